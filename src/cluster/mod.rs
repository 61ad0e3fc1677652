//! What crosses nodes, as four narrow interfaces: who owns a partition
//! ([`Ownership`]), notices that may be lost ([`Ephemeral`]), who is online
//! and when they were last seen ([`Presence`]), and the durable hand-off of
//! committed events to another node ([`HandOff`]).
//!
//! Each trait's doc states what it guarantees, the way centrifuge's
//! `broker.go` and `presence.go` do: what may be lost, what is ordered, what
//! is idempotent. An implementation may do better, never worse; callers rely
//! on nothing more.
//!
//! Two implementations sit side by side. `local.rs`, a single node: it owns
//! every partition, ephemeral notices go straight to its shards, presence
//! is the registry and the store, and nothing is ever handed off. The Redis
//! side, for a node started with `--cluster`: [`table`] (ownership and the
//! lease), [`notices`] (ephemeral and presence over pub/sub), [`shipper`]
//! (the hand-off), run by [`coordinator`] with [`applier`]. [`redis`] is the
//! only module that imports the Redis client (as only [`crate::store`]
//! imports RocksDB), and no call to it is made on a shard's event loop.
//! Redis is the transport and the coordinator, never the only copy of an
//! acknowledged message: see docs/architecture.md, "A cluster".
//!
//! The seams sit where a request crosses a node boundary (login, typing and
//! presence routing, presence reads), never in a per-event loop: the
//! pipeline's fan-out of pushes to local shards goes through
//! [`crate::hub::fanout`] directly, so these traits may use dynamic
//! dispatch without costing the hot path anything.

pub mod admin;
pub mod applier;
pub mod coordinator;
pub mod handoff;
pub mod local;
pub mod mover;
pub mod notices;
pub mod redis;
pub mod shipper;
pub mod table;

use bytes::Bytes;
use swiftlet_protocol::pb;

use crate::hub::registry::ConnRef;
use crate::store::StoreError;

/// How many partitions users and groups hash to. Fixed for the life of a
/// cluster: changing it moves almost every user, so it is a constant, not
/// a setting. 4,096 leaves room for far more nodes than partitions need
/// to balance (each node holding dozens).
pub const PARTITIONS: u16 = 4096;

/// One of [`PARTITIONS`] slices of users and groups that move between
/// nodes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub u16);

impl Partition {
    /// The partition of a user id. Stable across runs, builds and
    /// platforms (no per-process seed): every node must agree on it.
    pub fn of_user(user: &str) -> Partition {
        Partition::of_bytes(b'u', user.as_bytes())
    }

    /// The partition of a group id (a space apart from users', so a group
    /// and a user with the same bytes need not share a home).
    pub fn of_group(group_id: u64) -> Partition {
        Partition::of_bytes(b'g', &group_id.to_be_bytes())
    }

    fn of_bytes(space: u8, bytes: &[u8]) -> Partition {
        // FNV-1a, then a 64-bit finalizer (MurmurHash3's fmix64) so that
        // ids differing only in their last characters spread over the low
        // bits that pick the partition.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in std::iter::once(&space).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        Partition((h % u64::from(PARTITIONS)) as u16)
    }
}

/// Where a partition lives, as this node last learned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// This node is home; `epoch` is the ownership epoch it holds.
    Local { epoch: u64 },
    /// Another node is home (a login here is redirected there).
    Remote { node: u16, epoch: u64 },
    /// No node is known to be home: the cluster is not initialized, or
    /// Redis lost the map and the home has not restored it yet.
    Unknown,
}

/// Which node is home for each partition.
///
/// Guarantees:
/// - Every partition has exactly one home at a given epoch; an epoch is
///   changed only by compare-and-set, and only upwards.
/// - An answer may be stale (the partition moved since this node learned
///   of it); it is never older than an epoch this node has already acted
///   on. A node that finds it acted on a stale epoch stops acting for that
///   partition; it never merges two homes' writes.
/// - Cheap and non-blocking: answered from memory, so a shard may ask it
///   on its event loop (once per login, not per message).
pub trait Ownership: Send + Sync {
    /// The home of `partition`.
    fn home(&self, partition: Partition) -> Home;

    /// The home of a user's inbox, devices and cursors.
    fn home_of_user(&self, user: &str) -> Home {
        self.home(Partition::of_user(user))
    }

    /// The home of a group's membership and posts.
    fn home_of_group(&self, group_id: u64) -> Home {
        self.home(Partition::of_group(group_id))
    }

