//! Device cursors and delivered receipts between a `DeliveryAck` and the
//! store: coalesced per device and per user in memory, written in bulk.
//!
//! A `DeliveryAck` used to cost a write of its own: a command to the commit
//! pipeline, a cursor row, a watermark read and write, a receipt event and
//! its push to the sender (who acknowledged that too). That made
//! acknowledging cost the server more than delivering (issue 16). Here an
//! acknowledgement only raises numbers in memory ([`Cursors::acknowledge`]):
//! the device's cursor, and per conversation the newest message id it
//! covers with the senders to tell. The pipeline takes what is due in its
//! group commits ([`Cursors::take`]) and writes each user's delivered
//! receipts and cursors together, so a device that acknowledges every
//! message costs one cursor row per [`CURSOR_DELAY`] and a conversation one
//! receipt per [`RECEIPT_DELAY`], however many messages they cover.
//!
//! Two delays, because two things wait here. A 1:1 delivered receipt is
//! news for a sender, who shows it (✓✓): it is written after
//! [`RECEIPT_DELAY`]. A cursor, and a group's delivered mark (no event,
//! only `GetReceipts` reads it), matter only after a reconnect or a crash:
//! they wait [`CURSOR_DELAY`]. What is due is taken at most
//! [`TAKE_PER_GROUP`] users per group commit (more while the backlog is
//! long), so a thousand devices acknowledging at the same moment are written
//! over a few commits rather than in one burst in front of the next post.
//!
//! The guarantees, and why they hold:
//! - **A login sees every acknowledged cursor**: [`Cursors::read`] takes
//!   the newer of the pending and the stored one. A cursor stays here from
//!   its `DeliveryAck` until a group commit carrying it (or a newer one) has
//!   been written, and the pending map is read before the store, so at every
//!   moment at least one of the two has it.
//! - **After a crash, a replay, never a skip**: a cursor is only ever set to
//!   a seq its device acknowledged, and only after the events it covers were
//!   written (a device can only acknowledge what it was pushed, and nothing
//!   is pushed before it is durable). A `kill -9` loses at most the last
//!   [`CURSOR_DELAY`] of cursors: those devices resume from the older stored
//!   cursor and see those events again, which the protocol allows (section
//!   7). A clean shutdown writes everything pending first
//!   ([`crate::commit::CommitHandle::flush`]).
//! - **A cursor is never written before the receipts it implies**: a user's
//!   receipts are taken with (or before) its cursors and go into the same
//!   batch, so a crash cannot keep a cursor whose receipts were lost (the
//!   device would never acknowledge those messages again). Receipts written
//!   before their cursor are harmless: after a crash the device acknowledges
//!   again, and the watermark filters out what was already told.
//! - **Bounded**: an entry per device that acknowledged within the last
//!   delay, and per user one entry per conversation with news; idle devices
//!   cost nothing here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use swiftlet_protocol::pb::conversation;

use crate::commit::{merge_delivered, DeliveredConv};
use crate::store::{Store, StoreError};

/// How long a 1:1 delivered receipt waits to be coalesced with the next
/// acknowledgements in its conversation.
pub const RECEIPT_DELAY: Duration = Duration::from_millis(50);
/// How long a cursor (and a group's delivered mark) waits to be coalesced
/// with the device's next acknowledgements.
pub const CURSOR_DELAY: Duration = Duration::from_millis(1000);
/// Users whose due cursors and receipts one group commit takes, at least.
pub const TAKE_PER_GROUP: usize = 64;

/// What the pipeline writes for one user: its devices' cursors (possibly
/// none: only receipts were due) and its delivered receipts.
#[derive(Debug)]
pub struct Due {
    pub user: Arc<str>,
    pub cursors: Vec<(Arc<str>, u64)>,
    pub convs: Vec<DeliveredConv>,
}

/// One device's cursor while it is pending.
struct Device {
    device: Arc<str>,
    /// The highest seq acknowledged.
    acked: u64,
    /// The highest seq in a batch that was written.
    written: u64,
}

/// One user's pending cursors and receipts.
#[derive(Default)]
struct User {
    devices: Vec<Device>,
    convs: Vec<DeliveredConv>,
    /// In [`Inner::lazy`]: something of this user is unwritten.
    in_lazy: bool,
    /// In [`Inner::fast`]: a 1:1 receipt of this user is unwritten.
    in_fast: bool,
}

#[derive(Default)]
struct Inner {
    users: HashMap<Arc<str>, User>,
    /// Users with a 1:1 receipt to write, oldest first, with when it came.
    fast: VecDeque<(Instant, Arc<str>)>,
    /// Users with anything to write, oldest first, with when it came.
    lazy: VecDeque<(Instant, Arc<str>)>,
}

