//! What the operator's API (`crate::admin`) asks of the store: an online
//! backup (a RocksDB checkpoint), the engine's own figures for `/metrics`,
//! one user's devices and inbox, and the durable token revocations.
//!
//! None of this is on a request's path: the admin thread and a metrics
//! scrape call it, so it may scan a user's keys or read properties that
//! take RocksDB's mutex.
//!
//! # What a backup holds
//!
//! [`Store::checkpoint`] first writes the WAL buffer out and syncs it, then
//! asks RocksDB for a checkpoint, which (the `rust-rocksdb` binding asks
//! with `log_size_for_flush` 0) flushes every column family's memtable to
//! SST files, hard-links the SST files into the target (copies across
//! file systems), copies the live WAL files up to their current size,
//! syncs what it wrote, and renames the directory into place. Every write
//! that returned before the call (every Ack sent before the backup began,
//! whatever `--wal-sync` says: the pipeline acknowledges after
//! `DB::write` returns, and what `write` returned is in the memtable or the
//! WAL) is therefore in the checkpoint. Writes racing the checkpoint may or
//! may not be; the checkpoint is still a consistent point in the WAL
//! order, never a torn batch.
//!
//! The checkpoint holds the run record of a running store, not a clean
//! shutdown, so a server started on it takes a new inbox epoch (see
//! [`Store::inbox_epoch`]): devices whose cursors passed what the backup
//! holds resynchronize instead of waiting for seqs that will be reused.

use std::path::Path;

use rocksdb::statistics::Ticker;
use rocksdb::{properties, Direction, IteratorMode};

use super::{cf, handle, keys, Store, StoreError};

/// RocksDB's own figures, summed over the column families.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineFigures {
    /// Bytes in memtables (active, unflushed and pinned).
    pub memtable_bytes: u64,
    /// Bytes compaction estimates it must rewrite to bring every level
    /// under its target.
    pub pending_compaction_bytes: u64,
    /// Compactions running now.
    pub running_compactions: u64,
    /// Size of the live SST files.
    pub sst_bytes: u64,
    /// Estimated keys, over all column families.
    pub estimated_keys: u64,
    /// 1 while writes are stopped (too many memtables or L0 files, or too
    /// much pending compaction).
    pub writes_stopped: u64,
    /// The rate writes are slowed to, bytes per second (0: not slowed).
    pub delayed_write_rate: u64,
    /// Microseconds writes spent stalled since the store opened.
    pub stall_micros: u64,
    /// Block cache lookups since the store opened.
    pub block_cache_hits: u64,
    pub block_cache_misses: u64,
    /// Bytes in the block cache.
    pub block_cache_bytes: u64,
    /// Memory the open SST files' readers hold outside the block cache
    /// (their index and filter blocks are in the cache, see `engine`).
    pub table_readers_bytes: u64,
}

/// One device of a user as the store has it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceCursor {
    pub device: String,
    /// The highest inbox seq the device acknowledged (durably).
    pub cursor: u64,
}

