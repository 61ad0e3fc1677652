//! Per-device inbox bookkeeping: which seqs arrived, which are missing, which
//! came twice.
//!
//! The server promises each device every event after its cursor exactly once,
//! in seq order. [`CursorTracker`] checks that promise from the client side
//! (tests and loadgen count duplicates and gaps with it) and yields the value
//! to put in `DeliveryAck.up_to`: the highest seq below which nothing is
//! missing. Out-of-order arrivals above a hole are remembered, so the cursor
//! jumps forward once the hole is filled (e.g. by a `Sync`). Pure data, no
//! I/O, so it is tested without a server.
//!
//! Seqs are only comparable within one **inbox epoch** (protocol/README.md
//! section 8): after a server crash that may have lost its last writes,
//! the server changes the epoch, and seqs it had handed out may name other
//! events. The tracker remembers the epoch of its seqs and, shown another
//! ([`CursorTracker::on_welcome`], [`CursorTracker::on_sync_batch`]),
//! forgets them and starts over from the server's cursor; otherwise it
//! would count the new events at reused seqs as duplicates and drop them.

use std::collections::BTreeSet;

use swiftlet_protocol::pb;

/// What one observed seq meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The next expected seq (or one that filled a hole); the cursor advanced.
    InOrder,
    /// Seen before (at or below the cursor, or already held above a hole).
    Duplicate,
    /// Ahead of the cursor: seqs `from..=to` have not arrived yet.
    Gap { from: u64, to: u64 },
}

/// Tracks the highest contiguous seq, and counts duplicates and gaps.
#[derive(Debug, Clone, Default)]
pub struct CursorTracker {
    /// Every seq <= `last` has been seen.
    last: u64,
    /// Seqs seen above `last + 1`, waiting for the hole below them to fill.
    ahead: BTreeSet<u64>,
    /// The inbox epoch `last` and `ahead` belong to (0: a server that does
    /// not tell, or not known yet).
    epoch: u64,
    duplicates: u64,
    gaps: u64,
}

impl CursorTracker {
    /// A tracker whose cursor starts at `start` (e.g. `Welcome.cursor`).
    pub fn new(start: u64) -> Self {
        CursorTracker {
            last: start,
            ..Default::default()
        }
    }

    /// A tracker at a connection's `Welcome`: its cursor, in its epoch.
    pub fn from_welcome(welcome: &pb::Welcome) -> Self {
        CursorTracker {
            last: welcome.cursor,
            epoch: welcome.inbox_epoch,
            ..Default::default()
        }
    }

    /// The inbox epoch of the seqs remembered.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Follow a reconnection's `Welcome`. In the same epoch the cursor moves
    /// up to `Welcome.cursor` ([`skip_to`](Self::skip_to)); in another, every
    /// seq remembered is forgotten and tracking starts over at
    /// `Welcome.cursor`, where the server resumes delivery. Returns true when
    /// it started over.
    pub fn on_welcome(&mut self, welcome: &pb::Welcome) -> bool {
        self.resync(welcome.inbox_epoch, welcome.cursor)
    }

    /// Follow a `SyncBatch`. In another epoch every seq remembered is
    /// forgotten and tracking starts over at 0: a `SyncBatch` carries no
    /// cursor, so nothing remembered is known to still name the same event
    /// (page again from `after = 0`, deduplicating by `Message.id`). Returns
    /// true when it started over.
    pub fn on_sync_batch(&mut self, batch: &pb::SyncBatch) -> bool {
        batch.inbox_epoch != self.epoch && self.resync(batch.inbox_epoch, 0)
    }

    /// In `epoch`, whose seqs up to `cursor` the server vouches for: move up
    /// to `cursor` if `epoch` is the one remembered, else forget everything
    /// and start over at `cursor` (possibly below the old cursor). Returns
    /// true when it started over. Duplicate and gap counts are kept.
    pub fn resync(&mut self, epoch: u64, cursor: u64) -> bool {
        if epoch == self.epoch {
            self.skip_to(cursor);
            return false;
        }
        self.epoch = epoch;
        self.last = cursor;
        self.ahead.clear();
        true
    }

    /// Record one seq.
    pub fn observe(&mut self, seq: u64) -> Observed {
        if seq <= self.last || self.ahead.contains(&seq) {
            self.duplicates += 1;
            return Observed::Duplicate;
        }
        if seq == self.last + 1 {
            self.last = seq;
            // Absorb anything that was waiting above the filled hole.
            while self.ahead.remove(&(self.last + 1)) {
                self.last += 1;
            }
            return Observed::InOrder;
        }
        // The missing range ends just below the nearest seq already held
        // above the cursor that is below `seq`, if any, else just below seq.
        let from = self
            .ahead
            .range(..seq)
            .next_back()
            .map_or(self.last + 1, |s| s + 1);
        self.ahead.insert(seq);
        self.gaps += 1;
        Observed::Gap { from, to: seq - 1 }
    }

