//! Who is online where: user id → the connections (shard, slot, generation)
//! of that user's logged-in devices, across all shards. The same structure
//! also indexes presence subscriptions (watched user → watching connections).
//!
//! The commit pipeline reads it to route pushes; shards write it on login and
//! logout. It is striped into independently locked maps so logins on
//! different shards rarely contend, and no lock is ever held across I/O: a
//! lookup copies the few `ConnRef`s out and releases the stripe.
//!
//! Memory per entry matters (it counts against the per-connection budget):
//! the user id is one shared `Arc<str>` (the same allocation the session
//! holds), and a user's connection lives inline in a `SmallVec` until the
//! user has a second device online.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use parking_lot::RwLock;
use smallvec::SmallVec;

/// Names one connection anywhere in the process: the shard that owns it, its
/// slot in that shard's slab, and the slot's generation (slots are reused;
/// the generation tells a new connection from the one a message was meant for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
    /// What the connection is, which decides what reaches it and how.
    /// Fits in padding.
    pub kind: ConnKind,
}

/// The two kinds of connection a [`ConnRef`] may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// A device's framed session (TCP, or WebSocket): it makes its user
    /// online, and takes the pipeline's answers as frames.
    Session,
    /// An HTTP exchange. A parked long-poll is woken by pushes like a
    /// device, but is not presence (polls come and go every few seconds,
    /// and would make the user flap online and offline); a send takes the
    /// pipeline's answer typed, as it answers in JSON, not in frames.
    Http,
}

impl ConnRef {
    /// The connection makes its user online.
    #[inline]
    pub fn presence(&self) -> bool {
        self.kind == ConnKind::Session
    }
}

impl ConnKind {
    /// The kind whose [`ConnRef::presence`] is `presence` (the two kinds
    /// differ in exactly that, so a peer node that names a connection by
    /// its presence flag names its kind).
    pub fn of_presence(presence: bool) -> ConnKind {
        if presence {
            ConnKind::Session
        } else {
            ConnKind::Http
        }
    }
}

/// What [`Registry::add`] did.
#[derive(Debug)]
pub struct Added {
    /// The shared id to keep in the session: all devices of a user share
    /// one string.
    pub user: Arc<str>,
    /// The user had no presence connection before this one: they came online.
    pub came_online: bool,
    /// Connections the user now has, this one included.
    pub conns: usize,
}

type Conns = SmallVec<[ConnRef; 1]>;
type Stripe = RwLock<HashMap<Arc<str>, Conns>>;

/// The process-wide map of online users.
pub struct Registry {
    stripes: Box<[Stripe]>,
    hasher: BuildHasherDefault<DefaultHasher>,
}

impl Registry {
    /// A registry with `stripes` independently locked parts (rounded up to a
    /// power of two).
    pub fn new(stripes: usize) -> Self {
        let n = stripes.max(1).next_power_of_two();
        Registry {
            stripes: (0..n).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: BuildHasherDefault::default(),
        }
    }

    fn stripe(&self, user: &str) -> &Stripe {
        let h = self.hasher.hash_one(user) as usize;
        &self.stripes[h & (self.stripes.len() - 1)]
    }

    /// Record that `conn` is a connection of `user`.
    pub fn add(&self, user: &str, conn: ConnRef) -> Added {
        let mut map = self.stripe(user).write();
        if let Some(conns) = map.get_mut(user) {
            let came_online = conn.presence() && !conns.iter().any(ConnRef::presence);
            conns.push(conn);
            let n = conns.len();
            if let Some((key, _)) = map.get_key_value(user) {
                return Added {
                    user: key.clone(),
                    came_online,
                    conns: n,
                };
            }
        }
        let key: Arc<str> = Arc::from(user);
        map.insert(key.clone(), SmallVec::from_elem(conn, 1));
        Added {
            user: key,
            came_online: conn.presence(),
            conns: 1,
        }
    }

    /// Forget `conn`; the user's entry goes when its last connection does.
    /// True when the user went offline: `conn` was their last presence
    /// connection.
    pub fn remove(&self, user: &str, conn: ConnRef) -> bool {
        let mut map = self.stripe(user).write();
        if let Some(conns) = map.get_mut(user) {
            conns.retain(|c| *c != conn);
            let online = conns.iter().any(ConnRef::presence);
            if conns.is_empty() {
                map.remove(user);
            }
            return conn.presence() && !online;
        }
        false
    }

    /// Append the connections of `user` to `out`.
    pub fn lookup(&self, user: &str, out: &mut Vec<ConnRef>) {
        if let Some(conns) = self.stripe(user).read().get(user) {
            out.extend_from_slice(conns);
        }
    }

    /// True when any device of `user` is connected.
    pub fn is_online(&self, user: &str) -> bool {
        self.stripe(user)
            .read()
            .get(user)
            .is_some_and(|conns| conns.iter().any(ConnRef::presence))
    }

    /// Every user with a device connected (a presence connection).
    pub fn online_list(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for s in self.stripes.iter() {
            for (u, conns) in s.read().iter() {
                if conns.iter().any(ConnRef::presence) {
                    out.push(u.clone());
                }
            }
        }
        out
    }

    /// Users with at least one connection (a device, or a parked long-poll).
    pub fn online_users(&self) -> usize {
        self.stripes.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_share_one_id_and_leave_cleanly() {
        let r = Registry::new(4);
        let a = ConnRef {
            shard: 0,
            slot: 1,
            gen: 1,
            kind: ConnKind::Session,
        };
        let b = ConnRef {
            shard: 1,
            slot: 7,
            gen: 3,
            kind: ConnKind::Session,
        };
        let first = r.add("alice", a);
        assert!(first.came_online);
        let second = r.add("alice", b);
        assert!(!second.came_online);
        assert_eq!(second.conns, 2);
        assert!(Arc::ptr_eq(&first.user, &second.user));
        let mut out = Vec::new();
        r.lookup("alice", &mut out);
        assert_eq!(out, vec![a, b]);
        assert!(!r.remove("alice", a));
        assert!(r.is_online("alice"));
        assert!(r.remove("alice", b));
        assert!(!r.is_online("alice"));
        assert_eq!(r.online_users(), 0);
    }

    #[test]
    fn a_long_poll_is_routed_to_but_is_not_presence() {
        let r = Registry::new(4);
        let poll = ConnRef {
            shard: 0,
            slot: 2,
            gen: 9,
            kind: ConnKind::Http,
        };
        let device = ConnRef {
            shard: 0,
            slot: 3,
            gen: 9,
            kind: ConnKind::Session,
        };
        assert!(!r.add("bob", poll).came_online);
        assert!(!r.is_online("bob"));
        // A device logging in while a poll is parked brings bob online.
        assert!(r.add("bob", device).came_online);
        let mut out = Vec::new();
        r.lookup("bob", &mut out);
        assert_eq!(out, vec![poll, device]);
        assert!(!r.remove("bob", poll));
        assert!(r.remove("bob", device));
        assert!(!r.is_online("bob"));
    }
}
