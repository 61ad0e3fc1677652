//! The commands that ask the server something (send, sync, groups, read,
//! receipts, watch, privacy), each run as a task of its own.
//!
//! A request can take a while (or a reconnect), and incoming messages must
//! keep printing meanwhile, so the session loop only spawns these and goes
//! back to its deliveries. Each task prints its own answer: the words come
//! from `render`, the one-off status and error lines are written here. Only
//! a send outlives its connection: a failure a new connection could fix
//! goes back to the outbox, to be sent again under the same
//! `client_msg_id`, so it is never stored twice.

use std::time::Duration;

use swiftlet_client::{new_client_msg_id, pb, Client, ClientError};
use tokio::sync::mpsc;

use crate::parse::GroupCmd;
use crate::receipts::{lock, SharedGate};
use crate::render::{self, render_group_info, render_presence};
use crate::target::Target;

/// How often a send that failed with the connection is retried.
const MAX_SEND_ATTEMPTS: u32 = 5;

/// Page size for `/sync`.
const SYNC_PAGE: u32 = 50;

/// A message on its way, kept for a retry after a reconnect.
#[derive(Debug, Clone)]
pub struct Outgoing {
    client_msg_id: String,
    to: Target,
    text: String,
    attempts: u32,
}

impl Outgoing {
    /// A new message, with the `client_msg_id` every retry of it keeps.
    pub fn new(to: Target, text: String) -> Self {
        Outgoing {
            client_msg_id: new_client_msg_id(),
            to,
            text,
            attempts: 0,
        }
    }
}

/// Send in the background so incoming messages keep printing; a failure that
/// a new connection could fix goes back to the outbox for a retry.
pub fn spawn_send(
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
        match send_once(&client, &out).await {
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

/// One attempt of a send, to a user or a group.
async fn send_once(client: &Client, out: &Outgoing) -> Result<pb::Ack, ClientError> {
    match &out.to {
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
    }
}

pub fn spawn_sync(client: Client, me: String, after: u64) {
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

pub fn spawn_group(client: Client, cmd: GroupCmd) {
    tokio::spawn(async move {
        match group_request(&client, &cmd).await {
            Ok(text) => println!("{text}"),
            Err(e) => println!("✗ /group failed: {e}"),
        }
    });
}

/// One `/group` request, and the text of its answer.
async fn group_request(client: &Client, cmd: &GroupCmd) -> Result<String, ClientError> {
    match cmd {
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
    }
}

/// Mark `conv` read up to message `up_to`.
pub fn spawn_read(client: Client, conv: Target, up_to: u64) {
    tokio::spawn(async move {
        match client.mark_read(conv.conversation(), up_to).await {
            Ok(()) => println!("(marked {conv} read up to #{up_to})"),
            Err(e) => println!("✗ /read {conv} failed: {e}"),
        }
    });
}

pub fn spawn_receipts(client: Client, group: u64, msg: u64) {
    tokio::spawn(async move {
        match client.receipts(group, msg).await {
            Ok(l) => println!("{}", render::receipt_list(group, &l)),
            Err(e) => println!("✗ receipts failed: {e}"),
        }
    });
}

pub fn spawn_watch(client: Client, users: Vec<String>) {
    tokio::spawn(async move {
        match client.subscribe_presence(&refs(&users)).await {
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

pub fn spawn_privacy(client: Client, hide: bool) {
    tokio::spawn(async move {
        match client.set_privacy(hide).await {
            Ok(()) if hide => println!("(your last seen is hidden)"),
            Ok(()) => println!("(your last seen is visible)"),
            Err(e) => println!("✗ /privacy failed: {e}"),
        }
    });
}
