//! The single-node implementations of [`super`]'s interfaces: this node is
//! home to every partition, ephemeral notices go straight to this node's
//! shards, presence is the registry and the store, and nothing is handed
//! off. Behaviour is exactly what the shards did before the seams existed.
//! The Redis side (`table.rs`, `notices.rs`, `shipper.rs`) keeps the same
//! interfaces.

use std::sync::Arc;

use bytes::Bytes;

use super::{Ephemeral, HandOff, HandOffError, Home, OutboxEntry, Ownership, Partition, Presence};
use crate::hub::mailbox::ShardHandle;
use crate::hub::registry::{ConnRef, Registry};
use crate::store::{Store, StoreError};

/// This node owns every partition, at epoch 0 (no other node ever bid for
/// one, so no epoch was ever raised).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalOwnership;

impl Ownership for LocalOwnership {
    fn home(&self, _partition: Partition) -> Home {
        Home::Local { epoch: 0 }
    }

    // No hash at login: the answer is the same for every partition.
    fn home_of_user(&self, _user: &str) -> Home {
        Home::Local { epoch: 0 }
    }
}

/// Ephemeral notices to this node's shards: recipients are found in the
/// registry (users) or the watchers registry (presence), and each shard
/// gets one mailbox message per notice.
pub struct LocalEphemeral {
    registry: Arc<Registry>,
    watchers: Arc<Registry>,
    shards: Arc<[ShardHandle]>,
}

impl LocalEphemeral {
    pub fn new(
        registry: Arc<Registry>,
        watchers: Arc<Registry>,
        shards: Arc<[ShardHandle]>,
    ) -> Self {
        LocalEphemeral {
            registry,
            watchers,
            shards,
        }
    }

    /// Send one frame to many live connections, one mailbox message per
    /// shard.
    fn push(&self, conns: &[ConnRef], frame: Bytes) {
        if conns.is_empty() {
            return;
        }
        let mut per_shard: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.shards.len()];
        for c in conns {
            if let Some(v) = per_shard.get_mut(usize::from(c.shard)) {
                v.push((c.slot, c.gen));
            }
        }
        for (shard, targets) in self.shards.iter().zip(per_shard) {
            if !targets.is_empty() {
                // Best effort: dropped when that shard is far behind.
                shard.send_ephemeral(targets, frame.clone());
            }
        }
    }
}

impl Ephemeral for LocalEphemeral {
    fn to_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    ) {
        scratch.clear();
        for u in users {
            self.registry.lookup(u, scratch);
        }
        self.push(scratch, frame);
    }

    fn to_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes) {
        let mut conns = Vec::new();
        self.watchers.lookup(user, &mut conns);
        if conns.is_empty() {
            return;
        }
        self.push(&conns, frame());
    }
}

/// Presence from this node's registry (online) and store (last seen).
pub struct LocalPresence {
    registry: Arc<Registry>,
    store: Arc<Store>,
}

impl LocalPresence {
    pub fn new(registry: Arc<Registry>, store: Arc<Store>) -> Self {
        LocalPresence { registry, store }
    }
}

impl Presence for LocalPresence {
    fn is_online(&self, user: &str) -> bool {
        self.registry.is_online(user)
    }

    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError> {
        self.store.presence(user)
    }
}

/// A single node never hands off: every user and group is home here, so
/// no event is bound for another node's inbox and nothing is ever written
/// to an outbox. Present so that the Redis implementation has its place.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalHandOff;

impl HandOff for LocalHandOff {
    fn ship(&self, entries: &[OutboxEntry]) -> Result<(), HandOffError> {
        if entries.is_empty() {
            Ok(())
        } else {
            Err(HandOffError::NoPeers)
        }
    }

    fn acked(&self, _to: u16) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::super::PARTITIONS;
    use super::*;
    use crate::hub::mailbox::ShardMsg;
    use crate::hub::registry::ConnKind;

