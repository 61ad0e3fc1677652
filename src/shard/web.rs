//! The shard's side of the browser bridge: WebSocket input, and HTTP
//! requests answered on the connection (see `crate::bridge` for why they
//! live on the shards). A WebSocket connection, once upgraded, runs the same
//! session code as TCP; only the framing differs (`Conn::send_frame`).
//!
//! A plain HTTP connection carries one [`Exchange`] (reading the request, a
//! parked long-poll, a send waiting for the pipeline), never a session's
//! fields. It is named in the registry and in a send's origin as
//! `ConnKind::Http`, so the pipeline's answer reaches it typed and is
//! turned into JSON without being encoded and decoded on the way.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use swiftlet_protocol::{Body, ErrorCode};

use super::conn::{Carries, Exchange, Phase, Transport};
use super::session;
use super::{ticks, Shard};
use crate::bridge::{http, web as assets, ws};
use crate::commit::{CommitCmd, Op, Origin};
use crate::hub::mailbox::Answer;
use crate::hub::registry::{ConnKind, ConnRef};
use crate::session::delivery::Delivery;

/// Longest long-poll wait, in seconds.
const MAX_WAIT_S: u64 = 60;

/// The WebSocket close code for a fatal protocol error.
pub fn close_code(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::FrameTooLarge => ws::CLOSE_TOO_BIG,
        ErrorCode::MalformedFrame => ws::CLOSE_INVALID_PAYLOAD,
        ErrorCode::ShuttingDown | ErrorCode::IdleTimeout => ws::CLOSE_GOING_AWAY,
        ErrorCode::Internal => ws::CLOSE_INTERNAL,
        _ => ws::CLOSE_POLICY,
    }
}

impl Shard {
    /// Buffer an HTTP request until it is complete, then answer it.
    pub(super) fn ingest_http(&mut self, slot: usize, n: usize) {
        let max_body = self.ctx.limits.max_frame;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.phase == Phase::Closing || conn.carries != Carries::Http(Exchange::Reading) {
            // One request per connection; anything after it is ignored.
            return;
        }
        conn.extend_partial(&self.scratch[..n]);
        match http::parse(conn.partial(), max_body) {
            Ok(None) => {}
            Ok(Some((req, used))) => {
                if req.method == "GET" && req.path == "/v1/sync" {
                    let limit = http::query_param(&req.query, "limit")
                        .and_then(|l| l.parse::<u64>().ok())
                        .map_or(0, |l| l.min(u64::from(u32::MAX)) as u32);
                    let rows = session::sync_limit(limit);
                    if !self.pages.take(rows) {
                        // The turn's share of page reads is spent: kept as
                        // bytes, parsed and handled first thing next turn.
                        self.ctx.metrics.pages_put_off.fetch_add(1, Relaxed);
                        self.waiting_to_read.push(slot);
                        return;
                    }
                }
                let rest = conn
                    .partial()
                    .get(used..)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                conn.consume_partial(usize::MAX);
                self.ctx
                    .metrics
                    .http_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.handle_http(slot, req, rest);
            }
            Err(e) => self.http_finish(slot, e.answer()),
        }
    }

