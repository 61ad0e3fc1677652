//! How the CLI names a conversation: the other user of a 1:1 chat, or a
//! group written `#GID`.
//!
//! The protocol names a conversation from the reader's side (a 1:1 chat is
//! the *other* user), and a message names both ends; every other module
//! needs one comparable, hashable key that prints the way the user types it,
//! so that conversion lives here and only here.

use std::fmt;

use swiftlet_client::pb::{self, conversation};
use swiftlet_client::{with_group, with_user};

/// A conversation: the other user of a 1:1 chat, or a group (`#GID`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    User(String),
    Group(u64),
}

impl Target {
    pub fn conversation(&self) -> pb::Conversation {
        match self {
            Target::User(u) => with_user(u),
            Target::Group(g) => with_group(*g),
        }
    }

    /// The conversation as the protocol names it, if it names one.
    pub fn of(c: Option<&pb::Conversation>) -> Option<Target> {
        match c?.kind.as_ref()? {
            conversation::Kind::User(u) => Some(Target::User(u.clone())),
            conversation::Kind::GroupId(g) => Some(Target::Group(*g)),
        }
    }

    /// The conversation a message belongs to, as `me` sees it.
    pub fn of_message(me: &str, m: &pb::Message) -> Target {
        if m.group_id != 0 {
            Target::Group(m.group_id)
        } else if m.from_user == me {
            Target::User(m.to_user.clone())
        } else {
            Target::User(m.from_user.clone())
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::User(u) => f.write_str(u),
            Target::Group(g) => write!(f, "#{g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from: &str, to: &str, group_id: u64) -> pb::Message {
        pb::Message {
            from_user: from.into(),
            to_user: to.into(),
            group_id,
            ..Default::default()
        }
    }

    #[test]
    fn a_message_belongs_to_the_other_end_or_its_group() {
        let bob = Target::User("bob".into());
        assert_eq!(
            Target::of_message("alice", &message("alice", "bob", 0)),
            bob
        );
        assert_eq!(
            Target::of_message("alice", &message("bob", "alice", 0)),
            bob
        );
        assert_eq!(
            Target::of_message("alice", &message("bob", "", 7)),
            Target::Group(7)
        );
    }

    #[test]
    fn protocol_conversations_round_trip() {
        for t in [Target::User("bob".into()), Target::Group(7)] {
            assert_eq!(Target::of(Some(&t.conversation())), Some(t));
        }
        assert_eq!(Target::of(None), None);
        assert_eq!(Target::of(Some(&pb::Conversation::default())), None);
    }

    #[test]
    fn displays_as_typed() {
        assert_eq!(Target::User("bob".into()).to_string(), "bob");
        assert_eq!(Target::Group(7).to_string(), "#7");
    }
}
