//! The client library against a scripted fake peer on 127.0.0.1:0.
//!
//! These test only the library's own machinery (request routing by
//! request_id, deliveries, disconnect and timeout handling, heartbeats,
//! close, reliable resend), not server behaviour, which the server's
//! end-to-end tests cover against the real thing.

use std::future::Future;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use swiftlet_client::{
    pb, Body, Client, ClientConfig, ClientError, CloseReason, DeliveryItem, Envelope, ErrorCode,
    FrameCodec, ReliableSender, RetryPolicy,
};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

type Peer = Framed<tokio::net::TcpStream, FrameCodec>;

/// Serve each accepted connection (numbered from 0) with `script`.
async fn fake_server<F, Fut>(script: F) -> String
where
    F: Fn(usize, Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(script(n, Framed::new(stream, FrameCodec::default())));
            n += 1;
        }
    });
    addr
}

async fn recv(peer: &mut Peer) -> Envelope {
    peer.next().await.expect("frame").expect("valid frame")
}

/// Read the Hello and answer Welcome (no idle timeout: no heartbeat).
async fn welcome(peer: &mut Peer) {
    let hello = recv(peer).await;
    assert!(matches!(hello.body, Some(Body::Hello(ref h)) if h.protocol_version == 1));
    let w = pb::Welcome {
        user_id: "alice".into(),
        device_id: "d1".into(),
        cursor: 3,
        head_seq: 5,
        max_frame_bytes: 64 * 1024,
        ..Default::default()
    };
    peer.send(Envelope::new(hello.request_id, Body::Welcome(w)))
        .await
        .expect("send welcome");
}

fn ack(request_id: u64, send: &pb::Send, server_msg_id: u64) -> Envelope {
    Envelope::new(
        request_id,
        Body::Ack(pb::Ack {
            client_msg_id: send.client_msg_id.clone(),
            server_msg_id,
            timestamp_ms: 1,
            seq: 0,
        }),
    )
}

/// One send through a [`ReliableSender`] retrying every 10-50 ms: its Ack
/// (server_msg_id 9, from the second connection).
async fn send_with_quick_retries(addr: &str) -> pb::Ack {
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        deadline: Duration::from_secs(10),
    };
    let mut sender = ReliableSender::new(cfg(addr), policy);
    let ack = sender.send("bob", "text/plain", "hi").await.expect("ack");
    assert_eq!(ack.server_msg_id, 9);
    assert_eq!(sender.connects(), 2);
    ack
}

fn cfg(addr: &str) -> ClientConfig {
    let mut c = ClientConfig::new(addr, "alice", "d1");
    c.request_timeout = Duration::from_secs(5);
    c
}

#[tokio::test]
async fn responses_are_routed_by_request_id_and_pushes_to_deliveries() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        let first = recv(&mut peer).await;
        let second = recv(&mut peer).await;
        // Answer out of order, with a push in between.
        let ev = pb::Event { seq: 4, kind: None };
        peer.send(Envelope::new(
            0,
            Body::Deliver(pb::Deliver { event: Some(ev) }),
        ))
        .await
        .expect("push");
        for env in [second, first] {
            let reply = match env.body {
                Some(Body::Send(s)) => ack(env.request_id, &s, 77),
                Some(Body::Sync(_)) => Envelope::new(
                    env.request_id,
                    Body::SyncBatch(pb::SyncBatch {
                        head_seq: 5,
                        ..Default::default()
                    }),
                ),
                other => panic!("unexpected {other:?}"),
            };
            peer.send(reply).await.expect("reply");
        }
        // Keep the connection open until the client goes away.
        while peer.next().await.is_some() {}
    })
    .await;

    let (client, mut deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    assert_eq!(client.welcome().cursor, 3);
    let (sent, synced) = tokio::join!(
        client.send_with_id("m1", "bob", "text/plain", "hi"),
        client.sync(3, 10)
    );
    let sent = sent.expect("ack");
    assert_eq!(
        (sent.client_msg_id.as_str(), sent.server_msg_id),
        ("m1", 77)
    );
    assert_eq!(synced.expect("batch").head_seq, 5);
    match deliveries.next().await {
        Some(DeliveryItem::Event(ev)) => assert_eq!(ev.seq, 4),
        other => panic!("expected event, got {other:?}"),
    }
}

