//! The verification pass, run once traffic is quiesced: every inbox paged
//! with `Sync` from seq 0 and compared with the ledger and with every
//! device's stream. What "exactly once" means, precisely:
//!
//! - **Per inbox** (the server's promise, protocol sections 6 and 7): an
//!   acknowledged message is in the inbox of each user it was for (sender
//!   and recipient of a 1:1 message, once if they are the same; every
//!   member of a group, sender included) **exactly once**, with the
//!   `server_msg_id` its Ack named, and `Ack.seq` is its seq in the
//!   sender's inbox. A send that never got an Ack (given up) is in all of
//!   those inboxes once or in none (one write batch). No inbox holds a
//!   message nobody sent, nor two copies of one `client_msg_id` (a retry
//!   stored again). Seqs run 1, 2, 3, ... without holes.
//! - **With retention** (the soak runs it at its defaults): an inbox holds
//!   the run `first_available_seq..=head`, and an acknowledged message may
//!   be missing from it only if retention removed it: if it is older (by
//!   id) than every message the inbox still holds. That rests on message
//!   ids growing with seqs within an inbox (ids are taken in commit order
//!   on one node), which is checked too.
//! - **Per device** (checked as it goes by [`crate::stream::Stream`]):
//!   gap-free and in order within each connection, never resuming past
//!   what it acknowledged, replays only at the start of a connection and
//!   only of events it saw; here, finally, every seq it saw is the inbox's
//!   event at that seq, and a connected device has seen the whole inbox.
//! - **Retries after a restart** ([`resend_sample`]): re-sending an
//!   acknowledged `client_msg_id` gets the same Ack (id, time, seq) and
//!   stores nothing, which the next inbox check confirms.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use swiftlet_client::{pb, Client, ClientConfig};
use tokio::time::Instant;

use crate::stream::fingerprint;
use crate::world::{lock, Outcome, Target, World};

/// How long devices get to catch up with their inboxes.
const CATCH_UP: Duration = Duration::from_secs(60);

/// At most this many violation texts go into a report (all are counted).
const KEPT: usize = 30;

/// What one verification pass found.
#[derive(Debug, Default, Clone)]
pub struct Verified {
    pub inboxes: usize,
    pub events: u64,
    pub acked: u64,
    /// Acknowledged sends that took more than one attempt (their first
    /// lost to a kill): each still stored once.
    pub retried: u64,
    pub unresolved: u64,
    /// (Message, inbox) pairs absent because retention removed them (older
    /// than everything the inbox still holds).
    pub trimmed: u64,
    /// Unresolved sends found stored (in every inbox they were for).
    pub unresolved_stored: u64,
    pub devices: usize,
    pub delivered: u64,
    pub replayed: u64,
    pub violations: u64,
    pub texts: Vec<String>,
}

impl Verified {
    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.texts.len() < KEPT {
            self.texts.push(what);
        }
    }
}

struct Inbox {
    /// The oldest seq held (1 unless retention removed some).
    first: u64,
    /// Fingerprints of seqs `first..`.
    fps: Vec<u64>,
    /// The smallest message id held: in an inbox, ids grow with seqs
    /// (checked), so a message with a smaller id may have been trimmed.
    oldest_id: Option<u64>,
    /// Message id -> (seqs it is at, from_user, client_msg_id).
    messages: HashMap<u64, (Vec<u64>, String, String)>,
}

