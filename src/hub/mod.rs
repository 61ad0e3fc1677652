//! Where the shards and the commit pipeline meet, without either knowing
//! the other: who is online where, how a shard is handed work, and how what
//! one group commit produces is routed to the shards.
//!
//! - [`registry`]: user → connections (shard, slot, generation, and
//!   whether a session or an HTTP exchange), and presence watchers.
//! - [`mailbox`]: a shard's mailbox: [`mailbox::ShardHandle`], the messages
//!   it carries ([`mailbox::ShardMsg`], [`mailbox::Push`],
//!   [`mailbox::Reply`] with its [`mailbox::Answer`], framed or typed) and
//!   what a push remembers ([`mailbox::Sent`]).
//! - [`fanout`]: a group commit's answers and pushes grouped per shard, one
//!   message and one wake-up per shard per group.
//!
//! Nothing here owns a socket, reads the store or decides what a request
//! does. The shards and the pipeline both import this module; it imports
//! neither (`crate::shard`, `crate::commit`), which is what keeps the two
//! free of a cycle.

pub mod fanout;
pub mod mailbox;
pub mod registry;
