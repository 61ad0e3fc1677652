//! Group changes: create, add and remove members, leave, rename.
//!
//! A change writes the whole group (its members and a new version), the
//! memberships it changes, and a `GroupEvent` in the inbox of everyone it
//! concerns, in one request of a group commit; the group cache
//! ([`crate::groups::GroupDirectory`]) is updated at once, so later requests of the same
//! group commit see the change. A group that does not exist and one the
//! caller is not in get the same refusal, so non-members cannot probe which
//! groups exist.
//!
//! This file must never change a group without its event (members learn of
//! every change in order, between the posts), and never put anything before
//! the seqs of everyone notified are reserved.

use std::sync::Arc;

use swiftlet_protocol::pb::{self, event::Kind, GroupEventKind, GroupRole};
use swiftlet_protocol::{Body, ErrorCode};

use super::group::{refuse, Fail, Pipeline, Work};
use super::seqs::encode_event;
use super::{Origin, MAX_EVENT_USERS, MAX_GROUP_NAME};
use crate::auth::valid_id;
use crate::groups::Group;

impl Pipeline {
    /// Group `id` if `user` is a member. A group that does not exist and
    /// one the user is not in get the same refusal, so that non-members
    /// cannot probe which groups exist.
    pub(super) fn member_group(&self, id: u64, user: &str) -> Result<Arc<Group>, Fail> {
        match self.groups.get(id)? {
            Some(g) if g.is_member(user) => Ok(g),
            _ => refuse(ErrorCode::NotFound, "no such group, or not a member of it"),
        }
    }

    fn valid_users(users: Vec<String>) -> Result<Vec<Arc<str>>, Fail> {
        let mut out: Vec<Arc<str>> = Vec::with_capacity(users.len());
        for u in users {
            if !valid_id(&u) {
                return refuse(
                    ErrorCode::InvalidRecipient,
                    format!("{u:?} is not a valid user id"),
                );
            }
            if !out.iter().any(|x| **x == *u) {
                out.push(Arc::from(u));
            }
        }
        Ok(out)
    }

    fn valid_name(name: &str) -> Result<(), Fail> {
        if name.is_empty() || name.len() > MAX_GROUP_NAME {
            return refuse(ErrorCode::InvalidRequest, "group names are 1-128 bytes");
        }
        Ok(())
    }

    /// Write a changed group, its memberships, and an event to `notify`.
    fn save_group(
        &mut self,
        w: &mut Work,
        g: Group,
        notify: &[Arc<str>],
        event: pb::GroupEvent,
    ) -> Result<Option<Body>, Fail> {
        let mut event = event;
        let g = Arc::new(g);
        // Reserve the seqs first: the only fallible reads.
        if event.users.len() <= MAX_EVENT_USERS {
            self.append_inline(w, notify, Kind::GroupEvent(event))?;
        } else {
            // Listing thousands of users in every member's copy would make
            // a change to a group of n cost n times its size: each affected
            // user's copy names only them, the others' name nobody.
            let users = std::mem::take(&mut event.users);
            let affected: std::collections::HashSet<&str> =
                users.iter().map(String::as_str).collect();
            let general = encode_event(Kind::GroupEvent(event.clone()));
            self.append_inline_each(w, notify, |u| {
                if affected.contains(u) {
                    let mut mine = event.clone();
                    mine.users = vec![u.to_owned()];
                    encode_event(Kind::GroupEvent(mine))
                } else {
                    general.clone()
                }
            })?;
        }
        self.store.put_group(&mut w.batch, &g.info(true))?;
        w.writes += 1;
        self.groups.put(g.clone());
        Ok(Some(Body::GroupInfo(g.reply_info())))
    }

    fn group_event(
        &self,
        g: &Group,
        kind: GroupEventKind,
        actor: &str,
        users: &[Arc<str>],
    ) -> pb::GroupEvent {
        pb::GroupEvent {
            group_id: g.id,
            kind: kind as i32,
            actor: actor.to_owned(),
            users: users.iter().map(|u| u.to_string()).collect(),
            name: g.name.clone(),
            version: g.version,
            timestamp_ms: self.clock.now_ms(),
            user_count: users.len() as u32,
        }
    }

