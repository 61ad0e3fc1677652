//! The protocol as one connection sees it: what each frame a client sends
//! does. It is given a [`Session`] (a view of the connection's protocol
//! fields and an [`Output`] for answers), never the connection itself, and
//! a node behind [`NodeServices`], never the node's parts, so no socket,
//! thread or store handle is in reach, and tests drive it against a
//! scripted node (see `request_props.rs` beside this file).
//!
//! Handling a frame reads what it needs through the node and leaves its
//! effects for others to carry out:
//! - answers go to the [`Output`] (the shard frames them into the
//!   connection's buffer);
//! - durable work is submitted to the node ([`NodeServices::submit`]), whose
//!   pipeline answers it after the commit;
//! - ephemeral notices (typing, presence) are routed by the node
//!   ([`NodeServices::notify_users`], [`NodeServices::notify_watchers`]);
//! - acknowledged cursors are left in [`ShardSessions::cursors`], which the
//!   shard hands to the pipeline at the end of its turn;
//! - anything fatal comes back as [`Flow::Close`] with the code the client
//!   is told, and the shard writes the Error and closes.
//!
//! The wire contract it keeps (protocol/README.md, sections 3, 4 and 10),
//! which the property tests check on random frame sequences: nothing is
//! submitted or routed before a successful Hello; a request with a nonzero
//! id gets exactly one answer carrying that id (or is handed to the
//! pipeline, which answers it), except that DeliveryAck and Typing are
//! answered only when refused; errors about a request are never fatal;
//! and the connection is closed exactly on request id 0, a frame before
//! Hello, a second Hello and a refused Hello.
//!
//! Generic over the node and the output, so the shard's path is statically
//! dispatched and allocates nothing more than it did before the seams.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use swiftlet_protocol::codec::frame_bytes;
use swiftlet_protocol::pb::{self, conversation, TypingState};
use swiftlet_protocol::{Body, Envelope, ErrorCode, PROTOCOL_VERSION};

use super::services::{Limits, NodeServices};
use super::state::{Carries, Output, Phase, Session};
use crate::auth::valid_id;
use crate::cluster::Home;
use crate::commit::{add_delivered, CommitCmd, DeliveredConv, Op, Origin, SubmitError};
use crate::groups::{page_limit, MAX_INFO_MEMBERS};
use crate::hub::registry::{ConnKind, ConnRef};
use crate::session::delivery::Delivery;
use crate::session::unacked::Unacked;
use crate::store::keys;

/// What the shard does with the connection after a frame.
#[derive(Debug, PartialEq)]
pub enum Flow {
    Continue,
    /// Send a fatal Error with this code and close. The id is the request's
    /// the error answers (a refused Hello's), or 0 when it is about the
    /// connection.
    Close(u64, ErrorCode, String),
    /// Like `Close`, with an Error that says more (a cluster redirect).
    Refuse(u64, Box<pb::Error>),
}

/// How long a client whose home node is down should wait before trying
/// again (a hint: a node restarts in seconds).
pub const HOME_RETRY_MS: u32 = 2_000;

/// Why `user` may not be served here, if they may not: their home is
/// another node (NOT_HOME, with where it listens), or no live node is
/// their home now (HOME_UNAVAILABLE).
pub fn not_home<N: NodeServices>(node: &N, user: &str) -> Option<pb::Error> {
    let refuse = |code: ErrorCode, message: String, redirect, retry_after_ms| pb::Error {
        code: code as i32,
        message,
        fatal: true,
        redirect,
        retry_after_ms,
    };
    let refusal = match node.home_of_user(user) {
        Home::Local { .. } if node.writable() => None,
        // Fenced: until it holds its lease again and has re-read the map,
        // this node cannot tell whether it is still the user's home.
        Home::Local { .. } => Some(refuse(
            ErrorCode::HomeUnavailable,
            "this node is re-joining its cluster; retry shortly".into(),
            None,
            HOME_RETRY_MS,
        )),
        Home::Remote { node: home, .. } => Some(match node.redirect(home) {
            Some(r) => refuse(
                ErrorCode::NotHome,
                format!("this user is served by node {home}; reconnect there"),
                Some(r),
                0,
            ),
            None => refuse(
                ErrorCode::HomeUnavailable,
                format!("this user's home, node {home}, is down; retry later"),
                None,
                HOME_RETRY_MS,
            ),
        }),
        Home::Unknown => Some(refuse(
            ErrorCode::HomeUnavailable,
            "no node is home to this user yet; retry later".into(),
            None,
            HOME_RETRY_MS,
        )),
    };
    if let Some(r) = &refusal {
        node.count_refusal(r.redirect.is_some());
    }
    refusal
}

