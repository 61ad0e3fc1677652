//! Flat combining: the shards run the commit pipeline themselves, one at a
//! time, each committing what every shard queued.
//!
//! Shards [`Combiner::submit`] items to a bounded queue and, at the end of
//! the same loop turn, call [`Combiner::combine`]: whichever shard takes the
//! lock commits what is queued, its own items and the other shards'. There
//! is no commit thread to wake and wait for: on a small machine a hand-off
//! to another thread and back cost more than the write itself. A shard that
//! finds the lock taken leaves its items to the holder, which looks at the
//! queue again after it lets go and, if anything is there, wakes every
//! shard for another turn. (Should that hand-off ever miss, every shard runs
//! a turn at least once a tick, so an item would wait one tick, never be
//! lost.)
//!
//! The hand-off rests on two `SeqCst` fences, one on each side, between a
//! write and a read of two different locations: a submitter writes the
//! queue then reads the lock (`try_lock`), the holder writes the lock
//! (unlock) then reads the queue (`is_empty`). With both fences, at least
//! one of the two sees the other's write: either the submitter finds the
//! lock free and commits, or the holder finds the item and wakes the
//! shards. `tests/loom_combine.rs` checks exactly that with loom.
//!
//! This module owns the queue, the lock and the wake-ups, and nothing else:
//! it is generic over what is committed ([`Committer`]) and who is woken
//! ([`Wake`]), so it never names a store, a command or a shard. It must
//! never make a shard wait for another: [`Combiner::combine`] only tries
//! the lock (only [`Combiner::submit_waiting`] and [`Combiner::flush`]
//! wait for it, and say so).
//!
//! With the `loom` feature it runs on loom's atomics and `Arc`, and on a
//! lock and a bounded queue built from them (`model`, below) that promise
//! no more ordering than parking_lot's and crossbeam's. The feature exists
//! for the model only: the rest of the crate then works only inside
//! `loom::model`.

#[cfg(not(feature = "loom"))]
use std::sync::{
    atomic::{fence, Ordering},
    Arc,
};

#[cfg(not(feature = "loom"))]
use crossbeam_channel::{bounded, Receiver, Sender};
#[cfg(not(feature = "loom"))]
use parking_lot::Mutex;

#[cfg(feature = "loom")]
use loom::sync::{
    atomic::{fence, Ordering},
    Arc,
};

#[cfg(feature = "loom")]
use model::{bounded, Mutex, Receiver, Sender};

/// What the lock holder runs on what is queued.
pub trait Committer {
    type Item;
    /// Most items handed to one [`Committer::commit`].
    const MAX_GROUP: usize;
    /// Commit `group` (1 to [`Committer::MAX_GROUP`] items, oldest first),
    /// leaving it empty. `own` is the calling shard, if a shard calls, which
    /// takes its share of the results after [`Combiner::combine`] returns
    /// (so it needs no wake-up).
    fn commit(&mut self, group: &mut Vec<Self::Item>, own: Option<usize>);
}

/// Makes one shard run a loop turn soon (and so call
/// [`Combiner::combine`]).
pub trait Wake {
    fn wake(&self);
}

/// The shards' way in: the sending side of the queue, and what every handle
/// shares. Cheap to clone.
pub struct Combiner<C: Committer, W> {
    tx: Sender<C::Item>,
    shared: Arc<Shared<C, W>>,
}

impl<C: Committer, W> Clone for Combiner<C, W> {
    fn clone(&self) -> Self {
        Combiner {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The queue and the committer every handle shares.
struct Shared<C: Committer, W> {
    rx: Receiver<C::Item>,
    locked: Mutex<Locked<C>>,
    /// Every shard, woken when items were queued while the lock was held.
    wake: Vec<W>,
}

/// What only the lock holder touches.
struct Locked<C: Committer> {
    committer: C,
    /// The items of the group being committed (kept for its capacity).
    group: Vec<C::Item>,
}

impl<C: Committer> Locked<C> {
    /// Commit one group of what is queued (up to [`Committer::MAX_GROUP`]
    /// items).
    fn commit_queued(&mut self, rx: &Receiver<C::Item>, own: Option<usize>) {
        while self.group.len() < C::MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => self.group.push(item),
                Err(_) => break,
            }
        }
        if !self.group.is_empty() {
            self.committer.commit(&mut self.group, own);
        }
    }
}

impl<C: Committer, W: Wake> Combiner<C, W> {
    /// A queue of `queue` items in front of `committer`; `wake` are the
    /// shards that run [`Combiner::combine`].
    pub fn new(committer: C, queue: usize, wake: Vec<W>) -> Self {
        let (tx, rx) = bounded(queue);
        Combiner {
            tx,
            shared: Arc::new(Shared {
                rx,
                locked: Mutex::new(Locked {
                    committer,
                    group: Vec::with_capacity(C::MAX_GROUP),
                }),
                wake,
            }),
        }
    }

