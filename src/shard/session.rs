//! The protocol as one connection sees it: what each frame a client sends
//! does, with no socket code. The shard decodes frames and calls [`handle`];
//! responses are encoded into the connection's output buffer, durable work
//! is submitted to the commit pipeline, and anything fatal comes back as
//! [`Flow::Close`] with the code the client is told.

use std::sync::Arc;

use swiftlet_protocol::codec::encode_frame;
use swiftlet_protocol::{pb, Body, Envelope, ErrorCode, PROTOCOL_VERSION};

use super::conn::{Conn, Phase};
use super::ShardCtx;
use crate::auth::valid_id;
use crate::commit::{CommitCmd, SubmitError};
use crate::registry::ConnRef;

/// What the shard does with the connection after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send a fatal Error with this code and close.
    Close(ErrorCode, String),
}

/// Largest Sync page.
pub const MAX_SYNC_LIMIT: u32 = 500;
const DEFAULT_SYNC_LIMIT: u32 = 100;
/// Room kept in a frame for everything around a message body.
pub const FRAME_OVERHEAD: usize = 1024;
const MAX_CONTENT_TYPE: usize = 128;

/// Append `env` to the connection's output.
pub fn queue(conn: &mut Conn, env: &Envelope) {
    encode_frame(env, &mut conn.outbuf);
}

fn request_error(conn: &mut Conn, request_id: u64, code: ErrorCode, message: &str) -> Flow {
    queue(conn, &Envelope::error(request_id, code, message, false));
    Flow::Continue
}

/// Act on one frame from the client.
pub fn handle(conn: &mut Conn, slot: u32, env: Envelope, ctx: &ShardCtx, now: u32) -> Flow {
    let rid = env.request_id;
    match (conn.phase, env.body) {
        (Phase::Closing, _) => Flow::Continue,
        (Phase::Handshake, Some(Body::Hello(hello))) => login(conn, slot, rid, hello, ctx, now),
        (Phase::Handshake, _) => Flow::Close(
            ErrorCode::ProtocolViolation,
            "the first frame must be Hello".into(),
        ),
        (Phase::Live, Some(Body::Hello(_))) => {
            Flow::Close(ErrorCode::ProtocolViolation, "already logged in".into())
        }
        (Phase::Live, Some(Body::Ping(p))) => {
            queue(
                conn,
                &Envelope::new(rid, Body::Pong(pb::Pong { nonce: p.nonce })),
            );
            Flow::Continue
        }
        (Phase::Live, Some(Body::Send(send))) => submit_send(conn, slot, rid, send, ctx),
        (Phase::Live, Some(Body::DeliveryAck(a))) => delivery_ack(conn, rid, a.up_to, ctx),
        (Phase::Live, Some(Body::Sync(s))) => sync(conn, rid, s, ctx),
        (Phase::Live, Some(_)) => {
            request_error(conn, rid, ErrorCode::InvalidRequest, "not a client request")
        }
        (Phase::Live, None) => request_error(
            conn,
            rid,
            ErrorCode::InvalidRequest,
            "empty or unknown request type",
        ),
    }
}

fn login(conn: &mut Conn, slot: u32, rid: u64, hello: pb::Hello, ctx: &ShardCtx, now: u32) -> Flow {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Flow::Close(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        );
    }
    if !valid_id(&hello.device_id) {
        return Flow::Close(
            ErrorCode::ProtocolViolation,
            "device_id must be 1-64 bytes of [A-Za-z0-9._@-]".into(),
        );
    }
    let user = match ctx.auth.authenticate(&hello.token) {
        Ok(u) => u,
        Err(e) => return Flow::Close(e.code, e.reason),
    };
    let (cursor, head) = match (
        ctx.store.cursor(&user, &hello.device_id),
        ctx.store.last_seq(&user),
    ) {
        (Ok(c), Ok(h)) => (c, h),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "reading a cursor at login failed");
            return Flow::Close(ErrorCode::Internal, "storage error".into());
        }
    };
    let me = ConnRef {
        shard: ctx.id,
        slot,
        gen: conn.gen,
    };
    // Registered before the backlog is read: a message committed from here on
    // is pushed to this connection, and one committed before is in the read.
    let user = ctx.registry.add(&user, me);
    queue(
        conn,
        &Envelope::new(
            rid,
            Body::Welcome(pb::Welcome {
                user_id: user.to_string(),
                device_id: hello.device_id.clone(),
                cursor,
                head_seq: head,
                idle_timeout_ms: ctx.limits.idle_timeout_ms as u32,
                max_frame_bytes: ctx.limits.max_frame as u32,
                server_version: env!("CARGO_PKG_VERSION").into(),
                server_time_ms: crate::ids::unix_ms(),
            }),
        ),
    );
    conn.user = Some(user);
    conn.device = Some(Arc::from(hello.device_id));
    conn.phase = Phase::Live;
    conn.since = now;
    conn.acked = cursor;
    conn.next_seq = cursor + 1;
    // The backlog (possibly empty) is sent by the shard's catch-up.
    conn.lagging = true;
    Flow::Continue
}

