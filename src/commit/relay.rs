//! Events for users whose home is another node, and events other nodes
//! hand to this one (see [`crate::cluster::HandOff`]).
//!
//! Outgoing: an inbox event for a remote user takes no seq here; it is
//! kept in [`Work::relays`] (rolled back with its request), and before the
//! group's batch is written the relays are folded into one outbox entry
//! per destination, with that destination's next outbox seq, *in the same
//! batch*. So the Ack the sender gets covers the outbox entry too: it is as
//! durable as the sender's own copy. The entries go to the hand-off only
//! after the write.
//!
//! Incoming: [`Pipeline::apply_handoff`] applies the entries of one stream
//! entry from node `src`, only from the one after the last applied from
//! that source (older ones are duplicates, dropped; a later first one is a
//! gap, left for the source to re-drive), and records the new mark in the
//! same batch. Each event is appended to its user's inbox as if committed
//! here: messages keep their id and are stored as this node's copy.
//!
//! On a single node there are no [`Routes`] and none of this runs.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use swiftlet_protocol::pb::{self, event::Kind, ReceiptKind};

use super::group::{Pipeline, Work};
use super::{Op, Origin};
use crate::cluster::handoff::{self, Answer, Caller, Forwarded, RelayEntry, RelayEvent};
use crate::cluster::{HandOff, Home, OutboxEntry, Ownership, Partition};
use crate::hub::mailbox::Sent;
use crate::hub::registry::{ConnKind, ConnRef};
use crate::store::keys::{self, InboxEntry};
use crate::store::StoreError;
use swiftlet_protocol::{Envelope, ErrorCode};

/// How the pipeline of a cluster node finds homes and hands events on.
#[derive(Clone)]
pub struct Routes {
    /// This node's id.
    pub node: u16,
    pub ownership: Arc<dyn Ownership>,
    pub handoff: Arc<dyn HandOff>,
}

/// Where an inbox event of a user goes.
pub(super) enum Route {
    Local,
    Remote(u16),
}

/// What the pipeline keeps between groups for the hand-off.
#[derive(Default)]
pub(super) struct RelayState {
    /// Newest outbox seq given to each destination (read from the store on
    /// first use; dropped after a failed write).
    outbox_heads: HashMap<u16, u64>,
    /// Newest entry applied from each source (likewise).
    applied: HashMap<u16, u64>,
}

impl RelayState {
    pub(super) fn clear(&mut self) {
        self.outbox_heads.clear();
        self.applied.clear();
    }
}

impl Pipeline {
    /// Where `user`'s inbox lives. A partition with no known home is
    /// treated as local: that happens only before the cluster is
    /// initialized, when the node is fenced and writes nothing.
    pub(super) fn route(&self, user: &str) -> Route {
        match &self.routes {
            None => Route::Local,
            Some(r) => match r.ownership.home(Partition::of_user(user)) {
                Home::Remote { node, .. } => Route::Remote(node),
                Home::Local { .. } | Home::Unknown => Route::Local,
            },
        }
    }

    /// Whether this node may write now (false when fenced).
    pub(super) fn writable(&self) -> bool {
        self.routes.as_ref().is_none_or(|r| r.ownership.writable())
    }

    /// Whether this node may write a request of `user`: it holds its lease
    /// and is still `user`'s home.
    pub(super) fn may_write_for(&self, user: &str) -> bool {
        self.routes.as_ref().is_none_or(|r| {
            r.ownership.writable()
                && matches!(
                    r.ownership.home(Partition::of_user(user)),
                    Home::Local { .. }
                )
        })
    }

