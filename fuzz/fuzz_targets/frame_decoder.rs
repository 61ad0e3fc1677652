//! The TCP framing (`swiftlet_protocol::codec`): any bytes, whole or in
//! pieces, through the slice decoder and the tokio codec. Checks: no panic;
//! the same frames and the same error (or tail) however the stream is cut;
//! the tokio codec agrees; every decoded Envelope re-encodes to a frame that
//! decodes to itself.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use swiftlet_fuzz::{feed, split};
use swiftlet_protocol::codec::{decode_frame, encode_frame};
use swiftlet_protocol::FrameCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, stream, cuts)) = split(data) else {
        return;
    };
    let max = if ctl & 0x80 != 0 { 300 } else { 64 * 1024 };
    let text = |r: Result<_, swiftlet_protocol::FrameError>| r.map_err(|e| e.to_string());
    let whole = feed(stream, &[], |b| text(decode_frame(b, max)));
    let pieces = feed(stream, &cuts, |b| text(decode_frame(b, max)));
    assert_eq!(pieces, whole, "cut at {cuts:?}");

    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let via_codec = feed(stream, &cuts, |b| {
        // The codec consumes from its own buffer; hand it only what is new.
        buf.extend_from_slice(&b[buf.len()..]);
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(env)) => Ok(Some((env, before - buf.len()))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    });
    assert_eq!(via_codec, whole, "tokio codec, cut at {cuts:?}");

    for env in whole.0 {
        let mut out = Vec::new();
        encode_frame(&env, &mut out);
        let (again, used) = decode_frame(&out, usize::MAX)
            .expect("a re-encoded frame decodes")
            .expect("whole");
        assert_eq!((again, used), (env, out.len()));
    }
});
