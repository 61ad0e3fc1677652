//! A server started in-process with a manual clock (`Config::clock`) reads
//! the time only from it: the shards' timers fire when the test moves the
//! clock, not when real time passes, and timestamps are the clock's.

mod common;

use std::time::Duration;

use common::*;
use swiftlet::clock::ManualClock;
use swiftlet_protocol::{Body, ErrorCode};

const T0: u64 = 1_800_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_come_from_the_injected_clock() {
    let clock = ManualClock::new(T0);
    let srv = TestServer::start_with(|c| c.clock = clock.clock());
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &token("alice")).await;
    match raw.recv().await.and_then(|e| e.body) {
        Some(Body::Welcome(w)) => assert_eq!(w.server_time_ms, T0),
        other => panic!("expected Welcome, got {other:?}"),
    }
    clock.advance(Duration::from_secs(5));
    let (alice, _arx) = srv.connect("alice", "phone").await;
    let (_bob, mut brx) = srv.connect("bob", "phone").await;
    let ack = alice.send("bob", "text/plain", "hi").await.expect("ack");
    assert_eq!(ack.timestamp_ms, T0 + 5_000);
    assert_eq!(next_message(&mut brx).await.1.timestamp_ms, T0 + 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shards_timers_run_on_the_injected_clock() {
    let clock = ManualClock::new(T0);
    // The defaults: 10 s to say Hello, 60 s of silence once logged in.
    let srv = TestServer::start_with(|c| c.clock = clock.clock());

    let mut silent = Raw::connect(srv.addr()).await;
    let mut idle = Raw::connect(srv.addr()).await;
    idle.hello(1, &token("erin")).await;
    assert!(matches!(
        idle.recv().await.and_then(|e| e.body),
        Some(Body::Welcome(_))
    ));

    // Past the handshake timeout: only the connection without a Hello goes.
    clock.advance(Duration::from_millis(10_500));
    assert_eq!(silent.expect_fatal().await, ErrorCode::HandshakeTimeout);

    // Past the idle timeout, with no real minute waited.
    clock.advance(Duration::from_secs(60));
    assert_eq!(idle.expect_fatal().await, ErrorCode::IdleTimeout);
}
