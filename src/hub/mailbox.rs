//! How other threads hand work to a shard: a channel plus a mio `Waker`.
//!
//! A shard's event loop sleeps in `epoll_wait`; a message alone would not wake
//! it, so every send is followed by a wake (except a shard's own share of a
//! commit it ran itself, taken in the same turn). The pipeline sends at most
//! one [`ShardMsg::Deliver`] per shard per group commit, which bounds the
//! wake-ups (and the cross-thread traffic) to one per shard per batch, not
//! one per message or per recipient.
//!
//! What the mailbox can hold is bounded by who fills it. Deliveries come
//! from the pipeline, at most one per commit group, and a shard takes its
//! mailbox every turn (a turn is itself bounded: see `READS_PER_TURN`).
//! Ephemeral notices come from any client's Typing and presence changes, so
//! they are counted: past [`MAX_EPHEMERAL_QUEUED`] waiting for one shard,
//! more are dropped (they are best effort by contract).
//!
//! It lives in [`crate::hub`] because the pipeline and other shards fill a
//! shard's mailbox and the shard empties it: it must never import either
//! side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;

use super::registry::ConnRef;

/// One inbox event for one connection.
#[derive(Debug, Clone)]
pub struct Push {
    pub slot: u32,
    pub gen: u32,
    /// The event's inbox sequence, which the connection checks against the
    /// next one it expects, and which the shard splices into the frame.
    pub seq: u64,
    /// `Event { seq: 0, kind }` encoded once and shared by every recipient
    /// (a group post's members): the shard frames it straight into each
    /// connection's output buffer, so fan-out allocates nothing per member.
    pub event: Bytes,
    /// For a message: its sender and conversation, remembered until the
    /// connection acknowledges it (see `session::unacked`).
    pub sent: Option<Arc<Sent>>,
}

/// What a delivered receipt needs to know about a message: made once by the
/// pipeline per message, shared by its pushes, and kept by each shard until
/// the connection acknowledges it.
#[derive(Debug)]
pub struct Sent {
    pub id: u64,
    pub from: Arc<str>,
    /// 0 for a direct message.
    pub group_id: u64,
    /// The connection that sent it, when it is on this node: one that asked
    /// (`Hello.skip_own_sends`) is not pushed its own message.
    pub origin: Option<ConnRef>,
}

/// An answer to one request, with when the shard read that request (the
/// shard records the time until it has written the answer: see
/// `swiftlet_request_seconds`).
#[derive(Debug, Clone)]
pub struct Reply {
    pub to: ConnRef,
    pub answer: Answer,
    pub received: Instant,
}

/// An answer in the form its connection takes (see
/// [`ConnKind`](super::registry::ConnKind)).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Encoded once, in the protocol's framing, by the pipeline: the shard
    /// copies it into a session's output (re-framed for a WebSocket).
    Frame(Bytes),
    /// The envelope itself, for an HTTP exchange, which answers in JSON:
    /// nothing is encoded only to be decoded again.
    Typed(Box<swiftlet_protocol::Envelope>),
}

/// Work for a shard.
pub enum ShardMsg {
    /// Responses to write as they are (Acks, errors) and inbox pushes.
    Deliver {
        replies: Vec<Reply>,
        pushes: Vec<Push>,
        /// When the group commit that produced them was durable.
        committed: Instant,
    },
    /// Ephemeral frames (typing, presence) for live connections: never
    /// stored, so never caught up; dropped for a connection that is behind.
    Ephemeral {
        targets: Vec<(u32, u32)>,
        frame: Bytes,
    },
    /// Stop accepting connections and reading requests; answer when done.
    StopAccepting(Sender<()>),
    /// Tell every client the server is stopping, close, and exit the loop.
    Close,
    /// Cluster: partitions moved away from this node. Close every logged-in
    /// connection of a user this node is no longer home to, telling it
    /// where to go (`NOT_HOME`).
    Rehome,
    /// The operator's API (`crate::admin`) looks at, or closes, some of
    /// one user's connections on this shard.
    Sessions(SessionsOf),
    /// The answer to an HTTP request that waited for another thread (an
    /// admin request): write it and close, if the connection still waits.
    HttpAnswer { to: ConnRef, answer: Vec<u8> },
}