    /// Queue `item` without blocking; a full queue gives it back. It is
    /// committed by the caller's next [`Combiner::combine`], or by
    /// whichever shard commits first.
    pub fn submit(&self, item: C::Item) -> Result<(), C::Item> {
        // The handle holds the receiver too: the queue never closes, so
        // an error means full.
        self.tx.try_send(item).map_err(|e| e.into_inner())
    }

    /// Queue `item`; while the queue is full, commit from it to make room.
    pub fn submit_waiting(&self, mut item: C::Item) {
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return,
                Err(e) => {
                    item = e.into_inner();
                    self.shared
                        .locked
                        .lock()
                        .commit_queued(&self.shared.rx, None);
                }
            }
        }
    }

    /// Commit one group of what is queued, unless another thread is
    /// committing: that one looks at the queue again once it is done.
    /// `own` is the calling shard (see [`Committer::commit`]).
    pub fn combine(&self, own: Option<usize>) {
        // Pairs with the same fence below, in the thread that held the lock:
        // either this thread sees the lock free, or the holder sees what
        // this thread queued before it tried the lock.
        fence(Ordering::SeqCst);
        if self.shared.rx.is_empty() {
            return;
        }
        let Some(mut locked) = self.shared.locked.try_lock() else {
            return;
        };
        locked.commit_queued(&self.shared.rx, own);
        drop(locked);
        fence(Ordering::SeqCst);
        if !self.shared.rx.is_empty() {
            // Queued meanwhile, by shards that found the lock taken. One
            // group per call, then every shard gets a turn (each runs
            // `combine` once per turn): a shard that went on committing for
            // the others would leave its own connections waiting (closed
            // loop p99 60-69 ms with four groups per call, 47-53 with one).
            for shard in &self.shared.wake {
                shard.wake();
            }
        }
    }

    /// Block until everything queued so far is committed (graceful
    /// shutdown, benches, tests).
    pub fn flush(&self) {
        loop {
            let mut locked = self.shared.locked.lock();
            if self.shared.rx.is_empty() {
                return;
            }
            locked.commit_queued(&self.shared.rx, None);
        }
    }
}

/// The loom stand-ins for parking_lot's mutex and crossbeam's bounded
/// channel: the same method names and shapes, so the code above is the same
/// code under the model.
///
/// Both are built on loom atomics with the orderings the real ones give at
/// the least: acquire/release. Not on loom's `Mutex`, which loom takes to
/// be sequentially consistent (each lock and unlock orders everything, like
/// a `SeqCst` fence), and not on `SeqCst` accesses, whose loads loom lets
/// see only the newest `SeqCst` store: either would order the hand-off by
/// itself and hide a missing fence, where parking_lot's lock word is only
/// acquire/release. What the model finds with the fences alone holds for
/// the stronger real types. The data behind them sits in parking_lot
/// mutexes that loom does not see and that are never contended (taking one
/// with `try_lock` checks that).
#[cfg(feature = "loom")]
mod model {
    use std::collections::VecDeque;
    use std::ops::{Deref, DerefMut};

    use loom::sync::atomic::{
        AtomicBool, AtomicUsize,
        Ordering::{Acquire, Relaxed, Release},
    };
    use loom::sync::Arc;

    /// parking_lot's lock: a flag taken by an acquire compare-exchange and
    /// given back by a release swap.
    pub struct Mutex<T> {
        locked: AtomicBool,
        data: parking_lot::Mutex<T>,
    }

