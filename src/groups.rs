//! Group membership as the server consults it: a read-through cache of the
//! `groups` column family, shared by the commit pipeline (which is the only
//! writer, so a membership change and the posts around it are ordered) and
//! the shards (which read it for typing fan-out, GetGroup and receipts).
//!
//! A [`Group`] keeps its members as shared `Arc<str>`s with a hash index, so
//! a post to a 10,000-member group checks membership in O(1) and fans out
//! without allocating an id string per member.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use swiftlet_protocol::pb::{self, GroupRole};

use crate::generations::Generations;
use crate::store::{Store, StoreError};

/// Most members one GroupInfo sent to a client lists: 500 of the longest
/// user ids (64 bytes) come to about 35 KB, inside the 64 KiB frame limit.
pub const MAX_INFO_MEMBERS: usize = 500;

/// The size of a requested page: `requested`, or `max` when that is 0 or
/// more than `max` (GetGroup, GetReceipts, ListGroups).
pub fn page_limit(requested: u32, max: usize) -> usize {
    match requested as usize {
        0 => max,
        n => n.min(max),
    }
}

/// One group, immutable: a change makes a new `Group`.
#[derive(Debug, Clone)]
pub struct Group {
    pub id: u64,
    pub name: String,
    pub created_by: String,
    pub created_ms: u64,
    pub version: u64,
    /// In joining order (the oldest member is promoted when the last admin goes).
    members: Vec<(Arc<str>, GroupRole)>,
    index: HashMap<Arc<str>, usize>,
    /// For members added after the group was made: the message-id mark of
    /// their joining (see `GroupMember.joined_after`). Absent for the
    /// founding members, so a group created at once holds no entries here.
    joined_after: HashMap<Arc<str>, u64>,
    /// The members sorted by name, which is the order of their inbox keys:
    /// a post appends to the inboxes in this order, so RocksDB inserts the
    /// batch's keys ascending and each memtable insert starts from where the
    /// previous one ended instead of searching the skiplist from the top.
    by_name: Vec<Arc<str>>,
}

impl Group {
    pub fn new(
        id: u64,
        name: String,
        created_by: String,
        created_ms: u64,
        version: u64,
        members: Vec<(Arc<str>, GroupRole)>,
    ) -> Self {
        let mut g = Group {
            id,
            name,
            created_by,
            created_ms,
            version,
            members,
            index: HashMap::new(),
            joined_after: HashMap::new(),
            by_name: Vec::new(),
        };
        g.reindex();
        g
    }

