//! A cluster node's runtime: the coordinator thread (lease, ownership map,
//! peers, marks), and the [`Cluster`] that starts it with the shipper and
//! the applier.
//!
//! Each tick (a fifth of the lease, at most a second) the coordinator:
//!
//! 1. renews this node's lease and advertises its addresses;
//! 2. reads the map's version, and the map when it changed; takes every
//!    partition's home at an epoch newer than the one recorded (recording
//!    it in RocksDB, synced, before acting on it) and ignores older ones;
//!    writes back every home it knows that Redis lost or holds at an older
//!    epoch (Redis restarted empty; a move this node took part in);
//! 3. only then extends the lease in the [`Table`], to the time the renewal
//!    was *sent* plus nine tenths of the lease: so the node stops writing
//!    before Redis can let its lease expire, and after a lapse it writes
//!    again only once it has re-read the map;
//! 4. reads the other nodes' addresses and leases, and the marks the
//!    destinations reported, trimming the outbox up to them;
//! 5. notices a Redis restart (a new `run_id`) and has the shipper re-drive
//!    everything unacknowledged.
//!
//! A node whose table is incomplete (the cluster has not been initialized)
//! never extends its lease, so it writes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::applier::{self, ApplierStats};
use super::notices::{self, Notices};
use super::redis::{Link, LinkError};
use super::shipper::{self, Shipper};
use super::table::{Peer, Table};
use super::{mover, Home, Ownership, Partition, PARTITIONS};
use crate::commit::{CommitHandle, Routes};
use crate::hub::mailbox::{ShardHandle, ShardMsg};
use crate::store::cluster::EpochRecord;
use crate::store::{Store, StoreError};

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    pub node_id: u16,
    /// Where clients redirected here connect: TCP protocol, HTTP.
    pub advertise_tcp: String,
    pub advertise_http: String,
    /// How long a renewal holds the lease.
    pub lease: Duration,
    /// The deadline of every Redis call.
    pub deadline: Duration,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster link: {0}")]
    Link(#[from] LinkError),
    #[error("reading this node's cluster records: {0}")]
    Store(#[from] StoreError),
    #[error("starting a cluster thread: {0}")]
    Io(#[from] std::io::Error),
}

/// The state of the link, for `/metrics` and `cluster status`.
#[derive(Default)]
pub struct LinkStats {
    /// 1 while the last call to Redis succeeded.
    pub up: AtomicU64,
    pub redis_restarts: AtomicU64,
    /// This node's outbox entries not yet applied, per destination, at the
    /// coordinator's last look.
    pub backlog: parking_lot::Mutex<Vec<(u16, u64)>>,
}

/// A running cluster node's threads and shared state.
pub struct Cluster {
    pub table: Arc<Table>,
    pub shipper: Arc<Shipper>,
    pub applier: Arc<ApplierStats>,
    pub link: Arc<LinkStats>,
    config: ClusterConfig,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Load what this node recorded; no thread runs yet, so the pipeline
    /// can be built with [`Cluster::routes`] first.
    pub fn prepare(config: ClusterConfig, store: &Store) -> Result<Cluster, ClusterError> {
        let table = Arc::new(Table::new(config.node_id));
        for r in store.epochs()? {
            table.set(r.partition, r.node, r.epoch);
        }
        // Fail early on a malformed URL.
        Link::new(&config.url, config.deadline)?;
        Ok(Cluster {
            table,
            shipper: Arc::new(Shipper::default()),
            applier: Arc::new(ApplierStats::default()),
            link: Arc::new(LinkStats::default()),
            config,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        })
    }

    /// What the commit pipeline needs.
    pub fn routes(&self) -> Routes {
        Routes {
            node: self.config.node_id,
            ownership: self.table.clone(),
            handoff: self.shipper.clone(),
        }
    }

    /// Start the coordinator, shipper and applier threads.
    pub fn run(
        &mut self,
        store: Arc<Store>,
        commit: CommitHandle,
        notices: Arc<Notices>,
        shards: Arc<[ShardHandle]>,
    ) -> Result<(), ClusterError> {
        let link = || Link::new(&self.config.url, self.config.deadline);
        let (n, l, stop) = (notices.clone(), link()?, self.stop.clone());
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-pub".into())
                .spawn(move || notices::run_publisher(n, l, stop))?,
        );
        let (n, url, deadline, stop) = (
            notices.clone(),
            self.config.url.clone(),
            self.config.deadline,
            self.stop.clone(),
        );
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-sub".into())
                .spawn(move || notices::run_subscriber(n, &url, deadline, stop))?,
        );
        let coordinator = Coordinator {
            commit: commit.clone(),
            moving: Arc::new(AtomicBool::new(false)),
            config: self.config.clone(),
            table: self.table.clone(),
            shipper: self.shipper.clone(),
            stats: self.link.clone(),
            store: store.clone(),
            notices,
            shards,
            link: link()?,
            version: None,
            run_id: None,
            warned_uninitialized: false,
        };
        let stop = self.stop.clone();
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-coord".into())
                .spawn(move || coordinator.run(&stop))?,
        );
        let (shipper, table, stop, s) = (
            self.shipper.clone(),
            self.table.clone(),
            self.stop.clone(),
            store.clone(),
        );
        let l = link()?;
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-ship".into())
                .spawn(move || shipper::run(shipper, s, table, l, stop))?,
        );
        let (me, stats, stop, l) = (
            self.config.node_id,
            self.applier.clone(),
            self.stop.clone(),
            link()?,
        );
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-apply".into())
                .spawn(move || applier::run(me, store, commit, l, stats, stop))?,
        );
        Ok(())
    }

    /// What `/metrics` shows of this node's cluster side.
    pub fn renderer(&self, notices: Arc<Notices>) -> crate::metrics::Render {
        let (table, shipper, applier, link) = (
            self.table.clone(),
            self.shipper.clone(),
            self.applier.clone(),
            self.link.clone(),
        );
        Box::new(move |out: &mut String| {
            use std::fmt::Write as _;
            let me = table.me();
            let gauge = |out: &mut String, name: &str, help: &str, v: String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            };
            let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                    v.load(Ordering::Relaxed)
                );
            };
            gauge(
                out,
                "swiftlet_cluster_redis_up",
                "1 while the last coordination round with Redis succeeded.",
                link.up.load(Ordering::Relaxed).to_string(),
            );
            gauge(
                out,
                "swiftlet_cluster_lease_seconds",
                "How long this node may still write without renewing its lease (0: fenced).",
                format!("{:.3}", table.lease_left().as_secs_f64()),
            );
            gauge(
                out,
                "swiftlet_cluster_partitions",
                "Partitions this node is home to.",
                table.counts().get(&me).copied().unwrap_or(0).to_string(),
            );
            let _ = writeln!(out, "# HELP swiftlet_cluster_outbox_backlog Outbox entries not yet applied at their destination.\n# TYPE swiftlet_cluster_outbox_backlog gauge");
            for (dest, n) in link.backlog.lock().iter() {
                let _ = writeln!(
                    out,
                    "swiftlet_cluster_outbox_backlog{{dest=\"{dest}\"}} {n}"
                );
            }
            counter(
                out,
                "swiftlet_cluster_shipped_total",
                "Stream entries shipped to other nodes.",
                &shipper.stats.shipped_entries,
            );
            counter(
                out,
                "swiftlet_cluster_redrives_total",
                "Times the outbox above a destination's mark was shipped again.",
                &shipper.stats.redrives,
            );
            counter(
                out,
                "swiftlet_cluster_ship_failures_total",
                "Failed XADDs (re-driven later).",
                &shipper.stats.xadd_failures,
            );
            counter(
                out,
                "swiftlet_cluster_applied_total",
                "Outbox entries of other nodes taken from this node's stream.",
                &applier.entries,
            );
            counter(
                out,
                "swiftlet_cluster_gaps_total",
                "Stream entries that began after a gap (left for a re-drive).",
                &applier.gaps,
            );
            counter(
                out,
                "swiftlet_cluster_redis_restarts_total",
                "Redis restarts noticed (each followed by a restore and a re-drive).",
                &link.redis_restarts,
            );
            counter(
                out,
                "swiftlet_cluster_notices_dropped_total",
                "Typing and presence notices dropped for other nodes (publisher behind).",
                &notices.dropped,
            );
        })
    }

    /// Stop the threads (before the pipeline and the store stop).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Coordinator {
    commit: CommitHandle,
    /// Set while a partition move's thread (this node's side) runs.
    moving: Arc<AtomicBool>,
    config: ClusterConfig,
    table: Arc<Table>,
    shipper: Arc<Shipper>,
    stats: Arc<LinkStats>,
    store: Arc<Store>,
    notices: Arc<Notices>,
    shards: Arc<[ShardHandle]>,
    link: Link,
    /// The map version last read.
    version: Option<u64>,
    run_id: Option<String>,
    warned_uninitialized: bool,
}

