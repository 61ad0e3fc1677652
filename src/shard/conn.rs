//! One client connection as a shard holds it: the socket, the timers and
//! buffers of its transport, and, inline, the fields of its protocol state
//! that the request code sees through a [`Session`] view (so the protocol
//! code never holds the socket, and the slot pays no struct padding).
//!
//! This struct is most of what an idle connection costs, so it is kept small
//! and flat: ids are shared `Arc<str>`s (the registry holds the same
//! allocation), timestamps are 32-bit tick counts, and both buffers are empty
//! `Vec`s (no heap) unless a partial frame arrived or output is waiting.
//! Reads go through the shard's shared scratch buffer instead of one per
//! connection.
//!
//! A TLS connection keeps its [`TlsSession`] in the same box as the
//! buffers (so a plain connection's slot does not grow by a pointer it
//! would never use), and that box then stays while the connection lives.
//! Everything above the socket sees plaintext: [`Conn::read`] opens the
//! records into the scratch buffer, [`Conn::flush`] seals the output.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use prost::Message as _;
use swiftlet_protocol::codec::{
    decode_head, deliver_envelope_len, encode_frame, write_deliver_envelope, write_deliver_frame,
};
use swiftlet_protocol::Envelope;

use super::tls::{TlsSession, TLS_HANDSHAKE_BYTE};
use crate::bridge::ws;
use crate::session::bucket::{self, FrameRate};
use crate::session::delivery::Delivery;

pub use crate::session::state::{Carries, Exchange, Phase, Transport};
use crate::session::state::{Output, Session};

pub struct Conn {
    pub stream: TcpStream,
    /// Generation of this slab slot, to tell this connection from an earlier
    /// one in the same slot.
    pub gen: u32,
    pub phase: Phase,
    pub transport: Transport,
    /// Four yes/no states in one byte (see [`Flags`]): the byte that
    /// three separate `bool`s would take beyond it is the frame bucket's.
    flags: Flags,
    /// Requests handed to the commit pipeline and not yet answered (at
    /// most `MAX_IN_FLIGHT`).
    pub in_flight: u8,
    /// Tick of the last complete frame received; before any, the accept
    /// (so the handshake deadline counts from it).
    pub last_rx: u32,
    /// Tick at which the output last fell behind (see `behind`).
    pub last_tx: u32,
    /// Tick of this connection's live timer entry: the one entry of the
    /// shard's wheel that is acted on (others are stale and skipped). For a
    /// closing connection it is the end of its grace period.
    pub timer_at: u32,
    /// The user this connection is registered under (what `logout`
    /// removes): a logged-in session's, or a parked long-poll's.
    pub user: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
    /// The protocol's own state: inbox delivery, or an HTTP exchange.
    pub carries: Carries,
    /// Typing and presence units left (see [`bucket`]).
    pub typing_tokens: u8,
    /// Frames this connection may still send before the next refill (see
    /// [`bucket`]; unused while frames are not limited).
    pub frame_tokens: u16,
    /// Instant both buckets were refilled to.
    pub refilled: bucket::Instant,
    /// Users whose presence this connection subscribed to (boxed: most
    /// connections have none, and then this costs one pointer).
    pub watching: Option<Box<Vec<Arc<str>>>>,
    /// Buffers, only while one holds something: an idle connection pays
    /// one null pointer for both.
    io: Option<Box<Buffers>>,
}

/// A connection's yes/no states, one bit each.
#[derive(Debug, Default, Clone, Copy)]
struct Flags(u8);

impl Flags {
    /// Already in the shard's list of connections to flush this turn.
    const DIRTY: u8 = 1;
    /// Input is not read or handled: the output is over budget, or too
    /// many requests wait for the pipeline. Cleared when that passes.
    const PAUSED: u8 = 2;
    /// The peer closed its side: read to the end, not just to a short read.
    const PEER_CLOSED: u8 = 4;
    /// The output is at or over half the budget: the client is behind, and
    /// has been since `last_tx`.
    const BEHIND: u8 = 8;
    /// The write side is shut (a closing connection's FIN is out). Shut
    /// once only: every `shutdown` wakes the socket's waiters, so each one
    /// is a new edge-triggered event for the shard, whose flush would shut
    /// it again: a closing connection whose peer had not closed yet kept
    /// its shard spinning for the whole grace period (found with
    /// swiftlet-hostile: a flood of connections took both cores).
    const WRITE_SHUT: u8 = 16;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u8, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }
}

