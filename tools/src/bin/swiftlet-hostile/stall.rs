//! Clients that never read: each logs in as `<prefix>-sink-<k>` (the
//! fast senders' recipients, so live pushes pile up for it too), then
//! pipelines `Sync{after: 0, limit: 500}` (the biggest page) and `Ping`
//! frames and never reads a byte, until the socket stops taking them. The
//! server must stop reading it and stop pushing to it once its output
//! budget is full (protocol/README.md §9), so its memory stays bounded,
//! and close it `SLOW_CONSUMER` once that has lasted the idle timeout. At
//! the stop it reads everything the server queued, to see how it ended:
//! still open (paused), or the fatal `SLOW_CONSUMER` as the last frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use swiftlet_client::codec::decode_frame;
use swiftlet_client::{code_name, pb, Body, Envelope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::tally::Report;
use crate::wire::{self, Target};
use crate::Args;

const KIND: &str = "never_reads";

pub async fn run(
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    stop: watch::Receiver<bool>,
) {
    wire::each(args.stall, |k| {
        let (target, args, report, stop) =
            (target.clone(), args.clone(), report.clone(), stop.clone());
        async move { staller(k, &target, &args, &report, stop).await }
    })
    .await;
}

async fn staller(
    k: usize,
    target: &Target,
    args: &Args,
    report: &Report,
    mut stop: watch::Receiver<bool>,
) {
    let user = format!("{}-sink-{k}", args.user_prefix);
    let mut s = match target.connect(false).await {
        Ok(s) => s,
        Err(e) => {
            report.answer(KIND, &format!("connect error: {}", e.kind()), false);
            return;
        }
    };
    // Log in; the Welcome is read (a client must know it is in), and then
    // nothing ever again until the stop.
    if s.write_all(&wire::frame(&target.hello(&user, "stall")))
        .await
        .is_err()
    {
        report.answer(KIND, "closed before the Welcome", false);
        return;
    }
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match decode_frame(&buf, usize::MAX) {
            Ok(Some((env, used))) => {
                // What came behind the Welcome (the backlog's first pushes)
                // stays in `buf`, read on at the stop.
                buf.advance(used);
                match env.body {
                    Some(Body::Welcome(_)) => report.count(KIND, "logins", 1),
                    other => {
                        report.answer(KIND, &format!("not a Welcome: {other:?}"), false);
                        return;
                    }
                }
                break;
            }
            Ok(None) => {}
            Err(_) => {
                report.answer(KIND, "undecodable Welcome", false);
                return;
            }
        }
        match tokio::time::timeout(wire::ANSWER_WAIT, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                report.answer(KIND, "no Welcome", false);
                return;
            }
        }
    }
    // Pipeline requests until the server stops taking them. One write
    // future for the whole run: dropping a half-done write would cut a
    // frame in two.
    let written = std::sync::atomic::AtomicU64::new(0);
    let since = std::time::Instant::now();
    let last_progress_ms = std::sync::atomic::AtomicU64::new(0);
    {
        let writer = async {
            let mut rid = 1u64;
            let mut out = Vec::new();
            loop {
                out.clear();
                for i in 0..32 {
                    rid += 1;
                    let body = if i % 2 == 0 {
                        Body::Sync(pb::Sync {
                            after: 0,
                            limit: 500,
                        })
                    } else {
                        Body::Ping(pb::Ping { nonce: rid })
                    };
                    swiftlet_client::codec::encode_frame(&Envelope::new(rid, body), &mut out);
                }
                if s.write_all(&out).await.is_err() {
                    return;
                }
                written.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
                last_progress_ms.store(
                    since.elapsed().as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        };
        tokio::select! {
            _ = writer => report.count(KIND, "write errors", 1),
            _ = stop.changed() => {}
        }
    }
    report.count(KIND, "request bytes written", written.into_inner());
    let stuck_ms =
        (since.elapsed().as_millis() as u64).saturating_sub(last_progress_ms.into_inner());
    if stuck_ms > 1000 {
        report.count(KIND, "blocked at the stop (server stopped reading)", 1);
    }
    // The stop: read what the server queued, for at most 5 s (once it is
    // read on, a staller's whole backlog follows, and the fast senders
    // filled it), to its end or until it goes quiet.
    buf.reserve(256 * 1024);
    let (mut frames, mut bytes, mut fatal) = (0u64, 0u64, None);
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let end = loop {
        while let Ok(Some((env, used))) = decode_frame(&buf, usize::MAX) {
            buf.advance(used);
            frames += 1;
            bytes += used as u64;
            if let Some(Body::Error(e)) = env.body {
                if e.fatal {
                    fatal = Some(code_name(e.code));
                }
            }
        }
        let quiet = (tokio::time::Instant::now() + Duration::from_secs(2)).min(until);
        match tokio::time::timeout_at(quiet, s.read_buf(&mut buf)).await {
            Err(_) => break "open at the stop (paused)",
            Ok(Ok(0)) => break "closed",
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break "reset",
        }
    };
    report.count(KIND, "answer frames read at the stop", frames);
    report.count(KIND, "answer bytes read at the stop", bytes);
    if decode_frame(&buf, usize::MAX).is_err() {
        report.answer(KIND, "undecodable answer", false);
        return;
    }
    let (answer, allowed) = match (fatal, end) {
        (None, "open at the stop (paused)") => (end.to_owned(), true),
        (Some("SLOW_CONSUMER"), "closed") => ("SLOW_CONSUMER".to_owned(), true),
        (Some(code), end) => (format!("{code}, {end}"), false),
        (None, end) => (end.to_owned(), false),
    };
    report.answer(KIND, &answer, allowed);
}
