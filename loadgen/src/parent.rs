//! `--workers N`: re-execute this binary N times with the hidden
//! `--worker-index i` (and a shared `--user-prefix`), each worker taking a
//! share of the connections, and merge what they report.
//!
//! The protocol between parent and workers is JSON lines on the worker's
//! stdout (`{"progress":..}` each second, `{"ready":true}` when its setup is
//! done, `{"result":..}` last) and one line on its stdin (`go`, once every
//! worker is ready and the server's memory has been read). Worker stderr
//! passes straight through.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::cli::Args;
use crate::run::{progress_line, SETTLE};
use crate::stats::Snapshot;
use crate::summary::{ServerMemory, WorkerResult};

enum Msg {
    Progress(usize, Snapshot),
    Ready,
    Result(usize, Box<WorkerResult>),
    Eof,
}

/// Run `args` over `args.workers` worker processes; return the merged result
/// and the server memory readings.
pub async fn run(args: &Args, prefix: &str) -> anyhow::Result<(WorkerResult, ServerMemory)> {
    let n = args.workers as usize;
    let mut mem = ServerMemory::default();
    if let Some(pid) = args.server_pid {
        crate::procmem::before(pid, &mut mem);
    }
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut stdins: Vec<ChildStdin> = Vec::with_capacity(n);
    for i in 0..n {
        let mut child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .args(["--worker-index", &i.to_string(), "--user-prefix", prefix])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {i}"))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        stdins.push(child.stdin.take().context("worker stdin")?);
        children.push(child);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    eprintln!("worker {i}: {line}");
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
                            eprintln!("worker {i}: unreadable result: {e}");
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
            let _ = tx.send(Msg::Eof);
        });
    }
    drop(tx);

    let start = Instant::now();
    let mut latest = vec![Snapshot::default(); n];
    let mut prev = Snapshot::default();
    let mut ready = 0;
    let mut results: Vec<Option<WorkerResult>> = vec![None; n];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut open_workers = n;
    while open_workers > 0 {
        tokio::select! {
            _ = tick.tick() => {
                let mut sum = Snapshot::default();
                latest.iter().for_each(|s| sum.add(s));
                eprintln!("{} [{} workers]", progress_line(start.elapsed(), &prev, &sum), n);
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
                        for s in stdins.iter_mut() {
                            s.write_all(b"go\n").await.context("telling a worker to go")?;
                            s.flush().await?;
                        }
                    }
                }
                Some(Msg::Result(i, r)) => results[i] = Some(*r),
                Some(Msg::Eof) => open_workers -= 1,
            }
        }
    }
    for (i, mut c) in children.into_iter().enumerate() {
        let status = c.wait().await?;
        if results[i].is_none() {
            anyhow::bail!("worker {i} ended ({status}) without a result");
        }
    }
    let mut merged = WorkerResult::default();
    for r in results.iter().flatten() {
        merged.merge(r);
    }
    Ok((merged, mem))
}
