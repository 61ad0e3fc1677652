//! Moving a partition to another node under traffic
//! (`swiftlet cluster move-partition P --to N`), without losing or
//! duplicating anything acknowledged.
//!
//! The operator's command only asks: it writes the request into Redis
//! (`swiftlet:moves`). Then, each side on its own thread, started by its
//! coordinator:
//!
//! 1. **The destination prepares** ([`prepare`]): it drops whatever rows
//!    of the partition it still holds from an earlier time it was home
//!    (a copy lands on a clean slate), then says it is ready.
//! 2. **The source copies** ([`run`]): through the commit pipeline it sets
//!    a watch on the partition's keys, then scans its rows and ships them,
//!    chunk by chunk, in its outbox to the destination (the hand-off that
//!    already carries events: durable on both sides, in order, re-driven
//!    after any doubt). Traffic goes on meanwhile.
//! 3. **The freeze** (one pipeline step, `crate::commit` `moves.rs`): the
//!    rows written since the watch began are read as they stand and
//!    shipped last, with the new epoch, and in the same batch the source
//!    records the destination as home. From then on it relays the
//!    partition's events there and refuses its users' requests; its
//!    shards close their connections with a redirect.
//! 4. **The destination takes over** when it applies that last entry: in
//!    the same batch it records the epoch and becomes home, so the events
//!    relayed after it are applied there, in order.
//! 5. **The map follows**: each side's coordinator writes the new home
//!    back to Redis (an epoch only ever grows there), and every node moves
//!    its table on. The source drops its copy of the rows, and the request.
//!
//! If a step before the freeze fails, nothing has changed hands: the
//! watch is dropped and the failure is written for the operator
//! (`swiftlet:moves:failed`). After the freeze the move is done, whatever
//! happens to either node: the rows and the hand-over wait in the source's
//! outbox until the destination applies them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::redis::Link;
use super::table::Table;
use super::{Home, Ownership, Partition};
use crate::commit::{CommitCmd, CommitHandle, MoveStep, MoveStepError, IMPORT_BYTES};
use crate::hub::mailbox::{ShardHandle, ShardMsg};
use crate::store::cluster::EpochRecord;
use crate::store::{Store, StoreError};

/// How long one pipeline step may take before the move gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// Why a move gave up.
#[derive(Debug, thiserror::Error)]
pub enum MoveFailed {
    #[error(transparent)]
    Step(#[from] MoveStepError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the commit pipeline did not answer a move step within {0:?}")]
    Timeout(Duration),
}

/// What the source's mover needs.
pub struct Source {
    pub partition: Partition,
    pub to: u16,
    pub store: Arc<Store>,
    pub commit: CommitHandle,
    pub table: Arc<Table>,
    pub shards: Arc<[ShardHandle]>,
    pub link: Link,
    /// Set while this mover runs; cleared when it ends.
    pub running: Arc<AtomicBool>,
}

/// The destination's preparation: drop this node's stale rows of `p`,
/// then say it is ready for the copy.
pub fn prepare(
    p: Partition,
    store: Arc<Store>,
    table: Arc<Table>,
    mut link: Link,
    running: Arc<AtomicBool>,
) {
    let local = |q: Partition| matches!(table.home(q), Home::Local { .. });
    match store.drop_rows(p, local) {
        Ok(n) => {
            tracing::info!(
                partition = p.0,
                dropped = n,
                "ready to take a partition over"
            );
            if let Err(e) = link.move_ready(p.0, table.me()) {
                crate::log_every!(1000, warn, error = %e, "saying a move may begin failed; retrying");
            }
        }
        Err(e) => {
            crate::log_every!(1000, error, partition = p.0, error = %e, "dropping stale rows before a move failed");
        }
    }
    running.store(false, Ordering::Release);
}

fn step(
    commit: &CommitHandle,
    make: impl FnOnce(crossbeam_channel::Sender<Result<(), MoveStepError>>) -> MoveStep,
) -> Result<(), MoveFailed> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    commit.submit_waiting(CommitCmd::Move(make(tx)));
    commit.combine(None);
    match rx.recv_timeout(STEP_DEADLINE) {
        Ok(r) => Ok(r?),
        Err(_) => Err(MoveFailed::Timeout(STEP_DEADLINE)),
    }
}

/// The source's mover: copy, freeze, hand over, clean up (see the module
/// doc).
pub fn run(mut s: Source) {
    let p = s.partition;
    match copy_and_hand_over(&s) {
        Ok(epoch) => {
            tracing::info!(partition = p.0, to = s.to, epoch, "partition handed over");
            // Her connections here go to the new home.
            for shard in s.shards.iter() {
                shard.send(ShardMsg::Rehome);
            }
            let table = s.table.clone();
            let local = |q: Partition| matches!(table.home(q), Home::Local { .. });
            match s.store.drop_rows(p, local) {
                Ok(n) => tracing::info!(
                    partition = p.0,
                    dropped = n,
                    "dropped the rows of a partition handed over"
                ),
                Err(e) => {
                    crate::log_every!(1000, warn, partition = p.0, error = %e, "dropping the rows of a partition handed over failed (they are dropped before it may come back)")
                }
            }
            if let Err(e) = s.link.move_done(p.0) {
                crate::log_every!(1000, warn, error = %e, "clearing a finished move's request failed");
            }
        }
        Err(e) => {
            s.store.unwatch(p);
            tracing::error!(partition = p.0, to = s.to, error = %e, "moving a partition failed; it stays here");
            if let Err(e2) = s.link.move_failed(p.0, &e.to_string()) {
                crate::log_every!(1000, warn, error = %e2, "recording a failed move failed");
            }
        }
    }
    s.running.store(false, Ordering::Release);
}

fn copy_and_hand_over(s: &Source) -> Result<u64, MoveFailed> {
    let p = s.partition;
    let epoch = match s.table.home(p) {
        Home::Local { epoch } => epoch + 1,
        _ => return Err(MoveStepError::NotHome(p.0).into()),
    };
    let started = std::time::Instant::now();
    step(&s.commit, |done| MoveStep::Watch { partition: p, done })?;
    let (mut chunks, mut rows_copied) = (0usize, 0usize);
    s.store.partition_rows(p, IMPORT_BYTES, |rows| {
        chunks += 1;
        rows_copied += rows.len();
        step(&s.commit, |done| MoveStep::Copy {
            partition: p,
            to: s.to,
            rows,
            done,
        })
    })?;
    let copied = started.elapsed();
    // Cursors and receipts acknowledged but still only in memory are
    // written now, so the tail carries them (one acknowledged after this
    // is dropped at the hand-over: a replay at the new home, never a skip).
    s.commit.flush();
    step(&s.commit, |done| MoveStep::Finish {
        partition: p,
        to: s.to,
        epoch,
        done,
    })?;
    tracing::info!(
        partition = p.0,
        rows = rows_copied,
        chunks,
        copy_ms = copied.as_millis() as u64,
        freeze_ms = (started.elapsed() - copied).as_millis() as u64,
        "partition copied, then frozen for its tail"
    );
    // The hand-over is in the WAL; sync it before anyone acts on it.
    s.store.put_epochs(&[EpochRecord {
        partition: p.0,
        node: s.to,
        epoch,
    }])?;
    Ok(epoch)
}
