//! Log lines that a client, a full disk or a file-descriptor limit can make
//! repeat thousands of times a second, cut to at most one per period per
//! call site.
//!
//! A server at its file limit fails `accept` on every readiness event, and a
//! failing disk fails every group commit: one line each would flood the logs
//! (and the disk they live on) exactly when an operator needs them. Each call
//! site of [`log_every!`](crate::log_every) owns one [`Every`]: the first
//! line of a period is logged, with a `suppressed` field counting the lines
//! left out since the one before, and the rest only counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's limit: at most one line per `period_ms`.
pub struct Every {
    period_ms: u64,
    /// Milliseconds since [`epoch`] before which lines are suppressed.
    next: AtomicU64,
    /// Lines suppressed since the last one logged.
    suppressed: AtomicU64,
}

/// The process's own clock origin for [`Every`].
fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Every {
    pub const fn new(period_ms: u64) -> Self {
        Every {
            period_ms,
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now (`n` lines were suppressed
    /// since the last one), `None` when this one is to be suppressed.
    pub fn check(&self) -> Option<u64> {
        self.check_at(epoch().elapsed().as_millis() as u64)
    }

    /// [`Every::check`] at `now_ms` on the limiter's clock (for tests).
    pub fn check_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now_ms < next
            || self
                .next
                .compare_exchange(
                    next,
                    now_ms + self.period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// `log_every!(period_ms, level, fields and message)`: a `tracing` event at
/// `level`, at most once per `period_ms` from this call site, with a
/// `suppressed` field counting the events left out since the last one.
#[macro_export]
macro_rules! log_every {
    ($period_ms:expr, $level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::Every = $crate::logging::Every::new($period_ms);
        if let Some(suppressed) = LIMIT.check() {
            tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::Every;

    #[test]
    fn one_line_per_period_and_the_count_of_the_rest() {
        let limit = Every::new(1000);
        assert_eq!(limit.check_at(5), Some(0));
        assert_eq!(limit.check_at(6), None);
        assert_eq!(limit.check_at(1004), None);
        assert_eq!(limit.check_at(1005), Some(2));
        assert_eq!(limit.check_at(1006), None);
        assert_eq!(limit.check_at(5000), Some(1));
    }

    #[test]
    fn the_macro_logs_through_tracing() {
        for i in 0..3 {
            crate::log_every!(60_000, warn, i, "a repeated line");
        }
    }
}
