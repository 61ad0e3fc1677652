//! The durable write paths through the real commit pipeline (dedup lookup,
//! message id, inbox sequence numbers, one RocksDB WriteBatch per group,
//! WAL write), with no sockets involved.
//!
//! - `durable_send/group/N`: 1:1 sends, N submitted before waiting. `group/1`
//!   waits for each send to be durable before the next (no group commit
//!   possible); larger N let the pipeline fold sends into few write batches.
//!   Throughput in messages.
//! - `durable_send/users/U`: 1:1 sends between random pairs of U users, 64
//!   per group commit: 200 users (each user's rows recur in a memtable, as
//!   in the peers harness) against a million (most have one row in it).
//! - `fan_out/members/M`: posts to a group of M members, each stored once
//!   and referenced from M inboxes in the same batch. Throughput in inbox
//!   entries.
//! - `wal_sync/MODE/N`: `durable_send/group/N` in each `--wal-sync` mode
//!   (`off`, `interval` at its default 100 ms, `always`): what an fsync
//!   per group commit costs a lone sender (N = 1) and a group (N = 64).
//!   The other shapes run in the default mode.
//!
//! - `statistics/on|off/N`: `durable_send/group/N` with RocksDB's tickers
//!   on (as the server runs, for `/metrics`) and off: what recording them
//!   costs the write path. The two stores are measured turn about, several
//!   rounds, so a noisy machine affects both alike.
//!
//! - `sync_page/LIMIT`: one Sync page of a 1,000-message inbox, read from
//!   the store (`read`) and then encoded into its frame (`encode`), the two
//!   halves of what a shard does inline for a `Sync`. Throughput in events.
//!
//! The shapes run in one process so their ratios survive a noisy machine.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swiftlet::commit::{self, CommitCmd, CommitHandle, Op, Origin, PipelineConfig};
use swiftlet::groups::GroupDirectory;
use swiftlet::hub::registry::{ConnKind, ConnRef, Registry};
use swiftlet::store::{Store, StoreOptions, WalSync};
use swiftlet_protocol::pb;

struct Bench {
    pipeline: CommitHandle,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
    n: u64,
}

impl Bench {
    fn new() -> Bench {
        Bench::with(StoreOptions::default())
    }

    fn with(opts: StoreOptions) -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &opts).expect("open store"));
        let registry = Arc::new(Registry::new(16));
        let groups = Arc::new(GroupDirectory::new(store.clone()));
        // No shards: answers and pushes are computed and then dropped.
        let pipeline = commit::start(
            store.clone(),
            registry,
            groups,
            Vec::new(),
            Arc::new(swiftlet::metrics::Metrics::default()),
            Arc::new(swiftlet::cursors::Cursors::new(store.clone())),
            PipelineConfig {
                clock: swiftlet::clock::Clock::system(),
                node_id: 0,
                queue: 64 * 1024,
                max_group_members: 10_000,
                routes: None,
            },
        );
        Bench {
            pipeline,
            store,
            _dir: dir,
            n: 0,
        }
    }

    fn submit(&mut self, user: &str, op: Op) {
        self.n += 1;
        let origin = Origin {
            reply: ConnRef {
                shard: 0,
                slot: 0,
                gen: 0,
                kind: ConnKind::Session,
            },
            request_id: self.n,
            user: Arc::from(user),
            device: Arc::from("phone"),
            received: std::time::Instant::now(),
            from: None,
        };
        // The queue holds 64k commands; a bench group is at most 1024.
        self.pipeline
            .submit(CommitCmd::Request(origin, op))
            .expect("queue has room");
    }

    fn send(&mut self, to_user: String, group_id: u64) {
        self.send_from("alice", to_user, group_id);
    }

    fn send_from(&mut self, from: &str, to_user: String, group_id: u64) {
        let send = pb::Send {
            client_msg_id: format!("c{}", self.n),
            to_user,
            content_type: "text/plain".into(),
            body: Bytes::from(vec![b'x'; 100]),
            group_id,
        };
        self.submit(from, Op::Send(send));
    }
}

fn durable_sends(c: &mut Criterion) {
    let mut b = Bench::new();
    let mut group = c.benchmark_group("durable_send");
    for size in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("group", size), &size, |bench, &size| {
            bench.iter(|| {
                for _ in 0..size {
                    let to = format!("user{}", b.n % 1000);
                    b.send(to, 0);
                }
                b.pipeline.flush();
            })
        });
    }
    group.finish();
}