    /// Fold the group's relays into one outbox entry per destination, in
    /// the group's batch; returns the entries to hand off once it is
    /// written.
    pub(super) fn write_outbox(&mut self, w: &mut Work) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut by_dest: Vec<(u16, Vec<RelayEvent>)> = Vec::new();
        for (dest, ev) in w.relays.drain(..) {
            match by_dest.iter_mut().find(|(d, _)| *d == dest) {
                Some((_, v)) => v.push(ev),
                None => by_dest.push((dest, vec![ev])),
            }
        }
        let mut out = Vec::with_capacity(by_dest.len());
        for (dest, events) in by_dest {
            let payload = Bytes::from(RelayEntry { events }.encode_to_vec());
            out.push(self.put_outbox_entry(w, dest, payload)?);
        }
        Ok(out)
    }

    /// Put `payload` into the outbox for `dest` with its next seq, in
    /// `w`'s batch.
    pub(super) fn put_outbox_entry(
        &mut self,
        w: &mut Work,
        dest: u16,
        payload: Bytes,
    ) -> Result<OutboxEntry, StoreError> {
        let head = match self.relay.outbox_heads.get(&dest) {
            Some(h) => *h,
            None => self.store.outbox_head(dest)?,
        };
        let seq = head + 1;
        self.store.put_outbox(&mut w.batch, dest, seq, &payload);
        self.relay.outbox_heads.insert(dest, seq);
        Ok(OutboxEntry {
            to: dest,
            seq,
            payload,
        })
    }

    /// After the group's write: hand the new outbox entries on.
    pub(super) fn hand_off(&self, entries: &[OutboxEntry]) {
        if let (Some(r), false) = (&self.routes, entries.is_empty()) {
            // A refused or lost hand-off is re-driven from the outbox.
            let _ = r.handoff.ship(entries);
        }
    }

    /// The newest entry applied from `src`: in this group, else as
    /// written.
    fn applied_from(&self, w: &Work, src: u16) -> Result<u64, StoreError> {
        if let Some((_, _, _, new)) = w.applied.iter().rev().find(|a| a.1 == src) {
            return Ok(*new);
        }
        match self.relay.applied.get(&src) {
            Some(a) => Ok(*a),
            None => self.store.applied(src),
        }
    }

    /// After the group's write: remember what was applied.
    pub(super) fn applied_written(&mut self, src: u16, mark: u64) {
        self.relay.applied.insert(src, mark);
    }

    /// Apply the outbox entries `first, first + 1, ...` of node `src` (see
    /// the module doc). Returns (the mark before, the mark after).
    pub(super) fn apply_handoff(
        &mut self,
        w: &mut Work,
        src: u16,
        first: u64,
        entries: &[Bytes],
    ) -> Result<(u64, u64), StoreError> {
        let old = self.applied_from(w, src)?;
        if first > old + 1 {
            // A gap: an earlier entry went missing on the way. Nothing is
            // applied out of order; the source ships again from our mark.
            return Ok((old, old));
        }
        let mut mark = old;
        for (i, e) in entries.iter().enumerate() {
            let seq = first + i as u64;
            if seq <= mark {
                continue;
            }
            match handoff::decode(e) {
                Ok(relay) => {
                    for ev in relay.events {
                        if let Some(import) = ev.import {
                            self.apply_import(w, import)?;
                        } else if let Some(req) = ev.request {
                            self.run_forwarded(w, src, ev.user, req);
                        } else if let Some(answer) = ev.answer {
                            deliver_answer(w, answer);
                        } else {
                            self.deliver_relayed(w, &Arc::from(ev.user.as_str()), ev.event)?;
                        }
                    }
                }
                Err(e) => {
                    // Another node wrote it; it cannot be applied, ever.
                    crate::log_every!(1000, error, src, seq, error = %e, "skipping an undecodable hand-off entry");
                }
            }
            mark = seq;
        }
        if mark > old {
            self.store.put_applied(&mut w.batch, src, mark);
            w.writes += 1;
        }
        Ok((old, mark))
    }

    /// Answer `o` once this group's batch is written (through the hand-off
    /// when it came from another node: the answer rides in the batch).
    pub(super) fn answer_after_commit(&mut self, w: &mut Work, o: &Origin, env: Envelope) {
        match o.from {
            None => w.answers.push((o.reply, o.received, env)),
            Some(node) => relay_answer(w, o, node, &env),
        }
    }

    /// Answer `o` now, whatever happens to this group's batch (a refusal,
    /// or an Ack already durable). One from another node can only go back
    /// with the batch.
    pub(super) fn answer_now(&mut self, w: &mut Work, o: &Origin, env: Envelope) {
        match o.from {
            None => self.outbox.reply(o.reply, o.received, &env),
            Some(node) => relay_answer(w, o, node, &env),
        }
    }

    /// The node that is home to the group `op` writes to, when it is not
    /// this one.
    pub(super) fn group_home_elsewhere(&self, op: &Op) -> Option<u16> {
        let r = self.routes.as_ref()?;
        match r.ownership.home(Partition::of_group(op.group_id()?)) {
            Home::Remote { node, .. } => Some(node),
            Home::Local { .. } | Home::Unknown => None,
        }
    }

    /// A new group id whose home is this node (the creator's), so a group
    /// is created where its creator is served; None if this node is home
    /// to no partition. On a single node, the next id.
    pub(super) fn local_group_id(&mut self, now: u64) -> Option<u64> {
        let Some(r) = &self.routes else {
            return Some(self.ids.next_at(now));
        };
        let r = r.clone();
        // Each try lands here with the share of partitions this node holds
        // (a third with three nodes): a few tries, almost always.
        (0..4 * crate::cluster::PARTITIONS).find_map(|_| {
            let id = self.ids.next_at(now);
            matches!(
                r.ownership.home(Partition::of_group(id)),
                Home::Local { .. }
            )
            .then_some(id)
        })
    }

    /// Send `op` to the group's home, `home`, with this batch; its answer
    /// comes back the same way.
    pub(super) fn forward(&mut self, w: &mut Work, o: &Origin, op: Op, home: u16) {
        let envelope = Envelope::new(o.request_id, op.into_body());
        w.writes += 1;
        w.relays.push((
            home,
            RelayEvent {
                user: o.user.to_string(),
                request: Some(Forwarded {
                    caller: Some(caller_of(o.reply)),
                    device: o.device.to_string(),
                    envelope: Bytes::from(envelope.encode_to_vec()),
                }),
                ..RelayEvent::default()
            },
        ));
    }

    /// Apply a request node `src` forwarded here (this node is home to its
    /// group), as if a local client had sent it; the answer goes back.
    fn run_forwarded(&mut self, w: &mut Work, src: u16, user: String, req: Forwarded) {
        let caller = req.caller.unwrap_or_default();
        let origin = Origin {
            reply: ConnRef {
                shard: u16::try_from(caller.shard).unwrap_or(u16::MAX),
                slot: caller.slot,
                gen: caller.gen,
                kind: ConnKind::of_presence(caller.presence),
            },
            request_id: 0,
            user: Arc::from(user.as_str()),
            device: Arc::from(req.device.as_str()),
            received: self.clock.now(),
            from: Some(src),
        };
        let env = match Envelope::decode(req.envelope.as_ref()) {
            Ok(env) => env,
            Err(_) => {
                crate::log_every!(
                    1000,
                    error,
                    src,
                    "skipping an undecodable forwarded request"
                );
                return;
            }
        };
        let origin = Origin {
            request_id: env.request_id,
            ..origin
        };
        let op = env.body.and_then(Op::from_body);
        let sp = w.savepoint();
        match op {
            Some(op) if op.group_id().is_some() && self.group_home_elsewhere(&op).is_none() => {
                self.run_request(w, sp, &origin, op)
            }
            // The group moved on, or this is not a group request: refuse,
            // the client retries at its home.
            _ => self.answer_now(
                w,
                &origin,
                Envelope::error(
                    origin.request_id,
                    ErrorCode::Unavailable,
                    "the group's home moved; retry",
                    false,
                ),
            ),
        }
    }

    /// Append one relayed event to `user`'s inbox (or hand it on, if the
    /// user's home has moved on meanwhile: nothing of it is kept here).
    fn deliver_relayed(
        &mut self,
        w: &mut Work,
        user: &Arc<str>,
        event: Bytes,
    ) -> Result<(), StoreError> {
        if let Route::Remote(dest) = self.route(user) {
            self.relay_on(w, dest, user, &event);
            return Ok(());
        }
        let kind = match pb::Event::decode(event.as_ref()) {
            Ok(pb::Event { kind: Some(k), .. }) => k,
            _ => {
                crate::log_every!(1000, error, "skipping an undecodable relayed event");
                return Ok(());
            }
        };
        let seq = self.next_seq(w, user)?;
        match kind {
            Kind::Message(m) => {
                self.store.put_message(&mut w.batch, &m)?;
                let sent = Arc::new(Sent {
                    id: m.id,
                    from: Arc::from(m.from_user.as_str()),
                    group_id: m.group_id,
                    origin: None,
                });
                let conv = keys::conversation_of(m.group_id, user, &m.from_user);
                w.written_undo.set(&mut w.written, m.id, conv);
                self.append(w, user, seq, InboxEntry::Message(m.id), &event, Some(&sent))
            }
            Kind::Receipt(r) => {
                // The watermark lives with the reader's home; keep a copy
                // here so this user's GetReceipts sees it.
                if let Some(pb::Conversation {
                    kind: Some(pb::conversation::Kind::User(_)),
                }) = &r.conversation
                {
                    let conv = keys::conversation_of(0, user, &r.user);
                    let reader: Arc<str> = Arc::from(r.user.as_str());
                    let (d, rd) = self.watermarks(w, &conv, &reader)?;
                    let marks = if r.kind == ReceiptKind::Read as i32 {
                        (d.max(r.up_to), rd.max(r.up_to))
                    } else {
                        (d.max(r.up_to), rd)
                    };
                    if marks != (d, rd) {
                        self.set_watermarks(w, &conv, &reader, marks)?;
                    }
                }
                self.append(
                    w,
                    user,
                    seq,
                    InboxEntry::Inline(event.to_vec()),
                    &event,
                    None,
                )
            }
            _ => self.append(
                w,
                user,
                seq,
                InboxEntry::Inline(event.to_vec()),
                &event,
                None,
            ),
        }
    }
}

