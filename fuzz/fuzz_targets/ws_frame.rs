//! The WebSocket frame decoder (`src/bridge/ws.rs`, compiled from its
//! source): any bytes, whole or in pieces. Checks: no panic; the same frames
//! and the same error (or tail) however the stream is cut; a payload never
//! exceeds the limit, control frames never exceed 125 bytes; every prefix
//! of the stream decodes to "not yet" or to the whole stream's first answer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swiftlet_fuzz::bridge::ws;
use swiftlet_fuzz::{feed, split};

fuzz_target!(|data: &[u8]| {
    let Some((ctl, stream, cuts)) = split(data) else {
        return;
    };
    let max = if ctl & 0x80 != 0 { 100 } else { 64 * 1024 };
    let whole = feed(stream, &[], |b| ws::decode(b, max));
    let pieces = feed(stream, &cuts, |b| ws::decode(b, max));
    assert_eq!(pieces, whole, "cut at {cuts:?}");
    for f in &whole.0 {
        assert!(f.payload.len() <= max);
        assert!(f.opcode < ws::OP_CLOSE || f.payload.len() <= 125);
        assert!(f.opcode != ws::OP_CONTINUATION);
    }
    let first = ws::decode(stream, max);
    for n in 0..stream.len().min(64) {
        match ws::decode(&stream[..n], max) {
            Ok(None) => {}
            part => assert_eq!(part, first, "prefix of {n} bytes"),
        }
    }
});
