//! Open-loop pacing finer than tokio's timer.
//!
//! With `--rate R` the senders of a run share the rate: sender `k` of `N`
//! sends at `t0 + k/R + j·N/R`, so consecutive sends are `1/R` apart (0.1 ms
//! at 10,000/s). tokio's timer wheel has a resolution of one millisecond, so
//! per-sender timers fire in whole-millisecond groups: at 10,000/s, ten
//! senders sent in the same instant at the start of every millisecond, and
//! the queueing of that burst, in loadgen and in the server, was measured
//! as send→delivered latency. A load generator's own timer should not shape
//! the load it claims to offer.
//!
//! So one pacer thread per process sleeps to each send's own time
//! (`std::thread::sleep`: `nanosleep` on high-resolution timers) and
//! releases the sender whose turn it is through its [`Slot`]: a counter of
//! sends due and a `Notify` that wakes the sender's task. A pacer that
//! wakes late releases every send due by then, so the rate is exact however
//! late it runs (what tokio's default missed-tick behaviour did too).
//! Senders of other worker processes have a slot here that no task claims;
//! the pacer skips it without sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One sender's line from the pacer.
#[derive(Default)]
pub struct Slot {
    /// Sends released and not yet taken.
    due: AtomicU32,
    /// A task of this process sends for this slot.
    claimed: AtomicBool,
    notify: Notify,
}

impl Slot {
    /// Wait until at least one send is due; take and return how many are.
    /// Cancel-safe: the count is taken only in the poll that returns it.
    pub async fn due(&self) -> u32 {
        loop {
            let n = self.due.swap(0, Ordering::AcqRel);
            if n > 0 {
                return n;
            }
            // A release between the swap and this wait leaves a permit in
            // the Notify, so it is not missed.
            self.notify.notified().await;
        }
    }

    fn release(&self) {
        self.due.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// The slots of every sender of the run, indexed by global sender index.
pub struct Pacer {
    slots: Vec<Slot>,
}

impl Pacer {
    /// Slots for `senders` senders over all processes.
    pub fn new(senders: usize) -> Self {
        Pacer {
            slots: (0..senders).map(|_| Slot::default()).collect(),
        }
    }

    /// Sender `k`'s slot, marked as sending from this process. `None` when
    /// `k` is out of range.
    pub fn claim(&self, k: u32) -> Option<&Slot> {
        let slot = self.slots.get(k as usize)?;
        slot.claimed.store(true, Ordering::Release);
        Some(slot)
    }

    /// Start the pacer thread: sender `k` is released at `t0 + k·stagger +
    /// j·period` for j = 0, 1, … until `stop` is cancelled.
    pub fn start(
        self: &Arc<Self>,
        t0: Instant,
        stagger: Duration,
        period: Duration,
        stop: CancellationToken,
    ) -> std::io::Result<JoinHandle<()>> {
        let pacer = self.clone();
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || pacer.run(t0, stagger, period, &stop))
    }

    fn run(&self, t0: Instant, stagger: Duration, period: Duration, stop: &CancellationToken) {
        let mut start_of_period = t0;
        while !stop.is_cancelled() {
            let mut released = false;
            for (k, slot) in self.slots.iter().enumerate() {
                if !slot.claimed.load(Ordering::Acquire) {
                    continue;
                }
                sleep_until(start_of_period + stagger * k as u32);
                if stop.is_cancelled() {
                    return;
                }
                slot.release();
                released = true;
            }
            start_of_period += period;
            if !released {
                // No sender in this process (yet): wait out the period
                // instead of spinning over the slots.
                sleep_until(start_of_period);
            }
        }
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claimed_slots_are_released_in_turn_and_nothing_is_lost() {
        let pacer = Arc::new(Pacer::new(4));
        let (a, b) = (
            pacer.claim(1).expect("slot 1"),
            pacer.claim(3).expect("slot 3"),
        );
        assert!(pacer.claim(4).is_none());
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let thread = pacer
            .start(
                t0,
                Duration::from_micros(100),
                Duration::from_micros(400),
                stop.clone(),
            )
            .expect("pacer thread");
        // Take sends until each slot has had 50; a slot's count never
        // runs ahead of the other's by more than what was due meanwhile.
        let (mut got_a, mut got_b) = (0u32, 0u32);
        while got_a < 50 || got_b < 50 {
            tokio::select! {
                n = a.due(), if got_a < 50 => got_a += n,
                n = b.due(), if got_b < 50 => got_b += n,
            }
        }
        stop.cancel();
        thread.join().expect("pacer exits");
        // The unclaimed slots were never released.
        assert_eq!(pacer.slots[0].due.load(Ordering::Acquire), 0);
        assert_eq!(pacer.slots[2].due.load(Ordering::Acquire), 0);
        // 50 each in 50 periods of 0.4 ms at the least: the pacer never
        // releases a send before its time.
        assert!(t0.elapsed() >= Duration::from_micros(400 * 49));
    }

    #[test]
    fn a_pacer_with_no_sender_here_stops_when_told() {
        let pacer = Arc::new(Pacer::new(3));
        let stop = CancellationToken::new();
        let thread = pacer
            .start(
                Instant::now(),
                Duration::from_millis(1),
                Duration::from_millis(3),
                stop.clone(),
            )
            .expect("pacer thread");
        std::thread::sleep(Duration::from_millis(10));
        stop.cancel();
        // Returns within a period; before the fix it spun forever.
        thread.join().expect("pacer exits");
        assert!(pacer
            .slots
            .iter()
            .all(|s| s.due.load(Ordering::Acquire) == 0));
    }
}
