//! Live counters and histograms of one process, shared by every connection
//! task through an `Arc<Stats>`.
//!
//! Counters are relaxed atomics (a progress line may be a few events stale,
//! never wrong at the end). Latencies go into HdrHistograms, in
//! microseconds, behind one mutex each: a record is a few nanoseconds, and
//! with loadgen on 2 cores the lock is rarely contended. The ticker swaps out
//! the per-second delivery histogram once a second for the latency timeline
//! (`--plot`, `timeline` in the summary).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Highest latency recorded, in microseconds (one hour); above is clamped.
const MAX_US: u64 = 3_600_000_000;

/// A fresh latency histogram (µs, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h with 3 significant figures is a valid configuration.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

fn record(h: &Mutex<Histogram<u64>>, us: u64) {
    let mut h = h.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    h.saturating_record(us.clamp(1, MAX_US));
}

fn take(h: &Mutex<Histogram<u64>>) -> Histogram<u64> {
    let mut h = h.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::replace(&mut *h, new_hist())
}

/// Process-wide counters and histograms.
pub struct Stats {
    pub open: AtomicU64,
    pub logins: AtomicU64,
    /// NOT_HOME redirects followed by logins (a cluster's entry nodes).
    pub redirects: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    /// Our own messages echoed back to the sending device.
    pub echoes: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Inbox seqs that arrived ahead of a hole.
    pub gaps: AtomicU64,
    pub error_count: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// While false (warm-up), latencies are not recorded.
    pub measuring: AtomicBool,
    delivery: Mutex<Histogram<u64>>,
    delivery_second: Mutex<Histogram<u64>>,
    ack: Mutex<Histogram<u64>>,
    login: Mutex<Histogram<u64>>,
    /// group: send → delivery to the last online member, per post.
    fanout: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            open: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            measuring: AtomicBool::new(true),
            delivery: Mutex::new(new_hist()),
            delivery_second: Mutex::new(new_hist()),
            ack: Mutex::new(new_hist()),
            login: Mutex::new(new_hist()),
            fanout: Mutex::new(new_hist()),
        }
    }
}

/// A point-in-time copy of the counters, for progress lines.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub open: u64,
    pub logins: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    /// This process's CPU time so far (µs) and its RSS (bytes), filled by
    /// the progress ticker ([`Snapshot::with_cost`]), not by `snapshot`.
    #[serde(default)]
    pub cpu_us: u64,
    #[serde(default)]
    pub rss_bytes: u64,
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.open += o.open;
        self.logins += o.logins;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.errors += o.errors;
        self.cpu_us += o.cpu_us;
        self.rss_bytes += o.rss_bytes;
    }

    /// With this process's CPU time and RSS read from /proc.
    pub fn with_cost(mut self) -> Self {
        self.cpu_us = crate::procmem::self_cpu_us();
        self.rss_bytes = crate::procmem::self_rss_bytes();
        self
    }
}

impl Stats {
    /// Count one error of `kind`.
    pub fn error(&self, kind: impl Into<String>) {
        self.error_count.fetch_add(1, Relaxed);
        let mut m = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(kind.into()).or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn measuring(&self) -> bool {
        self.measuring.load(Relaxed)
    }

    /// A message delivered `us` microseconds after it was sent.
    pub fn record_delivery(&self, us: u64) {
        if self.measuring() {
            record(&self.delivery, us);
            record(&self.delivery_second, us);
        }
    }

    /// A send acknowledged `us` microseconds after it was written.
    pub fn record_ack(&self, us: u64) {
        if self.measuring() {
            record(&self.ack, us);
        }
    }

    /// A post that reached its last member `us` microseconds after it was sent.
    pub fn record_fanout(&self, us: u64) {
        if self.measuring() {
            record(&self.fanout, us);
        }
    }

    /// Move the fan-out histogram out.
    pub fn take_fanout(&self) -> Histogram<u64> {
        take(&self.fanout)
    }

    /// A connect + login that took `us` microseconds.
    pub fn record_login(&self, us: u64) {
        self.logins.fetch_add(1, Relaxed);
        record(&self.login, us);
    }

    /// The delivery histogram of the second that just ended (and reset it).
    pub fn take_second(&self) -> Histogram<u64> {
        take(&self.delivery_second)
    }

    /// Drop everything recorded so far in the histograms (end of warm-up).
    pub fn reset_histograms(&self) {
        take(&self.delivery);
        take(&self.delivery_second);
        take(&self.ack);
        take(&self.fanout);
    }

    /// Move the totals out: (delivery, ack, login).
    pub fn take_histograms(&self) -> (Histogram<u64>, Histogram<u64>, Histogram<u64>) {
        (take(&self.delivery), take(&self.ack), take(&self.login))
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            open: self.open.load(Relaxed),
            logins: self.logins.load(Relaxed),
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            errors: self.error_count.load(Relaxed),
            ..Snapshot::default()
        }
    }
}

/// Keeps `open` honest: counts a connection as open until dropped.
pub struct OpenGuard<'a>(&'a Stats);

impl<'a> OpenGuard<'a> {
    pub fn new(stats: &'a Stats) -> Self {
        stats.open.fetch_add(1, Relaxed);
        OpenGuard(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}
