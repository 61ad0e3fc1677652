//! `swiftlet-cli`: an interactive chat client for a terminal.
//!
//! Owns only presentation and the reconnect loop; every protocol detail lives
//! in the `swiftlet_client` library. Lines typed on stdin are commands
//! (`/send bob hi there`, `/group create team bob carol`, `/read bob`,
//! `/help`, `/quit`); incoming messages, group changes, receipts, typing and
//! presence are printed as they arrive, and inbox events are acknowledged
//! with `DeliveryAck` at once (printing is this client's "processing"). When
//! the connection drops, the CLI reconnects with backoff and the server
//! resumes delivery from the acknowledged cursor; a send that failed with the
//! connection is retried after the reconnect under the same `client_msg_id`,
//! so it is never stored twice. Presence subscriptions belong to a
//! connection, so the watched users are subscribed again after a reconnect.
//! Times are shown in UTC (no time-zone database here).
//!
//! # Layout
//!
//! This file parses the flags and wires stdin to the session; the rest is
//! one module per job, the pure ones (no client, no printing) tested alone:
//!
//! - `parse`: the command grammar, a stdin line to a `Command` (pure).
//! - `render`: the lines printed for events, receipts, Acks, presence,
//!   typing, groups and listings (pure).
//! - `receipts`: the `✓✓` / `read` state of the user's own messages, and the
//!   `AckGate` that keeps them behind the `✓` of their send (state).
//! - `presence`: who is typing where, this user's typing, whose presence is
//!   watched (state).
//! - `target`: `Target`, a conversation as the user names it (`bob`, `#7`).
//! - `session`: connect, follow the deliveries and the user's lines,
//!   reconnect with backoff.
//! - `home`: in a cluster, where to log in (the entry address, the home
//!   a login was redirected to), the redirect line printed once, and the
//!   wait after `HOME_UNAVAILABLE` (pure).
//! - `actions`: each request to the server as a task of its own, the send
//!   with its retries.

use anyhow::bail;
use clap::Parser;
use swiftlet_client::{token, ClientConfig};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

mod actions;
mod home;
mod parse;
mod presence;
mod receipts;
mod render;
mod session;
mod target;

/// How long a `--jwt-secret` token minted here stays valid.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// Lines read ahead of the session (it takes one at a time).
const STDIN_BUFFER: usize = 64;

/// Interactive swiftlet chat client.
#[derive(Debug, Parser)]
#[command(name = "swiftlet-cli", version)]
struct Args {
    /// Your user id.
    #[arg(long)]
    user: String,
    /// The server's TCP address (in a cluster, any node: a login is
    /// redirected to the user's home node).
    #[arg(long, default_value = "127.0.0.1:7400")]
    server: String,
    /// This device's id (one delivery cursor per device).
    #[arg(long, default_value = "cli")]
    device: String,
    /// A ready-made login token (HS256 JWT).
    #[arg(long)]
    token: Option<String>,
    /// Mint a token for --user with the server's secret.
    #[arg(long, env = "SWIFTLET_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The server runs with --dev-auth: log in with the bare user id.
    #[arg(long)]
    dev_auth: bool,
    #[command(flatten)]
    tls: swiftlet_client::TlsArgs,
}

impl Args {
    /// The login token; an explicit flag wins over the environment.
    fn login_token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        if self.dev_auth {
            return Ok(self.user.clone());
        }
        if let Some(secret) = &self.jwt_secret {
            return Ok(token::mint(secret.as_bytes(), &self.user, TOKEN_TTL_SECS));
        }
        bail!("say how to log in: --token JWT, --jwt-secret S (or SWIFTLET_JWT_SECRET), or --dev-auth")
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = ClientConfig::new(&args.server, args.login_token()?, &args.device);
    cfg.tls = args.tls.connector()?;
    session::run(cfg, stdin_lines()).await
}

/// stdin outlives connections, so it is read by a task of its own; the
/// channel closes when stdin ends, which the session takes as `/quit`.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (line_tx, lines) = mpsc::channel::<String>(STDIN_BUFFER);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if line_tx.send(line).await.is_err() {
                return;
            }
        }
    });
    lines
}
