//! A cluster of three real `swiftlet` processes joined through a real
//! `redis-server` on a free loopback port (installed by the README's test
//! command; its absence fails these tests, it does not skip them).
//!
//! What they prove: users chat across nodes exactly once and in order,
//! with redirects followed, receipts and several devices; a `kill -9` of
//! the recipients' home loses nothing and the senders keep getting Acks;
//! Redis killed and restarted empty, or paused, loses nothing and stalls
//! nothing on a node, even when it lost the map before some nodes had
//! read it; an owner paused past its lease cannot write; a partition moved
//! under traffic loses and duplicates nothing.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, token, PATIENCE, SECRET};
use swiftlet::cluster::Partition;
use swiftlet_client::{
    pb, Client, ClientConfig, ClientError, CloseReason, Deliveries, DeliveryItem,
};
use swiftlet_protocol::pb::event::Kind;
use swiftlet_protocol::ErrorCode;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A `redis-server` on a free port, with nothing persisted: a restart
/// starts empty, like a Redis that lost its data.
struct Redis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.spawn();
        r
    }

    /// Start redis-server on `self.port`, or on another free port if
    /// someone took that one meanwhile: it answers PING before this
    /// returns, and is the child this test started (not whoever else may
    /// have been listening there).
    fn spawn(&mut self) {
        for _ in 0..5 {
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("redis-server must be installed (tools/scripts/setup.sh installs it)");
            let deadline = Instant::now() + PATIENCE;
            loop {
                if child.try_wait().expect("redis-server status").is_some() {
                    break; // it could not bind: try another port
                }
                if redis_pings(self.port) {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            self.port = free_port();
        }
        panic!("redis-server could not bind a free port");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`, then a fresh, empty Redis on the same port.
    fn kill_and_restart_empty(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL redis");
            c.wait().expect("reap redis");
        }
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One node: the real binary, restartable on the same ports and data.
struct Node {
    id: u16,
    port: u16,
    http: u16,
    dir: tempfile::TempDir,
    redis: String,
    lease_ms: u64,
    child: Option<Child>,
}

impl Node {
    fn start(id: u16, redis: &Redis, lease_ms: u64) -> Node {
        let mut n = Node {
            id,
            port: free_port(),
            http: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            redis: redis.url(),
            lease_ms,
            child: None,
        };
        n.spawn();
        n
    }

    /// Start the node; if its ports were taken meanwhile (it refuses to
    /// share them and exits), on fresh ones. It serves its own /metrics
    /// before this returns.
    fn spawn(&mut self) {
        for _ in 0..5 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_swiftlet"))
                .args(["serve", "--shards", "2", "--jwt-secret", SECRET])
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--http")
                .arg(format!("127.0.0.1:{}", self.http))
                .arg("--data-dir")
                .arg(self.dir.path())
                .arg("--cluster")
                .arg(&self.redis)
                .arg("--node-id")
                .arg(self.id.to_string())
                .arg("--lease-ms")
                .arg(self.lease_ms.to_string())
                .arg("--redis-timeout-ms")
                // As long as the lease allows: on a loaded box, a short
                // deadline fails calls that were merely slow.
                .arg((self.lease_ms / 3).min(1_000).to_string())
                // NODE_LOG=info (or debug) to see the nodes' own logs.
                .env(
                    "RUST_LOG",
                    std::env::var("NODE_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn swiftlet");
            let deadline = Instant::now() + PATIENCE;
            loop {
                if child.try_wait().expect("node status").is_some() {
                    break;
                }
                if try_http_get(self.http, "/metrics")
                    .is_some_and(|m| m.contains("swiftlet_cluster_redis_up"))
                {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "node {} did not start", self.id);
                std::thread::sleep(Duration::from_millis(20));
            }
            self.port = free_port();
            self.http = free_port();
        }
        panic!("node {} could not bind free ports", self.id);
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_9();
    }
}

fn cluster_cmd(redis: &Redis, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_swiftlet"))
        .args(["cluster", "--redis", &redis.url()])
        .args(args)
        .output()
        .expect("run swiftlet cluster");
    assert!(
        out.status.success(),
        "swiftlet cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Three nodes (ids 1, 2, 3) and a map giving partition p to node
/// `p % 3 + 1`.
fn cluster(redis: &Redis, lease_ms: u64) -> Vec<Node> {
    let nodes: Vec<Node> = (1..=3).map(|id| Node::start(id, redis, lease_ms)).collect();
    cluster_cmd(redis, &["init", "--nodes", "1,2,3"]);
    nodes
}

/// The node id `cluster init --nodes 1,2,3` made home to `user`.
fn home_of(user: &str) -> u16 {
    Partition::of_user(user).0 % 3 + 1
}

/// A user name starting with `prefix` whose home is node `node`.
fn user_on(prefix: &str, node: u16) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| home_of(u) == node)
        .expect("some name hashes there")
}

/// Log in at `addr` (any node), following redirects, retrying while the
/// cluster settles (nodes joining, a home restarting).
async fn login(addr: &str, user: &str, device: &str) -> (Client, Deliveries) {
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        match Client::connect(ClientConfig::new(addr, token(user), device)).await {
            Ok(c) => return c,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{user}/{device} could not log in at {addr}: {e}"),
        }
    }
}

/// Send until acknowledged, through reconnects and refusals (a retry with
/// the same id is stored once).
async fn send_acked(at: &str, user: &str, id: &str, to: &str, body: &str) -> pb::Ack {
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        let (c, _d) = login(at, user, "sender").await;
        loop {
            match c
                .send_with_id(id, to, "text/plain", body.as_bytes().to_vec())
                .await
            {
                Ok(ack) => return ack,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if e.needs_reconnect() || e.code() == Some(ErrorCode::Unavailable as i32) {
                        break;
                    }
                }
                Err(e) => panic!("{user} sending {id}: {e}"),
            }
        }
    }
}

/// Messages `n` from a device's live stream until `want` message bodies
/// have arrived, acknowledging as it goes; fails on a duplicate seq.
async fn collect_messages(c: &Client, d: &mut Deliveries, want: usize) -> Vec<pb::Message> {
    let mut got = Vec::new();
    let mut last_seq = c.welcome().cursor;
    while got.len() < want {
        let item = tokio::time::timeout(PATIENCE * 2, d.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} messages arrived", got.len()));
        match item {
            Some(DeliveryItem::Event(ev)) => {
                assert!(
                    ev.seq > last_seq,
                    "seq {} after {last_seq}: a duplicate or reorder",
                    ev.seq
                );
                last_seq = ev.seq;
                c.ack_delivery(ev.seq).await.expect("ack delivery");
                if let Some(Kind::Message(m)) = ev.kind {
                    got.push(m);
                }
            }
            Some(DeliveryItem::Closed(r)) => panic!("closed after {} messages: {r}", got.len()),
            Some(_) => {}
            None => panic!("deliveries ended"),
        }
    }
    got
}

/// Every message of `user`'s inbox, by paging Sync from the start.
async fn inbox(c: &Client) -> Vec<pb::Message> {
    let (mut after, mut out) = (0, Vec::new());
    loop {
        let page = c.sync(after, 500).await.expect("sync");
        for ev in &page.events {
            assert!(ev.seq > after, "sync pages are in seq order");
            after = ev.seq;
            if let Some(Kind::Message(m)) = &ev.kind {
                out.push(m.clone());
            }
        }
        if !page.has_more {
            return out;
        }
    }
}

/// The bodies `from` sent to the owner of `msgs`, in order.
fn bodies_from(msgs: &[pb::Message], from: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.from_user == from)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_across_nodes_with_redirects_receipts_and_devices() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 15_000);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 2);
    // Alice logs in through node 3 and bob's laptop through node 1: both
    // are redirected home.
    let (a, mut ad) = login(&nodes[2].addr(), &alice, "phone").await;
    assert_eq!(a.addr(), nodes[0].addr(), "redirected to alice's home");
    let (b1, mut bd1) = login(&nodes[1].addr(), &bob, "phone").await;
    let (b2, mut bd2) = login(&nodes[0].addr(), &bob, "laptop").await;
    assert_eq!(b2.addr(), nodes[1].addr(), "redirected to bob's home");

    // Live, across nodes: both of bob's devices get each message once, in order.
    let sent = numbered("a2b", 30);
    for (i, body) in sent.iter().enumerate() {
        a.send_with_id(
            &format!("a2b-{i}"),
            &bob,
            "text/plain",
            body.as_bytes().to_vec(),
        )
        .await
        .expect("ack");
    }
    let on_phone = collect_messages(&b1, &mut bd1, sent.len()).await;
    let on_laptop = collect_messages(&b2, &mut bd2, sent.len()).await;
    assert_eq!(bodies_from(&on_phone, &alice), sent);
    assert_eq!(bodies_from(&on_laptop, &alice), sent);

    // Bob's acknowledgements come back to alice as delivered receipts, and
    // a MarkRead as a read receipt.
    let newest = on_phone.last().expect("messages").id;
    b1.mark_read(
        pb::Conversation {
            kind: Some(pb::conversation::Kind::User(alice.clone())),
        },
        newest,
    )
    .await
    .expect("mark read");
    let deadline = Instant::now() + PATIENCE;
    let (mut delivered, mut read) = (0, 0);
    while (delivered.max(read) < newest || read < newest) && Instant::now() < deadline {
        if let Ok(Some(DeliveryItem::Event(ev))) =
            tokio::time::timeout(Duration::from_millis(500), ad.next()).await
        {
            a.ack_delivery(ev.seq).await.expect("ack");
            if let Some(Kind::Receipt(r)) = ev.kind {
                assert_eq!(r.user, bob);
                if r.kind == pb::ReceiptKind::Delivered as i32 {
                    delivered = delivered.max(r.up_to);
                } else if r.kind == pb::ReceiptKind::Read as i32 {
                    read = read.max(r.up_to);
                }
            }
        }
    }
    // (A read receipt also says delivered: one may come in the other's place.)
    assert_eq!(
        (delivered.max(read), read),
        (newest, newest),
        "receipts crossed back"
    );

    // Offline: alice is away while bob answers; she gets it all on return.
    a.close().await;
    drop(ad);
    let replies = numbered("b2a", 20);
    for (i, body) in replies.iter().enumerate() {
        b2.send_with_id(
            &format!("b2a-{i}"),
            &alice,
            "text/plain",
            body.as_bytes().to_vec(),
        )
        .await
        .expect("ack");
    }
    let (a, _ad) = login(&nodes[1].addr(), &alice, "phone").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = bodies_from(&inbox(&a).await, &bob);
        if got.len() >= replies.len() || Instant::now() > deadline {
            assert_eq!(got, replies, "every reply once, in order");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Bob's own devices see his replies too (his inbox, his node).
    assert_eq!(bodies_from(&inbox(&b1).await, &bob), replies);
    let status = cluster_cmd(&redis, &["status"]);
    assert!(
        status.contains("held"),
        "status lists live nodes:\n{status}"
    );
    // Node 3 redirected alice once, and shows its link to Redis.
    let metrics = http_get(nodes[2].http, "/metrics");
    // (At least once: a login made while the cluster was settling may
    // have been redirected, then told to wait, and redirected again.)
    let redirects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swiftlet_cluster_redirects_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(redirects >= 1, "{metrics}");
    assert!(
        metrics.contains("\nswiftlet_cluster_redis_up 1\n"),
        "{metrics}"
    );
}

/// The body of a plain HTTP GET.
fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).expect("HTTP GET")
}

fn try_http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Whether a Redis answers PING on `port`.
fn redis_pings(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_recipients_home_loses_nothing() {
    let redis = Redis::start();
    let mut nodes = cluster(&redis, 15_000);
    let bob = user_on("bob", 2);
    let senders = [user_on("ann", 1), user_on("cat", 3)];
    let (b, _bd) = login(&nodes[1].addr(), &bob, "phone").await;
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    // Ann sends through node 1, cat through node 3.
    let sender_addrs = [nodes[0].addr(), nodes[2].addr()];
    let send_round = |round: &str| {
        let mut futs = Vec::new();
        for (si, s) in senders.iter().enumerate() {
            let at = sender_addrs[si].clone();
            let (s, bob, round) = (s.clone(), bob.clone(), round.to_owned());
            futs.push(tokio::spawn(async move {
                let bodies = numbered(&format!("{s}-{round}"), 40);
                for (i, body) in bodies.iter().enumerate() {
                    send_acked(&at, &s, &format!("{round}-{i}"), &bob, body).await;
                }
                (s, bodies)
            }));
        }
        futs
    };
    for f in send_round("before") {
        let (s, b) = f.await.expect("sender");
        sent.entry(s).or_default().extend(b);
    }
    // Bob's home dies while the senders are at it, with bob connected;
    // everyone else keeps sending and keeps getting Acks.
    let during = send_round("during");
    tokio::time::sleep(Duration::from_millis(50)).await;
    nodes[1].kill_9();
    drop(b);
    for f in during {
        let (s, b) = f.await.expect("sender");
        sent.entry(s).or_default().extend(b);
    }
    for f in send_round("while-down") {
        let (s, b) = f.await.expect("sender");
        sent.entry(s).or_default().extend(b);
    }
    nodes[1].spawn();
    let (b, _bd) = login(&nodes[0].addr(), &bob, "phone").await;
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let msgs = inbox(&b).await;
        let done = senders
            .iter()
            .all(|s| bodies_from(&msgs, s).len() >= sent[s].len());
        if done || Instant::now() > deadline {
            for s in &senders {
                assert_eq!(
                    bodies_from(&msgs, s),
                    sent[s],
                    "every Ack of {s} delivered once, in order"
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_or_paused_loses_and_stalls_nothing() {
    let mut redis = Redis::start();
    let nodes = cluster(&redis, 15_000);
    let ann = user_on("ann", 1);
    let ann2 = user_on("amy", 1);
    let bob = user_on("bob", 2);
    let mut sent = Vec::new();
    let mut n = 0;
    let mut send = |count: usize| {
        let v: Vec<(String, String)> = (0..count)
            .map(|_| {
                n += 1;
                (format!("m-{n}"), format!("body-{n}"))
            })
            .collect();
        v
    };
    for (id, body) in send(20) {
        send_acked(&nodes[0].addr(), &ann, &id, &bob, &body).await;
        sent.push(body);
    }
    // Redis dies and comes back with nothing: nodes restore the map, the
    // streams and the marks by themselves, and re-drive.
    redis.kill_and_restart_empty();
    for (id, body) in send(20) {
        send_acked(&nodes[0].addr(), &ann, &id, &bob, &body).await;
        sent.push(body);
    }
    // Redis paused for 10 s (shorter than the lease): chat within a node
    // goes on meanwhile, and cross-node traffic sent then arrives after.
    signal(redis.pid(), "STOP");
    let paused = Instant::now();
    let (a2, mut a2d) = login(&nodes[0].addr(), &ann2, "phone").await;
    let (a1, _a1d) = login(&nodes[0].addr(), &ann, "phone").await;
    let mut local = 0;
    while paused.elapsed() < Duration::from_secs(10) {
        local += 1;
        a1.send_with_id(
            &format!("local-{local}"),
            &ann2,
            "text/plain",
            b"hi".to_vec(),
        )
        .await
        .expect("same-node send while redis is paused");
        let got = collect_messages(&a2, &mut a2d, 1).await;
        assert_eq!(got.len(), 1);
        if local <= 5 {
            let (id, body) = send(1).remove(0);
            a1.send_with_id(&id, &bob, "text/plain", body.as_bytes().to_vec())
                .await
                .expect("cross-node sends are acknowledged while redis is paused");
            sent.push(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(redis.pid(), "CONT");
    assert!(
        local >= 10,
        "same-node chat kept flowing: {local} round trips"
    );
    let (b, _bd) = login(&nodes[1].addr(), &bob, "phone").await;
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let got = bodies_from(&inbox(&b).await, &ann);
        if got.len() >= sent.len() || Instant::now() > deadline {
            assert_eq!(got, sent, "every acknowledged message once, in order");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Redis lost the map before some nodes had ever read it: the node that
/// had read it gives back every home it knows, not only its own, so the
/// others' users are not left without a home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_lost_before_other_nodes_read_it_is_restored_whole() {
    let mut redis = Redis::start();
    let node1 = Node::start(1, &redis, 15_000);
    cluster_cmd(&redis, &["init", "--nodes", "1,2,3"]);
    // Node 1 has read and recorded the map once one of its users is served.
    let ann = user_on("ann", 1);
    let (_a, _ad) = login(&node1.addr(), &ann, "phone").await;
    redis.kill_and_restart_empty();
    // Nodes 2 and 3 join with nothing recorded.
    let node2 = Node::start(2, &redis, 15_000);
    let _node3 = Node::start(3, &redis, 15_000);
    let bob = user_on("bob", 2);
    let (b, _bd) = login(&node1.addr(), &bob, "phone").await;
    assert_eq!(b.addr(), node2.addr(), "sent to his home, node 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_paused_past_its_lease_is_fenced() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 2_000);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 2);
    let (a, mut ad) = login(&nodes[0].addr(), &alice, "phone").await;
    a.send_with_id("before", &bob, "text/plain", b"before".to_vec())
        .await
        .expect("ack before the pause");
    // Node 1 stops past its lease; meanwhile alice's partition is given to
    // node 3 (disaster recovery: node 1 looks dead).
    signal(nodes[0].pid(), "STOP");
    std::thread::sleep(Duration::from_millis(3_000));
    let p = Partition::of_user(&alice).0.to_string();
    cluster_cmd(&redis, &["move-partition", &p, "--to", "3", "--force"]);
    // Node 1 wakes up: whatever its shards read first, it must not write
    // for alice any more.
    signal(nodes[0].pid(), "CONT");
    match a
        .send_with_id("after", &bob, "text/plain", b"fenced".to_vec())
        .await
    {
        Ok(ack) => panic!("a fenced node acknowledged a send: {ack:?}"),
        Err(ClientError::Server { code, .. }) => {
            assert_eq!(code, ErrorCode::Unavailable as i32)
        }
        Err(e) => assert!(e.needs_reconnect(), "refused or closed: {e}"),
    }
    // Once node 1 has read the new map, it closes her connection and says
    // where her home is now.
    let reason = loop {
        match tokio::time::timeout(PATIENCE, ad.next()).await {
            Ok(Some(DeliveryItem::Closed(r))) => break r,
            Ok(Some(_)) => {}
            other => panic!("her connection was not closed: {other:?}"),
        }
    };
    // (NOT_HOME with node 3's address; HOME_UNAVAILABLE if node 1 had not
    // yet heard that node 3 is alive: both send her elsewhere.)
    assert!(
        matches!(&reason, CloseReason::Server { code, .. }
            if *code == ErrorCode::NotHome as i32 || *code == ErrorCode::HomeUnavailable as i32),
        "closed with {reason}"
    );
    // Her next login (at node 1) goes to node 3, and she chats from there.
    let (a3, _a3d) = login(&nodes[0].addr(), &alice, "phone").await;
    assert_eq!(a3.addr(), nodes[2].addr());
    a3.send_with_id("after", &bob, "text/plain", b"from-3".to_vec())
        .await
        .expect("ack from the new home");
    let (b, _bd) = login(&nodes[1].addr(), &bob, "phone").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut got = bodies_from(&inbox(&b).await, &alice);
        if got.len() >= 2 || Instant::now() > deadline {
            // Each once, and nothing node 1 was refused. (Their order is
            // not alice's: "before" waited in paused node 1's outbox while
            // "from-3" went from her new home; after a forced move there
            // is no order across the two homes.)
            got.sort();
            assert_eq!(got, vec!["before".to_owned(), "from-3".to_owned()]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next typing or presence notice about `user` (events are
/// acknowledged and skipped, as are notices about others), or a failed
/// test after a while.
async fn next_notice(c: &Client, d: &mut Deliveries, user: &str) -> DeliveryItem {
    loop {
        match tokio::time::timeout(PATIENCE, d.next()).await {
            Ok(Some(DeliveryItem::Event(ev))) => c.ack_delivery(ev.seq).await.expect("ack"),
            Ok(Some(DeliveryItem::Presence(p))) if p.user != user => {}
            Ok(Some(DeliveryItem::Typing(t))) if t.user != user => {}
            Ok(Some(item)) => return item,
            Ok(None) => panic!("deliveries ended"),
            Err(_) => panic!("no notice arrived"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_cross_nodes() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 15_000);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 2);
    let carol = user_on("carol", 3);
    // Carol is online before alice looks: alice's node learns it from
    // carol's node's online set, not from a notice it never heard.
    let (_c, _cd) = login(&nodes[2].addr(), &carol, "phone").await;
    let (a, mut ad) = login(&nodes[0].addr(), &alice, "phone").await;
    let deadline = Instant::now() + PATIENCE;
    let now = loop {
        // (Subscribing is rate limited: a refusal is retried.)
        match a.subscribe_presence(&[&bob, &carol]).await {
            Err(e) if e.code() != Some(ErrorCode::RateLimited as i32) => panic!("subscribe: {e}"),
            Err(_) => {}
            Ok(now) => {
                if now.iter().any(|p| p.user == carol && p.online) || Instant::now() > deadline {
                    break now;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let online = |u: &str| now.iter().find(|p| p.user == u).map(|p| p.online);
    assert_eq!(online(&bob), Some(false));
    assert_eq!(
        online(&carol),
        Some(true),
        "a remote user online before the look"
    );

    // Bob comes online on node 2: alice, on node 1, is told.
    let (b, bd) = login(&nodes[1].addr(), &bob, "phone").await;
    match next_notice(&a, &mut ad, &bob).await {
        DeliveryItem::Presence(p) => assert_eq!((p.user.as_str(), p.online), (bob.as_str(), true)),
        other => panic!("expected bob's presence, got {other:?}"),
    }
    // He types to her across nodes.
    b.typing(
        pb::Conversation {
            kind: Some(pb::conversation::Kind::User(alice.clone())),
        },
        true,
    )
    .await
    .expect("typing");
    match next_notice(&a, &mut ad, &bob).await {
        DeliveryItem::Typing(t) => {
            assert_eq!(t.user, bob);
            assert_eq!(t.state, pb::TypingState::Started as i32);
        }
        other => panic!("expected bob typing, got {other:?}"),
    }
    // He leaves: offline, with a last seen time (after a STOPPED typing
    // notice for the typing he left unfinished).
    b.close().await;
    drop(bd);
    let mut notice = next_notice(&a, &mut ad, &bob).await;
    if let DeliveryItem::Typing(t) = &notice {
        assert_eq!(t.state, pb::TypingState::Stopped as i32);
        notice = next_notice(&a, &mut ad, &bob).await;
    }
    match notice {
        DeliveryItem::Presence(p) => {
            assert_eq!((p.user.as_str(), p.online), (bob.as_str(), false));
            assert!(p.last_seen_ms > 0, "last seen travels with the notice");
        }
        other => panic!("expected bob offline, got {other:?}"),
    }
    let now = loop {
        match a.subscribe_presence(&[&bob]).await {
            Ok(now) => break now,
            // Rate limited: the bucket refills.
            Err(e) if e.code() == Some(ErrorCode::RateLimited as i32) => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("subscribe: {e}"),
        }
    };
    assert!(!now[0].online);
    assert!(now[0].last_seen_ms > 0, "last seen of a remote user");
}

/// The group messages in `msgs` from `from`, as bodies, in order.
fn group_bodies(msgs: &[pb::Message], group: u64, from: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.group_id == group && m.from_user == from)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_chat_across_nodes_is_written_by_the_groups_home() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 15_000);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 2);
    let carol = user_on("carol", 3);
    let dave = user_on("dave", 2);
    let (a, _ad) = login(&nodes[0].addr(), &alice, "phone").await;
    let (b, _bd) = login(&nodes[1].addr(), &bob, "phone").await;
    let (c, _cd) = login(&nodes[2].addr(), &carol, "phone").await;
    // Created on alice's node, which becomes its home.
    let g = a
        .create_group("trio", &[&bob, &carol])
        .await
        .expect("create")
        .group_id;
    // Every member posts, from three nodes: posts from bob and carol are
    // forwarded to the group's home and acknowledged from there.
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    let mut bobs_first = None;
    for round in 0..10 {
        for (who, client) in [(&alice, &a), (&bob, &b), (&carol, &c)] {
            let body = format!("{who}-{round}");
            let ack = client
                .send_group_with_id(&format!("g-{round}"), g, "text/plain", body.clone())
                .await
                .unwrap_or_else(|e| panic!("{who} posting: {e}"));
            if *who == bob && round == 0 {
                bobs_first = Some(ack);
            }
            sent.entry(who.clone()).or_default().push(body);
        }
    }
    // A retry of a forwarded post gets the first Ack, and no second copy
    // (the inbox checks below would see one).
    let first = b
        .send_group_with_id("g-0", g, "text/plain", format!("{bob}-0"))
        .await
        .expect("retry");
    assert_eq!(
        Some(&first),
        bobs_first.as_ref(),
        "the retry's Ack is the first one"
    );
    // Bob reads the group from his node: the read goes to its home.
    let info = b.get_group(g).await.expect("get_group forwarded");
    assert_eq!(info.member_count, 3);
    // Alice (the admin) adds dave, who is served by bob's node.
    a.add_members(g, &[&dave]).await.expect("add dave");
    let (d, _dd) = login(&nodes[1].addr(), &dave, "phone").await;
    let after = c
        .send_group_with_id("g-late", g, "text/plain", "late")
        .await
        .expect("post after dave joined");
    assert!(after.server_msg_id > first.server_msg_id);

    sent.get_mut(&carol)
        .expect("carol posted")
        .push("late".into());
    for (who, client) in [(&alice, &a), (&bob, &b), (&carol, &c)] {
        let deadline = Instant::now() + PATIENCE;
        let msgs = loop {
            let msgs = inbox(client).await;
            let complete = [&alice, &bob, &carol]
                .iter()
                .all(|s| group_bodies(&msgs, g, s).len() >= sent[*s].len());
            if complete || Instant::now() > deadline {
                break msgs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for s in [&alice, &bob, &carol] {
            assert_eq!(
                group_bodies(&msgs, g, s),
                sent[s],
                "{who} sees {s}'s posts once each, in order"
            );
        }
    }
    // Dave sees what was posted after he joined, and nothing before.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = group_bodies(&inbox(&d).await, g, &carol);
        if !got.is_empty() || Instant::now() > deadline {
            assert_eq!(got, vec!["late".to_owned()]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send numbered messages from `user` to `to`, logged in at `at`
/// (following redirects), each until acknowledged (a refusal or a closed
/// connection means log in again and retry with the same id, stored
/// once), until `stop` is set and then `after` more. Counts the Acks in
/// `acked` and returns how many were sent.
async fn send_until(
    at: String,
    user: String,
    to: String,
    prefix: &'static str,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    after: usize,
) -> usize {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + PATIENCE * 6;
    let (mut c, mut _d) = login(&at, &user, "sender").await;
    let mut more = after;
    let mut i = 0;
    while more > 0 {
        if stop.load(Ordering::Acquire) {
            more -= 1;
        }
        let id = format!("{prefix}-{i}");
        loop {
            match c
                .send_with_id(&id, &to, "text/plain", id.as_bytes().to_vec())
                .await
            {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if e.needs_reconnect() || e.code() == Some(ErrorCode::Unavailable as i32) {
                        (c, _d) = login(&at, &user, "sender").await;
                    }
                }
                Err(e) => panic!("{user} sending {id}: {e}"),
            }
        }
        acked.fetch_add(1, Ordering::Relaxed);
        i += 1;
        // Paced, so the traffic spans the move on any machine.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    i
}

/// Until a message each way between `a` (at `at_a`) and `b` has been
/// delivered: both homes hold their leases and hand off at once.
async fn settle(at_a: &str, a: &str, at_b: &str, b: &str) {
    for (at, from, to, at_to) in [(at_a, a, b, at_b), (at_b, b, a, at_a)] {
        let id = format!("settle-{from}");
        send_acked(at, from, &id, to, &id).await;
        let (c, _d) = login(at_to, to, "settle").await;
        let deadline = Instant::now() + PATIENCE;
        while !bodies_from(&inbox(&c).await, from).contains(&id) {
            assert!(Instant::now() < deadline, "{id} never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_under_traffic_loses_and_duplicates_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let redis = Redis::start();
    let nodes = cluster(&redis, 15_000);
    // Alice's partition moves from node 1 to node 3 while bob (node 2)
    // and carol (node 1, a partition that stays) write to her, and she
    // writes to bob.
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 2);
    let carol = (0..)
        .map(|i| format!("carol{i}"))
        .find(|u| home_of(u) == 1 && Partition::of_user(u) != Partition::of_user(&alice))
        .expect("a name");
    let p = Partition::of_user(&alice).0;
    // Settled first: until every node holds its lease, a hand-off entry
    // may wait for a re-drive, and order across the move's two homes is
    // kept only for what the old home has handed off by then.
    settle(&nodes[0].addr(), &alice, &nodes[1].addr(), &bob).await;
    let (phone, mut pd) = login(&nodes[0].addr(), &alice, "phone").await;
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = [
        (nodes[1].addr(), bob.clone(), alice.clone(), "b"),
        (nodes[0].addr(), carol.clone(), alice.clone(), "c"),
        (nodes[0].addr(), alice.clone(), bob.clone(), "a"),
    ]
    .into_iter()
    .map(|(at, user, to, prefix)| {
        Some(tokio::spawn(send_until(
            at,
            user,
            to,
            prefix,
            acked.clone(),
            stop.clone(),
            20,
        )))
    })
    .collect::<Vec<_>>();
    let mut sent = [None; 3];

    // Her phone reads and acknowledges as it goes; the move closes its
    // connection with a redirect, and it logs in again (at node 1, sent on
    // to node 3) from its stored cursor.
    // (seq, body of a message from bob or carol)
    let mut seen: Vec<(u64, Option<String>)> = Vec::new();
    let theirs = |seen: &[(u64, Option<String>)]| seen.iter().filter(|(_, b)| b.is_some()).count();
    let mut phone = Some(phone);
    let mut moved = None;
    let mut relogins = 0;
    let give_up = Instant::now() + PATIENCE * 4;
    loop {
        if moved.is_none() && acked.load(Ordering::Relaxed) >= 30 {
            let (url, stop) = (redis.url(), stop.clone());
            moved = Some(tokio::task::spawn_blocking(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_swiftlet"))
                    .args(["cluster", "--redis", &url, "move-partition"])
                    .arg(p.to_string())
                    .args(["--to", "3"])
                    .output()
                    .expect("run swiftlet cluster");
                stop.store(true, Ordering::Release);
                assert!(
                    out.status.success(),
                    "move-partition: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }));
        }
        for (i, s) in senders.iter_mut().enumerate() {
            if s.as_ref().is_some_and(|h| h.is_finished()) {
                sent[i] = Some(s.take().expect("running").await.expect("sender"));
            }
        }
        if let [Some(b), Some(c), Some(_)] = sent {
            if theirs(&seen) >= b + c {
                break;
            }
        }
        assert!(
            Instant::now() < give_up,
            "her phone has {} of their messages; sent {sent:?}, relogins {relogins}",
            theirs(&seen)
        );
        let c = phone.as_ref().expect("logged in");
        match tokio::time::timeout(Duration::from_millis(500), pd.next()).await {
            Err(_) => continue,
            Ok(Some(DeliveryItem::Event(ev))) => {
                let last = seen.last().map_or(c.welcome().cursor, |s| s.0);
                assert!(ev.seq > last, "seq {} after {last}", ev.seq);
                let body = match ev.kind {
                    Some(Kind::Message(m))
                        if m.from_user != alice && !m.body.starts_with(b"settle") =>
                    {
                        Some(String::from_utf8_lossy(&m.body).into_owned())
                    }
                    _ => None,
                };
                seen.push((ev.seq, body));
                let _ = c.ack_delivery(ev.seq).await;
            }
            Ok(Some(DeliveryItem::Closed(reason))) => {
                relogins += 1;
                assert!(relogins < 10, "closed again and again: {reason}");
                let (c, d) = login(&nodes[0].addr(), &alice, "phone").await;
                // Its cursor may be behind what it acknowledged at the old
                // home (a replay), never ahead (a skip).
                let cursor = c.welcome().cursor;
                assert!(
                    cursor <= seen.last().map_or(0, |s| s.0),
                    "cursor {cursor} is past what the phone saw"
                );
                seen.retain(|s| s.0 <= cursor);
                phone = Some(c);
                pd = d;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("deliveries ended"),
        }
    }
    let [Some(nb), Some(nc), Some(na)] = sent else {
        unreachable!("all three finished")
    };
    moved.expect("the move ran").await.expect("move-partition");
    assert!(relogins >= 1, "the move sent her phone to its new home");
    let seqs: Vec<u64> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "her phone's stream is gap-free"
    );
    let mut got: Vec<String> = seen.into_iter().filter_map(|s| s.1).collect();
    got.sort();
    let mut want = [numbered("b", nb), numbered("c", nc)].concat();
    want.sort();
    assert_eq!(got, want, "her phone got every message once");

    // Her home is node 3 now, for a new login at any node.
    let (laptop, _ld) = login(&nodes[1].addr(), &alice, "laptop").await;
    assert_eq!(laptop.addr(), nodes[2].addr());
    let msgs: Vec<pb::Message> = inbox(&laptop)
        .await
        .into_iter()
        .filter(|m| !m.body.starts_with(b"settle"))
        .collect();
    assert_eq!(
        bodies_from(&msgs, &bob),
        numbered("b", nb),
        "bob's, once each, in order"
    );
    assert_eq!(
        bodies_from(&msgs, &carol),
        numbered("c", nc),
        "carol's, once each, in order"
    );
    // Hers went to bob's home through node 1's outbox, then node 3's.
    let (b, _bd) = login(&nodes[1].addr(), &bob, "phone").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut got = bodies_from(&inbox(&b).await, &alice);
        got.retain(|m| !m.starts_with("settle"));
        if got.len() >= na || Instant::now() > deadline {
            assert_eq!(got, numbered("a", na), "hers, once each, in order");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
