//! One device of one user: a connection kept up (reconnecting with backoff
//! whenever it is lost, as an app does), its deliveries checked by a
//! [`Stream`] and acknowledged in batches, and the sends made through it.
//!
//! The device's connection both reads and sends, as a phone's does: its
//! own messages come back to it as events, interleaved with their Acks.
//! That is why sends are retried here rather than with the library's
//! `ReliableSender`, which owns a connection of its own, discards its
//! deliveries and has one send in flight; the rule is the same
//! (`ClientError::is_retryable`, backoff, the **same** `client_msg_id`
//! until an Ack), applied to whichever connection the device has up.
//!
//! Acknowledgements go in batches (every few events, and on a timer) so that
//! a `kill -9` finds events delivered but not acknowledged, whose replay
//! [`Stream`] then checks. A logout ([`Cmd::Logout`]) first lets the sends in
//! flight finish, then (when clean) acknowledges everything, confirms it
//! with a Ping and closes: the next login must resume exactly there.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use swiftlet_client::{
    pb, with_group, with_user, Backoff, Client, ClientConfig, ClientError, CloseReason, Deliveries,
    DeliveryItem,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::stream::{Resume, Stream};
use crate::world::{lock, Outcome, SendRecord, Target, World};

/// What the exercise asks of a device.
#[derive(Debug)]
pub enum Cmd {
    /// Log out, stay away `pause`, log in again. `clean`: acknowledge all
    /// first (the app closed normally); else just drop the connection.
    Logout { pause: Duration, clean: bool },
    /// Log out cleanly for good.
    Leave,
}

/// How a device behaves.
#[derive(Debug, Clone)]
pub struct DeviceOpts {
    /// Acknowledge after at most this many unacknowledged events.
    pub ack_batch: u64,
    /// ... or after this long.
    pub ack_every: Duration,
    /// Chance of a MarkRead for a received message of someone else.
    pub read_prob: f64,
    /// Sends in flight at once on this device.
    pub inflight: u32,
    /// Time one send may take, retries included.
    pub send_deadline: Duration,
}

pub struct Device {
    pub user: String,
    pub id: String,
    pub stream: Mutex<Stream>,
    conn: watch::Sender<Option<Client>>,
    cmds: mpsc::Sender<Cmd>,
    inflight: Arc<Semaphore>,
    opts: DeviceOpts,
    next_cmid: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Device {
    /// Create the device and start its connection task.
    pub fn spawn(
        world: Arc<World>,
        addr: &str,
        user: &str,
        id: &str,
        opts: DeviceOpts,
        rng: StdRng,
    ) -> Arc<Device> {
        let (cmds, cmd_rx) = mpsc::channel(4);
        let dev = Arc::new(Device {
            user: user.to_owned(),
            id: id.to_owned(),
            stream: Mutex::new(Stream::default()),
            conn: watch::channel(None).0,
            cmds,
            inflight: Arc::new(Semaphore::new(opts.inflight as usize)),
            opts,
            next_cmid: AtomicU64::new(0),
            task: Mutex::new(None),
        });
        let cfg = ClientConfig::new(addr, user, id);
        let task = tokio::spawn(dev.clone().run(world, cfg, cmd_rx, rng));
        *lock(&dev.task) = Some(task);
        dev
    }

    /// The connection, if up.
    pub fn client(&self) -> Option<Client> {
        self.conn.borrow().clone().filter(|c| c.closed().is_none())
    }

    /// Ask the device to do something; false if it is busy with another
    /// command or gone.
    pub fn command(&self, cmd: Cmd) -> bool {
        self.cmds.try_send(cmd).is_ok()
    }

    /// A place for one more send, if the device is up and has room.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.client()?;
        self.inflight.clone().try_acquire_owned().ok()
    }

