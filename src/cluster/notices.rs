//! Typing and presence across nodes, over Redis pub/sub: the cluster's
//! [`Ephemeral`] and [`Presence`].
//!
//! What may be lost goes this way only (see [`Ephemeral`]'s guarantees).
//! A typing notice for users of another node is published on that node's
//! channel (`swiftlet:eph:N`); a presence change of one of this node's
//! users is published to every node (`swiftlet:presence`), and the node
//! keeps its set of online users in Redis (`swiftlet:online:N`). Each node
//! keeps, in memory, the presence of other nodes' users it heard of; it
//! reads every live node's online set when its subscription starts (what
//! was published while it was away is lost) and every
//! [`RESYNC`] after, so a lost notice is corrected within that. A user
//! whose home has lost its lease counts as offline: a dead node's users
//! turn offline by themselves. Last seen of another node's user is what
//! its last offline notice said (0 if none was heard).
//!
//! Shards never wait for Redis: they hand notices to the publisher
//! thread's bounded queue, and a full queue drops the notice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::RwLock;
use prost::Message as _;
use swiftlet_protocol::{pb, Body, Envelope};

use super::local::{LocalEphemeral, LocalPresence};
use super::redis::{notice_channel, Link, PRESENCE_CHANNEL};
use super::table::Table;
use super::{Ephemeral, Home, Ownership, Partition, Presence};
use crate::hub::registry::{ConnRef, Registry};
use crate::store::StoreError;

/// Notices waiting for the publisher at most; more are dropped.
const QUEUE: usize = 16 * 1024;
/// How often each node's online set is read again.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Typing notices for users of one node.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeNotes {
    #[prost(message, repeated, tag = "1")]
    notes: Vec<NodeNote>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeNote {
    #[prost(string, repeated, tag = "1")]
    users: Vec<String>,
    /// The encoded frame to write to each of their connections.
    #[prost(bytes = "bytes", tag = "2")]
    frame: Bytes,
}

/// Presence changes of one node's users: each an encoded frame holding a
/// `pb::Presence`, exactly what the watchers are sent.
#[derive(Clone, PartialEq, prost::Message)]
struct PresenceNotes {
    #[prost(uint32, tag = "1")]
    node: u32,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    frames: Vec<Bytes>,
}

/// The `pb::Presence` an encoded presence frame holds.
fn presence_in(frame: &[u8]) -> Option<pb::Presence> {
    match swiftlet_protocol::codec::decode_frame(frame, usize::MAX) {
        Ok(Some((
            Envelope {
                body: Some(Body::Presence(p)),
                ..
            },
            _,
        ))) => Some(p),
        _ => None,
    }
}

enum Out {
    ToNode(u16, NodeNote),
    Presence(Bytes),
}

#[derive(Debug, Clone, Copy)]
struct Remote {
    node: u16,
    online: bool,
    last_seen_ms: u64,
}

/// The cluster's ephemeral notices and presence (see the module doc).
pub struct Notices {
    table: Arc<Table>,
    registry: Arc<Registry>,
    local: LocalEphemeral,
    local_presence: LocalPresence,
    tx: Sender<Out>,
    rx: Receiver<Out>,
    remote: RwLock<HashMap<String, Remote>>,
    /// Set when this node's online set in Redis must be written afresh.
    resync_own: AtomicBool,
    /// Notices dropped because the publisher was behind.
    pub dropped: AtomicU64,
}

impl Notices {
    pub fn new(
        table: Arc<Table>,
        registry: Arc<Registry>,
        local: LocalEphemeral,
        local_presence: LocalPresence,
    ) -> Notices {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        Notices {
            table,
            registry,
            local,
            local_presence,
            tx,
            rx,
            remote: RwLock::new(HashMap::new()),
            resync_own: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
        }
    }

    /// Redis may have lost this node's online set: write it again.
    pub fn resync(&self) {
        self.resync_own.store(true, Ordering::Release);
    }

