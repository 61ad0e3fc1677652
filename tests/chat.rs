//! 1:1 chat end to end: live delivery to every device of both parties,
//! offline delivery in order, cursors, and Sync paging.

mod common;

use common::*;
use swiftlet_client::pb;
use swiftlet_protocol::{Body, Envelope, ErrorCode, PROTOCOL_VERSION};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_to_bob_live_on_every_device_of_both() {
    let srv = TestServer::start();
    let (alice_phone, mut alice_phone_rx) = srv.connect("alice", "phone").await;
    let (_alice_laptop, mut alice_laptop_rx) = srv.connect("alice", "laptop").await;
    let (bob_phone, mut bob_phone_rx) = srv.connect("bob", "phone").await;
    let (_bob_tablet, mut bob_tablet_rx) = srv.connect("bob", "tablet").await;

    let ack = alice_phone
        .send("bob", "text/plain", "hi bob")
        .await
        .expect("ack");
    assert!(ack.server_msg_id > 0);

    for rx in [&mut bob_phone_rx, &mut bob_tablet_rx] {
        let (seq, m) = next_message(rx).await;
        assert_eq!(seq, 1);
        assert_eq!(
            (
                m.from_user.as_str(),
                m.from_device.as_str(),
                m.to_user.as_str()
            ),
            ("alice", "phone", "bob")
        );
        assert_eq!(&m.body[..], b"hi bob");
        assert_eq!(m.id, ack.server_msg_id);
    }
    // The sender's devices see what she sent: the other one, and this one.
    for rx in [&mut alice_laptop_rx, &mut alice_phone_rx] {
        let (seq, m) = next_message(rx).await;
        assert_eq!(seq, 1);
        assert_eq!(m.id, ack.server_msg_id);
        assert_eq!(m.client_msg_id, ack.client_msg_id);
    }
    assert_no_more(&bob_phone, &mut bob_phone_rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_arrive_in_order_then_live_continues_without_gap() {
    let srv = TestServer::start();
    let (alice, _alice_rx) = srv.connect("alice", "phone").await;
    let mut acks = send_numbered(&alice, "bob", 0..50).await;
    let (bob, mut bob_rx) = srv.connect("bob", "phone").await;
    assert_eq!(bob.welcome().cursor, 0);
    assert_eq!(bob.welcome().head_seq, 50);
    // Sends racing with the backlog: still one copy each, in order.
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move { send_numbered(&alice, "bob", 50..100).await })
    };
    for i in 0..100u64 {
        let (seq, m) = next_message(&mut bob_rx).await;
        assert_eq!(seq, i + 1, "in order, no gap, no duplicate");
        assert_eq!(m.body, format!("m{i}").into_bytes());
    }
    acks.extend(sender.await.expect("sender"));
    assert_eq!(acks.len(), 100);
    assert_no_more(&bob, &mut bob_rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_after_its_acknowledged_cursor() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    send_numbered(&alice, "bob", 0..10).await;
    {
        let (bob, mut rx) = srv.connect("bob", "phone").await;
        for _ in 0..10 {
            next_message(&mut rx).await;
        }
        bob.ack_delivery(6).await.expect("ack delivery");
        // A ping orders the ack before the close on the server.
        bob.ping().await.expect("ping");
        bob.close().await;
    }
    let (bob, mut rx) = srv.connect("bob", "phone").await;
    assert_eq!(bob.welcome().cursor, 6);
    for expected in 7..=10 {
        assert_eq!(next_message(&mut rx).await.0, expected);
    }
    assert_no_more(&bob, &mut rx).await;
    // Another device of bob has its own cursor: it gets all ten.
    let (_tablet, mut trx) = srv.connect("bob", "tablet").await;
    assert_eq!(next_message(&mut trx).await.0, 1);
    // Acknowledging beyond what was delivered is refused, typed. A
    // DeliveryAck has no answer when it is accepted, so the client library
    // does not wait for one (`ack_delivery` resolves once the frame is
    // queued): read the refusal on a raw connection.
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(PROTOCOL_VERSION, &token("bob")).await;
    let mut delivered = 0;
    loop {
        match raw.recv().await.map(|e| e.body) {
            Some(Some(Body::Welcome(w))) => assert_eq!(w.cursor, 0, "a fresh device"),
            Some(Some(Body::Deliver(_))) => delivered += 1,
            other => panic!("expected Welcome and Delivers, got {other:?}"),
        }
        if delivered == 10 {
            break;
        }
    }
    raw.send(Envelope::new(
        2,
        Body::DeliveryAck(pb::DeliveryAck { up_to: 99 }),
    ))
    .await;
    match raw.recv().await {
        Some(Envelope {
            request_id: 2,
            body: Some(Body::Error(e)),
        }) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest as i32);
            assert!(!e.fatal, "the connection stays open");
        }
        other => panic!("expected INVALID_REQUEST for request 2, got {other:?}"),
    }
    // Still open, and the refused acknowledgement moved no cursor.
    raw.send(Envelope::new(3, Body::Ping(pb::Ping { nonce: 7 })))
        .await;
    assert!(matches!(
        raw.recv().await.and_then(|e| e.body),
        Some(Body::Pong(pb::Pong { nonce: 7 }))
    ));
    drop(raw);
    let (again, _rx) = srv.connect("bob", "raw").await;
    assert_eq!(again.welcome().cursor, 0, "the refused ack moved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_through_the_inbox() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    send_numbered(&alice, "bob", 0..25).await;
    let (bob, _brx) = srv.connect("bob", "laptop").await;
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = bob.sync(after, 10).await.expect("sync");
        assert_eq!(page.head_seq, 25);
        assert_eq!(page.first_available_seq, 1);
        for e in &page.events {
            seen.push(e.seq);
        }
        if !page.has_more {
            break;
        }
        after = page.events.last().expect("a non-final page has events").seq;
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    let empty = bob.sync(25, 10).await.expect("sync at head");
    assert!(empty.events.is_empty() && !empty.has_more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_typed_and_keep_the_connection() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let bad_recipient = alice.send("not a user!", "text/plain", "x").await;
    assert_eq!(
        bad_recipient.expect_err("refused").code(),
        Some(swiftlet_protocol::ErrorCode::InvalidRecipient as i32)
    );
    let bad_id = alice.send_with_id("", "bob", "text/plain", "x").await;
    assert_eq!(
        bad_id.expect_err("refused").code(),
        Some(swiftlet_protocol::ErrorCode::InvalidRequest as i32)
    );
    // Still logged in and working.
    alice.send("bob", "text/plain", "fine").await.expect("ack");
}

/// A connection that asks not to be pushed its own sends (protocol section
/// 7, "Own sends") learns their seqs from the Acks; its user's other devices
/// still get them, what others send is pushed to it as before, and its
/// cursor moves past its own sends by itself, so they never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_skips_its_own_sends_gets_their_seqs_in_the_acks_and_never_sees_them() {
    let srv = TestServer::start();
    let skip_own = || {
        let mut c =
            swiftlet_client::ClientConfig::new(srv.addr().to_string(), token("alice"), "phone");
        c.skip_own_sends = true;
        c
    };
    let (phone, mut phone_rx) = swiftlet_client::Client::connect(skip_own())
        .await
        .expect("login");
    let (_laptop, mut laptop_rx) = srv.connect("alice", "laptop").await;
    let (bob, mut bob_rx) = srv.connect("bob", "phone").await;

    let mut seqs = Vec::new();
    for i in 0..3 {
        let ack = phone
            .send("bob", "text/plain", format!("m{i}"))
            .await
            .expect("ack");
        seqs.push(ack.seq);
    }
    assert_eq!(seqs, vec![1, 2, 3], "their places in alice's inbox");
    for expected in 1..=3 {
        assert_eq!(next_message(&mut laptop_rx).await.0, expected);
        assert_eq!(next_message(&mut bob_rx).await.0, expected);
    }
    assert_no_more(&phone, &mut phone_rx).await;

    // What others send still comes, after the skipped seqs.
    bob.send("alice", "text/plain", "hi").await.expect("ack");
    let (seq, m) = next_message(&mut phone_rx).await;
    assert_eq!((seq, m.from_user.as_str()), (4, "bob"));
    phone.ack_delivery(4).await.expect("ack delivery");
    phone.ping().await.expect("ping");
    phone.close().await;

    let (phone, _phone_rx) = swiftlet_client::Client::connect(skip_own())
        .await
        .expect("login");
    assert_eq!(phone.welcome().cursor, 4);
    // Everything written to it is acknowledged: its next own send is
    // acknowledged for it at once.
    let ack = phone.send("bob", "text/plain", "m3").await.expect("ack");
    assert_eq!(ack.seq, 5);
    phone.ping().await.expect("ping");
    phone.close().await;
    let (phone, mut phone_rx2) = swiftlet_client::Client::connect(skip_own())
        .await
        .expect("login");
    assert_eq!(
        phone.welcome().cursor,
        5,
        "its own send is behind its cursor"
    );
    assert_no_more(&phone, &mut phone_rx2).await;
}