/// Acknowledged cursors and delivered receipts not yet written.
pub struct Cursors {
    store: Arc<Store>,
    inner: Mutex<Inner>,
    /// A shard asked for a group commit to write what is due, and the
    /// pipeline has not taken it yet (so the other shards need not ask).
    requested: AtomicBool,
    /// When the oldest entry of either queue is due, in microseconds after
    /// `base` (`u64::MAX`: nothing queued). Changed under the lock, read
    /// without it: the shards look at it every turn.
    next_due: AtomicU64,
    base: Instant,
}

impl Cursors {
    pub fn new(store: Arc<Store>) -> Self {
        Cursors {
            store,
            inner: Mutex::new(Inner::default()),
            requested: AtomicBool::new(false),
            next_due: AtomicU64::new(u64::MAX),
            base: Instant::now(),
        }
    }

    /// `t` in microseconds after `base`.
    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    /// Set [`Cursors::next_due`] from the fronts of the queues (under the
    /// lock).
    fn reset_next_due(&self, inner: &Inner) {
        let fast = inner.fast.front().map(|(at, _)| *at + RECEIPT_DELAY);
        let lazy = inner.lazy.front().map(|(at, _)| *at + CURSOR_DELAY);
        let due = match (fast, lazy) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.next_due
            .store(due.map_or(u64::MAX, |d| self.micros(d)), Ordering::Relaxed);
    }

    /// The device's cursor: the pending one if any (it is newer), else the
    /// stored one. The pending map is read first: a cursor that is gone
    /// from it by the time the store is read was written before it left.
    pub fn read(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        let pending = self.inner.lock().users.get(user).and_then(|u| {
            u.devices
                .iter()
                .find(|d| &*d.device == device)
                .map(|d| d.acked)
        });
        let stored = self.store.cursor(user, device)?;
        Ok(pending.map_or(stored, |p| p.max(stored)))
    }

    /// The devices of `user` with a cursor acknowledged and not yet
    /// written, and that cursor (for listings that read the store too).
    pub fn pending(&self, user: &str) -> Vec<(Arc<str>, u64)> {
        self.inner
            .lock()
            .users
            .get(user)
            .map_or_else(Vec::new, |u| {
                u.devices
                    .iter()
                    .map(|d| (d.device.clone(), d.acked))
                    .collect()
            })
    }

    /// `device` of `user` acknowledged its inbox up to `up_to`, which
    /// covers `convs` (see [`crate::commit::summarize_delivered`]).
    pub fn acknowledge(
        &self,
        user: &Arc<str>,
        device: &Arc<str>,
        up_to: u64,
        convs: Vec<DeliveredConv>,
        now: Instant,
    ) {
        let direct = convs
            .iter()
            .any(|c| matches!(c.seen_as.kind, Some(conversation::Kind::User(_))));
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let u = match inner.users.get_mut(&**user) {
            Some(u) => u,
            None => inner.users.entry(user.clone()).or_default(),
        };
        match u.devices.iter_mut().find(|d| d.device == *device) {
            Some(d) => d.acked = d.acked.max(up_to),
            None => u.devices.push(Device {
                device: device.clone(),
                acked: up_to,
                written: 0,
            }),
        }
        merge_delivered(&mut u.convs, convs);
        if !u.in_lazy {
            u.in_lazy = true;
            inner.lazy.push_back((now, user.clone()));
            self.next_due
                .fetch_min(self.micros(now + CURSOR_DELAY), Ordering::Relaxed);
        }
        if direct && !u.in_fast {
            u.in_fast = true;
            inner.fast.push_back((now, user.clone()));
            self.next_due
                .fetch_min(self.micros(now + RECEIPT_DELAY), Ordering::Relaxed);
        }
    }

    /// Whether something is due at `now` and no group commit was asked for
    /// it yet: the caller then asks for one (and this returns false to the
    /// others until the pipeline has taken what is due).
    pub fn wants_commit(&self, now: Instant) -> bool {
        if self.requested.load(Ordering::Relaxed)
            || self.micros(now) < self.next_due.load(Ordering::Relaxed)
        {
            return false;
        }
        !self.requested.swap(true, Ordering::Relaxed)
    }

