//! Decoding one connection's input, one frame at a time.
//!
//! [`next`] decodes the frame at the front of a byte slice (the bytes of one
//! read, or what the connection kept from earlier reads) for the
//! connection's transport, and the shard hands each frame to the session
//! before it decodes the next. Nothing decoded is stored anywhere: a frame
//! lives in the caller's stack frame for as long as it is handled, so the
//! input of one connection cannot reach another, even when decoding stops
//! early (an error, a full output budget, the turn's share spent). An
//! earlier design collected a read's frames in a shard-wide list, and a
//! connection refused halfway left its frames there for the next reader to
//! run as its own.
//!
//! Decoding frame by frame is also what lets the shard stop at any frame:
//! what is not decoded stays bytes in the connection's input buffer (see
//! [`super::conn::Conn::keep_input`]), counted against its budget.

use prost::Message as _;
use swiftlet_protocol::codec::{decode_frame, decode_head, FrameError};
use swiftlet_protocol::{Envelope, ErrorCode};

use super::conn::Transport;
use crate::bridge::ws;

/// One decoded unit of input.
#[derive(Debug)]
pub enum Input {
    /// An Envelope for the session.
    Frame(Envelope),
    /// A WebSocket ping: answer with a pong carrying this payload.
    WsPing(Vec<u8>),
    /// A WebSocket frame with nothing to do (a pong).
    Skip,
}

/// Why a connection's input ends it: the code the client is told, and the
/// WebSocket close code when it speaks WebSocket. `ErrorCode::Unspecified`
/// means no Error frame is sent (the client closed).
#[derive(Debug)]
pub struct Fatal {
    pub code: ErrorCode,
    pub why: String,
    pub ws_close: Option<u16>,
    /// The Error to send instead of one made from `code` and `why` (it
    /// says more: a cluster redirect).
    pub detail: Option<Box<swiftlet_protocol::pb::Error>>,
}

impl From<FrameError> for Fatal {
    fn from(e: FrameError) -> Self {
        let code = match e {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        };
        Fatal {
            code,
            why: e.to_string(),
            ws_close: None,
            detail: None,
        }
    }
}

/// Decode the unit at the front of `data`: it and the bytes it used, or
/// `Ok(None)` when `data` holds only part of one. `max` is the largest
/// frame (payload, for WebSocket) accepted.
pub fn next(
    transport: Transport,
    data: &[u8],
    max: usize,
) -> Result<Option<(Input, usize)>, Fatal> {
    match transport {
        Transport::Tcp => Ok(decode_frame(data, max)?.map(|(env, used)| (Input::Frame(env), used))),
        Transport::WebSocket => next_ws(data, max),
        // An HTTP request is parsed whole by the bridge, never framed.
        Transport::Http => Ok(None),
    }
}

fn next_ws(data: &[u8], max: usize) -> Result<Option<(Input, usize)>, Fatal> {
    let (frame, used) = match ws::decode(data, max) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(e) => {
            let (code, close) = match e {
                ws::WsError::TooLarge(_) => (ErrorCode::FrameTooLarge, ws::CLOSE_TOO_BIG),
                _ => (ErrorCode::MalformedFrame, ws::CLOSE_PROTOCOL),
            };
            return Err(Fatal {
                code,
                why: e.to_string(),
                ws_close: Some(close),
                detail: None,
            });
        }
    };
    let input = match frame.opcode {
        ws::OP_BINARY => match Envelope::decode(frame.payload.as_slice()) {
            Ok(env) => Input::Frame(env),
            Err(e) => {
                return Err(Fatal {
                    code: ErrorCode::MalformedFrame,
                    why: format!("malformed envelope: {e}"),
                    ws_close: Some(ws::CLOSE_INVALID_PAYLOAD),
                    detail: None,
                })
            }
        },
        ws::OP_TEXT => {
            return Err(Fatal {
                code: ErrorCode::MalformedFrame,
                why: "text frames are not accepted: send each Envelope as one binary message"
                    .into(),
                ws_close: Some(ws::CLOSE_UNSUPPORTED),
                detail: None,
            })
        }
        ws::OP_PING => Input::WsPing(frame.payload),
        ws::OP_CLOSE => {
            return Err(Fatal {
                code: ErrorCode::Unspecified,
                why: "closed by the client".into(),
                ws_close: Some(ws::CLOSE_NORMAL),
                detail: None,
            })
        }
        ws::OP_PONG => Input::Skip,
        // RFC 6455 5.2: an endpoint fails the connection on an opcode it
        // does not know (3-7 and 11-15 are reserved).
        op => {
            return Err(Fatal {
                code: ErrorCode::MalformedFrame,
                why: format!("reserved WebSocket opcode {op}"),
                ws_close: Some(ws::CLOSE_PROTOCOL),
                detail: None,
            })
        }
    };
    Ok(Some((input, used)))
}

