//! loadgen end to end: the real binary against a real server (started
//! in-process on port 0 with RocksDB in a temp dir), small enough to be fast
//! on two cores. Each run must exit 0 and its JSON summary must show every
//! send acknowledged and delivered exactly once; loadgen's own checks (order,
//! duplicates, loss) make it exit non-zero otherwise.

use std::process::Command;

use serde_json::Value;

struct Server {
    server: Option<swiftlet::Server>,
    _dir: tempfile::TempDir,
    /// With TLS: the CA file loadgen is to trust.
    ca: Option<String>,
}

impl Server {
    fn start() -> Server {
        Self::start_with(false)
    }

    /// A server whose listeners speak TLS, with a certificate for
    /// 127.0.0.1 from a CA made here.
    fn start_tls() -> Server {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca = None;
        let mut tls_files = (None, None);
        if tls {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().expect("key");
            let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
                .expect("params")
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("cert");
            let (ca_path, cert_path, key_path) = (
                dir.path().join("ca.pem"),
                dir.path().join("cert.pem"),
                dir.path().join("key.pem"),
            );
            std::fs::write(&ca_path, ca_cert.pem()).expect("write");
            std::fs::write(&cert_path, cert.pem()).expect("write");
            std::fs::write(&key_path, key.serialize_pem()).expect("write");
            ca = Some(ca_path.display().to_string());
            tls_files = (Some(cert_path), Some(key_path));
        }
        let config = swiftlet::Config {
            tls_cert: tls_files.0,
            tls_key: tls_files.1,
            listen: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_owned(),
            shards: 2,
            dev_auth: true,
            ..swiftlet::Config::default()
        };
        let server = swiftlet::start(config).expect("server starts");
        Server {
            server: Some(server),
            _dir: dir,
            ca,
        }
    }

    fn running(&self) -> &swiftlet::Server {
        self.server.as_ref().expect("running")
    }