/// A connection's output buffer, as a session's [`Output`]: envelopes
/// framed for the transport.
pub struct ConnOut<'a> {
    io: &'a mut Option<Box<Buffers>>,
    transport: Transport,
}

impl Output for ConnOut<'_> {
    fn send_env(&mut self, env: &Envelope) {
        let out = &mut self.io.get_or_insert_with(Box::default).outbuf;
        match self.transport {
            Transport::Tcp => encode_frame(env, out),
            Transport::WebSocket => {
                ws::write_header(out, ws::OP_BINARY, env.encoded_len());
                env.encode_raw(out);
            }
            Transport::Http => {}
        }
    }
}

/// A connection's buffers.
#[derive(Default)]
struct Buffers {
    /// Input read and not yet handled: a partial frame, or frames the shard
    /// stopped before (output over budget, the turn's share spent).
    inbuf: Vec<u8>,
    /// Encoded frames not yet accepted by the socket.
    outbuf: Vec<u8>,
    /// Tick the partial frame at the front of `inbuf` started, while the
    /// client owes the rest of it (it has a deadline).
    partial_since: Option<u32>,
    /// The connection's TLS, on a TLS listener: its presence keeps this box.
    tls: Option<Box<TlsSession>>,
}

/// What one read of a connection gave (see [`Conn::read`]).
#[derive(Debug)]
pub enum Received {
    /// The peer closed (or reset) the connection.
    Eof,
    /// `plain` bytes of input are at the front of the scratch buffer
    /// (possibly none, e.g. a TLS handshake record). `full`: the read
    /// filled the room it had, so the socket may hold more.
    Data {
        plain: usize,
        full: bool,
        peer_closed: bool,
    },
    /// The first bytes on a TLS listener are not a TLS handshake.
    NotTls,
    /// The TLS layer refused the input; its alert (if any) is queued.
    TlsFailed(rustls::Error),
}

impl Conn {
    /// A connection accepted at tick `now` (instant `instant`), with full
    /// buckets (`frames`: the node's frame rate).
    pub fn new(
        stream: TcpStream,
        gen: u32,
        now: u32,
        instant: bucket::Instant,
        transport: Transport,
        frames: FrameRate,
    ) -> Self {
        Conn {
            stream,
            gen,
            phase: Phase::Handshake,
            transport,
            carries: match transport {
                Transport::Http => Carries::Http(Exchange::Reading),
                _ => Carries::Frames(Delivery::default()),
            },
            flags: Flags::default(),
            in_flight: 0,
            last_rx: now,
            last_tx: now,
            timer_at: 0,
            user: None,
            device: None,
            typing_tokens: bucket::TYPING_FULL,
            frame_tokens: frames.full(),
            refilled: instant,
            watching: None,
            io: None,
        }
    }

    /// In the shard's list of connections to flush this turn.
    pub fn dirty(&self) -> bool {
        self.flags.has(Flags::DIRTY)
    }

    pub fn set_dirty(&mut self, on: bool) {
        self.flags.set(Flags::DIRTY, on);
    }

    /// Input is not read or handled until the shard resumes it (output over
    /// budget, or too many requests in flight).
    pub fn paused(&self) -> bool {
        self.flags.has(Flags::PAUSED)
    }

    pub fn set_paused(&mut self, on: bool) {
        self.flags.set(Flags::PAUSED, on);
    }

    /// The peer closed its side: read to the end, not just to a short read.
    pub fn peer_closed(&self) -> bool {
        self.flags.has(Flags::PEER_CLOSED)
    }

    pub fn set_peer_closed(&mut self) {
        self.flags.set(Flags::PEER_CLOSED, true);
    }

    /// The output is at or over half the budget, since `last_tx`.
    pub fn behind(&self) -> bool {
        self.flags.has(Flags::BEHIND)
    }

    pub fn set_behind(&mut self, on: bool) {
        self.flags.set(Flags::BEHIND, on);
    }

    /// Refill both of the connection's buckets to instant `now` (see
    /// [`bucket`]); the shard does this before it handles the input.
    pub fn refill(&mut self, now: bucket::Instant, frames: FrameRate) {
        bucket::refill(
            &mut self.typing_tokens,
            &mut self.frame_tokens,
            &mut self.refilled,
            now,
            frames,
        );
    }

    /// Catching up from the store (a framed connection that is lagging).
    pub fn lagging(&self) -> bool {
        self.carries.lagging()
    }

    /// An HTTP request waiting for an event or an answer, and the tick it
    /// gives up at.
    pub fn http_waiting_until(&self) -> Option<u32> {
        self.carries.exchange().and_then(|x| x.waiting_until())
    }

