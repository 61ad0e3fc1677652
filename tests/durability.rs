//! Nothing acknowledged is lost and nothing is stored twice: retries across a
//! restart, and a `kill -9` in the middle of a stream of sends. And the
//! inbox epoch changes exactly when seqs may have been reused: after a
//! `kill -9`, not after a clean restart, nor after a crash of a server that
//! syncs every commit.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use swiftlet_client::{
    Client, ClientConfig, CursorTracker, Deliveries, ReliableSender, RetryPolicy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_restart_gets_the_same_ack_and_one_copy_is_stored() {
    let mut srv = TestServer::start();
    let first = {
        let (alice, _rx) = srv.connect("alice", "phone").await;
        alice
            .send_with_id("cm-1", "bob", "text/plain", "once")
            .await
            .expect("ack")
    };
    srv.restart();
    let (alice, _rx) = srv.connect("alice", "phone").await;
    let retry = alice
        .send_with_id("cm-1", "bob", "text/plain", "once")
        .await
        .expect("ack");
    assert_eq!(retry, first, "same server id and timestamp");
    assert_eq!(srv.server().store().count_messages().expect("count"), 1);
    let (bob, _brx) = srv.connect("bob", "phone").await;
    let page = bob.sync(0, 100).await.expect("sync");
    assert_eq!(page.events.len(), 1);
}

/// The real binary on `port` (protocol) and `http` (its HTTP listener: a
/// fixed default port would be shared with, or refused by, anything else
/// running on this machine).
fn spawn_server(port: u16, http: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_swiftlet"))
        .args(["serve", "--shards", "2", "--jwt-secret", SECRET])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--http")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn swiftlet")
}

/// 10,000 sends from four concurrent senders with retries while the server
/// is killed with SIGKILL twice and restarted: every acknowledged message is
/// stored exactly once with the id its Ack named, and a device receives each
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_10_000_sends_loses_and_duplicates_nothing() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 2_500;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let mut server = KillOnDrop(spawn_server(port, http, dir.path(), &[]));

    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let cfg = ClientConfig::new(addr.clone(), token("alice"), format!("dev{s}"));
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let policy = RetryPolicy {
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                deadline: Duration::from_secs(60),
            };
            let mut sender = ReliableSender::new(cfg, policy);
            let mut acks = HashMap::new();
            for i in 0..PER_SENDER {
                let cmid = format!("s{s}-{i}");
                let ack = sender
                    .send_with_id(&cmid, "bob", "text/plain", format!("{s}/{i}"))
                    .await
                    .expect("eventually acked");
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                acks.insert(cmid, ack.server_msg_id);
            }
            acks
        }));
    }
    // Kill twice, at about a third and two thirds of the way.
    for threshold in [SENDERS * PER_SENDER / 3, 2 * SENDERS * PER_SENDER / 3] {
        while acked.load(std::sync::atomic::Ordering::Relaxed) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.0.kill().expect("SIGKILL");
        server.0.wait().expect("reap");
        server.0 = spawn_server(port, http, dir.path(), &[]);
    }
    let mut all = HashMap::new();
    for t in tasks {
        all.extend(t.await.expect("sender task"));
    }
    assert_eq!(all.len(), SENDERS * PER_SENDER);

    // Bob's device sees every message exactly once, in seq order.
    let (bob, mut rx) = loop {
        match swiftlet_client::Client::connect(ClientConfig::new(
            addr.clone(),
            token("bob"),
            "phone",
        ))
        .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(
        bob.welcome().head_seq as usize,
        SENDERS * PER_SENDER,
        "exactly one copy of each"
    );
    let mut seen = HashMap::new();
    for expected_seq in 1..=(SENDERS * PER_SENDER) as u64 {
        let (seq, m) = next_message(&mut rx).await;
        assert_eq!(seq, expected_seq);
        assert!(
            seen.insert(m.client_msg_id.clone(), m.id).is_none(),
            "duplicate {}",
            m.client_msg_id
        );
    }
    assert_eq!(seen, all, "each stored message has the id its Ack named");
    assert_no_more(&bob, &mut rx).await;
}