    fn reindex(&mut self) {
        self.index = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (u, _))| (u.clone(), i))
            .collect();
        self.by_name = self.members.iter().map(|(u, _)| u.clone()).collect();
        self.by_name.sort_unstable();
    }

    fn from_info(info: pb::GroupInfo) -> Self {
        let mut joined_after = HashMap::new();
        let members = info
            .members
            .into_iter()
            .map(|m| {
                let user: Arc<str> = Arc::from(m.user.as_str());
                if m.joined_after != 0 {
                    joined_after.insert(user.clone(), m.joined_after);
                }
                (
                    user,
                    GroupRole::try_from(m.role).unwrap_or(GroupRole::Member),
                )
            })
            .collect();
        let mut g = Group::new(
            info.group_id,
            info.name,
            info.created_by,
            info.created_ms,
            info.version,
            members,
        );
        g.joined_after = joined_after;
        g
    }

    fn member_info(&self, user: &Arc<str>, role: GroupRole) -> pb::GroupMember {
        pb::GroupMember {
            user: user.to_string(),
            role: role as i32,
            joined_after: self.joined_after(user),
        }
    }

    /// The answer to a change of the group: every member in joining order if
    /// there are at most [`MAX_INFO_MEMBERS`], else the first page by name.
    pub fn reply_info(&self) -> pb::GroupInfo {
        if self.members.len() <= MAX_INFO_MEMBERS {
            self.info(true)
        } else {
            self.info_page("", 0)
        }
    }

    /// The members after `after` in name order, at most `limit` (see
    /// [`page_limit`]; the bound is [`MAX_INFO_MEMBERS`]), for GetGroup.
    pub fn info_page(&self, after: &str, limit: u32) -> pb::GroupInfo {
        let limit = page_limit(limit, MAX_INFO_MEMBERS);
        let page = self.members_after(after);
        let mut info = self.info(false);
        info.members = page
            .iter()
            .take(limit)
            .map(|u| self.member_info(u, self.role(u).unwrap_or(GroupRole::Member)))
            .collect();
        info.more_members = page.len() > limit;
        info
    }

    /// The stored form (all members); `with_members == false` leaves the
    /// list out. Replies to clients use [`Group::reply_info`] or
    /// [`Group::info_page`], which bound the list to what fits in a frame.
    pub fn info(&self, with_members: bool) -> pb::GroupInfo {
        pb::GroupInfo {
            group_id: self.id,
            name: self.name.clone(),
            members: if with_members {
                self.members
                    .iter()
                    .map(|(u, r)| self.member_info(u, *r))
                    .collect()
            } else {
                Vec::new()
            },
            created_by: self.created_by.clone(),
            created_ms: self.created_ms,
            version: self.version,
            member_count: self.members.len() as u32,
            more_members: false,
        }
    }

    pub fn role(&self, user: &str) -> Option<GroupRole> {
        self.index.get(user).map(|&i| self.members[i].1)
    }

    pub fn is_member(&self, user: &str) -> bool {
        self.index.contains_key(user)
    }

    /// The mark of `user`'s joining: messages with an id up to it were
    /// posted before (0 for a founding member).
    pub fn joined_after(&self, user: &str) -> u64 {
        self.joined_after.get(user).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members in joining order.
    pub fn members(&self) -> impl Iterator<Item = &Arc<str>> {
        self.members.iter().map(|(u, _)| u)
    }

    /// The members sorted by name (the order of their inbox keys).
    pub fn members_by_name(&self) -> &[Arc<str>] {
        &self.by_name
    }

    /// The members whose names sort after `after`, in name order (paging).
    pub fn members_after(&self, after: &str) -> &[Arc<str>] {
        let start = self.by_name.partition_point(|u| &**u <= after);
        &self.by_name[start..]
    }

    /// A copy with `users` added as members (those already in are skipped),
    /// joining after every message with an id up to `mark`.
    pub fn with_added(&self, users: &[Arc<str>], mark: u64) -> Group {
        let mut g = self.clone();
        for u in users {
            if !g.index.contains_key(u) {
                g.index.insert(u.clone(), g.members.len());
                g.members.push((u.clone(), GroupRole::Member));
                g.joined_after.insert(u.clone(), mark);
            }
        }
        g.version += 1;
        g.reindex();
        g
    }

    /// A copy without `users`; if no admin remains, the longest-standing
    /// member becomes one.
    pub fn with_removed(&self, users: &[Arc<str>]) -> Group {
        let mut g = self.clone();
        let gone: std::collections::HashSet<&str> = users.iter().map(|u| &**u).collect();
        g.members.retain(|(u, _)| !gone.contains(&**u));
        g.joined_after.retain(|u, _| !gone.contains(&**u));
        if !g.members.is_empty() && !g.members.iter().any(|(_, r)| *r == GroupRole::Admin) {
            g.members[0].1 = GroupRole::Admin;
        }
        g.version += 1;
        g.reindex();
        g
    }

    pub fn renamed(&self, name: String) -> Group {
        let mut g = self.clone();
        g.name = name;
        g.version += 1;
        g
    }
}

/// The cache. Absent groups are not cached (a lookup of an unknown id reads
/// the store, which its bloom-less point lookup answers quickly).
pub struct GroupDirectory {
    store: Arc<Store>,
    /// Bounded (see [`Generations`]); the pipeline rotates it between
    /// group commits, so a group it installed for the batch being built is
    /// never dropped before that batch is written.
    cache: RwLock<Generations<u64, Arc<Group>>>,
}

/// What one cache generation may hold, in members (each cached group
/// weighs one plus its member count; a member costs about 100 bytes: its
/// name, its place in the joining order, the name index and the sorted
/// list). Bounding by groups instead let 16,384 groups of 10,000 members,
/// about 16 GB, stay cached.
const MEMBERS_PER_GENERATION: usize = 512 * 1024;

impl GroupDirectory {
    pub fn new(store: Arc<Store>) -> Self {
        GroupDirectory {
            store,
            cache: RwLock::new(Generations::weighted(MEMBERS_PER_GENERATION, |g| {
                1 + g.len()
            })),
        }
    }