/// Verify everything the world knows against the server at `addr`.
pub async fn verify(world: &Arc<World>, addr: &str) -> anyhow::Result<Verified> {
    let mut out = Verified::default();
    let users: Vec<(String, bool)> = lock(&world.users)
        .iter()
        .map(|u| (u.name.clone(), u.active))
        .collect();
    let devices = world.all_devices();
    let active_devices: Vec<_> = {
        let users = lock(&world.users);
        users
            .iter()
            .filter(|u| u.active)
            .flat_map(|u| u.devices.iter().cloned())
            .collect()
    };

    // Every active device connected, then caught up with its inbox's head.
    let deadline = Instant::now() + CATCH_UP;
    while active_devices.iter().any(|d| d.client().is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delivered receipts and read marks trail the traffic by a little.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut heads = HashMap::new();
    for (user, _) in &users {
        let client = client_for(world, addr, user).await?;
        let batch = client.0.sync(0, 1).await.context("head sync")?;
        heads.insert(user.clone(), batch.head_seq);
        client.close().await;
    }
    for d in &active_devices {
        let head = heads.get(&d.user).copied().unwrap_or(0);
        while lock(&d.stream).contiguous() < head && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Page every inbox.
    let mut inboxes = HashMap::new();
    for (user, _) in &users {
        let client = client_for(world, addr, user).await?;
        let inbox = page_settled(&client.0, user, &mut out).await?;
        client.close().await;
        out.inboxes += 1;
        out.events += inbox.fps.len() as u64;
        for (id, (seqs, ..)) in &inbox.messages {
            if seqs.len() > 1 {
                out.violation(format!(
                    "{user}: message {id} is in the inbox {} times, at seqs {seqs:?}",
                    seqs.len()
                ));
            }
        }
        inboxes.insert(user.clone(), inbox);
    }

    // The ledger against the inboxes.
    let ledger: Vec<_> = lock(&world.ledger)
        .iter()
        .map(|((from, cmid), r)| {
            (
                from.clone(),
                cmid.clone(),
                r.target.clone(),
                r.outcome.clone(),
                r.attempts,
            )
        })
        .collect();
    let mut by_cmid: HashMap<(String, String), Option<u64>> = HashMap::new();
    for (from, cmid, target, outcome, attempts) in ledger {
        let recipients = world.recipients(&from, &target);
        match outcome {
            Outcome::Pending => {
                out.violation(format!("{from}/{cmid}: still pending at verification"))
            }
            Outcome::Acked(ack) => {
                out.acked += 1;
                out.retried += u64::from(attempts > 1);
                by_cmid.insert((from.clone(), cmid.clone()), Some(ack.server_msg_id));
                for r in &recipients {
                    let found = inboxes
                        .get(r)
                        .and_then(|i| i.messages.get(&ack.server_msg_id));
                    match found {
                        None if inboxes.get(r).is_some_and(|i| i.trimmed(ack.server_msg_id)) => {
                            out.trimmed += 1;
                        }
                        None => out.violation(format!(
                            "{from}/{cmid} (id {}, to {target:?}) acknowledged but missing from {r}'s inbox",
                            ack.server_msg_id
                        )),
                        Some((_, f, c)) if *f != from || *c != cmid => out.violation(format!(
                            "{r}'s message {} is {f}/{c}, the Ack named {from}/{cmid}",
                            ack.server_msg_id
                        )),
                        Some(_) => {}
                    }
                }
                let sender = inboxes.get(&from);
                if ack.seq != 0 && sender.is_some_and(|i| ack.seq >= i.first) {
                    let at = sender.and_then(|i| i.messages.get(&ack.server_msg_id));
                    if !at.is_some_and(|(seqs, ..)| seqs.contains(&ack.seq)) {
                        out.violation(format!(
                            "{from}/{cmid}: Ack.seq {} is not its seq in the sender's inbox",
                            ack.seq
                        ));
                    }
                }
            }
            Outcome::Unresolved(why) => {
                out.unresolved += 1;
                by_cmid.insert((from.clone(), cmid.clone()), None);
                let holders = recipients
                    .iter()
                    .filter(|r| {
                        inboxes.get(*r).is_some_and(|i| {
                            i.messages
                                .values()
                                .any(|(_, f, c)| *f == from && *c == cmid)
                        })
                    })
                    .count();
                let trimmed = recipients
                    .iter()
                    .any(|r| inboxes.get(r).is_some_and(|i| i.first > 1));
                if holders == recipients.len() {
                    out.unresolved_stored += 1;
                } else if holders != 0 && !trimmed {
                    out.violation(format!(
                        "{from}/{cmid} ({why}) is in {holders} of its {} inboxes",
                        recipients.len()
                    ));
                }
            }
        }
    }
    // Every stored message was sent by the exercise, once.
    for (user, inbox) in &inboxes {
        for (id, (_, from, cmid)) in &inbox.messages {
            match by_cmid.get(&(from.clone(), cmid.clone())) {
                None => out.violation(format!("{user}: message {id} ({from}/{cmid}) was never sent")),
                Some(Some(acked)) if acked != id => out.violation(format!(
                    "{user}: {from}/{cmid} stored as {id} besides its acknowledged {acked} (a retry stored twice)"
                )),
                Some(_) => {}
            }
        }
    }

    // Every device's stream against its inbox.
    for d in &devices {
        let Some(inbox) = inboxes.get(&d.user) else {
            continue;
        };
        let online = active_devices.iter().any(|a| Arc::ptr_eq(a, d));
        let must_reach = if online {
            heads.get(&d.user).copied().unwrap_or(0)
        } else {
            0
        };
        let mut s = lock(&d.stream);
        s.check_against(&inbox.fps, inbox.first, must_reach);
        out.devices += 1;
        out.delivered += s.delivered;
        out.replayed += s.replayed;
        if s.violations() > 0 {
            out.violations += s.violations();
            for t in s.violation_texts() {
                if out.texts.len() < KEPT {
                    out.texts.push(format!("{}/{}: {t}", d.user, d.id));
                }
            }
        }
    }
    Ok(out)
}

/// A connection to read `user`'s inbox with: one of their devices', or a
/// short-lived one for a user who left.
async fn client_for(world: &World, addr: &str, user: &str) -> anyhow::Result<Reader> {
    let existing = lock(&world.users)
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| u.devices.iter().find_map(|d| d.client()));
    if let Some(c) = existing {
        return Ok(Reader(c, false));
    }
    // Its pushes are dropped: only Sync answers are read.
    let (c, _) = Client::connect(ClientConfig::new(addr, user, "verifier"))
        .await
        .with_context(|| format!("log in as {user} to verify"))?;
    Ok(Reader(c, true))
}

struct Reader(Client, bool);

impl Reader {
    async fn close(self) {
        if self.1 {
            self.0.close().await;
        }
    }
}

/// Page `user`'s inbox; again (up to 3 times) if retention trimmed it
/// while it was being read.
async fn page_settled(client: &Client, user: &str, out: &mut Verified) -> anyhow::Result<Inbox> {
    for _ in 0..3 {
        if let Some(inbox) = page(client, user, out).await? {
            return Ok(inbox);
        }
    }
    anyhow::bail!("{user}'s inbox was trimmed while it was read, three times")
}

/// One pass over the inbox from seq 0; None if retention moved its start
/// between two pages.
async fn page(client: &Client, user: &str, out: &mut Verified) -> anyhow::Result<Option<Inbox>> {
    let mut inbox = Inbox {
        first: 1,
        fps: Vec::new(),
        oldest_id: None,
        messages: HashMap::new(),
    };
    let mut after = 0;
    let mut epoch = None;
    let mut last_id = 0;
    loop {
        let batch = client.sync(after, 500).await.context("sync")?;
        if *epoch.get_or_insert(batch.inbox_epoch) != batch.inbox_epoch {
            out.violation(format!("{user}: the inbox epoch changed while paging"));
        }
        if after == 0 {
            inbox.first = batch.first_available_seq.max(1);
            after = inbox.first - 1;
        } else if batch.first_available_seq > after + 1 {
            return Ok(None);
        }
        for ev in &batch.events {
            if ev.seq != after + 1 {
                out.violation(format!("{user}: inbox seq {} follows {after}", ev.seq));
            }
            after = ev.seq;
            inbox.fps.push(fingerprint(ev));
            if let Some(pb::event::Kind::Message(m)) = &ev.kind {
                if m.id <= last_id && !inbox.messages.contains_key(&m.id) {
                    out.violation(format!(
                        "{user}: message {} at seq {} is older than one before it",
                        m.id, ev.seq
                    ));
                }
                last_id = last_id.max(m.id);
                inbox.oldest_id = Some(inbox.oldest_id.map_or(m.id, |o| o.min(m.id)));
                let e = inbox
                    .messages
                    .entry(m.id)
                    .or_insert_with(|| (Vec::new(), m.from_user.clone(), m.client_msg_id.clone()));
                e.0.push(ev.seq);
            }
        }
        if !batch.has_more || batch.events.is_empty() {
            return Ok(Some(inbox));
        }
    }
}

impl Inbox {
    /// Whether message `id`, absent here, may have been removed by
    /// retention: something was trimmed and `id` is older than every
    /// message still held.
    fn trimmed(&self, id: u64) -> bool {
        self.first > 1 && self.oldest_id.is_none_or(|oldest| id < oldest)
    }
}

/// Re-send up to `n` acknowledged messages with their `client_msg_id`s
/// through a connected device of their sender (any device: the id is
/// unique per user), and check each gets its first Ack again. Returns how
/// many were re-sent; mismatches are counted as violations in `world`.
pub async fn resend_sample(world: &World, n: usize, rng: &mut StdRng) -> (u64, Vec<String>) {
    let sample: Vec<_> = lock(&world.ledger)
        .iter()
        .filter_map(|((from, cmid), r)| match &r.outcome {
            Outcome::Acked(ack) => {
                Some((from.clone(), cmid.clone(), r.target.clone(), ack.clone()))
            }
            _ => None,
        })
        .choose_multiple(rng, n);
    let mut bad = Vec::new();
    let mut done = 0;
    for (from, cmid, target, ack) in sample {
        let client = lock(&world.users)
            .iter()
            .find(|u| u.name == from && u.active)
            .and_then(|u| u.devices.iter().find_map(|d| d.client()));
        let Some(client) = client else { continue };
        let again = match &target {
            Target::User(to) => client.send_with_id(&cmid, to, "text/plain", "again").await,
            Target::Group(g) => {
                client
                    .send_group_with_id(&cmid, *g, "text/plain", "again")
                    .await
            }
        };
        match again {
            Ok(a) if (a.server_msg_id, a.timestamp_ms, a.seq) == (ack.server_msg_id, ack.timestamp_ms, ack.seq) => done += 1,
            Ok(a) => bad.push(format!(
                "re-sent {from}/{cmid}: Ack (id {}, ts {}, seq {}) differs from the first (id {}, ts {}, seq {})",
                a.server_msg_id, a.timestamp_ms, a.seq, ack.server_msg_id, ack.timestamp_ms, ack.seq
            )),
            Err(e) => world.count_error("re-send", &e),
        }
    }
    (done, bad)
}
