//! What the protocol code of a connection may use from its node: the store
//! (reads), the registry and watchers, the group cache, the commit pipeline
//! (durable requests), login, the limits, the cluster seams, the clock,
//! metrics. One per shard; the shard owns the sockets, this owns none.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::cluster::{Ephemeral, Ownership, Presence};
use crate::commit::CommitHandle;
use crate::cursors::Cursors;
use crate::groups::GroupDirectory;
use crate::hub::mailbox::ShardHandle;
use crate::hub::registry::Registry;
use crate::metrics::Metrics;
use crate::store::Store;

/// Limits every connection of the shard runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame: usize,
    pub push_buffer_bytes: usize,
    pub idle_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    /// A started frame must be complete within this long.
    pub frame_timeout_ms: u64,
    /// Most connections (of any transport) one user may hold.
    pub max_conns_per_user: usize,
    pub typing_ttl_ms: u64,
    /// Origins allowed to open a WebSocket besides the server's own page.
    pub allowed_origins: Vec<String>,
}

/// What a shard's connections share with the rest of the node.
pub struct Services {
    pub id: u16,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    /// Presence subscriptions: watched user -> watching connections.
    pub watchers: Arc<Registry>,
    pub groups: Arc<GroupDirectory>,
    pub commit: CommitHandle,
    pub auth: Authenticator,
    pub limits: Limits,
    /// Every shard's mailbox, this one's included.
    pub shards: Arc<[ShardHandle]>,
    /// Which node is home to each user (asked at login).
    pub ownership: Arc<dyn Ownership>,
    /// Where typing and presence notices go.
    pub ephemeral: Arc<dyn Ephemeral>,
    /// Who is online, and last seen.
    pub presence: Arc<dyn Presence>,
    /// What the session code reads the time from.
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    /// Device cursors acknowledged and not yet written.
    pub cursors: Arc<Cursors>,
}
