//! The coordinator: runs a scenario over several worker processes and merges
//! what they report into one result.
//!
//! A worker is this binary run with the hidden `--worker-index i`, the
//! total as `--workers N` and a shared `--user-prefix`; it takes share `i`
//! of the connections (users, groups, messages). It is reached one of two
//! ways, after which everything is the same:
//! - `--workers N`: N child processes of this one, over their stdin/stdout;
//! - `--agents A,B,..` / `--spawn-agents N`: `loadgen agent` processes
//!   (see [`crate::agent`]) on this or other machines, over TCP; each
//!   starts the worker on its own machine and relays its lines. With
//!   `--spawn-agents` the coordinator starts the agents itself on
//!   127.0.0.1 (port 0) and gives each its slice of `--source`.
//!
//! The lines: the worker's `{"progress":..}` each second, `{"ready":true}`
//! when its setup is done, `{"result":..}` last (HdrHistogram V2 blobs, so
//! the merged percentiles are exact); one line to it, `go`, once every
//! worker is ready and the server's memory has been read. A worker (or
//! agent) that ends or disconnects without a result fails the run with an
//! error naming it; the others are stopped (their connections dropped).
//!
//! The server (`--server-pid`) is on the coordinator's machine, so the
//! coordinator reads its CPU over the workers' measured window, which it
//! times from its own `go` (warm-up, then `--duration`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::cli::{Args, Scenario};
use crate::run::{progress_line, ServerCpu, SETTLE};
use crate::stats::Snapshot;
use crate::summary::{ServerMemory, WorkerResult};

enum Msg {
    Progress(usize, Snapshot),
    Ready,
    Result(usize, Box<WorkerResult>),
    Eof(usize),
}

/// One worker as the coordinator sees it.
struct Link {
    /// "worker 2" or "agent 127.0.0.1:7701", for messages.
    name: String,
    /// Where `go` is written: a child's stdin or the agent's socket.
    to: Box<dyn AsyncWrite + Unpin + Send>,
    /// The process started for it (worker or local agent), killed on drop.
    _process: Option<Child>,
}

/// Does this run need a coordinator (workers or agents)?
pub fn coordinates(args: &Args) -> bool {
    args.worker_index.is_none()
        && (args.workers > 1 || args.agents.is_some() || args.spawn_agents > 0)
}

/// Run `args` over its workers or agents; return the merged result and the
/// server's readings.
pub async fn run(args: &Args, prefix: &str) -> anyhow::Result<(WorkerResult, ServerMemory)> {
    let mut mem = ServerMemory::default();
    if let Some(pid) = args.server_pid {
        crate::procmem::before(pid, &mut mem);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut links = open_links(args, prefix, &tx).await?;
    drop(tx);
    let n = links.len();

    let start = Instant::now();
    let mut latest = vec![Snapshot::default(); n];
    let mut prev = Snapshot::default();
    let mut server = ServerCpu::new(args.server_pid);
    let mut ready = 0;
    let mut results: Vec<Option<WorkerResult>> = vec![None; n];
    let mut server_window = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut open = n;
    while open > 0 {
        tokio::select! {
            _ = tick.tick() => {
                let mut sum = Snapshot::default();
                latest.iter().for_each(|s| sum.add(s));
                let line = progress_line(start.elapsed(), &prev, &sum, server.tick());
                eprintln!("{line} [{n} workers]");
                prev = sum;
            }
            msg = rx.recv() => match msg {
                None => break,
                Some(Msg::Progress(i, s)) => latest[i] = s,
                Some(Msg::Ready) => {
                    ready += 1;
                    if ready == n {
                        if let Some(pid) = args.server_pid {
                            tokio::time::sleep(SETTLE).await;
                            crate::procmem::after(pid, &mut mem);
                        }
                        for l in links.iter_mut() {
                            let go = async {
                                l.to.write_all(b"go\n").await?;
                                l.to.flush().await
                            };
                            go.await.with_context(|| format!("telling {} to go", l.name))?;
                        }
                        server_window = args.server_pid.and_then(|pid| server_cpu_window(args, pid));
                    }
                }
                Some(Msg::Result(i, r)) => results[i] = Some(*r),
                Some(Msg::Eof(i)) => {
                    open -= 1;
                    if results[i].is_none() {
                        // Dropping the links kills the local processes and
                        // closes the agents' sockets, which stops their workers.
                        anyhow::bail!(
                            "{} ended or disconnected without a result; stopping the run",
                            links[i].name
                        );
                    }
                }
            }
        }
    }
    if let Some(w) = server_window {
        mem.cpu_us = w.await.ok().flatten();
    }
    let mut merged = WorkerResult::default();
    for r in results.iter().flatten() {
        merged.merge(r);
    }
    Ok((merged, mem))
}

/// The server's CPU µs over the workers' measured window, timed from `go`:
/// chat and group send for `--duration` after `--warmup`; idle holds for
/// `--duration`. Storm and offline measure no fixed window.
fn server_cpu_window(args: &Args, pid: u32) -> Option<tokio::task::JoinHandle<Option<u64>>> {
    let skip = match args.scenario {
        Scenario::Chat | Scenario::Group => args.warmup.max(0.0),
        Scenario::Idle => 0.0,
        Scenario::Storm | Scenario::Offline => return None,
    };
    let duration = args.duration.max(0.0);
    Some(tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs_f64(skip)).await;
        let t0 = crate::procmem::cpu_us(pid)?;
        tokio::time::sleep(Duration::from_secs_f64(duration)).await;
        Some(crate::procmem::cpu_us(pid)?.saturating_sub(t0))
    }))
}

