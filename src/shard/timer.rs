//! A hashed timing wheel: one per shard, so a connection's timeouts cost an
//! 8-byte slot entry instead of a timer object each.
//!
//! Entries are lazy. A connection is filed under the tick of its earliest
//! possible deadline; when that tick comes the shard recomputes the real
//! deadline from the connection's own timestamps (last frame received, last
//! write progress) and either acts or files it again. Activity therefore
//! costs nothing here: receiving a frame only updates a timestamp.

pub use crate::clock::TICK_MS;
const SLOTS: usize = 1024;

/// The wheel. Ticks are counted from the shard's start.
pub struct Wheel {
    slots: Vec<Vec<(u32, u32)>>,
    /// The last tick whose slot was drained.
    current: u64,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            current: 0,
        }
    }
}

impl Wheel {
    /// File `(slot, gen)` to come due at tick `at` (or at the wheel's horizon,
    /// if later: it will then be filed again).
    /// Returns the tick it is filed at.
    pub fn schedule(&mut self, at: u64, slot: u32, gen: u32) -> u64 {
        let at = at.clamp(self.current + 1, self.current + SLOTS as u64 - 1);
        self.slots[(at % SLOTS as u64) as usize].push((slot, gen));
        at
    }

    /// Move to tick `now`, appending every entry that came due to `due`.
    pub fn advance(&mut self, now: u64, due: &mut Vec<(u32, u32)>) {
        while self.current < now {
            self.current += 1;
            let slot = &mut self.slots[(self.current % SLOTS as u64) as usize];
            due.append(slot);
            if slot.capacity() > 64 {
                slot.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_at_their_tick_and_far_ones_at_the_horizon() {
        let mut w = Wheel::default();
        w.schedule(5, 1, 1);
        w.schedule(3, 2, 1);
        w.schedule(100_000, 3, 1);
        let mut due = Vec::new();
        w.advance(2, &mut due);
        assert!(due.is_empty());
        w.advance(3, &mut due);
        assert_eq!(due, vec![(2, 1)]);
        due.clear();
        w.advance(5, &mut due);
        assert_eq!(due, vec![(1, 1)]);
        due.clear();
        w.advance(SLOTS as u64 + 10, &mut due);
        assert_eq!(due, vec![(3, 1)]);
    }
}