    fn handle_http(&mut self, slot: usize, req: http::Request, rest: Vec<u8>) {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/ws") => self.upgrade(slot, &req, rest),
            ("GET", "/healthz") => {
                self.http_finish(slot, http::response(200, "text/plain", b"ok\n"))
            }
            ("GET", "/metrics") => {
                let text = self.ctx.metrics.render();
                self.http_finish(
                    slot,
                    http::response(200, "text/plain; version=0.0.4", text.as_bytes()),
                );
            }
            (_, path) if path.starts_with(crate::admin::PREFIX) => self.http_admin(slot, req),
            ("GET", "/v1/sync") => self.http_sync(slot, &req),
            ("POST", "/v1/messages") => self.http_send(slot, &req),
            // Before the page's files: `GET /v1/messages` is a wrong
            // method too, not a missing page.
            (_, "/v1/messages" | "/v1/sync" | "/ws" | "/healthz" | "/metrics") => self.http_finish(
                slot,
                http::response(405, "text/plain", b"method not allowed\n"),
            ),
            ("GET", path) => match assets::asset(path) {
                Some((content_type, body)) => {
                    self.http_finish(slot, http::response(200, content_type, body))
                }
                None => self.http_finish(slot, http::error(ErrorCode::NotFound, "no such page")),
            },
            _ => self.http_finish(slot, http::error(ErrorCode::NotFound, "no such page")),
        }
    }

    /// An operator's request: checked here, answered by the admin thread
    /// (see `crate::admin`), which may take minutes (a backup).
    fn http_admin(&mut self, slot: usize, req: http::Request) {
        if let Err(answer) = self.ctx.admin.check(&req) {
            return self.http_finish(slot, answer);
        }
        let reply = self.conn_ref(slot);
        if let Err(answer) = self.ctx.admin.submit(crate::admin::Job {
            request: req,
            reply: crate::admin::Reply::Shard(reply),
        }) {
            return self.http_finish(slot, answer);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let until = self.now + ticks(crate::admin::WAIT_MS);
        conn.carries = Carries::Http(Exchange::Admin { until });
        super::arm(&mut self.wheel, conn, slot, self.now, until);
    }

    fn upgrade(&mut self, slot: usize, req: &http::Request, rest: Vec<u8>) {
        let key = match (&req.websocket_key, req.upgrade_websocket) {
            (Some(k), true) => k.clone(),
            _ => {
                return self.http_finish(
                    slot,
                    http::error(ErrorCode::InvalidRequest, "expected a WebSocket upgrade"),
                )
            }
        };
        if !http::origin_allowed(req, &self.ctx.limits.allowed_origins) {
            return self.http_finish(
                slot,
                http::error(ErrorCode::Forbidden, "origin not allowed"),
            );
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.out().extend_from_slice(&http::upgrade(&key));
        // The 101 goes out now, before any frame that came behind the
        // request is handled: a fatal error in one discards the output not
        // yet written, and the client must still get the 101 before the
        // Error message and close frame (otherwise it reads them as a
        // broken HTTP answer). A fresh socket takes these ~130 bytes at
        // once (on TLS they are sealed, and sealed records are kept); an
        // error here shows again at the next write, which drops the
        // connection.
        let _ = conn.flush();
        conn.transport = Transport::WebSocket;
        conn.carries = Carries::Frames(Delivery::default());
        // Frames the client sent right behind its request: the connection's
        // input, handled by the shard as soon as this returns.
        conn.keep_input(rest, None);
        // The handshake timer keeps running: Hello is still due.
        self.mark_dirty(slot);
    }

    /// The user a request's bearer token names, or the error answer.
    fn http_user(&self, req: &http::Request) -> Result<String, Vec<u8>> {
        let Some(token) = http::bearer(req) else {
            return Err(http::error(
                ErrorCode::AuthFailed,
                "Authorization: Bearer <token> is required",
            ));
        };
        let user = self
            .ctx
            .auth
            .authenticate(token)
            .map_err(|e| http::error(e.code, &e.reason))?;
        // In a cluster a user is served by their home node only.
        match session::not_home(&self.ctx, &user) {
            Some(refusal) => Err(http::refusal(&refusal)),
            None => Ok(user),
        }
    }

    fn http_sync(&mut self, slot: usize, req: &http::Request) {
        let user = match self.http_user(req) {
            Ok(u) => u,
            Err(answer) => return self.http_finish(slot, answer),
        };
        let num = |name| http::query_param(&req.query, name).map(str::parse::<u64>);
        let (after, limit, wait) = match (num("after"), num("limit"), num("wait")) {
            (Some(Err(_)), _, _) | (_, Some(Err(_)), _) | (_, _, Some(Err(_))) => {
                return self.http_finish(
                    slot,
                    http::error(
                        ErrorCode::InvalidRequest,
                        "after, limit and wait are numbers",
                    ),
                )
            }
            (a, l, w) => (
                a.and_then(Result::ok).unwrap_or(0),
                l.and_then(Result::ok).unwrap_or(0).min(u64::from(u32::MAX)) as u32,
                w.and_then(Result::ok).unwrap_or(0).min(MAX_WAIT_S),
            ),
        };
        let me = self.conn_ref(slot);
        // Registered before the read, like a device at login: an event
        // committed from here on wakes the poll, one before is in the page.
        // A poll is not presence (`ConnRef::presence`), but it counts
        // against the user's connection limit like a device.
        let user = if wait > 0 {
            let added = self.ctx.registry.add(&user, me);
            if added.conns > self.ctx.limits.max_conns_per_user {
                self.ctx.registry.remove(&added.user, me);
                return self.http_finish(
                    slot,
                    http::error(
                        ErrorCode::TooManyConnections,
                        "this user has the most connections allowed",
                    ),
                );
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                self.ctx.registry.remove(&added.user, me);
                return;
            };
            conn.user = Some(added.user.clone());
            added.user
        } else {
            Arc::from(user)
        };
        let page = match session::sync_page(&self.ctx, &user, after, limit) {
            Ok(p) => p,
            Err(e) => {
                crate::log_every!(1000, error, error = %e, "sync read failed");
                return self.http_finish(
                    slot,
                    http::error(ErrorCode::StoreUnavailable, "storage error"),
                );
            }
        };
        if !page.events.is_empty() || wait == 0 {
            return self.http_finish(slot, http::json(200, &page));
        }
        // Park until a push for this user or the wait ends.
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let until = self.now + ticks(wait * 1000);
        conn.carries = Carries::Http(Exchange::Poll {
            after,
            until,
            // What a page holds at most anyway.
            limit: limit.min(session::MAX_SYNC_LIMIT) as u16,
        });
        super::arm(&mut self.wheel, conn, slot, self.now, until);
    }

    /// A parked long-poll's user got an event: answer with the page.
    pub(super) fn http_wake(&mut self, slot: usize) {
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        let (Some(user), Some(Exchange::Poll { after, limit, .. })) =
            (conn.user.clone(), conn.carries.exchange())
        else {
            return;
        };
        let limit = u32::from(limit);
        // Charged, never put off: the poll was parked already.
        self.pages.charge(session::sync_limit(limit));
        let answer = match session::sync_page(&self.ctx, &user, after, limit) {
            Ok(page) => http::json(200, &page),
            Err(_) => http::error(ErrorCode::StoreUnavailable, "storage error"),
        };
        self.http_finish(slot, answer);
    }

    /// A long-poll's wait ended (empty page), or a send got no answer.
    pub(super) fn http_timeout(&mut self, slot: usize) {
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        if matches!(conn.carries, Carries::Http(Exchange::Poll { .. })) {
            self.http_wake(slot);
        } else if matches!(conn.carries, Carries::Http(Exchange::Admin { .. })) {
            self.http_finish(
                slot,
                http::error(
                    ErrorCode::Unavailable,
                    "the admin request did not finish in time; it may still complete",
                ),
            );
        } else {
            self.http_finish(
                slot,
                http::error(
                    ErrorCode::StoreUnavailable,
                    "no answer from storage in time",
                ),
            );
        }
    }

    fn http_send(&mut self, slot: usize, req: &http::Request) {
        let user = match self.http_user(req) {
            Ok(u) => u,
            Err(answer) => return self.http_finish(slot, answer),
        };
        let send = match http::parse_send(&req.body) {
            Ok(s) => s,
            Err(e) => {
                return self.http_finish(
                    slot,
                    http::error(ErrorCode::InvalidRequest, &format!("bad JSON: {e}")),
                )
            }
        };
        if let Some((code, why)) = session::check_send(&send, &self.ctx.limits) {
            return self.http_finish(slot, http::error(code, why));
        }
        let origin = Origin {
            reply: self.conn_ref(slot),
            request_id: 1,
            user: Arc::from(user),
            device: Arc::from("http"),
            received: self.ctx.clock.now(),
            from: None,
        };
        if let Err(e) = self
            .ctx
            .commit
            .submit(CommitCmd::Request(origin, Op::Send(send)))
        {
            return self.http_finish(slot, http::error(ErrorCode::RateLimited, &e.to_string()));
        }
        let idle = ticks(self.ctx.limits.idle_timeout_ms);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        // Waiting for the pipeline's answer; not in the registry, so
        // nothing is pushed to it.
        let until = self.now + idle;
        conn.carries = Carries::Http(Exchange::Send { until });
        super::arm(&mut self.wheel, conn, slot, self.now, until);
    }

    /// The pipeline's answer to `POST /v1/messages`, as HTTP. It comes
    /// typed (the connection's `ConnKind::Http` asked for that), so nothing
    /// is decoded here.
    pub(super) fn http_reply(&mut self, slot: usize, answer: Answer) {
        let body = match answer {
            Answer::Typed(env) => env.body,
            Answer::Frame(_) => None,
        };
        let answer = match body {
            Some(Body::Ack(ack)) => http::json(200, &ack),
            Some(Body::Error(e)) => http::error(
                ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal),
                &e.message,
            ),
            _ => http::error(ErrorCode::Internal, "unexpected answer"),
        };
        self.http_finish(slot, answer);
    }

    /// Write `answer` and close the connection.
    pub(super) fn http_finish(&mut self, slot: usize, answer: Vec<u8>) {
        self.logout(slot);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.discard_buffers();
        conn.out().extend_from_slice(&answer);
        conn.phase = Phase::Closing;
        let flushed = conn.flush();
        conn.shutdown_when_flushed();
        match flushed {
            Err(_) => self.drop_conn(slot),
            Ok(_) => {
                super::arm_grace(&mut self.wheel, conn, slot, self.now);
                self.mark_dirty(slot);
            }
        }
    }

    fn conn_ref(&self, slot: usize) -> ConnRef {
        ConnRef {
            shard: self.ctx.id,
            slot: slot as u32,
            gen: self.conns.get(slot).map_or(0, |c| c.gen),
            kind: ConnKind::Http,
        }
    }
}