/// Log in as `user`, waiting for a server that is still starting.
async fn connect_when_up(addr: &str, user: &str, device: &str) -> (Client, Deliveries) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match Client::connect(ClientConfig::new(addr, token(user), device)).await {
            Ok(c) => return c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no login within {PATIENCE:?}: {e}"),
        }
    }
}

/// Stop the server gracefully (SIGTERM) and wait for it to exit.
fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
    let exit = child.wait().expect("reap");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
}

/// Kill the server with SIGKILL and wait for it to be gone.
fn kill_9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

/// The inbox epoch in Welcome, SyncBatch and the HTTP sync JSON: the same
/// after a clean restart; another after a `kill -9` of a server in the
/// default `--wal-sync interval` (whose last interval may be lost after a
/// power failure, which leaves the same database behind as a kill), and the
/// client library's tracker then starts over at the server's cursor; the
/// same after a `kill -9` of a server with `--wal-sync always`, which lost
/// nothing anyone saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_epoch_changes_after_kill_9_and_not_after_a_clean_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let mut server = KillOnDrop(spawn_server(port, http, dir.path(), &[]));
    let respawn = |server: &mut KillOnDrop, extra: &[&str]| {
        server.0 = spawn_server(port, http, dir.path(), extra);
    };

    let (alice, _arx) = connect_when_up(&addr, "alice", "phone").await;
    send_numbered(&alice, "bob", 0..3).await;
    alice.close().await;
    let (bob, mut rx) = connect_when_up(&addr, "bob", "phone").await;
    let epoch = bob.welcome().inbox_epoch;
    assert_ne!(epoch, 0, "the server tells its epoch");
    let mut tracker = CursorTracker::from_welcome(bob.welcome());
    for _ in 0..3 {
        tracker.observe(next_message(&mut rx).await.0);
    }
    bob.ack_delivery(1).await.expect("ack delivery");
    assert_eq!(bob.sync(0, 10).await.expect("sync").inbox_epoch, epoch);
    let auth = format!("Bearer {}", token("bob"));
    let (status, body) = http_get(http_addr, "/v1/sync?after=0", &auth).await;
    assert_eq!(status, 200);
    assert_eq!(body["inboxEpoch"], serde_json::json!(epoch.to_string()));
    bob.ping()
        .await
        .expect("ping orders the ack before the restart");
    bob.close().await;

    terminate(&mut server.0);
    respawn(&mut server, &[]);
    let (bob, _rx) = connect_when_up(&addr, "bob", "phone").await;
    assert_eq!(bob.welcome().inbox_epoch, epoch, "a clean restart keeps it");
    assert!(!tracker.on_welcome(bob.welcome()));
    assert_eq!(tracker.last(), 3, "same epoch: seqs still remembered");
    bob.close().await;

    kill_9(&mut server.0);
    respawn(&mut server, &[]);
    let (bob, _rx) = connect_when_up(&addr, "bob", "phone").await;
    let after_kill = bob.welcome().inbox_epoch;
    assert_ne!(
        after_kill, epoch,
        "a kill -9 without --wal-sync always changes it"
    );
    assert_eq!(bob.sync(0, 10).await.expect("sync").inbox_epoch, after_kill);
    let (_, body) = http_get(http_addr, "/v1/sync?after=0", &auth).await;
    assert_eq!(
        body["inboxEpoch"],
        serde_json::json!(after_kill.to_string())
    );
    assert!(tracker.on_welcome(bob.welcome()), "the tracker starts over");
    assert_eq!(tracker.last(), bob.welcome().cursor);
    assert_eq!(tracker.last(), 1);
    bob.close().await;

    // A server that syncs every commit: the first start still follows an
    // unclean end of an unsynced run, so the epoch changes; its own kill -9
    // then loses nothing anyone saw, and the epoch stays.
    kill_9(&mut server.0);
    respawn(&mut server, &["--wal-sync", "always"]);
    let (bob, _rx) = connect_when_up(&addr, "bob", "phone").await;
    let synced = bob.welcome().inbox_epoch;
    assert_ne!(synced, after_kill);
    bob.close().await;
    kill_9(&mut server.0);
    respawn(&mut server, &["--wal-sync", "always"]);
    let (bob, _rx) = connect_when_up(&addr, "bob", "phone").await;
    assert_eq!(
        bob.welcome().inbox_epoch,
        synced,
        "nothing seen can have rolled back"
    );
    assert_eq!(bob.welcome().head_seq, 3);
}

