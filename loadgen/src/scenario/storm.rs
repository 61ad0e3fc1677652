//! `storm`: log in this process's share of `--connections`, then, on the
//! barrier's "go", every client drops its connection and reconnects at once
//! (as after a server restart or a network blip). Reports the reconnect
//! login rate (`logins_per_s`, over `relogin_s`) and the time until every
//! client has caught up with its inbox (`catchup_s`: Welcome received and
//! every event up to `Welcome.head_seq` delivered).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use swiftlet_client::CursorTracker;
use swiftlet_protocol::{pb, Body};
use tokio_util::sync::CancellationToken;

use super::idle::hold;
use crate::addr::share;
use crate::conn::{fatal_error, Conn, ConnError};
use crate::run::{connect, wait_count, Ctx};
use crate::stats::Stats;
use crate::summary::WorkerResult;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let range = share(ctx.args.connections, ctx.worker_index, ctx.worker_count);
    let n = range.end - range.start;
    let go = CancellationToken::new();
    let stop = CancellationToken::new();
    let attempted = Arc::new(AtomicU64::new(0));
    let relogged = Arc::new(AtomicU64::new(0));
    let caught_up = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for k in range {
        let mut target = ctx.target(k, &ctx.user("c", k));
        let stats = ctx.stats.clone();
        let slots = ctx.connect_slots.clone();
        let (go, stop) = (go.clone(), stop.clone());
        let (attempted, relogged, caught_up) =
            (attempted.clone(), relogged.clone(), caught_up.clone());
        let args = ctx.args.clone();
        tasks.push(tokio::spawn(async move {
            let first = connect(&slots, &stats, &mut target, 0).await;
            attempted.fetch_add(1, Relaxed);
            let Some(first) = first else { return };
            // Hold the first connection until the storm starts.
            let open = crate::stats::OpenGuard::new(&stats);
            go.cancelled().await;
            drop(first);
            drop(open);
            let again = connect(&slots, &stats, &mut target, 0).await;
            relogged.fetch_add(1, Relaxed);
            let Some(mut conn) = again else {
                caught_up.fetch_add(1, Relaxed);
                return;
            };
            if let Err(e) = catch_up(&mut conn, &stats).await {
                stats.error(e.kind());
            }
            caught_up.fetch_add(1, Relaxed);
            hold(conn, &args, &stats, &stop).await;
        }));
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let open_at_ready = ctx.stats.open.load(Relaxed);
    let first_logins = ctx.stats.logins.load(Relaxed);
    ctx.barrier().await?;
    // Only the reconnects go into the login histogram.
    ctx.stats.take_histograms();
    let storm = Instant::now();
    go.cancel();
    wait_count(&relogged, open_at_ready).await;
    let relogin_s = storm.elapsed().as_secs_f64();
    wait_count(&caught_up, open_at_ready).await;
    let catchup_s = storm.elapsed().as_secs_f64();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (latency, ack_latency, login_latency) = ctx.stats.take_histograms();
    let logins = ctx.stats.logins.load(Relaxed);
    Ok(WorkerResult {
        connections: n,
        open_at_ready,
        logins,
        relogins: logins - first_logins,
        delivered: ctx.stats.delivered.load(Relaxed),
        errors: ctx.stats.errors(),
        login_phase_s,
        measured_s: relogin_s,
        relogin_s: Some(relogin_s),
        catchup_s: Some(catchup_s),
        latency,
        ack_latency,
        login_latency,
        ..Default::default()
    })
}

/// Read deliveries until everything up to `Welcome.head_seq` has arrived,
/// then acknowledge them.
pub async fn catch_up(conn: &mut Conn, stats: &Stats) -> Result<(), ConnError> {
    let head = conn.welcome.head_seq;
    let mut tracker = CursorTracker::new(conn.welcome.cursor);
    while tracker.last() < head {
        let env = conn.recv().await?;
        match env.body {
            Some(Body::Deliver(d)) => {
                if let Some(ev) = d.event {
                    if tracker.observe(ev.seq) == swiftlet_client::Observed::Duplicate {
                        stats.duplicated.fetch_add(1, Relaxed);
                    } else {
                        stats.delivered.fetch_add(1, Relaxed);
                    }
                }
            }
            Some(Body::Error(e)) => {
                if let Some(err) = fatal_error(&e) {
                    return Err(err);
                }
            }
            _ => {}
        }
    }
    if tracker.last() > conn.welcome.cursor {
        conn.send(Body::DeliveryAck(pb::DeliveryAck {
            up_to: tracker.last(),
        }))
        .await?;
    }
    Ok(())
}
