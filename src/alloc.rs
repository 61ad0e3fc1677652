//! The memory allocator: mimalloc for the whole process, and the one piece
//! of housekeeping density needs from it.
//!
//! mimalloc returns freed pages to the OS lazily, on a later allocation or
//! free by the same thread. A shard that goes quiet after a burst of logins
//! makes no such call, so the pages its transient allocations used (decoded
//! Hellos, store iterators, encoded Welcomes) would stay resident for as long
//! as the shard stays idle: measured, about a third of an idle connection's
//! RSS. So the purge delay is cut to milliseconds ([`configure`]), and a shard calls
//! [`release_free_memory`] when a poll finds nothing to do after work, at
//! most once a second, which hands back what is left at the cost of one walk
//! over its own heap.

/// The process allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the crate does
/// not export it: see c_src/mimalloc/v3/include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc v3's default purge delay, in milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::os::raw::c_long = 1000;

/// The purge delay swiftlet sets, in milliseconds.
///
/// A delayed purge happens on a later call into the allocator by the same
/// thread. With mimalloc's 1 s, memory freed after a burst of logins stayed
/// resident while the shard was busy with a trickle of heartbeats, never
/// quiet enough for [`release_free_memory`]. With 0, every page that empties
/// is handed back at once and faulted in again by the next allocation, and
/// idle density measured worse than with a short delay: 498-551 B per idle
/// connection against 402-430 B with 10 ms (`tools/scripts/density.sh
/// 18000`, alternating runs). 10 ms is past the churn of one event loop turn
/// and well inside the time between two heartbeats.
const PURGE_DELAY_MS: std::os::raw::c_long = 10;

/// Shorten mimalloc's purge delay to [`PURGE_DELAY_MS`]. The option is set
/// only if it still has its documented default, as a guard against a
/// mimalloc whose option numbering differs.
#[allow(unsafe_code)]
pub fn configure() {
    // SAFETY: mi_option_get/mi_option_set read and write one integer of
    // mimalloc's option table; any option number is accepted (unknown
    // numbers are ignored) and nothing else is touched.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        } else {
            tracing::warn!(
                "mimalloc purge delay option not recognised; freed memory is returned lazily"
            );
        }
    }
}

/// `mi_option_allow_thp` in mimalloc v3's `mi_option_t`.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Turn transparent huge pages off for the whole process.
///
/// mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), and with
/// THP the kernel backs a touched arena region with a whole 2 MiB page: an
/// idle connection's few hundred bytes then cost resident memory in 2 MiB
/// steps, whether the kernel had a free huge page at that moment or not.
/// Idle density measured 362-649 B per connection across runs of the same
/// binary, drifting with the machine's memory state. A huge-page fault also
/// zeroes 2 MiB on the faulting thread (`perf`: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page` in a shard, in the first second of a load).
/// `PR_SET_THP_DISABLE` overrides the madvise for every mapping of the
/// process, RocksDB's included; mimalloc is told too, so it stops asking.
#[allow(unsafe_code)]
pub fn disable_huge_pages() {
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) sets one flag on the
    // calling process's memory descriptor; it takes no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not turn transparent huge pages off; idle memory will be coarser"
        );
    }
    // SAFETY: as in `configure`: one integer of mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) }
}

/// Return this thread's free allocator pages to the OS.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks and trims the calling thread's own
    // mimalloc heap; it takes no pointers and is safe to call at any time
    // from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Bytes mimalloc has committed from the OS (in use, or free and not yet
/// purged): an upper bound on the resident memory of swiftlet's own
/// (Rust) allocations. What RocksDB allocates is the C library's, see
/// `crate::store::libc_heap`. Read on scrape for `/metrics`.
#[allow(unsafe_code)]
pub fn mimalloc_committed() -> u64 {
    let mut commit: usize = 0;
    // SAFETY: mi_process_info writes through each pointer it is given that
    // is not null; the only one given points at a live local.
    unsafe {
        libmimalloc_sys::mi_process_info(
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut commit,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    commit as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mimalloc_committed_sees_a_rust_allocation_and_not_a_c_one() {
        let before = mimalloc_committed();
        let rust = std::hint::black_box(vec![1u8; 64 << 20]);
        assert!(mimalloc_committed() >= before + (60 << 20));
        drop(rust);
        let before = mimalloc_committed();
        // SAFETY: a plain malloc/free pair of the C library; the block is
        // written within its size and freed once.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::malloc(64 << 20) as *mut u8;
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 1, 64 << 20);
            // Kept opaque, or the compiler may drop the malloc/free pair.
            libc::free(std::hint::black_box(p) as *mut libc::c_void);
        }
        assert!(mimalloc_committed() < before + (60 << 20));
    }
}
