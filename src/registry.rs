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

    /// Record that `conn` is a logged-in device of `user`. Returns the shared
    /// id to keep in the session, so all devices of a user share one string,
    /// and whether this is the user's first connection (they came online).
    pub fn add(&self, user: &str, conn: ConnRef) -> (Arc<str>, bool) {
        let mut map = self.stripe(user).write();
        if let Some(conns) = map.get_mut(user) {
            conns.push(conn);
            if let Some((key, _)) = map.get_key_value(user) {
                return (key.clone(), false);
            }
        }
        let key: Arc<str> = Arc::from(user);
        map.insert(key.clone(), SmallVec::from_elem(conn, 1));
        (key, true)
    }

    /// Forget `conn`; the user's entry goes when its last connection does.
    /// True when that happened (the user went offline).
    pub fn remove(&self, user: &str, conn: ConnRef) -> bool {
        let mut map = self.stripe(user).write();
        if let Some(conns) = map.get_mut(user) {
            conns.retain(|c| *c != conn);
            if conns.is_empty() {
                map.remove(user);
                return true;
            }
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
        self.stripe(user).read().contains_key(user)
    }

    /// Users with at least one connection.
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
        };
        let b = ConnRef {
            shard: 1,
            slot: 7,
            gen: 3,
        };
        let (id1, first) = r.add("alice", a);
        assert!(first);
        let (id2, first) = r.add("alice", b);
        assert!(!first);
        assert!(Arc::ptr_eq(&id1, &id2));
        let mut out = Vec::new();
        r.lookup("alice", &mut out);
        assert_eq!(out, vec![a, b]);
        assert!(!r.remove("alice", a));
        assert!(r.is_online("alice"));
        assert!(r.remove("alice", b));
        assert!(!r.is_online("alice"));
        assert_eq!(r.online_users(), 0);
    }
}