    pub(super) fn create_group(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::CreateGroup,
    ) -> Result<Option<Body>, Fail> {
        Self::valid_name(&req.name)?;
        let mut users = Self::valid_users(req.members)?;
        users.retain(|u| **u != *o.user);
        if users.len() + 1 > self.max_group_members {
            return refuse(
                ErrorCode::LimitExceeded,
                format!("groups hold at most {} members", self.max_group_members),
            );
        }
        let now = self.clock.now_ms();
        let Some(id) = self.local_group_id(now) else {
            return refuse(
                ErrorCode::Unavailable,
                "this node is home to no group partition; retry later",
            );
        };
        let mut members = vec![(o.user.clone(), GroupRole::Admin)];
        members.extend(users.iter().map(|u| (u.clone(), GroupRole::Member)));
        let g = Group::new(id, req.name, o.user.to_string(), now, 1, members);
        let all: Vec<Arc<str>> = g.members().cloned().collect();
        for u in &all {
            self.store.put_membership(&mut w.batch, u, id, true)?;
        }
        let event = self.group_event(&g, GroupEventKind::Created, &o.user, &all);
        self.save_group(w, g, &all, event)
    }

    pub(super) fn change_members(
        &mut self,
        w: &mut Work,
        o: &Origin,
        id: u64,
        users: Vec<String>,
        add: bool,
    ) -> Result<Option<Body>, Fail> {
        let g = self.member_group(id, &o.user)?;
        if g.role(&o.user) != Some(GroupRole::Admin) {
            return refuse(ErrorCode::Forbidden, "only admins add or remove members");
        }
        let users = Self::valid_users(users)?;
        if add {
            let new: Vec<Arc<str>> = users.into_iter().filter(|u| !g.is_member(u)).collect();
            if new.is_empty() {
                // Nothing changes: no new version, no event.
                return Ok(Some(Body::GroupInfo(g.reply_info())));
            }
            if g.len() + new.len() > self.max_group_members {
                return refuse(
                    ErrorCode::LimitExceeded,
                    format!("groups hold at most {} members", self.max_group_members),
                );
            }
            // Every message posted so far has a smaller id than this mark,
            // every later one a larger: receipts judge the new members only
            // on what was posted after they joined.
            let changed = g.with_added(&new, self.ids.next_now());
            let notify: Vec<Arc<str>> = changed.members().cloned().collect();
            for u in &new {
                self.store.put_membership(&mut w.batch, u, id, true)?;
            }
            let event = self.group_event(&changed, GroupEventKind::MembersAdded, &o.user, &new);
            self.save_group(w, changed, &notify, event)
        } else {
            let gone: Vec<Arc<str>> = users.into_iter().filter(|u| g.is_member(u)).collect();
            if gone.is_empty() {
                return Ok(Some(Body::GroupInfo(g.reply_info())));
            }
            // Everyone before the change hears of it, the removed included.
            let notify: Vec<Arc<str>> = g.members().cloned().collect();
            let changed = g.with_removed(&gone);
            for u in &gone {
                self.store.put_membership(&mut w.batch, u, id, false)?;
            }
            let event = self.group_event(&changed, GroupEventKind::MembersRemoved, &o.user, &gone);
            self.save_group(w, changed, &notify, event)
        }
    }

    pub(super) fn leave_group(
        &mut self,
        w: &mut Work,
        o: &Origin,
        id: u64,
    ) -> Result<Option<Body>, Fail> {
        let g = self.member_group(id, &o.user)?;
        let notify: Vec<Arc<str>> = g.members().cloned().collect();
        let me = [o.user.clone()];
        let changed = g.with_removed(&me);
        self.store
            .put_membership(&mut w.batch, &o.user, id, false)?;
        let event = self.group_event(&changed, GroupEventKind::MemberLeft, &o.user, &me);
        self.save_group(w, changed, &notify, event)
    }

    pub(super) fn rename_group(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::RenameGroup,
    ) -> Result<Option<Body>, Fail> {
        Self::valid_name(&req.name)?;
        let g = self.member_group(req.group_id, &o.user)?;
        let changed = g.renamed(req.name);
        let notify: Vec<Arc<str>> = changed.members().cloned().collect();
        let event = self.group_event(&changed, GroupEventKind::Renamed, &o.user, &[]);
        self.save_group(w, changed, &notify, event)
    }
}
