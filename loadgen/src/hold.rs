//! The lean holder of idle connections: a few threads (one per core, or
//! `--threads`), each owning a slab of logged-in sockets on its own `mio`
//! poll, instead of one tokio task per connection.
//!
//! Why: an idle connection only needs a heartbeat every few seconds and to
//! notice what the server sends (a Pong, a fatal Error, a WebSocket Ping or
//! Close). As a task it held its whole future (sized for the login it came
//! from), a tokio timer, two buffers and the task header: ~4.5 KB of loadgen
//! RSS each, and a timer wake-up per ping. Here a connection is an fd, its
//! ping time and two `Vec`s that are empty (unallocated) unless a frame
//! arrived split or a write was cut short: ~50 bytes in the slab. Reads go
//! into one scratch buffer per thread, parsing as many frames as a read
//! brought; pings are due from a timer wheel of 50 ms slots that the thread
//! turns between polls, so no timer exists per connection.
//!
//! Connections log in on the tokio runtime as before (TLS, WebSocket
//! upgrade, NOT_HOME redirects: [`crate::conn::Conn::connect`]) and are
//! handed over here by [`Holder::adopt`] once logged in; a TLS connection
//! cannot leave its tokio stream and stays a task ([`crate::scenario::idle::hold`]).

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use swiftlet_protocol::codec::encode_frame;
use swiftlet_protocol::{pb, Body, Envelope};

use crate::conn::{parse_frame, ConnError, Parsed, Parts};
use crate::stats::Stats;

/// The timer wheel's slot length and slot count (51.2 s per turn; longer
/// ping periods go round more than once).
const TICK: Duration = Duration::from_millis(50);
const SLOTS: usize = 1024;
/// The poll token of a thread's waker (new connections, stop).
const WAKE: Token = Token(usize::MAX);
/// One thread's read scratch buffer.
const SCRATCH: usize = 64 * 1024;

/// One held connection.
struct Held {
    sock: TcpStream,
    ws: bool,
    /// Bumped when the slab slot is reused, so stale wheel entries are skipped.
    gen: u32,
    next_request: u32,
    /// The tick of the next ping.
    due: u64,
    period_ticks: u32,
    /// Bytes of a frame that arrived split (empty, unallocated, otherwise).
    unread: Vec<u8>,
    /// Bytes a write left over (empty otherwise); WRITABLE is armed while
    /// there are any.
    unwritten: Vec<u8>,
}

/// A connection on its way to a thread.
struct Adopt {
    parts: Parts,
    ping: Duration,
}

struct Thread {
    tx: mpsc::Sender<Adopt>,
    waker: Arc<Waker>,
    handle: JoinHandle<()>,
}

/// The threads holding idle connections of one process.
pub struct Holder {
    threads: Vec<Thread>,
    next: AtomicUsize,
    stop: Arc<AtomicBool>,
}

impl Holder {
    /// Start `threads` holder threads (at least one).
    pub fn start(threads: usize, stats: Arc<Stats>) -> std::io::Result<Holder> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut out = Vec::new();
        for i in 0..threads.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (tx, rx) = mpsc::channel();
            let (stats, stop) = (stats.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("loadgen-hold-{i}"))
                .spawn(move || Engine::new(poll, rx, stats, stop).run())?;
            out.push(Thread { tx, waker, handle });
        }
        Ok(Holder {
            threads: out,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// Hand a logged-in connection over (round-robin over the threads); it
    /// pings every `ping`. It counts as open from now until it fails or
    /// [`Holder::stop`].
    pub fn adopt(&self, parts: Parts, ping: Duration, stats: &Stats) {
        let t = &self.threads[self.next.fetch_add(1, Relaxed) % self.threads.len()];
        stats.open.fetch_add(1, Relaxed);
        if t.tx.send(Adopt { parts, ping }).is_err() {
            // The thread is gone (it only ends on stop): the socket closes.
            stats.open.fetch_sub(1, Relaxed);
            stats.error("holder_gone");
            return;
        }
        let _ = t.waker.wake();
    }

    /// Close every connection and end the threads.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in &self.threads {
            let _ = t.waker.wake();
        }
        for t in self.threads {
            drop(t.tx);
            let _ = t.handle.join();
        }
    }
}

