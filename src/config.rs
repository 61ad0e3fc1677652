//! Server configuration: one set of documented defaults, overridden by an
//! optional TOML file, then by environment variables, then by flags.
//!
//! [`Config::default`] is the single source of the defaults;
//! [`Config::to_toml`] prints them (`swiftlet config --print-defaults`) and
//! README.md's configuration table mirrors that (tests/config.rs checks
//! both ways). A bad key or value is refused before anything starts, with
//! an error naming the key ([`ConfigError::Invalid`], or toml's own error,
//! which quotes the offending line). Flags and environment variables are parsed
//! by clap ([`ServeArgs`]); every field there is optional so that "not given"
//! can fall through to the file and then to the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
pub use crate::store::WalSync;

/// Everything `swiftlet serve` needs to run.
///
/// Serialized only by [`Config::to_toml`] (`swiftlet config
/// --print-defaults`): the secret is never serialized, unset options are
/// left out (TOML has no null), and the clock is not configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP address of the protocol.
    pub listen: SocketAddr,
    /// HTTP address: WebSocket bridge, HTTP sync, web page, metrics.
    pub http: SocketAddr,
    /// Origins allowed to open a WebSocket besides the server's own page
    /// (`*` allows any: only for development).
    pub allowed_origins: Vec<String>,
    /// Directory of the RocksDB database (created if missing).
    pub data_dir: PathBuf,
    /// Event-loop shards; 0 means one per available core.
    pub shards: usize,
    /// Accept a bare user id as a token. For demos and load tests only.
    pub dev_auth: bool,
    /// Allow `dev_auth` on addresses other than loopback ones, where anyone
    /// who can reach the server could log in as anyone.
    pub dev_auth_public: bool,
    /// HS256 secret for login tokens. When unset, a random secret is created
    /// in `<data_dir>/jwt.secret` and reused from there. Never serialized:
    /// a printed configuration must be safe to paste into a ticket.
    #[serde(skip_serializing)]
    pub jwt_secret: Option<String>,
    /// Bearer token of the operator's API (`/admin/v1/...` on the HTTP
    /// port, `swiftlet admin`). Unset: the API is off. Never serialized,
    /// like the JWT secret.
    #[serde(skip_serializing)]
    pub admin_token: Option<String>,
    /// Close a logged-in connection that sent nothing for this long.
    pub idle_timeout_ms: u64,
    /// Close a connection that has not sent Hello within this long.
    pub handshake_timeout_ms: u64,
    /// A frame whose first byte arrived must be complete within this long
    /// (bytes of an unfinished frame are not activity).
    pub frame_timeout_ms: u64,
    /// Most connections one user may hold at once (devices, WebSockets,
    /// parked long-polls): every push to the user goes to each of them.
    pub max_conns_per_user: usize,
    /// Most connections the node holds, of every transport, logged in or
    /// not; one past it is refused at accept. 0: the process's open-file
    /// limit less 1,024 (kept for RocksDB, listeners and links), so the
    /// node refuses cleanly before it runs out of files.
    pub max_connections: usize,
    /// Most connections from one source address; 0: no cap. Off by
    /// default: carrier-grade NAT puts thousands of phones behind one
    /// address.
    pub max_conns_per_ip: usize,
    /// Connections refused (past `max_connections` or `max_conns_per_ip`)
    /// per second at most; past it the node accepts nothing until its next
    /// 100 ms tick, and connection attempts wait in the kernel's listen
    /// backlog. 0: no limit.
    pub max_refusals_per_sec: u32,
    /// Frames one connection may send per second, in a token bucket that
    /// holds one second's worth and earns it back continuously; a
    /// connection over it is not read until it has earned more. 0: no limit.
    pub max_frames_per_sec: u32,
    /// Largest accepted frame, in bytes.
    pub max_frame: usize,
    /// Stop live pushes to a connection once this many bytes wait to be sent
    /// to it; it resumes from the store when it drains.
    pub push_buffer_bytes: usize,
    /// When the write-ahead log is synced to disk, which decides whether an
    /// Ack survives a power loss (see [`WalSync`]).
    #[serde(serialize_with = "wal_sync_name")]
    pub wal_sync: WalSync,
    /// The sync period of [`WalSync::Interval`]: the most a power loss can
    /// take back of what was acknowledged.
    pub wal_sync_interval_ms: u64,
    /// Directory of RocksDB's write-ahead log, for a separate (fast) device:
    /// every Ack waits for its WAL write. Unset: inside `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_dir: Option<PathBuf>,
    /// One budget for RocksDB's memtables over every column family: past
    /// about seven eighths of it the oldest memtable is flushed (never a
    /// write stall), so the store's write buffers stay near it at most
    /// instead of up to 32 MiB per column family. 0: no overall budget.
    pub memtable_budget_bytes: usize,
    /// RocksDB's block cache, shared by every column family: data blocks
    /// read, and every SST's index and bloom filter blocks, so it bounds
    /// what the store's reads hold in memory.
    pub block_cache_bytes: usize,
    /// This node's id (0-1023), part of every message id.
    pub node_id: u16,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// A typing indicator lapses this long after its last STARTED.
    pub typing_ttl_ms: u64,
    /// Join a cluster through the Redis at this URL (`redis://host:port`).
    /// Unset: a single node, no Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Where clients redirected to this node connect, as
    /// `TCP_ADDR,HTTP_ADDR`. Unset: the addresses it listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The operator's port: `/metrics`, `/healthz` and the admin API on a
    /// listener outside the client ports' caps (see `crate::admin::ops`).
    /// Unset: they are only on the HTTP port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_listen: Option<SocketAddr>,
    /// How long one renewal of the node's cluster lease lasts: a node that
    /// cannot reach Redis for this long stops writing.
    pub lease_ms: u64,
    /// The deadline of every call to Redis.
    pub redis_timeout_ms: u64,
    /// PEM certificate chain (leaf first) served on both listeners, which
    /// then speak only TLS (TCP+TLS, HTTPS, WSS). Read again on SIGHUP.
    /// Unset: plain TCP and HTTP (a trusted network, or TLS terminated in
    /// front of the node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1). Read again
    /// on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The newest events kept per inbox; 0 keeps every event (see
    /// `crate::store::retention`).
    pub inbox_keep: u64,
    /// Inbox events older than this go (the newest of an inbox stays);
    /// 0 keeps events whatever their age.
    pub inbox_max_age: Span,
    /// A retry of a send with the same client_msg_id is answered with the
    /// first Ack for at least this long after it; 0: forever.
    pub dedup_window: Span,
    /// What the node reads the time from: the shards' loops and timers,
    /// the pipeline's timestamps and ids, fan-out and latency timing. The
    /// system clock, except in tests that start a server in-process with a
    /// [`ManualClock`](crate::clock::ManualClock) so timeouts fire without
    /// waiting. Neither a flag nor a file key.
    #[serde(skip)]
    pub clock: Clock,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            http: SocketAddr::from(([127, 0, 0, 1], 7480)),
            allowed_origins: Vec::new(),
            data_dir: PathBuf::from("./data"),
            shards: 0,
            dev_auth: false,
            dev_auth_public: false,
            jwt_secret: None,
            admin_token: None,
            idle_timeout_ms: 60_000,
            handshake_timeout_ms: 10_000,
            frame_timeout_ms: 15_000,
            max_conns_per_user: 32,
            max_connections: 0,
            max_conns_per_ip: 0,
            max_refusals_per_sec: 1000,
            max_frames_per_sec: 20_000,
            max_frame: swiftlet_protocol::DEFAULT_MAX_FRAME,
            push_buffer_bytes: 256 * 1024,
            wal_sync: WalSync::Interval,
            wal_sync_interval_ms: 100,
            wal_dir: None,
            memtable_budget_bytes: crate::store::DEFAULT_MEMTABLE_BUDGET,
            block_cache_bytes: crate::store::DEFAULT_BLOCK_CACHE,
            node_id: 0,
            max_group_members: 1024,
            typing_ttl_ms: 6_000,
            cluster: None,
            advertise: None,
            ops_listen: None,
            lease_ms: 15_000,
            redis_timeout_ms: 1_000,
            tls_cert: None,
            tls_key: None,
            // A week of a heavy user's traffic, ~2 MB of references and
            // messages at most: what a phone offline for a month finds.
            inbox_keep: 10_000,
            // What the large messengers hold an undelivered message for.
            inbox_max_age: Span::days(30),
            // Far past any client's retry deadline (the client library's
            // is 60 s; a phone's outbox retries when it is back online),
            // and a day of records, not the whole history.
            dedup_window: Span::days(1),
            clock: Clock::system(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value the server cannot run with, named by its file key, flag and
    /// environment variable (all three spell the same setting).
    #[error(
        "{key} (--{}, SWIFTLET_{}): {reason}",
        .key.replace('_', "-"),
        .key.to_uppercase()
    )]
    Invalid { key: &'static str, reason: String },
    /// Dev-auth lets any client log in as any user; on an address others
    /// can reach, that is everyone's account open to anyone.
    #[error(
        "--dev-auth lets anyone who reaches {addr} log in as any user: listen on a \
         loopback address, or add --dev-auth-public to allow it anyway"
    )]
    DevAuthPublic { addr: SocketAddr },
    /// Whoever reads the secret can mint a token for any user, and whoever
    /// can write it can choose it (the rule ssh applies to private keys).
    #[error(
        "{path} is open to group or others (mode {mode:03o}); it holds the secret \
         that signs every login token: chmod 600 {path}"
    )]
    SecretFileExposed { path: PathBuf, mode: u32 },
}

