//! loadgen: drives a running swiftlet server with simulated clients and
//! prints one JSON summary on the last line of stdout. See README.md beside
//! this crate for every flag, the summary's fields and the scale-out
//! arithmetic.
//!
//! Layout:
//! - [`cli`]: the flags; [`addr`]: servers, source addresses, tokens, shares.
//! - [`conn`]: the lean raw protocol connection every scenario but the
//!   offline senders uses.
//! - [`ws`]: hand-rolled WebSocket framing for `--transport ws`.
//! - [`hold`]: the threads that hold idle connections without a task each.
//! - [`scenario`]: idle, chat, group, storm, offline.
//! - [`run`]: the per-process context, barrier, progress and timeline.
//! - [`parent`]: the coordinator of `--workers` (child processes) and
//!   `--agents`/`--spawn-agents` (over TCP), merging their results;
//!   [`agent`]: `loadgen agent`, which runs shares for a coordinator.
//! - [`stats`], [`summary`]: counters, histograms, the JSON summary.
//! - [`peek`]: a delivered message's seq, group and body header read in
//!   place, without decoding the rest.
//! - [`body`]: the message body header; [`procmem`]: server memory from
//!   /proc; [`plot`]: the SVG latency chart.

mod addr;
mod agent;
mod body;
mod cli;
mod conn;
mod hold;
mod pace;
mod parent;
mod peek;
mod plot;
mod procmem;
mod run;
mod scenario;
mod stats;
mod summary;
mod ws;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use rand::Rng as _;
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::addr::Auth;
use crate::cli::{Args, Scenario};
use crate::run::{Coord, Ctx};
use crate::summary::{ServerMemory, WorkerResult};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages on its arenas, and the kernel
    // then backs a touched region with a whole 2 MiB page: loadgen's own RSS
    // per idle connection read 2.1-2.7 KB with 22 of its 32 MB in huge
    // pages (smaps AnonHugePages, 9,000 connections), against ~0.3 KB
    // without. The server turns THP off for the same reason (src/alloc.rs).
    // Failing only coarsens the memory figures.
    let _ = nix::sys::prctl::set_thp_disable(true);
    if std::env::args_os().nth(1).is_some_and(|a| a == "agent") {
        let a = cli::AgentArgs::parse_from(std::env::args_os().skip(1));
        return block_on(Some(1), agent::serve(a), |()| ExitCode::SUCCESS);
    }
    let args = Args::parse();
    let threads = args.threads;
    block_on(threads, real_main(args), |code| code)
}

/// Run `f` on a runtime with `threads` workers (1: current-thread; default:
/// one per core); an error is printed and exits with status 1.
fn block_on<T>(
    threads: Option<usize>,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
    code: impl FnOnce(T) -> ExitCode,
) -> ExitCode {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let out = rt.block_on(f);
    // Do not wait for blocking threads: a worker's stdin watcher
    // (run::Ctx::barrier) sits in a read that ends only with the coordinator.
    rt.shutdown_background();
    match out {
        Ok(v) => code(v),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.dev_auth || args.jwt_secret.is_some(),
        "give --dev-auth or --jwt-secret SECRET"
    );
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    raise_fd_limit();
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lg{:06x}", rand::thread_rng().gen_range(0..0x100_0000u32)));

    if parent::coordinates(&args) {
        let (result, mem) = parent::run(&args, &prefix).await?;
        return finish(&args, &result, &mem);
    }

    let ctx = build_ctx(&args, prefix).await?;
    let child = ctx.is_child();
    let stats = ctx.stats.clone();
    let progress_stop = CancellationToken::new();
    run::spawn_progress(stats, child, args.server_pid, progress_stop.clone());
    let (result, mem) = run_scenario(ctx).await?;
    progress_stop.cancel();
    if child {
        println!("{}", serde_json::json!({ "result": result }));
        return Ok(ExitCode::SUCCESS);
    }
    finish(&args, &result, &mem)
}

