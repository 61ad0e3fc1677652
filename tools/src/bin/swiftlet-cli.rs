//! `swiftlet-cli`: an interactive chat client for a terminal.
//!
//! Owns only presentation and the reconnect loop; every protocol detail lives
//! in the `swiftlet_client` library. Lines typed on stdin are commands
//! (`/send bob hi there`, `/sync [after]`, `/help`, `/quit`); incoming
//! messages are printed as they arrive and acknowledged with `DeliveryAck`
//! at once (printing is this client's "processing"). When the connection
//! drops, the CLI reconnects with backoff and the server resumes delivery
//! from the acknowledged cursor; a send that failed with the connection is
//! retried after the reconnect under the same `client_msg_id`, so it is
//! never stored twice. Times are shown in UTC (no time-zone database here).

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use swiftlet_client::pb::{self, event::Kind};
use swiftlet_client::{
    new_client_msg_id, token, Backoff, Client, ClientConfig, CursorTracker, DeliveryItem, Observed,
};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

/// How long a `--jwt-secret` token minted here stays valid.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// How often a send that failed with the connection is retried.
const MAX_SEND_ATTEMPTS: u32 = 5;

/// Page size for `/sync`.
const SYNC_PAGE: u32 = 50;

/// Interactive swiftlet chat client.
#[derive(Debug, Parser)]
#[command(name = "swiftlet-cli", version)]
struct Args {
    /// Your user id.
    #[arg(long)]
    user: String,
    /// The server's TCP address.
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

/// One parsed stdin line.
#[derive(Debug, PartialEq)]
enum Command {
    Send { to: String, text: String },
    Sync { after: u64 },
    Help,
    Quit,
    Nothing,
    Bad(String),
}

fn parse_command(line: &str) -> Command {
    let line = line.trim();
    if line.is_empty() {
        return Command::Nothing;
    }
    let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    match cmd {
        "/send" | "/s" => match rest.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => Command::Send {
                to: to.to_owned(),
                text: text.trim().to_owned(),
            },
            _ => Command::Bad("usage: /send USER TEXT".into()),
        },
        "/sync" => {
            if rest.is_empty() {
                Command::Sync { after: 0 }
            } else {
                match rest.parse() {
                    Ok(after) => Command::Sync { after },
                    Err(_) => Command::Bad("usage: /sync [AFTER_SEQ]".into()),
                }
            }
        }
        "/help" | "/h" | "/?" => Command::Help,
        "/quit" | "/q" | "/exit" => Command::Quit,
        _ => Command::Bad(format!("unknown command {cmd:?}; /help lists them")),
    }
}

const HELP: &str = "\
commands:
  /send USER TEXT   send TEXT to USER (✓ once the server has stored it)
  /sync [AFTER]     list your inbox after seq AFTER (default 0)
  /help             this text
  /quit             leave";

/// A message on its way, kept for a retry after a reconnect.
#[derive(Debug, Clone)]
struct Outgoing {
    client_msg_id: String,
    to: String,
    text: String,
    attempts: u32,
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let day_secs = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        day_secs / 3600,
        (day_secs / 60) % 60,
        day_secs % 60
    )
}

fn render_body(m: &pb::Message) -> String {
    if m.content_type.is_empty() || m.content_type.starts_with("text/") {
        String::from_utf8_lossy(&m.body).into_owned()
    } else {
        format!("<{} bytes of {}>", m.body.len(), m.content_type)
    }
}

fn render_event(me: &str, ev: &pb::Event) -> String {
    match &ev.kind {
        Some(Kind::Message(m)) if m.from_user == me => format!(
            "[{}] {me} → {}: {}",
            clock(m.timestamp_ms),
            m.to_user,
            render_body(m)
        ),
        Some(Kind::Message(m)) => {
            format!(
                "[{}] {}: {}",
                clock(m.timestamp_ms),
                m.from_user,
                render_body(m)
            )
        }
        None => format!("[event {}] (a kind this client does not show)", ev.seq),
        _ => format!("(event {})", ev.seq),
    }
}

/// Send in the background so incoming messages keep printing; a failure that
/// a new connection could fix goes back to the outbox for a retry.
fn spawn_send(client: Client, mut out: Outgoing, retry: mpsc::UnboundedSender<Outgoing>) {
    tokio::spawn(async move {
        out.attempts += 1;
        let result = client
            .send_with_id(&out.client_msg_id, &out.to, "text/plain", out.text.clone())
            .await;
        match result {
            Ok(ack) => println!("✓ {} (#{})", out.to, ack.server_msg_id),
            Err(e) if e.is_retryable() && out.attempts < MAX_SEND_ATTEMPTS => {
                println!("… send to {} not confirmed ({e}); will retry", out.to);
                tokio::time::sleep(Duration::from_millis(500) * out.attempts).await;
                let _ = retry.send(out);
            }
            Err(e) => println!("✗ send to {} failed: {e}", out.to),
        }
    });
}

fn spawn_sync(client: Client, me: String, after: u64) {
    tokio::spawn(async move {
        match client.sync(after, SYNC_PAGE).await {
            Ok(batch) => {
                if batch.first_available_seq > after + 1 {
                    println!(
                        "(events {}..{} were removed by retention)",
                        after + 1,
                        batch.first_available_seq - 1
                    );
                }
                if batch.events.is_empty() {
                    println!("(nothing after {after}; newest is {})", batch.head_seq);
                }
                for ev in &batch.events {
                    println!("{:>6} {}", ev.seq, render_event(&me, ev));
                }
                if let (true, Some(last)) = (batch.has_more, batch.events.last()) {
                    println!("(more: /sync {})", last.seq);
                }
            }
            Err(e) => println!("✗ sync failed: {e}"),
        }
    });
}