/// Largest Sync page.
pub const MAX_SYNC_LIMIT: u32 = 500;
const DEFAULT_SYNC_LIMIT: u32 = 100;
/// Room kept in a frame for everything around a message body.
pub const FRAME_OVERHEAD: usize = 1024;
const MAX_CONTENT_TYPE: usize = 128;
/// Most users one connection may watch the presence of.
pub const MAX_PRESENCE_SUBSCRIPTIONS: usize = 1000;
/// Typing tokens a SubscribePresence takes (it reads up to a thousand
/// users' presence; the bucket is shared with Typing).
pub const PRESENCE_TOKENS: u8 = 5;
/// The device id of messages sent over HTTP (`POST /v1/messages`): no
/// device may log in under it.
pub const HTTP_DEVICE: &str = "http";

/// Where a typing indicator goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypingTarget {
    User(Arc<str>),
    Group(u64),
}

/// A connection that said it is typing, until it stops or the TTL lapses.
#[derive(Debug, Clone)]
pub struct Typist {
    pub user: Arc<str>,
    pub target: TypingTarget,
    pub deadline: u32,
}

/// Per-shard session state that is not per-connection.
#[derive(Default)]
pub struct ShardSessions {
    /// Active typists by (slot, generation).
    pub typing: HashMap<(u32, u32), Typist>,
    /// Typing deadlines in the order they were set, with the typist's key
    /// (one TTL for all, so that is deadline order; stale entries are
    /// skipped when they come due).
    pub typing_due: VecDeque<(u32, (u32, u32))>,
    /// Reused buffer for recipient lookups.
    pub conns: Vec<ConnRef>,
    /// Device cursors acknowledged this turn.
    pub cursors: Vec<Acked>,
    /// What each connection was sent and has not acknowledged.
    pub unacked: Unacked,
}

/// One DeliveryAck: a device's cursor moved from `after` to `up_to`.
#[derive(Debug)]
pub struct Acked {
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub after: u64,
    pub up_to: u64,
    /// The delivered receipts it implies, when the shard still held what
    /// the range was (else they are read from the store).
    pub delivered: Option<Vec<DeliveredConv>>,
    /// Not a DeliveryAck: the connection's own message, passed over and
    /// acknowledged for the device (see `session::delivery`).
    pub own: bool,
}

/// Append `env` to the connection's output.
pub fn queue<O: Output>(conn: &mut Session<'_, O>, env: &Envelope) {
    conn.send_env(env);
}

/// In a cluster, a group read or typing notice for a group whose home is
/// another node: refused (group writes are forwarded there by the
/// pipeline; reads are not, yet).
fn group_elsewhere<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    rid: u64,
    id: u64,
    node: &N,
) -> Option<Flow> {
    matches!(node.home_of_group(id), Home::Remote { .. }).then(|| {
        request_error(
            conn,
            rid,
            ErrorCode::Unavailable,
            "this group is served by another node: its receipts and typing are not forwarded",
        )
    })
}

fn request_error<O: Output>(
    conn: &mut Session<'_, O>,
    request_id: u64,
    code: ErrorCode,
    message: &str,
) -> Flow {
    queue(conn, &Envelope::error(request_id, code, message, false));
    Flow::Continue
}

fn store_error<O: Output>(
    conn: &mut Session<'_, O>,
    rid: u64,
    e: crate::store::StoreError,
) -> Flow {
    crate::log_every!(1000, error, error = %e, "store read failed");
    request_error(conn, rid, ErrorCode::StoreUnavailable, "storage error")
}

