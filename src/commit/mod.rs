//! The commit pipeline: turns requests into durable writes, then tells the
//! shards what to answer and push.
//!
//! The way of a request through it:
//!
//! 1. A shard reads a request that changes durable state and queues a
//!    [`CommitCmd`] with [`CommitHandle::submit`] (a bounded queue: a full
//!    one is an answer for the client, never a blocked loop).
//! 2. At the end of the same loop turn the shard runs the pipeline itself,
//!    [`CommitHandle::combine`]: whichever shard takes the pipeline's lock
//!    commits what is queued, its own commands and the other shards' (flat
//!    combining, `combine.rs`; no commit thread to wake and wait for).
//! 3. One group commit (`group.rs`) takes up to [`MAX_GROUP`] commands and
//!    applies each in order into one RocksDB batch, each request from a
//!    savepoint ([`crate::txn`]) so that a refused request, or one whose
//!    store read fails midway, leaves nothing behind. What a request does
//!    lives with its family: `sends.rs` (dedup, message ids, the
//!    recipients' inboxes), `groups.rs` (membership changes), `receipts.rs`
//!    (delivered and read watermarks and their events), `presence.rs`
//!    (last seen, privacy). Every inbox event takes its user's next
//!    sequence number from `seqs.rs`.
//! 4. The batch is written once: one write-ahead-log record for many
//!    requests (group commit). Only after that write returns are the
//!    answers and Deliver pushes handed to [`crate::hub::fanout`], which
//!    gives each shard one message and one wake-up per group (the
//!    committing shard takes its own share in the same turn, without a
//!    wake-up). If the write fails, every answer of the group becomes
//!    `STORE_UNAVAILABLE`, nothing is pushed, and the cached sequence
//!    numbers and groups are dropped so they are re-read from the store.
//!
//! One committer at a time is what makes the invariants cheap: inbox
//! sequence numbers are gap-free and in commit order per user, a post and a
//! membership change to the same group are strictly ordered (a removed
//! member gets nothing posted after the removal), and watermarks only grow.
//!
//! This module is the pipeline's public face: the commands, the handle and
//! [`start`]. The pipeline reaches the shards only through [`crate::hub`]
//! and must never import `crate::shard`; it reads and writes durable state
//! only through [`Store`] methods, and leaves the layout of storage keys
//! to [`crate::store::keys`].

mod combine;
mod group;
mod groups;
mod moves;
mod presence;
mod receipts;
mod relay;
mod sends;
mod seqs;

use std::sync::Arc;
use std::time::Instant;

use swiftlet_protocol::pb;
use swiftlet_protocol::Body;

use crate::clock::Clock;
use crate::cursors::Cursors;
use crate::generations::Generations;
use crate::groups::GroupDirectory;
use crate::hub::fanout::Outbox;
use crate::hub::mailbox::ShardHandle;
use crate::hub::registry::{ConnRef, Registry};
use crate::ids::IdGen;
use crate::metrics::Metrics;
use crate::store::Store;
use combine::{Combiner, Wake};
use group::Pipeline;
pub use moves::{MoveStep, MoveStepError, IMPORT_BYTES};
pub use receipts::{add_delivered, merge_delivered, summarize_delivered, DeliveredConv};
pub use relay::Routes;
use seqs::HEADS_PER_GENERATION;

/// Most commands folded into one write batch.
pub const MAX_GROUP: usize = 1024;
/// Most users a GroupEvent lists (see `GroupEvent.users` in the protocol).
pub const MAX_EVENT_USERS: usize = 64;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 128;

/// Who asked, and where the answer goes.
#[derive(Debug, Clone)]
pub struct Origin {
    pub reply: ConnRef,
    pub request_id: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
    /// When the shard read the request.
    pub received: Instant,
    /// The node whose connection `reply` is, when not this one: the
    /// request was forwarded here (a cluster's group home), and the answer
    /// goes back through the hand-off.
    pub from: Option<u16>,
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
    /// A read, in the pipeline only to be forwarded to the group's home
    /// (a cluster); a shard answers it itself when the group is local.
    GetGroup(pb::GetGroup),
}

impl Op {
    /// The request as a client sends it (to forward it to another node).
    pub fn into_body(self) -> Body {
        match self {
            Op::Send(r) => Body::Send(r),
            Op::CreateGroup(r) => Body::CreateGroup(r),
            Op::AddMembers(r) => Body::AddMembers(r),
            Op::RemoveMembers(r) => Body::RemoveMembers(r),
            Op::LeaveGroup(r) => Body::LeaveGroup(r),
            Op::RenameGroup(r) => Body::RenameGroup(r),
            Op::MarkRead(r) => Body::MarkRead(r),
            Op::SetPrivacy(r) => Body::SetPrivacy(r),
            Op::GetGroup(r) => Body::GetGroup(r),
        }
    }