/// Section 6's limits at their edges: a `client_msg_id` of 64 bytes and a
/// `content_type` of 128 are accepted, one byte more is `INVALID_REQUEST`;
/// a body of exactly `max_frame_bytes − 1024` is accepted, one byte more is
/// `BODY_TOO_LARGE`; and the largest message, between users and devices
/// with 64-byte ids, reaches its reader in one frame, pushed and in a Sync
/// page (the client library refuses frames over `max_frame_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_limits_hold_at_their_edges_and_the_largest_message_fits_on_the_way_out() {
    let srv = TestServer::start();
    let (alice_id, bob_id) = ("a".repeat(64), "b".repeat(64));
    let connect = |user: &str| {
        swiftlet_client::Client::connect(swiftlet_client::ClientConfig::new(
            srv.addr().to_string(),
            token(user),
            "d".repeat(64),
        ))
    };
    let (alice, _arx) = connect(&alice_id).await.expect("login");
    let (bob, mut brx) = connect(&bob_id).await.expect("login");
    let limit = alice.welcome().max_frame_bytes as usize - 1024;
    assert_eq!(limit, 64_512);

    let refused = |id: String, content_type: String, body: usize| {
        let alice = &alice;
        let bob_id = &bob_id;
        async move {
            code_of(
                alice
                    .send_with_id(&id, bob_id, &content_type, vec![0u8; body])
                    .await,
            )
        }
    };
    assert_eq!(
        refused("m".repeat(65), "t".into(), 1).await,
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        refused("m1".into(), "t".repeat(129), 1).await,
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        refused("m1".into(), "t".into(), limit + 1).await,
        ErrorCode::BodyTooLarge
    );
    let ack = alice
        .send_with_id(&"m".repeat(64), &bob_id, &"t".repeat(128), vec![7u8; limit])
        .await
        .expect("the largest message is accepted");
    let (seq, m) = next_message(&mut brx).await;
    assert_eq!((m.id, m.body.len()), (ack.server_msg_id, limit));
    let page = bob.sync(seq - 1, 1).await.expect("sync");
    assert_eq!(page.events.len(), 1);

    // Both a recipient and a group: refused before anything is stored.
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(PROTOCOL_VERSION, &token("carol")).await;
    assert!(matches!(
        raw.recv().await.and_then(|e| e.body),
        Some(Body::Welcome(_))
    ));
    raw.send(Envelope::new(
        2,
        Body::Send(pb::Send {
            client_msg_id: "c1".into(),
            to_user: "bob".into(),
            content_type: "text/plain".into(),
            body: bytes::Bytes::from_static(b"x"),
            group_id: 7,
        }),
    ))
    .await;
    match raw.recv().await {
        Some(Envelope {
            request_id: 2,
            body: Some(Body::Error(e)),
        }) => assert_eq!((e.code, e.fatal), (ErrorCode::InvalidRequest as i32, false)),
        other => panic!("expected INVALID_REQUEST, got {other:?}"),
    }
}

