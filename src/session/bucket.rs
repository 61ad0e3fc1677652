//! The token buckets that limit what one connection may send: every frame
//! (`--max-frames-per-sec`), and its typing notices and presence
//! subscriptions (which share a bucket: both fan out to other users at no
//! durable cost, so both are what a client could flood).
//!
//! Both refill continuously, from the shard's clock read once per loop
//! turn as an [`Instant`] of 100 µs units: a connection gets back what the
//! time since its last refill earned, counted against fixed boundaries
//! (every 1/rate of a second, from the shard's start), so nothing is lost
//! to rounding however often it refills, and a client held at the rate is
//! read in small steps ([`FrameRate::retry`]) rather than in a burst each
//! 100 ms tick.
//!
//! The state is three fields the connection keeps inline (typing units,
//! frame tokens, and the instant both were refilled to), not a struct of
//! its own: a nested struct would pad the connection's slab slot by 8
//! bytes, paid by every idle connection. Both refill together in
//! [`refill`], which the shard calls before it handles a connection's
//! input; taking is then a plain subtraction. Typing counts half tokens
//! (one unit per 100 ms, [`UNITS_PER_TOKEN`] per token), so its rate is
//! exactly one token per [`REFILL_TICKS`] ticks however the requests fall.

/// A point on a shard's clock, in 100 µs units since the shard started,
/// wrapping after about five days (see [`refill`]).
pub type Instant = u32;
/// [`Instant`] units per second.
pub const UNITS_PER_SEC: u64 = 10_000;
/// [`Instant`] units per tick of the shard's wheel (100 ms).
pub const UNITS_PER_TICK: u32 = 1_000;
/// The least time between two reads of a connection held at its rate (2
/// ms): more often would cost a loop turn for a token or two.
const MIN_RETRY: u32 = 20;

/// Typing and presence tokens a connection may spend in a burst (the
/// bucket starts full).
pub const BURST: u8 = 10;
/// Ticks (of the shard's wheel, 100 ms) per typing token refilled.
pub const REFILL_TICKS: u32 = 2;
/// Typing units per token: one unit comes back each tick.
const UNITS_PER_TOKEN: u8 = REFILL_TICKS as u8;
/// A full typing bucket, in units.
pub const TYPING_FULL: u8 = BURST * UNITS_PER_TOKEN;
/// Typing units earned per second (one a tick).
const TYPING_PER_SEC: u64 = UNITS_PER_SEC / UNITS_PER_TICK as u64;

/// Page rows (inbox events, members, groups) a frame token pays for: a
/// `Sync` of 100 events takes 10 tokens, a page of 500 members 50.
pub const ROWS_PER_PAGE_TOKEN: usize = 10;

/// The frame bucket, from `--max-frames-per-sec`: it holds one second's
/// frames and earns them back continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRate {
    /// Tokens when full, and earned per second (0: no limit).
    full: u16,
}

impl FrameRate {
    /// No limit on frames.
    pub const OFF: FrameRate = FrameRate { full: 0 };

