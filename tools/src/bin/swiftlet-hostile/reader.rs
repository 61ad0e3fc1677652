//! Clients that ask for the biggest pages as fast as they can: each logs in
//! as `<prefix>-reader-<k>`, creates a group of 500 (itself and 499 users
//! that never connect) and 249 groups of one, so that it is in 250 groups,
//! posts one message to the big group, and then pipelines, back to back,
//! the three requests a shard answers by reading pages on its own turn:
//! `GetReceipts` (500 members' watermarks), `GetGroup` (a page of 500
//! members) and `ListGroups` (250 groups), reading every answer. Each is a
//! legal request; the server must share its reads between connections
//! (protocol/README.md §9) so that these clients slow only themselves.
//! Allowed answers: `ReceiptList`, `GroupInfo`, `GroupList`, and
//! `RATE_LIMITED`; a fatal error ends the connection and the reader starts
//! again.
//!
//! Posters (`--posters`) make the same groups, then post to the big group
//! as fast as the server takes their posts, reading every answer: each
//! post is 500 inbox rows (the group's fan-out) in the pipeline's batch.
//! Allowed answers: `Ack`, the posts' own `Deliver`s, `RATE_LIMITED`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use swiftlet_client::codec::decode_frame;
use swiftlet_client::{code_name, pb, Body, Envelope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::tally::Report;
use crate::wire::{self, Target};
use crate::Args;

/// What a client of this module does once set up.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Pipeline the biggest pages.
    Read,
    /// Post to the big group back to back.
    Post,
}

impl Mode {
    fn kind(self) -> &'static str {
        match self {
            Mode::Read => "big_reader",
            Mode::Post => "big_group_poster",
        }
    }
}
/// Requests written per `write_all` (a third of each kind).
const BATCH: usize = 48;
/// Members of the big group, the reader included (a full page).
const BIG_GROUP: usize = 500;
/// Groups the reader is in (a full `ListGroups` page).
const GROUPS: usize = 250;

pub async fn run(
    mode: Mode,
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    stop: watch::Receiver<bool>,
) {
    let n = match mode {
        Mode::Read => args.readers,
        Mode::Post => args.posters,
    };
    wire::each(n, |k| {
        let (target, args, report, stop) =
            (target.clone(), args.clone(), report.clone(), stop.clone());
        async move { reader(mode, k, &target, &args, &report, stop).await }
    })
    .await;
}

