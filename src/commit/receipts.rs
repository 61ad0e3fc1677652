//! Receipts: delivered (a device acknowledged its inbox up to a seq) and
//! read (MarkRead), as per-user watermarks in each conversation, and the
//! receipt events that tell the senders.
//!
//! Delivered receipts are worked out where the acknowledgement arrives:
//! the shards summarize what a device acknowledged per conversation
//! ([`add_delivered`], [`merge_delivered`], from what they sent it, or
//! [`summarize_delivered`] from the store), outside the pipeline's lock;
//! [`crate::cursors`] coalesces them per user and conversation until they
//! are due, and the pipeline only raises the watermarks and appends the
//! events, one per conversation for everything coalesced. A
//! watermark only grows, which filters out what another device of the same
//! user already acknowledged. In a group, delivered is a watermark only
//! (the sender asks with GetReceipts); read is also an event.
//!
//! This file must never lower a watermark, nor tell a user of a read of a
//! message that is not in the conversation named.

use std::sync::Arc;

use swiftlet_protocol::pb::{self, conversation, event::Kind, ReceiptKind};
use swiftlet_protocol::{Body, ErrorCode};

use super::group::{refuse, Fail, Pipeline, Work};
use super::Origin;
use crate::auth::valid_id;
use crate::store::keys;
use crate::store::{Store, StoreError};

/// Inbox events read at a time for delivered receipts, and group messages a
/// MarkRead looks at for the senders it tells.
const RECEIPT_SCAN: usize = 2_000;

/// What one acknowledgement covers in one conversation.
#[derive(Debug, Clone)]
pub struct DeliveredConv {
    /// The conversation's `status` key.
    pub key: Vec<u8>,
    /// The conversation as its senders see it.
    pub seen_as: pb::Conversation,
    /// The newest message id covered.
    pub newest: u64,
    /// Who sent the covered messages.
    pub senders: Vec<String>,
}

/// Read `user`'s inbox in `(after, up_to]` and summarize the messages from
/// others by conversation. The shards call it when they no longer hold what
/// a connection was sent (see `session::unacked`); it runs there, outside the
/// pipeline's lock. It reads [`RECEIPT_SCAN`] events at a time and keeps
/// only the summary, so its memory grows with the conversations, not the
/// events; the events are what was delivered to the device, which bounds
/// the work.
pub fn summarize_delivered(
    store: &Store,
    user: &str,
    after: u64,
    up_to: u64,
) -> Result<Vec<DeliveredConv>, StoreError> {
    let mut convs: Vec<DeliveredConv> = Vec::new();
    let mut after = after;
    while after < up_to {
        let limit = RECEIPT_SCAN.min(usize::try_from(up_to - after).unwrap_or(usize::MAX));
        let page = store.read_inbox(user, after, limit, usize::MAX)?;
        for ev in &page.events {
            if ev.seq > up_to {
                return Ok(convs);
            }
            if let Some(Kind::Message(m)) = &ev.kind {
                add_delivered(&mut convs, user, &m.from_user, m.group_id, m.id);
            }
        }
        match page.events.last() {
            Some(last) if page.has_more => after = last.seq,
            _ => break,
        }
    }
    Ok(convs)
}

/// Count message `id` from `from` (in group `group_id`, or direct when 0)
/// as delivered to `user`, in its conversation's entry of `convs`.
pub fn add_delivered(
    convs: &mut Vec<DeliveredConv>,
    user: &str,
    from: &str,
    group_id: u64,
    id: u64,
) {
    if from == user {
        return;
    }
    let seen_as = if group_id != 0 {
        group_conv(group_id)
    } else {
        direct(user)
    };
    merge_conv(
        convs,
        DeliveredConv {
            key: keys::conversation_of(group_id, user, from),
            seen_as,
            newest: id,
            senders: vec![from.to_owned()],
        },
    );
}