async fn build_ctx(args: &Args, prefix: String) -> anyhow::Result<Ctx> {
    let servers = addr::resolve_servers(&args.server).await?;
    let conn_servers = match args.transport {
        cli::Transport::Tcp => servers.clone(),
        cli::Transport::Ws => addr::resolve_servers(&args.http_server)
            .await
            .context("--http-server")?,
    };
    let sources = match &args.source {
        Some(s) => addr::parse_sources(s).context("--source")?,
        None => Vec::new(),
    };
    let auth = match &args.jwt_secret {
        Some(s) if !args.dev_auth => Auth::Jwt(s.clone()),
        _ => Auth::Dev,
    };
    let coord = match args.worker_index {
        Some(_) => Coord::Child {
            lines: tokio::io::BufReader::new(tokio::io::stdin()).lines(),
        },
        None => {
            let mut mem = ServerMemory::default();
            if let Some(pid) = args.server_pid {
                procmem::before(pid, &mut mem);
            }
            Coord::Local { mem }
        }
    };
    Ok(Ctx {
        args: args.clone(),
        servers,
        conn_servers,
        sources,
        auth,
        prefix,
        worker_index: args.worker_index.unwrap_or(0),
        worker_count: args.workers.max(1),
        stats: Arc::new(stats::Stats::default()),
        connect_slots: Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1))),
        coord,
        tls: match (args.tls.connector()?, args.transport) {
            (Some(c), cli::Transport::Ws) => Some(c.for_http()),
            (c, _) => c,
        },
        rss_before: procmem::self_rss_bytes(),
        rss_ready: 0,
    })
}

async fn run_scenario(mut ctx: Ctx) -> anyhow::Result<(WorkerResult, ServerMemory)> {
    let mut result = match ctx.args.scenario {
        Scenario::Idle => scenario::idle::run(&mut ctx).await?,
        Scenario::Chat => scenario::chat::run(&mut ctx).await?,
        Scenario::Storm => scenario::storm::run(&mut ctx).await?,
        Scenario::Offline => scenario::offline::run(&mut ctx).await?,
        Scenario::Group => scenario::group::run(&mut ctx).await?,
    };
    result.redirects = ctx
        .stats
        .redirects
        .load(std::sync::atomic::Ordering::Relaxed);
    result.rss_before_bytes = ctx.rss_before;
    result.rss_ready_bytes = ctx.rss_ready;
    let mem = match ctx.coord {
        Coord::Local { mem } => mem,
        Coord::Child { .. } => ServerMemory::default(),
    };
    Ok((result, mem))
}

/// Print the summary (last stdout line), draw the plot, choose the exit code.
fn finish(args: &Args, r: &WorkerResult, mem: &ServerMemory) -> anyhow::Result<ExitCode> {
    let summary = summary::summary(args.scenario.name(), args.params_json(), r, mem);
    if let Some(path) = &args.plot {
        let points: Vec<_> = r
            .timeline
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let q = |p| {
                    (!s.latency.is_empty()).then(|| s.latency.value_at_quantile(p) as f64 / 1000.0)
                };
                (i as u64 + 1, q(0.5), q(0.99))
            })
            .collect();
        let title = format!(
            "loadgen {}: send→delivered latency per second",
            args.scenario.name()
        );
        std::fs::write(path, plot::svg(&title, &points))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{summary}");
    let bad = r.lost() > 0 || r.duplicated > 0 || r.reordered > 0;
    if bad {
        eprintln!(
            "loadgen: correctness check FAILED: lost {}, duplicated {}, reordered {}",
            r.lost(),
            r.duplicated,
            r.reordered
        );
        return Ok(ExitCode::from(1));
    }
    if r.connections > 0 && r.open_at_ready == 0 {
        eprintln!("loadgen: no connection could be opened");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Raise the soft open-files limit to the hard limit (each connection is an
/// fd). Without the `libc` crate we ask the shell's `ulimit` semantics
/// through /proc: if the soft limit is low, say so.
fn raise_fd_limit() {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
        let soft: Option<u64> = line.split_whitespace().nth(3).and_then(|s| s.parse().ok());
        if let Some(soft) = soft.filter(|s| *s < 20_000) {
            eprintln!(
                "loadgen: open-files soft limit is {soft}; run `ulimit -n 20000` (or higher) for large runs"
            );
        }
    }
}
