//! One connection to a swiftlet server: handshake, request/response routing,
//! server pushes, heartbeats, shutdown.
//!
//! # Tasks and why
//!
//! [`Client::connect`] does the handshake inline, then splits the socket and
//! spawns three tasks:
//!
//! - **reader**: decodes frames; a response is matched to its waiting request
//!   by `request_id` through a map of oneshot senders; a `Deliver` goes into
//!   the bounded [`Deliveries`] queue; a fatal `Error` ends the connection.
//! - **writer**: the only owner of the write half, fed by a bounded mpsc. We
//!   chose a writer task over a `Mutex` around the sink because callers then
//!   never wait on each other's socket writes (only on queue space), the task
//!   batches whatever is queued into one flush (a burst of sends becomes one
//!   syscall), and shutdown is one place that drains the queue and sends FIN.
//! - **heartbeat**: a Ping every `heartbeat` period; an unanswered Ping means
//!   the connection is half-open, and it is closed with
//!   [`CloseReason::HeartbeatTimeout`] so the caller can reconnect.
//!
//! # Failure
//!
//! Whoever notices the end first (reader: EOF, bad frame, fatal Error;
//! writer: I/O error; heartbeat; [`Client::close`]; dropping the last
//! [`Client`]) calls `Shared::fail`, which records the first [`CloseReason`],
//! fails every pending request with [`ClientError::Disconnected`] and cancels
//! the other tasks. A request registered afterwards fails at once: the closed
//! flag and the pending map sit under one lock, so none can slip between.
//! The lock is a std mutex held only for map operations, never across I/O.
//! It also hands out request ids: the protocol requires them to increase on
//! the wire, so an id is taken and its frame queued in one critical section.
//!
//! # Backpressure
//!
//! Deliveries are bounded (`ClientConfig::delivery_buffer`): when the
//! application stops draining them, the reader stops reading the socket and
//! the server's own slow-consumer handling takes over, as the protocol
//! intends. Dropping [`Deliveries`] discards events instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use rand::RngCore;
use swiftlet_protocol::{pb, Body, Envelope, ErrorCode, FrameCodec, FrameError, PROTOCOL_VERSION};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::config::ClientConfig;
use crate::error::{ClientError, CloseReason};
use crate::tls::MaybeTls;

/// Capacity of the queue in front of the writer task. Bounded so a stalled
/// socket pushes back on callers instead of growing memory.
const WRITE_QUEUE: usize = 1024;

/// How long [`Client::close`] waits for queued frames to be written.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Request id of the Hello; later requests count up from here.
const HELLO_REQUEST_ID: u64 = 1;

/// A fresh random `client_msg_id`: 128 random bits as 32 hex characters.
pub fn new_client_msg_id() -> String {
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// One item from [`Deliveries::next`].
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryItem {
    /// The next inbox event for this device, in seq order. Acknowledge it with
    /// [`Client::ack_delivery`] once it is processed.
    Event(pb::Event),
    /// Someone started or stopped typing in a conversation (live only,
    /// never stored; a STARTED lapses after its `expires_in_ms`).
    Typing(pb::TypingNotice),
    /// A watched user came online or went offline (see
    /// [`Client::subscribe_presence`]).
    Presence(pb::Presence),
    /// Retention removed events this device had not acknowledged: they are
    /// gone for good and the next [`DeliveryItem::Event`] is the first one
    /// after them. Show it ("N older messages are no longer available");
    /// acknowledging the next event covers the gap too.
    Gap(Gap),
    /// The connection ended; no more events follow. `Server { .. }` carries a
    /// fatal error from the server.
    Closed(CloseReason),
}

/// Inbox events `from..=to` were removed by retention before this device
/// fetched them (protocol/README.md, section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

impl Gap {
    /// The gap between a device's position `after` (its cursor, or the last
    /// seq it received) and the oldest seq the server still holds, if any.
    /// `first_available` 0 means the server holds nothing, so everything
    /// after `after` up to `head` is gone.
    pub fn between(after: u64, first_available: u64, head: u64) -> Option<Gap> {
        match first_available {
            0 if head > after => Some(Gap {
                from: after + 1,
                to: head,
            }),
            f if f > after.saturating_add(1) => Some(Gap {
                from: after + 1,
                to: f - 1,
            }),
            _ => None,
        }
    }

    /// How many events are gone.
    pub fn count(&self) -> u64 {
        self.to - self.from + 1
    }
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.count();
        let (noun, verb) = if n == 1 {
            ("message is", "was")
        } else {
            ("messages are", "were")
        };
        write!(
            f,
            "{n} older {noun} no longer available (events {}..{} {verb} removed by retention)",
            self.from, self.to
        )
    }
}