    /// Wait for the device's task to end (after [`Cmd::Leave`]).
    pub async fn join(&self) {
        let task = lock(&self.task).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Send one message to `target` with a fresh `client_msg_id`, retrying
    /// with the same id until acknowledged, and record the outcome.
    pub async fn send(&self, world: &World, target: Target, body: Vec<u8>) {
        let n = self.next_cmid.fetch_add(1, Ordering::Relaxed);
        let cmid = format!("{}.{n}", self.id);
        let key = (self.user.clone(), cmid.clone());
        lock(&world.ledger).insert(
            key.clone(),
            SendRecord {
                target: target.clone(),
                outcome: Outcome::Pending,
                attempts: 0,
            },
        );
        world.in_flight.fetch_add(1, Ordering::SeqCst);
        let (outcome, attempts) = self.send_until_acked(world, &cmid, &target, body).await;
        world.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(r) = lock(&world.ledger).get_mut(&key) {
            r.outcome = outcome;
            r.attempts = attempts;
        }
    }

    async fn send_until_acked(
        &self,
        world: &World,
        cmid: &str,
        target: &Target,
        body: Vec<u8>,
    ) -> (Outcome, u32) {
        let deadline = Instant::now() + self.opts.send_deadline;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut conn = self.conn.subscribe();
        let mut attempts = 0;
        loop {
            let up = tokio::time::timeout_at(
                deadline,
                conn.wait_for(|c| c.as_ref().is_some_and(|c| c.closed().is_none())),
            )
            .await
            .map(|r| r.map(|c| c.clone()));
            let client = match up {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => continue,
                Ok(Err(_)) => return (Outcome::Unresolved("device gone".into()), attempts),
                Err(_) => {
                    return (
                        Outcome::Unresolved("no connection before the deadline".into()),
                        attempts,
                    )
                }
            };
            attempts += 1;
            let result = match target {
                Target::User(to) => {
                    client
                        .send_with_id(cmid, to, "text/plain", body.clone())
                        .await
                }
                Target::Group(g) => {
                    client
                        .send_group_with_id(cmid, *g, "text/plain", body.clone())
                        .await
                }
            };
            let e = match result {
                Ok(ack) => return (Outcome::Acked(ack), attempts),
                Err(e) => e,
            };
            world.count_error("send", &e);
            if !e.is_retryable() {
                return (Outcome::Unresolved(format!("not retryable: {e}")), attempts);
            }
            let wait = backoff.next_delay();
            if Instant::now() + wait >= deadline {
                return (Outcome::Unresolved(format!("gave up: {e}")), attempts);
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn run(
        self: Arc<Self>,
        world: Arc<World>,
        cfg: ClientConfig,
        mut cmds: mpsc::Receiver<Cmd>,
        mut rng: StdRng,
    ) {
        // How the last connection ended: an exact resume point is only
        // promised if no kill -9 came between its confirmation and the
        // next Welcome.
        let mut exact: Option<(u64, u64)> = None;
        let mut first = true;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            let (client, mut rx) = match Client::connect(cfg.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    world.count_error("login", &e);
                    if !e.is_retryable() {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            let resume = match exact.take() {
                _ if first => Resume::First,
                Some((up_to, kills)) if kills == world.kills() => Resume::Exact { up_to },
                _ => Resume::AtMostAcked,
            };
            first = false;
            lock(&self.stream).on_welcome(client.welcome().cursor, resume);
            self.conn.send_replace(Some(client.clone()));

            let batch = rng.gen_range(1..=self.opts.ack_batch.max(1));
            let mut tick = tokio::time::interval(self.opts.ack_every);
            let cmd = loop {
                tokio::select! {
                    item = rx.next() => match item {
                        Some(DeliveryItem::Event(ev)) => {
                            self.on_event(&world, &client, &ev, &mut rng);
                            let last = lock(&self.stream).last_on_connection();
                            if last >= lock(&self.stream).acked() + batch {
                                self.ack(&client).await;
                            }
                        }
                        Some(DeliveryItem::Gap(g)) => world.count(&format!("gap reported by the library: {g}")),
                        Some(DeliveryItem::Typing(_) | DeliveryItem::Presence(_)) => {}
                        Some(DeliveryItem::Closed(_)) | None => break None,
                    },
                    _ = tick.tick() => self.ack(&client).await,
                    cmd = cmds.recv() => break Some(cmd.unwrap_or(Cmd::Leave)),
                }
            };
            let Some(cmd) = cmd else {
                // Lost (server killed, or closed by it): reconnect.
                self.conn.send_replace(None);
                if let Some(reason) = client.closed() {
                    world.count(&format!("connection lost: {}", short_reason(&reason)));
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            };
            let (pause, clean, leave) = match cmd {
                Cmd::Logout { pause, clean } => (pause, clean, false),
                Cmd::Leave => (Duration::ZERO, true, true),
            };
            // No new sends; the ones in flight finish first (deliveries are
            // still read meanwhile, or their Acks could queue behind them).
            let all = self.opts.inflight;
            let permits = self
                .drain_until(
                    &world,
                    &client,
                    &mut rx,
                    &mut rng,
                    self.inflight.clone().acquire_many_owned(all),
                )
                .await;
            self.conn.send_replace(None);
            let Some(Ok(permits)) = permits else {
                world.count("connection lost during a logout");
                if leave {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            };
            if clean {
                self.ack(&client).await;
                let kills = world.kills();
                let up_to = lock(&self.stream).acked();
                let pinged = self
                    .drain_until(&world, &client, &mut rx, &mut rng, client.ping())
                    .await;
                match pinged {
                    Some(Ok(_)) => exact = Some((up_to, kills)),
                    Some(Err(e)) => world.count_error("logout ping", &e),
                    None => world.count("connection lost during a logout"),
                }
            }
            client.close().await;
            drop(rx);
            if leave {
                return;
            }
            tokio::time::sleep(pause).await;
            drop(permits);
        }
    }

    /// Check one event, and now and then mark it read.
    fn on_event(&self, world: &Arc<World>, client: &Client, ev: &pb::Event, rng: &mut StdRng) {
        let replay = lock(&self.stream).on_event(ev);
        let Some(pb::event::Kind::Message(m)) = &ev.kind else {
            return;
        };
        if replay || m.from_user == self.user || !rng.gen_bool(self.opts.read_prob) {
            return;
        }
        let conv = if m.group_id != 0 {
            with_group(m.group_id)
        } else {
            with_user(&m.from_user)
        };
        let (client, world, id) = (client.clone(), world.clone(), m.id);
        tokio::spawn(async move {
            match client.mark_read(conv, id).await {
                // The device logged out meanwhile: nothing went wrong.
                Ok(()) | Err(ClientError::Disconnected(CloseReason::Local)) => {}
                Err(e) => world.count_error("mark read", &e),
            }
        });
    }

    /// Acknowledge everything delivered on this connection so far.
    async fn ack(&self, client: &Client) {
        let up_to = {
            let s = lock(&self.stream);
            let last = s.last_on_connection();
            if last <= s.acked() {
                return;
            }
            last
        };
        if client.ack_delivery(up_to).await.is_ok() {
            lock(&self.stream).on_ack(up_to);
        }
    }

    /// Run `fut` while still reading deliveries; None if the connection
    /// ended first.
    async fn drain_until<F: Future>(
        &self,
        world: &Arc<World>,
        client: &Client,
        rx: &mut Deliveries,
        rng: &mut StdRng,
        fut: F,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                item = rx.next() => match item {
                    Some(DeliveryItem::Event(ev)) => self.on_event(world, client, &ev, rng),
                    Some(DeliveryItem::Closed(_)) | None => return None,
                    Some(_) => {}
                },
            }
        }
    }
}

fn short_reason(r: &swiftlet_client::CloseReason) -> String {
    match r {
        swiftlet_client::CloseReason::Io(_) => "i/o error".into(),
        swiftlet_client::CloseReason::Server { code, .. } => {
            swiftlet_client::code_name(*code).into()
        }
        other => other.to_string(),
    }
}
