//! Exponential backoff with jitter, for reconnect loops.
//!
//! Jitter matters more than the curve: after a server restart every client
//! reconnects at once, and without it they would keep arriving in lockstep.
//! Each delay is drawn uniformly from `[base/2, base]` ("equal jitter"), so a
//! client never retries sooner than half the nominal delay.

use std::time::Duration;

use rand::Rng;

/// Doubling delays from `initial` up to `max`, jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            base: initial,
        }
    }

    /// The delay before the next attempt; doubles the nominal delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (base * 2).min(self.max);
        let half = base / 2;
        let jitter_ns = rand::thread_rng().gen_range(0..=half.as_nanos() as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Back to the initial delay (call after a success).
    pub fn reset(&mut self) {
        self.base = self.initial;
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 5 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let bounds = [100, 200, 400, 400, 400];
        for max_ms in bounds {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(max_ms / 2), "{d:?}");
            assert!(d <= Duration::from_millis(max_ms), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
