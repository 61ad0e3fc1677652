//! What every scenario shares inside one process: the run context (targets,
//! user names, auth, the connection semaphore), the barrier between setup
//! and the measured phase (in-process, or through the parent when this is a
//! worker), the progress ticker, and the per-second timeline recorder.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::addr::Auth;
use crate::cli::Args;
use crate::conn::{Conn, ConnError, Target};
use crate::stats::{Snapshot, Stats};
use crate::summary::{Second, ServerMemory};

/// How long one connect + login may take before it counts as a timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per connection before it is given up (each failure is counted).
pub const CONNECT_ATTEMPTS: u32 = 3;
/// Settle time between "everyone connected" and the "after" memory reading.
pub const SETTLE: Duration = Duration::from_secs(2);

/// How this process relates to the others.
pub enum Coord {
    /// The whole run is in this process; it measures the server itself.
    Local { mem: ServerMemory },
    /// Worker `index` of a parent: report on stdout, wait for "go" on stdin.
    Child {
        lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    },
}

/// The run context of one process.
pub struct Ctx {
    pub args: Args,
    /// `--server`: TCP addresses (the offline senders always use these).
    pub servers: Vec<SocketAddr>,
    /// Where raw connections go: `--server`, or `--http-server` for ws.
    pub conn_servers: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub auth: Auth,
    pub prefix: String,
    pub worker_index: u32,
    pub worker_count: u32,
    pub stats: Arc<Stats>,
    pub connect_slots: Arc<Semaphore>,
    pub coord: Coord,
    /// TLS to the servers (`--tls`, `--ca`), for the transport in use.
    pub tls: Option<swiftlet_client::TlsConnector>,
    /// This process's VmRSS before connecting and at the barrier.
    pub rss_before: u64,
    pub rss_ready: u64,
}

/// CPU time spent over a window by this process and, when this process
/// watches it (`--server-pid`, no parent), by the server.
pub struct CpuWindow {
    own: u64,
    server: Option<(u32, u64)>,
}

impl CpuWindow {
    pub fn start(ctx: &Ctx) -> Self {
        let server = match (&ctx.coord, ctx.args.server_pid) {
            (Coord::Local { .. }, Some(pid)) => crate::procmem::cpu_us(pid).map(|t| (pid, t)),
            _ => None,
        };
        CpuWindow {
            own: crate::procmem::self_cpu_us(),
            server,
        }
    }

    /// (this process's CPU µs, the server's CPU µs) since `start`.
    pub fn stop(self) -> (u64, Option<u64>) {
        let own = crate::procmem::self_cpu_us().saturating_sub(self.own);
        let server = self
            .server
            .and_then(|(pid, t0)| Some(crate::procmem::cpu_us(pid)?.saturating_sub(t0)));
        (own, server)
    }
}

/// What [`Ctx::target`] needs, owned, for tasks that make targets as they go.
#[derive(Clone)]
pub struct Targets {
    conn_servers: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    auth: Auth,
    prefix: String,
    transport: crate::cli::Transport,
    tls: Option<swiftlet_client::TlsConnector>,
}

impl Targets {
    /// Where global connection `k` of user `user` connects from and to.
    pub fn target(&self, k: u64, user: &str) -> Target {
        let pick = |len: usize| (k % len.max(1) as u64) as usize;
        Target {
            server: self.conn_servers[pick(self.conn_servers.len())],
            source: self.sources.get(pick(self.sources.len())).copied(),
            token: self.auth.token(user),
            device: "d1".to_owned(),
            transport: self.transport,
            tls: self.tls.clone(),
        }
    }

    /// The user id of global index `k` of a kind (`c`onnection, `u`ser, ...).
    pub fn user(&self, kind: &str, k: u64) -> String {
        format!("{}-{kind}{k}", self.prefix)
    }
}

impl Ctx {
    pub fn targets(&self) -> Targets {
        Targets {
            conn_servers: self.conn_servers.clone(),
            sources: self.sources.clone(),
            auth: self.auth.clone(),
            prefix: self.prefix.clone(),
            transport: self.args.transport,
            tls: self.tls.clone(),
        }
    }

