//! What the protocol code of a connection may ask of its node, as one
//! narrow trait ([`NodeServices`]), and the node's real implementation of it
//! ([`Services`], one per shard: the store, the registry and watchers, the
//! group cache, the commit pipeline, login, the limits, the cluster seams,
//! the clock, metrics). The shard owns the sockets; neither owns one.
//!
//! Request handling (`super::requests`) is generic over the trait, so the
//! shard's path is statically dispatched to [`Services`] (each method is a
//! direct, inlinable call into what the code called before the trait
//! existed) while tests drive the same code against a scripted node (an
//! in-memory store, a manual clock, a recorder of what was submitted and
//! routed: see `super::scripted`), the way quinn-proto's tests drive its
//! I/O-free connection.
//!
//! The trait has three kinds of methods: reads (login, cursors and heads,
//! inbox pages, groups, receipts, presence), registrations (the registry
//! and the presence watchers, which a login or a subscription must make
//! before it reads, so nothing committed in between is missed), and
//! effects (a durable command for the pipeline, an ephemeral notice to
//! route). Effects are performed by the node, not by the request code: the
//! pipeline answers a submitted command after its commit, and a notice's
//! routing is best effort (see [`crate::cluster::Ephemeral`]).

use std::sync::Arc;

use bytes::Bytes;
use swiftlet_protocol::{pb, ErrorCode};

use crate::auth::{AuthError, Authenticator, Identity};
use crate::clock::Clock;
use crate::cluster::{Ephemeral, Home, Ownership, Presence};
use crate::commit::{CommitCmd, CommitHandle, SubmitError};
use crate::cursors::Cursors;
use crate::groups::{Group, GroupDirectory};
use crate::hub::mailbox::ShardHandle;
use crate::hub::registry::{Added, ConnRef, Registry};
use crate::metrics::Metrics;
use crate::store::{InboxPage, Store, StoreError};

/// Limits every connection of the shard runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame: usize,
    pub push_buffer_bytes: usize,
    pub idle_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    /// A started frame must be complete within this long.
    pub frame_timeout_ms: u64,
    /// Frames one connection may send, as its bucket's size and refill.
    pub frames: crate::session::bucket::FrameRate,
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
    /// The operator's API: its token, and its thread.
    pub admin: crate::admin::Gate,
}

/// What request handling needs from its node, and nothing more.
///
/// Reads may fail with a [`StoreError`]; the request code answers such a
/// failure with a typed error, never a panic. No method blocks on the
/// network: every one is answered from memory or the local store.
pub trait NodeServices {
    /// The shard the connection lives on (part of its [`ConnRef`]).
    fn shard_id(&self) -> u16;
    /// The limits every connection of the shard runs under.
    fn limits(&self) -> &Limits;
    /// Where the protocol reads the time.
    fn clock(&self) -> &Clock;

    /// Who a Hello's token proves, and when it was issued.
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError>;
    /// Count a login's outcome: `Ok` for a Welcome, else the code it was
    /// refused with (`swiftlet_logins_total`, `swiftlet_login_failures_total`).
    fn count_login(&self, outcome: Result<(), ErrorCode>);
    /// The node that is home to `user` (asked once per login).
    fn home_of_user(&self, user: &str) -> Home;
    /// The node that is home to group `id`.
    fn home_of_group(&self, id: u64) -> Home;
    /// Whether this node may write for the partitions it is home to (false
    /// while it is fenced: see [`Ownership::writable`]).
    fn writable(&self) -> bool;
    /// Where a client of node `node` reconnects, if that node is alive.
    fn redirect(&self, node: u16) -> Option<pb::Redirect>;
    /// Count a login refused because the user's home is elsewhere:
    /// redirected there, or told their home is unavailable.
    fn count_refusal(&self, redirected: bool);
    /// Route `user`'s pushes to `conn` from now on.
    fn register(&self, user: &str, conn: ConnRef) -> Added;
    /// Stop routing to `conn`; true when `user` went offline.
    fn unregister(&self, user: &str, conn: ConnRef) -> bool;

    /// A device's cursor, pending acknowledgements included.
    fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError>;
    /// The newest seq of `user`'s inbox (0 when empty).
    fn head(&self, user: &str) -> Result<u64, StoreError>;
    /// The oldest seq retention kept of `user`'s inbox.
    fn first_seq(&self, user: &str) -> Result<u64, StoreError>;
    /// The store's inbox epoch (see the wire spec, section 8).
    fn inbox_epoch(&self) -> u64;
    /// Up to `limit` events of `user`'s inbox after `after`, in at most
    /// about `max_bytes`, with the inbox's oldest and newest seqs as of
    /// the same read.
    fn inbox_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError>;