/// Fold `more` into `into`, one entry per conversation.
pub fn merge_delivered(into: &mut Vec<DeliveredConv>, more: Vec<DeliveredConv>) {
    for c in more {
        merge_conv(into, c);
    }
}

/// Fold one conversation's entry into `into`: the newer watermark, the
/// union of the senders.
fn merge_conv(into: &mut Vec<DeliveredConv>, c: DeliveredConv) {
    match into.iter_mut().find(|x| x.key == c.key) {
        Some(x) => {
            x.newest = x.newest.max(c.newest);
            for s in c.senders {
                if !x.senders.contains(&s) {
                    x.senders.push(s);
                }
            }
        }
        None => into.push(c),
    }
}

pub(super) fn direct(user: &str) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::User(user.to_owned())),
    }
}

fn group_conv(id: u64) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::GroupId(id)),
    }
}

fn receipt(
    conversation: pb::Conversation,
    user: &str,
    kind: ReceiptKind,
    up_to: u64,
    timestamp_ms: u64,
) -> Kind {
    Kind::Receipt(pb::Receipt {
        conversation: Some(conversation),
        user: user.to_owned(),
        kind: kind as i32,
        up_to,
        timestamp_ms,
    })
}

impl Pipeline {
    pub(super) fn watermarks(
        &self,
        w: &Work,
        conv: &[u8],
        user: &Arc<str>,
    ) -> Result<(u64, u64), StoreError> {
        match w.marks.get(&(conv.to_vec(), user.clone())) {
            Some(m) => Ok(*m),
            None => self.store.watermarks(conv, user),
        }
    }

    pub(super) fn set_watermarks(
        &self,
        w: &mut Work,
        conv: &[u8],
        user: &Arc<str>,
        marks: (u64, u64),
    ) -> Result<(), StoreError> {
        self.store
            .put_watermarks(&mut w.batch, conv, user, marks.0, marks.1)?;
        w.writes += 1;
        w.marks_undo
            .set(&mut w.marks, (conv.to_vec(), user.clone()), marks);
        Ok(())
    }

    pub(super) fn mark_read(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::MarkRead,
    ) -> Result<Option<Body>, Fail> {
        let (conv, group, peer) = match req.conversation.and_then(|c| c.kind) {
            Some(conversation::Kind::User(peer)) if valid_id(&peer) => {
                (keys::direct_conversation(&o.user, &peer), None, Some(peer))
            }
            Some(conversation::Kind::GroupId(id)) => {
                let g = self.member_group(id, &o.user)?;
                (keys::group_conversation(id), Some(g), None)
            }
            _ => {
                return refuse(
                    ErrorCode::InvalidRequest,
                    "MarkRead needs a conversation (a user or a group)",
                )
            }
        };
        // up_to must name a message of this conversation: that refuses a
        // watermark beyond the newest message without keeping a per-post
        // "newest" record.
        let up_to_conv = match w.written.get(&req.up_to) {
            Some(c) => Some(c.clone()),
            None => self.store.message_conversation(req.up_to)?,
        };
        if up_to_conv.as_deref() != Some(conv.as_slice()) {
            return refuse(
                ErrorCode::InvalidRequest,
                "up_to is not a message of this conversation",
            );
        }
        let (delivered, read) = self.watermarks(w, &conv, &o.user)?;
        if req.up_to <= read {
            return Ok(Some(Body::Done(pb::Done {})));
        }
        // Who learns of it: the senders of what this covers, and the reader's
        // own devices (so they clear their unread state too).
        let (to_senders, senders_conv): (Vec<Arc<str>>, pb::Conversation) = match (&group, &peer) {
            (Some(g), _) => {
                let senders = self
                    .store
                    .group_senders(g.id, read, req.up_to, RECEIPT_SCAN)?;
                (
                    senders
                        .into_iter()
                        .filter(|s| *s != *o.user)
                        .map(Arc::from)
                        .collect(),
                    group_conv(g.id),
                )
            }
            (None, Some(peer)) => (
                if *peer == *o.user {
                    Vec::new()
                } else {
                    vec![Arc::from(peer.as_str())]
                },
                direct(&o.user),
            ),
            (None, None) => return refuse(ErrorCode::InvalidRequest, "no conversation"),
        };
        let own_conv = match (&group, &peer) {
            (Some(g), _) => group_conv(g.id),
            (_, Some(peer)) => direct(peer),
            _ => direct(&o.user),
        };
        self.append_inline(
            w,
            &to_senders,
            receipt(
                senders_conv,
                &o.user,
                ReceiptKind::Read,
                req.up_to,
                self.clock.now_ms(),
            ),
        )?;
        self.append_inline(
            w,
            std::slice::from_ref(&o.user),
            receipt(
                own_conv,
                &o.user,
                ReceiptKind::Read,
                req.up_to,
                self.clock.now_ms(),
            ),
        )?;
        self.set_watermarks(w, &conv, &o.user, (delivered.max(req.up_to), req.up_to))?;
        Ok(Some(Body::Done(pb::Done {})))
    }

