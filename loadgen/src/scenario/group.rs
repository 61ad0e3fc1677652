//! `group`: `--groups` G groups of `--members` S members, one connection
//! per member; the first `--senders` K members of each group post to it.
//!
//! Members are users `u0..`: group g is users g·S .. g·S+S−1 and its first
//! member creates it. Setup: every member logs in, then each creator sends
//! CreateGroup with (up to 500 of) the other S−1 members, gets GroupInfo,
//! adds the rest with AddMembers 500 at a time, and the others learn the
//! group id from the GroupEvent (CREATED or MEMBERS_ADDED) pushed to their
//! inboxes.
//! When every online member knows its group, the measured phase starts.
//!
//! Posting: closed loop by default, one post in flight per poster, where a
//! post is in flight until it is acknowledged *and* delivered to every other
//! online member (so the figures are fan-out capacity, not a growing
//! backlog). With `--rate R`, open loop: R posts/s over all posters, each on
//! its own timer, staggered evenly.
//!
//! Measured: send→delivered latency of every delivery to every member
//! (`latency_ms`), the fan-out completion latency of every post (send → the
//! delivery to its last online member, `fanout_ms`), send→Ack, deliveries/s
//! and posts/s. Checked: every online member other than the poster gets every
//! acknowledged post once (`lost`, `duplicated`), in per-poster order
//! (`reordered`); the poster's own copy is an echo. Receipt and GroupEvent
//! inbox events advance the seq and are otherwise ignored.
//!
//! Workers (`--workers`) take whole groups, so a fan-out is always measured
//! inside one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swiftlet_protocol::{pb, Body, Envelope};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::session::{self, Common, Delivery, Pending, Role, Session, READ_CHUNK};
use crate::addr::share;
use crate::body::{self, Header};
use crate::conn::ConnError;
use crate::peek::Delivered;
use crate::run::{connect, wait_count, Ctx};
use crate::summary::WorkerResult;

/// Longest wait for every online member to learn its group.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One group of this process.
#[derive(Default)]
struct Group {
    /// Members connected (fixed once the login phase is over).
    online: AtomicU64,
    /// Members that know the group id (creator: GroupInfo; others: the
    /// CREATED GroupEvent).
    joined: AtomicU64,
}

/// A post on its way to the other members.
struct Fan {
    sent_ns: u64,
    /// Online members still to receive it.
    remaining: u32,
    /// Unix ns of the latest delivery so far.
    last_ns: u64,
}

/// One poster's posts being fanned out, by counter.
#[derive(Default)]
struct Poster {
    fans: Mutex<HashMap<u64, Fan>>,
    /// Closed loop: the poster's last post reached every member.
    done: Notify,
}

/// What every member task shares. Posters are the senders of [`Common`]
/// (its `setup` is the CreateGroup phase, its `expected` the deliveries
/// owed: for each acknowledged post, its online receivers).
struct Shared {
    c: Common,
    prefix: String,
    /// Members per group (S) and posters per group (K).
    members: u64,
    posters_per_group: u64,
    /// Global index of this process's first group.
    first_group: u64,
    groups: Vec<Group>,
    /// `groups.len() * posters_per_group`, group-major.
    posters: Vec<Poster>,
    /// What a member that does not post waits on (never notified).
    no_poster: Poster,
    /// Members that know their group, over all groups.
    joined: AtomicU64,
    /// Posts whose fan-out completed.
    fanned: AtomicU64,
}

impl Shared {
    fn user(&self, k: u64) -> String {
        format!("{}-u{k}", self.prefix)
    }