    /// Move the cursor forward to `seq` without observing the seqs in between
    /// (e.g. after a reconnect whose Welcome.cursor is ahead of ours, or when
    /// retention removed history). Never moves backwards.
    pub fn skip_to(&mut self, seq: u64) {
        if seq > self.last {
            self.last = seq;
            self.ahead = self.ahead.split_off(&(seq + 1));
            while self.ahead.remove(&(self.last + 1)) {
                self.last += 1;
            }
        }
    }

    /// The highest seq with nothing missing at or below it: the value for
    /// `DeliveryAck.up_to`.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The highest seq seen at all.
    pub fn highest_seen(&self) -> u64 {
        self.ahead.last().copied().unwrap_or(self.last)
    }

    /// True when some seq between the cursor and the highest seen is missing.
    pub fn has_holes(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// How many observed seqs were duplicates.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// How many observed seqs arrived ahead of a hole.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_advances() {
        let mut t = CursorTracker::new(0);
        for s in 1..=5 {
            assert_eq!(t.observe(s), Observed::InOrder);
        }
        assert_eq!(t.last(), 5);
        assert_eq!((t.duplicates(), t.gaps()), (0, 0));
    }

    #[test]
    fn duplicates_are_counted_and_do_not_move_the_cursor() {
        let mut t = CursorTracker::new(3);
        assert_eq!(t.observe(3), Observed::Duplicate);
        assert_eq!(t.observe(1), Observed::Duplicate);
        assert_eq!(t.observe(4), Observed::InOrder);
        assert_eq!(t.observe(4), Observed::Duplicate);
        assert_eq!(t.last(), 4);
        assert_eq!(t.duplicates(), 3);
    }

    #[test]
    fn gaps_hold_the_cursor_until_filled() {
        let mut t = CursorTracker::new(0);
        assert_eq!(t.observe(1), Observed::InOrder);
        assert_eq!(t.observe(4), Observed::Gap { from: 2, to: 3 });
        assert_eq!(t.observe(7), Observed::Gap { from: 5, to: 6 });
        assert_eq!(t.observe(4), Observed::Duplicate);
        assert_eq!(t.last(), 1);
        assert_eq!(t.highest_seen(), 7);
        assert!(t.has_holes());
        assert_eq!(t.observe(2), Observed::InOrder);
        assert_eq!(t.observe(3), Observed::InOrder);
        assert_eq!(t.last(), 4, "3 filled the hole below 4");
        assert_eq!(t.observe(5), Observed::InOrder);
        assert_eq!(t.observe(6), Observed::InOrder);
        assert_eq!(t.last(), 7);
        assert!(!t.has_holes());
        assert_eq!(t.gaps(), 2);
    }

    #[test]
    fn skip_to_jumps_and_absorbs() {
        let mut t = CursorTracker::new(0);
        t.observe(5);
        t.observe(9);
        t.skip_to(4);
        assert_eq!(t.last(), 5);
        t.skip_to(2);
        assert_eq!(t.last(), 5, "never backwards");
        t.skip_to(8);
        assert_eq!(t.last(), 9);
        assert!(!t.has_holes());
    }

    fn welcome(epoch: u64, cursor: u64) -> pb::Welcome {
        pb::Welcome {
            cursor,
            inbox_epoch: epoch,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_epoch_forgets_every_seq_and_restarts_at_the_servers_cursor() {
        let mut t = CursorTracker::from_welcome(&welcome(7, 2));
        assert_eq!(t.epoch(), 7);
        for s in [3, 4, 5, 9] {
            t.observe(s);
        }
        assert_eq!((t.last(), t.highest_seen()), (5, 9));
        // Same epoch: a reconnect only moves the cursor up.
        assert!(!t.on_welcome(&welcome(7, 4)));
        assert_eq!(t.last(), 5);
        assert_eq!(t.observe(5), Observed::Duplicate);
        // The server crashed and lost seqs 4 and 5 and more: its new epoch
        // hands them to new events, which must not count as duplicates.
        assert!(t.on_welcome(&welcome(8, 3)));
        assert_eq!((t.epoch(), t.last(), t.highest_seen()), (8, 3, 3));
        assert!(!t.has_holes(), "9 was forgotten");
        assert_eq!(t.observe(4), Observed::InOrder);
        assert_eq!(t.observe(5), Observed::InOrder);
        assert_eq!(t.observe(6), Observed::InOrder);
        assert_eq!(t.last(), 6);
    }

    #[test]
    fn a_sync_batch_of_another_epoch_restarts_at_zero() {
        let mut t = CursorTracker::from_welcome(&welcome(7, 5));
        let batch = |epoch| pb::SyncBatch {
            inbox_epoch: epoch,
            ..Default::default()
        };
        assert!(!t.on_sync_batch(&batch(7)));
        assert_eq!(t.last(), 5);
        assert!(t.on_sync_batch(&batch(9)));
        assert_eq!((t.epoch(), t.last()), (9, 0));
        assert_eq!(t.observe(1), Observed::InOrder);
    }
}
