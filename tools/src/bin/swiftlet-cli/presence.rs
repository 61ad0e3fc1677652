//! Presence and typing state: who is typing where (until they stop or
//! their indicator lapses), where this user said they are typing, and whose
//! presence this user follows.
//!
//! All of it belongs to a connection on the server's side (a subscription
//! or an indicator dies with the connection), so [`PresenceState`] says what
//! survives a reconnect and what must be forgotten or restored. No client
//! and no printing: callers pass the time in, so lapses are tested without
//! sleeping.

use std::collections::HashMap;
use std::time::Duration;

use swiftlet_client::pb::{self, TypingState};
use tokio::time::Instant;

use crate::render::typing_line;
use crate::target::Target;

/// A typing indicator whose STARTED carried no lifetime lapses after this.
const DEFAULT_TYPING_TTL: Duration = Duration::from_secs(6);

/// Slack before a typing indicator is cleared locally: the server's own
/// STOPPED at the end of the TTL normally arrives first.
const TYPING_GRACE: Duration = Duration::from_millis(500);

/// Who is typing where, until they stop or their indicator lapses.
#[derive(Debug, Default)]
pub struct Typists {
    active: HashMap<(Target, String), Instant>,
}

impl Typists {
    /// The line to print for a notice, if it changes what is shown.
    pub fn on_notice(&mut self, n: &pb::TypingNotice, now: Instant) -> Option<String> {
        let conv = Target::of(n.conversation.as_ref())?;
        let key = (conv, n.user.clone());
        if n.state == TypingState::Started as i32 {
            let ttl = match n.expires_in_ms {
                0 => DEFAULT_TYPING_TTL,
                ms => Duration::from_millis(u64::from(ms)),
            };
            let line = typing_line(&key.0, &key.1, true);
            let was = self.active.insert(key, now + ttl + TYPING_GRACE);
            // A refreshed STARTED is not news.
            was.is_none().then_some(line)
        } else {
            self.active
                .remove(&key)
                .map(|_| typing_line(&key.0, &key.1, false))
        }
    }

    /// Indicators whose time ran out with no STOPPED.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<(Target, String)> = self
            .active
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .map(|k| {
                self.active.remove(&k);
                typing_line(&k.0, &k.1, false)
            })
            .collect()
    }

    /// A message from `user` in `conv` ends their indicator without a line
    /// of its own: the message itself shows they stopped.
    pub fn message_from(&mut self, conv: Target, user: &str) {
        self.active.remove(&(conv, user.to_owned()));
    }
}

/// Typing and presence as this CLI sees them, kept across reconnects.
#[derive(Debug, Default)]
pub struct PresenceState {
    /// Others typing, shown until they stop or their indicator lapses.
    pub typists: Typists,
    /// Where this user last said STARTED (a STOPPED goes there before the
    /// next message).
    pub my_typing: Option<Target>,
    /// Presence subscriptions to restore on every connection.
    pub watching: Vec<String>,
}

impl PresenceState {
    /// A new connection: subscriptions and typing indicators died with the
    /// old one (the watched users are subscribed again by the caller).
    pub fn new_connection(&mut self) {
        self.my_typing = None;
        self.typists.active.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swiftlet_client::{with_group, with_user};

    #[test]
    fn typing_is_shown_once_and_lapses() {
        let mut t = Typists::default();
        let now = Instant::now();
        let notice = |state: TypingState| pb::TypingNotice {
            conversation: Some(with_user("bob")),
            user: "bob".into(),
            state: state as i32,
            expires_in_ms: 1000,
        };
        assert_eq!(
            t.on_notice(&notice(TypingState::Started), now).as_deref(),
            Some("bob is typing…")
        );
        assert_eq!(t.on_notice(&notice(TypingState::Started), now), None);
        assert_eq!(
            t.on_notice(&notice(TypingState::Stopped), now).as_deref(),
            Some("bob stopped typing")
        );
        assert_eq!(t.on_notice(&notice(TypingState::Stopped), now), None);
        let mut group = notice(TypingState::Started);
        group.conversation = Some(with_group(7));
        assert_eq!(
            t.on_notice(&group, now).as_deref(),
            Some("bob is typing in #7…")
        );
        assert!(t.expire(now + Duration::from_millis(900)).is_empty());
        assert_eq!(
            t.expire(now + Duration::from_secs(2)),
            vec!["bob stopped typing in #7".to_owned()]
        );
        assert!(t.active.is_empty());
    }

    #[test]
    fn a_message_or_a_new_connection_ends_typing_quietly() {
        let mut p = PresenceState::default();
        let now = Instant::now();
        let started = |conv: pb::Conversation| pb::TypingNotice {
            conversation: Some(conv),
            user: "bob".into(),
            state: TypingState::Started as i32,
            expires_in_ms: 0,
        };
        assert!(p
            .typists
            .on_notice(&started(with_user("bob")), now)
            .is_some());
        assert!(p.typists.on_notice(&started(with_group(7)), now).is_some());
        p.typists.message_from(Target::User("bob".into()), "bob");
        assert_eq!(p.typists.active.len(), 1, "only the 1:1 indicator ends");
        // No lifetime given: the default TTL plus the grace.
        assert!(p.typists.expire(now + Duration::from_secs(6)).is_empty());
        p.my_typing = Some(Target::Group(7));
        p.watching = vec!["bob".into()];
        p.new_connection();
        assert!(p.typists.active.is_empty());
        assert_eq!(p.my_typing, None);
        assert_eq!(
            p.watching,
            vec!["bob".to_owned()],
            "restored, not forgotten"
        );
    }
}