    /// Take what is due at `now` (everything, with `all`): for a bounded
    /// number of users, their receipts, and their cursors when those are
    /// due. The caller writes them in one batch and then calls
    /// [`Cursors::done`] with them. Unless `all`, a lock held by a shard
    /// recording an acknowledgement is not waited for (the committer would
    /// hold up every request of its group, and that shard may have been
    /// descheduled on a busy machine): nothing is taken this time, and a
    /// shard asks again for a commit.
    pub fn take(&self, now: Instant, all: bool) -> Vec<Due> {
        self.requested.store(false, Ordering::Relaxed);
        let inner = if all {
            Some(self.inner.lock())
        } else {
            self.inner.try_lock()
        };
        let Some(mut inner) = inner else {
            return Vec::new();
        };
        let inner = &mut *inner;
        let backlog = inner.lazy.len();
        let max = if all {
            usize::MAX
        } else {
            TAKE_PER_GROUP.max(backlog / 16)
        };
        let mut out: Vec<Due> = Vec::new();
        let due =
            |at: &Instant, delay: Duration| all || now.saturating_duration_since(*at) >= delay;
        // Cursors first (with the receipts of their users), then receipts.
        while out.len() < max {
            match inner.lazy.front() {
                Some((at, _)) if due(at, CURSOR_DELAY) => {}
                _ => break,
            }
            let Some((_, user)) = inner.lazy.pop_front() else {
                break;
            };
            let Some(u) = inner.users.get_mut(&user) else {
                continue;
            };
            u.in_lazy = false;
            // Taken in the fast queue too: its entry there finds nothing.
            out.push(Due {
                cursors: u
                    .devices
                    .iter()
                    .filter(|d| d.acked > d.written)
                    .map(|d| (d.device.clone(), d.acked))
                    .collect(),
                convs: std::mem::take(&mut u.convs),
                user,
            });
        }
        while out.len() < max {
            match inner.fast.front() {
                Some((at, _)) if due(at, RECEIPT_DELAY) => {}
                _ => break,
            }
            let Some((_, user)) = inner.fast.pop_front() else {
                break;
            };
            let Some(u) = inner.users.get_mut(&user) else {
                continue;
            };
            u.in_fast = false;
            if u.convs.is_empty() {
                continue;
            }
            out.push(Due {
                cursors: Vec::new(),
                convs: std::mem::take(&mut u.convs),
                user,
            });
        }
        self.reset_next_due(inner);
        out
    }

