//! Process metrics in Prometheus text format: connections by transport
//! and shard, logins and refused logins by reason, messages in and out,
//! acks, fan-out sizes, request, store write and push latency, whether the
//! store takes writes, RocksDB's own figures, open files, RSS.
//!
//! Plain atomics updated where the events happen (the shards, the commit
//! pipeline, the store), so recording costs one relaxed add and `GET
//! /metrics` reads a consistent-enough snapshot without stopping anyone.
//! Figures that cost something to gather (RocksDB's properties and
//! tickers, the count of open files) are read while rendering, on scrape
//! only.
//!
//! Hand-written rather than the `prometheus-client` crate: its histogram
//! takes a mutex on every observation and its labelled families a read
//! lock and a hash lookup per use, where recording here is one relaxed
//! add with no lock; the exposition itself is a few dozen lines.
//!
//! It sits at the top of the crate because the shards, the commit pipeline,
//! the store and the bridge all record into it; it must never import any of
//! them, and recording must never take a lock or allocate.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use swiftlet_protocol::ErrorCode;

/// Upper bounds of the fan-out histogram (recipients per message).
const FANOUT_BUCKETS: [u64; 8] = [1, 2, 5, 10, 50, 100, 1000, 10_000];
/// Upper bounds of the push delay and request histograms, in microseconds.
const PUSH_BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7500, 10_000, 15_000, 25_000,
    100_000,
];
/// Upper bounds of the store write histogram, in microseconds.
const COMMIT_BUCKETS_US: [u64; 10] = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000];

/// A cumulative histogram with fixed bucket bounds.
pub struct Histogram<const N: usize> {
    bounds: [u64; N],
    counts: [AtomicU64; N],
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [u64; N]) -> Self {
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: u64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// `per_unit`: recorded values per exported unit (1e6 for microseconds
    /// exported as seconds): a division, so bounds print as `0.00005`.
    fn render(&self, out: &mut String, name: &str, help: &str, per_unit: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / per_unit
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum.load(Relaxed) as f64 / per_unit
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The store's write health, recorded by `crate::store` (which owns it) and
/// shared with [`Metrics::store`].
#[derive(Debug)]
pub struct StoreHealth {
    /// 1 while the store takes writes; 0 from a failed write (a full disk)
    /// until it recovers, or while it is open read-only.
    pub writable: AtomicI64,
    /// Commits that failed or were refused: each one's requests were
    /// answered `STORE_UNAVAILABLE`.
    pub write_failures: AtomicU64,
    /// Times the store took writes again after refusing them.
    pub recoveries: AtomicU64,
    /// Attempts to take writes again that failed (the disk still full).
    pub recovery_failures: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            writable: AtomicI64::new(1),
            write_failures: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            recovery_failures: AtomicU64::new(0),
        }
    }
}

/// Why a login was refused, as the `reason` label of
/// `swiftlet_login_failures_total`: every code a Hello can be refused
/// with, and `other` for any code added later.
const LOGIN_FAILURES: [(ErrorCode, &str); 9] = [
    (ErrorCode::AuthFailed, "auth_failed"),
    (ErrorCode::TokenExpired, "token_expired"),
    (ErrorCode::TokenRevoked, "token_revoked"),
    (ErrorCode::UnsupportedVersion, "unsupported_version"),
    (ErrorCode::InvalidDevice, "invalid_device"),
    (ErrorCode::TooManyConnections, "too_many_connections"),
    (ErrorCode::NotHome, "not_home"),
    (ErrorCode::HomeUnavailable, "home_unavailable"),
    (ErrorCode::Internal, "internal"),
];

/// One shard's logged-in connections, by transport.
#[derive(Default)]
pub struct ShardConns {
    pub tcp: AtomicI64,
    pub websocket: AtomicI64,
}

