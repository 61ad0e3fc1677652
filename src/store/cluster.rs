//! The records a node of a cluster keeps in its own RocksDB, in the
//! [`cf::CLUSTER`] column family. Redis may lose anything; these may not:
//!
//! - `'o' ‖ dest: u16 BE ‖ seq: u64 BE` → an outbox entry: events committed
//!   here for users whose home is node `dest`, written in the same batch as
//!   the events' other effects, deleted once `dest` reports it applied.
//! - `'n' ‖ dest: u16 BE` → `seq: u64 BE`, the newest outbox seq ever given
//!   to `dest` (outbox entries are deleted, the count must not restart).
//! - `'a' ‖ src: u16 BE` → `seq: u64 BE`, the newest entry from node `src`
//!   applied here, written in the batch that applies it.
//! - `'e' ‖ partition: u16 BE` → `node: u16 BE ‖ epoch: u64 BE`, the
//!   newest ownership of a partition this node has seen: it never acts on an
//!   older one, whatever Redis says.

use bytes::Bytes;

use super::{cf, handle, keys, Batch, Store, StoreError};

const OUTBOX: u8 = b'o';
const NEXT: u8 = b'n';
const APPLIED: u8 = b'a';
const EPOCH: u8 = b'e';

fn node_key(tag: u8, node: u16) -> [u8; 3] {
    let n = node.to_be_bytes();
    [tag, n[0], n[1]]
}