/// Flags of `swiftlet serve`; each may also come from the environment.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and env win over it).
    #[arg(long, env = "SWIFTLET_CONFIG")]
    pub config: Option<PathBuf>,
    /// TCP address for the protocol [default: 127.0.0.1:7400].
    #[arg(long, env = "SWIFTLET_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP address: WebSocket, HTTP sync, web page, metrics [default: 127.0.0.1:7480].
    #[arg(long, env = "SWIFTLET_HTTP")]
    pub http: Option<SocketAddr>,
    /// An origin allowed to open a WebSocket besides the server's own page
    /// (repeatable; env: comma-separated; `*` allows any).
    #[arg(
        long = "allow-origin",
        env = "SWIFTLET_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Data directory [default: ./data].
    #[arg(long, env = "SWIFTLET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Event-loop shards [default: one per core].
    #[arg(long, env = "SWIFTLET_SHARDS")]
    pub shards: Option<usize>,
    /// Accept bare user ids as tokens (development only; logged loudly).
    #[arg(long, env = "SWIFTLET_DEV_AUTH")]
    pub dev_auth: bool,
    /// Allow --dev-auth on a non-loopback address (anyone who reaches it may log in as anyone).
    #[arg(long, env = "SWIFTLET_DEV_AUTH_PUBLIC")]
    pub dev_auth_public: bool,
    /// HS256 secret for login tokens [default: generated into <data-dir>/jwt.secret].
    #[arg(long, env = "SWIFTLET_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Bearer token of the operator's API (/admin/v1/..., `swiftlet admin`), at least 16 bytes [default: unset, the API is off].
    #[arg(long, env = "SWIFTLET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Idle timeout in milliseconds [default: 60000].
    #[arg(long, env = "SWIFTLET_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Time allowed between connect and Hello, in milliseconds [default: 10000].
    #[arg(long, env = "SWIFTLET_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Time allowed for one frame from its first byte to its last, in milliseconds [default: 15000].
    #[arg(long, env = "SWIFTLET_FRAME_TIMEOUT_MS")]
    pub frame_timeout_ms: Option<u64>,
    /// Most connections per user [default: 32].
    #[arg(long, env = "SWIFTLET_MAX_CONNS_PER_USER")]
    pub max_conns_per_user: Option<usize>,
    /// Most connections the node holds; 0: the open-file limit less 1024 [default: 0].
    #[arg(long, env = "SWIFTLET_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections from one source address; 0: no cap [default: 0].
    #[arg(long, env = "SWIFTLET_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<usize>,
    /// Connections refused at the caps per second at most; past it nothing is accepted until the next 100 ms; 0: no limit [default: 1000].
    #[arg(long, env = "SWIFTLET_MAX_REFUSALS_PER_SEC")]
    pub max_refusals_per_sec: Option<u32>,
    /// Frames per second per connection (a token bucket of one second; a group post or change takes a token per member, a page one per 10 rows, at most the whole bucket); 0: no limit [default: 20000].
    #[arg(long, env = "SWIFTLET_MAX_FRAMES_PER_SEC")]
    pub max_frames_per_sec: Option<u32>,
    /// Largest accepted frame in bytes [default: 65536].
    #[arg(long, env = "SWIFTLET_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Pending output per connection before live pushes pause [default: 262144].
    #[arg(long, env = "SWIFTLET_PUSH_BUFFER_BYTES")]
    pub push_buffer_bytes: Option<usize>,
    /// When to fsync the WAL: off (an Ack survives kill -9, not power loss),
    /// interval (power loss loses at most the last interval), always (an Ack
    /// survives power loss); a bare --wal-sync is always [default: interval].
    #[arg(
        long,
        env = "SWIFTLET_WAL_SYNC",
        num_args = 0..=1,
        default_missing_value = "always",
        value_name = "MODE"
    )]
    pub wal_sync: Option<WalSync>,
    /// Period of --wal-sync interval, in milliseconds [default: 100].
    #[arg(long, env = "SWIFTLET_WAL_SYNC_INTERVAL_MS")]
    pub wal_sync_interval_ms: Option<u64>,
    /// Directory of the write-ahead log, e.g. on a separate fast device [default: inside the data dir].
    #[arg(long, env = "SWIFTLET_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// RocksDB memtables over all column families, in bytes (at least 33554432): past ~7/8 of it the oldest is flushed; 0: no overall budget [default: 67108864].
    #[arg(long, env = "SWIFTLET_MEMTABLE_BUDGET_BYTES")]
    pub memtable_budget_bytes: Option<usize>,
    /// RocksDB's block cache (data, index and filter blocks), in bytes (at least 8388608) [default: 67108864].
    #[arg(long, env = "SWIFTLET_BLOCK_CACHE_BYTES")]
    pub block_cache_bytes: Option<usize>,
    /// Node id, 0-1023 [default: 0].
    #[arg(long, env = "SWIFTLET_NODE_ID")]
    pub node_id: Option<u16>,
    /// Most members per group [default: 1024].
    #[arg(long, env = "SWIFTLET_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<usize>,
    /// Typing indicators lapse after this many ms without a new STARTED [default: 6000].
    #[arg(long, env = "SWIFTLET_TYPING_TTL_MS")]
    pub typing_ttl_ms: Option<u64>,
    /// Join a cluster through this Redis (redis://HOST:PORT); needs a distinct --node-id per node.
    #[arg(long, env = "SWIFTLET_CLUSTER")]
    pub cluster: Option<String>,
    /// Addresses redirected clients use: TCP_ADDR,HTTP_ADDR [default: the listen addresses].
    #[arg(long, env = "SWIFTLET_ADVERTISE")]
    pub advertise: Option<String>,
    /// The operator's port (/metrics, /healthz, admin API), outside the client caps; a private address [default: unset].
    #[arg(long, env = "SWIFTLET_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,
    /// Cluster lease in ms: without Redis for this long a node stops writing [default: 15000].
    #[arg(long, env = "SWIFTLET_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Deadline of every Redis call in ms [default: 1000].
    #[arg(long, env = "SWIFTLET_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// PEM certificate chain: both listeners then speak only TLS; reloaded on SIGHUP [default: plain TCP].
    #[arg(long, env = "SWIFTLET_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; reloaded on SIGHUP.
    #[arg(long, env = "SWIFTLET_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Newest events kept per inbox; 0 keeps all [default: 10000].
    #[arg(long, env = "SWIFTLET_INBOX_KEEP")]
    pub inbox_keep: Option<u64>,
    /// Inbox events older than this go, e.g. 30d, 12h, 90m; 0 keeps them [default: 30d].
    #[arg(long, env = "SWIFTLET_INBOX_MAX_AGE", value_name = "DURATION")]
    pub inbox_max_age: Option<Span>,
    /// How long a send's retry is still answered with its first Ack; 0 forever [default: 1d].
    #[arg(long, env = "SWIFTLET_DEDUP_WINDOW", value_name = "DURATION")]
    pub dedup_window: Option<Span>,
}

