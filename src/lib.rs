//! swiftlet: a chat server built for connection density and durability.
//!
//! Clients speak length-delimited protobuf over TCP (see `protocol/README.md`).
//! Each core runs one shard: a single-threaded mio event loop that owns its
//! connections. Every message is written to RocksDB's write-ahead log before
//! it is acknowledged, by one commit pipeline that groups many sends into one
//! write; it then hands Acks and pushes to the shards that hold the
//! recipients' connections.
//!
//! # Layout
//!
//! - [`server`]: start and stop a node: store, pipeline, listeners, shards.
//! - [`session`]: the protocol of one connection, with no socket in reach:
//!   [`session::requests`] what each client frame does, on a
//!   [`session::state::Session`] view of the connection's fields and an
//!   output sink; [`session::services`] the one trait through which it
//!   asks its node for reads and hands it effects, and the real node;
//!   [`session::delivery`] exactly-once, in-order inbox delivery;
//!   [`session::unacked`] what a connection was sent and not acknowledged;
//!   [`session::bucket`] its typing and presence rate.
//! - [`shard`]: one core's event loop, the only place with sockets;
//!   [`shard::conn`] one connection's transport state and buffers,
//!   [`shard::input`] its input decoded one frame at a time,
//!   [`shard::timer`] the timeout wheel, [`shard::tls`] the certificate
//!   (reloaded on SIGHUP) and each connection's TLS, driven from the
//!   shard's buffers.
//! - [`hub`]: where the shards and the pipeline meet: [`hub::registry`]
//!   which user is connected where (and who watches whose presence),
//!   [`hub::mailbox`] how other threads hand a shard work, [`hub::fanout`]
//!   one message per shard per group commit.
//! - [`bridge`]: WebSocket and HTTP (sync, long-poll, send, page, metrics)
//!   served by the same shards.
//! - [`commit`]: the group-commit pipeline, run by the shards in turn (flat
//!   combining): dedup, ids, inbox sequences, atomic writes, then Acks and
//!   pushes through [`hub`].
//! - [`cluster`]: what crosses nodes, as narrow interfaces with their
//!   guarantees (ownership of partitions, ephemeral notices, presence,
//!   durable hand-off); [`cluster::local`] the single-node implementation,
//!   and beside it the Redis one (`--cluster`): ownership table and lease,
//!   outbox shipper and applier, notices over pub/sub.
//! - [`txn`]: savepoints that make each request in a group commit all or nothing.
//! - [`cursors`]: device cursors acknowledged and not yet written.
//! - [`groups`]: group membership, cached for the pipeline and the shards.
//! - [`generations`]: the two-generation bound on the pipeline's caches.
//! - [`store`]: RocksDB, the only module that knows it.
//! - [`admin`]: the operator's API on the HTTP port (stats, a user's devices
//!   and inbox, disconnect, token revocation, online backup, compaction) and
//!   the `swiftlet admin` commands.
//! - [`alloc`]: mimalloc, and returning an idle shard's free pages.
//! - [`auth`]: tokens to user ids; id shapes.
//! - [`ids`]: time-ordered 64-bit message ids.
//! - [`clock`]: where a node reads the time (one clock, from the config;
//!   a manual one in tests).
//! - [`logging`]: rate limits for log lines a client or a fault can repeat.
//! - [`metrics`]: counters and histograms the shards, the pipeline and the
//!   bridge record into; `/metrics` renders them.
//! - [`config`]: defaults, TOML file, environment, flags.

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod bridge;
pub mod clock;
pub mod cluster;
pub mod commit;
pub mod config;
pub mod cursors;
pub mod generations;
pub mod groups;
pub mod hub;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod session;
pub mod shard;
pub mod store;
pub mod txn;

pub use config::Config;
pub use server::{start, Server, ServerError};
