//! Clients sending as fast as they can: each logs in as a user of its own
//! (`<prefix>-fast-<k>`) and writes `Send`s back to back, as fast as the
//! socket takes them, to the never-reading users of [`crate::stall`] (so
//! their inboxes grow while they stall), while a reader task takes every
//! answer: the server's flow control (at most 16 requests waiting for
//! storage, 256 frames and 64 KiB read per turn, the frames-per-second
//! bucket where the server has one) is what must hold them back. Allowed
//! answers: `Ack`, `RATE_LIMITED`; a fatal error ends the connection and
//! the sender logs in again.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use swiftlet_client::{code_name, pb, Body, Envelope};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::tally::Report;
use crate::wire::{self, Target};
use crate::Args;

const KIND: &str = "fast_sender";
/// Frames written per `write_all`.
const BATCH: usize = 64;

pub async fn run(
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    stop: watch::Receiver<bool>,
) {
    wire::each(args.fast, |k| {
        let (target, args, report, stop) =
            (target.clone(), args.clone(), report.clone(), stop.clone());
        async move { sender(k, &target, &args, &report, stop).await }
    })
    .await;
}

async fn sender(
    k: usize,
    target: &Target,
    args: &Args,
    report: &Report,
    stop: watch::Receiver<bool>,
) {
    let user = format!("{}-fast-{k}", args.user_prefix);
    let body = vec![b'x'; args.fast_body_bytes];
    let mut n: u64 = 0;
    while !*stop.borrow() {
        let s = match target.connect(false).await {
            Ok(s) => s,
            Err(e) => {
                report.count(KIND, &format!("connect error: {}", e.kind()), 1);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let (mut rd, mut wr) = s.into_split();
        if wr
            .write_all(&wire::frame(&target.hello(&user, "fast")))
            .await
            .is_err()
        {
            continue;
        }
        report.count(KIND, "logins attempted", 1);
        let mut buf = BytesMut::with_capacity(128 * 1024);
        let reader =
            wire::read_answers(&mut rd, &mut buf, stop.clone(), |env| classify(env, report));
        let mut writer_stop = stop.clone();
        let writer = async {
            let mut out = Vec::with_capacity(BATCH * (args.fast_body_bytes + 64));
            loop {
                out.clear();
                for _ in 0..BATCH {
                    n += 1;
                    let to = if args.stall > 0 {
                        format!("{}-sink-{}", args.user_prefix, n as usize % args.stall)
                    } else {
                        user.clone()
                    };
                    let env = Envelope::new(
                        n + 1,
                        Body::Send(pb::Send {
                            client_msg_id: format!("f{k}-{n}"),
                            to_user: to,
                            content_type: "application/octet-stream".into(),
                            body: body.clone().into(),
                            group_id: 0,
                        }),
                    );
                    swiftlet_client::codec::encode_frame(&env, &mut out);
                }
                tokio::select! {
                    r = wr.write_all(&out) => if r.is_err() { return; },
                    _ = writer_stop.changed() => return,
                }
                report.count(KIND, "sends written", BATCH as u64);
            }
        };
        // The connection ends when the reader sees its end; the writer is
        // dropped with it.
        let end = tokio::select! {
            end = reader => end,
            _ = writer => {
                // The writer stops on a write error or the stop; read what
                // is left for the server's reason.
                String::new()
            }
        };
        if !end.is_empty() {
            let allowed = end == "closed";
            report.answer(KIND, &format!("connection ended: {end}"), allowed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Count one frame from the server; `Some` ends the connection (a fatal
/// error).
fn classify(env: Envelope, report: &Report) -> Option<String> {
    match env.body {
        Some(Body::Welcome(_)) => report.count(KIND, "logins", 1),
        Some(Body::Ack(_)) => report.count(KIND, "acked", 1),
        Some(Body::Deliver(_)) => report.count(KIND, "delivered (own echoes)", 1),
        Some(Body::Error(e)) => {
            let name = code_name(e.code);
            let allowed = !e.fatal && name == "RATE_LIMITED";
            report.answer(KIND, &format!("error: {name}"), allowed);
            if e.fatal {
                return Some(format!("fatal {name}"));
            }
        }
        Some(_) => report.count(KIND, "other frames", 1),
        None => report.count(KIND, "empty frames", 1),
    }
    None
}
