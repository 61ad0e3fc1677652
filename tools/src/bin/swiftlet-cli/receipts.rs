//! Receipt tracking: which of the user's own messages each reader has
//! (`✓✓`) or has read (`read`), and the order those marks reach the screen
//! relative to the `✓` of the send.
//!
//! The CLI learns the ids of its user's own messages from their own inbox
//! (every message a user sends is also an event of their inbox, ahead of any
//! receipt about it), so it tracks messages sent from other devices too. A
//! `Receipt{conversation, user, kind, up_to}` covers every tracked id
//! `<= up_to` of that conversation; each message is reported once per
//! recipient and kind: `✓` on the Ack, `✓✓` when delivered, `read` when read.
//! The Ack and a receipt travel different paths (the receipt follows the
//! recipient's `DeliveryAck`), so a receipt can arrive first: [`AckGate`]
//! holds it until the `✓` of the send it covers is shown.
//!
//! [`Conversations`] also keeps the newest message id seen in each
//! conversation: `/read` marks a conversation read up to it (a message id,
//! never beyond the conversation's newest, as the server requires).
//!
//! State only: no client and no printing (the words come from `render`), so
//! the tests below replay receipts and Acks in any order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use swiftlet_client::pb::{self, ReceiptKind};

use crate::render;
use crate::target::Target;

/// Own message ids remembered per conversation for receipts.
const TRACKED_PER_CONVERSATION: usize = 1000;

/// Who has each of the user's own messages, per conversation.
#[derive(Debug, Default)]
struct MessageMarks {
    delivered: BTreeSet<String>,
    read: BTreeSet<String>,
}

/// What the CLI remembers about conversations across reconnects: the newest
/// message id seen in each (for `/read`) and the user's own messages (for
/// receipts).
#[derive(Debug, Default)]
pub struct Conversations {
    newest: HashMap<Target, u64>,
    sent: HashMap<Target, BTreeMap<u64, MessageMarks>>,
}

impl Conversations {
    /// The newest message id seen in `conv`, the mark `/read` sends.
    pub fn newest(&self, conv: &Target) -> Option<u64> {
        self.newest.get(conv).copied()
    }

    /// Note a message of the inbox.
    pub fn on_message(&mut self, me: &str, m: &pb::Message) {
        let conv = Target::of_message(me, m);
        let newest = self.newest.entry(conv.clone()).or_default();
        *newest = (*newest).max(m.id);
        if m.from_user == me {
            let sent = self.sent.entry(conv).or_default();
            sent.entry(m.id).or_default();
            while sent.len() > TRACKED_PER_CONVERSATION {
                sent.pop_first();
            }
        }
    }

    /// The ids of own messages a receipt newly covers for its user.
    pub fn on_receipt(&mut self, conv: &Target, user: &str, read: bool, up_to: u64) -> Vec<u64> {
        let Some(sent) = self.sent.get_mut(conv) else {
            return Vec::new();
        };
        let mut newly = Vec::new();
        for (id, marks) in sent.range_mut(..=up_to) {
            let fresh_delivery = marks.delivered.insert(user.to_owned());
            let fresh = if read {
                marks.read.insert(user.to_owned())
            } else {
                fresh_delivery && !marks.read.contains(user)
            };
            if fresh {
                newly.push(*id);
            }
        }
        newly
    }
}

/// Keeps the display of this CLI's own sends in order: `✓` (the Ack)
/// before `✓✓` (delivered) before `read`.
///
/// The Ack answers the `Send`; a receipt is an inbox event that follows the
/// recipient's `DeliveryAck`, and the Ack's line is printed by the task that
/// sent. So a receipt can reach the screen before the Ack of a message it
/// covers. A receipt mark for a send of this CLI whose Ack has not been
/// shown is held here and shown right after that Ack's line (only the
/// highest mark per reader: `read` replaces a held `✓✓`). Sends from other
/// devices, or from before this CLI started, are never held: they have no
/// Ack to wait for.
#[derive(Debug, Default)]
pub struct AckGate {
    /// Sends of this CLI not acknowledged yet, by `client_msg_id`: the
    /// message id, once the user's own inbox has shown the message.
    unacked: HashMap<String, Option<u64>>,
    /// Receipt marks waiting for an Ack, by message id, in arrival order.
    held: HashMap<u64, Vec<HeldMark>>,
}