type Reply = Result<Body, ClientError>;

struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once, by the first `fail`.
    closed: Option<CloseReason>,
    /// The request id of the next frame queued.
    next_id: u64,
}

/// What the tasks and the handles share. Tasks hold `Arc<Shared>`, never
/// `Arc<Inner>`, so dropping the last [`Client`] can close the connection.
struct Shared {
    state: Mutex<State>,
    writer: mpsc::Sender<Envelope>,
    shutdown: CancellationToken,
    /// The server's `max_frame_bytes` (0: unknown, no local check).
    server_max_frame: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, but a poisoned map is still
        // a consistent map, so recover instead of propagating the panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reason(&self) -> Option<CloseReason> {
        self.lock().closed.clone()
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected(self.reason().unwrap_or(CloseReason::Local))
    }

    /// End the connection (first reason wins) and fail every pending request.
    fn fail(&self, reason: CloseReason) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
            std::mem::take(&mut st.pending)
        };
        let reason = self.reason().unwrap_or(CloseReason::Local);
        for (_, tx) in pending {
            let _ = tx.send(Err(ClientError::Disconnected(reason.clone())));
        }
        self.shutdown.cancel();
    }

    /// Hand a response to the request waiting for it.
    fn complete(&self, request_id: u64, reply: Reply) {
        match self.lock().pending.remove(&request_id) {
            // The requester may have timed out and gone; that is fine.
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(request_id, "response to no pending request"),
        }
    }

    fn check_size(&self, env: &Envelope) -> Result<(), ClientError> {
        let len = env.encoded_len();
        if self.server_max_frame > 0 && len > self.server_max_frame {
            return Err(ClientError::TooLarge {
                len,
                max: self.server_max_frame,
            });
        }
        Ok(())
    }

    /// Queue `body` for the writer under the next request id, registering
    /// `reply` (if any) for the response. The protocol requires ids to
    /// increase on the wire, so queue space is reserved first and the id is
    /// taken and the frame queued together under the state lock: concurrent
    /// callers can never queue in a different order than their ids.
    async fn enqueue(
        &self,
        body: Body,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> Result<u64, ClientError> {
        // Size the frame with the widest possible id.
        let mut env = Envelope::new(u64::MAX, body);
        self.check_size(&env)?;
        let permit = self
            .writer
            .reserve()
            .await
            .map_err(|_| self.disconnected())?;
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(ClientError::Disconnected(reason.clone()));
        }
        let id = st.next_id;
        st.next_id += 1;
        env.request_id = id;
        if let Some(tx) = reply {
            st.pending.insert(id, tx);
        }
        permit.send(env);
        Ok(id)
    }

    /// Send a frame that expects no response.
    async fn post(&self, body: Body) -> Result<(), ClientError> {
        self.enqueue(body, None).await.map(drop)
    }

    /// Send a request and wait for the frame with the same request id.
    async fn request(&self, body: Body, timeout: Duration) -> Reply {
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        let id = tokio::time::timeout_at(deadline, self.enqueue(body, Some(tx)))
            .await
            .map_err(|_| ClientError::Timeout)??;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.disconnected()),
            Err(_) => {
                self.lock().pending.remove(&id);
                Err(ClientError::Timeout)
            }
        }
    }

    async fn ping(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let nonce = rand::thread_rng().next_u64();
        match self
            .request(Body::Ping(pb::Ping { nonce }), timeout)
            .await?
        {
            Body::Pong(p) if p.nonce == nonce => Ok(start.elapsed()),
            Body::Pong(p) => Err(ClientError::Protocol(format!(
                "pong nonce {} does not match ping nonce {nonce}",
                p.nonce
            ))),
            other => Err(unexpected("Pong", &other)),
        }
    }
}

