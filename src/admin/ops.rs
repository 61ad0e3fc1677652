//! The operator's port (`--ops-listen`): `/metrics`, `/healthz` and the
//! admin API on a listener of their own, outside the client ports' caps.
//!
//! On the HTTP port these share the clients' admission: a node that a
//! flood holds at `--max-connections` (or an address at its per-address
//! cap, or the shards at their refusal budget) answers a scrape `503` like
//! any other connection, exactly when the operator most needs to look.
//! The operator's port is counted apart, with a small cap of its own
//! ([`MAX_OPEN`] requests at a time; more are answered `503`), and each
//! connection must deliver its request within [`READ_TIMEOUT`]. It is
//! plain HTTP/1.1, one request per connection, and meant for a private
//! address (the default is off; the endpoints stay on the HTTP port too).
//!
//! It runs on threads of its own, never on the shards: one accepts, and
//! each request gets a short-lived thread that reads it, answers `/metrics`
//! and `/healthz` itself, and hands an admin request to the admin thread
//! through the same [`Gate`] the shards use (the same token check, the
//! same queue), waiting for the answer on a channel of its own.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use swiftlet_protocol::ErrorCode;

use super::{Gate, Job, Reply, PREFIX, WAIT_MS};
use crate::bridge::http;
use crate::metrics::Metrics;

/// Requests served at a time; more are answered `503` and closed.
pub const MAX_OPEN: usize = 16;
/// Time a connection has to deliver its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the accepting thread waits for a request it refuses (at the
/// cap) to arrive.
const BUSY_READ: Duration = Duration::from_secs(1);
/// Largest request body (admin requests carry small JSON bodies).
const MAX_BODY: usize = 64 * 1024;

const LISTENER: Token = Token(0);
const STOP: Token = Token(1);

/// The running port: its address, and what stops it.
pub struct OpsPort {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl OpsPort {
    /// Listen on `addr` and serve there until [`OpsPort::stop`].
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>, gate: Gate) -> io::Result<OpsPort> {
        let mut listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), STOP)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("swiftlet-ops".into())
                .spawn(move || accept_loop(poll, listener, &stop, &metrics, &gate))?
        };
        Ok(OpsPort {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and wait for the accepting thread (requests being
    /// served finish on their own threads, within their timeouts).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "waking the operator port to stop failed");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OpsPort {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    mut poll: Poll,
    listener: TcpListener,
    stop: &AtomicBool,
    metrics: &Arc<Metrics>,
    gate: &Gate,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut events = Events::with_capacity(16);
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "operator port: poll failed; the port stops");
            return;
        }
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: try again at the next readiness
                    // (or the next connection); the port never spins.
                    crate::log_every!(60_000, warn, error = %e, "operator port: accept failed");
                    break;
                }
            };
            // Back to a blocking socket with deadlines: each request has a
            // thread of its own.
            let stream = TcpStream::from(stream);
            if let Err(e) = stream.set_nonblocking(false) {
                crate::log_every!(60_000, warn, error = %e, "operator port: a connection could not be set up");
                continue;
            }
            if open.fetch_add(1, Ordering::AcqRel) >= MAX_OPEN {
                open.fetch_sub(1, Ordering::AcqRel);
                busy(stream);
                continue;
            }
            let (open2, metrics, gate) = (open.clone(), metrics.clone(), gate.clone());
            let spawned = std::thread::Builder::new()
                .name("swiftlet-ops-req".into())
                .spawn(move || {
                    serve(stream, &metrics, gate);
                    open2.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                open.fetch_sub(1, Ordering::AcqRel);
                crate::log_every!(60_000, warn, error = %e, "operator port: no thread for a request");
            }
        }
    }
}

/// The answer when [`MAX_OPEN`] requests are being served: `503`, after
/// reading the request (within [`BUSY_READ`]): closing with unread input
/// would reset the connection, and the reset can overtake the answer.
fn busy(mut stream: TcpStream) {
    let _ = read_request(&mut stream, BUSY_READ);
    finish(
        stream,
        &http::busy("the operator port serves as many requests as it may; retry later"),
    );
}

/// Read one request, answer it, close.
fn serve(mut stream: TcpStream, metrics: &Metrics, gate: Gate) {
    let answer = match read_request(&mut stream, READ_TIMEOUT) {
        Ok(Some(req)) => answer(req, metrics, gate),
        Ok(None) => return,
        Err(e) => e.answer(),
    };
    finish(stream, &answer);
}

/// Write `answer` (within [`READ_TIMEOUT`]) and close.
fn finish(mut stream: TcpStream, answer: &[u8]) {
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let _ = stream.write_all(answer);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// The request on `stream`, read `within` this long. `Ok(None)`: the peer
/// closed or was too slow (nothing to answer).
fn read_request(
    stream: &mut TcpStream,
    within: Duration,
) -> Result<Option<http::Request>, http::HttpError> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((req, _)) = http::parse(&buf, MAX_BODY)? {
            return Ok(Some(req));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Ok(None);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
}

fn answer(req: http::Request, metrics: &Metrics, gate: Gate) -> Vec<u8> {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => http::response(200, "text/plain", b"ok\n"),
        ("GET", "/metrics") => http::response(
            200,
            "text/plain; version=0.0.4",
            metrics.render().as_bytes(),
        ),
        (_, path) if path.starts_with(PREFIX) => admin(req, gate),
        (_, "/healthz" | "/metrics") => http::response(405, "text/plain", b"method not allowed\n"),
        _ => http::error(ErrorCode::NotFound, "no such page on the operator port"),
    }
}

/// An admin request: the shards' gate and queue, an answer channel of its
/// own. The gate is dropped before the wait, so a node stopping while a
/// backup runs is not held up by this thread (see `crate::server`).
fn admin(req: http::Request, gate: Gate) -> Vec<u8> {
    if let Err(refusal) = gate.check(&req) {
        return refusal;
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let submitted = gate.submit(Job {
        request: req,
        reply: Reply::Direct(tx),
    });
    drop(gate);
    if let Err(refusal) = submitted {
        return refusal;
    }
    // As on the HTTP port: past the wait, or with the admin thread gone
    // (the node stopping), the work may still complete.
    rx.recv_timeout(Duration::from_millis(WAIT_MS))
        .unwrap_or_else(|_| {
            http::error(
                ErrorCode::Unavailable,
                "the admin request did not finish in time; it may still complete",
            )
        })
}
