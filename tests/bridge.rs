//! The browser bridge: WebSocket and TCP clients in one conversation, HTTP
//! sync and long-poll, HTTP send, and bad input over WebSocket and HTTP.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::Value;
use swiftlet_client::pb;
use swiftlet_protocol::{Body, Envelope, ErrorCode};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(
    srv: &TestServer,
    origin: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{}/ws", srv.http_addr()).into_client_request()?;
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", o.parse().expect("header"));
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn ws_send(ws: &mut Ws, env: Envelope) {
    ws.send(WsMessage::Binary(env.encode_to_vec()))
        .await
        .expect("ws send");
}

/// The next envelope; None once the server closed.
async fn ws_recv(ws: &mut Ws) -> Option<Envelope> {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("ws answer within patience")
        {
            Some(Ok(WsMessage::Binary(b))) => {
                return Some(Envelope::decode(b.as_slice()).expect("valid envelope"))
            }
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn ws_login(ws: &mut Ws, user: &str) -> pb::Welcome {
    ws_send(
        ws,
        Envelope::new(
            1,
            Body::Hello(pb::Hello {
                protocol_version: 1,
                token: token(user),
                device_id: "browser".into(),
                skip_own_sends: false,
            }),
        ),
    )
    .await;
    match ws_recv(ws).await.and_then(|e| e.body) {
        Some(Body::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// `GET /v1/sync?<query>` as `user`: the status and the JSON page.
async fn sync_as(addr: std::net::SocketAddr, user: &str, query: &str) -> (u16, Value) {
    let auth = format!("Bearer {}", token(user));
    let target = format!("/v1/sync?{query}");
    let (status, body) = http(addr, "GET", &target, &[("Authorization", &auth)], b"").await;
    (status, serde_json::from_slice(&body).expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_and_a_tcp_client_chat() {
    let srv = TestServer::start();
    let mut bob = ws_connect(&srv, None).await.expect("upgrade");
    assert_eq!(ws_login(&mut bob, "bob").await.user_id, "bob");
    let (alice, mut arx) = srv.connect("alice", "phone").await;

    let ack = alice
        .send("bob", "text/plain", "hi browser")
        .await
        .expect("ack");
    match ws_recv(&mut bob).await.and_then(|e| e.body) {
        Some(Body::Deliver(d)) => {
            let ev = d.event.expect("event");
            assert_eq!(ev.seq, 1);
            match ev.kind {
                Some(pb::event::Kind::Message(m)) => {
                    assert_eq!((m.id, &m.body[..]), (ack.server_msg_id, &b"hi browser"[..]))
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("expected Deliver, got {other:?}"),
    }
    next_message(&mut arx).await; // alice's own copy
    ws_send(
        &mut bob,
        Envelope::new(
            2,
            Body::Send(pb::Send {
                client_msg_id: "w1".into(),
                to_user: "alice".into(),
                content_type: "text/plain".into(),
                body: bytes::Bytes::from_static(b"hi tcp"),
                group_id: 0,
            }),
        ),
    )
    .await;
    let mut got_ack = false;
    while !got_ack {
        match ws_recv(&mut bob).await.map(|e| (e.request_id, e.body)) {
            Some((2, Some(Body::Ack(_)))) => got_ack = true,
            Some((0, Some(Body::Deliver(_)))) => {} // bob's own copy
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(&next_message(&mut arx).await.1.body[..], b"hi tcp");
    let (status, body) = http(srv.http_addr(), "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("swiftlet_connections{transport=\"websocket\"} 1"),
        "{text}"
    );
    assert!(text.contains("swiftlet_connections{transport=\"tcp\"} 1"));
    // The shard timed the Send from reading it to writing its Ack; it
    // records that just after the write, so the count may trail the Ack.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, body) = http(srv.http_addr(), "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8_lossy(&body).into_owned();
        let answered = text
            .lines()
            .find_map(|l| l.strip_prefix("swiftlet_request_seconds_count "))
            .and_then(|n| n.parse::<u64>().ok());
        if answered >= Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sync_returns_what_was_missed_as_proto3_json() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    send_numbered(&alice, "bob", 0..3).await;
    let (status, page) = sync_as(srv.http_addr(), "bob", "after=1&limit=10").await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    // proto3 JSON: 64-bit integers as strings, bytes as base64, camelCase.
    assert_eq!(events[0]["seq"], "2");
    assert_eq!(events[0]["message"]["body"], "bTE=");
    assert_eq!(events[0]["message"]["fromUser"], "alice");
    assert_eq!(page["headSeq"], "3");
}

/// Big HTTP pages at once: a shard reads a bounded share of page events a
/// turn, and a request past it is parsed again and answered in a later
/// turn. Each is answered, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_big_http_pages_at_once_are_each_answered() {
    let srv = TestServer::start();
    let (alice, _arx) = srv.connect("alice", "phone").await;
    send_numbered(&alice, "bob", 0..20).await;
    let addr = srv.http_addr();
    let pages = futures::future::join_all(
        (0..16).map(|_| async move { sync_as(addr, "bob", "after=0&limit=500").await }),
    )
    .await;
    for (status, page) in pages {
        assert_eq!(status, 200);
        assert_eq!(page["events"].as_array().expect("events").len(), 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_when_something_arrives_or_when_the_wait_ends() {
    let srv = TestServer::start();
    let addr = srv.http_addr();
    let poll = tokio::spawn(async move { sync_as(addr, "bob", "after=0&wait=30").await });
    // The poll is parked once the server routes to bob (a poll is not
    // presence: bob does not show as online).
    while srv.server().online_users() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (alice, _arx) = srv.connect("alice", "phone").await;
    alice
        .send("bob", "text/plain", "wake up")
        .await
        .expect("ack");
    let (status, page) = poll.await.expect("poll task");
    assert_eq!(status, 200);
    assert_eq!(page["events"][0]["message"]["body"], "d2FrZSB1cA==");

    // Nothing new: the answer comes when the wait ends, empty.
    let (status, page) = sync_as(addr, "bob", "after=1&wait=1").await;
    assert_eq!(status, 200);
    assert!(
        page.get("events")
            .is_none_or(|e| e.as_array().is_some_and(Vec::is_empty)),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_send_is_idempotent_like_the_socket() {
    let srv = TestServer::start();
    let auth = format!("Bearer {}", token("alice"));
    let body = br#"{"clientMsgId":"h1","toUser":"bob","contentType":"text/plain","body":"aGk="}"#;
    let (s1, a1) = http(
        srv.http_addr(),
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        body,
    )
    .await;
    let (s2, a2) = http(
        srv.http_addr(),
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        body,
    )
    .await;
    assert_eq!((s1, s2), (200, 200));
    let (a1, a2): (Value, Value) = (
        serde_json::from_slice(&a1).expect("json"),
        serde_json::from_slice(&a2).expect("json"),
    );
    assert_eq!(a1["serverMsgId"], a2["serverMsgId"]);
    assert_eq!(srv.server().store().count_messages().expect("count"), 1);
    let (bob, _brx) = srv.connect("bob", "phone").await;
    assert_eq!(bob.welcome().head_seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_http_gets_typed_errors() {
    let srv = TestServer::start();
    let addr = srv.http_addr();
    let code =
        |body: &[u8]| serde_json::from_slice::<Value>(body).expect("json error")["code"].as_i64();
    let (s, b) = http(addr, "GET", "/v1/sync", &[], b"").await;
    assert_eq!((s, code(&b)), (401, Some(ErrorCode::AuthFailed as i64)));
    let forged = format!(
        "Bearer {}",
        swiftlet_protocol::token::mint(b"wrong", "bob", 60)
    );
    let (s, b) = http(addr, "GET", "/v1/sync", &[("Authorization", &forged)], b"").await;
    assert_eq!((s, code(&b)), (401, Some(ErrorCode::AuthFailed as i64)));
    let auth = format!("Bearer {}", token("alice"));
    let (s, b) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .await;
    assert_eq!((s, code(&b)), (400, Some(ErrorCode::InvalidRequest as i64)));
    let huge = vec![b'x'; srv.config.max_frame + 1];
    let (s, b) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        &huge,
    )
    .await;
    assert_eq!((s, code(&b)), (413, Some(ErrorCode::BodyTooLarge as i64)));
    let (s, _) = http(addr, "GET", "/nope", &[], b"").await;
    assert_eq!(s, 404);
    let (s, b) = http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((s, b.as_slice()), (200, &b"ok\n"[..]));
    let (s, b) = http(addr, "GET", "/", &[], b"").await;
    assert_eq!(s, 200);
    assert!(!b.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_websocket_gets_typed_errors_and_close_codes() {
    let srv = TestServer::start();
    // Another site's page may not open a socket.
    match ws_connect(&srv, Some("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    // The server's own page may.
    let own = format!("http://{}", srv.http_addr());
    assert!(ws_connect(&srv, Some(&own)).await.is_ok());

    async fn expect_close(ws: &mut Ws, code: ErrorCode, close: CloseCode) {
        let mut saw_error = false;
        loop {
            match tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("answer")
            {
                Some(Ok(WsMessage::Binary(b))) => {
                    if let Some(Body::Error(e)) =
                        Envelope::decode(b.as_slice()).expect("envelope").body
                    {
                        assert_eq!((e.code, e.fatal), (code as i32, true));
                        saw_error = true;
                    }
                }
                Some(Ok(WsMessage::Close(Some(frame)))) => {
                    assert!(saw_error, "a typed Error frame comes before the close");
                    assert_eq!(frame.code, close);
                    return;
                }
                other => panic!("expected an error and a close, got {other:?}"),
            }
        }
    }
    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    ws.send(WsMessage::Text("hello?".into()))
        .await
        .expect("send text");
    expect_close(&mut ws, ErrorCode::MalformedFrame, CloseCode::Unsupported).await;

    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    ws_login(&mut ws, "dave").await;
    ws.send(WsMessage::Binary(vec![0u8; srv.config.max_frame + 1]))
        .await
        .expect("send big");
    expect_close(&mut ws, ErrorCode::FrameTooLarge, CloseCode::Size).await;

    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    ws.send(WsMessage::Binary(vec![0x0f, 0xff, 0xff]))
        .await
        .expect("send junk");
    expect_close(&mut ws, ErrorCode::MalformedFrame, CloseCode::Invalid).await;

    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    ws_send(&mut ws, Envelope::new(1, Body::Ping(pb::Ping { nonce: 1 }))).await;
    expect_close(&mut ws, ErrorCode::ProtocolViolation, CloseCode::Policy).await;
}

/// One raw HTTP exchange on a fresh connection: the bytes as written, the
/// status, the head (lower-cased) and the body.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("answer within patience")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head, raw[split..].to_vec())
}

/// The statuses, bodies and headers section 20 promises, one request each:
/// the routing table (405 and 404), the limits on a request (32 header
/// lines, an 8 KiB head, no chunked bodies, a `Bearer` token), the query of
/// `GET /v1/sync`, strict JSON in `POST /v1/messages` and its `Ack`
/// (with the sender's seq, as on a socket), and the headers every answer
/// carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_statuses_and_headers_follow_section_20() {
    let srv = TestServer::start();
    let addr = srv.http_addr();
    let code = |body: &[u8]| {
        serde_json::from_slice::<Value>(body).expect("a JSON error")["code"]
            .as_i64()
            .expect("a code")
    };
    let auth = format!("Bearer {}", token("alice"));

    // Every answer: no caching, no sniffing, no keep-alive, no CORS.
    let (s, head, body) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((s, body.as_slice()), (200, &b"ok\n"[..]));
    for h in [
        "cache-control: no-store\r\n",
        "x-content-type-options: nosniff\r\n",
        "connection: close\r\n",
        "content-type: text/plain\r\n",
    ] {
        assert!(head.contains(h), "{h:?} missing from {head}");
    }
    assert!(!head.contains("access-control-"), "{head}");
    // One request per connection: what follows it is ignored.
    let (s, _, body) = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!((s, body.as_slice()), (200, &b"ok\n"[..]));

    // Another method on a known path: 405, plain text. Elsewhere: 404.
    for (method, path) in [
        ("POST", "/healthz"),
        ("PUT", "/v1/sync"),
        ("GET", "/v1/messages"),
        ("POST", "/ws"),
        ("DELETE", "/metrics"),
    ] {
        let (s, body) = http(addr, method, path, &[], b"").await;
        assert_eq!(
            (s, body.as_slice()),
            (405, &b"method not allowed\n"[..]),
            "{method} {path}"
        );
    }
    let (s, body) = http(addr, "POST", "/nothing", &[], b"").await;
    assert_eq!((s, code(&body)), (404, ErrorCode::NotFound as i64));

    // 32 header lines are accepted, 33 are not; a head over 8 KiB is 413.
    let lines = |n: usize| {
        let mut r = String::from("GET /healthz HTTP/1.1\r\n");
        for i in 0..n {
            r.push_str(&format!("X-H{i}: v\r\n"));
        }
        r + "\r\n"
    };
    assert_eq!(exchange(addr, lines(32).as_bytes()).await.0, 200);
    let (s, _, body) = exchange(addr, lines(33).as_bytes()).await;
    assert_eq!((s, code(&body)), (400, ErrorCode::InvalidRequest as i64));
    let long = format!(
        "GET /healthz HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "x".repeat(8 * 1024)
    );
    let (s, _, body) = exchange(addr, long.as_bytes()).await;
    assert_eq!((s, code(&body)), (413, ErrorCode::BodyTooLarge as i64));
    let (s, _, body) = exchange(
        addr,
        b"POST /v1/messages HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
    )
    .await;
    assert_eq!((s, code(&body)), (400, ErrorCode::InvalidRequest as i64));
    let chunked = format!(
        "POST /v1/messages HTTP/1.1\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let (s, _, body) = exchange(addr, chunked.as_bytes()).await;
    assert_eq!((s, code(&body)), (400, ErrorCode::InvalidRequest as i64));

    // Another Authorization scheme is no token.
    let (s, body) = http(
        addr,
        "GET",
        "/v1/sync",
        &[("Authorization", "Basic YWxpY2U6eA==")],
        b"",
    )
    .await;
    assert_eq!((s, code(&body)), (401, ErrorCode::AuthFailed as i64));
    // Query values are decimal integers; other parameters are ignored.
    for query in ["after=x", "limit=-1", "wait=1.5", "after="] {
        let (s, body) = http(
            addr,
            "GET",
            &format!("/v1/sync?{query}"),
            &[("Authorization", &auth)],
            b"",
        )
        .await;
        assert_eq!(
            (s, code(&body)),
            (400, ErrorCode::InvalidRequest as i64),
            "{query}"
        );
    }
    let (s, _) = http(
        addr,
        "GET",
        "/v1/sync?after=0&colour=blue",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(s, 200);

    // A WebSocket upgrade needs its headers.
    let (s, body) = http(addr, "GET", "/ws", &[], b"").await;
    assert_eq!((s, code(&body)), (400, ErrorCode::InvalidRequest as i64));

    // A field the message does not have is refused; a good send gets its
    // Ack, with the message's seq in the sender's inbox.
    let (s, body) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        br#"{"clientMsgId":"h1","toUser":"bob","colour":"blue"}"#,
    )
    .await;
    assert_eq!((s, code(&body)), (400, ErrorCode::InvalidRequest as i64));
    let (s, body) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        br#"{"client_msg_id":"h1","toUser":"bob","body":"aGk"}"#,
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let ack: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        (&ack["clientMsgId"], &ack["seq"]),
        (&"h1".into(), &"1".into())
    );
    assert!(ack["serverMsgId"].is_string() && ack["timestampMs"].is_string());
    // URL-safe base64 is accepted in requests; a 64-bit integer may be a
    // JSON number (here a group that does not exist: 404, not a 400).
    let (s, body) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        br#"{"clientMsgId":"h2","toUser":"bob","body":"-_8"}"#,
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let (s, body) = http(
        addr,
        "POST",
        "/v1/messages",
        &[("Authorization", &auth)],
        br#"{"clientMsgId":"h3","groupId":12345}"#,
    )
    .await;
    assert_eq!((s, code(&body)), (404, ErrorCode::NotFound as i64));
    let (bob, mut brx) = srv.connect("bob", "phone").await;
    let (_, m) = next_message(&mut brx).await;
    assert_eq!((m.from_device.as_str(), &m.body[..]), ("http", &b"hi"[..]));
    assert_eq!(&next_message(&mut brx).await.1.body[..], &[0xfb, 0xff]);
    drop(bob);
}

/// A masked client WebSocket frame with the first byte `b0` (FIN, reserved
/// bits and opcode as given).
fn raw_ws_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut out = vec![b0];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Upgrade a fresh connection, send `frames` right behind the request,
/// then, once `wait_for` server frames have come, `then`, and read until
/// the server closes: the server's frames (opcode, payload).
async fn ws_exchange(
    srv: &TestServer,
    frames: &[u8],
    wait_for: usize,
    then: &[u8],
) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.http_addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(frames);
    s.write_all(&bytes).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while ws_frames(&answer).len() < wait_for {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("an answer within patience")
            .expect("read");
        assert!(n > 0, "closed early: {:?}", ws_frames(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    s.write_all(then).await.expect("write");
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer))
        .await
        .expect("closed within patience")
        .expect("read");
    ws_frames(&answer)
}

/// The server frames (opcode, payload) after the `101` head in `answer`
/// (whole frames only).
fn ws_frames(answer: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let Some(head) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    assert!(answer.starts_with(b"HTTP/1.1 101"), "not upgraded");
    let mut rest = &answer[head + 4..];
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let (len, at) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            n => (usize::from(n), 2),
        };
        if rest.len() < at + len {
            break;
        }
        out.push((rest[0] & 0x0f, rest[at..at + len].to_vec()));
        rest = &rest[at + len..];
    }
    out
}

/// Section 2.2's frame rules over raw WebSocket bytes: a ping is answered
/// with a pong carrying its payload, a close frame with a close 1000 (no
/// Error); an unmasked or fragmented frame, reserved bits, a control frame
/// over 125 bytes and a reserved opcode are a fatal `MALFORMED_FRAME`
/// followed by close 1002, whose reason is the Error's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frame_rules_get_the_close_codes_of_section_2_2() {
    let srv = TestServer::start();
    let mut frames = raw_ws_frame(0x8A, b"unasked pong", true);
    frames.extend(raw_ws_frame(0x89, b"are you there", true));
    let close = raw_ws_frame(0x88, &1000u16.to_be_bytes(), true);
    let answer = ws_exchange(&srv, &frames, 1, &close).await;
    let [(0xA, pong), (0x8, close)] = &answer[..] else {
        panic!("expected a pong and a close, got {answer:?}");
    };
    assert_eq!(pong, b"are you there");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1000);

    let hello = Envelope::new(1, Body::Ping(pb::Ping { nonce: 1 })).encode_to_vec();
    let bad = [
        ("unmasked", raw_ws_frame(0x82, &hello, false)),
        ("fragmented", raw_ws_frame(0x02, &hello, true)),
        ("a continuation", raw_ws_frame(0x80, &hello, true)),
        ("reserved bits", raw_ws_frame(0xC2, &hello, true)),
        ("a long ping", raw_ws_frame(0x89, &[7; 126], true)),
        ("reserved opcode 3", raw_ws_frame(0x83, &hello, true)),
        ("reserved opcode 11", raw_ws_frame(0x8B, b"", true)),
    ];
    for (what, frame) in bad {
        let answer = ws_exchange(&srv, &frame, 0, b"").await;
        let [(0x2, error), (0x8, close)] = &answer[..] else {
            panic!("{what}: expected an Error message and a close, got {answer:?}");
        };
        let error = match Envelope::decode(error.as_slice()).expect("envelope").body {
            Some(Body::Error(e)) => e,
            other => panic!("{what}: {other:?}"),
        };
        assert_eq!(
            (error.code, error.fatal),
            (ErrorCode::MalformedFrame as i32, true),
            "{what}"
        );
        assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1002, "{what}");
        assert_eq!(&close[2..], error.message.as_bytes(), "{what}");
    }
}

/// Section 11: a stopping server tells every connection. A parked
/// long-poll is a connection too: it is answered `503` `SHUTTING_DOWN`
/// (section 20's status for that code), not dropped without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_long_poll_is_told_the_server_is_stopping() {
    let mut srv = TestServer::start();
    let addr = srv.http_addr();
    let poll = tokio::spawn(async move { sync_as(addr, "bob", "after=0&wait=30").await });
    // Parked once the server routes to bob.
    while srv.server().online_users() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let server = srv.server.take();
    let stopper = std::thread::spawn(move || server.map(|s| s.shutdown()));
    let (status, body) = poll.await.expect("poll task");
    assert_eq!(
        (status, &body["code"]),
        (503, &Value::from(ErrorCode::ShuttingDown as i64)),
        "{body}"
    );
    stopper.join().expect("shutdown");
}

/// Section 2.2's close codes for errors the session sends, and section 4's
/// rule that an Error refusing a Hello carries its request id on
/// WebSocket too: a refused Hello closes with 1008, the idle timeout with
/// 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refusals_and_timeouts_close_with_their_codes() {
    use swiftlet::clock::ManualClock;
    let clock = ManualClock::new(1_800_000_000_000);
    let srv = TestServer::start_with(|c| c.clock = clock.clock());
    /// The fatal Error (request id, code) and the close code that follow.
    async fn fatal(ws: &mut Ws) -> (u64, i32, Option<u16>) {
        let mut error = None;
        loop {
            match tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("answer")
            {
                Some(Ok(WsMessage::Binary(b))) => {
                    let env = Envelope::decode(b.as_slice()).expect("envelope");
                    if let Some(Body::Error(e)) = env.body {
                        assert!(e.fatal, "{e:?}");
                        error = Some((env.request_id, e.code));
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let (rid, code) = error.expect("an Error before the close");
                    return (rid, code, frame.map(|f| u16::from(f.code)));
                }
                other => panic!("expected an Error and a close, got {other:?}"),
            }
        }
    }

    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    ws_send(
        &mut ws,
        Envelope::new(
            9,
            Body::Hello(pb::Hello {
                protocol_version: 1,
                token: "not-a-token".into(),
                device_id: "browser".into(),
                skip_own_sends: false,
            }),
        ),
    )
    .await;
    assert_eq!(
        fatal(&mut ws).await,
        (9, ErrorCode::AuthFailed as i32, Some(1008))
    );

    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    let welcome = ws_login(&mut ws, "ivy").await;
    clock.advance(std::time::Duration::from_millis(
        u64::from(welcome.idle_timeout_ms) + 1_000,
    ));
    assert_eq!(
        fatal(&mut ws).await,
        (0, ErrorCode::IdleTimeout as i32, Some(1001))
    );
}

/// Sections 4 and 20: a parked long-poll counts against the user's
/// connection maximum. A poll past it is answered `429`
/// `TOO_MANY_CONNECTIONS`; a parked one keeps a socket login out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_counts_against_the_users_connections() {
    let srv = TestServer::start_with(|c| c.max_conns_per_user = 1);
    let addr = srv.http_addr();
    {
        let (_phone, _rx) = srv.connect("kit", "phone").await;
        let (status, body) = sync_as(addr, "kit", "after=0&wait=30").await;
        assert_eq!(
            (status, &body["code"]),
            (429, &Value::from(ErrorCode::TooManyConnections as i64)),
            "{body}"
        );
        // A poll that does not wait is no connection: answered at once.
        assert_eq!(sync_as(addr, "kit", "after=0").await.0, 200);
    }
    // Once the phone has gone, a parked poll holds the place.
    let routed = || srv.server().online_users();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while routed() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the phone never left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let poll = tokio::spawn(async move { sync_as(addr, "kit", "after=0&wait=30").await });
    while routed() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll never parked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(1, &token("kit")).await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::TooManyConnections);
    poll.abort();
}

/// Section 2.2's origin rule: the page's own origin (its host, any case)
/// and the `--allow-origin` values as sent, scheme included; a refused
/// origin gets exactly the documented `403` body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_origins_follow_section_2_2() {
    let srv = TestServer::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]);
    let addr = srv.http_addr();
    let upgrade = |origin: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: chat.example:7480\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    for (origin, allowed) in [
        ("https://chat.example:7480", true),
        ("http://CHAT.example:7480", true),
        ("https://chat.example", false),
        ("https://app.example", true),
        ("HTTPS://App.Example", true),
        ("http://app.example", false),
        ("https://evil.example", false),
    ] {
        // A refused upgrade is answered and closed; an accepted one is
        // closed by the client (read only the head).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(upgrade(origin).as_bytes())
            .await
            .expect("write");
        let mut head = vec![0u8; 12];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut head))
            .await
            .expect("an answer")
            .expect("read");
        let status = if allowed {
            &b"HTTP/1.1 101"[..]
        } else {
            &b"HTTP/1.1 403"[..]
        };
        assert_eq!(&head[..], status, "{origin}");
        if !allowed {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("read");
            let split = rest
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a head")
                + 4;
            assert_eq!(
                &rest[split..],
                br#"{"code":1006,"error":"FORBIDDEN","message":"origin not allowed"}"#,
                "{origin}"
            );
        }
    }
}

/// Section 20: a long-poll `wait` above 60 s is taken as 60 s. On the
/// manual clock, a poll asking for 600 s ends once 61 s have passed,
/// answered with the (empty) page read then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_waits_at_most_sixty_seconds() {
    use swiftlet::clock::ManualClock;
    let clock = ManualClock::new(1_800_000_000_000);
    let srv = TestServer::start_with(|c| c.clock = clock.clock());
    let addr = srv.http_addr();
    let poll = tokio::spawn(async move { sync_as(addr, "nia", "after=0&wait=600").await });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while srv.server().online_users() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never parked");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    clock.advance(std::time::Duration::from_secs(59));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "answered before 60 s");
    clock.advance(std::time::Duration::from_secs(2));
    let (status, page) = tokio::time::timeout(PATIENCE, poll)
        .await
        .expect("answered once 60 s have passed")
        .expect("poll task");
    assert_eq!(status, 200);
    assert!(page.get("events").is_none(), "{page}");
}

/// Sections 2.2 and 20: the handshake timeout runs from the TCP connect
/// on the HTTP port too. A request still incomplete then is closed without
/// an answer; an upgraded WebSocket without a Hello gets a fatal
/// `HANDSHAKE_TIMEOUT` and close 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_timeout_holds_on_the_http_port() {
    use swiftlet::clock::ManualClock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let clock = ManualClock::new(1_800_000_000_000);
    let srv = TestServer::start_with(|c| c.clock = clock.clock());
    let addr = srv.http_addr();
    let mut partial = tokio::net::TcpStream::connect(addr).await.expect("connect");
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut ws = ws_connect(&srv, None).await.expect("upgrade");
    // The partial request's connection may reach its shard after the
    // clock moved: move it again until it is closed.
    let mut rest = Vec::new();
    let mut closed = false;
    for _ in 0..40 {
        clock.advance(std::time::Duration::from_millis(10_500));
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            partial.read_to_end(&mut rest),
        );
        if let Ok(r) = read.await {
            r.expect("read");
            closed = true;
            break;
        }
    }
    assert!(closed, "the incomplete request was never closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let mut error = None;
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("an answer")
        {
            Some(Ok(WsMessage::Binary(b))) => {
                error = match Envelope::decode(b.as_slice()).expect("envelope").body {
                    Some(Body::Error(e)) => Some(e.code),
                    other => panic!("{other:?}"),
                }
            }
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                assert_eq!(error, Some(ErrorCode::HandshakeTimeout as i32));
                assert_eq!(frame.code, CloseCode::Policy);
                break;
            }
            other => panic!("expected an Error and a close, got {other:?}"),
        }
    }
}
