//! The traffic: an open-loop stream of sends at a steady rate, spread over
//! the active users' devices, mixing 1:1 messages (to a random other user,
//! now and then to oneself) and group posts (to a group of the sender's).
//!
//! Open loop, as real users are: the rate does not slow down when the
//! server does. Each device has a bounded number of sends in flight; a send
//! whose device is full or offline is counted as skipped instead of queued,
//! so a stall shows in the counts rather than in the exercise's memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::world::{lock, Target, World};

/// How the traffic is shaped.
#[derive(Debug, Clone)]
pub struct TrafficOpts {
    /// Sends per second, over all devices.
    pub rate: f64,
    /// Share of sends that are group posts.
    pub group_share: f64,
    /// Share of 1:1 sends addressed to the sender itself.
    pub self_share: f64,
    /// Message bodies are this many bytes at most.
    pub max_body: usize,
}

/// Sends traffic until `stop` is set, then waits for every send in flight
/// to end (acknowledged, or given up at its deadline).
/// The traffic running in its own task until [`Running::stop`].
pub struct Running {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Start [`run`] on `world` in a task of its own.
    pub fn start(world: Arc<World>, opts: TrafficOpts, seed: u64) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(world, opts, stop.clone(), seed));
        Running { stop, task }
    }

    /// Stop sending and wait until the sends in flight have ended.
    pub async fn stop(self) -> Result<(), tokio::task::JoinError> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await
    }
}

pub async fn run(world: Arc<World>, opts: TrafficOpts, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sends = JoinSet::new();
    const TICK: Duration = Duration::from_millis(10);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    let mut owed = 0.0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        owed += opts.rate * (now - last).as_secs_f64();
        last = now;
        while owed >= 1.0 {
            owed -= 1.0;
            dispatch(&world, &opts, &mut rng, &mut sends);
        }
        // Reap finished sends so the set stays small.
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
}

fn dispatch(world: &Arc<World>, opts: &TrafficOpts, rng: &mut StdRng, sends: &mut JoinSet<()>) {
    let picked = {
        let users = lock(&world.users);
        let active: Vec<_> = users.iter().filter(|u| u.active).collect();
        let Some(from) = active.choose(rng) else {
            return;
        };
        let Some(device) = from.devices.choose(rng).cloned() else {
            return;
        };
        let groups: Vec<u64> = lock(&world.groups)
            .iter()
            .filter(|g| g.members.contains(&from.name))
            .map(|g| g.id)
            .collect();
        let target = if !groups.is_empty() && rng.gen_bool(opts.group_share) {
            Target::Group(*groups.choose(rng).expect("not empty"))
        } else if rng.gen_bool(opts.self_share) {
            Target::User(from.name.clone())
        } else {
            let others: Vec<_> = active.iter().filter(|u| u.name != from.name).collect();
            match others.choose(rng) {
                Some(to) => Target::User(to.name.clone()),
                None => Target::User(from.name.clone()),
            }
        };
        (device, target)
    };
    let (device, target) = picked;
    let Some(slot) = device.try_slot() else {
        world.skipped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let len = rng.gen_range(1..=opts.max_body.max(1));
    let body: Vec<u8> = (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect();
    let world = world.clone();
    sends.spawn(async move {
        device.send(&world, target, body).await;
        drop(slot);
    });
}
