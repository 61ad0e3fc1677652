//! Pure formatting: what the server says (inbox events, receipts, the Ack
//! of a send, presence, typing, groups, listings) turned into the lines the
//! CLI prints.
//!
//! No client, no locks, no printing: every function takes values and
//! returns text, so the exact words a user sees (and the browser test
//! greps for, such as `✓ alice (#N)`) are pinned by the tests below. The
//! one-off status and error lines of a command stay beside the command.
//! Times are shown in UTC (no time-zone database here).

use swiftlet_client::pb::{self, event::Kind, GroupEventKind, GroupRole, ReceiptKind};
use swiftlet_client::Gap;

use crate::target::Target;

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let day_secs = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        day_secs / 3600,
        (day_secs / 60) % 60,
        day_secs % 60
    )
}

/// `HH:MM` (UTC) when `ms` is on the same UTC day as `now_ms`, else
/// `YYYY-MM-DD HH:MM`.
fn last_seen(ms: u64, now_ms: u64) -> String {
    let hm = &clock(ms)[..5];
    let day = ms / 86_400_000;
    if day == now_ms / 86_400_000 {
        return hm.to_owned();
    }
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hm}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn render_body(m: &pb::Message) -> String {
    if m.content_type.is_empty() || m.content_type.starts_with("text/") {
        String::from_utf8_lossy(&m.body).into_owned()
    } else {
        format!("<{} bytes of {}>", m.body.len(), m.content_type)
    }
}

fn render_group_event(g: &pb::GroupEvent) -> String {
    // A change concerning more than 64 users lists at most the reader.
    let unlisted = (g.user_count as usize).saturating_sub(g.users.len());
    let users = match (g.users.is_empty(), unlisted) {
        (_, 0) => g.users.join(", "),
        (true, n) => format!("{n} users"),
        (false, n) => format!("{} and {n} others", g.users.join(", ")),
    };
    let at = format!("\"{}\" (#{})", g.name, g.group_id);
    match GroupEventKind::try_from(g.kind).unwrap_or(GroupEventKind::Unspecified) {
        GroupEventKind::Created if unlisted > 0 => format!(
            "* {} created {at} with {} members",
            g.actor,
            g.user_count.saturating_sub(1)
        ),
        GroupEventKind::Created => {
            let others: Vec<&str> = g
                .users
                .iter()
                .map(String::as_str)
                .filter(|u| *u != g.actor)
                .collect();
            if others.is_empty() {
                format!("* {} created {at}", g.actor)
            } else {
                format!("* {} created {at} with {}", g.actor, others.join(", "))
            }
        }
        GroupEventKind::MembersAdded => format!("* {} added {users} to {at}", g.actor),
        GroupEventKind::MembersRemoved => format!("* {} removed {users} from {at}", g.actor),
        GroupEventKind::MemberLeft => format!("* {} left {at}", g.actor),
        GroupEventKind::Renamed => {
            format!("* {} renamed #{} to \"{}\"", g.actor, g.group_id, g.name)
        }
        GroupEventKind::Unspecified => format!("* #{} changed (version {})", g.group_id, g.version),
    }
}

fn receipt_word(kind: i32) -> &'static str {
    match ReceiptKind::try_from(kind) {
        Ok(ReceiptKind::Read) => "read",
        Ok(ReceiptKind::Delivered) => "delivered",
        _ => "acknowledged",
    }
}

/// One line for an inbox event (live and in `/sync` listings).
pub fn render_event(me: &str, ev: &pb::Event) -> String {
    match &ev.kind {
        Some(Kind::Message(m)) if m.group_id != 0 => format!(
            "[{}] #{} {}: {}",
            clock(m.timestamp_ms),
            m.group_id,
            m.from_user,
            render_body(m)
        ),
        Some(Kind::Message(m)) if m.from_user == me => format!(
            "[{}] {me} → {}: {}",
            clock(m.timestamp_ms),
            m.to_user,
            render_body(m)
        ),
        Some(Kind::Message(m)) => {
            format!(
                "[{}] {}: {}",
                clock(m.timestamp_ms),
                m.from_user,
                render_body(m)
            )
        }
        Some(Kind::GroupEvent(g)) => render_group_event(g),
        Some(Kind::Receipt(r)) => {
            let conv = Target::of(r.conversation.as_ref())
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into());
            let who = if r.user == me { "you" } else { &r.user };
            format!(
                "(receipt: {who} {} {conv} up to #{})",
                receipt_word(r.kind),
                r.up_to
            )
        }
        None => format!("[event {}] (a kind this client does not show)", ev.seq),
    }
}