    /// `per_sec` frames a second (0: no limit; at most `u16::MAX`, which
    /// the configuration checks).
    pub fn new(per_sec: u32) -> Self {
        FrameRate {
            full: u16::try_from(per_sec).unwrap_or(u16::MAX),
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

    /// Tokens a group post or group change reaching `members` takes: one
    /// per member (an inbox row each, and for a post a push to each online
    /// device; see `session::fanout_cost`), at least one
    /// and at most a full bucket, so that the biggest group's post still
    /// goes through once a second. Two clients posting back to back to
    /// groups of 500, a frame a post, wrote 500,000 inbox rows a second
    /// and raised the honest users' p99 from about 2 to 400-630 ms
    /// (docs/performance.md).
    pub fn fanout_tokens(&self, members: usize) -> u16 {
        u16::try_from(members)
            .unwrap_or(u16::MAX)
            .clamp(1, self.full.max(1))
    }

    /// Tokens a page of `rows` takes ([`ROWS_PER_PAGE_TOKEN`] rows a
    /// token, rounded up; at least one, at most a full bucket): two
    /// clients pipelining the biggest receipt, member and group pages, a
    /// frame each, had 100 pages of 500 rows read a second each at a
    /// phone's rate (100 frames/s), and took the measured server's CPU
    /// from 10 to 20 s a run.
    pub fn page_tokens(&self, rows: usize) -> u16 {
        self.fanout_tokens(rows.div_ceil(ROWS_PER_PAGE_TOKEN))
    }

    /// How long after a connection ran dry to read it again: one token's
    /// time, and at least [`MIN_RETRY`].
    pub fn retry(&self) -> u32 {
        let token = UNITS_PER_SEC.div_ceil(u64::from(self.full.max(1)));
        u32::try_from(token).unwrap_or(u32::MAX).max(MIN_RETRY)
    }
}

/// What `per_sec` a second earns between instants `then` and `now`: the
/// boundaries (multiples of 1/`per_sec` s) passed, so that refilling often
/// loses nothing. Across the clock's wrap it counts the elapsed time
/// instead, which may drop a fraction once every five days.
fn earned(then: Instant, now: Instant, per_sec: u64) -> u64 {
    let at = |t: Instant| u64::from(t) * per_sec / UNITS_PER_SEC;
    if now >= then {
        at(now) - at(then)
    } else {
        u64::from(now.wrapping_sub(then)) * per_sec / UNITS_PER_SEC
    }
}

/// Bring both buckets to instant `now`: the time since `refilled` gives
/// back a typing unit per 100 ms and a frame per 1/rate s, up to full.
pub fn refill(
    typing: &mut u8,
    frames: &mut u16,
    refilled: &mut Instant,
    now: Instant,
    rate: FrameRate,
) {
    if now == *refilled {
        return;
    }
    let then = std::mem::replace(refilled, now);
    let back = earned(then, now, TYPING_PER_SEC);
    *typing = (u64::from(*typing) + back).min(u64::from(TYPING_FULL)) as u8;
    if rate.on() {
        let back = earned(then, now, u64::from(rate.full));
        *frames = (u64::from(*frames) + back).min(u64::from(rate.full)) as u16;
    }
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

    const TICK: Instant = UNITS_PER_TICK;

    fn at(typing: &mut u8, refilled: &mut Instant, tick: u32, n: u8) -> bool {
        refill(typing, &mut 0, refilled, tick * TICK, FrameRate::OFF);
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
    fn a_post_takes_a_token_per_member_and_a_page_one_per_ten_rows_up_to_a_full_bucket() {
        let rate = FrameRate::new(100);
        assert_eq!(rate.fanout_tokens(0), 1);
        assert_eq!(rate.fanout_tokens(40), 40);
        assert_eq!(rate.fanout_tokens(1_024), 100);
        assert_eq!(FrameRate::new(20_000).fanout_tokens(100_000), 20_000);
        assert_eq!(rate.page_tokens(100), 10);
        assert_eq!(rate.page_tokens(1), 1);
        assert_eq!(rate.page_tokens(41), 5);
        assert_eq!(FrameRate::new(20).page_tokens(500), 20);
    }

    #[test]
    fn frames_hold_a_second_and_come_back_continuously() {
        let rate = FrameRate::new(2_000);
        assert_eq!(rate.full(), 2_000);
        let (mut typing, mut frames, mut refilled) = (0, 0, 10 * TICK);
        refill(&mut typing, &mut frames, &mut refilled, 10 * TICK, rate);
        assert_eq!(frames, 0, "no time passed");
        // 2,000 a second is one per 5 units (0.5 ms).
        refill(&mut typing, &mut frames, &mut refilled, 10 * TICK + 5, rate);
        assert_eq!(frames, 1);
        refill(&mut typing, &mut frames, &mut refilled, 13 * TICK, rate);
        assert_eq!(frames, 600, "three ticks' worth in all");
        assert_eq!(typing, 3, "and a typing unit per tick");
        refill(&mut typing, &mut frames, &mut refilled, u32::MAX - 1, rate);
        assert_eq!(frames, 2_000, "never over a second's worth");
        assert_eq!(FrameRate::new(u32::MAX).full(), u16::MAX);
        assert!(!FrameRate::new(0).on());
    }

    #[test]
    fn refilling_often_loses_nothing_to_rounding() {
        // 3 a second: one per 3,333.3 units. Refilled every unit for ten
        // seconds, exactly 30 come back; typing, 100.
        let rate = FrameRate::new(3);
        let (mut typing, mut frames, mut refilled) = (0, 0, 0);
        let (mut got, mut units) = (0u32, 0u32);
        for now in 1..=10 * UNITS_PER_SEC as u32 {
            refill(&mut typing, &mut frames, &mut refilled, now, rate);
            got += u32::from(frames);
            frames = 0;
            units += u32::from(typing);
            typing = 0;
        }
        assert_eq!((got, units), (30, 100));
    }

    #[test]
    fn across_the_clock_wrap_the_elapsed_time_counts() {
        let rate = FrameRate::new(1_000);
        let (mut typing, mut frames, mut refilled) = (0, 0, u32::MAX - 4);
        // 4 + 6 units later, wrapped: 1 ms, one frame.
        refill(&mut typing, &mut frames, &mut refilled, 5, rate);
        assert_eq!((frames, refilled), (1, 5));
    }

    #[test]
    fn a_dry_connection_is_read_again_after_a_token_and_at_least_2_ms() {
        assert_eq!(FrameRate::new(1_000).retry(), MIN_RETRY);
        assert_eq!(FrameRate::new(20_000).retry(), MIN_RETRY);
        assert_eq!(FrameRate::new(20).retry(), 500, "one token: 50 ms");
        assert_eq!(FrameRate::new(3).retry(), 3_334);
    }
}
