//! `offline`: queue `--messages` messages for `--users` receivers who are
//! offline, then, on the barrier's "go", connect them all and measure how
//! fast they catch up (`msgs_per_s` = deliveries / `catchup_s`).
//!
//! The queueing side uses the client library (`swiftlet_client::Client`):
//! `--senders` connections, each sending its messages one after the other
//! so its counter order is the order the receivers must see. Receivers are
//! raw connections; each reads until its inbox head (`Welcome.head_seq`),
//! checks seq and per-sender order, acknowledges, and records its time from
//! "go" to caught up in `latency_ms`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use swiftlet_client::{Client, ClientConfig, CursorTracker, Observed};
use swiftlet_protocol::{pb, Body};

use crate::addr::share;
use crate::body::{self, Header};
use crate::conn::{fatal_error, Conn, ConnError};
use crate::run::{connect, Ctx};
use crate::stats::{OpenGuard, Stats};
use crate::summary::WorkerResult;

const READ_CHUNK: usize = 16 * 1024;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let receivers = share(ctx.args.users.max(1), ctx.worker_index, ctx.worker_count);
    let r_count = receivers.end - receivers.start;
    let msgs = share(ctx.args.messages, ctx.worker_index, ctx.worker_count);
    let m_count = msgs.end - msgs.start;
    let senders = ctx.args.senders().clamp(1, m_count.max(1));
    let stats = ctx.stats.clone();

    // Phase 1: queue the messages.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for j in 0..senders {
        let user = ctx.user("s", u64::from(ctx.worker_index) * 1_000_000 + j);
        let server = ctx.servers[(j as usize) % ctx.servers.len()].to_string();
        let mut cfg = ClientConfig::new(server, ctx.auth.token(&user), "d1");
        // The senders use the TCP port (the TCP connector, whatever the
        // transport of the measured connections).
        cfg.tls = ctx.args.tls.connector()?;
        let names: Vec<(u64, String)> = (j..m_count)
            .step_by(senders as usize)
            .map(|i| {
                let r = receivers.start + i % r_count.max(1);
                (i, ctx.user("r", r))
            })
            .collect();
        let sender_id = 0x8000_0000 | (ctx.worker_index << 16) | j as u32;
        let (stats, body_bytes) = (stats.clone(), ctx.args.body_bytes);
        tasks.push(tokio::spawn(async move {
            let (client, deliveries) = match Client::connect(cfg).await {
                Ok(c) => c,
                Err(e) => {
                    stats.error(format!("sender_connect_{}", client_error_kind(&e)));
                    return;
                }
            };
            // The sender's own copies are not this scenario's concern.
            drop(deliveries);
            for (counter, (_, to)) in names.into_iter().enumerate() {
                let h = Header {
                    sent_unix_ns: body::unix_ns(),
                    sender: sender_id,
                    counter: counter as u64 + 1,
                };
                stats.sent.fetch_add(1, Relaxed);
                let id = format!("o{}", counter + 1);
                let t = Instant::now();
                match client
                    .send_with_id(&id, &to, body::CONTENT_TYPE, body::encode(&h, body_bytes))
                    .await
                {
                    Ok(_) => {
                        stats.acked.fetch_add(1, Relaxed);
                        stats.record_ack(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => stats.error(format!("send_{}", client_error_kind(&e))),
                }
            }
            client.close().await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let queue_s = start.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: queued {} messages for {r_count} offline users in {queue_s:.2}s",
        stats.acked.load(Relaxed)
    );
    ctx.barrier().await?;

    // Phase 2: the receivers come online.
    let go = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for k in receivers {
        let mut target = ctx.target(k, &ctx.user("r", k));
        let (slots, stats, done) = (ctx.connect_slots.clone(), stats.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            if let Some(mut conn) = connect(&slots, &stats, &mut target, READ_CHUNK).await {
                let _open = OpenGuard::new(&stats);
                match catch_up(&mut conn, &stats).await {
                    Ok(()) => stats.record_delivery(go.elapsed().as_micros() as u64),
                    Err(e) => stats.error(e.kind()),
                }
            }
            done.fetch_add(1, Relaxed);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let catchup_s = go.elapsed().as_secs_f64();
    let (latency, ack_latency, login_latency) = stats.take_histograms();
    let delivered = stats.delivered.load(Relaxed);
    Ok(WorkerResult {
        connections: r_count,
        open_at_ready: done.load(Relaxed),
        logins: stats.logins.load(Relaxed),
        sent: stats.sent.load(Relaxed),
        acked: stats.acked.load(Relaxed),
        delivered,
        duplicated: stats.duplicated.load(Relaxed),
        reordered: stats.reordered.load(Relaxed),
        gaps: stats.gaps.load(Relaxed),
        errors: stats.errors(),
        measured_s: catchup_s,
        measured_delivered: delivered,
        login_phase_s: queue_s,
        catchup_s: Some(catchup_s),
        latency,
        ack_latency,
        login_latency,
        ..Default::default()
    })
}

fn client_error_kind(e: &swiftlet_client::ClientError) -> String {
    match e.code() {
        Some(c) => swiftlet_client::code_name(c).to_lowercase(),
        None => match e {
            swiftlet_client::ClientError::Timeout => "timeout".into(),
            swiftlet_client::ClientError::Io(_) => "io".into(),
            swiftlet_client::ClientError::Disconnected(_) => "disconnected".into(),
            _ => "other".into(),
        },
    }
}

/// Read the backlog up to `Welcome.head_seq`, checking order; acknowledge
/// as it goes.
async fn catch_up(conn: &mut Conn, stats: &Stats) -> Result<(), ConnError> {
    let head = conn.welcome.head_seq;
    let mut tracker = CursorTracker::new(conn.welcome.cursor);
    let mut last_from: HashMap<u32, u64> = HashMap::new();
    let mut acked = conn.welcome.cursor;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while tracker.last() < head {
        let env = tokio::time::timeout_at(deadline, conn.recv())
            .await
            .map_err(|_| ConnError::Timeout)??;
        match env.body {
            Some(Body::Deliver(d)) => {
                let Some(ev) = d.event else { continue };
                match tracker.observe(ev.seq) {
                    Observed::Duplicate => {
                        stats.duplicated.fetch_add(1, Relaxed);
                        continue;
                    }
                    Observed::Gap { .. } => {
                        stats.gaps.fetch_add(1, Relaxed);
                    }
                    Observed::InOrder => {}
                }
                let Some(pb::event::Kind::Message(m)) = ev.kind else {
                    continue;
                };
                let Some(h) = body::decode(&m.body) else {
                    stats.error("foreign_body");
                    continue;
                };
                let last = last_from.entry(h.sender).or_insert(0);
                if h.counter == *last {
                    stats.duplicated.fetch_add(1, Relaxed);
                    continue;
                }
                if h.counter < *last {
                    stats.reordered.fetch_add(1, Relaxed);
                } else {
                    *last = h.counter;
                }
                stats.delivered.fetch_add(1, Relaxed);
                if tracker.last() >= acked + 256 {
                    acked = tracker.last();
                    conn.send(Body::DeliveryAck(pb::DeliveryAck { up_to: acked }))
                        .await?;
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
    if tracker.last() > acked {
        conn.send(Body::DeliveryAck(pb::DeliveryAck {
            up_to: tracker.last(),
        }))
        .await?;
    }
    Ok(())
}