async fn reader(
    mode: Mode,
    k: usize,
    target: &Target,
    args: &Args,
    report: &Report,
    stop: watch::Receiver<bool>,
) {
    let kind = mode.kind();
    let user = match mode {
        Mode::Read => format!("{}-reader-{k}", args.user_prefix),
        Mode::Post => format!("{}-poster-{k}", args.user_prefix),
    };
    while !*stop.borrow() {
        let mut s = match target.connect(false).await {
            Ok(s) => s,
            Err(e) => {
                report.count(kind, &format!("connect error: {}", e.kind()), 1);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut buf = BytesMut::with_capacity(256 * 1024);
        let (group, message) = match set_up(&mut s, &mut buf, target, args, &user, k).await {
            Ok(ids) => ids,
            Err(why) => {
                report.answer(kind, &format!("setup failed: {why}"), false);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        report.count(kind, "set up", 1);
        let (mut rd, mut wr) = s.into_split();
        let reader = wire::read_answers(&mut rd, &mut buf, stop.clone(), |env| {
            classify(kind, env, report)
        });
        let mut writer_stop = stop.clone();
        let writer = async {
            let mut out = Vec::with_capacity(BATCH * 32);
            let mut rid: u64 = 1_000;
            loop {
                out.clear();
                for i in 0..BATCH {
                    rid += 1;
                    let body = match (mode, i % 3) {
                        (Mode::Post, _) => Body::Send(pb::Send {
                            client_msg_id: format!("p{k}-{}-{rid}", std::process::id()),
                            to_user: String::new(),
                            content_type: "text/plain".into(),
                            body: b"to everyone".to_vec().into(),
                            group_id: group,
                        }),
                        (_, 0) => Body::GetReceipts(pb::GetReceipts {
                            group_id: group,
                            message_id: message,
                            members_after: String::new(),
                            members_limit: BIG_GROUP as u32,
                        }),
                        (_, 1) => Body::GetGroup(pb::GetGroup {
                            group_id: group,
                            members_after: String::new(),
                            members_limit: BIG_GROUP as u32,
                        }),
                        _ => Body::ListGroups(pb::ListGroups {
                            after_group_id: 0,
                            limit: GROUPS as u32,
                        }),
                    };
                    swiftlet_client::codec::encode_frame(&Envelope::new(rid, body), &mut out);
                }
                tokio::select! {
                    r = wr.write_all(&out) => if r.is_err() { return; },
                    _ = writer_stop.changed() => return,
                }
                report.count(kind, "requests written", BATCH as u64);
            }
        };
        let end = tokio::select! {
            end = reader => end,
            _ = writer => String::new(),
        };
        if !end.is_empty() {
            let allowed = end == "closed";
            report.answer(kind, &format!("connection ended: {end}"), allowed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Log in, make the groups and post the message; the big group's id and
/// the message's.
async fn set_up(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    target: &Target,
    args: &Args,
    user: &str,
    k: usize,
) -> Result<(u64, u64), String> {
    ask(s, buf, target.hello(user, "reader")).await?;
    let members = (1..BIG_GROUP)
        .map(|i| format!("{}-rm{k}-{i}", args.user_prefix))
        .collect();
    let big = match ask(s, buf, create(2, "big", members)).await? {
        Body::GroupInfo(g) => g.group_id,
        other => return Err(format!("CreateGroup answered {}", name(&other))),
    };
    // The small groups, pipelined; each answer is awaited in order.
    let mut out = Vec::new();
    for i in 1..GROUPS {
        let env = create(2 + i as u64, "small", Vec::new());
        swiftlet_client::codec::encode_frame(&env, &mut out);
    }
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    for i in 1..GROUPS {
        match answer(s, buf, 2 + i as u64).await? {
            Body::GroupInfo(_) => {}
            other => return Err(format!("CreateGroup answered {}", name(&other))),
        }
    }
    let post = Envelope::new(
        500,
        Body::Send(pb::Send {
            client_msg_id: format!("reader-{k}-{}", std::process::id()),
            to_user: String::new(),
            content_type: "text/plain".into(),
            body: b"read my receipts".to_vec().into(),
            group_id: big,
        }),
    );
    match ask(s, buf, post).await? {
        Body::Ack(a) => Ok((big, a.server_msg_id)),
        other => Err(format!("Send answered {}", name(&other))),
    }
}

fn create(rid: u64, name: &str, members: Vec<String>) -> Envelope {
    Envelope::new(
        rid,
        Body::CreateGroup(pb::CreateGroup {
            name: name.into(),
            members,
        }),
    )
}

/// Write `env` and wait for its answer.
async fn ask(s: &mut TcpStream, buf: &mut BytesMut, env: Envelope) -> Result<Body, String> {
    let rid = env.request_id;
    s.write_all(&wire::frame(&env))
        .await
        .map_err(|e| e.to_string())?;
    answer(s, buf, rid).await
}

/// The next frame answering `rid` (pushes are skipped), within 10 s.
async fn answer(s: &mut TcpStream, buf: &mut BytesMut, rid: u64) -> Result<Body, String> {
    let wait = async {
        loop {
            while let Some((env, used)) =
                decode_frame(buf, usize::MAX).map_err(|e| e.to_string())?
            {
                buf.advance(used);
                if env.request_id == rid {
                    return env.body.ok_or_else(|| "an empty answer".to_owned());
                }
            }
            match s.read_buf(buf).await {
                Ok(0) => return Err("closed".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

fn name(body: &Body) -> String {
    match body {
        Body::Error(e) => format!("error {}", code_name(e.code)),
        _ => "something else".to_owned(),
    }
}

/// Count one frame from the server; `Some` ends the connection (a fatal
/// error).
fn classify(kind: &'static str, env: Envelope, report: &Report) -> Option<String> {
    match env.body {
        Some(Body::Ack(_)) if kind == Mode::Post.kind() => report.count(kind, "acked", 1),
        Some(Body::Deliver(_)) if kind == Mode::Post.kind() => {
            report.count(kind, "own posts delivered", 1)
        }
        Some(Body::ReceiptList(_)) => report.count(kind, "receipt pages", 1),
        Some(Body::GroupInfo(_)) => report.count(kind, "member pages", 1),
        Some(Body::GroupList(_)) => report.count(kind, "group lists", 1),
        Some(Body::Error(e)) => {
            let name = code_name(e.code);
            let allowed = !e.fatal && name == "RATE_LIMITED";
            report.answer(kind, &format!("error: {name}"), allowed);
            if e.fatal {
                return Some(format!("fatal {name}"));
            }
        }
        Some(_) => report.count(kind, "other frames", 1),
        None => report.count(kind, "empty frames", 1),
    }
    None
}
