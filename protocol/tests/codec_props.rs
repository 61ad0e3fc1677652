//! Property tests of the framing codec (issue 14, "Fuzzing"): what the
//! scripted chunks of `tests/codec.rs` check for a few inputs, checked here
//! for arbitrary ones.
//!
//! - Round trip: any sequence of Envelopes, encoded with [`encode_frame`],
//!   decodes to the same Envelopes, each using exactly its bytes, with the
//!   slice decoder and with the tokio [`FrameCodec`], however the stream is
//!   split.
//! - Arbitrary bytes: [`decode_frame`] never panics, and a stream fed in
//!   pieces split at arbitrary points gives the same frames and the same
//!   error (or the same unconsumed tail) as the stream fed whole. This is
//!   what lets a shard decode whatever one read brought and keep the rest.
//! - Prefixes: a prefix of a stream decodes to "not yet" or to exactly what
//!   the whole stream decodes to; the length is refused from the head alone.
//!
//! `fuzz/fuzz_targets/frame_decoder.rs` checks the same under libFuzzer.

use bytes::BytesMut;
use proptest::prelude::*;
use swiftlet_protocol::codec::{decode_frame, decode_head, encode_frame};
use swiftlet_protocol::pb;
use swiftlet_protocol::{Body, Envelope, FrameCodec, FrameError};
use tokio_util::codec::Decoder;

/// A small maximum so that oversize lengths are common among random bytes.
const SMALL_MAX: usize = 300;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._@-]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<u32>(), text(), text()).prop_map(|(protocol_version, token, device_id)| {
            Body::Hello(pb::Hello {
                protocol_version,
                token,
                device_id,
                skip_own_sends: false,
            })
        }),
        (
            text(),
            text(),
            text(),
            prop::collection::vec(any::<u8>(), 0..600),
            any::<u64>()
        )
            .prop_map(|(client_msg_id, to_user, content_type, body, group_id)| {
                Body::Send(pb::Send {
                    client_msg_id,
                    to_user,
                    content_type,
                    body: body.into(),
                    group_id,
                })
            }),
        any::<u64>().prop_map(|nonce| Body::Ping(pb::Ping { nonce })),
        any::<u64>().prop_map(|nonce| Body::Pong(pb::Pong { nonce })),
        (any::<u64>(), any::<u32>())
            .prop_map(|(after, limit)| Body::Sync(pb::Sync { after, limit })),
        (any::<i32>(), text(), any::<bool>(), any::<u32>()).prop_map(
            |(code, message, fatal, retry_after_ms)| {
                Body::Error(pb::Error {
                    code,
                    message,
                    fatal,
                    retry_after_ms,
                    ..Default::default()
                })
            }
        ),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), prop::option::weighted(0.95, body()))
        .prop_map(|(request_id, body)| Envelope { request_id, body })
}

/// Cut points (sorted, deduplicated, within `0..=len`) from random fractions.
fn cuts(len: usize, fractions: &[f64]) -> Vec<usize> {
    let mut c: Vec<usize> = fractions
        .iter()
        .map(|f| ((len as f64) * f) as usize)
        .map(|c| c.min(len))
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// How a stream ended: an error (as text, since `FrameError` wraps foreign
/// errors without `PartialEq`) or the number of bytes left undecoded.
#[derive(Debug, PartialEq)]
enum End {
    Error(String),
    Tail(usize),
}

/// Decode `stream` as a shard does: append each piece to a buffer, decode
/// every whole frame in it, keep the rest for the next piece, stop at the
/// first error.
fn feed(stream: &[u8], cut_points: &[usize], max: usize) -> (Vec<Envelope>, End) {
    let mut frames = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut from = 0;
    for &to in cut_points.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match decode_frame(&buf, max) {
                Ok(Some((env, used))) => {
                    assert!(
                        used > 0 && used <= buf.len(),
                        "used {used} of {}",
                        buf.len()
                    );
                    frames.push(env);
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => return (frames, End::Error(e.to_string())),
            }
        }
    }
    (frames, End::Tail(buf.len()))
}

