//! The server under test: the real `swiftlet serve` binary as a child
//! process, so the exercise can `kill -9` it and start it again on the same
//! data directory and ports, and read its RSS and open files from /proc.
//!
//! It runs with `--dev-auth` (a bare user id is the token) on loopback
//! ports picked free at start. For the crash rounds it keeps every inbox
//! event (`--inbox-keep 0 --inbox-max-age 0`), so every acknowledged
//! message stays checkable; the soak runs retention with its defaults,
//! which is what keeps a long-running server's database, and so its open
//! files, from growing without end. Its log (stderr) goes to
//! `<work>/server.log`, appended across restarts, and is counted by level.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use swiftlet_client::{Client, ClientConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// How long a (re)start may take before the exercise gives up.
const START_PATIENCE: Duration = Duration::from_secs(60);

pub struct ServerProc {
    bin: PathBuf,
    work: PathBuf,
    shards: usize,
    extra: Vec<String>,
    keep_everything: bool,
    tcp: u16,
    http: u16,
    child: Option<Child>,
    pub starts: u64,
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

impl ServerProc {
    pub fn new(
        bin: PathBuf,
        work: &Path,
        shards: usize,
        extra: Vec<String>,
        keep_everything: bool,
    ) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "no server binary at {} (cargo build --release --bin swiftlet, or pass --server-bin)",
                bin.display()
            );
        }
        Ok(ServerProc {
            bin,
            work: work.to_owned(),
            shards,
            extra,
            keep_everything,
            tcp: free_port()?,
            http: free_port()?,
            child: None,
            starts: 0,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.tcp)
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.join("server.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Start the server and wait until a login succeeds.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open server.log")?;
        let keep: &[&str] = if self.keep_everything {
            &["--inbox-keep", "0", "--inbox-max-age", "0"]
        } else {
            &[]
        };
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--dev-auth")
            .args(keep)
            .args(["--log-format", "json"])
            .arg("--shards")
            .arg(self.shards.to_string())
            .arg("--listen")
            .arg(self.addr())
            .arg("--http")
            .arg(format!("127.0.0.1:{}", self.http))
            .arg("--data-dir")
            .arg(self.work.join("data"))
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        let cfg = ClientConfig::new(self.addr(), "probe", "probe");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the server exited at start ({status}); see {}",
                        self.log_path().display()
                    );
                }
            }
            match Client::connect(cfg.clone()).await {
                Ok((c, _)) => {
                    c.close().await;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("no login within {START_PATIENCE:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// SIGKILL the server and reap it.
    pub async fn kill_9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("SIGKILL the server")?;
        }
        Ok(())
    }

    /// SIGTERM (graceful shutdown) and wait for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .context("run kill -TERM")?;
                if !status.success() {
                    bail!("kill -TERM {pid} failed");
                }
            }
            let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .context("graceful shutdown took over 30 s")??;
            if !exit.success() {
                bail!("graceful shutdown exited with {exit}");
            }
        }
        Ok(())
    }

    /// The server's resident set size in KiB (VmRSS), if it is running.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// The anonymous part of RSS (heaps, stacks), KiB; the rest is
    /// file-backed (the binary's and libraries' pages).
    pub fn rss_anon_kib(&self) -> Option<u64> {
        self.status_kib("RssAnon:")
    }

    /// One `… kB` field of `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    }

    /// Gauges from the server's `/metrics` (Prometheus text), by name,
    /// without labels; None if it does not answer.
    pub async fn metrics(&self) -> Option<HashMap<String, f64>> {
        let fetch = async {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.http))
                .await
                .ok()?;
            conn.write_all(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
            let mut text = String::new();
            conn.read_to_string(&mut text).await.ok()?;
            Some(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()??;
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some(
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.contains('{'))
                .filter_map(|l| {
                    let (name, value) = l.split_once(' ')?;
                    Some((name.to_owned(), value.trim().parse().ok()?))
                })
                .collect(),
        )
    }

    /// How many files the server holds open.
    pub fn open_fds(&self) -> Option<u64> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.pid()?)).ok()?;
        Some(dir.count() as u64)
    }

    /// The server's log lines at WARN or ERROR as (level, message), less
    /// the two the exercise causes on purpose: the `--dev-auth` warning at
    /// every start, and the inbox epoch change after a `kill -9`.
    pub fn log_problems(&self) -> Vec<(String, String)> {
        let Ok(text) = std::fs::read_to_string(self.log_path()) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let level = v.get("level")?.as_str()?.to_owned();
                let message = v
                    .get("message")
                    .or_else(|| v.get("fields")?.get("message"))?;
                Some((level, message.as_str()?.to_owned()))
            })
            .filter(|(level, m)| {
                (level == "ERROR" || level == "WARN")
                    && !m.contains("--dev-auth")
                    && !m.contains("did not shut down cleanly")
            })
            .collect()
    }
}
