//! Retention: how much of each inbox the store keeps, and the background
//! trimmer that removes the rest, together with the messages no inbox
//! references any more. Dedup records expire on their own, by a compaction
//! filter ([`dedup_filter`]).
//!
//! # What is kept
//!
//! An inbox keeps its newest `keep` events (0: no limit by count) and every
//! event younger than `max_age` (0: no limit by age); an event goes once
//! either rule lets it go. The newest event of an inbox is always kept,
//! whatever its age: it holds the inbox's head seq, from which the next
//! event's seq is counted, so an inbox never starts again at 1.
//!
//! # Why range deletions, and never a hole in the middle
//!
//! What is trimmed is always a *prefix* of the inbox: the trimmer walks an
//! inbox from its oldest event and stops at the first one it must keep
//! ([`Walk`]), then removes `[0, floor)` with one RocksDB range deletion.
//! A range deletion is visible to every read at once and atomically, so an
//! inbox is always a contiguous run of seqs `first..=head`, and the first
//! key a read finds *is* the oldest seq the server still holds: what
//! `first_available_seq` reports, on every path, without any bookkeeping.
//! RocksDB drops the covered keys (and then the tombstone) in its own
//! compactions. A compaction filter on the inbox was the other candidate
//! and was rejected: it runs file by file, whenever RocksDB compacts, so an
//! inbox whose older events sit in a lower level than its newer ones would
//! lose a middle event before an older one, a hole no seq can describe; and
//! its decisions cannot be seen by a read before the compaction happens.
//!
//! # Off the hot path
//!
//! Nothing on the commit path scans or deletes. An append only compares
//! its seq with the limit: each time an inbox grows by another
//! [`Policy::step`] events past `keep`, the store hands the user's name to
//! the trimmer thread (a bounded channel; a full one drops the note, and
//! the next sweep catches up). So an inbox holds between `keep` and
//! `keep + step` events between trims. Every [`Policy::sweep_every`] the
//! trimmer also sweeps all inboxes, two seeks per user, for what aged out.
//! The trimmer runs on its own thread; its writes are small batches.
//!
//! # Messages
//!
//! A message is stored once and referenced by every inbox it went to: two
//! for a 1:1 message (recipient and sender), every member's for a group
//! post, one per local inbox on each node of a cluster. Each reference
//! written adds one to the message's count in the `refs` column family (a
//! merge, coalesced within a batch: one write per message, not per
//! recipient). The trimmer, in the batch that removes inbox entries,
//! subtracts what it removed, and deletes the message and its count when
//! that reaches zero. The count is read and written under the store's
//! `gc` lock, which a commit holds for reading while it writes if it adds
//! or removes a reference to a message it did not mint itself: a commit
//! that adds a reference to a stored message (a cluster relays the same
//! message to a second local member later) is either seen by the trimmer
//! or comes after the delete and stores the message again. A commit whose
//! references all go to messages it minted (every group commit of sends)
//! cannot touch a count the trimmer reads, since no stored row names those
//! messages yet, and does not wait for a trim: one holds the lock for
//! milliseconds. A message with no count (written before counts existed)
//! is never deleted.
//!
//! # Dedup records
//!
//! A dedup record (the Ack of a `client_msg_id`) is needed only while its
//! sender may still retry. Past `dedup_window` after its Ack, compactions
//! drop it ([`dedup_filter`]); until a compaction reaches it, a late retry
//! is still answered with the first Ack. The filter reads the node's
//! [`Clock`], so a test moves time by hand.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use rocksdb::compaction_filter::Decision;
use rocksdb::ReadOptions;
use swiftlet_protocol::pb;

use super::engine::Shared;
use super::keys::{self, InboxEntry};
use super::{cf, handle, StoreError};
use crate::clock::Clock;

/// What each inbox keeps, and how long dedup records last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The newest events kept per inbox; 0: no limit.
    pub keep: u64,
    /// Events younger than this are kept; zero: no limit.
    pub max_age: Duration,
    /// Dedup records older than this may be dropped; zero: kept forever.
    pub dedup_window: Duration,
}

impl Default for Policy {
    /// Keep everything (what a store opened without a policy does).
    fn default() -> Self {
        Policy {
            keep: 0,
            max_age: Duration::ZERO,
            dedup_window: Duration::ZERO,
        }
    }
}

