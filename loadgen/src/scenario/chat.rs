//! `chat`: `--users` users, one connection each, sending 1:1 messages to
//! random peers among all users (across workers too). Closed loop by
//! default: one message in flight per user, the next sent on its Ack. With
//! `--rate R`, open loop: each user sends on its own timer so the total is
//! R messages/s whatever the latency.
//!
//! Every user task reads, sends and checks in one loop on one socket:
//! send→Ack latency from the request id; send→delivered latency from the
//! Unix timestamp in the body (see [`crate::body`]); per-device order and
//! duplicates from the inbox seq ([`CursorTracker`]) and from each sender's
//! counter. The sender's own device also receives its message (the server
//! files it in both inboxes); those are counted as `echoes`, not deliveries.
//!
//! Phases: connect all, barrier, (warm-up), send for `--duration`, stop
//! sending and wait for the outstanding Acks, then drain deliveries until
//! everything acknowledged has arrived (single process) or nothing arrived
//! for 1.5 s, at most `--drain` seconds.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use swiftlet_protocol::{Body, Envelope};
use tokio::time::Instant;

use super::session::{self, Common, Role, Session, READ_CHUNK};
use crate::addr::share;
use crate::body;
use crate::conn::ConnError;
use crate::peek::Delivered;
use crate::run::{connect, wait_count, Ctx};
use crate::summary::WorkerResult;

/// What every user task shares.
struct Shared {
    names: Vec<String>,
    c: Common,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<WorkerResult> {
    let users = ctx.args.users.max(1);
    let range = share(users, ctx.worker_index, ctx.worker_count);
    let n = range.end - range.start;
    let c = Common::new(ctx, users)?;
    if ctx.args.body_bytes < body::HEADER_LEN {
        eprintln!(
            "loadgen: --body-bytes {} is below the {}-byte header; sending {} bytes",
            ctx.args.body_bytes,
            body::HEADER_LEN,
            body::HEADER_LEN
        );
    }
    // No setup phase: every session passes it at once.
    c.setup.cancel();
    let shared = Arc::new(Shared {
        names: (0..users).map(|k| ctx.user("u", k)).collect(),
        c,
    });
    let attempted = Arc::new(AtomicU64::new(0));
    let start = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for k in range {
        let mut target = ctx.target(k, &shared.names[k as usize]);
        let (slots, shared, attempted) =
            (ctx.connect_slots.clone(), shared.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            let conn = connect(&slots, &shared.c.stats, &mut target, READ_CHUNK).await;
            attempted.fetch_add(1, Relaxed);
            if let Some(conn) = conn {
                let user = User(Session::new(k as u32, conn));
                session::serve(user, &shared).await;
            }
        }));
    }
    wait_count(&attempted, n).await;
    let login_phase_s = start.elapsed().as_secs_f64();
    let open_at_ready = ctx.stats.open.load(Relaxed);
    ctx.barrier().await?;

    let c = &shared.c;
    let measured = session::measure(ctx, c).await;
    ctx.set_server_cpu(measured.server_cpu_us);
    // Drain: outstanding Acks first, then deliveries.
    let deadline = session::drain_acks(ctx, c).await;
    let stats = &ctx.stats;
    let mut last = (stats.delivered.load(Relaxed), Instant::now());
    while Instant::now() < deadline {
        let delivered = stats.delivered.load(Relaxed);
        if !ctx.is_child() && delivered >= stats.acked.load(Relaxed) {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    session::close(c, tasks).await;
    Ok(session::result(stats, n, open_at_ready, login_phase_s, measured).await)
}

/// One simulated user: its session; a pending send is when it was queued.
struct User(Session<Instant>);

impl User {
    fn queue_send(&mut self, sh: &Shared) {
        let users = sh.names.len() as u32;
        let me = self.0.me;
        let peer = if users <= 1 {
            me
        } else {
            let p = rand::thread_rng().gen_range(0..users - 1);
            if p >= me {
                p + 1
            } else {
                p
            }
        };
        self.0.counter += 1;
        let to = &sh.names[peer as usize];
        self.0
            .queue_message(&sh.c, body::unix_ns(), to, 0, Instant::now());
    }

    /// Closed loop: the next send once the last is answered.
    fn next_closed_loop(&mut self, sh: &Shared) {
        if self.0.sending && !sh.c.open_loop() {
            self.queue_send(sh);
        }
    }
}

impl Role for User {
    type Pending = Instant;
    type Shared = Shared;

    fn common(sh: &Shared) -> &Common {
        &sh.c
    }

    fn session(&mut self) -> &mut Session<Instant> {
        &mut self.0
    }

    fn sending(&self) -> bool {
        self.0.sending
    }

    fn sender_index(&self, _sh: &Shared) -> Option<u32> {
        Some(self.0.me)
    }

    fn send(&mut self, sh: &Shared) {
        self.queue_send(sh);
    }

    fn message(&mut self, d: Delivered, sh: &Shared) {
        self.0.deliver_message(&sh.c, d, None);
    }

    fn handle(&mut self, env: Envelope, sh: &Shared) -> Result<(), ConnError> {
        match env.body {
            Some(Body::Ack(_)) => {
                let answered = self.0.acked(&sh.c, env.request_id).is_some();
                if answered {
                    self.next_closed_loop(sh);
                }
            }
            Some(Body::Deliver(d)) => {
                self.0.deliver(&sh.c, d, None);
            }
            Some(Body::Error(e)) => {
                let refused = self.0.refused(&sh.c, env.request_id, &e, "send")?;
                if refused.is_some() {
                    self.next_closed_loop(sh);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
