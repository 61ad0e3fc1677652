//! The messages each connection was sent and has not acknowledged yet: who
//! sent each one and in which conversation, kept so that a DeliveryAck's
//! delivered receipts are worked out from memory instead of by reading the
//! acknowledged range of the inbox back from the store.
//!
//! A busy chat has about as many delivered receipts as messages, so that
//! read (an iterator over the inbox range, then the messages it references)
//! was one of the largest costs of a delivery. The shard knows the answer
//! already: it wrote those messages to the socket a moment earlier. Each
//! [`Push`](crate::hub::mailbox::Push) of a message carries a shared [`Sent`], and
//! the catch-up path records what it reads from the store.
//!
//! Only connections with messages in flight have an entry, so an idle
//! connection costs nothing here. An entry holds at most [`MAX_UNACKED`]
//! messages; past that (a device that never acknowledges) the oldest are
//! dropped and the entry remembers up to which seq it is incomplete, and an
//! acknowledgement reaching into that part falls back to the store read.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::hub::mailbox::Sent;

/// Most unacknowledged messages remembered per connection.
pub const MAX_UNACKED: usize = 512;

struct Entry {
    gen: u32,
    /// `(seq, message)` in seq order.
    sent: VecDeque<(u64, Arc<Sent>)>,
    /// Messages up to this seq may be missing from `sent`.
    incomplete_to: u64,
}

/// Per-shard map from connection slot to its unacknowledged messages.
#[derive(Default)]
pub struct Unacked {
    conns: HashMap<u32, Entry>,
}

impl Unacked {
    /// Connection `(slot, gen)` was sent message `sent` at inbox `seq`.
    pub fn record(&mut self, slot: u32, gen: u32, seq: u64, sent: Arc<Sent>) {
        let e = self.conns.entry(slot).or_insert_with(|| Entry {
            gen,
            sent: VecDeque::new(),
            incomplete_to: 0,
        });
        if e.gen != gen {
            // A previous connection in this slot that was not forgotten.
            *e = Entry {
                gen,
                sent: VecDeque::new(),
                incomplete_to: 0,
            };
        }
        if e.sent.len() >= MAX_UNACKED {
            if let Some((dropped, _)) = e.sent.pop_front() {
                e.incomplete_to = e.incomplete_to.max(dropped);
            }
        }
        e.sent.push_back((seq, sent));
    }

    /// Connection `(slot, gen)` acknowledged `(after, up_to]`: the messages
    /// of that range, or `None` if some may be missing (read the store).
    pub fn take(&mut self, slot: u32, gen: u32, after: u64, up_to: u64) -> Option<Vec<Arc<Sent>>> {
        let Some(e) = self.conns.get_mut(&slot).filter(|e| e.gen == gen) else {
            // Nothing was recorded since this connection logged in: it was
            // sent no message in the range.
            return Some(Vec::new());
        };
        let mut out = Vec::new();
        while let Some((seq, _)) = e.sent.front() {
            if *seq > up_to {
                break;
            }
            if let Some((_, s)) = e.sent.pop_front() {
                out.push(s);
            }
        }
        let complete = after >= e.incomplete_to;
        if e.sent.is_empty() && up_to >= e.incomplete_to {
            self.conns.remove(&slot);
        }
        complete.then_some(out)
    }

    /// The connection in `slot` is gone.
    pub fn forget(&mut self, slot: u32) {
        self.conns.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(id: u64) -> Arc<Sent> {
        Arc::new(Sent {
            id,
            from: Arc::from("alice"),
            group_id: 0,
            origin: None,
        })
    }

    fn ids(v: Option<Vec<Arc<Sent>>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|s| s.id).collect())
    }

    #[test]
    fn an_ack_takes_the_messages_it_covers() {
        let mut u = Unacked::default();
        for seq in 1..=5 {
            u.record(7, 1, seq, sent(100 + seq));
        }
        assert_eq!(ids(u.take(7, 1, 0, 3)), Some(vec![101, 102, 103]));
        assert_eq!(ids(u.take(7, 1, 3, 5)), Some(vec![104, 105]));
        assert!(u.conns.is_empty(), "an entry goes when all is acknowledged");
        assert_eq!(ids(u.take(7, 1, 5, 6)), Some(vec![]));
    }

    #[test]
    fn a_slot_reused_by_another_connection_starts_afresh() {
        let mut u = Unacked::default();
        u.record(7, 1, 1, sent(1));
        u.record(7, 2, 4, sent(4));
        assert_eq!(ids(u.take(7, 2, 3, 4)), Some(vec![4]));
        u.record(7, 3, 9, sent(9));
        assert_eq!(ids(u.take(7, 2, 4, 9)), Some(vec![]), "another generation");
    }

    #[test]
    fn past_the_cap_the_dropped_range_reads_the_store() {
        let mut u = Unacked::default();
        let n = MAX_UNACKED as u64 + 10;
        for seq in 1..=n {
            u.record(1, 1, seq, sent(seq));
        }
        assert_eq!(u.take(1, 1, 0, 5).map(|v| v.len()), None);
        // The part still held is complete.
        assert_eq!(ids(u.take(1, 1, 10, 12)), Some(vec![11, 12]));
        assert_eq!(u.take(1, 1, 12, n).map(|v| v.len()), Some(n as usize - 12));
        assert!(u.conns.is_empty());
    }
}