    /// Where global connection `k` of user `user` connects from and to.
    pub fn target(&self, k: u64, user: &str) -> Target {
        self.targets().target(k, user)
    }

    /// The user id of global index `k` of a kind (`c`onnection, `u`ser, ...).
    pub fn user(&self, kind: &str, k: u64) -> String {
        format!("{}-{kind}{k}", self.prefix)
    }

    /// The server's CPU over the measured window, if this process read it.
    pub fn set_server_cpu(&mut self, us: Option<u64>) {
        if let Coord::Local { mem } = &mut self.coord {
            mem.cpu_us = us;
        }
    }

    pub fn is_child(&self) -> bool {
        matches!(self.coord, Coord::Child { .. })
    }

    /// Setup is done (everyone connected): let the server settle and read
    /// its memory (local), or tell the parent and wait for its "go".
    pub async fn barrier(&mut self) -> anyhow::Result<()> {
        self.rss_ready = crate::procmem::self_rss_bytes();
        match &mut self.coord {
            Coord::Local { mem } => {
                if let Some(pid) = self.args.server_pid {
                    tokio::time::sleep(SETTLE).await;
                    crate::procmem::after(pid, mem);
                }
                Ok(())
            }
            Coord::Child { lines } => {
                println!("{{\"ready\":true}}");
                match lines.next_line().await? {
                    Some(l) if l.trim() == "go" => {}
                    other => anyhow::bail!("worker expected \"go\" from the parent, got {other:?}"),
                }
                // Nothing more comes from the coordinator: its end of the
                // pipe closing means it (or the agent between us) is gone,
                // and a worker nobody will read from stops at once.
                let mut rest =
                    std::mem::replace(lines, tokio::io::BufReader::new(tokio::io::stdin()).lines());
                tokio::spawn(async move {
                    while let Ok(Some(_)) = rest.next_line().await {}
                    eprintln!("loadgen worker: the coordinator is gone; stopping");
                    std::process::exit(1);
                });
                Ok(())
            }
        }
    }
}

/// Connect and log in with retries, holding a connect slot meanwhile.
/// Failures are counted by kind; `None` after the last attempt. NOT_HOME
/// redirects are followed (and counted) inside one attempt, and `target`
/// then names the home node; a HOME_UNAVAILABLE's `retry_after_ms` is
/// honoured before the next attempt.
pub async fn connect(
    slots: &Semaphore,
    stats: &Stats,
    target: &mut Target,
    read_chunk: usize,
) -> Option<Conn> {
    let _permit = slots.acquire().await.ok()?;
    for attempt in 1..=CONNECT_ATTEMPTS {
        let start = Instant::now();
        match Conn::connect(target, CONNECT_TIMEOUT).await {
            Ok((mut c, redirects)) => {
                stats.record_login(start.elapsed().as_micros() as u64);
                stats.redirects.fetch_add(u64::from(redirects), Relaxed);
                c.set_read_chunk(read_chunk);
                return Some(c);
            }
            Err(e) => {
                stats.error(e.kind());
                if attempt < CONNECT_ATTEMPTS {
                    tokio::time::sleep(retry_delay(&e, attempt)).await;
                }
            }
        }
    }
    None
}

/// How long to wait before attempt `attempt + 1`: 100 ms per attempt so
/// far, or the server's hint if it asked for longer.
fn retry_delay(e: &ConnError, attempt: u32) -> Duration {
    let ours = Duration::from_millis(100 * u64::from(attempt));
    match e {
        ConnError::Server { retry_after_ms, .. } => {
            ours.max(Duration::from_millis(u64::from(*retry_after_ms)))
        }
        _ => ours,
    }
}

