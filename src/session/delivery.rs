//! Where one connection stands in its user's inbox: the state machine behind
//! exactly-once, in-order delivery. No I/O, no clock: the shard feeds it
//! pushes (events the pipeline made durable), pages read from the store and
//! acknowledgements, and does what it answers.
//!
//! It rests on one number, `next_seq`, the seq the connection must be sent
//! next. A push is written only if it is exactly that event and there is
//! room; an older one is a duplicate (it was already sent, from a push or a
//! page) and is dropped; a newer one (a gap), or one that arrives without
//! room, makes the connection *lagging*: live pushes stop and the shard reads
//! the missing events from the store, in order, from `next_seq`, until a
//! page says nothing more is there. Because the pipeline pushes only what is
//! durable, and a connection is registered for pushes before its first
//! store read, an event is always either in a page read after it was
//! committed or in a push that arrives after that read: never lost, and
//! never sent twice, since both paths go through `next_seq`.
//!
//! A connection that asked for it (`Hello.skip_own_sends`) is not written
//! the messages it sent itself, when they come as live pushes in order: it
//! moves past them as if it had written them (the Ack told the client their
//! seqs). It still owes them to its device's cursor: when the device has
//! acknowledged everything written to it, such a message is acknowledged
//! for it at once ([`Push::Own`]); otherwise an acknowledgement of the last
//! event written extends over the own messages that followed it. A catch-up
//! from the store writes them like any event.
//!
//! It must never skip a seq or send one twice on one connection, other than
//! the connection's own messages when it asked for that; the property tests
//! below drive it through random interleavings against a simulated store
//! to check exactly that.

/// Why an acknowledgement is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("DeliveryAck beyond the last delivered event")]
    BeyondDelivered,
}

/// What to do with a pushed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Write it: it is the next event and there is room.
    Send,
    /// Already sent on this connection: drop it.
    Duplicate,
    /// It cannot be written now (a gap, or no room): the connection just
    /// started lagging and must be caught up from the store.
    StartCatchUp,
    /// The connection is catching up already: the event will come from the
    /// store.
    Skip,
    /// The connection's own message, which it asked not to be written:
    /// passed over. `acked` is the range `(after, up_to]` acknowledged for
    /// the device with it (everything written before was acknowledged).
    Own { acked: Option<(u64, u64)> },
}

/// One connection's place in its user's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// The seq this connection must be sent next.
    next_seq: u64,
    /// The highest seq the device acknowledged.
    acked: u64,
    /// Own messages passed over since the last event written (so the last
    /// one written is `next_seq - 1 - own_run`).
    own_run: u32,
    /// Live pushes are off; events come from the store.
    lagging: bool,
    /// Pass over this connection's own messages (`Hello.skip_own_sends`).
    skip_own: bool,
}

impl Delivery {
    /// A device logs in with its stored `cursor` while its user's newest
    /// inbox seq is `head`: everything after the cursor is owed, the
    /// backlog from the store.
    /// `skip_own`: pass over the connection's own messages.
    pub fn login(cursor: u64, head: u64, skip_own: bool) -> Self {
        Delivery {
            next_seq: cursor + 1,
            acked: cursor,
            own_run: 0,
            lagging: cursor < head,
            skip_own,
        }
    }

    /// The last seq written to the connection (or its login cursor).
    fn last_written(&self) -> u64 {
        self.next_seq - 1 - u64::from(self.own_run)
    }

    /// The seq to send next.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest seq acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Live pushes are off until a catch-up reaches the end of the inbox.
    pub fn lagging(&self) -> bool {
        self.lagging
    }

    /// Event `seq` was pushed; `room` says whether the connection's output
    /// has room for it now, `own` whether it is a message this connection
    /// sent.
    pub fn on_push(&mut self, seq: u64, room: bool, own: bool) -> Push {
        if seq < self.next_seq {
            Push::Duplicate
        } else if self.lagging {
            Push::Skip
        } else if seq == self.next_seq && own && self.skip_own && self.own_run < u32::MAX {
            let caught_up = self.acked >= self.last_written();
            self.next_seq += 1;
            self.own_run += 1;
            let acked = caught_up.then(|| {
                let after = self.acked;
                self.acked = seq;
                (after, seq)
            });
            Push::Own { acked }
        } else if seq == self.next_seq && room {
            self.next_seq += 1;
            self.own_run = 0;
            Push::Send
        } else {
            self.lagging = true;
            Push::StartCatchUp
        }
    }