impl Config {
    /// Defaults, then the TOML file named by `args.config`, then `args`.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let mut c = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = args.$f.clone() { c.$f = v; } )* };
        }
        take!(
            listen,
            http,
            data_dir,
            shards,
            idle_timeout_ms,
            handshake_timeout_ms,
            frame_timeout_ms,
            max_conns_per_user,
            max_connections,
            max_conns_per_ip,
            max_refusals_per_sec,
            max_frames_per_sec,
            max_frame,
            push_buffer_bytes,
            wal_sync,
            wal_sync_interval_ms,
            memtable_budget_bytes,
            block_cache_bytes,
            node_id,
            max_group_members,
            typing_ttl_ms,
            lease_ms,
            redis_timeout_ms,
            inbox_keep,
            inbox_max_age,
            dedup_window
        );
        if args.cluster.is_some() {
            c.cluster = args.cluster.clone();
        }
        if args.advertise.is_some() {
            c.advertise = args.advertise.clone();
        }
        if args.ops_listen.is_some() {
            c.ops_listen = args.ops_listen;
        }
        if args.jwt_secret.is_some() {
            c.jwt_secret = args.jwt_secret.clone();
        }
        if args.admin_token.is_some() {
            c.admin_token = args.admin_token.clone();
        }
        if args.wal_dir.is_some() {
            c.wal_dir = args.wal_dir.clone();
        }
        if args.tls_cert.is_some() {
            c.tls_cert = args.tls_cert.clone();
        }
        if args.tls_key.is_some() {
            c.tls_key = args.tls_key.clone();
        }
        if !args.allowed_origins.is_empty() {
            c.allowed_origins = args.allowed_origins.clone();
        }
        c.dev_auth |= args.dev_auth;
        c.dev_auth_public |= args.dev_auth_public;
        c.validate()?;
        Ok(c)
    }

    /// Defaults overridden by a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Refuse settings the server cannot run with; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: String) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid { key, reason })
        }
        // Not below the default: the protocol's fixed page sizes (250
        // groups, 500 members, 1,000 presence entries) are chosen so a page
        // of the longest ids fits in 64 KiB, and the server must never send
        // a frame larger than the maximum it advertises.
        if self.max_frame < swiftlet_protocol::DEFAULT_MAX_FRAME || self.max_frame > 16 << 20 {
            return bad(
                "max_frame",
                format!(
                    "{} is not between 65536 (64 KiB) and 16777216 (16 MiB)",
                    self.max_frame
                ),
            );
        }
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return bad(
                    "admin_token",
                    format!(
                        "is {} bytes: use at least 16 (e.g. `openssl rand -hex 32`)",
                        t.len()
                    ),
                );
            }
            if t.bytes().any(|b| !b.is_ascii_graphic()) {
                return bad(
                    "admin_token",
                    "must be printable ASCII without spaces (it travels in an HTTP header)".into(),
                );
            }
        }
        if self.node_id > crate::ids::MAX_NODE {
            return bad(
                "node_id",
                format!("{} is above {}", self.node_id, crate::ids::MAX_NODE),
            );
        }
        for (key, ms) in [
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
            ("typing_ttl_ms", self.typing_ttl_ms),
        ] {
            if ms < 100 {
                return bad(key, format!("{ms} is below 100 ms"));
            }
        }
        if self.max_group_members < 2 || self.max_group_members > 100_000 {
            return bad(
                "max_group_members",
                format!("{} is not between 2 and 100000", self.max_group_members),
            );
        }
        if self.max_frames_per_sec != 0 && !(10..=65_535).contains(&self.max_frames_per_sec) {
            return bad(
                "max_frames_per_sec",
                format!(
                    "{} is not 0 (no limit) or between 10 and 65535",
                    self.max_frames_per_sec
                ),
            );
        }
        if self.max_conns_per_user == 0 {
            return bad("max_conns_per_user", "must be at least 1".into());
        }
        if self.push_buffer_bytes < self.max_frame {
            return bad(
                "push_buffer_bytes",
                format!(
                    "{} is below max_frame ({}): one frame must fit",
                    self.push_buffer_bytes, self.max_frame
                ),
            );
        }
        if self.wal_sync_interval_ms == 0 || self.wal_sync_interval_ms > 60_000 {
            return bad(
                "wal_sync_interval_ms",
                format!("{} is not between 1 and 60000", self.wal_sync_interval_ms),
            );
        }
        let min_budget = crate::store::MIN_MEMTABLE_BUDGET;
        if self.memtable_budget_bytes != 0 && self.memtable_budget_bytes < min_budget {
            return bad(
                "memtable_budget_bytes",
                format!(
                    "{} is below {min_budget}: nearly every write would flush a memtable; 0 means no budget",
                    self.memtable_budget_bytes
                ),
            );
        }
        let min_cache = crate::store::MIN_BLOCK_CACHE;
        if self.block_cache_bytes < min_cache {
            return bad(
                "block_cache_bytes",
                format!(
                    "{} is below {min_cache}: the index and filter blocks alone would not stay cached",
                    self.block_cache_bytes
                ),
            );
        }
        if self.lease_ms < 1_000 || self.lease_ms > 600_000 {
            return bad(
                "lease_ms",
                format!("{} is not between 1000 and 600000", self.lease_ms),
            );
        }
        if self.redis_timeout_ms < 10 || self.redis_timeout_ms * 3 > self.lease_ms {
            return bad(
                "redis_timeout_ms",
                format!(
                    "{} is not between 10 and a third of lease_ms ({})",
                    self.redis_timeout_ms, self.lease_ms
                ),
            );
        }
        for (key, span) in [
            ("inbox_max_age", self.inbox_max_age),
            ("dedup_window", self.dedup_window),
        ] {
            if !span.0.is_zero() && span.0 < std::time::Duration::from_secs(1) {
                return bad(key, format!("{span} is below 1s (0 means no limit)"));
            }
        }
        if let Some(url) = &self.cluster {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return bad("cluster", format!("{url:?} is not a redis:// URL"));
            }
        }
        if let Some(a) = &self.advertise {
            if a.split(',').count() != 2 || a.split(',').any(|p| p.trim().is_empty()) {
                return bad("advertise", format!("{a:?} is not TCP_ADDR,HTTP_ADDR"));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return bad("tls_key", "tls_cert is set: the key is needed too".into())
            }
            (None, Some(_)) => {
                return bad(
                    "tls_cert",
                    "tls_key is set: the certificate is needed too".into(),
                )
            }
            _ => {}
        }
        if self.dev_auth && !self.dev_auth_public {
            // Unspecified (0.0.0.0, ::) is every interface, not loopback.
            if let Some(addr) = [self.listen, self.http]
                .into_iter()
                .find(|a| !a.ip().to_canonical().is_loopback())
            {
                return Err(ConfigError::DevAuthPublic { addr });
            }
        }
        Ok(())
    }

    /// The configuration as a TOML file that `--config` reads back into the
    /// same configuration (`swiftlet config --print-defaults`): every key
    /// with a value, in the order of [`Config`]'s fields, then a comment
    /// for each option that is unset (TOML has no null) saying what unset
    /// means. `jwt_secret` is never printed, only whether it is set.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let mut out = String::from(
            "# swiftlet's configuration: the defaults, overridden by --config,\n\
             # SWIFTLET_* variables and flags. `swiftlet serve --config FILE` reads it back.\n",
        );
        out.push_str(&toml::to_string(self)?);
        let unset = [
            ("jwt_secret", self.jwt_secret.is_none(), UNSET_JWT_SECRET),
            (
                "admin_token",
                self.admin_token.is_none(),
                "the admin API is off",
            ),
            ("wal_dir", self.wal_dir.is_none(), "inside data_dir"),
            ("cluster", self.cluster.is_none(), "one node, no Redis"),
            (
                "advertise",
                self.advertise.is_none(),
                "the listen addresses",
            ),
            (
                "ops_listen",
                self.ops_listen.is_none(),
                "metrics and the admin API only on the HTTP port",
            ),
            (
                "tls_cert",
                self.tls_cert.is_none(),
                "plain TCP and HTTP, no TLS",
            ),
            (
                "tls_key",
                self.tls_key.is_none(),
                "plain TCP and HTTP, no TLS",
            ),
        ];
        for (key, is_unset, meaning) in unset {
            if is_unset {
                out.push_str(&format!("# {key} is unset: {meaning}\n"));
            }
        }
        if self.jwt_secret.is_some() {
            out.push_str(
                "# jwt_secret is set, and not printed: a file read back without it \
                 uses <data_dir>/jwt.secret\n",
            );
        }
        if self.admin_token.is_some() {
            out.push_str(
                "# admin_token is set, and not printed: a file read back without it \
                 has the admin API off\n",
            );
        }
        Ok(out)
    }

    /// Shards to run: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// The JWT secret: configured, or read from (or created in) the data dir.
    pub fn resolve_secret(&self) -> Result<Vec<u8>, ConfigError> {
        if let Some(s) = &self.jwt_secret {
            if s.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "jwt_secret",
                    reason: "is empty".into(),
                });
            }
            return Ok(s.as_bytes().to_vec());
        }
        let path = self.data_dir.join("jwt.secret");
        let io = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        match read_secret_file(&path) {
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::create_dir_all(&self.data_dir).map_err(io)?;
                let secret: String = (0..32)
                    .map(|_| format!("{:02x}", rand::random::<u8>()))
                    .collect();
                // Created owner-only: never readable by anyone else, not
                // even between its creation and a chmod.
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path);
                match created {
                    Ok(mut f) => {
                        f.write_all(secret.as_bytes()).map_err(io)?;
                        f.sync_all().map_err(io)?;
                        Ok(secret.into_bytes())
                    }
                    // Another process (a `swiftlet token` beside a starting
                    // server) created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        read_secret_file(&path)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            other => other,
        }
    }
}

