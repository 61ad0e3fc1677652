//! One core's event loop: a thread running a mio `Poll` that owns its
//! connections outright.
//!
//! Each shard has its own listener on the shared port (`SO_REUSEPORT`, so the
//! kernel spreads accepts), a slab of [`conn::Conn`] state structs, one 64 KiB
//! scratch buffer that every read goes through, and a timing wheel for
//! handshake, idle and slow-consumer timeouts. A connection lives and dies on
//! its shard; nothing else touches it. Other threads reach the shard only
//! through its [`mailbox`], never through a lock held across I/O.
//!
//! One turn of the loop: wait for readiness (or the next tick); accept; read
//! and decode frames and run them through [`session::handle`]; take the
//! mailbox (Acks, pushes); refill lagging connections from the store;
//! write every connection that has output, one `write` each; fire due timers.
//!
//! Delivery order and exactly-once per connection rest on one number per
//! connection, `next_seq`: a push is written only if it is exactly the next
//! event; an older one is a duplicate and dropped; a newer one (a gap) or one
//! that arrives while too much output waits makes the connection *lagging*,
//! and the shard reads the missing events from the store instead. Because the
//! commit pipeline pushes only what is already durable, the store always has
//! everything a push refers to.

pub mod conn;
pub mod mailbox;
pub mod session;
pub mod timer;
mod turn;
pub mod unacked;
mod web;

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use swiftlet_protocol::codec::{decode_frame, FrameError};
use swiftlet_protocol::{pb, Body, Envelope, ErrorCode};

use crate::auth::Authenticator;
use crate::bridge::metrics::Metrics;
use crate::commit::{merge_delivered, summarize_delivered, CommitCmd, CommitHandle};
use crate::cursors::Cursors;
use crate::groups::GroupDirectory;
use crate::registry::{ConnRef, Registry};
use crate::store::Store;
use conn::{Conn, Phase, Transport};
use mailbox::{Reply, ShardHandle, ShardMsg};
use session::{Acked, Flow, ShardSessions};
use timer::{Wheel, TICK_MS};
use turn::TurnClock;
use unacked::Sent;

pub const LISTENER: Token = Token(usize::MAX);
pub const WAKER: Token = Token(usize::MAX - 1);
pub const HTTP_LISTENER: Token = Token(usize::MAX - 2);
const SCRATCH_BYTES: usize = 64 * 1024;
/// How long a closing connection may take to read its last frame.
const CLOSE_GRACE_TICKS: u32 = 20;
/// Least ticks between two returns of free memory to the OS.
const COLLECT_TICKS: u32 = 10;
/// A turn this long is logged, with where its time went (at most once per
/// [`COLLECT_TICKS`] per shard).
const SLOW_TURN: Duration = Duration::from_millis(10);
/// Events read from the store per catch-up page.
const CATCHUP_PAGE: usize = 256;

/// Limits every connection of the shard runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame: usize,
    pub push_buffer_bytes: usize,
    pub idle_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    pub typing_ttl_ms: u64,
    /// Origins allowed to open a WebSocket besides the server's own page.
    pub allowed_origins: Vec<String>,
}

/// What a shard shares with the rest of the server.
pub struct ShardCtx {
    pub id: u16,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    /// Presence subscriptions: watched user -> watching connections.
    pub watchers: Arc<Registry>,
    pub groups: Arc<GroupDirectory>,
    pub commit: CommitHandle,
    pub auth: Authenticator,
    pub limits: Limits,
    /// Every shard's mailbox, this one's included (ephemeral pushes).
    pub shards: Arc<[ShardHandle]>,
    pub metrics: Arc<Metrics>,
    /// Device cursors acknowledged and not yet written.
    pub cursors: Arc<Cursors>,
}

/// Why a connection's input ends it: the code the client is told, and the
/// WebSocket close code when it speaks WebSocket.
pub struct Fatal {
    pub code: ErrorCode,
    pub why: String,
    pub ws_close: Option<u16>,
}