    /// The durable request a body is, if it is one.
    pub fn from_body(body: Body) -> Option<Op> {
        Some(match body {
            Body::Send(r) => Op::Send(r),
            Body::CreateGroup(r) => Op::CreateGroup(r),
            Body::AddMembers(r) => Op::AddMembers(r),
            Body::RemoveMembers(r) => Op::RemoveMembers(r),
            Body::LeaveGroup(r) => Op::LeaveGroup(r),
            Body::RenameGroup(r) => Op::RenameGroup(r),
            Body::MarkRead(r) => Op::MarkRead(r),
            Body::SetPrivacy(r) => Op::SetPrivacy(r),
            Body::GetGroup(r) => Op::GetGroup(r),
            _ => return None,
        })
    }

    /// The group this request writes to, if any (its home must apply it).
    pub fn group_id(&self) -> Option<u64> {
        let id = match self {
            Op::Send(r) => r.group_id,
            Op::AddMembers(r) => r.group_id,
            Op::RemoveMembers(r) => r.group_id,
            Op::LeaveGroup(r) => r.group_id,
            Op::RenameGroup(r) => r.group_id,
            Op::GetGroup(r) => r.group_id,
            Op::MarkRead(pb::MarkRead {
                conversation:
                    Some(pb::Conversation {
                        kind: Some(pb::conversation::Kind::GroupId(id)),
                    }),
                ..
            }) => *id,
            Op::CreateGroup(_) | Op::MarkRead(_) | Op::SetPrivacy(_) => 0,
        };
        (id != 0).then_some(id)
    }
}

/// Work for the pipeline.
pub enum CommitCmd {
    /// A client request; answered to `origin.reply` after the commit.
    Request(Origin, Op),
    /// Write the acknowledged cursors and delivered receipts that are due
    /// in [`Cursors`] (all of them with `all`). Every group commit takes
    /// what is due anyway; a shard sends this when something is due and no
    /// commit would otherwise come.
    WriteCursors { all: bool },
    /// The user's last connection closed.
    LastSeen { user: Arc<str>, at_ms: u64 },
    /// Cluster: outbox entries `first, first + 1, ...` of node `src`
    /// arrived (see [`crate::cluster::HandOff`]); apply those after the
    /// last applied from `src`, and send the new mark to `done` once it is
    /// written (the old one if nothing could be; nothing if the group
    /// failed before its write).
    Apply {
        src: u16,
        first: u64,
        entries: Vec<bytes::Bytes>,
        done: crossbeam_channel::Sender<u64>,
    },
    /// Cluster: a step of moving a partition to another node, committed
    /// between two groups (see `moves.rs`).
    Move(MoveStep),
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
    combiner: Combiner<Pipeline, ShardHandle>,
}

impl CommitHandle {
    /// Queue `cmd` without blocking. It is committed by the caller's next
    /// [`CommitHandle::combine`], or by whichever shard commits first.
    pub fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError> {
        self.combiner.submit(cmd).map_err(|_| SubmitError::Busy)
    }

    /// Queue `cmd`; while the queue is full, commit from it to make room.
    pub fn submit_waiting(&self, cmd: CommitCmd) {
        self.combiner.submit_waiting(cmd);
    }

    /// Commit one group of what is queued, unless another thread is
    /// committing: that one looks at the queue again once it is done.
    /// `own` is the calling shard, which takes its share of the answers and
    /// pushes from its mailbox after this returns (so it is not woken).
    pub fn combine(&self, own: Option<usize>) {
        self.combiner.combine(own);
    }

    /// Block until everything queued so far is committed and handed to the
    /// shards, and every cursor and receipt acknowledged so far is written
    /// (graceful shutdown, benches, tests).
    pub fn flush(&self) {
        self.combiner
            .submit_waiting(CommitCmd::WriteCursors { all: true });
        self.combiner.flush();
    }
}

impl Wake for ShardHandle {
    fn wake(&self) {
        ShardHandle::wake(self);
    }
}

/// What the pipeline needs besides the store.
pub struct PipelineConfig {
    pub node_id: u16,
    pub queue: usize,
    pub max_group_members: usize,
    /// What the pipeline reads the time from (timestamps, message ids).
    pub clock: Clock,
    /// On a cluster node: homes and the hand-off; None on a single node.
    pub routes: Option<Routes>,
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
    let pipeline = Pipeline {
        store,
        registry,
        groups,
        metrics,
        cursors,
        outbox: Outbox::new(shards.clone(), config.clock.clone()),
        ids: IdGen::new(config.node_id),
        max_group_members: config.max_group_members,
        clock: config.clock,
        heads: Generations::new(HEADS_PER_GENERATION),
        routes: config.routes,
        relay: Default::default(),
    };
    CommitHandle {
        combiner: Combiner::new(pipeline, config.queue, shards),
    }
}
