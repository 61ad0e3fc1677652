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

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use swiftlet_client::pb::{self, event::Kind};
use swiftlet_client::{
    new_client_msg_id, token, Backoff, Client, ClientConfig, CursorTracker, DeliveryItem, Observed,
};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod parse;
mod presence;
mod receipts;
mod render;
mod target;

use parse::{parse_command, Command, GroupCmd, HELP};
use presence::PresenceState;
use receipts::{lock, render_receipt, Conversations, SharedGate};
use render::{render_event, render_group_info, render_presence};
use target::Target;

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

/// A message on its way, kept for a retry after a reconnect.
#[derive(Debug, Clone)]
struct Outgoing {
    client_msg_id: String,
    to: Target,
    text: String,
    attempts: u32,
}

/// Everything the CLI keeps across reconnects.
#[derive(Debug, Default)]
struct ChatState {
    conversations: Conversations,
    /// Receipts wait here for the Acks of the sends they cover.
    gate: SharedGate,
    presence: PresenceState,
}

/// Send in the background so incoming messages keep printing; a failure that
/// a new connection could fix goes back to the outbox for a retry.
fn spawn_send(
    client: Client,
    mut out: Outgoing,
    retry: mpsc::UnboundedSender<Outgoing>,
    gate: SharedGate,
) {
    // Before the request goes out: the message's own inbox event (and any
    // receipt about it) can only come after.
    lock(&gate).sending(&out.client_msg_id);
    tokio::spawn(async move {
        out.attempts += 1;
        let result = match &out.to {
            Target::User(to) => {
                client
                    .send_with_id(&out.client_msg_id, to, "text/plain", out.text.clone())
                    .await
            }
            Target::Group(g) => {
                client
                    .send_group_with_id(&out.client_msg_id, *g, "text/plain", out.text.clone())
                    .await
            }
        };
        match result {
            Ok(ack) => {
                // Under the lock, so no receipt line slips in before the ✓.
                let mut g = lock(&gate);
                println!("{}", render::ack(&out.to, ack.server_msg_id));
                for line in g.release(&out.client_msg_id) {
                    println!("{line}");
                }
            }
            Err(e) if e.is_retryable() && out.attempts < MAX_SEND_ATTEMPTS => {
                println!("… send to {} not confirmed ({e}); will retry", out.to);
                tokio::time::sleep(Duration::from_millis(500) * out.attempts).await;
                let _ = retry.send(out);
            }
            Err(e) => {
                let mut g = lock(&gate);
                println!("✗ send to {} failed: {e}", out.to);
                // A receipt about it says it was stored after all.
                for line in g.release(&out.client_msg_id) {
                    println!("{line}");
                }
            }
        }
    });
}

