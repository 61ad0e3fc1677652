//! The commit pipeline: turns requests into durable writes, then tells the
//! shards what to answer and push.
//!
//! Shards submit [`CommitCmd`]s to a bounded queue and, at the end of the
//! same loop turn, run the pipeline themselves ([`CommitHandle::combine`]):
//! whichever shard takes the pipeline's lock commits what is queued, its own
//! commands and the other shards' (flat combining). There is no commit
//! thread to wake and wait for: on a small machine a hand-off to another
//! thread and back cost more than the write itself. A shard that finds the
//! lock taken leaves its commands to the holder, which looks at the queue
//! again after it lets go and, if anything is there, wakes every shard for
//! another turn. (Should that hand-off ever miss, every shard runs a turn at
//! least once a tick, so a command would wait one tick, never be lost.)
//!
//! One commit takes what is queued (up to [`MAX_GROUP`]), applies each
//! command in order — dedup, message ids, per-user inbox sequence numbers,
//! group membership, receipt watermarks — into one RocksDB batch, and writes
//! the batch once: one write-ahead-log record for many requests (group
//! commit). Only after that write returns does it hand answers and Deliver
//! pushes to the shards, grouped per shard so each shard is woken at most
//! once per group (the committing shard takes its own share in the same
//! turn, without a wake-up).
//!
//! One committer at a time is what makes the invariants cheap: inbox
//! sequence numbers are gap-free and in commit order per user, a post and a
//! membership change to the same group are strictly ordered (a removed
//! member gets nothing posted after the removal), and watermarks only grow.
//! Each request is all or nothing: it runs from a savepoint, and a request
//! that is refused or whose store read fails midway is rolled back to it
//! (see [`crate::txn`]), so it leaves no writes in the batch, no pushes and
//! no reserved sequence numbers, and a later request of the same group
//! takes the seqs it would have had. If the write fails, every answer of the
//! group becomes `STORE_UNAVAILABLE`, nothing is pushed, and the cached
//! sequence numbers and groups are dropped so they are re-read from the store.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use prost::Message as _;
use swiftlet_protocol::pb::{
    self, conversation, event::Kind, GroupEventKind, GroupRole, ReceiptKind,
};
use swiftlet_protocol::{Body, Envelope, ErrorCode};

use crate::auth::valid_id;
use crate::cursors::Cursors;
use crate::generations::Generations;
use crate::groups::{Group, GroupDirectory};
use crate::hub::fanout::Outbox;
use crate::hub::mailbox::{Sent, ShardHandle};
use crate::hub::registry::{ConnRef, Registry};
use crate::ids::{unix_ms, IdGen};
use crate::metrics::Metrics;
use crate::store::keys::{self, InboxEntry};
use crate::store::{Batch, Store, StoreError};
use crate::txn::Undo;

/// Most commands folded into one write batch.
pub const MAX_GROUP: usize = 1024;
/// Most users a GroupEvent lists (see `GroupEvent.users` in the protocol).
pub const MAX_EVENT_USERS: usize = 64;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 128;
/// Inbox events read at a time for delivered receipts, and group messages a
/// MarkRead looks at for the senders it tells.
const RECEIPT_SCAN: usize = 2_000;

/// Who asked, and where the answer goes.
#[derive(Debug, Clone)]
pub struct Origin {
    pub reply: ConnRef,
    pub request_id: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
    /// When the shard read the request.
    pub received: Instant,
}

/// A request that changes durable state.
#[derive(Debug)]
pub enum Op {
    Send(pb::Send),
    CreateGroup(pb::CreateGroup),
    AddMembers(pb::AddMembers),
    RemoveMembers(pb::RemoveMembers),
    LeaveGroup(pb::LeaveGroup),
    RenameGroup(pb::RenameGroup),
    MarkRead(pb::MarkRead),
    SetPrivacy(pb::SetPrivacy),
}

/// Work for the pipeline.
pub enum CommitCmd {
    /// A client request; answered to `origin.reply` after the commit.
    Request(Origin, Op),
    /// A device of `user` acknowledged its inbox up to `up_to`: write its
    /// cursor (pending in [`Cursors`] until then), and the delivered
    /// receipts of `convs`, the conversations that covers (summarized by the
    /// shard, from what it sent or with [`summarize_delivered`]).
    Acknowledged {
        user: Arc<str>,
        device: Arc<str>,
        up_to: u64,
        convs: Vec<DeliveredConv>,
    },
    /// The user's last connection closed.
    LastSeen { user: Arc<str>, at_ms: u64 },
}