/// The same through the tokio codec.
fn feed_codec(stream: &[u8], cut_points: &[usize], max: usize) -> (Vec<Envelope>, End) {
    let mut codec = FrameCodec::new(max);
    let mut frames = Vec::new();
    let mut buf = BytesMut::new();
    let mut from = 0;
    for &to in cut_points.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(env)) => frames.push(env),
                Ok(None) => break,
                Err(e) => return (frames, End::Error(e.to_string())),
            }
        }
    }
    (frames, End::Tail(buf.len()))
}

fn encode_all(envs: &[Envelope]) -> Vec<u8> {
    let mut out = Vec::new();
    for env in envs {
        encode_frame(env, &mut out);
    }
    out
}

/// Random bytes biased towards streams that contain some valid frames.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        (
            prop::collection::vec(envelope(), 0..4),
            prop::collection::vec(any::<u8>(), 0..20),
            any::<prop::sample::Index>(),
            any::<u8>()
        )
            .prop_map(|(envs, garbage, at, flip)| {
                // Valid frames with garbage spliced in and one byte flipped.
                let mut s = encode_all(&envs);
                let i = if s.is_empty() { 0 } else { at.index(s.len()) };
                if let Some(b) = s.get_mut(i) {
                    *b ^= flip;
                }
                s.splice(i..i, garbage);
                s
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip_however_the_stream_is_split(
        envs in prop::collection::vec(envelope(), 0..6),
        fractions in prop::collection::vec(0.0..1.0f64, 0..8),
    ) {
        let stream = encode_all(&envs);
        let cut_points = cuts(stream.len(), &fractions);
        let max = 1 << 20;
        prop_assert_eq!(feed(&stream, &cut_points, max), (envs.clone(), End::Tail(0)));
        prop_assert_eq!(feed_codec(&stream, &cut_points, max), (envs, End::Tail(0)));
    }

    #[test]
    fn one_frame_uses_exactly_its_bytes(env in envelope(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut buf = Vec::new();
        encode_frame(&env, &mut buf);
        let len = buf.len();
        buf.extend_from_slice(&tail);
        let (decoded, used) = decode_frame(&buf, 1 << 20)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("whole frame not decoded"))?;
        prop_assert_eq!(decoded, env);
        prop_assert_eq!(used, len);
    }

    #[test]
    fn arbitrary_bytes_decode_the_same_in_pieces_as_whole(
        stream in stream(),
        fractions in prop::collection::vec(0.0..1.0f64, 0..12),
        max in prop_oneof![Just(SMALL_MAX), Just(1usize << 16)],
    ) {
        let whole = feed(&stream, &[], max);
        let cut_points = cuts(stream.len(), &fractions);
        prop_assert_eq!(&feed(&stream, &cut_points, max), &whole);
        // Byte by byte, the extreme split.
        let every: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(&feed(&stream, &every, max), &whole);
        // The tokio codec agrees with the slice decoder.
        prop_assert_eq!(&feed_codec(&stream, &cut_points, max), &whole);
    }

    #[test]
    fn a_prefix_is_not_yet_or_the_same_answer(
        stream in stream(),
        max in prop_oneof![Just(SMALL_MAX), Just(1usize << 16)],
    ) {
        let whole = decode_frame(&stream, max).map_err(|e| e.to_string());
        for n in 0..=stream.len() {
            match decode_frame(&stream[..n], max).map_err(|e| e.to_string()) {
                Ok(None) => {}
                part => prop_assert_eq!(&part, &whole, "prefix of {} bytes", n),
            }
        }
    }

    #[test]
    fn an_oversize_length_is_refused_from_its_head_alone(
        len in (SMALL_MAX as u64 + 1)..(1u64 << 35),
    ) {
        let mut head = Vec::new();
        prost::encoding::encode_varint(len, &mut head);
        // No body at all, and still refused: nothing is reserved for it.
        let refused = matches!(decode_head(&head, SMALL_MAX), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused, "length {} not refused", len);
    }
}