/// What ended a session.
enum SessionEnd {
    Quit,
    Lost,
}

async fn session(
    client: &Client,
    deliveries: &mut swiftlet_client::Deliveries,
    tracker: &mut CursorTracker,
    lines: &mut mpsc::Receiver<String>,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    outbox_tx: &mpsc::UnboundedSender<Outgoing>,
) -> anyhow::Result<SessionEnd> {
    let me = client.welcome().user_id.clone();
    loop {
        tokio::select! {
            item = deliveries.next() => match item {
                Some(DeliveryItem::Event(ev)) => {
                    match tracker.observe(ev.seq) {
                        Observed::Duplicate => {}
                        Observed::InOrder => println!("{}", render_event(&me, &ev)),
                        Observed::Gap { from, to } => {
                            println!("(events {from}..{to} have not arrived; /sync {} fetches them)", from - 1);
                            println!("{}", render_event(&me, &ev));
                        }
                    }
                    // Printed means processed: advance the cursor at once.
                    let _ = client.ack_delivery(tracker.last()).await;
                }
                Some(DeliveryItem::Typing(_)) | Some(DeliveryItem::Presence(_)) => {}
                Some(DeliveryItem::Closed(reason)) => {
                    println!("connection lost: {reason}");
                    if !reason.may_reconnect() {
                        bail!("the server refused this session: {reason}");
                    }
                    return Ok(SessionEnd::Lost);
                }
                None => return Ok(SessionEnd::Lost),
            },
            line = lines.recv() => match parse_command(line.as_deref().unwrap_or("/quit")) {
                Command::Quit => return Ok(SessionEnd::Quit),
                Command::Send { to, text } => {
                    let out = Outgoing { client_msg_id: new_client_msg_id(), to, text, attempts: 0 };
                    spawn_send(client.clone(), out, outbox_tx.clone());
                }
                Command::Sync { after } => spawn_sync(client.clone(), me.clone(), after),
                Command::Help => println!("{HELP}"),
                Command::Bad(msg) => println!("{msg}"),
                Command::Nothing => {}
            },
            Some(out) = outbox.recv() => spawn_send(client.clone(), out, outbox_tx.clone()),
        }
    }
}

/// Sleep for `wait`, unless the user quits meanwhile (then `true`). Sends
/// typed meanwhile go to the outbox, for the next connection.
async fn wait_or_quit(
    wait: Duration,
    lines: &mut mpsc::Receiver<String>,
    outbox: &mpsc::UnboundedSender<Outgoing>,
) -> bool {
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return false,
            line = lines.recv() => match parse_command(line.as_deref().unwrap_or("/quit")) {
                Command::Quit => return true,
                Command::Nothing => {}
                Command::Send { to, text } => {
                    println!("(not connected; will send after reconnecting)");
                    let out = Outgoing { client_msg_id: new_client_msg_id(), to, text, attempts: 0 };
                    let _ = outbox.send(out);
                }
                Command::Help => println!("{HELP}"),
                Command::Bad(msg) => println!("{msg}"),
                Command::Sync { .. } => println!("(not connected; reconnecting in a moment)"),
            },
        }
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
    let cfg = ClientConfig::new(&args.server, args.login_token()?, &args.device);

    // stdin outlives connections, so it is read by a task of its own.
    let (line_tx, mut lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if line_tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let (outbox_tx, mut outbox) = mpsc::unbounded_channel::<Outgoing>();

    let mut tracker: Option<CursorTracker> = None;
    let mut backoff = Backoff::default();
    loop {
        let (client, mut deliveries) = match Client::connect(cfg.clone()).await {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_delay();
                println!("cannot reach {}: {e}; retrying in {wait:.1?}", cfg.addr);
                if wait_or_quit(wait, &mut lines, &outbox_tx).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e).context(format!("logging in to {}", cfg.addr)),
        };
        backoff.reset();
        let w = client.welcome();
        println!(
            "connected to {} as {} (device {}); {} new event(s). /help for commands",
            cfg.addr,
            w.user_id,
            w.device_id,
            w.head_seq.saturating_sub(w.cursor)
        );
        // Kept across reconnects, so an event redelivered because its ack was
        // lost with the connection is recognised and not printed twice.
        let t = tracker.get_or_insert_with(|| CursorTracker::new(w.cursor));
        t.skip_to(w.cursor);

        let end = session(
            &client,
            &mut deliveries,
            t,
            &mut lines,
            &mut outbox,
            &outbox_tx,
        )
        .await;
        match end {
            Ok(SessionEnd::Quit) => {
                client.close().await;
                return Ok(());
            }
            Ok(SessionEnd::Lost) => {
                let wait = backoff.next_delay();
                println!("reconnecting in {wait:.1?}");
                if wait_or_quit(wait, &mut lines, &outbox_tx).await {
                    return Ok(());
                }
            }
            Err(e) => {
                client.close().await;
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_command("/send bob hi  there "),
            Command::Send {
                to: "bob".into(),
                text: "hi  there".into()
            }
        );
        assert!(matches!(parse_command("/send bob"), Command::Bad(_)));
        assert_eq!(parse_command("/sync"), Command::Sync { after: 0 });
        assert_eq!(parse_command("/sync 42"), Command::Sync { after: 42 });
        assert!(matches!(parse_command("/sync x"), Command::Bad(_)));
        assert_eq!(parse_command("  "), Command::Nothing);
        assert_eq!(parse_command("/quit"), Command::Quit);
        assert!(matches!(parse_command("hello"), Command::Bad(_)));
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock((12 * 3600 + 65) * 1000 + 999), "12:01:05");
        assert_eq!(clock(86_400_000 + 1000), "00:00:01");
    }
}
