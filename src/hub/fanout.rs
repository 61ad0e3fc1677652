//! Per-shard fan-out of what one group commit produces: the answers to its
//! requests and the Deliver pushes of its events, grouped by the shard that
//! holds each connection, then handed over as one [`ShardMsg::Deliver`]
//! and one wake-up per shard per group (the committing shard takes its own
//! share in the same turn, without a wake-up).
//!
//! The pipeline fills an [`Outbox`] only once the group's batch is durable
//! (or with the errors that replace its answers when the write failed), so
//! nothing here is ever taken back. It must never decide what to send: it
//! only routes, through the [`Registry`], and it never blocks (the shards'
//! mailboxes are unbounded for deliveries; see [`super::mailbox`]).
//!
//! [`ShardMsg::Deliver`]: super::mailbox::ShardMsg::Deliver

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use swiftlet_protocol::codec::frame_bytes;
use swiftlet_protocol::Envelope;

use super::mailbox::{Answer, Push, Reply, Sent, ShardHandle};
use super::registry::{ConnKind, ConnRef, Registry};
use crate::clock::Clock;

/// Per-shard buffers of what a group produces, sent after the commit.
pub struct Outbox {
    shards: Vec<ShardHandle>,
    /// The pipeline's clock: when a group was handed over (the start of
    /// the push delay the shards measure).
    clock: Clock,
    replies: Vec<Vec<Reply>>,
    pushes: Vec<Vec<Push>>,
    conns: Vec<ConnRef>,
}

impl Outbox {
    pub fn new(shards: Vec<ShardHandle>, clock: Clock) -> Self {
        let n = shards.len();
        Outbox {
            shards,
            clock,
            replies: vec![Vec::new(); n],
            pushes: (0..n).map(|_| Vec::new()).collect(),
            conns: Vec::new(),
        }
    }

    #[inline]
    pub fn reply(&mut self, to: ConnRef, received: Instant, env: &Envelope) {
        if let Some(v) = self.replies.get_mut(usize::from(to.shard)) {
            let answer = match to.kind {
                ConnKind::Session => Answer::Frame(frame_bytes(env)),
                ConnKind::Http => Answer::Typed(Box::new(env.clone())),
            };
            v.push(Reply {
                to,
                answer,
                received,
            });
        }
    }

    /// Queue a Deliver of `event` at inbox `seq` to every online device of
    /// `user`.
    #[inline]
    pub fn push(
        &mut self,
        registry: &Registry,
        user: &str,
        seq: u64,
        event: &Bytes,
        sent: Option<&Arc<Sent>>,
    ) {
        self.conns.clear();
        registry.lookup(user, &mut self.conns);
        if self.conns.is_empty() {
            return;
        }
        for c in &self.conns {
            if let Some(v) = self.pushes.get_mut(usize::from(c.shard)) {
                v.push(Push {
                    slot: c.slot,
                    gen: c.gen,
                    seq,
                    event: event.clone(),
                    sent: sent.cloned(),
                });
            }
        }
    }

    /// Hand everything to the shards: one message and one wake-up per
    /// shard, except `own`, the committing shard, which takes its mailbox
    /// before it sleeps again.
    #[inline]
    pub fn dispatch(&mut self, own: Option<usize>) {
        let committed = self.clock.now();
        for (i, shard) in self.shards.iter().enumerate() {
            let replies = std::mem::take(&mut self.replies[i]);
            let pushes = std::mem::take(&mut self.pushes[i]);
            if !replies.is_empty() || !pushes.is_empty() {
                shard.deliver(replies, pushes, committed, own != Some(i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::mailbox::ShardMsg;
    use swiftlet_protocol::codec::decode_frame;
    use swiftlet_protocol::{pb, Body};

    #[test]
    fn a_session_gets_its_answer_framed_and_an_http_exchange_typed() {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut out = Outbox::new(vec![ShardHandle::new(tx, waker)], Clock::system());
        let to = |slot, kind| ConnRef {
            shard: 0,
            slot,
            gen: 1,
            kind,
        };
        let ack = |rid| {
            Envelope::new(
                rid,
                Body::Ack(pb::Ack {
                    client_msg_id: "c1".into(),
                    ..Default::default()
                }),
            )
        };
        let now = Instant::now();
        out.reply(to(1, ConnKind::Session), now, &ack(7));
        out.reply(to(2, ConnKind::Http), now, &ack(8));
        out.dispatch(None);
        let Ok(ShardMsg::Deliver { replies, .. }) = rx.try_recv() else {
            panic!("one delivery for the shard");
        };
        match &replies[..] {
            [Reply {
                answer: Answer::Frame(frame),
                ..
            }, Reply {
                answer: Answer::Typed(env),
                ..
            }] => {
                let (framed, used) = decode_frame(frame, usize::MAX)
                    .expect("valid")
                    .expect("whole");
                assert_eq!((framed, used), (ack(7), frame.len()));
                assert_eq!(**env, ack(8));
            }
            other => panic!("{other:?}"),
        }
    }
}
