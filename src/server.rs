//! Starting and stopping a node: open the store, start the commit pipeline,
//! bind one `SO_REUSEPORT` listener per shard on the same address, and run
//! each shard on its own named thread.
//!
//! `SO_REUSEPORT` would just as gladly let a second server (or anything
//! else of the same user) join a port this one serves, and the kernel
//! would then split new connections between them without a word. So
//! before binding a fixed port, [`start`] refuses it when anyone listens
//! there already (see `refuse_if_served`).
//!
//! A full disk does not stop a start: the store then opens read-only (see
//! `crate::store`), the node serves logins, reads and live ephemeral
//! traffic, answers requests that write `STORE_UNAVAILABLE`, and takes
//! writes again by itself once there is room. Every other store error at
//! open still stops the start.
//!
//! Shutdown is ordered so that nothing acknowledged is lost and nothing
//! in flight is left unanswered: (1) every shard stops accepting and stops
//! reading requests; (2) the commit pipeline commits whatever was submitted
//! and hands the Acks to the shards; (3) the shards write those, tell every
//! client `SHUTTING_DOWN`, and close; (4) the pipeline stops, and the store
//! records the clean shutdown (which keeps the inbox epoch, see
//! [`Store::inbox_epoch`]) and is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::Poll;
use socket2::{Domain, Protocol, Socket, Type};

use crate::admin;
use crate::auth::{Authenticator, Revocations};
use crate::cluster::coordinator::{Cluster, ClusterConfig, ClusterError};
use crate::cluster::local::{LocalEphemeral, LocalOwnership, LocalPresence};
use crate::cluster::notices::Notices;
use crate::cluster::{Ephemeral, Ownership, Presence};
use crate::commit::{self, CommitHandle, PipelineConfig};
use crate::config::{Config, ConfigError};
use crate::cursors::Cursors;
use crate::groups::GroupDirectory;
use crate::hub::mailbox::{ShardHandle, ShardMsg};
use crate::hub::registry::Registry;
use crate::metrics::Metrics;
use crate::session::services::{Limits, Services};
use crate::shard::tls::{TlsConfig, TlsError};
use crate::shard::{Shard, WAKER};
use crate::store::{Store, StoreError, StoreOptions};

/// Commands the commit queue holds before shards are told "busy".
const COMMIT_QUEUE: usize = 64 * 1024;

