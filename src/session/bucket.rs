//! The token bucket that limits one connection's typing notices and
//! presence subscriptions (they share it: both fan out to other users at no
//! durable cost, so both are what a client could flood).
//!
//! The state is two fields the connection keeps inline (a count and the
//! tick of the last refill), not a struct of its own: a nested struct would
//! pad the connection's slab slot by 8 bytes, paid by every idle connection.
//! A refill keeps the part of a period already waited, so the rate is
//! exactly one token per [`REFILL_TICKS`] however the requests fall.

/// Tokens a connection may spend in a burst (the bucket starts full).
pub const BURST: u8 = 10;
/// Ticks (of the shard's wheel, 100 ms) per token refilled.
pub const REFILL_TICKS: u32 = 2;

/// Take `n` tokens at tick `now` from the bucket held in `tokens` and
/// `refilled` (the tick up to which refills were counted); false, taking
/// none, when it holds fewer.
pub fn take(tokens: &mut u8, refilled: &mut u32, now: u32, n: u8) -> bool {
    let refill = now.saturating_sub(*refilled) / REFILL_TICKS;
    if refill > 0 {
        *tokens = (u32::from(*tokens) + refill).min(u32::from(BURST)) as u8;
        *refilled += refill * REFILL_TICKS;
    }
    if *tokens < n {
        return false;
    }
    *tokens -= n;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_token_per_period_exactly() {
        let (mut tokens, mut refilled) = (BURST, 0);
        for _ in 0..BURST {
            assert!(take(&mut tokens, &mut refilled, 0, 1));
        }
        assert!(!take(&mut tokens, &mut refilled, 1, 1), "empty");
        // Tick 1 counted nothing; at tick 2 one token is back, and the
        // half period waited at tick 3 is not lost.
        assert!(take(&mut tokens, &mut refilled, 3, 1));
        assert!(!take(&mut tokens, &mut refilled, 3, 1));
        assert!(take(&mut tokens, &mut refilled, 4, 1));
    }

    #[test]
    fn a_request_that_needs_more_than_is_left_takes_none() {
        let (mut tokens, mut refilled) = (BURST, 0);
        assert!(take(&mut tokens, &mut refilled, 0, 5));
        assert!(take(&mut tokens, &mut refilled, 0, 5));
        assert!(!take(&mut tokens, &mut refilled, 0, 5));
        assert_eq!(tokens, 0);
        // A long silence refills to the burst, no further.
        assert!(take(&mut tokens, &mut refilled, 1_000, 5));
        assert_eq!(tokens, BURST - 5);
    }
}
