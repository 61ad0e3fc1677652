//! What the sending scenarios (`chat`, `group`) share: one user's session on
//! one socket, and the phases of the run around all of them.
//!
//! [`Common`] is the state every session task of a process shares: the phase
//! tokens (`setup`, `go`, `stop_sending`, `close`), open-loop timing and the
//! in-flight/owed counters. [`Session`] is one connection with its checks:
//! DeliveryAck queueing (every [`ACK_EVERY`] deliveries and every 500 ms),
//! per-device order and duplicates from the inbox seq ([`CursorTracker`]),
//! per-sender counters (echoes, duplicates, reordering), send→Ack latency and
//! the handling of Error frames. [`drive`] is the per-user task loop (ack and
//! ping timers with jitter, the open-loop send timer, the `select!` loop); a
//! scenario plugs in through [`Role`]. [`measure`], [`drain_acks`],
//! [`close`] and [`result`] are the phases after the barrier and the summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use swiftlet_client::{CursorTracker, Observed};
use swiftlet_protocol::{pb, Body, Envelope};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::body::{self, Header};
use crate::conn::{fatal_error, Conn, ConnError, Frame};
use crate::pace::{Pacer, Slot};
use crate::peek::Delivered;
use crate::run::{spawn_timeline, CpuWindow, Ctx};
use crate::stats::{OpenGuard, Stats};
use crate::summary::{Second, WorkerResult};

/// Deliveries between two DeliveryAcks (also sent every 500 ms).
pub const ACK_EVERY: u32 = 64;
/// Read-buffer reservation for busy sending connections.
pub const READ_CHUNK: usize = 8 * 1024;

/// What every session task of this process shares.
pub struct Common {
    pub stats: Arc<Stats>,
    pub body_bytes: usize,
    /// Open loop: seconds between two sends of one sender.
    pub period: Option<Duration>,
    /// Open loop: seconds between the first sends of two consecutive
    /// senders (1 / rate), so sender k sends at `t0 + k·stagger + j·period`.
    pub stagger: Duration,
    /// Open loop: releases each sender at its time (see [`crate::pace`]).
    pub pacer: Arc<Pacer>,
    pub ping: Option<Duration>,
    /// Before `go`: each session's [`Role::setup`] (group: CreateGroup).
    pub setup: CancellationToken,
    pub go: CancellationToken,
    pub stop_sending: CancellationToken,
    pub close: CancellationToken,
    /// Sends not yet answered, over all sessions of this process.
    pub in_flight: AtomicI64,
    /// Deliveries owed: for each acknowledged send, [`Pending::owed`].
    pub expected: AtomicU64,
    /// What a session without a wake-up waits on (never notified).
    never: Notify,
}

impl Common {
    /// `senders`: how many send over all processes (open loop: the `--rate`
    /// is shared among them).
    pub fn new(ctx: &Ctx, senders: u64) -> anyhow::Result<Self> {
        let period = match ctx.args.rate {
            Some(r) if r > 0.0 => Some(Duration::from_secs_f64(senders as f64 / r)),
            Some(_) => anyhow::bail!("--rate must be positive"),
            None => None,
        };
        Ok(Common {
            stats: ctx.stats.clone(),
            body_bytes: ctx.args.body_bytes,
            period,
            stagger: ctx
                .args
                .rate
                .map_or(Duration::ZERO, |r| Duration::from_secs_f64(1.0 / r)),
            pacer: Arc::new(Pacer::new(if period.is_some() {
                senders as usize
            } else {
                0
            })),
            ping: ctx.args.ping_interval.map(Duration::from_secs_f64),
            setup: CancellationToken::new(),
            go: CancellationToken::new(),
            stop_sending: CancellationToken::new(),
            close: CancellationToken::new(),
            in_flight: AtomicI64::new(0),
            expected: AtomicU64::new(0),
            never: Notify::new(),
        })
    }

