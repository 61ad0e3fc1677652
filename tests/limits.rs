//! Limits on what one client may make the server do, each answered with a
//! typed error: connections per user, per node and per source address,
//! presence subscriptions, what a non-member learns of a group, and the
//! long-poll's place in presence.

mod common;

use std::time::Duration;

use common::*;
use swiftlet_client::{pb, DeliveryItem};
use swiftlet_protocol::{Body, Envelope, ErrorCode};

/// A Raw login of `user` on `device`; the first answer.
async fn raw_login(srv: &TestServer, user: &str, device: &str, rid: u64) -> (Raw, Envelope) {
    let mut raw = Raw::connect(srv.addr()).await;
    raw.send(Envelope::new(
        rid,
        Body::Hello(pb::Hello {
            protocol_version: 1,
            token: token(user),
            device_id: device.into(),
            skip_own_sends: false,
        }),
    ))
    .await;
    let first = raw.recv().await.expect("an answer to Hello");
    (raw, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_the_configured_connections() {
    let srv = TestServer::start_with(|c| c.max_conns_per_user = 2);
    let (a, _arx) = srv.connect("ivy", "phone").await;
    let (_b, _brx) = srv.connect("ivy", "laptop").await;
    let (mut raw, answer) = raw_login(&srv, "ivy", "tablet", 5).await;
    match answer.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooManyConnections as i32);
            assert!(e.fatal);
            // It answers the Hello.
            assert_eq!(answer.request_id, 5);
        }
        other => panic!("expected TOO_MANY_CONNECTIONS, got {other:?}"),
    }
    assert!(raw.recv().await.is_none(), "closed after the refusal");
    // Another user is not affected, and a freed place can be taken again.
    let (_other, _orx) = srv.connect("jay", "phone").await;
    a.close().await;
    let mut refused = 0;
    loop {
        let (_raw, answer) = raw_login(&srv, "ivy", "tablet", 1).await;
        match answer.body {
            Some(Body::Welcome(_)) => break,
            // The close of the first device may not have reached the
            // server yet.
            Some(Body::Error(e)) if e.code == ErrorCode::TooManyConnections as i32 => {
                refused += 1;
                assert!(refused < 200, "the freed place never came back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_subscriptions_are_rate_limited() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let many: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    // The bucket holds ten tokens and a subscription takes five: two in a
    // row pass, a third right after is refused.
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(alice.subscribe_presence(&many).await);
    }
    assert_eq!(results[0].as_ref().map(Vec::len).ok(), Some(1000));
    assert!(results[1].is_ok());
    assert_eq!(
        code_of(results.pop().expect("three")),
        ErrorCode::RateLimited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_errors_answer_the_hello_and_bad_devices_are_permanent() {
    let srv = TestServer::start();
    for (device, version, token_of, code) in [
        ("phone", 2, token("ann"), ErrorCode::UnsupportedVersion),
        ("no spaces", 1, token("ann"), ErrorCode::InvalidDevice),
        ("http", 1, token("ann"), ErrorCode::InvalidDevice),
        ("phone", 1, "not-a-token".to_string(), ErrorCode::AuthFailed),
    ] {
        let mut raw = Raw::connect(srv.addr()).await;
        raw.send(Envelope::new(
            9,
            Body::Hello(pb::Hello {
                protocol_version: version,
                token: token_of,
                device_id: device.into(),
                skip_own_sends: false,
            }),
        ))
        .await;
        let answer = raw.recv().await.expect("an answer");
        match answer.body {
            Some(Body::Error(e)) => {
                assert_eq!((e.code, e.fatal), (code as i32, true), "{device}");
                assert_eq!(answer.request_id, 9, "{code:?} answers the Hello");
            }
            other => panic!("expected {code:?}, got {other:?}"),
        }
        // The class says: do not reconnect unchanged.
        assert!(e_class_permanent(code), "{code:?}");
    }
}

fn e_class_permanent(code: ErrorCode) -> bool {
    (3000..4000).contains(&(code as i32))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_zero_is_a_protocol_violation() {
    let srv = TestServer::start();
    let mut raw = Raw::logged_in(srv.addr(), "kim").await;
    raw.send(Envelope::new(0, Body::Ping(pb::Ping { nonce: 1 })))
        .await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::ProtocolViolation);
}

/// A long-poll is routed pushes like a device, but it is not presence: a
/// user who only polls neither comes online nor gets a last-seen write per
/// poll, and a watcher sees no flapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_is_not_presence() {
    let srv = TestServer::start();
    let (watcher, mut wrx) = srv.connect("wendy", "phone").await;
    let list = watcher.subscribe_presence(&["paul"]).await.expect("sub");
    assert!(!list[0].online);
    let bearer = format!("Bearer {}", token("paul"));
    for _ in 0..2 {
        let (status, _) = http(
            srv.http_addr(),
            "GET",
            "/v1/sync?after=0&wait=1",
            &[("Authorization", bearer.as_str())],
            b"",
        )
        .await;
        assert_eq!(status, 200);
    }
    // No presence change reached the watcher, and paul has no last seen.
    watcher.ping().await.expect("ping");
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(200), wrx.next()).await {
        assert!(
            !matches!(item, DeliveryItem::Presence(_)),
            "a long-poll changed presence: {item:?}"
        );
    }
    let list = watcher.subscribe_presence(&["paul"]).await.expect("sub");
    assert_eq!((list[0].online, list[0].last_seen_ms), (false, 0));
    // A poll still wakes on a message, even with `after` at its largest.
    let (status, body) = http(
        srv.http_addr(),
        "GET",
        &format!("/v1/sync?after={}&wait=1", u64::MAX),
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// A connection past `max_connections` is refused at accept in its own
/// protocol (TCP: a fatal TOO_MANY_CONNECTIONS; HTTP: 503), the node keeps
/// accepting, and a place freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_refuses_connections_past_its_cap_and_keeps_accepting() {
    // One shard: connections are accepted in the order they were made.
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.max_connections = 3;
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::connect(srv.addr()).await);
    }
    // Refused before any Hello: a fatal Error with request_id 0, then the
    // close; on the HTTP port a 503 with Retry-After: 1.
    let mut refused = Raw::connect(srv.addr()).await;
    match refused.recv().await {
        Some(Envelope {
            request_id: 0,
            body: Some(Body::Error(e)),
        }) if e.fatal => assert_eq!(e.code, ErrorCode::TooManyConnections as i32),
        other => panic!("expected TOO_MANY_CONNECTIONS with request_id 0, got {other:?}"),
    }
    assert!(refused.recv().await.is_none(), "closed after the refusal");
    let (status, head) = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(srv.http_addr())
            .await
            .expect("connect");
        // The answer may come before the request is written.
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
            .await
            .expect("answered within patience");
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        (text.get(9..12).and_then(|c| c.parse::<u16>().ok()), text)
    };
    assert_eq!(status, Some(503), "{head}");
    for h in [
        "retry-after: 1\r\n",
        "content-type: text/plain\r\n",
        "connection: close\r\n",
        "cache-control: no-store\r\n",
        "x-content-type-options: nosniff\r\n",
    ] {
        assert!(head.contains(h), "{h:?} missing from {head}");
    }
    // The ones held are served.
    held[0].hello(1, &token("kim")).await;
    assert!(matches!(
        held[0].recv().await.and_then(|e| e.body),
        Some(Body::Welcome(_))
    ));
    // A freed place comes back (once the server has seen the close).
    drop(held.pop());
    let mut tries = 0;
    loop {
        let mut next = Raw::connect(srv.addr()).await;
        next.hello(1, &token("lee")).await;
        match next.recv().await.and_then(|e| e.body) {
            Some(Body::Welcome(_)) => break,
            Some(Body::Error(e)) if e.code == ErrorCode::TooManyConnections as i32 => {
                tries += 1;
                assert!(tries < 200, "the freed place never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A node held at its connection cap (a flood) refuses a scrape on the
/// HTTP port like any connection; the operator's port (`--ops-listen`) is
/// counted apart and answers `/metrics`, `/healthz` and the admin API,
/// and past its own small cap it answers `503` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_port_answers_while_the_client_ports_are_full() {
    const ADMIN: &str = "ops-test-admin-token-0123456789";
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.max_connections = 2;
        c.admin_token = Some(ADMIN.into());
        c.ops_listen = Some("127.0.0.1:0".parse().expect("addr"));
    });
    let ops = srv.server().ops_addr().expect("the operator port is on");
    let _held = [
        Raw::connect(srv.addr()).await,
        Raw::connect(srv.addr()).await,
    ];
    let (status, _) = http(srv.http_addr(), "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 503, "the HTTP port is past the cap");

    // Its own cap, first, while no request of the test holds a place (a
    // request's thread lets go of its place only after the client has its
    // answer): requests that never arrive hold every place (until their
    // read deadline), and the next connection is answered 503.
    let mut silent = Vec::new();
    for _ in 0..swiftlet::admin::ops::MAX_OPEN {
        silent.push(tokio::net::TcpStream::connect(ops).await.expect("connect"));
    }
    assert_eq!(http(ops, "GET", "/healthz", &[], b"").await.0, 503);
    drop(silent);
    // The places come back as their threads see the connections close.
    let mut tries = 0;
    while http(ops, "GET", "/healthz", &[], b"").await.0 != 200 {
        tries += 1;
        assert!(tries < 200, "the operator port never answered again");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    let (status, body) = http(ops, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("swiftlet_connections"), "{text}");
    assert_eq!(
        http(ops, "GET", "/healthz", &[], b"").await,
        (200, b"ok\n".to_vec())
    );
    assert_eq!(http(ops, "POST", "/metrics", &[], b"").await.0, 405);
    assert_eq!(http(ops, "GET", "/ws", &[], b"").await.0, 404);
    // The admin API, behind the same token as on the HTTP port.
    assert_eq!(http(ops, "GET", "/admin/v1/stats", &[], b"").await.0, 401);
    let bearer = format!("Bearer {ADMIN}");
    let (status, body) = http(
        ops,
        "GET",
        "/admin/v1/stats",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stats: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(stats["uptime_s"].is_u64(), "{stats}");
}

/// With `max_conns_per_ip`, one source address is capped and another is
/// not affected.
/// A raw connection to `addr` from the local address `ip` (any of
/// 127.0.0.0/8 is this machine).
async fn raw_from(addr: std::net::SocketAddr, ip: &str) -> Raw {
    let ip: std::net::IpAddr = ip.parse().expect("ip");
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(std::net::SocketAddr::new(ip, 0)).expect("bind");
    let stream = s.connect(addr).await.expect("connect");
    Raw {
        framed: tokio_util::codec::Framed::new(stream, swiftlet_protocol::FrameCodec::default()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share() {
    let srv = TestServer::start_with(|c| {
        c.shards = 1;
        c.max_conns_per_ip = 2;
    });
    let _a = raw_from(srv.addr(), "127.0.0.1").await;
    let _b = raw_from(srv.addr(), "127.0.0.1").await;
    let mut third = raw_from(srv.addr(), "127.0.0.1").await;
    assert_eq!(third.expect_fatal().await, ErrorCode::TooManyConnections);
    let mut other = raw_from(srv.addr(), "127.0.0.2").await;
    other.hello(1, &token("max")).await;
    assert!(matches!(
        other.recv().await.and_then(|e| e.body),
        Some(Body::Welcome(_))
    ));
}

/// Past a cap, a shard refuses at most its share of
/// `--max-refusals-per-sec` per 100 ms tick, then accepts nothing until the
/// next: a client refused and reconnecting at once, forever, cannot keep
/// the node busy refusing it. The manual clock decides the ticks; the
/// connections past the budget wait in the listen backlog, and each tick
/// answers one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_past_the_cap_are_answered_at_the_configured_rate() {
    use tokio::io::AsyncReadExt;
    let clock = swiftlet::clock::ManualClock::new(1_800_000_000_000);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.shards = 1;
        c.max_connections = 1;
        // One refusal per tick for the one shard.
        c.max_refusals_per_sec = 10;
    });
    let mut held = Raw::connect(srv.addr()).await;
    held.hello(1, &token("kim")).await;
    assert!(matches!(
        held.recv().await.and_then(|e| e.body),
        Some(Body::Welcome(_))
    ));
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(Raw::connect(srv.addr()).await);
    }
    for tick in 0..3 {
        // One of them is answered this tick, whichever the kernel queued
        // first; the others hear nothing until the clock moves.
        let mut answered = None;
        while answered.is_none() {
            for (i, raw) in waiting.iter_mut().enumerate() {
                let mut byte = [0u8; 1];
                let s = raw.framed.get_mut();
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_millis(50), s.peek(&mut byte)).await
                {
                    assert!(matches!(r, Ok(n) if n > 0), "closed without an answer");
                    answered = Some(i);
                    break;
                }
            }
        }
        let mut refused = waiting.remove(answered.unwrap_or_default());
        assert_eq!(refused.expect_fatal().await, ErrorCode::TooManyConnections);
        for raw in &mut waiting {
            let mut byte = [0u8; 1];
            let quiet = tokio::time::timeout(
                Duration::from_millis(300),
                raw.framed.get_mut().read(&mut byte),
            )
            .await;
            assert!(quiet.is_err(), "tick {tick}: a second refusal in one tick");
        }
        clock.advance(Duration::from_millis(100));
    }
    // The one held is served throughout.
    held.send(Envelope::new(2, Body::Ping(pb::Ping { nonce: 7 })))
        .await;
    assert!(matches!(
        held.recv().await.and_then(|e| e.body),
        Some(Body::Pong(_))
    ));
}

/// A connection that sends frames faster than `--max-frames-per-sec` is
/// read no faster: its bucket holds one second's frames and earns them
/// back continuously (one per 1/rate s, not a tenth at each 100 ms tick),
/// and what waits is handled later, none of it lost. Under a manual clock
/// this is exact: each Send's Ack carries the time it was handled, and the
/// test moves the clock one token's time (50 ms, half a tick) only once
/// every frame the bucket allowed so far is answered, so a frame handled
/// early would show an earlier time, and one refilled only per tick a
/// later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_the_rate_wait_for_the_bucket_and_none_is_lost() {
    const T0: u64 = 1_800_000_000_000;
    const RATE: u32 = 20; // a bucket of 20, one back per 50 ms
    const SENDS: u64 = 40;
    let clock = swiftlet::clock::ManualClock::new(T0);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.max_frames_per_sec = RATE;
    });
    let (mut flood, welcome) = raw_login(&srv, "mallory", "phone", 1).await;
    assert!(matches!(welcome.body, Some(Body::Welcome(_))));
    // All at once, in one write: the Hello took one token, 19 are left.
    let mut bytes = Vec::new();
    for i in 0..SENDS {
        let send = Envelope::new(
            2 + i,
            Body::Send(pb::Send {
                client_msg_id: format!("m{i}"),
                to_user: "bob".into(),
                content_type: "text/plain".into(),
                body: format!("{i}").into_bytes().into(),
                group_id: 0,
            }),
        );
        swiftlet_protocol::codec::encode_frame(&send, &mut bytes);
    }
    flood.send_bytes(&bytes).await;

    // Send i is handled at the first step k (of 50 ms) with 19 + k > i.
    let step_of = |i: u64| if i < 19 { 0 } else { i - 18 };
    let mut handled_at = Vec::new();
    let mut step = 0;
    while (handled_at.len() as u64) < SENDS {
        let allowed = (19 + step).min(SENDS);
        while (handled_at.len() as u64) < allowed {
            match flood
                .recv()
                .await
                .and_then(|e| e.body.map(|b| (e.request_id, b)))
            {
                Some((rid, Body::Ack(ack))) => {
                    assert_eq!(
                        ack.client_msg_id,
                        format!("m{}", rid - 2),
                        "answers in order"
                    );
                    handled_at.push((rid - 2, ack.timestamp_ms));
                }
                // The echo of its own message to the sending device.
                Some((_, Body::Deliver(_))) => {}
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
        step += 1;
        clock.advance(Duration::from_millis(50));
    }
    for (i, at) in handled_at {
        assert_eq!(
            at,
            T0 + 50 * step_of(i),
            "send {i} handled at the wrong time"
        );
    }
    // Everything reached bob, once, in order.
    let (_bob, mut brx) = srv.connect("bob", "phone").await;
    for i in 0..SENDS {
        assert_eq!(
            next_message(&mut brx).await.1.body,
            format!("{i}").into_bytes()
        );
    }
    let throttled = metric(srv.http_addr(), "swiftlet_throttled_total").await;
    assert!(
        throttled >= 21.0,
        "held back at each of the 21 steps: {throttled}"
    );
}

/// A group post takes a frame token per member of the group (it writes an
/// inbox row for each): with a bucket of 20 and a group of 10, the poster
/// gets a post through per 10 tokens earned, however many it pipelines,
/// and every post is stored once and in order. Under the manual clock each
/// post's Ack carries the time it was handled (see the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_post_takes_a_token_per_member() {
    const T0: u64 = 1_800_000_000_000;
    const POSTS: u64 = 4;
    let clock = swiftlet::clock::ManualClock::new(T0);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.max_frames_per_sec = 20; // one back per 50 ms
    });
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let others: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let mut names: Vec<&str> = others.iter().map(String::as_str).collect();
    names.push("mallory");
    let group = alice.create_group("ten", &names).await.expect("create");
    assert_eq!(group.member_count, 10);
    let (mut poster, welcome) = raw_login(&srv, "mallory", "phone", 1).await;
    assert!(matches!(welcome.body, Some(Body::Welcome(_))));
    let mut bytes = Vec::new();
    for i in 0..POSTS {
        let post = Envelope::new(
            2 + i,
            Body::Send(pb::Send {
                client_msg_id: format!("p{i}"),
                to_user: String::new(),
                content_type: "text/plain".into(),
                body: format!("{i}").into_bytes().into(),
                group_id: group.group_id,
            }),
        );
        swiftlet_protocol::codec::encode_frame(&post, &mut bytes);
    }
    poster.send_bytes(&bytes).await;
    // The Hello took 1 of 20 tokens: post 0 goes at once (19 -> 9), post 1
    // once a token is back (step 1 of 50 ms), posts 2 and 3 ten tokens
    // (ten steps) apart.
    let step_of = |i: u64| [0, 1, 11, 21][i as usize];
    let mut handled_at = Vec::new();
    let mut step = 0;
    while (handled_at.len() as u64) < POSTS {
        let allowed = (0..POSTS).filter(|&i| step_of(i) <= step).count();
        while handled_at.len() < allowed {
            match poster
                .recv()
                .await
                .and_then(|e| e.body.map(|b| (e.request_id, b)))
            {
                Some((rid, Body::Ack(ack))) => {
                    assert_eq!(ack.client_msg_id, format!("p{}", rid - 2), "in order");
                    handled_at.push((rid - 2, ack.timestamp_ms));
                }
                // Her own posts and the group's creation, pushed.
                Some((_, Body::Deliver(_))) => {}
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
        step += 1;
        clock.advance(Duration::from_millis(50));
    }
    for (i, at) in handled_at {
        assert_eq!(
            at,
            T0 + 50 * step_of(i),
            "post {i} handled at the wrong time"
        );
    }
    let (_m0, mut m0_rx) = srv.connect("m0", "phone").await;
    next_group_event(&mut m0_rx).await;
    for i in 0..POSTS {
        assert_eq!(
            next_message(&mut m0_rx).await.1.body,
            format!("{i}").into_bytes()
        );
    }
}

/// A page takes a frame token per ten rows it may read: with a bucket of
/// 20, a `Sync` for 100 events takes 10, so of `Sync, Send a, Sync, Send
/// b` written at once, `a` is handled at once and `b` only once the second
/// Sync's tokens are earned (a Sync's answer carries no time; the Acks
/// do, under the manual clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_takes_a_token_per_ten_rows() {
    const T0: u64 = 1_800_000_000_000;
    let clock = swiftlet::clock::ManualClock::new(T0);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.max_frames_per_sec = 20; // one back per 50 ms
    });
    let (mut reader, welcome) = raw_login(&srv, "mallory", "phone", 1).await;
    assert!(matches!(welcome.body, Some(Body::Welcome(_))));
    let sync = |rid| {
        Envelope::new(
            rid,
            Body::Sync(pb::Sync {
                after: 0,
                limit: 100,
            }),
        )
    };
    let send = |rid, id: &str| {
        Envelope::new(
            rid,
            Body::Send(pb::Send {
                client_msg_id: id.into(),
                to_user: "bob".into(),
                content_type: "text/plain".into(),
                body: b"x".to_vec().into(),
                group_id: 0,
            }),
        )
    };
    let mut bytes = Vec::new();
    for env in [sync(2), send(3, "a"), sync(4), send(5, "b")] {
        swiftlet_protocol::codec::encode_frame(&env, &mut bytes);
    }
    reader.send_bytes(&bytes).await;
    // The Hello took 1 of 20: the first Sync 10 (9 left), `a` 1 (8 left);
    // the second Sync waits for 10 (two steps of 50 ms), `b` for one more.
    let expected = [("a", 0), ("b", 3)];
    let mut step = 0;
    let mut acks = Vec::new();
    let mut pages = 0;
    while acks.len() < 2 {
        while acks.len() < expected.iter().filter(|(_, s)| *s <= step).count() {
            match reader.recv().await.and_then(|e| e.body) {
                Some(Body::Ack(ack)) => acks.push((ack.client_msg_id, ack.timestamp_ms)),
                Some(Body::SyncBatch(_)) => pages += 1,
                Some(Body::Deliver(_)) => {}
                other => panic!("expected an Ack or a page, got {other:?}"),
            }
        }
        step += 1;
        clock.advance(Duration::from_millis(50));
    }
    for ((id, at), (want, step)) in acks.iter().zip(expected) {
        assert_eq!(id, want);
        assert_eq!(*at, T0 + 50 * step, "{id} handled at the wrong time");
    }
    while pages < 2 {
        if let Some(Body::SyncBatch(_)) = reader.recv().await.and_then(|e| e.body) {
            pages += 1;
        }
    }
}

