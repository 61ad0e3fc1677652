//! The memory allocator: mimalloc for the whole process, and the one piece
//! of housekeeping density needs from it.
//!
//! mimalloc returns freed pages to the OS lazily, on a later allocation or
//! free by the same thread. A shard that goes quiet after a burst of logins
//! makes no such call, so the pages its transient allocations used (decoded
//! Hellos, store iterators, encoded Welcomes) would stay resident for as long
//! as the shard stays idle: measured, about a third of an idle connection's
//! RSS. A shard therefore calls [`release_free_memory`] once when it turns
//! idle after doing work, which hands those pages back at the cost of one
//! walk over its own heap.

/// The process allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Return this thread's free allocator pages to the OS.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks and trims the calling thread's own
    // mimalloc heap; it takes no pointers and is safe to call at any time
    // from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
