//! Length-delimited framing: `varint(len) ‖ Envelope`, as protobuf's own
//! "delimited" format, so any protobuf library reads and writes it.
//!
//! The decoder is two-phase, like tokio-util's `LengthDelimitedCodec`: read
//! the head (the varint), check the length against the maximum *before* any
//! memory is reserved for the body, then wait until the whole body is there.
//! A short read is `Ok(None)`, never an error. The slice functions
//! ([`decode_frame`], [`encode_frame`]) serve the server's mio loops, which own
//! their buffers; [`FrameCodec`] wraps them for tokio.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::pb::Envelope;

/// Default largest accepted frame body, in bytes (64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// The longest varint a length may use. 5 bytes encode up to 2^35-1, far past
/// any sane maximum; a longer varint is malformed, not merely large.
const MAX_VARINT_LEN: usize = 5;

/// Why a byte stream is not a valid sequence of frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: usize },
    /// The length prefix is not a valid varint.
    #[error("malformed length prefix")]
    BadLength,
    /// The frame body is not a valid Envelope.
    #[error("malformed envelope: {0}")]
    BadEnvelope(#[from] prost::DecodeError),
    /// An I/O error from the underlying stream (tokio codec only).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The head of a frame: the body's length and how many bytes the varint took.
/// `Ok(None)` when `buf` does not yet hold the whole varint.
pub fn decode_head(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_LEN) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if value > max as u64 {
                return Err(FrameError::TooLarge { len: value, max });
            }
            return Ok(Some((value as usize, i + 1)));
        }
        // A continuation already past the maximum can be refused early.
        if value > max as u64 {
            return Err(FrameError::TooLarge { len: value, max });
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(FrameError::BadLength);
    }
    Ok(None)
}

/// Decode one frame from the front of `buf`. Returns the envelope and the
/// number of bytes it used, or `Ok(None)` if `buf` holds only part of a frame.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(Envelope, usize)>, FrameError> {
    let Some((len, head)) = decode_head(buf, max)? else {
        return Ok(None);
    };
    let end = head + len;
    if buf.len() < end {
        return Ok(None);
    }
    let env = Envelope::decode(&buf[head..end])?;
    Ok(Some((env, end)))
}

/// Append one frame holding `env` to `out`.
pub fn encode_frame(env: &Envelope, out: &mut impl BufMut) {
    // encode_length_delimited only fails when the buffer is too small, and a
    // growable BufMut (Vec, BytesMut) never is.
    let len = env.encoded_len();
    prost::encoding::encode_varint(len as u64, out);
    env.encode_raw(out);
}

/// `env` as one frame in a fresh buffer.
pub fn frame_bytes(env: &Envelope) -> bytes::Bytes {
    let len = env.encoded_len();
    let mut out = BytesMut::with_capacity(len + MAX_VARINT_LEN);
    encode_frame(env, &mut out);
    out.freeze()
}

/// The frame of a `Deliver` push, `Envelope { request_id: 0, deliver:
/// Deliver { event: Event { seq, kind } } }`, built from `event_without_seq`,
/// the encoding of `Event { seq: 0, kind }`.
///
/// A group message reaches every member with a different `seq`; encoding
/// the event body once and splicing the seq in front per member saves
/// re-encoding the message for each of them. The bytes are exactly what
/// prost would produce (a test checks it): fields in tag order, seq first.
pub fn deliver_frame(seq: u64, event_without_seq: &[u8]) -> bytes::Bytes {
    let env_len = deliver_envelope_len(seq, event_without_seq.len());
    let mut out =
        BytesMut::with_capacity(prost::encoding::encoded_len_varint(env_len as u64) + env_len);
    write_deliver_frame(&mut out, seq, event_without_seq);
    out.freeze()
}

const DELIVER_TAG: u64 = (22 << 3) | 2; // Envelope.deliver, length-delimited
const EVENT_TAG: u8 = (1 << 3) | 2; // Deliver.event, length-delimited
const SEQ_TAG: u8 = 1 << 3; // Event.seq, varint

