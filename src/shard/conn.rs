//! One client connection as a shard holds it: the socket, where the session
//! stands, and buffers that exist only while they hold something.
//!
//! This struct is most of what an idle connection costs, so it is kept small
//! and flat: ids are shared `Arc<str>`s (the registry holds the same
//! allocation), timestamps are 32-bit tick counts, and both buffers are empty
//! `Vec`s (no heap) unless a partial frame arrived or output is waiting.
//! Reads go through the shard's shared scratch buffer instead of one per
//! connection.

use std::io::{self, Write};
use std::sync::Arc;

use mio::net::TcpStream;

/// Typing frames a connection may send in a burst; one more is allowed per
/// [`TYPING_REFILL_TICKS`].
pub const TYPING_BURST: u8 = 10;
pub const TYPING_REFILL_TICKS: u32 = 2;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected; waiting for Hello.
    Handshake,
    /// Logged in.
    Live,
    /// A final frame was queued and the write side shut down; waiting for the
    /// peer to close (or a short deadline) so the frame is not lost to a reset.
    Closing,
}

pub struct Conn {
    pub stream: TcpStream,
    /// Generation of this slab slot, to tell this connection from an earlier
    /// one in the same slot.
    pub gen: u32,
    pub phase: Phase,
    /// Set by a push that could not be sent in order (a gap, or too much
    /// output waiting): the shard refills from the store instead.
    pub lagging: bool,
    /// Already in the shard's list of connections to flush this turn.
    pub dirty: bool,
    /// Tick of the phase change (accept, login, close).
    pub since: u32,
    /// Tick of the last frame received.
    pub last_rx: u32,
    /// Tick of the last time output made progress (or was empty).
    pub last_tx: u32,
    pub user: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
    /// The next inbox seq this connection should be sent.
    pub next_seq: u64,
    /// The highest seq the device acknowledged.
    pub acked: u64,
    /// Typing frames this connection may still send (a token bucket).
    pub typing_tokens: u8,
    /// Tick the bucket was last refilled.
    pub typing_refill: u32,
    /// Users whose presence this connection subscribed to (boxed: most
    /// connections have none, and then this costs one pointer).
    pub watching: Option<Box<Vec<Arc<str>>>>,
    /// Bytes of a partial frame.
    pub inbuf: Vec<u8>,
    /// Encoded frames not yet accepted by the socket.
    pub outbuf: Vec<u8>,
}

impl Conn {
    pub fn new(stream: TcpStream, gen: u32, now: u32) -> Self {
        Conn {
            stream,
            gen,
            phase: Phase::Handshake,
            lagging: false,
            dirty: false,
            since: now,
            last_rx: now,
            last_tx: now,
            user: None,
            device: None,
            next_seq: 1,
            acked: 0,
            typing_tokens: TYPING_BURST,
            typing_refill: now,
            watching: None,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
        }
    }

    /// Take one typing token; false when the bucket is empty.
    pub fn take_typing_token(&mut self, now: u32) -> bool {
        let refill = now.saturating_sub(self.typing_refill) / TYPING_REFILL_TICKS;
        if refill > 0 {
            self.typing_tokens =
                (u32::from(self.typing_tokens) + refill).min(u32::from(TYPING_BURST)) as u8;
            self.typing_refill = now;
        }
        if self.typing_tokens == 0 {
            return false;
        }
        self.typing_tokens -= 1;
        true
    }

    /// Write as much pending output as the socket takes. Ok(true) when all of
    /// it went; the buffer's memory is then released.
    pub fn flush(&mut self, now: u32) -> io::Result<bool> {
        let mut written = 0;
        let result = loop {
            if written == self.outbuf.len() {
                break Ok(true);
            }
            match self.stream.write(&self.outbuf[written..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if written > 0 {
            self.last_tx = now;
            if written == self.outbuf.len() {
                self.outbuf = Vec::new();
            } else {
                self.outbuf.drain(..written);
            }
        }
        if self.outbuf.is_empty() {
            self.last_tx = now;
        }
        result
    }
}
