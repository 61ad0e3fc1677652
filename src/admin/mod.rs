//! The operator's API: `/admin/v1/...` on the HTTP port (and on the
//! operator's port, [`ops`], when there is one), behind an admin
//! token (`--admin-token`; unset, the API is off), and the `swiftlet
//! admin` commands that call it ([`client`]) or work on a stopped node's
//! files ([`restore`]).
//!
//! The shards parse the request and check the token ([`Gate`]), then hand
//! it to one admin thread ([`start`]) and go on: a backup or a compaction
//! takes seconds to minutes and must never hold up a shard's loop. The
//! thread answers through the shard's mailbox (`ShardMsg::HttpAnswer`),
//! and acts on connections the same way (`ShardMsg::Sessions`): it never
//! touches a socket. Requests are served one at a time, in arrival order.
//!
//! The token is compared in constant time (both sides hashed, then every
//! byte compared), so the time of a refusal says nothing about how much of
//! a guess was right. The endpoints and their answers are specified in
//! protocol/README.md, section 20 ("Operator API").

pub mod client;
pub mod ops;
pub mod restore;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use sha1::{Digest, Sha1};
use swiftlet_protocol::ErrorCode;

use crate::auth::{valid_id, Revocations};
use crate::bridge::http::{self, Request};
use crate::cursors::Cursors;
use crate::hub::mailbox::{SessionInfo, SessionsOf, ShardHandle, ShardMsg};
use crate::hub::registry::{ConnRef, Registry};
use crate::metrics::Metrics;
use crate::store::Store;

/// Where the operator's API lives on the HTTP port.
pub const PREFIX: &str = "/admin/";

/// Admin requests waiting for the admin thread; more are refused (`429`).
const QUEUE: usize = 64;

/// How long a shard waits for the admin thread's answer before it gives
/// up on the request (a compaction of a large store is the slow one).
pub const WAIT_MS: u64 = 60 * 60 * 1000;

/// How long the admin thread waits for the shards to report on a user's
/// connections.
const SHARD_PATIENCE: Duration = Duration::from_secs(10);

/// The shards' side: is the API on, is the token right, and where to
/// send a request. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    /// SHA-1 of the admin token; `None`: the API is off.
    token: Option<[u8; 20]>,
    jobs: Option<Sender<Job>>,
}

/// One admin request and who waits for its answer.
pub struct Job {
    pub request: Request,
    pub reply: Reply,
}

/// Where an admin answer goes.
pub enum Reply {
    /// A connection on a shard's HTTP port (through its mailbox).
    Shard(ConnRef),
    /// A request on the operator's port ([`ops`]), waiting on its thread.
    Direct(Sender<Vec<u8>>),
}

fn digest(s: &[u8]) -> [u8; 20] {
    Sha1::digest(s).into()
}

impl Gate {
    /// A gate that refuses everything (no token configured).
    pub fn off() -> Self {
        Gate {
            token: None,
            jobs: None,
        }
    }

    /// Whether `req` may go through: `Err` holds the refusal to answer with.
    pub fn check(&self, req: &Request) -> Result<(), Vec<u8>> {
        let Some(want) = &self.token else {
            return Err(http::error(
                ErrorCode::Forbidden,
                "the admin API is off: start the server with --admin-token (or SWIFTLET_ADMIN_TOKEN)",
            ));
        };
        let Some(given) = http::bearer(req) else {
            return Err(http::error(
                ErrorCode::AuthFailed,
                "Authorization: Bearer <admin token> is required",
            ));
        };
        let got = digest(given.as_bytes());
        // Every byte is compared whatever the first difference.
        let diff = got.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(http::error(ErrorCode::AuthFailed, "wrong admin token"));
        }
        Ok(())
    }

    /// Hand `job` to the admin thread; `Err` holds the refusal when it has
    /// too many waiting.
    pub fn submit(&self, job: Job) -> Result<(), Vec<u8>> {
        let busy = || {
            http::error(
                ErrorCode::RateLimited,
                "too many admin requests are waiting; retry later",
            )
        };
        match &self.jobs {
            Some(tx) => tx.try_send(job).map_err(|_| busy()),
            None => Err(busy()),
        }
    }
}