    /// Open loop: sends on a timer; closed loop: the next on an answer.
    pub fn open_loop(&self) -> bool {
        self.period.is_some()
    }
}

/// A send waiting for its Ack.
pub trait Pending {
    /// When the Send was queued.
    fn queued_at(&self) -> Instant;
    /// Deliveries its Ack makes owed (added to [`Common::expected`]).
    fn owed(&self) -> u64 {
        0
    }
}

impl Pending for Instant {
    fn queued_at(&self) -> Instant {
        *self
    }
}

/// One connection and its checks.
pub struct Session<P> {
    pub me: u32,
    pub conn: Conn,
    tracker: CursorTracker,
    acked_up_to: u64,
    since_ack: u32,
    /// Highest counter seen per sender.
    last_from: HashMap<u32, u64>,
    pub counter: u64,
    /// request id → the pending send.
    pub inflight: HashMap<u64, P>,
    pub sending: bool,
}

/// What a Deliver frame turned out to be, past the common checks.
pub enum Delivery {
    /// A message from another sender, counted as delivered at `now_ns`.
    Counted { header: Header, now_ns: u64 },
    /// A non-message inbox event (seq already checked).
    Event(pb::event::Kind),
    /// Nothing more to do (duplicate, echo, foreign body, ...).
    Done,
}

