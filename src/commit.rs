//! The commit pipeline: the one thread that turns requests into durable
//! writes, then tells the shards what to acknowledge and push.
//!
//! Shards submit [`CommitCmd`]s over a bounded channel and never wait. The
//! pipeline takes everything queued (up to [`MAX_GROUP`]), checks each send
//! against the dedup records, assigns message ids and per-user inbox
//! sequence numbers, and writes the whole group as one RocksDB batch: one
//! write-ahead-log record for many messages (group commit). Only after that
//! write returns does it hand Acks and Deliver pushes to the shards, grouped
//! per shard so each shard is woken once per group.
//!
//! Sequence numbers must be gap-free and in commit order per user; a single
//! writer thread gets that without locks. It keeps each active user's newest
//! seq in memory (read from the store on first use). If a write fails, every
//! send of the group gets `STORE_UNAVAILABLE`, nothing is pushed, and the
//! cached sequence numbers are dropped so they are re-read from the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use swiftlet_protocol::codec::frame_bytes;
use swiftlet_protocol::{pb, Body, Envelope, ErrorCode};

use crate::ids::{unix_ms, IdGen};
use crate::registry::{ConnRef, Registry};
use crate::shard::mailbox::{Push, ShardHandle};
use crate::store::keys::InboxEntry;
use crate::store::{Store, StoreError};

/// Most commands folded into one write batch.
pub const MAX_GROUP: usize = 1024;

/// A request for the pipeline.
pub enum CommitCmd {
    /// Store a 1:1 message and acknowledge it to `reply`.
    Send {
        reply: ConnRef,
        request_id: u64,
        from_user: Arc<str>,
        from_device: Arc<str>,
        send: pb::Send,
    },
    /// Persist a device's cursor.
    Cursor {
        user: Arc<str>,
        device: Arc<str>,
        seq: u64,
    },
    /// Answer once everything submitted before it is committed and handed to
    /// the shards (used by graceful shutdown and tests).
    Flush(Sender<()>),
}

/// Why a command was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("commit queue full")]
    Busy,
    #[error("commit pipeline stopped")]
    Closed,
}

/// The shards' way in. Cheap to clone.
#[derive(Clone)]
pub struct CommitHandle {
    tx: Sender<CommitCmd>,
}

