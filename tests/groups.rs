//! Groups: fan-out to every device of every member across shards, exactly
//! once and in order; offline members catch up; only members post; a removed
//! member gets nothing after the removal; admin rules and the size limit.

mod common;

use common::*;
use swiftlet_client::{pb, with_group, Client, Deliveries};
use swiftlet_protocol::pb::{GroupEventKind, GroupRole};
use swiftlet_protocol::ErrorCode;

const MEMBERS: usize = 50;

fn name(i: usize) -> String {
    format!("m{i:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_members_over_four_shards_get_every_post_once_in_order() {
    let srv = TestServer::start_with(|c| c.shards = 4);
    let users: Vec<String> = (0..MEMBERS).map(name).collect();
    // Members 0-39 online (0-9 with a second device), 40-49 offline.
    let mut devices: Vec<(String, Client, Deliveries)> = Vec::new();
    for (i, u) in users.iter().enumerate().take(40) {
        let (c, d) = srv.connect(u, "phone").await;
        devices.push((u.clone(), c, d));
        if i < 10 {
            let (c, d) = srv.connect(u, "tablet").await;
            devices.push((u.clone(), c, d));
        }
    }
    let admin = devices[0].1.clone();
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let info = admin.create_group("fifty", &others).await.expect("create");
    assert_eq!(info.members.len(), MEMBERS);
    assert_eq!(info.members[0].role, pb::GroupRole::Admin as i32);
    let gid = info.group_id;

    let mut acks = Vec::new();
    for i in 0..5 {
        let poster = &devices[(i * 7) % devices.len()].1;
        acks.push(
            poster
                .send_group(gid, "text/plain", format!("post {i}"))
                .await
                .expect("ack"),
        );
    }
    for (user, _, d) in devices.iter_mut() {
        let (seq, ev) = next_group_event(d).await;
        assert_eq!(
            (seq, ev.kind),
            (1, GroupEventKind::Created as i32),
            "{user}"
        );
        for (i, ack) in acks.iter().enumerate() {
            let (seq, m) = next_message(d).await;
            assert_eq!(seq, i as u64 + 2, "{user}: in order, no gap");
            assert_eq!((m.id, m.group_id), (ack.server_msg_id, gid));
            assert_eq!(m.body, format!("post {i}").into_bytes());
        }
    }
    for (_, c, d) in devices.iter_mut() {
        assert_no_more(c, d).await;
    }
    // Offline at send time: all of it on login.
    for u in &users[40..] {
        let (c, mut d) = srv.connect(u, "phone").await;
        assert_eq!(next_group_event(&mut d).await.0, 1);
        for ack in &acks {
            assert_eq!(next_message(&mut d).await.1.id, ack.server_msg_id);
        }
        assert_no_more(&c, &mut d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_post_and_a_removed_member_gets_nothing_after() {
    let srv = TestServer::start();
    let (alice, mut arx) = srv.connect("alice", "phone").await;
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    let (carol, mut crx) = srv.connect("carol", "phone").await;
    let (mallory, _mrx) = srv.connect("mallory", "phone").await;
    let gid = alice
        .create_group("trio", &["bob", "carol"])
        .await
        .expect("create")
        .group_id;
    for d in [&mut arx, &mut brx, &mut crx] {
        next_group_event(d).await;
    }

    let before = srv.server().store().count_messages().expect("count");
    assert_eq!(
        code_of(mallory.send_group(gid, "text/plain", "let me in").await),
        ErrorCode::NotFound
    );
    // A non-member is not told whether the group exists: the same answer
    // as for a group that does not.
    let not_mine = mallory.get_group(gid).await.expect_err("refused");
    let nowhere = mallory.get_group(987_654).await.expect_err("refused");
    assert_eq!(not_mine.code(), Some(ErrorCode::NotFound as i32));
    assert_eq!(not_mine.to_string(), nowhere.to_string());
    assert_eq!(
        code_of(alice.send_group(987_654, "text/plain", "nowhere").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        srv.server().store().count_messages().expect("count"),
        before,
        "nothing stored"
    );
    // Only admins change membership.
    assert_eq!(
        code_of(bob.add_members(gid, &["mallory"]).await),
        ErrorCode::Forbidden
    );
    // Adding a current member changes nothing: same version, no event.
    let same = alice.add_members(gid, &["bob"]).await.expect("no-op add");
    assert_eq!((same.version, same.members.len()), (1, 3));

    let after = alice.remove_members(gid, &["carol"]).await.expect("remove");
    assert_eq!(after.members.len(), 2);
    let (_, ev) = next_group_event(&mut crx).await;
    assert_eq!(ev.kind, GroupEventKind::MembersRemoved as i32);
    assert_eq!(ev.users, vec!["carol".to_string()]);
    next_group_event(&mut brx).await;
    next_group_event(&mut arx).await;

    alice
        .send_group(gid, "text/plain", "carol is gone")
        .await
        .expect("ack");
    assert_eq!(&next_message(&mut brx).await.1.body[..], b"carol is gone");
    assert_no_more(&carol, &mut crx).await;
    assert_eq!(
        code_of(carol.send_group(gid, "text/plain", "still here?").await),
        ErrorCode::NotFound
    );

    // Rename and leave are events too; the last admin leaving promotes bob.
    alice.rename_group(gid, "duo").await.expect("rename");
    let (_, ev) = next_group_event(&mut brx).await;
    assert_eq!(
        (ev.kind, ev.name.as_str()),
        (GroupEventKind::Renamed as i32, "duo")
    );
    let left = alice.leave_group(gid).await.expect("leave");
    assert_eq!(left.members.len(), 1);
    assert_eq!(left.members[0].role, pb::GroupRole::Admin as i32);
    let groups = bob.list_groups().await.expect("list");
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.group_id, g.member_count))
            .collect::<Vec<_>>(),
        vec![(gid, 1)]
    );
    assert!(alice.list_groups().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_limit_is_enforced() {
    let srv = TestServer::start_with(|c| c.max_group_members = 4);
    let (alice, _arx) = srv.connect("alice", "phone").await;
    assert_eq!(
        code_of(alice.create_group("big", &["b", "c", "d", "e"]).await),
        ErrorCode::LimitExceeded
    );
    let gid = alice
        .create_group("full", &["b", "c", "d"])
        .await
        .expect("create")
        .group_id;
    assert_eq!(
        code_of(alice.add_members(gid, &["e"]).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(alice.get_group(gid).await.expect("info").members.len(), 4);
    assert_eq!(
        code_of(alice.create_group("", &["b"]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code_of(alice.create_group("bad", &["not ok"]).await),
        ErrorCode::InvalidRecipient
    );
}

/// A group past what one frame can list: answers and events stay small
/// (members paged by name, events naming at most 64 users), and the whole
/// membership is still there, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_group_pages_members_and_receipts_and_keeps_its_events_small() {
    let srv = TestServer::start();
    let (alice, mut arx) = srv.connect("alice", "phone").await;
    let first: Vec<String> = (0..499).map(|i| format!("m{i:03}")).collect();
    let first_refs: Vec<&str> = first.iter().map(String::as_str).collect();
    let created = alice
        .create_group("big", &first_refs)
        .await
        .expect("create");
    let gid = created.group_id;
    // 500 members fit: all of them, in joining order, the creator first.
    assert_eq!(created.members.len(), 500);
    assert_eq!(created.members[0].user, "alice");
    assert!(!created.more_members);
    // Alice is one of the 500 the creation concerns: her copy names only her.
    let (_, ev) = next_group_event(&mut arx).await;
    assert_eq!(ev.kind, GroupEventKind::Created as i32);
    assert_eq!(
        (ev.users.clone(), ev.user_count),
        (vec!["alice".to_string()], 500)
    );

    let more: Vec<String> = (500..600).map(|i| format!("m{i:03}")).collect();
    let more_refs: Vec<&str> = more.iter().map(String::as_str).collect();
    let grown = alice.add_members(gid, &more_refs).await.expect("add");
    assert_eq!(grown.member_count, 600);
    assert_eq!(grown.members.len(), 500, "the first page");
    assert!(grown.more_members);
    assert_eq!(grown.members[0].user, "alice", "by name");
    // Not one of the 100 added: her copy names nobody, and counts them.
    let (_, ev) = next_group_event(&mut arx).await;
    assert_eq!(ev.kind, GroupEventKind::MembersAdded as i32);
    assert!(ev.users.is_empty());
    assert_eq!(ev.user_count, 100);

    // An added member learns it was added, and an original one that it was
    // in the group from the start.
    let (_m550, ev) = first_group_event(&srv, "m550").await;
    assert_eq!(
        (ev.kind, ev.users, ev.user_count),
        (
            GroupEventKind::MembersAdded as i32,
            vec!["m550".into()],
            100
        )
    );
    let (m007, ev) = first_group_event(&srv, "m007").await;
    assert_eq!(
        (ev.kind, ev.users, ev.user_count),
        (GroupEventKind::Created as i32, vec!["m007".into()], 500)
    );

    // Paging by name covers every member once.
    let page = alice.get_group_page(gid, "m100", 10).await.expect("page");
    let names: Vec<&str> = page.members.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(
        names,
        (101..111).map(|i| format!("m{i:03}")).collect::<Vec<_>>()
    );
    assert!(page.more_members);
    let all = alice.get_group(gid).await.expect("all pages");
    let mut names: Vec<String> = all.members.iter().map(|m| m.user.clone()).collect();
    assert_eq!(names.len(), 600);
    assert!(!all.more_members);
    names.dedup();
    assert_eq!(names.len(), 600, "no member twice");
    assert_eq!(
        all.members
            .iter()
            .find(|m| m.user == "alice")
            .map(|m| m.role),
        Some(GroupRole::Admin as i32)
    );

    // The receipt list of a post pages the same way, the sender left out.
    let post = alice
        .send_group(gid, "text/plain", "to all 600")
        .await
        .expect("post")
        .server_msg_id;
    m007.mark_read(with_group(gid), post).await.expect("read");
    let page = alice
        .receipts_page(gid, post, "", 10)
        .await
        .expect("first receipts page");
    assert_eq!(page.read, vec!["m007".to_string()]);
    assert_eq!(page.pending.len(), 9);
    assert!(page.more_members);
    assert_eq!(page.last_member, "m009");
    let list = alice.receipts(gid, post).await.expect("all receipts");
    assert_eq!(list.read, vec!["m007".to_string()]);
    assert_eq!(
        list.read.len() + list.delivered.len() + list.pending.len(),
        599
    );
    assert!(!list.more_members);
    assert!(!list.pending.iter().any(|u| u == "alice"));
}

/// ListGroups pages by group id; the client joins the pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_groups_pages_by_group_id() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let g = alice
            .create_group(&format!("g{i}"), &["bob"])
            .await
            .expect("create");
        ids.push(g.group_id);
    }
    ids.sort_unstable();
    let first = alice.list_groups_page(0, 5).await.expect("first page");
    let got: Vec<u64> = first.groups.iter().map(|g| g.group_id).collect();
    assert_eq!(got, ids[..5]);
    assert!(first.more);
    let last = alice.list_groups_page(ids[9], 5).await.expect("last page");
    let got: Vec<u64> = last.groups.iter().map(|g| g.group_id).collect();
    assert_eq!(got, ids[10..]);
    assert!(!last.more);
    let all: Vec<u64> = alice
        .list_groups()
        .await
        .expect("all")
        .iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(all, ids);
}

/// Log `user` in and take the first event of their inbox, a group event.
async fn first_group_event(srv: &TestServer, user: &str) -> (Client, pb::GroupEvent) {
    let (client, mut rx) = srv.connect(user, "phone").await;
    let (_, ev) = next_group_event(&mut rx).await;
    (client, ev)
}

/// Section 16: a page of the largest entries still fits in a frame (the
/// client library refuses frames over `max_frame_bytes`). 251 groups with
/// 128-byte names created by a 64-byte user id: `ListGroups` answers the
/// first 250 and `more`. A group of 501 members with 64-byte ids: the
/// answer to `CreateGroup`, a `GetGroup` page and a `GetReceipts` page each
/// hold 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_the_largest_entries_fit_in_a_frame() {
    let srv = TestServer::start();
    let long = |c: char, i: usize| format!("{c}{i:0>63}");
    let creator = long('a', 0);
    let (alice, _arx) = srv.connect(&creator, "phone").await;
    let mut last = 0;
    for i in 0..251 {
        last = alice
            .create_group(&format!("{i:n>128}"), &[])
            .await
            .expect("create")
            .group_id;
    }
    let page = alice.list_groups_page(0, 0).await.expect("a page");
    assert_eq!((page.groups.len(), page.more), (250, true));
    assert_eq!(page.groups[249].name.len(), 128);
    let rest = alice
        .list_groups_page(page.groups[249].group_id, 0)
        .await
        .expect("the rest");
    assert_eq!(
        rest.groups.iter().map(|g| g.group_id).collect::<Vec<_>>(),
        vec![last]
    );

    let members: Vec<String> = (1..=500).map(|i| long('m', i)).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let created = alice
        .create_group(&"g".repeat(128), &refs)
        .await
        .expect("create");
    assert_eq!(
        (
            created.members.len(),
            created.more_members,
            created.member_count
        ),
        (500, true, 501)
    );
    let gid = created.group_id;
    let page = alice.get_group_page(gid, "", 0).await.expect("a page");
    assert_eq!((page.members.len(), page.more_members), (500, true));
    let post = alice
        .send_group(gid, "text/plain", "to all")
        .await
        .expect("post")
        .server_msg_id;
    let receipts = alice
        .receipts_page(gid, post, "", 0)
        .await
        .expect("receipts");
    assert_eq!(
        (receipts.pending.len(), receipts.more_members),
        (500, false)
    );
}

/// Section 2.1: no answer is larger than `max_frame_bytes`, not even an
/// Error about a huge invalid member id (whose text could echo it, with
/// every control byte escaped to several characters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_about_a_huge_invalid_id_fits_in_a_frame() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let huge = "\u{1}".repeat(60_000);
    assert_eq!(
        code_of(alice.create_group("g", &[huge.as_str()]).await),
        ErrorCode::InvalidRecipient
    );
    let gid = alice.create_group("g", &[]).await.expect("create").group_id;
    assert_eq!(
        code_of(alice.add_members(gid, &[huge.as_str()]).await),
        ErrorCode::InvalidRecipient
    );
    alice.ping().await.expect("still connected");
}
