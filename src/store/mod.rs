//! Durable state: the only module that imports `rocksdb`.
//!
//! One RocksDB holds everything, split into column families declared in
//! [`cf`] with key layouts in [`keys`]. Writes go through [`Batch`], which is
//! one RocksDB `WriteBatch`: everything put into it becomes durable together
//! or not at all, in one write-ahead-log record. The commit pipeline
//! (`crate::commit`) fills one batch per turn of its loop, which is how many
//! sends share one WAL write (group commit).
//!
//! Reads (inbox pages, cursors, dedup lookups) are safe from any thread; the
//! shards read inbox pages directly when a device catches up.
//!
//! A failed write (a full disk) makes the store refuse every commit, while
//! reads go on, until it has a writable database again, which it gets by
//! itself in the background; on a full disk it also opens read-only rather
//! than not at all. How and why: [`engine`].
//!
//! # What a commit survives
//!
//! [`Store::commit`] returns once its batch is in the write-ahead log. What
//! that survives is [`WalSync`]'s choice: the OS page cache (a `kill -9` of
//! the server, not a power loss or kernel crash), the disk after at most
//! one sync interval, or the disk before the commit returns. When a run may
//! have ended with commits lost that were already answered or pushed, the
//! next open changes the [inbox epoch](Store::inbox_epoch): the inbox heads
//! may then have rolled back, and their seqs may be handed to new events.

pub mod cf;
pub mod cluster;
mod engine;
pub mod keys;
mod memory;
pub mod ops;
pub mod partition;
pub mod retention;

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, WriteOptions, DB};
use swiftlet_protocol::pb;

use crate::clock::Clock;
use crate::metrics::StoreHealth;
use keys::{InboxEntry, RunState};
pub use memory::{libc_heap, LibcHeap, DEFAULT_MEMTABLE_BUDGET, MIN_BUDGET as MIN_MEMTABLE_BUDGET};

/// The default [`StoreOptions::block_cache_bytes`].
pub const DEFAULT_BLOCK_CACHE: usize = 64 << 20;

/// The smallest block cache a server accepts: below it the LRU cache has
/// a single shard, and one partition of a big SST's index or filter is a
/// sizeable part of it.
pub const MIN_BLOCK_CACHE: usize = 8 << 20;
pub use retention::{Policy as RetentionPolicy, TrimReport};

/// A storage failure. Engine errors are mapped here, in one place.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Engine(#[from] rocksdb::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("missing column family {0}")]
    MissingCf(&'static str),
    /// Opening with the write-ahead log somewhere else than where the
    /// database keeps it would silently drop every write not yet flushed
    /// from it.
    #[error(
        "the write-ahead log of this database is in {was}, not {now}: \
         start with the WAL directory it was created with (or move the *.log files \
         there and update {marker})"
    )]
    WalDirMoved {
        was: String,
        now: String,
        marker: String,
    },
    /// A commit after [`Store::mark_clean_shutdown`]: it would not be
    /// covered by the clean-shutdown record.
    #[error("the store was closed")]
    Closed,
    /// A commit while the database is open read-only: the disk was full
    /// (see [`engine`]).
    #[error("the database is open read-only until there is room to write")]
    ReadOnly,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// A read failed on purpose (see [`Store::fail_next`]).
    #[cfg(test)]
    #[error("injected failure of {0:?}")]
    Injected(FailRead),
}

/// When the write-ahead log is synced to disk (fsync), which decides what
/// a returned [`Store::commit`] (and so an Ack) survives. In every mode the
/// batch is in the WAL file when `commit` returns, so a crash of the
/// server process alone (`kill -9`, a panic, the OOM killer) loses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "WalSyncRepr")]
pub enum WalSync {
    /// Never synced by the server: the kernel writes the WAL back when it
    /// chooses (on Linux typically within 30 s). A power loss or kernel
    /// crash loses the commits not yet written back.
    Off,
    /// A background thread syncs the WAL every interval: a power loss or
    /// kernel crash loses at most the commits of the last interval (plus
    /// the duration of one fsync). Costs one fsync per interval, off the
    /// commit path.
    Interval,
    /// Every group commit is synced before it returns: an Ack survives a
    /// power loss. Costs one fsync in every commit's latency (0.4 to 4 ms
    /// on the shared VM of docs/performance.md); group commit shares it
    /// among whatever is in flight.
    Always,
}

impl WalSync {
    pub fn name(self) -> &'static str {
        match self {
            WalSync::Off => "off",
            WalSync::Interval => "interval",
            WalSync::Always => "always",
        }
    }
}

impl std::fmt::Display for WalSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WalSync {
    type Err = String;

    /// `off`, `interval` or `always`; the boolean spellings of the flag it
    /// replaced (`true`/`false`, `on`, `1`/`0`, `yes`/`no`) still work, as
    /// `always` and `off`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" | "false" | "no" | "0" => Ok(WalSync::Off),
            "interval" => Ok(WalSync::Interval),
            "always" | "on" | "true" | "yes" | "1" => Ok(WalSync::Always),
            _ => Err(format!(
                "unknown WAL sync mode {s:?}: expected off, interval or always"
            )),
        }
    }
}

/// How a TOML file may spell a [`WalSync`]: a mode name, or the boolean of
/// the setting it replaced.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum WalSyncRepr {
    Bool(bool),
    Name(String),
}

impl TryFrom<WalSyncRepr> for WalSync {
    type Error = String;

    fn try_from(r: WalSyncRepr) -> Result<Self, String> {
        match r {
            WalSyncRepr::Bool(true) => Ok(WalSync::Always),
            WalSyncRepr::Bool(false) => Ok(WalSync::Off),
            WalSyncRepr::Name(s) => s.parse(),
        }
    }
}

/// Tuning knobs of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When the WAL is synced (see [`WalSync`]).
    pub wal_sync: WalSync,
    /// The period of [`WalSync::Interval`].
    pub wal_sync_interval: Duration,
    /// Block cache size in bytes, shared by all column families.
    pub block_cache_bytes: usize,
    /// Memtable size per column family. Smaller memtables keep skiplist
    /// inserts of random keys (inboxes, dedup records) shallow.
    pub write_buffer_bytes: usize,
    /// One budget for the memtables of every column family together (see
    /// [`memory`]); 0: none, each column family is bounded by
    /// `write_buffer_bytes` alone.
    pub memtable_budget_bytes: usize,
    /// Where the write-ahead log lives; `None`: in the database directory.
    /// Recorded in the database (see [`WAL_DIR_MARKER`]) and checked on
    /// every open.
    pub wal_dir: Option<std::path::PathBuf>,
    /// What each inbox keeps and how long dedup records last (see
    /// [`retention`]); the default keeps everything.
    pub retention: retention::Policy,
    /// Where retention and the dedup window read the time.
    pub clock: Clock,
    /// RocksDB statistics (tickers only: block cache hits and misses,
    /// write stall time), which `/metrics` reads on scrape. On in the
    /// server; off only to measure what they cost (benches/store.rs,
    /// `statistics/...`).
    pub statistics: bool,
}

