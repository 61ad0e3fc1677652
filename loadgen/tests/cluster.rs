//! loadgen against a cluster: two real nodes (in-process, port 0, RocksDB
//! in temp dirs) joined through a real `redis-server` on a free loopback
//! port. `--server A,B` spreads the logins over both nodes, so about half
//! of them land on a node that is not the user's home and must follow the
//! NOT_HOME redirect; the chat then crosses nodes through the durable
//! hand-off. Each run must exit 0 with every message delivered exactly
//! once, and must report the redirects it followed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use swiftlet_client::{Client, ClientConfig};

/// How long the cluster may take to settle (the nodes read the map).
const SETTLE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A throwaway `redis-server` (nothing persisted), killed on drop.
struct Redis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// A free port is only free until someone binds it, and other tests
    /// start servers too: the Redis answering must be ours (its INFO names
    /// our child's pid), else try another port.
    fn start() -> Redis {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--port", &port.to_string()])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (tools/scripts/setup.sh installs it)");
            if wait_for_own_redis(&mut child, port) {
                return Redis {
                    port,
                    child,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on a port of its own");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once `child` serves `port` (it may instead exit: the port was taken).
fn wait_for_own_redis(child: &mut Child, port: u16) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            // The reply is one bulk string of about 1 KiB; read until our
            // line is in it, the peer stops, or 16 KiB.
            let pid = format!("process_id:{}\r\n", child.id());
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            if s.write_all(b"INFO server\r\n").is_err() {
                return false;
            }
            while reply.len() < 16 * 1024 {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => reply.extend_from_slice(&buf[..n]),
                    _ => break,
                }
                if String::from_utf8_lossy(&reply).contains(&pid) {
                    return true;
                }
            }
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

struct Node {
    server: Option<swiftlet::Server>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(id: u16, redis: &Redis) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = swiftlet::Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_owned(),
            shards: 1,
            dev_auth: true,
            node_id: id,
            cluster: Some(redis.url()),
            // A loaded test machine (the whole suite at once) can make a
            // Redis call take longer than the default deadline of 1 s.
            redis_timeout_ms: 3_000,
            ..swiftlet::Config::default()
        };
        Node {
            server: Some(swiftlet::start(config).expect("node starts")),
            _dir: dir,
        }
    }

    fn tcp(&self) -> String {
        self.server
            .as_ref()
            .expect("running")
            .local_addr()
            .to_string()
    }

    fn http(&self) -> String {
        self.server
            .as_ref()
            .expect("running")
            .http_addr()
            .to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// The map made (partitions over nodes 1 and 2), two nodes, and every node
/// answering logins, its own users' and (with a redirect) the other's.
async fn cluster(redis: &Redis) -> Vec<Node> {
    // The map first: a node then reads it whole at its first look, instead
    // of between the chunks `init` writes it in.
    swiftlet::cluster::admin::init(&redis.url(), &[1, 2]).expect("cluster init");
    let nodes = vec![Node::start(1, redis), Node::start(2, redis)];
    let deadline = Instant::now() + SETTLE;
    for node in &nodes {
        for user in ["settle-a", "settle-b", "settle-c", "settle-d"] {
            loop {
                let cfg = ClientConfig::new(node.tcp(), user, "settle");
                match Client::connect(cfg).await {
                    Ok((c, _)) => {
                        c.close().await;
                        break;
                    }
                    Err(e) if e.is_retryable() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("{user} cannot log in at {}: {e}", node.tcp()),
                }
            }
        }
    }
    nodes
}

/// Run `loadgen chat ARGS` with dev-auth; its JSON summary.
fn loadgen(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("chat")
        .arg("--dev-auth")
        .args(args)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).expect("the last line is JSON")
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// Every message acknowledged and delivered once, nothing failed, and some
/// (never more than one per login) logins redirected home.
fn delivered_once_with_redirects(summary: &Value, users: u64) {
    let sent = count(summary, "sent");
    assert!(sent > 0, "nothing sent: {summary}");
    assert_eq!(count(summary, "acked"), sent, "{summary}");
    assert_eq!(count(summary, "delivered"), sent, "{summary}");
    assert_eq!(count(summary, "lost"), 0, "{summary}");
    assert_eq!(count(summary, "duplicated"), 0, "{summary}");
    assert_eq!(count(summary, "errors_total"), 0, "{summary}");
    assert_eq!(count(summary, "connections"), users, "{summary}");
    let redirects = count(summary, "redirects");
    assert!(
        redirects > 0 && redirects <= users,
        "20 users spread over 2 nodes: some, at most one each, redirected: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_two_nodes_follows_redirects_tcp_and_websocket() {
    let redis = Redis::start();
    let nodes = cluster(&redis).await;
    let tcp = format!("{},{}", nodes[0].tcp(), nodes[1].tcp());
    let http = format!("{},{}", nodes[0].http(), nodes[1].http());
    // Fixed user names: which logins are redirected does not vary by run.
    let summary = loadgen(&[
        "--server",
        &tcp,
        "--users",
        "20",
        "--duration",
        "1",
        "--user-prefix",
        "lgc",
    ]);
    delivered_once_with_redirects(&summary, 20);

    let summary = loadgen(&[
        "--transport",
        "ws",
        "--http-server",
        &http,
        "--users",
        "20",
        "--rate",
        "200",
        "--duration",
        "1",
        "--user-prefix",
        "lgw",
    ]);
    delivered_once_with_redirects(&summary, 20);
}