/// `GET target` with an Authorization header: status and JSON body.
async fn http_get(
    addr: std::net::SocketAddr,
    target: &str,
    auth: &str,
) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, "GET", target, &[("Authorization", auth)], b"").await;
    (status, serde_json::from_slice(&body).expect("json"))
}

/// The server process, killed however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server's counter `name` from its /metrics page.
async fn counter(http_addr: std::net::SocketAddr, name: &str) -> u64 {
    let (status, body) = http(http_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Acknowledged cursors are coalesced in memory and written in bulk (see
/// `crate::cursors`): after a `kill -9` a device may see again events it
/// acknowledged, but its cursor never passes what it acknowledged and it
/// is sent every event after it (a replay, never a skip); a cursor the
/// server reports written survives a `kill -9`; a clean shutdown writes
/// every pending one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_after_acknowledgements_replays_but_never_skips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let mut server = KillOnDrop(spawn_server(port, http, dir.path(), &[]));
    let respawn = |server: &mut KillOnDrop| {
        server.0 = spawn_server(port, http, dir.path(), &[]);
    };
    let n = 20;
    let (alice, _arx) = connect_when_up(&addr, "alice", "phone").await;
    send_numbered(&alice, "bob", 0..n).await;
    alice.close().await;

    // Bob receives all, acknowledges up to `acked`, and the server dies
    // before or after the cursor was written.
    let (bob, mut rx) = connect_when_up(&addr, "bob", "phone").await;
    for expected in 1..=n {
        assert_eq!(next_message(&mut rx).await.0, expected);
    }
    let acked = 12;
    bob.ack_delivery(5).await.expect("ack delivery");
    bob.ack_delivery(acked).await.expect("ack delivery");
    bob.ping()
        .await
        .expect("ping orders the acks before the kill");
    kill_9(&mut server.0);
    respawn(&mut server);
    let (bob, mut rx) = connect_when_up(&addr, "bob", "phone").await;
    let cursor = bob.welcome().cursor;
    assert!(
        cursor <= acked,
        "cursor {cursor} passed the acknowledged {acked}"
    );
    for expected in cursor + 1..=n {
        assert_eq!(next_message(&mut rx).await.0, expected, "no skip");
    }

    // Once the server says it wrote the cursor, a kill -9 keeps it.
    let written = counter(http_addr, "swiftlet_cursors_written_total").await;
    bob.ack_delivery(15).await.expect("ack delivery");
    bob.ping().await.expect("ping");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while counter(http_addr, "swiftlet_cursors_written_total").await == written {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cursor was never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_9(&mut server.0);
    respawn(&mut server);
    let (bob, mut rx) = connect_when_up(&addr, "bob", "phone").await;
    assert_eq!(bob.welcome().cursor, 15);
    for expected in 16..=n {
        assert_eq!(next_message(&mut rx).await.0, expected);
    }

    // A clean shutdown writes what is pending, however recent.
    bob.ack_delivery(18).await.expect("ack delivery");
    bob.ping().await.expect("ping");
    terminate(&mut server.0);
    respawn(&mut server);
    let (bob, mut rx) = connect_when_up(&addr, "bob", "phone").await;
    assert_eq!(bob.welcome().cursor, 18);
    for expected in 19..=n {
        assert_eq!(next_message(&mut rx).await.0, expected);
    }
    assert_no_more(&bob, &mut rx).await;
}
