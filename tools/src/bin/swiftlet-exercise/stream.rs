//! One device's delivered stream, checked event by event against what the
//! protocol promises (protocol/README.md section 7, "The cursor" and
//! "Delivery"). Pure data, no I/O, so its edge cases are unit-tested here.
//!
//! What a device may see, and what this checks:
//! - **Within a connection** seqs start at `Welcome.cursor + 1` and rise by
//!   exactly one per `Deliver`. In the crash rounds the server keeps every
//!   event (`--inbox-keep 0 --inbox-max-age 0`); in the soak retention runs
//!   with its defaults, but a device is never away long enough to fall
//!   behind what it trims, so there too any jump is a gap.
//! - **Across connections** a device resumes after `Welcome.cursor`, which
//!   never exceeds the highest `DeliveryAck.up_to` it sent (a cursor above
//!   it would skip events). After a clean logout (every event acknowledged,
//!   a Ping answered after the ack, no server crash since) the cursor is
//!   exactly that acknowledgement: a login sees every acknowledged cursor.
//!   After a `kill -9` it may be older (cursors are written within a
//!   second), so the device sees events again: a **replay**, always the
//!   first events of the new connection, since seqs rise by one from the
//!   cursor.
//! - **A replayed seq names the same event** as when it was first seen.
//!   The protocol only promises that within one inbox epoch, and a
//!   `kill -9` changes the epoch; but a `kill -9` loses nothing durable and
//!   nothing is pushed before it is durable, so no seq a device was shown
//!   can be reused. Checking identity across the crash is the sharp test of
//!   "nothing acknowledged lost" from the device's side (after a power
//!   loss it would not hold, nor would the protocol promise it).
//!
//! Events are remembered as a 64-bit fingerprint per seq (the encoded
//! event without its seq), so a 30-minute soak's streams fit in memory and
//! are compared with the inbox pages read by [`crate::verify`].

use std::hash::{Hash, Hasher};

use prost::Message as _;
use swiftlet_client::pb;

/// At most this many violation texts are kept per device (all are counted).
const KEPT_VIOLATIONS: usize = 20;

/// A fingerprint of an event's content (everything but its seq); never 0.
pub fn fingerprint(event: &pb::Event) -> u64 {
    let mut e = event.clone();
    e.seq = 0;
    // SipHash with fixed keys: the same bytes give the same value in every
    // run, so a mismatch is a different event, not a different hasher.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    e.encode_to_vec().hash(&mut h);
    h.finish().max(1)
}

/// How the previous connection of this device ended, as the next Welcome
/// must be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// First login of this device.
    First,
    /// Clean logout: `up_to` was acknowledged and confirmed by a Ping, and
    /// the server was not killed since. The cursor must be exactly `up_to`.
    Exact { up_to: u64 },
    /// The connection was lost (server killed, or dropped without a final
    /// acknowledgement): the cursor may be anything up to what was acked.
    AtMostAcked,
}

/// The checked record of one device's deliveries.
#[derive(Debug, Default)]
pub struct Stream {
    /// Fingerprint of each seq seen (index seq - 1); 0 = never seen.
    seen: Vec<u64>,
    /// Next seq expected on the current connection.
    next: u64,
    /// Highest `up_to` this device has sent in a DeliveryAck.
    acked: u64,
    pub delivered: u64,
    pub replayed: u64,
    pub connections: u64,
    violations: u64,
    kept: Vec<String>,
}