#[tokio::test]
async fn a_fatal_error_at_hello_is_a_server_error() {
    let addr = fake_server(|_, mut peer| async move {
        let hello = recv(&mut peer).await;
        let err = Envelope::error(hello.request_id, ErrorCode::AuthFailed, "bad token", true);
        let _ = peer.send(err).await;
    })
    .await;
    match Client::connect(cfg(&addr)).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::AuthFailed as i32),
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_dropped_connection_fails_pending_requests_and_ends_deliveries() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        let _ = recv(&mut peer).await; // the Send, never answered
    })
    .await;
    let (client, mut deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    let err = client
        .send("bob", "text/plain", "hi")
        .await
        .expect_err("no ack");
    assert!(
        matches!(err, ClientError::Disconnected(CloseReason::Eof)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        deliveries.next().await,
        Some(DeliveryItem::Closed(CloseReason::Eof))
    );
    assert_eq!(deliveries.next().await, None);
    // Later requests fail at once.
    assert!(matches!(
        client.sync(0, 1).await,
        Err(ClientError::Disconnected(_))
    ));
}

#[tokio::test]
async fn a_fatal_server_error_mid_session_closes_with_its_code() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        let _ = recv(&mut peer).await;
        let err = Envelope::error(0, ErrorCode::ShuttingDown, "bye", true);
        let _ = peer.send(err).await;
    })
    .await;
    let (client, mut deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    let err = client.sync(0, 1).await.expect_err("closed");
    assert_eq!(err.code(), Some(ErrorCode::ShuttingDown as i32));
    match deliveries.next().await {
        Some(DeliveryItem::Closed(reason @ CloseReason::Server { .. })) => {
            assert!(reason.may_reconnect())
        }
        other => panic!("expected Closed(Server), got {other:?}"),
    }
}

#[tokio::test]
async fn a_request_error_fails_only_that_request() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        let env = recv(&mut peer).await;
        let err = Envelope::error(env.request_id, ErrorCode::InvalidRecipient, "no", false);
        peer.send(err).await.expect("error");
        let ping = recv(&mut peer).await;
        let Some(Body::Ping(p)) = ping.body else {
            panic!("expected ping")
        };
        let pong = Envelope::new(ping.request_id, Body::Pong(pb::Pong { nonce: p.nonce }));
        peer.send(pong).await.expect("pong");
        while peer.next().await.is_some() {}
    })
    .await;
    let (client, _deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    let err = client
        .send("", "text/plain", "x")
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), Some(ErrorCode::InvalidRecipient as i32));
    assert!(!err.is_retryable());
    client.ping().await.expect("still connected");
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_a_silent_peer_fails_the_heartbeat() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        while peer.next().await.is_some() {}
    })
    .await;
    let mut c = cfg(&addr);
    c.request_timeout = Duration::from_millis(200);
    c.heartbeat = Some(Duration::from_millis(300));
    let (client, mut deliveries) = Client::connect(c).await.expect("connect");
    assert!(matches!(client.sync(0, 1).await, Err(ClientError::Timeout)));
    assert_eq!(
        client.closed(),
        None,
        "a timeout alone keeps the connection"
    );
    assert_eq!(
        deliveries.next().await,
        Some(DeliveryItem::Closed(CloseReason::HeartbeatTimeout))
    );
}