    #[test]
    fn the_partition_hash_is_stable_across_runs() {
        // Fixed values: a change here moves users between nodes in a
        // running cluster, so it must be deliberate.
        let got: Vec<u16> = ["alice", "bob", "carol", ""]
            .iter()
            .map(|u| Partition::of_user(u).0)
            .collect();
        assert_eq!(got, GOLDEN_USERS);
        assert_eq!(Partition::of_group(1).0, GOLDEN_GROUP_1);
        assert_ne!(
            Partition::of_user("alice"),
            Partition::of_user("alicf"),
            "neighbouring ids should not share a partition"
        );
    }

    const GOLDEN_USERS: [u16; 4] = [3366, 2810, 1231, 1384];
    const GOLDEN_GROUP_1: u16 = 1884;

    #[test]
    fn the_partition_hash_spreads_users_evenly() {
        let per = 100usize;
        let mut counts = vec![0usize; usize::from(PARTITIONS)];
        for i in 0..usize::from(PARTITIONS) * per {
            counts[usize::from(Partition::of_user(&format!("user{i}")).0)] += 1;
        }
        let (min, max) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        // A uniform spread has a standard deviation of 10 around 100:
        // these bounds are over five of them.
        assert!(min >= 50 && max <= 150, "min {min}, max {max}");
    }

    #[test]
    fn a_single_node_owns_everything_at_epoch_0() {
        let o: &dyn Ownership = &LocalOwnership;
        for u in ["alice", "bob", "x"] {
            assert_eq!(o.home_of_user(u), Home::Local { epoch: 0 });
        }
        assert_eq!(o.home_of_group(42), Home::Local { epoch: 0 });
        assert_eq!(o.home(Partition(PARTITIONS - 1)), Home::Local { epoch: 0 });
    }

    #[test]
    fn a_single_node_never_hands_off() {
        let h = LocalHandOff;
        assert_eq!(h.ship(&[]), Ok(()));
        let entry = OutboxEntry {
            to: 1,
            seq: 1,
            payload: Bytes::from_static(b"e"),
        };
        assert_eq!(h.ship(&[entry]), Err(HandOffError::NoPeers));
        assert_eq!(h.acked(1), 0);
    }

    fn conn(shard: u16, slot: u32) -> ConnRef {
        ConnRef {
            shard,
            slot,
            gen: 7,
            kind: ConnKind::Session,
        }
    }

    #[test]
    fn ephemeral_notices_reach_the_local_shards_holding_the_users() {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let shards: Arc<[ShardHandle]> = vec![
            ShardHandle::new(tx0, waker.clone()),
            ShardHandle::new(tx1, waker),
        ]
        .into();
        let registry = Arc::new(Registry::new(4));
        let watchers = Arc::new(Registry::new(4));
        registry.add("alice", conn(0, 1));
        registry.add("bob", conn(1, 2));
        registry.add("bob", conn(1, 3));
        watchers.add("carol", conn(0, 4));
        let e = LocalEphemeral::new(registry, watchers, shards);

        let mut scratch = Vec::new();
        let frame = Bytes::from_static(b"typing");
        e.to_users(
            &mut ["alice", "bob", "nobody"].into_iter(),
            &mut scratch,
            frame.clone(),
        );
        let targets = |rx: &crossbeam_channel::Receiver<ShardMsg>| match rx.try_recv() {
            Ok(ShardMsg::Ephemeral { targets, frame }) => (targets, frame),
            _ => panic!("no ephemeral message"),
        };
        assert_eq!(targets(&rx0), (vec![(1, 7)], frame.clone()));
        assert_eq!(targets(&rx1), (vec![(2, 7), (3, 7)], frame));
        assert!(rx0.is_empty() && rx1.is_empty());

        // Watchers: the frame is built only when someone watches.
        let mut built = 0;
        e.to_watchers("dave", &mut || {
            built += 1;
            Bytes::new()
        });
        assert_eq!(built, 0);
        assert!(rx0.is_empty() && rx1.is_empty());
        e.to_watchers("carol", &mut || {
            built += 1;
            Bytes::from_static(b"presence")
        });
        assert_eq!(built, 1);
        assert_eq!(targets(&rx0).0, vec![(4, 7)]);
        assert!(rx1.is_empty());
    }
}
