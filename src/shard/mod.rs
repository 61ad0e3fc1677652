//! One core's event loop: a thread running a mio `Poll` that owns its
//! connections outright.
//!
//! Each shard has its own listener on the shared port (`SO_REUSEPORT`, so the
//! kernel spreads accepts), a slab of [`conn::Conn`] state structs, one 64 KiB
//! scratch buffer that every read goes through, and a timing wheel for
//! handshake, idle and slow-consumer timeouts. A connection lives and dies on
//! its shard; nothing else touches it. Other threads reach the shard only
//! through its [`mailbox`](crate::hub::mailbox), never through a lock held across I/O.
//!
//! One turn of the loop: wait for readiness (or the next tick); accept; read
//! and decode frames one at a time and run each through
//! [`session::handle`](crate::session::requests::handle)
//! (see [`input`]); take the mailbox (Acks, pushes); refill lagging
//! connections from the store; write every connection that has output, one
//! `write` each; fire due timers. The loop's ticks (the timing wheel's
//! unit, [`TICK_MS`]) and every instant it measures come from the node's
//! [`Clock`](crate::clock::Clock), so a test's manual clock drives its
//! timeouts.
//!
//! No client gets more than its share. Each connection is read at most
//! [`READS_PER_TURN`] times and handled at most [`FRAMES_PER_TURN`] frames
//! per turn (the rest waits, as bytes, for the next turn), and at most its
//! frame bucket's worth per 100 ms tick (`--max-frames-per-sec`: an empty
//! bucket holds the connection back until the next tick, see
//! [`session::bucket`](crate::session::bucket)). Its memory is
//! one budget, `push_buffer_bytes`: at or above it the connection is
//! *paused* (nothing more is read or handled, so no answer is produced)
//! until its output drains below half, and live pushes stop (it catches up
//! from the store later). At most [`MAX_IN_FLIGHT`] of its requests wait
//! for the pipeline. A connection whose output stays at or above half the
//! budget for the idle timeout is closed with `SLOW_CONSUMER`, however
//! slowly it reads; one that starts a frame and does not finish it within
//! the frame timeout is closed with `IDLE_TIMEOUT` (only complete frames
//! count as activity).
//!
//! Delivery order and exactly-once per connection are decided by the
//! connection's [`Delivery`](crate::session::delivery::Delivery) (pushes,
//! store pages, acknowledgements); the shard carries out what it answers:
//! writes a push, or reads the missing events from the store while the
//! connection is *lagging*. Because the commit pipeline pushes only what is
//! already durable, the store always has everything a push refers to.

pub mod admission;
pub mod conn;
pub mod input;
mod share;
mod sidecar;
pub mod timer;
pub mod tls;
mod turn;
mod web;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use swiftlet_protocol::{pb, Body, Envelope, ErrorCode};

use crate::bridge::ws;
pub use crate::clock::{ticks, TICK_MS};
use crate::commit::{merge_delivered, summarize_delivered, CommitCmd};
use crate::hub::mailbox::{Answer, Reply, Sent, ShardMsg};
use crate::hub::registry::{ConnKind, ConnRef};
use crate::session::bucket;
use crate::session::delivery;
use crate::session::requests::{self as session, Acked, Flow, ShardSessions};
pub use crate::session::services::{Limits, Services};
use admission::{Admission, Refusal, RefusalBudget};
use conn::{Carries, Conn, Exchange, Phase, Received, Transport};
pub use input::Fatal;
use input::Input;
use share::Share;
use sidecar::SlotWords;
use timer::Wheel;
use tls::TlsConfig;
use turn::TurnClock;

pub const LISTENER: Token = Token(usize::MAX);
pub const WAKER: Token = Token(usize::MAX - 1);
pub const HTTP_LISTENER: Token = Token(usize::MAX - 2);
const SCRATCH_BYTES: usize = 64 * 1024;
/// Readiness events one poll returns at most.
const EVENTS_PER_POLL: usize = 1024;
/// How long a closing connection may take to read its last frame.
const CLOSE_GRACE_TICKS: u32 = 20;
/// Least ticks between two returns of free memory to the OS.
const COLLECT_TICKS: u32 = 10;
/// A turn this long is logged, with where its time went (at most once per
/// [`COLLECT_TICKS`] per shard).
const SLOW_TURN: Duration = Duration::from_millis(10);
/// Events read from the store per catch-up page.
const CATCHUP_PAGE: usize = 256;
/// Page rows one turn reads and encodes for the requests answered by a
/// page on the shard's own turn (`Sync`, `GetReceipts`, `GetGroup`,
/// `ListGroups`, `GET /v1/sync`), over all connections: each is charged
/// the biggest page it may read ([`session::page_cost`]: a `Sync` its
/// limit, 100 by default and 500 at most; a `GetReceipts` or `GetGroup` up
/// to 500 members; a `ListGroups` up to 250 groups); catch-up pages have
/// a share of the same size of their own. A page of 500 takes a shard
/// 0.4-1.6 ms. A hostile run that pipelined big Syncs from four
/// connections held turns of 12-47 ms, as each connection read pages
/// until its output budget was full, and every other connection of the
/// shard waited; two clients pipelining the biggest receipt, member and
/// group pages raised the honest users' p99 from about 2 to 38 ms. A
/// request past the share waits for the next turn, which serves it before
/// anything else (so pages are taken in turn, not by whoever sends most),
/// and a connection reads at most one page per turn.
const PAGE_ROWS_PER_TURN: usize = 512;
/// Rows of group posts and group changes one turn hands to the group
/// commit, over all connections ([`session::fanout_cost`]: a post or a
/// change counts its group's members), with the same rules as
/// [`PAGE_ROWS_PER_TURN`]: one post to a full group (1,024 members by
/// default) a turn, or many to small groups; a request past the share is
/// handled first next turn, and a connection hands over at most one such
/// request a turn. A row costs the commit about 1.5 µs, so a turn's share
/// takes about 1.5 ms.
const FANOUT_ROWS_PER_TURN: usize = 1024;
/// Reads of one connection per loop turn (each up to the 64 KiB scratch
/// buffer): no socket holds the shard, however much it sends.
const READS_PER_TURN: u32 = 1;
/// Frames of one connection handled per loop turn.
const FRAMES_PER_TURN: u32 = 256;
/// Connections accepted or refused per loop turn (from both listeners
/// together), and connections closed by their timers per turn: a wave of
/// connections arriving or timing out together (a flood, slowloris clients
/// reconnecting in step) is taken in slices between which the connections
/// already logged in are served, instead of in one turn of many
/// milliseconds. A refusal costs the shard ~20 µs (accept, read, write,
/// shutdown, close), so a slice stays well under a millisecond: input that
/// arrives meanwhile waits for the turn's end.
const CONN_CHANGES_PER_TURN: usize = 16;
/// Requests of one connection waiting for the commit pipeline at most; its
/// input is not read while this many are unanswered. It is also each
/// connection's most in one group commit: with 64, four clients sending as
/// fast as they could filled every group with 256 of their sends and the
/// other users' waited behind them (honest p50 5.1-5.6 ms against 2.0-2.2
/// with 16; docs/performance.md). 16 in flight is what a client that
/// pipelines needs to keep a send path busy (the peers harness's window).
pub const MAX_IN_FLIGHT: usize = 16;

