//! The RocksDB instance behind a [`Store`](super::Store), and how the store
//! gets a writable one back by itself after a write error (a full disk).
//!
//! # What a write error does to RocksDB
//!
//! A failed write-ahead-log append (`ENOSPC`) stops the database: every
//! later write fails at once with the same error, while reads keep working.
//! RocksDB can resume by itself, but only under conditions a server cannot
//! count on: it polls every 5 s for free space of at least the largest
//! memtable size any column family had at open (64 MiB here, the unused
//! `default` family's default), and never after the background WAL sync of
//! [`WalSync::Interval`](super::WalSync) met the failed log file, which
//! makes the error fatal ("Writer has previous error"). Measured on a
//! 16 MiB tmpfs: sends were refused until a restart.
//!
//! So the store recovers on its own terms, from one background thread
//! ([`Recovery`]), never from a shard or the commit pipeline (a reopen takes
//! tens of milliseconds, more with a long WAL to replay):
//!
//! 1. A failed commit marks the store *refusing* (one ERROR line, the
//!    `swiftlet_store_writable` gauge to 0) and wakes the thread. Every
//!    commit is refused at once from then on, with `STORE_UNAVAILABLE` for
//!    its requests.
//! 2. The thread tries again after 250 ms, doubling to at most every 5 s:
//!    first a small synced write (RocksDB may have resumed by itself);
//!    failing that, it opens the database read-only beside the stopped
//!    instance (RocksDB allows that in one process: a read-only instance
//!    takes no lock) and swaps it in, so reads never stop, and closes the
//!    stopped one; then, from then on, it tries a writable open. The open
//!    replays the WAL, so it holds exactly what was written, and fails
//!    cleanly while the disk is still full. It may also find space: it
//!    writes the WAL into SST files and deletes it, and with it the space
//!    RocksDB had reserved ahead of the WAL's end (about 4 MiB on the
//!    16 MiB tmpfs of the tests), so a store may take writes for a while
//!    after a reopen on a full disk, until that space is used too. Each
//!    failed attempt counts in `swiftlet_store_recovery_failures_total`.
//! 3. Once a writable open succeeds it is swapped in: commits are taken
//!    again, with the same inbox epoch (the process never lost its page
//!    cache, so nothing acknowledged can have rolled back).
//!
//! A start on a full disk takes the same path from step 2: the writable
//! open fails for want of space, the store opens read-only and serves
//! reads, and the thread takes it from there. Any other open error still
//! stops the start.
//!
//! # What a reader pays
//!
//! Each store call clones the current [`Engine`] out of a read lock (two
//! uncontended atomic operations and a reference count), and keeps it for
//! the call: an engine is swapped out only under the write lock, for the
//! time of a pointer exchange, and closes once its last call is over.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Options, DB,
};

use super::retention::{self, Policy};
use super::{cf, StoreError, StoreOptions, WalSync};
use crate::clock::Clock;
use crate::metrics::StoreHealth;

/// The first retry after a failed commit.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two retries (RocksDB's own poll period).
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long a retired instance waits for its last readers before it is
/// left to close when they are done.
const RETIRE_PATIENCE: Duration = Duration::from_secs(5);

/// One open RocksDB instance.
pub(super) struct Engine {
    /// Shared with the [`WalSyncer`] thread, if any: the database closes once
    /// both let go.
    db: Arc<DB>,
    /// False for a read-only instance: every commit is refused.
    pub(super) writable: bool,
    /// The [`WalSync::Interval`] thread; it stops when the engine drops.
    _syncer: Option<WalSyncer>,
    /// The options it was opened with, which hold its statistics (the
    /// tickers `/metrics` reads on scrape: see `Store::engine_figures`).
    pub(super) options: Options,
}

impl std::ops::Deref for Engine {
    type Target = DB;

    fn deref(&self) -> &DB {
        &self.db
    }
}

/// How to open the database, the same way every time.
pub(super) struct Recipe {
    pub(super) path: PathBuf,
    pub(super) opts: StoreOptions,
    /// The write-ahead-log directory, settled and absolute.
    pub(super) wal_dir: Option<PathBuf>,
    /// Shared by every instance, so a reopen starts with a warm cache.
    pub(super) cache: rocksdb::Cache,
    /// The memtables' overall budget (see [`memory`](super::memory)), shared
    /// by every instance too: one being retired still holds its memtables.
    pub(super) write_buffers: Option<rocksdb::WriteBufferManager>,
}

