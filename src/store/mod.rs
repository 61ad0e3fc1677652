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

pub mod cf;
pub mod keys;

use std::path::Path;

use prost::Message as _;
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteOptions, DB,
};
use swiftlet_protocol::pb;

use keys::InboxEntry;

/// A storage failure. Engine errors are mapped here, in one place.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Engine(#[from] rocksdb::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("missing column family {0}")]
    MissingCf(&'static str),
}

/// Tuning knobs of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync the WAL on every commit. Off, a commit is in the OS page cache
    /// when it returns, which survives a process crash (`kill -9`) but not a
    /// power loss; on, it survives both, at the price of one fsync per group
    /// commit.
    pub wal_sync: bool,
    /// Block cache size in bytes, shared by all column families.
    pub block_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_sync: false,
            block_cache_bytes: 64 << 20,
        }
    }
}

/// The embedded database.
pub struct Store {
    db: DB,
    write_opts: WriteOptions,
}

/// An atomic group of writes. Dropping it unwritten discards it.
#[derive(Default)]
pub struct Batch {
    wb: rocksdb::WriteBatch,
}

/// One page of a user's inbox.
#[derive(Debug, Default)]
pub struct InboxPage {
    pub events: Vec<pb::Event>,
    /// True when the page stopped at `limit` or `max_bytes`, not at the end.
    pub has_more: bool,
}

impl Store {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        let cache = rocksdb::Cache::new_lru_cache(opts.block_cache_bytes);
        let cf_opts = |bloom: bool| {
            let mut bbo = BlockBasedOptions::default();
            bbo.set_block_cache(&cache);
            if bloom {
                // Most dedup lookups are misses (a first send): a bloom filter
                // answers them without touching a data block.
                bbo.set_bloom_filter(10.0, false);
            }
            let mut o = Options::default();
            o.set_block_based_table_factory(&bbo);
            o.set_compression_type(DBCompressionType::Lz4);
            o
        };
        let descriptors = cf::ALL_CFS.iter().map(|name| {
            ColumnFamilyDescriptor::new(*name, cf_opts(*name == cf::DEDUP || *name == cf::CURSORS))
        });
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_compression_type(DBCompressionType::Lz4);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors)?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(opts.wal_sync);
        Ok(Store { db, write_opts })
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    /// Write `batch` atomically; when this returns Ok the batch is in the WAL.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.db.write_opt(batch.wb, &self.write_opts)?;
        Ok(())
    }

    /// A new, empty batch bound to this store's column families.
    pub fn batch(&self) -> Batch {
        Batch::default()
    }

    /// Put a message record into `batch`.
    pub fn put_message(&self, batch: &mut Batch, msg: &pb::Message) -> Result<(), StoreError> {
        batch.wb.put_cf(
            self.cf(cf::MESSAGES)?,
            msg.id.to_be_bytes(),
            msg.encode_to_vec(),
        );
        Ok(())
    }

    /// Put an inbox slot into `batch`.
    pub fn put_inbox(
        &self,
        batch: &mut Batch,
        user: &str,
        seq: u64,
        entry: InboxEntry,
    ) -> Result<(), StoreError> {
        batch.wb.put_cf(
            self.cf(cf::INBOX)?,
            keys::inbox_key(user, seq),
            entry.encode(),
        );
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
        batch.wb.put_cf(
            self.cf(cf::DEDUP)?,
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
        batch.wb.put_cf(
            self.cf(cf::CURSORS)?,
            keys::user_named_key(user, device),
            seq.to_be_bytes(),
        );
        Ok(())
    }

    /// The Ack an earlier send with this `client_msg_id` got, if any.
    pub fn dedup(&self, user: &str, client_msg_id: &str) -> Result<Option<pb::Ack>, StoreError> {
        match self.db.get_pinned_cf(
            self.cf(cf::DEDUP)?,
            keys::user_named_key(user, client_msg_id),
        )? {
            None => Ok(None),
            Some(v) => pb::Ack::decode(&*v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("dedup record: {e}"))),
        }
    }

    /// The device's stored cursor (0 when it never acknowledged anything).
    pub fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(cf::CURSORS)?, keys::user_named_key(user, device))?
        {
            None => Ok(0),
            Some(v) => keys::decode_u64(&v),
        }
    }

    /// The user's newest inbox seq (0 when the inbox is empty).
    pub fn last_seq(&self, user: &str) -> Result<u64, StoreError> {
        let prefix = keys::user_prefix(user);
        let mut it = self.db.raw_iterator_cf(self.cf(cf::INBOX)?);
        it.seek_for_prev(keys::inbox_key(user, u64::MAX));
        it.status()?;
        match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k),
            _ => Ok(0),
        }
    }

    /// The user's oldest inbox seq still stored (0 when the inbox is empty).
    pub fn first_seq(&self, user: &str) -> Result<u64, StoreError> {
        let prefix = keys::user_prefix(user);
        let mut it = self.db.raw_iterator_cf(self.cf(cf::INBOX)?);
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
        let prefix = keys::user_prefix(user);
        let mut upper = prefix.clone();
        // Past every `user ‖ 0x00 ‖ seq` key, before the next user's keys.
        upper.extend_from_slice(&[0xff; 9]);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        let start = keys::inbox_key(user, after.saturating_add(1));
        let iter = self.db.iterator_cf_opt(
            self.cf(cf::INBOX)?,
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

        let messages_cf = self.cf(cf::MESSAGES)?;
        let ids: Vec<_> = slots
            .iter()
            .map(|(_, InboxEntry::Message(id))| (messages_cf, id.to_be_bytes()))
            .collect();
        let values = self.db.multi_get_cf(ids);
        let mut page = InboxPage {
            events: Vec::with_capacity(slots.len()),
            has_more,
        };
        let mut bytes = 0usize;
        for ((seq, InboxEntry::Message(id)), value) in slots.into_iter().zip(values) {
            let raw = value?.ok_or_else(|| {
                StoreError::Corrupt(format!("inbox of {user} references missing message {id}"))
            })?;
            // 16 bytes covers the Event wrapper around each message (tags, seq).
            let cost = raw.len() + 16;
            if !page.events.is_empty() && bytes + cost > max_bytes {
                page.has_more = true;
                break;
            }
            bytes += cost;
            let msg = pb::Message::decode(raw.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("message {id}: {e}")))?;
            page.events.push(pb::Event {
                seq,
                kind: Some(pb::event::Kind::Message(msg)),
            });
        }
        Ok(page)
    }

    /// How many messages are stored (exact count by a scan: for tests and
    /// tools, not for hot paths).
    pub fn count_messages(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self
            .db
            .iterator_cf(self.cf(cf::MESSAGES)?, IteratorMode::Start)
        {
            item?;
            n += 1;
        }
        Ok(n)
    }
}
