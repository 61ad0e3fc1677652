//! Column families and the byte layout of every key, declared once.
//!
//! Keys are big-endian so that RocksDB's bytewise order is the numeric order
//! and a prefix scan walks one user's inbox from oldest to newest. User and
//! device ids never contain a NUL byte (the auth module refuses them), so
//! `user ‖ 0x00` is an unambiguous prefix: "alice\0…" sorts before "alice1\0…".

/// `msg_id: u64 BE` → encoded `pb::Message`. A message is stored once, however
/// many inboxes reference it.
pub const MESSAGES: &str = "messages";
/// `user ‖ 0x00 ‖ seq: u64 BE` → inbox entry (see [`super::keys::InboxEntry`]).
/// The offline queue and the sync log are the same thing.
pub const INBOX: &str = "inbox";
/// `user ‖ 0x00 ‖ client_msg_id` → encoded `pb::Ack`: the answer every retry of
/// that send gets, kept so idempotency survives restarts, for the dedup
/// window (a compaction filter drops older ones: see [`super::retention`]).
pub const DEDUP: &str = "dedup";
/// `msg_id: u64 BE` → `count: i64 BE`, merged: how many inbox entries
/// reference the message. Each reference written merges +1, each one
/// trimmed −1; the trimmer deletes the message when it reaches 0 (see
/// [`super::retention`]). A message without one predates the counts.
pub const REFS: &str = "refs";
/// `user ‖ 0x00 ‖ device` → `seq: u64 BE`, the highest inbox seq the device
/// acknowledged.
pub const CURSORS: &str = "cursors";

/// `group_id: u64 BE` → encoded `pb::GroupInfo` (with members): the whole
/// group, rewritten on each membership or name change (rare next to posts).
pub const GROUPS: &str = "groups";
/// `user ‖ 0x00 ‖ group_id: u64 BE` → empty: the groups a user is in.
pub const MEMBERSHIPS: &str = "memberships";
/// `conversation ‖ 0x00 ‖ user` → `delivered: u64 BE ‖ read: u64 BE`, the
/// user's receipt watermarks (message ids) in that conversation.
/// A conversation key is `'u' ‖ a ‖ '|' ‖ b` for a 1:1 chat (a < b) or
/// `'g' ‖ group_id: u64 BE` for a group.
pub const STATUS: &str = "status";
/// `group_id: u64 BE ‖ msg_id: u64 BE` → sender: the group's messages in
/// order, to find whose messages a read receipt covers.
pub const GROUP_LOG: &str = "group_log";
/// `user` → `last_seen_ms: u64 BE ‖ flags: u8` (bit 0: hide last seen).
/// Written on disconnect and on a privacy change, never per presence change.
pub const PRESENCE: &str = "presence";

/// `user` → `before: u64 BE`, seconds since the Unix epoch: the user's
/// tokens issued before it are refused (`swiftlet admin revoke`; see
/// `crate::auth::Revocations`, which holds them in memory). Written by the
/// admin API only, read once at start.
pub const REVOKED: &str = "revoked";

/// Small records about the database itself, one per fixed key (see
/// [`super::keys::META_INBOX_EPOCH`] and [`super::keys::META_RUN`]). Written
/// at open and at a clean shutdown, never on the hot path.
pub const META: &str = "meta";

/// What a node of a cluster keeps about the cluster (see
/// [`super::cluster`]): its outbox of events bound for other nodes, what it
/// applied from each of them, and the ownership epochs it has seen. Empty on
/// a single node.
pub const CLUSTER: &str = "cluster";

/// Every column family the store opens.
pub const ALL_CFS: [&str; 13] = [
    MESSAGES,
    INBOX,
    DEDUP,
    REFS,
    CURSORS,
    GROUPS,
    MEMBERSHIPS,
    STATUS,
    GROUP_LOG,
    PRESENCE,
    META,
    CLUSTER,
    REVOKED,
];
