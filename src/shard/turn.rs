//! Where one event-loop turn spent its time, for the slow-turn warning.
//!
//! A shard's turn should take well under a millisecond; one that takes
//! tens is a stall every connection of the shard feels (a slow store read, a
//! long group commit, the thread descheduled). The clock takes a timestamp
//! at each phase boundary (from the node's [`Clock`]: with the system clock
//! a `clock_gettime` through the vDSO, ~20 ns) so that a slow turn can say
//! which phase was slow.

use std::fmt;
use std::time::{Duration, Instant};

use crate::clock::Clock;

/// Phases a turn is split into.
const MAX_PHASES: usize = 12;

pub struct TurnClock {
    /// The node's clock (a clone of the system clock costs nothing).
    clock: Clock,
    started: Instant,
    last: Instant,
    phases: [(&'static str, Duration); MAX_PHASES],
    len: usize,
}

impl TurnClock {
    pub fn start(clock: Clock) -> Self {
        let now = clock.now();
        TurnClock {
            clock,
            started: now,
            last: now,
            phases: [("", Duration::ZERO); MAX_PHASES],
            len: 0,
        }
    }

    /// The phase `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        let now = self.clock.now();
        if let Some(p) = self.phases.get_mut(self.len) {
            *p = (name, now - self.last);
            self.len += 1;
        }
        self.last = now;
    }

    /// When the turn started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the last phase ended.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// From the start to the last mark.
    pub fn total(&self) -> Duration {
        self.last - self.started
    }
}

/// `total 23.1ms: read 0.2ms, commit 22.7ms, …` (phases under 0.1 ms left out).
impl fmt::Display for TurnClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "total {:.1}ms:", self.total().as_secs_f64() * 1e3)?;
        for (name, d) in &self.phases[..self.len] {
            if *d >= Duration::from_micros(100) {
                write!(f, " {name} {:.1}ms", d.as_secs_f64() * 1e3)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_short_ones_are_left_out_of_the_report() {
        let mut clock = TurnClock::start(Clock::system());
        clock.mark("first");
        clock.mark("second");
        let total: Duration = clock.phases[..clock.len].iter().map(|(_, d)| *d).sum();
        assert_eq!(total, clock.total());

        clock.phases[0] = ("quick", Duration::from_micros(50));
        clock.phases[1] = ("slow", Duration::from_micros(2_500));
        let text = clock.to_string();
        assert!(text.contains(" slow 2.5ms"), "{text}");
        assert!(!text.contains("quick"), "{text}");
        // More phases than it holds: the extra ones are dropped, not a panic.
        for _ in 0..MAX_PHASES + 2 {
            clock.mark("more");
        }
        assert_eq!(clock.len, MAX_PHASES);
    }
}