    /// The poster slot of global user `sender`, if it is a poster here.
    fn poster(&self, sender: u32) -> Option<&Poster> {
        let (g, j) = (
            u64::from(sender) / self.members,
            u64::from(sender) % self.members,
        );
        if j >= self.posters_per_group || g < self.first_group {
            return None;
        }
        self.posters
            .get(((g - self.first_group) * self.posters_per_group + j) as usize)
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let groups = ctx.args.groups.max(1);
    let members = ctx.args.members;
    anyhow::ensure!(members >= 2, "--members must be at least 2");
    let k = ctx.args.senders().clamp(1, members);
    let range = share(groups, ctx.worker_index, ctx.worker_count);
    let local_groups = range.end - range.start;
    let shared = Arc::new(Shared {
        c: Common::new(ctx, groups * k)?,
        prefix: ctx.prefix.clone(),
        members,
        posters_per_group: k,
        first_group: range.start,
        groups: (0..local_groups).map(|_| Group::default()).collect(),
        posters: (0..local_groups * k).map(|_| Poster::default()).collect(),
        no_poster: Poster::default(),
        joined: AtomicU64::new(0),
        fanned: AtomicU64::new(0),
    });

    let attempted = Arc::new(AtomicU64::new(0));
    let n = local_groups * members;
    let start = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for g in range.clone() {
        for j in 0..members {
            let user = g * members + j;
            let mut target = ctx.target(user, &shared.user(user));
            let (slots, shared, attempted) =
                (ctx.connect_slots.clone(), shared.clone(), attempted.clone());
            tasks.push(tokio::spawn(async move {
                let gl = (g - shared.first_group) as usize;
                let conn = connect(&slots, &shared.c.stats, &mut target, READ_CHUNK).await;
                if conn.is_some() {
                    shared.groups[gl].online.fetch_add(1, Relaxed);
                }
                attempted.fetch_add(1, Relaxed);
                let Some(conn) = conn else { return };
                session::serve(Member::new(user as u32, gl, j, conn), &shared).await;
            }));
        }
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let online: u64 = shared.groups.iter().map(|g| g.online.load(Relaxed)).sum();

    // Create the groups and wait until every online member knows its own.
    let join_start = Instant::now();
    shared.c.setup.cancel();
    while shared.joined.load(Relaxed) < online && join_start.elapsed() < JOIN_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let missing = online.saturating_sub(shared.joined.load(Relaxed));
    if missing > 0 {
        eprintln!("loadgen: {missing} members never learned their group; posting anyway");
        for _ in 0..missing {
            ctx.stats.error("group_join_timeout");
        }
    }
    eprintln!(
        "loadgen: {} groups of {members} created, {} members online, in {:.2} s",
        local_groups,
        shared.joined.load(Relaxed),
        join_start.elapsed().as_secs_f64()
    );
    let open_at_ready = ctx.stats.open.load(Relaxed);
    ctx.barrier().await?;

    let c = &shared.c;
    let measured = session::measure(ctx, c).await;
    ctx.set_server_cpu(measured.server_cpu_us);
    // Drain: outstanding Acks first, then deliveries. Groups are whole in
    // this process, so it knows exactly how many deliveries are owed.
    let deadline = session::drain_acks(ctx, c).await;
    let stats = &ctx.stats;
    while stats.delivered.load(Relaxed) < c.expected.load(Relaxed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    session::close(c, tasks).await;
    let incomplete: usize = shared
        .posters
        .iter()
        .map(|p| p.fans.lock().map(|f| f.len()).unwrap_or(0))
        .sum();
    if incomplete > 0 {
        stats.error("fanout_incomplete");
        eprintln!("loadgen: {incomplete} posts did not reach every online member");
    }
    let measured_posts = measured.measured_acked;
    let base = session::result(stats, n, open_at_ready, login_phase_s, measured).await;
    Ok(WorkerResult {
        expected: Some(c.expected.load(Relaxed)),
        measured_posts,
        fanout: stats.take_fanout(),
        ..base
    })
}

/// A post waiting for its Ack.
struct Post {
    at: Instant,
    counter: u64,
    /// Online members to deliver it to (the poster's own copy excluded).
    receivers: u32,
}

impl Pending for Post {
    fn queued_at(&self) -> Instant {
        self.at
    }

    fn owed(&self) -> u64 {
        u64::from(self.receivers)
    }
}

/// One member: its session, its group, and its fan-out checks.
struct Member {
    s: Session<Post>,
    /// Index of its group in this process, and its place in the group.
    group: usize,
    place: u64,
    group_id: u64,
    create_request: Option<u64>,
    /// The creator: members to add once the group exists.
    pending_adds: Vec<String>,
    /// Closed loop: the last post's fan-out has not completed yet.
    fanning: bool,
}

/// Most members one CreateGroup or AddMembers names (a request must fit in
/// the server's frame limit).
const CREATE_CHUNK: usize = 500;

impl Member {
    fn new(me: u32, group: usize, place: u64, conn: crate::conn::Conn) -> Self {
        Member {
            s: Session::new(me, conn),
            group,
            place,
            group_id: 0,
            create_request: None,
            pending_adds: Vec::new(),
            fanning: false,
        }
    }

    fn is_poster(&self, sh: &Shared) -> bool {
        self.place < sh.posters_per_group
    }

    /// This member's poster slot (a never-notified one if it does not post:
    /// `select!` builds every branch's future, even disabled ones).
    fn poster<'a>(&self, sh: &'a Shared) -> &'a Poster {
        if !self.is_poster(sh) {
            return &sh.no_poster;
        }
        let slot = self.group * sh.posters_per_group as usize + self.place as usize;
        sh.posters.get(slot).unwrap_or(&sh.no_poster)
    }

    // `..Default::default()`: the protocol grows fields loadgen leaves unset.
    #[allow(clippy::needless_update)]
    fn queue_create(&mut self, sh: &Shared) {
        let first = (sh.first_group + self.group as u64) * sh.members;
        let mut others: Vec<String> = (first + 1..first + sh.members)
            .map(|k| sh.user(k))
            .collect();
        // A request must fit in a frame: a big group is created with its
        // first members and grown with AddMembers (queued right behind, so
        // the server applies them in order).
        let rest = others.split_off(others.len().min(CREATE_CHUNK));
        let id = self.s.conn.queue(Body::CreateGroup(pb::CreateGroup {
            name: format!("{}-g{}", sh.prefix, sh.first_group + self.group as u64),
            members: others,
            ..Default::default()
        }));
        self.create_request = Some(id);
        self.pending_adds = rest;
    }

    /// After the CreateGroup answer: the remaining members, in chunks.
    #[allow(clippy::needless_update)]
    fn queue_adds(&mut self, group_id: u64) {
        let mut rest = std::mem::take(&mut self.pending_adds);
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(CREATE_CHUNK));
            self.s.conn.queue(Body::AddMembers(pb::AddMembers {
                group_id,
                users: rest,
                ..Default::default()
            }));
            rest = tail;
        }
    }

    /// This member now knows its group (once).
    fn join(&mut self, group_id: u64, sh: &Shared) {
        if self.group_id == 0 && group_id != 0 {
            self.group_id = group_id;
            sh.groups[self.group].joined.fetch_add(1, Relaxed);
            sh.joined.fetch_add(1, Relaxed);
        }
    }

    /// Closed loop: post again once the last post is acked and fanned out.
    fn next_closed_loop(&mut self, sh: &Shared) {
        if self.s.sending && !sh.c.open_loop() && self.s.inflight.is_empty() && !self.fanning {
            self.queue_post(sh);
        }
    }

    fn queue_post(&mut self, sh: &Shared) {
        if self.group_id == 0 {
            sh.c.stats.error("post_without_group");
            return;
        }
        self.s.counter += 1;
        let receivers = sh.groups[self.group].online.load(Relaxed).saturating_sub(1) as u32;
        let sent_ns = body::unix_ns();
        if receivers > 0 {
            if let Ok(mut fans) = self.poster(sh).fans.lock() {
                fans.insert(
                    self.s.counter,
                    Fan {
                        sent_ns,
                        remaining: receivers,
                        last_ns: 0,
                    },
                );
            }
            self.fanning = !sh.c.open_loop();
        }
        let post = Post {
            at: Instant::now(),
            counter: self.s.counter,
            receivers,
        };
        self.s
            .queue_message(&sh.c, sent_ns, "", self.group_id, post);
    }

    /// A post delivered to this member: its poster's fan-out progress.
    fn fan_out(&mut self, h: Header, now: u64, sh: &Shared) {
        let stats = &sh.c.stats;
        let Some(poster) = sh.poster(h.sender) else {
            stats.error("foreign_sender");
            return;
        };
        let complete = {
            let Ok(mut fans) = poster.fans.lock() else {
                return;
            };
            match fans.get_mut(&h.counter) {
                Some(f) => {
                    f.last_ns = f.last_ns.max(now);
                    f.remaining = f.remaining.saturating_sub(1);
                    if f.remaining == 0 {
                        fans.remove(&h.counter)
                    } else {
                        None
                    }
                }
                None => {
                    stats.error("fanout_unknown_post");
                    None
                }
            }
        };
        if let Some(f) = complete {
            sh.fanned.fetch_add(1, Relaxed);
            stats.record_fanout(f.last_ns.saturating_sub(f.sent_ns) / 1000);
            if !sh.c.open_loop() {
                poster.done.notify_one();
            }
        }
    }
}