    /// Answers and pushes may be routed to it: a logged-in framed
    /// connection, or an HTTP request waiting for one.
    pub fn routable(&self) -> bool {
        match self.carries {
            Carries::Frames(_) => self.phase == Phase::Live,
            Carries::Http(Exchange::Poll { .. } | Exchange::Send { .. }) => {
                self.phase != Phase::Closing
            }
            Carries::Http(Exchange::Reading | Exchange::Admin { .. }) => false,
        }
    }

    /// Queue one frame in the protocol's framing (varint length, Envelope),
    /// re-framed for the connection's transport.
    pub fn send_frame(&mut self, frame: &[u8]) {
        match self.transport {
            Transport::Tcp => self.out().extend_from_slice(frame),
            Transport::WebSocket => {
                // Frames built in this process always have a valid head.
                if let Ok(Some((_, head))) = decode_head(frame, usize::MAX) {
                    ws::write_frame(self.out(), ws::OP_BINARY, &frame[head..]);
                }
            }
            // Plain HTTP answers are built by the bridge, never from frames.
            Transport::Http => {}
        }
    }

    /// Queue a Deliver of inbox event `seq`, given as `Event { seq: 0, .. }`
    /// encoded (see [`Push`](crate::hub::mailbox::Push)).
    pub fn send_deliver(&mut self, seq: u64, event_without_seq: &[u8]) {
        match self.transport {
            Transport::Tcp => write_deliver_frame(self.out(), seq, event_without_seq),
            Transport::WebSocket => {
                let out = self.out();
                let len = deliver_envelope_len(seq, event_without_seq.len());
                ws::write_header(out, ws::OP_BINARY, len);
                write_deliver_envelope(out, seq, event_without_seq);
            }
            Transport::Http => {}
        }
    }

    /// Queue one envelope, framed for the connection's transport.
    pub fn send_env(&mut self, env: &Envelope) {
        ConnOut {
            io: &mut self.io,
            transport: self.transport,
        }
        .send_env(env);
    }