/// The whole size of the frame that starts `partial`, when its head says
/// so and the frame is within `max`: the input buffer is sized once for it
/// instead of doubling as its bytes trickle in. A head claiming more than
/// `max` gives `None`: it may not have been checked yet (the loop stops
/// before a frame when the connection is paused or its turn is spent, and
/// after a fatal error the rest is kept too), and a client must never make
/// the server reserve what it claims (a WebSocket length of 2^62 did,
/// and aborted the process).
pub fn frame_size(transport: Transport, partial: &[u8], max: usize) -> Option<usize> {
    match transport {
        Transport::Tcp => match decode_head(partial, max) {
            Ok(Some((len, head))) => Some(head + len),
            _ => None,
        },
        Transport::WebSocket => ws_frame_size(partial, max),
        Transport::Http => None,
    }
}

/// A client WebSocket frame's size from its header: 2 bytes, the extended
/// length, the 4-byte mask, the payload (`None` over `max`).
fn ws_frame_size(partial: &[u8], max: usize) -> Option<usize> {
    let b1 = *partial.get(1)?;
    let (len, head) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes([*partial.get(2)?, *partial.get(3)?])),
            4,
        ),
        127 => {
            let bytes: [u8; 8] = partial.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len).ok().filter(|l| *l <= max)?;
    len.checked_add(head + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use swiftlet_protocol::codec::encode_frame;
    use swiftlet_protocol::{pb, Body};

    fn ping(rid: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(
            &Envelope::new(rid, Body::Ping(pb::Ping { nonce: rid })),
            &mut out,
        );
        out
    }

    #[test]
    fn frames_come_one_at_a_time_and_a_bad_one_ends_the_input() {
        let mut bytes = ping(1);
        bytes.extend(ping(2));
        bytes.extend([3u8, 0x0f, 0xff, 0xff]);
        let (first, used) = next(Transport::Tcp, &bytes, 1024)
            .expect("valid")
            .expect("whole");
        assert!(matches!(first, Input::Frame(e) if e.request_id == 1));
        let (second, used2) = next(Transport::Tcp, &bytes[used..], 1024)
            .expect("valid")
            .expect("whole");
        assert!(matches!(second, Input::Frame(e) if e.request_id == 2));
        let err = next(Transport::Tcp, &bytes[used + used2..], 1024).expect_err("garbage");
        assert_eq!(err.code, ErrorCode::MalformedFrame);
    }

    #[test]
    fn a_partial_frame_is_not_an_error_and_its_size_is_known_early() {
        let bytes = ping(7);
        assert!(next(Transport::Tcp, &bytes[..3], 1024)
            .expect("valid so far")
            .is_none());
        assert_eq!(
            frame_size(Transport::Tcp, &bytes[..1], 65_536),
            Some(bytes.len())
        );
        let mut big = Vec::new();
        prost::encoding::encode_varint(60_000, &mut big);
        assert_eq!(
            frame_size(Transport::Tcp, &big, 65_536),
            Some(60_000 + big.len())
        );
        // WebSocket: header 4 (126 + u16 length) + mask 4 + payload.
        let ws = [0x82u8, 0x80 | 126, 0xEA, 0x60];
        assert_eq!(
            frame_size(Transport::WebSocket, &ws, 65_536),
            Some(60_000 + 8)
        );
        assert_eq!(frame_size(Transport::WebSocket, &ws[..3], 65_536), None);
    }

    #[test]
    fn a_head_over_the_maximum_sizes_nothing() {
        let mut big = Vec::new();
        prost::encoding::encode_varint(60_000, &mut big);
        assert_eq!(frame_size(Transport::Tcp, &big, 59_999), None);
        let mut huge = Vec::new();
        prost::encoding::encode_varint((1u64 << 35) - 1, &mut huge);
        assert_eq!(frame_size(Transport::Tcp, &huge, 65_536), None);
        // A 64-bit WebSocket length of 2^62: once reserved whole.
        let mut ws = vec![0x82u8, 0x80 | 127];
        ws.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert_eq!(frame_size(Transport::WebSocket, &ws, 65_536), None);
        let ws = [0x82u8, 0x80 | 126, 0xEA, 0x60];
        assert_eq!(frame_size(Transport::WebSocket, &ws, 59_999), None);
    }
}