impl Role for Member {
    type Pending = Post;
    type Shared = Shared;

    fn common(sh: &Shared) -> &Common {
        &sh.c
    }

    fn session(&mut self) -> &mut Session<Post> {
        &mut self.s
    }

    fn sending(&self) -> bool {
        self.s.sending
    }

    fn setup(&mut self, sh: &Shared) {
        if self.place == 0 {
            self.queue_create(sh);
        }
    }

    /// Poster p (global) first posts at t0 + p/rate.
    fn sender_index(&self, sh: &Shared) -> Option<u32> {
        let g = sh.first_group + self.group as u64;
        self.is_poster(sh)
            .then(|| (g * sh.posters_per_group + self.place) as u32)
    }

    fn send(&mut self, sh: &Shared) {
        self.queue_post(sh);
    }

    fn waker<'a>(&self, sh: &'a Shared) -> Option<&'a Notify> {
        Some(&self.poster(sh).done)
    }

    fn wake_armed(&self, sh: &Shared) -> bool {
        self.is_poster(sh) && self.fanning
    }

    fn on_wake(&mut self, sh: &Shared) {
        self.fanning = false;
        self.next_closed_loop(sh);
    }

    fn message(&mut self, d: Delivered, sh: &Shared) {
        if let Delivery::Counted { header, now_ns } =
            self.s.deliver_message(&sh.c, d, Some(self.group_id))
        {
            self.fan_out(header, now_ns, sh);
        }
    }

    fn handle(&mut self, env: Envelope, sh: &Shared) -> Result<(), ConnError> {
        match env.body {
            Some(Body::Ack(_)) => {
                let answered = self.s.acked(&sh.c, env.request_id).is_some();
                if answered {
                    self.next_closed_loop(sh);
                }
            }
            Some(Body::GroupInfo(info)) if Some(env.request_id) == self.create_request => {
                self.join(info.group_id, sh);
                self.queue_adds(info.group_id);
            }
            Some(Body::Deliver(d)) => match self.s.deliver(&sh.c, d, Some(self.group_id)) {
                Delivery::Counted { header, now_ns } => self.fan_out(header, now_ns, sh),
                Delivery::Event(pb::event::Kind::GroupEvent(e))
                    if e.kind == pb::GroupEventKind::Created as i32
                        || e.kind == pb::GroupEventKind::MembersAdded as i32 =>
                {
                    self.join(e.group_id, sh);
                }
                // Receipts for our posts: they advance the seq, nothing else.
                _ => {}
            },
            Some(Body::Error(e)) => {
                let what = if Some(env.request_id) == self.create_request {
                    "create_group"
                } else {
                    "send"
                };
                if let Some(post) = self.s.refused(&sh.c, env.request_id, &e, what)? {
                    // Refused: nobody will receive it.
                    if let Ok(mut fans) = self.poster(sh).fans.lock() {
                        fans.remove(&post.counter);
                    }
                    self.fanning = false;
                    self.next_closed_loop(sh);
                }
            }
            // Pong, TypingNotice, Presence, answers loadgen does not ask for.
            _ => {}
        }
        Ok(())
    }
}
