//! Hand-rolled WebSocket framing (RFC 6455) for `--transport ws`: the client
//! side only, as much as swiftlet's `GET /ws` needs. Each binary message is
//! one protobuf `Envelope` with no varint prefix. Client frames are masked
//! binary frames (FIN=1); server frames are unmasked. Fragmented messages
//! are refused (the server never fragments). Pure functions over buffers, so
//! [`crate::conn::Conn`] keeps its two buffers and no extra task per
//! connection.

use std::ops::Range;

use bytes::{BufMut, BytesMut};
use prost::Message as _;
use swiftlet_protocol::Envelope;

#[cfg(test)]
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Why bytes from the server are not a frame we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("fragmented frame (FIN=0 or continuation)")]
    Fragmented,
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(u64),
    #[error("control frame longer than 125 bytes")]
    LongControl,
    #[error("reserved bits set")]
    Reserved,
}

/// One decoded frame header: where its payload lies in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    /// The masking key, if the frame is masked (server frames never are).
    pub mask: Option<[u8; 4]>,
    /// The payload's byte range in the decoded buffer (still masked if
    /// `mask` is set).
    pub payload: Range<usize>,
    /// Bytes the whole frame takes.
    pub used: usize,
}

/// Append a frame header for a masked frame of `len` payload bytes.
pub fn put_header(out: &mut BytesMut, opcode: u8, len: usize, mask: [u8; 4]) {
    out.put_u8(0x80 | opcode);
    if len <= 125 {
        out.put_u8(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(0x80 | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&mask);
}

/// XOR `buf` with the masking key (masking and unmasking are the same).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Append `payload` as one masked frame.
pub fn encode_masked(out: &mut BytesMut, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    put_header(out, opcode, payload.len(), mask);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Append `env` as one masked binary frame, encoded in place (no copy).
pub fn encode_envelope(out: &mut BytesMut, env: &Envelope, mask: [u8; 4]) {
    let len = env.encoded_len();
    put_header(out, OP_BINARY, len, mask);
    let start = out.len();
    out.reserve(len);
    env.encode_raw(out);
    apply_mask(&mut out[start..], mask);
}

/// Decode one frame header from the front of `buf`; `Ok(None)` until the
/// whole frame (header and payload) is there.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<Frame>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let opcode = b0 & 0x0F;
    if b0 & 0x80 == 0 || opcode == 0 {
        return Err(WsError::Fragmented);
    }
    let mut pos = 2;
    let len = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            pos = 4;
            u64::from(u16::from_be_bytes([buf[2], buf[3]]))
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            pos = 10;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if opcode >= OP_CLOSE && len > 125 {
        return Err(WsError::LongControl);
    }
    if len > max_payload as u64 {
        return Err(WsError::TooLarge(len));
    }
    let mask = if b1 & 0x80 != 0 {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    let end = pos + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(Frame {
        opcode,
        mask,
        payload: pos..end,
        used: end,
    }))
}

/// The position just past the `\r\n\r\n` ending an HTTP head, if present.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Check an upgrade response head: the status must be 101.
pub fn check_upgrade(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("101")) if v.starts_with("HTTP/1.") => Ok(()),
        _ => Err(format!("upgrade refused: {line:?}")),
    }
}

