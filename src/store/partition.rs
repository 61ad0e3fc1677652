//! One partition's share of the database, for moving a partition between
//! cluster nodes (`crate::cluster::mover`): which partition each stored
//! row belongs to, reading a partition's rows out, noting the rows written
//! while they are read (the *watch*), writing rows in, and dropping them.
//!
//! Keys are laid out by user and group, not by partition, so a partition's
//! rows are found by a scan of the movable column families; a move is an
//! operator's act, not a hot path. What makes it safe under traffic is the
//! watch: it is set (by the commit pipeline, between two groups) before the
//! scan begins, and [`Store::commit`] notes every key of the watched
//! partition written after that. The scan may read a row in any state; a
//! row written after the watch began is read again, as it stands, when the
//! move freezes the partition (the *tail*). A row neither written after the
//! watch began nor read by the scan cannot exist.
//!
//! Every row has one *authority*, the partition whose home writes it, and
//! some rows are also wanted by another partition's home:
//!
//! | column family | authority | also |
//! | --- | --- | --- |
//! | inbox, dedup, cursors, presence | the user | |
//! | groups, group_log | the group | |
//! | memberships | the group (its home writes them) | |
//! | status, group conversation | the group | |
//! | status, 1:1 conversation `a|b`, row of reader `r` | `r` | the other party (its home keeps a copy for GetReceipts) |
//! | messages | (by reference: copied with the inbox and group-log rows that name them) | |
//!
//! A row is *related* to a partition when that partition is its authority
//! or its "also". A move copies every related row; the receiver keeps its
//! own row where it is the authority (a copy never overwrites the
//! original); a node drops related rows whose authority it is not home to.
//! Messages are never dropped here: one stored message may be named by
//! inboxes of many partitions. Their reference counts (see
//! [`super::retention`]) follow the inbox rows that arrive and leave; a
//! message whose count a departure brings to zero stays stored (the
//! trimmer deletes only what its own trims release).

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use rocksdb::IteratorMode;

use super::keys::{self, InboxEntry};
use super::{cf, handle, Batch, Store, StoreError};
use crate::cluster::Partition;

/// The column families a partition's rows live in, by their index in a
/// [`Record`]. The order is part of the hand-off format: append only.
pub const MOVABLE: [&str; 9] = [
    cf::MESSAGES,
    cf::INBOX,
    cf::DEDUP,
    cf::CURSORS,
    cf::GROUPS,
    cf::MEMBERSHIPS,
    cf::STATUS,
    cf::GROUP_LOG,
    cf::PRESENCE,
];
const MESSAGES: u8 = 0;
const INBOX: u8 = 1;
const GROUP_LOG: u8 = 7;