impl Config {
    /// What the store keeps (see `crate::store::retention`).
    pub fn retention(&self) -> crate::store::RetentionPolicy {
        crate::store::RetentionPolicy {
            keep: self.inbox_keep,
            max_age: self.inbox_max_age.0,
            dedup_window: self.dedup_window.0,
        }
    }
}

/// A duration as operators write it: a whole number and a unit, `ms`, `s`,
/// `m`, `h` or `d` (`30d`, `12h`, `1500ms`), or `0` for "no limit". Written
/// back in the largest unit that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub std::time::Duration);

impl Span {
    pub const fn days(n: u64) -> Span {
        Span(std::time::Duration::from_secs(n * 86_400))
    }
}

const SPAN_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Span, String> {
        let t = text.trim();
        if t == "0" {
            return Ok(Span(std::time::Duration::ZERO));
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(digits);
        let bad = || format!("{text:?} is not a duration like 30d, 12h, 90m, 45s, 500ms or 0");
        let n: u64 = n.parse().map_err(|_| bad())?;
        let ms = SPAN_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, ms)| *ms)
            .ok_or_else(bad)?;
        let ms = n.checked_mul(ms).ok_or_else(bad)?;
        Ok(Span(std::time::Duration::from_millis(ms)))
    }
}

impl TryFrom<String> for Span {
    type Error = String;