/// Act on one frame from the client.
pub fn handle<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    env: Envelope,
    node: &N,
    local: &mut ShardSessions,
    now: u32,
) -> Flow {
    let rid = env.request_id;
    if *conn.phase == Phase::Closing {
        return Flow::Continue;
    }
    if rid == 0 {
        // An answer carrying 0 would read as a push.
        return Flow::Close(
            0,
            ErrorCode::ProtocolViolation,
            "request_id 0 is reserved for pushes".into(),
        );
    }
    let body = match (*conn.phase, env.body) {
        (Phase::Closing, _) => return Flow::Continue,
        (Phase::Handshake, Some(Body::Hello(hello))) => return login(conn, slot, rid, hello, node),
        (Phase::Handshake, _) => {
            return Flow::Close(
                0,
                ErrorCode::ProtocolViolation,
                "the first frame must be Hello".into(),
            )
        }
        (Phase::Live, None) => {
            return request_error(
                conn,
                rid,
                ErrorCode::InvalidRequest,
                "empty or unknown request type",
            )
        }
        (Phase::Live, Some(body)) => body,
    };
    match body {
        Body::Hello(_) => Flow::Close(0, ErrorCode::ProtocolViolation, "already logged in".into()),
        Body::Ping(p) => {
            queue(
                conn,
                &Envelope::new(rid, Body::Pong(pb::Pong { nonce: p.nonce })),
            );
            Flow::Continue
        }
        Body::Send(send) => {
            if let Some(problem) = check_send(&send, node.limits()) {
                return request_error(conn, rid, problem.0, problem.1);
            }
            submit(conn, slot, rid, Op::Send(send), node)
        }
        Body::DeliveryAck(a) => delivery_ack(conn, slot, rid, a.up_to, local),
        Body::Sync(s) => sync(conn, rid, s, node),
        Body::CreateGroup(r) => submit(conn, slot, rid, Op::CreateGroup(r), node),
        Body::AddMembers(r) => submit(conn, slot, rid, Op::AddMembers(r), node),
        Body::RemoveMembers(r) => submit(conn, slot, rid, Op::RemoveMembers(r), node),
        Body::LeaveGroup(r) => submit(conn, slot, rid, Op::LeaveGroup(r), node),
        Body::RenameGroup(r) => submit(conn, slot, rid, Op::RenameGroup(r), node),
        Body::MarkRead(r) => submit(conn, slot, rid, Op::MarkRead(r), node),
        Body::SetPrivacy(r) => submit(conn, slot, rid, Op::SetPrivacy(r), node),
        Body::GetGroup(r) => get_group(conn, slot, rid, r, node),
        Body::ListGroups(r) => list_groups(conn, rid, r, node),
        Body::GetReceipts(r) => get_receipts(conn, rid, r, node),
        Body::Typing(t) => typing(conn, slot, rid, t, node, local, now),
        Body::SubscribePresence(s) => subscribe_presence(conn, slot, rid, s.users, node),
        _ => request_error(conn, rid, ErrorCode::InvalidRequest, "not a client request"),
    }
}

fn me<O: Output, N: NodeServices>(conn: &Session<'_, O>, slot: u32, node: &N) -> ConnRef {
    ConnRef {
        shard: node.shard_id(),
        slot,
        gen: conn.gen,
        kind: ConnKind::Session,
    }
}

fn login<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    hello: pb::Hello,
    node: &N,
) -> Flow {
    let flow = try_login(conn, slot, rid, hello, node);
    node.count_login(match &flow {
        Flow::Continue => Ok(()),
        Flow::Close(_, code, _) => Err(*code),
        Flow::Refuse(_, e) => Err(e.code()),
    });
    flow
}

fn try_login<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    hello: pb::Hello,
    node: &N,
) -> Flow {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Flow::Close(
            rid,
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        );
    }
    if !valid_id(&hello.device_id) {
        return Flow::Close(
            rid,
            ErrorCode::InvalidDevice,
            "device_id must be 1-64 bytes of [A-Za-z0-9._@-]".into(),
        );
    }
    if hello.device_id == HTTP_DEVICE {
        return Flow::Close(
            rid,
            ErrorCode::InvalidDevice,
            "device_id \"http\" is reserved for messages sent over HTTP".into(),
        );
    }
    let (user, issued_at) = match node.authenticate(&hello.token) {
        Ok(id) => (id.user, id.issued_at),
        Err(e) => return Flow::Close(rid, e.code, e.reason),
    };
    // A single node is home to everyone; in a cluster a user is served
    // only by their home node, so their devices, inbox and cursors stay
    // together: elsewhere the login is redirected there (or told to wait
    // while that node is down).
    if let Some(refusal) = not_home(node, &user) {
        return Flow::Refuse(rid, Box::new(refusal));
    }
    // Registered before the inbox head is read: a message committed after
    // that read is pushed to this connection (its push is looked up after
    // its commit), and one committed before is at or below the head, which
    // the catch-up from the cursor covers. So a device with nothing pending
    // (cursor == head) needs no store read beyond these two.
    let me = me(conn, slot, node);
    let added = node.register(&user, me);
    let (user, first) = (added.user, added.came_online);
    let limits = node.limits();
    if added.conns > limits.max_conns_per_user {
        node.unregister(&user, me);
        return Flow::Close(
            rid,
            ErrorCode::TooManyConnections,
            format!(
                "a user may hold {} connections at once",
                limits.max_conns_per_user
            ),
        );
    }
    // The oldest seq after the head: a trim between the two reads moves
    // it on, never past the head (which retention always keeps).
    let bounds = (
        node.cursor(&user, &hello.device_id),
        node.head(&user),
        node.first_seq(&user),
    );
    let (cursor, head, first_available) = match bounds {
        (Ok(c), Ok(h), Ok(f)) => (c, h, f),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            crate::log_every!(1000, error, error = %e, "reading a cursor at login failed");
            node.unregister(&user, me);
            return Flow::Close(rid, ErrorCode::Internal, "storage error".into());
        }
    };
    queue(
        conn,
        &Envelope::new(
            rid,
            Body::Welcome(pb::Welcome {
                user_id: user.to_string(),
                device_id: hello.device_id.clone(),
                cursor,
                head_seq: head,
                idle_timeout_ms: limits.idle_timeout_ms as u32,
                max_frame_bytes: limits.max_frame as u32,
                server_version: env!("CARGO_PKG_VERSION").into(),
                server_time_ms: node.clock().now_ms(),
                inbox_epoch: node.inbox_epoch(),
                first_available_seq: first_available,
            }),
        ),
    );
    if first {
        notify_presence(node, &user, true, 0);
    }
    *conn.user = Some(user);
    *conn.device = Some(Arc::from(hello.device_id));
    // Seconds until 2106; a later iat is kept as the latest we can hold.
    *conn.token_iat = u32::try_from(issued_at).unwrap_or(u32::MAX);
    *conn.phase = Phase::Live;
    // The backlog is sent by the shard's catch-up.
    *conn.carries = Carries::Frames(Delivery::login(cursor, head, hello.skip_own_sends));
    Flow::Continue
}