/// Everything `/metrics` reports.
pub struct Metrics {
    /// The store's, shared with it (see `Store::health`).
    pub store: Arc<StoreHealth>,
    pub tcp_connections: AtomicI64,
    pub ws_connections: AtomicI64,
    /// The same, per shard (indexed by shard id; see [`Metrics::with_shards`]).
    pub shard_conns: Box<[ShardConns]>,
    /// Hellos answered with a Welcome.
    pub logins: AtomicU64,
    /// Hellos refused, by [`LOGIN_FAILURES`] reason (and `other` last).
    pub login_failures: [AtomicU64; LOGIN_FAILURES.len() + 1],
    pub http_requests: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub acks: AtomicU64,
    /// Rows (puts and deletes) in group commits that were written.
    pub store_rows: AtomicU64,
    /// DeliveryAcks that moved a cursor.
    pub delivery_acks: AtomicU64,
    /// Device cursors written to the store.
    pub cursors_written: AtomicU64,
    /// Times a connection's frame bucket ran dry and its input was held
    /// back until the next refill (`--max-frames-per-sec`).
    pub throttled: AtomicU64,
    /// Requests that read a page on the shard's turn (`Sync`,
    /// `GetReceipts`, `GetGroup`, `ListGroups`, `GET /v1/sync`) left for a
    /// later turn: the turn's share of page reads was spent, or their
    /// connection had read its page this turn.
    pub pages_put_off: AtomicU64,
    /// Group posts and group changes left for a later turn: the turn's
    /// share of fan-out rows was spent, or their connection had handed one
    /// over this turn.
    pub fanouts_put_off: AtomicU64,
    pub fanout: Histogram<8>,
    pub commit_us: Histogram<10>,
    /// From a group commit's durable write to a shard having written that
    /// group's answers and pushes to its sockets (one observation per shard
    /// loop turn that handled any, from the oldest commit among them): the
    /// server's share of a fan-out's latency after the write.
    pub push_delay_us: Histogram<16>,
    /// From a shard reading a request that goes through the commit
    /// pipeline (a Send, a group change, a MarkRead) to the shard having
    /// written its answer: queueing for the pipeline, the durable write and
    /// the hand-back. The server's share of a client's send→Ack latency.
    pub request_us: Histogram<16>,
    /// The work of one event-loop turn that had any (every shard): a
    /// request that arrives meanwhile waits up to this long to be read,
    /// which `request_us` does not see.
    pub turn_us: Histogram<16>,
    /// Logins (and HTTP requests) answered NOT_HOME, and HOME_UNAVAILABLE.
    pub redirects: AtomicU64,
    pub home_unavailable: AtomicU64,
    /// A cluster node's own figures (the Redis link, the hand-off), set
    /// once when the node joins; nothing on a single node.
    pub cluster: OnceLock<Render>,
    /// The storage engine's own figures (RocksDB properties and tickers),
    /// set once by the server: read on scrape only.
    pub engine: OnceLock<Render>,
}

/// Writes more of the exposition (a part another module owns).
pub type Render = Box<dyn Fn(&mut String) + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            store: Arc::new(StoreHealth::default()),
            tcp_connections: AtomicI64::new(0),
            ws_connections: AtomicI64::new(0),
            shard_conns: Box::default(),
            logins: AtomicU64::new(0),
            login_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            http_requests: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            store_rows: AtomicU64::new(0),
            delivery_acks: AtomicU64::new(0),
            cursors_written: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            pages_put_off: AtomicU64::new(0),
            fanouts_put_off: AtomicU64::new(0),
            fanout: Histogram::new(FANOUT_BUCKETS),
            commit_us: Histogram::new(COMMIT_BUCKETS_US),
            push_delay_us: Histogram::new(PUSH_BUCKETS_US),
            request_us: Histogram::new(PUSH_BUCKETS_US),
            turn_us: Histogram::new(PUSH_BUCKETS_US),
            redirects: AtomicU64::new(0),
            home_unavailable: AtomicU64::new(0),
            cluster: OnceLock::new(),
            engine: OnceLock::new(),
        }
    }
}