/// What stopped [`Shard::handle_input`].
enum Stop {
    /// Every whole frame was handled; a partial one may be kept.
    Drained,
    /// The output is over budget or too many requests are in flight: the
    /// connection is paused until [`Shard::resume`].
    Paused,
    /// The turn's share of frames is spent; more next turn.
    TurnSpent,
    /// The next frame reads a page or fans out to a group, and the turn's
    /// share of its kind is spent: first in line next turn. (A connection
    /// that had its page or fan-out stops with `TurnSpent`, behind those.)
    ReadsSpent,
    /// The connection's frame bucket is empty: more once it refills, at
    /// the next tick.
    Throttled,
    /// The connection closed.
    Closed,
}

/// File `conn`'s timer at tick `at`, unless its live entry comes sooner.
/// The tick it is filed at (the wheel's horizon, if `at` is past it)
/// becomes the live one; entries filed before for other ticks are stale.
fn arm(wheel: &mut Wheel, conn: &mut Conn, slot: usize, now: u32, at: u32) {
    if conn.timer_at <= now || at < conn.timer_at {
        conn.timer_at = wheel.schedule(u64::from(at), slot as u32, conn.gen) as u32;
    }
}

/// Give a connection that was just made `Closing` its grace period: its
/// live timer entry becomes the end of it, whatever was filed before.
fn arm_grace(wheel: &mut Wheel, conn: &mut Conn, slot: usize, now: u32) {
    let at = u64::from(now + CLOSE_GRACE_TICKS);
    conn.timer_at = wheel.schedule(at, slot as u32, conn.gen) as u32;
}