/// A Send's problem, if it has one the pipeline need not see.
pub fn check_send(send: &pb::Send, limits: &Limits) -> Option<(ErrorCode, &'static str)> {
    if !valid_id(&send.client_msg_id) {
        return Some((
            ErrorCode::InvalidRequest,
            "client_msg_id must be 1-64 bytes of [A-Za-z0-9._@-]",
        ));
    }
    if send.group_id == 0 && !valid_id(&send.to_user) {
        return Some((
            ErrorCode::InvalidRecipient,
            "to_user is not a valid user id",
        ));
    }
    if send.group_id != 0 && !send.to_user.is_empty() {
        return Some((
            ErrorCode::InvalidRequest,
            "set to_user or group_id, not both",
        ));
    }
    if send.content_type.len() > MAX_CONTENT_TYPE {
        return Some((
            ErrorCode::InvalidRequest,
            "content_type is longer than 128 bytes",
        ));
    }
    if send.body.len() > limits.max_frame.saturating_sub(FRAME_OVERHEAD) {
        return Some((ErrorCode::BodyTooLarge, "body is over the size limit"));
    }
    None
}

/// Hand a durable request to the commit pipeline; it answers after the write.
pub fn submit<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    op: Op,
    node: &N,
) -> Flow {
    let (Some(user), Some(device)) = (conn.user.clone(), conn.device.clone()) else {
        return Flow::Close(0, ErrorCode::Internal, "session without a user".into());
    };
    let origin = Origin {
        reply: me(conn, slot, node),
        request_id: rid,
        user,
        device,
        received: node.clock().now(),
        from: None,
    };
    match node.submit(CommitCmd::Request(origin, op)) {
        Ok(()) => {
            // Until its answer comes back (the shard stops reading at
            // MAX_IN_FLIGHT).
            *conn.in_flight = conn.in_flight.saturating_add(1);
            Flow::Continue
        }
        Err(SubmitError::Busy) => {
            request_error(conn, rid, ErrorCode::RateLimited, "server busy; retry")
        }
    }
}

fn delivery_ack<O: Output>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    up_to: u64,
    local: &mut ShardSessions,
) -> Flow {
    let Some(d) = conn.delivery() else {
        return Flow::Continue;
    };
    let (after, up_to) = match d.on_ack(up_to) {
        Err(e) => return request_error(conn, rid, ErrorCode::InvalidRequest, &e.to_string()),
        Ok(None) => return Flow::Continue,
        Ok(Some(range)) => range,
    };
    let (Some(user), Some(device)) = (conn.user.clone(), conn.device.clone()) else {
        return Flow::Continue;
    };
    // Handed to the commit pipeline at the end of this turn, and pending
    // in `Cursors` before any answer of the turn goes out: the device's next
    // login sees it.
    let delivered = local
        .unacked
        .take(slot, conn.gen, after, up_to)
        .map(|sent| {
            let mut convs = Vec::new();
            for s in &sent {
                add_delivered(&mut convs, &user, &s.from, s.group_id, s.id);
            }
            convs
        });
    local.cursors.push(Acked {
        user,
        device,
        after,
        up_to,
        delivered,
        own: false,
    });
    Flow::Continue
}

fn sync<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    rid: u64,
    req: pb::Sync,
    node: &N,
) -> Flow {
    let Some(user) = conn.user.clone() else {
        return Flow::Close(0, ErrorCode::Internal, "session without a user".into());
    };
    match sync_page(node, &user, req.after, req.limit) {
        Ok(batch) => {
            queue(conn, &Envelope::new(rid, Body::SyncBatch(batch)));
            Flow::Continue
        }
        Err(e) => store_error(conn, rid, e),
    }
}