#[tokio::test]
async fn close_writes_queued_frames_first() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let addr = fake_server(move |_, mut peer| {
        let tx = tx.lock().ok().and_then(|mut t| t.take());
        async move {
            welcome(&mut peer).await;
            let mut seen = Vec::new();
            while let Some(Ok(env)) = peer.next().await {
                seen.push(env.body);
            }
            if let Some(tx) = tx {
                let _ = tx.send(seen);
            }
        }
    })
    .await;
    let (client, _deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    client.ack_delivery(7).await.expect("queued");
    client.close().await;
    assert_eq!(client.closed(), Some(CloseReason::Local));
    let seen = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("peer saw EOF")
        .expect("report");
    assert_eq!(
        seen,
        vec![Some(Body::DeliveryAck(pb::DeliveryAck { up_to: 7 }))]
    );
}

#[tokio::test]
async fn reliable_send_resends_the_same_id_after_a_disconnect() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = fake_server(move |n, mut peer| {
        let tx = tx.clone();
        async move {
            welcome(&mut peer).await;
            let env = recv(&mut peer).await;
            let Some(Body::Send(send)) = env.body else {
                panic!("expected send")
            };
            let _ = tx.send(send.client_msg_id.clone());
            if n == 0 {
                return; // "kill -9" before the Ack
            }
            peer.send(ack(env.request_id, &send, 9)).await.expect("ack");
            while peer.next().await.is_some() {}
        }
    })
    .await;
    let ack = send_with_quick_retries(&addr).await;
    let first = rx.recv().await.expect("first id");
    let second = rx.recv().await.expect("second id");
    assert_eq!(first, second);
    assert_eq!(first, ack.client_msg_id);
}

/// Protocol section 10: `UNAVAILABLE` changed nothing and is retried with
/// the same id, on the same connection first, and from a new connection
/// once it persists (a cluster node that lost the user's partition keeps
/// answering it; the user's new home is elsewhere).
#[tokio::test]
async fn reliable_send_retries_unavailable_and_reconnects_when_it_persists() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = fake_server(move |n, mut peer| {
        let tx = tx.clone();
        async move {
            welcome(&mut peer).await;
            while let Some(Ok(env)) = peer.next().await {
                let Some(Body::Send(send)) = env.body else {
                    continue;
                };
                let _ = tx.send((n, send.client_msg_id.clone()));
                let answer = if n == 0 {
                    Envelope::error(
                        env.request_id,
                        ErrorCode::Unavailable,
                        "this node may not write for this user now",
                        false,
                    )
                } else {
                    ack(env.request_id, &send, 9)
                };
                peer.send(answer).await.expect("answer");
            }
        }
    })
    .await;
    let ack = send_with_quick_retries(&addr).await;
    let mut attempts = Vec::new();
    while let Ok(a) = rx.try_recv() {
        attempts.push(a);
    }
    let id = ack.client_msg_id;
    assert_eq!(
        attempts,
        vec![(0, id.clone()), (0, id.clone()), (1, id)],
        "twice on the first connection, then once on a new one"
    );
}

#[tokio::test]
async fn reliable_send_gives_up_at_the_deadline() {
    // Nothing listens on this port once the listener is dropped.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        deadline: Duration::from_millis(300),
    };
    let err = swiftlet_client::send_reliably(&cfg(&addr), &policy, "m1", "bob", "text/plain", "x")
        .await
        .expect_err("nobody home");
    match err {
        ClientError::GaveUp { attempts, last } => {
            assert!(attempts >= 2, "{attempts}");
            assert!(matches!(*last, ClientError::Io(_)), "{last:?}");
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_reach_the_wire_with_increasing_ids() {
    let addr = fake_server(|_, mut peer| async move {
        welcome(&mut peer).await;
        let mut last = 1;
        while let Some(Ok(env)) = peer.next().await {
            assert!(env.request_id > last, "{} after {last}", env.request_id);
            last = env.request_id;
            if let Some(Body::Ping(p)) = env.body {
                let pong = Envelope::new(env.request_id, Body::Pong(pb::Pong { nonce: p.nonce }));
                if peer.send(pong).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (client, _deliveries) = Client::connect(cfg(&addr)).await.expect("connect");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.ping().await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("pong: ids stayed increasing");
    }
}
