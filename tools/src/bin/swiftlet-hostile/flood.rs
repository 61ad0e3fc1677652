//! A flood past the connection cap: every `--flood-every` seconds a burst
//! of `--flood` connections (three in four to the TCP port, one in four to
//! the HTTP port), `--flood-concurrency` attempts in flight, none of which
//! ever sends a byte. Those the server accepts are held until it closes
//! them; the rest must be refused at once (protocol/README.md §4, "Before
//! the Hello"): `TOO_MANY_CONNECTIONS` with request id 0 on the TCP port,
//! `503` on the HTTP port. An accepted one ends with `HANDSHAKE_TIMEOUT`
//! (TCP) or a close without a word (HTTP).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::tally::Report;
use crate::wire::{self, Target};
use crate::Args;

const KIND: &str = "flood";

pub async fn run(
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    mut stop: watch::Receiver<bool>,
) {
    if args.flood == 0 {
        return;
    }
    let gate = Arc::new(Semaphore::new(args.flood_concurrency.max(1)));
    let mut holders = tokio::task::JoinSet::new();
    let mut every = tokio::time::interval(Duration::from_secs_f64(args.flood_every.max(0.1)));
    // The first burst after the slowloris ramp-up, so it meets a full house.
    tokio::time::sleep(Duration::from_secs(3)).await;
    'bursts: loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => break,
        }
        report.count(KIND, "bursts", 1);
        for i in 0..args.flood {
            let permit = tokio::select! {
                p = gate.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'bursts },
                _ = stop.changed() => break 'bursts,
            };
            let (target, report, mut stop) = (target.clone(), report.clone(), stop.clone());
            let http = i % 4 == 3;
            holders.spawn(async move {
                let conn = target.connect(http).await;
                drop(permit);
                let mut s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        report.count(KIND, &format!("connect error: {}", e.kind()), 1);
                        return;
                    }
                };
                report.count(KIND, "connections", 1);
                let (got, end) = tokio::select! {
                    r = wire::read_to_end(&mut s, wire::ANSWER_WAIT) => r,
                    _ = stop.changed() => {
                        report.count(KIND, "held at the stop", 1);
                        return;
                    }
                };
                if http {
                    let a = wire::web_answer(&got, end);
                    let ok = matches!(a.as_str(), "http 503" | "closed");
                    report.answer(KIND, &format!("http: {a}"), ok);
                } else {
                    let a = wire::tcp_answer(&got, end);
                    let ok = matches!(a.as_str(), "TOO_MANY_CONNECTIONS" | "HANDSHAKE_TIMEOUT");
                    report.answer(KIND, &format!("tcp: {a}"), ok);
                }
            });
            // Reap finished holders as we go, so the set stays small.
            while holders.try_join_next().is_some() {}
        }
    }
    while holders.join_next().await.is_some() {}
}