    /// Whether `user` is a member of group `group` (one point read).
    fn is_member(&self, user: &str, group: u64) -> Result<bool, StoreError>;
    /// A group with its members.
    fn group(&self, id: u64) -> Result<Option<Arc<Group>>, StoreError>;
    /// One page of the ids of `user`'s groups after `after`, and whether
    /// more follow.
    fn memberships_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError>;
    /// A stored message.
    fn message(&self, id: u64) -> Result<Option<pb::Message>, StoreError>;
    /// The (delivered, read) watermarks of `users` in `conversation`, in
    /// their order.
    fn watermarks(
        &self,
        conversation: &[u8],
        users: &[&str],
    ) -> Result<Vec<(u64, u64)>, StoreError>;

    /// Whether `user` holds a live connection.
    fn is_online(&self, user: &str) -> bool;
    /// When `user` was last seen (Unix ms) and whether they hide it.
    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError>;
    /// Route `user`'s presence changes to `conn`; returns the shared id.
    fn watch(&self, user: &str, conn: ConnRef) -> Arc<str>;
    /// Stop routing `user`'s presence changes to `conn`.
    fn unwatch(&self, user: &str, conn: ConnRef);

    /// Effect: hand a durable command to the commit pipeline, which
    /// answers it after the commit. `Busy` when its queue is full (the
    /// request is then answered `RATE_LIMITED` at once).
    fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError>;
    /// Effect: route an ephemeral notice to every live connection of
    /// `users` (see [`Ephemeral::to_users`]).
    fn notify_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    );
    /// Effect: route a notice about `user` to their watchers; `frame` is
    /// built only if someone may be watching (see
    /// [`Ephemeral::to_watchers`]).
    fn notify_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes);
}

impl NodeServices for Services {
    #[inline]
    fn shard_id(&self) -> u16 {
        self.id
    }

    #[inline]
    fn limits(&self) -> &Limits {
        &self.limits
    }

    #[inline]
    fn clock(&self) -> &Clock {
        &self.clock
    }

    #[inline]
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.auth.identify(token)
    }

    #[inline]
    fn count_login(&self, outcome: Result<(), ErrorCode>) {
        self.metrics.count_login(outcome);
    }

    #[inline]
    fn home_of_user(&self, user: &str) -> Home {
        self.ownership.home_of_user(user)
    }

    #[inline]
    fn home_of_group(&self, id: u64) -> Home {
        self.ownership.home_of_group(id)
    }

    #[inline]
    fn writable(&self) -> bool {
        self.ownership.writable()
    }

    #[inline]
    fn redirect(&self, node: u16) -> Option<pb::Redirect> {
        self.ownership.redirect(node)
    }

    #[inline]
    fn count_refusal(&self, redirected: bool) {
        let counter = if redirected {
            &self.metrics.redirects
        } else {
            &self.metrics.home_unavailable
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    #[inline]
    fn register(&self, user: &str, conn: ConnRef) -> Added {
        self.registry.add(user, conn)
    }

    #[inline]
    fn unregister(&self, user: &str, conn: ConnRef) -> bool {
        self.registry.remove(user, conn)
    }

    #[inline]
    fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        self.cursors.read(user, device)
    }

    #[inline]
    fn head(&self, user: &str) -> Result<u64, StoreError> {
        self.store.last_seq(user)
    }

    #[inline]
    fn first_seq(&self, user: &str) -> Result<u64, StoreError> {
        self.store.first_seq(user)
    }

    #[inline]
    fn inbox_epoch(&self) -> u64 {
        self.store.inbox_epoch()
    }

    #[inline]
    fn inbox_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        self.store.sync_inbox(user, after, limit, max_bytes)
    }

    #[inline]
    fn is_member(&self, user: &str, group: u64) -> Result<bool, StoreError> {
        self.store.is_member(user, group)
    }

    #[inline]
    fn group(&self, id: u64) -> Result<Option<Arc<Group>>, StoreError> {
        self.groups.get(id)
    }

    #[inline]
    fn memberships_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        self.store.memberships_page(user, after, limit)
    }

    #[inline]
    fn message(&self, id: u64) -> Result<Option<pb::Message>, StoreError> {
        self.store.message(id)
    }

    #[inline]
    fn watermarks(
        &self,
        conversation: &[u8],
        users: &[&str],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.store.watermarks_of(conversation, users)
    }

    #[inline]
    fn is_online(&self, user: &str) -> bool {
        self.presence.is_online(user)
    }

    #[inline]
    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError> {
        self.presence.last_seen(user)
    }

    #[inline]
    fn watch(&self, user: &str, conn: ConnRef) -> Arc<str> {
        self.watchers.add(user, conn).user
    }

    #[inline]
    fn unwatch(&self, user: &str, conn: ConnRef) {
        self.watchers.remove(user, conn);
    }

    #[inline]
    fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError> {
        self.commit.submit(cmd)
    }

    #[inline]
    fn notify_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    ) {
        self.ephemeral.to_users(users, scratch, frame);
    }

    #[inline]
    fn notify_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes) {
        self.ephemeral.to_watchers(user, frame);
    }
}