pub struct Shard {
    poll: Poll,
    listener: Option<TcpListener>,
    http_listener: Option<TcpListener>,
    mailbox: Receiver<ShardMsg>,
    conns: Slab<Conn>,
    /// Per slot, the `iat` of the token its session logged in with (set at
    /// each login): an operator's revocation closes the sessions whose
    /// token is older. Beside the slab rather than in `Conn`, where it
    /// would cost an idle connection 8 bytes of alignment, not 4; in
    /// fixed chunks rather than one growing vector (see [`sidecar`]).
    token_iats: SlotWords,
    next_gen: u32,
    scratch: Box<[u8]>,
    /// The poll's readiness events, made with the shard (on the thread
    /// that starts the node) and taken by [`Shard::run`]. Not made on the
    /// shard's own thread: its 12 KiB buffer would share a mimalloc page
    /// with the registry's stripe tables of the same size class, which a
    /// shard makes and frees as logins grow them, and hold that page and
    /// every freed table in it resident (about 20 B per idle connection at
    /// 18,000; docs/performance.md, "Idle density re-checked").
    events: Option<Events>,
    /// With `--tls-cert`: both listeners speak TLS, with this certificate.
    tls: Option<Arc<TlsConfig>>,
    /// Where a TLS connection's ciphertext is read (its plaintext goes to
    /// `scratch`); empty without TLS.
    cipher: Box<[u8]>,
    /// Connections with input left for a later turn (their share was
    /// spent, or they were paused and have drained).
    pending_input: Vec<usize>,
    /// Connections whose next frame costs more than this turn's share had
    /// left (a page, a group post or change): pumped first next turn (see
    /// [`PAGE_ROWS_PER_TURN`], [`FANOUT_ROWS_PER_TURN`]).
    waiting_to_read: Vec<usize>,
    /// Rows this turn may still read for pages.
    pages: Share,
    /// Rows of group posts and changes this turn may still hand to the
    /// commit.
    fanouts: Share,
    /// Connections whose frame bucket ran dry: read again
    /// [`bucket::FrameRate::retry`] after the first of them was held back, when
    /// each has earned a token or more.
    throttled: Vec<usize>,
    /// The instant the first of `throttled` was held back at.
    throttled_at: bucket::Instant,
    dirty: Vec<usize>,
    catchup: Vec<usize>,
    due: Vec<(u32, u32)>,
    wheel: Wheel,
    sessions: ShardSessions,
    ctx: Services,
    start: Instant,
    now: u32,
    /// This turn's time in finer units, for the token buckets.
    instant: bucket::Instant,
    /// When this turn started, since `start`.
    turn_started: Duration,
    /// Listener hit an error (e.g. out of file descriptors), or this tick's
    /// refusals are spent: accept again next turn (each turn checks).
    accept_pending: bool,
    /// A listener had more than a turn's share ([`CONN_CHANGES_PER_TURN`])
    /// waiting: the next turn comes at once and accepts again.
    accept_more: bool,
    /// Connections this turn may still accept or refuse, from any listener
    /// and whichever of the turn's steps accepts.
    accepts_left: usize,
    /// Refusals this shard may still answer this tick (see [`admission`]).
    refusals: RefusalBudget,
    /// The node's connection caps, shared with the other shards.
    admission: Arc<Admission>,
    /// Each connection's source address, when addresses are counted.
    addresses: HashMap<usize, IpAddr>,
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
        ctx: Services,
        tls: Option<Arc<TlsConfig>>,
        admission: Arc<Admission>,
    ) -> io::Result<Self> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut http_listener, HTTP_LISTENER, Interest::READABLE)?;
        let start = ctx.clock.now();
        Ok(Shard {
            poll,
            listener: Some(listener),
            http_listener: Some(http_listener),
            mailbox,
            conns: Slab::new(),
            token_iats: SlotWords::default(),
            next_gen: 0,
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            cipher: match tls {
                Some(_) => vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
                None => Box::default(),
            },
            tls,
            pending_input: Vec::new(),
            waiting_to_read: Vec::new(),
            pages: Share::new(PAGE_ROWS_PER_TURN),
            fanouts: Share::new(FANOUT_ROWS_PER_TURN),
            throttled: Vec::new(),
            throttled_at: 0,
            dirty: Vec::new(),
            catchup: Vec::new(),
            due: Vec::new(),
            wheel: Wheel::default(),
            sessions: ShardSessions::default(),
            ctx,
            start,
            now: 0,
            instant: 0,
            turn_started: Duration::ZERO,
            accept_pending: false,
            accept_more: false,
            accepts_left: CONN_CHANGES_PER_TURN,
            refusals: admission.refusal_budget(),
            admission,
            addresses: HashMap::new(),
            draining: false,
            exit_at: None,
            busy: false,
            last_collect: 0,
            last_slow_report: 0,
            delivered_since: None,
            answered: Vec::new(),
            events: Some(Events::with_capacity(EVENTS_PER_POLL)),
        })
    }

    /// Run until shut down.
    pub fn run(mut self) {
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(EVENTS_PER_POLL));
        loop {
            let elapsed = self.ctx.clock.now().saturating_duration_since(self.start);
            let next_tick = Duration::from_millis((u64::from(self.now) + 1) * TICK_MS);
            let timeout = if self.catchup.is_empty()
                && self.pending_input.is_empty()
                && self.waiting_to_read.is_empty()
                && !self.accept_more
                && self.due.is_empty()
            {
                let wake = if self.throttled.is_empty() {
                    next_tick
                } else {
                    // The held-back connections' retry, on the clock of
                    // `elapsed` (instants wrap; the distance does not).
                    let retry = self.ctx.limits.frames.retry();
                    let waited = self.instant.wrapping_sub(self.throttled_at);
                    let at = retry.saturating_sub(waited).min(retry);
                    let unit = Duration::from_micros(1_000_000 / bucket::UNITS_PER_SEC);
                    next_tick.min(self.turn_started + unit * at)
                };
                wake.saturating_sub(elapsed)
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
            let mut clock = TurnClock::start(self.ctx.clock.clone());
            self.accepts_left = CONN_CHANGES_PER_TURN;
            self.pages.refill();
            self.fanouts.refill();
            let elapsed = clock.started().saturating_duration_since(self.start);
            self.now = (elapsed.as_millis() as u64 / TICK_MS) as u32;
            self.turn_started = elapsed;
            // Wraps after about five days; the buckets allow for it.
            self.instant = (elapsed.as_micros() * u128::from(bucket::UNITS_PER_SEC) / 1_000_000)
                as bucket::Instant;
            let idle_poll = events.is_empty()
                && self.mailbox.is_empty()
                && self.catchup.is_empty()
                && self.pending_input.is_empty()
                && self.waiting_to_read.is_empty();
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
            if !self.throttled.is_empty()
                && self.instant.wrapping_sub(self.throttled_at) >= self.ctx.limits.frames.retry()
            {
                // The held-back connections have earned frames again.
                self.pending_input.append(&mut self.throttled);
            }
            // Those that waited for a share of reads first.
            for slot in std::mem::take(&mut self.waiting_to_read) {
                match self.conns.get(slot).map(|c| c.transport) {
                    // A whole request left unhandled (see `ingest_http`):
                    // parsed again.
                    Some(Transport::Http) => self.ingest_http(slot, 0),
                    Some(_) => self.pump(slot),
                    None => {}
                }
            }
            for slot in std::mem::take(&mut self.pending_input) {
                self.pump(slot);
            }
            if std::mem::take(&mut self.accept_more) {
                self.accept(Transport::Tcp);
                self.accept(Transport::Http);
            }
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
            let written = clock.last();
            if let Some(t) = self.delivered_since.take() {
                let us = written.saturating_duration_since(t).as_micros() as u64;
                self.ctx.metrics.push_delay_us.observe(us);
            }
            for t in self.answered.drain(..) {
                let us = written.saturating_duration_since(t).as_micros() as u64;
                self.ctx.metrics.request_us.observe(us);
            }
            self.fire_timers();
            clock.mark("timers");
            // What the timers queued (last-seen times of timed-out devices);
            // their answers wake this shard for the next turn.
            self.ctx.commit.combine(None);
            clock.mark("commit2");
            let total = clock.total();
            if !idle_poll {
                self.ctx.metrics.turn_us.observe(total.as_micros() as u64);
            }
            if total >= SLOW_TURN && self.now >= self.last_slow_report + COLLECT_TICKS {
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
        if !self.refusals.open(self.now) {
            // Refused enough this tick: what comes waits in the backlog.
            self.accept_pending = true;
            return;
        }
        while self.accepts_left > 0 {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    self.accepts_left -= 1;
                    if let Err(why) = self.admission.admit(peer.ip()) {
                        self.refuse(&mut stream, transport, why);
                        self.refusals.spend();
                        if !self.refusals.open(self.now) {
                            self.accept_pending = true;
                            return;
                        }
                        continue;
                    }
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    let session = match &self.tls {
                        None => None,
                        Some(tls) => match tls.session(transport == Transport::Http) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                crate::log_every!(60_000, error, error = %e, "starting a TLS session failed; connection refused");
                                self.admission.release(
                                    Some(peer.ip()).filter(|_| self.admission.counts_addresses()),
                                );
                                continue;
                            }
                        },
                    };
                    let entry = self.conns.vacant_entry();
                    let slot = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        crate::log_every!(1000, warn, error = %e, "registering a connection failed");
                        self.admission
                            .release(Some(peer.ip()).filter(|_| self.admission.counts_addresses()));
                        continue;
                    }
                    if self.admission.counts_addresses() {
                        self.addresses.insert(slot, peer.ip());
                    }
                    self.next_gen = self.next_gen.wrapping_add(1);
                    let gen = self.next_gen;
                    let conn = entry.insert(Conn::new(
                        stream,
                        gen,
                        self.now,
                        self.instant,
                        transport,
                        self.ctx.limits.frames,
                    ));
                    if let Some(session) = session {
                        conn.set_tls(session);
                    }
                    let at = self.now + ticks(self.ctx.limits.handshake_timeout_ms);
                    arm(&mut self.wheel, conn, slot, self.now, at);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the pending connections stay in
                    // the backlog; try again on the next tick. At the file
                    // limit this fails on every tick: one line a minute.
                    crate::log_every!(60_000, warn, shard = self.ctx.id, error = %e, "accept failed");
                    self.accept_pending = true;
                    return;
                }
            }
        }
        // The turn's share is taken and more may wait (the listener is
        // edge-triggered: it does not report them again).
        self.accept_more = true;
    }

    /// Answer a connection past a cap (see [`admission`]) in its own
    /// protocol, at most once and without waiting, and close it.
    fn refuse(&self, stream: &mut mio::net::TcpStream, transport: Transport, why: Refusal) {
        use std::io::Write as _;
        crate::log_every!(10_000, warn, shard = self.ctx.id, reason = ?why, held = self.admission.held(), "connection refused: at the connection cap");
        let text = match why {
            Refusal::Full => "the server holds as many connections as it may; retry later",
            Refusal::PerAddress => "too many connections from this address; retry later",
        };
        let bytes: Vec<u8> = match (&self.tls, transport) {
            (Some(_), _) => return,
            (None, Transport::Http) => crate::bridge::http::busy(text),
            (None, _) => swiftlet_protocol::codec::frame_bytes(&Envelope::error(
                0,
                ErrorCode::TooManyConnections,
                text,
                true,
            ))
            .to_vec(),
        };
        // What the client sent already (an HTTP request, a Hello) is read
        // and dropped first: closing with unread input would reset the
        // connection, and the reset can overtake the answer.
        let mut sink = [0u8; 2048];
        for _ in 0..2 {
            match std::io::Read::read(stream, &mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        // A fresh socket's send buffer takes this whole; if not, the
        // client sees the close alone.
        let _ = stream.write(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot) {
            if !conn.dirty() {
                conn.set_dirty(true);
                self.dirty.push(slot);
            }
        }
    }

    /// The readiness of `slot`'s socket changed: read and handle its input.
    fn on_readable(&mut self, slot: usize, closed: bool) {
        if let Some(conn) = self.conns.get_mut(slot) {
            if closed {
                conn.set_peer_closed();
            }
        }
        self.pump(slot);
    }

    /// Handle what `slot` kept from earlier turns, then read its socket,
    /// within one turn's share: [`READS_PER_TURN`] reads and
    /// [`FRAMES_PER_TURN`] frames, so no connection holds the shard however
    /// much it sends. What is left for later waits in `pending_input`; a
    /// paused connection (output over budget, too much in flight) is not
    /// read until [`Self::resume`].
    ///
    /// A read that fills less than the scratch buffer emptied the socket's
    /// receive queue, and the readiness is edge-triggered: data that arrives
    /// later is a new event. So reading stops there instead of paying one
    /// more `read` for its `WouldBlock`, unless the peer closed (that edge is
    /// spent: read on to the end).
    fn pump(&mut self, slot: usize) {
        let mut frames_left = FRAMES_PER_TURN;
        let mut reads_left = READS_PER_TURN;
        if !self.handle_kept(slot, &mut frames_left) {
            return;
        }
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            // While stopping, requests are no longer read; a closing
            // connection is still read, to see its EOF.
            if self.draining && conn.phase != Phase::Closing {
                return;
            }
            if reads_left == 0 {
                self.pending_input.push(slot);
                return;
            }
            reads_left -= 1;
            let (n, full, peer_closed) = match conn.read(&mut self.scratch, &mut self.cipher) {
                Ok(Received::Eof) => {
                    self.drop_conn(slot);
                    return;
                }
                Ok(Received::Data {
                    plain,
                    full,
                    peer_closed,
                }) => (plain, full, peer_closed),
                Ok(Received::NotTls) => {
                    self.refuse_plaintext(slot);
                    return;
                }
                Ok(Received::TlsFailed(e)) => {
                    crate::log_every!(10_000, debug, shard = self.ctx.id, error = %e, "TLS refused a connection's input");
                    self.close_tls_failed(slot);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_conn(slot);
                    return;
                }
            };
            let short = !full && !conn.peer_closed();
            if conn.out_len() > 0 && !conn.dirty() {
                // TLS handshake records to send.
                conn.set_dirty(true);
                self.dirty.push(slot);
            }
            match (conn.phase, conn.transport) {
                // Discarded: a closing connection is read only for its EOF
                // (within the same share per turn: a peer that keeps
                // sending cannot hold the shard through its grace period).
                (Phase::Closing, _) => {}
                // Only TLS records that carried no data (the handshake).
                _ if n == 0 => {}
                (_, Transport::Http) => {
                    // A request may span many reads. An upgrade turns the
                    // connection into a WebSocket, whose first frames may
                    // have come right behind the request.
                    self.ingest_http(slot, n);
                    if !self.handle_kept(slot, &mut frames_left) {
                        return;
                    }
                }
                _ => match self.handle_input(slot, n, &mut frames_left) {
                    Stop::Drained => {}
                    Stop::Paused | Stop::Closed => return,
                    Stop::TurnSpent => {
                        self.pending_input.push(slot);
                        return;
                    }
                    Stop::ReadsSpent => {
                        self.waiting_to_read.push(slot);
                        return;
                    }
                    Stop::Throttled => {
                        self.hold_back(slot);
                        return;
                    }
                },
            }
            if peer_closed {
                // TLS close_notify: the peer sends nothing more, as with a
                // FIN on a plain connection.
                self.drop_conn(slot);
                return;
            }
            if short {
                return;
            }
        }
    }

    /// Handle frames a framed connection kept from before. False when the
    /// connection must not be read on now.
    fn handle_kept(&mut self, slot: usize, frames_left: &mut u32) -> bool {
        let Some(conn) = self.conns.get(slot) else {
            return false;
        };
        if conn.transport == Transport::Http || conn.phase == Phase::Closing {
            return true;
        }
        if conn.paused() {
            return false;
        }
        if conn.partial().is_empty() {
            return true;
        }
        match self.handle_input(slot, 0, frames_left) {
            Stop::Drained => true,
            Stop::Paused | Stop::Closed => false,
            Stop::TurnSpent => {
                self.pending_input.push(slot);
                false
            }
            Stop::ReadsSpent => {
                self.waiting_to_read.push(slot);
                false
            }
            Stop::Throttled => {
                self.hold_back(slot);
                false
            }
        }
    }

    /// Decode and handle, one frame at a time, the input `slot` kept plus
    /// the `fresh` bytes just read into the scratch buffer. Each frame is
    /// handled before the next is decoded, and what is not handled stays
    /// bytes in the connection (see [`input`]). Stops before a frame when
    /// the connection's output is over budget or too many of its requests
    /// wait for the pipeline (it is then paused), and when the turn's share
    /// of frames is spent.
    fn handle_input(&mut self, slot: usize, fresh: usize, frames_left: &mut u32) -> Stop {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Stop::Closed;
        };
        let now = self.now;
        let limits = &self.ctx.limits;
        conn.refill(self.instant, limits.frames);
        let was_partial = conn.partial_since();
        let mut held = conn.take_input();
        let from_scratch = held.is_empty();
        if !from_scratch {
            held.extend_from_slice(&self.scratch[..fresh]);
        }
        let data: &[u8] = if from_scratch {
            &self.scratch[..fresh]
        } else {
            &held
        };
        let mut pos = 0;
        let mut handled = false;
        let mut stop = Stop::Drained;
        let mut fatal: Option<(u64, Fatal)> = None;
        loop {
            if conn.phase == Phase::Closing {
                stop = Stop::Closed;
                break;
            }
            if conn.out_len() >= limits.push_buffer_bytes
                || usize::from(conn.in_flight) >= MAX_IN_FLIGHT
            {
                conn.set_paused(true);
                stop = Stop::Paused;
                break;
            }
            if *frames_left == 0 {
                stop = Stop::TurnSpent;
                break;
            }
            if limits.frames.on() && conn.frame_tokens == 0 {
                self.ctx
                    .metrics
                    .throttled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stop = Stop::Throttled;
                break;
            }
            let (input, used) = match input::next(conn.transport, &data[pos..], limits.max_frame) {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(f) => {
                    fatal = Some((0, f));
                    break;
                }
            };
            // A page to read or a group post to fan out: charged to the
            // turn's share of its kind, or left for the next turn, first in
            // line (decoded again then).
            let mut costly = None;
            // Frame tokens this unit takes: a group post or change one per
            // member, a page one per ten rows (see `bucket::FrameRate`),
            // anything else one.
            let mut tokens = 1;
            if let Input::Frame(Envelope {
                body: Some(body), ..
            }) = &input
            {
                if conn.phase == Phase::Live {
                    costly = match session::page_cost(body) {
                        Some(rows) => {
                            tokens = limits.frames.page_tokens(rows);
                            Some((&mut self.pages, rows, &self.ctx.metrics.pages_put_off))
                        }
                        None => session::fanout_cost(body, &self.ctx).map(|rows| {
                            tokens = limits.frames.fanout_tokens(rows);
                            (&mut self.fanouts, rows, &self.ctx.metrics.fanouts_put_off)
                        }),
                    };
                }
            }
            if limits.frames.on() && conn.frame_tokens < tokens {
                // Decoded again once the bucket holds the post's tokens.
                self.ctx.metrics.throttled.fetch_add(1, Relaxed);
                stop = Stop::Throttled;
                break;
            }
            let mut put_off = None;
            if let Some((share, rows, counter)) = costly {
                if !share.take(rows) {
                    counter.fetch_add(1, Relaxed);
                    stop = Stop::ReadsSpent;
                    break;
                }
                put_off = Some(counter);
            }
            pos += used;
            *frames_left -= 1;
            // Every unit counts, WebSocket control frames too.
            conn.frame_tokens = conn.frame_tokens.saturating_sub(tokens);
            handled = true;
            let env = match input {
                // Only a complete frame is activity (on WebSocket, a
                // binary message: control frames are not).
                Input::Frame(env) => {
                    conn.last_rx = now;
                    env
                }
                Input::WsPing(payload) => {
                    ws::write_frame(conn.out(), ws::OP_PONG, &payload);
                    continue;
                }
                Input::Skip => continue,
            };
            let was_handshake = conn.phase == Phase::Handshake;
            let mut token_iat = 0;
            let flow = session::handle(
                &mut conn.session(&mut token_iat),
                slot as u32,
                env,
                &self.ctx,
                &mut self.sessions,
                now,
            );
            match flow {
                Flow::Continue => {
                    if was_handshake && conn.phase == Phase::Live {
                        self.token_iats.set(slot, token_iat);
                        // Logged in (`logout` takes it off the gauge).
                        let ws = conn.transport == Transport::WebSocket;
                        self.ctx.metrics.connection(self.ctx.id, ws, 1);
                        let at = now + ticks(limits.idle_timeout_ms);
                        arm(&mut self.wheel, conn, slot, now, at);
                    }
                    if let Some(counter) = put_off {
                        // One costly request per connection per turn, and
                        // behind those the share left waiting.
                        if pos < data.len() {
                            counter.fetch_add(1, Relaxed);
                        }
                        stop = Stop::TurnSpent;
                        break;
                    }
                }
                Flow::Close(rid, code, why) => {
                    fatal = Some((
                        rid,
                        Fatal {
                            code,
                            why,
                            ws_close: None,
                            detail: None,
                        },
                    ));
                    break;
                }
                Flow::Refuse(rid, err) => {
                    fatal = Some((
                        rid,
                        Fatal {
                            code: err.code(),
                            why: err.message.clone(),
                            ws_close: None,
                            detail: Some(err),
                        },
                    ));
                    break;
                }
            }
        }
        let rest = &data[pos..];
        let size = input::frame_size(conn.transport, rest, limits.max_frame);
        let rest = if from_scratch {
            rest.to_vec()
        } else {
            held.drain(..pos);
            held
        };
        let owes_rest = matches!(stop, Stop::Drained) && !rest.is_empty();
        conn.keep_input(rest, size);
        // A frame the client has started and owes the rest of has a
        // deadline; input the server chose not to read yet has none.
        let partial = match (owes_rest, handled, was_partial) {
            (false, _, _) => None,
            (true, false, Some(at)) => Some(at),
            (true, _, _) => Some(now),
        };
        conn.set_partial_since(partial);
        if partial.is_some() && partial != was_partial && conn.phase == Phase::Live {
            let at = now + ticks(limits.frame_timeout_ms);
            arm(&mut self.wheel, conn, slot, now, at);
        }
        if conn.lagging() && conn.phase == Phase::Live {
            self.catchup.push(slot);
        }
        let has_output = conn.out_len() > 0;
        if has_output {
            self.mark_dirty(slot);
        }
        if let Some((rid, f)) = fatal {
            self.close_with(slot, rid, f.code, &f.why, f.ws_close, f.detail);
            return Stop::Closed;
        }
        stop
    }

    /// `slot`'s frame bucket is empty: read it again once it has earned
    /// frames ([`bucket::FrameRate::retry`] after the first connection of the list
    /// was held back), not in the next turn.
    fn hold_back(&mut self, slot: usize) {
        if self.throttled.is_empty() {
            self.throttled_at = self.instant;
        }
        self.throttled.push(slot);
    }

    /// Clear `slot`'s pause once its output drained below half the budget
    /// and its requests in flight are under the limit, and read it again
    /// next turn (its readiness edge may have come and gone meanwhile).
    fn resume(&mut self, slot: usize) {
        let low = self.ctx.limits.push_buffer_bytes / 2;
        if let Some(conn) = self.conns.get_mut(slot) {
            if conn.paused() && conn.out_len() < low && usize::from(conn.in_flight) < MAX_IN_FLIGHT
            {
                conn.set_paused(false);
                self.pending_input.push(slot);
            }
        }
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
                        answer,
                        received,
                    } in replies
                    {
                        if let Some(conn) = self.live_conn(to.slot, to.gen) {
                            if conn.transport == Transport::Http {
                                self.answered.push(received);
                                self.http_reply(to.slot as usize, answer);
                                continue;
                            }
                            // Queued whatever the budget: the connection's
                            // reads stop while it is over, and at most
                            // MAX_IN_FLIGHT answers are on their way.
                            match answer {
                                Answer::Frame(frame) => conn.send_frame(&frame),
                                Answer::Typed(env) => conn.send_env(&env),
                            }
                            conn.in_flight = conn.in_flight.saturating_sub(1);
                            self.answered.push(received);
                            self.mark_dirty(to.slot as usize);
                            self.resume(to.slot as usize);
                        }
                    }
                    let high = self.ctx.limits.push_buffer_bytes;
                    let me = self.ctx.id;
                    for p in pushes {
                        let Some(conn) = self.live_conn(p.slot, p.gen) else {
                            continue;
                        };
                        let room = conn.load() < high;
                        let own =
                            p.sent.as_ref().and_then(|s| s.origin).is_some_and(|o| {
                                o.shard == me && o.slot == p.slot && o.gen == p.gen
                            });
                        let decision = match &mut conn.carries {
                            Carries::Frames(d) => d.on_push(p.seq, room, own),
                            // A parked long-poll: answer with what arrived.
                            Carries::Http(Exchange::Poll { after, .. }) if p.seq > *after => {
                                self.http_wake(p.slot as usize);
                                continue;
                            }
                            _ => continue,
                        };
                        match decision {
                            delivery::Push::Send => {
                                conn.send_deliver(p.seq, &p.event);
                                if let Some(sent) = p.sent {
                                    self.sessions.unacked.record(p.slot, p.gen, p.seq, sent);
                                }
                                self.ctx
                                    .metrics
                                    .messages_out
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                self.mark_dirty(p.slot as usize);
                            }
                            delivery::Push::Own { acked } => {
                                // Acknowledged for the device: its own
                                // message tells it nothing new (no receipt).
                                if let (Some((after, up_to)), Some(user), Some(device)) =
                                    (acked, conn.user.clone(), conn.device.clone())
                                {
                                    self.sessions.cursors.push(Acked {
                                        user,
                                        device,
                                        after,
                                        up_to,
                                        delivered: Some(Vec::new()),
                                        own: true,
                                    });
                                }
                            }
                            delivery::Push::StartCatchUp => self.catchup.push(p.slot as usize),
                            delivery::Push::Duplicate | delivery::Push::Skip => {}
                        }
                    }
                }
                ShardMsg::Ephemeral { targets, frame } => {
                    if let Some(me) = self.ctx.shards.get(usize::from(self.ctx.id)) {
                        me.ephemeral_taken();
                    }
                    let high = self.ctx.limits.push_buffer_bytes;
                    for (slot, gen) in targets {
                        let Some(conn) = self.live_conn(slot, gen) else {
                            continue;
                        };
                        // Ephemeral: a connection that is behind skips it.
                        if !conn.lagging()
                            && conn.load() < high
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
                ShardMsg::Sessions(q) => self.sessions_of(q),
                ShardMsg::HttpAnswer { to, answer } => {
                    let waiting = self.conns.get(to.slot as usize).is_some_and(|c| {
                        c.gen == to.gen
                            && c.phase != Phase::Closing
                            && matches!(c.carries, Carries::Http(Exchange::Admin { .. }))
                    });
                    if waiting {
                        self.http_finish(to.slot as usize, answer);
                    }
                }
                ShardMsg::Rehome => {
                    let moved: Vec<(usize, pb::Error)> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.phase == Phase::Live)
                        .filter_map(|(slot, c)| {
                            let user = c.user.as_deref()?;
                            session::not_home(&self.ctx, user).map(|e| (slot, e))
                        })
                        .collect();
                    for (slot, e) in moved {
                        let (code, why) = (e.code(), e.message.clone());
                        self.close_with(slot, 0, code, &why, None, Some(Box::new(e)));
                    }
                }
                ShardMsg::Close => {
                    let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for slot in slots {
                        self.end_with(
                            slot,
                            ErrorCode::ShuttingDown,
                            "server shutting down; retry later or elsewhere",
                        );
                    }
                    self.exit_at = Some(self.now + CLOSE_GRACE_TICKS);
                }
            }
        }
    }

    /// The operator's look at (and maybe close of) one user's connections
    /// here (see [`ShardMsg::Sessions`]).
    fn sessions_of(&mut self, q: crate::hub::mailbox::SessionsOf) {
        use crate::hub::mailbox::SessionInfo;
        let mut found = Vec::new();
        for (slot, gen) in q.targets {
            let Some(conn) = self.conns.get(slot as usize) else {
                continue;
            };
            if conn.gen != gen
                || conn.phase == Phase::Closing
                || conn.user.as_deref() != Some(&*q.user)
            {
                continue;
            }
            let poll = conn.transport == Transport::Http;
            if q.device.is_some() && (poll || conn.device != q.device) {
                continue;
            }
            let token_iat = self.token_iats.get(slot as usize);
            if q.issued_before
                .is_some_and(|before| poll || u64::from(token_iat) >= before)
            {
                continue;
            }
            found.push(SessionInfo {
                shard: self.ctx.id,
                transport: match conn.transport {
                    Transport::Tcp => "tcp",
                    Transport::WebSocket => "websocket",
                    Transport::Http => "http",
                },
                device: conn.device.as_deref().map(str::to_owned),
                token_issued_at: if poll { 0 } else { token_iat },
            });
            if let Some((code, why)) = &q.close {
                self.end_with(slot as usize, *code, why);
            }
        }
        let _ = q.done.send(found);
    }

    fn live_conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)
            .filter(|c| c.gen == gen && c.routable())
    }

    /// Refill lagging connections from the store, while their output is
    /// below half the push buffer, reading at most [`PAGE_ROWS_PER_TURN`]
    /// events in all: those the share did not reach keep their place at
    /// the head of the list for the next turn.
    fn run_catchups(&mut self) {
        let low = self.ctx.limits.push_buffer_bytes / 2;
        let mut list = std::mem::take(&mut self.catchup);
        let mut events_left = PAGE_ROWS_PER_TURN;
        let mut kept = 0;
        for i in 0..list.len() {
            let slot = list[i];
            if events_left == 0 {
                list[kept] = slot;
                kept += 1;
                continue;
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.phase != Phase::Live {
                continue;
            }
            let Some(user) = conn.user.clone() else {
                continue;
            };
            let mut failed = None;
            let mut lagging = false;
            while conn.out_len() < low {
                let Some(after) = conn.carries.delivery().and_then(|d| d.catch_up_after()) else {
                    break;
                };
                if events_left == 0 {
                    lagging = true;
                    break;
                }
                let page_size = CATCHUP_PAGE.min(events_left);
                match self.ctx.store.read_inbox(&user, after, page_size, low) {
                    Ok(page) => {
                        events_left = events_left.saturating_sub(page.events.len().max(1));
                        for event in page.events {
                            if let Some(d) = conn.carries.delivery() {
                                d.on_page_event(event.seq);
                            }
                            if let Some(pb::event::Kind::Message(m)) = &event.kind {
                                let sent = Sent {
                                    id: m.id,
                                    from: Arc::from(m.from_user.as_str()),
                                    group_id: m.group_id,
                                    origin: None,
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
                        if let Some(d) = conn.carries.delivery() {
                            d.on_page_end(page.has_more);
                        }
                        if !page.has_more {
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
                crate::log_every!(1000, error, error = %e, "reading an inbox for delivery failed");
                self.close_with(slot, 0, ErrorCode::Internal, "storage error", None, None);
                continue;
            }
            if lagging {
                // Room for more, but not this turn's reads: next turn.
                list[kept] = slot;
                kept += 1;
            }
            // Still lagging: the flush below makes room, and a drained
            // buffer brings it back here.
            self.mark_dirty(slot);
        }
        list.truncate(kept);
        // Whatever was added meanwhile goes behind those kept.
        list.append(&mut self.catchup);
        self.catchup = list;
    }

    /// Record the device cursors acknowledged this turn (one per device),
    /// with the delivered receipts they imply, in [`Cursors`], where logins
    /// read them at once and the pipeline writes them in bulk (see
    /// `crate::cursors`); and ask for a group commit when some are due and
    /// none would come otherwise.
    fn write_cursors(&mut self) {
        let now = self.ctx.clock.now();
        if self.ctx.cursors.wants_commit(now) {
            // A full queue means a group commit is coming anyway, and it
            // takes what is due.
            let _ = self
                .ctx
                .commit
                .submit(CommitCmd::WriteCursors { all: false });
        }
        if self.sessions.cursors.is_empty() {
            return;
        }
        let mut cursors = std::mem::take(&mut self.sessions.cursors);
        self.ctx.metrics.delivery_acks.fetch_add(
            cursors.iter().filter(|c| !c.own).count() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
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
            // watermark past them), but the cursor is still recorded.
            let convs = match a.delivered {
                Some(convs) => convs,
                None => summarize_delivered(&self.ctx.store, &a.user, a.after, a.up_to)
                    .unwrap_or_else(|e| {
                        crate::log_every!(1000, error, error = %e, "reading acknowledged events failed");
                        Vec::new()
                    }),
            };
            self.ctx
                .cursors
                .acknowledge(&a.user, &a.device, a.up_to, convs, now);
        }
        self.sessions.cursors = cursors;
    }

    fn flush_dirty(&mut self) {
        let low = self.ctx.limits.push_buffer_bytes / 2;
        let idle = ticks(self.ctx.limits.idle_timeout_ms);
        let now = self.now;
        let mut list = std::mem::take(&mut self.dirty);
        for slot in list.drain(..) {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.set_dirty(false);
            match conn.flush() {
                Ok(_) => {
                    conn.shutdown_when_flushed();
                    // Output at or over half the budget after a flush: the
                    // client is behind. It has `idle` to catch up; progress
                    // alone (a byte a second) is not enough.
                    let behind = conn.out_len() >= low && conn.phase == Phase::Live;
                    if behind && !conn.behind() {
                        conn.last_tx = now;
                        arm(&mut self.wheel, conn, slot, now, now + idle);
                    }
                    conn.set_behind(behind);
                    if conn.lagging() && conn.out_len() < low && conn.phase == Phase::Live {
                        self.catchup.push(slot);
                    }
                    self.resume(slot);
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
        let frame = ticks(self.ctx.limits.frame_timeout_ms);
        // Entries looked at, and connections closed: at most
        // CONN_CHANGES_PER_TURN closes a turn, the rest wait in `due` for
        // the next turn, which comes at once.
        let (mut seen, mut closed) = (0, 0);
        while closed < CONN_CHANGES_PER_TURN {
            let Some(&(slot, gen)) = due.get(seen) else {
                break;
            };
            seen += 1;
            let now = self.now;
            let Some(conn) = self
                .conns
                .get_mut(slot as usize)
                .filter(|c| c.gen == gen && c.timer_at <= now)
            else {
                // Gone, or a stale entry: the live one comes later.
                continue;
            };
            if let Some(until) = conn.http_waiting_until() {
                if conn.phase != Phase::Closing {
                    if until > now {
                        arm(&mut self.wheel, conn, slot as usize, now, until);
                    } else {
                        self.http_timeout(slot as usize);
                        closed += 1;
                    }
                    continue;
                }
            }
            let (deadline, code, why) = match conn.phase {
                Phase::Handshake => (
                    conn.last_rx + handshake,
                    ErrorCode::HandshakeTimeout,
                    "no Hello within the handshake timeout",
                ),
                // The live entry of a closing connection is its grace's end.
                Phase::Closing => (conn.timer_at, ErrorCode::Unspecified, ""),
                Phase::Live => [
                    (
                        conn.last_rx + idle,
                        ErrorCode::IdleTimeout,
                        "nothing received within the idle timeout",
                    ),
                    (
                        if conn.behind() {
                            conn.last_tx + idle
                        } else {
                            u32::MAX
                        },
                        ErrorCode::SlowConsumer,
                        "output not read within the idle timeout",
                    ),
                    (
                        conn.partial_since().map_or(u32::MAX, |at| at + frame),
                        ErrorCode::IdleTimeout,
                        "a frame was not completed within the frame timeout",
                    ),
                ]
                .into_iter()
                .min_by_key(|d| d.0)
                .unwrap_or((u32::MAX, ErrorCode::Unspecified, "")),
            };
            if deadline > now {
                arm(&mut self.wheel, conn, slot as usize, now, deadline);
                continue;
            }
            match code {
                ErrorCode::Unspecified => self.drop_conn(slot as usize),
                code => self.close_with(slot as usize, 0, code, why, None, None),
            }
            closed += 1;
        }
        due.drain(..seen);
        self.due = due;
    }

    /// Typing indicators whose TTL lapsed without a new STARTED: tell the
    /// other side they stopped. Deadlines are queued in the order they were
    /// set (the TTL is one for all), so this looks only at those due.
    fn expire_typing(&mut self) {
        while let Some(&(deadline, key)) = self.sessions.typing_due.front() {
            if deadline > self.now {
                break;
            }
            self.sessions.typing_due.pop_front();
            // A later STARTED moved the deadline, or a STOPPED ended it.
            if self
                .sessions
                .typing
                .get(&key)
                .is_some_and(|t| t.deadline == deadline)
            {
                self.stop_typing(key);
            }
        }
    }

    /// End the typing indicator of connection `key` (slot, generation), if
    /// it has one: tell the other side it stopped.
    fn stop_typing(&mut self, key: (u32, u32)) {
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
            kind: match conn.transport {
                Transport::Http => ConnKind::Http,
                Transport::Tcp | Transport::WebSocket => ConnKind::Session,
            },
        };
        session::unsubscribe_all(&mut conn.watching, me, &self.ctx);
        let user = conn.user.take();
        let transport = conn.transport;
        self.stop_typing((me.slot, me.gen));
        let Some(user) = user else { return };
        match transport {
            Transport::Tcp => self.ctx.metrics.connection(self.ctx.id, false, -1),
            Transport::WebSocket => self.ctx.metrics.connection(self.ctx.id, true, -1),
            Transport::Http => {}
        }
        if self.ctx.registry.remove(&user, me) {
            let at_ms = self.ctx.clock.now_ms();
            session::notify_offline(&self.ctx, &user, at_ms);
            // Not dropped on a full queue: this commits from it instead.
            self.ctx
                .commit
                .submit_waiting(CommitCmd::LastSeen { user, at_ms });
        }
    }

    /// End `slot`'s session with a fatal `code`, in its own protocol: an
    /// HTTP exchange (a parked long-poll, a send waiting for its Ack) is
    /// answered with the code's status; any other connection gets the
    /// Error frame and is closed ([`Shard::close_with`]).
    fn end_with(&mut self, slot: usize, code: ErrorCode, why: &str) {
        let http = self
            .conns
            .get(slot)
            .is_some_and(|c| c.transport == Transport::Http && c.phase != Phase::Closing);
        if http {
            self.http_finish(slot, crate::bridge::http::error(code, why));
        } else {
            self.close_with(slot, 0, code, why, None, None);
        }
    }

    /// Tell the client why, then close: the error frame (answering request
    /// `rid`, or 0 when it is about the connection) is flushed, the write
    /// side shut, and the socket kept (reads discarded) until the peer
    /// closes or a short grace period ends, so the frame is not lost to a
    /// reset. A WebSocket also gets a close frame: `ws_close`, or one
    /// derived from `code`. `ErrorCode::Unspecified` sends no Error frame
    /// (the client closed).
    fn close_with(
        &mut self,
        slot: usize,
        rid: u64,
        code: ErrorCode,
        why: &str,
        ws_close: Option<u16>,
        detail: Option<Box<pb::Error>>,
    ) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        tracing::debug!(shard = self.ctx.id, slot, ?code, why, "closing connection");
        self.logout(slot);
        let now = self.now;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.phase = Phase::Closing;
        conn.set_paused(false);
        conn.set_behind(false);

        // Output not yet sent is abandoned (everything durable is resent
        // from the store on the next login), and its memory returned now;
        // except at shutdown, where it holds the last Acks of requests the
        // pipeline committed while stopping, and is bounded by the budget.
        if code == ErrorCode::ShuttingDown {
            conn.discard_input();
        } else {
            conn.discard_buffers();
        }
        match detail {
            Some(err) => conn.send_env(&Envelope::new(rid, Body::Error(*err))),
            None if code != ErrorCode::Unspecified => {
                conn.send_env(&Envelope::error(rid, code, why, true))
            }
            None => {}
        }
        if conn.transport == Transport::WebSocket {
            let close = ws_close.unwrap_or_else(|| web::close_code(code));
            ws::write_close(conn.out(), close, why);
        }
        let flushed = conn.flush();
        conn.shutdown_when_flushed();
        if flushed.is_err() {
            self.drop_conn(slot);
            return;
        }
        arm_grace(&mut self.wheel, conn, slot, now);
    }

    /// The first bytes on a TLS listener were not TLS: say so in
    /// plaintext, in the framing the client is speaking (an Error frame on
    /// the protocol port, a 400 on the HTTP port), then close.
    fn refuse_plaintext(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.drop_tls();
        crate::log_every!(
            10_000,
            debug,
            shard = self.ctx.id,
            "plaintext on a TLS listener refused"
        );
        if conn.transport == Transport::Http {
            let answer = crate::bridge::http::error(
                ErrorCode::InvalidRequest,
                "this port speaks HTTPS: use https:// (or wss://)",
            );
            self.http_finish(slot, answer);
        } else {
            self.close_with(
                slot,
                0,
                ErrorCode::ProtocolViolation,
                "this port speaks TLS: connect with TLS",
                None,
                None,
            );
        }
    }

    /// TLS refused the connection's input (a bad record, a failed
    /// handshake, an alert from the peer): send the alert rustls queued,
    /// if any, and close. No Error frame: the session cannot carry one.
    fn close_tls_failed(&mut self, slot: usize) {
        self.close_with(slot, 0, ErrorCode::Unspecified, "TLS error", None, None);
    }

    fn drop_conn(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        self.logout(slot);
        self.sessions.unacked.forget(slot as u32);
        let mut conn = self.conns.remove(slot);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.admission.release(self.addresses.remove(&slot));
    }
}
