//! Storage faults, provoked for real: the data directory is a 16 MiB tmpfs
//! the test mounts, and a ballast file fills it.
//!
//! - While the disk is full, a send gets `STORE_UNAVAILABLE` and no Ack,
//!   and the server keeps serving: logins, Sync, Ping, typing. Thousands of
//!   refused sends cost a few log lines, not one each.
//! - Once the ballast is gone, sends succeed again, on the same process: no
//!   restart.
//! - A server started while the disk is full comes up, serves reads and
//!   refuses writes, and starts accepting them once space returns.
//! - Every message acknowledged before, during and after is stored exactly
//!   once, and nothing refused is stored.
//!
//! The server is the real binary, started as a child process. Mounting
//! needs root (CI runs `make test` as root) or, failing that, unprivileged
//! user namespaces (`unshare`); with neither, these tests fail and say so:
//! they never skip.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use swiftlet_client::{pb, with_user, Client, ClientConfig, Deliveries, DeliveryItem};
use swiftlet_protocol::ErrorCode;

/// Size of the test's filesystem: room for the database's first files and a
/// few MiB of write-ahead log, as in the measurement.
const DISK_MIB: u32 = 16;

/// A small tmpfs the test owns, unmounted when dropped (also when the test
/// fails), so a failing run leaves no mount behind.
struct Disk {
    /// The mount point, as the server sees it.
    server_path: PathBuf,
    /// The same directory as this process reaches it (through the holder's
    /// `/proc/<pid>/root` when the mount lives in a namespace of its own).
    host_path: PathBuf,
    /// The process holding the user and mount namespace of the mount, when
    /// mounting here was not permitted.
    holder: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Disk {
    fn new() -> Disk {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().to_owned();
        let options = format!("size={DISK_MIB}m,mode=0700");
        let here = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "swiftlet-test"])
            .arg(&mount_point)
            .output();
        match here {
            Ok(out) if out.status.success() => {
                return Disk {
                    server_path: mount_point.clone(),
                    host_path: mount_point,
                    holder: None,
                    _dir: dir,
                }
            }
            _ => {}
        }
        let why_not_here = match here {
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(e) => e.to_string(),
        };
        // No permission here: a user and mount namespace of our own, held
        // open by a sleeping shell, with the server started inside it.
        let script = format!(
            "mount -t tmpfs -o {options} swiftlet-test \"$0\" && echo mounted && exec sleep 3600"
        );
        let holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
            .arg(&mount_point)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut holder = match holder {
            Ok(h) => h,
            Err(e) => panic!(
                "the storage-fault tests mount a {DISK_MIB} MiB tmpfs: run them as root (CI runs \
                 `make test` as root) or where user namespaces are allowed. \
                 mount: {why_not_here}; unshare: {e}"
            ),
        };
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped");
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = holder.kill();
            let out = holder.wait_with_output().expect("reap unshare");
            panic!(
                "the storage-fault tests mount a {DISK_MIB} MiB tmpfs: run them as root (CI runs \
                 `make test` as root) or where user namespaces are allowed. \
                 mount: {why_not_here}; unshare: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let host_path = PathBuf::from(format!("/proc/{}/root", holder.id()))
            .join(mount_point.strip_prefix("/").expect("absolute"));
        Disk {
            server_path: mount_point,
            host_path,
            holder: Some(holder),
            _dir: dir,
        }
    }

    /// A command that runs `program` where it sees this disk.
    fn command(&self, program: &str) -> Command {
        match &self.holder {
            None => Command::new(program),
            Some(h) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--target={}", h.id()))
                    .args(["--user", "--mount", "--preserve-credentials", "--"])
                    .arg(program);
                c
            }
        }
    }

    fn ballast(&self) -> PathBuf {
        self.host_path.join("ballast")
    }

    /// Fill every free byte with a ballast file (again: it grows).
    fn fill(&self) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ballast())
            .expect("create the ballast");
        for chunk in [1 << 20, 4096, 512] {
            let bytes = vec![0x5a_u8; chunk];
            while f.write_all(&bytes).and_then(|()| f.flush()).is_ok() {}
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.ballast()).expect("remove the ballast");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        match self.holder.take() {
            // The namespace, and the tmpfs with it, goes with its last process.
            Some(mut h) => {
                let _ = h.kill();
                let _ = h.wait();
            }
            None => {
                let plain = Command::new("umount").arg(&self.server_path).status();
                if !plain.is_ok_and(|s| s.success()) {
                    // Still busy (a server that did not exit): detach it.
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(&self.server_path)
                        .status();
                }
            }
        }
    }
}