/// Why a command was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("commit queue full")]
    Busy,
}

/// The shards' way in. Cheap to clone.
#[derive(Clone)]
pub struct CommitHandle {
    tx: Sender<CommitCmd>,
    shared: Arc<Shared>,
}

/// The queue and the pipeline every handle shares.
struct Shared {
    rx: Receiver<CommitCmd>,
    pipeline: Mutex<Pipeline>,
    shards: Vec<ShardHandle>,
}

impl CommitHandle {
    /// Queue `cmd` without blocking. It is committed by the caller's next
    /// [`CommitHandle::combine`], or by whichever shard commits first.
    pub fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            // The handle holds the receiver too: the queue never closes.
            TrySendError::Full(_) | TrySendError::Disconnected(_) => SubmitError::Busy,
        })
    }

    /// Queue `cmd`; while the queue is full, commit from it to make room.
    pub fn submit_waiting(&self, mut cmd: CommitCmd) {
        loop {
            match self.tx.try_send(cmd) {
                Ok(()) => return,
                Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                    cmd = back;
                    self.shared
                        .pipeline
                        .lock()
                        .commit_queued(&self.shared.rx, None);
                }
            }
        }
    }

    /// Commit one group of what is queued, unless another thread is
    /// committing: that one looks at the queue again once it is done.
    /// `own` is the calling shard, which takes its share of the answers and
    /// pushes from its mailbox after this returns (so it is not woken).
    pub fn combine(&self, own: Option<usize>) {
        // Pairs with the same fence below, in the thread that held the lock:
        // either this thread sees the lock free, or the holder sees what
        // this thread queued before it tried the lock.
        fence(Ordering::SeqCst);
        if self.shared.rx.is_empty() {
            return;
        }
        let Some(mut pipeline) = self.shared.pipeline.try_lock() else {
            return;
        };
        pipeline.commit_queued(&self.shared.rx, own);
        drop(pipeline);
        fence(Ordering::SeqCst);
        if !self.shared.rx.is_empty() {
            // Queued meanwhile, by shards that found the lock taken. One
            // group per call, then every shard gets a turn (each runs
            // `combine` once per turn): a shard that went on committing for
            // the others would leave its own connections waiting (closed
            // loop p99 60-69 ms with four groups per call, 47-53 with one).
            for shard in &self.shared.shards {
                shard.wake();
            }
        }
    }

    /// Block until everything queued so far is committed and handed to the
    /// shards (graceful shutdown, benches, tests).
    pub fn flush(&self) {
        loop {
            let mut pipeline = self.shared.pipeline.lock();
            if self.shared.rx.is_empty() {
                return;
            }
            pipeline.commit_queued(&self.shared.rx, None);
        }
    }
}

/// What the pipeline needs besides the store.
pub struct PipelineConfig {
    pub node_id: u16,
    pub queue: usize,
    pub max_group_members: usize,
}

/// Create the pipeline; the shards run it through the returned handle.
pub fn start(
    store: Arc<Store>,
    registry: Arc<Registry>,
    groups: Arc<GroupDirectory>,
    shards: Vec<ShardHandle>,
    metrics: Arc<Metrics>,
    cursors: Arc<Cursors>,
    config: PipelineConfig,
) -> CommitHandle {
    let (tx, rx) = crossbeam_channel::bounded(config.queue);
    let shared_shards = shards.clone();
    let pipeline = Pipeline {
        store,
        registry,
        groups,
        metrics,
        cursors,
        outbox: Outbox::new(shards),
        ids: IdGen::new(config.node_id),
        max_group_members: config.max_group_members,
        heads: Generations::new(HEADS_PER_GENERATION),
        group: Vec::with_capacity(MAX_GROUP),
    };
    CommitHandle {
        tx,
        shared: Arc::new(Shared {
            rx,
            pipeline: Mutex::new(pipeline),
            shards: shared_shards,
        }),
    }
}

/// Why a request was not applied.
enum Fail {
    Refuse(ErrorCode, String),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

fn refuse<T>(code: ErrorCode, why: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Refuse(code, why.into()))
}