/// The hot families whose keys start `user ‖ 0x00` and take a user's rows
/// in order: an inbox's seqs grow, a user's sends come one after another,
/// a device's cursor is rewritten in place.
fn owned_by_user(name: &str) -> bool {
    matches!(name, cf::INBOX | cf::DEDUP | cf::CURSORS)
}

/// Options whose memtable starts each insert from where the last insert of
/// the same user's hint ended (RocksDB's
/// `memtable_insert_with_hint_prefix_extractor`, with users hashed into a
/// bounded number of hints by `user_hint.cc`). Without it every insert of
/// a key not next to the previous one walks the 16 MiB skiplist down from
/// its top, missing the CPU caches on the way: the two inbox rows and the
/// dedup row of a 1:1 message land at three such places. RocksDB takes
/// this option by name only, so it is set from a string, before anything
/// else: the options set afterwards on the result are owned by it.
fn user_hint() -> Result<Options, StoreError> {
    user_hint_ffi::register();
    Ok(Options::default()
        .get_options_from_string("memtable_insert_with_hint_prefix_extractor=swiftlet.UserHint")?)
}

/// The C++ side of the hint (`src/store/user_hint.cc`).
#[allow(unsafe_code)]
mod user_hint_ffi {
    extern "C" {
        fn swiftlet_register_user_hint();
    }

    /// Registers `swiftlet.UserHint` in RocksDB's object library.
    pub(super) fn register() {
        // SAFETY: takes no arguments, touches only RocksDB's object library,
        // and is idempotent and thread-safe (`std::call_once`).
        unsafe { swiftlet_register_user_hint() }
    }
}

