//! Command-line interface: one positional scenario and the flags every
//! scenario shares. The same struct is parsed by the parent and by worker
//! processes (which get the parent's argv plus the hidden `--worker-index`
//! and `--user-prefix`), so a flag given twice keeps its last value.

use clap::{Parser, ValueEnum};

/// A scenario to drive against a running swiftlet server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Open N connections, log in, hold them with heartbeats.
    Idle,
    /// N users sending 1:1 messages to random peers (closed or open loop).
    Chat,
    /// G groups of S members; members post to their group.
    Group,
    /// N clients log in, then all drop and reconnect at once.
    Storm,
    /// M messages queued for offline users, who then connect and catch up.
    Offline,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Chat => "chat",
            Scenario::Group => "group",
            Scenario::Storm => "storm",
            Scenario::Offline => "offline",
        }
    }
}

/// How connections talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The TCP protocol: `varint(len) ‖ Envelope` on `--server`.
    Tcp,
    /// WebSocket on `--http-server` (`GET /ws`), one Envelope per binary
    /// message. The offline scenario's senders still use TCP.
    Ws,
}

/// loadgen: drive a swiftlet server with simulated clients and report a JSON
/// summary on the last line of stdout. See loadgen/README.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, args_override_self = true)]
pub struct Args {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Server TCP address(es), comma-separated; connections go round-robin.
    /// A cluster's nodes: a login at a node that is not the user's home
    /// follows its NOT_HOME redirect.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub server: String,

    /// `tcp` (on --server) or `ws` (WebSocket on --http-server).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,

    /// The server's HTTP listener(s), comma-separated, for --transport ws.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_server: String,

    #[command(flatten)]
    pub tls: swiftlet_client::TlsArgs,

    /// Log in with bare user ids (server started with --dev-auth).
    #[arg(long, conflicts_with = "jwt_secret")]
    pub dev_auth: bool,

    /// Mint HS256 tokens with this secret (the server's --jwt-secret).
    #[arg(long, env = "SWIFTLET_JWT_SECRET")]
    pub jwt_secret: Option<String>,

    /// Connections to open (idle, storm).
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,

    /// Users (chat: each one connection that sends and receives; offline:
    /// the receivers).
    #[arg(long, default_value_t = 100)]
    pub users: u64,

    /// Groups (group scenario).
    #[arg(long, default_value_t = 10)]
    pub groups: u64,

    /// Members per group (group scenario).
    #[arg(long, default_value_t = 10)]
    pub members: u64,

    /// Messages to queue for offline users (offline).
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,

    /// offline: sender connections that queue the messages (default 8).
    /// group: posters per group, its first K members (default 1).
    #[arg(long)]
    pub senders: Option<u64>,

    /// Seconds to hold (idle) or to send for (chat), after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of chat traffic before measuring starts (not in the histograms).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,

    /// Open loop: total messages per second over all users (group: over all
    /// posters). Without it, chat and group are closed loop (chat: the next
    /// message on the Ack; group: on the Ack and delivery to every member).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Message body size in bytes (at least 24: the loadgen header).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,

    /// Spawn N worker processes, each with a share of the connections/users,
    /// and merge their results. 1 runs everything in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,

    /// Coordinate agents (`loadgen agent --listen ADDR`, on this or other
    /// machines) at these addresses, comma-separated: each runs a share of
    /// the scenario and sends back its result, merged into one summary.
    #[arg(long)]
    pub agents: Option<String>,

    /// Start N local agents (`loadgen agent` on 127.0.0.1, port chosen by
    /// the kernel) and coordinate them over TCP like `--agents`; with
    /// `--source`, agent i takes every N-th source address from the i-th.
    #[arg(long, default_value_t = 0)]
    pub spawn_agents: u32,

    /// Runtime worker threads of each loadgen process (default: one per
    /// core; 1 runs the runtime on one thread), and the threads that hold
    /// idle connections.
    #[arg(long)]
    pub threads: Option<usize>,

    /// Local source addresses, round-robin per connection: one address, a
    /// range `127.0.0.2-127.0.0.9`, or a comma-separated list of either.
    #[arg(long)]
    pub source: Option<String>,

    /// Concurrent connection attempts (connect + login) per process.
    #[arg(long, default_value_t = 1024)]
    pub concurrency: usize,

    /// The server's pid: read its RSS (and kernel socket memory) before
    /// connecting and 2 s after everyone connected.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Seconds to wait after the last send for deliveries to arrive.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,

    /// Ping period in seconds (default: a third of the server's idle timeout).
    #[arg(long)]
    pub ping_interval: Option<f64>,

    /// Write an SVG of p50/p99 latency per second to this file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,

    /// Prefix of generated user ids (default: random per run, so runs never
    /// see each other's inboxes).
    #[arg(long)]
    pub user_prefix: Option<String>,

    /// Internal: this process is worker i of --workers.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,
}

impl Args {
    /// `--senders` with the scenario's default.
    pub fn senders(&self) -> u64 {
        self.senders.unwrap_or(match self.scenario {
            Scenario::Group => 1,
            _ => 8,
        })
    }

    /// The parameters echoed in the JSON summary.
    pub fn params_json(&self) -> serde_json::Value {
        serde_json::json!({
            "server": self.server,
            "transport": self.transport,
            "http_server": (self.transport == Transport::Ws).then_some(&self.http_server),
            "auth": if self.dev_auth { "dev" } else { "jwt" },
            "connections": self.connections,
            "users": self.users,
            "groups": self.groups,
            "members": self.members,
            "messages": self.messages,
            "senders": self.senders(),
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "rate": self.rate,
            "body_bytes": self.body_bytes,
            "workers": self.workers,
            "agents": self.agents,
            "spawn_agents": self.spawn_agents,
            "threads": self.threads,
            "source": self.source,
            "concurrency": self.concurrency,
            "server_pid": self.server_pid,
        })
    }
}

/// `loadgen agent`: run shares of scenarios for coordinators that connect.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen agent", version)]
pub struct AgentArgs {
    /// Where to wait for coordinators (`--agents` of a loadgen run).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,

    /// This machine's source addresses, replacing the coordinator's
    /// `--source` (same syntax).
    #[arg(long)]
    pub source: Option<String>,

    /// Serve one coordinator, then exit (what `--spawn-agents` starts).
    #[arg(long)]
    pub once: bool,
}