    /// The batch carrying `taken` was written (`written`), or failed: then
    /// its cursors stay pending and are taken again after
    /// [`CURSOR_DELAY`]; its receipts are dropped, as a failed write drops
    /// every request of its group (the next acknowledgement in each
    /// conversation moves the watermark past them). A device whose cursor
    /// is written and not acknowledged further since is forgotten.
    pub fn done(&self, taken: Vec<Due>, written: bool, now: Instant) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        for t in taken {
            let Some(u) = inner.users.get_mut(&t.user) else {
                continue;
            };
            if written {
                for (device, up_to) in &t.cursors {
                    if let Some(d) = u.devices.iter_mut().find(|d| d.device == *device) {
                        d.written = d.written.max(*up_to);
                    }
                }
                u.devices.retain(|d| d.acked > d.written);
            } else if !u.in_lazy {
                u.in_lazy = true;
                inner.lazy.push_back((now, t.user.clone()));
            }
            if u.devices.is_empty() && u.convs.is_empty() && !u.in_lazy {
                inner.users.remove(&t.user);
            }
        }
        if !written {
            self.reset_next_due(inner);
        }
    }

    /// How many users have something pending.
    #[cfg(test)]
    fn pending_users(&self) -> usize {
        self.inner.lock().users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys;
    use crate::store::StoreOptions;
    use swiftlet_protocol::pb;

    fn harness() -> (tempfile::TempDir, Arc<Store>, Cursors) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("open"));
        let cursors = Cursors::new(store.clone());
        (dir, store, cursors)
    }

    fn conv(user: &str, peer: &str, newest: u64) -> DeliveredConv {
        DeliveredConv {
            key: keys::direct_conversation(user, peer),
            seen_as: pb::Conversation {
                kind: Some(conversation::Kind::User(user.to_owned())),
            },
            newest,
            senders: vec![peer.to_owned()],
        }
    }

    fn group(id: u64, newest: u64) -> DeliveredConv {
        DeliveredConv {
            key: keys::group_conversation(id),
            seen_as: pb::Conversation {
                kind: Some(conversation::Kind::GroupId(id)),
            },
            newest,
            senders: vec!["carol".to_owned()],
        }
    }

    /// Write what `take` gave, as the pipeline does.
    fn write(store: &Store, cursors: &Cursors, taken: Vec<Due>, now: Instant) {
        let mut batch = store.batch();
        for t in &taken {
            for (device, up_to) in &t.cursors {
                store
                    .put_cursor(&mut batch, &t.user, device, *up_to)
                    .expect("put");
            }
        }
        store.commit(batch).expect("commit");
        cursors.done(taken, true, now);
    }

    #[test]
    fn a_pending_cursor_is_read_until_its_batch_is_written() {
        let (_dir, store, cursors) = harness();
        let t0 = Instant::now();
        let (amy, phone) = (Arc::from("amy"), Arc::from("phone"));
        let mut batch = store.batch();
        store
            .put_cursor(&mut batch, "amy", "phone", 3)
            .expect("put");
        store.commit(batch).expect("commit");
        assert_eq!(cursors.read("amy", "phone").expect("read"), 3);

        cursors.acknowledge(&amy, &phone, 5, Vec::new(), t0);
        cursors.acknowledge(&amy, &phone, 4, Vec::new(), t0); // an older one never wins
        assert_eq!(cursors.read("amy", "phone").expect("read"), 5);
        assert_eq!(cursors.read("amy", "tablet").expect("read"), 0);

        // Not due yet: nothing to take, nothing asked for.
        assert!(!cursors.wants_commit(t0));
        assert!(cursors.take(t0, false).is_empty());
        let later = t0 + CURSOR_DELAY;
        assert!(cursors.wants_commit(later));
        assert!(!cursors.wants_commit(later), "asked once until taken");
        let taken = cursors.take(later, false);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].cursors, vec![(phone.clone(), 5)]);
        // Acknowledged further while the batch is on its way.
        cursors.acknowledge(&amy, &phone, 7, Vec::new(), later);
        write(&store, &cursors, taken, later);
        assert_eq!(store.cursor("amy", "phone").expect("read"), 5);
        assert_eq!(cursors.read("amy", "phone").expect("read"), 7);
        write(&store, &cursors, cursors.take(later, true), later);
        assert_eq!(cursors.pending_users(), 0, "written and forgotten");
        assert_eq!(cursors.read("amy", "phone").expect("read"), 7);
    }

    #[test]
    fn a_failed_write_keeps_the_cursor_pending_and_takes_it_again() {
        let (_dir, store, cursors) = harness();
        let t0 = Instant::now();
        let (amy, phone) = (Arc::from("amy"), Arc::from("phone"));
        cursors.acknowledge(&amy, &phone, 5, Vec::new(), t0);
        let taken = cursors.take(t0, true);
        cursors.done(taken, false, t0);
        assert_eq!(cursors.read("amy", "phone").expect("read"), 5);
        assert!(cursors.take(t0, false).is_empty(), "not due again yet");
        let taken = cursors.take(t0 + CURSOR_DELAY, false);
        assert_eq!(taken[0].cursors, vec![(phone, 5)]);
        write(&store, &cursors, taken, t0);
        assert_eq!(cursors.pending_users(), 0);
        assert_eq!(store.cursor("amy", "phone").expect("read"), 5);
    }

    #[test]
    fn receipts_are_coalesced_per_conversation_and_direct_ones_go_first() {
        let (_dir, store, cursors) = harness();
        let t0 = Instant::now();
        let (bob, phone, tablet) = (Arc::from("bob"), Arc::from("phone"), Arc::from("tablet"));
        cursors.acknowledge(&bob, &phone, 1, vec![conv("bob", "alice", 10)], t0);
        cursors.acknowledge(&bob, &tablet, 2, vec![conv("bob", "alice", 11)], t0);
        cursors.acknowledge(&bob, &phone, 3, vec![group(7, 12)], t0);
        // The 1:1 receipt is due first, alone: one per conversation, the
        // newest id; the cursors wait.
        let taken = cursors.take(t0 + RECEIPT_DELAY, false);
        assert_eq!(taken.len(), 1);
        assert!(taken[0].cursors.is_empty());
        let newest: Vec<u64> = taken[0].convs.iter().map(|c| c.newest).collect();
        assert_eq!(newest, vec![11, 12], "alice's and the group's, coalesced");
        write(&store, &cursors, taken, t0);
        assert_eq!(cursors.read("bob", "phone").expect("read"), 3);
        // Then the cursors, with nothing more to tell.
        let taken = cursors.take(t0 + CURSOR_DELAY, false);
        assert_eq!(taken.len(), 1);
        let mut c = taken[0].cursors.clone();
        c.sort();
        assert_eq!(c, vec![(phone, 3), (tablet, 2)]);
        assert!(taken[0].convs.is_empty());
        write(&store, &cursors, taken, t0);
        assert_eq!(cursors.pending_users(), 0);
    }

    #[test]
    fn many_due_at_once_are_taken_a_bounded_number_per_group() {
        let (_dir, store, cursors) = harness();
        let t0 = Instant::now();
        let phone: Arc<str> = Arc::from("phone");
        let n = 3 * TAKE_PER_GROUP;
        for i in 0..n {
            cursors.acknowledge(&Arc::from(format!("u{i}")), &phone, 1, Vec::new(), t0);
        }
        let later = t0 + CURSOR_DELAY;
        let mut groups = 0;
        loop {
            let taken = cursors.take(later, false);
            if taken.is_empty() {
                break;
            }
            assert!(taken.len() <= TAKE_PER_GROUP);
            groups += 1;
            write(&store, &cursors, taken, later);
        }
        assert_eq!(groups, 3);
        assert_eq!(cursors.pending_users(), 0);
        assert_eq!(store.cursor("u7", "phone").expect("read"), 1);
    }
}