/// What a request costs the shard's turn in page reads, when the shard
/// answers it by reading and encoding a page on its own turn: the rows of
/// the biggest page it may read. A `Sync` reads up to its limit of inbox
/// events, a `GetReceipts` one watermark per member listed, a `GetGroup`
/// a page of members, a `ListGroups` a page of memberships and each of
/// those groups. `None` for every other request (answered from memory,
/// or by the commit pipeline). The shard shares these rows out per turn,
/// so that a client pipelining big pages waits for its own turn instead
/// of holding everyone else's (protocol/README.md §9, "Fairness").
pub fn page_cost(body: &Body) -> Option<usize> {
    match body {
        Body::Sync(r) => Some(sync_limit(r.limit)),
        Body::GetReceipts(r) => Some(page_limit(r.members_limit, MAX_INFO_MEMBERS)),
        Body::GetGroup(r) => Some(page_limit(r.members_limit, MAX_INFO_MEMBERS)),
        Body::ListGroups(r) => Some(page_limit(r.limit, MAX_GROUPS_PAGE)),
        _ => None,
    }
}

/// What a request that fans out to a group costs the shard's turn, in rows
/// the group commit writes for it: a post writes an inbox row for each
/// member (and pushes to each online device); a group change writes the
/// whole group and a `GroupEvent` in the inbox of every member. Two clients
/// posting back to back to groups of 500 held their shards in group
/// commits of 12-20 ms and raised the honest users' p99 from about 2 to
/// 262-632 ms; the shard prices these in frame tokens and shares them out
/// per turn like pages. `None` for anything else (a 1:1 `Send` writes a few
/// rows, which the requests in flight bound), and for a group this node
/// does not know or does not write (a cluster's group homed elsewhere).
pub fn fanout_cost<N: NodeServices>(body: &Body, node: &N) -> Option<usize> {
    let members = |id: u64| match node.home_of_group(id) {
        Home::Remote { .. } => None,
        _ => node.group(id).ok().flatten().map(|g| g.len()),
    };
    match body {
        Body::Send(s) if s.group_id != 0 => members(s.group_id),
        Body::CreateGroup(r) => Some(1 + r.members.len()),
        Body::AddMembers(r) => members(r.group_id).map(|n| n + r.users.len()),
        Body::RemoveMembers(r) => members(r.group_id),
        Body::LeaveGroup(r) => members(r.group_id),
        Body::RenameGroup(r) => members(r.group_id),
        _ => None,
    }
}

/// The most events a Sync asking for `limit` reads (see [`page_cost`]).
pub fn sync_limit(limit: u32) -> usize {
    let limit = match limit {
        0 => DEFAULT_SYNC_LIMIT,
        n => n.min(MAX_SYNC_LIMIT),
    };
    limit as usize
}

/// One Sync page of `user`'s inbox (shared with the HTTP sync endpoint).
pub fn sync_page<N: NodeServices>(
    node: &N,
    user: &str,
    after: u64,
    limit: u32,
) -> Result<pb::SyncBatch, crate::store::StoreError> {
    let limit = sync_limit(limit);
    let max_bytes = node.limits().max_frame.saturating_sub(FRAME_OVERHEAD);
    // Page, head and first available seq from one snapshot: the gap a
    // client computes from them is exactly what retention removed.
    let page = node.inbox_page(user, after, limit, max_bytes)?;
    Ok(pb::SyncBatch {
        events: page.events,
        has_more: page.has_more,
        head_seq: page.head,
        first_available_seq: page.first_available,
        inbox_epoch: node.inbox_epoch(),
    })
}

fn get_group<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    req: pb::GetGroup,
    node: &N,
) -> Flow {
    let id = req.group_id;
    let Some(user) = conn.user.clone() else {
        return Flow::Continue;
    };
    if matches!(node.home_of_group(id), Home::Remote { .. }) {
        // Its home holds it: the pipeline forwards the read there, and the
        // answer comes back the same way.
        return submit(conn, slot, rid, Op::GetGroup(req), node);
    }
    // Membership first, by one point read: a non-member loads nothing and
    // learns nothing (not even whether the group exists).
    match node.is_member(&user, id) {
        Err(e) => return store_error(conn, rid, e),
        Ok(false) => return no_such_group(conn, rid),
        Ok(true) => {}
    }
    match node.group(id) {
        Err(e) => store_error(conn, rid, e),
        Ok(Some(g)) if g.is_member(&user) => {
            let page = g.info_page(&req.members_after, req.members_limit);
            queue(conn, &Envelope::new(rid, Body::GroupInfo(page)));
            Flow::Continue
        }
        Ok(_) => no_such_group(conn, rid),
    }
}

/// The one answer for a group that does not exist and for one the user is
/// not in, so that non-members cannot probe which groups exist.
fn no_such_group<O: Output>(conn: &mut Session<'_, O>, rid: u64) -> Flow {
    request_error(
        conn,
        rid,
        ErrorCode::NotFound,
        "no such group, or not a member of it",
    )
}

/// Most groups one GroupList holds (a GroupInfo without members is at most
/// about 200 bytes, so a page stays inside a frame).
const MAX_GROUPS_PAGE: usize = 250;