/// What the admin thread works with.
pub struct Node {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub shards: Arc<[ShardHandle]>,
    pub metrics: Arc<Metrics>,
    pub cursors: Arc<Cursors>,
    pub revocations: Arc<Revocations>,
    pub data_dir: PathBuf,
    pub node_id: u16,
}

/// Start the admin thread when `token` is set; the gate the shards use.
/// The thread ends once every gate (every shard) is gone.
pub fn start(token: Option<&str>, node: Node) -> std::io::Result<(Gate, Option<JoinHandle<()>>)> {
    let Some(token) = token else {
        return Ok((Gate::off(), None));
    };
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let handle = std::thread::Builder::new()
        .name("swiftlet-admin".into())
        .spawn(move || serve(node, rx))?;
    Ok((
        Gate {
            token: Some(digest(token.as_bytes())),
            jobs: Some(tx),
        },
        Some(handle),
    ))
}

fn serve(node: Node, jobs: Receiver<Job>) {
    let started = Instant::now();
    for job in jobs {
        let answer = node.answer(&job.request, started);
        match job.reply {
            Reply::Shard(to) => {
                if let Some(shard) = node.shards.get(usize::from(to.shard)) {
                    shard.send(ShardMsg::HttpAnswer { to, answer });
                }
            }
            // Gone when its request timed out or the port stopped.
            Reply::Direct(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bad(message: &str) -> Vec<u8> {
    http::error(ErrorCode::InvalidRequest, message)
}

fn store_failed(what: &str, e: &dyn std::fmt::Display) -> Vec<u8> {
    tracing::error!(error = %e, "admin: {what} failed");
    http::error(ErrorCode::StoreUnavailable, &format!("{what} failed: {e}"))
}

impl Node {
    /// The HTTP answer to one admin request.
    fn answer(&self, req: &Request, started: Instant) -> Vec<u8> {
        let path = req.path.strip_prefix("/admin/v1/").unwrap_or("");
        let parts: Vec<&str> = path.split('/').collect();
        tracing::info!(method = %req.method, path = %req.path, "admin request");
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["stats"]) => self.stats(started),
            ("GET", ["users", user]) => self.user(user),
            ("POST", ["users", user, "disconnect"]) => self.disconnect(user, req),
            ("POST", ["users", user, "revoke"]) => self.revoke(user, req),
            ("POST", ["backup"]) => self.backup(req),
            ("POST", ["compact"]) => self.compact(),
            (_, ["stats"] | ["users", _] | ["users", _, "disconnect" | "revoke"])
            | (_, ["backup" | "compact"]) => {
                http::response(405, "text/plain", b"method not allowed\n")
            }
            _ => http::error(ErrorCode::NotFound, "no such admin endpoint"),
        }
    }

    fn stats(&self, started: Instant) -> Vec<u8> {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.metrics;
        let body = serde_json::json!({
            "node_id": self.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": started.elapsed().as_secs(),
            "shards": self.shards.len(),
            "connections": {
                "tcp": m.tcp_connections.load(Relaxed),
                "websocket": m.ws_connections.load(Relaxed),
            },
            "online_users": self.registry.online_users(),
            "logins": m.logins.load(Relaxed),
            "messages_in": m.messages_in.load(Relaxed),
            "messages_out": m.messages_out.load(Relaxed),
            "store": {
                "writable": self.store.writable(),
                "inbox_epoch": self.store.inbox_epoch().to_string(),
                "engine": self.store.engine_figures(),
            },
            "open_files": crate::metrics::open_files(),
            "max_open_files": crate::metrics::max_open_files(),
            "resident_memory_bytes": crate::metrics::rss_bytes(),
        });
        http::json(200, &body)
    }

    /// Ask every shard holding one of `user`'s connections about them
    /// (and close the matching ones when `close` is set).
    fn sessions(
        &self,
        user: &str,
        device: Option<&str>,
        issued_before: Option<u64>,
        close: Option<(ErrorCode, String)>,
    ) -> Result<Vec<SessionInfo>, Vec<u8>> {
        let mut conns = Vec::new();
        self.registry.lookup(user, &mut conns);
        let mut by_shard: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.shards.len()];
        for c in &conns {
            if let Some(list) = by_shard.get_mut(usize::from(c.shard)) {
                list.push((c.slot, c.gen));
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut asked = 0;
        let user: Arc<str> = Arc::from(user);
        let device: Option<Arc<str>> = device.map(Arc::from);
        for (shard, targets) in self.shards.iter().zip(by_shard) {
            if targets.is_empty() {
                continue;
            }
            shard.send(ShardMsg::Sessions(SessionsOf {
                user: user.clone(),
                targets,
                device: device.clone(),
                issued_before,
                close: close.clone(),
                done: tx.clone(),
            }));
            asked += 1;
        }
        let mut found = Vec::new();
        for _ in 0..asked {
            match rx.recv_timeout(SHARD_PATIENCE) {
                Ok(list) => found.extend(list),
                Err(_) => {
                    return Err(http::error(
                        ErrorCode::Internal,
                        "a shard did not answer about the user's connections",
                    ))
                }
            }
        }
        Ok(found)
    }

    fn user(&self, user: &str) -> Vec<u8> {
        if !valid_id(user) {
            return bad("not a valid user id");
        }
        let read = || -> Result<serde_json::Value, crate::store::StoreError> {
            // Acknowledgements not yet written count (`crate::cursors`
            // writes them up to a second later), also of a device whose
            // first cursor is not written yet.
            let mut cursors: Vec<(String, u64)> = self
                .store
                .device_cursors(user)?
                .into_iter()
                .map(|d| (d.device, d.cursor))
                .collect();
            for (device, acked) in self.cursors.pending(user) {
                match cursors.iter_mut().find(|(d, _)| **d == *device) {
                    Some((_, c)) => *c = (*c).max(acked),
                    None => cursors.push((device.to_string(), acked)),
                }
            }
            cursors.sort();
            let devices: Vec<serde_json::Value> = cursors
                .into_iter()
                .map(|(device, cursor)| serde_json::json!({"device": device, "cursor": cursor}))
                .collect();
            let (last_seen_ms, hides_last_seen) = self.store.presence(user)?;
            Ok(serde_json::json!({
                "user": user,
                "online": self.registry.is_online(user),
                "devices": devices,
                "inbox": {
                    "head": self.store.last_seq(user)?,
                    "first_available": self.store.first_seq(user)?,
                    "size": self.store.inbox_len(user)?,
                },
                "groups": self.store.memberships(user)?.iter().map(u64::to_string).collect::<Vec<_>>(),
                "last_seen_ms": last_seen_ms,
                "hides_last_seen": hides_last_seen,
                "tokens_revoked_before": self.revocations.before(user),
            }))
        };
        let mut body = match read() {
            Ok(b) => b,
            Err(e) => return store_failed("reading the user", &e),
        };
        match self.sessions(user, None, None, None) {
            Ok(list) => body["connections"] = serde_json::json!(list),
            Err(answer) => return answer,
        }
        http::json(200, &body)
    }

    fn disconnect(&self, user: &str, req: &Request) -> Vec<u8> {
        if !valid_id(user) {
            return bad("not a valid user id");
        }
        let device = http::query_param(&req.query, "device");
        if device.is_some_and(|d| !valid_id(d)) {
            return bad("not a valid device id");
        }
        let why = "disconnected by an operator".to_owned();
        match self.sessions(user, device, None, Some((ErrorCode::Disconnected, why))) {
            Ok(closed) => {
                tracing::info!(user, ?device, closed = closed.len(), "admin: disconnected");
                http::json(200, &serde_json::json!({"closed": closed.len()}))
            }
            Err(answer) => answer,
        }
    }

    fn revoke(&self, user: &str, req: &Request) -> Vec<u8> {
        if !valid_id(user) {
            return bad("not a valid user id");
        }
        let before = match http::query_param(&req.query, "before").map(str::parse::<u64>) {
            None => now_secs(),
            Some(Ok(t)) => t,
            Some(Err(_)) => return bad("before is a time in seconds since the Unix epoch"),
        };
        // Durable first: a login that sees the revocation in memory must
        // see it after a restart too.
        if let Err(e) = self.store.put_revocation(user, before) {
            return store_failed("recording the revocation", &e);
        }
        self.revocations.set(user, before);
        let why = format!("tokens issued before {before} were revoked");
        match self.sessions(
            user,
            None,
            Some(before),
            Some((ErrorCode::TokenRevoked, why)),
        ) {
            Ok(closed) => {
                tracing::info!(user, before, closed = closed.len(), "admin: tokens revoked");
                http::json(
                    200,
                    &serde_json::json!({"revoked_before": before, "closed": closed.len()}),
                )
            }
            Err(answer) => answer,
        }
    }

    fn backup(&self, req: &Request) -> Vec<u8> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            dir: PathBuf,
        }
        let dir = match serde_json::from_slice::<Body>(&req.body) {
            Ok(b) => b.dir,
            Err(e) => return bad(&format!("expected {{\"dir\": \"/absolute/path\"}}: {e}")),
        };
        if !dir.is_absolute() {
            return bad("dir must be an absolute path on the server's machine");
        }
        if dir.exists() {
            return bad("dir already exists: a backup goes into a new directory");
        }
        let began = Instant::now();
        match backup_into(&self.store, &self.data_dir, &dir) {
            Ok(secret) => {
                let seconds = began.elapsed().as_secs_f64();
                tracing::info!(dir = %dir.display(), seconds, "admin: backup taken");
                http::json(
                    200,
                    &serde_json::json!({
                        "dir": dir,
                        "secret_copied": secret,
                        "seconds": seconds,
                    }),
                )
            }
            Err(e) => {
                // Nothing half-made is left for a restore to pick up.
                let _ = std::fs::remove_dir_all(&dir);
                store_failed("the backup", &e)
            }
        }
    }

    fn compact(&self) -> Vec<u8> {
        let began = Instant::now();
        match self.store.compact() {
            Ok(()) => {
                let seconds = began.elapsed().as_secs_f64();
                tracing::info!(seconds, "admin: compaction done");
                http::json(200, &serde_json::json!({"seconds": seconds}))
            }
            Err(e) => store_failed("the compaction", &e),
        }
    }
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A backup in `dir`, laid out as a data directory: `dir/db` is a
/// checkpoint of the store, and `dir/jwt.secret` a copy of the node's
/// generated secret when it has one (so the tokens it signed stay valid
/// for a server started on the backup). True when the secret was copied.
pub fn backup_into(store: &Store, data_dir: &Path, dir: &Path) -> Result<bool, BackupError> {
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e| BackupError::Io(what, e)
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    store.checkpoint(&dir.join("db"))?;
    let secret = data_dir.join("jwt.secret");
    if !secret.exists() {
        return Ok(false);
    }
    copy_private(&secret, &dir.join("jwt.secret")).map_err(io("copying", &secret))?;
    Ok(true)
}

/// Copy a file that only its owner may read (mode 0600 from the start).
pub(crate) fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: "/admin/v1/stats".into(),
            authorization: auth.map(str::to_owned),
            ..Request::default()
        }
    }

    #[test]
    fn the_gate_wants_the_exact_token() {
        let status = |r: Result<(), Vec<u8>>| {
            r.err()
                .map(|b| String::from_utf8_lossy(&b[9..12]).into_owned())
        };
        assert_eq!(
            status(Gate::off().check(&request(Some("Bearer x")))),
            Some("403".into())
        );
        let gate = Gate {
            token: Some(digest(b"correct horse battery")),
            jobs: None,
        };
        assert_eq!(status(gate.check(&request(None))), Some("401".into()));
        assert_eq!(
            status(gate.check(&request(Some("Bearer correct horse")))),
            Some("401".into())
        );
        assert_eq!(
            status(gate.check(&request(Some("Basic correct horse battery")))),
            Some("401".into())
        );
        assert_eq!(
            status(gate.check(&request(Some("Bearer correct horse battery")))),
            None
        );
    }
}