/// An event to push once the batch holding it is durable.
struct Pending {
    user: Arc<str>,
    seq: u64,
    /// `Event { seq: 0, kind }` encoded, shared by every recipient.
    event: Bytes,
    /// For a message: what its delivered receipts need.
    sent: Option<Arc<Sent>>,
}

/// What one group of commands produces.
///
/// A request changes it, and the pipeline's inbox heads, only in ways a
/// [`Savepoint`] can take back: by appending to its lists, and by setting
/// keys through the `*_undo` logs, which hold the running request's changes.
#[derive(Default)]
struct Work {
    batch: Batch,
    /// Answers sent only if the batch commits.
    answers: Vec<(ConnRef, Instant, Envelope)>,
    pushes: Vec<Pending>,
    writes: usize,
    /// Retries landing in the same group as their original.
    fresh: HashMap<(Arc<str>, String), pb::Ack>,
    fresh_undo: Undo<(Arc<str>, String), pb::Ack>,
    /// Conversation of each message written in this group.
    written: HashMap<u64, Vec<u8>>,
    written_undo: Undo<u64, Vec<u8>>,
    /// Watermarks written in this group.
    marks: HashMap<(Vec<u8>, Arc<str>), (u64, u64)>,
    marks_undo: Undo<(Vec<u8>, Arc<str>), (u64, u64)>,
    /// Seqs reserved in [`Pipeline::heads`] by the running request.
    heads_undo: Undo<Arc<str>, u64>,
    /// Device cursors in this group's batch, pending in [`Cursors`].
    cursors: Vec<(Arc<str>, Arc<str>, u64)>,
}

/// Where a request began in its group's [`Work`]: rolling back to it takes
/// the request back entirely (see [`crate::txn`]).
#[derive(Clone, Copy)]
struct Savepoint {
    ops: usize,
    answers: usize,
    pushes: usize,
    writes: usize,
}

impl Work {
    /// Begin a request (or the part of one that may fail alone): what the
    /// requests before did is kept for good.
    fn savepoint(&mut self) -> Savepoint {
        self.fresh_undo.forget();
        self.written_undo.forget();
        self.marks_undo.forget();
        self.heads_undo.forget();
        Savepoint {
            ops: self.batch.len(),
            answers: self.answers.len(),
            pushes: self.pushes.len(),
            writes: self.writes,
        }
    }

    /// Take back everything done since `sp`, in this work and in `heads`
    /// (the pipeline's inbox heads).
    fn rollback(&mut self, sp: Savepoint, heads: &mut Generations<Arc<str>, u64>) {
        self.batch.truncate(sp.ops);
        self.answers.truncate(sp.answers);
        self.pushes.truncate(sp.pushes);
        self.writes = sp.writes;
        self.fresh_undo.rollback(&mut self.fresh);
        self.written_undo.rollback(&mut self.written);
        self.marks_undo.rollback(&mut self.marks);
        self.heads_undo.rollback(heads);
    }
}

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
/// a connection was sent (see `shard::unacked`); it runs there,
/// outside the pipeline's lock. It reads [`RECEIPT_SCAN`] events at a time
/// and keeps only the summary, so its memory grows with the conversations,
/// not the events; the events are what was delivered to the device, which
/// bounds the work.
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

fn encode_event(kind: Kind) -> Bytes {
    Bytes::from(
        pb::Event {
            seq: 0,
            kind: Some(kind),
        }
        .encode_to_vec(),
    )
}

fn direct(user: &str) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::User(user.to_owned())),
    }
}

fn group_conv(id: u64) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::GroupId(id)),
    }
}

fn receipt(conversation: pb::Conversation, user: &str, kind: ReceiptKind, up_to: u64) -> Kind {
    Kind::Receipt(pb::Receipt {
        conversation: Some(conversation),
        user: user.to_owned(),
        kind: kind as i32,
        up_to,
        timestamp_ms: unix_ms(),
    })
}

struct Pipeline {
    store: Arc<Store>,
    registry: Arc<Registry>,
    groups: Arc<GroupDirectory>,
    metrics: Arc<Metrics>,
    cursors: Arc<Cursors>,
    outbox: Outbox,
    ids: IdGen,
    max_group_members: usize,
    /// Newest inbox seq of recently written users, so an append needs no
    /// store read.
    heads: Generations<Arc<str>, u64>,
    /// The commands of the group being committed (kept for its capacity).
    group: Vec<CommitCmd>,
}

