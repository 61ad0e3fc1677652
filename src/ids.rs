//! Message ids: 64-bit, ordered by time, unique across nodes.
//!
//! Layout (most significant first): 42 bits of milliseconds since
//! 2024-01-01T00:00:00Z (good until 2163), 10 bits of node id, 12 bits of a
//! per-millisecond sequence. One generator lives in the commit pipeline's
//! thread, so it needs no lock. If the clock steps back, the generator keeps
//! counting from the last millisecond it used rather than repeat an id; if
//! 4,096 ids are taken within one millisecond it borrows the next one.

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
/// The largest node id.
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;

/// Generates ids for one node.
#[derive(Debug)]
pub struct IdGen {
    node: u64,
    last_ms: u64,
    seq: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl IdGen {
    pub fn new(node: u16) -> Self {
        IdGen {
            node: u64::from(node.min(MAX_NODE)),
            last_ms: 0,
            seq: 0,
        }
    }

    /// The next id, given the current Unix time in milliseconds.
    pub fn next_at(&mut self, now_unix_ms: u64) -> u64 {
        let now = now_unix_ms.saturating_sub(EPOCH_MS);
        if now > self.last_ms {
            self.last_ms = now;
            self.seq = 0;
        } else {
            self.seq += 1;
            if self.seq >> SEQ_BITS != 0 {
                self.last_ms += 1;
                self.seq = 0;
            }
        }
        (self.last_ms << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | self.seq
    }

    /// The next id at the current time.
    pub fn next_now(&mut self) -> u64 {
        self.next_at(unix_ms())
    }
}

/// The Unix time in milliseconds an id was made at.
pub fn timestamp_of(id: u64) -> u64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_steps_back_or_a_millisecond_overflows() {
        let mut g = IdGen::new(5);
        let t = EPOCH_MS + 1_000;
        let mut last = 0;
        for i in 0..10_000u64 {
            // Time goes back once in the middle.
            let now = if i == 5_000 { t - 500 } else { t };
            let id = g.next_at(now);
            assert!(id > last, "id {i} did not increase");
            last = id;
        }
        assert_eq!((last >> SEQ_BITS) & u64::from(MAX_NODE), 5);
        assert!(timestamp_of(last) >= t);
    }

    #[test]
    fn different_nodes_never_collide() {
        let mut a = IdGen::new(1);
        let mut b = IdGen::new(2);
        let t = EPOCH_MS + 42;
        assert_ne!(a.next_at(t), b.next_at(t));
    }
}