/// Section 8's page rules: a limit of 0 means 100 and one over 500 is
/// capped at 500; a page holds no more than fits in a frame, but at least
/// one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_limits_default_cap_and_fit_in_a_frame() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let sends: Vec<_> = (0..501)
        .map(|i| alice.send("bob", "text/plain", format!("m{i}")))
        .collect();
    for ack in futures::future::join_all(sends).await {
        ack.expect("ack");
    }
    let page = alice.sync(0, 0).await.expect("sync");
    assert_eq!((page.events.len(), page.has_more), (100, true));
    let page = alice.sync(0, 600).await.expect("sync");
    assert_eq!((page.events.len(), page.has_more), (500, true));
    let page = alice.sync(500, 600).await.expect("sync");
    assert_eq!((page.events.len(), page.has_more), (1, false));

    // Three bodies of 40 KB: one per page, each page within the frame.
    let (carol, _crx) = srv.connect("carol", "phone").await;
    for _ in 0..3 {
        carol
            .send("dave", "text/plain", vec![1u8; 40_000])
            .await
            .expect("ack");
    }
    let mut after = 0;
    let mut pages = 0;
    loop {
        let page = carol.sync(after, 10).await.expect("sync");
        assert_eq!(page.events.len(), 1);
        pages += 1;
        after = page.events[0].seq;
        if !page.has_more {
            break;
        }
    }
    assert_eq!((pages, after), (3, 3));
}