    /// Whether this node may write for the partitions it is home to now:
    /// false once it could not renew its lease in time (it is *fenced*,
    /// another node may have been given its partitions).
    fn writable(&self) -> bool {
        true
    }

    /// Where a client of node `node` reconnects, if that node is alive.
    fn redirect(&self, _node: u16) -> Option<pb::Redirect> {
        None
    }

    /// The commit pipeline hands `partition` over (`home` is
    /// [`Home::Remote`]) or takes it over ([`Home::Local`]) as part of a
    /// partition move, at the batch that moves its rows; or puts back what
    /// it said before when that batch was not written. Takes effect at
    /// once for every caller. A single node is home to everything and
    /// never moves a partition.
    fn set_home(&self, _partition: Partition, _home: Home) {}
}

/// Notices that are never stored: typing and presence changes, to users
/// and watchers who may be connected to other nodes.
///
/// Guarantees:
/// - At most once, and may be lost: under load (a shard far behind, a
///   full queue), when a recipient is between nodes, or when the transport
///   drops it (Redis pub/sub loses whatever is sent while a subscriber is
///   away). Nothing is retried; a client learns the truth from the next
///   notice or from a fresh read.
/// - Ordered per sender and recipient connection only as far as one path
///   carries them; nothing is ordered against durable events.
/// - Never blocks the caller, which is a shard's event loop.
pub trait Ephemeral: Send + Sync {
    /// Send `frame` to every live connection of each of `users`.
    /// `scratch` is the caller's buffer, reused between calls so a notice
    /// allocates nothing for the lookup.
    fn to_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    );

    /// Send a notice about `user` to every connection watching their
    /// presence. `frame` is called at most once, and only if someone may
    /// be watching, so an unwatched user costs no encoding and no reads.
    fn to_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes);
}

/// Who is online, and when they were last seen.
///
/// Guarantees:
/// - `is_online` is true while the user holds a logged-in connection on
///   their home node; it may lag a login or logout elsewhere by the time
///   a notice takes to arrive (see [`Ephemeral`]), and may be briefly true
///   after a node has died, until its keys expire.
/// - `last_seen` is what was committed when the user's last connection
///   closed, with their privacy choice: durable, read from the user's home.
pub trait Presence: Send + Sync {
    /// Whether `user` holds a live connection.
    fn is_online(&self, user: &str) -> bool;

    /// When `user` was last seen (Unix ms; 0 if never) and whether they
    /// hide it.
    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError>;
}

/// One committed event bound for another node's inbox, as written to this
/// node's outbox in the same batch as the event itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The destination node.
    pub to: u16,
    /// Gap-free and increasing per (this node, destination): the receiver
    /// applies entry n only after n - 1.
    pub seq: u64,
    /// The encoded event, opaque to the transport.
    pub payload: Bytes,
}

/// Why a hand-off did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandOffError {
    /// This node has no peers: a single node never hands off.
    #[error("no other node to hand off to")]
    NoPeers,
    /// The transport is unreachable; the entries stay in the outbox and
    /// are shipped again later.
    #[error("hand-off transport unavailable")]
    Unavailable,
}

/// The durable hand-off of committed events to another node's inbox.
///
/// The source writes each event and its [`OutboxEntry`] in one batch and
/// acknowledges the client only after that write, so the outbox, not the
/// transport, holds the copy that matters. Guarantees:
/// - Nothing acknowledged is lost: an entry stays in the source's outbox
///   until the destination reports a high-water mark at or above it; after
///   any doubt (a restart, a failover, a timeout) the source ships again
///   everything above the last mark.
/// - Applied once, in order: the destination applies entry `seq` only if
///   it is the next from that source, in the same batch as its new
///   high-water mark; a duplicate is dropped, a gap waits. So shipping is
///   idempotent, and the transport may lose, repeat or replay entries.
/// - Never blocks a shard: shipping runs off the event loops.
pub trait HandOff: Send + Sync {
    /// Ship `entries` (all to one destination, in `seq` order) towards
    /// their destination's inbox. `Ok` means handed to the transport, not
    /// applied: only [`HandOff::acked`] says what was applied.
    fn ship(&self, entries: &[OutboxEntry]) -> Result<(), HandOffError>;

    /// The highest `seq` node `to` has reported applying from this node
    /// (0 before any report); entries at or below it may be deleted from
    /// the outbox.
    fn acked(&self, to: u16) -> u64;
}