impl From<FrameError> for Fatal {
    fn from(e: FrameError) -> Self {
        let code = match e {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        };
        Fatal {
            code,
            why: e.to_string(),
            ws_close: None,
        }
    }
}

/// `ms` in timer ticks, rounded up.
pub fn ticks(ms: u64) -> u32 {
    ms.div_ceil(TICK_MS).min(u64::from(u32::MAX)) as u32
}

pub struct Shard {
    poll: Poll,
    listener: Option<TcpListener>,
    http_listener: Option<TcpListener>,
    mailbox: Receiver<ShardMsg>,
    conns: Slab<Conn>,
    next_gen: u32,
    scratch: Box<[u8]>,
    frames: Vec<Envelope>,
    dirty: Vec<usize>,
    catchup: Vec<usize>,
    due: Vec<(u32, u32)>,
    wheel: Wheel,
    sessions: ShardSessions,
    ctx: ShardCtx,
    start: Instant,
    now: u32,
    /// Listener hit an error (e.g. out of file descriptors): retry each tick.
    accept_pending: bool,
    /// Shutdown: requests are no longer read.
    draining: bool,
    /// Shutdown: exit once every connection is gone, or at this tick.
    exit_at: Option<u32>,
    /// Work was done since free memory was last returned to the OS.
    busy: bool,
    /// Tick of the last return of free memory to the OS.
    last_collect: u32,
    /// Tick of the last slow-turn warning.
    last_slow_report: u32,
    /// The oldest commit whose answers and pushes this turn handled, for
    /// the push delay metric.
    delivered_since: Option<Instant>,
    /// When each request answered this turn was read (see
    /// `swiftlet_request_seconds`).
    answered: Vec<Instant>,
}

