//! The token buckets that limit what one connection may send: every frame
//! (`--max-frames-per-sec`), and its typing notices and presence
//! subscriptions (which share a bucket: both fan out to other users at no
//! durable cost, so both are what a client could flood).
//!
//! The state is three fields the connection keeps inline (typing units,
//! frame tokens, and the tick both were refilled to), not a struct of its
//! own: a nested struct would pad the connection's slab slot by 8 bytes,
//! paid by every idle connection. Both buckets refill together, by whole
//! ticks, in [`refill`], which the shard calls before it handles a
//! connection's input; taking is then a plain subtraction. Typing counts
//! half tokens (one unit per tick, [`UNITS_PER_TOKEN`] per token), so its
//! rate is exactly one token per [`REFILL_TICKS`] however the requests fall.

/// Typing and presence tokens a connection may spend in a burst (the
/// bucket starts full).
pub const BURST: u8 = 10;
/// Ticks (of the shard's wheel, 100 ms) per typing token refilled.
pub const REFILL_TICKS: u32 = 2;
/// Typing units per token: one unit comes back each tick.
const UNITS_PER_TOKEN: u8 = REFILL_TICKS as u8;
/// A full typing bucket, in units.
pub const TYPING_FULL: u8 = BURST * UNITS_PER_TOKEN;

/// The frame bucket's size and refill, from `--max-frames-per-sec`: it holds
/// one second's frames and gets a tick's share back each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRate {
    /// Tokens when full (0: no limit).
    full: u16,
    /// Tokens back per tick.
    per_tick: u16,
}

impl FrameRate {
    /// No limit on frames.
    pub const OFF: FrameRate = FrameRate {
        full: 0,
        per_tick: 0,
    };

    /// `per_sec` frames a second (0: no limit; at most `u16::MAX`, which
    /// the configuration checks), refilled by whole ticks of `tick_ms`.
    pub fn new(per_sec: u32, tick_ms: u64) -> Self {
        if per_sec == 0 {
            return FrameRate::OFF;
        }
        let full = u16::try_from(per_sec).unwrap_or(u16::MAX);
        let per_tick = (u64::from(full) * tick_ms).div_ceil(1000).max(1);
        FrameRate {
            full,
            per_tick: u16::try_from(per_tick).unwrap_or(u16::MAX),
        }
    }

    /// Frames are limited.
    pub fn on(&self) -> bool {
        self.full > 0
    }

    /// A full bucket (what a new connection starts with).
    pub fn full(&self) -> u16 {
        self.full
    }
}

/// Bring both buckets to tick `now`: the ticks since `refilled` give back
/// one typing unit each and a tick's share of frames each, up to full.
pub fn refill(typing: &mut u8, frames: &mut u16, refilled: &mut u32, now: u32, rate: FrameRate) {
    let ticks = now.saturating_sub(*refilled);
    if ticks == 0 {
        return;
    }
    *refilled = now;
    *typing = (u32::from(*typing) + ticks).min(u32::from(TYPING_FULL)) as u8;
    let back = u64::from(ticks) * u64::from(rate.per_tick);
    *frames = (u64::from(*frames) + back).min(u64::from(rate.full)) as u16;
}

/// Take `n` typing tokens; false, taking none, when fewer are left.
pub fn take_typing(typing: &mut u8, n: u8) -> bool {
    let units = n.saturating_mul(UNITS_PER_TOKEN);
    if *typing < units {
        return false;
    }
    *typing -= units;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(typing: &mut u8, refilled: &mut u32, now: u32, n: u8) -> bool {
        refill(typing, &mut 0, refilled, now, FrameRate::OFF);
        take_typing(typing, n)
    }

    #[test]
    fn a_burst_then_one_token_per_period_exactly() {
        let (mut typing, mut refilled) = (TYPING_FULL, 0);
        for _ in 0..BURST {
            assert!(at(&mut typing, &mut refilled, 0, 1));
        }
        assert!(!at(&mut typing, &mut refilled, 1, 1), "empty");
        // Tick 1 gave half a token; at tick 2 one token is back, and the
        // half period waited at tick 3 is not lost.
        assert!(at(&mut typing, &mut refilled, 3, 1));
        assert!(!at(&mut typing, &mut refilled, 3, 1));
        assert!(at(&mut typing, &mut refilled, 4, 1));
    }

    #[test]
    fn a_request_that_needs_more_than_is_left_takes_none() {
        let (mut typing, mut refilled) = (TYPING_FULL, 0);
        assert!(at(&mut typing, &mut refilled, 0, 5));
        assert!(at(&mut typing, &mut refilled, 0, 5));
        assert!(!at(&mut typing, &mut refilled, 0, 5));
        assert_eq!(typing, 0);
        // A long silence refills to the burst, no further.
        assert!(at(&mut typing, &mut refilled, 1_000, 5));
        assert_eq!(typing, TYPING_FULL - 5 * UNITS_PER_TOKEN);
    }

    #[test]
    fn frames_hold_a_second_and_get_a_tick_share_back_each_tick() {
        let rate = FrameRate::new(2_000, 100);
        assert_eq!((rate.full(), rate.per_tick), (2_000, 200));
        let (mut typing, mut frames, mut refilled) = (0, 0, 10);
        refill(&mut typing, &mut frames, &mut refilled, 10, rate);
        assert_eq!(frames, 0, "no tick passed");
        refill(&mut typing, &mut frames, &mut refilled, 13, rate);
        assert_eq!(frames, 600);
        refill(&mut typing, &mut frames, &mut refilled, 1_000_000, rate);
        assert_eq!(frames, 2_000, "never over a second's worth");
        // A rate below ten a second still gets a token each tick.
        assert_eq!(FrameRate::new(5, 100).per_tick, 1);
        assert_eq!(FrameRate::new(u32::MAX, 100).full(), u16::MAX);
        assert!(!FrameRate::new(0, 100).on());
    }
}
