//! A scripted node for tests of request handling: an in-memory store with
//! inboxes, cursors, groups and messages; a manual clock; a registry and
//! watchers in plain maps; and recorders of every effect (commands
//! submitted to the pipeline, notices routed). Switches make the pipeline
//! busy or the store's reads fail. Beside it, [`TestConn`]: a connection's
//! protocol fields, as the shard keeps them, with a recording [`Output`].
//!
//! Tokens: `tok:<user>` logs in as `<user>`, `old:<user>` is an expired
//! token, anything else is refused. Users in `remote` are homed on another
//! node (alive when it is in `alive`), users in `homeless` on none, groups
//! in `remote_groups` on another node; `fenced` makes the node unwritable.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use swiftlet_protocol::codec::decode_frame;
use swiftlet_protocol::pb::{self, GroupRole};
use swiftlet_protocol::{Envelope, ErrorCode};

use super::bucket;
use super::delivery::Delivery;
use super::services::{Limits, NodeServices};
use super::state::{Carries, Output, Phase, Session};
use crate::auth::{AuthError, Identity};
use crate::clock::{Clock, ManualClock};
use crate::cluster::Home;
use crate::commit::{CommitCmd, SubmitError};
use crate::groups::Group;
use crate::hub::registry::{Added, ConnKind, ConnRef};
use crate::store::{InboxPage, StoreError};

/// Where a recorded notice went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeTo {
    /// Every live connection of these users.
    Users(Vec<String>),
    /// Everyone watching this user's presence.
    Watchers(String),
}

/// An ephemeral notice the code under test routed.
#[derive(Debug, Clone)]
pub struct Notice {
    pub to: NoticeTo,
    pub env: Envelope,
}

pub struct ScriptedNode {
    pub shard: u16,
    pub limits: Limits,
    pub manual: ManualClock,
    clock: Clock,
    /// Each user's inbox: the event at index i has seq i + 1.
    pub inboxes: HashMap<String, Vec<pb::Event>>,
    pub cursors: HashMap<(String, String), u64>,
    pub groups: HashMap<u64, Arc<Group>>,
    pub messages: HashMap<u64, pb::Message>,
    pub last_seen: HashMap<String, (u64, bool)>,
    /// Users whose home is another node, and which node.
    pub remote: HashMap<String, u16>,
    /// Nodes a redirect may send a client to.
    pub alive: HashSet<u16>,
    /// Users no node is home to.
    pub homeless: HashSet<String>,
    /// Groups whose home is another node.
    pub remote_groups: HashSet<u64>,
    /// The node lost its cluster lease while set.
    pub fenced: Cell<bool>,
    /// Logins refused for a home elsewhere: (redirected, unavailable).
    pub refusals: Cell<(u32, u32)>,
    pub epoch: u64,
    /// Every store read fails while set.
    pub fail_reads: Cell<bool>,
    /// The pipeline's queue is full while set.
    pub busy: Cell<bool>,
    pub registry: RefCell<HashMap<Arc<str>, Vec<ConnRef>>>,
    pub watchers: RefCell<HashMap<Arc<str>, Vec<ConnRef>>>,
    /// Effects, in order.
    pub submitted: RefCell<Vec<CommitCmd>>,
    pub notices: RefCell<Vec<Notice>>,
}

impl ScriptedNode {
    pub fn new(limits: Limits) -> Self {
        let manual = ManualClock::new(1_700_000_000_000);
        ScriptedNode {
            shard: 0,
            limits,
            clock: manual.clock(),
            manual,
            inboxes: HashMap::new(),
            cursors: HashMap::new(),
            groups: HashMap::new(),
            messages: HashMap::new(),
            last_seen: HashMap::new(),
            remote: HashMap::new(),
            alive: HashSet::new(),
            homeless: HashSet::new(),
            remote_groups: HashSet::new(),
            fenced: Cell::new(false),
            refusals: Cell::new((0, 0)),
            epoch: 42,
            fail_reads: Cell::new(false),
            busy: Cell::new(false),
            registry: RefCell::new(HashMap::new()),
            watchers: RefCell::new(HashMap::new()),
            submitted: RefCell::new(Vec::new()),
            notices: RefCell::new(Vec::new()),
        }
    }

    /// Give `user` an inbox of `n` messages (seqs 1..=n).
    pub fn fill_inbox(&mut self, user: &str, n: u64) {
        let events = (1..=n)
            .map(|seq| pb::Event {
                seq,
                kind: Some(pb::event::Kind::Message(pb::Message {
                    id: 1_000 + seq,
                    from_user: "someone".into(),
                    to_user: user.into(),
                    body: Bytes::from_static(b"0123456789"),
                    ..Default::default()
                })),
            })
            .collect();
        self.inboxes.insert(user.to_owned(), events);
    }