fn outbox_key(dest: u16, seq: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[..3].copy_from_slice(&node_key(OUTBOX, dest));
    k[3..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The ownership of one partition as a node recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochRecord {
    pub partition: u16,
    pub node: u16,
    pub epoch: u64,
}

impl EpochRecord {
    fn encode(&self) -> [u8; 10] {
        let mut v = [0u8; 10];
        v[..2].copy_from_slice(&self.node.to_be_bytes());
        v[2..].copy_from_slice(&self.epoch.to_be_bytes());
        v
    }
}

impl Store {
    /// Put outbox entry `seq` for node `dest` into `batch`, and record `seq`
    /// as the newest given to `dest`.
    pub fn put_outbox(&self, batch: &mut Batch, dest: u16, seq: u64, entry: &[u8]) {
        batch.put(cf::CLUSTER, outbox_key(dest, seq), entry.to_vec());
        batch.put(cf::CLUSTER, node_key(NEXT, dest), seq.to_be_bytes());
    }

    /// The newest outbox seq ever given to `dest` (0 if none).
    pub fn outbox_head(&self, dest: u16) -> Result<u64, StoreError> {
        self.cluster_u64(node_key(NEXT, dest))
    }

    /// Outbox entries for `dest` with seq > `after`, oldest first: at most
    /// `limit` of them, and (beyond the first) at most about `max_bytes`.
    pub fn outbox_after(
        &self,
        dest: u16,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let db = self.db();
        let mut it = db.raw_iterator_cf(handle(&db, cf::CLUSTER)?);
        it.seek(outbox_key(dest, after.saturating_add(1)));
        let prefix = node_key(OUTBOX, dest);
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix)
                || out.len() >= limit
                || (bytes >= max_bytes && !out.is_empty())
            {
                break;
            }
            let seq = keys::decode_u64(&k[3..])?;
            bytes += v.len();
            out.push((seq, Bytes::copy_from_slice(v)));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The oldest outbox seq still stored for `dest`, if any.
    pub fn outbox_tail(&self, dest: u16) -> Result<Option<u64>, StoreError> {
        Ok(self.outbox_after(dest, 0, 1, 0)?.first().map(|(s, _)| *s))
    }

    /// Delete `dest`'s outbox entries up to and including `up_to` (they
    /// were applied there). A write of its own, off the commit pipeline:
    /// no one else writes these keys.
    pub fn trim_outbox(&self, dest: u16, up_to: u64) -> Result<(), StoreError> {
        let db = self.db();
        let cf = handle(&db, cf::CLUSTER)?;
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_range_cf(
            cf,
            outbox_key(dest, 0),
            outbox_key(dest, up_to.saturating_add(1)),
        );
        db.write_opt(wb, &self.write_opts)?;
        Ok(())
    }

    /// Every node this node has ever given an outbox seq to.
    pub fn outbox_dests(&self) -> Result<Vec<u16>, StoreError> {
        self.scan_tag(NEXT, |k, _| Ok(u16::from_be_bytes([k[1], k[2]])))
    }

    /// The newest entry from node `src` applied here (0 if none).
    pub fn applied(&self, src: u16) -> Result<u64, StoreError> {
        self.cluster_u64(node_key(APPLIED, src))
    }

    /// Every source with what was applied from it.
    pub fn applied_all(&self) -> Result<Vec<(u16, u64)>, StoreError> {
        self.scan_tag(APPLIED, |k, v| {
            Ok((u16::from_be_bytes([k[1], k[2]]), keys::decode_u64(v)?))
        })
    }

    /// Record in `batch` that entries from `src` are applied up to `seq`.
    pub fn put_applied(&self, batch: &mut Batch, src: u16, seq: u64) {
        batch.put(cf::CLUSTER, node_key(APPLIED, src), seq.to_be_bytes());
    }

    /// Every partition's ownership as this node last recorded it.
    pub fn epochs(&self) -> Result<Vec<EpochRecord>, StoreError> {
        self.scan_tag(EPOCH, |k, v| {
            if v.len() != 10 {
                return Err(StoreError::Corrupt(format!(
                    "epoch value of {} bytes",
                    v.len()
                )));
            }
            Ok(EpochRecord {
                partition: u16::from_be_bytes([k[1], k[2]]),
                node: u16::from_be_bytes([v[0], v[1]]),
                epoch: keys::decode_u64(&v[2..])?,
            })
        })
    }

    /// Record an ownership in `batch`, with what made it (a partition
    /// handed over or taken over): the two stand or fall together.
    pub fn put_epoch(&self, batch: &mut Batch, r: EpochRecord) {
        batch.put(cf::CLUSTER, node_key(EPOCH, r.partition), r.encode());
    }

    /// Record ownerships (synced: a node must not forget an epoch it acted
    /// on, even after a power loss).
    pub fn put_epochs(&self, records: &[EpochRecord]) -> Result<(), StoreError> {
        let db = self.db();
        let cf = handle(&db, cf::CLUSTER)?;
        let mut wb = rocksdb::WriteBatch::default();
        for r in records {
            wb.put_cf(cf, node_key(EPOCH, r.partition), r.encode());
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        db.write_opt(wb, &opts)?;
        Ok(())
    }

    fn cluster_u64(&self, key: [u8; 3]) -> Result<u64, StoreError> {
        let db = self.db();
        let found = db.get_pinned_cf(handle(&db, cf::CLUSTER)?, key)?;
        match found {
            None => Ok(0),
            Some(v) => keys::decode_u64(&v),
        }
    }

    /// Every `tag ‖ u16` record, decoded by `f(key, value)`.
    fn scan_tag<T>(
        &self,
        tag: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let db = self.db();
        let mut it = db.raw_iterator_cf(handle(&db, cf::CLUSTER)?);
        it.seek([tag]);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.first() != Some(&tag) {
                break;
            }
            if k.len() != 3 {
                return Err(StoreError::Corrupt(format!(
                    "cluster key of {} bytes",
                    k.len()
                )));
            }
            out.push(f(k, v)?);
            it.next();
        }
        it.status()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn outbox_survives_reopen_and_trims_by_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
            let mut b = store.batch();
            for seq in 1..=5 {
                store.put_outbox(&mut b, 7, seq, format!("e{seq}").as_bytes());
            }
            store.put_outbox(&mut b, 9, 1, b"x");
            store.put_applied(&mut b, 3, 42);
            store.commit(b).expect("commit");
            store.trim_outbox(7, 2).expect("trim");
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("reopen");
        assert_eq!(store.outbox_head(7).expect("head"), 5);
        let left: Vec<u64> = store
            .outbox_after(7, 0, 100, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![3, 4, 5]);
        assert_eq!(store.outbox_after(7, 3, 1, 0).expect("read")[0].0, 4);
        assert_eq!(store.outbox_tail(9).expect("tail"), Some(1));
        assert_eq!(store.outbox_dests().expect("dests"), vec![7, 9]);
        assert_eq!(store.applied(3).expect("applied"), 42);
        assert_eq!(store.applied(4).expect("applied"), 0);
        store
            .put_epochs(&[EpochRecord {
                partition: 12,
                node: 2,
                epoch: 5,
            }])
            .expect("epochs");
        assert_eq!(
            store.epochs().expect("epochs"),
            vec![EpochRecord {
                partition: 12,
                node: 2,
                epoch: 5
            }]
        );
    }
}
