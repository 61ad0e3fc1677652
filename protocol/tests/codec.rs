//! Framing codec tests, in the manner of tokio-util's `LengthDelimitedCodec`
//! tests: frames fed whole, in scripted chunks and one byte at a time, several
//! per buffer, truncated, oversized and malformed; plus the exact bytes of the
//! worked example in `protocol/README.md`.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use swiftlet_protocol::codec::{decode_frame, decode_head, encode_frame, frame_bytes};
use swiftlet_protocol::pb;
use swiftlet_protocol::{Body, Envelope, ErrorCode, FrameCodec, FrameError, DEFAULT_MAX_FRAME};
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------- fixtures

/// 2025-01-01T00:00:00Z in Unix milliseconds.
const T_2025: u64 = 1_735_689_600_000;
/// The message-id epoch, 2024-01-01T00:00:00Z in Unix milliseconds.
const ID_EPOCH: u64 = 1_704_067_200_000;

/// A server message id as README "Message ids" lays it out.
fn msg_id(unix_ms: u64, node: u64, seq: u64) -> u64 {
    ((unix_ms - ID_EPOCH) << 22) | (node << 12) | seq
}

fn hello() -> Envelope {
    Envelope::new(
        1,
        Body::Hello(pb::Hello {
            protocol_version: 1,
            token: "alice".into(),
            device_id: "phone".into(),
            skip_own_sends: false,
        }),
    )
}

fn send() -> Envelope {
    Envelope::new(
        2,
        Body::Send(pb::Send {
            client_msg_id: "m1".into(),
            to_user: "bob".into(),
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"hi"),
            group_id: 0,
        }),
    )
}

fn ack() -> Envelope {
    Envelope::new(
        2,
        Body::Ack(pb::Ack {
            client_msg_id: "m1".into(),
            server_msg_id: msg_id(T_2025, 1, 0),
            timestamp_ms: T_2025,
            seq: 1,
        }),
    )
}

fn deliver() -> Envelope {
    Envelope::new(
        0,
        Body::Deliver(pb::Deliver {
            event: Some(pb::Event {
                seq: 1,
                kind: Some(pb::event::Kind::Message(pb::Message {
                    id: msg_id(T_2025, 1, 0),
                    from_user: "alice".into(),
                    from_device: "phone".into(),
                    to_user: "bob".into(),
                    client_msg_id: "m1".into(),
                    timestamp_ms: T_2025,
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"hi"),
                    group_id: 0,
                })),
            }),
        }),
    )
}

/// A frame whose body needs a 2-byte length varint (len >= 128).
fn big_send() -> Envelope {
    Envelope::new(
        7,
        Body::Send(pb::Send {
            client_msg_id: "01J0Z8Q6W9V4K2M3N5P7R8S9T0".into(),
            to_user: "bob".into(),
            content_type: "text/plain; charset=utf-8".into(),
            body: Bytes::from(vec![b'x'; 300]),
            group_id: 0,
        }),
    )
}