    fn send(&self, out: Out) {
        if self.tx.try_send(out).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remote_home(&self, user: &str) -> Option<u16> {
        match self.table.home(Partition::of_user(user)) {
            Home::Remote { node, .. } => Some(node),
            _ => None,
        }
    }

    /// A presence frame from another node: remember it, pass it on.
    fn heard_presence(&self, node: u16, frame: Bytes) {
        let Some(p) = presence_in(&frame) else {
            crate::log_every!(
                1000,
                warn,
                "an undecodable presence notice from another node"
            );
            return;
        };
        self.remote.write().insert(
            p.user.clone(),
            Remote {
                node,
                online: p.online,
                last_seen_ms: p.last_seen_ms,
            },
        );
        self.local.to_watchers(&p.user, &mut || frame.clone());
    }

    /// Node `node`'s online users are exactly `online`.
    fn heard_online_set(&self, node: u16, online: Vec<String>) {
        let mut remote = self.remote.write();
        for r in remote.values_mut().filter(|r| r.node == node) {
            r.online = false;
        }
        for u in online {
            let e = remote.entry(u).or_insert(Remote {
                node,
                online: true,
                last_seen_ms: 0,
            });
            e.node = node;
            e.online = true;
        }
    }
}

impl Ephemeral for Notices {
    fn to_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    ) {
        let mut remote: Vec<(u16, Vec<String>)> = Vec::new();
        let mut local: Vec<&str> = Vec::new();
        for u in users {
            match self.remote_home(u) {
                Some(node) => match remote.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, v)) => v.push(u.to_owned()),
                    None => remote.push((node, vec![u.to_owned()])),
                },
                None => local.push(u),
            }
        }
        if !local.is_empty() {
            self.local
                .to_users(&mut local.into_iter(), scratch, frame.clone());
        }
        for (node, users) in remote {
            self.send(Out::ToNode(
                node,
                NodeNote {
                    users,
                    frame: frame.clone(),
                },
            ));
        }
    }

    fn to_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes) {
        // Watchers may be on any node: the frame is always built.
        let f = frame();
        self.local.to_watchers(user, &mut || f.clone());
        self.send(Out::Presence(f));
    }
}

impl Presence for Notices {
    fn is_online(&self, user: &str) -> bool {
        match self.remote_home(user) {
            None => self.local_presence.is_online(user),
            Some(node) => {
                self.table.alive(node)
                    && self
                        .remote
                        .read()
                        .get(user)
                        .is_some_and(|r| r.online && r.node == node)
            }
        }
    }

    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError> {
        match self.remote_home(user) {
            None => self.local_presence.last_seen(user),
            // What its home said when it went offline (already 0 if they
            // hide it).
            Some(_) => Ok((
                self.remote.read().get(user).map_or(0, |r| r.last_seen_ms),
                false,
            )),
        }
    }
}

/// The publisher thread: publishes what the shards queued, batched per
/// channel, and keeps this node's online set in Redis.
pub fn run_publisher(notices: Arc<Notices>, mut link: Link, stop: Arc<AtomicBool>) {
    let me = notices.table.me();
    let mut batch = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if notices.resync_own.swap(false, Ordering::AcqRel) {
            let online: Vec<String> = notices
                .registry
                .online_list()
                .iter()
                .map(|u| u.to_string())
                .collect();
            if let Err(e) = link.update_online(me, &online, &[], true) {
                crate::log_every!(1000, warn, error = %e, "writing this node's online set failed");
                notices.resync_own.store(true, Ordering::Release);
            }
        }
        match notices.rx.recv_timeout(Duration::from_millis(100)) {
            Ok(o) => batch.push(o),
            Err(_) => continue,
        }
        while batch.len() < 1024 {
            match notices.rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let mut per_node: Vec<(u16, NodeNotes)> = Vec::new();
        let mut presence = PresenceNotes {
            node: u32::from(me),
            frames: Vec::new(),
        };
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for o in batch.drain(..) {
            match o {
                Out::ToNode(node, note) => match per_node.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, v)) => v.notes.push(note),
                    None => per_node.push((node, NodeNotes { notes: vec![note] })),
                },
                Out::Presence(frame) => {
                    if let Some(p) = presence_in(&frame) {
                        if p.online {
                            add.push(p.user);
                        } else {
                            remove.push(p.user);
                        }
                    }
                    presence.frames.push(frame);
                }
            }
        }
        let mut failed = false;
        for (node, notes) in per_node {
            failed |= link
                .publish(&notice_channel(node), &notes.encode_to_vec())
                .is_err();
        }
        if !presence.frames.is_empty() {
            failed |= link
                .publish(PRESENCE_CHANNEL, &presence.encode_to_vec())
                .is_err();
            if link.update_online(me, &add, &remove, false).is_err() {
                notices.resync();
                failed = true;
            }
        }
        if failed {
            // Lost, as pub/sub may lose: the receivers resync.
            crate::log_every!(1000, warn, "publishing notices to other nodes failed");
        }
    }
}