pub(crate) fn unexpected(wanted: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

struct Inner {
    shared: Arc<Shared>,
    welcome: pb::Welcome,
    request_timeout: Duration,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    /// Where the login succeeded (after any redirects).
    addr: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.fail(CloseReason::Local);
    }
}

/// A logged-in connection. Clones share the connection; it closes when
/// [`Client::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &self.inner.welcome.user_id)
            .field("device_id", &self.inner.welcome.device_id)
            .field("closed", &self.inner.shared.reason())
            .finish()
    }
}

/// The server's pushes for this connection, in order.
pub struct Deliveries {
    rx: mpsc::Receiver<DeliveryItem>,
    shared: Arc<Shared>,
    closed_reported: bool,
}

impl Deliveries {
    /// The next event; then, once the connection ends, one
    /// [`DeliveryItem::Closed`]; then `None`.
    pub async fn next(&mut self) -> Option<DeliveryItem> {
        match self.rx.recv().await {
            Some(item) => Some(item),
            None if self.closed_reported => None,
            None => {
                self.closed_reported = true;
                // The reader records the reason before dropping its sender.
                Some(DeliveryItem::Closed(
                    self.shared.reason().unwrap_or(CloseReason::Eof),
                ))
            }
        }
    }
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("queued", &self.rx.len())
            .finish()
    }
}

type Reader = FramedRead<ReadHalf<MaybeTls<TcpStream>>, FrameCodec>;
type Writer = FramedWrite<WriteHalf<MaybeTls<TcpStream>>, FrameCodec>;