pub fn typing_line(conv: &Target, user: &str, started: bool) -> String {
    let verb = if started {
        "is typing"
    } else {
        "stopped typing"
    };
    match conv {
        Target::Group(g) if started => format!("{user} {verb} in #{g}…"),
        Target::Group(g) => format!("{user} {verb} in #{g}"),
        Target::User(_) if started => format!("{user} {verb}…"),
        Target::User(_) => format!("{user} {verb}"),
    }
}

pub fn render_presence(p: &pb::Presence) -> String {
    if p.online {
        format!("{} is online", p.user)
    } else if p.last_seen_ms > 0 {
        format!(
            "{} was last seen {}",
            p.user,
            last_seen(p.last_seen_ms, now_ms())
        )
    } else {
        format!("{} is offline", p.user)
    }
}

pub fn render_group_info(g: &pb::GroupInfo) -> String {
    let mut out = format!(
        "#{} \"{}\": {} member(s), created by {} at {} UTC, version {}",
        g.group_id,
        g.name,
        g.member_count,
        g.created_by,
        last_seen(g.created_ms, now_ms()),
        g.version
    );
    for m in &g.members {
        let role = if m.role == GroupRole::Admin as i32 {
            " (admin)"
        } else {
            ""
        };
        out.push_str(&format!("\n  {}{role}", m.user));
    }
    out
}

/// `✓ bob (#123)`: the Ack of a send, stored as message `server_msg_id`.
pub fn ack(to: &Target, server_msg_id: u64) -> String {
    format!("✓ {to} (#{server_msg_id})")
}

/// Who a receipt mark is from: the other user of a 1:1 chat, or
/// `#GID by USER` in a group.
pub fn receipt_reader(conv: &Target, user: &str) -> String {
    match conv {
        Target::User(u) => u.clone(),
        Target::Group(g) => format!("#{g} by {user}"),
    }
}

/// `✓✓ bob (#10, #20)`: a receipt mark on some of the user's own messages.
pub fn receipt_marks(mark: &str, whom: &str, ids: &[u64]) -> String {
    let ids: Vec<String> = ids.iter().map(|i| format!("#{i}")).collect();
    format!("{mark} {whom} ({})", ids.join(", "))
}

/// `read carol (everything up to #5)`: a receipt on messages this CLI never
/// saw (sent before it started).
pub fn receipt_up_to(mark: &str, whom: &str, up_to: u64) -> String {
    format!("{mark} {whom} (everything up to #{up_to})")
}