/// The real server binary with its data on `disk`, logging to a file of
/// its own (outside the disk) so the test can count the lines.
struct ServerProcess {
    child: Child,
    port: u16,
    http: u16,
    log: PathBuf,
}

impl ServerProcess {
    fn start(disk: &Disk, port: u16, http: u16, log: &Path) -> ServerProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("server log");
        let child = disk
            .command(env!("CARGO_BIN_EXE_swiftlet"))
            .args(["serve", "--shards", "2", "--jwt-secret", SECRET])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--data-dir")
            .arg(disk.server_path.join("data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn swiftlet");
        ServerProcess {
            child,
            port,
            http,
            log: log.to_owned(),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn http_addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.http).parse().expect("addr")
    }

    /// The process is still the one started (never restarted, never exited).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the server exited ({status}); its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Log in as `user`, waiting for a server that is still starting (and
    /// failing at once if it exits instead).
    async fn connect(&mut self, user: &str, device: &str) -> (Client, Deliveries) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.assert_running();
            match Client::connect(ClientConfig::new(self.addr(), token(user), device)).await {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("no login within {PATIENCE:?}: {e}"),
            }
        }
    }

    /// Stop gracefully (SIGTERM), as an operator would, and wait.
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "no exit within {PATIENCE:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines at WARN or ERROR so far, but for the slow-turn warnings a
    /// busy test machine causes (at most one a second per shard, and not
    /// about storage).
    fn alarms(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .filter(|l| !l.contains("slow event-loop turn"))
            .map(str::to_owned)
            .collect()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(self.http_addr(), name).await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the sender knows: the Ack of every acknowledged message, and the
/// ids of sends refused: to be retried, or given up (never retried, so
/// never to be stored).
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, u64>,
    refused: Vec<String>,
    abandoned: Vec<String>,
    next: usize,
}

impl Ledger {
    /// Send one new message to bob: `Ok` with its Ack, or the refusal's
    /// code (a refused send is remembered for a retry).
    async fn send(&mut self, alice: &Client, phase: &str) -> Result<u64, ErrorCode> {
        self.next += 1;
        let cmid = format!("{phase}-{}", self.next);
        // A body of some size, so the WAL fills quickly.
        let body = format!("{cmid} {}", "x".repeat(900));
        match alice.send_with_id(&cmid, "bob", "text/plain", body).await {
            Ok(ack) => {
                self.acked.insert(cmid, ack.server_msg_id);
                Ok(ack.server_msg_id)
            }
            Err(e) => {
                let code = ErrorCode::try_from(
                    e.code()
                        .unwrap_or_else(|| panic!("{cmid}: not a server error: {e}")),
                )
                .expect("a known code");
                self.refused.push(cmid);
                Err(code)
            }
        }
    }

    /// Give up on all refused sends but the first `keep`.
    fn abandon_all_but(&mut self, keep: usize) {
        if self.refused.len() > keep {
            self.abandoned.extend(self.refused.drain(keep..));
        }
    }

