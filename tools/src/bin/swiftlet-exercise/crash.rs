//! Crash rounds: traffic runs, the server is `kill -9`ed at a random moment
//! (seeded), started again on the same data directory and ports, traffic
//! goes on while the devices reconnect and the sends that lost their Ack
//! are retried with the same `client_msg_id`; then traffic stops, every
//! send in flight ends, a sample of acknowledged sends is re-sent, and
//! everything is verified ([`crate::verify`]) before the next round.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use crate::server::ServerProc;
use crate::traffic::{self, TrafficOpts};
use crate::verify::{self, Verified};
use crate::world::World;

#[derive(Debug, Clone)]
pub struct CrashOpts {
    pub rounds: u32,
    pub kill_min_ms: u64,
    pub kill_max_ms: u64,
    /// Traffic goes on this long after the restart (random up to it, at
    /// least a quarter of it) before the round is verified.
    pub after_restart_ms: u64,
    /// Acknowledged sends re-sent per round.
    pub resend: usize,
}

/// Run the rounds; returns the JSON summary and whether all passed.
pub async fn run(
    world: &Arc<World>,
    server: &mut ServerProc,
    opts: &CrashOpts,
    traffic_opts: &TrafficOpts,
    rng: &mut StdRng,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let started = Instant::now();
    let mut rounds = Vec::new();
    let mut failed = false;
    let mut resent_total = 0;
    let mut last = Verified::default();
    for round in 1..=opts.rounds {
        let t0 = Instant::now();
        let traffic = traffic::Running::start(world.clone(), traffic_opts.clone(), rng.gen());
        let kill_at = rng.gen_range(opts.kill_min_ms..=opts.kill_max_ms.max(opts.kill_min_ms));
        tokio::time::sleep(Duration::from_millis(kill_at)).await;
        // Kill while sends are in flight, so that some lose their Ack and
        // must be retried (at this rate a moment with none is rare).
        let wait_from = Instant::now();
        while world.in_flight.load(Ordering::SeqCst) == 0
            && wait_from.elapsed() < Duration::from_millis(500)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let in_flight = world.in_flight.load(Ordering::SeqCst);
        let (acked_at_kill, ..) = world.ledger_counts();
        world.kills.fetch_add(1, Ordering::SeqCst);
        server.kill_9().await?;
        let down_ms = rng.gen_range(0..=200);
        tokio::time::sleep(Duration::from_millis(down_ms)).await;
        server.start().await?;
        let after = rng.gen_range(opts.after_restart_ms / 4..=opts.after_restart_ms.max(1));
        tokio::time::sleep(Duration::from_millis(after)).await;
        traffic.stop().await?;
        let (resent, bad) = verify::resend_sample(world, opts.resend, rng).await;
        resent_total += resent;
        let mut v = verify::verify(world, &server.addr()).await?;
        for b in bad {
            v.violations += 1;
            v.texts.push(b);
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "round {round:>2}/{}: killed after {kill_at} ms ({acked_at_kill} acked by then, {in_flight} in flight), down {down_ms} ms, traffic {after} ms after restart; \
             {} acked ({} after a retry), {} unresolved ({} stored), {} re-sent with the same Ack; {} events in {} inboxes; \
             {} devices: {} delivered, {} replayed; violations {}; {secs:.1} s",
            opts.rounds, v.acked, v.retried, v.unresolved, v.unresolved_stored, resent, v.events, v.inboxes, v.devices,
            v.delivered, v.replayed, v.violations
        );
        for t in &v.texts {
            println!("  VIOLATION {t}");
        }
        if v.violations > 0 || v.unresolved > 0 {
            failed = true;
        }
        rounds.push(json!({
            "round": round, "kill_after_ms": kill_at, "in_flight_at_kill": in_flight, "down_ms": down_ms, "after_restart_ms": after,
            "acked": v.acked, "retried": v.retried, "unresolved": v.unresolved, "violations": v.violations, "seconds": secs,
        }));
        last = v;
        if failed {
            break;
        }
    }
    let problems = server.log_problems();
    let log_errors = problems.iter().filter(|(l, _)| l == "ERROR").count();
    for (level, message) in problems.iter().take(10) {
        println!("  server log: {level} {message}");
    }
    if log_errors > 0 {
        failed = true;
    }
    let errors = crate::world::lock(&world.errors).clone();
    let summary = json!({
        "server_log": {"error": log_errors, "warn": problems.len() - log_errors},
        "mode": "crash-rounds",
        "rounds": rounds.len(),
        "acked": last.acked,
        "acked_after_retry": last.retried,
        "unresolved": last.unresolved,
        "unresolved_stored": last.unresolved_stored,
        "resent_same_ack": resent_total,
        "inbox_events": last.events,
        "devices": last.devices,
        "delivered": last.delivered,
        "replayed": last.replayed,
        "violations": last.violations,
        "skipped_sends": world.skipped.load(Ordering::Relaxed),
        "client_errors": errors,
        "seconds": started.elapsed().as_secs_f64(),
        "passed": !failed,
        "per_round": rounds,
    });
    Ok((summary, !failed))
}
