//! Receipts: delivered when a device of the recipient acknowledges, read by
//! watermark, told to every device of the sender; the group receipt list.

mod common;

use common::*;
use swiftlet_client::{with_group, with_user, Client, Deliveries};
use swiftlet_protocol::pb::{conversation, ReceiptKind};
use swiftlet_protocol::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_and_read_reach_both_devices_of_the_sender() {
    let srv = TestServer::start();
    let (alice, mut phone) = srv.connect("alice", "phone").await;
    let (_laptop_client, mut laptop) = srv.connect("alice", "laptop").await;
    let (bob, mut bob_phone) = srv.connect("bob", "phone").await;

    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(
            alice
                .send("bob", "text/plain", format!("m{i}"))
                .await
                .expect("ack")
                .server_msg_id,
        );
    }
    for d in [&mut phone, &mut laptop] {
        for _ in 0..3 {
            next_message(d).await;
        }
    }
    for _ in 0..3 {
        next_message(&mut bob_phone).await;
    }
    bob.ack_delivery(3).await.expect("ack delivery");
    for d in [&mut phone, &mut laptop] {
        let (seq, r) = next_receipt(d).await;
        assert_eq!(seq, 4);
        assert_eq!(
            (r.kind, r.user.as_str(), r.up_to),
            (ReceiptKind::Delivered as i32, "bob", ids[2])
        );
        assert_eq!(
            r.conversation.and_then(|c| c.kind),
            Some(conversation::Kind::User("bob".into()))
        );
    }

    bob.mark_read(with_user("alice"), ids[1])
        .await
        .expect("mark read");
    for d in [&mut phone, &mut laptop] {
        let (_, r) = next_receipt(d).await;
        assert_eq!((r.kind, r.up_to), (ReceiptKind::Read as i32, ids[1]));
        // Covers one and two, not three.
        assert!(ids[0] <= r.up_to && ids[1] <= r.up_to && ids[2] > r.up_to);
    }
    // Bob's own devices learn the conversation is read up to there.
    let (_, own) = next_receipt(&mut bob_phone).await;
    assert_eq!(
        (own.kind, own.user.as_str()),
        (ReceiptKind::Read as i32, "bob")
    );
    assert_eq!(
        own.conversation.and_then(|c| c.kind),
        Some(conversation::Kind::User("alice".into()))
    );

    // A MarkRead beyond the newest message is refused; an older one is a no-op.
    assert_eq!(
        code_of(bob.mark_read(with_user("alice"), ids[2] + 1).await),
        ErrorCode::InvalidRequest
    );
    bob.mark_read(with_user("alice"), ids[0])
        .await
        .expect("no-op");
    assert_no_more(&alice, &mut phone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_receipt_list_tells_read_delivered_and_pending() {
    let srv = TestServer::start();
    let (alice, mut arx) = srv.connect("alice", "phone").await;
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    let (carol, mut crx) = srv.connect("carol", "phone").await;
    let gid = alice
        .create_group("crew", &["bob", "carol", "dave"])
        .await
        .expect("create")
        .group_id;
    for d in [&mut arx, &mut brx, &mut crx] {
        next_group_event(d).await;
    }
    let m = alice
        .send_group(gid, "text/plain", "who reads this?")
        .await
        .expect("ack")
        .server_msg_id;
    next_message(&mut arx).await;
    let (bseq, _) = next_message(&mut brx).await;
    next_message(&mut crx).await;

    bob.ack_delivery(bseq).await.expect("delivered");
    carol.mark_read(with_group(gid), m).await.expect("read");
    // Read is pushed to the sender; delivered in a group is only a watermark.
    let (_, r) = next_receipt(&mut arx).await;
    assert_eq!(
        r.conversation.and_then(|c| c.kind),
        Some(conversation::Kind::GroupId(gid))
    );
    assert_eq!(
        (r.user.as_str(), r.kind),
        ("carol", ReceiptKind::Read as i32)
    );
    // Bob's acknowledgement reaches the watermark asynchronously: ask until
    // the list settles (bounded by PATIENCE).
    let want = (
        vec!["carol".to_string()],
        vec!["bob".to_string()],
        vec!["dave".to_string()],
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let list = alice.receipts(gid, m).await.expect("receipts");
        let got = (list.read, list.delivered, list.pending);
        if got == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipt list never settled: {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_no_more(&alice, &mut arx).await;

    // Erin joins after m: m was never hers, so its list leaves her out; a
    // post after she joined lists her (pending: she is not connected).
    let info = alice.add_members(gid, &["erin"]).await.expect("add erin");
    let erin = info
        .members
        .iter()
        .find(|x| x.user == "erin")
        .expect("erin listed");
    assert!(erin.joined_after >= m, "joined after m: {erin:?}");
    next_group_event(&mut arx).await;
    let list = alice.receipts(gid, m).await.expect("receipts");
    assert_eq!((list.read, list.delivered, list.pending), want);
    let m2 = alice
        .send_group(gid, "text/plain", "welcome, erin")
        .await
        .expect("ack")
        .server_msg_id;
    assert!(m2 > erin.joined_after);
    let list = alice.receipts(gid, m2).await.expect("receipts");
    assert!(list.pending.contains(&"erin".to_string()), "{list:?}");

    // Only the sender may ask; a non-member is not told the group exists.
    assert_eq!(code_of(bob.receipts(gid, m).await), ErrorCode::Forbidden);
    let (nina, _nrx) = srv.connect("nina", "phone").await;
    assert_eq!(code_of(nina.receipts(gid, m).await), ErrorCode::NotFound);
    assert_eq!(
        code_of(alice.receipts(gid, m + 1).await),
        ErrorCode::NotFound
    );
    // And only members mark a group read.
    let (mallory, _mrx) = srv.connect("mallory", "phone").await;
    assert_eq!(
        code_of(mallory.mark_read(with_group(gid), m).await),
        ErrorCode::NotFound
    );
}

/// Delivered receipts come out right whether the shard still holds what a
/// device was sent (a catch-up after login, live pushes) or has to read the
/// acknowledged range back from the store (a longer unacknowledged run than
/// it keeps per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_receipts_after_a_catch_up_and_after_a_long_unacknowledged_run() {
    let srv = TestServer::start();
    let (alice, mut arx) = srv.connect("alice", "phone").await;
    // Bob is offline: these reach him by catch-up when he logs in.
    let last = send_to_bob(&alice, &mut arx, 3).await;
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    receive_ack_and_see_delivered(&bob, &mut brx, &mut arx, 3, last).await;

    let n = swiftlet::session::unacked::MAX_UNACKED + 20;
    let last = send_to_bob(&alice, &mut arx, n).await;
    receive_ack_and_see_delivered(&bob, &mut brx, &mut arx, n, last).await;
    assert_no_more(&alice, &mut arx).await;
}

/// Alice sends `n` messages to bob (taking her own copies off `arx`); the
/// last one's id.
async fn send_to_bob(alice: &Client, arx: &mut Deliveries, n: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = alice
            .send("bob", "text/plain", format!("m{i}"))
            .await
            .expect("ack")
            .server_msg_id;
        next_message(arx).await;
    }
    last
}

/// Bob's device receives `n` messages and acknowledges them; alice's device
/// then sees bob's delivered receipt up to `last`.
async fn receive_ack_and_see_delivered(
    bob: &Client,
    brx: &mut Deliveries,
    arx: &mut Deliveries,
    n: usize,
    last: u64,
) {
    let mut seq = 0;
    for _ in 0..n {
        seq = next_message(brx).await.0;
    }
    bob.ack_delivery(seq).await.expect("ack delivery");
    let (_, r) = next_receipt(arx).await;
    assert_eq!(
        (r.kind, r.user.as_str(), r.up_to),
        (ReceiptKind::Delivered as i32, "bob", last)
    );
}
