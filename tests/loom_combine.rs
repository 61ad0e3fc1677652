//! A loom model of flat combining (src/commit/combine.rs): no queued item is
//! left behind. After every thread's `submit` and `combine` returned, each
//! item was either committed or some shard was woken to commit it; and the
//! woken shards' next turns commit everything.
//!
//! Runs with `cargo nextest run --release --features loom --test
//! loom_combine` (`make test` does). The module is compiled here on its own,
//! so the model needs no RocksDB. With the `loom` feature it runs on loom's
//! atomics and `Arc`, and on a lock and a bounded queue built from them
//! with no more ordering than parking_lot's and crossbeam's promise (see
//! `model` in combine.rs): so a holder can miss a push made while it held
//! the lock unless the two `SeqCst` fences order them. Without either fence,
//! or without the wake-up, every test here fails.
//!
//! Each thread is a shard's turn: it queues, combines, then takes its own
//! wake-ups, one more `combine` each, as a shard's next turns would. So a
//! wake-up taken before an item was queued does not count for that item.
#![cfg(feature = "loom")]

// `flush` is not modelled (it takes the lock and waits).
#[allow(dead_code)]
#[path = "../src/commit/combine.rs"]
mod combine;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc as StdArc;

use combine::{Combiner, Committer, Wake};

/// Commits one item per group (so every other item has to wait for a
/// second group), recording each as a bit. Only the lock holder touches it,
/// and the model reads it after joining every thread, so a plain atomic
/// (invisible to loom, adding no interleavings) is enough.
struct Log {
    committed: StdArc<AtomicUsize>,
}

impl Committer for Log {
    type Item = usize;
    const MAX_GROUP: usize = 1;

    fn commit(&mut self, group: &mut Vec<usize>, _own: Option<usize>) {
        for bit in group.drain(..) {
            let before = self.committed.fetch_or(bit, Relaxed);
            assert_eq!(before & bit, 0, "item {bit} committed twice");
        }
    }
}

/// Every shard's wake-up flag: set by `wake`, taken by the shard's next
/// turn (read and cleared by the model's threads and after the joins, like
/// `Log`).
#[derive(Clone)]
struct Shard {
    woken: StdArc<[AtomicBool; SHARDS]>,
    index: usize,
}

const SHARDS: usize = 2;

impl Wake for Shard {
    fn wake(&self) {
        self.woken[self.index].store(true, Relaxed);
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(PREEMPTIONS);
    builder.check(f);
}

/// Enough for any two-party hand-off (the bugs it looks for need one or
/// two), and few enough that the file runs in seconds.
const PREEMPTIONS: usize = 3;

struct Setup {
    c: Combiner<Log, Shard>,
    committed: StdArc<AtomicUsize>,
    woken: StdArc<[AtomicBool; SHARDS]>,
}

fn setup(queue: usize) -> Setup {
    let committed = StdArc::new(AtomicUsize::new(0));
    let woken = StdArc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let log = Log {
        committed: committed.clone(),
    };
    let shards = (0..SHARDS)
        .map(|index| Shard {
            woken: woken.clone(),
            index,
        })
        .collect();
    Setup {
        c: Combiner::new(log, queue, shards),
        committed,
        woken,
    }
}

/// The rest of shard `i`'s turns: one more `combine` per wake-up taken.
fn turns(c: &Combiner<Log, Shard>, woken: &[AtomicBool; SHARDS], i: usize) {
    while woken[i].swap(false, Relaxed) {
        c.combine(Some(i));
    }
}

/// After the joins: every item is committed, or a shard has a wake-up
/// still to take (its turn comes after every push, so it may commit what
/// any push queued). Then those turns run, and everything is committed.
fn check(s: &Setup, all: usize) {
    let committed = s.committed.load(Relaxed);
    if committed != all {
        assert!(
            s.woken.iter().any(|w| w.load(Relaxed)),
            "items {:#b} queued, and no shard woken to commit them",
            all & !committed
        );
    }
    while s.woken.iter().any(|w| w.load(Relaxed)) {
        for i in 0..SHARDS {
            turns(&s.c, &s.woken, i);
        }
    }
    assert_eq!(s.committed.load(Relaxed), all, "left in the queue");
}

/// Shard `i`'s turn: queue `items`, combine, then take its wake-ups.
fn shard(s: &Setup, i: usize, items: &'static [usize]) -> loom::thread::JoinHandle<()> {
    let c = s.c.clone();
    let woken = s.woken.clone();
    loom::thread::spawn(move || {
        for &item in items {
            assert!(c.submit(item).is_ok(), "queue full");
        }
        c.combine(Some(i));
        turns(&c, &woken, i);
    })
}

/// Two shards each queue an item and combine in the same turn: whichever
/// loses the lock relies on the holder to see its item.
#[test]
fn two_shards_submitting_and_combining_leave_nothing_behind() {
    model(|| {
        let s = setup(4);
        let a = shard(&s, 0, &[0b01]);
        let b = shard(&s, 1, &[0b10]);
        a.join().expect("shard 0");
        b.join().expect("shard 1");
        check(&s, 0b11);
    });
}

/// A shard that queued two items in one turn, and another shard with one:
/// groups of one leave items after every commit, for the holder's second
/// look at the queue.
#[test]
fn a_shard_with_two_items_and_another_with_one_leave_nothing_behind() {
    model(|| {
        let s = setup(4);
        let a = shard(&s, 0, &[0b001, 0b010]);
        let b = shard(&s, 1, &[0b100]);
        a.join().expect("shard 0");
        b.join().expect("shard 1");
        check(&s, 0b111);
    });
}

/// A full queue: one shard waits for room (committing from the queue
/// under the lock) while the other combines.
#[test]
fn a_shard_waiting_for_room_and_one_combining_leave_nothing_behind() {
    model(|| {
        let s = setup(1);
        assert!(s.c.submit(0b001).is_ok(), "queue full");
        let waiting = {
            let c = s.c.clone();
            let woken = s.woken.clone();
            loom::thread::spawn(move || {
                c.submit_waiting(0b010);
                c.combine(Some(0));
                turns(&c, &woken, 0);
            })
        };
        let b = shard(&s, 1, &[]);
        waiting.join().expect("shard 0");
        b.join().expect("shard 1");
        check(&s, 0b011);
    });
}
