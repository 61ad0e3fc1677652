//! One group commit: the commands a combiner took from the queue, applied
//! in order into one batch, written once, then answered and pushed.
//!
//! Each request runs from a savepoint in the group's [`Work`] and is rolled
//! back to it when it is refused or a store read fails midway (see
//! [`crate::txn`]): it leaves no writes in the batch, no answers, no pushes
//! and no reserved inbox seqs, and a later request of the same group takes
//! the seqs it would have had. An acknowledgement's cursor stands when its
//! delivered receipts fail; those are rolled back alone.
//!
//! The failure policy of the write: if it fails, every answer of the group
//! becomes `STORE_UNAVAILABLE`, nothing is pushed, and the cached inbox
//! heads and groups are dropped so they are re-read from the store. Answers
//! and pushes go to [`Outbox`] only after the write returned, so nothing is
//! acknowledged or pushed before it is in the write-ahead log. A failed
//! write (a full disk) makes the store refuse every commit until it has
//! recovered by itself, in the background (`crate::store`'s `engine`): the
//! pipeline keeps answering `STORE_UNAVAILABLE`, at once and without a
//! retry of its own, and writes again as soon as the store does. The
//! store logs the outage once at each end; this file adds at most one line
//! a minute.
//!
//! This file owns the loop, the transaction and the write; what each
//! request does lives with its family (`sends`, `groups`, `receipts`,
//! `presence`). It must never answer or push a request's result before the
//! batch holding it is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use swiftlet_protocol::pb;
use swiftlet_protocol::{Body, Envelope, ErrorCode};

use super::combine::Committer;
use super::relay::{RelayState, Routes};
use super::seqs::Heads;
use super::{CommitCmd, Op, Origin, MAX_GROUP};
use crate::clock::Clock;
use crate::cluster::handoff::RelayEvent;
use crate::cluster::{Home, Partition};
use crate::cursors::{Cursors, Due};
use crate::groups::GroupDirectory;
use crate::hub::fanout::Outbox;
use crate::hub::mailbox::Sent;
use crate::hub::registry::{ConnRef, Registry};
use crate::ids::IdGen;
use crate::metrics::Metrics;
use crate::store::{Batch, Store, StoreError};
use crate::txn::Undo;

/// Why a request was not applied.
pub(super) enum Fail {
    Refuse(ErrorCode, String),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

pub(super) fn refuse<T>(code: ErrorCode, why: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Refuse(code, why.into()))
}

/// An event to push once the batch holding it is durable.
pub(super) struct Pending {
    pub(super) user: Arc<str>,
    pub(super) seq: u64,
    /// `Event { seq: 0, kind }` encoded, shared by every recipient.
    pub(super) event: Bytes,
    /// For a message: what its delivered receipts need.
    pub(super) sent: Option<Arc<Sent>>,
}

/// What one group of commands produces.
///
/// A request changes it, and the pipeline's inbox heads, only in ways a
/// [`Savepoint`] can take back: by appending to its lists, and by setting
/// keys through the `*_undo` logs, which hold the running request's changes.
#[derive(Default)]
pub(super) struct Work {
    pub(super) batch: Batch,
    /// Answers sent only if the batch commits.
    pub(super) answers: Vec<(ConnRef, Instant, Envelope)>,
    pub(super) pushes: Vec<Pending>,
    pub(super) writes: usize,
    /// Retries landing in the same group as their original.
    pub(super) fresh: HashMap<(Arc<str>, String), pb::Ack>,
    pub(super) fresh_undo: Undo<(Arc<str>, String), pb::Ack>,
    /// Conversation of each message written in this group.
    pub(super) written: HashMap<u64, Vec<u8>>,
    pub(super) written_undo: Undo<u64, Vec<u8>>,
    /// Watermarks written in this group.
    pub(super) marks: HashMap<(Vec<u8>, Arc<str>), (u64, u64)>,
    pub(super) marks_undo: Undo<(Vec<u8>, Arc<str>), (u64, u64)>,
    /// Seqs reserved in [`Pipeline::heads`] by the running request.
    pub(super) heads_undo: Undo<Arc<str>, u64>,
    /// What goes to other nodes with this batch: (node, what).
    pub(super) relays: Vec<(u16, RelayEvent)>,
    /// Hand-off entries applied in this group: who waits for the mark,
    /// the source, the mark before and after.
    pub(super) applied: Vec<(Sender<u64>, u16, u64, u64)>,
    /// Partitions taken over in this group (a move's tail applied), with
    /// the home they had before: put back if the batch is not written.
    pub(super) taken: Vec<(Partition, Home)>,
}