    pub struct MutexGuard<'a, T> {
        data: Option<parking_lot::MutexGuard<'a, T>>,
        locked: &'a AtomicBool,
    }

    impl<T> Mutex<T> {
        pub fn new(t: T) -> Self {
            Mutex {
                locked: AtomicBool::new(false),
                data: parking_lot::Mutex::new(t),
            }
        }

        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.locked
                .compare_exchange(false, true, Acquire, Relaxed)
                .ok()?;
            let data = self.data.try_lock();
            assert!(data.is_some(), "two threads hold the lock");
            Some(MutexGuard {
                data,
                locked: &self.locked,
            })
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            loop {
                if let Some(guard) = self.try_lock() {
                    return guard;
                }
                loom::thread::yield_now();
            }
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.data.as_deref().expect("held until dropped")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.data.as_deref_mut().expect("held until dropped")
        }
    }

    impl<T> Drop for MutexGuard<'_, T> {
        fn drop(&mut self) {
            self.data = None;
            self.locked.swap(false, Release);
        }
    }

    /// A bounded queue. `is_empty` compares two counters, as crossbeam's
    /// array channel compares its head and tail, so a thread can see the
    /// queue empty after another pushed unless something orders the two.
    /// `try_recv` believes the counters too, then takes the item.
    struct Chan<T> {
        items: parking_lot::Mutex<VecDeque<T>>,
        cap: usize,
        pushed: AtomicUsize,
        popped: AtomicUsize,
    }

    pub struct Sender<T>(Arc<Chan<T>>);
    pub struct Receiver<T>(Arc<Chan<T>>);

    /// The queue was full.
    pub struct TrySendError<T>(T);

    impl<T> TrySendError<T> {
        pub fn into_inner(self) -> T {
            self.0
        }
    }

    pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
        let chan = Arc::new(Chan {
            items: parking_lot::Mutex::new(VecDeque::new()),
            cap,
            pushed: AtomicUsize::new(0),
            popped: AtomicUsize::new(0),
        });
        (Sender(chan.clone()), Receiver(chan))
    }

    impl<T> Clone for Sender<T> {
        fn clone(&self) -> Self {
            Sender(self.0.clone())
        }
    }

    impl<T> Sender<T> {
        pub fn try_send(&self, t: T) -> Result<(), TrySendError<T>> {
            {
                let mut items = self.0.items.lock();
                if items.len() >= self.0.cap {
                    return Err(TrySendError(t));
                }
                items.push_back(t);
            }
            self.0.pushed.fetch_add(1, Release);
            Ok(())
        }
    }

    impl<T> Receiver<T> {
        /// Only the lock holder receives.
        pub fn try_recv(&self) -> Result<T, ()> {
            if self.is_empty() {
                return Err(());
            }
            let t = self.0.items.lock().pop_front().ok_or(())?;
            self.0.popped.fetch_add(1, Release);
            Ok(t)
        }

        pub fn is_empty(&self) -> bool {
            let popped = self.0.popped.load(Acquire);
            let pushed = self.0.pushed.load(Acquire);
            pushed == popped
        }
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Records what it committed, in groups of at most two.
    #[derive(Default)]
    struct Log(Arc<parking_lot::Mutex<Vec<Vec<u32>>>>);

    impl Committer for Log {
        type Item = u32;
        const MAX_GROUP: usize = 2;
        fn commit(&mut self, group: &mut Vec<u32>, _own: Option<usize>) {
            self.0.lock().push(std::mem::take(group));
        }
    }

    #[derive(Default, Clone)]
    struct Woken(Arc<AtomicUsize>);

    impl Wake for Woken {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn one_group_per_combine_then_a_wake_for_the_rest_and_a_full_queue_commits_to_make_room() {
        let log = Log::default();
        let groups = log.0.clone();
        let woken = Woken::default();
        let c = Combiner::new(log, 3, vec![woken.clone()]);
        for i in 1..=3 {
            assert!(c.submit(i).is_ok());
        }
        assert_eq!(c.submit(4), Err(4), "a full queue gives the item back");
        c.combine(Some(0));
        assert_eq!(*groups.lock(), vec![vec![1, 2]]);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "3 is left: wake");
        assert!(c.submit(4).is_ok());
        assert!(c.submit(5).is_ok());
        // Full again: room for 6 once 3 and 4 are committed.
        c.submit_waiting(6);
        assert_eq!(*groups.lock(), vec![vec![1, 2], vec![3, 4]]);
        c.flush();
        assert_eq!(*groups.lock(), vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
        c.combine(None);
        assert_eq!(groups.lock().len(), 3, "nothing queued, nothing committed");
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
    }
}