/// The answer to `/group list`.
pub fn group_list(groups: &[pb::GroupInfo]) -> String {
    if groups.is_empty() {
        return "(you are in no group)".to_owned();
    }
    groups
        .iter()
        .map(|g| {
            format!(
                "#{} \"{}\" ({} member(s))",
                g.group_id, g.name, g.member_count
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The answer to `/receipts GID MSG_ID`.
pub fn receipt_list(group: u64, l: &pb::ReceiptList) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    format!(
        "#{group} message #{}: read: {}; delivered: {}; pending: {}",
        l.message_id,
        list(&l.read),
        list(&l.delivered),
        list(&l.pending)
    )
}

/// The answer to `/sync AFTER`, one line each: the events with their seqs,
/// and what retention removed or a next page holds.
pub fn sync_listing(me: &str, after: u64, batch: &pb::SyncBatch) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(gap) = Gap::between(after, batch.first_available_seq, batch.head_seq) {
        lines.push(format!("({gap})"));
    }
    if batch.events.is_empty() {
        lines.push(format!(
            "(nothing after {after}; newest is {})",
            batch.head_seq
        ));
    }
    for ev in &batch.events {
        lines.push(format!("{:>6} {}", ev.seq, render_event(me, ev)));
    }
    if let (true, Some(last)) = (batch.has_more, batch.events.last()) {
        lines.push(format!("(more: /sync {})", last.seq));
    }
    lines
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock((12 * 3600 + 65) * 1000 + 999), "12:01:05");
        assert_eq!(clock(86_400_000 + 1000), "00:00:01");
    }

    #[test]
    fn last_seen_shows_the_date_when_not_today() {
        let t = 1_735_689_600_000 + (12 * 3600 + 60) * 1000; // 2025-01-01 12:01
        assert_eq!(last_seen(t, t + 3_600_000), "12:01");
        assert_eq!(last_seen(t, t + 86_400_000), "2025-01-01 12:01");
        assert_eq!(last_seen(951_782_400_000, 0), "2000-02-29 00:00");
    }

    /// A message as the tests of the CLI's modules use it.
    pub(crate) fn msg(id: u64, from: &str, to: &str, group_id: u64) -> pb::Message {
        pb::Message {
            id,
            from_user: from.into(),
            to_user: to.into(),
            group_id,
            timestamp_ms: (12 * 3600 + 65) * 1000,
            content_type: "text/plain".into(),
            body: "hi".into(),
            ..Default::default()
        }
    }

    #[test]
    fn events_render() {
        let ev = |kind| pb::Event {
            seq: 1,
            kind: Some(kind),
        };
        assert_eq!(
            render_event("bob", &ev(Kind::Message(msg(1, "alice", "", 7)))),
            "[12:01:05] #7 alice: hi"
        );
        assert_eq!(
            render_event("bob", &ev(Kind::Message(msg(1, "alice", "bob", 0)))),
            "[12:01:05] alice: hi"
        );
        let g = |kind: GroupEventKind, users: &[&str]| pb::GroupEvent {
            group_id: 7,
            kind: kind as i32,
            actor: "alice".into(),
            users: strings(users),
            name: "team".into(),
            version: 2,
            timestamp_ms: 0,
            user_count: users.len() as u32,
        };
        let big = |kind: GroupEventKind, users: &[&str], count: u32| pb::GroupEvent {
            user_count: count,
            ..g(kind, users)
        };
        let cases = [
            (
                big(GroupEventKind::Created, &["bob"], 500),
                "* alice created \"team\" (#7) with 499 members",
            ),
            (
                big(GroupEventKind::MembersAdded, &["bob"], 100),
                "* alice added bob and 99 others to \"team\" (#7)",
            ),
            (
                big(GroupEventKind::MembersRemoved, &[], 100),
                "* alice removed 100 users from \"team\" (#7)",
            ),
            (
                g(GroupEventKind::Created, &["alice", "bob"]),
                "* alice created \"team\" (#7) with bob",
            ),
            (
                g(GroupEventKind::MembersAdded, &["bob"]),
                "* alice added bob to \"team\" (#7)",
            ),
            (
                g(GroupEventKind::MembersRemoved, &["bob", "carol"]),
                "* alice removed bob, carol from \"team\" (#7)",
            ),
            (
                g(GroupEventKind::MemberLeft, &["alice"]),
                "* alice left \"team\" (#7)",
            ),
            (
                g(GroupEventKind::Renamed, &[]),
                "* alice renamed #7 to \"team\"",
            ),
        ];
        for (event, want) in cases {
            assert_eq!(render_event("bob", &ev(Kind::GroupEvent(event))), want);
        }
    }

    #[test]
    fn presence_renders() {
        let p = |online, last_seen_ms| pb::Presence {
            user: "bob".into(),
            online,
            last_seen_ms,
        };
        assert_eq!(render_presence(&p(true, 0)), "bob is online");
        assert_eq!(render_presence(&p(false, 0)), "bob is offline");
        let today = now_ms() / 86_400_000 * 86_400_000 + 60_000;
        assert_eq!(render_presence(&p(false, today)), "bob was last seen 00:01");
    }

    #[test]
    fn acks_and_receipt_marks_render() {
        let bob = Target::User("bob".into());
        assert_eq!(ack(&bob, 42), "✓ bob (#42)");
        assert_eq!(ack(&Target::Group(7), 42), "✓ #7 (#42)");
        assert_eq!(receipt_reader(&bob, "bob"), "bob");
        assert_eq!(receipt_reader(&Target::Group(7), "carol"), "#7 by carol");
        assert_eq!(receipt_marks("✓✓", "bob", &[10, 20]), "✓✓ bob (#10, #20)");
        assert_eq!(receipt_marks("read", "bob", &[10]), "read bob (#10)");
        assert_eq!(
            receipt_up_to("read", "carol", 5),
            "read carol (everything up to #5)"
        );
    }

    #[test]
    fn typing_lines_render() {
        let bob = Target::User("bob".into());
        assert_eq!(typing_line(&bob, "bob", true), "bob is typing…");
        assert_eq!(typing_line(&bob, "bob", false), "bob stopped typing");
        let group = Target::Group(7);
        assert_eq!(typing_line(&group, "bob", true), "bob is typing in #7…");
        assert_eq!(
            typing_line(&group, "bob", false),
            "bob stopped typing in #7"
        );
    }

    #[test]
    fn inbox_receipts_render_in_listings() {
        let r = |user: &str, kind: ReceiptKind| pb::Event {
            seq: 3,
            kind: Some(Kind::Receipt(pb::Receipt {
                conversation: Some(Target::Group(7).conversation()),
                user: user.into(),
                kind: kind as i32,
                up_to: 40,
                timestamp_ms: 0,
            })),
        };
        assert_eq!(
            render_event("alice", &r("bob", ReceiptKind::Read)),
            "(receipt: bob read #7 up to #40)"
        );
        assert_eq!(
            render_event("alice", &r("alice", ReceiptKind::Delivered)),
            "(receipt: you delivered #7 up to #40)"
        );
        let none = pb::Event { seq: 9, kind: None };
        assert_eq!(
            render_event("alice", &none),
            "[event 9] (a kind this client does not show)"
        );
        let mut own = msg(1, "alice", "bob", 0);
        assert_eq!(
            render_event("alice", &ev(Kind::Message(own.clone()))),
            "[12:01:05] alice → bob: hi"
        );
        own.content_type = "image/png".into();
        assert_eq!(
            render_event("alice", &ev(Kind::Message(own))),
            "[12:01:05] alice → bob: <2 bytes of image/png>"
        );
    }

    fn ev(kind: Kind) -> pb::Event {
        pb::Event {
            seq: 1,
            kind: Some(kind),
        }
    }

    fn group(id: u64, name: &str, members: &[(&str, GroupRole)]) -> pb::GroupInfo {
        pb::GroupInfo {
            group_id: id,
            name: name.into(),
            member_count: members.len() as u32,
            created_by: "alice".into(),
            created_ms: 0,
            version: 1,
            members: members
                .iter()
                .map(|(user, role)| pb::GroupMember {
                    user: (*user).into(),
                    role: *role as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn groups_render() {
        let team = group(
            7,
            "team",
            &[("alice", GroupRole::Admin), ("bob", GroupRole::Member)],
        );
        assert_eq!(
            render_group_info(&team),
            "#7 \"team\": 2 member(s), created by alice at 1970-01-01 00:00 UTC, version 1\n  \
             alice (admin)\n  bob"
        );
        assert_eq!(group_list(&[]), "(you are in no group)");
        assert_eq!(
            group_list(&[team, group(8, "night shift", &[])]),
            "#7 \"team\" (2 member(s))\n#8 \"night shift\" (0 member(s))"
        );
    }

    #[test]
    fn receipt_lists_render() {
        let l = pb::ReceiptList {
            message_id: 40,
            read: strings(&["bob"]),
            delivered: vec![],
            pending: strings(&["carol", "dave"]),
            ..Default::default()
        };
        assert_eq!(
            receipt_list(7, &l),
            "#7 message #40: read: bob; delivered: -; pending: carol, dave"
        );
    }

    #[test]
    fn sync_listings_render() {
        let batch = |events: Vec<pb::Event>, has_more, first_available_seq| pb::SyncBatch {
            events,
            has_more,
            head_seq: 9,
            first_available_seq,
            ..Default::default()
        };
        assert_eq!(
            sync_listing("bob", 4, &batch(vec![], false, 1)),
            vec!["(nothing after 4; newest is 9)".to_owned()]
        );
        assert_eq!(
            sync_listing("bob", 7, &batch(vec![], false, 0)),
            vec![
                "(2 older messages are no longer available (events 8..9 were removed by retention))"
                    .to_owned(),
                "(nothing after 7; newest is 9)".to_owned()
            ]
        );
        let events = vec![
            pb::Event {
                seq: 5,
                kind: Some(Kind::Message(msg(1, "alice", "bob", 0))),
            },
            pb::Event { seq: 6, kind: None },
        ];
        assert_eq!(
            sync_listing("bob", 2, &batch(events, true, 5)),
            vec![
                "(2 older messages are no longer available (events 3..4 were removed by retention))"
                    .to_owned(),
                "     5 [12:01:05] alice: hi".to_owned(),
                "     6 [event 6] (a kind this client does not show)".to_owned(),
                "(more: /sync 6)".to_owned(),
            ]
        );
    }
}