fn list_groups<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    rid: u64,
    req: pb::ListGroups,
    node: &N,
) -> Flow {
    let Some(user) = conn.user.clone() else {
        return Flow::Continue;
    };
    let limit = page_limit(req.limit, MAX_GROUPS_PAGE);
    // One page of the user's memberships, not all of them.
    let page = node
        .memberships_page(&user, req.after_group_id, limit)
        .and_then(|(ids, more)| {
            let mut groups = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(g) = node.group(id)? {
                    groups.push(g.info(false));
                }
            }
            Ok(pb::GroupList { groups, more })
        });
    match page {
        Ok(page) => {
            queue(conn, &Envelope::new(rid, Body::GroupList(page)));
            Flow::Continue
        }
        Err(e) => store_error(conn, rid, e),
    }
}

fn get_receipts<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    rid: u64,
    req: pb::GetReceipts,
    node: &N,
) -> Flow {
    let Some(user) = conn.user.clone() else {
        return Flow::Continue;
    };
    if let Some(refused) = group_elsewhere(conn, rid, req.group_id, node) {
        return refused;
    }
    // Membership first, by one point read: a non-member learns nothing,
    // not even whether the group or the message exists.
    match node.is_member(&user, req.group_id) {
        Err(e) => return store_error(conn, rid, e),
        Ok(false) => return no_such_group(conn, rid),
        Ok(true) => {}
    }
    let msg = match node.message(req.message_id) {
        Err(e) => return store_error(conn, rid, e),
        Ok(Some(m)) if m.group_id == req.group_id && req.group_id != 0 => m,
        Ok(_) => {
            return request_error(
                conn,
                rid,
                ErrorCode::NotFound,
                "no such message in that group",
            )
        }
    };
    if *msg.from_user != *user {
        return request_error(
            conn,
            rid,
            ErrorCode::Forbidden,
            "only the sender sees a message's receipts",
        );
    }
    let group = match node.group(req.group_id) {
        Err(e) => return store_error(conn, rid, e),
        Ok(Some(g)) if g.is_member(&user) => g,
        Ok(_) => return no_such_group(conn, rid),
    };
    let limit = page_limit(req.members_limit, MAX_INFO_MEMBERS);
    // Members who joined after the message never had it: not listed.
    let mut rest = group
        .members_after(&req.members_after)
        .iter()
        .map(|m| &**m)
        .filter(|m| *m != &*user && group.joined_after(m) < msg.id)
        .peekable();
    let members: Vec<&str> = rest.by_ref().take(limit).collect();
    let more_members = rest.peek().is_some();
    let marks = match node.watermarks(&keys::group_conversation(group.id), &members) {
        Ok(m) => m,
        Err(e) => return store_error(conn, rid, e),
    };
    let mut list = pb::ReceiptList {
        message_id: msg.id,
        more_members,
        last_member: members.last().map(|m| m.to_string()).unwrap_or_default(),
        ..Default::default()
    };
    for (m, (delivered, read)) in members.into_iter().zip(marks) {
        if read >= msg.id {
            list.read.push(m.to_owned());
        } else if delivered >= msg.id {
            list.delivered.push(m.to_owned());
        } else {
            list.pending.push(m.to_owned());
        }
    }
    queue(conn, &Envelope::new(rid, Body::ReceiptList(list)));
    Flow::Continue
}

fn typing<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    t: pb::Typing,
    node: &N,
    local: &mut ShardSessions,
    now: u32,
) -> Flow {
    let Some(user) = conn.user.clone() else {
        return Flow::Continue;
    };
    if !conn.take_typing_tokens(1) {
        return request_error(
            conn,
            rid,
            ErrorCode::RateLimited,
            "too many typing notices; slow down",
        );
    }
    let target = match t.conversation.and_then(|c| c.kind) {
        Some(conversation::Kind::User(u)) if valid_id(&u) => TypingTarget::User(Arc::from(u)),
        Some(conversation::Kind::GroupId(id)) if group_elsewhere(conn, rid, id, node).is_some() => {
            return Flow::Continue
        }
        Some(conversation::Kind::GroupId(id)) => match node.is_member(&user, id) {
            Err(e) => return store_error(conn, rid, e),
            Ok(true) => TypingTarget::Group(id),
            Ok(false) => return no_such_group(conn, rid),
        },
        _ => {
            return request_error(
                conn,
                rid,
                ErrorCode::InvalidRequest,
                "Typing needs a conversation",
            )
        }
    };
    let state = TypingState::try_from(t.state).unwrap_or(TypingState::Unspecified);
    let key = (slot, conn.gen);
    match state {
        TypingState::Started => {
            let deadline = now + crate::clock::ticks(node.limits().typing_ttl_ms);
            local.typing_due.push_back((deadline, key));
            if let Some(old) = local.typing.insert(
                key,
                Typist {
                    user: user.clone(),
                    target: target.clone(),
                    deadline,
                },
            ) {
                if old.target != target {
                    send_typing(
                        node,
                        &mut local.conns,
                        &old.user,
                        &old.target,
                        TypingState::Stopped,
                    );
                }
            }
            send_typing(node, &mut local.conns, &user, &target, TypingState::Started);
        }
        TypingState::Stopped => {
            local.typing.remove(&key);
            send_typing(node, &mut local.conns, &user, &target, TypingState::Stopped);
        }
        TypingState::Unspecified => {
            return request_error(
                conn,
                rid,
                ErrorCode::InvalidRequest,
                "state must be STARTED or STOPPED",
            )
        }
    }
    Flow::Continue
}

