//! Retention, end to end: inboxes trimmed by count while traffic flows and
//! by age on the injected clock, the gap marker a device behind the trim
//! point gets (and one ahead of it never gets), messages no inbox holds
//! any more reclaimed, dedup records expiring after their window, and
//! nothing kept lost across a restart. The trim is forced through the
//! store's hook (`Store::trim_now`, what the trimmer thread runs on its
//! own schedule), so no test waits for a timer.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use swiftlet::clock::ManualClock;
use swiftlet::config::Span;
use swiftlet_client::{pb, Client, DeliveryItem, Gap};

/// What a fresh device of `user` sees by paging from 0: the first
/// available seq and head of the first page, and every event.
async fn inbox_of(srv: &TestServer, user: &str) -> (u64, u64, Vec<pb::Event>) {
    let (c, _d) = srv.connect(user, "inspector").await;
    let first_page = c.sync(0, 500).await.expect("sync");
    let (first, head) = (first_page.first_available_seq, first_page.head_seq);
    let mut events = first_page.events.clone();
    let mut more = first_page.has_more;
    while more {
        let after = events.last().map_or(0, |e| e.seq);
        let page = c.sync(after, 500).await.expect("sync");
        events.extend(page.events);
        more = page.has_more;
    }
    c.close().await;
    (first, head, events)
}

fn message_ids(events: &[pb::Event]) -> BTreeSet<u64> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::Message(m)) => Some(m.id),
            _ => None,
        })
        .collect()
}

/// Everything delivered after the Welcome, up to and including `head`,
/// acknowledging as it goes; asserts the marker and events come exactly
/// once each and in order.
async fn receive_until(
    client: &Client,
    d: &mut swiftlet_client::Deliveries,
    head: u64,
) -> (Vec<Gap>, Vec<u64>) {
    let (mut gaps, mut seqs) = (Vec::new(), Vec::<u64>::new());
    while seqs.last().copied().unwrap_or(0) < head {
        match next_item(d).await {
            DeliveryItem::Gap(g) => {
                let last = seqs.last().copied().unwrap_or(0);
                assert!(last < g.from, "gap {g:?} after seq {last}");
                gaps.push(g)
            }
            DeliveryItem::Event(e) => {
                if let Some(g) = gaps.last() {
                    assert!(e.seq > g.to, "event {} inside the gap {g:?}", e.seq);
                }
                seqs.push(e.seq);
                client.ack_delivery(e.seq).await.expect("ack");
            }
            DeliveryItem::Typing(_) | DeliveryItem::Presence(_) => {}
            DeliveryItem::Closed(r) => panic!("closed: {r}"),
        }
    }
    (gaps, seqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_under_traffic_leaves_a_gap_marker_and_then_everything_after_it_once() {
    const KEEP: u64 = 16;
    let mut srv = TestServer::start_with(|c| {
        c.inbox_keep = KEEP;
        c.inbox_max_age = Span(Duration::ZERO);
    });
    let (alice, _ad) = srv.connect("alice", "phone").await;
    let (carol, _cd) = srv.connect("carol", "phone").await;
    let group = carol
        .create_group("trio", &["alice", "bob"])
        .await
        .expect("group")
        .group_id;

    // bob's phone takes the group's creation and goes away: behind.
    let (phone, mut pd) = srv.connect("bob", "phone").await;
    let created = next_group_event(&mut pd).await.0;
    phone.ack_delivery(created).await.expect("ack");
    phone.ping().await.expect("ping");
    phone.close().await;
    drop(pd);

    // bob's tablet stays, acknowledging as events come: ahead.
    let (tablet, mut td) = srv.connect("bob", "tablet").await;
    let tablet_start = tablet.welcome().cursor;

    // The trim runs again and again while the sends go on.
    let store = srv.server().store().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let trimmer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            while !stop.load(Ordering::Relaxed) {
                removed += store.trim_now().expect("trim").events;
                std::thread::sleep(Duration::from_millis(2));
            }
            removed
        })
    };
    let mut sent = BTreeSet::new();
    for i in 0..60 {
        let ack = alice
            .send("bob", "text/plain", format!("m{i}"))
            .await
            .expect("send");
        sent.insert(ack.server_msg_id);
        if i % 3 == 0 {
            let ack = carol
                .send_group(group, "text/plain", format!("g{i}"))
                .await
                .expect("post");
            sent.insert(ack.server_msg_id);
        }
    }
    // The tablet saw everything live, in order, and never a marker.
    let head = store.last_seq("bob").expect("head");
    let (gaps, seqs) = receive_until(&tablet, &mut td, head).await;
    assert!(gaps.is_empty(), "a device ahead of the trim saw {gaps:?}");
    assert_eq!(seqs, (tablet_start + 1..=head).collect::<Vec<_>>());

    stop.store(true, Ordering::Relaxed);
    let during = trimmer.await.expect("trimmer");
    assert!(during > 0, "the trims under traffic removed nothing");
    store.trim_now().expect("trim");
    store.compact().expect("compact");

    // Exactly the newest KEEP stay.
    let (first, bob_head, bob_events) = inbox_of(&srv, "bob").await;
    assert_eq!(bob_head, head);
    assert_eq!(first, head - KEEP + 1);
    assert_eq!(
        bob_events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (first..=head).collect::<Vec<_>>()
    );

    // The phone is told where its gap is, then gets the rest once, in order.
    let (phone, mut pd) = srv.connect("bob", "phone").await;
    let w = phone.welcome().clone();
    assert_eq!(
        (w.cursor, w.first_available_seq, w.head_seq),
        (created, first, head)
    );
    match next_item(&mut pd).await {
        DeliveryItem::Gap(g) => {
            assert_eq!(
                g,
                Gap {
                    from: created + 1,
                    to: first - 1
                }
            );
            assert_eq!(
                g.to_string(),
                format!(
                    "{} older messages are no longer available (events {}..{} were removed by retention)",
                    first - 1 - created,
                    created + 1,
                    first - 1
                )
            );
        }
        other => panic!("expected the gap marker first, got {other:?}"),
    }
    let (gaps, seqs) = receive_until(&phone, &mut pd, head).await;
    assert!(gaps.is_empty(), "a second marker: {gaps:?}");
    assert_eq!(seqs, (first..=head).collect::<Vec<_>>());
    assert_no_more(&phone, &mut pd).await;
    phone.close().await;

    // Messages no inbox references any more are gone; the others stay.
    let mut referenced = message_ids(&bob_events);
    for user in ["alice", "carol"] {
        referenced.extend(message_ids(&inbox_of(&srv, user).await.2));
    }
    let stored = store.count_messages().expect("count");
    assert_eq!(stored, referenced.len() as u64);
    assert!(stored < sent.len() as u64, "nothing was reclaimed");
    drop(store);

    // A restart keeps every event that was not trimmed.
    alice.close().await;
    carol.close().await;
    tablet.close().await;
    srv.restart();
    let after = inbox_of(&srv, "bob").await;
    assert_eq!((after.0, after.1), (first, head));
    assert_eq!(after.2, bob_events);
    assert_eq!(
        srv.server().store().count_messages().expect("count"),
        referenced.len() as u64
    );
}