/// The file in the database directory that records where its write-ahead
/// log lives (absent: in the database directory itself).
pub const WAL_DIR_MARKER: &str = "SWIFTLET_WAL_DIR";

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_sync: WalSync::Interval,
            wal_sync_interval: Duration::from_millis(100),
            block_cache_bytes: DEFAULT_BLOCK_CACHE,
            write_buffer_bytes: 16 << 20,
            memtable_budget_bytes: DEFAULT_MEMTABLE_BUDGET,
            wal_dir: None,
            retention: retention::Policy::default(),
            clock: Clock::system(),
            statistics: true,
        }
    }
}

/// The embedded database.
pub struct Store {
    /// Declared first, so it stops before the engine closes (see
    /// [`retention`]).
    _trimmer: retention::Trimmer,
    /// Declared early, so it stops before the engine closes (see
    /// [`engine`]).
    _recovery: engine::Recovery,
    /// Inboxes for the trimmer to look at (see [`retention`]).
    notes: retention::Notes,
    /// The open instance and what it takes to open it again.
    shared: Arc<engine::Shared>,
    write_opts: WriteOptions,
    /// The partition being moved away, if any (see [`partition`]); set
    /// only while `watching`, so a commit outside a move pays one load.
    watch: parking_lot::Mutex<Option<partition::Watch>>,
    watching: AtomicBool,
    /// Reads to fail once each, for tests of what a failing disk does.
    #[cfg(test)]
    faults: parking_lot::Mutex<Vec<FailRead>>,
    /// Fail the next commit as a read-only engine would (tests only).
    #[cfg(test)]
    fail_commit: AtomicBool,
}

/// A store read that [`Store::fail_next`] makes fail (tests only).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailRead {
    /// [`Store::last_seq`] of this user.
    LastSeq(String),
    /// [`Store::watermarks`] of this user, in any conversation.
    Watermarks(String),
    /// [`Store::message`] of this id.
    Message(u64),
}

/// An atomic group of writes. Dropping it unwritten discards it.
///
/// The writes are collected per column family and only turned into a
/// RocksDB `WriteBatch` by [`Store::commit`], which puts each family's in
/// key order first (a stable sort: writes to one key keep their order).
/// Inbox, dedup and status keys of a group commit are spread over the whole
/// key space; in key order, the writes of one inbox follow each other and
/// each memtable insert after the first starts its skiplist search from
/// where the previous one ended instead of from the top, which made the
/// memtable inserts, the pipeline's largest cost, markedly cheaper.
/// Collected per family, the sort compares keys only, and the families
/// whose keys only grow (messages, reference counts: ids are increasing)
/// arrive already in order, which the sort checks in one pass.
#[derive(Default)]
pub struct Batch {
    /// The column families written, each with its writes in the order
    /// they were made.
    families: Vec<Family>,
    /// Writes collected so far, over all families.
    len: usize,
    /// Bytes of keys and values collected so far (to size the `WriteBatch`).
    bytes: usize,
    /// The last reference count added ([`Batch::add_ref`]): its place in
    /// `families` and in that family's writes, and for which message, so
    /// the references a message gets from consecutive inbox entries become
    /// one write.
    last_ref: Option<(usize, usize, u64)>,
    /// Messages this batch stores under ids minted for it
    /// ([`Store::put_minted_message`]), in the order stored (ids grow, so
    /// sorted): no inbox row names them yet, so no trim can be deciding on
    /// their counts.
    minted: Vec<u64>,
    /// The batch changes the reference count of a message it did not mint
    /// (a relayed or moved row): it must not be written while the trimmer
    /// decides on counts (see [`Store::commit`] and `retention`).
    shares_messages: bool,
}

struct Family {
    cf: &'static str,
    ops: Vec<BatchOp>,
}

struct BatchOp {
    /// The write's place among all of the batch's writes, for
    /// [`Batch::truncate`].
    at: usize,
    key: Vec<u8>,
    value: OpValue,
}

enum OpValue {
    Put(Vec<u8>),
    Delete,
    /// A reference-count delta ([`cf::REFS`]'s merge operator).
    AddRefs(i64),
}

impl OpValue {
    fn len(&self) -> usize {
        match self {
            OpValue::Put(v) => v.len(),
            OpValue::Delete => 0,
            OpValue::AddRefs(_) => 8,
        }
    }
}