impl Policy {
    /// Whether inboxes are trimmed at all.
    pub fn trims(&self) -> bool {
        self.keep > 0 || !self.max_age.is_zero()
    }

    /// How many events past `keep` an inbox grows before the store asks the
    /// trimmer to trim it: an eighth of `keep`, so a trim's tombstone
    /// covers many entries and an inbox stays within 12.5 % of its limit.
    pub fn step(&self) -> u64 {
        (self.keep / 8).max(1)
    }

    /// Whether the append of `seq` should wake the trimmer for its inbox.
    #[inline]
    pub fn due(&self, seq: u64) -> bool {
        self.keep > 0 && seq > self.keep && (seq - self.keep).is_multiple_of(self.step())
    }

    /// How often the trimmer sweeps every inbox: a tenth of `max_age`
    /// (so an event outlives it by at most 10 %), between 1 s and 1 h;
    /// hourly when only the count limits (the sweep then only catches
    /// notes a full channel dropped).
    pub fn sweep_every(&self) -> Duration {
        if self.max_age.is_zero() {
            Duration::from_secs(3600)
        } else {
            (self.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
        }
    }

    /// The trim rule for an inbox whose newest seq is `head`, at `now_ms`.
    pub fn walk(&self, head: u64, now_ms: u64) -> Walk {
        let count_floor = if self.keep > 0 && head > self.keep {
            head - self.keep + 1
        } else {
            0
        };
        let age_ms = u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX);
        Walk {
            head,
            count_floor,
            cutoff_ms: (age_ms > 0).then(|| now_ms.saturating_sub(age_ms)),
        }
    }
}

/// The trim decision for one inbox: which of its oldest events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// The newest seq: never trimmed.
    pub head: u64,
    /// Events below this seq go (the count rule); 0: none by count.
    pub count_floor: u64,
    /// Events stamped before this Unix ms go (the age rule).
    pub cutoff_ms: Option<u64>,
}

impl Walk {
    /// Whether the event `seq`, stamped `time_ms` (None: unknown), goes.
    /// Applied from the oldest event on, the trim stops at the first event
    /// kept: what goes is always a prefix.
    pub fn trims(&self, seq: u64, time_ms: Option<u64>) -> bool {
        if seq >= self.head {
            return false;
        }
        if seq < self.count_floor {
            return true;
        }
        matches!((self.cutoff_ms, time_ms), (Some(c), Some(t)) if t < c)
    }

    /// The first seq kept of an inbox whose events, oldest first, are
    /// `events` (seq, time): everything before it goes.
    pub fn floor(&self, events: impl IntoIterator<Item = (u64, Option<u64>)>) -> Option<u64> {
        let mut floor = None;
        for (seq, time) in events {
            if !self.trims(seq, time) {
                break;
            }
            floor = Some(seq + 1);
        }
        floor
    }
}

/// The time an inline inbox event (group change, receipt) was made, from
/// its encoded `pb::Event`; None when it carries none.
pub fn inline_time(raw: &[u8]) -> Option<u64> {
    match pb::Event::decode(raw).ok()?.kind? {
        pb::event::Kind::GroupEvent(g) => Some(g.timestamp_ms),
        pb::event::Kind::Receipt(r) => Some(r.timestamp_ms),
        pb::event::Kind::Message(m) => Some(m.timestamp_ms),
    }
    .filter(|&t| t > 0)
}