impl CommitHandle {
    /// Queue `cmd` without blocking.
    pub fn submit(&self, cmd: CommitCmd) -> Result<(), SubmitError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })
    }

    /// Block until everything queued so far is committed and dispatched.
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(CommitCmd::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// Start the pipeline thread. It stops when every [`CommitHandle`] is dropped.
pub fn spawn(
    store: Arc<Store>,
    registry: Arc<Registry>,
    shards: Vec<ShardHandle>,
    node_id: u16,
    queue: usize,
) -> std::io::Result<(CommitHandle, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(queue);
    let mut pipeline = Pipeline {
        store,
        registry,
        outbox: Outbox::new(shards),
        ids: IdGen::new(node_id),
        heads: HashMap::new(),
    };
    let join = std::thread::Builder::new()
        .name("swiftlet-commit".into())
        .spawn(move || pipeline.run(rx))?;
    Ok((CommitHandle { tx }, join))
}

struct Pipeline {
    store: Arc<Store>,
    registry: Arc<Registry>,
    outbox: Outbox,
    ids: IdGen,
    /// Newest inbox seq of each user seen since start.
    heads: HashMap<Arc<str>, u64>,
}

/// A message to push once the batch holding it is durable.
struct Pending {
    user: Arc<str>,
    seq: u64,
    msg: Arc<pb::Message>,
}

/// Per-shard buffers of what a group produces, sent after the commit.
struct Outbox {
    shards: Vec<ShardHandle>,
    replies: Vec<Vec<(ConnRef, Bytes)>>,
    pushes: Vec<Vec<Push>>,
    conns: Vec<ConnRef>,
}

impl Outbox {
    fn new(shards: Vec<ShardHandle>) -> Self {
        let n = shards.len();
        Outbox {
            shards,
            replies: vec![Vec::new(); n],
            pushes: (0..n).map(|_| Vec::new()).collect(),
            conns: Vec::new(),
        }
    }

    fn reply(&mut self, to: ConnRef, env: &Envelope) {
        if let Some(v) = self.replies.get_mut(usize::from(to.shard)) {
            v.push((to, frame_bytes(env)));
        }
    }

    /// Queue a Deliver of `msg` at `seq` to every online device of `user`.
    fn push(&mut self, registry: &Registry, user: &str, seq: u64, msg: &pb::Message) {
        self.conns.clear();
        registry.lookup(user, &mut self.conns);
        if self.conns.is_empty() {
            return;
        }
        let frame = frame_bytes(&Envelope::new(
            0,
            Body::Deliver(pb::Deliver {
                event: Some(pb::Event {
                    seq,
                    kind: Some(pb::event::Kind::Message(msg.clone())),
                }),
            }),
        ));
        for c in &self.conns {
            if let Some(v) = self.pushes.get_mut(usize::from(c.shard)) {
                v.push(Push {
                    slot: c.slot,
                    gen: c.gen,
                    seq,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Hand everything to the shards: one message and one wake-up per shard.
    fn dispatch(&mut self) {
        for (i, shard) in self.shards.iter().enumerate() {
            let replies = std::mem::take(&mut self.replies[i]);
            let pushes = std::mem::take(&mut self.pushes[i]);
            if !replies.is_empty() || !pushes.is_empty() {
                shard.deliver(replies, pushes);
            }
        }
    }
}

fn ack_envelope(request_id: u64, ack: pb::Ack) -> Envelope {
    Envelope::new(request_id, Body::Ack(ack))
}

impl Pipeline {
    fn run(&mut self, rx: Receiver<CommitCmd>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Ok(first) = rx.recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group);
        }
        tracing::debug!("commit pipeline stopped");
    }

    fn next_seq(&mut self, user: &Arc<str>) -> Result<u64, StoreError> {
        let head = match self.heads.get(user) {
            Some(h) => *h,
            None => self.store.last_seq(user)?,
        };
        self.heads.insert(user.clone(), head + 1);
        Ok(head + 1)
    }

    fn commit_group(&mut self, group: &mut Vec<CommitCmd>) {
        let mut batch = self.store.batch();
        // Acks of this group by (sender, client_msg_id): a retry that lands
        // in the same group as its original must get the same answer.
        let mut fresh: HashMap<(Arc<str>, String), pb::Ack> = HashMap::new();
        let mut acks: Vec<(ConnRef, u64, pb::Ack)> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut flushes = Vec::new();
        let mut writes = 0usize;

        for cmd in group.drain(..) {
            match cmd {
                CommitCmd::Send {
                    reply,
                    request_id,
                    from_user,
                    from_device,
                    send,
                } => {
                    let key = (from_user.clone(), send.client_msg_id.clone());
                    if let Some(ack) = fresh.get(&key) {
                        acks.push((reply, request_id, ack.clone()));
                        continue;
                    }
                    match self.store_send(&mut batch, &from_user, &from_device, send) {
                        Ok(Stored::Duplicate(ack)) => {
                            self.outbox.reply(reply, &ack_envelope(request_id, ack))
                        }
                        Ok(Stored::New { ack, pushes }) => {
                            writes += 1;
                            fresh.insert(key, ack.clone());
                            acks.push((reply, request_id, ack));
                            pending.extend(pushes);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading the store for a send failed");
                            self.outbox.reply(
                                reply,
                                &Envelope::error(
                                    request_id,
                                    ErrorCode::StoreUnavailable,
                                    "storage error",
                                    false,
                                ),
                            );
                        }
                    }
                }
                CommitCmd::Cursor { user, device, seq } => {
                    match self.store.put_cursor(&mut batch, &user, &device, seq) {
                        Ok(()) => writes += 1,
                        Err(e) => tracing::error!(error = %e, "cursor write failed"),
                    }
                }
                CommitCmd::Flush(done) => flushes.push(done),
            }
        }

        let committed = writes == 0 || {
            match self.store.commit(std::mem::take(&mut batch)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "group commit failed");
                    false
                }
            }
        };
        if committed {
            for (to, request_id, ack) in acks {
                self.outbox.reply(to, &ack_envelope(request_id, ack));
            }
            for p in pending {
                self.outbox.push(&self.registry, &p.user, p.seq, &p.msg);
            }
        } else {
            // Sequence numbers handed out in this group were never written.
            self.heads.clear();
            for (to, request_id, _) in acks {
                self.outbox.reply(
                    to,
                    &Envelope::error(
                        request_id,
                        ErrorCode::StoreUnavailable,
                        "storage write failed",
                        false,
                    ),
                );
            }
        }
        self.outbox.dispatch();
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// Put one send into `batch`, or find that it was stored before.
    fn store_send(
        &mut self,
        batch: &mut crate::store::Batch,
        from_user: &Arc<str>,
        from_device: &Arc<str>,
        send: pb::Send,
    ) -> Result<Stored, StoreError> {
        if let Some(ack) = self.store.dedup(from_user, &send.client_msg_id)? {
            return Ok(Stored::Duplicate(ack));
        }
        // Every read happens before the first put, so an error leaves nothing
        // half-written in the batch.
        let to_user: Arc<str> = if *send.to_user == **from_user {
            from_user.clone()
        } else {
            Arc::from(send.to_user.as_str())
        };
        let to_seq = self.next_seq(&to_user)?;
        let from_seq = if Arc::ptr_eq(&to_user, from_user) {
            None
        } else {
            Some(self.next_seq(from_user)?)
        };
        let now = unix_ms();
        let id = self.ids.next_at(now);
        let msg = Arc::new(pb::Message {
            id,
            from_user: from_user.to_string(),
            from_device: from_device.to_string(),
            to_user: send.to_user,
            client_msg_id: send.client_msg_id,
            timestamp_ms: now,
            content_type: send.content_type,
            body: send.body,
        });
        let ack = pb::Ack {
            client_msg_id: msg.client_msg_id.clone(),
            server_msg_id: id,
            timestamp_ms: now,
        };
        self.store.put_message(batch, &msg)?;
        self.store
            .put_inbox(batch, &to_user, to_seq, InboxEntry::Message(id))?;
        let mut pushes = vec![Pending {
            user: to_user,
            seq: to_seq,
            msg: msg.clone(),
        }];
        if let Some(seq) = from_seq {
            self.store
                .put_inbox(batch, from_user, seq, InboxEntry::Message(id))?;
            pushes.push(Pending {
                user: from_user.clone(),
                seq,
                msg,
            });
        }
        self.store
            .put_dedup(batch, from_user, &ack.client_msg_id, &ack)?;
        Ok(Stored::New { ack, pushes })
    }
}

enum Stored {
    Duplicate(pb::Ack),
    New { ack: pb::Ack, pushes: Vec<Pending> },
}
