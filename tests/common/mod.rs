//! Test harness: a real server (real sockets, RocksDB in a temp dir) started
//! in-process on port 0, clients from the real client library, and a raw
//! framed socket for feeding the server bad input.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use swiftlet::{Config, Server};
use swiftlet_client::{pb, Client, ClientConfig, Deliveries, DeliveryItem};
use swiftlet_protocol::{Body, Envelope, FrameCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub const SECRET: &str = "integration-test-secret";
/// Upper bound on waiting for something that must happen; reaching it fails
/// the test. Never used to assert speed.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

/// The test defaults: free loopback ports, data in `dir`, 2 shards, JWT
/// auth with [`SECRET`].
pub fn test_config(dir: &tempfile::TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        shards: 2,
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    }
}

/// A loopback port nobody listens on now (for a server started as a
/// process, which cannot report the port it took).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn token(user: &str) -> String {
    swiftlet_protocol::token::mint(SECRET.as_bytes(), user, 3600)
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::start_with(|_| {})
    }

    /// Start with the test defaults (2 shards, JWT auth) changed by `tweak`.
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(&dir);
        tweak(&mut config);
        let server = swiftlet::start(config.clone()).expect("server starts");
        TestServer {
            server: Some(server),
            dir,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").local_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").http_addr()
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// Graceful shutdown, then start again on the same data directory and port.
    pub fn restart(&mut self) {
        let (addr, http) = (self.addr(), self.http_addr());
        self.stop();
        self.config.listen = addr;
        self.config.http = http;
        self.server = Some(swiftlet::start(self.config.clone()).expect("server restarts"));
    }

    /// Graceful shutdown. The server's threads wait for clients to close, and
    /// the clients are tasks of this runtime: let them run meanwhile.
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::task::block_in_place(|| s.shutdown());
        }
    }

    pub async fn connect(&self, user: &str, device: &str) -> (Client, Deliveries) {
        Client::connect(ClientConfig::new(
            self.addr().to_string(),
            token(user),
            device,
        ))
        .await
        .expect("login")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `from` sends "m{i}" to `to` for each i of `range`, one after another,
/// each acknowledged; returns the Acks.
pub async fn send_numbered(from: &Client, to: &str, range: std::ops::Range<u64>) -> Vec<pb::Ack> {
    let mut acks = Vec::new();
    for i in range {
        acks.push(
            from.send(to, "text/plain", format!("m{i}"))
                .await
                .expect("ack"),
        );
    }
    acks
}

/// The next event, or a failed test after [`PATIENCE`].
pub async fn next_event(d: &mut Deliveries) -> pb::Event {
    match tokio::time::timeout(PATIENCE, d.next()).await {
        Ok(Some(DeliveryItem::Event(e))) => e,
        Ok(other) => panic!("expected an event, got {other:?}"),
        Err(_) => panic!("no event within {PATIENCE:?}"),
    }
}

/// The next item of any kind (event, typing, presence).
pub async fn next_item(d: &mut Deliveries) -> DeliveryItem {
    match tokio::time::timeout(PATIENCE, d.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("deliveries ended"),
        Err(_) => panic!("nothing delivered within {PATIENCE:?}"),
    }
}

/// The next event, which must be a group change.
pub async fn next_group_event(d: &mut Deliveries) -> (u64, pb::GroupEvent) {
    let e = next_event(d).await;
    match e.kind {
        Some(pb::event::Kind::GroupEvent(g)) => (e.seq, g),
        other => panic!("expected a group event, got {other:?}"),
    }
}

/// The next event, which must be a receipt.
pub async fn next_receipt(d: &mut Deliveries) -> (u64, pb::Receipt) {
    let e = next_event(d).await;
    match e.kind {
        Some(pb::event::Kind::Receipt(r)) => (e.seq, r),
        other => panic!("expected a receipt, got {other:?}"),
    }
}

/// The code of a refused request.
pub fn code_of<T: std::fmt::Debug>(
    r: Result<T, swiftlet_client::ClientError>,
) -> swiftlet_protocol::ErrorCode {
    let e = r.expect_err("the request must be refused");
    let code = e
        .code()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    swiftlet_protocol::ErrorCode::try_from(code).expect("a known code")
}

/// The next event, which must be a message.
pub async fn next_message(d: &mut Deliveries) -> (u64, pb::Message) {
    let e = next_event(d).await;
    match e.kind {
        Some(pb::event::Kind::Message(m)) => (e.seq, m),
        other => panic!("expected a message event, got {other:?}"),
    }
}

/// Asserts nothing more is delivered: a Ping round trip first, so anything
/// already on its way has arrived, then a short look.
pub async fn assert_no_more(client: &Client, d: &mut Deliveries) {
    client.ping().await.expect("ping");
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(200), d.next()).await {
        panic!("unexpected delivery: {item:?}");
    }
}

/// A framed socket with no client logic, for protocol abuse.
pub struct Raw {
    pub framed: Framed<TcpStream, FrameCodec>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Raw {
            framed: Framed::new(stream, FrameCodec::default()),
        }
    }

    pub async fn send(&mut self, env: Envelope) {
        self.framed.send(env).await.expect("send frame");
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(bytes).await.expect("write");
    }

    /// A raw connection logged in as `user` (device "raw"), its Welcome read.
    pub async fn logged_in(addr: SocketAddr, user: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.hello(1, &token(user)).await;
        let welcome = raw.recv().await.and_then(|e| e.body);
        assert!(matches!(welcome, Some(Body::Welcome(_))), "{welcome:?}");
        raw
    }

    pub async fn hello(&mut self, version: u32, token: &str) {
        self.send(Envelope::new(
            1,
            Body::Hello(pb::Hello {
                protocol_version: version,
                token: token.into(),
                device_id: "raw".into(),
                skip_own_sends: false,
            }),
        ))
        .await;
    }

    /// The next frame; None when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Envelope> {
        match tokio::time::timeout(PATIENCE, self.framed.next()).await {
            Ok(Some(Ok(env))) => Some(env),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("server neither answered nor closed within {PATIENCE:?}"),
        }
    }

    /// Read the next frame, which must be the non-fatal Error `code`
    /// answering request `rid`.
    pub async fn expect_request_error(&mut self, rid: u64, code: swiftlet_protocol::ErrorCode) {
        match self.recv().await {
            Some(Envelope {
                request_id,
                body: Some(Body::Error(e)),
            }) => assert_eq!(
                (request_id, e.code, e.fatal),
                (rid, code as i32, false),
                "{e:?}"
            ),
            other => panic!("expected {code:?} for request {rid}, got {other:?}"),
        }
    }

    /// Read until the server's fatal Error, then require the close. Returns
    /// the error code.
    pub async fn expect_fatal(&mut self) -> swiftlet_protocol::ErrorCode {
        loop {
            match self.recv().await {
                Some(Envelope {
                    body: Some(Body::Error(e)),
                    ..
                }) if e.fatal => {
                    assert!(
                        self.recv().await.is_none(),
                        "connection stays open after a fatal error"
                    );
                    return swiftlet_protocol::ErrorCode::try_from(e.code).expect("known code");
                }
                Some(_) => continue,
                None => panic!("closed without an Error frame"),
            }
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body). The
/// server closes after every answer, so the body runs to EOF.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    s.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("answer within patience")
        .expect("read answer");
    let text = String::from_utf8_lossy(&raw);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    (status, raw[split..].to_vec())
}

/// The value of counter or gauge `name` (a line `name value`) in the
/// server's `/metrics` on `http_addr`.
pub async fn metric(http_addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http(http_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}