/// Some connections of one user, and what to do with them (see
/// [`ShardMsg::Sessions`]). A connection that is not `user`'s any more (its
/// slot was reused) is left alone.
pub struct SessionsOf {
    pub user: Arc<str>,
    /// (slot, generation) of the user's connections on this shard, from
    /// the registry.
    pub targets: Vec<(u32, u32)>,
    /// Only this device's sessions (parked HTTP polls have no device).
    pub device: Option<Arc<str>>,
    /// Only sessions whose token was issued before this (seconds since
    /// the Unix epoch); parked HTTP polls are left out.
    pub issued_before: Option<u64>,
    /// Close the matching connections with this code and reason.
    pub close: Option<(swiftlet_protocol::ErrorCode, String)>,
    /// Gets what matched.
    pub done: Sender<Vec<SessionInfo>>,
}

/// One connection as [`ShardMsg::Sessions`] reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub shard: u16,
    /// `tcp`, `websocket`, or `http` (a parked long-poll).
    pub transport: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The `iat` of the token it logged in with (0 for a poll, and for a
    /// token without one).
    pub token_issued_at: u32,
}

/// Ephemeral messages that may wait in one shard's mailbox; more are
/// dropped.
pub const MAX_EPHEMERAL_QUEUED: usize = 4096;

/// The sending side of a shard's mailbox. Cheap to clone.
#[derive(Clone)]
pub struct ShardHandle {
    tx: Sender<ShardMsg>,
    waker: Arc<mio::Waker>,
    /// Ephemeral messages sent and not yet taken by the shard.
    ephemeral: Arc<AtomicUsize>,
}

impl ShardHandle {
    pub fn new(tx: Sender<ShardMsg>, waker: Arc<mio::Waker>) -> Self {
        ShardHandle {
            tx,
            waker,
            ephemeral: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Send ephemeral frames unless [`MAX_EPHEMERAL_QUEUED`] already wait
    /// for this shard. False when dropped.
    pub fn send_ephemeral(&self, targets: Vec<(u32, u32)>, frame: bytes::Bytes) -> bool {
        if self.ephemeral.fetch_add(1, Ordering::Relaxed) >= MAX_EPHEMERAL_QUEUED {
            self.ephemeral.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        self.send(ShardMsg::Ephemeral { targets, frame });
        true
    }

    /// The shard took one ephemeral message from its mailbox.
    pub fn ephemeral_taken(&self) {
        self.ephemeral.fetch_sub(1, Ordering::Relaxed);
    }

    /// Send `msg` and wake the shard. A shard that has exited drops it.
    pub fn send(&self, msg: ShardMsg) {
        if self.tx.send(msg).is_ok() {
            self.wake();
        }
    }

    /// Make the shard run a loop turn.
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            crate::log_every!(1000, warn, error = %e, "waking a shard failed");
        }
    }

    /// Hand the shard a group commit's answers and pushes. `wake` is false
    /// only when the caller is this shard's own thread, which takes its
    /// mailbox before it waits again.
    pub fn deliver(&self, replies: Vec<Reply>, pushes: Vec<Push>, committed: Instant, wake: bool) {
        let msg = ShardMsg::Deliver {
            replies,
            pushes,
            committed,
        };
        if wake {
            self.send(msg);
        } else {
            let _ = self.tx.send(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_notices_past_the_bound_are_dropped() {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = ShardHandle::new(tx, waker);
        for _ in 0..MAX_EPHEMERAL_QUEUED {
            assert!(handle.send_ephemeral(Vec::new(), bytes::Bytes::new()));
        }
        assert!(!handle.send_ephemeral(Vec::new(), bytes::Bytes::new()));
        assert_eq!(rx.len(), MAX_EPHEMERAL_QUEUED);
        // The shard takes one: room for one more.
        let _ = rx.try_recv();
        handle.ephemeral_taken();
        assert!(handle.send_ephemeral(Vec::new(), bytes::Bytes::new()));
        assert!(!handle.send_ephemeral(Vec::new(), bytes::Bytes::new()));
    }
}