impl Client {
    /// Connect, log in, and start the connection's tasks. A fatal `Error`
    /// in answer to the Hello is [`ClientError::Server`].
    pub async fn connect(cfg: ClientConfig) -> Result<(Client, Deliveries), ClientError> {
        let (reader, writer, welcome, addr) =
            tokio::time::timeout(cfg.request_timeout, login_following_redirects(&cfg))
                .await
                .map_err(|_| ClientError::Timeout)??;

        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        let (deliver_tx, deliver_rx) = mpsc::channel(cfg.delivery_buffer.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
                next_id: HELLO_REQUEST_ID + 1,
            }),
            writer: write_tx,
            shutdown: CancellationToken::new(),
            server_max_frame: welcome.max_frame_bytes as usize,
        });

        tokio::spawn(run_reader(
            shared.clone(),
            reader,
            deliver_tx,
            welcome.cursor,
        ));
        let writer_task = tokio::spawn(run_writer(shared.clone(), write_rx, writer));
        let period = cfg.heartbeat.or_else(|| {
            (welcome.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(u64::from(welcome.idle_timeout_ms) / 3))
        });
        if let Some(period) = period.filter(|p| !p.is_zero()) {
            tokio::spawn(run_heartbeat(shared.clone(), period, cfg.request_timeout));
        }

        let client = Client {
            inner: Arc::new(Inner {
                shared: shared.clone(),
                welcome,
                request_timeout: cfg.request_timeout,
                writer_task: Mutex::new(Some(writer_task)),
                addr,
            }),
        };
        let deliveries = Deliveries {
            rx: deliver_rx,
            shared,
            closed_reported: false,
        };
        Ok((client, deliveries))
    }

    /// The address this connection logged in at: the configured one, or
    /// the user's home node it was redirected to (see NOT_HOME in the
    /// protocol). Reconnect there.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The server's Welcome: user id, the device's cursor, limits.
    pub fn welcome(&self) -> &pb::Welcome {
        &self.inner.welcome
    }

    /// Why the connection ended, or `None` while it is up.
    pub fn closed(&self) -> Option<CloseReason> {
        self.inner.shared.reason()
    }

    /// Send a message with a fresh random `client_msg_id`; resolves when the
    /// server has made it durable.
    pub async fn send(
        &self,
        to_user: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        self.send_with_id(&new_client_msg_id(), to_user, content_type, body)
            .await
    }

    /// Send a message with the caller's `client_msg_id`. Retrying with the
    /// same id (on this or any later connection) is safe: the server stores
    /// the message once and answers every retry with the same Ack.
    pub async fn send_with_id(
        &self,
        client_msg_id: &str,
        to_user: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        let send = pb::Send {
            client_msg_id: client_msg_id.to_owned(),
            to_user: to_user.to_owned(),
            content_type: content_type.to_owned(),
            body: body.into(),
            group_id: 0,
        };
        self.send_message(send).await
    }

    /// Send a prepared `Send` (1:1 or group) and await its Ack.
    pub(crate) async fn send_message(&self, send: pb::Send) -> Result<pb::Ack, ClientError> {
        match self.request(Body::Send(send)).await? {
            Body::Ack(ack) => Ok(ack),
            other => Err(unexpected("Ack", &other)),
        }
    }

    /// Tell the server this device has processed every event up to `up_to`
    /// (its stored cursor; never moves backwards). No response is expected;
    /// this resolves once the frame is queued for writing.
    pub async fn ack_delivery(&self, up_to: u64) -> Result<(), ClientError> {
        self.inner
            .shared
            .post(Body::DeliveryAck(pb::DeliveryAck { up_to }))
            .await
    }

    /// Page through the inbox: events with seq > `after`, at most `limit`
    /// (0: the server's default).
    pub async fn sync(&self, after: u64, limit: u32) -> Result<pb::SyncBatch, ClientError> {
        match self.request(Body::Sync(pb::Sync { after, limit })).await? {
            Body::SyncBatch(batch) => Ok(batch),
            other => Err(unexpected("SyncBatch", &other)),
        }
    }

    /// Round-trip time of one Ping.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        self.inner.shared.ping(self.inner.request_timeout).await
    }

    /// Close the connection: pending requests fail with
    /// `Disconnected(Local)`, frames already queued (a last DeliveryAck) are
    /// still written, then the socket is shut down.
    pub async fn close(&self) {
        self.inner.shared.fail(CloseReason::Local);
        let task = self
            .inner
            .writer_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(CLOSE_GRACE, task).await;
        }
    }

    pub(crate) async fn request(&self, body: Body) -> Reply {
        self.inner
            .shared
            .request(body, self.inner.request_timeout)
            .await
    }

    /// Queue a frame that gets no answer (DeliveryAck, Typing).
    pub(crate) async fn post(&self, body: Body) -> Result<(), ClientError> {
        self.inner.shared.post(body).await
    }
}

/// Most redirects one login follows (a cluster node redirects at most
/// once; more means the nodes disagree, and the client should back off).
pub const MAX_REDIRECTS: usize = 3;

/// Log in at `cfg.addr`; when the server answers NOT_HOME, log in again at
/// the address it names. Returns where the login succeeded.
async fn login_following_redirects(
    cfg: &ClientConfig,
) -> Result<(Reader, Writer, pb::Welcome, String), ClientError> {
    let mut addr = cfg.addr.clone();
    for _ in 0..=MAX_REDIRECTS {
        match handshake(cfg, &addr).await? {
            Login::Welcome(session) => {
                let (r, w, welcome) = *session;
                return Ok((r, w, welcome, addr));
            }
            Login::Redirect(to) => {
                tracing::debug!(from = %addr, to = %to, "redirected to the user's home node");
                addr = to;
            }
        }
    }
    // The nodes disagree for a moment (one has not yet read a move): a
    // 2xxx error, so the caller backs off and tries again.
    Err(ClientError::Server {
        code: ErrorCode::NotHome as i32,
        message: format!(
            "more than {MAX_REDIRECTS} redirects (last to {addr}); retry with backoff"
        ),
    })
}