impl Recipe {
    fn db_options(&self) -> Result<Options, StoreError> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        o.set_compression_type(DBCompressionType::Lz4);
        o.set_max_background_jobs(2);
        // Flushes and compactions run at a lower CPU priority than the
        // shards: on a small machine they otherwise compete
        // for the same cores and show up as latency spikes on the Ack path.
        let mut env = rocksdb::Env::new()?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        o.set_env(&env);
        o.set_keep_log_file_num(4);
        if let Some(budget) = &self.write_buffers {
            o.set_write_buffer_manager(budget);
        }
        // One writer inserts a write group's batches one after another, in
        // their sorted order (see `Batch`), reusing its place in the skiplist
        // from key to key. Concurrent inserts start every key's search from
        // the top, and the commit pipeline writes nearly all of the data: a
        // shard's small cursor batch joining its group made the large batch
        // pay that.
        o.set_allow_concurrent_memtable_write(false);
        if let Some(dir) = &self.wal_dir {
            o.set_wal_dir(dir);
        }
        // Tickers only (per-core counters, no timers or histograms): the
        // block cache hits and misses and the write stall time `/metrics`
        // reports, read on scrape.
        if self.opts.statistics {
            o.enable_statistics();
            o.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        }
        Ok(o)
    }

    fn families(&self) -> Result<Vec<ColumnFamilyDescriptor>, StoreError> {
        let cf_opts = |name: &str| -> Result<Options, StoreError> {
            // Column families read by whole key (not scanned by prefix).
            let point = matches!(
                name,
                cf::MESSAGES
                    | cf::DEDUP
                    | cf::REFS
                    | cf::CURSORS
                    | cf::STATUS
                    | cf::GROUPS
                    | cf::PRESENCE
                    | cf::META
            );
            let mut bbo = BlockBasedOptions::default();
            bbo.set_block_cache(&self.cache);
            // Every SST's index and bloom filter live in the block cache,
            // so the cache's size bounds them: left to the table readers,
            // they sit outside every budget and grow with the database
            // (about 1.2 bytes a key for the filters alone). Partitioned,
            // in blocks of about 4 KiB under a small top-level index that
            // stays pinned: a whole filter is one cache entry, and one
            // bigger than a cache shard (1 MiB of the 64 MiB cache) is
            // dropped as soon as it is released, so every lookup read it
            // again (a million-key file's is 1.2 MB). The newest files'
            // (L0) stay pinned, as the hot path reads them most; the cache
            // keeps index and filter blocks in its high-priority pool.
            bbo.set_cache_index_and_filter_blocks(true);
            bbo.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
            bbo.set_partition_filters(true);
            bbo.set_pin_top_level_index_and_filter(true);
            bbo.set_pin_l0_filter_and_index_blocks_in_cache(true);
            let mut o = if owned_by_user(name) {
                user_hint()?
            } else {
                Options::default()
            };
            if point {
                // Most dedup lookups are misses (a first send): bloom filters,
                // on the SST files and on the memtable, answer them without
                // touching a data block or walking the skiplist.
                bbo.set_bloom_filter(10.0, false);
                o.set_memtable_prefix_bloom_ratio(0.02);
                o.set_memtable_whole_key_filtering(true);
            }
            o.set_block_based_table_factory(&bbo);
            match name {
                cf::REFS => o.set_merge_operator_associative("swiftlet-refs", retention::add_refs),
                cf::DEDUP if !self.opts.retention.dedup_window.is_zero() => o
                    .set_compaction_filter(
                        "swiftlet-dedup-window",
                        retention::dedup_filter(
                            self.opts.retention.dedup_window,
                            self.opts.clock.clone(),
                        ),
                    ),
                _ => {}
            }
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_write_buffer_size(self.opts.write_buffer_bytes);
            Ok(o)
        };
        cf::ALL_CFS
            .iter()
            .map(|name| Ok(ColumnFamilyDescriptor::new(*name, cf_opts(name)?)))
            .collect()
    }

    /// Open for writing and start a run with `epoch` (`None`: settle it
    /// from how the previous run ended): the run record is a synced write,
    /// so a full disk fails here too. Returns the engine and its epoch.
    pub(super) fn open_writable(
        &self,
        epoch: Option<u64>,
        refusing: &Arc<AtomicBool>,
    ) -> Result<(Engine, u64), StoreError> {
        let options = self.db_options()?;
        let db = Arc::new(DB::open_cf_descriptors(
            &options,
            &self.path,
            self.families()?,
        )?);
        let epoch = match epoch {
            Some(e) => e,
            None => super::settle_epoch(&db)?,
        };
        super::record_run(&db, self.opts.wal_sync, epoch)?;
        let syncer = match self.opts.wal_sync {
            WalSync::Interval => Some(
                WalSyncer::start(db.clone(), self.opts.wal_sync_interval, refusing.clone())
                    .map_err(|source| StoreError::Io {
                        what: "starting the WAL sync thread for",
                        path: self.path.display().to_string(),
                        source,
                    })?,
            ),
            WalSync::Off | WalSync::Always => None,
        };
        Ok((
            Engine {
                db,
                writable: true,
                _syncer: syncer,
                options,
            },
            epoch,
        ))
    }

    /// Open read-only: the WAL is replayed into memory, nothing is written,
    /// so this works on a full disk, and beside a writable instance.
    pub(super) fn open_read_only(&self) -> Result<Engine, StoreError> {
        let options = self.db_options()?;
        let db = DB::open_cf_descriptors_read_only(&options, &self.path, self.families()?, false)?;
        Ok(Engine {
            db: Arc::new(db),
            writable: false,
            _syncer: None,
            options,
        })
    }
}

/// Whether `e` says the disk (or the user's quota on it) is full.
pub(super) fn out_of_space(e: &StoreError) -> bool {
    match e {
        StoreError::Engine(e) => {
            let text = e.as_ref();
            text.contains("No space left on device") || text.contains("Disk quota exceeded")
        }
        _ => false,
    }
}

/// What the store, its recovery thread and its WAL syncers share.
pub(super) struct Shared {
    engine: RwLock<Arc<Engine>>,
    pub(super) recipe: Recipe,
    pub(super) epoch: u64,
    /// Set by `Store::mark_clean_shutdown`: no commits and no reopening
    /// from then on.
    pub(super) closed: AtomicBool,
    /// Commits are being refused, from the first failure until a recovery.
    /// Shared with the WAL syncers, which do not sync a failed log.
    refusing: Arc<AtomicBool>,
    /// When the store began refusing, and how many commits it refused since.
    outage: Mutex<Option<(Instant, u64)>>,
    /// Held by whoever swaps the engine (and by a clean shutdown).
    swap: Mutex<()>,
    wake: crossbeam_channel::Sender<()>,
    health: Arc<StoreHealth>,
    /// What inboxes keep (see [`retention`]).
    pub(super) policy: Policy,
    /// Where retention reads the time.
    pub(super) clock: Clock,
    /// Held for reading by every commit while it writes, and for writing by
    /// the trimmer while it reads and writes reference counts, and by a
    /// clean shutdown (see [`retention`]).
    pub(super) gc: RwLock<()>,
    /// Held by whoever trims an inbox.
    pub(super) trim: Mutex<()>,
}

