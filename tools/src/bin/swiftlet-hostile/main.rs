//! `swiftlet-hostile`: every kind of hostile client at once, against a
//! running server, for a fixed time; then one JSON report on stdout of what
//! the server answered each kind (typed errors, close codes, HTTP statuses,
//! refusals at the connection cap), and which answers the wire spec does
//! not allow (`unexpected`).
//!
//! It is the hostile half of `tools/scripts/hostile.sh`, which runs it
//! beside honest `loadgen chat` users and compares their latency with a run
//! without it (docs/performance.md, "Hostile clients"). It speaks raw bytes
//! over tokio sockets rather than through the client library, because the
//! point is to do what no well-behaved client does. One module per kind:
//!
//! - [`slowloris`]: connections that never finish their `Hello` (silent,
//!   or trickling it a byte a second; on TCP and on the HTTP port);
//! - [`flood`]: bursts of connections past `--max-connections`;
//! - [`fast`]: logged-in clients sending `Send`s as fast as the server
//!   takes them, reading their answers;
//! - [`stall`]: logged-in clients that pipeline big `Sync`s and `Ping`s and
//!   never read a byte (their inboxes are what the fast senders fill);
//! - [`reader`]: logged-in clients that pipeline the biggest `GetReceipts`,
//!   `GetGroup` and `ListGroups` pages, reading every answer, and clients
//!   posting to a 500-member group as fast as they can;
//! - [`malformed`]: oversized and malformed input in a loop on TCP,
//!   WebSocket and HTTP, each case checked against the answer the spec
//!   gives for it.
//!
//! [`wire`] holds the byte-level helpers they share, [`tally`] the report.

mod fast;
mod flood;
mod malformed;
mod reader;
mod slowloris;
mod stall;
mod tally;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tokio::sync::watch;

use tally::Report;
use wire::Target;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "swiftlet-hostile",
    about = "Hostile clients, all at once, against a swiftlet server"
)]
pub struct Args {
    /// The server's TCP protocol address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    server: SocketAddr,
    /// The server's HTTP listener (WebSocket, HTTP API).
    #[arg(long, default_value = "127.0.0.1:7480")]
    http_server: SocketAddr,
    /// Seconds to keep every abuse running.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Log in with bare user ids (server in --dev-auth); otherwise tokens
    /// are minted with --jwt-secret.
    #[arg(long)]
    dev_auth: bool,
    #[arg(long, env = "SWIFTLET_JWT_SECRET")]
    jwt_secret: Option<String>,
    /// Local source addresses, round-robin per connection
    /// (`127.0.0.2-127.0.0.9` or a comma list): spreads the churn over more
    /// ephemeral ports, and keeps the hostile clients apart from honest
    /// ones in per-address caps.
    #[arg(long, default_value = "127.0.0.2-127.0.0.9")]
    source: String,
    /// Connections that never finish their Hello, held all the time (each
    /// reconnects when the server closes it).
    #[arg(long, default_value_t = 2000)]
    slowloris: usize,
    /// Connections opened in each flood burst.
    #[arg(long, default_value_t = 1500)]
    flood: usize,
    /// Seconds between flood bursts.
    #[arg(long, default_value_t = 10.0)]
    flood_every: f64,
    /// Connection attempts in flight during a burst.
    #[arg(long, default_value_t = 256)]
    flood_concurrency: usize,
    /// Logged-in clients sending as fast as they can.
    #[arg(long, default_value_t = 4)]
    fast: usize,
    /// Body bytes of the fast senders' messages.
    #[arg(long, default_value_t = 100)]
    fast_body_bytes: usize,
    /// Logged-in clients that never read.
    #[arg(long, default_value_t = 4)]
    stall: usize,
    /// Logged-in clients pipelining the biggest group and receipt pages.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Logged-in clients posting to a 500-member group as fast as they can.
    #[arg(long, default_value_t = 2)]
    posters: usize,
    /// Loops per transport (TCP, WebSocket, HTTP) sending malformed and
    /// oversized input back to back.
    #[arg(long, default_value_t = 2)]
    malformed: usize,
    /// The server's maximum frame (Welcome.max_frame_bytes), to size the
    /// oversized cases.
    #[arg(long, default_value_t = 65536)]
    max_frame: usize,
    /// User-id prefix of the hostile users (fast senders and stallers).
    #[arg(long, default_value = "hostile")]
    user_prefix: String,
}

fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    if let Some((a, b)) = spec.split_once('-') {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
            a.trim().parse().context("source range start")?,
            b.trim().parse().context("source range end")?,
        );
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 255 {
            bail!("source range {spec}: at most 256 addresses, in increasing order");
        }
        return Ok((a..=b).map(|x| IpAddr::V4(x.into())).collect());
    }
    spec.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("source address {s}"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.dev_auth && args.jwt_secret.is_none() {
        bail!("give --dev-auth or --jwt-secret (the hostile senders log in)");
    }
    let target = Arc::new(Target::new(&args, parse_sources(&args.source)?));
    let report = Arc::new(Report::default());
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Start order: the logged-in abusers first (they must get in before
    // the flood fills the cap), then the rest.
    tasks.spawn(fast::run(
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tasks.spawn(stall::run(
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tasks.spawn(reader::run(
        reader::Mode::Read,
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tasks.spawn(reader::run(
        reader::Mode::Post,
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    tasks.spawn(malformed::run(
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tasks.spawn(slowloris::run(
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    tasks.spawn(flood::run(
        target.clone(),
        args.clone(),
        report.clone(),
        stop.clone(),
    ));
    let ticker = {
        let report = report.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => eprintln!("[{:>5.1}s] {}", started.elapsed().as_secs_f64(), report.progress()),
                    _ = stop.changed() => return,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let _ = stop_tx.send(true);
    // Every kind ends within a few seconds of the stop (each closes its
    // sockets and reads what is left to classify).
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => break,
                Some(Err(e)) => eprintln!("a hostile kind panicked: {e}"),
                Some(Ok(())) => {}
            },
            _ = &mut deadline => { eprintln!("some hostile kinds did not stop within 20 s"); break; }
        }
    }
    ticker.abort();
    let json = report.to_json(started.elapsed().as_secs_f64(), &args);
    println!("{json}");
    if report.unexpected_total() > 0 {
        std::process::exit(1);
    }
    Ok(())
}