    fn try_from(s: String) -> Result<Span, String> {
        s.parse()
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        s.to_string()
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0");
        }
        let (unit, per) = SPAN_UNITS
            .iter()
            .find(|(_, per)| ms % per == 0)
            .copied()
            .unwrap_or(("ms", 1));
        write!(f, "{}{unit}", ms / per)
    }
}

/// What an unset `jwt_secret` means (also README.md's default for it).
const UNSET_JWT_SECRET: &str = "generated into <data_dir>/jwt.secret (mode 0600)";

/// A [`WalSync`] as the name its TOML key takes (the store's type is not
/// serializable, and needs to be only here).
fn wal_sync_name<S: serde::Serializer>(w: &WalSync, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(w.name())
}

/// The secret in `path`, refused if anyone but its owner may read or
/// write the file.
fn read_secret_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    // Checked on the open file, so the file read is the file checked.
    let mode = f.metadata().map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::SecretFileExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(io)?;
    match s.trim() {
        "" => Err(ConfigError::Invalid {
            key: "jwt_secret",
            reason: format!("unset, and {} is empty", path.display()),
        }),
        t => Ok(t.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_override_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "shards = 3\nidle_timeout_ms = 5000\nwal_dir = \"/fast/wal\"\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path.clone()),
            shards: Some(5),
            ..Default::default()
        };
        let c = Config::load(&args).expect("load");
        assert_eq!(c.shards, 5);
        assert_eq!(c.idle_timeout_ms, 5000);
        assert_eq!(c.wal_dir, Some(PathBuf::from("/fast/wal")));
        assert_eq!(c.listen, Config::default().listen);
        let args = ServeArgs {
            config: Some(path),
            wal_dir: Some(PathBuf::from("/faster/wal")),
            ..Default::default()
        };
        let c = Config::load(&args).expect("load");
        assert_eq!(c.wal_dir, Some(PathBuf::from("/faster/wal")));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_naming_the_key() {
        let unknown = toml::from_str::<Config>("shardz = 1").expect_err("unknown key");
        assert!(unknown.to_string().contains("shardz"), "{unknown}");
        let mistyped = toml::from_str::<Config>("max_frame = \"big\"").expect_err("a string");
        assert!(mistyped.to_string().contains("max_frame"), "{mistyped}");
        let d = Config::default;
        for (c, key) in [
            (
                Config {
                    max_frame: 10,
                    ..d()
                },
                "max_frame",
            ),
            (
                Config {
                    max_frame: 65_535,
                    ..d()
                },
                "max_frame",
            ),
            (
                Config {
                    frame_timeout_ms: 5,
                    ..d()
                },
                "frame_timeout_ms",
            ),
            (
                Config {
                    node_id: 1024,
                    ..d()
                },
                "node_id",
            ),
            (
                Config {
                    redis_timeout_ms: 6_000,
                    ..d()
                },
                "redis_timeout_ms",
            ),
            (
                Config {
                    memtable_budget_bytes: 1 << 20,
                    ..d()
                },
                "memtable_budget_bytes",
            ),
            (
                Config {
                    block_cache_bytes: 1 << 20,
                    ..d()
                },
                "block_cache_bytes",
            ),
            (
                Config {
                    cluster: Some("127.0.0.1:6379".into()),
                    ..d()
                },
                "cluster",
            ),
        ] {
            match c.validate() {
                Err(e @ ConfigError::Invalid { key: k, .. }) => {
                    assert_eq!(k, key);
                    let text = e.to_string();
                    let flag = format!("--{}", key.replace('_', "-"));
                    let env = format!("SWIFTLET_{}", key.to_uppercase());
                    for name in [key, &flag, &env] {
                        assert!(text.contains(name), "{text:?} does not name {name}");
                    }
                }
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn to_toml_reads_back_and_never_prints_the_secret() {
        let c = Config {
            listen: "0.0.0.0:7400".parse().expect("addr"),
            allowed_origins: vec!["https://a.example".into(), "*".into()],
            data_dir: PathBuf::from("/var/lib/swift \"let\""),
            jwt_secret: Some("hunter2-the-secret".into()),
            wal_sync: WalSync::Always,
            wal_dir: Some(PathBuf::from("/fast/wal")),
            cluster: Some("redis://10.0.0.1:6379".into()),
            advertise: Some("10.0.0.2:7400,10.0.0.2:7480".into()),
            ..Config::default()
        };
        let text = c.to_toml().expect("toml");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("# jwt_secret is set"), "{text}");
        let back: Config = toml::from_str(&text).expect("reads back");
        assert_eq!(back.jwt_secret, None);
        let back = Config {
            jwt_secret: c.jwt_secret.clone(),
            ..back
        };
        assert_eq!(back.to_toml().expect("toml"), text);
        assert_eq!(back.data_dir, c.data_dir);
        assert_eq!(back.allowed_origins, c.allowed_origins);

        let d = Config::default().to_toml().expect("toml");
        let back: Config = toml::from_str(&d).expect("defaults read back");
        assert_eq!(back.to_toml().expect("toml"), d);
        for key in ["jwt_secret", "wal_dir", "cluster", "advertise"] {
            assert!(d.contains(&format!("\n# {key} is unset: ")), "{key}: {d}");
        }
    }

    #[test]
    fn generated_secret_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let a = c.resolve_secret().expect("secret");
        assert_eq!(a, c.resolve_secret().expect("secret again"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn the_generated_secret_is_owner_only_and_an_exposed_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let secret = c.resolve_secret().expect("secret");
        let path = dir.path().join("jwt.secret");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        for exposed in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(exposed))
                .expect("chmod");
            match c.resolve_secret() {
                Err(ConfigError::SecretFileExposed { mode, .. }) => assert_eq!(mode, exposed),
                other => panic!("mode {exposed:o}: expected SecretFileExposed, got {other:?}"),
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        assert_eq!(c.resolve_secret().expect("owner-only"), secret);
    }

    #[test]
    fn dev_auth_on_a_public_address_needs_dev_auth_public() {
        let local = Config {
            dev_auth: true,
            ..Config::default()
        };
        local.validate().expect("loopback is fine");
        let v6 = Config {
            listen: "[::1]:7400".parse().expect("addr"),
            ..local.clone()
        };
        v6.validate().expect("IPv6 loopback is fine");
        for (listen, http) in [
            ("0.0.0.0:7400", "127.0.0.1:7480"),
            ("127.0.0.1:7400", "[::]:7480"),
            ("10.1.2.3:7400", "127.0.0.1:7480"),
        ] {
            let public = Config {
                listen: listen.parse().expect("addr"),
                http: http.parse().expect("addr"),
                ..local.clone()
            };
            match public.validate() {
                Err(ConfigError::DevAuthPublic { addr }) => {
                    assert!(addr.to_string() == listen || addr.to_string() == http)
                }
                other => panic!("{listen} {http}: expected DevAuthPublic, got {other:?}"),
            }
            Config {
                dev_auth_public: true,
                ..public.clone()
            }
            .validate()
            .expect("allowed explicitly");
            Config {
                dev_auth: false,
                ..public
            }
            .validate()
            .expect("no dev-auth, no question");
        }
        let from_toml: Config =
            toml::from_str("dev_auth = true\ndev_auth_public = true\nlisten = \"0.0.0.0:7400\"")
                .expect("toml");
        from_toml.validate().expect("allowed in the file");
    }

    #[test]
    fn wal_sync_is_a_mode_and_the_boolean_spelling_still_works() {
        assert_eq!(Config::default().wal_sync, WalSync::Interval);
        let parse = |t: &str| toml::from_str::<Config>(t).map(|c| c.wal_sync);
        assert_eq!(parse("wal_sync = true").ok(), Some(WalSync::Always));
        assert_eq!(parse("wal_sync = false").ok(), Some(WalSync::Off));
        assert_eq!(
            parse("wal_sync = \"interval\"").ok(),
            Some(WalSync::Interval)
        );
        assert!(parse("wal_sync = \"sometimes\"").is_err());

        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let flags = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("swiftlet").chain(args.iter().copied()))
                .map(|c| c.serve.wal_sync)
        };
        assert_eq!(flags(&[]).ok(), Some(None));
        assert_eq!(flags(&["--wal-sync"]).ok(), Some(Some(WalSync::Always)));
        assert_eq!(flags(&["--wal-sync", "off"]).ok(), Some(Some(WalSync::Off)));
        assert_eq!(
            flags(&["--wal-sync=interval", "--shards", "2"]).ok(),
            Some(Some(WalSync::Interval))
        );
        assert!(flags(&["--wal-sync", "sometimes"]).is_err());
        let c = Config::load(&ServeArgs {
            wal_sync: Some(WalSync::Off),
            wal_sync_interval_ms: Some(20),
            ..Default::default()
        })
        .expect("load");
        assert_eq!((c.wal_sync, c.wal_sync_interval_ms), (WalSync::Off, 20));
    }

    #[test]
    fn retention_spans_parse_print_back_and_zero_keeps_everything() {
        use std::time::Duration;
        for (text, d, shown) in [
            ("30d", Duration::from_secs(30 * 86_400), "30d"),
            ("48h", Duration::from_secs(48 * 3600), "2d"),
            ("90m", Duration::from_secs(5400), "90m"),
            ("1500ms", Duration::from_millis(1500), "1500ms"),
            ("0", Duration::ZERO, "0"),
        ] {
            let span: Span = text.parse().expect(text);
            assert_eq!(span.0, d, "{text}");
            assert_eq!(span.to_string(), shown);
        }
        for bad in ["", "30", "d", "3w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<Span>().is_err(), "{bad:?}");
        }
        let c: Config =
            toml::from_str("inbox_keep = 0\ninbox_max_age = \"0\"\ndedup_window = \"12h\"")
                .expect("parse");
        let p = c.retention();
        assert!(!p.trims(), "0 and 0 keep everything");
        assert_eq!(p.dedup_window, Duration::from_secs(12 * 3600));
        assert!(toml::from_str::<Config>("inbox_max_age = \"soon\"").is_err());
        let tiny = Config {
            inbox_max_age: Span(Duration::from_millis(10)),
            ..Config::default()
        };
        assert!(
            matches!(
                tiny.validate(),
                Err(ConfigError::Invalid {
                    key: "inbox_max_age",
                    ..
                })
            ),
            "{:?}",
            tiny.validate()
        );
    }
}
