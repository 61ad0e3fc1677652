//! `idle`: open this process's share of `--connections`, log each in, hold
//! them with heartbeats for `--duration`, then close. Reports the login rate
//! of the connect phase and (via `--server-pid`) the server's memory per
//! connection. `--concurrency` connector tasks log the connections in and
//! hand each to the [`Holder`] threads (no task per idle connection: see
//! [`crate::hold`]); only TLS connections, whose stream stays in tokio, are
//! held by a task each ([`hold`], also used by `storm`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{first_ping, idle_frame, ping, ping_period};
use crate::addr::share;
use crate::cli::Args;
use crate::conn::{Conn, Taken};
use crate::hold::Holder;
use crate::run::{connect, wait_count, CpuWindow, Ctx};
use crate::stats::{OpenGuard, Stats};
use crate::summary::WorkerResult;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let range = share(ctx.args.connections, ctx.worker_index, ctx.worker_count);
    let n = range.end - range.start;
    let stop = CancellationToken::new();
    let attempted = Arc::new(AtomicU64::new(0));
    let threads = ctx
        .args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let holder = Arc::new(Holder::start(threads, ctx.stats.clone())?);
    let start = Instant::now();
    // A bounded pool of connector tasks takes the connections in turn, so
    // the memory of a login in progress exists `--concurrency` times, not
    // once per connection.
    let next = Arc::new(AtomicU64::new(range.start));
    let connectors = (ctx.args.concurrency.max(1) as u64).min(n);
    let targets = Arc::new(ctx.targets());
    let mut tasks = Vec::with_capacity(connectors as usize);
    for _ in 0..connectors {
        let (stats, slots, stop, attempted) = (
            ctx.stats.clone(),
            ctx.connect_slots.clone(),
            stop.clone(),
            attempted.clone(),
        );
        let (args, next, end, holder, targets) = (
            ctx.args.clone(),
            next.clone(),
            range.end,
            holder.clone(),
            targets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut tls_held = Vec::new();
            loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= end {
                    break;
                }
                let mut target = targets.target(k, &targets.user("c", k));
                let conn = Box::pin(connect(&slots, &stats, &mut target, 0)).await;
                if let Some(conn) = conn {
                    let period = ping_period(&args, &conn);
                    match conn.into_parts() {
                        Taken::Parts(parts) => holder.adopt(parts, period, &stats),
                        Taken::Lost(e) => stats.error(e.kind()),
                        // TLS: the stream cannot leave tokio; a task holds it.
                        Taken::Kept(conn) => {
                            let (args, stats, stop) = (args.clone(), stats.clone(), stop.clone());
                            tls_held.push(tokio::spawn(async move {
                                hold(*conn, &args, &stats, &stop).await
                            }));
                        }
                    }
                }
                attempted.fetch_add(1, Relaxed);
            }
            for t in tls_held {
                let _ = t.await;
            }
        }));
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let open_at_ready = ctx.stats.open.load(Relaxed);
    ctx.barrier().await?;
    let cpu = CpuWindow::start(ctx);
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration.max(0.0))).await;
    let (cpu_us, server_cpu_us) = cpu.stop();
    ctx.set_server_cpu(server_cpu_us);
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if let Ok(holder) = Arc::try_unwrap(holder) {
        tokio::task::spawn_blocking(move || holder.stop()).await?;
    }
    let (latency, ack_latency, login_latency) = ctx.stats.take_histograms();
    Ok(WorkerResult {
        connections: n,
        open_at_ready,
        logins: ctx.stats.logins.load(Relaxed),
        delivered: ctx.stats.delivered.load(Relaxed),
        errors: ctx.stats.errors(),
        login_phase_s,
        measured_s: login_phase_s,
        latency,
        ack_latency,
        login_latency,
        cpu_us,
        ..Default::default()
    })
}

/// Keep one logged-in connection alive until `stop`.
pub async fn hold(mut conn: Conn, args: &Args, stats: &Stats, stop: &CancellationToken) {
    let _open = OpenGuard::new(stats);
    let period = ping_period(args, &conn);
    let mut next = first_ping(period);
    conn.shrink();
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                next += period;
                ping(&mut conn).await
            }
            r = conn.recv() => r.and_then(|env| idle_frame(env.body)),
        };
        if let Err(e) = r {
            stats.error(e.kind());
            return;
        }
        conn.shrink();
    }
}