impl Batch {
    /// The writes of `cf` (an entry of [`cf::ALL_CFS`]): its place in
    /// `families`, added if new. A batch writes a handful of families, so
    /// a scan.
    fn family(&mut self, cf: &'static str) -> usize {
        match self.families.iter().position(|f| f.cf == cf) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    cf,
                    ops: Vec::new(),
                });
                self.families.len() - 1
            }
        }
    }

    /// Add a write to `cf`; returns its place in `families` and in that
    /// family's writes.
    fn push(&mut self, cf: &'static str, key: Vec<u8>, value: OpValue) -> (usize, usize) {
        let f = self.family(cf);
        self.bytes += key.len() + value.len();
        let ops = &mut self.families[f].ops;
        ops.push(BatchOp {
            at: self.len,
            key,
            value,
        });
        self.len += 1;
        (f, ops.len() - 1)
    }

    fn put(&mut self, cf: &'static str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.push(cf, key.into(), OpValue::Put(value.into()));
    }

    fn delete(&mut self, cf: &'static str, key: impl Into<Vec<u8>>) {
        self.push(cf, key.into(), OpValue::Delete);
    }

    /// One more inbox entry references message `id`.
    fn add_ref(&mut self, id: u64) {
        if self.minted.binary_search(&id).is_err() {
            self.shares_messages = true;
        }
        if let Some((f, i, last)) = self.last_ref {
            if last == id {
                if let Some(BatchOp {
                    value: OpValue::AddRefs(n),
                    ..
                }) = self.families.get_mut(f).and_then(|f| f.ops.get_mut(i))
                {
                    *n += 1;
                    return;
                }
            }
        }
        let (f, i) = self.push(cf::REFS, id.to_be_bytes().to_vec(), OpValue::AddRefs(1));
        self.last_ref = Some((f, i, id));
    }

    /// Add `n` (which may be negative) to message `id`'s reference count:
    /// rows that name it arriving or leaving outside [`Store::put_inbox`]
    /// (a partition moving in or out, see [`partition`]).
    fn add_refs(&mut self, id: u64, n: i64) {
        self.shares_messages = true;
        self.push(cf::REFS, id.to_be_bytes().to_vec(), OpValue::AddRefs(n));
    }

    /// Writes collected so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Drop the writes made after the first `len` (a failed request's: see
    /// `crate::txn`).
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for f in &mut self.families {
            while f.ops.last().is_some_and(|op| op.at >= len) {
                if let Some(op) = f.ops.pop() {
                    self.bytes -= op.key.len() + op.value.len();
                }
            }
        }
        self.len = len;
        if let Some((f, i, _)) = self.last_ref {
            if self.families.get(f).is_none_or(|f| i >= f.ops.len()) {
                self.last_ref = None;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every write, family by family, each in the order it was made.
    fn writes(&self) -> impl Iterator<Item = (&'static str, &BatchOp)> {
        self.families
            .iter()
            .flat_map(|f| f.ops.iter().map(move |op| (f.cf, op)))
    }
}

/// One page of a user's inbox.
#[derive(Debug, Default)]
pub struct InboxPage {
    pub events: Vec<pb::Event>,
    /// True when the page stopped at `limit` or `max_bytes`, not at the end.
    pub has_more: bool,
    /// The oldest seq the inbox holds (0: none), as of the page's read
    /// ([`Store::sync_inbox`] only; 0 from [`Store::read_inbox`]).
    pub first_available: u64,
    /// The newest seq (0: none), likewise.
    pub head: u64,
}

/// Where the write-ahead log of the database at `db` goes, checked against
/// where it went before: a database that exists must be opened with the WAL
/// directory it was created with. A new database records `configured`
/// before RocksDB creates it, so it never exists without that record.
/// Returns the directory, made absolute, to give RocksDB.
fn settle_wal_dir(
    db: &Path,
    configured: Option<&Path>,
) -> Result<Option<std::path::PathBuf>, StoreError> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let io = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| StoreError::Io { what, path, source }
    };
    let now = match configured {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            Some(std::fs::canonicalize(dir).map_err(io("resolving", dir))?)
        }
        None => None,
    };
    let marker = db.join(WAL_DIR_MARKER);
    if db.join("CURRENT").exists() {
        let was = match std::fs::read(&marker) {
            Ok(bytes) => Some(std::path::PathBuf::from(std::ffi::OsString::from_vec(
                bytes,
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading", &marker)(e)),
        };
        if was != now {
            let show = |d: &Option<std::path::PathBuf>| match d {
                Some(d) => d.display().to_string(),
                None => format!("the database directory {}", db.display()),
            };
            return Err(StoreError::WalDirMoved {
                was: show(&was),
                now: show(&now),
                marker: marker.display().to_string(),
            });
        }
        return Ok(now);
    }
    std::fs::create_dir_all(db).map_err(io("creating", db))?;
    match &now {
        Some(dir) => {
            std::fs::write(&marker, dir.as_os_str().as_bytes()).map_err(io("writing", &marker))?
        }
        None => match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &marker)(e)),
        },
    }
    Ok(now)
}

/// Write options that sync the WAL before the write returns.
fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// The inbox epoch of a run starting on `db` (see [`Store::inbox_epoch`]):
/// the stored one if the previous run ended in a way that lost nothing,
/// else a fresh one. Only reads, so a read-only instance can tell too.
fn settle_epoch(db: &DB) -> Result<u64, StoreError> {
    let meta = handle(db, cf::META)?;
    let previous = db
        .get_pinned_cf(meta, keys::META_RUN)?
        .map(|v| RunState::decode(&v))
        .transpose()?;
    let epoch = db
        .get_pinned_cf(meta, keys::META_INBOX_EPOCH)?
        .map(|v| keys::decode_u64(&v))
        .transpose()?;
    let keep = match previous {
        Some(RunState::Clean | RunState::RunningSynced) => epoch,
        // A run that may have lost acknowledged commits, a new database, or
        // one from before epochs existed.
        Some(RunState::Running) | None => None,
    };
    if let Some(e) = keep {
        return Ok(e);
    }
    let fresh = loop {
        let e = rand::random::<u64>();
        if e != 0 && Some(e) != epoch {
            break e;
        }
    };
    if epoch.is_some() {
        tracing::warn!(
            previous = ?previous,
            "the last run did not shut down cleanly and did not sync every commit: \
             its last commits may be lost, so the inbox epoch changes"
        );
    }
    Ok(fresh)
}

/// Record, synced, that a run in `mode` with inbox epoch `epoch` is under
/// way on `db`. Synced: a clean-shutdown record that came back after a
/// power loss would keep the epoch of a run that lost commits.
fn record_run(db: &DB, mode: WalSync, epoch: u64) -> Result<(), StoreError> {
    let meta = handle(db, cf::META)?;
    let running = match mode {
        WalSync::Always => RunState::RunningSynced,
        WalSync::Off | WalSync::Interval => RunState::Running,
    };
    let mut wb = rocksdb::WriteBatch::default();
    wb.put_cf(meta, keys::META_INBOX_EPOCH, epoch.to_be_bytes());
    wb.put_cf(meta, keys::META_RUN, running.encode());
    db.write_opt(wb, &synced())?;
    Ok(())
}

/// The handle of column family `name`.
fn handle<'a>(db: &'a DB, name: &'static str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or(StoreError::MissingCf(name))
}

