//! What the fuzz targets share: the server's bridge parsers, compiled from
//! their source files, and the piecewise feeding every target checks.
//!
//! `src/bridge/ws.rs` and `src/bridge/http.rs` are pure functions over byte
//! slices, but they live in the `swiftlet` crate, which links RocksDB; built
//! with sanitizer flags that would take 15+ minutes and gain nothing. Their
//! imports are small (base64, sha1, httparse, serde_json, the protocol
//! crate), so this crate compiles the same files as its own modules. What
//! is fuzzed is the code the server runs, byte for byte.

#![allow(dead_code)]

// Siblings at the root, as in the server's `bridge` module, so that
// http.rs's `super::ws` resolves.
#[path = "../../src/bridge/http.rs"]
pub mod http;
#[path = "../../src/bridge/ws.rs"]
pub mod ws;

/// The server's `bridge` module, the parsers only.
pub mod bridge {
    pub use crate::{http, ws};
}

/// Split the fuzzer's input into a control byte and the stream, and derive
/// up to 15 cut points in the stream from the control byte (xorshift), so
/// libFuzzer explores splits as well as contents.
pub fn split(data: &[u8]) -> Option<(u8, &[u8], Vec<usize>)> {
    let (&ctl, stream) = data.split_first()?;
    let mut cuts = Vec::new();
    let mut x = u32::from(ctl) | 0x9E37_0000;
    for _ in 0..(ctl & 0x0F) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        cuts.push(x as usize % (stream.len() + 1));
    }
    cuts.sort_unstable();
    cuts.dedup();
    Some((ctl, stream, cuts))
}

/// How a decoded stream ended.
#[derive(Debug, PartialEq)]
pub enum End<E> {
    Error(E),
    Tail(usize),
}

/// Feed `stream` to `decode` as a shard does: append each piece (cut at
/// `cuts`) to a buffer, decode every whole item, keep the rest, stop at the
/// first error. Panics if `decode` claims more bytes than it was given.
pub fn feed<T, E>(
    stream: &[u8],
    cuts: &[usize],
    mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> (Vec<T>, End<E>) {
    let mut items = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match decode(&buf) {
                Ok(Some((item, used))) => {
                    assert!(
                        used > 0 && used <= buf.len(),
                        "used {used} of {}",
                        buf.len()
                    );
                    items.push(item);
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => return (items, End::Error(e)),
            }
        }
    }
    (items, End::Tail(buf.len()))
}