    /// Where the next store page starts (the seq before the first wanted),
    /// while catching up.
    pub fn catch_up_after(&self) -> Option<u64> {
        self.lagging.then(|| self.next_seq - 1)
    }

    /// An event of a page read from the store after [`Self::catch_up_after`]
    /// is being sent. Pages come in seq order; the store may have gaps
    /// (retention), so `next_seq` follows the events, not a count.
    pub fn on_page_event(&mut self, seq: u64) {
        debug_assert!(seq >= self.next_seq, "pages start after next_seq");
        self.next_seq = seq + 1;
        self.own_run = 0;
    }

    /// The page ended; `has_more` says whether the store holds more events
    /// after it. At the end, live pushes resume.
    pub fn on_page_end(&mut self, has_more: bool) {
        if !has_more {
            self.lagging = false;
        }
    }

    /// The device acknowledged everything up to `up_to`. Returns the newly
    /// acknowledged range `(after, up_to]`, or `None` if it acknowledges
    /// nothing new. Acknowledging the last event written acknowledges the
    /// own messages passed over after it.
    pub fn on_ack(&mut self, up_to: u64) -> Result<Option<(u64, u64)>, AckError> {
        if up_to >= self.next_seq {
            return Err(AckError::BeyondDelivered);
        }
        let up_to = if up_to >= self.last_written() {
            self.next_seq - 1
        } else {
            up_to
        };
        if up_to <= self.acked {
            return Ok(None);
        }
        let after = self.acked;
        self.acked = up_to;
        Ok(Some((after, up_to)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn a_device_at_the_head_is_live_and_one_behind_catches_up() {
        let d = Delivery::login(5, 5, false);
        assert!(!d.lagging());
        let mut d = Delivery::login(2, 5, false);
        assert_eq!(d.catch_up_after(), Some(2));
        d.on_page_event(3);
        d.on_page_event(5);
        d.on_page_end(false);
        assert!(!d.lagging());
        assert_eq!(d.on_push(5, true, false), Push::Duplicate);
        assert_eq!(d.on_push(6, true, false), Push::Send);
        assert_eq!(d.on_push(8, true, false), Push::StartCatchUp);
        assert_eq!(d.on_push(9, true, false), Push::Skip);
    }

    #[test]
    fn acknowledgements_move_forward_only_and_never_past_what_was_sent() {
        let mut d = Delivery::login(0, 0, false);
        assert_eq!(d.on_push(1, true, false), Push::Send);
        assert_eq!(d.on_push(2, true, false), Push::Send);
        assert_eq!(d.on_ack(3), Err(AckError::BeyondDelivered));
        assert_eq!(d.on_ack(1), Ok(Some((0, 1))));
        assert_eq!(d.on_ack(1), Ok(None));
        assert_eq!(d.on_ack(2), Ok(Some((1, 2))));
    }

    /// One step of the simulated world.
    #[derive(Debug, Clone)]
    enum Step {
        /// The pipeline commits an event for the user (it goes into the
        /// store, and a push into the mailbox of the current connection);
        /// `own`: a message the current connection sent.
        Commit { own: bool },
        /// The shard takes up to `n` pushes from its mailbox; `room` is
        /// whether the output has room for each.
        TakePushes { n: usize, room: bool },
        /// The shard runs a catch-up page of at most `n` events.
        CatchUp { n: usize },
        /// The client acknowledges what it received, up to this fraction.
        Ack { per_mille: u16 },
        /// The device reconnects: a new connection logs in from the stored
        /// cursor; pushes meant for the old one are dropped (a new
        /// generation), and it is registered before its login reads.
        Reconnect,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(|own| Step::Commit { own }),
            4 => (1usize..6, any::<bool>()).prop_map(|(n, room)| Step::TakePushes { n, room }),
            2 => (1usize..8).prop_map(|n| Step::CatchUp { n }),
            2 => (0u16..=1000).prop_map(|per_mille| Step::Ack { per_mille }),
            1 => Just(Step::Reconnect),
        ]
    }

    /// The simulated store, mailbox and client of one device.
    struct World {
        /// Inbox seqs in the store: 1..=head.
        head: u64,
        /// The device's stored cursor.
        cursor: u64,
        /// The cursor the current connection logged in with.
        login_cursor: u64,
        conn: Delivery,
        /// Whether connections pass over their own messages.
        skip_own: bool,
        /// Pushes: (seq, sent by the current connection).
        mailbox: VecDeque<(u64, bool)>,
        /// What this connection wrote to the client, or passed over as its
        /// own, in order.
        received: Vec<u64>,
        /// Seqs written to the device on any connection, or passed over as
        /// the own message of the connection they were pushed to.
        known: std::collections::HashSet<u64>,
    }

    impl World {
        fn new(skip_own: bool) -> Self {
            World {
                head: 0,
                cursor: 0,
                login_cursor: 0,
                conn: Delivery::login(0, 0, skip_own),
                skip_own,
                mailbox: VecDeque::new(),
                received: Vec::new(),
                known: Default::default(),
            }
        }

        fn write(&mut self, seq: u64) {
            // Exactly once, in order, from the cursor on: each write is the
            // successor of the last one (or of the cursor at login).
            let expected = self.received.last().map_or(self.login_cursor, |s| *s) + 1;
            assert_eq!(seq, expected, "written out of order or twice");
            self.received.push(seq);
            self.known.insert(seq);
        }

        /// The device's cursor moves to `up_to`: never past an event the
        /// device was not written (its own messages aside).
        fn move_cursor(&mut self, up_to: u64) {
            assert!(up_to > self.cursor, "cursors only grow");
            for seq in 1..=up_to {
                assert!(self.known.contains(&seq), "the cursor skips {seq}");
            }
            self.cursor = up_to;
        }

        fn catch_up(&mut self, n: usize) {
            let Some(after) = self.conn.catch_up_after() else {
                return;
            };
            let last = self.head.min(after + n as u64);
            for seq in after + 1..=last {
                self.conn.on_page_event(seq);
                self.write(seq);
            }
            self.conn.on_page_end(last < self.head);
        }

        fn apply(&mut self, s: &Step) {
            match *s {
                Step::Commit { own } => {
                    self.head += 1;
                    self.mailbox.push_back((self.head, own));
                }
                Step::TakePushes { n, room } => {
                    for _ in 0..n {
                        let Some((seq, own)) = self.mailbox.pop_front() else {
                            break;
                        };
                        match self.conn.on_push(seq, room, own) {
                            Push::Send => self.write(seq),
                            Push::Own { acked } => {
                                assert!(own && self.skip_own, "only own messages pass");
                                self.write(seq);
                                if let Some((after, up_to)) = acked {
                                    assert_eq!(after, self.cursor);
                                    self.move_cursor(up_to);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Step::CatchUp { n } => self.catch_up(n),
                Step::Ack { per_mille } => {
                    // The client acknowledges some of what it was written
                    // (or told by an Ack).
                    let sent = self.received.last().copied().unwrap_or(self.login_cursor);
                    let acked = self.conn.acked().min(sent);
                    let up_to = acked + (sent - acked) * u64::from(per_mille) / 1000;
                    if let Ok(Some((_, up_to))) = self.conn.on_ack(up_to) {
                        self.move_cursor(up_to);
                    }
                }
                Step::Reconnect => {
                    self.mailbox.clear();
                    self.conn = Delivery::login(self.cursor, self.head, self.skip_own);
                    self.login_cursor = self.cursor;
                    self.received.clear();
                }
            }
        }

        /// Run until nothing is pending: every push taken, every catch-up
        /// done.
        fn settle(&mut self) {
            for _ in 0..10_000 {
                if self.mailbox.is_empty() && !self.conn.lagging() {
                    return;
                }
                self.apply(&Step::TakePushes { n: 16, room: true });
                self.catch_up(16);
            }
            panic!("never settled");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every connection writes its user's events exactly once, in seq
        /// order, starting right after its cursor, whatever the order of
        /// commits, pushes, full buffers, catch-ups, acks and reconnects;
        /// once nothing is pending it has written everything. With
        /// `skip_own`, the connection's own messages are passed over instead
        /// of written, and the cursor still never skips an event.
        #[test]
        fn exactly_once_in_order_across_any_interleaving(
            steps in proptest::collection::vec(step(), 1..200),
            skip_own in any::<bool>(),
        ) {
            let mut w = World::new(skip_own);
            for s in &steps {
                w.apply(s);
            }
            w.settle();
            let first = w.login_cursor + 1;
            let expected: Vec<u64> = (first..=w.head).collect();
            prop_assert_eq!(&w.received, &expected);
        }
    }
}
