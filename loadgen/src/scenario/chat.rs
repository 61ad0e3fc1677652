//! `chat`: `--users` users, one connection each, sending 1:1 messages to
//! random peers among all users (across workers too). Closed loop by
//! default: one message in flight per user, the next sent on its Ack. With
//! `--rate R`, open loop: each user sends on its own timer so the total is
//! R messages/s whatever the latency.
//!
//! Every user task reads, sends and checks in one loop on one socket:
//! send→Ack latency from the request id; send→delivered latency from the
//! Unix timestamp in the body (see [`crate::body`]); per-device order and
//! duplicates from the inbox seq ([`CursorTracker`]) and from each sender's
//! counter. The sender's own device also receives its message (the server
//! files it in both inboxes); those are counted as `echoes`, not deliveries.
//!
//! Phases: connect all, barrier, (warm-up), send for `--duration`, stop
//! sending and wait for the outstanding Acks, then drain deliveries until
//! everything acknowledged has arrived (single process) or nothing arrived
//! for 1.5 s, at most `--drain` seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use swiftlet_client::{CursorTracker, Observed};
use swiftlet_protocol::{pb, Body, Envelope};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::addr::share;
use crate::body::{self, Header};
use crate::conn::{fatal_error, Conn, ConnError};
use crate::run::{connect, spawn_timeline, wait_count, Ctx};
use crate::stats::{OpenGuard, Stats};
use crate::summary::WorkerResult;

/// Deliveries between two DeliveryAcks (also sent every 500 ms).
const ACK_EVERY: u32 = 64;
/// Read-buffer reservation for busy chat connections.
const READ_CHUNK: usize = 8 * 1024;