/// A receipt mark waiting for the Ack of the message it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldMark {
    mark: &'static str,
    whom: String,
}

impl AckGate {
    /// A send is on its way (again, for a retry).
    pub fn sending(&mut self, client_msg_id: &str) {
        self.unacked.entry(client_msg_id.to_owned()).or_default();
    }

    /// A message of the user's own inbox: if it is one of this CLI's sends
    /// still without an Ack, remember its id.
    pub fn stored(&mut self, client_msg_id: &str, id: u64) {
        if let Some(slot) = self.unacked.get_mut(client_msg_id) {
            *slot = Some(id);
        }
    }

    /// Hold `mark` by `whom` for message `id` if its Ack has not been shown;
    /// false when it may be shown now.
    fn hold(&mut self, id: u64, mark: &'static str, whom: &str) -> bool {
        if !self.unacked.values().any(|v| *v == Some(id)) {
            return false;
        }
        let held = self.held.entry(id).or_default();
        if held.iter().any(|h| h.whom == whom && h.mark == "read") {
            // Already holding the highest mark for this reader.
            return true;
        }
        if mark == "read" {
            held.retain(|h| h.whom != whom);
        }
        held.push(HeldMark {
            mark,
            whom: whom.to_owned(),
        });
        true
    }

    /// The send `client_msg_id` is done (its Ack was shown, or it failed for
    /// good): the lines held for it, to show now.
    pub fn release(&mut self, client_msg_id: &str) -> Vec<String> {
        let Some(Some(id)) = self.unacked.remove(client_msg_id) else {
            return Vec::new();
        };
        self.held
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .map(|h| render::receipt_marks(h.mark, &h.whom, &[id]))
            .collect()
    }
}

/// The gate, shared by the session loop (receipts) and the send tasks (Acks).
pub type SharedGate = Arc<Mutex<AckGate>>;

pub fn lock(gate: &SharedGate) -> std::sync::MutexGuard<'_, AckGate> {
    gate.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The line for a receipt on the user's own messages, if there is news to