/// A wave of connections waiting together, and a wave timing out
/// together, is taken in slices of a turn's share (the connections already
/// logged in are served between them), and none of it is forgotten: the
/// listener is edge-triggered, so a shard that stopped accepting after its
/// share and waited for the next event would leave the rest in the
/// backlog; one that stopped closing after its share and dropped the other
/// due timers would leave them open for good. The wave is made to wait
/// deterministically: a refusal spends the tick's one refusal, after which
/// the shard accepts nothing until the manual clock moves a tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_of_connections_is_taken_in_slices_and_none_is_forgotten() {
    const WAVE: usize = 300;
    let clock = swiftlet::clock::ManualClock::new(1_800_000_000_000);
    let srv = TestServer::start_with(|c| {
        c.clock = clock.clock();
        c.shards = 1;
        c.max_conns_per_ip = WAVE;
        c.max_refusals_per_sec = 10;
    });
    let mut silent = Vec::new();
    for _ in 0..WAVE {
        silent.push(raw_from(srv.addr(), "127.0.0.1").await);
    }
    // Refused, so every silent one was accepted before it (one shard
    // accepts in order), and this tick's refusal is spent.
    let mut refused = raw_from(srv.addr(), "127.0.0.1").await;
    assert_eq!(refused.expect_fatal().await, ErrorCode::TooManyConnections);
    let mut wave = Vec::new();
    for _ in 0..WAVE {
        wave.push(raw_from(srv.addr(), "127.0.0.2").await);
    }
    // The next tick finds the whole wave in the backlog; no connection
    // arrives after it to wake the listener again.
    clock.advance(Duration::from_millis(100));
    for (i, raw) in wave.iter_mut().enumerate() {
        raw.hello(1, &token(&format!("u{i}"))).await;
        assert!(
            matches!(
                raw.recv().await.and_then(|e| e.body),
                Some(Body::Welcome(_))
            ),
            "connection {i} of the wave was not served"
        );
    }
    // Every silent one is due in the same tick; each is told.
    clock.advance(Duration::from_millis(10_500));
    for raw in &mut silent {
        assert_eq!(raw.expect_fatal().await, ErrorCode::HandshakeTimeout);
    }
}

/// Section 20, "The operator's port": a head over 8 KiB and a body over
/// 64 KiB are `413`, a malformed request `400` `INVALID_REQUEST`, each
/// answered and closed like any request there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_port_refuses_oversized_and_malformed_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start_with(|c| c.ops_listen = Some("127.0.0.1:0".parse().expect("addr")));
    let ops = srv.server().ops_addr().expect("the operator port is on");
    let answer = |request: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(ops).await.expect("connect");
        s.write_all(&request).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
            .await
            .expect("answered within patience")
            .expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    };
    let long = format!(
        "GET /healthz HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "x".repeat(8 * 1024)
    );
    let (status, body) = answer(long.into_bytes()).await;
    assert_eq!(status, 413, "{body}");
    let big = b"POST /admin/v1/compact HTTP/1.1\r\nContent-Length: 65537\r\n\r\n".to_vec();
    let (status, body) = answer(big).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = answer(b"\x01\x02 nonsense\r\n\r\n".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(error["code"], ErrorCode::InvalidRequest as i32);
    assert_eq!(http(ops, "GET", "/healthz", &[], b"").await.0, 200);
}