fn submit_send(conn: &mut Conn, slot: u32, rid: u64, send: pb::Send, ctx: &ShardCtx) -> Flow {
    if !valid_id(&send.client_msg_id) {
        return request_error(
            conn,
            rid,
            ErrorCode::InvalidRequest,
            "client_msg_id must be 1-64 bytes of [A-Za-z0-9._@-]",
        );
    }
    if !valid_id(&send.to_user) {
        return request_error(
            conn,
            rid,
            ErrorCode::InvalidRecipient,
            "to_user is not a valid user id",
        );
    }
    if send.content_type.len() > MAX_CONTENT_TYPE {
        return request_error(
            conn,
            rid,
            ErrorCode::InvalidRequest,
            "content_type is longer than 128 bytes",
        );
    }
    if send.body.len() > ctx.limits.max_frame.saturating_sub(FRAME_OVERHEAD) {
        return request_error(
            conn,
            rid,
            ErrorCode::BodyTooLarge,
            "body is over the size limit",
        );
    }
    let (Some(user), Some(device)) = (conn.user.clone(), conn.device.clone()) else {
        return Flow::Close(ErrorCode::Internal, "session without a user".into());
    };
    let cmd = CommitCmd::Send {
        reply: ConnRef {
            shard: ctx.id,
            slot,
            gen: conn.gen,
        },
        request_id: rid,
        from_user: user,
        from_device: device,
        send,
    };
    match ctx.commit.submit(cmd) {
        Ok(()) => Flow::Continue,
        Err(SubmitError::Busy) => request_error(
            conn,
            rid,
            ErrorCode::RateLimited,
            "server busy; retry the send",
        ),
        Err(SubmitError::Closed) => request_error(
            conn,
            rid,
            ErrorCode::StoreUnavailable,
            "storage is stopping",
        ),
    }
}

fn delivery_ack(conn: &mut Conn, rid: u64, up_to: u64, ctx: &ShardCtx) -> Flow {
    if up_to >= conn.next_seq {
        return request_error(
            conn,
            rid,
            ErrorCode::InvalidRequest,
            "DeliveryAck beyond the last delivered event",
        );
    }
    if up_to <= conn.acked {
        return Flow::Continue;
    }
    conn.acked = up_to;
    if let (Some(user), Some(device)) = (conn.user.clone(), conn.device.clone()) {
        // A cursor that could not be queued is only a later resume point:
        // the device sees those events again, and acknowledges them again.
        if let Err(e) = ctx.commit.submit(CommitCmd::Cursor {
            user,
            device,
            seq: up_to,
        }) {
            tracing::debug!(error = %e, "cursor update dropped");
        }
    }
    Flow::Continue
}

fn sync(conn: &mut Conn, rid: u64, req: pb::Sync, ctx: &ShardCtx) -> Flow {
    let Some(user) = conn.user.clone() else {
        return Flow::Close(ErrorCode::Internal, "session without a user".into());
    };
    let limit = match req.limit {
        0 => DEFAULT_SYNC_LIMIT,
        n => n.min(MAX_SYNC_LIMIT),
    } as usize;
    let max_bytes = ctx.limits.max_frame.saturating_sub(FRAME_OVERHEAD);
    let page = ctx.store.read_inbox(&user, req.after, limit, max_bytes);
    let bounds = ctx
        .store
        .last_seq(&user)
        .and_then(|h| Ok((h, ctx.store.first_seq(&user)?)));
    match (page, bounds) {
        (Ok(page), Ok((head_seq, first_available_seq))) => {
            queue(
                conn,
                &Envelope::new(
                    rid,
                    Body::SyncBatch(pb::SyncBatch {
                        events: page.events,
                        has_more: page.has_more,
                        head_seq,
                        first_available_seq,
                    }),
                ),
            );
            Flow::Continue
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "sync read failed");
            request_error(conn, rid, ErrorCode::StoreUnavailable, "storage error")
        }
    }
}