enum Login {
    Welcome(Box<(Reader, Writer, pb::Welcome)>),
    Redirect(String),
}

async fn handshake(cfg: &ClientConfig, addr: &str) -> Result<Login, ClientError> {
    let stream = TcpStream::connect(addr).await?;
    // Chat frames are small and latency-bound; Nagle would hold them back.
    stream.set_nodelay(true)?;
    let stream = MaybeTls::connect(stream, cfg.tls.as_ref(), addr)
        .await
        .map_err(ClientError::from_handshake)?;
    let (read, write) = tokio::io::split(stream);
    let mut reader = FramedRead::new(read, FrameCodec::new(cfg.max_frame));
    let mut writer = FramedWrite::new(write, FrameCodec::new(cfg.max_frame));

    let hello = pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        token: cfg.token.clone(),
        device_id: cfg.device_id.clone(),
        skip_own_sends: cfg.skip_own_sends,
    };
    writer
        .send(Envelope::new(HELLO_REQUEST_ID, Body::Hello(hello)))
        .await?;

    let env = match reader.next().await {
        None => return Err(ClientError::Disconnected(CloseReason::Eof)),
        Some(frame) => frame?,
    };
    match env.body {
        Some(Body::Welcome(welcome)) => Ok(Login::Welcome(Box::new((reader, writer, welcome)))),
        Some(Body::Error(pb::Error {
            code,
            redirect: Some(r),
            ..
        })) if code == ErrorCode::NotHome as i32 && !r.tcp_addr.is_empty() => {
            Ok(Login::Redirect(r.tcp_addr))
        }
        Some(Body::Error(e)) => Err(ClientError::Server {
            code: e.code,
            message: e.message,
        }),
        Some(other) => Err(unexpected("Welcome", &other)),
        None => Err(ClientError::Protocol(
            "expected Welcome, got an empty envelope".into(),
        )),
    }
}

async fn run_reader(
    shared: Arc<Shared>,
    mut frames: Reader,
    deliveries: mpsc::Sender<DeliveryItem>,
    cursor: u64,
) {
    let reason = tokio::select! {
        reason = read_loop(&shared, &mut frames, &deliveries, cursor) => reason,
        _ = shared.shutdown.cancelled() => CloseReason::Local,
    };
    if reason != CloseReason::Local {
        tracing::debug!(%reason, "connection closed");
    }
    // Record the reason before `deliveries` drops, so Deliveries sees it.
    shared.fail(reason);
    drop(deliveries);
}