fn spawn_sync(client: Client, me: String, after: u64) {
    tokio::spawn(async move {
        match client.sync(after, SYNC_PAGE).await {
            Ok(batch) => {
                for line in render::sync_listing(&me, after, &batch) {
                    println!("{line}");
                }
            }
            Err(e) => println!("✗ sync failed: {e}"),
        }
    });
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn spawn_group(client: Client, cmd: GroupCmd) {
    tokio::spawn(async move {
        let result = match &cmd {
            GroupCmd::Create { name, members } => client
                .create_group(name, &refs(members))
                .await
                .map(|g| format!("created {}", render_group_info(&g))),
            GroupCmd::Add { group, users } => client
                .add_members(*group, &refs(users))
                .await
                .map(|g| render_group_info(&g)),
            GroupCmd::Remove { group, users } => client
                .remove_members(*group, &refs(users))
                .await
                .map(|g| render_group_info(&g)),
            GroupCmd::Leave { group } => client
                .leave_group(*group)
                .await
                .map(|g| format!("you left #{} \"{}\"", g.group_id, g.name)),
            GroupCmd::Rename { group, name } => client
                .rename_group(*group, name)
                .await
                .map(|g| format!("#{} is now \"{}\"", g.group_id, g.name)),
            GroupCmd::Info { group } => client
                .get_group(*group)
                .await
                .map(|g| render_group_info(&g)),
            GroupCmd::List => client
                .list_groups()
                .await
                .map(|groups| render::group_list(&groups)),
        };
        match result {
            Ok(text) => println!("{text}"),
            Err(e) => println!("✗ /group failed: {e}"),
        }
    });
}

fn spawn_receipts(client: Client, group: u64, msg: u64) {
    tokio::spawn(async move {
        match client.receipts(group, msg).await {
            Ok(l) => println!("{}", render::receipt_list(group, &l)),
            Err(e) => println!("✗ receipts failed: {e}"),
        }
    });
}

fn spawn_watch(client: Client, users: Vec<String>) {
    tokio::spawn(async move {
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        match client.subscribe_presence(&refs).await {
            Ok(list) if list.is_empty() => println!("(watching nobody)"),
            Ok(list) => {
                for p in &list {
                    println!("{}", render_presence(p));
                }
            }
            Err(e) => println!("✗ /watch failed: {e}"),
        }
    });
}

/// What ended a session.
enum SessionEnd {
    Quit,
    Lost,
}

/// Print and acknowledge one inbox event.
async fn on_event(
    client: &Client,
    me: &str,
    ev: pb::Event,
    tracker: &mut CursorTracker,
    state: &mut ChatState,
) {
    let show = match tracker.observe(ev.seq) {
        Observed::Duplicate => false,
        Observed::InOrder => true,
        Observed::Gap { from, to } => {
            println!(
                "(events {from}..{to} have not arrived; /sync {} fetches them)",
                from - 1
            );
            true
        }
    };
    if show {
        match &ev.kind {
            Some(Kind::Message(m)) => {
                state.conversations.on_message(me, m);
                if m.from_user == me {
                    lock(&state.gate).stored(&m.client_msg_id, m.id);
                }
                // A message ends its sender's typing indicator.
                let conv = Target::of_message(me, m);
                state.presence.typists.message_from(conv, &m.from_user);
                println!("{}", render_event(me, &ev));
            }
            Some(Kind::Receipt(r)) => {
                let mut gate = lock(&state.gate);
                if let Some(line) = render_receipt(&mut state.conversations, &mut gate, me, r) {
                    println!("{line}");
                }
            }
            _ => println!("{}", render_event(me, &ev)),
        }
    }
    // Printed means processed: advance the cursor at once.
    let _ = client.ack_delivery(tracker.last()).await;
}

async fn session(
    client: &Client,
    deliveries: &mut swiftlet_client::Deliveries,
    tracker: &mut CursorTracker,
    state: &mut ChatState,
    lines: &mut mpsc::Receiver<String>,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    outbox_tx: &mpsc::UnboundedSender<Outgoing>,
) -> anyhow::Result<SessionEnd> {
    let me = client.welcome().user_id.clone();
    // Typing indicators end by themselves; look for lapsed ones now and then.
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = deliveries.next() => match item {
                Some(DeliveryItem::Event(ev)) => on_event(client, &me, ev, tracker, state).await,
                Some(DeliveryItem::Typing(n)) => {
                    if let Some(line) = state.presence.typists.on_notice(&n, Instant::now()) {
                        println!("{line}");
                    }
                }
                Some(DeliveryItem::Presence(p)) => println!("{}", render_presence(&p)),
                Some(DeliveryItem::Closed(reason)) => {
                    println!("connection lost: {reason}");
                    if !reason.may_reconnect() {
                        bail!("the server refused this session: {reason}");
                    }
                    return Ok(SessionEnd::Lost);
                }
                None => return Ok(SessionEnd::Lost),
            },
            _ = sweep.tick() => {
                for line in state.presence.typists.expire(Instant::now()) {
                    println!("{line}");
                }
            }
            line = lines.recv() => match parse_command(line.as_deref().unwrap_or("/quit")) {
                Command::Quit => return Ok(SessionEnd::Quit),
                Command::Send { to, text } => {
                    // Stop the typing indicator first: same queue, so the
                    // STOPPED reaches the server before the message.
                    if let Some(conv) = state.presence.my_typing.take() {
                        let _ = client.typing(conv.conversation(), false).await;
                    }
                    let out = Outgoing { client_msg_id: new_client_msg_id(), to, text, attempts: 0 };
                    spawn_send(client.clone(), out, outbox_tx.clone(), state.gate.clone());
                }
                Command::Sync { after } => spawn_sync(client.clone(), me.clone(), after),
                Command::Group(cmd) => spawn_group(client.clone(), cmd),
                Command::Read { conv } => match state.conversations.newest(&conv) {
                    Some(up_to) => {
                        let client = client.clone();
                        tokio::spawn(async move {
                            match client.mark_read(conv.conversation(), up_to).await {
                                Ok(()) => println!("(marked {conv} read up to #{up_to})"),
                                Err(e) => println!("✗ /read {conv} failed: {e}"),
                            }
                        });
                    }
                    None => println!("(no message from {conv} seen yet; nothing to mark read)"),
                },
                Command::Receipts { group, msg } => spawn_receipts(client.clone(), group, msg),
                Command::Typing { conv } => {
                    if let Some(old) = state.presence.my_typing.take().filter(|old| *old != conv) {
                        let _ = client.typing(old.conversation(), false).await;
                    }
                    match client.typing(conv.conversation(), true).await {
                        Ok(()) => state.presence.my_typing = Some(conv),
                        Err(e) => println!("✗ /typing failed: {e}"),
                    }
                }
                Command::Watch { users } => {
                    state.presence.watching = users.clone();
                    spawn_watch(client.clone(), users);
                }
                Command::Privacy { hide } => {
                    let client = client.clone();
                    tokio::spawn(async move {
                        match client.set_privacy(hide).await {
                            Ok(()) if hide => println!("(your last seen is hidden)"),
                            Ok(()) => println!("(your last seen is visible)"),
                            Err(e) => println!("✗ /privacy failed: {e}"),
                        }
                    });
                }
                Command::Help => println!("{HELP}"),
                Command::Bad(msg) => println!("{msg}"),
                Command::Nothing => {}
            },
            Some(out) = outbox.recv() => {
                spawn_send(client.clone(), out, outbox_tx.clone(), state.gate.clone())
            }
        }
    }
}