/// The argv of worker `i` of `n`: ours, plus its index, the count and the
/// shared user prefix (a flag given twice keeps its last value).
fn worker_argv(i: usize, n: usize, prefix: &str) -> Vec<String> {
    std::env::args()
        .skip(1)
        .chain([
            "--worker-index".to_owned(),
            i.to_string(),
            "--workers".to_owned(),
            n.to_string(),
            "--user-prefix".to_owned(),
            prefix.to_owned(),
        ])
        .collect()
}

/// Start the workers (or reach the agents), hand each its share, and
/// start forwarding what each reports to `tx`.
async fn open_links(
    args: &Args,
    prefix: &str,
    tx: &mpsc::UnboundedSender<Msg>,
) -> anyhow::Result<Vec<Link>> {
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let mut agents: Vec<(String, Option<Child>)> = Vec::new();
    if let Some(list) = &args.agents {
        for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            agents.push((a.to_owned(), None));
        }
        anyhow::ensure!(!agents.is_empty(), "--agents names no address");
    }
    let spawn = args.spawn_agents as usize;
    if spawn > 0 {
        let sources = match &args.source {
            Some(s) => crate::addr::parse_sources(s).context("--source")?,
            None => Vec::new(),
        };
        for i in 0..spawn {
            let (addr, child) = spawn_agent(&exe, i, source_slice(&sources, i, spawn))
                .await
                .with_context(|| format!("starting local agent {i}"))?;
            agents.push((addr, Some(child)));
        }
    }
    if !agents.is_empty() {
        anyhow::ensure!(
            args.workers <= 1,
            "give --workers or --agents/--spawn-agents, not both (run more agents instead)"
        );
        let n = agents.len();
        let mut links = Vec::with_capacity(n);
        for (i, (addr, process)) in agents.into_iter().enumerate() {
            let name = format!("agent {addr}");
            let sock = TcpStream::connect(&addr)
                .await
                .with_context(|| format!("cannot reach {name}"))?;
            sock.set_nodelay(true)?;
            let (from, mut to) = sock.into_split();
            let request = serde_json::json!({ "argv": worker_argv(i, n, prefix) });
            to.write_all(format!("{request}\n").as_bytes())
                .await
                .with_context(|| format!("sending {name} its share"))?;
            forward(i, from, name.clone(), tx.clone());
            links.push(Link {
                name,
                to: Box::new(to),
                _process: process,
            });
        }
        return Ok(links);
    }
    let n = args.workers as usize;
    let mut links = Vec::with_capacity(n);
    for i in 0..n {
        let mut child = Command::new(&exe)
            .args(worker_argv(i, n, prefix))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {i}"))?;
        let from = child.stdout.take().context("worker stdout")?;
        let to = child.stdin.take().context("worker stdin")?;
        let name = format!("worker {i}");
        forward(i, from, name.clone(), tx.clone());
        links.push(Link {
            name,
            to: Box::new(to),
            _process: Some(child),
        });
    }
    Ok(links)
}

/// Local agent `i` of `n` gets every `n`-th source address from the `i`-th
/// (all of them when there are fewer addresses than agents).
fn source_slice(sources: &[std::net::IpAddr], i: usize, n: usize) -> Option<String> {
    if sources.is_empty() {
        return None;
    }
    let mine: Vec<String> = if sources.len() >= n {
        sources
            .iter()
            .skip(i)
            .step_by(n)
            .map(|a| a.to_string())
            .collect()
    } else {
        sources.iter().map(|a| a.to_string()).collect()
    };
    Some(mine.join(","))
}

/// Start `loadgen agent --listen 127.0.0.1:0 --once` and read the address
/// it listens on from its first stdout line.
async fn spawn_agent(
    exe: &std::path::Path,
    i: usize,
    source: Option<String>,
) -> anyhow::Result<(String, Child)> {
    let mut cmd = Command::new(exe);
    cmd.args(["agent", "--listen", "127.0.0.1:0", "--once"]);
    if let Some(s) = source {
        cmd.args(["--source", &s]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("agent stdout")?;
    let mut lines = BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("no address within 10 s")??
        .with_context(|| format!("local agent {i} exited before listening"))?;
    let addr = crate::agent::parse_listening(&line)
        .with_context(|| format!("local agent {i} said {line:?}"))?;
    Ok((addr, child))
}

/// Read worker `i`'s lines and pass them on as [`Msg`]s; lines that are not
/// JSON are printed with its name.
fn forward<R>(i: usize, from: R, name: String, tx: mpsc::UnboundedSender<Msg>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                eprintln!("{name}: {line}");
                continue;
            };
            let msg = if let Some(p) = v.get("progress") {
                serde_json::from_value(p.clone())
                    .ok()
                    .map(|s| Msg::Progress(i, s))
            } else if v.get("ready").is_some() {
                Some(Msg::Ready)
            } else if let Some(r) = v.get("result") {
                match serde_json::from_value::<WorkerResult>(r.clone()) {
                    Ok(r) => Some(Msg::Result(i, Box::new(r))),
                    Err(e) => {
                        eprintln!("{name}: unreadable result: {e}");
                        None
                    }
                }
            } else {
                None
            };
            if let Some(m) = msg {
                let _ = tx.send(m);
            }
        }
        let _ = tx.send(Msg::Eof(i));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_agents_split_the_source_addresses() {
        let s = crate::addr::parse_sources("127.0.0.1-127.0.0.4").expect("range");
        assert_eq!(
            source_slice(&s, 0, 2).as_deref(),
            Some("127.0.0.1,127.0.0.3")
        );
        assert_eq!(
            source_slice(&s, 1, 2).as_deref(),
            Some("127.0.0.2,127.0.0.4")
        );
        assert_eq!(source_slice(&s[..1], 1, 2).as_deref(), Some("127.0.0.1"));
        assert_eq!(source_slice(&[], 0, 2), None);
    }
}
