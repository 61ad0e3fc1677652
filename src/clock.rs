//! Where a node reads the time: wall-clock milliseconds (message and event
//! timestamps, message ids, last seen) and a monotonic [`Instant`] (the
//! shards' ticks and timers, loop-turn timing, request latency and push
//! delay, commit timing).
//!
//! One [`Clock`] per node, from [`Config::clock`](crate::config::Config):
//! the shards, the session code, the pipeline and its fan-out all read it,
//! so a test that starts a server in-process with a [`ManualClock`] moves
//! every timeout and timestamp of the node by hand (quinn's habit:
//! time-dependent logic driven without sleeping). It is a concrete enum,
//! not a trait object: the system clock costs one predictable branch per
//! read and no indirect call. What still reads the operating system's
//! clocks directly is off the shards' path: the rate limit of log lines,
//! the store's background WAL sync, token expiry, and the cluster's lease
//! and shipping threads.
//!
//! A wall clock may step backwards (NTP, a VM resumed); nothing here hides
//! that. [`crate::ids::IdGen`] keeps ids increasing across such a step,
//! and the monotonic half never goes back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The time source of a node. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Clock {
    System(SystemClock),
    Manual(ManualClock),
}

impl Clock {
    /// The operating system's clocks.
    pub fn system() -> Clock {
        Clock::System(SystemClock)
    }

    /// Milliseconds since the Unix epoch (may step backwards).
    #[inline]
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System(c) => c.now_ms(),
            Clock::Manual(c) => c.now_ms(),
        }
    }

    /// A monotonic instant (never goes backwards).
    #[inline]
    pub fn now(&self) -> Instant {
        match self {
            Clock::System(c) => c.now(),
            Clock::Manual(c) => c.now(),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

/// `SystemTime` and `Instant`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    #[inline]
    pub fn now_ms(&self) -> u64 {
        crate::ids::unix_ms()
    }

    #[inline]
    pub fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told, shared by its clones (the test keeps
/// one, the code under test reads another).
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Manual>,
}

#[derive(Debug)]
struct Manual {
    /// `Instant` cannot be built from a number, so the monotonic reading is
    /// this real instant plus `elapsed_ns`.
    base: Instant,
    elapsed_ns: AtomicU64,
    wall_ms: AtomicU64,
}

impl ManualClock {
    /// A clock that reads `wall_ms` until moved.
    pub fn new(wall_ms: u64) -> ManualClock {
        ManualClock {
            inner: Arc::new(Manual {
                base: Instant::now(),
                elapsed_ns: AtomicU64::new(0),
                wall_ms: AtomicU64::new(wall_ms),
            }),
        }
    }

    /// This clock as a node's [`Clock`].
    pub fn clock(&self) -> Clock {
        Clock::Manual(self.clone())
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.wall_ms.load(Ordering::Relaxed)
    }

    pub fn now(&self) -> Instant {
        self.inner.base + Duration::from_nanos(self.inner.elapsed_ns.load(Ordering::Relaxed))
    }

    /// Let `d` pass on both clocks.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.inner.elapsed_ns.fetch_add(ns, Ordering::Relaxed);
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.inner.wall_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Set the wall clock, backwards too (as NTP may); the monotonic clock
    /// does not move.
    pub fn set_ms(&self, wall_ms: u64) {
        self.inner.wall_ms.store(wall_ms, Ordering::Relaxed);
    }
}

/// Milliseconds per tick of the shards' timing wheels: the resolution of
/// every per-connection timeout.
pub const TICK_MS: u64 = 100;

/// `ms` in ticks, rounded up.
pub fn ticks(ms: u64) -> u32 {
    ms.div_ceil(TICK_MS).min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_agree() {
        let m = ManualClock::new(1_000);
        let c = m.clock();
        let t0 = c.now();
        assert_eq!(c.now_ms(), 1_000);
        m.advance(Duration::from_millis(250));
        assert_eq!(c.now_ms(), 1_250);
        assert_eq!(c.now().duration_since(t0), Duration::from_millis(250));
        m.set_ms(500);
        assert_eq!(c.now_ms(), 500, "the wall clock may step back");
        assert_eq!(c.now().duration_since(t0), Duration::from_millis(250));
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let c = Clock::system();
        let (a, b) = (crate::ids::unix_ms(), c.now_ms());
        assert!(b >= a && b - a < 60_000);
        let t = c.now();
        assert!(c.now() >= t);
    }
}