impl Coordinator {
    fn run(mut self, stop: &AtomicBool) {
        let tick = (self.config.lease / 5).min(Duration::from_secs(1));
        while !stop.load(Ordering::Acquire) {
            let started = Instant::now();
            match self.tick(started) {
                Ok(()) => self.stats.up.store(1, Ordering::Relaxed),
                Err(e) => {
                    self.stats.up.store(0, Ordering::Relaxed);
                    crate::log_every!(2000, warn, error = %e, "cluster coordination failed; retrying");
                }
            }
            let next = started + tick;
            while !stop.load(Ordering::Acquire) && Instant::now() < next {
                std::thread::sleep(Duration::from_millis(20).min(next - Instant::now().min(next)));
            }
        }
        self.table.drop_lease();
    }

    fn tick(&mut self, sent: Instant) -> Result<(), ClusterError> {
        let addrs = format!(
            "{},{}",
            self.config.advertise_tcp, self.config.advertise_http
        );
        let was_writable = !self.table.lease_left().is_zero();
        self.link
            .renew(self.config.node_id, &addrs, self.config.lease)?;

        let run_id = self.link.run_id()?;
        if self.run_id.as_ref().is_some_and(|r| *r != run_id) {
            tracing::warn!("redis restarted; restoring the map and re-driving the outbox");
            self.stats.redis_restarts.fetch_add(1, Ordering::Relaxed);
            self.shipper.redrive_all();
            self.notices.resync();
            self.version = None;
        }
        self.run_id = Some(run_id);

        // Peers first: a partition that moves away sends its users there.
        let mut peers = HashMap::new();
        for (n, addrs, alive) in self.link.nodes()? {
            let (tcp, http) = addrs.split_once(',').unwrap_or((addrs.as_str(), ""));
            peers.insert(
                n,
                Peer {
                    tcp: tcp.to_owned(),
                    http: http.to_owned(),
                    alive,
                },
            );
        }
        self.table.set_peers(peers);

        // The version is read before the map: a change made after that
        // read (by an operator, another node, or our own restore) shows as
        // a new version at the next tick, never hidden behind this one.
        let version = self.link.map_version()?;
        // A move changed a home here: write it back to Redis now.
        let moved = self.table.take_changed();
        if moved || version.is_none() || version != self.version {
            self.reconcile()?;
            self.version = version;
        }

        let complete = (0..PARTITIONS).all(|p| self.table.get(p).is_some());
        if complete {
            self.warned_uninitialized = false;
            let lease = self.config.lease * 9 / 10;
            self.table.extend_lease(sent + lease);
            if !was_writable {
                tracing::info!(
                    node = self.config.node_id,
                    "holding the cluster lease: writes enabled"
                );
            }
        } else if !self.warned_uninitialized {
            self.warned_uninitialized = true;
            tracing::warn!("the cluster map is incomplete: run `swiftlet cluster init` (writes stay refused until then)");
        }

        if complete {
            self.moves()?;
        }

        for (dest, mark) in self.link.marks(self.config.node_id)? {
            self.shipper.set_mark(dest, mark);
            // Applied there: this node's copy is no longer needed.
            self.store.trim_outbox(dest, mark)?;
        }
        let mut backlog = Vec::new();
        for dest in self.store.outbox_dests()? {
            let head = self.store.outbox_head(dest)?;
            backlog.push((dest, head.saturating_sub(self.shipper_mark(dest))));
        }
        *self.stats.backlog.lock() = backlog.clone();
        self.link.report_backlog(self.config.node_id, &backlog)?;
        Ok(())
    }