/// The compaction filter of the dedup column family: drops the records
/// whose Ack is older than `window` by `clock`. A record that does not
/// decode is kept (a read reports it).
pub fn dedup_filter(
    window: Duration,
    clock: Clock,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    move |_level, _key, value| {
        if window_ms == 0 {
            return Decision::Keep;
        }
        match pb::Ack::decode(value) {
            Ok(ack) if ack.timestamp_ms.saturating_add(window_ms) < clock.now_ms() => {
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}

/// The merge operator of the `refs` column family: reference counts as
/// `i64` big-endian deltas, summed. A value of another length is a
/// corruption (the merge fails, and so does the read).
pub fn add_refs(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut sum = match existing {
        Some(v) => decode_refs(v)?,
        None => 0,
    };
    for op in operands {
        sum = sum.saturating_add(decode_refs(op)?);
    }
    Some(sum.to_be_bytes().to_vec())
}

/// A reference count or delta.
pub fn decode_refs(v: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes)
}

/// What one trim pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    /// Inboxes that lost events.
    pub inboxes: u64,
    /// Inbox events removed.
    pub events: u64,
    /// Messages deleted because no inbox references them any more.
    pub messages: u64,
}

impl std::ops::AddAssign for TrimReport {
    fn add_assign(&mut self, o: TrimReport) {
        self.inboxes += o.inboxes;
        self.events += o.events;
        self.messages += o.messages;
    }
}

/// Users whose inbox grew past another step, for the trimmer.
pub(super) type Notes = crossbeam_channel::Sender<Arc<str>>;

/// How many notes wait at most; more are dropped (the sweep catches up).
pub(super) const NOTES: usize = 4096;

/// Most inbox events one trim batch removes; a longer prefix takes several.
pub(super) const MAX_TRIM_BATCH: usize = 4096;

/// Trim `user`'s inbox by the store's policy, now; returns what went.
/// Holds the trim lock for the whole pass, so two trims never decide on
/// the same events (their reference counts would be subtracted twice).
pub(super) fn trim_user(shared: &Shared, user: &str) -> Result<TrimReport, StoreError> {
    let _trimming = shared.trim.lock();
    let mut report = TrimReport::default();
    loop {
        let (removed, more) = trim_batch(shared, user)?;
        report += removed;
        if !more {
            return Ok(report);
        }
    }
}

/// One batch of [`trim_user`]: at most [`MAX_TRIM_BATCH`] events; true
/// when more may go.
fn trim_batch(shared: &Shared, user: &str) -> Result<(TrimReport, bool), StoreError> {
    let db = shared.engine();
    if !db.writable || !shared.writable() {
        return Ok((TrimReport::default(), false));
    }
    let inbox = handle(&db, cf::INBOX)?;
    let prefix = keys::user_prefix(user);
    let head = {
        let mut it = db.raw_iterator_cf(inbox);
        it.seek_for_prev(keys::inbox_key(user, u64::MAX));
        it.status()?;
        match it.key() {
            Some(k) if k.starts_with(&prefix) => keys::seq_of_inbox_key(&prefix, k)?,
            _ => return Ok((TrimReport::default(), false)),
        }
    };
    let walk = shared.policy.walk(head, shared.clock.now_ms());
    // Never past the head, which is never trimmed.
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(keys::inbox_key(user, head));
    let mut it = db.raw_iterator_cf_opt(inbox, ro);
    it.seek(&prefix);
    let mut floor = None;
    let mut refs: Vec<u64> = Vec::new();
    let mut events = 0u64;
    let mut more = false;
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if events as usize == MAX_TRIM_BATCH {
            more = true;
            break;
        }
        let seq = keys::seq_of_inbox_key(&prefix, k)?;
        let entry = InboxEntry::decode(v)?;
        let time = match &entry {
            InboxEntry::Message(id) => Some(crate::ids::timestamp_of(*id)),
            InboxEntry::Inline(raw) => inline_time(raw),
        };
        if !walk.trims(seq, time) {
            break;
        }
        if let InboxEntry::Message(id) = entry {
            refs.push(id);
        }
        floor = Some(seq + 1);
        events += 1;
        it.next();
    }
    it.status()?;
    drop(it);
    let Some(floor) = floor else {
        return Ok((TrimReport::default(), false));
    };

    let mut wb = rocksdb::WriteBatch::default();
    wb.delete_range_cf(
        inbox,
        keys::inbox_key(user, 0),
        keys::inbox_key(user, floor),
    );
    refs.sort_unstable();
    let mut released: Vec<(u64, i64)> = Vec::new();
    for id in refs {
        match released.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => released.push((id, 1)),
        }
    }
    // Counts are read and written with commits held off: see the module doc.
    let _gc = shared.gc.write();
    if shared.closed.load(Ordering::SeqCst) {
        return Err(StoreError::Closed);
    }
    let refs_cf = handle(&db, cf::REFS)?;
    let messages = handle(&db, cf::MESSAGES)?;
    let counts = db.multi_get_cf(released.iter().map(|(id, _)| (refs_cf, id.to_be_bytes())));
    let mut deleted = 0;
    for ((id, n), count) in released.iter().zip(counts) {
        let Some(count) = count? else {
            // Written before counts existed: who else holds it is unknown.
            continue;
        };
        let count = decode_refs(&count)
            .ok_or_else(|| StoreError::Corrupt(format!("refs of message {id}")))?;
        if count - n <= 0 {
            wb.delete_cf(messages, id.to_be_bytes());
            wb.delete_cf(refs_cf, id.to_be_bytes());
            deleted += 1;
        } else {
            wb.merge_cf(refs_cf, id.to_be_bytes(), (-n).to_be_bytes());
        }
    }
    if let Err(e) = db.write(wb) {
        shared.write_failed(&db, Some(&e));
        return Err(e.into());
    }
    Ok((
        TrimReport {
            inboxes: 1,
            events,
            messages: deleted,
        },
        more,
    ))
}