/// Sleep for `wait`, unless the user quits meanwhile (then `true`). Sends
/// typed meanwhile go to the outbox, for the next connection.
async fn wait_or_quit(
    wait: Duration,
    lines: &mut mpsc::Receiver<String>,
    outbox: &mpsc::UnboundedSender<Outgoing>,
    state: &mut ChatState,
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
                Command::Watch { users } => {
                    println!("(not connected; will watch them after reconnecting)");
                    state.presence.watching = users;
                }
                Command::Help => println!("{HELP}"),
                Command::Bad(msg) => println!("{msg}"),
                Command::Sync { .. }
                | Command::Group(_)
                | Command::Read { .. }
                | Command::Receipts { .. }
                | Command::Typing { .. }
                | Command::Privacy { .. } => {
                    println!("(not connected; reconnecting in a moment, try again then)")
                }
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
    let mut state = ChatState::default();
    let mut backoff = Backoff::default();
    loop {
        let (client, mut deliveries) = match Client::connect(cfg.clone()).await {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_delay();
                println!("cannot reach {}: {e}; retrying in {wait:.1?}", cfg.addr);
                if wait_or_quit(wait, &mut lines, &outbox_tx, &mut state).await {
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
        // lost with the connection is recognised and not printed twice;
        // forgotten when the inbox epoch changed, since its seqs may then
        // name new events.
        let t = tracker.get_or_insert_with(|| CursorTracker::from_welcome(w));
        if t.on_welcome(w) {
            println!(
                "(the server restarted after a crash; events after {} are shown again)",
                w.cursor
            );
        }
        // Subscriptions (and a typing indicator) die with a connection.
        state.presence.new_connection();
        if !state.presence.watching.is_empty() {
            spawn_watch(client.clone(), state.presence.watching.clone());
        }

        let end = session(
            &client,
            &mut deliveries,
            t,
            &mut state,
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
                if wait_or_quit(wait, &mut lines, &outbox_tx, &mut state).await {
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
