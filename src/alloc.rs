//! The memory allocator: mimalloc for the whole process, and the one piece
//! of housekeeping density needs from it.
//!
//! mimalloc returns freed pages to the OS lazily, on a later allocation or
//! free by the same thread. A shard that goes quiet after a burst of logins
//! makes no such call, so the pages its transient allocations used (decoded
//! Hellos, store iterators, encoded Welcomes) would stay resident for as long
//! as the shard stays idle: measured, about a third of an idle connection's
//! RSS. So purging is made immediate ([`configure`]), and a shard calls
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

/// Purge freed pages at once instead of after a delay (1 s by default). A
/// delayed purge only happens on a later call into the allocator by the same
/// thread, so memory freed after a burst of logins stays resident while the
/// shard is busy with a trickle of heartbeats, never quiet enough for
/// [`release_free_memory`]. The option is set only if it still has its documented
/// default, as a guard against a mimalloc whose option numbering differs.
#[allow(unsafe_code)]
pub fn configure() {
    // SAFETY: mi_option_get/mi_option_set read and write one integer of
    // mimalloc's option table; any option number is accepted (unknown
    // numbers are ignored) and nothing else is touched.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
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