impl Shard {
    pub fn new(
        poll: Poll,
        mut listener: TcpListener,
        mut http_listener: TcpListener,
        mailbox: Receiver<ShardMsg>,
        ctx: ShardCtx,
    ) -> io::Result<Self> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut http_listener, HTTP_LISTENER, Interest::READABLE)?;
        Ok(Shard {
            poll,
            listener: Some(listener),
            http_listener: Some(http_listener),
            mailbox,
            conns: Slab::new(),
            next_gen: 0,
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            frames: Vec::new(),
            dirty: Vec::new(),
            catchup: Vec::new(),
            due: Vec::new(),
            wheel: Wheel::default(),
            sessions: ShardSessions::default(),
            ctx,
            start: Instant::now(),
            now: 0,
            accept_pending: false,
            draining: false,
            exit_at: None,
            busy: false,
            last_collect: 0,
            last_slow_report: 0,
            delivered_since: None,
            answered: Vec::new(),
        })
    }

    /// Run until shut down.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let elapsed = self.start.elapsed();
            let next_tick = Duration::from_millis((u64::from(self.now) + 1) * TICK_MS);
            let timeout = if self.catchup.is_empty() {
                next_tick.saturating_sub(elapsed)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(shard = self.ctx.id, error = %e, "poll failed; shard stops");
                break;
            }
            self.now = (self.start.elapsed().as_millis() as u64 / TICK_MS) as u32;
            let mut clock = TurnClock::start();
            let idle_poll = events.is_empty() && self.mailbox.is_empty() && self.catchup.is_empty();
            if !idle_poll {
                self.busy = true;
            } else if self.busy && self.now >= self.last_collect + COLLECT_TICKS {
                // A poll that found nothing to do, after work, at most once a
                // second: give back the allocator pages freed since (see
                // crate::alloc). Only between events, never in the middle of
                // a burst; rate-limited because the walk over a big heap
                // costs a millisecond or more.
                crate::alloc::release_free_memory();
                self.busy = false;
                self.last_collect = self.now;
            }
            clock.mark("collect");
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(Transport::Tcp),
                    HTTP_LISTENER => self.accept(Transport::Http),
                    WAKER => {}
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(slot, ev.is_read_closed() || ev.is_error());
                        }
                        if ev.is_writable() {
                            self.mark_dirty(slot);
                        }
                    }
                }
            }
            clock.mark("read");
            self.write_cursors();
            clock.mark("cursors");
            // This turn's requests and acknowledgements (and whatever the
            // other shards queued): committed here, answered below.
            self.ctx.commit.combine(Some(usize::from(self.ctx.id)));
            clock.mark("commit");
            self.take_mailbox();
            clock.mark("mailbox");
            self.run_catchups();
            clock.mark("catchup");
            self.flush_dirty();
            clock.mark("write");
            if let Some(t) = self.delivered_since.take() {
                let us = t.elapsed().as_micros() as u64;
                self.ctx.metrics.push_delay_us.observe(us);
            }
            for t in self.answered.drain(..) {
                let us = t.elapsed().as_micros() as u64;
                self.ctx.metrics.request_us.observe(us);
            }
            self.fire_timers();
            clock.mark("timers");
            // What the timers queued (last-seen times of timed-out devices);
            // their answers wake this shard for the next turn.
            self.ctx.commit.combine(None);
            clock.mark("commit2");
            if clock.total() >= SLOW_TURN && self.now >= self.last_slow_report + COLLECT_TICKS {
                self.last_slow_report = self.now;
                tracing::warn!(shard = self.ctx.id, turn = %clock, "slow event-loop turn");
            }
            if let Some(at) = self.exit_at {
                if self.conns.is_empty() || self.now >= at {
                    break;
                }
            }
        }
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.drop_conn(slot);
        }
        tracing::debug!(shard = self.ctx.id, "shard stopped");
    }

    fn accept(&mut self, transport: Transport) {
        let listener = match transport {
            Transport::Http => &self.http_listener,
            _ => &self.listener,
        };
        let Some(listener) = listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    let entry = self.conns.vacant_entry();
                    let slot = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!(error = %e, "registering a connection failed");
                        continue;
                    }
                    self.next_gen = self.next_gen.wrapping_add(1);
                    let gen = self.next_gen;
                    entry.insert(Conn::new(stream, gen, self.now, transport));
                    self.wheel.schedule(
                        u64::from(self.now + ticks(self.ctx.limits.handshake_timeout_ms)),
                        slot as u32,
                        gen,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the pending connections stay in
                    // the backlog; try again on the next tick.
                    tracing::warn!(shard = self.ctx.id, error = %e, "accept failed");
                    self.accept_pending = true;
                    break;
                }
            }
        }
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Read and handle what `slot`'s socket holds. A read that fills less
    /// than the scratch buffer emptied the socket's receive queue, and the
    /// readiness is edge-triggered: data that arrives later is a new event.
    /// So the loop stops there instead of paying one more `read` for its
    /// `WouldBlock` (half of the server's reads in a chat load). It reads on
    /// to the end only when the event also said the peer closed (`closed`),
    /// since that edge is spent, and for a closing connection.
    fn on_readable(&mut self, slot: usize, closed: bool) {
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            // While stopping, requests are no longer read; a closing
            // connection is still read, to see its EOF.
            if self.draining && conn.phase != Phase::Closing {
                return;
            }
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.drop_conn(slot);
                    return;
                }
                Ok(n) => {
                    if conn.phase == Phase::Closing {
                        continue;
                    }
                    let drained = n < self.scratch.len() && !closed;
                    conn.last_rx = self.now;
                    let ingested = match conn.transport {
                        Transport::Tcp => self.ingest(slot, n).map_err(Fatal::from),
                        Transport::WebSocket => self.ingest_ws(slot, n),
                        Transport::Http => {
                            self.ingest_http(slot, n);
                            return;
                        }
                    };
                    if let Err(f) = ingested {
                        self.close_with_ws(slot, f.code, &f.why, f.ws_close);
                        return;
                    }
                    if !self.process_frames(slot) || drained {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(slot);
                    return;
                }
            }
        }
    }

    /// Decode the frames in `scratch[..n]` (after any partial frame kept
    /// from before) into `self.frames`; keep a trailing partial frame.
    fn ingest(&mut self, slot: usize, n: usize) -> Result<(), FrameError> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Ok(());
        };
        let max = self.ctx.limits.max_frame;
        let mut pos = 0;
        if conn.partial().is_empty() {
            // The common case: whole frames straight from the scratch buffer.
            let data = &self.scratch[..n];
            while let Some((env, used)) = decode_frame(&data[pos..], max)? {
                self.frames.push(env);
                pos += used;
            }
            if pos < n {
                conn.extend_partial(&data[pos..]);
            }
        } else {
            conn.extend_partial(&self.scratch[..n]);
            let data = conn.partial();
            while let Some((env, used)) = decode_frame(&data[pos..], max)? {
                self.frames.push(env);
                pos += used;
            }
            conn.consume_partial(pos);
        }
        Ok(())
    }

    /// Run decoded frames through the session. False if the connection closed.
    fn process_frames(&mut self, slot: usize) -> bool {
        let mut frames = std::mem::take(&mut self.frames);
        let mut open = true;
        for env in frames.drain(..) {
            let Some(conn) = self.conns.get_mut(slot) else {
                break;
            };
            let was_handshake = conn.phase == Phase::Handshake;
            match session::handle(
                conn,
                slot as u32,
                env,
                &self.ctx,
                &mut self.sessions,
                self.now,
            ) {
                Flow::Continue => {
                    let idle = ticks(self.ctx.limits.idle_timeout_ms);
                    if was_handshake
                        && conn.phase == Phase::Live
                        && idle < ticks(self.ctx.limits.handshake_timeout_ms)
                    {
                        // The wheel entry filed at accept comes due at the
                        // handshake deadline and re-files itself at the idle
                        // one; only an idle timeout shorter than that needs
                        // an entry of its own.
                        self.wheel
                            .schedule(u64::from(self.now + idle), slot as u32, conn.gen);
                    }
                }
                Flow::Close(code, why) => {
                    self.close_with(slot, code, &why);
                    open = false;
                    break;
                }
            }
        }
        self.frames = frames;
        if let Some(conn) = self.conns.get(slot) {
            if conn.lagging {
                self.catchup.push(slot);
            }
            if conn.out_len() > 0 {
                self.mark_dirty(slot);
            }
        }
        open
    }

    fn take_mailbox(&mut self) {
        while let Ok(msg) = self.mailbox.try_recv() {
            match msg {
                ShardMsg::Deliver {
                    replies,
                    pushes,
                    committed,
                } => {
                    self.delivered_since.get_or_insert(committed);
                    for Reply {
                        to,
                        frame,
                        received,
                    } in replies
                    {
                        if let Some(conn) = self.live_conn(to.slot, to.gen) {
                            if conn.transport == Transport::Http {
                                self.answered.push(received);
                                self.http_reply(to.slot as usize, &frame);
                                continue;
                            }
                            conn.send_frame(&frame);
                            self.answered.push(received);
                            self.mark_dirty(to.slot as usize);
                        }
                    }
                    let high = self.ctx.limits.push_buffer_bytes;
                    for p in pushes {
                        let Some(conn) = self.live_conn(p.slot, p.gen) else {
                            continue;
                        };
                        if p.seq < conn.next_seq {
                            continue;
                        }
                        if conn.transport == Transport::Http {
                            // A parked long-poll: answer with what arrived.
                            self.http_wake(p.slot as usize);
                        } else if p.seq == conn.next_seq && !conn.lagging && conn.out_len() < high {
                            conn.send_deliver(p.seq, &p.event);
                            conn.next_seq += 1;
                            if let Some(sent) = p.sent {
                                self.sessions.unacked.record(p.slot, p.gen, p.seq, sent);
                            }
                            self.ctx
                                .metrics
                                .messages_out
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            self.mark_dirty(p.slot as usize);
                        } else if !conn.lagging {
                            conn.lagging = true;
                            self.catchup.push(p.slot as usize);
                        }
                    }
                }
                ShardMsg::Ephemeral { targets, frame } => {
                    let high = self.ctx.limits.push_buffer_bytes;
                    for (slot, gen) in targets {
                        let Some(conn) = self.live_conn(slot, gen) else {
                            continue;
                        };
                        // Ephemeral: a connection that is behind skips it.
                        if !conn.lagging
                            && conn.out_len() < high
                            && conn.transport != Transport::Http
                        {
                            conn.send_frame(&frame);
                            self.mark_dirty(slot as usize);
                        }
                    }
                }
                ShardMsg::StopAccepting(done) => {
                    for mut l in [self.listener.take(), self.http_listener.take()]
                        .into_iter()
                        .flatten()
                    {
                        let _ = self.poll.registry().deregister(&mut l);
                    }
                    self.draining = true;
                    let _ = done.send(());
                }
                ShardMsg::Close => {
                    let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for slot in slots {
                        self.close_with(slot, ErrorCode::ShuttingDown, "server shutting down");
                    }
                    self.exit_at = Some(self.now + CLOSE_GRACE_TICKS);
                }
            }
        }
    }

    fn live_conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)
            .filter(|c| c.gen == gen && c.phase == Phase::Live)
    }

    /// Refill lagging connections from the store, while their output is
    /// below half the push buffer.
    fn run_catchups(&mut self) {
        let low = self.ctx.limits.push_buffer_bytes / 2;
        let mut list = std::mem::take(&mut self.catchup);
        for slot in list.drain(..) {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.phase != Phase::Live || !conn.lagging {
                continue;
            }
            let Some(user) = conn.user.clone() else {
                continue;
            };
            let mut failed = None;
            while conn.out_len() < low {
                match self
                    .ctx
                    .store
                    .read_inbox(&user, conn.next_seq - 1, CATCHUP_PAGE, low)
                {
                    Ok(page) => {
                        for event in page.events {
                            conn.next_seq = event.seq + 1;
                            if let Some(pb::event::Kind::Message(m)) = &event.kind {
                                let sent = Sent {
                                    id: m.id,
                                    from: Arc::from(m.from_user.as_str()),
                                    group_id: m.group_id,
                                };
                                self.sessions.unacked.record(
                                    slot as u32,
                                    conn.gen,
                                    event.seq,
                                    Arc::new(sent),
                                );
                            }
                            let env =
                                Envelope::new(0, Body::Deliver(pb::Deliver { event: Some(event) }));
                            conn.send_env(&env);
                            self.ctx
                                .metrics
                                .messages_out
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if !page.has_more {
                            conn.lagging = false;
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                tracing::error!(error = %e, "reading an inbox for delivery failed");
                self.close_with(slot, ErrorCode::Internal, "storage error");
                continue;
            }
            // Still lagging: the flush below makes room, and a drained
            // buffer brings it back here.
            self.mark_dirty(slot);
        }
        self.catchup = list;
    }

    /// Hand the device cursors acknowledged this turn (one per device) to
    /// the pipeline, which writes each with the delivered receipts it
    /// implies. Runs before the turn's output is flushed, and each cursor is
    /// pending in [`Cursors`] from then until written, so after an answer
    /// the client sees past its DeliveryAck, its next login has the cursor.
    fn write_cursors(&mut self) {
        if self.sessions.cursors.is_empty() {
            return;
        }
        let mut cursors = std::mem::take(&mut self.sessions.cursors);
        // Several acknowledgements of one device this turn: one range.
        cursors.sort_by(|a, b| (&a.user, &a.device, a.up_to).cmp(&(&b.user, &b.device, b.up_to)));
        let mut merged: Vec<Acked> = Vec::with_capacity(cursors.len());
        for c in cursors.drain(..) {
            match merged.last_mut() {
                Some(m) if m.user == c.user && m.device == c.device => {
                    m.after = m.after.min(c.after);
                    m.up_to = m.up_to.max(c.up_to);
                    m.delivered = match (m.delivered.take(), c.delivered) {
                        (Some(mut into), Some(more)) => {
                            merge_delivered(&mut into, more);
                            Some(into)
                        }
                        _ => None,
                    };
                }
                _ => merged.push(c),
            }
        }
        for a in merged {
            // If the shard no longer holds what the range was, the receipts
            // come from the store; if that read fails they are skipped (the
            // next acknowledgement in the same conversation moves the
            // watermark past them), but the cursor is still written.
            let convs = match a.delivered {
                Some(convs) => convs,
                None => summarize_delivered(&self.ctx.store, &a.user, a.after, a.up_to)
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "reading acknowledged events failed");
                        Vec::new()
                    }),
            };
            self.ctx.cursors.begin(&a.user, &a.device, a.up_to);
            let cmd = CommitCmd::Acknowledged {
                user: a.user,
                device: a.device,
                up_to: a.up_to,
                convs,
            };
            // When the queue is full this commits from it to make room: an
            // acknowledgement is not dropped, and a shard busy committing
            // stops reading, which pushes back on its clients.
            self.ctx.commit.submit_waiting(cmd);
        }
        self.sessions.cursors = cursors;
    }

    fn flush_dirty(&mut self) {
        let low = self.ctx.limits.push_buffer_bytes / 2;
        let mut list = std::mem::take(&mut self.dirty);
        for slot in list.drain(..) {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            match conn.flush(self.now) {
                Ok(_) => {
                    conn.shutdown_when_flushed();
                    if conn.lagging && conn.out_len() < low && conn.phase == Phase::Live {
                        self.catchup.push(slot);
                    }
                }
                Err(_) => self.drop_conn(slot),
            }
        }
        self.dirty = list;
    }

    fn fire_timers(&mut self) {
        if self.accept_pending {
            self.accept_pending = false;
            self.accept(Transport::Tcp);
            self.accept(Transport::Http);
        }
        self.expire_typing();
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(u64::from(self.now), &mut due);
        let idle = ticks(self.ctx.limits.idle_timeout_ms);
        let handshake = ticks(self.ctx.limits.handshake_timeout_ms);
        for (slot, gen) in due.drain(..) {
            let Some(conn) = self.conns.get(slot as usize).filter(|c| c.gen == gen) else {
                continue;
            };
            if conn.transport == Transport::Http && conn.phase == Phase::Live {
                if conn.wait_until > self.now {
                    self.wheel.schedule(u64::from(conn.wait_until), slot, gen);
                } else {
                    self.http_timeout(slot as usize);
                }
                continue;
            }
            let (deadline, code) = match conn.phase {
                Phase::Handshake => (conn.since + handshake, Some(ErrorCode::HandshakeTimeout)),
                Phase::Closing => (conn.since + CLOSE_GRACE_TICKS, None),
                Phase::Live => {
                    let read_deadline = conn.last_rx + idle;
                    let write_deadline = if conn.out_len() == 0 {
                        u32::MAX
                    } else {
                        conn.last_tx + idle
                    };
                    if write_deadline < read_deadline {
                        (write_deadline, Some(ErrorCode::SlowConsumer))
                    } else {
                        (read_deadline, Some(ErrorCode::IdleTimeout))
                    }
                }
            };
            if deadline > self.now {
                self.wheel.schedule(u64::from(deadline), slot, gen);
                continue;
            }
            match code {
                Some(code) => {
                    let why = match code {
                        ErrorCode::SlowConsumer => "output not read within the idle timeout",
                        ErrorCode::HandshakeTimeout => "no Hello within the handshake timeout",
                        _ => "nothing received within the idle timeout",
                    };
                    self.close_with(slot as usize, code, why);
                }
                None => self.drop_conn(slot as usize),
            }
        }
        self.due = due;
    }

    /// Typing indicators whose TTL lapsed without a new STARTED: tell the
    /// other side they stopped.
    fn expire_typing(&mut self) {
        if self.sessions.typing.is_empty() {
            return;
        }
        let now = self.now;
        let expired: Vec<(u32, u32)> = self
            .sessions
            .typing
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(t) = self.sessions.typing.remove(&key) {
                session::send_typing(
                    &self.ctx,
                    &mut self.sessions.conns,
                    &t.user,
                    &t.target,
                    pb::TypingState::Stopped,
                );
            }
        }
    }

    /// Everything that ends with a logged-in session: leave the registry
    /// (and, for the user's last connection, record last seen and tell the
    /// watchers), drop presence subscriptions, and stop a typing indicator.
    fn logout(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let me = ConnRef {
            shard: self.ctx.id,
            slot: slot as u32,
            gen: conn.gen,
        };
        session::unsubscribe_all(conn, me, &self.ctx);
        if let Some(t) = self.sessions.typing.remove(&(me.slot, me.gen)) {
            session::send_typing(
                &self.ctx,
                &mut self.sessions.conns,
                &t.user,
                &t.target,
                pb::TypingState::Stopped,
            );
        }
        let Some(user) = conn.user.take() else { return };
        let gauge = match conn.transport {
            Transport::Tcp => Some(&self.ctx.metrics.tcp_connections),
            Transport::WebSocket => Some(&self.ctx.metrics.ws_connections),
            Transport::Http => None,
        };
        if let Some(g) = gauge {
            g.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.ctx.registry.remove(&user, me) {
            let at_ms = crate::ids::unix_ms();
            session::notify_offline(&self.ctx, &user, at_ms);
            if let Err(e) = self.ctx.commit.submit(CommitCmd::LastSeen { user, at_ms }) {
                tracing::debug!(error = %e, "last seen not recorded");
            }
        }
    }

    /// Tell the client why, then close: the error frame is flushed, the write
    /// side shut, and the socket kept (reads discarded) until the peer closes
    /// or a short grace period ends, so the frame is not lost to a reset.
    fn close_with(&mut self, slot: usize, code: ErrorCode, why: &str) {
        self.close_with_ws(slot, code, why, None);
    }

    /// [`Self::close_with`], naming the WebSocket close code for a
    /// WebSocket (else one is derived from `code`).
    fn close_with_ws(&mut self, slot: usize, code: ErrorCode, why: &str, ws_close: Option<u16>) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        tracing::debug!(shard = self.ctx.id, slot, ?code, why, "closing connection");
        self.logout(slot);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.phase = Phase::Closing;
        conn.lagging = false;
        conn.since = self.now;

        // Output not yet sent is abandoned: everything durable is resent from
        // the store on the next login.
        conn.discard_buffers();
        let error = Envelope::error(0, code, why, true);
        match conn.transport {
            Transport::Tcp => conn.send_env(&error),
            Transport::WebSocket => {
                conn.send_env(&error);
                let close = ws_close.unwrap_or_else(|| web::close_code(code));
                crate::bridge::ws::write_close(conn.out(), close, why);
            }
            // An HTTP request ends with the answer it was given.
            Transport::Http => {}
        }
        let flushed = conn.flush(self.now);
        conn.shutdown_when_flushed();
        let gen = conn.gen;
        if flushed.is_err() {
            self.drop_conn(slot);
            return;
        }
        self.wheel
            .schedule(u64::from(self.now + CLOSE_GRACE_TICKS), slot as u32, gen);
    }

    fn drop_conn(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        self.logout(slot);
        self.sessions.unacked.forget(slot as u32);
        let mut conn = self.conns.remove(slot);
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }
}
