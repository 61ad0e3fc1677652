//! The pipeline's part in moving a partition to another node (the whole
//! move is `crate::cluster::mover`'s): the steps that must sit between two
//! group commits, because the pipeline is the one writer and a move is
//! only safe against what it writes.
//!
//! On the node the partition leaves:
//!
//! - [`MoveStep::Watch`]: the store starts noting the partition's keys
//!   that commits write (so no commit straddles the start of the copy).
//! - [`MoveStep::Copy`]: one chunk of the rows the mover read is put into
//!   the outbox for the destination, as an [`Import`], in a batch of its
//!   own. The outbox orders it with everything else this node sends there.
//! - [`MoveStep::Finish`], the freeze: the rows written since the watch
//!   began are read as they stand now (the *tail*) and put into the outbox
//!   the same way, the last one naming the new epoch; the new home is
//!   recorded, and the ownership table says so, in the same batch. From
//!   the next group on, this node relays the partition's events to its new
//!   home, refuses its users' requests, and writes none of its rows. The
//!   freeze lasts this one step: reading the tail.
//!
//! On the destination, [`Pipeline::apply_import`] (from the hand-off, in
//! the source's order) puts the rows, and at the tail takes the partition
//! over: it records the epoch and becomes home in the same batch, so the
//! events the source relayed after the tail, next in the same stream, are
//! applied here, in order. If that batch is not written the table says
//! again what it said before.

use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;
use prost::Message as _;

use super::group::{Pipeline, Work};
use crate::cluster::handoff::{Import, RelayEntry, RelayEvent, Row};
use crate::cluster::{Home, OutboxEntry, Partition};
use crate::store::cluster::EpochRecord;
use crate::store::partition::{MoveError, Record};
use crate::store::StoreError;

/// Rows one outbox entry of a move carries at most, in bytes (beyond its
/// first row): well under what one Redis stream entry takes.
pub const IMPORT_BYTES: usize = 256 * 1024;

/// One step of moving a partition away (see the module doc).
pub enum MoveStep {
    Watch {
        partition: Partition,
        done: Sender<Result<(), MoveStepError>>,
    },
    Copy {
        partition: Partition,
        to: u16,
        rows: Vec<Record>,
        done: Sender<Result<(), MoveStepError>>,
    },
    Finish {
        partition: Partition,
        to: u16,
        /// The partition's epoch at its new home.
        epoch: u64,
        done: Sender<Result<(), MoveStepError>>,
    },
}