    pub fn get(&self, id: u64) -> Result<Option<Arc<Group>>, StoreError> {
        if let Some(g) = self.cache.read().peek(&id) {
            return Ok(Some(g.clone()));
        }
        if let Some(g) = self.cache.write().get(&id) {
            return Ok(Some(g));
        }
        let Some(info) = self.store.group(id)? else {
            return Ok(None);
        };
        Ok(Some(self.install_loaded(Arc::new(Group::from_info(info)))))
    }

    /// Cache a group read from the store, unless a newer version got there
    /// first: the pipeline installs a change with [`GroupDirectory::put`]
    /// while a shard may be reading the version before it. Returns what the
    /// cache holds afterwards.
    fn install_loaded(&self, loaded: Arc<Group>) -> Arc<Group> {
        let mut cache = self.cache.write();
        let keep = match cache.get(&loaded.id) {
            Some(cur) if cur.version >= loaded.version => cur,
            _ => loaded,
        };
        cache.insert(keep.id, keep.clone());
        keep
    }

    /// Install a changed group (the pipeline calls this as it writes it).
    pub fn put(&self, group: Arc<Group>) {
        self.cache.write().insert(group.id, group);
    }

    /// Forget everything cached (after a failed write, the store is the truth).
    pub fn clear(&self) {
        self.cache.write().clear();
    }

    /// Between group commits (the pipeline): retire the young generation if
    /// it is full, dropping the groups nobody used for a generation.
    pub fn rotate_if_full(&self) {
        self.cache.write().rotate_if_full();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<Arc<str>> {
        v.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn a_stale_read_never_replaces_a_newer_cached_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(
            Store::open(dir.path(), &crate::store::StoreOptions::default()).expect("open"),
        );
        let groups = GroupDirectory::new(store);
        let v1 = Arc::new(Group::new(
            9,
            "g".into(),
            "a".into(),
            0,
            1,
            vec![(Arc::from("a"), GroupRole::Admin)],
        ));
        let v2 = Arc::new(v1.with_added(&ids(&["b"]), 5));
        // The pipeline installs v2 while a shard was reading v1 from the store.
        groups.put(v2.clone());
        assert_eq!(groups.install_loaded(v1.clone()).version, 2);
        // Also when v2 has moved to the old generation meanwhile.
        groups.cache.write().retire_all();
        assert_eq!(groups.install_loaded(v1.clone()).version, 2);
        assert!(groups.get(9).expect("get").expect("cached").is_member("b"));
        // A newer read does replace an older cached one.
        groups.clear();
        groups.put(v1);
        assert_eq!(groups.install_loaded(v2).version, 2);
    }

    #[test]
    fn membership_changes_keep_an_admin_and_the_index() {
        let g = Group::new(
            1,
            "g".into(),
            "a".into(),
            0,
            1,
            vec![(Arc::from("a"), GroupRole::Admin)],
        );
        let g = g.with_added(&ids(&["c", "b", "a"]), 77);
        assert_eq!(g.len(), 3);
        // The founder keeps no mark, and re-adding her does not give her one.
        assert_eq!(g.joined_after("a"), 0);
        assert_eq!(g.joined_after("b"), 77);
        assert_eq!(g.members_by_name(), &ids(&["a", "b", "c"])[..]);
        assert_eq!(g.version, 2);
        let g = g.with_removed(&ids(&["a"]));
        assert!(!g.is_member("a"));
        assert_eq!(g.members_by_name(), &ids(&["b", "c"])[..]);
        assert_eq!(
            g.role("c"),
            Some(GroupRole::Admin),
            "oldest remaining member promoted"
        );
        assert_eq!(g.role("b"), Some(GroupRole::Member));
        let back = Group::from_info(g.info(true));
        assert_eq!(back.role("c"), Some(GroupRole::Admin));
        assert_eq!(back.members().count(), 2);
        // The joining marks survive the stored form, and leave with the member.
        assert_eq!(back.joined_after("b"), 77);
        assert_eq!(back.info_page("", 0).members[0].joined_after, 77);
        let g = back.with_removed(&ids(&["b"]));
        assert_eq!(g.joined_after("b"), 0);
        assert_eq!(g.joined_after("c"), 77);
    }
}