impl Store {
    /// An online backup: a RocksDB checkpoint of the whole database in
    /// `dir`, which must not exist yet (see the module doc for what it
    /// holds). Safe while the store takes writes.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let db = self.db();
        // Interval and off modes leave the WAL to the kernel: sync it, so
        // the copy the checkpoint makes of it is of data that is on disk
        // here too (the flush below makes it redundant for the memtable's
        // contents; this covers a writable engine only).
        if db.writable {
            db.flush_wal(true)?;
        }
        let cp = rocksdb::checkpoint::Checkpoint::new(&db)?;
        cp.create_checkpoint(dir)?;
        Ok(())
    }

    /// The engine's figures now (see [`EngineFigures`]). Reads properties
    /// and tickers: for a scrape, never for a request.
    pub fn engine_figures(&self) -> EngineFigures {
        let db = self.db();
        let mut f = EngineFigures::default();
        let sum = |name: &std::ffi::CStr| -> u64 {
            cf::ALL_CFS
                .iter()
                .filter_map(|c| handle(&db, c).ok())
                .filter_map(|h| db.property_int_value_cf(h, name).ok().flatten())
                .sum()
        };
        f.memtable_bytes = sum(properties::CUR_SIZE_ALL_MEM_TABLES);
        f.pending_compaction_bytes = sum(properties::ESTIMATE_PENDING_COMPACTION_BYTES);
        f.sst_bytes = sum(properties::LIVE_SST_FILES_SIZE);
        f.estimated_keys = sum(properties::ESTIMATE_NUM_KEYS);
        f.table_readers_bytes = sum(properties::ESTIMATE_TABLE_READERS_MEM);
        let int = |name: &std::ffi::CStr| db.property_int_value(name).ok().flatten().unwrap_or(0);
        f.running_compactions = int(properties::NUM_RUNNING_COMPACTIONS);
        f.writes_stopped = int(properties::IS_WRITE_STOPPED);
        f.delayed_write_rate = int(properties::ACTUAL_DELAYED_WRITE_RATE);
        // One cache is shared by every column family: any one reports it.
        f.block_cache_bytes = handle(&db, cf::INBOX)
            .ok()
            .and_then(|h| {
                db.property_int_value_cf(h, &**properties::BLOCK_CACHE_USAGE)
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        f.stall_micros = db.options.get_ticker_count(Ticker::StallMicros);
        f.block_cache_hits = db.options.get_ticker_count(Ticker::BlockCacheHit);
        f.block_cache_misses = db.options.get_ticker_count(Ticker::BlockCacheMiss);
        f
    }

    /// Every device of `user` that ever acknowledged something, with its
    /// durable cursor (acknowledgements not yet written are in
    /// `crate::cursors`).
    pub fn device_cursors(&self, user: &str) -> Result<Vec<DeviceCursor>, StoreError> {
        let db = self.db();
        let prefix = keys::user_prefix(user);
        let mut out = Vec::new();
        let iter = db.iterator_cf(
            handle(&db, cf::CURSORS)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let Some(device) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push(DeviceCursor {
                device: String::from_utf8_lossy(device).into_owned(),
                cursor: keys::decode_u64(&v)?,
            });
        }
        Ok(out)
    }

    /// How many events `user`'s inbox holds (a scan of its keys: bounded
    /// by retention, and for the admin API only).
    pub fn inbox_len(&self, user: &str) -> Result<u64, StoreError> {
        let db = self.db();
        let prefix = keys::user_prefix(user);
        let mut it = db.raw_iterator_cf(handle(&db, cf::INBOX)?);
        it.seek(&prefix);
        let mut n = 0;
        while it.key().is_some_and(|k| k.starts_with(&prefix)) {
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// Record durably (a synced write) that `user`'s tokens issued before
    /// `before` (seconds since the Unix epoch) are refused.
    pub fn put_revocation(&self, user: &str, before: u64) -> Result<(), StoreError> {
        let db = self.db();
        if !db.writable {
            return Err(StoreError::ReadOnly);
        }
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(
            handle(&db, cf::REVOKED)?,
            user.as_bytes(),
            before.to_be_bytes(),
        );
        db.write_opt(wb, &super::synced())?;
        Ok(())
    }

    /// Every recorded revocation: (user, before).
    pub fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let db = self.db();
        let mut out = Vec::new();
        for item in db.iterator_cf(handle(&db, cf::REVOKED)?, IteratorMode::Start) {
            let (k, v) = item?;
            let user = String::from_utf8(k.to_vec())
                .map_err(|_| StoreError::Corrupt("a revoked user id is not UTF-8".into()))?;
            out.push((user, keys::decode_u64(&v)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn a_checkpoint_opens_with_what_was_written_and_revocations_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).expect("open");
        let mut b = store.batch();
        store
            .put_cursor(&mut b, "alice", "phone", 7)
            .expect("cursor");
        store.commit(b).expect("commit");
        store.put_revocation("alice", 1234).expect("revoke");
        let backup = dir.path().join("backup");
        store.checkpoint(&backup).expect("checkpoint");
        // A second checkpoint into the same place is refused.
        assert!(store.checkpoint(&backup).is_err());
        let figures = store.engine_figures();
        assert!(figures.estimated_keys > 0, "{figures:?}");
        drop(store);
        let copy = Store::open(&backup, &StoreOptions::default()).expect("open the checkpoint");
        let devices = copy.device_cursors("alice").expect("devices");
        assert_eq!(
            devices
                .iter()
                .map(|d| (d.device.as_str(), d.cursor))
                .collect::<Vec<_>>(),
            [("phone", 7)]
        );
        assert_eq!(
            copy.revocations().expect("read"),
            [("alice".to_owned(), 1234)]
        );
        assert_eq!(copy.inbox_len("alice").expect("len"), 0);
    }

    /// The open SST files' index and bloom filter blocks are charged to the
    /// block cache, so its size bounds them (`engine`'s table options):
    /// left to the table readers, the filters alone (10 bits a key here)
    /// grow with the database outside every budget.
    #[test]
    fn sst_index_and_filter_blocks_live_in_the_block_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).expect("open");
        const FILES: u32 = 4;
        const KEYS: u32 = 20_000;
        for file in 0..FILES {
            let mut b = store.batch();
            for i in 0..KEYS {
                b.put(cf::DEDUP, format!("{file:02}-{i:08}"), b"x".to_vec());
            }
            store.commit(b).expect("commit");
            let db = store.db();
            db.flush_cf(handle(&db, cf::DEDUP).expect("family"))
                .expect("flush");
        }
        let f = store.engine_figures();
        let filters = u64::from(FILES * KEYS) * 10 / 8;
        assert!(
            f.table_readers_bytes < filters / 4,
            "the table readers hold {} bytes outside the cache; the filters alone are about {filters}",
            f.table_readers_bytes
        );
        assert!(
            f.block_cache_bytes >= filters / 2,
            "the block cache holds {} bytes: the filters ({filters}) are not in it",
            f.block_cache_bytes
        );
    }

    /// A filter bigger than one shard of the block cache (64 MiB in 64
    /// shards: 1 MiB) could not stay in it, and every lookup read it from
    /// the file again: an SST of a million keys has a 1.2 MB filter, and a
    /// node under a fast sender then spent its shards in `pread`s of it.
    /// Partitioned filters and indexes are cached in small blocks.
    #[test]
    fn a_big_sst_filter_is_read_from_its_file_once_not_at_every_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StoreOptions {
            write_buffer_bytes: 256 << 20,
            memtable_budget_bytes: 0,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("db"), &opts).expect("open");
        let db = store.db();
        let h = handle(&db, cf::DEDUP).expect("family");
        // Two flushed files that overlap, merged by a compaction: its
        // output is not a flushed file, whose filter would stay pinned.
        for half in 0..2u32 {
            let mut b = store.batch();
            for i in (half..1_000_000u32).step_by(2) {
                b.put(cf::DEDUP, i.to_be_bytes().to_vec(), Vec::new());
            }
            store.commit(b).expect("commit");
            db.flush_cf(h).expect("flush");
        }
        db.compact_range_cf(h, None::<&[u8]>, None::<&[u8]>);
        let misses = || db.options.get_ticker_count(Ticker::BlockCacheFilterMiss);
        let before = misses();
        for i in 0..200u32 {
            // Reads of data blocks all over the file fill the cache's
            // shards, the filter's among them.
            let present = (i * 4_999).to_be_bytes();
            assert!(db.get_cf(h, present).expect("get").is_some());
            let absent = (2_000_000 + i).to_be_bytes();
            assert!(db.get_cf(h, absent).expect("get").is_none());
        }
        let missed = misses() - before;
        assert!(
            missed <= 20,
            "200 lookups missed the filter in the block cache {missed} times"
        );
    }
}
