//! Slowloris: connections that never finish their `Hello`, held open all
//! the time. A third stay silent on the TCP port, a third trickle a valid
//! `Hello` frame one byte a second (so the frame is never complete within
//! the handshake timeout), a third trickle a WebSocket upgrade request to
//! the HTTP port. The spec's answers (protocol/README.md §2.2, §4, §5):
//! `HANDSHAKE_TIMEOUT` on the TCP port (or `IDLE_TIMEOUT` if the frame
//! timeout were the shorter), a close without a word on the HTTP port, and
//! at the connection cap `TOO_MANY_CONNECTIONS` or `503`. Each connection
//! reconnects as soon as it is closed, so the server holds this many
//! unauthenticated connections throughout.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::tally::Report;
use crate::wire::{self, Target};
use crate::Args;

const KIND: &str = "slowloris";

#[derive(Clone, Copy)]
enum Mode {
    TcpSilent,
    TcpTrickle,
    HttpTrickle,
}

pub async fn run(
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.slowloris {
        let mode = match i % 3 {
            0 => Mode::TcpSilent,
            1 => Mode::TcpTrickle,
            _ => Mode::HttpTrickle,
        };
        let (target, report, stop) = (target.clone(), report.clone(), stop.clone());
        // Ramp up over about two seconds rather than in one burst.
        let delay = Duration::from_micros(i as u64 * 1000);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            hold(mode, &target, &report, stop).await
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn hold(mode: Mode, target: &Target, report: &Report, mut stop: watch::Receiver<bool>) {
    let bytes = match mode {
        Mode::TcpSilent => Vec::new(),
        Mode::TcpTrickle => wire::frame(&target.hello("hostile-slow", "slow")),
        Mode::HttpTrickle => wire::ws_upgrade(target.http),
    };
    let http = matches!(mode, Mode::HttpTrickle);
    while !*stop.borrow() {
        let mut s = match target.connect(http).await {
            Ok(s) => s,
            Err(e) => {
                report.count(KIND, &format!("connect error: {}", e.kind()), 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        report.count(KIND, "connections", 1);
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let closed = loop {
            tokio::select! {
                r = s.readable() => break r.is_ok(),
                _ = tick.tick(), if sent < bytes.len() => {
                    if s.write_all(&bytes[sent..sent + 1]).await.is_err() {
                        break true;
                    }
                    sent += 1;
                    report.count(KIND, "bytes trickled", 1);
                }
                _ = stop.changed() => break false,
            }
        };
        if !closed {
            report.count(KIND, "held at the stop", 1);
            return;
        }
        let (got, end) = wire::read_to_end(&mut s, Duration::from_secs(5)).await;
        let (answer, allowed) = match mode {
            Mode::TcpSilent | Mode::TcpTrickle => {
                let a = wire::tcp_answer(&got, end);
                let ok = matches!(
                    a.as_str(),
                    "HANDSHAKE_TIMEOUT" | "IDLE_TIMEOUT" | "TOO_MANY_CONNECTIONS"
                );
                (format!("tcp: {a}"), ok)
            }
            Mode::HttpTrickle => {
                let a = wire::web_answer(&got, end);
                let ok = matches!(a.as_str(), "closed" | "http 503");
                (format!("http: {a}"), ok)
            }
        };
        report.answer(KIND, &answer, allowed);
        // Reconnect at once, as an attacker would; a short pause keeps a
        // refused connection from spinning.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