/// The answer to `o`, whose connection is on node `node`, relayed there
/// with this batch.
fn relay_answer(w: &mut Work, o: &Origin, node: u16, env: &Envelope) {
    w.writes += 1;
    w.relays.push((
        node,
        RelayEvent {
            user: o.user.to_string(),
            answer: Some(Answer {
                caller: Some(caller_of(o.reply)),
                envelope: Bytes::from(env.encode_to_vec()),
            }),
            ..RelayEvent::default()
        },
    ));
}

fn caller_of(c: ConnRef) -> Caller {
    Caller {
        shard: u32::from(c.shard),
        slot: c.slot,
        gen: c.gen,
        presence: c.presence(),
    }
}

/// An answer from a group's home for a connection of this node: sent once
/// the batch that applied it is written (a connection gone meanwhile, or
/// replaced in its slot, gets nothing: the generation differs).
fn deliver_answer(w: &mut Work, a: Answer) {
    let Some(c) = a.caller else { return };
    let Ok(env) = Envelope::decode(a.envelope.as_ref()) else {
        crate::log_every!(1000, error, "skipping an undecodable forwarded answer");
        return;
    };
    let conn = ConnRef {
        shard: u16::try_from(c.shard).unwrap_or(u16::MAX),
        slot: c.slot,
        gen: c.gen,
        kind: ConnKind::of_presence(c.presence),
    };
    w.answers.push((conn, std::time::Instant::now(), env));
}