fn all_kinds() -> Vec<Envelope> {
    vec![
        hello(),
        Envelope::new(
            1,
            Body::Welcome(pb::Welcome {
                user_id: "alice".into(),
                device_id: "phone".into(),
                cursor: 41,
                head_seq: 45,
                idle_timeout_ms: 60_000,
                max_frame_bytes: DEFAULT_MAX_FRAME as u32,
                server_version: "0.1.0".into(),
                server_time_ms: T_2025,
                inbox_epoch: 0x5eed_e90c,
                first_available_seq: 40,
            }),
        ),
        Envelope::error(3, ErrorCode::BodyTooLarge, "body over 64512 bytes", false),
        Envelope::new(4, Body::Ping(pb::Ping { nonce: u64::MAX })),
        Envelope::new(4, Body::Pong(pb::Pong { nonce: u64::MAX })),
        send(),
        ack(),
        deliver(),
        Envelope::new(6, Body::DeliveryAck(pb::DeliveryAck { up_to: 45 })),
        Envelope::new(
            5,
            Body::Sync(pb::Sync {
                after: 0,
                limit: 500,
            }),
        ),
        Envelope::new(
            5,
            Body::SyncBatch(pb::SyncBatch {
                events: vec![],
                has_more: false,
                head_seq: 45,
                first_available_seq: 1,
                inbox_epoch: 0x5eed_e90c,
            }),
        ),
        big_send(),
        // An Envelope with no body at all encodes to zero bytes: a frame of
        // length 0 is valid framing (what the session makes of it is its
        // business).
        Envelope::default(),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn codec() -> FrameCodec {
    FrameCodec::default()
}

// ------------------------------------------------------------- round trip

#[test]
fn round_trip_every_kind_through_the_slice_functions() {
    for env in all_kinds() {
        let mut buf = Vec::new();
        encode_frame(&env, &mut buf);
        let (got, used) = decode_frame(&buf, DEFAULT_MAX_FRAME)
            .expect("valid frame")
            .expect("whole frame");
        assert_eq!(got, env);
        assert_eq!(used, buf.len());
        assert_eq!(&buf[..], &frame_bytes(&env)[..]);
    }
}

#[test]
fn round_trip_every_kind_through_the_tokio_codec() {
    let mut c = codec();
    let mut buf = BytesMut::new();
    for env in all_kinds() {
        c.encode(&env, &mut buf).expect("encode");
        assert_eq!(c.decode(&mut buf).expect("decode"), Some(env));
        assert!(buf.is_empty());
    }
    // The by-value Encoder writes the same bytes.
    let mut a = BytesMut::new();
    let mut b = BytesMut::new();
    c.encode(send(), &mut a).expect("encode");
    c.encode(&send(), &mut b).expect("encode");
    assert_eq!(a, b);
}

#[test]
fn framing_is_protobuf_length_delimited() {
    // Any protobuf library's "delimited" reader and writer interoperate.
    for env in all_kinds() {
        let ours = frame_bytes(&env);
        let theirs = env.encode_length_delimited_to_vec();
        assert_eq!(&ours[..], &theirs[..]);
        assert_eq!(
            Envelope::decode_length_delimited(ours).expect("decode"),
            env
        );
    }
}

// ------------------------------------------------------- scripted chunks

/// Feed `chunks` one after another, decoding after each; collect frames.
fn feed(chunks: &[&[u8]]) -> (Vec<Envelope>, Vec<usize>) {
    let mut c = codec();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut nones = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        buf.extend_from_slice(chunk);
        loop {
            match c.decode(&mut buf).expect("no error") {
                Some(env) => out.push(env),
                None => {
                    nones.push(i);
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty(), "leftover bytes: {}", hex(&buf));
    (out, nones)
}

#[test]
fn split_head() {
    let frame = frame_bytes(&big_send());
    // The length needs two varint bytes: feed them separately.
    assert!(frame[0] & 0x80 != 0 && frame[1] & 0x80 == 0);
    assert_eq!(
        decode_head(&frame[..1], DEFAULT_MAX_FRAME).expect("ok"),
        None
    );
    let (got, _) = feed(&[&frame[..1], &frame[1..2], &frame[2..]]);
    assert_eq!(got, vec![big_send()]);
}

#[test]
fn split_body() {
    let frame = frame_bytes(&big_send());
    let (got, nones) = feed(&[&frame[..2], &frame[2..50], &frame[50..299], &frame[299..]]);
    assert_eq!(got, vec![big_send()]);
    // Nothing came out before the last chunk.
    assert_eq!(&nones[..3], &[0, 1, 2]);
}

#[test]
fn one_byte_at_a_time() {
    let mut stream = Vec::new();
    for env in all_kinds() {
        encode_frame(&env, &mut stream);
    }
    let chunks: Vec<&[u8]> = stream.chunks(1).collect();
    let (got, _) = feed(&chunks);
    assert_eq!(got, all_kinds());
}

#[test]
fn several_frames_in_one_buffer() {
    let mut stream = BytesMut::new();
    for env in all_kinds() {
        encode_frame(&env, &mut stream);
    }
    // tokio codec: one buffer, many frames.
    let (got, _) = feed(&[&stream]);
    assert_eq!(got, all_kinds());

    // Slice functions: walk the buffer by the byte counts they report.
    let mut at = 0;
    let mut got = Vec::new();
    while let Some((env, used)) = decode_frame(&stream[at..], DEFAULT_MAX_FRAME).expect("ok") {
        got.push(env);
        at += used;
    }
    assert_eq!(at, stream.len());
    assert_eq!(got, all_kinds());
}

#[test]
fn truncated_frame_is_none_and_leaves_the_buffer_alone() {
    let frame = frame_bytes(&send());
    for cut in 0..frame.len() {
        assert!(
            decode_frame(&frame[..cut], DEFAULT_MAX_FRAME)
                .expect("ok")
                .is_none(),
            "cut at {cut}"
        );
        let mut c = codec();
        let mut buf = BytesMut::from(&frame[..cut]);
        assert!(c.decode(&mut buf).expect("ok").is_none(), "cut at {cut}");
        assert_eq!(&buf[..], &frame[..cut], "buffer consumed at cut {cut}");
        // The rest arrives: the frame comes out whole.
        buf.extend_from_slice(&frame[cut..]);
        assert_eq!(c.decode(&mut buf).expect("ok"), Some(send()));
    }
}

#[test]
fn truncated_frame_at_end_of_stream_is_an_error() {
    let frame = frame_bytes(&send());
    let mut buf = BytesMut::from(&frame[..10]);
    assert!(matches!(
        codec().decode_eof(&mut buf),
        Err(FrameError::Io(_))
    ));
    let mut empty = BytesMut::new();
    assert!(codec().decode_eof(&mut empty).expect("ok").is_none());
}

// ------------------------------------------------------ size limits

#[test]
fn frame_of_exactly_max_is_accepted_one_more_is_refused() {
    let frame = frame_bytes(&send());
    let len = frame.len() - 1; // 1-byte varint
    let mut ok = FrameCodec::new(len);
    assert_eq!(
        ok.decode(&mut BytesMut::from(&frame[..])).expect("ok"),
        Some(send())
    );
    let mut small = FrameCodec::new(len - 1);
    match small.decode(&mut BytesMut::from(&frame[..])) {
        Err(FrameError::TooLarge { len: l, max }) => {
            assert_eq!((l, max), (len as u64, len - 1));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    // The head alone says 65537 bytes: refused with no body byte in sight.
    let mut head = Vec::new();
    prost::encoding::encode_varint(DEFAULT_MAX_FRAME as u64 + 1, &mut head);
    assert_eq!(head, [0x81, 0x80, 0x04]);

    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&head);
    let cap = buf.capacity();
    match codec().decode(&mut buf) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, 65_537);
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Nothing was reserved for the announced body.
    assert_eq!(buf.capacity(), cap);

    // A huge length: refused as soon as the varint bytes seen so far already
    // exceed the maximum, even before the varint is complete.
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&[0xff, 0xff, 0xff]);
    let cap = buf.capacity();
    assert!(matches!(
        codec().decode(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(buf.capacity(), cap);

    // Same through the slice function.
    assert!(matches!(
        decode_head(&[0xff, 0xff, 0xff, 0xff, 0x0f], DEFAULT_MAX_FRAME),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn an_acceptable_length_reserves_only_what_the_frame_needs() {
    let frame = frame_bytes(&big_send());
    let mut buf = BytesMut::with_capacity(4);
    buf.extend_from_slice(&frame[..3]);
    assert!(codec().decode(&mut buf).expect("ok").is_none());
    assert!(buf.capacity() >= frame.len());
    assert!(buf.capacity() < DEFAULT_MAX_FRAME);
}

#[test]
fn six_byte_varint_is_bad_length() {
    // Value 0, spelled with five continuation bytes: too long to be a length.
    let mut buf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..]);
    assert!(matches!(
        codec().decode(&mut buf),
        Err(FrameError::BadLength)
    ));
    // Five bytes all with the continuation bit are already decisive.
    assert!(matches!(
        decode_head(&[0x80, 0x80, 0x80, 0x80, 0x80], DEFAULT_MAX_FRAME),
        Err(FrameError::BadLength)
    ));
    // Four such bytes are merely incomplete.
    assert!(decode_head(&[0x80, 0x80, 0x80, 0x80], DEFAULT_MAX_FRAME)
        .expect("ok")
        .is_none());
    // A non-minimal but short varint is accepted (protobuf readers do).
    assert_eq!(
        decode_head(&[0x85, 0x80, 0x00], DEFAULT_MAX_FRAME).expect("ok"),
        Some((5, 3))
    );
}

#[test]
fn malformed_envelope_is_bad_envelope() {
    // Length 2, body = field 1 with wire type 7 (invalid).
    let mut buf = BytesMut::from(&[0x02, 0x0f, 0x00][..]);
    assert!(matches!(
        codec().decode(&mut buf),
        Err(FrameError::BadEnvelope(_))
    ));
    // Length 3, body = a length-delimited field claiming 100 bytes.
    assert!(matches!(
        decode_frame(&[0x03, 0x52, 0x64, 0x00], DEFAULT_MAX_FRAME),
        Err(FrameError::BadEnvelope(_))
    ));
}

// ------------------------------------------------------ garbage

/// xorshift64*: a fixed-seed PRNG, enough to make garbage reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_garbage_errors_or_waits_never_panics() {
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let (mut frames, mut errors, mut waits) = (0, 0, 0);
    for _ in 0..20_000 {
        let n = rng.below(64) as usize;
        let mut bytes = Vec::with_capacity(n);
        for _ in 0..n {
            bytes.put_u8(rng.next() as u8);
        }
        // Half the time, give it a plausible small length prefix so the
        // garbage reaches the protobuf decoder.
        if rng.below(2) == 0 && n > 0 {
            bytes[0] = (n as u8 - 1) & 0x7f;
        }
        let slice = decode_frame(&bytes, DEFAULT_MAX_FRAME);
        let mut c = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            match c.decode(&mut buf) {
                Ok(Some(_)) => frames += 1,
                Ok(None) => {
                    waits += 1;
                    break;
                }
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
        // The slice decoder never claims more bytes than it was given.
        if let Ok(Some((_, used))) = slice {
            assert!(used <= bytes.len());
        }
    }
    // The run exercised all three outcomes.
    assert!(
        frames > 0 && errors > 0 && waits > 0,
        "{frames} {errors} {waits}"
    );
}

#[test]
fn bit_flips_of_a_valid_stream_never_panic() {
    let mut stream = Vec::new();
    for env in all_kinds() {
        encode_frame(&env, &mut stream);
    }
    let mut rng = Rng(42);
    for _ in 0..5_000 {
        let mut s = stream.clone();
        for _ in 0..=rng.below(4) {
            let i = rng.below(s.len() as u64) as usize;
            s[i] ^= 1 << rng.below(8);
        }
        let mut c = codec();
        let mut buf = BytesMut::from(&s[..]);
        while let Ok(Some(_)) = c.decode(&mut buf) {}
    }
}

// ------------------------------------------- README worked example

#[test]
fn readme_worked_example_bytes() {
    // protocol/README.md, "Worked example": these exact bytes are printed
    // there, field by field. Change both together.
    let cases: [(&str, Envelope, &str); 5] = [
        (
            "hello",
            hello(),
            "14 08 01 52 10 08 01 12 05 61 6c 69 63 65 1a 05 70 68 6f 6e 65",
        ),
        (
            "send",
            send(),
            "1e 08 02 a2 01 19 0a 02 6d 31 12 03 62 6f 62 1a 0a 74 65 78 74 2f 70 6c 61 69 6e 22 02 68 69",
        ),
        (
            "ack",
            ack(),
            "1c 08 02 aa 01 17 0a 02 6d 31 10 80 a0 80 80 a0 bc cd eb 01 18 80 f8 a5 f9 c1 32 20 01",
        ),
        (
            "deliver",
            deliver(),
            "41 b2 01 3e 0a 3c 08 01 12 38 08 80 a0 80 80 a0 bc cd eb 01 12 05 61 6c 69 63 65 1a 05 70 68 6f 6e 65 22 03 62 6f 62 2a 02 6d 31 30 80 f8 a5 f9 c1 32 3a 0a 74 65 78 74 2f 70 6c 61 69 6e 42 02 68 69",
        ),
        (
            "delivery_ack",
            Envelope::new(1, Body::DeliveryAck(pb::DeliveryAck { up_to: 1 })),
            "07 08 01 ba 01 02 08 01",
        ),
    ];
    for (name, env, want) in cases {
        let got = hex(&frame_bytes(&env));
        println!("{name}: {got}");
        assert_eq!(got, want, "{name}");
        assert_eq!(
            decode_frame(&frame_bytes(&env), DEFAULT_MAX_FRAME)
                .expect("ok")
                .map(|(e, _)| e),
            Some(env)
        );
    }
    assert_eq!(msg_id(T_2025, 1, 0), 0x01d7_35e2_0000_1000);
    assert_eq!(msg_id(T_2025, 1, 0), 132_633_958_809_604_096);
}