const T0: u64 = 1_800_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_the_max_age_go_the_head_stays_and_dedup_records_expire() {
    let clock = ManualClock::new(T0);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.inbox_keep = 0;
        c.inbox_max_age = Span(HOUR);
        c.dedup_window = Span(HOUR);
        // The clock jumps two hours below, with alice and carol logged
        // in: past the default idle timeout (60 s), a shard's next turn
        // would close them before alice's next send was read (1 run in
        // 15 failed so).
        c.idle_timeout_ms = 4 * 3_600_000;
    });
    let (alice, _ad) = srv.connect("alice", "phone").await;
    let (carol, _cd) = srv.connect("carol", "phone").await;
    let group = carol
        .create_group("old", &["alice", "bob"])
        .await
        .expect("group")
        .group_id;
    let first_ack = alice
        .send_with_id("first-send", "bob", "text/plain", "old 0")
        .await
        .expect("send");
    for i in 1..3 {
        alice
            .send("bob", "text/plain", format!("old {i}"))
            .await
            .expect("send");
    }
    for i in 0..2 {
        carol
            .send_group(group, "text/plain", format!("post {i}"))
            .await
            .expect("post");
    }
    // bob: 1 group event, 3 messages, 2 posts, all old by then; 2 new.
    clock.advance(2 * HOUR);
    for i in 0..2 {
        alice
            .send("bob", "text/plain", format!("new {i}"))
            .await
            .expect("send");
    }
    let store = srv.server().store().clone();
    let report = store.trim_now().expect("trim");
    assert_eq!(report.inboxes, 3, "{report:?}");

    let (first, head, events) = inbox_of(&srv, "bob").await;
    assert_eq!((first, head), (7, 8));
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![7, 8]);
    // carol's newest event (her last post) is old, and stays: it holds
    // her inbox's head.
    let (cfirst, chead, cevents) = inbox_of(&srv, "carol").await;
    assert_eq!((cfirst, chead, cevents.len()), (3, 3, 1));
    // Stored: bob's two new messages, and the post carol's head holds.
    let mut referenced = message_ids(&events);
    referenced.extend(message_ids(&cevents));
    assert_eq!(referenced.len(), 3);
    assert_eq!(store.count_messages().expect("count"), 3);

    // A device that never connected is told of the six it will not get.
    let (fresh, mut fd) = srv.connect("bob", "fresh").await;
    assert_eq!(fresh.welcome().first_available_seq, 7);
    assert_eq!(
        next_item(&mut fd).await,
        DeliveryItem::Gap(Gap { from: 1, to: 6 })
    );
    assert_eq!(next_message(&mut fd).await.1.body, "new 0".as_bytes());
    assert_eq!(next_message(&mut fd).await.1.body, "new 1".as_bytes());
    assert_no_more(&fresh, &mut fd).await;

    // Within the window a retry gets the first Ack; past it, once a
    // compaction has run, the record is gone and a retry is a new send.
    let retry = alice
        .send_with_id("first-send", "bob", "text/plain", "old 0")
        .await
        .expect("retry");
    assert_eq!(
        retry.server_msg_id, first_ack.server_msg_id,
        "kept until compacted"
    );
    let before = store.count_dedup().expect("count");
    store.compact().expect("compact");
    assert_eq!(
        store.count_dedup().expect("count"),
        before - 5,
        "the old sends' records"
    );
    let late = alice
        .send_with_id("first-send", "bob", "text/plain", "old 0")
        .await
        .expect("late retry");
    assert_ne!(late.server_msg_id, first_ack.server_msg_id);
}