async fn read_loop(
    shared: &Shared,
    frames: &mut Reader,
    deliveries: &mpsc::Sender<DeliveryItem>,
    cursor: u64,
) -> CloseReason {
    let mut deliveries_open = true;
    // The last seq delivered on this connection (delivery resumes after the
    // cursor). Within a connection seqs come gap-free and in order, except
    // where retention removed events: a jump is exactly that gap.
    let mut last = cursor;
    // Seqs of this connection's own messages not delivered yet, from their
    // Acks: a server that skips own sends (`skip_own_sends`) jumps over
    // them, and such a jump is no gap.
    let mut own: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    loop {
        let env = match frames.next().await {
            None => return CloseReason::Eof,
            Some(Err(FrameError::Io(e))) => return CloseReason::Io(e.to_string()),
            Some(Err(e)) => return CloseReason::Frame(e.to_string()),
            Some(Ok(env)) => env,
        };
        match env.body {
            Some(Body::Deliver(deliver)) => {
                let Some(event) = deliver.event else {
                    tracing::warn!("Deliver without an event");
                    continue;
                };
                let gap = (event.seq > last.saturating_add(1))
                    .then(|| {
                        // Own seqs at either end of the jump are no gap
                        // (the loops are bounded by what `own` holds).
                        let (mut from, mut to) = (last + 1, event.seq - 1);
                        while from <= to && own.contains(&from) {
                            from += 1;
                        }
                        while to >= from && own.contains(&to) {
                            to -= 1;
                        }
                        (from <= to).then_some(Gap { from, to })
                    })
                    .flatten();
                last = last.max(event.seq);
                own = own.split_off(&(last + 1));
                if let Some(gap) = gap {
                    if deliveries_open && deliveries.send(DeliveryItem::Gap(gap)).await.is_err() {
                        deliveries_open = false;
                    }
                }
                // A dropped Deliveries means "discard"; keep serving responses.
                if deliveries_open && deliveries.send(DeliveryItem::Event(event)).await.is_err() {
                    deliveries_open = false;
                }
            }
            Some(Body::TypingNotice(t)) => {
                if deliveries_open && deliveries.send(DeliveryItem::Typing(t)).await.is_err() {
                    deliveries_open = false;
                }
            }
            Some(Body::Presence(p)) => {
                if deliveries_open && deliveries.send(DeliveryItem::Presence(p)).await.is_err() {
                    deliveries_open = false;
                }
            }
            Some(Body::Error(e)) if e.fatal || e.code >= 2000 => {
                if env.request_id != 0 {
                    shared.complete(
                        env.request_id,
                        Err(ClientError::Server {
                            code: e.code,
                            message: e.message.clone(),
                        }),
                    );
                }
                return CloseReason::Server {
                    code: e.code,
                    message: e.message,
                };
            }
            Some(Body::Error(e)) => shared.complete(
                env.request_id,
                Err(ClientError::Server {
                    code: e.code,
                    message: e.message,
                }),
            ),
            Some(body) => {
                if let Body::Ack(ack) = &body {
                    if ack.seq > last {
                        own.insert(ack.seq);
                    }
                }
                shared.complete(env.request_id, Ok(body))
            }
            // A body this version does not know (a newer server): skip it.
            None => tracing::debug!(request_id = env.request_id, "unknown frame body"),
        }
    }
}

async fn run_writer(shared: Arc<Shared>, mut queue: mpsc::Receiver<Envelope>, mut sink: Writer) {
    loop {
        tokio::select! {
            // Queued frames go out before a shutdown is honoured.
            biased;
            env = queue.recv() => {
                let Some(env) = env else { break };
                if let Err(e) = write_batch(&mut sink, env, &mut queue).await {
                    shared.fail(CloseReason::Io(e.to_string()));
                    return;
                }
            }
            _ = shared.shutdown.cancelled() => {
                let drain = async {
                    while let Ok(env) = queue.try_recv() {
                        sink.feed(env).await?;
                    }
                    SinkExt::<Envelope>::close(&mut sink).await
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
                return;
            }
        }
    }
}

/// Write `first` and whatever else is already queued, then flush once.
async fn write_batch(
    sink: &mut Writer,
    first: Envelope,
    queue: &mut mpsc::Receiver<Envelope>,
) -> Result<(), FrameError> {
    sink.feed(first).await?;
    while let Ok(env) = queue.try_recv() {
        sink.feed(env).await?;
    }
    SinkExt::<Envelope>::flush(sink).await
}

async fn run_heartbeat(shared: Arc<Shared>, period: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        match shared.ping(timeout).await {
            Ok(_) => {}
            Err(ClientError::Timeout) => {
                shared.fail(CloseReason::HeartbeatTimeout);
                return;
            }
            Err(ClientError::Disconnected(_)) => return,
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
