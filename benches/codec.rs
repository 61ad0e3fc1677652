//! Framing codec hot path: encode and decode of the two frames the server
//! handles most, a `Send` with a 100-byte body (client to server) and the
//! `Deliver` it becomes (server to every device). Throughput is in frames.
//!
//! Run: `cargo bench --bench codec` (the root package builds RocksDB; use the
//! shared release target dir).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message as _;
use swiftlet_protocol::codec::{decode_frame, decode_head, encode_frame};
use swiftlet_protocol::pb;
use swiftlet_protocol::{Body, Envelope, DEFAULT_MAX_FRAME};

const T: u64 = 1_735_689_600_000;

fn send_frame() -> Envelope {
    Envelope::new(
        1_234,
        Body::Send(pb::Send {
            client_msg_id: "01J0Z8Q6W9V4K2M3N5P7R8S9T0".into(),
            to_user: "bob@example.org".into(),
            content_type: "text/plain".into(),
            body: Bytes::from(vec![b'x'; 100]),
            group_id: 0,
        }),
    )
}

fn deliver_frame() -> Envelope {
    Envelope::new(
        0,
        Body::Deliver(pb::Deliver {
            event: Some(pb::Event {
                seq: 123_456,
                kind: Some(pb::event::Kind::Message(pb::Message {
                    id: ((T - 1_704_067_200_000) << 22) | (1 << 12) | 7,
                    from_user: "alice@example.org".into(),
                    from_device: "phone".into(),
                    to_user: "bob@example.org".into(),
                    client_msg_id: "01J0Z8Q6W9V4K2M3N5P7R8S9T0".into(),
                    timestamp_ms: T,
                    content_type: "text/plain".into(),
                    body: Bytes::from(vec![b'x'; 100]),
                    group_id: 0,
                })),
            }),
        }),
    )
}

fn bench_frame(c: &mut Criterion, name: &str, env: Envelope) {
    let mut wire = Vec::new();
    encode_frame(&env, &mut wire);
    let mut g = c.benchmark_group(format!("codec/{name}"));
    g.throughput(Throughput::Elements(1));

    // Encode into a reused buffer, as a connection's output buffer is.
    let mut out = BytesMut::with_capacity(4096);
    g.bench_function(format!("encode ({} B)", wire.len()), |b| {
        b.iter(|| {
            out.clear();
            encode_frame(black_box(&env), &mut out);
            black_box(out.len())
        })
    });

    // Decode from a byte slice: the server's mio loops (body copied into Bytes).
    g.bench_function("decode slice", |b| {
        b.iter(|| {
            let r = decode_frame(black_box(&wire), DEFAULT_MAX_FRAME);
            black_box(r.ok().flatten().map(|(e, n)| (e.request_id, n)))
        })
    });

    // Decode from `Bytes`, as `FrameCodec` does: the body is shared with the
    // read buffer, not copied. (The root package does not depend on
    // tokio-util, so this spells out the codec's two steps.)
    let shared = Bytes::from(wire.clone());
    g.bench_function("decode bytes", |b| {
        b.iter(|| {
            let buf = black_box(&shared);
            let (len, head) = decode_head(buf, DEFAULT_MAX_FRAME)
                .ok()
                .flatten()
                .unwrap_or_default();
            let env = Envelope::decode(buf.slice(head..head + len)).unwrap_or_default();
            black_box(env.request_id)
        })
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "send_100B", send_frame());
    bench_frame(c, "deliver_100B", deliver_frame());
}

criterion_group!(benches, codec);
criterion_main!(benches);