/// 1:1 sends between random pairs of `users` users, 64 per group commit.
/// With 200 users each one's inbox and dedup rows recur many times in a
/// memtable; with a million most users have one row in it, as on a big
/// node where each user chats now and then. The memtable's cost per row
/// differs between the two (how far apart a commit's keys land).
fn spread_sends(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_send");
    for users in [200u64, 1_000_000] {
        let mut b = Bench::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            // xorshift64: the same pairs in every build compared
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % users
        };
        group.throughput(Throughput::Elements(64));
        group.bench_with_input(BenchmarkId::new("users", users), &users, |bench, _| {
            bench.iter(|| {
                for _ in 0..64 {
                    let (from, to) = (next(), next());
                    b.send_from(&format!("user{from}"), format!("user{to}"), 0);
                }
                b.pipeline.flush();
            })
        });
    }
    group.finish();
}

fn wal_sync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_sync");
    for mode in [WalSync::Off, WalSync::Interval, WalSync::Always] {
        let mut b = Bench::with(StoreOptions {
            wal_sync: mode,
            ..StoreOptions::default()
        });
        for size in [1usize, 64] {
            group.throughput(Throughput::Elements(size as u64));
            group.bench_with_input(
                BenchmarkId::new(mode.name(), size),
                &size,
                |bench, &size| {
                    bench.iter(|| {
                        for _ in 0..size {
                            let to = format!("user{}", b.n % 1000);
                            b.send(to, 0);
                        }
                        b.pipeline.flush();
                    })
                },
            );
        }
    }
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut b = Bench::new();
    let mut group = c.benchmark_group("fan_out");
    for members in [100usize, 1000, 10_000] {
        b.submit(
            "alice",
            Op::CreateGroup(pb::CreateGroup {
                name: format!("g{members}"),
                members: (1..members).map(|i| format!("m{members}-{i}")).collect(),
            }),
        );
        b.pipeline.flush();
        let gid = b
            .store
            .memberships("alice")
            .expect("memberships")
            .into_iter()
            .max()
            .expect("the group just created");
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::new("members", members), &gid, |bench, &gid| {
            bench.iter(|| {
                b.send(String::new(), gid);
                b.pipeline.flush();
            })
        });
    }
    group.finish();
}

fn statistics(c: &mut Criterion) {
    let mut group = c.benchmark_group("statistics");
    let mut stores: Vec<(&str, Bench)> = [("on", true), ("off", false)]
        .into_iter()
        .map(|(name, statistics)| {
            let b = Bench::with(StoreOptions {
                statistics,
                ..StoreOptions::default()
            });
            (name, b)
        })
        .collect();
    let size = 64usize;
    group.throughput(Throughput::Elements(size as u64));
    for round in 0..3 {
        for (name, b) in &mut stores {
            group.bench_function(
                BenchmarkId::new(format!("{name}/round{round}"), size),
                |bench| {
                    bench.iter(|| {
                        for _ in 0..size {
                            let to = format!("user{}", b.n % 1000);
                            b.send(to, 0);
                        }
                        b.pipeline.flush();
                    })
                },
            );
        }
    }
    group.finish();
}

fn sync_page(c: &mut Criterion) {
    let mut b = Bench::new();
    for _ in 0..1000 {
        b.send("bob".into(), 0);
    }
    b.pipeline.flush();
    let max_bytes = 1 << 20;
    let mut group = c.benchmark_group("sync_page");
    for limit in [100usize, 500] {
        group.throughput(Throughput::Elements(limit as u64));
        group.bench_with_input(BenchmarkId::new("read", limit), &limit, |bench, &limit| {
            bench.iter(|| {
                let page = b
                    .store
                    .sync_inbox("bob", 0, limit, max_bytes)
                    .expect("page");
                assert_eq!(page.events.len(), limit);
                page
            })
        });
        let page = b
            .store
            .sync_inbox("bob", 0, limit, max_bytes)
            .expect("page");
        let env = pb::Envelope::new(
            7,
            pb::envelope::Body::SyncBatch(pb::SyncBatch {
                events: page.events,
                has_more: page.has_more,
                head_seq: page.head,
                first_available_seq: page.first_available,
                inbox_epoch: 1,
            }),
        );
        group.bench_with_input(BenchmarkId::new("encode", limit), &env, |bench, env| {
            bench.iter(|| swiftlet_protocol::codec::frame_bytes(env))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    durable_sends,
    spread_sends,
    wal_sync,
    fan_out,
    statistics,
    sync_page
);
criterion_main!(benches);
