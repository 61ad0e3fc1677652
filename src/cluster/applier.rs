//! The applier: reads this node's Redis stream of hand-off entries, on its
//! own thread and its own connection (its reads block), and applies them
//! through the commit pipeline ([`CommitCmd::Apply`]).
//!
//! An entry is acknowledged (`XACK` and `XDEL`) only after the batch that
//! applied it, with the new "applied from that source" mark, is written;
//! then the mark is reported to the source, which trims its outbox up to
//! it. So Redis never holds the only copy: until the mark is reported the
//! source keeps its outbox entries, and re-drives them after any doubt.
//! Every mark is reported again every few seconds, in case Redis lost the
//! reports. If the stream or its consumer group is gone (Redis restarted
//! empty), they are created again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handoff;
use super::redis::Link;
use crate::commit::{CommitCmd, CommitHandle};
use crate::store::Store;

/// Stream entries read at a time.
const READ_COUNT: usize = 64;
/// How long one read waits for an entry.
const BLOCK: Duration = Duration::from_millis(500);
/// How often every mark is reported again.
const REPORT_ALL: Duration = Duration::from_secs(2);

/// What the applier has done.
#[derive(Default)]
pub struct ApplierStats {
    /// Outbox entries taken from the stream (applied, or duplicates).
    pub entries: AtomicU64,
    /// Stream entries that began after a gap (left for a re-drive).
    pub gaps: AtomicU64,
}

/// The applier thread's loop; returns when `stop` is set.
pub fn run(
    me: u16,
    store: Arc<Store>,
    commit: CommitHandle,
    mut link: Link,
    stats: Arc<ApplierStats>,
    stop: Arc<AtomicBool>,
) {
    let mut need_group = true;
    // After (re)creating the group, and after a failed apply, first read
    // what was delivered to us and never acknowledged.
    let mut pending = true;
    let mut last_report = Instant::now() - REPORT_ALL;
    while !stop.load(Ordering::Acquire) {
        if need_group {
            match link.ensure_group(me) {
                Ok(()) => {
                    need_group = false;
                    pending = true;
                }
                Err(e) => {
                    crate::log_every!(1000, warn, error = %e, "creating this node's stream failed; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        if last_report.elapsed() >= REPORT_ALL {
            last_report = Instant::now();
            match store.applied_all() {
                Ok(marks) => {
                    if let Err(e) = link.report_marks(me, &marks) {
                        crate::log_every!(1000, warn, error = %e, "reporting marks failed");
                    }
                }
                Err(e) => {
                    crate::log_every!(1000, error, error = %e, "reading the applied marks failed")
                }
            }
        }
        let entries = match link.read_stream(me, pending, READ_COUNT, BLOCK) {
            Ok(e) => e,
            Err(e) if e.is_no_group() => {
                need_group = true;
                continue;
            }
            Err(e) => {
                crate::log_every!(1000, warn, error = %e, "reading this node's stream failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if entries.is_empty() {
            pending = false;
            continue;
        }
        let mut waits = Vec::with_capacity(entries.len());
        let mut done_ids = Vec::new();
        for e in entries {
            if e.src == 0 || e.src == me {
                // Deleted meanwhile, or not for us to apply.
                done_ids.push(e.id);
                continue;
            }
            let parts = match handoff::unpack(e.data) {
                Ok(p) => p,
                Err(err) => {
                    crate::log_every!(1000, error, src = e.src, error = %err, "dropping an undecodable stream entry");
                    done_ids.push(e.id);
                    continue;
                }
            };
            let count = parts.len() as u64;
            let (tx, rx) = crossbeam_channel::bounded(1);
            commit.submit_waiting(CommitCmd::Apply {
                src: e.src,
                first: e.first,
                entries: parts,
                done: tx,
            });
            waits.push((e.id, e.src, e.first, count, rx));
        }
        commit.combine(None);
        let mut marks: HashMap<u16, u64> = HashMap::new();
        for (id, src, first, count, rx) in waits {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(mark) => {
                    let last = first + count.saturating_sub(1);
                    if mark >= last {
                        // Applied, now or before: done with it.
                        stats.entries.fetch_add(count, Ordering::Relaxed);
                    } else {
                        stats.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    // A gap (mark < first - 1) is acknowledged too: the
                    // source re-drives from the mark we report.
                    done_ids.push(id);
                    let m = marks.entry(src).or_insert(0);
                    *m = (*m).max(mark);
                }
                Err(_) => {
                    // Not written: leave it pending and read it again.
                    pending = true;
                }
            }
        }
        if let Err(e) = link.ack(me, &done_ids) {
            crate::log_every!(1000, warn, error = %e, "acknowledging stream entries failed");
        }
        let marks: Vec<(u16, u64)> = marks.into_iter().collect();
        if let Err(e) = link.report_marks(me, &marks) {
            crate::log_every!(1000, warn, error = %e, "reporting marks failed");
        }
    }
}
