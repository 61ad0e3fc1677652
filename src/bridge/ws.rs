//! WebSocket framing (RFC 6455) for the shards: the opening handshake's
//! accept key, decoding client frames (masked, checked against the frame
//! limit before anything is buffered) and encoding server frames.
//!
//! Written here rather than taken from a WebSocket crate because the shards
//! own their sockets and buffers (see `crate::shard`): what they need is the
//! framing alone, over byte slices, in the same two-phase style as the
//! protobuf codec. Fragmented messages are refused: browsers send a binary
//! message of a few hundred bytes as one frame.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Frame opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the server uses.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_UNSUPPORTED: u16 = 1003;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Why bytes from a client are not acceptable WebSocket frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("fragmented messages are not supported")]
    Fragmented,
    #[error("reserved bits set")]
    Reserved,
    #[error("control frame too long")]
    BadControl,
}

/// One decoded client frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Decode one frame from the front of `buf`: the frame and the bytes it
/// used, or `Ok(None)` when `buf` holds only part of one.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !fin || opcode == OP_CONTINUATION {
        return Err(WsError::Fragmented);
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && len > 125 {
        return Err(WsError::BadControl);
    }
    if len > max_payload as u64 {
        return Err(WsError::TooLarge(len));
    }
    let len = len as usize;
    if buf.len() < pos + 4 + len {
        return Ok(None);
    }
    let mask = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
    pos += 4;
    let payload = buf[pos..pos + len]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some((Frame { opcode, payload }, pos + len)))
}

/// Append the header of an unmasked server frame carrying `len` bytes.
pub fn write_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Append a whole server frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    write_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Append a close frame with `code` and a short reason.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(120)];
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    write_frame(out, OP_CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_decode_in_pieces_and_limits_hold() {
        let payload = vec![7u8; 300];
        let f = client_frame(OP_BINARY, &payload);
        for cut in [0, 1, 3, 5, 8, f.len() - 1] {
            assert_eq!(decode(&f[..cut], 1000), Ok(None), "cut at {cut}");
        }
        let (frame, used) = decode(&f, 1000).expect("valid").expect("whole");
        assert_eq!(
            (frame.opcode, frame.payload, used),
            (OP_BINARY, payload, f.len())
        );
        // The length is refused from the header alone.
        assert_eq!(decode(&f[..4], 100), Err(WsError::TooLarge(300)));
        let mut unmasked = f.clone();
        unmasked[1] &= 0x7F;
        assert_eq!(decode(&unmasked, 1000), Err(WsError::Unmasked));
        let mut fragment = f;
        fragment[0] &= 0x7F;
        assert_eq!(decode(&fragment, 1000), Err(WsError::Fragmented));
    }

    #[test]
    fn server_frames_use_the_shortest_length() {
        let mut out = Vec::new();
        write_frame(&mut out, OP_BINARY, &[0; 125]);
        assert_eq!(&out[..2], &[0x82, 125]);
        out.clear();
        write_frame(&mut out, OP_BINARY, &[0; 126]);
        assert_eq!(&out[..4], &[0x82, 126, 0, 126]);
        out.clear();
        write_close(&mut out, CLOSE_TOO_BIG, "x");
        assert_eq!(out, vec![0x88, 3, 0x03, 0xF1, b'x']);
    }
}