impl<P: Pending> Session<P> {
    pub fn new(me: u32, conn: Conn) -> Self {
        let cursor = conn.welcome.cursor;
        Session {
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

    pub fn queue_delivery_ack(&mut self) {
        if self.tracker.last() > self.acked_up_to {
            self.acked_up_to = self.tracker.last();
            self.since_ack = 0;
            self.conn.queue(Body::DeliveryAck(pb::DeliveryAck {
                up_to: self.acked_up_to,
            }));
        }
    }

    /// Queue a message carrying the [`Header`] of `self.counter`, to a user
    /// (`to_user`) or a group (`group_id`), and remember it as `pending`.
    pub fn queue_message(
        &mut self,
        c: &Common,
        sent_ns: u64,
        to_user: &str,
        group_id: u64,
        pending: P,
    ) {
        let h = Header {
            sent_unix_ns: sent_ns,
            sender: self.me,
            counter: self.counter,
        };
        let id = self.conn.queue_send(to_user, group_id, &h, c.body_bytes);
        self.inflight.insert(id, pending);
        c.in_flight.fetch_add(1, Relaxed);
        c.stats.sent.fetch_add(1, Relaxed);
    }

    /// An Ack: the send it answers, with its latency recorded (`None`, and
    /// an `unexpected_ack` error, if nothing was waiting for it).
    pub fn acked(&mut self, c: &Common, request_id: u64) -> Option<P> {
        let Some(p) = self.inflight.remove(&request_id) else {
            c.stats.error("unexpected_ack");
            return None;
        };
        c.stats
            .record_ack(p.queued_at().elapsed().as_micros() as u64);
        c.stats.acked.fetch_add(1, Relaxed);
        c.expected.fetch_add(p.owed(), Relaxed);
        c.in_flight.fetch_sub(1, Relaxed);
        Some(p)
    }

    /// An Error frame: a fatal one ends the session; others count as
    /// `{what}_{code}`, and the send it refuses (if any) is returned.
    pub fn refused(
        &mut self,
        c: &Common,
        request_id: u64,
        e: &pb::Error,
        what: &str,
    ) -> Result<Option<P>, ConnError> {
        if let Some(err) = fatal_error(e) {
            return Err(err);
        }
        c.stats.error(format!(
            "{what}_{}",
            swiftlet_client::code_name(e.code).to_lowercase()
        ));
        let p = self.inflight.remove(&request_id);
        if p.is_some() {
            c.in_flight.fetch_sub(1, Relaxed);
        }
        Ok(p)
    }

    /// A Deliver frame: seq order and duplicates, echoes, per-sender order
    /// and duplicates, delivery latency; then a DeliveryAck if due. With
    /// `group`, a message of another group counts a `wrong_group` error.
    pub fn deliver(&mut self, c: &Common, d: pb::Deliver, group: Option<u64>) -> Delivery {
        let Some(ev) = d.event else {
            c.stats.error("empty_deliver");
            return Delivery::Done;
        };
        let out = self.check(ev, &c.stats, group);
        self.since_ack += 1;
        if self.since_ack >= ACK_EVERY {
            self.queue_delivery_ack();
        }
        out
    }

    /// A Deliver of a message, read in place by [`crate::peek`]: the same
    /// checks as [`Session::deliver`].
    pub fn deliver_message(&mut self, c: &Common, d: Delivered, group: Option<u64>) -> Delivery {
        let out = if self.seq_ok(d.seq, &c.stats) {
            self.check_message(d.header, d.group_id, &c.stats, group)
        } else {
            Delivery::Done
        };
        self.since_ack += 1;
        if self.since_ack >= ACK_EVERY {
            self.queue_delivery_ack();
        }
        out
    }

    /// The inbox seq: false for a duplicate (counted); a gap is counted.
    fn seq_ok(&mut self, seq: u64, stats: &Stats) -> bool {
        match self.tracker.observe(seq) {
            Observed::Duplicate => {
                stats.duplicated.fetch_add(1, Relaxed);
                return false;
            }
            Observed::Gap { .. } => {
                stats.gaps.fetch_add(1, Relaxed);
            }
            Observed::InOrder => {}
        }
        true
    }

    fn check(&mut self, ev: pb::Event, stats: &Stats, group: Option<u64>) -> Delivery {
        if !self.seq_ok(ev.seq, stats) {
            return Delivery::Done;
        }
        let m = match ev.kind {
            Some(pb::event::Kind::Message(m)) => m,
            Some(other) => return Delivery::Event(other),
            None => return Delivery::Done,
        };
        self.check_message(body::decode(&m.body), m.group_id, stats, group)
    }

    /// A message's header (None: not a loadgen body): echoes, group,
    /// per-sender order and duplicates, delivery latency.
    fn check_message(
        &mut self,
        header: Option<Header>,
        group_id: u64,
        stats: &Stats,
        group: Option<u64>,
    ) -> Delivery {
        let Some(h) = header else {
            stats.error("foreign_body");
            return Delivery::Done;
        };
        if h.sender == self.me {
            stats.echoes.fetch_add(1, Relaxed);
            return Delivery::Done;
        }
        if group.is_some_and(|g| group_id != g) {
            stats.error("wrong_group");
        }
        let last = self.last_from.entry(h.sender).or_insert(0);
        if h.counter == *last {
            stats.duplicated.fetch_add(1, Relaxed);
            return Delivery::Done;
        }
        if h.counter < *last {
            stats.reordered.fetch_add(1, Relaxed);
        } else {
            *last = h.counter;
        }
        let now_ns = body::unix_ns();
        stats.delivered.fetch_add(1, Relaxed);
        stats.record_delivery(now_ns.saturating_sub(h.sent_unix_ns) / 1000);
        Delivery::Counted { header: h, now_ns }
    }
}

/// A scenario's part in [`drive`].
pub trait Role {
    type Pending: Pending;
    type Shared;
    fn common(sh: &Self::Shared) -> &Common;
    fn session(&mut self) -> &mut Session<Self::Pending>;
    fn sending(&self) -> bool;
    /// On [`Common::setup`].
    fn setup(&mut self, _sh: &Self::Shared) {}
    /// On `go`: this session's global sender index (its open-loop phase is
    /// `index · stagger`), or `None` if it does not send.
    fn sender_index(&self, sh: &Self::Shared) -> Option<u32>;
    /// Queue one send.
    fn send(&mut self, sh: &Self::Shared);
    /// Closed loop: what wakes this session besides its socket, and when
    /// that wake-up is armed.
    fn waker<'a>(&self, _sh: &'a Self::Shared) -> Option<&'a Notify> {
        None
    }
    fn wake_armed(&self, _sh: &Self::Shared) -> bool {
        false
    }
    fn on_wake(&mut self, _sh: &Self::Shared) {}
    /// One frame from the server.
    fn handle(&mut self, env: Envelope, sh: &Self::Shared) -> Result<(), ConnError>;
    /// A delivered message (the frame loadgen receives most), read in place.
    fn message(&mut self, d: Delivered, sh: &Self::Shared);
}

