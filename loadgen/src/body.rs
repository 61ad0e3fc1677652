//! The loadgen message body: a fixed 24-byte header, then zero padding to
//! `--body-bytes`. The header carries what the receiver needs to measure and
//! check without any shared state: the send time (Unix nanoseconds, so a
//! receiver in another worker process can compute latency on the same
//! machine clock), the sender's index, and the sender's per-run counter
//! (strictly increasing, so per-sender order and duplicates are visible).

use std::time::{SystemTime, UNIX_EPOCH};

/// "LGB1": marks a body as ours (a foreign or stale message is not counted).
const MAGIC: u32 = 0x4c47_4231;

/// Bytes of the header; bodies are never shorter.
pub const HEADER_LEN: usize = 24;

/// The content type loadgen sends.
pub const CONTENT_TYPE: &str = "application/x-loadgen";

/// What a body says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub sent_unix_ns: u64,
    pub sender: u32,
    pub counter: u64,
}

/// Nanoseconds since the Unix epoch now.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A body of `len` bytes (at least [`HEADER_LEN`]) carrying `h`.
pub fn encode(h: &Header, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len.max(HEADER_LEN));
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&h.sent_unix_ns.to_be_bytes());
    out.extend_from_slice(&h.sender.to_be_bytes());
    out.extend_from_slice(&h.counter.to_be_bytes());
    out.resize(len.max(HEADER_LEN), 0);
    out
}

/// Append a body of `len` bytes (at least [`HEADER_LEN`]) carrying `h` to
/// `out`, without a buffer of its own.
pub fn put(h: &Header, len: usize, out: &mut impl bytes::BufMut) {
    out.put_u32(MAGIC);
    out.put_u64(h.sent_unix_ns);
    out.put_u32(h.sender);
    out.put_u64(h.counter);
    out.put_bytes(0, len.max(HEADER_LEN) - HEADER_LEN);
}

/// The header of a loadgen body, or `None` for anything else.
pub fn decode(body: &[u8]) -> Option<Header> {
    let head = body.get(..HEADER_LEN)?;
    let u32_at = |i: usize| head.get(i..i + 4)?.try_into().ok().map(u32::from_be_bytes);
    let u64_at = |i: usize| head.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
    if u32_at(0)? != MAGIC {
        return None;
    }
    Some(Header {
        sent_unix_ns: u64_at(4)?,
        sender: u32_at(12)?,
        counter: u64_at(16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let h = Header {
            sent_unix_ns: unix_ns(),
            sender: 4242,
            counter: 7,
        };
        let b = encode(&h, 100);
        assert_eq!(b.len(), 100);
        assert_eq!(decode(&b), Some(h));
        assert_eq!(
            encode(&h, 3).len(),
            HEADER_LEN,
            "never shorter than the header"
        );
    }

    #[test]
    fn foreign_bodies_are_refused() {
        assert_eq!(decode(b"hello"), None);
        assert_eq!(decode(&[0u8; 40]), None);
        let mut b = encode(
            &Header {
                sent_unix_ns: 1,
                sender: 2,
                counter: 3,
            },
            24,
        );
        b.truncate(23);
        assert_eq!(decode(&b), None);
    }
}
