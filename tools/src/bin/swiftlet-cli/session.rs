//! The connection's life: connect, follow the client library's deliveries
//! and the user's lines, and reconnect with backoff when the connection
//! drops.
//!
//! Every inbox event is printed and acknowledged with `DeliveryAck` at once
//! (printing is this client's "processing"), so after a reconnect the server
//! resumes delivery from the acknowledged cursor; the [`CursorTracker`] is
//! kept across connections so an event redelivered because its ack was lost
//! is recognised and not printed twice. What the CLI remembers across
//! reconnects is [`ChatState`]; what dies with a connection (presence
//! subscriptions, typing indicators) is forgotten or restored at each
//! `Welcome`. Requests run as tasks of their own (`actions`), so this loop
//! never waits on the server except for a typing notice, which must reach
//! the server's queue before the message that ends it.

use std::time::Duration;

use anyhow::{bail, Context as _};
use swiftlet_client::pb::{self, event::Kind};
use swiftlet_client::{
    Backoff, Client, ClientConfig, CursorTracker, Deliveries, DeliveryItem, Observed,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::actions::{self, Outgoing};
use crate::home::{self, Home};
use crate::parse::{parse_command, Command, HELP};
use crate::presence::PresenceState;
use crate::receipts::{lock, render_receipt, Conversations, SharedGate};
use crate::render::{render_event, render_presence};
use crate::target::Target;

/// How often lapsed typing indicators are looked for.
const TYPING_SWEEP: Duration = Duration::from_millis(250);

/// Everything the CLI keeps across reconnects.
#[derive(Debug, Default)]
struct ChatState {
    conversations: Conversations,
    /// Receipts wait here for the Acks of the sends they cover.
    gate: SharedGate,
    presence: PresenceState,
}

/// What feeds the session besides the server: the user's lines, and sends
/// waiting for a (re)connection. Both outlive connections.
struct Inputs {
    lines: mpsc::Receiver<String>,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    outbox_tx: mpsc::UnboundedSender<Outgoing>,
}

/// What ended a session.
enum SessionEnd {
    Quit,
    Lost,
}

/// Connect as `cfg` says and chat until the user quits (or stdin ends), or
/// the server refuses the session.
pub async fn run(cfg: ClientConfig, lines: mpsc::Receiver<String>) -> anyhow::Result<()> {
    let (outbox_tx, outbox) = mpsc::unbounded_channel::<Outgoing>();
    let mut inputs = Inputs {
        lines,
        outbox,
        outbox_tx,
    };
    let mut tracker: Option<CursorTracker> = None;
    let mut state = ChatState::default();
    let mut backoff = Backoff::default();
    let mut home = Home::new(&cfg.addr);
    let mut cfg = cfg;
    loop {
        cfg.addr = home.addr().to_owned();
        let (client, mut deliveries) = match Client::connect(cfg.clone()).await {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                home.failed();
                let (line, wait) = home::retry(&e, &cfg.addr, backoff.next_delay());
                println!("{line}");
                if wait_or_quit(wait, &mut inputs, &mut state).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e).context(format!("logging in to {}", cfg.addr)),
        };
        backoff.reset();
        if let Some(line) = home.landed(client.addr()) {
            println!("{line}");
        }
        let w = client.welcome();
        println!(
            "connected to {} as {} (device {}); {} new event(s). /help for commands",
            client.addr(),
            w.user_id,
            w.device_id,
            // Those retention removed are not new events: the Gap says so.
            w.head_seq
                .saturating_sub(w.cursor.max(w.first_available_seq.saturating_sub(1)))
        );
        let t = follow_welcome(&mut tracker, w);
        // Subscriptions (and a typing indicator) die with a connection.
        state.presence.new_connection();
        if !state.presence.watching.is_empty() {
            actions::spawn_watch(client.clone(), state.presence.watching.clone());
        }

        let end = session(&client, &mut deliveries, t, &mut state, &mut inputs).await;
        match end {
            Ok(SessionEnd::Quit) => {
                client.close().await;
                return Ok(());
            }
            Ok(SessionEnd::Lost) => {
                let wait = backoff.next_delay();
                println!("reconnecting in {wait:.1?}");
                if wait_or_quit(wait, &mut inputs, &mut state).await {
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

/// The tracker for a new connection, from its `Welcome` (and its inbox
/// epoch).
fn follow_welcome<'t>(
    tracker: &'t mut Option<CursorTracker>,
    w: &pb::Welcome,
) -> &'t mut CursorTracker {
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
    t
}

/// One connection: deliveries, the user's lines, and retried sends, until
/// the connection is lost or the user quits.
async fn session(
    client: &Client,
    deliveries: &mut Deliveries,
    tracker: &mut CursorTracker,
    state: &mut ChatState,
    inputs: &mut Inputs,
) -> anyhow::Result<SessionEnd> {
    let me = client.welcome().user_id.clone();
    // Typing indicators end by themselves; look for lapsed ones now and then.
    let mut sweep = tokio::time::interval(TYPING_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = deliveries.next() => {
                if let Some(end) = on_delivery(client, &me, item, tracker, state).await? {
                    return Ok(end);
                }
            }
            _ = sweep.tick() => {
                for line in state.presence.typists.expire(Instant::now()) {
                    println!("{line}");
                }
            }
            line = inputs.lines.recv() => match parse_command(line.as_deref().unwrap_or("/quit")) {
                Command::Quit => return Ok(SessionEnd::Quit),
                cmd => on_command(client, &me, cmd, state, &inputs.outbox_tx).await,
            },
            Some(out) = inputs.outbox.recv() => {
                actions::spawn_send(client.clone(), out, inputs.outbox_tx.clone(), state.gate.clone())
            }
        }
    }
}

/// Show one item of the connection's deliveries; `Some` when it ended the
/// session, an error when the server refused it for good.
async fn on_delivery(
    client: &Client,
    me: &str,
    item: Option<DeliveryItem>,
    tracker: &mut CursorTracker,
    state: &mut ChatState,
) -> anyhow::Result<Option<SessionEnd>> {
    match item {
        Some(DeliveryItem::Event(ev)) => on_event(client, me, ev, tracker, state).await,
        Some(DeliveryItem::Typing(n)) => {
            if let Some(line) = state.presence.typists.on_notice(&n, Instant::now()) {
                println!("{line}");
            }
        }
        Some(DeliveryItem::Presence(p)) => println!("{}", render_presence(&p)),
        Some(DeliveryItem::Gap(gap)) => {
            println!("({gap})");
            // Gone for good: nothing to wait for below the next event.
            tracker.skip_to(gap.to);
        }
        Some(DeliveryItem::Closed(reason)) => {
            println!("connection lost: {reason}");
            if !reason.may_reconnect() {
                bail!("the server refused this session: {reason}");
            }
            return Ok(Some(SessionEnd::Lost));
        }
        None => return Ok(Some(SessionEnd::Lost)),
    }
    Ok(None)
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
        show_event(me, &ev, state);
    }
    // Printed means processed: advance the cursor at once.
    let _ = client.ack_delivery(tracker.last()).await;
}

/// Print a new inbox event, noting what it tells about receipts and typing.
fn show_event(me: &str, ev: &pb::Event, state: &mut ChatState) {
    match &ev.kind {
        Some(Kind::Message(m)) => {
            state.conversations.on_message(me, m);
            if m.from_user == me {
                lock(&state.gate).stored(&m.client_msg_id, m.id);
            }
            // A message ends its sender's typing indicator.
            let conv = Target::of_message(me, m);
            state.presence.typists.message_from(conv, &m.from_user);
            println!("{}", render_event(me, ev));
        }
        Some(Kind::Receipt(r)) => {
            let mut gate = lock(&state.gate);
            if let Some(line) = render_receipt(&mut state.conversations, &mut gate, me, r) {
                println!("{line}");
            }
        }
        _ => println!("{}", render_event(me, ev)),
    }
}

/// Carry out one command while connected (`/quit` is the caller's).
async fn on_command(
    client: &Client,
    me: &str,
    cmd: Command,
    state: &mut ChatState,
    outbox_tx: &mpsc::UnboundedSender<Outgoing>,
) {
    match cmd {
        Command::Send { to, text } => {
            // Stop the typing indicator first: same queue, so the
            // STOPPED reaches the server before the message.
            if let Some(conv) = state.presence.my_typing.take() {
                let _ = client.typing(conv.conversation(), false).await;
            }
            let out = Outgoing::new(to, text);
            actions::spawn_send(client.clone(), out, outbox_tx.clone(), state.gate.clone());
        }
        Command::Sync { after } => actions::spawn_sync(client.clone(), me.to_owned(), after),
        Command::Group(cmd) => actions::spawn_group(client.clone(), cmd),
        Command::Read { conv } => match state.conversations.newest(&conv) {
            Some(up_to) => actions::spawn_read(client.clone(), conv, up_to),
            None => println!("(no message from {conv} seen yet; nothing to mark read)"),
        },
        Command::Receipts { group, msg } => actions::spawn_receipts(client.clone(), group, msg),
        Command::Typing { conv } => start_typing(client, conv, state).await,
        Command::Watch { users } => {
            state.presence.watching = users.clone();
            actions::spawn_watch(client.clone(), users);
        }
        Command::Privacy { hide } => actions::spawn_privacy(client.clone(), hide),
        Command::Help => println!("{HELP}"),
        Command::Bad(msg) => println!("{msg}"),
        Command::Quit | Command::Nothing => {}
    }
}

/// Say this user is typing in `conv`, first stopping an indicator elsewhere.
async fn start_typing(client: &Client, conv: Target, state: &mut ChatState) {
    if let Some(old) = state.presence.my_typing.take().filter(|old| *old != conv) {
        let _ = client.typing(old.conversation(), false).await;
    }
    match client.typing(conv.conversation(), true).await {
        Ok(()) => state.presence.my_typing = Some(conv),
        Err(e) => println!("✗ /typing failed: {e}"),
    }
}

/// Sleep for `wait`, unless the user quits meanwhile (then `true`). Sends
/// typed meanwhile go to the outbox, for the next connection.
async fn wait_or_quit(wait: Duration, inputs: &mut Inputs, state: &mut ChatState) -> bool {
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return false,
            line = inputs.lines.recv() => match parse_command(line.as_deref().unwrap_or("/quit")) {
                Command::Quit => return true,
                cmd => on_command_offline(cmd, &inputs.outbox_tx, state),
            },
        }
    }
}

/// Carry out one command while not connected (`/quit` is the caller's):
/// sends and `/watch` wait for the next connection, the rest is refused.
fn on_command_offline(
    cmd: Command,
    outbox: &mpsc::UnboundedSender<Outgoing>,
    state: &mut ChatState,
) {
    match cmd {
        Command::Quit | Command::Nothing => {}
        Command::Send { to, text } => {
            println!("(not connected; will send after reconnecting)");
            let _ = outbox.send(Outgoing::new(to, text));
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
    }
}
