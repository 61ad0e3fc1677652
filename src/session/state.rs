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
/// An HTTP [`Exchange`] fits in the bytes `Delivery` leaves before its
/// flag, so the enum is no bigger than `Delivery` (its tag lives in the
/// flag's spare values): an idle connection pays nothing for HTTP. A test
/// below holds it to that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// Frames of the protocol (TCP, or WebSocket after an upgrade): where
    /// the connection stands in its user's inbox.
    Frames(Delivery),
    /// One HTTP request and its answer.
    Http(Exchange),
}

impl Carries {
    /// Inbox delivery, for a framed connection.
    pub fn delivery(&mut self) -> Option<&mut Delivery> {
        match self {
            Carries::Frames(d) => Some(d),
            Carries::Http(_) => None,
        }
    }

    /// A framed connection catching up from the store.
    pub fn lagging(&self) -> bool {
        matches!(self, Carries::Frames(d) if d.lagging())
    }

    /// The HTTP exchange, for a connection on the HTTP listener that has
    /// not upgraded to a WebSocket.
    pub fn exchange(&self) -> Option<Exchange> {
        match self {
            Carries::Http(x) => Some(*x),
            Carries::Frames(_) => None,
        }
    }
}

/// Where one HTTP exchange stands. Each connection on the HTTP listener
/// carries one request (every answer closes the connection), and this is
/// all the state it needs besides its buffers: it shares no field with a
/// framed session's protocol state.
///
/// 16 bytes: the variants' fields are inline (not a struct of their own)
/// so that the tag packs beside them, and a page limit is a `u16` (a Sync
/// page holds at most `MAX_SYNC_LIMIT`, 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// The request is being read (a `GET /ws` upgrade turns the connection
    /// into `Frames`; any other request is answered at once or waits below).
    Reading,
    /// A parked long-poll, waiting for an event of its user: it answers
    /// with the page of at most `limit` events (0: the default page) after
    /// seq `after`, or with an empty one at tick `until`.
    Poll { after: u64, until: u32, limit: u16 },
    /// `POST /v1/messages` handed to the pipeline, waiting for its answer
    /// until tick `until`.
    Send { until: u32 },
    /// An operator's request handed to the admin thread (`crate::admin`),
    /// waiting for its answer until tick `until`.
    Admin { until: u32 },
}

impl Exchange {
    /// The tick a waiting exchange gives up at (answering with an empty
    /// page, or with an error).
    pub fn waiting_until(&self) -> Option<u32> {
        match self {
            Exchange::Reading => None,
            Exchange::Poll { until, .. } => Some(*until),
            Exchange::Send { until } | Exchange::Admin { until } => Some(*until),
        }
    }
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
    /// The `iat` of the token the session logged in with (seconds), for
    /// closing it when its user's tokens are revoked (`crate::admin`).
    pub token_iat: &'a mut u32,
    pub carries: &'a mut Carries,
    /// Users whose presence this connection watches.
    pub watching: &'a mut Option<Box<Vec<Arc<str>>>>,
    /// Requests handed to the pipeline and not yet answered.
    pub in_flight: &'a mut u8,
    /// The typing and presence bucket (see [`bucket`]), in units; the
    /// shard refilled it before handing over the frame.
    pub typing_tokens: &'a mut u8,
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
    pub fn take_typing_tokens(&mut self, n: u8) -> bool {
        bucket::take_typing(self.typing_tokens, n)
    }

    /// Queue one envelope to the client.
    pub fn send_env(&mut self, env: &Envelope) {
        self.out.send_env(env);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP exchange costs a framed connection nothing.
    #[test]
    fn carries_is_no_bigger_than_delivery() {
        assert_eq!(
            std::mem::size_of::<Carries>(),
            std::mem::size_of::<Delivery>()
        );
    }
}