/// Users per generation of the pipeline's inbox-head cache (about 64 bytes
/// each): see [`Generations`].
const HEADS_PER_GENERATION: usize = 1 << 18;

impl Pipeline {
    /// Commit one group of what is queued (up to [`MAX_GROUP`] commands).
    fn commit_queued(&mut self, rx: &Receiver<CommitCmd>, own: Option<usize>) {
        let mut group = std::mem::take(&mut self.group);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => group.push(cmd),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            self.commit_group(&mut group, own);
        }
        self.group = group;
    }

    fn commit_group(&mut self, group: &mut Vec<CommitCmd>, own: Option<usize>) {
        let mut w = Work::default();
        for cmd in group.drain(..) {
            let sp = w.savepoint();
            match cmd {
                CommitCmd::Request(origin, op) => match self.apply(&mut w, &origin, op) {
                    Ok(Some(body)) => w.answers.push((
                        origin.reply,
                        origin.received,
                        Envelope::new(origin.request_id, body),
                    )),
                    Ok(None) => {}
                    Err(Fail::Refuse(code, why)) => {
                        w.rollback(sp, &mut self.heads);
                        self.outbox.reply(
                            origin.reply,
                            origin.received,
                            &Envelope::error(origin.request_id, code, why, false),
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
                        self.outbox.reply(
                            origin.reply,
                            origin.received,
                            &Envelope::error(
                                origin.request_id,
                                ErrorCode::StoreUnavailable,
                                "storage error",
                                false,
                            ),
                        );
                    }
                },
                CommitCmd::Acknowledged {
                    user,
                    device,
                    up_to,
                    convs,
                } => {
                    w.writes += 1;
                    if let Err(e) = self.store.put_cursor(&mut w.batch, &user, &device, up_to) {
                        crate::log_every!(1000, error, error = %e, "cursor update failed");
                    }
                    // The cursor stands when the receipts fail: they are
                    // skipped (the next acknowledgement in a conversation
                    // moves its watermark past them), not half written.
                    let receipts = w.savepoint();
                    if let Err(e) = self.delivered(&mut w, &user, convs) {
                        crate::log_every!(1000, error, error = %e, "delivered receipts failed");
                        w.rollback(receipts, &mut self.heads);
                    }
                    w.cursors.push((user, device, up_to));
                }
                CommitCmd::LastSeen { user, at_ms } => {
                    let r = self.store.presence(&user).and_then(|(_, hide)| {
                        w.writes += 1;
                        self.store.put_presence(&mut w.batch, &user, at_ms, hide)
                    });
                    if let Err(e) = r {
                        crate::log_every!(1000, error, error = %e, "last-seen update failed");
                        w.rollback(sp, &mut self.heads);
                    }
                }
            }
        }

        let committed = w.writes == 0 || {
            let started = Instant::now();
            let result = self.store.commit(std::mem::take(&mut w.batch));
            self.metrics
                .commit_us
                .observe(started.elapsed().as_micros() as u64);
            match result {
                Ok(()) => true,
                Err(e) => {
                    crate::log_every!(1000, error, error = %e, "group commit failed");
                    false
                }
            }
        };
        // Written, or lost with the batch (logged above; those devices
        // resume from their stored cursors and see a few events again).
        for (user, device, up_to) in w.cursors.drain(..) {
            self.cursors.done(&user, &device, up_to);
        }
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
        } else {
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
            // The cached heads and groups may be ahead of the store.
            self.heads.clear();
            self.groups.clear();
        }
        self.heads.rotate_if_full();
        self.groups.rotate_if_full();
        self.outbox.dispatch(own);
    }

    /// Reserve the next inbox seq of `user` (until the running request is
    /// rolled back: see [`Work::rollback`]).
    fn next_seq(&mut self, w: &mut Work, user: &Arc<str>) -> Result<u64, StoreError> {
        let head = match self.heads.get(&**user) {
            Some(h) => h,
            None => self.store.last_seq(user)?,
        };
        w.heads_undo.set(&mut self.heads, user.clone(), head + 1);
        Ok(head + 1)
    }

    /// Append an encoded event to `user`'s inbox; `entry` is what the slot
    /// stores (a message reference or the event itself).
    fn append(
        &mut self,
        w: &mut Work,
        user: &Arc<str>,
        seq: u64,
        entry: InboxEntry,
        event: &Bytes,
        sent: Option<&Arc<Sent>>,
    ) -> Result<(), StoreError> {
        self.store.put_inbox(&mut w.batch, user, seq, entry)?;
        w.writes += 1;
        w.pushes.push(Pending {
            user: user.clone(),
            seq,
            event: event.clone(),
            sent: sent.cloned(),
        });
        Ok(())
    }

    /// Append an inline event (group change, receipt) to each of `users`.
    fn append_inline(
        &mut self,
        w: &mut Work,
        users: &[Arc<str>],
        kind: Kind,
    ) -> Result<(), StoreError> {
        let event = encode_event(kind);
        self.append_inline_each(w, users, |_| event.clone())
    }

    /// Append to each of `users` the encoded event `event_for(user)` gives.
    fn append_inline_each(
        &mut self,
        w: &mut Work,
        users: &[Arc<str>],
        mut event_for: impl FnMut(&str) -> Bytes,
    ) -> Result<(), StoreError> {
        // Reads first: nothing is put until every seq is known.
        let seqs = users
            .iter()
            .map(|u| self.next_seq(w, u))
            .collect::<Result<Vec<_>, _>>()?;
        for (u, seq) in users.iter().zip(seqs) {
            let event = event_for(u);
            self.append(w, u, seq, InboxEntry::Inline(event.to_vec()), &event, None)?;
        }
        Ok(())
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
            Op::SetPrivacy(req) => {
                let (last_seen, _) = self.store.presence(&o.user)?;
                self.store
                    .put_presence(&mut w.batch, &o.user, last_seen, req.hide_last_seen)?;
                w.writes += 1;
                Ok(Some(Body::Done(pb::Done {})))
            }
        }
    }

    /// Group `id` if `user` is a member. A group that does not exist and
    /// one the user is not in get the same refusal, so that non-members
    /// cannot probe which groups exist.
    fn member_group(&self, id: u64, user: &str) -> Result<Arc<Group>, Fail> {
        match self.groups.get(id)? {
            Some(g) if g.is_member(user) => Ok(g),
            _ => refuse(ErrorCode::NotFound, "no such group, or not a member of it"),
        }
    }

    fn send(&mut self, w: &mut Work, o: &Origin, send: pb::Send) -> Result<Option<Body>, Fail> {
        let key = (o.user.clone(), send.client_msg_id.clone());
        if let Some(ack) = w.fresh.get(&key) {
            w.answers.push((
                o.reply,
                o.received,
                Envelope::new(o.request_id, Body::Ack(ack.clone())),
            ));
            return Ok(None);
        }
        if let Some(ack) = self.store.dedup(&o.user, &send.client_msg_id)? {
            // Already durable: answer at once, whatever happens to this batch.
            self.outbox.reply(
                o.reply,
                o.received,
                &Envelope::new(o.request_id, Body::Ack(ack)),
            );
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
        let now = unix_ms();
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
        let ack = pb::Ack {
            client_msg_id: msg.client_msg_id.clone(),
            server_msg_id: id,
            timestamp_ms: now,
        };
        self.store.put_message(&mut w.batch, &msg)?;
        self.metrics
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.fanout.observe(recipients.len() as u64);
        let sent = Arc::new(Sent {
            id,
            from: o.user.clone(),
            group_id: msg.group_id,
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

    fn valid_users(users: Vec<String>) -> Result<Vec<Arc<str>>, Fail> {
        let mut out: Vec<Arc<str>> = Vec::with_capacity(users.len());
        for u in users {
            if !valid_id(&u) {
                return refuse(
                    ErrorCode::InvalidRecipient,
                    format!("{u:?} is not a valid user id"),
                );
            }
            if !out.iter().any(|x| **x == *u) {
                out.push(Arc::from(u));
            }
        }
        Ok(out)
    }

    fn valid_name(name: &str) -> Result<(), Fail> {
        if name.is_empty() || name.len() > MAX_GROUP_NAME {
            return refuse(ErrorCode::InvalidRequest, "group names are 1-128 bytes");
        }
        Ok(())
    }

    /// Write a changed group, its memberships, and an event to `notify`.
    fn save_group(
        &mut self,
        w: &mut Work,
        g: Group,
        notify: &[Arc<str>],
        event: pb::GroupEvent,
    ) -> Result<Option<Body>, Fail> {
        let mut event = event;
        let g = Arc::new(g);
        // Reserve the seqs first: the only fallible reads.
        if event.users.len() <= MAX_EVENT_USERS {
            self.append_inline(w, notify, Kind::GroupEvent(event))?;
        } else {
            // Listing thousands of users in every member's copy would make
            // a change to a group of n cost n times its size: each affected
            // user's copy names only them, the others' name nobody.
            let users = std::mem::take(&mut event.users);
            let affected: std::collections::HashSet<&str> =
                users.iter().map(String::as_str).collect();
            let general = encode_event(Kind::GroupEvent(event.clone()));
            self.append_inline_each(w, notify, |u| {
                if affected.contains(u) {
                    let mut mine = event.clone();
                    mine.users = vec![u.to_owned()];
                    encode_event(Kind::GroupEvent(mine))
                } else {
                    general.clone()
                }
            })?;
        }
        self.store.put_group(&mut w.batch, &g.info(true))?;
        w.writes += 1;
        self.groups.put(g.clone());
        Ok(Some(Body::GroupInfo(g.reply_info())))
    }

    fn group_event(
        g: &Group,
        kind: GroupEventKind,
        actor: &str,
        users: &[Arc<str>],
    ) -> pb::GroupEvent {
        pb::GroupEvent {
            group_id: g.id,
            kind: kind as i32,
            actor: actor.to_owned(),
            users: users.iter().map(|u| u.to_string()).collect(),
            name: g.name.clone(),
            version: g.version,
            timestamp_ms: unix_ms(),
            user_count: users.len() as u32,
        }
    }

    fn create_group(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::CreateGroup,
    ) -> Result<Option<Body>, Fail> {
        Self::valid_name(&req.name)?;
        let mut users = Self::valid_users(req.members)?;
        users.retain(|u| **u != *o.user);
        if users.len() + 1 > self.max_group_members {
            return refuse(
                ErrorCode::LimitExceeded,
                format!("groups hold at most {} members", self.max_group_members),
            );
        }
        let now = unix_ms();
        let id = self.ids.next_at(now);
        let mut members = vec![(o.user.clone(), GroupRole::Admin)];
        members.extend(users.iter().map(|u| (u.clone(), GroupRole::Member)));
        let g = Group::new(id, req.name, o.user.to_string(), now, 1, members);
        let all: Vec<Arc<str>> = g.members().cloned().collect();
        for u in &all {
            self.store.put_membership(&mut w.batch, u, id, true)?;
        }
        let event = Self::group_event(&g, GroupEventKind::Created, &o.user, &all);
        self.save_group(w, g, &all, event)
    }

    fn change_members(
        &mut self,
        w: &mut Work,
        o: &Origin,
        id: u64,
        users: Vec<String>,
        add: bool,
    ) -> Result<Option<Body>, Fail> {
        let g = self.member_group(id, &o.user)?;
        if g.role(&o.user) != Some(GroupRole::Admin) {
            return refuse(ErrorCode::Forbidden, "only admins add or remove members");
        }
        let users = Self::valid_users(users)?;
        if add {
            let new: Vec<Arc<str>> = users.into_iter().filter(|u| !g.is_member(u)).collect();
            if new.is_empty() {
                // Nothing changes: no new version, no event.
                return Ok(Some(Body::GroupInfo(g.reply_info())));
            }
            if g.len() + new.len() > self.max_group_members {
                return refuse(
                    ErrorCode::LimitExceeded,
                    format!("groups hold at most {} members", self.max_group_members),
                );
            }
            // Every message posted so far has a smaller id than this mark,
            // every later one a larger: receipts judge the new members only
            // on what was posted after they joined.
            let changed = g.with_added(&new, self.ids.next_now());
            let notify: Vec<Arc<str>> = changed.members().cloned().collect();
            for u in &new {
                self.store.put_membership(&mut w.batch, u, id, true)?;
            }
            let event = Self::group_event(&changed, GroupEventKind::MembersAdded, &o.user, &new);
            self.save_group(w, changed, &notify, event)
        } else {
            let gone: Vec<Arc<str>> = users.into_iter().filter(|u| g.is_member(u)).collect();
            if gone.is_empty() {
                return Ok(Some(Body::GroupInfo(g.reply_info())));
            }
            // Everyone before the change hears of it, the removed included.
            let notify: Vec<Arc<str>> = g.members().cloned().collect();
            let changed = g.with_removed(&gone);
            for u in &gone {
                self.store.put_membership(&mut w.batch, u, id, false)?;
            }
            let event = Self::group_event(&changed, GroupEventKind::MembersRemoved, &o.user, &gone);
            self.save_group(w, changed, &notify, event)
        }
    }

    fn leave_group(&mut self, w: &mut Work, o: &Origin, id: u64) -> Result<Option<Body>, Fail> {
        let g = self.member_group(id, &o.user)?;
        let notify: Vec<Arc<str>> = g.members().cloned().collect();
        let me = [o.user.clone()];
        let changed = g.with_removed(&me);
        self.store
            .put_membership(&mut w.batch, &o.user, id, false)?;
        let event = Self::group_event(&changed, GroupEventKind::MemberLeft, &o.user, &me);
        self.save_group(w, changed, &notify, event)
    }

    fn rename_group(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::RenameGroup,
    ) -> Result<Option<Body>, Fail> {
        Self::valid_name(&req.name)?;
        let g = self.member_group(req.group_id, &o.user)?;
        let changed = g.renamed(req.name);
        let notify: Vec<Arc<str>> = changed.members().cloned().collect();
        let event = Self::group_event(&changed, GroupEventKind::Renamed, &o.user, &[]);
        self.save_group(w, changed, &notify, event)
    }

    fn watermarks(&self, w: &Work, conv: &[u8], user: &Arc<str>) -> Result<(u64, u64), StoreError> {
        match w.marks.get(&(conv.to_vec(), user.clone())) {
            Some(m) => Ok(*m),
            None => self.store.watermarks(conv, user),
        }
    }

    fn set_watermarks(
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

    fn mark_read(
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
            receipt(senders_conv, &o.user, ReceiptKind::Read, req.up_to),
        )?;
        self.append_inline(
            w,
            std::slice::from_ref(&o.user),
            receipt(own_conv, &o.user, ReceiptKind::Read, req.up_to),
        )?;
        self.set_watermarks(w, &conv, &o.user, (delivered.max(req.up_to), req.up_to))?;
        Ok(Some(Body::Done(pb::Done {})))
    }

    /// Raise `user`'s delivered watermarks to what a device acknowledged,
    /// and tell the senders where that is news (the watermark filters out
    /// what another device of the user already acknowledged).
    fn delivered(
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
                    receipt(c.seen_as, user, ReceiptKind::Delivered, c.newest),
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
    use crate::hub::mailbox::ShardMsg;
    use crate::store::{FailRead, StoreOptions};
    use swiftlet_protocol::codec::decode_frame;

    /// A pipeline on a real store in a temporary directory, with one shard
    /// whose mailbox the test reads.
    struct Harness {
        store: Arc<Store>,
        pipeline: CommitHandle,
        mailbox: Receiver<ShardMsg>,
        shard: ShardHandle,
        restarts: u16,
        next_request: u64,
        // Dropped last: the waker needs its poll, the store its directory.
        _poll: mio::Poll,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("open"));
            let poll = mio::Poll::new().expect("poll");
            let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
            let (tx, mailbox) = crossbeam_channel::unbounded();
            let shard = ShardHandle::new(tx, Arc::new(waker));
            let pipeline = Self::pipeline(&store, &shard, 0);
            Harness {
                store,
                pipeline,
                mailbox,
                shard,
                restarts: 0,
                next_request: 0,
                _poll: poll,
                _dir: dir,
            }
        }

        fn pipeline(store: &Arc<Store>, shard: &ShardHandle, node_id: u16) -> CommitHandle {
            start(
                store.clone(),
                Arc::new(Registry::new(4)),
                Arc::new(GroupDirectory::new(store.clone())),
                vec![shard.clone()],
                Arc::new(Metrics::default()),
                Arc::new(Cursors::new(store.clone())),
                PipelineConfig {
                    node_id,
                    queue: MAX_GROUP,
                    max_group_members: 100,
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
            self.pipeline = Self::pipeline(&self.store, &self.shard, self.restarts);
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
                    presence: true,
                },
                request_id: self.next_request,
                user: Arc::from(user),
                device: Arc::from("phone"),
                received: Instant::now(),
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
                    let (env, _) = decode_frame(&r.frame, usize::MAX)
                        .expect("a valid frame")
                        .expect("a whole frame");
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
        h.submit(CommitCmd::Acknowledged {
            user: Arc::from("bob"),
            device: Arc::from("phone"),
            up_to: 2,
            convs,
        });
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
