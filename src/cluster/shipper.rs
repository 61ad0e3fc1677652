//! The shipper: moves this node's outbox into the destinations' Redis
//! streams, on its own thread, and is the pipeline's [`HandOff`].
//!
//! The pipeline hands it each outbox entry right after the write that made
//! it durable (a bounded queue; a full one drops, the entry is in the
//! outbox). It ships entries in seq order per destination, many per stream
//! entry. The outbox, not Redis, is the copy that matters, so whenever
//! there is doubt it *re-drives*: it ships again everything above the
//! destination's reported mark, read from the store. Doubt is: a gap in
//! what it was handed, a failed `XADD`, Redis having restarted, a
//! destination that was down coming back, or a mark that has not moved
//! for [`REDRIVE_AFTER`] while entries wait. Duplicates this makes are
//! dropped by the receiver. While a destination is down nothing is shipped
//! to it: its backlog waits in the outbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use super::handoff;
use super::redis::Link;
use super::table::Table;
use super::{HandOff, HandOffError, OutboxEntry};
use crate::store::Store;

/// Entries one stream entry carries at most.
const ENTRIES_PER_XADD: usize = 256;
/// Bytes one stream entry carries at most (beyond its first entry).
const BYTES_PER_XADD: usize = 1 << 20;
/// A destination whose mark has not moved for this long while entries
/// wait gets everything above its mark again.
pub const REDRIVE_AFTER: Duration = Duration::from_secs(3);
/// Entries handed over and not yet taken by the shipper thread.
const QUEUE: usize = 64 * 1024;

/// The pipeline's side of the shipper.
pub struct Shipper {
    tx: Sender<OutboxEntry>,
    rx: Receiver<OutboxEntry>,
    /// What each destination reported applying from this node.
    marks: Mutex<HashMap<u16, u64>>,
    /// Set when Redis may have lost what was shipped.
    redrive_all: AtomicBool,
    /// Counters for `/metrics` and `cluster status`.
    pub stats: ShipperStats,
}

/// What the shipper has done.
#[derive(Default)]
pub struct ShipperStats {
    pub shipped_entries: AtomicU64,
    pub redrives: AtomicU64,
    pub xadd_failures: AtomicU64,
}

impl Default for Shipper {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        Shipper {
            tx,
            rx,
            marks: Mutex::new(HashMap::new()),
            redrive_all: AtomicBool::new(false),
            stats: ShipperStats::default(),
        }
    }
}

impl HandOff for Shipper {
    fn ship(&self, entries: &[OutboxEntry]) -> Result<(), HandOffError> {
        for e in entries {
            match self.tx.try_send(e.clone()) {
                Ok(()) => {}
                // The entry is in the outbox; the shipper finds the gap.
                Err(TrySendError::Full(_)) => return Err(HandOffError::Unavailable),
                Err(TrySendError::Disconnected(_)) => return Err(HandOffError::Unavailable),
            }
        }
        Ok(())
    }

    fn acked(&self, to: u16) -> u64 {
        self.marks.lock().get(&to).copied().unwrap_or(0)
    }
}

impl Shipper {
    /// A destination reported its mark (the coordinator reads them).
    pub fn set_mark(&self, dest: u16, mark: u64) {
        let mut m = self.marks.lock();
        let e = m.entry(dest).or_insert(0);
        *e = (*e).max(mark);
    }

    /// Redis may have lost the streams: ship everything unacknowledged again.
    pub fn redrive_all(&self) {
        self.redrive_all.store(true, Ordering::Release);
    }
}

/// One destination as the shipper thread sees it.
#[derive(Default)]
struct Dest {
    /// Highest seq handed to Redis since the last doubt.
    shipped: u64,
    /// The mark at the last look, and when it last moved.
    mark: u64,
    progress: Option<Instant>,
    /// Something may be missing from its stream: re-drive when possible.
    dirty: bool,
}

