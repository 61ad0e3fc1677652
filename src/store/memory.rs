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
//! before. Preferred over a periodic `malloc_trim` for the memtables,
//! which walks every arena under its lock, gives back only whole free
//! pages, and would lag the flush it follows.
//!
//! # Giving freed cache blocks back
//!
//! The smaller allocations fragment the heaps in turn once the block cache
//! is full: every block read evicts another, of another size, often freed
//! on another thread than the one that allocated it. Measured in the soak
//! (750 sends/s, the cache at its 64 MiB): glibc's free chunks rose from
//! 3.4 to 9.7 MiB in 15 minutes of steady traffic, and to 98 MiB while the
//! final verification read every inbox back, all of it resident until the
//! process ended. So a thread ([`HeapTrimmer`]) looks at glibc's free bytes
//! once a second and calls `malloc_trim(0)` once a step ([`trim_step`]:
//! 1/32 of the process's RSS, at least [`MIN_TRIM_STEP`]) more have been
//! freed than the least it held since it last trimmed: the pages of free
//! chunks go back to the system (`MADV_DONTNEED`), and memory freed and
//! left free stays resident by at most about that step, about 3 % of RSS,
//! besides the partly used pages a trim cannot hand back. (A fixed 8 MiB
//! step was 11 % of a 70 MiB server, more than the soak's 5 % tolerance,
//! and let a slow drift of free chunks through at small caches.) A trim
//! walks the free chunks on that thread, each arena under its lock, so an
//! allocation on another thread may wait for it: 24 ms for one trim with
//! 115 MB in use, 0.7 ms with 32 MB (`swiftlet_heap_libc_trim_seconds_total`);
//! at most one a second, and in the small-cache soak three in 45 minutes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Once;
use std::time::Duration;

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

/// The least [`trim_step`]: below it a trim would hand back too little to
/// be worth a walk over the heaps.
pub const MIN_TRIM_STEP: u64 = 1 << 20;

/// Bytes freed into glibc's heaps and left free that make the
/// [`HeapTrimmer`] hand free pages back, for a process of `rss` bytes:
/// 1/32 of it, so free chunks left resident stay a small share of RSS
/// at any size, and a trim's walk (24 ms with 115 MB in use) comes at
/// most once a second and only after that much more was freed.
pub fn trim_step(rss: u64) -> u64 {
    (rss / 32).max(MIN_TRIM_STEP)
}

/// How often the [`HeapTrimmer`] looks.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// What RocksDB holds through the C library's malloc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LibcHeap {
    /// Bytes allocated and not freed, the directly mapped chunks included.
    pub in_use: u64,
    /// Bytes in free chunks that may be resident: those freed since the
    /// last trim, and those the trim could not hand back (pages partly
    /// used), measured as what the trim took off RSS.
    pub free: u64,
    /// Times the [`HeapTrimmer`] handed free pages back.
    pub trims: u64,
    /// Time those trims took, in microseconds.
    pub trim_micros: u64,
}

/// The process's glibc trimmer: the least free bytes seen since the last
/// trim, and the trims so far.
pub struct HeapTrimmer {
    low: AtomicU64,
    /// Free bytes still resident right after the last trim.
    kept: AtomicU64,
    trims: AtomicU64,
    micros: AtomicU64,
}

static HEAP_TRIMMER: HeapTrimmer = HeapTrimmer {
    low: AtomicU64::new(0),
    kept: AtomicU64::new(0),
    trims: AtomicU64::new(0),
    micros: AtomicU64::new(0),
};