    /// Retry every refused send with its own id until it is acknowledged;
    /// returns how long the first Ack took.
    async fn retry_refused(&mut self, alice: &Client) -> Duration {
        let started = Instant::now();
        let mut first = None;
        for cmid in std::mem::take(&mut self.refused) {
            let body = format!("{cmid} {}", "x".repeat(900));
            loop {
                match alice
                    .send_with_id(&cmid, "bob", "text/plain", body.clone())
                    .await
                {
                    Ok(ack) => {
                        first.get_or_insert_with(|| started.elapsed());
                        self.acked.insert(cmid, ack.server_msg_id);
                        break;
                    }
                    Err(e) => {
                        assert_eq!(
                            e.code(),
                            Some(ErrorCode::StoreUnavailable as i32),
                            "{cmid}: {e}"
                        );
                        assert!(
                            started.elapsed() < PATIENCE,
                            "sends still refused {PATIENCE:?} after space returned"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        first.unwrap_or_default()
    }

    /// Every acknowledged message is in bob's inbox exactly once, with the
    /// id its Ack named, in a gap-free run of seqs; nothing else is.
    async fn assert_stored_exactly_once(&self, bob: &Client) {
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut after = 0;
        loop {
            let page = bob.sync(after, 500).await.expect("sync");
            for e in &page.events {
                assert_eq!(e.seq, after + 1, "a gap or a repeat in bob's inbox");
                after = e.seq;
                if let Some(pb::event::Kind::Message(m)) = &e.kind {
                    assert!(
                        seen.insert(m.client_msg_id.clone(), m.id).is_none(),
                        "{} stored twice",
                        m.client_msg_id
                    );
                }
            }
            if !page.has_more {
                break;
            }
        }
        for cmid in self.refused.iter().chain(&self.abandoned) {
            assert!(!seen.contains_key(cmid), "refused {cmid} was stored");
        }
        assert_eq!(
            seen, self.acked,
            "bob's inbox is exactly the acknowledged messages"
        );
    }
}

/// Send until the full disk refuses one; returns how many were acknowledged
/// on the way (the WAL had some room left in its last page or file).
async fn send_until_refused(alice: &Client, ledger: &mut Ledger) -> usize {
    for acked in 0..100_000 {
        match ledger.send(alice, "filling").await {
            Ok(_) => {}
            Err(ErrorCode::StoreUnavailable) => return acked,
            Err(code) => panic!("expected STORE_UNAVAILABLE, got {code:?}"),
        }
    }
    panic!("100,000 sends acknowledged on a full {DISK_MIB} MiB disk");
}

/// Fill the disk until the store refuses writes and then fails to take them
/// again (`swiftlet_store_recovery_failures_total` moves); returns how many
/// sends were acknowledged on the way. A reopen replays the WAL into SST
/// files and deletes it, which gives back the space RocksDB had reserved
/// ahead of the WAL's end (about 4 MiB here), so after its first refusal
/// the store may rightly take writes again for a while: the ballast takes
/// that space too, until no reopen finds any.
async fn fill_until_refusing(
    disk: &Disk,
    srv: &ServerProcess,
    alice: &Client,
    ledger: &mut Ledger,
) -> usize {
    let mut acked = 0;
    for _ in 0..10 {
        disk.fill();
        let recoveries = srv.metric("swiftlet_store_recoveries_total").await;
        let failures = srv.metric("swiftlet_store_recovery_failures_total").await;
        acked += send_until_refused(alice, ledger).await;
        // The store's first attempt comes 250 ms after the refusal.
        for _ in 0..600 {
            if srv.metric("swiftlet_store_recovery_failures_total").await > failures {
                return acked;
            }
            if srv.metric("swiftlet_store_recoveries_total").await > recoveries {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the store kept finding space on a full disk");
}

/// While the disk is full: logins, reads (Sync), Ping and typing work, and
/// the server says over /metrics that it refuses writes.
async fn assert_serving_without_writes(srv: &mut ServerProcess, alice: &Client, ledger: &Ledger) {
    let (bob, mut bob_rx) = srv.connect("bob", "tablet").await;
    bob.ping().await.expect("ping");
    alice.ping().await.expect("ping");
    alice
        .typing(with_user("bob"), true)
        .await
        .expect("typing while the disk is full");
    loop {
        match next_item(&mut bob_rx).await {
            DeliveryItem::Typing(t) => {
                assert_eq!(t.user, "alice");
                break;
            }
            // Catch-up of what bob's new device has not seen yet.
            DeliveryItem::Event(_) => {}
            other => panic!("expected alice's typing, got {other:?}"),
        }
    }
    ledger.assert_stored_exactly_once(&bob).await;
    assert_eq!(srv.metric("swiftlet_store_writable").await, 0.0);
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_keeps_serving_and_recovers_when_space_returns() {
    let disk = Disk::new();
    let logs = tempfile::tempdir().expect("tempdir");
    let mut srv = ServerProcess::start(
        &disk,
        free_port(),
        free_port(),
        &logs.path().join("server.log"),
    );
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let mut ledger = Ledger::default();
    for _ in 0..20 {
        ledger
            .send(&alice, "before")
            .await
            .expect("acked before the disk fills");
    }

    let filled = fill_until_refusing(&disk, &srv, &alice, &mut ledger).await;
    let alarms_before = srv.alarms().len();
    // It stays refused while the disk is full: each send gets the typed
    // error and no Ack, thousands of times, for a few seconds.
    let outage = Instant::now();
    let mut refused = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            ledger.send(&alice, "during").await,
            Err(ErrorCode::StoreUnavailable),
            "a send acknowledged on a full disk"
        );
        refused += 1;
    }
    // Those are retried once space returns (a few of them: retrying
    // thousands one by one would only make the test slow); the rest are
    // given up and must never appear.
    ledger.abandon_all_but(10);
    assert_serving_without_writes(&mut srv, &alice, &ledger).await;
    let alarms = srv.alarms()[alarms_before..].to_vec();
    assert!(
        alarms.len() <= 5,
        "{} log lines at WARN or above for {refused} refused sends:\n{}",
        alarms.len(),
        alarms.join("\n")
    );
    assert!(srv.metric("swiftlet_store_write_failures_total").await >= 1.0);

    // Space returns: the same process takes sends again.
    disk.free();
    let recovered_in = ledger.retry_refused(&alice).await;
    srv.assert_running();
    for _ in 0..20 {
        ledger
            .send(&alice, "after")
            .await
            .expect("acked after recovery");
    }
    assert_eq!(srv.metric("swiftlet_store_writable").await, 1.0);
    assert!(srv.metric("swiftlet_store_recoveries_total").await >= 1.0);
    let (bob, _brx) = srv.connect("bob", "phone").await;
    ledger.assert_stored_exactly_once(&bob).await;
    eprintln!(
        "{filled} sends acknowledged while filling, {refused} refused in 3 s with {} log lines \
         at WARN or above, writes back {recovered_in:?} after the ballast went",
        alarms.len()
    );

    // And all of it survives a restart.
    alice.close().await;
    bob.close().await;
    srv.terminate();
    let (port, http) = (srv.port, srv.http);
    drop(srv);
    let mut srv = ServerProcess::start(&disk, port, http, &logs.path().join("server.log"));
    let (bob, _brx) = srv.connect("bob", "phone").await;
    ledger.assert_stored_exactly_once(&bob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_serves_reads_and_takes_writes_once_space_returns() {
    let disk = Disk::new();
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("server.log");
    let (port, http) = (free_port(), free_port());
    let mut srv = ServerProcess::start(&disk, port, http, &log);
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let mut ledger = Ledger::default();
    for _ in 0..20 {
        ledger
            .send(&alice, "before")
            .await
            .expect("acked before the disk fills");
    }
    fill_until_refusing(&disk, &srv, &alice, &mut ledger).await;
    alice.close().await;

    // The operator restarts it, the disk still full: it must come up.
    srv.terminate();
    drop(srv);
    let mut srv = ServerProcess::start(&disk, port, http, &log);
    let (alice, _arx) = srv.connect("alice", "phone").await;
    assert_eq!(
        ledger.send(&alice, "full-after-restart").await,
        Err(ErrorCode::StoreUnavailable)
    );
    assert_serving_without_writes(&mut srv, &alice, &ledger).await;

    disk.free();
    ledger.retry_refused(&alice).await;
    srv.assert_running();
    for _ in 0..20 {
        ledger
            .send(&alice, "after")
            .await
            .expect("acked after recovery");
    }
    assert_eq!(srv.metric("swiftlet_store_writable").await, 1.0);
    let (bob, _brx) = srv.connect("bob", "phone").await;
    ledger.assert_stored_exactly_once(&bob).await;
}