/// `(Event length, Deliver length)` of a spliced Deliver.
fn deliver_lens(seq: u64, event_without_seq: usize) -> (usize, usize) {
    use prost::encoding::encoded_len_varint;
    let seq_len = if seq == 0 {
        0
    } else {
        1 + encoded_len_varint(seq)
    };
    let event_len = seq_len + event_without_seq;
    let deliver_len = 1 + encoded_len_varint(event_len as u64) + event_len;
    (event_len, deliver_len)
}

/// The encoded length of `Envelope { deliver: { event: { seq, .. } } }`
/// whose event without its seq is `event_without_seq` bytes long: the body
/// of the frame [`write_deliver_frame`] writes, for transports that frame
/// it themselves (WebSocket).
pub fn deliver_envelope_len(seq: u64, event_without_seq: usize) -> usize {
    let (_, deliver_len) = deliver_lens(seq, event_without_seq);
    prost::encoding::encoded_len_varint(DELIVER_TAG)
        + prost::encoding::encoded_len_varint(deliver_len as u64)
        + deliver_len
}

/// Append the Deliver envelope of [`deliver_frame`] to `out`, without the
/// length prefix (see [`deliver_envelope_len`]).
pub fn write_deliver_envelope(out: &mut impl BufMut, seq: u64, event_without_seq: &[u8]) {
    use prost::encoding::encode_varint;
    let (event_len, deliver_len) = deliver_lens(seq, event_without_seq.len());
    encode_varint(DELIVER_TAG, out);
    encode_varint(deliver_len as u64, out);
    out.put_u8(EVENT_TAG);
    encode_varint(event_len as u64, out);
    if seq != 0 {
        out.put_u8(SEQ_TAG);
        encode_varint(seq, out);
    }
    out.put_slice(event_without_seq);
}

/// Append the whole frame of [`deliver_frame`] to `out`: the shards write a
/// group message's one encoded event straight into each member's output
/// buffer, with no per-member allocation.
pub fn write_deliver_frame(out: &mut impl BufMut, seq: u64, event_without_seq: &[u8]) {
    let env_len = deliver_envelope_len(seq, event_without_seq.len());
    prost::encoding::encode_varint(env_len as u64, out);
    write_deliver_envelope(out, seq, event_without_seq);
}

/// tokio-util codec over [`decode_frame`] / [`encode_frame`].
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Envelope;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, FrameError> {
        match decode_head(src, self.max_frame)? {
            None => Ok(None),
            Some((len, head)) => {
                if src.len() < head + len {
                    // Reserve only once the length is known to be acceptable.
                    src.reserve(head + len - src.len());
                    return Ok(None);
                }
                src.advance(head);
                let body = src.split_to(len);
                Ok(Some(Envelope::decode(body.freeze())?))
            }
        }
    }
}

impl tokio_util::codec::Encoder<&Envelope> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, env: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(env.encoded_len() + MAX_VARINT_LEN);
        encode_frame(env, dst);
        Ok(())
    }
}

impl tokio_util::codec::Encoder<Envelope> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, env: Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        <Self as tokio_util::codec::Encoder<&Envelope>>::encode(self, &env, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn spliced_deliver_frames_equal_prost_encoding() {
        let kind = pb::event::Kind::Message(pb::Message {
            id: 77,
            from_user: "alice".into(),
            body: bytes::Bytes::from_static(&[1u8; 300]),
            group_id: 9,
            ..Default::default()
        });
        let without_seq = pb::Event {
            seq: 0,
            kind: Some(kind.clone()),
        }
        .encode_to_vec();
        for seq in [0u64, 1, 127, 128, 1 << 40] {
            let env = Envelope::new(
                0,
                crate::Body::Deliver(pb::Deliver {
                    event: Some(pb::Event {
                        seq,
                        kind: Some(kind.clone()),
                    }),
                }),
            );
            assert_eq!(
                deliver_frame(seq, &without_seq),
                frame_bytes(&env),
                "seq {seq}"
            );
            let mut appended = vec![0xAA];
            write_deliver_frame(&mut appended, seq, &without_seq);
            assert_eq!(appended[1..], frame_bytes(&env)[..], "appended, seq {seq}");
            assert_eq!(
                deliver_envelope_len(seq, without_seq.len()),
                env.encoded_len(),
                "envelope length, seq {seq}"
            );
        }
    }
}
