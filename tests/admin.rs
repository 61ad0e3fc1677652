//! The operator's API (`/admin/v1/...`, `swiftlet admin`) against a real
//! server: refused without the token, disconnect, token revocation, and
//! an online backup taken under traffic that restores every message
//! acknowledged before it began.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use swiftlet_client::{pb, Client, ClientConfig, CloseReason, Deliveries};
use swiftlet_protocol::ErrorCode;

const ADMIN: &str = "admin-token-for-the-tests-0123";

fn with_admin() -> TestServer {
    TestServer::start_with(|c| c.admin_token = Some(ADMIN.into()))
}

async fn admin(
    server: &TestServer,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {ADMIN}");
    let (status, body) = http(
        server.http_addr(),
        method,
        path,
        &[("Authorization", &auth)],
        body,
    )
    .await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A token for `user` with the given `iat` (seconds).
fn token_issued_at(user: &str, iat: u64) -> String {
    let claims = swiftlet_protocol::token::Claims {
        sub: user.into(),
        exp: iat + 3600 * 24,
        iat,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn login(
    server: &TestServer,
    token: String,
    device: &str,
) -> Result<(Client, Deliveries), swiftlet_client::ClientError> {
    Client::connect(ClientConfig::new(server.addr().to_string(), token, device)).await
}

/// Wait for the server to close `client`; the code of its fatal Error.
async fn closed_with(client: &Client, d: &mut Deliveries) -> i32 {
    let ended = tokio::time::timeout(PATIENCE, async { while d.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the connection was not closed");
    match client.closed() {
        Some(CloseReason::Server { code, .. }) => code,
        other => panic!("closed without a server error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_refused_without_the_right_token() {
    let off = TestServer::start();
    let (status, body) = http(
        off.http_addr(),
        "GET",
        "/admin/v1/stats",
        &[("Authorization", &format!("Bearer {ADMIN}"))],
        b"",
    )
    .await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    let server = with_admin();
    let (status, _) = http(server.http_addr(), "GET", "/admin/v1/stats", &[], b"").await;
    assert_eq!(status, 401);
    let (status, body) = http(
        server.http_addr(),
        "POST",
        "/admin/v1/compact",
        &[("Authorization", "Bearer admin-token-for-the-tests-0124")],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    let error: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(error["error"], "AUTH_FAILED");
    // A user's login token is not an admin token.
    let (status, _) = http(
        server.http_addr(),
        "GET",
        "/admin/v1/stats",
        &[("Authorization", &format!("Bearer {}", token("alice")))],
        b"",
    )
    .await;
    assert_eq!(status, 401);

    let (_alice, _d) = server.connect("alice", "phone").await;
    let (status, stats) = admin(&server, "GET", "/admin/v1/stats", b"").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["connections"]["tcp"], 1);
    assert_eq!(stats["online_users"], 1);
    assert_eq!(admin(&server, "GET", "/admin/v1/nothing", b"").await.0, 404);
    assert_eq!(
        admin(&server, "DELETE", "/admin/v1/stats", b"").await.0,
        405
    );
    assert_eq!(
        admin(&server, "GET", "/admin/v1/users/not%20an%20id", b"")
            .await
            .0,
        400
    );
    let (status, _) = admin(&server, "POST", "/admin/v1/compact", b"").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_one_device_or_all_of_a_user() {
    let server = with_admin();
    let (phone, mut phone_d) = server.connect("alice", "phone").await;
    let (laptop, mut laptop_d) = server.connect("alice", "laptop").await;
    let (bob, _bob_d) = server.connect("bob", "b1").await;
    bob.send("alice", "text/plain", b"hi".to_vec())
        .await
        .expect("ack");
    next_message(&mut phone_d).await;
    next_message(&mut laptop_d).await;
    phone.ack_delivery(1).await.expect("ack delivery");
    // The Pong comes after the shard handled the DeliveryAck before it.
    phone.ping().await.expect("ping");

    let (status, user) = admin(&server, "GET", "/admin/v1/users/alice", b"").await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["online"], true);
    assert_eq!(user["inbox"]["head"], 1);
    assert_eq!(user["inbox"]["size"], 1);
    assert_eq!(user["inbox"]["first_available"], 1);
    let devices: BTreeSet<String> = user["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["device"].as_str().expect("device").to_owned())
        .collect();
    assert_eq!(
        devices,
        BTreeSet::from(["laptop".to_owned(), "phone".to_owned()])
    );
    let phone_cursor = user["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["device"] == "phone")
        .map(|d| d["cursor"].clone());
    assert_eq!(phone_cursor, Some(serde_json::json!(1)), "{user}");

    let (status, answer) = admin(
        &server,
        "POST",
        "/admin/v1/users/alice/disconnect?device=phone",
        b"",
    )
    .await;
    assert_eq!((status, &answer["closed"]), (200, &serde_json::json!(1)));
    assert_eq!(
        closed_with(&phone, &mut phone_d).await,
        ErrorCode::Disconnected as i32
    );
    laptop.ping().await.expect("the other device stays");

    let (status, answer) = admin(&server, "POST", "/admin/v1/users/alice/disconnect", b"").await;
    assert_eq!((status, &answer["closed"]), (200, &serde_json::json!(1)));
    assert_eq!(
        closed_with(&laptop, &mut laptop_d).await,
        ErrorCode::Disconnected as i32
    );
    bob.ping().await.expect("other users stay");
    // Disconnecting is not a ban: the device logs in again.
    let (again, _d) = server.connect("alice", "phone").await;
    again.ping().await.expect("logged in again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_their_sessions_closed_across_restarts() {
    let mut server = with_admin();
    let now = now_secs();
    let old = token_issued_at("alice", now - 100);
    let fresh = token_issued_at("alice", now - 10);
    let (old_client, mut old_d) = login(&server, old.clone(), "old").await.expect("login");
    let (fresh_client, _fresh_d) = login(&server, fresh.clone(), "fresh").await.expect("login");
    let (bob, _bob_d) = login(&server, token_issued_at("bob", now - 100), "b")
        .await
        .expect("login");

    let before = now - 50;
    let (status, answer) = admin(
        &server,
        "POST",
        &format!("/admin/v1/users/alice/revoke?before={before}"),
        b"",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["closed"], 1);
    assert_eq!(
        closed_with(&old_client, &mut old_d).await,
        ErrorCode::TokenRevoked as i32
    );
    fresh_client
        .ping()
        .await
        .expect("a newer token's session stays");
    bob.ping().await.expect("other users stay");

    let refused = login(&server, old.clone(), "old").await.map(|_| ());
    assert_eq!(code_of(refused), ErrorCode::TokenRevoked);
    // Over HTTP too.
    let (status, body) = http(
        server.http_addr(),
        "GET",
        "/v1/sync",
        &[("Authorization", &format!("Bearer {old}"))],
        b"",
    )
    .await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));

    // Durable: a restart still refuses it, and still takes the newer one.
    drop((fresh_client, bob));
    server.restart();
    let refused = login(&server, old, "old").await.map(|_| ());
    assert_eq!(code_of(refused), ErrorCode::TokenRevoked);
    let (c, _d) = login(&server, fresh, "fresh")
        .await
        .expect("the newer token logs in");
    c.ping().await.expect("ping");
    let (_, user) = admin(&server, "GET", "/admin/v1/users/alice", b"").await;
    assert_eq!(user["tokens_revoked_before"], before);
}

/// Messages bob acked while the backup ran are in it or not; every one
/// acknowledged before the backup began must be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_traffic_restores_everything_acknowledged_before_it() {
    // Retention off, here and in the copies: on a loaded machine alice
    // sends over 10,000 messages while the backup runs, and the default
    // --inbox-keep would then trim the oldest of bob's inbox, the very
    // ones this test looks for.
    let server = TestServer::start_with(|c| {
        c.admin_token = Some(ADMIN.into());
        c.inbox_keep = 0;
    });
    // Alice's own inbox gets her sends too: dropping the deliveries
    // discards them, so her Acks never wait behind them.
    let (alice, alice_d) = server.connect("alice", "a").await;
    drop(alice_d);
    let acked: Arc<parking_lot::Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let ack = alice
                    .send("bob", "text/plain", format!("m{n}").into_bytes())
                    .await
                    .expect("ack");
                acked.lock().push(ack.server_msg_id);
            }
            n
        })
    };
    // Traffic before, during and after the backup.
    while acked.lock().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before: Vec<u64> = acked.lock().clone();
    let backup = tempfile::tempdir().expect("tempdir");
    let dir = backup.path().join("b1");
    let body = serde_json::json!({ "dir": dir }).to_string();
    let (status, answer) = admin(&server, "POST", "/admin/v1/backup", body.as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    // The same place twice is refused.
    assert_eq!(
        admin(&server, "POST", "/admin/v1/backup", body.as_bytes())
            .await
            .0,
        400
    );
    while acked.lock().len() < before.len() + 50 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.expect("sender");
    assert!(sent as usize > before.len());

    // `swiftlet admin restore` into a fresh data directory, then a server on it.
    let restored = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swiftlet"))
        .args(["admin", "restore", "--from"])
        .arg(&dir)
        .arg("--data-dir")
        .arg(restored.path())
        .output()
        .expect("run swiftlet admin restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for data_dir in [dir.clone(), restored.path().to_owned()] {
        let mut config = test_config(&backup);
        config.data_dir = data_dir;
        config.inbox_keep = 0;
        let copy = swiftlet::start(config).expect("a server starts on the backup");
        let (bob, bob_d) = Client::connect(ClientConfig::new(
            copy.local_addr().to_string(),
            token("bob"),
            "b",
        ))
        .await
        .expect("login");
        // His backlog is pushed at login: discard it, so the Sync answers
        // never wait behind it (Sync reads the store itself).
        drop(bob_d);
        let mut have = BTreeSet::new();
        let mut after = 0;
        loop {
            let page: pb::SyncBatch = bob.sync(after, 500).await.expect("sync");
            for e in &page.events {
                if let Some(pb::event::Kind::Message(m)) = &e.kind {
                    have.insert(m.id);
                }
                after = after.max(e.seq);
            }
            if !page.has_more {
                break;
            }
        }
        let missing: Vec<&u64> = before.iter().filter(|id| !have.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{} acknowledged before the backup are missing",
            missing.len()
        );
        bob.close().await;
        tokio::task::block_in_place(|| copy.shutdown());
    }
}

/// Section 20: disconnecting a user answers their parked long-poll with
/// `DISCONNECTED`, status 503 (a client retries on it, as section 10 says
/// for the code), and counts it among the closed; with `?device=` only
/// that device's sessions go, never a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_answers_a_parked_long_poll() {
    let server = with_admin();
    let addr = server.http_addr();
    let auth = format!("Bearer {}", token("lou"));
    let poll = tokio::spawn(async move {
        http(
            addr,
            "GET",
            "/v1/sync?after=0&wait=30",
            &[("Authorization", &auth)],
            b"",
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.server().online_users() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never parked");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, answer) = admin(
        &server,
        "POST",
        "/admin/v1/users/lou/disconnect?device=phone",
        b"",
    )
    .await;
    assert_eq!((status, &answer["closed"]), (200, &serde_json::json!(0)));
    let (status, answer) = admin(&server, "POST", "/admin/v1/users/lou/disconnect", b"").await;
    assert_eq!((status, &answer["closed"]), (200, &serde_json::json!(1)));
    let (status, body) = poll.await.expect("poll task");
    let error: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        (status, &error["code"]),
        (503, &serde_json::json!(ErrorCode::Disconnected as i32)),
        "{error}"
    );
}