/// show now (marks for sends whose Ack is not shown yet wait in `gate`).
pub fn render_receipt(
    marks: &mut Conversations,
    gate: &mut AckGate,
    me: &str,
    r: &pb::Receipt,
) -> Option<String> {
    if r.user == me {
        // Our own reads (from any device): nothing to show.
        return None;
    }
    let conv = Target::of(r.conversation.as_ref())?;
    let read = r.kind == ReceiptKind::Read as i32;
    let ids = marks.on_receipt(&conv, &r.user, read, r.up_to);
    let mark = if read { "read" } else { "✓✓" };
    let whom = render::receipt_reader(&conv, &r.user);
    if ids.is_empty() {
        // Messages this CLI never saw (sent before it started).
        return Some(render::receipt_up_to(mark, &whom, r.up_to));
    }
    let ids: Vec<u64> = ids
        .into_iter()
        .filter(|&id| !gate.hold(id, mark, &whom))
        .collect();
    if ids.is_empty() {
        return None;
    }
    Some(render::receipt_marks(mark, &whom, &ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::msg;
    use swiftlet_client::{with_group, with_user};

    fn user(u: &str) -> Target {
        Target::User(u.into())
    }

    fn receipt(conv: pb::Conversation, user: &str, kind: ReceiptKind, up_to: u64) -> pb::Receipt {
        pb::Receipt {
            conversation: Some(conv),
            user: user.into(),
            kind: kind as i32,
            up_to,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn receipts_cover_own_messages_up_to_the_watermark() {
        let mut c = Conversations::default();
        for id in [10, 20, 30] {
            c.on_message("alice", &msg(id, "alice", "bob", 0));
        }
        c.on_message("alice", &msg(25, "bob", "alice", 0));
        assert_eq!(c.newest.get(&user("bob")), Some(&30));
        // Bob's receipts name alice's 1:1 conversation as "alice" for him, and
        // as "bob" for alice, who receives them.
        let r = receipt(with_user("bob"), "bob", ReceiptKind::Delivered, 30);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r).as_deref(),
            Some("✓✓ bob (#10, #20, #30)")
        );
        let r = receipt(with_user("bob"), "bob", ReceiptKind::Read, 20);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r).as_deref(),
            Some("read bob (#10, #20)")
        );
        // Nothing new: a delivered receipt for what is already read.
        assert!(c.on_receipt(&user("bob"), "bob", false, 20).is_empty());
        // A receipt from before this CLI's time still says something.
        let r = receipt(with_user("carol"), "carol", ReceiptKind::Read, 5);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r).as_deref(),
            Some("read carol (everything up to #5)")
        );
        // Our own reads (another device) are not shown.
        let r = receipt(with_user("bob"), "alice", ReceiptKind::Read, 25);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r),
            None
        );
    }

    #[test]
    fn a_receipt_never_shows_before_the_ack_of_its_send() {
        let mut c = Conversations::default();
        let mut gate = AckGate::default();
        // #5 was acknowledged long ago; m1 (#10) and m2 (#20) are sent from
        // this CLI and reach alice's inbox, then bob's receipts covering
        // them arrive before either Ack.
        c.on_message("alice", &msg(5, "alice", "bob", 0));
        for (id, cmid) in [(10, "m1"), (20, "m2")] {
            gate.sending(cmid);
            let mut m = msg(id, "alice", "bob", 0);
            m.client_msg_id = cmid.into();
            c.on_message("alice", &m);
            gate.stored(cmid, id);
        }
        let r = receipt(with_user("bob"), "bob", ReceiptKind::Delivered, 20);
        assert_eq!(
            render_receipt(&mut c, &mut gate, "alice", &r).as_deref(),
            Some("✓✓ bob (#5)"),
            "no ✓✓ for a message whose ✓ is not shown"
        );
        // m2's Ack: its ✓✓ right after its ✓.
        assert_eq!(gate.release("m2"), vec!["✓✓ bob (#20)".to_owned()]);
        // Read overtakes m1's Ack too: only the highest mark is kept.
        let r = receipt(with_user("bob"), "bob", ReceiptKind::Read, 20);
        assert_eq!(
            render_receipt(&mut c, &mut gate, "alice", &r).as_deref(),
            Some("read bob (#5, #20)")
        );
        assert_eq!(gate.release("m1"), vec!["read bob (#10)".to_owned()]);
        assert!(gate.release("m1").is_empty(), "shown once");
        // An Ack ahead of the message's own event: nothing is held.
        gate.sending("m3");
        assert!(gate.release("m3").is_empty());
        let mut m = msg(30, "alice", "bob", 0);
        m.client_msg_id = "m3".into();
        c.on_message("alice", &m);
        gate.stored("m3", 30);
        let r = receipt(with_user("bob"), "bob", ReceiptKind::Delivered, 30);
        assert_eq!(
            render_receipt(&mut c, &mut gate, "alice", &r).as_deref(),
            Some("✓✓ bob (#30)")
        );
        // In a group, each member's mark waits for the Ack.
        gate.sending("g1");
        let mut m = msg(40, "alice", "", 7);
        m.client_msg_id = "g1".into();
        c.on_message("alice", &m);
        gate.stored("g1", 40);
        for who in ["bob", "carol"] {
            let r = receipt(with_group(7), who, ReceiptKind::Read, 40);
            assert_eq!(render_receipt(&mut c, &mut gate, "alice", &r), None);
        }
        assert_eq!(
            gate.release("g1"),
            vec![
                "read #7 by bob (#40)".to_owned(),
                "read #7 by carol (#40)".to_owned()
            ]
        );
    }

    #[test]
    fn group_receipts_are_per_member() {
        let mut c = Conversations::default();
        c.on_message("alice", &msg(10, "alice", "", 7));
        c.on_message("alice", &msg(11, "bob", "", 7));
        assert_eq!(c.newest.get(&Target::Group(7)), Some(&11));
        let r = receipt(with_group(7), "bob", ReceiptKind::Read, 11);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r).as_deref(),
            Some("read #7 by bob (#10)")
        );
        let r = receipt(with_group(7), "carol", ReceiptKind::Delivered, 10);
        assert_eq!(
            render_receipt(&mut c, &mut AckGate::default(), "alice", &r).as_deref(),
            Some("✓✓ #7 by carol (#10)")
        );
    }
}
