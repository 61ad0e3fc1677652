//! The swiftlet wire protocol: protobuf messages and their framing.
//!
//! - [`pb`]: the types generated from `proto/swiftlet.proto` (an [`pb::Envelope`]
//!   with a `oneof` body is the only thing on the wire).
//! - [`codec`]: the length-delimited framing (an unsigned varint length, then
//!   the encoded Envelope), both as plain functions over byte slices, used by
//!   the server's mio event loops, and as a tokio-util `Decoder`/`Encoder`,
//!   used by the async client and the bridge.
//!
//! Every message also has serde impls that follow proto3's JSON mapping
//! (camelCase names, 64-bit integers as strings, bytes as base64), used by
//! the HTTP sync and send endpoints.
//!
//! `README.md` beside this crate is the specification a third party writes a
//! client from.

pub mod codec;
pub mod token;

/// Generated protobuf types, package `swiftlet.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/swiftlet.v1.rs"));
    // serde impls following proto3's JSON mapping (for the HTTP endpoints).
    include!(concat!(env!("OUT_DIR"), "/swiftlet.v1.serde.rs"));
}

pub use codec::{FrameCodec, FrameError, DEFAULT_MAX_FRAME};
pub use pb::envelope::Body;
pub use pb::{Envelope, ErrorCode};

/// The protocol version this crate speaks; `Hello.protocol_version` must equal it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest `Error.message` [`Envelope::error`] writes, in bytes. A message
/// may quote what a client sent (an id, a token's claim), and an Error must
/// fit in a frame however large that was.
pub const MAX_ERROR_MESSAGE: usize = 1024;

impl Envelope {
    /// An envelope with the given request id and body.
    pub fn new(request_id: u64, body: Body) -> Self {
        Envelope {
            request_id,
            body: Some(body),
        }
    }

    /// An `Error` envelope, its message cut to [`MAX_ERROR_MESSAGE`] bytes
    /// (at a character boundary).
    pub fn error(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        fatal: bool,
    ) -> Self {
        let mut message = message.into();
        message.truncate(message.floor_char_boundary(MAX_ERROR_MESSAGE));
        Envelope::new(
            request_id,
            Body::Error(pb::Error {
                code: code as i32,
                message,
                fatal,
                ..Default::default()
            }),
        )
    }
}

impl ErrorCode {
    /// True when the server closes the connection after sending this code
    /// (codes 2000 and up).
    pub fn is_fatal(self) -> bool {
        (self as i32) >= 2000
    }

    /// True when reconnecting unchanged can succeed (codes below 3000).
    pub fn may_reconnect(self) -> bool {
        (self as i32) < 3000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_cut_at_a_character_boundary() {
        let message = |env: Envelope| match env.body {
            Some(Body::Error(e)) => e.message,
            other => panic!("{other:?}"),
        };
        let short = Envelope::error(1, ErrorCode::Internal, "short", true);
        assert_eq!(message(short), "short");
        // 3-byte characters: 1,024 is not a boundary, 1,023 is.
        let long = Envelope::error(1, ErrorCode::Internal, "\u{200b}".repeat(1000), true);
        assert_eq!(message(long).len(), 1023);
    }
}
