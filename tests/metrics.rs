//! `/metrics` after real traffic, read with a Prometheus text-format parser
//! that is not the server's (the `prometheus-parse` crate): the exposition
//! parses, and the counters show what happened.

mod common;

use std::collections::HashMap;

use common::*;
use prometheus_parse::{Sample, Scrape, Value};
use swiftlet_client::{Client, ClientConfig};
use swiftlet_protocol::ErrorCode;

async fn scrape(server: &TestServer) -> Scrape {
    let (status, body) = http(server.http_addr(), "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

fn value(s: &Sample) -> f64 {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => panic!("{} is not a number", s.metric),
    }
}

/// The samples of `metric` whose labels include `labels`, summed.
fn sum(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert!(!found.is_empty(), "no sample of {metric} {labels:?}");
    found.iter().map(|s| value(s)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_parse_and_count_what_happened() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice", "a").await;
    let (bob, mut bob_d) = server.connect("bob", "b").await;
    for i in 0..5 {
        alice
            .send("bob", "text/plain", format!("m{i}").into_bytes())
            .await
            .expect("ack");
    }
    for _ in 0..5 {
        next_message(&mut bob_d).await;
    }
    // Two refused logins: a forged token and an expired one.
    let forged = swiftlet_protocol::token::mint(b"not the secret", "carol", 60);
    let r = Client::connect(ClientConfig::new(server.addr().to_string(), forged, "c")).await;
    assert_eq!(code_of(r.map(|_| ())), ErrorCode::AuthFailed);
    let expired = {
        let claims = swiftlet_protocol::token::Claims {
            sub: "carol".into(),
            exp: 1,
            iat: 0,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode")
    };
    let r = Client::connect(ClientConfig::new(server.addr().to_string(), expired, "c")).await;
    assert_eq!(code_of(r.map(|_| ())), ErrorCode::TokenExpired);

    let m = scrape(&server).await;
    let types: HashMap<&str, &str> = HashMap::from([
        ("swiftlet_logins_total", "counter"),
        ("swiftlet_connections", "gauge"),
    ]);
    for s in &m.samples {
        if let Some(t) = types.get(s.metric.as_str()) {
            let ok = matches!(
                (t, &s.value),
                (&"counter", Value::Counter(_)) | (&"gauge", Value::Gauge(_))
            );
            assert!(ok, "{} has the wrong type: {:?}", s.metric, s.value);
        }
    }
    assert_eq!(sum(&m, "swiftlet_logins_total", &[]), 2.0);
    assert_eq!(
        sum(
            &m,
            "swiftlet_login_failures_total",
            &[("reason", "auth_failed")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "swiftlet_login_failures_total",
            &[("reason", "token_expired")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "swiftlet_login_failures_total",
            &[("reason", "token_revoked")]
        ),
        0.0
    );
    assert_eq!(sum(&m, "swiftlet_messages_in_total", &[]), 5.0);
    assert_eq!(sum(&m, "swiftlet_acks_total", &[]), 5.0);
    assert!(sum(&m, "swiftlet_messages_out_total", &[]) >= 5.0);
    // By transport, and the same split by shard.
    assert_eq!(
        sum(&m, "swiftlet_connections", &[("transport", "tcp")]),
        2.0
    );
    assert_eq!(
        sum(&m, "swiftlet_shard_connections", &[("transport", "tcp")]),
        2.0
    );
    let shards: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.metric == "swiftlet_shard_connections")
        .filter_map(|s| s.labels.get("shard"))
        .collect();
    assert_eq!(shards.len(), 2, "one series per shard: {shards:?}");
    // RocksDB's own figures: the sends are in the memtable.
    assert!(sum(&m, "swiftlet_rocksdb_memtable_bytes", &[]) > 0.0);
    for metric in [
        "swiftlet_rocksdb_pending_compaction_bytes",
        "swiftlet_rocksdb_stall_seconds_total",
        "swiftlet_rocksdb_writes_stopped",
        "swiftlet_rocksdb_block_cache_hit_ratio",
    ] {
        let v = sum(&m, metric, &[]);
        assert!(v >= 0.0, "{metric} = {v}");
    }
    // The heap by allocator: RocksDB's memtables are allocated through the
    // C library's malloc, so its in-use bytes hold at least them; mimalloc
    // has committed something for the sessions.
    assert!(
        sum(&m, "swiftlet_heap_libc_in_use_bytes", &[])
            >= sum(&m, "swiftlet_rocksdb_memtable_bytes", &[])
    );
    assert!(sum(&m, "swiftlet_heap_mimalloc_committed_bytes", &[]) > 0.0);
    for metric in [
        "swiftlet_heap_libc_free_bytes",
        "swiftlet_heap_libc_trims_total",
        "swiftlet_heap_libc_trim_seconds_total",
    ] {
        let v = sum(&m, metric, &[]);
        assert!(v >= 0.0, "{metric} = {v}");
    }
    // Open files: at least the listeners, the two sockets and RocksDB's.
    assert!(sum(&m, "swiftlet_open_files", &[]) > 6.0);
    // The histograms are there, with their counts.
    let request_count = m
        .samples
        .iter()
        .find(|s| s.metric == "swiftlet_request_seconds")
        .map(|s| match &s.value {
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => panic!("not a histogram"),
        });
    assert_eq!(request_count, Some(5.0));

    drop((alice, bob));
    // A closed connection leaves the gauges.
    let (c, _d) = server.connect("dave", "d").await;
    c.close().await;
    let settled = async {
        loop {
            let m = scrape(&server).await;
            if sum(&m, "swiftlet_shard_connections", &[]) == 0.0 {
                return sum(&m, "swiftlet_logins_total", &[]);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let logins = tokio::time::timeout(PATIENCE, settled)
        .await
        .expect("gauges settle");
    assert_eq!(logins, 3.0);
}