    fn shipper_mark(&self, dest: u16) -> u64 {
        use super::HandOff;
        self.shipper.acked(dest)
    }

    /// This node's part in the partition moves asked for (see
    /// [`super::mover`]): one at a time, on a thread of its own.
    fn moves(&mut self) -> Result<(), ClusterError> {
        if self.moving.load(Ordering::Acquire) {
            return Ok(());
        }
        let me = self.config.node_id;
        for (p, to, ready) in self.link.moves()? {
            if p >= PARTITIONS {
                continue;
            }
            let partition = Partition(p);
            let link = Link::new(&self.config.url, self.config.deadline)?;
            match self.table.home(partition) {
                Home::Local { .. } if to == me => {
                    // Taken over here; the source did not get to clear it.
                    self.link.move_done(p)?;
                }
                Home::Local { .. } if ready && self.table.writable() => {
                    self.moving.store(true, Ordering::Release);
                    let source = mover::Source {
                        partition,
                        to,
                        store: self.store.clone(),
                        commit: self.commit.clone(),
                        table: self.table.clone(),
                        shards: self.shards.clone(),
                        link,
                        running: self.moving.clone(),
                    };
                    tracing::info!(partition = p, to, "moving a partition");
                    std::thread::Builder::new()
                        .name("cluster-move".into())
                        .spawn(move || mover::run(source))?;
                    return Ok(());
                }
                Home::Remote { .. } | Home::Unknown if to == me && !ready => {
                    self.moving.store(true, Ordering::Release);
                    let (store, table, running) =
                        (self.store.clone(), self.table.clone(), self.moving.clone());
                    std::thread::Builder::new()
                        .name("cluster-move".into())
                        .spawn(move || mover::prepare(partition, store, table, link, running))?;
                    return Ok(());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Take newer homes from Redis, give Redis back what it lost.
    fn reconcile(&mut self) -> Result<(), ClusterError> {
        let me = self.config.node_id;
        let mut seen = vec![false; usize::from(PARTITIONS)];
        let mut record = Vec::new();
        let mut restore = Vec::new();
        for (p, node, epoch) in self.link.read_map()? {
            let Some(s) = seen.get_mut(usize::from(p)) else {
                continue;
            };
            *s = true;
            match self.table.get(p) {
                Some((n, e)) if e > epoch => {
                    // Redis went backwards, or has not heard of a move
                    // this node made or took part in: keep ours, and
                    // write it back (an epoch there only ever grows).
                    restore.push((p, n, e));
                }
                Some((n, e)) if e == epoch && n == node => {}
                Some((n, e)) if e == epoch => {
                    // Two homes at one epoch: never act on it.
                    crate::log_every!(
                        1000,
                        error,
                        partition = p,
                        ours = n,
                        redis = node,
                        epoch = e,
                        "conflicting homes at one epoch; keeping ours"
                    );
                }
                _ => record.push(EpochRecord {
                    partition: p,
                    node,
                    epoch,
                }),
            }
        }
        // Partitions Redis lost: give back every home this node knows, not
        // only its own. A node that had not yet read the map when Redis
        // lost it knows nothing to give back, and its partitions would
        // stay without a home; an epoch in Redis only ever grows, so the
        // newest any node knows wins whoever writes first.
        for (p, was) in seen.iter().enumerate() {
            if !was {
                if let Some((n, e)) = self.table.get(p as u16) {
                    restore.push((p as u16, n, e));
                }
            }
        }
        if !record.is_empty() {
            // Recorded before acted on.
            self.store.put_epochs(&record)?;
            let mut moved_away = false;
            for r in &record {
                if self.table.get(r.partition).is_some_and(|(n, _)| n == me) && r.node != me {
                    tracing::info!(
                        partition = r.partition,
                        to = r.node,
                        epoch = r.epoch,
                        "a partition moved away"
                    );
                    moved_away = true;
                }
                self.table.set(r.partition, r.node, r.epoch);
            }
            if moved_away {
                // Their users' connections here go to their new home.
                for s in self.shards.iter() {
                    s.send(ShardMsg::Rehome);
                }
            }
        }
        if !restore.is_empty() {
            let n = self.link.restore(&restore)?;
            tracing::info!(
                partitions = restore.len(),
                changed = n,
                "gave redis back the homes it lost or held at older epochs"
            );
        }
        Ok(())
    }
}