/// A connection may pipeline big Syncs: a shard reads at most one page per
/// connection per turn, and a turn's share of page reads over all of its
/// connections, leaving the rest (and whatever came behind it) for later
/// turns. Every request is still answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_syncs_wait_their_turn_and_each_is_answered_once() {
    let srv = TestServer::start();
    let (alice, _alice_rx) = srv.connect("alice", "phone").await;
    send_numbered(&alice, "bob", 0..30).await;
    let mut bob = Raw::logged_in(srv.addr(), "bob").await;
    // 40 Syncs for the biggest page, each followed by a Ping, in one write.
    let mut bytes = bytes::BytesMut::new();
    for i in 0..40u64 {
        let sync = Body::Sync(pb::Sync {
            after: 0,
            limit: 500,
        });
        swiftlet_protocol::codec::encode_frame(&Envelope::new(2 + 2 * i, sync), &mut bytes);
        let ping = Body::Ping(pb::Ping { nonce: i });
        swiftlet_protocol::codec::encode_frame(&Envelope::new(3 + 2 * i, ping), &mut bytes);
    }
    bob.send_bytes(&bytes).await;
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 80 {
        let env = bob.recv().await.expect("an answer");
        match env.body {
            // The login's catch-up, interleaved.
            Some(Body::Deliver(_)) => continue,
            Some(Body::SyncBatch(page)) => {
                assert_eq!(env.request_id % 2, 0, "a Sync's answer");
                assert_eq!(page.events.len(), 30);
                assert!(!page.has_more);
            }
            Some(Body::Pong(_)) => assert_eq!(env.request_id % 2, 1, "a Ping's answer"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(answered.insert(env.request_id), "answered twice");
    }
    assert_eq!(answered, (2..82).collect());
}

/// A device far behind is caught up from the store over many turns (each
/// turn reads a bounded share of events for all catching-up devices):
/// every event arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_far_behind_catches_up_over_many_turns_in_order() {
    let srv = TestServer::start();
    let (alice, mut alice_rx) = srv.connect("alice", "phone").await;
    // Her own sends come back to her device: taken, so her client keeps
    // reading.
    tokio::spawn(async move { while alice_rx.next().await.is_some() {} });
    const N: u64 = 1_500;
    send_numbered(&alice, "bob", 0..N).await;
    let (bob, mut bob_rx) = srv.connect("bob", "phone").await;
    assert_eq!(bob.welcome().head_seq, N);
    for i in 0..N {
        let (seq, m) = next_message(&mut bob_rx).await;
        assert_eq!(seq, i + 1, "in order, no gap, no duplicate");
        assert_eq!(m.body, format!("m{i}").into_bytes());
    }
    assert_no_more(&bob, &mut bob_rx).await;
}
