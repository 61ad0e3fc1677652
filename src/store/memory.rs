//! What RocksDB's memtables may hold, and that their memory goes back to
//! the system once they are flushed.
//!
//! # One budget for every column family
//!
//! Each column family has its own memtable (16 MiB, see
//! [`StoreOptions::write_buffer_bytes`](super::StoreOptions)) and may hold a
//! second, immutable one while the first is flushed: with 13 column
//! families nothing but the traffic's mix kept the total below 400 MiB, and
//! in the soak the total's high-water mark kept rising with the mix (77
//! MiB, then 90 MiB after 35 minutes). A RocksDB write-buffer manager
//! ([`budget`]), shared by every column family and every instance a
//! [`Store`](super::Store) opens, gives them one budget: once the mutable
//! memtables hold more than seven eighths of it, the write that finds it so
//! switches the column family with the oldest memtable to a new one and
//! flushes the old (RocksDB's `HandleWriteBufferManagerFlush`). It never
//! stalls writes (`allow_stall` is off): a budget too small for the write
//! rate gives more, smaller flushes, not blocked commits. A column family's
//! memtable holds at least one 1 MiB arena block once written to, and the
//! point-lookup families a 330 KB bloom filter from the start, about 16 MiB
//! over all 13: below [`MIN_BUDGET`] nearly every write would flush one.
//!
//! # Giving flushed memtables back
//!
//! RocksDB allocates with the system allocator (glibc), not the server's
//! (mimalloc). A memtable is 1 MiB arena blocks plus its bloom filter,
//! allocated on the thread that writes (the commit pipeline) and freed on
//! RocksDB's flush thread. glibc serves such a block with its own `mmap`
//! and unmaps it on free, but only until the first time it frees one: its
//! dynamic mmap threshold then rises to that block's size, and from then on
//! every block comes from a per-thread arena heap, where a free chunk in the
//! middle of the heap stays resident (only the heap's top is ever given
//! back). Measured in the soak at 750 sends/s after 6 minutes
//! (`malloc_info`): glibc's arenas held 81 MiB, 35.9 MiB of it free chunks
//! of 1-4 MiB, while the memtables held 38.6 MiB; a `malloc_trim(0)` from a
//! debugger took RSS from 122 to 96 MiB. So RSS followed the high-water
//! mark of the memtables, not the memtables.
//!
//! [`return_freed_blocks`] fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]
//! once per process, which also turns its dynamic adjustment off: every
//! memtable block and bloom filter is mapped on its own and unmapped when
//! the flushed memtable is freed. Smaller allocations (write batches of a
//! few KiB, cache blocks, the table readers) are served from the heaps as
//! before. Preferred over a periodic `malloc_trim`, which walks every
//! arena under its lock, gives back only whole free pages, and would lag
//! the flush it follows.

use std::sync::Once;

/// The default [`StoreOptions::memtable_budget_bytes`](super::StoreOptions):
/// about four full memtables, the column families the traffic writes most
/// (messages, inbox entries, dedup records, references).
pub const DEFAULT_MEMTABLE_BUDGET: usize = 64 << 20;

/// The smallest budget allowed: twice what the memtables hold between
/// flushes without data to speak of (see the module doc).
pub const MIN_BUDGET: usize = 32 << 20;

/// Allocations of at least this many bytes are mapped on their own by
/// glibc and unmapped when freed: a memtable's 1 MiB arena blocks and its
/// ~330 KB bloom filter, and a compaction's read-ahead and output buffers,
/// each a few per flush or compaction.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// The write-buffer manager every column family shares, or `None` for no
/// overall budget (`bytes` 0).
pub(super) fn budget(bytes: usize) -> Option<rocksdb::WriteBufferManager> {
    (bytes > 0).then(|| rocksdb::WriteBufferManager::new_write_buffer_manager(bytes, false))
}

/// Fix glibc's mmap threshold (see the module doc); once per process, the
/// first time a store opens. Nothing to do with another C library. (The
/// server's own allocator, mimalloc, is set up in `crate::alloc`.)
#[allow(unsafe_code)]
pub(super) fn return_freed_blocks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallopt(M_MMAP_THRESHOLD, n) sets one tuning parameter
            // of glibc's allocator under its own lock; it takes no pointers.
            let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
            if set != 1 {
                tracing::warn!(
                    threshold = MMAP_THRESHOLD,
                    "could not fix glibc's mmap threshold: RocksDB's flushed memtables may stay resident"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{cf, handle, Store, StoreOptions};

    /// Writes 12 MiB of values to each of four column families (under
    /// their own 16 MiB memtable size, so none flushes by itself) and
    /// returns the most their mutable memtables held together after any
    /// commit.
    fn most_in_mutable_memtables(budget: usize) -> u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = StoreOptions {
            memtable_budget_bytes: budget,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), &opts).expect("open");
        let families = [cf::MESSAGES, cf::INBOX, cf::GROUP_LOG, cf::MEMBERSHIPS];
        let value = vec![0x5a_u8; 1024];
        let mut most = 0;
        for round in 0..48u32 {
            let mut batch = store.batch();
            for family in families {
                for i in 0..256u32 {
                    batch.put(family, format!("{round:04}-{i:04}"), value.clone());
                }
            }
            store.commit(batch).expect("commit");
            let db = store.db();
            let mutable: u64 = families
                .iter()
                .map(|family| {
                    let h = handle(&db, family).expect("column family");
                    db.property_int_value_cf(h, rocksdb::properties::CUR_SIZE_ACTIVE_MEM_TABLE)
                        .expect("property")
                        .expect("a value")
                })
                .sum();
            most = most.max(mutable);
        }
        most
    }

    #[test]
    fn one_budget_bounds_the_memtables_of_every_column_family_together() {
        let unbounded = most_in_mutable_memtables(0);
        assert!(
            unbounded > (MIN_BUDGET as u64) * 3 / 2,
            "without a budget the four memtables held only {unbounded} bytes: the test writes too little"
        );
        let bounded = most_in_mutable_memtables(MIN_BUDGET);
        assert!(
            bounded <= MIN_BUDGET as u64,
            "the mutable memtables held {bounded} bytes, over the {MIN_BUDGET}-byte budget"
        );
    }

    #[test]
    fn a_budget_of_zero_is_none() {
        assert!(budget(0).is_none());
        let m = budget(DEFAULT_MEMTABLE_BUDGET).expect("a budget");
        assert!(m.enabled());
        assert_eq!(m.get_buffer_size(), DEFAULT_MEMTABLE_BUDGET);
    }
}
