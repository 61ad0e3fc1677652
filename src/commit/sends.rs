//! Sends: a message to one user or to a group, stored once and referenced
//! from every recipient's inbox (the sender's too, for their other
//! devices), in the batch of its group commit.
//!
//! A retry with the same `client_msg_id` gets the first Ack and never a
//! second copy: from the group being committed (`fresh`) or from the
//! store's dedup record, which is written in the same batch as the message.
//! Only members post to a group, and a post is ordered with the group's
//! membership changes by the one committer.
//!
//! This file must never put anything before every recipient's seq is
//! reserved (the reads that can fail come first), and never build a storage
//! key itself: the store's methods and [`keys`] do.

use std::sync::Arc;

use swiftlet_protocol::pb::{self, event::Kind};
use swiftlet_protocol::{Body, Envelope};

use super::group::{Fail, Pipeline, Work};
use super::seqs::encode_event;
use super::Origin;
use crate::hub::mailbox::Sent;
use crate::store::keys::{self, InboxEntry};

impl Pipeline {
    pub(super) fn send(
        &mut self,
        w: &mut Work,
        o: &Origin,
        send: pb::Send,
    ) -> Result<Option<Body>, Fail> {
        let key = (o.user.clone(), send.client_msg_id.clone());
        if let Some(ack) = w.fresh.get(&key) {
            let ack = Envelope::new(o.request_id, Body::Ack(ack.clone()));
            self.answer_after_commit(w, o, ack);
            return Ok(None);
        }
        if let Some(ack) = self.store.dedup(&o.user, &send.client_msg_id)? {
            // Already durable: answer at once, whatever happens to this batch.
            self.answer_now(w, o, Envelope::new(o.request_id, Body::Ack(ack)));
            return Ok(None);
        }
        let group = if send.group_id != 0 {
            Some(self.member_group(send.group_id, &o.user)?)
        } else {
            None
        };
        let recipients: Vec<Arc<str>> = match &group {
            Some(g) => g.members_by_name().to_vec(),
            None if *send.to_user == *o.user => vec![o.user.clone()],
            None => vec![Arc::from(send.to_user.as_str()), o.user.clone()],
        };
        let conv = keys::conversation_of(send.group_id, &o.user, &send.to_user);
        // Reads first: nothing is put until every seq is known.
        let seqs = recipients
            .iter()
            .map(|u| self.next_seq(w, u))
            .collect::<Result<Vec<_>, _>>()?;
        let now = self.clock.now_ms();
        let id = self.ids.next_at(now);
        let msg = pb::Message {
            id,
            from_user: o.user.to_string(),
            from_device: o.device.to_string(),
            to_user: if group.is_some() {
                String::new()
            } else {
                send.to_user
            },
            client_msg_id: send.client_msg_id,
            timestamp_ms: now,
            content_type: send.content_type,
            body: send.body,
            group_id: send.group_id,
        };
        // The sender's own seq, for its Ack: a connection that passes over
        // its own messages learns their place from it.
        let own_seq = recipients
            .iter()
            .zip(&seqs)
            .find(|(u, _)| **u == o.user)
            .map_or(0, |(_, s)| *s);
        let ack = pb::Ack {
            client_msg_id: msg.client_msg_id.clone(),
            server_msg_id: id,
            timestamp_ms: now,
            seq: own_seq,
        };
        self.store.put_minted_message(&mut w.batch, &msg)?;
        self.metrics
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.fanout.observe(recipients.len() as u64);
        let sent = Arc::new(Sent {
            id,
            from: o.user.clone(),
            group_id: msg.group_id,
            origin: o.from.is_none().then_some(o.reply),
        });
        let event = encode_event(Kind::Message(msg));
        for (u, seq) in recipients.iter().zip(seqs) {
            self.append(w, u, seq, InboxEntry::Message(id), &event, Some(&sent))?;
        }
        self.store
            .put_dedup(&mut w.batch, &o.user, &ack.client_msg_id, &ack)?;
        if let Some(g) = &group {
            self.store.put_group_log(&mut w.batch, g.id, id, &o.user)?;
        }
        w.written_undo.set(&mut w.written, id, conv);
        w.fresh_undo.set(&mut w.fresh, key, ack.clone());
        Ok(Some(Body::Ack(ack)))
    }
}
