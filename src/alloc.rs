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

/// Return this thread's free allocator pages to the OS.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks and trims the calling thread's own
    // mimalloc heap; it takes no pointers and is safe to call at any time
    // from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