impl Stream {
    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.kept.len() < KEPT_VIOLATIONS {
            self.kept.push(what);
        }
    }

    /// A new connection's Welcome.
    pub fn on_welcome(&mut self, cursor: u64, resume: Resume) {
        self.connections += 1;
        if cursor > self.acked {
            self.violation(format!(
                "Welcome.cursor {cursor} is above the highest acknowledged seq {} (events would be skipped)",
                self.acked
            ));
        }
        if let Resume::Exact { up_to } = resume {
            if cursor != up_to {
                self.violation(format!(
                    "after a clean logout at {up_to} with no crash, Welcome.cursor is {cursor}"
                ));
            }
        }
        if resume == Resume::First && cursor != 0 {
            self.violation(format!("a new device got Welcome.cursor {cursor}"));
        }
        self.next = cursor + 1;
    }

    /// One delivered event. Returns true when it was seen before (a replay).
    pub fn on_event(&mut self, event: &pb::Event) -> bool {
        let seq = event.seq;
        if seq != self.next {
            self.violation(format!(
                "expected seq {} on this connection, got {seq} ({})",
                self.next,
                if seq > self.next {
                    "a gap"
                } else {
                    "out of order or duplicate"
                }
            ));
        }
        self.next = seq + 1;
        self.delivered += 1;
        let fp = fingerprint(event);
        let Some(i) = usize::try_from(seq).ok().and_then(|s| s.checked_sub(1)) else {
            self.violation("an event with seq 0".to_owned());
            return false;
        };
        if i >= self.seen.len() {
            self.seen.resize(i + 1, 0);
        }
        match self.seen[i] {
            0 => {
                self.seen[i] = fp;
                false
            }
            old => {
                self.replayed += 1;
                if old != fp {
                    self.violation(format!("seq {seq} came again as a different event"));
                }
                true
            }
        }
    }

    /// The last seq delivered on the current connection: what it may ack.
    pub fn last_on_connection(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    /// Record a DeliveryAck sent for `up_to`.
    pub fn on_ack(&mut self, up_to: u64) {
        self.acked = self.acked.max(up_to);
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Every seq up to this has been seen.
    pub fn contiguous(&self) -> u64 {
        self.seen.iter().take_while(|&&f| f != 0).count() as u64
    }

    /// Compare with the user's inbox: `inbox[i]` is the fingerprint of seq
    /// `first + i` (retention removed the seqs below `first`). Every seq
    /// this device saw that the inbox still holds must be the inbox's event
    /// at that seq, and the device must have seen every seq up to
    /// `must_reach`.
    pub fn check_against(&mut self, inbox: &[u64], first: u64, must_reach: u64) {
        let contiguous = self.contiguous();
        if contiguous < must_reach {
            self.violation(format!(
                "saw seqs 1..={contiguous} but the inbox reached {must_reach} before the check"
            ));
        }
        let mut wrong = Vec::new();
        for (seq, &fp) in (1u64..).zip(self.seen.iter()) {
            if fp == 0 || seq < first {
                continue;
            }
            let held = usize::try_from(seq - first).ok().and_then(|i| inbox.get(i));
            match held {
                Some(&f) if f == fp => {}
                Some(_) => wrong.push(format!("seq {seq} differs from the inbox")),
                None => wrong.push(format!("seq {seq} is not in the inbox")),
            }
        }
        for w in wrong {
            self.violation(w);
        }
    }

    pub fn violations(&self) -> u64 {
        self.violations
    }

    pub fn violation_texts(&self) -> &[String] {
        &self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, id: u64) -> pb::Event {
        pb::Event {
            seq,
            kind: Some(pb::event::Kind::Message(pb::Message {
                id,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_clean_stream_has_no_violations() {
        let mut s = Stream::default();
        s.on_welcome(0, Resume::First);
        for q in 1..=3 {
            assert!(!s.on_event(&msg(q, 100 + q)));
        }
        s.on_ack(3);
        s.on_welcome(3, Resume::Exact { up_to: 3 });
        assert!(!s.on_event(&msg(4, 104)));
        s.check_against(
            &[msg(1, 101), msg(2, 102), msg(3, 103), msg(4, 104)].map(|e| fingerprint(&e)),
            1,
            4,
        );
        // Retention removed seqs 1 and 2: the rest still match.
        s.check_against(&[msg(3, 103), msg(4, 104)].map(|e| fingerprint(&e)), 3, 4);
        assert_eq!(s.violations(), 0, "{:?}", s.violation_texts());
        assert_eq!((s.delivered, s.replayed, s.contiguous()), (4, 0, 4));
    }

    #[test]
    fn a_replay_after_a_crash_is_allowed_when_it_is_the_same_event() {
        let mut s = Stream::default();
        s.on_welcome(0, Resume::First);
        for q in 1..=4 {
            s.on_event(&msg(q, q));
        }
        s.on_ack(2);
        s.on_welcome(1, Resume::AtMostAcked);
        assert!(s.on_event(&msg(2, 2)));
        assert!(s.on_event(&msg(3, 3)));
        assert_eq!(s.violations(), 0);
        assert!(s.on_event(&msg(4, 99)), "a replay");
        assert_eq!(s.violations(), 1, "seq 4 now names another event");
    }

    #[test]
    fn gaps_skips_and_wrong_cursors_are_violations() {
        let mut s = Stream::default();
        s.on_welcome(0, Resume::First);
        s.on_event(&msg(1, 1));
        s.on_event(&msg(3, 3));
        assert_eq!(s.violations(), 1, "gap within a connection");
        s.on_ack(1);
        s.on_welcome(2, Resume::AtMostAcked);
        assert_eq!(s.violations(), 2, "cursor above the ack skips");
        s.on_welcome(0, Resume::Exact { up_to: 1 });
        assert_eq!(s.violations(), 3, "clean logout must resume exactly");
        s.on_event(&msg(1, 1));
        s.on_event(&msg(1, 1));
        assert_eq!(s.violations(), 4, "a duplicate within a connection");
        s.check_against(&[fingerprint(&msg(1, 1))], 1, 1);
        assert_eq!(s.violations(), 5, "seq 3 is not in the inbox");
        s.check_against(&[fingerprint(&msg(1, 1)), 7, fingerprint(&msg(3, 3))], 1, 3);
        assert_eq!(s.violations(), 6, "seq 2 never seen");
    }
}
