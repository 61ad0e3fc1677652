//! Typing indicators and presence: ephemeral pushes, a typing notice that
//! lapses by itself, a flood answered with a typed error, last seen that
//! survives a restart (and can be hidden), and a close that comes with the
//! last frame still noticed at once.

mod common;

use common::*;
use swiftlet_client::{pb, with_group, with_user, DeliveryItem};
use swiftlet_protocol::pb::{conversation, TypingState};
use swiftlet_protocol::{Body, Envelope, ErrorCode};

async fn next_typing(d: &mut swiftlet_client::Deliveries) -> pb::TypingNotice {
    match next_item(d).await {
        DeliveryItem::Typing(t) => t,
        other => panic!("expected a typing notice, got {other:?}"),
    }
}

async fn next_presence(d: &mut swiftlet_client::Deliveries) -> pb::Presence {
    match next_item(d).await {
        DeliveryItem::Presence(p) => p,
        other => panic!("expected a presence change, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_party_and_lapses_by_itself() {
    let srv = TestServer::start_with(|c| c.typing_ttl_ms = 300);
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let (_bob, mut brx) = srv.connect("bob", "phone").await;
    alice.typing(with_user("bob"), true).await.expect("typing");
    let t = next_typing(&mut brx).await;
    assert_eq!(
        (t.user.as_str(), t.state, t.expires_in_ms),
        ("alice", TypingState::Started as i32, 300)
    );
    assert_eq!(
        t.conversation.and_then(|c| c.kind),
        Some(conversation::Kind::User("alice".into()))
    );
    // No STOPPED from alice: the server sends it when the TTL lapses.
    let t = next_typing(&mut brx).await;
    assert_eq!(t.state, TypingState::Stopped as i32);

    // In a group, the other online members see it.
    let (carol, mut crx) = srv.connect("carol", "phone").await;
    let gid = alice
        .create_group("g", &["bob", "carol"])
        .await
        .expect("group")
        .group_id;
    next_group_event(&mut brx).await;
    next_group_event(&mut crx).await;
    carol.typing(with_group(gid), true).await.expect("typing");
    let t = next_typing(&mut brx).await;
    assert_eq!(
        (t.user.as_str(), t.conversation.and_then(|c| c.kind)),
        ("carol", Some(conversation::Kind::GroupId(gid)))
    );
    carol.typing(with_group(gid), false).await.expect("stop");
    assert_eq!(
        next_typing(&mut brx).await.state,
        TypingState::Stopped as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typing_flood_gets_rate_limited_not_disconnected() {
    let srv = TestServer::start();
    let mut raw = Raw::logged_in(srv.addr(), "alice").await;
    for i in 0..40 {
        raw.send(Envelope::new(
            10 + i,
            Body::Typing(pb::Typing {
                conversation: Some(with_user("bob")),
                state: TypingState::Started as i32,
            }),
        ))
        .await;
    }
    raw.send(Envelope::new(99, Body::Ping(pb::Ping { nonce: 5 })))
        .await;
    let mut limited = 0;
    loop {
        match raw.recv().await.and_then(|e| e.body) {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited as i32);
                assert!(!e.fatal);
                limited += 1;
            }
            Some(Body::Pong(p)) => {
                assert_eq!(p.nonce, 5);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        limited >= 20,
        "a burst of 10 is allowed, the rest refused ({limited} refused)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_pushed_and_last_seen_survives_a_restart() {
    let mut srv = TestServer::start();
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    let now = bob.subscribe_presence(&["alice"]).await.expect("subscribe");
    assert_eq!(
        (now[0].online, now[0].last_seen_ms),
        (false, 0),
        "never seen"
    );
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let p = next_presence(&mut brx).await;
    assert_eq!((p.user.as_str(), p.online), ("alice", true));
    alice.close().await;
    let p = next_presence(&mut brx).await;
    assert!(!p.online && p.last_seen_ms > 0);
    let last_seen = p.last_seen_ms;

    drop((bob, brx));
    srv.restart();
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    let now = bob.subscribe_presence(&["alice"]).await.expect("subscribe");
    assert_eq!((now[0].online, now[0].last_seen_ms), (false, last_seen));

    // Hidden last seen: 0 for everyone.
    let (alice, _arx) = srv.connect("alice", "phone").await;
    assert!(next_presence(&mut brx).await.online);
    alice.set_privacy(true).await.expect("privacy");
    alice.close().await;
    // The server has seen the close once bob is told (a close is not
    // synchronous with the client's call).
    let gone = next_presence(&mut brx).await;
    assert_eq!((gone.online, gone.last_seen_ms), (false, 0));
    let (carol, _crx) = srv.connect("carol", "phone").await;
    let now = carol
        .subscribe_presence(&["alice", "bob"])
        .await
        .expect("subscribe");
    assert_eq!((now[0].online, now[0].last_seen_ms), (false, 0));
    assert!(now[1].online);
}

/// A device whose last frame and FIN arrive together (or one after the
/// other) is seen to go: the shard stops reading at a short read, so this
/// checks that a close reported with data is still read to its end, and that
/// one arriving later is a new event (an unnoticed close would only end at
/// the idle timeout, far beyond the test's patience).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_sends_and_closes_at_once_goes_offline() {
    use tokio::io::AsyncWriteExt;
    let srv = TestServer::start();
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    bob.subscribe_presence(&["alice"]).await.expect("subscribe");
    let mut raw = Raw::logged_in(srv.addr(), "alice").await;
    let p = next_presence(&mut brx).await;
    assert_eq!((p.user.as_str(), p.online), ("alice", true));
    // A last Ping and the FIN in one segment: corked, the data waits for
    // the FIN, so the server sees both in one readiness event.
    let mut bytes = bytes::BytesMut::new();
    swiftlet_protocol::codec::encode_frame(
        &Envelope::new(2, Body::Ping(pb::Ping { nonce: 7 })),
        &mut bytes,
    );
    let stream = raw.framed.get_mut();
    socket2::SockRef::from(&*stream)
        .set_cork(true)
        .expect("cork");
    stream.write_all(&bytes).await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let p = next_presence(&mut brx).await;
    assert_eq!((p.user.as_str(), p.online), ("alice", false));
}

/// Typing to oneself (a note-to-self chat) reaches none of one's own
/// devices: the spec says never to the typist's own devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_to_oneself_reaches_no_device() {
    let srv = TestServer::start();
    let (phone, mut prx) = srv.connect("olga", "phone").await;
    let (laptop, mut lrx) = srv.connect("olga", "laptop").await;
    phone.typing(with_user("olga"), true).await.expect("typing");
    assert_no_more(&phone, &mut prx).await;
    assert_no_more(&laptop, &mut lrx).await;
}

/// The refusals of section 19 (`SubscribePresence`) and 18 (`Typing`),
/// each non-fatal: more than 1,000 users and more users than one answer
/// frame holds are `LIMIT_EXCEEDED`, an invalid id `INVALID_RECIPIENT`,
/// and a refused subscription leaves the previous one in place; a `Typing`
/// without a conversation or a state is `INVALID_REQUEST`, and one in a
/// group the typist is not in is `NOT_FOUND`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_refusals_are_typed_and_change_nothing() {
    let srv = TestServer::start();
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    bob.subscribe_presence(&["alice"]).await.expect("subscribe");

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_eq!(
        code_of(bob.subscribe_presence(&too_many).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code_of(bob.subscribe_presence(&["carol", "not an id"]).await),
        ErrorCode::InvalidRecipient
    );
    // 990 ids of 64 bytes fit in a request (66 bytes each), but their
    // answer would not fit in a frame (68 bytes each, more for users seen
    // before): refused, not sent over the frame limit.
    let long: Vec<String> = (0..990).map(|i| format!("{i:0>64}")).collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    assert_eq!(
        code_of(bob.subscribe_presence(&long).await),
        ErrorCode::LimitExceeded
    );
    // Still watching alice, and only her.
    let (_alice, _arx) = srv.connect("alice", "phone").await;
    let p = next_presence(&mut brx).await;
    assert_eq!((p.user.as_str(), p.online), ("alice", true));

    let carols = srv.connect("carol", "phone").await.0;
    let gid = carols.create_group("g", &[]).await.expect("group").group_id;
    let mut raw = Raw::logged_in(srv.addr(), "bob").await;
    let typing = |conversation, state: TypingState| {
        Body::Typing(pb::Typing {
            conversation,
            state: state as i32,
        })
    };
    let cases = [
        (
            typing(None, TypingState::Started),
            ErrorCode::InvalidRequest,
        ),
        (
            typing(Some(with_user("not an id")), TypingState::Started),
            ErrorCode::InvalidRequest,
        ),
        (
            typing(Some(with_user("carol")), TypingState::Unspecified),
            ErrorCode::InvalidRequest,
        ),
        (
            typing(Some(with_group(gid)), TypingState::Started),
            ErrorCode::NotFound,
        ),
        (
            typing(Some(with_group(gid + 1)), TypingState::Started),
            ErrorCode::NotFound,
        ),
    ];
    for (rid, (body, code)) in (2..).zip(cases) {
        raw.send(Envelope::new(rid, body)).await;
        raw.expect_request_error(rid, code).await;
    }
}

/// Section 18, "Automatic STOPPED": the server stops a connection's
/// indicator when it starts typing in another conversation, and when the
/// connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_stops_on_another_conversation_and_on_close() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let (_bob, mut brx) = srv.connect("bob", "phone").await;
    let (_carol, mut crx) = srv.connect("carol", "phone").await;
    alice.typing(with_user("bob"), true).await.expect("typing");
    assert_eq!(
        next_typing(&mut brx).await.state,
        TypingState::Started as i32
    );
    alice
        .typing(with_user("carol"), true)
        .await
        .expect("typing");
    let t = next_typing(&mut brx).await;
    assert_eq!(
        (t.user.as_str(), t.state, t.expires_in_ms),
        ("alice", TypingState::Stopped as i32, 0)
    );
    assert_eq!(
        next_typing(&mut crx).await.state,
        TypingState::Started as i32
    );
    alice.close().await;
    let t = next_typing(&mut crx).await;
    assert_eq!(
        (t.user.as_str(), t.state),
        ("alice", TypingState::Stopped as i32)
    );
}