/// Why the server could not start. Each message names the step; the
/// underlying error is its `source` (anyhow prints the chain).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the store")]
    Store(#[from] StoreError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Someone already listens on this address: joining it through
    /// `SO_REUSEPORT` would split its connections between the two.
    #[error(
        "{addr} is already served by another process (another swiftlet?): \
         refusing to share it through SO_REUSEPORT; stop that one or choose another port"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("starting threads")]
    Io(#[from] std::io::Error),
    #[error("joining the cluster")]
    Cluster(#[from] ClusterError),
    #[error("loading the TLS certificate")]
    Tls(#[from] TlsError),
}

/// A running node. Dropping it shuts it down.
pub struct Server {
    addr: SocketAddr,
    http_addr: SocketAddr,
    metrics: Arc<Metrics>,
    shards: Vec<ShardHandle>,
    shard_threads: Vec<JoinHandle<()>>,
    /// The operator's API (see `crate::admin`), when it is on.
    admin_thread: Option<JoinHandle<()>>,
    /// The operator's port (see `crate::admin::ops`), when configured.
    ops: Option<admin::ops::OpsPort>,
    commit: Option<CommitHandle>,
    store: Arc<Store>,
    registry: Arc<Registry>,
    cluster: Option<Cluster>,
    tls: Option<Arc<TlsConfig>>,
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The kernel caps this at net.core.somaxconn; ask for plenty so a
    // reconnect storm waits in the backlog instead of being refused.
    socket.listen(65_535)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Refuse `addr` when a listener already holds it. A probe socket is bound
/// without `SO_REUSEPORT`: the kernel then refuses it (`EADDRINUSE`)
/// wherever any listener holds the port, ours or anyone's. It keeps
/// `SO_REUSEADDR`, as the real listeners do, so the connections a previous
/// run left in TIME_WAIT do not count. Port 0 asks the kernel for a free
/// port, which nobody serves. (A server started in the instant between
/// this probe and our binds is not caught: this is a guard against
/// mistakes, not a lock.)
fn refuse_if_served(addr: SocketAddr) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let bind = |source| ServerError::Bind { addr, source };
    let probe =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(bind)?;
    probe.set_reuse_address(true).map_err(bind)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(ServerError::AddrInUse { addr }),
        Err(e) => Err(bind(e)),
    }
}

/// RocksDB's figures in the exposition (read on scrape: see
/// [`Store::engine_figures`]), and the heap by allocator
/// ([`crate::alloc::mimalloc_committed`], [`crate::store::libc_heap`]).
fn render_engine(store: &Store, out: &mut String) {
    let f = store.engine_figures();
    let ratio = match f.block_cache_hits + f.block_cache_misses {
        0 => 0.0,
        n => f.block_cache_hits as f64 / n as f64,
    };
    let gauges: [(&str, &str, f64); 10] = [
        (
            "swiftlet_rocksdb_memtable_bytes",
            "Bytes in RocksDB memtables.",
            f.memtable_bytes as f64,
        ),
        (
            "swiftlet_rocksdb_pending_compaction_bytes",
            "Bytes RocksDB estimates compaction must rewrite.",
            f.pending_compaction_bytes as f64,
        ),
        (
            "swiftlet_rocksdb_running_compactions",
            "RocksDB compactions running.",
            f.running_compactions as f64,
        ),
        (
            "swiftlet_rocksdb_sst_bytes",
            "Size of RocksDB's live SST files.",
            f.sst_bytes as f64,
        ),
        (
            "swiftlet_rocksdb_estimated_keys",
            "Keys RocksDB estimates it holds.",
            f.estimated_keys as f64,
        ),
        (
            "swiftlet_rocksdb_writes_stopped",
            "1 while RocksDB stops writes.",
            f.writes_stopped as f64,
        ),
        (
            "swiftlet_rocksdb_delayed_write_rate_bytes",
            "The rate RocksDB slows writes to (0: not slowed).",
            f.delayed_write_rate as f64,
        ),
        (
            "swiftlet_rocksdb_block_cache_bytes",
            "Bytes in the block cache.",
            f.block_cache_bytes as f64,
        ),
        (
            "swiftlet_rocksdb_table_readers_bytes",
            "Memory RocksDB's open SST readers hold outside the block cache.",
            f.table_readers_bytes as f64,
        ),
        (
            "swiftlet_rocksdb_block_cache_hit_ratio",
            "Block cache hits over lookups since the store opened.",
            ratio,
        ),
    ];
    for (name, help, v) in gauges {
        exposition_line(out, name, "gauge", help, v);
    }
    let counters: [(&str, &str, f64); 3] = [
        (
            "swiftlet_rocksdb_stall_seconds_total",
            "Time RocksDB held writes back (slowed or stopped).",
            f.stall_micros as f64 / 1e6,
        ),
        (
            "swiftlet_rocksdb_block_cache_hits_total",
            "Block cache hits.",
            f.block_cache_hits as f64,
        ),
        (
            "swiftlet_rocksdb_block_cache_misses_total",
            "Block cache misses.",
            f.block_cache_misses as f64,
        ),
    ];
    for (name, help, v) in counters {
        exposition_line(out, name, "counter", help, v);
    }
    let libc = crate::store::libc_heap();
    let heap: [(&str, &str, &str, f64); 5] = [
        (
            "swiftlet_heap_mimalloc_committed_bytes",
            "gauge",
            "Memory mimalloc, the allocator of swiftlet's own code, has committed.",
            crate::alloc::mimalloc_committed() as f64,
        ),
        (
            "swiftlet_heap_libc_in_use_bytes",
            "gauge",
            "Bytes allocated through the C library's malloc (RocksDB) and not freed.",
            libc.in_use as f64,
        ),
        (
            "swiftlet_heap_libc_free_bytes",
            "gauge",
            "Bytes freed into the C library's malloc since it last handed free pages back.",
            libc.free as f64,
        ),
        (
            "swiftlet_heap_libc_trims_total",
            "counter",
            "Times free pages of the C library's malloc were handed back to the system.",
            libc.trims as f64,
        ),
        (
            "swiftlet_heap_libc_trim_seconds_total",
            "counter",
            "Time spent handing those pages back.",
            libc.trim_micros as f64 / 1e6,
        ),
    ];
    for (name, kind, help, v) in heap {
        exposition_line(out, name, kind, help, v);
    }
}

/// One unlabelled sample with its HELP and TYPE lines.
fn exposition_line(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

/// Start a node with `config`.
pub fn start(config: Config) -> Result<Server, ServerError> {
    config.validate()?;
    crate::alloc::configure();
    crate::alloc::disable_huge_pages();
    let secret = config.resolve_secret()?;
    // Before anything binds: a bad certificate stops the start.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(TlsConfig::load(cert, key)?)),
        _ => None,
    };
    if config.dev_auth {
        tracing::warn!("--dev-auth is on: any client may log in as any user by sending a bare user id as its token");
    }
    // Before the store opens: a refused start leaves the data untouched.
    refuse_if_served(config.listen)?;
    refuse_if_served(config.http)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Arc::new(Store::open(
        &config.data_dir.join("db"),
        &StoreOptions {
            wal_sync: config.wal_sync,
            wal_sync_interval: Duration::from_millis(config.wal_sync_interval_ms),
            wal_dir: config.wal_dir.clone(),
            memtable_budget_bytes: config.memtable_budget_bytes,
            block_cache_bytes: config.block_cache_bytes,
            retention: config.retention(),
            clock: config.clock.clone(),
            ..StoreOptions::default()
        },
    )?);
    let n = config.shard_count();
    let registry = Arc::new(Registry::new(n * 16));
    let watchers = Arc::new(Registry::new(n * 16));
    let groups = Arc::new(GroupDirectory::new(store.clone()));

    // Listeners first: the first one may pick the port (port 0 in tests),
    // and the rest join it.
    let bind_all =
        |mut addr: SocketAddr| -> Result<(Vec<mio::net::TcpListener>, SocketAddr), ServerError> {
            let mut listeners = Vec::with_capacity(n);
            for _ in 0..n {
                let l =
                    bind_reuseport(addr).map_err(|source| ServerError::Bind { addr, source })?;
                addr = l.local_addr()?;
                listeners.push(l);
            }
            Ok((listeners, addr))
        };
    let (listeners, addr) = bind_all(config.listen)?;
    let (http_listeners, http_addr) = bind_all(config.http)?;
    let metrics = Arc::new(Metrics {
        store: store.health(),
        ..Metrics::with_shards(n)
    });
    {
        let store = store.clone();
        let _ = metrics
            .engine
            .set(Box::new(move |out: &mut String| render_engine(&store, out)));
    }
    let cursors = Arc::new(Cursors::new(store.clone()));

    let mut polls = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    let mut mailboxes = Vec::with_capacity(n);
    for _ in 0..n {
        let poll = Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        handles.push(ShardHandle::new(tx, waker));
        mailboxes.push(rx);
        polls.push(poll);
    }
    // A cluster node loads its recorded homes before the pipeline exists
    // (the pipeline routes by them); its threads start once it does.
    let mut cluster = match &config.cluster {
        None => None,
        Some(url) => {
            let (tcp, http) = match &config.advertise {
                Some(a) => {
                    let (t, h) = a.split_once(',').unwrap_or((a, ""));
                    (t.trim().to_owned(), h.trim().to_owned())
                }
                None => (addr.to_string(), http_addr.to_string()),
            };
            Some(Cluster::prepare(
                ClusterConfig {
                    url: url.clone(),
                    node_id: config.node_id,
                    advertise_tcp: tcp,
                    advertise_http: http,
                    lease: Duration::from_millis(config.lease_ms),
                    deadline: Duration::from_millis(config.redis_timeout_ms),
                },
                &store,
            )?)
        }
    };
    let clock = config.clock.clone();
    let commit = commit::start(
        store.clone(),
        registry.clone(),
        groups.clone(),
        handles.clone(),
        metrics.clone(),
        cursors.clone(),
        PipelineConfig {
            node_id: config.node_id,
            queue: COMMIT_QUEUE,
            max_group_members: config.max_group_members,
            clock: clock.clone(),
            routes: cluster.as_ref().map(Cluster::routes),
        },
    );

    let shard_handles: Arc<[ShardHandle]> = handles.clone().into();
    // The single-node implementations; a cluster swaps these for
    // `cluster::redis`'s without touching the shards.
    let ownership: Arc<dyn Ownership> = match &cluster {
        Some(c) => c.table.clone(),
        None => Arc::new(LocalOwnership),
    };
    let local_ephemeral =
        LocalEphemeral::new(registry.clone(), watchers.clone(), shard_handles.clone());
    let local_presence = LocalPresence::new(registry.clone(), store.clone());
    let (ephemeral, presence): (Arc<dyn Ephemeral>, Arc<dyn Presence>) = match &mut cluster {
        None => (Arc::new(local_ephemeral), Arc::new(local_presence)),
        Some(c) => {
            let notices = Arc::new(Notices::new(
                c.table.clone(),
                registry.clone(),
                local_ephemeral,
                local_presence,
            ));
            c.run(
                store.clone(),
                commit.clone(),
                notices.clone(),
                shard_handles.clone(),
            )?;
            let _ = metrics.cluster.set(c.renderer(notices.clone()));
            (notices.clone(), notices)
        }
    };
    let revocations = Arc::new(Revocations::from_entries(store.revocations()?));
    let auth = Authenticator::new(secret, config.dev_auth, revocations.clone());
    let (gate, admin_thread) = admin::start(
        config.admin_token.as_deref(),
        admin::Node {
            store: store.clone(),
            registry: registry.clone(),
            shards: shard_handles.clone(),
            metrics: metrics.clone(),
            cursors: cursors.clone(),
            revocations,
            data_dir: config.data_dir.clone(),
            node_id: config.node_id,
        },
    )?;
    let ops = match config.ops_listen {
        None => None,
        Some(addr) => Some(
            admin::ops::OpsPort::start(addr, metrics.clone(), gate.clone())
                .map_err(|source| ServerError::Bind { addr, source })?,
        ),
    };
    let limits = Limits {
        max_frame: config.max_frame,
        push_buffer_bytes: config.push_buffer_bytes,
        idle_timeout_ms: config.idle_timeout_ms,
        handshake_timeout_ms: config.handshake_timeout_ms,
        frame_timeout_ms: config.frame_timeout_ms,
        frames: crate::session::bucket::FrameRate::new(config.max_frames_per_sec),
        max_conns_per_user: config.max_conns_per_user,
        typing_ttl_ms: config.typing_ttl_ms,
        allowed_origins: config.allowed_origins.clone(),
    };
    let max_connections = match config.max_connections {
        0 => crate::shard::admission::open_file_limit()
            .saturating_sub(crate::shard::admission::FILES_KEPT)
            .max(1),
        n => n,
    };
    let admission = Arc::new(crate::shard::admission::Admission::new(
        max_connections,
        config.max_conns_per_ip,
        crate::shard::admission::RefusalBudget::per_shard(
            config.max_refusals_per_sec,
            n,
            crate::clock::TICK_MS,
        ),
    ));
    let mut shard_threads = Vec::with_capacity(n);
    for (i, (((poll, listener), http_listener), mailbox)) in polls
        .into_iter()
        .zip(listeners)
        .zip(http_listeners)
        .zip(mailboxes)
        .enumerate()
    {
        let ctx = Services {
            id: i as u16,
            store: store.clone(),
            registry: registry.clone(),
            watchers: watchers.clone(),
            groups: groups.clone(),
            shards: shard_handles.clone(),
            ownership: ownership.clone(),
            ephemeral: ephemeral.clone(),
            presence: presence.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            cursors: cursors.clone(),
            commit: commit.clone(),
            auth: auth.clone(),
            limits: limits.clone(),
            admin: gate.clone(),
        };
        let shard = Shard::new(
            poll,
            listener,
            http_listener,
            mailbox,
            ctx,
            tls.clone(),
            admission.clone(),
        )?;
        shard_threads.push(
            std::thread::Builder::new()
                .name(format!("swiftlet-shard-{i}"))
                .spawn(move || shard.run())?,
        );
    }
    // The shards (and the operator's port) hold the only gates now: the
    // admin thread ends after them.
    drop(gate);
    tracing::info!(
        %addr,
        %http_addr,
        shards = n,
        data_dir = %config.data_dir.display(),
        wal_sync = %config.wal_sync,
        inbox_epoch = store.inbox_epoch(),
        store_writable = store.writable(),
        tls = tls.is_some(),
        max_connections,
        admin_api = admin_thread.is_some(),
        ops_addr = ?ops.as_ref().map(admin::ops::OpsPort::local_addr),
        "swiftlet serving"
    );
    Ok(Server {
        addr,
        http_addr,
        metrics,
        shards: handles,
        shard_threads,
        admin_thread,
        ops,
        commit: Some(commit),
        store,
        registry,
        cluster,
        tls,
    })
}

impl Server {
    /// The address the protocol listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address (WebSocket, sync, page, metrics).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The operator's port, when configured (with the real port when 0
    /// was asked).
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(admin::ops::OpsPort::local_addr)
    }

    /// Whether the listeners speak TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Read the TLS certificate and key again (SIGHUP): connections
    /// accepted from now on get what the files hold now, established ones
    /// keep theirs. On an error the old certificate stays in use. `Ok(false)`
    /// when the node serves no TLS.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The node's cluster runtime, when it is one of a cluster.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The node's store (for tools and tests that inspect what is durable).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Users with at least one connection on this node.
    pub fn online_users(&self) -> usize {
        self.registry.online_users()
    }

    /// Stop gracefully (see the module doc for the order) and wait.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(commit) = self.commit.take() else {
            return;
        };
        tracing::info!("shutting down");
        let (tx, rx) = crossbeam_channel::unbounded();
        for s in &self.shards {
            s.send(ShardMsg::StopAccepting(tx.clone()));
        }
        drop(tx);
        for _ in &self.shards {
            if rx.recv().is_err() {
                break;
            }
        }
        // Its gate goes with it, so the admin thread can end below.
        if let Some(mut ops) = self.ops.take() {
            ops.stop();
        }
        // No more hand-offs in or out: what is unshipped stays in the
        // outbox, what is unapplied stays in Redis for the next start.
        if let Some(c) = &mut self.cluster {
            c.stop();
        }
        commit.flush();
        for s in &self.shards {
            s.send(ShardMsg::Close);
        }
        for t in self.shard_threads.drain(..) {
            let _ = t.join();
        }
        // Its gates went with the shards: it ends after the request it is
        // serving (a backup finishes; its answer has nowhere to go).
        if let Some(t) = self.admin_thread.take() {
            let _ = t.join();
        }
        // Whatever the shards queued on their way out (last-seen times).
        commit.flush();
        // Nothing writes after this: record that everything before is on
        // disk, so the next start keeps the inbox epoch.
        if let Err(e) = self.store.mark_clean_shutdown() {
            tracing::error!(error = %e, "recording the clean shutdown failed: the next start decides the inbox epoch from how the run before ended");
        }
        tracing::info!("stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