/// Trim every inbox that has something to lose now (two seeks per user;
/// more only for an inbox that loses events).
pub(super) fn sweep(shared: &Shared) -> Result<TrimReport, StoreError> {
    let mut report = TrimReport::default();
    if !shared.policy.trims() {
        return Ok(report);
    }
    let mut from: Vec<u8> = Vec::new();
    loop {
        // The next user at or after `from`, and whether its oldest event
        // would go: read on an engine let go before trimming.
        let user = {
            let db = shared.engine();
            let inbox = handle(&db, cf::INBOX)?;
            let mut it = db.raw_iterator_cf(inbox);
            it.seek(&from);
            it.status()?;
            let Some(k) = it.key() else {
                return Ok(report);
            };
            let user = user_of_inbox_key(k)?;
            from = keys::user_prefix(user);
            // Past every key of this user: `user ‖ 0x01`.
            if let Some(last) = from.last_mut() {
                *last = 1;
            }
            user.to_owned()
        };
        report += trim_user(shared, &user)?;
    }
}

/// The user of an inbox key (`user ‖ 0x00 ‖ seq: u64 BE`).
fn user_of_inbox_key(k: &[u8]) -> Result<&str, StoreError> {
    k.len()
        .checked_sub(9)
        .filter(|&n| k[n] == 0)
        .and_then(|n| std::str::from_utf8(&k[..n]).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("inbox key of {} bytes", k.len())))
}

