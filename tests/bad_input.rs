//! Bad input gets a typed Error frame (where the protocol allows one), then a
//! close; the server keeps serving everyone else and nothing panics.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use swiftlet_client::pb;
use swiftlet_protocol::{Body, Envelope, ErrorCode};

/// After the abuse, an ordinary pair of clients still chats.
async fn still_serving(srv: &TestServer) {
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let (_bob, mut brx) = srv.connect("bob", "phone").await;
    alice
        .send("bob", "text/plain", "still here?")
        .await
        .expect("ack");
    assert_eq!(&next_message(&mut brx).await.1.body[..], b"still here?");
}

/// What the server must answer a fresh connection whose first bytes are
/// `junk`: the first frame decides, exactly.
fn expected_refusal(junk: &[u8], max: usize) -> ErrorCode {
    use swiftlet_protocol::codec::{decode_frame, FrameError};
    match decode_frame(junk, max) {
        Err(FrameError::TooLarge { .. }) => ErrorCode::FrameTooLarge,
        Err(_) => ErrorCode::MalformedFrame,
        // A plausible length whose body never comes.
        Ok(None) => ErrorCode::HandshakeTimeout,
        Ok(Some((env, _))) => match env.body {
            _ if env.request_id == 0 => ErrorCode::ProtocolViolation,
            Some(Body::Hello(h)) if h.protocol_version != 1 => ErrorCode::UnsupportedVersion,
            Some(Body::Hello(_)) => ErrorCode::InvalidDevice,
            _ => ErrorCode::ProtocolViolation,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_refused_with_a_typed_error() {
    // One shard, so every junk connection shares its event loop with
    // alice, who reads between them: nothing of the junk may run as hers.
    let srv = TestServer::start_with(|c| {
        c.handshake_timeout_ms = 300;
        c.shards = 1;
    });
    let (alice, mut arx) = srv.connect("alice", "phone").await;
    for seed in 0..20u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // At least one byte with the top bit clear ends the length varint.
        let mut junk: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        junk[3] &= 0x7f;
        let mut raw = Raw::connect(srv.addr()).await;
        raw.send_bytes(&junk).await;
        let code = raw.expect_fatal().await;
        assert_eq!(
            code,
            expected_refusal(&junk, srv.config.max_frame),
            "seed {seed}"
        );
        alice.ping().await.expect("alice still served");
    }
    assert_no_more(&alice, &mut arx).await;
    assert_eq!(
        srv.server().store().count_messages().expect("count"),
        0,
        "junk was stored as someone's message"
    );
    still_serving(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_prefix_is_refused_before_the_body() {
    let srv = TestServer::start();
    let mut raw = Raw::connect(srv.addr()).await;
    // 16 MiB announced, no body sent: the refusal cannot wait for it.
    let mut prefix = Vec::new();
    prost::encoding::encode_varint(16 << 20, &mut prefix);
    raw.send_bytes(&prefix).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::FrameTooLarge);
    // The limit is the configured one: one byte over after a login.
    let mut raw = Raw::logged_in(srv.addr(), "carol").await;
    let mut over = Vec::new();
    prost::encoding::encode_varint(srv.config.max_frame as u64 + 1, &mut over);
    raw.send_bytes(&over).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::FrameTooLarge);
    still_serving(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_then_silence_times_out_with_a_typed_error() {
    let srv = TestServer::start_with(|c| c.handshake_timeout_ms = 300);
    let mut raw = Raw::connect(srv.addr()).await;
    // Announces 100 bytes, sends 10.
    let mut bytes = vec![100u8];
    bytes.extend_from_slice(&[0x08; 10]);
    raw.send_bytes(&bytes).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::HandshakeTimeout);
    still_serving(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_length_with_a_garbage_envelope_is_malformed() {
    let srv = TestServer::start();
    let mut raw = Raw::connect(srv.addr()).await;
    // Length 3, then a field with wire type 7 (invalid).
    raw.send_bytes(&[3, 0x0f, 0xff, 0xff]).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::MalformedFrame);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_before_hello_is_a_protocol_violation() {
    let srv = TestServer::start();
    let mut raw = Raw::connect(srv.addr()).await;
    raw.send(Envelope::new(1, Body::Ping(pb::Ping { nonce: 7 })))
        .await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::ProtocolViolation);
    // And a second Hello after login.
    let mut raw = Raw::logged_in(srv.addr(), "dave").await;
    raw.hello(1, &token("dave")).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::ProtocolViolation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_and_bad_tokens_are_refused() {
    let srv = TestServer::start();
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(2, &token("alice")).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::UnsupportedVersion);

    let expired = {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let claims = swiftlet_protocol::token::Claims {
            sub: "alice".into(),
            exp: 1_000_000,
            iat: 0,
        };
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode")
    };
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &expired).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::TokenExpired);

    let forged = swiftlet_protocol::token::mint(b"not-the-secret", "alice", 3600);
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &forged).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::AuthFailed);

    // Without --dev-auth a bare user id is not a token.
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, "alice").await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::AuthFailed);
    still_serving(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_logged_in_connection_is_closed_at_the_idle_timeout() {
    let srv = TestServer::start_with(|c| c.idle_timeout_ms = 300);
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &token("erin")).await;
    match raw.recv().await.and_then(|e| e.body) {
        Some(Body::Welcome(w)) => assert_eq!(w.idle_timeout_ms, 300),
        other => panic!("expected Welcome, got {other:?}"),
    }
    assert_eq!(raw.expect_fatal().await, ErrorCode::IdleTimeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_tells_clients_why() {
    let srv = TestServer::start();
    let mut raw = Raw::logged_in(srv.addr(), "frank").await;
    let mut srv = srv;
    let server = srv.server.take();
    let stopper = std::thread::spawn(move || server.map(|s| s.shutdown()));
    assert_eq!(raw.expect_fatal().await, ErrorCode::ShuttingDown);
    stopper.join().expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_auth_accepts_a_bare_user_id() {
    let srv = TestServer::start_with(|c| c.dev_auth = true);
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, "gina").await;
    match raw.recv().await.and_then(|e| e.body) {
        Some(Body::Welcome(w)) => assert_eq!(w.user_id, "gina"),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// Section 4, "Tokens", claim by claim: only HS256 with the server's
/// secret, `sub` and `exp` required, `exp` and `iat` non-negative integers,
/// no `aud`, a valid user id in `sub`; other claims (`iss`, `nbf`) ignored;
/// `TOKEN_EXPIRED` only for a good signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_claims_are_checked_as_section_4_says() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;
    let srv = TestServer::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let exp = now + 3600;
    let jwt = |alg: Algorithm, secret: &[u8], claims: serde_json::Value| {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    };
    let ours = |claims| jwt(Algorithm::HS256, SECRET.as_bytes(), claims);
    let cases = [
        (
            "HS384",
            jwt(
                Algorithm::HS384,
                SECRET.as_bytes(),
                json!({"sub": "alice", "exp": exp}),
            ),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "no exp",
            ours(json!({"sub": "alice"})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "no sub",
            ours(json!({"exp": exp})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "negative exp",
            ours(json!({"sub": "alice", "exp": -1})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "fractional exp",
            ours(json!({"sub": "alice", "exp": exp as f64 + 0.5})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "negative iat",
            ours(json!({"sub": "alice", "exp": exp, "iat": -5})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "string iat",
            ours(json!({"sub": "alice", "exp": exp, "iat": "5"})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "aud",
            ours(json!({"sub": "alice", "exp": exp, "aud": "swiftlet"})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "invalid sub",
            ours(json!({"sub": "al ice", "exp": exp})),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "forged and expired",
            jwt(
                Algorithm::HS256,
                b"not-the-secret",
                json!({"sub": "alice", "exp": 1}),
            ),
            Some(ErrorCode::AuthFailed),
        ),
        (
            "expired",
            ours(json!({"sub": "alice", "exp": now - 60})),
            Some(ErrorCode::TokenExpired),
        ),
        (
            "iss and a future nbf are ignored",
            ours(json!({"sub": "alice", "exp": exp, "iss": "x", "nbf": exp})),
            None,
        ),
        ("no iat", ours(json!({"sub": "alice", "exp": exp})), None),
    ];
    for (what, token, refusal) in cases {
        let mut raw = Raw::connect(srv.addr()).await;
        raw.hello(1, &token).await;
        match refusal {
            Some(code) => assert_eq!(raw.expect_fatal().await, code, "{what}"),
            None => match raw.recv().await.and_then(|e| e.body) {
                Some(Body::Welcome(w)) => assert_eq!(w.user_id, "alice", "{what}"),
                other => panic!("{what}: expected Welcome, got {other:?}"),
            },
        }
    }
}

/// Section 2.1: no frame from the server is larger than `max_frame_bytes`,
/// not even the Error refusing a token whose claim the server's JSON
/// reader quotes back (with each invisible character escaped to eight
/// bytes: a 48 KB claim would make a 128 KB message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_refusing_a_huge_token_fits_in_a_frame() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let srv = TestServer::start();
    let claims = serde_json::json!({
        "sub": "alice",
        "exp": 4_000_000_000u64,
        "iat": "\u{200b}".repeat(16_000),
    });
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    assert!(token.len() < 65_000, "the Hello must fit: {}", token.len());
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &token).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::AuthFailed);
}

/// Section 3: after login, a body this server does not know (a newer
/// client's field 39, raw bytes), no body, and a server-only body are each
/// a non-fatal `INVALID_REQUEST` carrying the frame's request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_empty_and_server_only_bodies_are_invalid_requests() {
    let srv = TestServer::start();
    let mut raw = Raw::logged_in(srv.addr(), "uma").await;
    // Envelope{request_id: 5, field 39: empty message}.
    raw.send_bytes(&[5, 0x08, 5, 0xba, 0x02, 0x00]).await;
    raw.send(Envelope {
        request_id: 6,
        body: None,
    })
    .await;
    raw.send(Envelope::new(7, Body::Pong(pb::Pong { nonce: 1 })))
        .await;
    raw.send(Envelope::new(8, Body::Ping(pb::Ping { nonce: 2 })))
        .await;
    for rid in 5..=7 {
        raw.expect_request_error(rid, ErrorCode::InvalidRequest)
            .await;
    }
    assert!(matches!(
        raw.recv().await.and_then(|e| e.body),
        Some(Body::Pong(pb::Pong { nonce: 2 }))
    ));
}