/// The shipper thread's loop; returns when `stop` is set.
pub fn run(
    shipper: Arc<Shipper>,
    store: Arc<Store>,
    table: Arc<Table>,
    mut link: Link,
    stop: Arc<AtomicBool>,
) {
    let me = table.me();
    let mut dests: HashMap<u16, Dest> = HashMap::new();
    match store.outbox_dests() {
        Ok(ds) => {
            for d in ds {
                dests.insert(
                    d,
                    Dest {
                        dirty: true,
                        ..Dest::default()
                    },
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "reading the outbox destinations failed"),
    }
    let mut last_check = Instant::now();
    let mut fresh: Vec<OutboxEntry> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if let Ok(e) = shipper.rx.recv_timeout(Duration::from_millis(20)) {
            fresh.push(e);
            while fresh.len() < QUEUE {
                match shipper.rx.try_recv() {
                    Ok(e) => fresh.push(e),
                    Err(_) => break,
                }
            }
        }
        // Fresh entries, per destination, in order.
        let mut i = 0;
        while i < fresh.len() {
            let dest = fresh[i].to;
            let mut j = i;
            while j < fresh.len() && fresh[j].to == dest {
                j += 1;
            }
            let d = dests.entry(dest).or_default();
            if !table.alive(dest) {
                d.dirty = true;
            } else if !d.dirty {
                let batch: Vec<&OutboxEntry> =
                    fresh[i..j].iter().filter(|e| e.seq > d.shipped).collect();
                match batch.first() {
                    Some(first) if d.shipped != 0 && first.seq != d.shipped + 1 => d.dirty = true,
                    Some(_) => {
                        for chunk in batch.chunks(ENTRIES_PER_XADD) {
                            let first = chunk[0].seq;
                            let data = handoff::pack(chunk.iter().map(|e| &e.payload));
                            if ship(&mut link, &shipper, dest, me, first, &data) {
                                d.shipped = chunk[chunk.len() - 1].seq;
                            } else {
                                d.dirty = true;
                                break;
                            }
                        }
                    }
                    None => {}
                }
            }
            i = j;
        }
        fresh.clear();

        if last_check.elapsed() >= Duration::from_millis(250) {
            last_check = Instant::now();
            let all = shipper.redrive_all.swap(false, Ordering::AcqRel);
            for (&dest, d) in dests.iter_mut() {
                let mark = shipper.acked(dest);
                if mark > d.mark || d.progress.is_none() {
                    d.mark = mark;
                    d.progress = Some(Instant::now());
                }
                if all {
                    d.dirty = true;
                }
                let head = match store.outbox_head(dest) {
                    Ok(h) => h,
                    Err(e) => {
                        crate::log_every!(1000, error, error = %e, "reading the outbox failed");
                        continue;
                    }
                };
                let stuck =
                    head > d.mark && d.progress.is_some_and(|t| t.elapsed() >= REDRIVE_AFTER);
                if head > d.mark && (d.dirty || stuck) && table.alive(dest) {
                    shipper.stats.redrives.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(dest, from = d.mark + 1, head, "re-driving the outbox");
                    d.shipped = d.mark;
                    d.dirty = !redrive(&mut link, &shipper, &store, me, dest, d);
                    d.progress = Some(Instant::now());
                } else if head <= d.mark {
                    d.dirty = false;
                    d.shipped = d.shipped.max(head);
                }
            }
        }
    }
}

fn ship(link: &mut Link, shipper: &Shipper, dest: u16, me: u16, first: u64, data: &[u8]) -> bool {
    match link.ship(dest, me, first, data) {
        Ok(()) => {
            shipper
                .stats
                .shipped_entries
                .fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            shipper.stats.xadd_failures.fetch_add(1, Ordering::Relaxed);
            crate::log_every!(1000, warn, dest, error = %e, "shipping to another node failed; it will be re-driven");
            false
        }
    }
}

/// Ship everything in the outbox above `d.shipped`; false if it stopped
/// on a failure.
fn redrive(
    link: &mut Link,
    shipper: &Shipper,
    store: &Store,
    me: u16,
    dest: u16,
    d: &mut Dest,
) -> bool {
    loop {
        let entries = match store.outbox_after(dest, d.shipped, ENTRIES_PER_XADD, BYTES_PER_XADD) {
            Ok(e) => e,
            Err(e) => {
                crate::log_every!(1000, error, error = %e, "reading the outbox failed");
                return false;
            }
        };
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return true;
        };
        let (first, last) = (first.0, last.0);
        let data = handoff::pack(entries.iter().map(|(_, p): &(u64, Bytes)| p));
        if !ship(link, shipper, dest, me, first, &data) {
            return false;
        }
        d.shipped = last;
    }
}