/// Wait until `done` reaches `n` (polling; the setup phases are seconds long).
pub async fn wait_count(done: &std::sync::atomic::AtomicU64, n: u64) {
    while done.load(Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Print a progress line each second until `stop`: a human line on stderr,
/// or, in a worker, a JSON line on stdout for the parent to add up.
pub fn spawn_progress(
    stats: Arc<Stats>,
    child: bool,
    server_pid: Option<u32>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut prev = Snapshot::default().with_cost();
        let mut server = ServerCpu::new(server_pid);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = stats.snapshot().with_cost();
            if child {
                if let Ok(s) = serde_json::to_string(&now) {
                    println!("{{\"progress\":{s}}}");
                }
            } else {
                let server_us = server.tick();
                eprintln!("{}", progress_line(start.elapsed(), &prev, &now, server_us));
            }
            prev = now;
        }
    });
}

/// The server's CPU time between progress ticks (`--server-pid`).
pub struct ServerCpu {
    pid: Option<u32>,
    last: Option<u64>,
}

impl ServerCpu {
    pub fn new(pid: Option<u32>) -> Self {
        ServerCpu {
            pid,
            last: pid.and_then(crate::procmem::cpu_us),
        }
    }

    /// The server's CPU µs since the last tick.
    pub fn tick(&mut self) -> Option<u64> {
        let now = crate::procmem::cpu_us(self.pid?)?;
        let d = self.last.map(|l| now.saturating_sub(l));
        self.last = Some(now);
        d
    }
}

/// One human progress line from two snapshots a second apart (and the
/// server's CPU µs in between, if known): rates, then CPU per delivered
/// message of loadgen (all its processes) and of the server, and loadgen's
/// RSS.
pub fn progress_line(
    elapsed: Duration,
    prev: &Snapshot,
    now: &Snapshot,
    server_cpu_us: Option<u64>,
) -> String {
    let delivered = now.delivered.saturating_sub(prev.delivered);
    let own_us = now.cpu_us.saturating_sub(prev.cpu_us);
    let per_msg = |us: u64| {
        if delivered > 0 {
            format!("{:.1}", us as f64 / delivered as f64)
        } else {
            "-".to_owned()
        }
    };
    format!(
        "[{:6.1}s] open {} logins {} (+{}/s) | sent {}/s acked {}/s delivered {}/s | errors {} | cpu µs/msg loadgen {} server {} | loadgen {:.0}% cpu {:.1} MB",
        elapsed.as_secs_f64(),
        now.open,
        now.logins,
        now.logins.saturating_sub(prev.logins),
        now.sent.saturating_sub(prev.sent),
        now.acked.saturating_sub(prev.acked),
        delivered,
        now.errors,
        per_msg(own_us),
        server_cpu_us.map_or_else(|| "-".to_owned(), per_msg),
        own_us as f64 / 1e4,
        now.rss_bytes as f64 / 1e6,
    )
}

/// Records one [`Second`] per second from its start until `stop`.
pub fn spawn_timeline(
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Second>> {
    tokio::spawn(async move {
        let out = Mutex::new(Vec::new());
        let mut prev = stats.snapshot();
        stats.take_second();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let push = |prev: &mut Snapshot| {
            let now = stats.snapshot();
            if let Ok(mut v) = out.lock() {
                v.push(Second {
                    sent: now.sent - prev.sent.min(now.sent),
                    acked: now.acked - prev.acked.min(now.acked),
                    delivered: now.delivered - prev.delivered.min(now.delivered),
                    latency: stats.take_second(),
                });
            }
            *prev = now;
        };
        loop {
            tokio::select! {
                _ = tick.tick() => push(&mut prev),
                _ = stop.cancelled() => break,
            }
        }
        out.into_inner().unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_for_the_servers_hint_when_it_is_longer() {
        let home_down = ConnError::Server {
            code: 2011,
            message: String::new(),
            retry_after_ms: 1_000,
        };
        assert_eq!(retry_delay(&home_down, 1), Duration::from_millis(1_000));
        assert_eq!(retry_delay(&ConnError::Eof, 2), Duration::from_millis(200));
        let soon = ConnError::Server {
            code: 2011,
            message: String::new(),
            retry_after_ms: 0,
        };
        assert_eq!(retry_delay(&soon, 3), Duration::from_millis(300));
    }
}