/// One holder thread's state.
struct Engine {
    poll: Poll,
    rx: mpsc::Receiver<Adopt>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    slab: Vec<Option<Held>>,
    free: Vec<u32>,
    gens: Vec<u32>,
    /// Per slot: (slab index, generation) of connections due in that slot
    /// (or in a later turn of the wheel).
    wheel: Vec<Vec<(u32, u32)>>,
    start: Instant,
    /// The next wheel tick to run.
    tick: u64,
    scratch: Vec<u8>,
    out: BytesMut,
}

impl Engine {
    fn new(
        poll: Poll,
        rx: mpsc::Receiver<Adopt>,
        stats: Arc<Stats>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Engine {
            poll,
            rx,
            stats,
            stop,
            slab: Vec::new(),
            free: Vec::new(),
            gens: Vec::new(),
            wheel: (0..SLOTS).map(|_| Vec::new()).collect(),
            start: Instant::now(),
            tick: 0,
            scratch: vec![0; SCRATCH],
            out: BytesMut::new(),
        }
    }

    fn now_tick(&self) -> u64 {
        (self.start.elapsed().as_nanos() / TICK.as_nanos()) as u64
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = (self.start + TICK * (self.tick as u32 + 1))
                .saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.stats.error("holder_poll");
                    break;
                }
            }
            if self.stop.load(Relaxed) {
                break;
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    self.take_new();
                    continue;
                }
                let i = ev.token().0;
                let r = if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read(i)
                } else {
                    Ok(())
                };
                let r = r.and_then(|()| {
                    if ev.is_writable() {
                        self.write(i)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = r {
                    self.close(i, Some(e));
                }
            }
            let now = self.now_tick();
            while self.tick <= now {
                self.turn(self.tick);
                self.tick += 1;
            }
        }
        for i in 0..self.slab.len() {
            self.close(i, None);
        }
    }

    /// Register the connections handed over since the last wake.
    fn take_new(&mut self) {
        while let Ok(a) = self.rx.try_recv() {
            let i = match self.free.pop() {
                Some(i) => i as usize,
                None => {
                    self.slab.push(None);
                    self.gens.push(0);
                    self.slab.len() - 1
                }
            };
            self.gens[i] = self.gens[i].wrapping_add(1);
            let mut sock = TcpStream::from_std(a.parts.socket);
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut sock, Token(i), Interest::READABLE)
            {
                self.free.push(i as u32);
                self.stats.open.fetch_sub(1, Relaxed);
                self.stats.error(ConnError::Io(e).kind());
                continue;
            }
            let period_ticks =
                (a.ping.as_nanos() / TICK.as_nanos()).clamp(1, u32::MAX as u128) as u32;
            // A random first ping within one period: connections that logged
            // in together do not ping together.
            let due = self.now_tick() + 1 + rand::random::<u32>() as u64 % u64::from(period_ticks);
            self.slab[i] = Some(Held {
                sock,
                ws: a.parts.ws,
                gen: self.gens[i],
                next_request: u32::try_from(a.parts.next_request).unwrap_or(1).max(1),
                due,
                period_ticks,
                unread: Vec::new(),
                unwritten: Vec::new(),
            });
            self.schedule(i, due);
            // Frames that came with the Welcome.
            if !a.parts.unread.is_empty() {
                let r = self.consume(i, &a.parts.unread);
                if let Err(e) = r.and_then(|()| self.flush_out(i)) {
                    self.close(i, Some(e));
                }
            }
        }
    }

    fn schedule(&mut self, i: usize, due: u64) {
        self.wheel[(due % SLOTS as u64) as usize].push((i as u32, self.gens[i]));
    }

    /// Run wheel tick `t`: ping every connection due by then.
    fn turn(&mut self, t: u64) {
        let slot = std::mem::take(&mut self.wheel[(t % SLOTS as u64) as usize]);
        let mut later = Vec::new();
        for &(i, gen) in &slot {
            let i = i as usize;
            let Some(h) = self.slab[i].as_mut().filter(|h| h.gen == gen) else {
                continue;
            };
            if h.due > t {
                later.push((i as u32, gen));
                continue;
            }
            h.due = t + u64::from(h.period_ticks);
            let due = h.due;
            let id = u64::from(h.next_request);
            h.next_request = h.next_request.checked_add(1).unwrap_or(1);
            let env = Envelope::new(id, Body::Ping(pb::Ping { nonce: 0 }));
            if h.ws {
                crate::ws::encode_envelope(&mut self.out, &env, rand::random());
            } else {
                encode_frame(&env, &mut self.out);
            }
            if let Err(e) = self.flush_out(i) {
                self.close(i, Some(e));
                continue;
            }
            self.schedule(i, due);
        }
        // Keep the slot's allocation; entries for later turns stay in it.
        let mut slot = slot;
        slot.clear();
        slot.extend(later);
        let cell = &mut self.wheel[(t % SLOTS as u64) as usize];
        slot.append(cell);
        *cell = slot;
    }

    /// Read everything the socket has, parsing frames as they complete.
    fn read(&mut self, i: usize) -> Result<(), ConnError> {
        loop {
            let Some(h) = self.slab[i].as_mut() else {
                return Ok(());
            };
            let n = match h.sock.read(&mut self.scratch) {
                Ok(0) => return Err(ConnError::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Io(e)),
            };
            let scratch = std::mem::take(&mut self.scratch);
            let r = self.consume(i, &scratch[..n]);
            self.scratch = scratch;
            r?;
            if n < SCRATCH {
                break;
            }
        }
        self.flush_out(i)
    }

    /// Parse `data` (after any split frame kept from before); replies (WebSocket Pongs) go to `self.out`.
    fn consume(&mut self, i: usize, data: &[u8]) -> Result<(), ConnError> {
        let Some(h) = self.slab[i].as_mut() else {
            return Ok(());
        };
        let mut kept = std::mem::take(&mut h.unread);
        let buf: &[u8] = if kept.is_empty() {
            data
        } else {
            kept.extend_from_slice(data);
            &kept
        };
        let mut at = 0;
        loop {
            match parse_frame(&buf[at..], h.ws, &mut self.out)? {
                Parsed::Frame(env, used) => {
                    at += used;
                    crate::scenario::idle_frame(env.body)?;
                }
                Parsed::Control { used, .. } | Parsed::Message(_, used) => at += used,
                Parsed::More => break,
            }
        }
        if at < buf.len() {
            h.unread = buf[at..].to_vec();
        }
        Ok(())
    }

    /// Write what `self.out` holds to connection `i` (then its own backlog).
    fn flush_out(&mut self, i: usize) -> Result<(), ConnError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = self.out.split();
        let Some(h) = self.slab[i].as_mut() else {
            return Ok(());
        };
        if h.unwritten.is_empty() {
            let n = write_some(&mut h.sock, &out)?;
            if n < out.len() {
                h.unwritten = out[n..].to_vec();
                self.poll.registry().reregister(
                    &mut h.sock,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
            }
        } else {
            h.unwritten.extend_from_slice(&out);
        }
        Ok(())
    }

    /// The socket can take more: write the backlog.
    fn write(&mut self, i: usize) -> Result<(), ConnError> {
        let Some(h) = self.slab[i].as_mut() else {
            return Ok(());
        };
        if h.unwritten.is_empty() {
            return Ok(());
        }
        let n = write_some(&mut h.sock, &h.unwritten)?;
        h.unwritten.drain(..n);
        if h.unwritten.is_empty() {
            h.unwritten = Vec::new();
            self.poll
                .registry()
                .reregister(&mut h.sock, Token(i), Interest::READABLE)?;
        }
        Ok(())
    }

    /// Drop connection `i` (counting `err`, if any).
    fn close(&mut self, i: usize, err: Option<ConnError>) {
        let Some(mut h) = self.slab[i].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut h.sock);
        self.free.push(i as u32);
        self.stats.open.fetch_sub(1, Relaxed);
        if let Some(e) = err {
            self.stats.error(e.kind());
        }
    }
}

/// Write as much of `buf` as the socket takes now.
fn write_some(sock: &mut TcpStream, buf: &[u8]) -> Result<usize, ConnError> {
    let mut at = 0;
    while at < buf.len() {
        match sock.write(&buf[at..]) {
            Ok(0) => return Err(ConnError::Io(ErrorKind::WriteZero.into())),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
    Ok(at)
}