/// Files this process has open, from /proc (0 where unavailable).
pub fn open_files() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// The soft limit on open files, from /proc (0 where unavailable).
pub fn max_open_files() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident set size of this process, from /proc (0 where unavailable).
#[allow(unsafe_code)]
pub fn rss_bytes() -> u64 {
    // SAFETY: sysconf reads one system setting; it takes no pointers.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

impl Metrics {
    /// Metrics of a node with `shards` shards.
    pub fn with_shards(shards: usize) -> Self {
        Metrics {
            shard_conns: (0..shards).map(|_| ShardConns::default()).collect(),
            ..Metrics::default()
        }
    }

    /// A session logged in (`delta` 1) or ended (-1) on `shard`: the
    /// total by transport and the shard's own.
    pub fn connection(&self, shard: u16, websocket: bool, delta: i64) {
        let (total, mine) = match (websocket, self.shard_conns.get(usize::from(shard))) {
            (false, s) => (&self.tcp_connections, s.map(|s| &s.tcp)),
            (true, s) => (&self.ws_connections, s.map(|s| &s.websocket)),
        };
        total.fetch_add(delta, Relaxed);
        if let Some(g) = mine {
            g.fetch_add(delta, Relaxed);
        }
    }

    /// A Hello answered: `Ok` with a Welcome, or refused with a code.
    pub fn count_login(&self, outcome: Result<(), ErrorCode>) {
        let counter = match outcome {
            Ok(()) => &self.logins,
            Err(code) => {
                let i = LOGIN_FAILURES
                    .iter()
                    .position(|(c, _)| *c == code)
                    .unwrap_or(LOGIN_FAILURES.len());
                &self.login_failures[i]
            }
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(
            out,
            "# HELP swiftlet_connections Logged-in connections by transport.\n# TYPE swiftlet_connections gauge\n\
             swiftlet_connections{{transport=\"tcp\"}} {}\nswiftlet_connections{{transport=\"websocket\"}} {}",
            self.tcp_connections.load(Relaxed),
            self.ws_connections.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP swiftlet_shard_connections Logged-in connections by shard and transport.\n\
             # TYPE swiftlet_shard_connections gauge"
        );
        for (i, s) in self.shard_conns.iter().enumerate() {
            let _ = writeln!(
                out,
                "swiftlet_shard_connections{{shard=\"{i}\",transport=\"tcp\"}} {}\n\
                 swiftlet_shard_connections{{shard=\"{i}\",transport=\"websocket\"}} {}",
                s.tcp.load(Relaxed),
                s.websocket.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP swiftlet_logins_total Hellos answered with a Welcome.\n# TYPE swiftlet_logins_total counter\n\
             swiftlet_logins_total {}\n\
             # HELP swiftlet_login_failures_total Hellos refused, by reason (the error code's name).\n\
             # TYPE swiftlet_login_failures_total counter",
            self.logins.load(Relaxed)
        );
        let reasons = LOGIN_FAILURES.iter().map(|(_, r)| *r).chain(["other"]);
        for (reason, n) in reasons.zip(&self.login_failures) {
            let _ = writeln!(
                out,
                "swiftlet_login_failures_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "swiftlet_http_requests_total",
                "HTTP requests served (WebSocket upgrades included).",
                &self.http_requests,
            ),
            (
                "swiftlet_messages_in_total",
                "Messages stored (1:1 and group posts).",
                &self.messages_in,
            ),
            (
                "swiftlet_messages_out_total",
                "Deliver frames written to connections.",
                &self.messages_out,
            ),
            (
                "swiftlet_acks_total",
                "Acks sent after durable writes.",
                &self.acks,
            ),
            (
                "swiftlet_store_rows_total",
                "Rows (puts and deletes) in group commits that were written.",
                &self.store_rows,
            ),
            (
                "swiftlet_delivery_acks_total",
                "DeliveryAcks that moved a device cursor.",
                &self.delivery_acks,
            ),
            (
                "swiftlet_cursors_written_total",
                "Device cursors written to the store.",
                &self.cursors_written,
            ),
            (
                "swiftlet_throttled_total",
                "Times a connection sent frames faster than --max-frames-per-sec and was not read until its bucket refilled.",
                &self.throttled,
            ),
            (
                "swiftlet_pages_put_off_total",
                "Requests that read a page (Sync, GetReceipts, GetGroup, ListGroups, GET /v1/sync) left for a later turn: the turn's share of page reads was spent, or their connection had its page this turn.",
                &self.pages_put_off,
            ),
            (
                "swiftlet_fanouts_put_off_total",
                "Group posts and group changes left for a later turn: the turn's share of fan-out rows (1,024) was spent, or their connection had handed one over this turn.",
                &self.fanouts_put_off,
            ),
            (
                "swiftlet_store_write_failures_total",
                "Store commits that failed or were refused (their requests got STORE_UNAVAILABLE).",
                &self.store.write_failures,
            ),
            (
                "swiftlet_store_recoveries_total",
                "Times the store took writes again after refusing them.",
                &self.store.recoveries,
            ),
            (
                "swiftlet_store_recovery_failures_total",
                "Attempts by the store to take writes again that failed (the disk still full); it tries again with backoff, 250 ms doubling to 5 s.",
                &self.store.recovery_failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP swiftlet_store_writable 1 while the store takes writes, 0 while it refuses them (a full disk) until it recovers.\n# TYPE swiftlet_store_writable gauge\nswiftlet_store_writable {}",
            self.store.writable.load(Relaxed)
        );
        self.fanout.render(
            &mut out,
            "swiftlet_fanout_recipients",
            "Inboxes one message was written to.",
            1.0,
        );
        self.commit_us.render(
            &mut out,
            "swiftlet_store_write_seconds",
            "Duration of one group commit (WAL write).",
            1e6,
        );
        self.push_delay_us.render(
            &mut out,
            "swiftlet_push_delay_seconds",
            "From a group commit's durable write to a shard having written its answers and pushes to the sockets.",
            1e6,
        );
        self.request_us.render(
            &mut out,
            "swiftlet_request_seconds",
            "From reading a request that goes through the commit pipeline to having written its answer.",
            1e6,
        );
        self.turn_us.render(
            &mut out,
            "swiftlet_shard_turn_seconds",
            "The work of one event-loop turn that had any, every shard: input arriving meanwhile waits up to this long to be read.",
            1e6,
        );
        if let Some(cluster) = self.cluster.get() {
            for (name, help, v) in [
                (
                    "swiftlet_cluster_redirects_total",
                    "Logins and HTTP requests answered NOT_HOME (the user's home is another node).",
                    &self.redirects,
                ),
                (
                    "swiftlet_cluster_home_unavailable_total",
                    "Logins and HTTP requests answered HOME_UNAVAILABLE.",
                    &self.home_unavailable,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                    v.load(Relaxed)
                );
            }
            cluster(&mut out);
        }
        if let Some(engine) = self.engine.get() {
            engine(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP swiftlet_resident_memory_bytes Resident set size.\n# TYPE swiftlet_resident_memory_bytes gauge\nswiftlet_resident_memory_bytes {}",
            rss_bytes()
        );
        let _ = writeln!(
            out,
            "# HELP swiftlet_open_files Open file descriptors (sockets included).\n# TYPE swiftlet_open_files gauge\nswiftlet_open_files {}\n\
             # HELP swiftlet_max_open_files The process's limit on open file descriptors.\n# TYPE swiftlet_max_open_files gauge\nswiftlet_max_open_files {}",
            open_files(),
            max_open_files()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let m = Metrics::default();
        m.fanout.observe(1);
        m.fanout.observe(3);
        m.fanout.observe(20_000);
        let text = m.render();
        assert!(text.contains("swiftlet_fanout_recipients_bucket{le=\"1\"} 1"));
        assert!(text.contains("swiftlet_fanout_recipients_bucket{le=\"5\"} 2"));
        assert!(text.contains("swiftlet_fanout_recipients_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("swiftlet_connections{transport=\"tcp\"} 0"));
        assert!(text.contains("\nswiftlet_store_writable 1\n"));
        assert!(text.contains("\nswiftlet_store_write_failures_total 0\n"));
        m.push_delay_us.observe(1500);
        let text = m.render();
        assert!(text.contains("swiftlet_push_delay_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("swiftlet_push_delay_seconds_bucket{le=\"0.0015\"} 1"));
        assert!(text.contains("swiftlet_push_delay_seconds_bucket{le=\"0.002\"} 1"));
        assert!(text.contains("swiftlet_push_delay_seconds_bucket{le=\"0.00005\"} 0"));
        m.count_login(Ok(()));
        m.count_login(Err(ErrorCode::TokenRevoked));
        m.count_login(Err(ErrorCode::Unspecified));
        let text = m.render();
        assert!(text.contains("\nswiftlet_logins_total 1\n"));
        assert!(text.contains("swiftlet_login_failures_total{reason=\"token_revoked\"} 1\n"));
        assert!(text.contains("swiftlet_login_failures_total{reason=\"other\"} 1\n"));
        assert!(text.contains("swiftlet_login_failures_total{reason=\"auth_failed\"} 0\n"));
        m.request_us.observe(700);
        let text = m.render();
        assert!(text.contains("swiftlet_request_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(text.contains("swiftlet_request_seconds_bucket{le=\"0.001\"} 1"));
    }
}