/// Now plus a random fraction of `period`: the first tick of a periodic timer.
fn jitter(period: Duration) -> Instant {
    let us = rand::thread_rng().gen_range(0..period.as_micros().max(1) as u64);
    Instant::now() + Duration::from_micros(us)
}

/// One session task: [`drive`], then account for its end (its error, and
/// the sends a dead connection will never have answered).
pub async fn serve<R: Role>(mut role: R, sh: &R::Shared) {
    let c = R::common(sh);
    if let Err(e) = drive(&mut role, sh).await {
        c.stats.error(e.kind());
    }
    c.in_flight
        .fetch_sub(role.session().inflight.len() as i64, Relaxed);
}

/// The per-user task loop: reads, sends and checks on one socket until
/// `close`.
pub async fn drive<R: Role>(u: &mut R, sh: &R::Shared) -> Result<(), ConnError> {
    let c = R::common(sh);
    let _open = OpenGuard::new(&c.stats);
    // Periodic DeliveryAcks and Pings start at a random phase: users
    // connect within a few ms of each other, and timers armed then would
    // make all of them ack (and the server write receipts) in the same
    // millisecond every 500 ms.
    let ack_every = Duration::from_millis(500);
    let mut ack_tick = tokio::time::interval_at(jitter(ack_every), ack_every);
    ack_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ping_every = c.ping.unwrap_or(Duration::from_millis(
        u64::from(u.session().conn.welcome.idle_timeout_ms.max(3000)) / 3,
    ));
    let mut ping_tick = tokio::time::interval_at(jitter(ping_every), ping_every);
    ping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Open loop: this sender's slot in the process's pacer, which releases
    // sender k at t0 + k/rate + j·period, so the senders' sends interleave
    // evenly at the total rate (see crate::pace).
    let open_loop = c.open_loop();
    let never = Slot::default();
    let paced = match u.sender_index(sh) {
        Some(k) if open_loop => c.pacer.claim(k).unwrap_or(&never),
        _ => &never,
    };
    let waker = u.waker(sh).unwrap_or(&c.never);
    let (mut set_up, mut started) = (false, false);
    // The phase futures are made once and polled in place: made anew each
    // turn, each would join (and leave) its token's waiter list under a
    // mutex shared by every session of the process, every turn.
    let close = c.close.cancelled();
    let setup = c.setup.cancelled();
    let go = c.go.cancelled();
    let stop_sending = c.stop_sending.cancelled();
    let woken = waker.notified();
    tokio::pin!(close, setup, go, stop_sending, woken);
    loop {
        tokio::select! {
            biased;
            _ = &mut close => break,
            _ = &mut setup, if !set_up => {
                set_up = true;
                u.setup(sh);
            }
            _ = &mut go, if !started => {
                started = true;
                u.session().sending = u.sender_index(sh).is_some();
                // Open loop: the pacer, started with `go`, releases the sends.
                if u.sending() && !open_loop {
                    u.send(sh);
                }
            }
            _ = &mut stop_sending, if u.sending() => u.session().sending = false,
            n = paced.due(), if u.sending() && open_loop => {
                for _ in 0..n {
                    u.send(sh);
                }
            }
            _ = &mut woken, if !open_loop && u.wake_armed(sh) => {
                woken.set(waker.notified());
                u.on_wake(sh);
            }
            _ = ack_tick.tick() => u.session().queue_delivery_ack(),
            _ = ping_tick.tick() => {
                u.session().conn.queue(Body::Ping(pb::Ping { nonce: 0 }));
            }
            r = u.session().conn.recv_frame() => {
                let mut frame = Some(r?);
                while let Some(f) = frame {
                    match f {
                        Frame::Message(d) => u.message(d, sh),
                        Frame::Envelope(env) => u.handle(env, sh)?,
                    }
                    frame = u.session().conn.try_next_frame()?;
                }
            }
        }
        u.session().conn.flush().await?;
    }
    u.session().queue_delivery_ack();
    let _ = u.session().conn.flush().await;
    Ok(())
}