/// Push a TypingNotice from `typist` to the other party or the group's
/// online members (not to the typist's own devices).
pub fn send_typing<N: NodeServices>(
    node: &N,
    conns: &mut Vec<ConnRef>,
    typist: &str,
    target: &TypingTarget,
    state: TypingState,
) {
    let (conversation, group) = match target {
        // Never to the typist's own devices.
        TypingTarget::User(peer) if **peer == *typist => return,
        TypingTarget::User(_) => (conversation::Kind::User(typist.to_owned()), None),
        TypingTarget::Group(id) => {
            let Ok(Some(g)) = node.group(*id) else {
                return;
            };
            (conversation::Kind::GroupId(*id), Some(g))
        }
    };
    let frame = frame_bytes(&Envelope::new(
        0,
        Body::TypingNotice(pb::TypingNotice {
            conversation: Some(pb::Conversation {
                kind: Some(conversation),
            }),
            user: typist.to_owned(),
            state: state as i32,
            expires_in_ms: if state == TypingState::Started {
                node.limits().typing_ttl_ms as u32
            } else {
                0
            },
        }),
    ));
    // Each branch passes its own concrete iterator: no allocation per
    // notice for a boxed one.
    match (target, group) {
        (TypingTarget::User(peer), _) => {
            node.notify_users(&mut std::iter::once(&**peer), conns, frame);
        }
        (TypingTarget::Group(_), Some(g)) => {
            let mut others = g.members().map(|m| &**m).filter(|m| *m != typist);
            node.notify_users(&mut others, conns, frame);
        }
        (TypingTarget::Group(_), None) => {}
    }
}

/// Tell the watchers of `user` that they came online or went offline.
pub fn notify_presence<N: NodeServices>(node: &N, user: &str, online: bool, last_seen_ms: u64) {
    node.notify_watchers(user, &mut || {
        frame_bytes(&Envelope::new(
            0,
            Body::Presence(pb::Presence {
                user: user.to_owned(),
                online,
                last_seen_ms,
            }),
        ))
    });
}

/// Tell the watchers of `user` that they went offline at `at_ms` (or with
/// no time, if they hide it). The privacy flag is read only when someone
/// is watching, so a reconnect storm of unwatched users costs no reads.
pub fn notify_offline<N: NodeServices>(node: &N, user: &str, at_ms: u64) {
    node.notify_watchers(user, &mut || {
        let hidden = node.last_seen(user).map(|(_, hide)| hide).unwrap_or(true);
        frame_bytes(&Envelope::new(
            0,
            Body::Presence(pb::Presence {
                user: user.to_owned(),
                online: false,
                last_seen_ms: if hidden { 0 } else { at_ms },
            }),
        ))
    });
}

/// The presence of `user` as others may see it.
fn presence_of<N: NodeServices>(
    node: &N,
    user: &str,
) -> Result<pb::Presence, crate::store::StoreError> {
    let online = node.is_online(user);
    let last_seen_ms = if online {
        0
    } else {
        let (at, hide) = node.last_seen(user)?;
        if hide {
            0
        } else {
            at
        }
    };
    Ok(pb::Presence {
        user: user.to_owned(),
        online,
        last_seen_ms,
    })
}

/// Drop every presence subscription in `watching` (a connection's).
pub fn unsubscribe_all<N: NodeServices>(
    watching: &mut Option<Box<Vec<Arc<str>>>>,
    me: ConnRef,
    node: &N,
) {
    if let Some(old) = watching.take() {
        for u in old.iter() {
            node.unwatch(u, me);
        }
    }
}

/// The largest the `PresenceList` answering a subscription to `users`
/// (request `rid`) can be, as an Envelope: each user with `online` set and
/// a `last_seen_ms` of any size. Depends on the request alone, so whether
/// a subscription fits never depends on who is online.
pub fn presence_answer_max(rid: u64, users: &[String]) -> usize {
    use prost::encoding::encoded_len_varint;
    let list: usize = users
        .iter()
        .map(|u| {
            // user (tag, length, bytes), online (2), last_seen_ms (tag + 10).
            let presence = 1 + encoded_len_varint(u.len() as u64) + u.len() + 2 + 11;
            1 + encoded_len_varint(presence as u64) + presence
        })
        .sum();
    // request_id, then the presence_list field (a two-byte tag).
    1 + encoded_len_varint(rid) + 2 + encoded_len_varint(list as u64) + list
}