/// Where a request began in its group's [`Work`]: rolling back to it takes
/// the request back entirely (see [`crate::txn`]).
#[derive(Clone, Copy)]
pub(super) struct Savepoint {
    ops: usize,
    answers: usize,
    pushes: usize,
    writes: usize,
    relays: usize,
}

impl Work {
    /// Begin a request (or the part of one that may fail alone): what the
    /// requests before did is kept for good.
    pub(super) fn savepoint(&mut self) -> Savepoint {
        self.fresh_undo.forget();
        self.written_undo.forget();
        self.marks_undo.forget();
        self.heads_undo.forget();
        Savepoint {
            ops: self.batch.len(),
            answers: self.answers.len(),
            pushes: self.pushes.len(),
            writes: self.writes,
            relays: self.relays.len(),
        }
    }

    /// Take back everything done since `sp`, in this work and in `heads`
    /// (the pipeline's inbox heads).
    pub(super) fn rollback(&mut self, sp: Savepoint, heads: &mut Heads) {
        self.batch.truncate(sp.ops);
        self.answers.truncate(sp.answers);
        self.pushes.truncate(sp.pushes);
        self.relays.truncate(sp.relays);
        self.writes = sp.writes;
        self.fresh_undo.rollback(&mut self.fresh);
        self.written_undo.rollback(&mut self.written);
        self.marks_undo.rollback(&mut self.marks);
        self.heads_undo.rollback(heads);
    }
}

/// The pipeline's state: what the lock holder of [`super::combine`]
/// commits with.
pub(super) struct Pipeline {
    pub(super) store: Arc<Store>,
    pub(super) registry: Arc<Registry>,
    pub(super) groups: Arc<GroupDirectory>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cursors: Arc<Cursors>,
    pub(super) outbox: Outbox,
    pub(super) ids: IdGen,
    /// Timestamps and ids read the time here only.
    pub(super) clock: Clock,
    pub(super) max_group_members: usize,
    /// Newest inbox seq of recently written users, so an append needs no
    /// store read.
    pub(super) heads: Heads,
    /// On a cluster node: where users' homes are, and the hand-off.
    pub(super) routes: Option<Routes>,
    pub(super) relay: RelayState,
}

impl Committer for Pipeline {
    type Item = CommitCmd;
    const MAX_GROUP: usize = MAX_GROUP;

    fn commit(&mut self, group: &mut Vec<CommitCmd>, own: Option<usize>) {
        // A step of a partition move sits between two groups: what came
        // before it is written first, what comes after in a later batch.
        while let Some(i) = group.iter().position(|c| matches!(c, CommitCmd::Move(_))) {
            let mut rest = group.split_off(i);
            let step = rest.remove(0);
            self.commit_group(group, own);
            if let CommitCmd::Move(step) = step {
                self.move_step(step);
            }
            *group = rest;
        }
        self.commit_group(group, own);
    }
}