    /// Add a group whose first member is its admin.
    pub fn add_group(&mut self, id: u64, members: &[&str]) {
        let members = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = if i == 0 {
                    GroupRole::Admin
                } else {
                    GroupRole::Member
                };
                (Arc::<str>::from(*m), role)
            })
            .collect();
        let g = Group::new(id, format!("g{id}"), "x".into(), 1, 1, members);
        self.groups.insert(id, Arc::new(g));
    }

    /// The connections registered for `user`.
    pub fn registered(&self, user: &str) -> Vec<ConnRef> {
        self.registry
            .borrow()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    fn read(&self) -> Result<(), StoreError> {
        if self.fail_reads.get() {
            Err(StoreError::Corrupt("scripted read failure".into()))
        } else {
            Ok(())
        }
    }
}

fn add(map: &RefCell<HashMap<Arc<str>, Vec<ConnRef>>>, user: &str, conn: ConnRef) -> Added {
    let mut map = map.borrow_mut();
    let key = map
        .get_key_value(user)
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| Arc::from(user));
    let conns = map.entry(key.clone()).or_default();
    let came_online = conn.presence() && !conns.iter().any(ConnRef::presence);
    conns.push(conn);
    Added {
        user: key,
        came_online,
        conns: conns.len(),
    }
}

fn remove(map: &RefCell<HashMap<Arc<str>, Vec<ConnRef>>>, user: &str, conn: ConnRef) -> bool {
    let mut map = map.borrow_mut();
    let Some(conns) = map.get_mut(user) else {
        return false;
    };
    conns.retain(|c| *c != conn);
    let online = conns.iter().any(ConnRef::presence);
    if conns.is_empty() {
        map.remove(user);
    }
    conn.presence() && !online
}

/// A notice's frame, as the test reads it back.
fn decode(frame: &Bytes) -> Envelope {
    match decode_frame(frame, usize::MAX) {
        Ok(Some((env, used))) if used == frame.len() => env,
        other => panic!("a notice is one whole frame, not {other:?}"),
    }
}

impl NodeServices for ScriptedNode {
    fn shard_id(&self) -> u16 {
        self.shard
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn clock(&self) -> &Clock {
        &self.clock
    }

    fn count_login(&self, _outcome: Result<(), ErrorCode>) {}

    fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(u) = token.strip_prefix("tok:") {
            return Ok(Identity {
                user: u.to_owned(),
                issued_at: 0,
            });
        }
        let code = if token.starts_with("old:") {
            ErrorCode::TokenExpired
        } else {
            ErrorCode::AuthFailed
        };
        Err(AuthError {
            code,
            reason: "scripted refusal".into(),
        })
    }

    fn home_of_user(&self, user: &str) -> Home {
        match self.remote.get(user) {
            Some(&node) => Home::Remote { node, epoch: 1 },
            None if self.homeless.contains(user) => Home::Unknown,
            None => Home::Local { epoch: 1 },
        }
    }

    fn home_of_group(&self, id: u64) -> Home {
        if self.remote_groups.contains(&id) {
            Home::Remote { node: 2, epoch: 1 }
        } else {
            Home::Local { epoch: 1 }
        }
    }

    fn writable(&self) -> bool {
        !self.fenced.get()
    }

    fn redirect(&self, node: u16) -> Option<pb::Redirect> {
        self.alive.contains(&node).then(|| pb::Redirect {
            node_id: u32::from(node),
            tcp_addr: format!("10.0.0.{node}:7400"),
            http_addr: format!("10.0.0.{node}:7480"),
        })
    }

    fn count_refusal(&self, redirected: bool) {
        let (r, u) = self.refusals.get();
        self.refusals
            .set(if redirected { (r + 1, u) } else { (r, u + 1) });
    }

    fn register(&self, user: &str, conn: ConnRef) -> Added {
        add(&self.registry, user, conn)
    }

    fn unregister(&self, user: &str, conn: ConnRef) -> bool {
        remove(&self.registry, user, conn)
    }

    fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        self.read()?;
        Ok(self
            .cursors
            .get(&(user.to_owned(), device.to_owned()))
            .copied()
            .unwrap_or(0))
    }

    fn head(&self, user: &str) -> Result<u64, StoreError> {
        self.read()?;
        Ok(self.inboxes.get(user).map_or(0, |v| v.len() as u64))
    }

    fn first_seq(&self, user: &str) -> Result<u64, StoreError> {
        self.read()?;
        Ok(self
            .inboxes
            .get(user)
            .map_or(0, |v| u64::from(!v.is_empty())))
    }

    fn inbox_epoch(&self) -> u64 {
        self.epoch
    }

    fn inbox_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        _max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        self.read()?;
        let all = self.inboxes.get(user).map(Vec::as_slice).unwrap_or(&[]);
        let mut rest = all.iter().filter(|e| e.seq > after);
        let events: Vec<pb::Event> = rest.by_ref().take(limit).cloned().collect();
        Ok(InboxPage {
            events,
            has_more: rest.next().is_some(),
            first_available: all.first().map_or(0, |e| e.seq),
            head: all.last().map_or(0, |e| e.seq),
        })
    }

    fn is_member(&self, user: &str, group: u64) -> Result<bool, StoreError> {
        self.read()?;
        Ok(self.groups.get(&group).is_some_and(|g| g.is_member(user)))
    }

    fn group(&self, id: u64) -> Result<Option<Arc<Group>>, StoreError> {
        self.read()?;
        Ok(self.groups.get(&id).cloned())
    }

    fn memberships_page(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        self.read()?;
        let mut ids: Vec<u64> = self
            .groups
            .values()
            .filter(|g| g.id > after && g.is_member(user))
            .map(|g| g.id)
            .collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    fn message(&self, id: u64) -> Result<Option<pb::Message>, StoreError> {
        self.read()?;
        Ok(self.messages.get(&id).cloned())
    }

    fn watermarks(
        &self,
        _conversation: &[u8],
        users: &[&str],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read()?;
        Ok(users.iter().map(|_| (0, 0)).collect())
    }

    fn is_online(&self, user: &str) -> bool {
        self.registry
            .borrow()
            .get(user)
            .is_some_and(|c| c.iter().any(ConnRef::presence))
    }

    fn last_seen(&self, user: &str) -> Result<(u64, bool), StoreError> {
        self.read()?;
        Ok(self.last_seen.get(user).copied().unwrap_or((0, false)))
    }

    fn watch(&self, user: &str, conn: ConnRef) -> Arc<str> {
        add(&self.watchers, user, conn).user
    }

    fn unwatch(&self, user: &str, conn: ConnRef) {
        remove(&self.watchers, user, conn);
    }

    fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError> {
        if self.busy.get() {
            return Err(SubmitError::Busy);
        }
        self.submitted.borrow_mut().push(cmd);
        Ok(())
    }

    fn notify_users(
        &self,
        users: &mut dyn Iterator<Item = &str>,
        _scratch: &mut Vec<ConnRef>,
        frame: Bytes,
    ) {
        let to = NoticeTo::Users(users.map(str::to_owned).collect());
        let env = decode(&frame);
        self.notices.borrow_mut().push(Notice { to, env });
    }

    fn notify_watchers(&self, user: &str, frame: &mut dyn FnMut() -> Bytes) {
        let to = NoticeTo::Watchers(user.to_owned());
        let env = decode(&frame());
        self.notices.borrow_mut().push(Notice { to, env });
    }
}

/// A connection's protocol fields, as the shard keeps them in its slab
/// slot, and the answers written to it.
pub struct TestConn {
    pub slot: u32,
    pub gen: u32,
    pub phase: Phase,
    pub user: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
    pub token_iat: u32,
    pub carries: Carries,
    /// Boxed as the shard's `Conn` keeps it (one pointer when empty).
    #[allow(clippy::box_collection)]
    pub watching: Option<Box<Vec<Arc<str>>>>,
    pub in_flight: u8,
    pub typing_tokens: u8,
    /// Instant the typing bucket was refilled to (see [`TestConn::refill`]).
    pub refilled: u32,
    /// Every envelope queued to the client, in order.
    pub out: Vec<Envelope>,
}

/// Records what a session queues.
pub struct Recorder<'a>(&'a mut Vec<Envelope>);

impl Output for Recorder<'_> {
    fn send_env(&mut self, env: &Envelope) {
        self.0.push(env.clone());
    }
}

impl TestConn {
    /// A TCP connection accepted at tick `now`.
    pub fn new(slot: u32, gen: u32, now: u32) -> Self {
        TestConn {
            slot,
            gen,
            phase: Phase::Handshake,
            user: None,
            device: None,
            token_iat: 0,
            carries: Carries::Frames(Delivery::default()),
            watching: None,
            in_flight: 0,
            typing_tokens: bucket::TYPING_FULL,
            refilled: now,
            out: Vec::new(),
        }
    }

    /// How the registry names this connection.
    pub fn me(&self, shard: u16) -> ConnRef {
        ConnRef {
            shard,
            slot: self.slot,
            gen: self.gen,
            kind: ConnKind::Session,
        }
    }

    /// Refill the typing bucket to tick `now` (in ticks, not instants), as the shard does before it
    /// handles a connection's input (frames are not limited here).
    pub fn refill(&mut self, now: u32) {
        bucket::refill(
            &mut self.typing_tokens,
            &mut 0,
            &mut self.refilled,
            now.wrapping_mul(bucket::UNITS_PER_TICK),
            bucket::FrameRate::OFF,
        );
    }

    /// The view request handling is given (as `Conn::session` builds it).
    pub fn session(&mut self) -> Session<'_, Recorder<'_>> {
        Session {
            phase: &mut self.phase,
            user: &mut self.user,
            device: &mut self.device,
            token_iat: &mut self.token_iat,
            carries: &mut self.carries,
            watching: &mut self.watching,
            in_flight: &mut self.in_flight,
            typing_tokens: &mut self.typing_tokens,
            gen: self.gen,
            out: Recorder(&mut self.out),
        }
    }
}