/// One row: put `value`, or delete the key when it is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Index into [`MOVABLE`].
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Record {
    fn weight(&self) -> usize {
        16 + self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

impl Record {
    /// The user and seq of an inbox row that puts an entry (not a delete).
    pub fn inbox_slot(&self) -> Option<(&str, u64)> {
        if self.cf != INBOX || self.value.is_none() {
            return None;
        }
        let user = user_of(&self.key)?;
        let seq = keys::seq_of_inbox_key(&self.key[..=user.len()], &self.key).ok()?;
        Some((user, seq))
    }
}

/// Whose a row is (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    pub authority: Partition,
    pub also: Option<Partition>,
}

impl Owners {
    fn of(authority: Partition) -> Owners {
        Owners {
            authority,
            also: None,
        }
    }

    pub fn related(&self, p: Partition) -> bool {
        self.authority == p || self.also == Some(p)
    }
}

/// The user before the first NUL of a user-prefixed key.
fn user_of(key: &[u8]) -> Option<&str> {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    std::str::from_utf8(&key[..end]).ok()
}

fn group_of(key: &[u8]) -> Option<u64> {
    key.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// Whose the row with `key` in movable column family `cf` is; None for a
/// message (found by reference) or a key that does not parse.
pub fn owners(cf: u8, key: &[u8]) -> Option<Owners> {
    match MOVABLE.get(usize::from(cf)).copied()? {
        cf::INBOX | cf::DEDUP | cf::CURSORS | cf::PRESENCE => {
            user_of(key).map(|u| Owners::of(Partition::of_user(u)))
        }
        cf::GROUPS | cf::GROUP_LOG => group_of(key).map(|g| Owners::of(Partition::of_group(g))),
        cf::MEMBERSHIPS => {
            let user = user_of(key)?;
            let g = group_of(key.get(user.len() + 1..)?)?;
            Some(Owners::of(Partition::of_group(g)))
        }
        cf::STATUS => match key.split_first()? {
            (b'g', rest) => group_of(rest).map(|g| Owners::of(Partition::of_group(g))),
            (b'u', rest) => {
                // `a '|' b 0x00 reader`: ids hold neither '|' nor NUL.
                let nul = rest.iter().position(|b| *b == 0)?;
                let (pair, reader) = (&rest[..nul], &rest[nul + 1..]);
                let bar = pair.iter().position(|b| *b == b'|')?;
                let (a, b) = (&pair[..bar], &pair[bar + 1..]);
                let other = if reader == a { b } else { a };
                Some(Owners {
                    authority: Partition::of_user(std::str::from_utf8(reader).ok()?),
                    also: Some(Partition::of_user(std::str::from_utf8(other).ok()?)),
                })
            }
            _ => None,
        },
        _ => None,
    }
}

/// The messages a row names: an inbox slot's, a group-log entry's.
fn named_message(cf: u8, key: &[u8], value: &[u8]) -> Option<u64> {
    match cf {
        INBOX => match InboxEntry::decode(value) {
            Ok(InboxEntry::Message(id)) => Some(id),
            _ => None,
        },
        GROUP_LOG => key
            .get(8..16)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes),
        _ => None,
    }
}

/// Keys of one partition written since its watch began.
pub(super) struct Watch {
    partition: Partition,
    keys: HashSet<(u8, Vec<u8>)>,
    /// More keys than [`MAX_WATCHED`] were written: the move must give up
    /// (the partition is too busy to move, or the move took too long).
    overflowed: bool,
}

/// Keys a watch notes at most (a partition is a 4,096th of the users; a
/// move's copy phase takes seconds).
const MAX_WATCHED: usize = 1 << 20;

/// Why a partition's rows could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("no watch is set on partition {0}")]
    NotWatched(u16),
    #[error("more than {MAX_WATCHED} keys of partition {0} were written during the copy")]
    Overflowed(u16),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Begin noting the keys of `p` that commits write (replacing any
    /// other watch: one move at a time per node). Called by the commit
    /// pipeline between groups, so no commit straddles the start.
    pub fn watch(&self, p: Partition) {
        *self.watch.lock() = Some(Watch {
            partition: p,
            keys: HashSet::new(),
            overflowed: false,
        });
        self.watching.store(true, Ordering::Release);
    }

    /// Stop the watch on `p` (a move that gave up), if it is the one set.
    pub fn unwatch(&self, p: Partition) {
        let mut w = self.watch.lock();
        if w.as_ref().is_some_and(|w| w.partition == p) {
            *w = None;
            self.watching.store(false, Ordering::Release);
        }
    }

    /// In [`Store::commit`], while a watch is set: note its partition's keys.
    pub(super) fn note_written<'a>(&self, ops: impl Iterator<Item = (&'static str, &'a [u8])>) {
        let mut guard = self.watch.lock();
        let Some(w) = guard.as_mut() else { return };
        if w.overflowed {
            return;
        }
        for (name, key) in ops {
            let Some(i) = MOVABLE.iter().position(|c| *c == name) else {
                continue;
            };
            let i = i as u8;
            if owners(i, key).is_some_and(|o| o.related(w.partition)) {
                w.keys.insert((i, key.to_vec()));
                if w.keys.len() > MAX_WATCHED {
                    w.overflowed = true;
                    w.keys = HashSet::new();
                    return;
                }
            }
        }
    }

    /// End the watch on `p` and read, as they stand now, the rows written
    /// since it began (with the messages they name): the tail of a move.
    /// Called by the commit pipeline between groups, so nothing is being
    /// written meanwhile.
    pub fn take_tail(&self, p: Partition) -> Result<Vec<Record>, MoveError> {
        let w = {
            let mut guard = self.watch.lock();
            match guard.take() {
                Some(w) if w.partition == p => {
                    self.watching.store(false, Ordering::Release);
                    w
                }
                other => {
                    *guard = other;
                    return Err(MoveError::NotWatched(p.0));
                }
            }
        };
        if w.overflowed {
            return Err(MoveError::Overflowed(p.0));
        }
        let db = self.db();
        let mut out = Vec::with_capacity(w.keys.len());
        let mut messages = HashSet::new();
        for (i, key) in w.keys {
            let value = db
                .get_cf(handle(&db, MOVABLE[usize::from(i)])?, &key)
                .map_err(StoreError::from)?;
            if let Some(id) = value.as_ref().and_then(|v| named_message(i, &key, v)) {
                messages.insert(id);
            }
            out.push(Record { cf: i, key, value });
        }
        self.with_messages(messages, &mut out)?;
        Ok(out)
    }

    fn with_messages(&self, ids: HashSet<u64>, out: &mut Vec<Record>) -> Result<(), StoreError> {
        let db = self.db();
        let h = handle(&db, cf::MESSAGES)?;
        for id in ids {
            let key = id.to_be_bytes().to_vec();
            if let Some(v) = db.get_cf(h, &key)? {
                out.push(Record {
                    cf: MESSAGES,
                    key,
                    value: Some(v),
                });
            }
        }
        Ok(())
    }

    /// Every row related to `p`, with the messages they name, in chunks of
    /// about `chunk_bytes` handed to `f` (a scan of every movable column
    /// family: see the module doc).
    pub fn partition_rows<E: From<StoreError>>(
        &self,
        p: Partition,
        chunk_bytes: usize,
        mut f: impl FnMut(Vec<Record>) -> Result<(), E>,
    ) -> Result<(), E> {
        let db = self.db();
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut messages = HashSet::new();
        for (i, name) in MOVABLE.iter().enumerate().skip(1) {
            let i = i as u8;
            for item in db.iterator_cf(handle(&db, name)?, IteratorMode::Start) {
                let (k, v) = item.map_err(StoreError::from)?;
                if !owners(i, &k).is_some_and(|o| o.related(p)) {
                    continue;
                }
                if let Some(id) = named_message(i, &k, &v) {
                    messages.insert(id);
                }
                let r = Record {
                    cf: i,
                    key: k.into_vec(),
                    value: Some(v.into_vec()),
                };
                bytes += r.weight();
                chunk.push(r);
                if bytes >= chunk_bytes {
                    f(std::mem::take(&mut chunk))?;
                    bytes = 0;
                }
            }
        }
        let mut tail = Vec::new();
        self.with_messages(messages, &mut tail)?;
        for r in tail {
            bytes += r.weight();
            chunk.push(r);
            if bytes >= chunk_bytes {
                f(std::mem::take(&mut chunk))?;
                bytes = 0;
            }
        }
        if !chunk.is_empty() {
            f(chunk)?;
        }
        Ok(())
    }

    /// Put rows another node handed over into `batch`, except where this
    /// node is the authority of a row (`local` says which partitions it is
    /// home to): a copy never overwrites the original. A row of an unknown
    /// column family is refused, whole.
    pub fn put_rows(
        &self,
        batch: &mut Batch,
        rows: Vec<Record>,
        local: impl Fn(Partition) -> bool,
    ) -> Result<usize, StoreError> {
        if let Some(bad) = rows.iter().find(|r| usize::from(r.cf) >= MOVABLE.len()) {
            return Err(StoreError::Corrupt(format!(
                "handed-over row of column family #{}",
                bad.cf
            )));
        }
        let db = self.db();
        let inbox = handle(&db, cf::INBOX)?;
        let mut n = 0;
        for r in rows {
            let name = MOVABLE[usize::from(r.cf)];
            if owners(r.cf, &r.key).is_some_and(|o| local(o.authority)) {
                continue;
            }
            if r.cf == INBOX {
                // The reference counts follow the inbox rows (see
                // `super::retention`).
                let before = db
                    .get_cf(inbox, &r.key)?
                    .and_then(|v| named_message(INBOX, &r.key, &v));
                let after = r
                    .value
                    .as_ref()
                    .and_then(|v| named_message(INBOX, &r.key, v));
                if before != after {
                    if let Some(id) = before {
                        batch.add_refs(id, -1);
                    }
                    if let Some(id) = after {
                        batch.add_refs(id, 1);
                    }
                }
            }
            match r.value {
                Some(v) => batch.put(name, r.key, v),
                None => batch.delete(name, r.key),
            }
            n += 1;
        }
        Ok(n)
    }

    /// Delete the rows related to `p` that no partition home here
    /// (`local`) wants, neither as authority nor as a copy, in batches of
    /// their own: the leftovers of a partition
    /// that moved away, or whatever a node holds of one about to move in.
    /// Returns how many were deleted.
    pub fn drop_rows(
        &self,
        p: Partition,
        local: impl Fn(Partition) -> bool,
    ) -> Result<usize, StoreError> {
        let db = self.db();
        let mut n = 0;
        let mut batch = Batch::default();
        for (i, name) in MOVABLE.iter().enumerate().skip(1) {
            for item in db.iterator_cf(handle(&db, name)?, IteratorMode::Start) {
                let (k, v) = item?;
                let Some(o) = owners(i as u8, &k) else {
                    continue;
                };
                if o.related(p) && !local(o.authority) && !o.also.is_some_and(&local) {
                    if let Some(id) = named_message(i as u8, &k, &v).filter(|_| i as u8 == INBOX) {
                        batch.add_refs(id, -1);
                    }
                    batch.delete(name, k.into_vec());
                    n += 1;
                    if batch.len() >= 10_000 {
                        self.commit(std::mem::take(&mut batch))?;
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.commit(batch)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn idx(name: &str) -> u8 {
        MOVABLE.iter().position(|c| *c == name).expect("movable") as u8
    }

    #[test]
    fn rows_know_their_partitions() {
        let alice = Partition::of_user("alice");
        let bob = Partition::of_user("bob");
        assert_eq!(
            owners(idx(cf::INBOX), &keys::inbox_key("alice", 7)),
            Some(Owners::of(alice))
        );
        assert_eq!(owners(idx(cf::PRESENCE), b"alice"), Some(Owners::of(alice)));
        let g = 0x0100_0000_0000_0000u64; // a NUL inside the id
        assert_eq!(
            owners(idx(cf::GROUP_LOG), &keys::u64_pair(g, 5)),
            Some(Owners::of(Partition::of_group(g)))
        );
        let mut m = keys::user_prefix("bob");
        m.extend_from_slice(&g.to_be_bytes());
        assert_eq!(
            owners(idx(cf::MEMBERSHIPS), &m),
            Some(Owners::of(Partition::of_group(g)))
        );
        let conv = keys::direct_conversation("bob", "alice");
        assert_eq!(
            owners(idx(cf::STATUS), &keys::status_key(&conv, "bob")),
            Some(Owners {
                authority: bob,
                also: Some(alice)
            })
        );
        assert_eq!(
            owners(
                idx(cf::STATUS),
                &keys::status_key(&keys::group_conversation(g), "bob")
            ),
            Some(Owners::of(Partition::of_group(g)))
        );
        assert_eq!(owners(idx(cf::MESSAGES), &5u64.to_be_bytes()), None);
        assert_eq!(owners(200, b"x"), None);
    }

    /// The watch sees what is written after it began, the scan what was
    /// there, and the two together are the partition; a copy lands
    /// elsewhere without overwriting what the receiver is authority of,
    /// and the source drops what it no longer owns.
    #[test]
    fn scan_plus_tail_is_the_partition_and_moves_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Store::open(&dir.path().join("a"), &StoreOptions::default()).expect("open");
        let alice = Partition::of_user("alice");
        let msg = |id: u64| swiftlet_protocol::pb::Message {
            id,
            from_user: "bob".into(),
            to_user: "alice".into(),
            body: bytes::Bytes::from_static(b"hi"),
            ..Default::default()
        };
        let mut b = src.batch();
        src.put_message(&mut b, &msg(1)).expect("put");
        src.put_inbox(&mut b, "alice", 1, InboxEntry::Message(1))
            .expect("put");
        src.put_inbox(&mut b, "bob", 1, InboxEntry::Message(1))
            .expect("put");
        src.put_cursor(&mut b, "alice", "phone", 1).expect("put");
        src.commit(b).expect("commit");

        src.watch(alice);
        let mut copied = Vec::new();
        src.partition_rows::<StoreError>(alice, 64, |c| {
            copied.extend(c);
            Ok(())
        })
        .expect("scan");
        let mut b = src.batch();
        src.put_message(&mut b, &msg(2)).expect("put");
        src.put_inbox(&mut b, "alice", 2, InboxEntry::Message(2))
            .expect("put");
        src.put_cursor(&mut b, "alice", "phone", 2).expect("put");
        src.put_cursor(&mut b, "bob", "phone", 1).expect("put");
        src.commit(b).expect("commit");
        let tail = src.take_tail(alice).expect("tail");
        assert!(tail
            .iter()
            .all(|r| r.cf == MESSAGES || owners(r.cf, &r.key).is_some_and(|o| o.related(alice))));
        assert_eq!(tail.len(), 3, "inbox 2, the cursor, message 2: {tail:?}");
        assert!(matches!(
            src.take_tail(alice),
            Err(MoveError::NotWatched(_))
        ));

        let dst = Store::open(&dir.path().join("b"), &StoreOptions::default()).expect("open");
        let mut b = dst.batch();
        dst.put_rows(&mut b, copied, |_| false).expect("rows");
        dst.put_rows(&mut b, tail, |_| false).expect("rows");
        dst.commit(b).expect("commit");
        assert_eq!(dst.last_seq("alice").expect("seq"), 2);
        assert_eq!(dst.cursor("alice", "phone").expect("cursor"), 2);
        assert!(dst.message(2).expect("read").is_some());
        assert_eq!(dst.last_seq("bob").expect("seq"), 0, "bob stays home");

        let dropped = src.drop_rows(alice, |p| p != alice).expect("drop");
        assert_eq!(dropped, 3);
        assert_eq!(src.last_seq("alice").expect("seq"), 0);
        assert_eq!(src.last_seq("bob").expect("seq"), 1);
        assert!(
            src.message(1).expect("read").is_some(),
            "bob's inbox names it"
        );
    }
}