impl Shared {
    /// The store state around `engine`, opened `writable` or not; returns it
    /// with the receiving end of its wake-ups for [`Recovery::start`].
    pub(super) fn new(
        engine: Engine,
        recipe: Recipe,
        epoch: u64,
        refusing: Arc<AtomicBool>,
    ) -> (Arc<Shared>, crossbeam_channel::Receiver<()>) {
        let (wake, woken) = crossbeam_channel::bounded(1);
        let writable = engine.writable;
        refusing.store(!writable, Ordering::SeqCst);
        let health = Arc::new(StoreHealth::default());
        let (policy, clock) = (recipe.opts.retention, recipe.opts.clock.clone());
        let shared = Arc::new(Shared {
            engine: RwLock::new(Arc::new(engine)),
            recipe,
            epoch,
            closed: AtomicBool::new(false),
            refusing,
            outage: Mutex::new(None),
            swap: Mutex::new(()),
            wake,
            health,
            policy,
            clock,
            gc: RwLock::new(()),
            trim: Mutex::new(()),
        });
        if !writable {
            shared.begin_outage();
            let _ = shared.wake.try_send(());
        }
        (shared, woken)
    }

    /// The current engine, for one call.
    pub(super) fn engine(&self) -> Arc<Engine> {
        self.engine.read().clone()
    }

    pub(super) fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Whether commits are taken now.
    pub(super) fn writable(&self) -> bool {
        !self.refusing.load(Ordering::Relaxed)
    }

    pub(super) fn swap_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.swap.lock()
    }

    fn begin_outage(&self) {
        *self.outage.lock() = Some((Instant::now(), 0));
        self.health.writable.store(0, Ordering::Relaxed);
    }

    /// A commit on `engine` failed with `error` (or was refused by a
    /// read-only engine, `None`).
    pub(super) fn write_failed(&self, engine: &Arc<Engine>, error: Option<&rocksdb::Error>) {
        self.health.write_failures.fetch_add(1, Ordering::Relaxed);
        // A straggler on an engine already replaced says nothing about the
        // current one.
        let current = Arc::ptr_eq(engine, &self.engine.read());
        if current && !self.refusing.swap(true, Ordering::SeqCst) {
            self.begin_outage();
            let error = error.map_or_else(|| "read-only".to_owned(), |e| e.to_string());
            tracing::error!(
                %error,
                "the store refuses writes: requests that write are answered STORE_UNAVAILABLE \
                 until it recovers, which it tries by itself (reads go on)"
            );
        }
        if let Some((_, refused)) = self.outage.lock().as_mut() {
            *refused += 1;
        }
        if current {
            let _ = self.wake.try_send(());
        }
    }

    /// A commit succeeded: if the store was refusing, RocksDB resumed by
    /// itself before the recovery thread noticed.
    pub(super) fn write_succeeded(&self) {
        if self.refusing.load(Ordering::Relaxed) {
            // Held: the recovery thread is swapping and says so itself.
            if let Some(_swapping) = self.swap.try_lock() {
                self.recovered("RocksDB resumed writes");
            }
        }
    }

    /// Leave the refusing state (the caller holds the swap lock).
    fn recovered(&self, how: &str) {
        if !self.refusing.swap(false, Ordering::SeqCst) {
            return;
        }
        let (seconds, refused) = match self.outage.lock().take() {
            Some((since, refused)) => (since.elapsed().as_secs_f64(), refused),
            None => (0.0, 0),
        };
        self.health.writable.store(1, Ordering::Relaxed);
        self.health.recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            how,
            refused_commits = refused,
            refusing_for_s = format!("{seconds:.1}"),
            "the store takes writes again"
        );
    }

    /// Put `engine` in place of the current one; returns the one it replaced.
    fn replace(&self, engine: Engine) -> Arc<Engine> {
        std::mem::replace(&mut *self.engine.write(), Arc::new(engine))
    }

    /// One attempt to get a writable engine back (see the module doc).
    fn try_recover(&self) -> Result<(), StoreError> {
        let _swapping = self.swap.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let current = self.engine();
        if current.writable {
            if super::record_run(&current, self.recipe.opts.wal_sync, self.epoch).is_ok() {
                self.recovered("RocksDB resumed writes");
                return Ok(());
            }
            // Stopped for good: reads move to a read-only instance while
            // this one closes and lets go of the database's lock.
            let read_only = self.recipe.open_read_only()?;
            drop(current);
            retire(self.replace(read_only));
        } else {
            drop(current);
        }
        let (engine, _) = self
            .recipe
            .open_writable(Some(self.epoch), &self.refusing)?;
        // The read-only instance closes when its last reader is done.
        drop(self.replace(engine));
        self.recovered("reopened the database");
        Ok(())
    }
}