/// What every user task shares.
struct Shared {
    names: Vec<String>,
    stats: Arc<Stats>,
    body_bytes: usize,
    /// Open loop: seconds between two sends of one user.
    period: Option<Duration>,
    /// Open loop: seconds between the sends of two consecutive users
    /// (1 / rate), so user k sends at `t0 + k·stagger + j·period`.
    stagger: Duration,
    /// When the measured phase started (set just before `go`).
    t0: OnceLock<Instant>,
    ping: Option<Duration>,
    go: CancellationToken,
    stop_sending: CancellationToken,
    close: CancellationToken,
    /// Sends not yet answered, over all users of this process.
    in_flight: AtomicI64,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let users = ctx.args.users.max(1);
    let range = share(users, ctx.worker_index, ctx.worker_count);
    let n = range.end - range.start;
    let period = match ctx.args.rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(users as f64 / r)),
        Some(_) => anyhow::bail!("--rate must be positive"),
        None => None,
    };
    if ctx.args.body_bytes < body::HEADER_LEN {
        eprintln!(
            "loadgen: --body-bytes {} is below the {}-byte header; sending {} bytes",
            ctx.args.body_bytes,
            body::HEADER_LEN,
            body::HEADER_LEN
        );
    }
    let shared = Arc::new(Shared {
        names: (0..users).map(|k| ctx.user("u", k)).collect(),
        stats: ctx.stats.clone(),
        body_bytes: ctx.args.body_bytes,
        period,
        stagger: ctx
            .args
            .rate
            .map_or(Duration::ZERO, |r| Duration::from_secs_f64(1.0 / r)),
        t0: OnceLock::new(),
        ping: ctx.args.ping_interval.map(Duration::from_secs_f64),
        go: CancellationToken::new(),
        stop_sending: CancellationToken::new(),
        close: CancellationToken::new(),
        in_flight: AtomicI64::new(0),
    });
    let attempted = Arc::new(AtomicU64::new(0));
    let start = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for k in range {
        let target = ctx.target(k, &shared.names[k as usize]);
        let (slots, shared, attempted) =
            (ctx.connect_slots.clone(), shared.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            let conn = connect(&slots, &shared.stats, &target, READ_CHUNK).await;
            attempted.fetch_add(1, Relaxed);
            if let Some(conn) = conn {
                let mut user = User::new(k as u32, conn, &shared);
                if let Err(e) = user.run(&shared).await {
                    shared.stats.error(e.kind());
                }
                // Sends of a dead connection will never be answered.
                shared
                    .in_flight
                    .fetch_sub(user.inflight.len() as i64, Relaxed);
            }
        }));
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let open_at_ready = ctx.stats.open.load(Relaxed);
    ctx.barrier().await?;

    let stats = &ctx.stats;
    let _ = shared.t0.set(Instant::now());
    shared.go.cancel();
    if ctx.args.warmup > 0.0 {
        stats.measuring.store(false, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(ctx.args.warmup)).await;
        stats.reset_histograms();
        stats.measuring.store(true, Relaxed);
    }
    let timeline_stop = CancellationToken::new();
    let timeline = spawn_timeline(stats.clone(), timeline_stop.clone());
    let measure_start = Instant::now();
    let delivered_before = stats.delivered.load(Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration.max(0.0))).await;
    let measured_delivered = stats.delivered.load(Relaxed) - delivered_before;
    let measured_s = measure_start.elapsed().as_secs_f64();
    shared.stop_sending.cancel();
    timeline_stop.cancel();

    // Drain: outstanding Acks first, then deliveries.
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.drain.max(0.0));
    while shared.in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = (stats.delivered.load(Relaxed), Instant::now());
    while Instant::now() < deadline {
        let delivered = stats.delivered.load(Relaxed);
        if !ctx.is_child() && delivered >= stats.acked.load(Relaxed) {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.close.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (latency, ack_latency, login_latency) = stats.take_histograms();
    Ok(WorkerResult {
        connections: n,
        open_at_ready,
        logins: stats.logins.load(Relaxed),
        sent: stats.sent.load(Relaxed),
        acked: stats.acked.load(Relaxed),
        delivered: stats.delivered.load(Relaxed),
        echoes: stats.echoes.load(Relaxed),
        duplicated: stats.duplicated.load(Relaxed),
        reordered: stats.reordered.load(Relaxed),
        gaps: stats.gaps.load(Relaxed),
        errors: stats.errors(),
        measured_s,
        measured_delivered,
        login_phase_s,
        latency,
        ack_latency,
        login_latency,
        timeline: timeline.await.unwrap_or_default(),
        ..Default::default()
    })
}

/// Now plus a random fraction of `period`: the first tick of a periodic timer.
pub(crate) fn jitter(period: Duration) -> Instant {
    let us = rand::thread_rng().gen_range(0..period.as_micros().max(1) as u64);
    Instant::now() + Duration::from_micros(us)
}

/// One simulated user: its connection and its checks.
struct User {
    me: u32,
    conn: Conn,
    tracker: CursorTracker,
    acked_up_to: u64,
    since_ack: u32,
    /// Highest counter seen per sender.
    last_from: HashMap<u32, u64>,
    counter: u64,
    /// request id → when the Send was queued.
    inflight: HashMap<u64, Instant>,
    sending: bool,
}

impl User {
    fn new(me: u32, conn: Conn, _shared: &Shared) -> Self {
        let cursor = conn.welcome.cursor;
        User {
            me,
            conn,
            tracker: CursorTracker::new(cursor),
            acked_up_to: cursor,
            since_ack: 0,
            last_from: HashMap::new(),
            counter: 0,
            inflight: HashMap::new(),
            sending: false,
        }
    }

    async fn run(&mut self, sh: &Shared) -> Result<(), ConnError> {
        let _open = OpenGuard::new(&sh.stats);
        // Periodic DeliveryAcks and Pings start at a random phase: users
        // connect within a few ms of each other, and timers armed then would
        // make all of them ack (and the server write receipts) in the same
        // millisecond every 500 ms.
        let ack_every = Duration::from_millis(500);
        let mut ack_tick = tokio::time::interval_at(jitter(ack_every), ack_every);
        ack_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let ping_every = sh.ping.unwrap_or(Duration::from_millis(
            u64::from(self.conn.welcome.idle_timeout_ms.max(3000)) / 3,
        ));
        let mut ping_tick = tokio::time::interval_at(jitter(ping_every), ping_every);
        ping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Open loop: a per-user timer, armed at `go`. User k's first send is
        // at t0 + k/rate, so the users' sends interleave evenly at the total
        // rate. (A timer armed at go + period, or any phase shared by every
        // user, makes all of them send in the same millisecond: a burst of
        // `--users` messages each period, whose queueing is then measured
        // as latency.)
        let period = sh.period.unwrap_or(Duration::from_secs(3600));
        let mut send_tick = tokio::time::interval(period);
        let mut started = false;
        loop {
            tokio::select! {
                biased;
                _ = sh.close.cancelled() => break,
                _ = sh.go.cancelled(), if !started => {
                    started = true;
                    self.sending = true;
                    if let Some(period) = sh.period {
                        let t0 = *sh.t0.get_or_init(Instant::now);
                        let offset = (sh.stagger * self.me).as_nanos() % period.as_nanos().max(1);
                        send_tick = tokio::time::interval_at(
                            t0 + Duration::from_nanos(offset as u64),
                            period,
                        );
                    } else {
                        self.queue_send(sh);
                    }
                }
                _ = sh.stop_sending.cancelled(), if self.sending => self.sending = false,
                _ = send_tick.tick(), if self.sending && sh.period.is_some() => self.queue_send(sh),
                _ = ack_tick.tick() => self.queue_delivery_ack(),
                _ = ping_tick.tick() => {
                    self.conn.queue(Body::Ping(pb::Ping { nonce: 0 }));
                }
                r = self.conn.recv() => {
                    self.handle(r?, sh)?;
                    while let Some(env) = self.conn.try_next()? {
                        self.handle(env, sh)?;
                    }
                }
            }
            self.conn.flush().await?;
        }
        self.queue_delivery_ack();
        let _ = self.conn.flush().await;
        Ok(())
    }

    // `..Default::default()`: the protocol grows fields loadgen leaves unset.
    #[allow(clippy::needless_update)]
    fn queue_send(&mut self, sh: &Shared) {
        let users = sh.names.len() as u32;
        let peer = if users <= 1 {
            self.me
        } else {
            let p = rand::thread_rng().gen_range(0..users - 1);
            if p >= self.me {
                p + 1
            } else {
                p
            }
        };
        self.counter += 1;
        let h = Header {
            sent_unix_ns: body::unix_ns(),
            sender: self.me,
            counter: self.counter,
        };
        let id = self.conn.queue(Body::Send(pb::Send {
            client_msg_id: format!("m{}", self.counter),
            to_user: sh.names[peer as usize].clone(),
            content_type: body::CONTENT_TYPE.to_owned(),
            body: body::encode(&h, sh.body_bytes).into(),
            ..Default::default()
        }));
        self.inflight.insert(id, Instant::now());
        sh.in_flight.fetch_add(1, Relaxed);
        sh.stats.sent.fetch_add(1, Relaxed);
    }

    fn queue_delivery_ack(&mut self) {
        if self.tracker.last() > self.acked_up_to {
            self.acked_up_to = self.tracker.last();
            self.since_ack = 0;
            self.conn.queue(Body::DeliveryAck(pb::DeliveryAck {
                up_to: self.acked_up_to,
            }));
        }
    }

    fn handle(&mut self, env: Envelope, sh: &Shared) -> Result<(), ConnError> {
        let stats = &sh.stats;
        match env.body {
            Some(Body::Ack(_)) => {
                if let Some(at) = self.inflight.remove(&env.request_id) {
                    stats.record_ack(at.elapsed().as_micros() as u64);
                    stats.acked.fetch_add(1, Relaxed);
                    sh.in_flight.fetch_sub(1, Relaxed);
                    if self.sending && sh.period.is_none() {
                        self.queue_send(sh);
                    }
                } else {
                    stats.error("unexpected_ack");
                }
            }
            Some(Body::Deliver(d)) => {
                let Some(ev) = d.event else {
                    stats.error("empty_deliver");
                    return Ok(());
                };
                self.deliver(ev, stats);
                self.since_ack += 1;
                if self.since_ack >= ACK_EVERY {
                    self.queue_delivery_ack();
                }
            }
            Some(Body::Error(e)) => {
                if let Some(err) = fatal_error(&e) {
                    return Err(err);
                }
                stats.error(format!(
                    "send_{}",
                    swiftlet_client::code_name(e.code).to_lowercase()
                ));
                if self.inflight.remove(&env.request_id).is_some() {
                    sh.in_flight.fetch_sub(1, Relaxed);
                    if self.sending && sh.period.is_none() {
                        self.queue_send(sh);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn deliver(&mut self, ev: pb::Event, stats: &Stats) {
        match self.tracker.observe(ev.seq) {
            Observed::Duplicate => {
                stats.duplicated.fetch_add(1, Relaxed);
                return;
            }
            Observed::Gap { .. } => {
                stats.gaps.fetch_add(1, Relaxed);
            }
            Observed::InOrder => {}
        }
        let Some(pb::event::Kind::Message(m)) = ev.kind else {
            return;
        };
        let Some(h) = body::decode(&m.body) else {
            stats.error("foreign_body");
            return;
        };
        if h.sender == self.me {
            stats.echoes.fetch_add(1, Relaxed);
            return;
        }
        let last = self.last_from.entry(h.sender).or_insert(0);
        if h.counter == *last {
            stats.duplicated.fetch_add(1, Relaxed);
            return;
        }
        if h.counter < *last {
            stats.reordered.fetch_add(1, Relaxed);
        } else {
            *last = h.counter;
        }
        stats.delivered.fetch_add(1, Relaxed);
        let now = body::unix_ns();
        stats.record_delivery(now.saturating_sub(h.sent_unix_ns) / 1000);
    }
}