    /// The connection's protocol state, for the request code: a view of
    /// this slot's fields, with the output buffer as where answers go.
    /// `token_iat` gets the `iat` of a login's token: the shard keeps it
    /// beside the slab (`Shard::token_iats`), not in this struct.
    pub fn session<'a>(&'a mut self, token_iat: &'a mut u32) -> Session<'a, ConnOut<'a>> {
        let Conn {
            phase,
            user,
            device,
            carries,
            watching,
            in_flight,
            typing_tokens,
            gen,
            transport,
            io,
            ..
        } = self;
        Session {
            phase,
            user,
            device,
            token_iat,
            carries,
            watching,
            in_flight,
            typing_tokens,
            gen: *gen,
            out: ConnOut {
                io,
                transport: *transport,
            },
        }
    }

    /// A closing connection's write side is shut once its last bytes are
    /// out (a FIN after the answer, never instead of it).
    /// On TLS, close_notify goes first, so the client can tell the end
    /// from a cut.
    pub fn shutdown_when_flushed(&mut self) {
        if self.phase != Phase::Closing || self.out_len() != 0 || self.flags.has(Flags::WRITE_SHUT)
        {
            return;
        }
        if let Some(tls) = self.io.as_mut().and_then(|b| b.tls.as_mut()) {
            if tls.established() && !tls.close_sent() {
                tls.queue_close_notify();
                if !matches!(self.flush(), Ok(true)) {
                    return;
                }
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        self.flags.set(Flags::WRITE_SHUT, true);
    }

    /// Pending output, created on first use.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.io.get_or_insert_with(Box::default).outbuf
    }

    /// Bytes of output waiting for the socket (on TLS, plaintext not yet
    /// sealed and records not yet written).
    pub fn out_len(&self) -> usize {
        self.io.as_ref().map_or(0, |b| {
            b.outbuf.len() + b.tls.as_ref().map_or(0, |t| t.tx().len())
        })
    }

    /// Drop input not yet handled, keeping the output (a shutdown still
    /// delivers the answers already queued).
    pub fn discard_input(&mut self) {
        drop(self.take_input());
    }

    /// Drop pending output and any partial input (the connection is
    /// closing). A TLS connection keeps its session, and the records
    /// already sealed: one may be half written, and cutting it would make
    /// everything after it unreadable.
    pub fn discard_buffers(&mut self) {
        match self.io.as_mut() {
            Some(b) if b.tls.is_some() => {
                b.inbuf = Vec::new();
                b.outbuf = Vec::new();
                b.partial_since = None;
            }
            _ => self.io = None,
        }
    }

    /// Input kept from earlier reads (empty if none): an HTTP request
    /// being assembled, a partial frame, or frames not yet handled.
    pub fn partial(&self) -> &[u8] {
        self.io.as_ref().map_or(&[], |b| &b.inbuf)
    }

    /// Append read bytes to the kept input.
    pub fn extend_partial(&mut self, bytes: &[u8]) {
        self.io
            .get_or_insert_with(Box::default)
            .inbuf
            .extend_from_slice(bytes);
    }

    /// Forget the first `n` bytes of the kept input.
    pub fn consume_partial(&mut self, n: usize) {
        if let Some(b) = self.io.as_mut() {
            if n >= b.inbuf.len() {
                b.inbuf = Vec::new();
            } else {
                b.inbuf.drain(..n);
            }
        }
        self.release_if_empty();
    }

    /// Take the kept input out, to decode it (put back what is left with
    /// [`Conn::keep_input`]).
    pub fn take_input(&mut self) -> Vec<u8> {
        let taken = self
            .io
            .as_mut()
            .map(|b| std::mem::take(&mut b.inbuf))
            .unwrap_or_default();
        self.release_if_empty();
        taken
    }

    /// Keep `rest` as the input not yet handled, sized exactly for the
    /// frame it starts when that is known (`frame_size`).
    pub fn keep_input(&mut self, mut rest: Vec<u8>, frame_size: Option<usize>) {
        if rest.is_empty() {
            if let Some(b) = self.io.as_mut() {
                b.inbuf = Vec::new();
                b.partial_since = None;
            }
            self.release_if_empty();
            return;
        }
        if let Some(size) = frame_size.filter(|s| *s > rest.len()) {
            rest.reserve_exact(size - rest.len());
        } else {
            rest.shrink_to_fit();
        }
        self.io.get_or_insert_with(Box::default).inbuf = rest;
    }

    /// Bytes of input kept.
    pub fn in_len(&self) -> usize {
        self.io.as_ref().map_or(0, |b| b.inbuf.capacity())
    }

    /// Memory the connection's buffers hold (what its budget counts).
    pub fn load(&self) -> usize {
        self.io.as_ref().map_or(0, |b| {
            b.inbuf.capacity() + b.outbuf.len() + b.tls.as_ref().map_or(0, |t| t.buffered())
        })
    }

    /// When the partial frame the client owes started, if it owes one.
    pub fn partial_since(&self) -> Option<u32> {
        self.io.as_ref().and_then(|b| b.partial_since)
    }

    /// Record (or, with `None`, clear) the start of an unfinished frame.
    pub fn set_partial_since(&mut self, at: Option<u32>) {
        match self.io.as_mut() {
            Some(b) => b.partial_since = at,
            None if at.is_some() => self.io.get_or_insert_with(Box::default).partial_since = at,
            None => {}
        }
    }

    fn release_if_empty(&mut self) {
        if self
            .io
            .as_ref()
            .is_some_and(|b| b.inbuf.capacity() == 0 && b.outbuf.is_empty() && b.tls.is_none())
        {
            self.io = None;
        }
    }

    /// Serve this connection over TLS with `session` (just accepted).
    pub fn set_tls(&mut self, session: Box<TlsSession>) {
        self.io.get_or_insert_with(Box::default).tls = Some(session);
    }

    /// Accepted on a TLS listener.
    pub fn is_tls(&self) -> bool {
        self.io.as_ref().is_some_and(|b| b.tls.is_some())
    }

    /// The TLS session, on a TLS connection.
    pub fn tls(&self) -> Option<&TlsSession> {
        self.io.as_ref().and_then(|b| b.tls.as_deref())
    }

    /// Stop speaking TLS on a connection that never did (its first bytes
    /// were not TLS), to tell it so in plaintext before closing.
    pub fn drop_tls(&mut self) {
        if let Some(b) = self.io.as_mut() {
            b.tls = None;
        }
        self.release_if_empty();
    }

    /// Read the socket once. A plain connection's bytes land in `scratch`;
    /// a TLS connection's ciphertext (after any partial record kept from
    /// before) lands in `cipher`, and what it opens to in `scratch`. A
    /// closing connection's input is only discarded (it is read for its
    /// EOF), so it is not opened either.
    pub fn read(&mut self, scratch: &mut [u8], cipher: &mut [u8]) -> io::Result<Received> {
        let closing = self.phase == Phase::Closing;
        let Some(tls) = self
            .io
            .as_mut()
            .and_then(|b| b.tls.as_mut())
            .filter(|_| !closing)
        else {
            return Ok(match self.stream.read(scratch)? {
                0 => Received::Eof,
                n => Received::Data {
                    plain: n,
                    full: n == scratch.len(),
                    peer_closed: false,
                },
            });
        };
        let kept = tls.take_rx();
        // Plaintext is never longer than its records, so ciphertext is
        // read into no more room than the plaintext buffer has; a kept
        // partial record (at most one record) is far shorter than either.
        let room = cipher.len().min(scratch.len());
        if kept.len() >= room {
            return Ok(Received::TlsFailed(rustls::Error::General(
                "a partial record larger than the read buffer".into(),
            )));
        }
        cipher[..kept.len()].copy_from_slice(&kept);
        let at = kept.len();
        drop(kept);
        let n = match self.stream.read(&mut cipher[at..room]) {
            Ok(0) => return Ok(Received::Eof),
            Ok(n) => n,
            Err(e) => {
                // Keep the partial record for the next read.
                if at > 0 {
                    tls.restore_rx(&cipher[..at]);
                }
                return Err(e);
            }
        };
        if !tls.started() {
            if cipher[0] != TLS_HANDSHAKE_BYTE {
                return Ok(Received::NotTls);
            }
            tls.mark_started();
        }
        let full = at + n == room;
        Ok(match tls.open(&mut cipher[..at + n], scratch) {
            Ok(opened) => Received::Data {
                plain: opened.plain,
                full,
                peer_closed: opened.peer_closed,
            },
            Err(e) => {
                tls.queue_alert();
                Received::TlsFailed(e)
            }
        })
    }

    /// Write as much pending output as the socket takes. Ok(true) when all of
    /// it went; the buffer's memory is then released. A TLS connection's
    /// output is sealed into records first; before its handshake is
    /// complete it can carry none (an error).
    pub fn flush(&mut self) -> io::Result<bool> {
        let Some(bufs) = self.io.as_mut() else {
            return Ok(true);
        };
        if let Some(tls) = bufs.tls.as_mut() {
            if !bufs.outbuf.is_empty() {
                match tls.seal(&bufs.outbuf) {
                    Ok(true) => bufs.outbuf = Vec::new(),
                    Ok(false) => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "output before the TLS handshake completed",
                        ))
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
            }
            let result = write_all_nonblocking(&mut self.stream, tls.tx());
            let (written, result) = result;
            tls.consume_tx(written);
            return result;
        }
        let out = &mut bufs.outbuf;
        let (written, result) = write_all_nonblocking(&mut self.stream, out);
        if written > 0 {
            if written == out.len() {
                *out = Vec::new();
            } else {
                out.drain(..written);
            }
        }
        self.release_if_empty();
        result
    }
}