fn subscribe_presence<O: Output, N: NodeServices>(
    conn: &mut Session<'_, O>,
    slot: u32,
    rid: u64,
    users: Vec<String>,
    node: &N,
) -> Flow {
    if users.len() > MAX_PRESENCE_SUBSCRIPTIONS {
        return request_error(
            conn,
            rid,
            ErrorCode::LimitExceeded,
            "at most 1,000 presence subscriptions",
        );
    }
    if users.iter().any(|u| !valid_id(u)) {
        return request_error(
            conn,
            rid,
            ErrorCode::InvalidRecipient,
            "not a valid user id",
        );
    }
    if presence_answer_max(rid, &users) > node.limits().max_frame {
        // No answer may be larger than the frame limit the client was told.
        return request_error(
            conn,
            rid,
            ErrorCode::LimitExceeded,
            "the answer for these users would not fit in a frame; watch fewer",
        );
    }
    if !conn.take_typing_tokens(PRESENCE_TOKENS) {
        return request_error(
            conn,
            rid,
            ErrorCode::RateLimited,
            "too many presence subscriptions; slow down",
        );
    }
    let me = me(conn, slot, node);
    unsubscribe_all(conn.watching, me, node);
    // Subscribed before each read, so a change right after the read is
    // pushed; if a read fails, every subscription made here is undone.
    let mut watching: Vec<Arc<str>> = Vec::with_capacity(users.len());
    let mut list = pb::PresenceList::default();
    for u in &users {
        if watching.iter().any(|w| **w == **u) {
            continue;
        }
        watching.push(node.watch(u, me));
        match presence_of(node, u) {
            Ok(p) => list.users.push(p),
            Err(e) => {
                for w in &watching {
                    node.unwatch(w, me);
                }
                return store_error(conn, rid, e);
            }
        }
    }
    if !watching.is_empty() {
        *conn.watching = Some(Box::new(watching));
    }
    queue(conn, &Envelope::new(rid, Body::PresenceList(list)));
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::scripted::ScriptedNode;
    use prost::Message as _;

    #[test]
    fn a_post_and_a_group_change_cost_a_row_per_member_and_nothing_else_does() {
        let mut node = ScriptedNode::new(crate::session::request_props::limits(4));
        let members: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        let names: Vec<&str> = members.iter().map(String::as_str).collect();
        node.add_group(7, &names);
        node.remote_groups.insert(8);
        let post = |group_id| {
            Body::Send(pb::Send {
                group_id,
                ..Default::default()
            })
        };
        assert_eq!(fanout_cost(&post(7), &node), Some(40));
        assert_eq!(fanout_cost(&post(0), &node), None, "1:1");
        assert_eq!(fanout_cost(&post(8), &node), None, "homed elsewhere");
        assert_eq!(fanout_cost(&post(9), &node), None, "no such group");
        let create = Body::CreateGroup(pb::CreateGroup {
            name: "g".into(),
            members: vec!["a".into(), "b".into()],
        });
        assert_eq!(fanout_cost(&create, &node), Some(3));
        let add = Body::AddMembers(pb::AddMembers {
            group_id: 7,
            users: vec!["x".into(); 5],
        });
        assert_eq!(fanout_cost(&add, &node), Some(45));
        for change in [
            Body::RemoveMembers(pb::RemoveMembers {
                group_id: 7,
                users: vec!["u1".into()],
            }),
            Body::LeaveGroup(pb::LeaveGroup { group_id: 7 }),
            Body::RenameGroup(pb::RenameGroup {
                group_id: 7,
                name: "n".into(),
            }),
        ] {
            assert_eq!(fanout_cost(&change, &node), Some(40));
        }
        assert_eq!(fanout_cost(&Body::Ping(pb::Ping { nonce: 1 }), &node), None);
    }

    #[test]
    fn the_presence_answer_bound_holds_for_the_largest_answer() {
        for (n, len) in [(0, 1), (1, 1), (3, 64), (200, 64), (1000, 40)] {
            let users: Vec<String> = (0..n).map(|i| format!("{i:0>len$}")).collect();
            let rid = u64::MAX;
            let largest = Envelope::new(
                rid,
                Body::PresenceList(pb::PresenceList {
                    users: users
                        .iter()
                        .map(|u| pb::Presence {
                            user: u.clone(),
                            online: true,
                            last_seen_ms: u64::MAX,
                        })
                        .collect(),
                }),
            );
            assert_eq!(
                presence_answer_max(rid, &users),
                largest.encoded_len(),
                "{n} users of {len} bytes"
            );
        }
    }
}
