//! `loadgen agent --listen ADDR`: a loadgen on another machine (or another
//! source address of this one) that runs shares of scenarios for a
//! coordinator (`loadgen SCENARIO --agents ADDR,..`).
//!
//! Why a process per share rather than running the scenario in the agent:
//! the worker path (`--worker-index`: JSON lines on stdout, `go` on stdin)
//! already runs a share and reports exact histograms, so the agent only
//! starts it and relays lines between it and the coordinator's socket; a
//! run over agents is merged exactly like `--workers`. One coordinator at a
//! time, one worker per coordinator.
//!
//! The exchange on the socket: the coordinator's first line is
//! `{"argv":[..]}` (the worker's argv: its share, the worker count, the
//! user prefix); the agent appends its own `--source` if it has one (this
//! machine's addresses), starts the worker, then relays the worker's stdout
//! lines to the socket and the socket's lines to the worker's stdin. The
//! worker ending closes the socket; the coordinator disconnecting first
//! kills the worker. The first stdout line of the agent itself says where
//! it listens (`loadgen agent listening on ADDR`), which is how
//! `--spawn-agents` learns a kernel-chosen port.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::cli::AgentArgs;

const LISTENING: &str = "loadgen agent listening on ";

/// How long a finished worker may take to flush its last lines after the
/// coordinator hung up (it closes once it has the result).
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// The address in the agent's first stdout line.
pub fn parse_listening(line: &str) -> Option<String> {
    line.trim().strip_prefix(LISTENING).map(str::to_owned)
}

/// One run's request from the coordinator.
#[derive(serde::Deserialize)]
struct Request {
    argv: Vec<String>,
}

/// Serve coordinators until killed (or one, with `--once`).
pub async fn serve(a: AgentArgs) -> anyhow::Result<()> {
    if let Some(s) = &a.source {
        crate::addr::parse_sources(s).context("--source")?;
    }
    let listener = TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    println!("{LISTENING}{}", listener.local_addr()?);
    loop {
        let (sock, peer) = listener.accept().await?;
        match serve_one(sock, &a).await {
            Ok(()) => {}
            Err(e) => eprintln!("loadgen agent: the run for {peer} failed: {e:#}"),
        }
        if a.once {
            return Ok(());
        }
    }
}

/// Run one worker for the coordinator on `sock`.
async fn serve_one(sock: TcpStream, a: &AgentArgs) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    let (from, mut to) = sock.into_split();
    let mut lines = BufReader::new(from).lines();
    let first = lines
        .next_line()
        .await?
        .context("the coordinator hung up before sending its request")?;
    let req: Request = serde_json::from_str(&first).context("unreadable request")?;
    anyhow::ensure!(
        req.argv.iter().any(|a| a == "--worker-index"),
        "the request names no share (--worker-index)"
    );
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(&req.argv);
    if let Some(s) = &a.source {
        cmd.args(["--source", s]);
    }
    let mut worker = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the worker")?;
    let mut worker_in = worker.stdin.take().context("worker stdin")?;
    let worker_out = worker.stdout.take().context("worker stdout")?;
    let up = async {
        let mut out = BufReader::new(worker_out).lines();
        while let Some(line) = out.next_line().await? {
            to.write_all(line.as_bytes()).await?;
            to.write_all(b"\n").await?;
        }
        to.shutdown().await?;
        anyhow::Ok(())
    };
    let down = async {
        while let Some(line) = lines.next_line().await? {
            worker_in.write_all(line.as_bytes()).await?;
            worker_in.write_all(b"\n").await?;
            worker_in.flush().await?;
        }
        anyhow::Ok(())
    };
    tokio::pin!(up);
    tokio::select! {
        r = &mut up => r.context("relaying the worker's report")?,
        r = down => {
            // The coordinator hung up: normal once it has the result (the
            // worker is then ending), else the run is abandoned.
            if tokio::time::timeout(FLUSH_GRACE, &mut up).await.is_err() {
                let _ = worker.kill().await;
                r?;
                anyhow::bail!("the coordinator disconnected before the run ended");
            }
        }
    }
    let status = worker.wait().await?;
    anyhow::ensure!(status.success(), "the worker exited with {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_names_the_address() {
        let line = format!("{LISTENING}127.0.0.1:40123\n");
        assert_eq!(parse_listening(&line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(parse_listening("something else"), None);
    }
}