/// Why a step of a move failed (the move gives up; the partition stays).
#[derive(Debug, thiserror::Error)]
pub enum MoveStepError {
    #[error("this node is not home to partition {0} (or not a cluster node)")]
    NotHome(u16),
    #[error("the epoch of partition {0} changed during the move")]
    EpochChanged(u16),
    #[error(transparent)]
    Rows(#[from] MoveError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Pipeline {
    /// Run one step, in a batch of its own.
    pub(super) fn move_step(&mut self, step: MoveStep) {
        match step {
            MoveStep::Watch { partition, done } => {
                let r = self.home_epoch(partition).map(|_| {
                    self.store.watch(partition);
                });
                let _ = done.send(r);
            }
            MoveStep::Copy {
                partition,
                to,
                rows,
                done,
            } => {
                let r = self.copy(partition, to, rows);
                let _ = done.send(r);
            }
            MoveStep::Finish {
                partition,
                to,
                epoch,
                done,
            } => {
                let r = self.finish(partition, to, epoch);
                if r.is_err() {
                    self.store.unwatch(partition);
                }
                let _ = done.send(r);
            }
        }
    }

    /// The epoch at which this node is home to `p`.
    fn home_epoch(&self, p: Partition) -> Result<u64, MoveStepError> {
        match self.routes.as_ref().map(|r| r.ownership.home(p)) {
            Some(Home::Local { epoch }) if self.writable() => Ok(epoch),
            _ => Err(MoveStepError::NotHome(p.0)),
        }
    }

    fn copy(&mut self, p: Partition, to: u16, rows: Vec<Record>) -> Result<(), MoveStepError> {
        self.home_epoch(p)?;
        let mut w = Work::default();
        let entries = self.put_imports(&mut w, p, to, rows, 0)?;
        self.write_move(w, &entries, None)
    }

    fn finish(&mut self, p: Partition, to: u16, epoch: u64) -> Result<(), MoveStepError> {
        let old = self.home_epoch(p)?;
        if epoch <= old {
            return Err(MoveStepError::EpochChanged(p.0));
        }
        let tail = self.store.take_tail(p)?;
        let mut w = Work::default();
        let entries = self.put_imports(&mut w, p, to, tail, epoch)?;
        self.store.put_epoch(
            &mut w.batch,
            EpochRecord {
                partition: p.0,
                node: to,
                epoch,
            },
        );
        let undo = (p, Home::Local { epoch: old });
        if let Some(r) = &self.routes {
            r.ownership.set_home(p, Home::Remote { node: to, epoch });
        }
        self.write_move(w, &entries, Some(undo))?;
        // Nothing of the partition is cached here any more: should it come
        // back, its heads and groups are read from the rows it brings.
        self.heads.clear();
        self.groups.clear();
        Ok(())
    }

    /// Put `rows` of `p` into the outbox for `to`, in entries of about
    /// [`IMPORT_BYTES`]; the last names `home_epoch` (0: not the tail).
    /// There is always at least one entry.
    fn put_imports(
        &mut self,
        w: &mut Work,
        p: Partition,
        to: u16,
        rows: Vec<Record>,
        home_epoch: u64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut chunks: Vec<Vec<Row>> = vec![Vec::new()];
        let mut bytes = 0;
        for r in rows {
            let size = 16 + r.key.len() + r.value.as_ref().map_or(0, Vec::len);
            if bytes + size > IMPORT_BYTES && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(c) = chunks.last_mut() {
                c.push(Row::from(r));
            }
        }
        let last = chunks.len() - 1;
        let mut out = Vec::with_capacity(chunks.len());
        for (i, rows) in chunks.into_iter().enumerate() {
            let import = Import {
                partition: u32::from(p.0),
                rows,
                home_epoch: if i == last { home_epoch } else { 0 },
            };
            let entry = RelayEntry {
                events: vec![RelayEvent {
                    import: Some(import),
                    ..RelayEvent::default()
                }],
            };
            out.push(self.put_outbox_entry(w, to, Bytes::from(entry.encode_to_vec()))?);
        }
        Ok(out)
    }

    /// Write a move's batch, then hand its entries off; when the write
    /// fails, put back the home `undo` names.
    fn write_move(
        &mut self,
        mut w: Work,
        entries: &[OutboxEntry],
        undo: Option<(Partition, Home)>,
    ) -> Result<(), MoveStepError> {
        match self.store.commit(std::mem::take(&mut w.batch)) {
            Ok(()) => {
                self.hand_off(entries);
                Ok(())
            }
            Err(e) => {
                if let (Some((p, home)), Some(r)) = (undo, &self.routes) {
                    r.ownership.set_home(p, home);
                }
                // The outbox heads given out may be ahead of the store.
                self.relay.clear();
                Err(e.into())
            }
        }
    }

    /// Put the rows of a partition moving here (see the module doc); at
    /// the tail, take it over. What was taken over is listed in
    /// [`Work::taken`], to be put back if the batch is not written.
    pub(super) fn apply_import(&mut self, w: &mut Work, import: Import) -> Result<(), StoreError> {
        let Some(routes) = self.routes.clone() else {
            return Ok(());
        };
        let Ok(p) = u16::try_from(import.partition) else {
            crate::log_every!(
                1000,
                error,
                partition = import.partition,
                "an import names no partition"
            );
            return Ok(());
        };
        let p = Partition(p);
        let rows: Vec<Record> = import
            .rows
            .into_iter()
            .filter_map(Row::into_record)
            .collect();
        // Inbox heads of users whose rows arrive in this batch: later
        // events of this group take the seqs after them.
        let heads: Vec<(Arc<str>, u64)> = rows
            .iter()
            .filter_map(|r| r.inbox_slot().map(|(u, seq)| (Arc::from(u), seq)))
            .collect();
        let own = |q: Partition| matches!(routes.ownership.home(q), Home::Local { .. });
        let n = self.store.put_rows(&mut w.batch, rows, own)?;
        w.writes += n.max(1);
        for (user, seq) in heads {
            let head = match self.heads.get(&*user) {
                Some(h) => h,
                None => self.store.last_seq(&user)?,
            };
            if seq > head {
                self.heads.insert(user, seq);
            }
        }
        if import.home_epoch != 0 {
            let before = routes.ownership.home(p);
            let newer = match before {
                Home::Local { epoch } | Home::Remote { epoch, .. } => import.home_epoch > epoch,
                Home::Unknown => true,
            };
            if newer {
                self.store.put_epoch(
                    &mut w.batch,
                    EpochRecord {
                        partition: p.0,
                        node: routes.node,
                        epoch: import.home_epoch,
                    },
                );
                routes.ownership.set_home(
                    p,
                    Home::Local {
                        epoch: import.home_epoch,
                    },
                );
                w.taken.push((p, before));
                self.groups.clear();
                tracing::info!(
                    partition = p.0,
                    epoch = import.home_epoch,
                    "took a partition over"
                );
            } else {
                crate::log_every!(
                    1000,
                    warn,
                    partition = p.0,
                    epoch = import.home_epoch,
                    "an import older than the home this node knows; not taking it over"
                );
            }
        }
        Ok(())
    }

    /// Put back the homes taken over in `w` from the `from`-th on (their
    /// batch was not written).
    pub(super) fn give_back(&self, w: &mut Work, from: usize) {
        if let Some(r) = &self.routes {
            while w.taken.len() > from {
                if let Some((p, home)) = w.taken.pop() {
                    r.ownership.set_home(p, home);
                }
            }
        }
    }
}
