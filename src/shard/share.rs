//! A turn's share of one kind of costly work, counted in rows.
//!
//! Some requests cost a shard far more than a frame: a page read on its own
//! turn (a `Sync` of 500 events, a `GetReceipts` of 500 watermarks) or a
//! group post whose fan-out the same turn's group commit writes (an inbox
//! row per member). Counting them as frames let one client that pipelined
//! them hold every other connection of its shard for tens of milliseconds
//! a turn. Each kind has a [`Share`] per turn: a request is charged the
//! rows it may cost, one that does not fit waits for the next turn (which
//! serves it first), and a request always fits a turn that has spent none,
//! so the biggest one still goes through. The shard also lets each
//! connection have at most one costly request a turn (see
//! `Shard::handle_input`), so the share goes round instead of to whoever
//! sends most.

/// What is left of one turn's share.
pub struct Share {
    left: usize,
    full: usize,
}

impl Share {
    pub const fn new(full: usize) -> Share {
        Share { left: full, full }
    }

    /// A new turn: the whole share again.
    pub fn refill(&mut self) {
        self.left = self.full;
    }

    /// Charge `rows` if they fit what is left; false, charging nothing,
    /// when they do not. Anything fits a turn that has spent none.
    pub fn take(&mut self, rows: usize) -> bool {
        if rows > self.left && self.left < self.full {
            return false;
        }
        self.charge(rows);
        true
    }

    /// Charge `rows` whether they fit or not: work that cannot wait (a
    /// parked long-poll woken by its event).
    pub fn charge(&mut self, rows: usize) {
        self.left = self.left.saturating_sub(rows);
    }
}

#[cfg(test)]
mod tests {
    use super::Share;

    #[test]
    fn the_first_request_always_fits_and_the_rest_only_within_the_share() {
        let mut s = Share::new(512);
        assert!(s.take(500));
        assert!(!s.take(100), "over what is left");
        assert!(s.take(12));
        assert!(!s.take(1), "spent");
        s.refill();
        assert!(s.take(5_000), "the biggest fits an untouched turn");
        assert!(!s.take(1));
        s.refill();
        s.charge(600);
        assert!(!s.take(1), "a charge may take it all");
    }
}
