//! A `u32` per connection slot kept beside the slab, in fixed 4 KiB chunks.
//!
//! Some per-connection figures are read so rarely that a field in
//! [`Conn`](super::conn::Conn) would cost every idle connection more than
//! they are worth (the struct is at its alignment boundary: 4 more bytes
//! make a slot 8 bytes bigger). They live here instead, indexed by slot.
//!
//! Why chunks and not one `Vec<u32>`: a vector that doubles as slots are
//! filled goes through 16, 32 and 64 KiB buffers while a burst of logins
//! runs. Those sizes are mimalloc's medium blocks, each served from its own
//! 512 KiB page, and the last one stays live with a single block in it. When
//! such a page is carved from memory freed moments before (the slab's own
//! previous buffer, freed when it doubled), the whole 512 KiB stays resident
//! for the sake of one block: measured, 0.5-0.9 MB more RSS after 18,000
//! logins in about half the runs (idle density 330-370 B per connection
//! instead of about 305, see docs/performance.md, "Idle density
//! re-checked"). 4 KiB chunks are small blocks, packed sixteen to a 64 KiB
//! page, and a chunk once made is never moved or freed while the shard runs.

/// Slots per chunk: 4 KiB of `u32`s.
const CHUNK: usize = 1024;

/// A `u32` per slot, 0 until set.
#[derive(Default)]
pub struct SlotWords {
    chunks: Vec<Box<[u32]>>,
}

impl SlotWords {
    /// Set `slot`'s word, making room for it.
    pub fn set(&mut self, slot: usize, value: u32) {
        let chunk = slot / CHUNK;
        while self.chunks.len() <= chunk {
            self.chunks.push(vec![0; CHUNK].into_boxed_slice());
        }
        if let Some(word) = self
            .chunks
            .get_mut(chunk)
            .and_then(|c| c.get_mut(slot % CHUNK))
        {
            *word = value;
        }
    }

    /// `slot`'s word (0 if it was never set).
    pub fn get(&self, slot: usize) -> u32 {
        self.chunks
            .get(slot / CHUNK)
            .and_then(|c| c.get(slot % CHUNK))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_kept_per_slot_across_chunks() {
        let mut w = SlotWords::default();
        assert_eq!(w.get(0), 0);
        assert_eq!(w.get(5 * CHUNK), 0);
        w.set(3, 7);
        w.set(CHUNK - 1, 8);
        w.set(CHUNK, 9);
        w.set(3 * CHUNK + 5, 10);
        assert_eq!(
            (
                w.get(3),
                w.get(CHUNK - 1),
                w.get(CHUNK),
                w.get(3 * CHUNK + 5)
            ),
            (7, 8, 9, 10)
        );
        // Untouched slots, in made and unmade chunks, read 0.
        assert_eq!((w.get(4), w.get(2 * CHUNK), w.get(9 * CHUNK)), (0, 0, 0));
        assert_eq!(w.chunks.len(), 4);
        // Chunks are never reallocated: each is exactly 4 KiB.
        assert!(w.chunks.iter().all(|c| c.len() == CHUNK));
        w.set(3, 0);
        assert_eq!(w.get(3), 0);
    }
}
