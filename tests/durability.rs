//! Nothing acknowledged is lost and nothing is stored twice: retries across a
//! restart, and a `kill -9` in the middle of a stream of sends.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use swiftlet_client::{ClientConfig, ReliableSender, RetryPolicy};

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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

/// The server process, killed however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
