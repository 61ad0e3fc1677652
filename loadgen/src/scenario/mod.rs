//! The scenarios. Each runs this process's share of the work (all of it
//! without `--workers`) and returns a [`WorkerResult`](crate::summary::WorkerResult).

pub mod chat;
pub mod group;
pub mod idle;
pub mod offline;
pub mod session;
pub mod storm;

use std::time::Duration;

use rand::Rng;
use swiftlet_protocol::{pb, Body};
use tokio::time::Instant;

use crate::cli::Args;
use crate::conn::{fatal_error, Conn, ConnError};

/// The heartbeat period: `--ping-interval`, else a third of the server's
/// idle timeout, else 20 s.
pub fn ping_period(args: &Args, conn: &Conn) -> Duration {
    if let Some(s) = args.ping_interval.filter(|s| *s > 0.0) {
        return Duration::from_secs_f64(s);
    }
    match conn.welcome.idle_timeout_ms {
        0 => Duration::from_secs(20),
        ms => Duration::from_millis(u64::from(ms) / 3),
    }
}

/// A random first ping time within one period, so 18,000 connections do not
/// ping in lockstep.
pub fn first_ping(period: Duration) -> Instant {
    let jitter = rand::thread_rng().gen_range(0..period.as_millis().max(1) as u64);
    Instant::now() + Duration::from_millis(jitter)
}

/// Send a Ping (heartbeat).
pub async fn ping(conn: &mut Conn) -> Result<(), ConnError> {
    conn.send(Body::Ping(pb::Ping { nonce: 0 })).await.map(drop)
}

/// A frame an idle connection may get: Pong and deliveries are fine; a fatal
/// error ends it.
pub fn idle_frame(body: Option<Body>) -> Result<(), ConnError> {
    match body {
        Some(Body::Error(e)) => fatal_error(&e).map_or(Ok(()), Err),
        _ => Ok(()),
    }
}
