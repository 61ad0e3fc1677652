//! Device cursors on their way to the store.
//!
//! A `DeliveryAck` moves its device's cursor. The shard that reads it does
//! not write the cursor itself: it hands it to the commit pipeline, which
//! writes it in its next group commit, in the same batch as the delivered
//! receipts the acknowledgement implies. That keeps the pipeline the only
//! writer on the hot path: a shard writing cursor batches of its own would
//! join the pipeline's RocksDB write groups, stall its own connections
//! while a large batch is written, and make the committer wait for it
//! whenever it leads a write and is descheduled (2-4 ms waits when shards
//! did so).
//!
//! In between, the cursor is *pending* here, so a login reads
//! acknowledged-but-not-yet-written cursors as well as stored ones:
//! [`Cursors::read`] looks here first, then in the store. A cursor is
//! recorded before the turn that read its `DeliveryAck` writes any answer,
//! and is forgotten only after the group commit that carries it, so at
//! every moment at least one of the two places has it, and the device's
//! next `Welcome` shows it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::store::keys;
use crate::store::{Store, StoreError};

/// Cursors acknowledged and not yet written, keyed by their store key.
pub struct Cursors {
    store: Arc<Store>,
    pending: Mutex<HashMap<Vec<u8>, u64>>,
}

impl Cursors {
    pub fn new(store: Arc<Store>) -> Self {
        Cursors {
            store,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The device's cursor: the pending one if any (it is newer), else the
    /// stored one. The pending map is read first: a cursor that is gone
    /// from it by the time the store is read was written before it left.
    pub fn read(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        let pending = self
            .pending
            .lock()
            .get(&keys::user_named_key(user, device))
            .copied();
        let stored = self.store.cursor(user, device)?;
        Ok(pending.map_or(stored, |p| p.max(stored)))
    }

    /// `up_to` is acknowledged and on its way to the store.
    pub fn begin(&self, user: &str, device: &str, up_to: u64) {
        let mut pending = self.pending.lock();
        let at = pending
            .entry(keys::user_named_key(user, device))
            .or_insert(up_to);
        *at = (*at).max(up_to);
    }

    /// A group commit carrying `up_to` is over (written, or failed and
    /// logged): forget it unless a newer one is pending.
    pub fn done(&self, user: &str, device: &str, up_to: u64) {
        let key = keys::user_named_key(user, device);
        let mut pending = self.pending.lock();
        if pending.get(&key).is_some_and(|at| *at <= up_to) {
            pending.remove(&key);
        }
    }

    /// How many are pending.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn a_pending_cursor_is_read_until_its_commit_is_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("open"));
        let cursors = Cursors::new(store.clone());
        let mut batch = store.batch();
        store
            .put_cursor(&mut batch, "amy", "phone", 3)
            .expect("put");
        store.commit(batch).expect("commit");
        assert_eq!(cursors.read("amy", "phone").expect("read"), 3);

        cursors.begin("amy", "phone", 5);
        cursors.begin("amy", "phone", 4); // an older one never wins
        assert_eq!(cursors.read("amy", "phone").expect("read"), 5);
        assert_eq!(cursors.read("amy", "tablet").expect("read"), 0);

        // The commit of 4 is over; 5 is still on its way.
        cursors.done("amy", "phone", 4);
        assert_eq!(cursors.read("amy", "phone").expect("read"), 5);
        // Written and done: the store has it.
        let mut batch = store.batch();
        store
            .put_cursor(&mut batch, "amy", "phone", 5)
            .expect("put");
        store.commit(batch).expect("commit");
        cursors.done("amy", "phone", 5);
        assert_eq!(cursors.pending(), 0);
        assert_eq!(cursors.read("amy", "phone").expect("read"), 5);
    }
}
