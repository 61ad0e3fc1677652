//! `group`: `--groups` G groups of `--members` S members, one connection
//! per member; the first `--senders` K members of each group post to it.
//!
//! Members are users `u0..`: group g is users g·S .. g·S+S−1 and its first
//! member creates it. Setup: every member logs in, then each creator sends
//! CreateGroup with the other S−1 members, gets GroupInfo, and the others
//! learn the group id from the GroupEvent (CREATED) pushed to their inboxes.
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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use swiftlet_client::{CursorTracker, Observed};
use swiftlet_protocol::{pb, Body, Envelope};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::chat::jitter;
use crate::addr::share;
use crate::body::{self, Header};
use crate::conn::{fatal_error, Conn, ConnError};
use crate::run::{connect, spawn_timeline, wait_count, Ctx};
use crate::stats::{OpenGuard, Stats};
use crate::summary::WorkerResult;

/// Deliveries between two DeliveryAcks (also sent every 500 ms).
const ACK_EVERY: u32 = 64;
/// Read-buffer reservation for busy member connections.
const READ_CHUNK: usize = 8 * 1024;
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

struct Shared {
    stats: Arc<Stats>,
    prefix: String,
    body_bytes: usize,
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
    /// Open loop: seconds between two posts of one poster, and between
    /// the first posts of two consecutive posters (1 / rate).
    period: Option<Duration>,
    stagger: Duration,
    t0: OnceLock<Instant>,
    ping: Option<Duration>,
    create: CancellationToken,
    go: CancellationToken,
    stop_sending: CancellationToken,
    close: CancellationToken,
    /// Posts not yet answered, over all posters of this process.
    in_flight: AtomicI64,
    /// Deliveries owed: for each acknowledged post, its online receivers.
    expected: AtomicU64,
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
    let period = match ctx.args.rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64((groups * k) as f64 / r)),
        Some(_) => anyhow::bail!("--rate must be positive"),
        None => None,
    };
    let shared = Arc::new(Shared {
        stats: ctx.stats.clone(),
        prefix: ctx.prefix.clone(),
        body_bytes: ctx.args.body_bytes,
        members,
        posters_per_group: k,
        first_group: range.start,
        groups: (0..local_groups).map(|_| Group::default()).collect(),
        posters: (0..local_groups * k).map(|_| Poster::default()).collect(),
        no_poster: Poster::default(),
        period,
        stagger: ctx
            .args
            .rate
            .map_or(Duration::ZERO, |r| Duration::from_secs_f64(1.0 / r)),
        t0: OnceLock::new(),
        ping: ctx.args.ping_interval.map(Duration::from_secs_f64),
        create: CancellationToken::new(),
        go: CancellationToken::new(),
        stop_sending: CancellationToken::new(),
        close: CancellationToken::new(),
        in_flight: AtomicI64::new(0),
        expected: AtomicU64::new(0),
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
            let target = ctx.target(user, &shared.user(user));
            let (slots, shared, attempted) =
                (ctx.connect_slots.clone(), shared.clone(), attempted.clone());
            tasks.push(tokio::spawn(async move {
                let gl = (g - shared.first_group) as usize;
                let conn = connect(&slots, &shared.stats, &target, READ_CHUNK).await;
                if conn.is_some() {
                    shared.groups[gl].online.fetch_add(1, Relaxed);
                }
                attempted.fetch_add(1, Relaxed);
                let Some(conn) = conn else { return };
                let mut m = Member::new(user as u32, gl, j, conn);
                if let Err(e) = m.run(&shared).await {
                    shared.stats.error(e.kind());
                }
                // Posts of a dead connection will never be answered.
                shared.in_flight.fetch_sub(m.inflight.len() as i64, Relaxed);
            }));
        }
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let online: u64 = shared.groups.iter().map(|g| g.online.load(Relaxed)).sum();

    // Create the groups and wait until every online member knows its own.
    let join_start = Instant::now();
    shared.create.cancel();
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

    let stats = &ctx.stats;
    let _ = shared.t0.set(Instant::now());
    shared.go.cancel();
    if ctx.args.warmup > 0.0 {
        stats.measuring.store(false, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(ctx.args.warmup)).await;
        stats.reset_histograms();
        stats.measuring.store(true, Relaxed);
    }
    let timeline_stop = CancellationToken::new();
    let timeline = spawn_timeline(stats.clone(), timeline_stop.clone());
    let measure_start = Instant::now();
    let delivered_before = stats.delivered.load(Relaxed);
    let acked_before = stats.acked.load(Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration.max(0.0))).await;
    let measured_delivered = stats.delivered.load(Relaxed) - delivered_before;
    let measured_posts = stats.acked.load(Relaxed) - acked_before;
    let measured_s = measure_start.elapsed().as_secs_f64();
    shared.stop_sending.cancel();
    timeline_stop.cancel();

    // Drain: outstanding Acks first, then deliveries. Groups are whole in
    // this process, so it knows exactly how many deliveries are owed.
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.drain.max(0.0));
    while shared.in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while stats.delivered.load(Relaxed) < shared.expected.load(Relaxed) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.close.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let incomplete: usize = shared
        .posters
        .iter()
        .map(|p| p.fans.lock().map(|f| f.len()).unwrap_or(0))
        .sum();
    if incomplete > 0 {
        stats.error("fanout_incomplete");
        eprintln!("loadgen: {incomplete} posts did not reach every online member");
    }
    let (latency, ack_latency, login_latency) = stats.take_histograms();
    Ok(WorkerResult {
        connections: n,
        open_at_ready,
        logins: stats.logins.load(Relaxed),
        sent: stats.sent.load(Relaxed),
        acked: stats.acked.load(Relaxed),
        delivered: stats.delivered.load(Relaxed),
        expected: Some(shared.expected.load(Relaxed)),
        echoes: stats.echoes.load(Relaxed),
        duplicated: stats.duplicated.load(Relaxed),
        reordered: stats.reordered.load(Relaxed),
        gaps: stats.gaps.load(Relaxed),
        errors: stats.errors(),
        measured_s,
        measured_delivered,
        measured_posts,
        login_phase_s,
        latency,
        ack_latency,
        login_latency,
        fanout: stats.take_fanout(),
        timeline: timeline.await.unwrap_or_default(),
        ..Default::default()
    })
}