/// Write `out` until done or the socket would block: the bytes written,
/// and Ok(true) when that was all of them.
fn write_all_nonblocking(stream: &mut TcpStream, out: &[u8]) -> (usize, io::Result<bool>) {
    let mut written = 0;
    let result = loop {
        if written == out.len() {
            break Ok(true);
        }
        match stream.write(&out[written..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    (written, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection over loopback (the test keeps the peer alive).
    fn conn() -> (Conn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        let stream = TcpStream::from_std(ours);
        (
            Conn::new(stream, 1, 0, 0, Transport::Tcp, FrameRate::OFF),
            peer,
        )
    }

    #[test]
    fn a_partial_frame_is_held_in_exactly_its_size_and_counted() {
        let (mut c, _peer) = conn();
        c.keep_input(vec![0xE0, 0xD4, 0x03, 0x08], Some(60_003));
        assert_eq!(c.in_len(), 60_003, "sized once, not doubled");
        assert_eq!(c.load(), 60_003, "counted against the budget");
        c.set_partial_since(Some(7));
        assert_eq!(c.partial_since(), Some(7));
        // Taking it out to decode keeps nothing behind.
        let taken = c.take_input();
        assert_eq!(taken.len(), 4);
        c.keep_input(Vec::new(), None);
        assert_eq!((c.load(), c.partial_since()), (0, None));
    }

    /// The struct is most of an idle connection's cost: keep it in budget.
    #[test]
    fn a_connection_struct_stays_small() {
        // A slab slot is the struct plus a tag (its niche is used when it has one).
        let size = std::mem::size_of::<Conn>();
        let slot = std::mem::size_of::<Option<Conn>>();
        eprintln!("Conn: {size} bytes, slab slot about {slot} bytes");
        assert!(slot <= 104, "a connection slot is {slot} bytes");
    }
}