/// glibc's `mallinfo2`: (bytes in use, bytes in free chunks).
#[allow(unsafe_code)]
fn mallinfo() -> (u64, u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct;
        // it locks each arena in turn while it sums them.
        let m = unsafe { libc::mallinfo2() };
        ((m.uordblks + m.hblkhd) as u64, m.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    (0, 0)
}

/// Read [`LibcHeap`] now.
pub fn libc_heap() -> LibcHeap {
    let (in_use, free) = mallinfo();
    LibcHeap {
        in_use,
        free: free.saturating_sub(HEAP_TRIMMER.low.load(Relaxed)) + HEAP_TRIMMER.kept.load(Relaxed),
        trims: HEAP_TRIMMER.trims.load(Relaxed),
        trim_micros: HEAP_TRIMMER.micros.load(Relaxed),
    }
}

impl HeapTrimmer {
    /// One look: trim if a [`trim_step`] more bytes are free than the
    /// least since the last trim. True if it trimmed.
    #[allow(unsafe_code)]
    fn look(&self) -> bool {
        let (_, free) = mallinfo();
        let low = self.low.load(Relaxed).min(free);
        let rss_before = crate::metrics::rss_bytes();
        if free - low < trim_step(rss_before) {
            self.low.store(low, Relaxed);
            return false;
        }
        let started = std::time::Instant::now();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim walks glibc's own arenas under their locks
        // and advises the kernel about whole free pages; it takes no
        // pointers.
        unsafe {
            libc::malloc_trim(0);
        }
        // The chunks stay free (and counted), their pages are gone: from
        // here on only what is freed beyond them may be resident.
        let after = mallinfo().1;
        self.low.store(after, Relaxed);
        // Without /proc (0), assume every free page went back.
        let handed_back = match (rss_before, crate::metrics::rss_bytes()) {
            (0, _) | (_, 0) => free,
            (b, a) => b.saturating_sub(a),
        };
        self.kept.store(after.saturating_sub(handed_back), Relaxed);
        self.trims.fetch_add(1, Relaxed);
        self.micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        true
    }
}

/// Fix glibc's mmap threshold and start the [`HeapTrimmer`]'s thread (see the
/// module doc); once per process, the first time a store opens. Nothing to
/// do with another C library. (The server's own allocator, mimalloc, is
/// set up in `crate::alloc`.)
#[allow(unsafe_code)]
pub(super) fn return_freed_blocks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if let Err(e) = std::thread::Builder::new()
            .name("swiftlet-heap-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                HEAP_TRIMMER.look();
            })
        {
            tracing::warn!(error = %e, "could not start the heap trimmer: freed cache blocks may stay resident");
        }
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

    /// Needs its process to itself, as `make test` (nextest) runs every
    /// test: under `cargo test` another test that opens a store starts the
    /// process's own trimmer, which may hand these pages back first.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    fn the_trimmer_trims_once_a_step_more_is_free_and_not_before() {
        let t = HeapTrimmer {
            low: AtomicU64::new(u64::MAX),
            kept: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        };
        // Nothing freed since the least it saw: no trim.
        assert!(!t.look());
        assert!(!t.look());
        // 24 MiB in 64 KiB blocks (under glibc's mmap threshold, so they
        // come from a heap), every other one freed: 12 MiB of free chunks
        // that cannot coalesce into the heap's top.
        let blocks: Vec<*mut libc::c_void> = (0..384)
            .map(|_| {
                // SAFETY: a plain malloc; written within its size below.
                let p = unsafe { libc::malloc(64 << 10) };
                assert!(!p.is_null());
                // SAFETY: p is a live block of 64 KiB.
                unsafe { std::ptr::write_bytes(p as *mut u8, 1, 64 << 10) };
                std::hint::black_box(p)
            })
            .collect();
        // Four blocks freed, 256 KiB: less than any step, no trim.
        for p in blocks.iter().step_by(2).take(4) {
            // SAFETY: each block is freed once.
            unsafe { libc::free(*p) };
        }
        assert!(!t.look(), "256 KiB freed: less than a step");
        for p in blocks.iter().step_by(2).skip(4) {
            // SAFETY: each block is freed once (the first four above).
            unsafe { libc::free(*p) };
        }
        let anon = || {
            std::fs::read_to_string("/proc/self/status")
                .expect("status")
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .expect("RssAnon")
        };
        let before = anon();
        assert!(t.look(), "12 MiB freed and left free: a trim");
        let after = anon();
        assert!(
            after + (8 << 10) <= before,
            "the free chunks' pages went back: RssAnon {before} -> {after} KiB"
        );
        assert_eq!(t.trims.load(Relaxed), 1);
        assert!(
            t.kept.load(Relaxed) < 4 << 20,
            "nearly every freed page went back, so little is kept: {}",
            t.kept.load(Relaxed)
        );
        assert!(!t.look(), "nothing freed since: no second trim");
        for p in blocks.iter().skip(1).step_by(2) {
            // SAFETY: the other half, each freed once.
            unsafe { libc::free(*p) };
        }
    }

    #[test]
    fn the_trim_step_is_a_thirty_second_of_rss_and_at_least_a_mebibyte() {
        assert_eq!(trim_step(0), MIN_TRIM_STEP, "RSS unknown");
        assert_eq!(trim_step(16 << 20), MIN_TRIM_STEP);
        assert_eq!(trim_step(70 << 20), 2_293_760, "a small server: 2.2 MiB");
        assert_eq!(trim_step(1 << 30), 32 << 20);
    }

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