/// What the measured phase counted.
pub struct Measured {
    pub measured_s: f64,
    pub measured_delivered: u64,
    /// Acks within the measured phase.
    pub measured_acked: u64,
    /// CPU µs of this process and (when it watches it) of the server over
    /// the measured phase.
    pub cpu_us: u64,
    pub server_cpu_us: Option<u64>,
    timeline: JoinHandle<Vec<Second>>,
}

/// After the barrier: `go`, the warm-up, then `--duration` of measured
/// sending with its timeline; then `stop_sending`.
pub async fn measure(ctx: &Ctx, c: &Common) -> Measured {
    let stats = &ctx.stats;
    if let Some(period) = c.period {
        // Stops with the sending; the thread only sleeps and notifies.
        if let Err(e) = c.pacer.start(
            std::time::Instant::now(),
            c.stagger,
            period,
            c.stop_sending.clone(),
        ) {
            eprintln!("loadgen: cannot start the pacer thread ({e}); nothing will be sent");
            stats.error("pacer");
        }
    }
    c.go.cancel();
    if ctx.args.warmup > 0.0 {
        stats.measuring.store(false, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(ctx.args.warmup)).await;
        stats.reset_histograms();
        stats.measuring.store(true, Relaxed);
    }
    let timeline_stop = CancellationToken::new();
    let timeline = spawn_timeline(stats.clone(), timeline_stop.clone());
    let measure_start = Instant::now();
    let cpu = CpuWindow::start(ctx);
    let delivered_before = stats.delivered.load(Relaxed);
    let acked_before = stats.acked.load(Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration.max(0.0))).await;
    let measured_delivered = stats.delivered.load(Relaxed) - delivered_before;
    let measured_acked = stats.acked.load(Relaxed) - acked_before;
    let (cpu_us, server_cpu_us) = cpu.stop();
    let measured_s = measure_start.elapsed().as_secs_f64();
    c.stop_sending.cancel();
    timeline_stop.cancel();
    Measured {
        measured_s,
        measured_delivered,
        measured_acked,
        cpu_us,
        server_cpu_us,
        timeline,
    }
}

/// The first part of the drain: wait for the outstanding Acks, at most
/// `--drain` seconds. Returns the drain's deadline.
pub async fn drain_acks(ctx: &Ctx, c: &Common) -> Instant {
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.drain.max(0.0));
    while c.in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    deadline
}

/// `close` every session and wait for their tasks.
pub async fn close(c: &Common, tasks: Vec<JoinHandle<()>>) {
    c.close.cancel();
    for t in tasks {
        let _ = t.await;
    }
}

/// The result fields the sending scenarios share.
pub async fn result(
    stats: &Stats,
    connections: u64,
    open_at_ready: u64,
    login_phase_s: f64,
    m: Measured,
) -> WorkerResult {
    let (latency, ack_latency, login_latency) = stats.take_histograms();
    WorkerResult {
        connections,
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
        measured_s: m.measured_s,
        measured_delivered: m.measured_delivered,
        login_phase_s,
        latency,
        ack_latency,
        login_latency,
        cpu_us: m.cpu_us,
        timeline: m.timeline.await.unwrap_or_default(),
        ..Default::default()
    }
}