/// The upgrade request for `host` with a fresh random key.
pub fn upgrade_request(host: &str, key: [u8; 16]) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use swiftlet_protocol::{pb, Body};

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Encode `len` bytes masked, check the header form, decode, unmask.
    fn roundtrip(len: usize, header_len: usize, len_byte: u8) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let mut out = BytesMut::new();
        encode_masked(&mut out, OP_BINARY, &payload, MASK);
        assert_eq!(out.len(), header_len + len);
        assert_eq!(out[0], 0x82, "FIN + binary");
        assert_eq!(out[1], 0x80 | len_byte, "MASK bit + length form");
        assert_eq!(&out[header_len - 4..header_len], &MASK);
        if len > 0 {
            assert_ne!(&out[header_len..], &payload[..], "payload is masked");
        }
        // Every proper prefix is incomplete, not an error.
        for cut in 0..out.len() {
            assert_eq!(decode(&out[..cut], 1 << 20), Ok(None), "cut at {cut}");
        }
        let f = decode(&out, 1 << 20).expect("valid").expect("complete");
        assert_eq!(f.opcode, OP_BINARY);
        assert_eq!(f.mask, Some(MASK));
        assert_eq!(f.used, out.len());
        let mut got = out[f.payload].to_vec();
        apply_mask(&mut got, MASK);
        assert_eq!(got, payload);
    }

    #[test]
    fn seven_bit_length() {
        roundtrip(0, 6, 0);
        roundtrip(5, 6, 5);
        roundtrip(125, 6, 125);
    }

    #[test]
    fn sixteen_bit_length() {
        roundtrip(126, 8, 126);
        roundtrip(65_535, 8, 126);
    }

    #[test]
    fn sixty_four_bit_length() {
        roundtrip(65_536, 14, 127);
        roundtrip(70_000, 14, 127);
    }

    #[test]
    fn masking_matches_rfc_example() {
        // RFC 6455 §5.7: a masked "Hello".
        let mut out = BytesMut::new();
        encode_masked(&mut out, OP_TEXT, b"Hello", MASK);
        assert_eq!(
            &out[..],
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn unmasked_server_frames() {
        // RFC 6455 §5.7: an unmasked "Hello", then a 256-byte binary frame
        // (16-bit length) and a 65,536-byte one (64-bit length).
        let hello = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let f = decode(&hello, 1000).expect("valid").expect("complete");
        assert_eq!(
            (f.opcode, f.mask, f.payload, f.used),
            (OP_TEXT, None, 2..7, 7)
        );

        let mut b = vec![0x82, 0x7E, 0x01, 0x00];
        b.resize(4 + 256, 9);
        let f = decode(&b, 1000).expect("valid").expect("complete");
        assert_eq!((f.payload, f.used), (4..260, 260));

        let mut b = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0];
        b.resize(10 + 65_536, 9);
        let f = decode(&b, 1 << 20).expect("valid").expect("complete");
        assert_eq!((f.payload, f.used), (10..65_546, 65_546));
        assert_eq!(decode(&b, 1000), Err(WsError::TooLarge(65_536)));
    }

    #[test]
    fn refused_frames() {
        assert_eq!(decode(&[0x02, 0x00], 10), Err(WsError::Fragmented));
        assert_eq!(decode(&[0x80, 0x00], 10), Err(WsError::Fragmented));
        assert_eq!(decode(&[0xC2, 0x00], 10), Err(WsError::Reserved));
        assert_eq!(
            decode(&[0x89, 0x7E, 0, 200], 1000),
            Err(WsError::LongControl)
        );
    }

    #[test]
    #[allow(clippy::needless_update)]
    fn envelope_frame_roundtrip() {
        let env = Envelope::new(
            42,
            Body::Hello(pb::Hello {
                protocol_version: 1,
                token: "u1".into(),
                device_id: "d1".into(),
                ..Default::default()
            }),
        );
        let mut out = BytesMut::new();
        encode_envelope(&mut out, &env, MASK);
        let f = decode(&out, 1 << 16).expect("valid").expect("complete");
        assert_eq!(f.used, out.len());
        let mut body = out[f.payload].to_vec();
        apply_mask(&mut body, MASK);
        assert_eq!(Envelope::decode(body.as_slice()).expect("envelope"), env);
    }

    #[test]
    fn upgrade_head() {
        let r = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x82\x00";
        let end = head_end(r).expect("head end");
        assert_eq!(&r[end..], b"\x82\x00");
        assert!(check_upgrade(&r[..end]).is_ok());
        assert!(check_upgrade(b"HTTP/1.1 403 Forbidden\r\n\r\n").is_err());
        assert_eq!(head_end(b"HTTP/1.1 101 Switching\r\n"), None);
        let req = upgrade_request("127.0.0.1:7480", [0; 16]);
        assert!(req.starts_with("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:7480\r\n"));
        assert!(req.contains("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
