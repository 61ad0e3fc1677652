//! The chat features beyond 1:1 messaging, as `Client` methods: groups,
//! receipts, typing and presence. Each is one request/answer pair of the
//! protocol (see protocol/README.md); live notices (typing, presence) arrive
//! through [`Deliveries`](crate::Deliveries).

use bytes::Bytes;
use swiftlet_protocol::pb::{self, conversation, TypingState};
use swiftlet_protocol::Body;

use crate::client::{new_client_msg_id, unexpected, Client};
use crate::error::ClientError;

/// A 1:1 conversation with `user`.
pub fn with_user(user: &str) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::User(user.to_owned())),
    }
}

/// A group conversation.
pub fn with_group(group_id: u64) -> pb::Conversation {
    pb::Conversation {
        kind: Some(conversation::Kind::GroupId(group_id)),
    }
}

fn group_info(body: Body) -> Result<pb::GroupInfo, ClientError> {
    match body {
        Body::GroupInfo(g) => Ok(g),
        other => Err(unexpected("GroupInfo", &other)),
    }
}

fn done(body: Body) -> Result<(), ClientError> {
    match body {
        Body::Done(_) => Ok(()),
        other => Err(unexpected("Done", &other)),
    }
}

impl Client {
    /// Create a group; the caller becomes its admin.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[&str],
    ) -> Result<pb::GroupInfo, ClientError> {
        let req = pb::CreateGroup {
            name: name.to_owned(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        group_info(self.request(Body::CreateGroup(req)).await?)
    }

    /// Admins: add members.
    pub async fn add_members(
        &self,
        group_id: u64,
        users: &[&str],
    ) -> Result<pb::GroupInfo, ClientError> {
        let req = pb::AddMembers {
            group_id,
            users: users.iter().map(|m| (*m).to_owned()).collect(),
        };
        group_info(self.request(Body::AddMembers(req)).await?)
    }

    /// Admins: remove members.
    pub async fn remove_members(
        &self,
        group_id: u64,
        users: &[&str],
    ) -> Result<pb::GroupInfo, ClientError> {
        let req = pb::RemoveMembers {
            group_id,
            users: users.iter().map(|m| (*m).to_owned()).collect(),
        };
        group_info(self.request(Body::RemoveMembers(req)).await?)
    }

    pub async fn leave_group(&self, group_id: u64) -> Result<pb::GroupInfo, ClientError> {
        group_info(
            self.request(Body::LeaveGroup(pb::LeaveGroup { group_id }))
                .await?,
        )
    }

    pub async fn rename_group(
        &self,
        group_id: u64,
        name: &str,
    ) -> Result<pb::GroupInfo, ClientError> {
        let req = pb::RenameGroup {
            group_id,
            name: name.to_owned(),
        };
        group_info(self.request(Body::RenameGroup(req)).await?)
    }

    /// All the caller's groups (without member lists): the pages of
    /// [`Client::list_groups_page`] joined, in group id order.
    pub async fn list_groups(&self) -> Result<Vec<pb::GroupInfo>, ClientError> {
        let mut page = self.list_groups_page(0, 0).await?;
        let mut groups = std::mem::take(&mut page.groups);
        while page.more {
            let Some(after) = groups.last().map(|g| g.group_id) else {
                break;
            };
            page = self.list_groups_page(after, 0).await?;
            groups.append(&mut page.groups);
        }
        Ok(groups)
    }

    /// One page of the caller's groups: ids above `after_group_id`, at most
    /// `limit` (0: the server's page size, 250).
    pub async fn list_groups_page(
        &self,
        after_group_id: u64,
        limit: u32,
    ) -> Result<pb::GroupList, ClientError> {
        let req = pb::ListGroups {
            after_group_id,
            limit,
        };
        match self.request(Body::ListGroups(req)).await? {
            Body::GroupList(l) => Ok(l),
            other => Err(unexpected("GroupList", &other)),
        }
    }

    /// One group with all its members (members only): the pages of
    /// [`Client::get_group_page`] joined, in name order.
    pub async fn get_group(&self, group_id: u64) -> Result<pb::GroupInfo, ClientError> {
        let mut info = self.get_group_page(group_id, "", 0).await?;
        while info.more_members {
            let after = match info.members.last() {
                Some(m) => m.user.clone(),
                None => break,
            };
            let page = self.get_group_page(group_id, &after, 0).await?;
            info.members.extend(page.members);
            info.more_members = page.more_members;
        }
        Ok(info)
    }

    /// One page of a group's members: those after `after` in name order, at
    /// most `limit` (0: the server's page size, 500).
    pub async fn get_group_page(
        &self,
        group_id: u64,
        after: &str,
        limit: u32,
    ) -> Result<pb::GroupInfo, ClientError> {
        group_info(
            self.request(Body::GetGroup(pb::GetGroup {
                group_id,
                members_after: after.to_owned(),
                members_limit: limit,
            }))
            .await?,
        )
    }

    /// Post to a group with a fresh `client_msg_id`.
    pub async fn send_group(
        &self,
        group_id: u64,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        self.send_group_with_id(&new_client_msg_id(), group_id, content_type, body)
            .await
    }

    /// Post to a group; retrying with the same `client_msg_id` is safe.
    pub async fn send_group_with_id(
        &self,
        client_msg_id: &str,
        group_id: u64,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        let send = pb::Send {
            client_msg_id: client_msg_id.to_owned(),
            to_user: String::new(),
            content_type: content_type.to_owned(),
            body: body.into(),
            group_id,
        };
        self.send_message(send).await
    }

    /// Mark a conversation read up to and including message id `up_to`.
    pub async fn mark_read(
        &self,
        conversation: pb::Conversation,
        up_to: u64,
    ) -> Result<(), ClientError> {
        let req = pb::MarkRead {
            conversation: Some(conversation),
            up_to,
        };
        done(self.request(Body::MarkRead(req)).await?)
    }

    /// Sender only: who has read, has, or lacks a group message, over the
    /// whole group (the pages of [`Client::receipts_page`] joined).
    pub async fn receipts(
        &self,
        group_id: u64,
        message_id: u64,
    ) -> Result<pb::ReceiptList, ClientError> {
        let mut list = self.receipts_page(group_id, message_id, "", 0).await?;
        while list.more_members && !list.last_member.is_empty() {
            let after = std::mem::take(&mut list.last_member);
            let page = self.receipts_page(group_id, message_id, &after, 0).await?;
            list.read.extend(page.read);
            list.delivered.extend(page.delivered);
            list.pending.extend(page.pending);
            list.more_members = page.more_members;
            list.last_member = page.last_member;
        }
        Ok(list)
    }

    /// One page of a group message's receipts: the members after `after`
    /// in user-id order, at most `limit` (0: the server's page size, 500).
    pub async fn receipts_page(
        &self,
        group_id: u64,
        message_id: u64,
        after: &str,
        limit: u32,
    ) -> Result<pb::ReceiptList, ClientError> {
        match self
            .request(Body::GetReceipts(pb::GetReceipts {
                group_id,
                message_id,
                members_after: after.to_owned(),
                members_limit: limit,
            }))
            .await?
        {
            Body::ReceiptList(l) => Ok(l),
            other => Err(unexpected("ReceiptList", &other)),
        }
    }

    /// Say the caller started (`true`) or stopped typing. No answer unless
    /// refused; a refusal (e.g. RATE_LIMITED) is logged by the reader.
    pub async fn typing(
        &self,
        conversation: pb::Conversation,
        started: bool,
    ) -> Result<(), ClientError> {
        let state = if started {
            TypingState::Started
        } else {
            TypingState::Stopped
        };
        let req = pb::Typing {
            conversation: Some(conversation),
            state: state as i32,
        };
        self.post(Body::Typing(req)).await
    }

    /// Replace this connection's presence subscriptions; returns the current
    /// state of each user. Changes then arrive as `DeliveryItem::Presence`.
    pub async fn subscribe_presence(
        &self,
        users: &[&str],
    ) -> Result<Vec<pb::Presence>, ClientError> {
        let req = pb::SubscribePresence {
            users: users.iter().map(|u| (*u).to_owned()).collect(),
        };
        match self.request(Body::SubscribePresence(req)).await? {
            Body::PresenceList(l) => Ok(l.users),
            other => Err(unexpected("PresenceList", &other)),
        }
    }

    /// Hide (or show) the caller's last seen time.
    pub async fn set_privacy(&self, hide_last_seen: bool) -> Result<(), ClientError> {
        done(
            self.request(Body::SetPrivacy(pb::SetPrivacy { hide_last_seen }))
                .await?,
        )
    }
}
