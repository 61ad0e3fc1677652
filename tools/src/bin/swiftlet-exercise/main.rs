//! `swiftlet-exercise`: drives a real `swiftlet serve` (which it starts,
//! kills and restarts itself) with many users and devices through the
//! client library, and checks that nothing acknowledged is lost or
//! duplicated and every device's stream is gap-free and in order.
//!
//! - `crash-rounds`: `kill -9` at random moments under mixed 1:1 and group
//!   traffic, verified after every restart ([`crash`]).
//! - `soak`: steady traffic for a long time with connections churning,
//!   the server's RSS and open files sampled ([`soak`]).
//!
//! Both print a line per round (or per minute), then one JSON summary on
//! the last line of stdout, and exit 1 when a check failed. The seed is
//! printed; `--seed` replays the same choices (kill moments, targets),
//! though not the same thread timings.
//!
//! # Layout
//!
//! - [`server`]: the server child process: start, `kill -9`, /proc figures.
//! - [`world`]: users, groups, the ledger of sends, error counts.
//! - [`population`]: creating users, devices and groups.
//! - [`device`]: one device's connection, acknowledgements and sends.
//! - [`stream`]: the per-device stream checks (pure, unit-tested).
//! - [`traffic`]: the open-loop send scheduler.
//! - [`verify`]: the verification pass over every inbox and stream.
//! - [`crash`], [`soak`]: the two modes.

mod crash;
mod device;
mod population;
mod server;
mod soak;
mod stream;
mod traffic;
mod verify;
mod world;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::DeviceOpts;
use crate::server::ServerProc;
use crate::traffic::TrafficOpts;
use crate::world::World;

#[derive(Parser)]
#[command(about = "Crash rounds and soak against a real swiftlet server")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
struct Common {
    /// The server binary; default: `swiftlet` beside this one.
    #[arg(long, env = "SWIFTLET_BIN", global = true)]
    server_bin: Option<PathBuf>,
    /// Directory for the server's data and log; default: a fresh temporary
    /// one, removed at the end unless --keep.
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// Keep the work directory.
    #[arg(long, global = true)]
    keep: bool,
    /// Seed of every random choice; default: random (printed).
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Users at the start (the soak replaces one now and then).
    #[arg(long, default_value_t = 12, global = true)]
    users: usize,
    /// Devices per user.
    #[arg(long, default_value_t = 3, global = true)]
    devices: usize,
    /// Groups, created at the start among the users.
    #[arg(long, default_value_t = 3, global = true)]
    groups: usize,
    /// Members per group, the creator included.
    #[arg(long, default_value_t = 6, global = true)]
    group_size: usize,
    /// Sends per second over all devices; default 600 for crash-rounds,
    /// 250 for soak.
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Sends in flight per device.
    #[arg(long, default_value_t = 4, global = true)]
    inflight: u32,
    /// Share of sends that are group posts.
    #[arg(long, default_value_t = 0.3, global = true)]
    group_share: f64,
    /// Acknowledge after at most this many events (random per connection).
    #[arg(long, default_value_t = 32, global = true)]
    ack_batch: u64,
    /// Chance of a MarkRead for a received message.
    #[arg(long, default_value_t = 0.02, global = true)]
    read_prob: f64,
    /// Event-loop threads of the server.
    #[arg(long, default_value_t = 2, global = true)]
    shards: usize,
    /// One more argument for `swiftlet serve` (repeatable), e.g.
    /// `--server-arg=--wal-sync --server-arg=always`.
    #[arg(long, allow_hyphen_values = true, global = true)]
    server_arg: Vec<String>,
}