/// The trimmer thread: trims the inboxes the store notes, and sweeps all
/// of them every [`Policy::sweep_every`]. Stops when dropped.
pub(super) struct Trimmer {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trimmer {
    /// Start the thread, unless the policy trims nothing.
    pub(super) fn start(
        shared: Arc<Shared>,
        notes: crossbeam_channel::Receiver<Arc<str>>,
    ) -> std::io::Result<Trimmer> {
        if !shared.policy.trims() {
            return Ok(Trimmer {
                stop: None,
                thread: None,
            });
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let every = shared.policy.sweep_every();
        let thread = std::thread::Builder::new()
            .name("swiftlet-trimmer".into())
            .spawn(move || {
                let mut next_sweep = std::time::Instant::now() + every;
                loop {
                    crossbeam_channel::select! {
                        recv(stopped) -> _ => return,
                        recv(notes) -> user => {
                            let Ok(user) = user else { return };
                            if let Err(e) = trim_user(&shared, &user) {
                                crate::log_every!(10_000, warn, error = %e, "trimming an inbox failed");
                            }
                        }
                        recv(crossbeam_channel::at(next_sweep)) -> _ => {
                            match sweep(&shared) {
                                Ok(r) if r.events > 0 => tracing::info!(
                                    inboxes = r.inboxes,
                                    events = r.events,
                                    messages = r.messages,
                                    "retention trimmed inboxes"
                                ),
                                Ok(_) => {}
                                Err(e) => crate::log_every!(10_000, warn, error = %e, "a retention sweep failed"),
                            }
                            next_sweep = std::time::Instant::now() + every;
                        }
                    }
                }
            })?;
        Ok(Trimmer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(keep: u64, age_s: u64) -> Policy {
        Policy {
            keep,
            max_age: Duration::from_secs(age_s),
            dedup_window: Duration::ZERO,
        }
    }

    #[test]
    fn the_count_keeps_the_newest_and_the_head_always_stays() {
        let w = policy(3, 0).walk(10, 0);
        let events = (1..=10).map(|s| (s, None));
        assert_eq!(w.floor(events), Some(8));
        // Fewer than keep: nothing goes.
        assert_eq!(
            policy(30, 0).walk(10, 0).floor((1..=10).map(|s| (s, None))),
            None
        );
        // Everything aged out: all but the head goes.
        let w = policy(0, 60).walk(10, 1_000_000);
        assert_eq!(w.floor((1..=10).map(|s| (s, Some(0)))), Some(10));
        // Keep everything.
        assert!(!policy(0, 0).trims());
        assert_eq!(
            policy(0, 0)
                .walk(10, 1 << 40)
                .floor((1..=10).map(|s| (s, Some(0)))),
            None
        );
    }

    #[test]
    fn age_stops_at_the_first_young_event_so_only_a_prefix_goes() {
        let w = policy(0, 60).walk(6, 100_000);
        // Cutoff 40_000: seq 3 is young, seq 4 old again (another node's
        // clock): 4 stays until 3 goes.
        let events = [
            (1, Some(1)),
            (2, Some(39_999)),
            (3, Some(40_000)),
            (4, Some(5)),
            (5, None),
            (6, Some(0)),
        ];
        assert_eq!(w.floor(events), Some(3));
        // An event without a time stops an age trim.
        assert_eq!(w.floor([(1, None), (2, Some(1))]), None);
    }

    #[test]
    fn notes_come_once_per_step_past_the_limit() {
        let p = policy(16, 0);
        let due: Vec<u64> = (1..=40).filter(|&s| p.due(s)).collect();
        assert_eq!(due, vec![18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40]);
        assert!(!(1..=1000).any(|s| policy(0, 60).due(s)));
    }

    #[test]
    fn refs_merge_by_summing_and_refuse_garbage() {
        let enc = |n: i64| n.to_be_bytes().to_vec();
        assert_eq!(decode_refs(&enc(-3)), Some(-3));
        assert_eq!(decode_refs(&[1, 2]), None);
    }

    #[test]
    fn the_dedup_filter_drops_only_acks_past_the_window() {
        let clock = crate::clock::ManualClock::new(1_000_000);
        let mut f = dedup_filter(Duration::from_secs(10), clock.clock());
        let ack = |t: u64| {
            pb::Ack {
                client_msg_id: "c".into(),
                server_msg_id: 1,
                timestamp_ms: t,
                seq: 0,
            }
            .encode_to_vec()
        };
        assert!(matches!(f(0, b"k", &ack(990_000)), Decision::Keep));
        assert!(matches!(f(0, b"k", &ack(989_999)), Decision::Remove));
        assert!(matches!(f(0, b"k", b"\xff\xff"), Decision::Keep));
        let mut forever = dedup_filter(Duration::ZERO, clock.clock());
        assert!(matches!(forever(0, b"k", &ack(0)), Decision::Keep));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Whatever the limits and the times: what goes is a prefix that
        /// never reaches the head, by count alone the `keep` newest stay, no
        /// event goes that both rules would keep, and the trim goes as far
        /// as the rules allow (the first event kept is one it must keep).
        #[test]
        fn the_trim_is_the_longest_prefix_the_rules_allow(
            keep in 0u64..20,
            age_s in 0u64..5,
            first in 1u64..30,
            len in 1usize..40,
            times in proptest::collection::vec(proptest::option::weighted(0.9, 0u64..10_000), 40),
            now in 0u64..12_000,
        ) {
            let p = policy(keep, age_s);
            let head = first + len as u64 - 1;
            let events: Vec<(u64, Option<u64>)> =
                (first..=head).zip(times.iter().copied()).collect();
            let w = p.walk(head, now);
            let floor = w.floor(events.iter().copied()).unwrap_or(first);
            prop_assert!(floor >= first && floor <= head, "floor {} outside {}..={}", floor, first, head);
            if keep > 0 && age_s == 0 {
                prop_assert!(head - floor + 1 >= keep.min(head - first + 1));
            }
            for &(seq, time) in &events {
                if seq < floor {
                    let by_count = keep > 0 && seq + keep <= head;
                    let by_age = age_s > 0
                        && time.is_some_and(|t| t + age_s * 1000 < now);
                    prop_assert!(by_count || by_age, "seq {} went for no reason", seq);
                } else if seq == floor && seq < head {
                    prop_assert!(!w.trims(seq, time));
                }
            }
            if !p.trims() {
                prop_assert_eq!(floor, first);
            }
        }
    }
}