/// The subscriber thread: delivers other nodes' notices to this node's
/// connections and keeps the presence of their users.
pub fn run_subscriber(notices: Arc<Notices>, url: &str, deadline: Duration, stop: Arc<AtomicBool>) {
    let me = notices.table.me();
    let channels = [notice_channel(me), PRESENCE_CHANNEL.to_owned()];
    let links = (Link::new(url, deadline), Link::new(url, deadline));
    let (Ok(mut sub), Ok(reads)) = links else {
        tracing::error!("the cluster URL was refused; no notices from other nodes");
        return;
    };
    let alive = || {
        let mut v: Vec<u16> = notices
            .table
            .peers()
            .into_iter()
            .filter(|(n, p)| *n != me && p.alive)
            .map(|(n, _)| n)
            .collect();
        v.sort_unstable();
        v
    };
    let resync = |reads: &mut Link| {
        for (node, peer) in notices.table.peers() {
            if node == me || !peer.alive {
                continue;
            }
            match reads.online(node) {
                Ok(set) => notices.heard_online_set(node, set),
                Err(e) => {
                    crate::log_every!(1000, warn, error = %e, "reading a node's online set failed")
                }
            }
        }
    };
    let reads = std::cell::RefCell::new(reads);
    let last = std::cell::Cell::new(Instant::now());
    // Read the online sets again every RESYNC, and at once when a node
    // joins or comes back.
    let synced_with = std::cell::RefCell::new(Vec::new());
    let maybe_resync = || {
        let now_alive = alive();
        if last.get().elapsed() >= RESYNC || *synced_with.borrow() != now_alive {
            resync(&mut reads.borrow_mut());
            last.set(Instant::now());
            *synced_with.borrow_mut() = now_alive;
        }
    };
    while !stop.load(Ordering::Acquire) {
        let result = sub.subscribe(
            &channels,
            &stop,
            || {
                resync(&mut reads.borrow_mut());
                last.set(Instant::now());
            },
            |channel, payload| {
                if channel == PRESENCE_CHANNEL {
                    match PresenceNotes::decode(payload) {
                        Ok(n) if n.node != u32::from(me) => {
                            let node = u16::try_from(n.node).unwrap_or(u16::MAX);
                            for f in n.frames {
                                notices.heard_presence(node, f);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => crate::log_every!(1000, warn, "an undecodable presence batch"),
                    }
                } else {
                    match NodeNotes::decode(payload) {
                        Ok(n) => {
                            let mut scratch = Vec::new();
                            for note in n.notes {
                                notices.local.to_users(
                                    &mut note.users.iter().map(String::as_str),
                                    &mut scratch,
                                    note.frame,
                                );
                            }
                        }
                        Err(_) => crate::log_every!(1000, warn, "an undecodable notice batch"),
                    }
                }
                maybe_resync();
            },
            maybe_resync,
        );
        if let Err(e) = result {
            crate::log_every!(1000, warn, error = %e, "the notice subscription failed; resubscribing");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        let n = NodeNotes {
            notes: vec![NodeNote {
                users: vec!["a".into(), "b".into()],
                frame: Bytes::from_static(b"f"),
            }],
        };
        assert_eq!(
            NodeNotes::decode(n.encode_to_vec().as_slice()).expect("decode"),
            n
        );
        let p = PresenceNotes {
            node: 3,
            frames: vec![Bytes::from_static(b"x")],
        };
        assert_eq!(
            PresenceNotes::decode(p.encode_to_vec().as_slice()).expect("decode"),
            p
        );
    }
}
