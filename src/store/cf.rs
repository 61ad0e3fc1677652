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
/// that send gets, kept so idempotency survives restarts.
pub const DEDUP: &str = "dedup";
/// `user ‖ 0x00 ‖ device` → `seq: u64 BE`, the highest inbox seq the device
/// acknowledged.
pub const CURSORS: &str = "cursors";

/// Every column family the store opens.
pub const ALL_CFS: [&str; 4] = [MESSAGES, INBOX, DEDUP, CURSORS];
