//! The durable send path: the commit pipeline (dedup lookup, message id,
//! inbox sequence numbers, one RocksDB WriteBatch per group, WAL write)
//! measured in messages per second, with no sockets involved.
//!
//! Two shapes are compared in one run so the ratio survives a noisy machine:
//! `group/1` waits for each send to be durable before submitting the next
//! (no group commit possible), `group/N` submits N sends and then waits, so
//! the pipeline folds them into few write batches.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swiftlet::commit::{self, CommitCmd};
use swiftlet::registry::{ConnRef, Registry};
use swiftlet::store::{Store, StoreOptions};
use swiftlet_protocol::pb;

fn durable_sends(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("open store"));
    let registry = Arc::new(Registry::new(16));
    // No shards: Acks and pushes are computed and then dropped.
    let (pipeline, _join) = commit::spawn(store, registry, Vec::new(), 0, 64 * 1024).expect("pipeline");
    let from: Arc<str> = Arc::from("alice");
    let device: Arc<str> = Arc::from("phone");
    let body = Bytes::from(vec![b'x'; 100]);
    let users: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
    let mut n = 0u64;

    let mut group = c.benchmark_group("durable_send");
    for size in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("group", size), &size, |b, &size| {
            b.iter(|| {
                for _ in 0..size {
                    n += 1;
                    let cmd = CommitCmd::Send {
                        reply: ConnRef { shard: 0, slot: 0, gen: 0 },
                        request_id: n,
                        from_user: from.clone(),
                        from_device: device.clone(),
                        send: pb::Send {
                            client_msg_id: format!("c{n}"),
                            to_user: users[(n % 1000) as usize].clone(),
                            content_type: "text/plain".into(),
                            body: body.clone(),
                        },
                    };
                    // The queue holds 64k commands; a group is at most 1024.
                    pipeline.submit(cmd).expect("queue has room");
                }
                pipeline.flush();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, durable_sends);
criterion_main!(benches);