impl Pipeline {
    fn commit_group(&mut self, group: &mut Vec<CommitCmd>, own: Option<usize>) {
        let mut w = Work::default();
        let mut write_all_cursors = false;
        for cmd in group.drain(..) {
            let sp = w.savepoint();
            match cmd {
                CommitCmd::Move(step) => {
                    // `commit` takes these out of the group.
                    self.move_step(step);
                }
                CommitCmd::Request(origin, _) if !self.may_write_for(&origin.user) => {
                    // Fenced, or the user's partition moved away: another
                    // node may be writing for them now.
                    self.answer_now(
                        &mut w,
                        &origin,
                        Envelope::error(
                            origin.request_id,
                            ErrorCode::Unavailable,
                            "this node may not write for this user now; reconnect and retry",
                            false,
                        ),
                    );
                }
                CommitCmd::Apply {
                    src,
                    first,
                    entries,
                    done,
                } => {
                    let taken = w.taken.len();
                    let result = if self.writable() {
                        self.apply_handoff(&mut w, src, first, &entries)
                    } else {
                        // Fenced: apply nothing, report what stands.
                        self.store.applied(src).map(|a| (a, a))
                    };
                    match result {
                        Ok((old, new)) => w.applied.push((done, src, old, new)),
                        Err(e) => {
                            crate::log_every!(1000, error, error = %e, "applying a hand-off failed");
                            w.rollback(sp, &mut self.heads);
                            self.give_back(&mut w, taken);
                            // Forwarded requests inside it took savepoints
                            // of their own: drop every cache that may hold
                            // what was rolled back.
                            self.heads.clear();
                            self.groups.clear();
                            self.relay.clear();
                            // No answer: the applier retries.
                            drop(done);
                        }
                    }
                }
                CommitCmd::Request(origin, op) => match self.group_home_elsewhere(&op) {
                    // The group's home is its one writer: it applies the
                    // request and answers through the hand-off.
                    Some(home) => self.forward(&mut w, &origin, op, home),
                    None => self.run_request(&mut w, sp, &origin, op),
                },
                CommitCmd::WriteCursors { all } => write_all_cursors |= all,
                CommitCmd::LastSeen { user, .. } if !self.may_write_for(&user) => {}
                CommitCmd::LastSeen { user, at_ms } => {
                    if let Err(e) = self.last_seen(&mut w, &user, at_ms) {
                        crate::log_every!(1000, error, error = %e, "last-seen update failed");
                        w.rollback(sp, &mut self.heads);
                    }
                }
            }
        }

        // The acknowledgements that are due (see `crate::cursors`), in the
        // same batch.
        let due = self.write_cursors(&mut w, write_all_cursors);

        // Events for other nodes' users go into the outbox in this batch,
        // so their Acks cover them too.
        let outbox = if w.relays.is_empty() {
            Ok(Vec::new())
        } else {
            self.write_outbox(&mut w)
        };
        let committed = match &outbox {
            Err(e) => {
                // An outbox seq could not be read: fail the whole group
                // rather than acknowledge events that would not be relayed.
                crate::log_every!(1000, error, error = %e, "reading the outbox failed");
                false
            }
            Ok(_) => {
                w.writes == 0
                    || {
                        let started = self.clock.now();
                        let rows = w.batch.len() as u64;
                        let result = self.store.commit(std::mem::take(&mut w.batch));
                        if result.is_ok() {
                            self.metrics
                                .store_rows
                                .fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
                        }
                        self.metrics.commit_us.observe(
                            self.clock
                                .now()
                                .saturating_duration_since(started)
                                .as_micros() as u64,
                        );
                        match result {
                            Ok(()) => true,
                            Err(e) => {
                                // The store logs when it starts refusing writes
                                // and when it recovers; this line only counts
                                // what was refused.
                                crate::log_every!(
                                    60_000,
                                    warn,
                                    error = %e,
                                    requests = w.answers.len(),
                                    "a group commit failed: its requests were answered STORE_UNAVAILABLE"
                                );
                                false
                            }
                        }
                    }
            }
        };
        if committed {
            let acks = w
                .answers
                .iter()
                .filter(|(_, _, e)| matches!(e.body, Some(Body::Ack(_))))
                .count();
            self.metrics
                .acks
                .fetch_add(acks as u64, std::sync::atomic::Ordering::Relaxed);
            for (to, received, env) in &w.answers {
                self.outbox.reply(*to, *received, env);
            }
            for p in &w.pushes {
                self.outbox
                    .push(&self.registry, &p.user, p.seq, &p.event, p.sent.as_ref());
            }
            for (done, src, _, new) in w.applied.drain(..) {
                self.applied_written(src, new);
                let _ = done.send(new);
            }
            if let Ok(entries) = &outbox {
                self.hand_off(entries);
            }
        } else {
            for (done, _, old, _) in w.applied.drain(..) {
                let _ = done.send(old);
            }
            for (to, received, env) in &w.answers {
                self.outbox.reply(
                    *to,
                    *received,
                    &Envelope::error(
                        env.request_id,
                        ErrorCode::StoreUnavailable,
                        "storage write failed",
                        false,
                    ),
                );
            }
        }
        if !committed {
            self.give_back(&mut w, 0);
            // The cached heads, groups and outbox seqs may be ahead of the
            // store.
            self.heads.clear();
            self.groups.clear();
            self.relay.clear();
        }
        self.heads.rotate_if_full();
        self.groups.rotate_if_full();
        self.outbox.dispatch(own);
        // The cursors were written, or lost with the batch (logged above:
        // then a later batch writes them). After the answers and pushes
        // are on their way: until `done`, logins read them from `Cursors`.
        if committed {
            let cursors: usize = due.iter().map(|d| d.cursors.len()).sum();
            self.metrics
                .cursors_written
                .fetch_add(cursors as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.cursors.done(due, committed, self.clock.now());
    }

    /// Put the cursors and delivered receipts [`Cursors`] has due (all of
    /// them with `all`) into this group's batch; returns them for
    /// [`Cursors::done`]. A user's receipts go in before its cursors'
    /// group is written, never after. The cursors stand when the receipts
    /// fail: those are skipped (the next acknowledgement in a conversation
    /// moves its watermark past them), not half written.
    fn write_cursors(&mut self, w: &mut Work, all: bool) -> Vec<Due> {
        let now = self.clock.now();
        let (mut due, elsewhere): (Vec<Due>, Vec<Due>) = self
            .cursors
            .take(now, all)
            .into_iter()
            .partition(|d| self.may_write_for(&d.user));
        // Fenced, or the user's partition moved away: forgotten here, the
        // device resumes from the cursor at the user's home (a replay of
        // what it acknowledged here, never a skip).
        if !elsewhere.is_empty() {
            self.cursors.done(elsewhere, true, now);
        }
        for d in &mut due {
            for (device, up_to) in &d.cursors {
                w.writes += 1;
                if let Err(e) = self.store.put_cursor(&mut w.batch, &d.user, device, *up_to) {
                    crate::log_every!(1000, error, error = %e, "cursor update failed");
                }
            }
            let convs = std::mem::take(&mut d.convs);
            if convs.is_empty() {
                continue;
            }
            let receipts = w.savepoint();
            if let Err(e) = self.delivered(w, &d.user, convs) {
                crate::log_every!(1000, error, error = %e, "delivered receipts failed");
                w.rollback(receipts, &mut self.heads);
            }
        }
        due
    }

    /// Apply one request from its savepoint `sp`, and answer it: after the
    /// write when it succeeded, at once when it was refused (rolled back).
    pub(super) fn run_request(&mut self, w: &mut Work, sp: Savepoint, origin: &Origin, op: Op) {
        match self.apply(w, origin, op) {
            Ok(Some(body)) => {
                self.answer_after_commit(w, origin, Envelope::new(origin.request_id, body))
            }
            Ok(None) => {}
            Err(Fail::Refuse(code, why)) => {
                w.rollback(sp, &mut self.heads);
                self.answer_now(
                    w,
                    origin,
                    Envelope::error(origin.request_id, code, why, false),
                );
            }
            Err(Fail::Store(e)) => {
                crate::log_every!(
                    1000,
                    error,
                    error = %e,
                    "reading the store for a request failed"
                );
                w.rollback(sp, &mut self.heads);
                self.answer_now(
                    w,
                    origin,
                    Envelope::error(
                        origin.request_id,
                        ErrorCode::StoreUnavailable,
                        "storage error",
                        false,
                    ),
                );
            }
        }
    }

    fn apply(&mut self, w: &mut Work, o: &Origin, op: Op) -> Result<Option<Body>, Fail> {
        match op {
            Op::Send(send) => self.send(w, o, send),
            Op::CreateGroup(req) => self.create_group(w, o, req),
            Op::AddMembers(req) => self.change_members(w, o, req.group_id, req.users, true),
            Op::RemoveMembers(req) => self.change_members(w, o, req.group_id, req.users, false),
            Op::LeaveGroup(req) => self.leave_group(w, o, req.group_id),
            Op::RenameGroup(req) => self.rename_group(w, o, req),
            Op::MarkRead(req) => self.mark_read(w, o, req),
            Op::SetPrivacy(req) => self.set_privacy(w, o, req),
            Op::GetGroup(req) => {
                let g = self.member_group(req.group_id, &o.user)?;
                Ok(Some(Body::GroupInfo(
                    g.info_page(&req.members_after, req.members_limit),
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::receipts::direct;
    use super::super::{start, summarize_delivered, CommitHandle, PipelineConfig};
    use super::*;
    use crate::hub::mailbox::{Answer, ShardHandle, ShardMsg};
    use crate::hub::registry::ConnKind;
    use crate::store::keys;
    use crate::store::{FailRead, StoreOptions};
    use crossbeam_channel::Receiver;
    use swiftlet_protocol::codec::decode_frame;
    use swiftlet_protocol::pb::event::Kind;

    /// A pipeline on a real store in a temporary directory, with one shard
    /// whose mailbox the test reads.
    struct Harness {
        store: Arc<Store>,
        pipeline: CommitHandle,
        cursors: Arc<Cursors>,
        mailbox: Receiver<ShardMsg>,
        shard: ShardHandle,
        restarts: u16,
        next_request: u64,
        clock: Clock,
        // Dropped last: the waker needs its poll, the store its directory.
        _poll: mio::Poll,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Harness {
            Self::with_clock(Clock::system())
        }

        fn with_clock(clock: Clock) -> Harness {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("open"));
            let poll = mio::Poll::new().expect("poll");
            let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
            let (tx, mailbox) = crossbeam_channel::unbounded();
            let shard = ShardHandle::new(tx, Arc::new(waker));
            let cursors = Arc::new(Cursors::new(store.clone()));
            let pipeline = Self::pipeline(&store, &cursors, &shard, 0, clock.clone());
            Harness {
                store,
                pipeline,
                cursors,
                mailbox,
                shard,
                restarts: 0,
                next_request: 0,
                clock,
                _poll: poll,
                _dir: dir,
            }
        }

        fn pipeline(
            store: &Arc<Store>,
            cursors: &Arc<Cursors>,
            shard: &ShardHandle,
            node_id: u16,
            clock: Clock,
        ) -> CommitHandle {
            start(
                store.clone(),
                Arc::new(Registry::new(4)),
                Arc::new(GroupDirectory::new(store.clone())),
                vec![shard.clone()],
                Arc::new(Metrics::default()),
                cursors.clone(),
                PipelineConfig {
                    node_id,
                    queue: MAX_GROUP,
                    max_group_members: 100,
                    clock,
                    routes: None,
                },
            )
        }

        /// A new pipeline on the same store, as after a restart: nothing is
        /// cached, so the next requests read every inbox head.
        fn restart(&mut self) {
            // Under another node id: a new id generator in the same
            // millisecond would repeat the old one's message ids (a real
            // restart takes longer than that).
            self.restarts += 1;
            self.cursors = Arc::new(Cursors::new(self.store.clone()));
            self.pipeline = Self::pipeline(
                &self.store,
                &self.cursors,
                &self.shard,
                self.restarts,
                self.clock.clone(),
            );
        }

        /// Queue a request; it is committed, with everything queued after
        /// it, by [`Harness::commit`]. Returns its request id.
        fn request(&mut self, user: &str, op: Op) -> u64 {
            self.next_request += 1;
            let origin = Origin {
                reply: ConnRef {
                    shard: 0,
                    slot: 0,
                    gen: 0,
                    kind: ConnKind::Session,
                },
                request_id: self.next_request,
                user: Arc::from(user),
                device: Arc::from("phone"),
                received: Instant::now(),
                from: None,
            };
            self.submit(CommitCmd::Request(origin, op));
            self.next_request
        }

        fn submit(&self, cmd: CommitCmd) {
            self.pipeline.submit(cmd).expect("queue has room");
        }

        fn send(&mut self, from: &str, to_user: &str, group_id: u64) -> u64 {
            let n = self.next_request;
            self.request(
                from,
                Op::Send(pb::Send {
                    client_msg_id: format!("c{n}"),
                    to_user: to_user.to_owned(),
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"hi"),
                    group_id,
                }),
            )
        }

        /// Commit everything queued (in one group: the queue holds no more
        /// than one group) and return the answers by request id.
        fn commit(&mut self) -> HashMap<u64, Body> {
            self.pipeline.flush();
            let mut answers = HashMap::new();
            while let Ok(msg) = self.mailbox.try_recv() {
                let ShardMsg::Deliver { replies, .. } = msg else {
                    continue;
                };
                for r in replies {
                    let env = match r.answer {
                        Answer::Frame(f) => {
                            decode_frame(&f, usize::MAX)
                                .expect("a valid frame")
                                .expect("a whole frame")
                                .0
                        }
                        Answer::Typed(env) => *env,
                    };
                    answers.insert(env.request_id, env.body.expect("a body"));
                }
            }
            answers
        }

        fn inbox(&self, user: &str) -> Vec<pb::Event> {
            self.store
                .read_inbox(user, 0, usize::MAX, usize::MAX)
                .expect("read inbox")
                .events
        }

        /// Check that `user`'s inbox holds seqs 1..=n without a gap; returns n.
        fn gap_free(&self, user: &str) -> usize {
            let seqs: Vec<u64> = self.inbox(user).iter().map(|e| e.seq).collect();
            let want: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, want, "{user}'s inbox has a hole");
            seqs.len()
        }
    }

    fn server_msg_id(answer: Option<&Body>) -> u64 {
        match answer {
            Some(Body::Ack(ack)) => ack.server_msg_id,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }

    fn group_id(answer: Option<&Body>) -> u64 {
        match answer {
            Some(Body::GroupInfo(info)) => info.group_id,
            other => panic!("expected a GroupInfo, got {other:?}"),
        }
    }

    fn assert_store_unavailable(answer: Option<&Body>) {
        match answer {
            Some(Body::Error(e)) if e.code == ErrorCode::StoreUnavailable as i32 => {}
            other => panic!("expected STORE_UNAVAILABLE, got {other:?}"),
        }
    }

    fn has_receipt(events: &[pb::Event]) -> bool {
        events
            .iter()
            .any(|e| matches!(e.kind, Some(Kind::Receipt(_))))
    }

    #[test]
    fn a_group_post_whose_inbox_read_fails_for_one_member_leaves_no_message_and_no_hole() {
        let mut h = Harness::new();
        let create = h.request(
            "alice",
            Op::CreateGroup(pb::CreateGroup {
                name: "g".into(),
                members: vec!["bob".into(), "carol".into()],
            }),
        );
        let g = group_id(h.commit().get(&create));
        h.send("alice", "", g);
        h.commit();
        let members = ["alice", "bob", "carol"];
        for m in members {
            assert_eq!(h.gap_free(m), 2, "the creation and the first post");
        }

        // Nothing cached: the failed post reads every member's inbox head,
        // and the next post, in the same group commit, follows it.
        h.restart();
        h.store.fail_next(FailRead::LastSeq("carol".into()));
        let failed = h.send("alice", "", g);
        let next = h.send("bob", "", g);
        let answers = h.commit();
        assert_store_unavailable(answers.get(&failed));
        let id = server_msg_id(answers.get(&next));

        for m in members {
            assert_eq!(h.gap_free(m), 3, "{m}: the next post right after the first");
            match h.inbox(m).last().and_then(|e| e.kind.clone()) {
                Some(Kind::Message(msg)) => assert_eq!(msg.id, id),
                other => panic!("{m}: expected the next post, got {other:?}"),
            }
        }
        assert_eq!(h.store.count_messages().expect("count"), 2);
    }

    #[test]
    fn a_mark_read_whose_own_receipt_fails_leaves_no_receipt_for_the_sender() {
        let mut h = Harness::new();
        let sent = h.send("alice", "bob", 0);
        let id = server_msg_id(h.commit().get(&sent));
        let conv = keys::direct_conversation("bob", "alice");
        let mark_read = pb::MarkRead {
            conversation: Some(direct("alice")),
            up_to: id,
        };

        // The sender's receipt is put first, then bob's own copy fails.
        h.restart();
        h.store.fail_next(FailRead::LastSeq("bob".into()));
        let failed = h.request("bob", Op::MarkRead(mark_read.clone()));
        // Something else in the same batch, so the batch is written.
        h.send("alice", "carol", 0);
        let answers = h.commit();
        assert_store_unavailable(answers.get(&failed));
        assert!(
            !has_receipt(&h.inbox("alice")),
            "a receipt of a failed MarkRead"
        );
        assert_eq!(h.store.watermarks(&conv, "bob").expect("read"), (0, 0));

        // Tried again, it goes through, right after alice's two messages.
        let again = h.request("bob", Op::MarkRead(mark_read));
        assert!(matches!(h.commit().get(&again), Some(Body::Done(_))));
        assert_eq!(h.gap_free("alice"), 3);
        assert!(has_receipt(&h.inbox("alice")));
        assert_eq!(h.store.watermarks(&conv, "bob").expect("read"), (id, id));
    }

    #[test]
    fn a_group_creation_whose_inbox_read_fails_leaves_no_memberships() {
        let mut h = Harness::new();
        h.store.fail_next(FailRead::LastSeq("carol".into()));
        let failed = h.request(
            "alice",
            Op::CreateGroup(pb::CreateGroup {
                name: "g".into(),
                members: vec!["bob".into(), "carol".into()],
            }),
        );
        // Something else in the same batch, so the batch is written.
        let sent = h.send("alice", "bob", 0);
        let answers = h.commit();
        assert_store_unavailable(answers.get(&failed));
        server_msg_id(answers.get(&sent));
        for m in ["alice", "bob", "carol"] {
            assert_eq!(h.store.memberships(m).expect("read"), Vec::<u64>::new());
        }
        assert_eq!(h.gap_free("alice"), 1, "only the message");
        assert_eq!(h.gap_free("bob"), 1, "only the message");
        assert_eq!(h.gap_free("carol"), 0);
    }

    #[test]
    fn an_acknowledgement_whose_receipts_fail_still_moves_the_cursor_but_sends_no_receipt() {
        let mut h = Harness::new();
        let from_alice = h.send("alice", "bob", 0);
        let from_carol = h.send("carol", "bob", 0);
        let answers = h.commit();
        let ids = [
            server_msg_id(answers.get(&from_alice)),
            server_msg_id(answers.get(&from_carol)),
        ];
        let convs = summarize_delivered(&h.store, "bob", 0, 2).expect("summarize");
        assert_eq!(convs.len(), 2);

        // Alice's receipt is put, then carol's fails.
        h.restart();
        h.store.fail_next(FailRead::LastSeq("carol".into()));
        h.cursors.acknowledge(
            &Arc::from("bob"),
            &Arc::from("phone"),
            2,
            convs,
            Instant::now(),
        );
        h.commit();
        assert_eq!(h.store.cursor("bob", "phone").expect("read"), 2);
        for (peer, id) in ["alice", "carol"].into_iter().zip(ids) {
            assert!(!has_receipt(&h.inbox(peer)), "a receipt to {peer}");
            let conv = keys::direct_conversation("bob", peer);
            assert_eq!(h.store.watermarks(&conv, "bob").expect("read"), (0, 0));
            // The next message from the peer gets the next seq.
            h.send(peer, "bob", 0);
            h.commit();
            assert_eq!(h.gap_free(peer), 2, "{peer}'s inbox after message {id}");
        }
    }

    #[test]
    fn timestamps_and_ids_come_from_the_clock_and_ids_grow_when_it_steps_back() {
        let t = crate::ids::EPOCH_MS + 1_000_000;
        let manual = crate::clock::ManualClock::new(t);
        let mut h = Harness::with_clock(manual.clock());
        let stamp = |answer: Option<&Body>| match answer {
            Some(Body::Ack(ack)) => (ack.server_msg_id, ack.timestamp_ms),
            other => panic!("expected an Ack, got {other:?}"),
        };

        let first = h.send("alice", "bob", 0);
        let (id1, ts1) = stamp(h.commit().get(&first));
        assert_eq!(ts1, t);
        assert_eq!(crate::ids::timestamp_of(id1), t);

        manual.advance(std::time::Duration::from_millis(5));
        let second = h.send("alice", "bob", 0);
        let (id2, ts2) = stamp(h.commit().get(&second));
        assert_eq!(ts2, t + 5);
        assert_eq!(crate::ids::timestamp_of(id2), t + 5);

        // The wall clock steps back a second: the message says so, but its
        // id still sorts after the ones before it.
        manual.set_ms(t - 1_000);
        let third = h.send("alice", "bob", 0);
        let (id3, ts3) = stamp(h.commit().get(&third));
        assert_eq!(ts3, t - 1_000);
        assert!(id3 > id2 && id2 > id1);
        let stored: Vec<u64> = h
            .inbox("bob")
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Message(m)) => Some(m.timestamp_ms),
                _ => None,
            })
            .collect();
        assert_eq!(stored, vec![t, t + 5, t - 1_000]);
    }
}