    /// Run `loadgen SCENARIO ARGS` against this server; its JSON summary.
    fn loadgen(&self, scenario: &str, args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .arg(scenario)
            .args(["--server", &self.running().local_addr().to_string()])
            .args(["--http-server", &self.running().http_addr().to_string()])
            .arg("--dev-auth")
            .args(self.ca.iter().flat_map(|ca| ["--ca", ca.as_str()]))
            .args(args)
            .output()
            .expect("loadgen runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "loadgen {scenario} failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().expect("a summary line");
        serde_json::from_str(last).expect("the last line is JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// Everything sent was acknowledged, and delivered once to each of its
/// `recipients`; nothing lost, duplicated or failed.
fn all_delivered_once(summary: &Value, recipients: u64) {
    let sent = count(summary, "sent");
    assert!(sent > 0, "nothing sent: {summary}");
    assert_eq!(count(summary, "acked"), sent, "{summary}");
    assert_eq!(count(summary, "delivered"), recipients * sent, "{summary}");
    assert_eq!(count(summary, "lost"), 0, "{summary}");
    assert_eq!(count(summary, "duplicated"), 0, "{summary}");
    assert_eq!(count(summary, "errors_total"), 0, "{summary}");
}

#[test]
fn open_loop_chat_delivers_every_message_once() {
    let server = Server::start();
    let summary = server.loadgen(
        "chat",
        &["--users", "20", "--rate", "400", "--duration", "1"],
    );
    assert_eq!(summary["scenario"], "chat");
    all_delivered_once(&summary, 1);
}

#[test]
fn closed_loop_chat_over_two_workers_delivers_every_message_once() {
    let server = Server::start();
    let summary = server.loadgen(
        "chat",
        &["--users", "20", "--duration", "1", "--workers", "2"],
    );
    all_delivered_once(&summary, 1);
}

#[test]
fn paced_group_posts_over_two_workers_reach_every_other_member_once() {
    let server = Server::start();
    let summary = server.loadgen(
        "group",
        &[
            "--groups",
            "2",
            "--members",
            "5",
            "--rate",
            "20",
            "--duration",
            "1",
            "--workers",
            "2",
        ],
    );
    // Each post reaches the four other members of its group.
    all_delivered_once(&summary, 4);
    assert_eq!(
        count(&summary, "expected"),
        4 * count(&summary, "sent"),
        "{summary}"
    );
}

#[test]
fn chat_over_tls_and_wss_delivers_every_message_once() {
    let server = Server::start_tls();
    let summary = server.loadgen(
        "chat",
        &["--users", "20", "--rate", "200", "--duration", "1"],
    );
    all_delivered_once(&summary, 1);
    let summary = server.loadgen(
        "chat",
        &[
            "--users",
            "20",
            "--rate",
            "200",
            "--duration",
            "1",
            "--transport",
            "ws",
        ],
    );
    all_delivered_once(&summary, 1);
}

#[test]
fn idle_connections_are_held_with_heartbeats_over_tcp_and_ws() {
    let server = Server::start();
    for transport in ["tcp", "ws"] {
        let summary = server.loadgen(
            "idle",
            &[
                "--connections",
                "50",
                "--duration",
                "1",
                "--ping-interval",
                "0.1",
                "--transport",
                transport,
            ],
        );
        assert_eq!(count(&summary, "connections"), 50, "{summary}");
        assert_eq!(count(&summary, "logins"), 50, "{summary}");
        assert_eq!(count(&summary, "errors_total"), 0, "{summary}");
        assert!(
            summary["loadgen_rss_bytes_per_conn"].is_i64(),
            "loadgen's own memory per connection: {summary}"
        );
    }
}

/// `loadgen agent --listen 127.0.0.1:0 --once`, and the address it listens on.
fn start_agent() -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["agent", "--listen", "127.0.0.1:0", "--once"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent starts");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .expect("agent prints its address");
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .expect("an address")
        .to_owned();
    (child, addr)
}

#[test]
fn chat_over_two_agents_merges_into_one_summary() {
    let server = Server::start();
    let (mut a, addr_a) = start_agent();
    let (mut b, addr_b) = start_agent();
    let agents = format!("{addr_a},{addr_b}");
    let summary = server.loadgen(
        "chat",
        &["--users", "20", "--duration", "1", "--agents", &agents],
    );
    all_delivered_once(&summary, 1);
    assert_eq!(count(&summary, "connections"), 20, "{summary}");
    assert_eq!(
        summary["latency_ms"]["count"].as_u64(),
        Some(count(&summary, "delivered")),
        "one merged histogram over both agents: {summary}"
    );
    // Each agent served its one coordinator and exited cleanly.
    assert!(a.wait().expect("agent a").success());
    assert!(b.wait().expect("agent b").success());
}

#[test]
fn spawned_agents_split_the_source_addresses_and_merge() {
    let server = Server::start();
    let summary = server.loadgen(
        "group",
        &[
            "--groups",
            "2",
            "--members",
            "4",
            "--duration",
            "1",
            "--spawn-agents",
            "2",
            "--source",
            "127.0.0.1-127.0.0.2",
        ],
    );
    all_delivered_once(&summary, 3);
    assert_eq!(count(&summary, "connections"), 8, "{summary}");
}

/// `loadgen chat --server SERVER --dev-auth ARGS`: (success, stderr).
fn coordinate(server: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["chat", "--server", server, "--dev-auth"])
        .args(args)
        .output()
        .expect("loadgen runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_agent_that_cannot_be_reached_or_goes_away_fails_the_run_by_name() {
    let server = Server::start();
    let addr = server.running().local_addr().to_string();
    // Nothing listens on port 1.
    let (ok, err) = coordinate(&addr, &["--users", "4", "--agents", "127.0.0.1:1"]);
    assert!(!ok, "{err}");
    assert!(err.contains("cannot reach agent 127.0.0.1:1"), "{err}");

    // An agent killed in the middle of a long run.
    let (mut agent, agent_addr) = start_agent();
    let coordinator = std::thread::spawn(move || {
        coordinate(
            &addr,
            &["--users", "4", "--duration", "60", "--agents", &agent_addr],
        )
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    agent.kill().expect("kill the agent");
    let _ = agent.wait();
    let (ok, err) = coordinator.join().expect("coordinator thread");
    assert!(!ok, "{err}");
    assert!(err.contains("disconnected without a result"), "{err}");
}