impl Store {
    /// Open (or create) the database at `path`. On a full disk, an
    /// existing database opens read-only: reads are served, commits
    /// refused, and the store takes writes again by itself once there is
    /// room (see [`engine`]).
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        memory::return_freed_blocks();
        let recipe = engine::Recipe {
            path: path.to_owned(),
            wal_dir: settle_wal_dir(path, opts.wal_dir.as_deref())?,
            cache: rocksdb::Cache::new_lru_cache(opts.block_cache_bytes),
            write_buffers: memory::budget(opts.memtable_budget_bytes),
            opts: opts.clone(),
        };
        let refusing = Arc::new(AtomicBool::new(false));
        let (engine, epoch) = match recipe.open_writable(None, &refusing) {
            Ok(opened) => opened,
            Err(e) if engine::out_of_space(&e) => {
                let engine = recipe.open_read_only().map_err(|read_only| {
                    tracing::error!(error = %read_only, "opening the database read-only failed too");
                    e
                })?;
                let epoch = settle_epoch(&engine)?;
                tracing::error!(
                    path = %path.display(),
                    "the disk is full: the database is open read-only; reads are served, \
                     requests that write are answered STORE_UNAVAILABLE until there is room"
                );
                (engine, epoch)
            }
            Err(e) => return Err(e),
        };
        let (shared, woken) = engine::Shared::new(engine, recipe, epoch, refusing);
        let recovery =
            engine::Recovery::start(shared.clone(), woken).map_err(|source| StoreError::Io {
                what: "starting the recovery thread for",
                path: path.display().to_string(),
                source,
            })?;
        let (notes, noted) = crossbeam_channel::bounded(retention::NOTES);
        let trimmer =
            retention::Trimmer::start(shared.clone(), noted).map_err(|source| StoreError::Io {
                what: "starting the retention thread for",
                path: path.display().to_string(),
                source,
            })?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(opts.wal_sync == WalSync::Always);
        Ok(Store {
            _trimmer: trimmer,
            _recovery: recovery,
            notes,
            shared,
            write_opts,
            watch: parking_lot::Mutex::new(None),
            watching: AtomicBool::new(false),
            #[cfg(test)]
            faults: parking_lot::Mutex::new(Vec::new()),
            #[cfg(test)]
            fail_commit: AtomicBool::new(false),
        })
    }

    /// The current database instance, for one call.
    fn db(&self) -> Arc<engine::Engine> {
        self.shared.engine()
    }

    /// Whether commits are taken now (false from a failed write until the
    /// store recovers, see [`engine`]).
    pub fn writable(&self) -> bool {
        self.shared.writable()
    }

    /// The store's write health, for `/metrics`.
    pub fn health(&self) -> Arc<StoreHealth> {
        self.shared.health().clone()
    }

    /// Make the next `read` fail with [`StoreError::Injected`] (once; several
    /// calls queue several failures).
    #[cfg(test)]
    pub fn fail_next(&self, read: FailRead) {
        self.faults.lock().push(read);
    }

    /// Fail if a queued failure matches, and forget that failure.
    #[cfg(test)]
    fn injected(&self, matches: impl Fn(&FailRead) -> bool) -> Result<(), StoreError> {
        let mut faults = self.faults.lock();
        match faults.iter().position(matches) {
            Some(i) => Err(StoreError::Injected(faults.remove(i))),
            None => Ok(()),
        }
    }

    /// The inbox epoch: a number that stays the same for as long as every
    /// inbox seq handed out (acknowledged, pushed, or returned by a read)
    /// keeps naming the same event, and changes when that may no longer
    /// hold.
    ///
    /// It changes at an open that follows a run which ended without
    /// [`Store::mark_clean_shutdown`] while commits returned before the WAL
    /// was synced ([`WalSync::Off`] or [`WalSync::Interval`]): that run may
    /// have lost its last commits with the OS page cache (power loss,
    /// kernel crash), so the inbox heads may have rolled back, and the seqs
    /// of lost events will be handed to new ones. (It changes after a
    /// `kill -9` too, which loses nothing, because the two leave the same
    /// database behind.) It does not change after a crash of a run with
    /// [`WalSync::Always`]: every commit of such a run was on disk before it
    /// returned, and seqs are answered, pushed or readable only after their
    /// commit returned, so nothing anyone saw can roll back; a commit whose
    /// sync did not finish was seen by no one, and whether it survived or
    /// not, the inbox stays consistent with everything that was seen.
    ///
    /// A new epoch is random (never 0, never the previous one), so a
    /// database restored from a copy does not repeat the epochs that a
    /// lost timeline already used.
    pub fn inbox_epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// Record that this run ended cleanly: sync the WAL and everything
    /// before it, then refuse further commits. Called by a graceful
    /// shutdown after its last commit; the next open keeps the inbox epoch.
    /// Fails while the store refuses writes: the next open then decides
    /// from how the run before this one ended.
    pub fn mark_clean_shutdown(&self) -> Result<(), StoreError> {
        // No engine is swapped in from here on.
        let _swapping = self.shared.swap_lock();
        {
            // No trim is half done: its batch is in, or it will see `closed`.
            let _gc = self.shared.gc.write();
            self.shared.closed.store(true, Ordering::SeqCst);
        }
        let db = self.db();
        if !db.writable {
            return Err(StoreError::ReadOnly);
        }
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(
            handle(&db, cf::META)?,
            keys::META_RUN,
            RunState::Clean.encode(),
        );
        db.write_opt(wb, &synced())?;
        Ok(())
    }

    /// Write `batch` atomically; when this returns Ok the batch is in the
    /// WAL (and on disk too with [`WalSync::Always`]). A failure makes the
    /// store refuse every commit until it recovers (see [`engine`]).
    pub fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let db = self.db();
        #[cfg(test)]
        let refuse = !db.writable || self.fail_commit.swap(false, Ordering::SeqCst);
        #[cfg(not(test))]
        let refuse = !db.writable;
        if refuse {
            self.shared.write_failed(&db, None);
            return Err(StoreError::ReadOnly);
        }
        let shares_messages = batch.shares_messages;
        if self.watching.load(Ordering::Acquire) {
            self.note_written(batch.writes().map(|(cf, op)| (cf, op.key.as_slice())));
        }
        // Room for every write's key and value and RocksDB's few bytes of
        // framing per write (type, family id, two varint lengths).
        let mut wb = rocksdb::WriteBatch::with_capacity_bytes(batch.bytes + 16 * batch.len + 12);
        batch.families.sort_unstable_by_key(|f| f.cf);
        for f in &mut batch.families {
            if f.ops.is_empty() {
                continue;
            }
            f.ops.sort_by(|a, b| a.key.cmp(&b.key));
            let cf = handle(&db, f.cf)?;
            for op in &f.ops {
                match &op.value {
                    OpValue::Put(v) => wb.put_cf(cf, &op.key, v),
                    OpValue::Delete => wb.delete_cf(cf, &op.key),
                    OpValue::AddRefs(n) => wb.merge_cf(cf, &op.key, n.to_be_bytes()),
                }
            }
        }
        // Never while the trimmer decides on reference counts (see
        // `retention`), if the batch touches a count the trimmer may be
        // reading: one of a message it did not mint. A group commit of
        // sends mints every message it references, and so never waits
        // for a trim (which holds the lock for milliseconds: a hostile
        // run showed 5-10 ms commits on the shards while a fast sender's
        // recipients were trimmed).
        let written = {
            let _gc = shares_messages.then(|| self.shared.gc.read());
            db.write_opt(wb, &self.write_opts)
        };
        match written {
            Ok(()) => {
                self.shared.write_succeeded();
                Ok(())
            }
            Err(e) => {
                self.shared.write_failed(&db, Some(&e));
                Err(e.into())
            }
        }
    }

    /// A new, empty batch bound to this store's column families.
    pub fn batch(&self) -> Batch {
        Batch::default()
    }

    /// Put a message record into `batch`: one that may be stored already
    /// (a message relayed from another node, which may reach this node's
    /// inboxes more than once). The references the batch then adds to it
    /// make the commit wait while the trimmer decides on counts.
    pub fn put_message(&self, batch: &mut Batch, msg: &pb::Message) -> Result<(), StoreError> {
        batch.put(cf::MESSAGES, msg.id.to_be_bytes(), msg.encode_to_vec());
        Ok(())
    }

    /// Put a message record into `batch` under an id minted for it on this
    /// node just now (ids grow: each minted id is larger than the last).
    /// No stored row can name it, so the trimmer never decides on its
    /// count while this batch is written: a batch whose references all go
    /// to messages it minted commits without waiting for the trimmer.
    pub fn put_minted_message(
        &self,
        batch: &mut Batch,
        msg: &pb::Message,
    ) -> Result<(), StoreError> {
        if batch.minted.last().is_some_and(|last| *last >= msg.id) {
            // Out of order (never from the id generator): not a minted id
            // this batch can vouch for.
            return self.put_message(batch, msg);
        }
        batch.minted.push(msg.id);
        self.put_message(batch, msg)
    }

    /// Put an inbox slot into `batch`.
    pub fn put_inbox(
        &self,
        batch: &mut Batch,
        user: &str,
        seq: u64,
        entry: InboxEntry,
    ) -> Result<(), StoreError> {
        batch.put(cf::INBOX, keys::inbox_key(user, seq), entry.encode());
        if let InboxEntry::Message(id) = entry {
            batch.add_ref(id);
        }
        if self.shared.policy.due(seq) {
            // Full: the next sweep trims this inbox.
            let _ = self.notes.try_send(Arc::from(user));
        }
        Ok(())
    }

    /// Remember the Ack of `(user, client_msg_id)` in `batch`.
    pub fn put_dedup(
        &self,
        batch: &mut Batch,
        user: &str,
        client_msg_id: &str,
        ack: &pb::Ack,
    ) -> Result<(), StoreError> {
        batch.put(
            cf::DEDUP,
            keys::user_named_key(user, client_msg_id),
            ack.encode_to_vec(),
        );
        Ok(())
    }

    /// Set a device's cursor in `batch`.
    pub fn put_cursor(
        &self,
        batch: &mut Batch,
        user: &str,
        device: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        batch.put(
            cf::CURSORS,
            keys::user_named_key(user, device),
            seq.to_be_bytes(),
        );
        Ok(())
    }

    /// The Ack an earlier send with this `client_msg_id` got, if any.
    pub fn dedup(&self, user: &str, client_msg_id: &str) -> Result<Option<pb::Ack>, StoreError> {
        let db = self.db();
        let found = db.get_pinned_cf(
            handle(&db, cf::DEDUP)?,
            keys::user_named_key(user, client_msg_id),
        )?;
        match found {
            None => Ok(None),
            Some(v) => pb::Ack::decode(&*v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("dedup record: {e}"))),
        }
    }

    /// The device's stored cursor (0 when it never acknowledged anything).
    pub fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        let db = self.db();
        let found = db.get_pinned_cf(
            handle(&db, cf::CURSORS)?,
            keys::user_named_key(user, device),
        )?;
        match found {
            None => Ok(0),
            Some(v) => keys::decode_u64(&v),
        }
    }

    /// The user's newest inbox seq (0 when the inbox is empty).
    pub fn last_seq(&self, user: &str) -> Result<u64, StoreError> {
        let db = self.db();
        #[cfg(test)]
        self.injected(|f| matches!(f, FailRead::LastSeq(u) if u == user))?;
        let prefix = keys::user_prefix(user);
        let mut it = db.raw_iterator_cf(handle(&db, cf::INBOX)?);
        it.seek_for_prev(keys::inbox_key(user, u64::MAX));
        it.status()?;
        match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k),
            _ => Ok(0),
        }
    }

    /// The user's oldest inbox seq still stored (0 when the inbox is empty).
    pub fn first_seq(&self, user: &str) -> Result<u64, StoreError> {
        let db = self.db();
        let prefix = keys::user_prefix(user);
        let mut it = db.raw_iterator_cf(handle(&db, cf::INBOX)?);
        it.seek(&prefix);
        it.status()?;
        match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k),
            _ => Ok(0),
        }
    }

    /// Events of `user`'s inbox with seq > `after`: at most `limit` of them and
    /// (beyond the first) at most about `max_bytes` of encoded messages.
    pub fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        let db = self.db();
        read_inbox_at(&db, None, user, after, limit, max_bytes)
    }

    /// [`Store::read_inbox`], with the inbox's oldest and newest seqs, all
    /// read from one snapshot: the page and its bounds agree even while
    /// the trimmer and the pipeline change the inbox (a Sync reports the
    /// gap retention made exactly, never one its own page fills).
    pub fn sync_inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        let db = self.db();
        let snapshot = db.snapshot();
        let at = || {
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snapshot);
            ro
        };
        let mut page = read_inbox_at(&db, Some(&at), user, after, limit, max_bytes)?;
        let inbox = handle(&db, cf::INBOX)?;
        let prefix = keys::user_prefix(user);
        let mut it = db.raw_iterator_cf_opt(inbox, at());
        it.seek(&prefix);
        it.status()?;
        page.first_available = match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k)?,
            _ => 0,
        };
        it.seek_for_prev(keys::inbox_key(user, u64::MAX));
        it.status()?;
        page.head = match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k)?,
            _ => 0,
        };
        Ok(page)
    }

    /// Trim every inbox by the retention policy now, on this thread, and
    /// reclaim the messages no inbox references any more (the trimmer
    /// thread does the same on its own schedule).
    pub fn trim_now(&self) -> Result<TrimReport, StoreError> {
        retention::sweep(&self.shared)
    }

    /// Compact every column family now: what retention removed, and dedup
    /// records past their window, leave the disk.
    pub fn compact(&self) -> Result<(), StoreError> {
        let db = self.db();
        for name in cf::ALL_CFS {
            db.compact_range_cf(handle(&db, name)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// How many dedup records are stored (a scan: for tests and tools).
    pub fn count_dedup(&self) -> Result<u64, StoreError> {
        self.count_rows(cf::DEDUP)
    }

    /// How many rows column family `name` holds (an exact count by a scan).
    fn count_rows(&self, name: &'static str) -> Result<u64, StoreError> {
        let db = self.db();
        let mut n = 0;
        for item in db.iterator_cf(handle(&db, name)?, IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

/// Read options for one read of a snapshot (`None`: the latest state).
type At<'a> = Option<&'a dyn Fn() -> ReadOptions>;

/// [`Store::read_inbox`] on `db`, at a snapshot or not.
fn read_inbox_at(
    db: &engine::Engine,
    at: At<'_>,
    user: &str,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<InboxPage, StoreError> {
    let ro_of = || at.map_or_else(ReadOptions::default, |f| f());
    let prefix = keys::user_prefix(user);
    let mut upper = prefix.clone();
    // Past every `user ‖ 0x00 ‖ seq` key, before the next user's keys.
    upper.extend_from_slice(&[0xff; 9]);
    let mut ro = ro_of();
    ro.set_iterate_upper_bound(upper);
    let start = keys::inbox_key(user, after.saturating_add(1));
    let iter = db.iterator_cf_opt(
        handle(db, cf::INBOX)?,
        ro,
        IteratorMode::From(&start, Direction::Forward),
    );

    let mut slots = Vec::new();
    let mut has_more = false;
    for item in iter {
        let (k, v) = item?;
        if slots.len() >= limit {
            has_more = true;
            break;
        }
        slots.push((
            keys::seq_of_inbox_key(&prefix, &k)?,
            InboxEntry::decode(&v)?,
        ));
    }

    let messages_cf = handle(db, cf::MESSAGES)?;
    let ids: Vec<_> = slots
        .iter()
        .filter_map(|(_, e)| match e {
            InboxEntry::Message(id) => Some((messages_cf, id.to_be_bytes())),
            InboxEntry::Inline(_) => None,
        })
        .collect();
    let mut values = db.multi_get_cf_opt(ids, &ro_of()).into_iter();
    let mut page = InboxPage {
        events: Vec::with_capacity(slots.len()),
        has_more,
        ..InboxPage::default()
    };
    let mut bytes = 0usize;
    for (seq, entry) in slots {
        let (raw, what) = match entry {
            InboxEntry::Message(id) => {
                let raw = values
                    .next()
                    .ok_or_else(|| {
                        StoreError::Corrupt("multi_get returned too few values".into())
                    })??
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "inbox of {user} references missing message {id}"
                        ))
                    })?;
                (raw, Some(id))
            }
            InboxEntry::Inline(raw) => (raw, None),
        };
        // 16 bytes covers the Event wrapper around each message (tags, seq).
        let cost = raw.len() + 16;
        if !page.events.is_empty() && bytes + cost > max_bytes {
            page.has_more = true;
            break;
        }
        bytes += cost;
        let event = match what {
            Some(id) => {
                let msg = pb::Message::decode(raw.as_slice())
                    .map_err(|e| StoreError::Corrupt(format!("message {id}: {e}")))?;
                pb::Event {
                    seq,
                    kind: Some(pb::event::Kind::Message(msg)),
                }
            }
            None => {
                let mut ev = pb::Event::decode(raw.as_slice()).map_err(|e| {
                    StoreError::Corrupt(format!("inline event at {user}/{seq}: {e}"))
                })?;
                ev.seq = seq;
                ev
            }
        };
        page.events.push(event);
    }
    Ok(page)
}

impl Store {
    /// Put an inline event (group change, receipt) into an inbox slot.
    pub fn put_inbox_event(
        &self,
        batch: &mut Batch,
        user: &str,
        seq: u64,
        kind: &pb::event::Kind,
    ) -> Result<(), StoreError> {
        let ev = pb::Event {
            seq: 0,
            kind: Some(kind.clone()),
        };
        self.put_inbox(batch, user, seq, InboxEntry::Inline(ev.encode_to_vec()))
    }

    /// One message by id.
    pub fn message(&self, id: u64) -> Result<Option<pb::Message>, StoreError> {
        let db = self.db();
        #[cfg(test)]
        self.injected(|f| *f == FailRead::Message(id))?;
        let found = db.get_pinned_cf(handle(&db, cf::MESSAGES)?, id.to_be_bytes())?;
        match found {
            None => Ok(None),
            Some(v) => pb::Message::decode(&*v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("message {id}: {e}"))),
        }
    }

    /// The `status` key of the conversation message `id` belongs to (see
    /// [`keys::conversation_of`]), or `None` if there is no such message.
    pub fn message_conversation(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .message(id)?
            .map(|m| keys::conversation_of(m.group_id, &m.from_user, &m.to_user)))
    }

    /// A group with its members.
    pub fn group(&self, id: u64) -> Result<Option<pb::GroupInfo>, StoreError> {
        let db = self.db();
        let found = db.get_pinned_cf(handle(&db, cf::GROUPS)?, id.to_be_bytes())?;
        match found {
            None => Ok(None),
            Some(v) => pb::GroupInfo::decode(&*v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("group {id}: {e}"))),
        }
    }

    pub fn put_group(&self, batch: &mut Batch, group: &pb::GroupInfo) -> Result<(), StoreError> {
        batch.put(
            cf::GROUPS,
            group.group_id.to_be_bytes(),
            group.encode_to_vec(),
        );
        Ok(())
    }

    /// Record (or, with `member == false`, erase) that `user` is in `group`.
    pub fn put_membership(
        &self,
        batch: &mut Batch,
        user: &str,
        group: u64,
        member: bool,
    ) -> Result<(), StoreError> {
        let mut key = keys::user_prefix(user);
        key.extend_from_slice(&group.to_be_bytes());
        if member {
            batch.put(cf::MEMBERSHIPS, key, Vec::new());
        } else {
            batch.delete(cf::MEMBERSHIPS, key);
        }
        Ok(())
    }

    /// Whether `user` is a member of group `group` (one point read, so a
    /// non-member's request never loads the group itself).
    pub fn is_member(&self, user: &str, group: u64) -> Result<bool, StoreError> {
        let db = self.db();
        let mut key = keys::user_prefix(user);
        key.extend_from_slice(&group.to_be_bytes());
        let found = db.get_pinned_cf(handle(&db, cf::MEMBERSHIPS)?, key)?;
        Ok(found.is_some())
    }

    /// Up to `limit` of `user`'s groups with ids above `after`, in id
    /// order, and whether more follow: one page is one short range scan,
    /// however many groups the user is in.
    pub fn memberships_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let db = self.db();
        let prefix = keys::user_prefix(user);
        let mut from = prefix.clone();
        from.extend_from_slice(&after.saturating_add(1).to_be_bytes());
        let mut out = Vec::with_capacity(limit.min(256));
        let iter = db.iterator_cf(
            handle(&db, cf::MEMBERSHIPS)?,
            IteratorMode::From(&from, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = keys::seq_of_inbox_key(&prefix, &k)?;
            if id <= after {
                // after == u64::MAX: nothing is above it.
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(id);
        }
        Ok((out, false))
    }

    /// The groups `user` is in, by id.
    pub fn memberships(&self, user: &str) -> Result<Vec<u64>, StoreError> {
        let db = self.db();
        let prefix = keys::user_prefix(user);
        let mut out = Vec::new();
        let iter = db.iterator_cf(
            handle(&db, cf::MEMBERSHIPS)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(keys::seq_of_inbox_key(&prefix, &k)?);
        }
        Ok(out)
    }

    /// `user`'s (delivered, read) watermarks in a conversation.
    pub fn watermarks(&self, conversation: &[u8], user: &str) -> Result<(u64, u64), StoreError> {
        let db = self.db();
        #[cfg(test)]
        self.injected(|f| matches!(f, FailRead::Watermarks(u) if u == user))?;
        let found = db.get_pinned_cf(
            handle(&db, cf::STATUS)?,
            keys::status_key(conversation, user),
        )?;
        match found {
            None => Ok((0, 0)),
            Some(v) => keys::decode_u64_pair(&v),
        }
    }

    /// Watermarks of many users in one conversation.
    pub fn watermarks_of(
        &self,
        conversation: &[u8],
        users: &[&str],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let db = self.db();
        let cf = handle(&db, cf::STATUS)?;
        let keys: Vec<_> = users
            .iter()
            .map(|u| (cf, keys::status_key(conversation, u)))
            .collect();
        db.multi_get_cf(keys)
            .into_iter()
            .map(|v| match v? {
                None => Ok((0, 0)),
                Some(v) => keys::decode_u64_pair(&v),
            })
            .collect()
    }

    pub fn put_watermarks(
        &self,
        batch: &mut Batch,
        conversation: &[u8],
        user: &str,
        delivered: u64,
        read: u64,
    ) -> Result<(), StoreError> {
        batch.put(
            cf::STATUS,
            keys::status_key(conversation, user),
            keys::u64_pair(delivered, read),
        );
        Ok(())
    }

    pub fn put_group_log(
        &self,
        batch: &mut Batch,
        group: u64,
        msg_id: u64,
        sender: &str,
    ) -> Result<(), StoreError> {
        batch.put(
            cf::GROUP_LOG,
            keys::u64_pair(group, msg_id),
            sender.as_bytes(),
        );
        Ok(())
    }

    /// Distinct senders of the group's messages with ids in `(after, up_to]`,
    /// looking at no more than `scan_limit` messages (the newest first).
    pub fn group_senders(
        &self,
        group: u64,
        after: u64,
        up_to: u64,
        scan_limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let db = self.db();
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::u64_pair(group, after.saturating_add(1)).to_vec());
        let start = keys::u64_pair(group, up_to);
        let iter = db.iterator_cf_opt(
            handle(&db, cf::GROUP_LOG)?,
            ro,
            IteratorMode::From(&start, Direction::Reverse),
        );
        let mut senders: Vec<String> = Vec::new();
        for item in iter.take(scan_limit) {
            let (_, v) = item?;
            let sender = String::from_utf8(v.to_vec())
                .map_err(|_| StoreError::Corrupt("group log sender".into()))?;
            if !senders.contains(&sender) {
                senders.push(sender);
            }
        }
        Ok(senders)
    }

    /// `user`'s (last seen ms, hides last seen).
    pub fn presence(&self, user: &str) -> Result<(u64, bool), StoreError> {
        let db = self.db();
        let found = db.get_pinned_cf(handle(&db, cf::PRESENCE)?, user.as_bytes())?;
        match found {
            None => Ok((0, false)),
            Some(v) if v.len() == 9 => Ok((keys::decode_u64(&v[..8])?, v[8] & 1 == 1)),
            Some(v) => Err(StoreError::Corrupt(format!(
                "presence value of {} bytes",
                v.len()
            ))),
        }
    }

    pub fn put_presence(
        &self,
        batch: &mut Batch,
        user: &str,
        last_seen_ms: u64,
        hide: bool,
    ) -> Result<(), StoreError> {
        let mut v = [0u8; 9];
        v[..8].copy_from_slice(&last_seen_ms.to_be_bytes());
        v[8] = u8::from(hide);
        batch.put(cf::PRESENCE, user.as_bytes(), v);
        Ok(())
    }

    /// How many messages are stored (exact count by a scan: for tests and
    /// tools, not for hot paths).
    pub fn count_messages(&self) -> Result<u64, StoreError> {
        self.count_rows(cf::MESSAGES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed request's writes are taken back from every column family
    /// they went to, and what the batch held before it is written whole:
    /// the reference counts too, coalesced or not.
    #[test]
    fn truncating_a_batch_drops_the_later_writes_of_every_family() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let message = |id| pb::Message {
            id,
            ..Default::default()
        };
        let mut b = store.batch();
        store.put_message(&mut b, &message(1)).expect("put");
        store
            .put_inbox(&mut b, "bob", 1, InboxEntry::Message(1))
            .expect("put");
        store
            .put_inbox(&mut b, "amy", 1, InboxEntry::Message(1))
            .expect("put");
        let kept = b.len();
        assert_eq!(kept, 4, "one message, two inbox rows, one coalesced count");
        store.put_message(&mut b, &message(2)).expect("put");
        store
            .put_inbox(&mut b, "cy", 1, InboxEntry::Message(2))
            .expect("put");
        store.put_cursor(&mut b, "amy", "phone", 1).expect("put");
        b.truncate(kept);
        assert_eq!(b.len(), kept);
        store
            .put_inbox(&mut b, "dan", 1, InboxEntry::Message(1))
            .expect("put");
        store.put_cursor(&mut b, "bob", "phone", 1).expect("put");
        store.commit(b).expect("commit");

        let db = store.db();
        let refs = |id: u64| {
            db.get_cf(handle(&db, cf::REFS).expect("cf"), id.to_be_bytes())
                .expect("read")
                .map(|v| retention::decode_refs(&v).expect("count"))
        };
        assert_eq!(refs(1), Some(3));
        assert_eq!(refs(2), None);
        assert_eq!(store.message(2).expect("read"), None);
        assert!(store.message(1).expect("read").is_some());
        assert_eq!(store.last_seq("cy").expect("read"), 0);
        assert_eq!(store.last_seq("dan").expect("read"), 1);
        assert_eq!(store.cursor("amy", "phone").expect("read"), 0);
        assert_eq!(store.cursor("bob", "phone").expect("read"), 1);
    }

    /// The trimmer decides on reference counts holding the `gc` lock for
    /// milliseconds. A batch whose references all go to messages it minted
    /// cannot touch a count the trimmer reads, and commits meanwhile; one
    /// that references a message it did not mint (a relay's) waits.
    #[test]
    fn only_a_batch_referencing_older_messages_waits_for_the_trimmer() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let message = |id| pb::Message {
            id,
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            // Inside the scope: a failing assert drops it before the scope
            // joins the committer.
            let trimming = store.shared.gc.write();
            let (minted, tx1) = (&store, tx.clone());
            s.spawn(move || {
                let mut b = minted.batch();
                minted
                    .put_minted_message(&mut b, &message(10))
                    .expect("put");
                for user in ["amy", "bob"] {
                    minted
                        .put_inbox(&mut b, user, 1, InboxEntry::Message(10))
                        .expect("put");
                }
                tx1.send(minted.commit(b)).expect("send");
            });
            // A guard against a hang, not a time bar: this commit takes no lock.
            rx.recv_timeout(Duration::from_secs(60))
                .expect("a batch of minted messages commits while the trimmer decides")
                .expect("commit");
            let relayed = &store;
            s.spawn(move || {
                let mut b = relayed.batch();
                relayed.put_message(&mut b, &message(10)).expect("put");
                relayed
                    .put_inbox(&mut b, "cy", 1, InboxEntry::Message(10))
                    .expect("put");
                tx.send(relayed.commit(b)).expect("send");
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "a batch referencing a message it did not mint waits for the trimmer"
            );
            drop(trimming);
            rx.recv().expect("answer").expect("commit");
        });
        let db = store.db();
        let refs = db
            .get_cf(handle(&db, cf::REFS).expect("cf"), 10u64.to_be_bytes())
            .expect("read")
            .map(|v| retention::decode_refs(&v).expect("count"));
        assert_eq!(refs, Some(3));
    }

    /// A batch is sorted before it is written; writes to one key must still
    /// apply in the order they were made.
    #[test]
    fn writes_to_one_key_keep_their_order_within_a_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
        let mut b = store.batch();
        store.put_cursor(&mut b, "zed", "phone", 9).expect("put");
        store.put_cursor(&mut b, "amy", "phone", 3).expect("put");
        store.put_cursor(&mut b, "amy", "phone", 5).expect("put");
        store.put_membership(&mut b, "amy", 7, true).expect("put");
        store
            .put_membership(&mut b, "amy", 7, false)
            .expect("delete");
        store
            .put_membership(&mut b, "amy", 8, false)
            .expect("delete");
        store.put_membership(&mut b, "amy", 8, true).expect("put");
        assert_eq!(b.len(), 7);
        store.commit(b).expect("commit");
        assert_eq!(store.cursor("amy", "phone").expect("read"), 5);
        assert_eq!(store.cursor("zed", "phone").expect("read"), 9);
        assert_eq!(store.memberships("amy").expect("read"), vec![8]);
    }

    fn wal_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count()
    }

    /// The WAL can live in its own directory; a database is only ever
    /// opened with the WAL directory it was created with, since anything
    /// else would lose the writes that are only in its WAL.
    #[test]
    fn the_wal_stays_in_its_directory_and_the_database_refuses_any_other() {
        let data = tempfile::tempdir().expect("temp dir");
        let wal = tempfile::tempdir().expect("temp dir");
        let db = data.path().join("db");
        let in_wal = |dir: &Path| StoreOptions {
            wal_dir: Some(dir.to_owned()),
            ..StoreOptions::default()
        };
        {
            let store = Store::open(&db, &in_wal(wal.path())).expect("open");
            let mut b = store.batch();
            store.put_cursor(&mut b, "amy", "phone", 7).expect("put");
            store.commit(b).expect("commit");
        }
        assert!(wal_files(wal.path()) > 0);
        assert_eq!(wal_files(&db), 0);

        let moved = |opts: StoreOptions| match Store::open(&db, &opts) {
            Err(StoreError::WalDirMoved { .. }) => {}
            Err(e) => panic!("expected WalDirMoved, got {e}"),
            Ok(_) => panic!("opened with the WAL elsewhere"),
        };
        moved(StoreOptions::default());
        let other = tempfile::tempdir().expect("temp dir");
        moved(in_wal(other.path()));

        // With its own WAL directory again: the write (never flushed to an
        // SST) is there.
        let store = Store::open(&db, &in_wal(wal.path())).expect("reopen");
        assert_eq!(store.cursor("amy", "phone").expect("read"), 7);
        drop(store);

        // A database made with the WAL inside refuses a WAL directory.
        let plain = tempfile::tempdir().expect("temp dir");
        drop(Store::open(plain.path(), &StoreOptions::default()).expect("open"));
        let elsewhere = tempfile::tempdir().expect("temp dir");
        match Store::open(plain.path(), &in_wal(elsewhere.path())) {
            Err(StoreError::WalDirMoved { .. }) => {}
            Err(e) => panic!("expected WalDirMoved, got {e}"),
            Ok(_) => panic!("opened with the WAL elsewhere"),
        }
    }

    fn opened(dir: &Path, wal_sync: WalSync) -> Store {
        let opts = StoreOptions {
            wal_sync,
            wal_sync_interval: Duration::from_millis(5),
            ..StoreOptions::default()
        };
        Store::open(dir, &opts).expect("open")
    }

    /// The epoch survives a clean shutdown; a run that may have lost
    /// acknowledged commits (dropped without one, as after a crash) changes
    /// it, unless that run synced every commit.
    #[test]
    fn the_inbox_epoch_changes_only_after_a_run_that_may_have_lost_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = opened(dir.path(), WalSync::Interval);
        let first = store.inbox_epoch();
        assert_ne!(first, 0);
        store.mark_clean_shutdown().expect("clean");
        assert!(matches!(
            store.commit(store.batch()),
            Err(StoreError::Closed)
        ));
        drop(store);

        let store = opened(dir.path(), WalSync::Off);
        assert_eq!(store.inbox_epoch(), first, "after a clean shutdown");
        drop(store);
        let store = opened(dir.path(), WalSync::Always);
        let second = store.inbox_epoch();
        assert_ne!(second, first, "after an unclean end of an unsynced run");
        drop(store);
        let store = opened(dir.path(), WalSync::Interval);
        assert_eq!(store.inbox_epoch(), second, "after a synced run's crash");
        drop(store);
        let store = opened(dir.path(), WalSync::Off);
        assert_ne!(store.inbox_epoch(), second, "after an interval run's crash");
    }

    #[test]
    fn an_interval_store_syncs_in_the_background_and_stops_when_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = opened(dir.path(), WalSync::Interval);
        let mut b = store.batch();
        store.put_cursor(&mut b, "amy", "phone", 4).expect("put");
        store.commit(b).expect("commit");
        std::thread::sleep(Duration::from_millis(20));
        drop(store);
        let store = opened(dir.path(), WalSync::Interval);
        assert_eq!(store.cursor("amy", "phone").expect("read"), 4);
    }

    /// A failed commit makes the store refuse writes and report it; the
    /// recovery thread finds the database writable again (here RocksDB was
    /// never stopped, so its probe write succeeds) and the store says so.
    /// A full disk, which does stop RocksDB, is `tests/storage_faults.rs`.
    #[test]
    fn a_failed_commit_is_reported_and_the_recovery_thread_ends_the_outage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = opened(dir.path(), WalSync::Interval);
        let epoch = store.inbox_epoch();
        let health = store.health();
        store.fail_commit.store(true, Ordering::SeqCst);
        let mut b = store.batch();
        store.put_cursor(&mut b, "amy", "phone", 1).expect("put");
        assert!(matches!(store.commit(b), Err(StoreError::ReadOnly)));
        assert!(!store.writable());
        assert_eq!(health.writable.load(Ordering::Relaxed), 0);
        assert_eq!(health.write_failures.load(Ordering::Relaxed), 1);

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !store.writable() {
            assert!(std::time::Instant::now() < deadline, "never recovered");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(health.writable.load(Ordering::Relaxed), 1);
        assert_eq!(health.recoveries.load(Ordering::Relaxed), 1);
        assert_eq!(store.inbox_epoch(), epoch);
        let mut b = store.batch();
        store.put_cursor(&mut b, "amy", "phone", 2).expect("put");
        store.commit(b).expect("commit after recovery");
        assert_eq!(store.cursor("amy", "phone").expect("read"), 2);
    }

    #[test]
    fn wal_sync_modes_parse_and_the_old_boolean_spellings_still_work() {
        for (text, mode) in [
            ("off", WalSync::Off),
            ("false", WalSync::Off),
            ("0", WalSync::Off),
            ("interval", WalSync::Interval),
            ("always", WalSync::Always),
            ("true", WalSync::Always),
            ("on", WalSync::Always),
            ("1", WalSync::Always),
        ] {
            assert_eq!(text.parse::<WalSync>(), Ok(mode), "{text}");
        }
        assert!("sometimes".parse::<WalSync>().is_err());
    }
}
