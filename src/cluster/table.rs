//! A cluster node's view of who is home where, and whether it may write:
//! the [`Ownership`] the shards and the pipeline ask, answered from memory.
//!
//! The coordinator thread (`coordinator.rs`) is its only writer: it sets a
//! partition's home only to an epoch at least as new as the one recorded
//! in this node's RocksDB (so a Redis that lost an update cannot move
//! ownership backwards), keeps the other nodes' addresses and liveness, and
//! extends [`Table::lease_until`] after each renewal of this node's lease.
//! Past that instant the node is *fenced*: [`Ownership::writable`] is
//! false and the pipeline refuses every write, because another node may
//! by then have been given its partitions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use swiftlet_protocol::pb;

use super::{Home, Ownership, Partition, PARTITIONS};

/// A partition no one has been given (the cluster is not initialized, or
/// Redis lost the map and its home has not restored it yet).
const UNKNOWN: u64 = u64::MAX;
const EPOCH_BITS: u32 = 48;

fn pack(node: u16, epoch: u64) -> u64 {
    (u64::from(node) << EPOCH_BITS) | (epoch & ((1 << EPOCH_BITS) - 1))
}

fn unpack(v: u64) -> Option<(u16, u64)> {
    (v != UNKNOWN).then_some(((v >> EPOCH_BITS) as u16, v & ((1 << EPOCH_BITS) - 1)))
}

/// Another node as this one last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub tcp: String,
    pub http: String,
    /// It held its lease at the last look.
    pub alive: bool,
}

/// The ownership table (see the module doc).
pub struct Table {
    me: u16,
    homes: Box<[AtomicU64]>,
    base: Instant,
    /// Milliseconds after `base` until which this node may write.
    lease_until: AtomicU64,
    peers: RwLock<HashMap<u16, Peer>>,
    /// Set when the pipeline changed a home (a partition move): the
    /// coordinator then writes what this node knows back to Redis.
    changed: AtomicBool,
}

impl Table {
    /// A table for node `me` that knows no homes and holds no lease.
    pub fn new(me: u16) -> Table {
        Table {
            me,
            homes: (0..PARTITIONS).map(|_| AtomicU64::new(UNKNOWN)).collect(),
            base: Instant::now(),
            lease_until: AtomicU64::new(0),
            peers: RwLock::new(HashMap::new()),
            changed: AtomicBool::new(false),
        }
    }

    pub fn me(&self) -> u16 {
        self.me
    }

    /// The recorded home of `p`, if any: (node, epoch).
    pub fn get(&self, p: u16) -> Option<(u16, u64)> {
        self.homes
            .get(usize::from(p))
            .and_then(|h| unpack(h.load(Ordering::Acquire)))
    }

    /// Set the home of `p` (the coordinator has checked the epoch).
    pub fn set(&self, p: u16, node: u16, epoch: u64) {
        if let Some(h) = self.homes.get(usize::from(p)) {
            h.store(pack(node, epoch), Ordering::Release);
        }
    }

    /// Whether the pipeline changed a home since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::AcqRel)
    }

    /// How many partitions each node is home to.
    pub fn counts(&self) -> HashMap<u16, usize> {
        let mut m = HashMap::new();
        for p in 0..PARTITIONS {
            if let Some((n, _)) = self.get(p) {
                *m.entry(n).or_insert(0) += 1;
            }
        }
        m
    }

    /// This node may write until `at` (the renewal that granted it was
    /// sent at `at - lease`).
    pub fn extend_lease(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.base).as_millis() as u64;
        self.lease_until.fetch_max(ms, Ordering::AcqRel);
    }

    /// Give up the lease now (Redis lost it, or shutdown).
    pub fn drop_lease(&self) {
        self.lease_until.store(0, Ordering::Release);
    }

    /// How long this node may still write (zero when fenced).
    pub fn lease_left(&self) -> Duration {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64;
        Duration::from_millis(self.lease_until.load(Ordering::Acquire).saturating_sub(now))
    }

    pub fn set_peers(&self, peers: HashMap<u16, Peer>) {
        *self.peers.write() = peers;
    }

    pub fn peers(&self) -> HashMap<u16, Peer> {
        self.peers.read().clone()
    }

    /// Whether node `n` held its lease at the last look.
    pub fn alive(&self, n: u16) -> bool {
        n == self.me || self.peers.read().get(&n).is_some_and(|p| p.alive)
    }
}

impl Ownership for Table {
    fn home(&self, partition: Partition) -> Home {
        match self.get(partition.0) {
            Some((n, epoch)) if n == self.me => Home::Local { epoch },
            Some((node, epoch)) => Home::Remote { node, epoch },
            None => Home::Unknown,
        }
    }

    fn writable(&self) -> bool {
        !self.lease_left().is_zero()
    }

    fn redirect(&self, node: u16) -> Option<pb::Redirect> {
        let peers = self.peers.read();
        let p = peers.get(&node).filter(|p| p.alive)?;
        Some(pb::Redirect {
            node_id: u32::from(node),
            tcp_addr: p.tcp.clone(),
            http_addr: p.http.clone(),
        })
    }

    fn set_home(&self, partition: Partition, home: Home) {
        match home {
            Home::Local { epoch } => self.set(partition.0, self.me, epoch),
            Home::Remote { node, epoch } => self.set(partition.0, node, epoch),
            Home::Unknown => {}
        }
        self.changed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_pack_and_fencing_follows_the_lease() {
        let t = Table::new(2);
        let p = Partition::of_user("alice");
        assert_eq!(t.home(p), Home::Unknown);
        t.set(p.0, 2, 7);
        assert_eq!(t.home(p), Home::Local { epoch: 7 });
        t.set(p.0, 3, (1 << 40) + 1);
        assert_eq!(
            t.home(p),
            Home::Remote {
                node: 3,
                epoch: (1 << 40) + 1
            }
        );
        assert!(!t.writable(), "no lease yet");
        t.extend_lease(Instant::now() + Duration::from_secs(5));
        assert!(t.writable());
        t.drop_lease();
        assert!(!t.writable());
        assert_eq!(t.redirect(3), None, "an unknown node is no redirect");
        t.set_peers(HashMap::from([(
            3,
            Peer {
                tcp: "127.0.0.1:1".into(),
                http: "127.0.0.1:2".into(),
                alive: true,
            },
        )]));
        assert_eq!(t.redirect(3).map(|r| r.node_id), Some(3));
    }
}