#[derive(Subcommand)]
enum Mode {
    /// `kill -9` rounds under traffic, each verified after the restart.
    CrashRounds {
        /// How many kill -9s (each round verified after its restart).
        #[arg(long, default_value_t = 20)]
        rounds: u32,
        /// The kill comes between these many ms into a round's traffic.
        #[arg(long, default_value_t = 300)]
        kill_min_ms: u64,
        #[arg(long, default_value_t = 3000)]
        kill_max_ms: u64,
        /// Traffic goes on up to this long after the restart.
        #[arg(long, default_value_t = 1500)]
        after_restart_ms: u64,
        /// Acknowledged sends re-sent per round (same Ack expected).
        #[arg(long, default_value_t = 20)]
        resend: usize,
    },
    /// Steady traffic with churning connections; RSS and fds sampled.
    Soak {
        /// How long the traffic runs (verification follows).
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// RSS is judged after this: at 250 sends/s RocksDB's memtables
        /// (16 MiB per column family, filling at different speeds, within
        /// one budget) take minutes to reach their steady saw-tooth
        /// (docs/performance.md, "Soak").
        #[arg(long, default_value_t = 15.0)]
        warmup_minutes: f64,
        /// RSS, open files and RocksDB's memory are sampled this often.
        #[arg(long, default_value_t = 2.0)]
        sample_secs: f64,
        /// A device logs out (and back in) this often.
        #[arg(long, default_value_t = 2000)]
        churn_every_ms: u64,
        /// A user leaves and a new one joins this often.
        #[arg(long, default_value_t = 30)]
        user_churn_secs: u64,
        /// RSS peaks and troughs may move this much (percent) from the
        /// first half of the measured period to the second.
        #[arg(long, default_value_t = 5.0)]
        rss_tolerance_pct: f64,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("swiftlet-exercise: a check failed (the summary above says which: VIOLATION lines, unresolved sends, RSS not flat, client errors or server ERROR lines)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("swiftlet-exercise: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let c = args.common;
    let seed = c.seed.unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let bin = match c.server_bin {
        Some(b) => b,
        None => std::env::current_exe()
            .context("where am I")?
            .with_file_name("swiftlet"),
    };
    // Removed when it goes out of scope, unless kept.
    let mut tmp = None;
    let work = match &c.work_dir {
        Some(w) => {
            std::fs::create_dir_all(w).context("create the work dir")?;
            w.clone()
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("swiftlet-exercise")
                .tempdir()?;
            if c.keep {
                dir.keep()
            } else {
                let path = dir.path().to_owned();
                tmp = Some(dir);
                path
            }
        }
    };
    let soak = matches!(args.mode, Mode::Soak { .. });
    let mut server = ServerProc::new(bin, &work, c.shards, c.server_arg.clone(), !soak)?;
    server.start().await?;
    let world = Arc::new(World::default());
    let device_opts = DeviceOpts {
        ack_batch: c.ack_batch,
        ack_every: Duration::from_millis(200),
        read_prob: c.read_prob,
        inflight: c.inflight,
        send_deadline: Duration::from_secs(60),
    };
    let traffic_opts = TrafficOpts {
        rate: c.rate.unwrap_or(if soak { 250.0 } else { 600.0 }),
        group_share: c.group_share,
        self_share: 0.02,
        max_body: 200,
    };
    population::add_users(
        &world,
        &server.addr(),
        c.users,
        c.devices,
        &device_opts,
        &mut rng,
    );
    population::all_online(&world, Duration::from_secs(30)).await?;
    population::create_groups(&world, c.groups, c.group_size, &mut rng).await?;
    let (summary, passed) = match args.mode {
        Mode::CrashRounds {
            rounds,
            kill_min_ms,
            kill_max_ms,
            after_restart_ms,
            resend,
        } => {
            let opts = crash::CrashOpts {
                rounds,
                kill_min_ms,
                kill_max_ms,
                after_restart_ms,
                resend,
            };
            crash::run(&world, &mut server, &opts, &traffic_opts, &mut rng).await?
        }
        Mode::Soak {
            minutes,
            warmup_minutes,
            sample_secs,
            churn_every_ms,
            user_churn_secs,
            rss_tolerance_pct,
        } => {
            let opts = soak::SoakOpts {
                minutes,
                warmup_minutes,
                sample_secs,
                churn_every: Duration::from_millis(churn_every_ms),
                user_churn: Duration::from_secs(user_churn_secs),
                devices: c.devices,
                rss_tolerance_pct,
            };
            soak::run(
                &world,
                &mut server,
                &opts,
                &traffic_opts,
                &device_opts,
                &mut rng,
            )
            .await?
        }
    };
    // Devices let go before the server stops, so it shuts down cleanly.
    for d in world.all_devices() {
        d.command(device::Cmd::Leave);
    }
    for d in world.all_devices() {
        let _ = tokio::time::timeout(Duration::from_secs(10), d.join()).await;
    }
    server.stop().await?;
    if c.keep || c.work_dir.is_some() {
        println!("work dir kept: {}", work.display());
    }
    println!("{summary}");
    drop(tmp);
    Ok(passed)
}