    /// Raise `user`'s delivered watermarks to what a device acknowledged,
    /// and tell the senders where that is news (the watermark filters out
    /// what another device of the user already acknowledged).
    pub(super) fn delivered(
        &mut self,
        w: &mut Work,
        user: &Arc<str>,
        convs: Vec<DeliveredConv>,
    ) -> Result<(), StoreError> {
        for c in convs {
            let (delivered, read) = self.watermarks(w, &c.key, user)?;
            if c.newest <= delivered {
                continue;
            }
            // In a group, delivered is kept as the watermark only (the
            // sender asks with GetReceipts): an event per member per post
            // would make each post to M members cost M more inbox writes
            // and M more pushes to the sender. Read stays an event (a
            // user's action, far rarer than deliveries).
            if !matches!(c.seen_as.kind, Some(conversation::Kind::GroupId(_))) {
                let senders: Vec<Arc<str>> = c.senders.into_iter().map(Arc::from).collect();
                self.append_inline(
                    w,
                    &senders,
                    receipt(
                        c.seen_as,
                        user,
                        ReceiptKind::Delivered,
                        c.newest,
                        self.clock.now_ms(),
                    ),
                )?;
            }
            self.set_watermarks(w, &c.key, user, (c.newest, read))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::InboxEntry;
    use crate::store::StoreOptions;

    /// A store in a temporary directory.
    struct Harness {
        store: Store,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
            Harness { store, _dir: dir }
        }
    }

    #[test]
    fn a_delivery_ack_of_more_than_a_page_of_events_summarizes_them_all() {
        let h = Harness::new();
        let n = RECEIPT_SCAN as u64 + 500;
        // Bob's inbox: from alice until the last acknowledged event, from
        // carol that one, from dave one past it.
        let mut b = h.store.batch();
        for seq in 1..=n + 1 {
            let from = match seq {
                s if s < n => "alice",
                s if s == n => "carol",
                _ => "dave",
            };
            let msg = pb::Message {
                id: 1000 + seq,
                from_user: from.into(),
                to_user: "bob".into(),
                ..Default::default()
            };
            h.store.put_message(&mut b, &msg).expect("put");
            h.store
                .put_inbox(&mut b, "bob", seq, InboxEntry::Message(msg.id))
                .expect("put");
        }
        h.store.commit(b).expect("commit");

        let convs = summarize_delivered(&h.store, "bob", 0, n).expect("summarize");
        let newest = |peer: &str| {
            let key = keys::direct_conversation("bob", peer);
            convs.iter().find(|c| c.key == key).map(|c| c.newest)
        };
        assert_eq!(newest("alice"), Some(1000 + n - 1));
        assert_eq!(newest("carol"), Some(1000 + n));
        assert_eq!(newest("dave"), None, "past the acknowledged range");
        assert_eq!(convs.len(), 2);
    }
}