/// Close `engine` once the calls still using it are done (on this thread,
/// so a shard never pays for closing a database), or, past
/// [`RETIRE_PATIENCE`], leave it to the last of them.
fn retire(engine: Arc<Engine>) {
    let deadline = Instant::now() + RETIRE_PATIENCE;
    while Arc::strong_count(&engine) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(engine);
}

/// The recovery thread: idle until a commit fails, then retrying with
/// backoff until the store takes writes again. Stops when dropped.
pub(super) struct Recovery {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recovery {
    pub(super) fn start(
        shared: Arc<Shared>,
        woken: crossbeam_channel::Receiver<()>,
    ) -> std::io::Result<Recovery> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("swiftlet-store-recovery".into())
            .spawn(move || loop {
                crossbeam_channel::select! {
                    recv(stopped) -> _ => return,
                    recv(woken) -> _ => {}
                }
                let mut wait = FIRST_RETRY;
                while !shared.writable() {
                    match stopped.recv_timeout(wait) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    match shared.try_recover() {
                        Ok(()) => wait = FIRST_RETRY,
                        Err(StoreError::Closed) => return,
                        Err(e) => {
                            shared
                                .health
                                .recovery_failures
                                .fetch_add(1, Ordering::Relaxed);
                            crate::log_every!(
                                30_000,
                                warn,
                                error = %e,
                                "the store still refuses writes; trying again"
                            );
                            wait = (wait * 2).min(MAX_RETRY);
                        }
                    }
                }
            })?;
        Ok(Recovery {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Recovery {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread of [`WalSync::Interval`]: syncs the WAL every interval until
/// dropped.
struct WalSyncer {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WalSyncer {
    fn start(
        db: Arc<DB>,
        every: Duration,
        refusing: Arc<AtomicBool>,
    ) -> std::io::Result<WalSyncer> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("swiftlet-wal-sync".into())
            .spawn(move || {
                // Ticks are scheduled from each sync's start, not its end,
                // so a write waits at most one interval for the next sync
                // to start (or, when one overruns, for it to finish).
                let mut next = Instant::now() + every;
                loop {
                    match stopped.recv_deadline(next) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    next += every;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    // After a failed write the log file is dead: syncing it
                    // only fails again, every interval.
                    if refusing.load(Ordering::Relaxed) {
                        continue;
                    }
                    // With the WAL written on every commit (not buffered
                    // by RocksDB), flushing it with `sync` is SyncWAL:
                    // fsync of every WAL file not yet synced.
                    if let Err(e) = db.flush_wal(true) {
                        crate::log_every!(1_000, error, error = %e, "syncing the WAL failed");
                    }
                }
            })?;
        Ok(WalSyncer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{cf, Store, StoreOptions};
    use super::owned_by_user;

    /// RocksDB writes the options each column family opened with to an
    /// `OPTIONS-*` file in the data directory: the families keyed by user
    /// insert with the user hint, and no other family does.
    #[test]
    fn the_families_keyed_by_user_insert_with_the_user_hint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let newest = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.starts_with("OPTIONS-"))
            .max()
            .expect("RocksDB wrote its options");
        let text = std::fs::read_to_string(dir.path().join(newest)).expect("read");
        for name in cf::ALL_CFS {
            let header = format!("CFOptions \"{name}\"]");
            let section = text
                .split("\n[")
                .find(|s| s.starts_with(&header))
                .unwrap_or_else(|| panic!("no section for {name}"));
            let hinted =
                section.contains("memtable_insert_with_hint_prefix_extractor=swiftlet.UserHint");
            assert_eq!(hinted, owned_by_user(name), "{name}");
        }
    }
}