/// A post waiting for its Ack.
struct Post {
    at: Instant,
    counter: u64,
    /// Online members to deliver it to (the poster's own copy excluded).
    receivers: u32,
}

/// One member: its connection, its group, and its checks.
struct Member {
    me: u32,
    /// Index of its group in this process, and its place in the group.
    group: usize,
    place: u64,
    conn: Conn,
    tracker: CursorTracker,
    acked_up_to: u64,
    since_ack: u32,
    group_id: u64,
    create_request: Option<u64>,
    /// Highest counter seen per poster.
    last_from: HashMap<u32, u64>,
    counter: u64,
    /// request id → the post.
    inflight: HashMap<u64, Post>,
    sending: bool,
    /// Closed loop: the last post's fan-out has not completed yet.
    fanning: bool,
}

impl Member {
    fn new(me: u32, group: usize, place: u64, conn: Conn) -> Self {
        let cursor = conn.welcome.cursor;
        Member {
            me,
            group,
            place,
            conn,
            tracker: CursorTracker::new(cursor),
            acked_up_to: cursor,
            since_ack: 0,
            group_id: 0,
            create_request: None,
            last_from: HashMap::new(),
            counter: 0,
            inflight: HashMap::new(),
            sending: false,
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

    async fn run(&mut self, sh: &Shared) -> Result<(), ConnError> {
        let _open = OpenGuard::new(&sh.stats);
        let ack_every = Duration::from_millis(500);
        let mut ack_tick = tokio::time::interval_at(jitter(ack_every), ack_every);
        ack_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let ping_every = sh.ping.unwrap_or(Duration::from_millis(
            u64::from(self.conn.welcome.idle_timeout_ms.max(3000)) / 3,
        ));
        let mut ping_tick = tokio::time::interval_at(jitter(ping_every), ping_every);
        ping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let period = sh.period.unwrap_or(Duration::from_secs(3600));
        let mut send_tick = tokio::time::interval(period);
        let open_loop = sh.period.is_some();
        let poster = self.is_poster(sh);
        let (mut created, mut started) = (false, false);
        loop {
            tokio::select! {
                biased;
                _ = sh.close.cancelled() => break,
                _ = sh.create.cancelled(), if !created => {
                    created = true;
                    if self.place == 0 {
                        self.queue_create(sh);
                    }
                }
                _ = sh.go.cancelled(), if !started => {
                    started = true;
                    self.sending = poster;
                    if poster && open_loop {
                        // Poster p (global) first posts at t0 + p/rate.
                        let g = sh.first_group + self.group as u64;
                        let p = (g * sh.posters_per_group + self.place) as u32;
                        let t0 = *sh.t0.get_or_init(Instant::now);
                        let offset = (sh.stagger * p).as_nanos() % period.as_nanos().max(1);
                        send_tick = tokio::time::interval_at(
                            t0 + Duration::from_nanos(offset as u64),
                            period,
                        );
                    } else if poster {
                        self.queue_post(sh);
                    }
                }
                _ = sh.stop_sending.cancelled(), if self.sending => self.sending = false,
                _ = send_tick.tick(), if self.sending && open_loop => self.queue_post(sh),
                _ = self.poster(sh).done.notified(), if poster && !open_loop && self.fanning => {
                    self.fanning = false;
                    self.next_closed_loop(sh);
                }
                _ = ack_tick.tick() => self.queue_delivery_ack(),
                _ = ping_tick.tick() => {
                    self.conn.queue(Body::Ping(pb::Ping { nonce: 0 }));
                }
                r = self.conn.recv() => {
                    self.handle(r?, sh)?;
                    while let Some(env) = self.conn.try_next()? {
                        self.handle(env, sh)?;
                    }
                }
            }
            self.conn.flush().await?;
        }
        self.queue_delivery_ack();
        let _ = self.conn.flush().await;
        Ok(())
    }

    // `..Default::default()`: the protocol grows fields loadgen leaves unset.
    #[allow(clippy::needless_update)]
    fn queue_create(&mut self, sh: &Shared) {
        let first = (sh.first_group + self.group as u64) * sh.members;
        let others = (first + 1..first + sh.members)
            .map(|k| sh.user(k))
            .collect();
        let id = self.conn.queue(Body::CreateGroup(pb::CreateGroup {
            name: format!("{}-g{}", sh.prefix, sh.first_group + self.group as u64),
            members: others,
            ..Default::default()
        }));
        self.create_request = Some(id);
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
        if self.sending && sh.period.is_none() && self.inflight.is_empty() && !self.fanning {
            self.queue_post(sh);
        }
    }

    #[allow(clippy::needless_update)]
    fn queue_post(&mut self, sh: &Shared) {
        if self.group_id == 0 {
            sh.stats.error("post_without_group");
            return;
        }
        self.counter += 1;
        let receivers = sh.groups[self.group].online.load(Relaxed).saturating_sub(1) as u32;
        let sent_ns = body::unix_ns();
        if receivers > 0 {
            if let Ok(mut fans) = self.poster(sh).fans.lock() {
                fans.insert(
                    self.counter,
                    Fan {
                        sent_ns,
                        remaining: receivers,
                        last_ns: 0,
                    },
                );
            }
            self.fanning = sh.period.is_none();
        }
        let h = Header {
            sent_unix_ns: sent_ns,
            sender: self.me,
            counter: self.counter,
        };
        let id = self.conn.queue(Body::Send(pb::Send {
            client_msg_id: format!("m{}", self.counter),
            group_id: self.group_id,
            content_type: body::CONTENT_TYPE.to_owned(),
            body: body::encode(&h, sh.body_bytes).into(),
            ..Default::default()
        }));
        self.inflight.insert(
            id,
            Post {
                at: Instant::now(),
                counter: self.counter,
                receivers,
            },
        );
        sh.in_flight.fetch_add(1, Relaxed);
        sh.stats.sent.fetch_add(1, Relaxed);
    }

    fn queue_delivery_ack(&mut self) {
        if self.tracker.last() > self.acked_up_to {
            self.acked_up_to = self.tracker.last();
            self.since_ack = 0;
            self.conn.queue(Body::DeliveryAck(pb::DeliveryAck {
                up_to: self.acked_up_to,
            }));
        }
    }

    fn handle(&mut self, env: Envelope, sh: &Shared) -> Result<(), ConnError> {
        let stats = &sh.stats;
        match env.body {
            Some(Body::Ack(_)) => {
                if let Some(post) = self.inflight.remove(&env.request_id) {
                    stats.record_ack(post.at.elapsed().as_micros() as u64);
                    stats.acked.fetch_add(1, Relaxed);
                    sh.expected.fetch_add(u64::from(post.receivers), Relaxed);
                    sh.in_flight.fetch_sub(1, Relaxed);
                    self.next_closed_loop(sh);
                } else {
                    stats.error("unexpected_ack");
                }
            }
            Some(Body::GroupInfo(info)) if Some(env.request_id) == self.create_request => {
                self.join(info.group_id, sh);
            }
            Some(Body::Deliver(d)) => {
                let Some(ev) = d.event else {
                    stats.error("empty_deliver");
                    return Ok(());
                };
                self.deliver(ev, sh);
                self.since_ack += 1;
                if self.since_ack >= ACK_EVERY {
                    self.queue_delivery_ack();
                }
            }
            Some(Body::Error(e)) => {
                if let Some(err) = fatal_error(&e) {
                    return Err(err);
                }
                let what = if Some(env.request_id) == self.create_request {
                    "create_group"
                } else {
                    "send"
                };
                stats.error(format!(
                    "{what}_{}",
                    swiftlet_client::code_name(e.code).to_lowercase()
                ));
                if let Some(post) = self.inflight.remove(&env.request_id) {
                    // Refused: nobody will receive it.
                    sh.in_flight.fetch_sub(1, Relaxed);
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

    fn deliver(&mut self, ev: pb::Event, sh: &Shared) {
        let stats = &sh.stats;
        match self.tracker.observe(ev.seq) {
            Observed::Duplicate => {
                stats.duplicated.fetch_add(1, Relaxed);
                return;
            }
            Observed::Gap { .. } => {
                stats.gaps.fetch_add(1, Relaxed);
            }
            Observed::InOrder => {}
        }
        let m = match ev.kind {
            Some(pb::event::Kind::Message(m)) => m,
            Some(pb::event::Kind::GroupEvent(e)) => {
                if e.kind == pb::GroupEventKind::Created as i32 {
                    self.join(e.group_id, sh);
                }
                return;
            }
            // Receipts for our posts: they advance the seq, nothing else.
            _ => return,
        };
        let Some(h) = body::decode(&m.body) else {
            stats.error("foreign_body");
            return;
        };
        if h.sender == self.me {
            stats.echoes.fetch_add(1, Relaxed);
            return;
        }
        if m.group_id != self.group_id {
            stats.error("wrong_group");
        }
        let last = self.last_from.entry(h.sender).or_insert(0);
        if h.counter == *last {
            stats.duplicated.fetch_add(1, Relaxed);
            return;
        }
        if h.counter < *last {
            stats.reordered.fetch_add(1, Relaxed);
        } else {
            *last = h.counter;
        }
        let now = body::unix_ns();
        stats.delivered.fetch_add(1, Relaxed);
        stats.record_delivery(now.saturating_sub(h.sent_unix_ns) / 1000);
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
            if sh.period.is_none() {
                poster.done.notify_one();
            }
        }
    }
}
