//! The protocol state of one connection, as the request code sees it: a
//! view ([`Session`]) of the fields the shard keeps inline in its slab slot
//! (so an idle connection pays no extra struct padding), plus where answers
//! go ([`Output`]). No socket is reachable from here: the request code
//! reads and changes this state and queues frames, and the shard does the
//! I/O.

use std::sync::Arc;

use swiftlet_protocol::Envelope;

use super::bucket;
use super::delivery::Delivery;

/// How frames travel on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The protocol's own framing: varint length, Envelope.
    Tcp,
    /// An HTTP request on the HTTP listener (before any WebSocket upgrade).
    Http,
    /// After `GET /ws`: one Envelope per binary WebSocket message.
    WebSocket,
}

/// What a connection carries, with the state of that protocol only.
///
/// The HTTP variants fit in the bytes `Delivery` leaves before its flag,
/// so the enum is no bigger than `Delivery` (its tag lives in the flag's
/// spare values): an idle connection pays nothing for HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// Frames of the protocol (TCP, or WebSocket after an upgrade): where
    /// the connection stands in its user's inbox.
    Frames(Delivery),
    /// An HTTP request being read (or answered).
    Http,
    /// A parked long-poll, waiting for an event of its user.
    Poll(Poll),
    /// An HTTP send waiting for the pipeline's answer until tick `until`.
    Send { until: u32 },
}

impl Carries {
    /// Inbox delivery, for a framed connection.
    pub fn delivery(&mut self) -> Option<&mut Delivery> {
        match self {
            Carries::Frames(d) => Some(d),
            _ => None,
        }
    }

    /// A framed connection catching up from the store.
    pub fn lagging(&self) -> bool {
        matches!(self, Carries::Frames(d) if d.lagging())
    }
}

/// A parked long-poll: the page it answers with, and when it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    /// The events after this seq…
    pub after: u64,
    /// …at most this many.
    pub limit: u32,
    /// Tick when the wait ends (with an empty page).
    pub until: u32,
}

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

/// Where a session's answers go: the connection's output buffer, framed
/// for its transport.
pub trait Output {
    /// Queue one envelope.
    fn send_env(&mut self, env: &Envelope);
}

/// One connection's protocol state, borrowed from the shard's slab slot
/// (built by the shard's `Conn::session`).
pub struct Session<'a, O: Output> {
    pub phase: &'a mut Phase,
    pub user: &'a mut Option<Arc<str>>,
    pub device: &'a mut Option<Arc<str>>,
    pub carries: &'a mut Carries,
    /// Users whose presence this connection watches.
    pub watching: &'a mut Option<Box<Vec<Arc<str>>>>,
    /// Requests handed to the pipeline and not yet answered.
    pub in_flight: &'a mut u8,
    /// The typing and presence bucket (see [`bucket`]): tokens left, and
    /// the tick refills were counted to.
    pub typing_tokens: &'a mut u8,
    pub typing_refill: &'a mut u32,
    /// The slab slot's generation (names the connection in the registry).
    pub gen: u32,
    pub out: O,
}

impl<O: Output> Session<'_, O> {
    /// Inbox delivery of a framed connection.
    pub fn delivery(&mut self) -> Option<&mut Delivery> {
        self.carries.delivery()
    }

    /// Take `n` tokens of the typing and presence bucket (see [`bucket`]).
    pub fn take_typing_tokens(&mut self, now: u32, n: u8) -> bool {
        bucket::take(self.typing_tokens, self.typing_refill, now, n)
    }

    /// Queue one envelope to the client.
    pub fn send_env(&mut self, env: &Envelope) {
        self.out.send_env(env);
    }
}
