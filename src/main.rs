//! The `swiftlet` binary: flags, logging and signals; everything else is in
//! the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use swiftlet::config::{Config, ServeArgs};

#[derive(Parser)]
#[command(name = "swiftlet", version, about = "A dense, durable chat server")]
struct Cli {
    /// Log lines on stderr as text, or as one JSON object per line (for a
    /// log shipper); applies to every command.
    #[arg(
        long,
        global = true,
        env = "SWIFTLET_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(ServeArgs),
    /// Mint a login token for a user, signed with the server's secret.
    Token {
        /// The user id the token is for.
        #[arg(long)]
        user: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl: u64,
        /// The secret (else the one the server uses: config, env, or <data-dir>/jwt.secret).
        #[arg(long, env = "SWIFTLET_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        #[arg(long, env = "SWIFTLET_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "SWIFTLET_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show the configuration `serve` would run with, given the same flags,
    /// environment and `--config` file.
    Config {
        /// Print it as TOML that `--config` reads back (the secret left out).
        #[arg(long, required = true)]
        print_defaults: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Operate a running node through its HTTP port (needs its admin token),
    /// or restore a backup into a stopped node's data directory.
    Admin {
        /// The node's HTTP address.
        #[arg(long, env = "SWIFTLET_HTTP", default_value = "127.0.0.1:7480")]
        http: String,
        /// The node's admin token.
        #[arg(long, env = "SWIFTLET_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// How long to wait for the answer (a backup or compaction of a large store takes minutes).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage a cluster of nodes joined through Redis.
    Cluster {
        /// The cluster's Redis.
        #[arg(
            long,
            env = "SWIFTLET_CLUSTER",
            default_value = "redis://127.0.0.1:6379"
        )]
        redis: String,
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// The node's figures: connections, logins, store, RocksDB, open files.
    Stats,
    /// A user's devices and cursors, inbox head, first available seq and size, groups, connections.
    User { user: String },
    /// Close a user's connections (or one device's) with DISCONNECTED.
    Disconnect {
        user: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Refuse the user's tokens issued before a time (TOKEN_REVOKED), closing
    /// the connections that logged in with one.
    Revoke {
        user: String,
        /// Seconds since the Unix epoch [default: now].
        #[arg(long)]
        before: Option<u64>,
    },
    /// Write an online backup into DIR (absolute, new, on the node's machine):
    /// a data directory a server can start on.
    Backup { dir: PathBuf },
    /// Compact every column family now.
    Compact,
    /// Put a backup in place as a STOPPED node's data (no server needed).
    Restore {
        /// The directory `admin backup` wrote.
        #[arg(long)]
        from: PathBuf,
        /// The data directory of the node to restore.
        #[arg(long, env = "SWIFTLET_DATA_DIR")]
        data_dir: PathBuf,
        /// Replace a database that is there (it is kept as db.before-restore-<time>).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Give every partition a home among the listed nodes (once, before first use).
    Init {
        /// Node ids, comma-separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u16>,
    },
    /// Nodes, leases, partitions per node, hand-off backlog.
    Status,
    /// Find the partition of a user (and its home).
    Partition {
        #[arg(long)]
        user: String,
    },
    /// Move a partition, with its users' and groups' rows, to another node, under traffic.
    MovePartition {
        partition: u16,
        #[arg(long)]
        to: u16,
        /// Disaster recovery: give the partition away although its home is down (its lease
        /// expired); what only that home's disk held is lost to the partition's users.
        #[arg(long)]
        force: bool,
        /// How long to wait for a cooperative move to finish.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
}

/// Logging to stderr, filtered by `RUST_LOG` (default `info`), before any
/// command runs so every command logs in the chosen format. JSON lines are
/// flattened (`{"timestamp","level","message",<fields>,"target"}`), the
/// shape log shippers index without a mapping.
fn init_logging(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(&args),
        Command::Token {
            user,
            ttl,
            jwt_secret,
            data_dir,
            config,
        } => {
            if !swiftlet::auth::valid_id(&user) {
                anyhow::bail!("user ids are 1-64 bytes of [A-Za-z0-9._@-]");
            }
            let args = ServeArgs {
                jwt_secret,
                data_dir,
                config,
                ..ServeArgs::default()
            };
            let secret = Config::load(&args)?.resolve_secret()?;
            let token = swiftlet_protocol::token::mint(&secret, &user, ttl);
            // The token is this command's output.
            #[allow(clippy::print_stdout)]
            {
                println!("{token}");
            }
            Ok(())
        }
        Command::Config {
            print_defaults,
            serve,
        } => {
            anyhow::ensure!(print_defaults, "nothing to do: try --print-defaults");
            let config = Config::load(&serve).context("configuration")?;
            // The configuration is this command's output.
            #[allow(clippy::print_stdout)]
            {
                print!("{}", config.to_toml()?);
            }
            Ok(())
        }
        Command::Cluster { redis, command } => cluster(&redis, command),
        Command::Admin {
            http,
            admin_token,
            timeout_secs,
            command,
        } => admin(&http, admin_token, timeout_secs, command),
    }
}

/// `swiftlet admin ...`: the node's JSON answer is the command's output.
#[allow(clippy::print_stdout)]
fn admin(
    http: &str,
    token: Option<String>,
    timeout_secs: u64,
    command: AdminCommand,
) -> anyhow::Result<()> {
    use swiftlet::admin::{client, restore};
    let (method, path, body) = match command {
        AdminCommand::Restore {
            from,
            data_dir,
            force,
        } => {
            let done = restore::restore(&from, &data_dir, force)?;
            println!(
                "restored {} into {}",
                from.display(),
                data_dir.join("db").display()
            );
            if let Some(kept) = done.kept {
                println!("the database that was there is kept in {}", kept.display());
            }
            if done.secret_copied {
                println!("copied the backup's jwt.secret");
            }
            return Ok(());
        }
        AdminCommand::Stats => ("GET", "/admin/v1/stats".to_owned(), None),
        AdminCommand::User { user } => ("GET", format!("/admin/v1/users/{user}"), None),
        AdminCommand::Disconnect { user, device } => {
            let q = device.map(|d| format!("?device={d}")).unwrap_or_default();
            (
                "POST",
                format!("/admin/v1/users/{user}/disconnect{q}"),
                None,
            )
        }
        AdminCommand::Revoke { user, before } => {
            let q = before.map(|b| format!("?before={b}")).unwrap_or_default();
            ("POST", format!("/admin/v1/users/{user}/revoke{q}"), None)
        }
        AdminCommand::Backup { dir } => {
            let dir = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()?.join(dir)
            };
            (
                "POST",
                "/admin/v1/backup".to_owned(),
                Some(serde_json::json!({ "dir": dir })),
            )
        }
        AdminCommand::Compact => ("POST", "/admin/v1/compact".to_owned(), None),
    };
    // Ids go in the path: refuse what would need escaping there.
    for part in path.split(['/', '?', '=']) {
        anyhow::ensure!(
            part.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b)),
            "ids are 1-64 bytes of [A-Za-z0-9._@-]: {part:?}"
        );
    }
    let token = token.context("the admin token: give --admin-token or set SWIFTLET_ADMIN_TOKEN")?;
    let answer = client::call(
        http,
        &token,
        method,
        &path,
        body.as_ref(),
        std::time::Duration::from_secs(timeout_secs),
    )?;
    println!("{answer}");
    Ok(())
}

/// `swiftlet cluster ...`: the answers are the command's output.
#[allow(clippy::print_stdout)]
fn cluster(redis: &str, command: ClusterCommand) -> anyhow::Result<()> {
    use swiftlet::cluster::admin;
    match command {
        ClusterCommand::Init { nodes } => {
            let n = admin::init(redis, &nodes)?;
            println!("initialized: {n} partitions over nodes {nodes:?}, epoch 1");
        }
        ClusterCommand::Status => {
            let st = admin::status(redis)?;
            match st.map_version {
                Some(v) => println!("map version {v}, {} partitions unassigned", st.unassigned),
                None => println!("no map: run `swiftlet cluster init --nodes ...`"),
            }
            println!(
                "{:>5}  {:<6} {:>10} {:>8}  {:<40} backlog",
                "node", "lease", "partitions", "stream", "addresses"
            );
            for (n, s) in &st.nodes {
                let backlog: Vec<String> = s
                    .backlog
                    .iter()
                    .map(|(d, b)| format!("->{d}: {b}"))
                    .collect();
                println!(
                    "{n:>5}  {:<6} {:>10} {:>8}  {:<40} {}",
                    if s.alive { "held" } else { "LOST" },
                    s.partitions,
                    s.stream_len,
                    s.addrs,
                    backlog.join(" ")
                );
            }
        }
        ClusterCommand::Partition { user } => {
            let p = swiftlet::cluster::Partition::of_user(&user);
            println!("{user}: partition {}", p.0);
        }
        ClusterCommand::MovePartition {
            partition,
            to,
            force,
            wait_secs,
        } => {
            let epoch = if force {
                admin::force_move(redis, partition, to)?
            } else {
                admin::move_partition(
                    redis,
                    partition,
                    to,
                    std::time::Duration::from_secs(wait_secs),
                )?
            };
            println!("partition {partition} -> node {to} at epoch {epoch}");
        }
    }
    Ok(())
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args).context("configuration")?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    let server = swiftlet::start(config).context("starting the server")?;
    for sig in signals.forever() {
        if sig != SIGHUP {
            tracing::info!(signal = sig, "signal received");
            break;
        }
        // SIGHUP: new TLS connections get the certificate the files hold
        // now; a bad file is logged and the old certificate kept.
        match server.reload_tls() {
            Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Ok(false) => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
            Err(e) => tracing::error!(
                error = %anyhow::Error::from(e),
                "SIGHUP: TLS certificate not reloaded; the old one stays in use"
            ),
        }
    }
    server.shutdown();
    Ok(())
}
