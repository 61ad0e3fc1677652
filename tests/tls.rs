//! TLS, end to end: a real server with `--tls-cert`/`--tls-key` (a CA and
//! a server certificate made by the test with rcgen), driven by the real
//! client library's TLS connector. Chat over TCP+TLS and over WSS; an
//! HTTPS request; certificate reload (in-process, and by SIGHUP to the real
//! binary) that keeps established connections and serves the new
//! certificate to new ones, and keeps the old one when the new files are
//! bad; the wrong transport on either port fails cleanly; a TLS handshake
//! that never completes meets the handshake timeout; garbage after a
//! ClientHello is refused with an alert and a close.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use swiftlet_client::{pb, Body, Client, ClientConfig, ClientError, Envelope, TlsConnector};
use swiftlet_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A CA and a server certificate it signed, for `localhost` and 127.0.0.1,
/// written as PEM files into `dir` under `name`-prefixed names.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    make_pki_for(dir, name, &["localhost", "127.0.0.1"])
}

/// The same, with a server certificate for `names`.
fn make_pki_for(dir: &Path, name: &str, names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("swiftlet test CA {name}"));
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let params = CertificateParams::new(names).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("cert");
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).expect("write ca");
    std::fs::write(&pki.cert, cert.pem()).expect("write cert");
    std::fs::write(&pki.key, key.serialize_pem()).expect("write key");
    pki
}

/// Files the server reads (`served-*`), so a test can replace their
/// contents with another PKI's and reload.
fn serve_files(dir: &Path, from: &Pki) -> (PathBuf, PathBuf) {
    let cert = dir.join("served-cert.pem");
    let key = dir.join("served-key.pem");
    std::fs::copy(&from.cert, &cert).expect("copy cert");
    std::fs::copy(&from.key, &key).expect("copy key");
    (cert, key)
}

fn tls_server(pki: &Pki, tweak: impl FnOnce(&mut swiftlet::Config)) -> TestServer {
    let (cert, key) = (pki.cert.clone(), pki.key.clone());
    TestServer::start_with(|c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        tweak(c);
    })
}

fn trusting(ca: &Path) -> TlsConnector {
    TlsConnector::new(Some(ca)).expect("connector")
}

async fn connect_tls(
    addr: std::net::SocketAddr,
    ca: &Path,
    user: &str,
    device: &str,
) -> Result<(Client, swiftlet_client::Deliveries), ClientError> {
    Client::connect(ClientConfig::new(addr.to_string(), token(user), device).with_tls(trusting(ca)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_tls_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |_| {});
    assert!(srv.server().tls());
    let (alice, _ad) = connect_tls(srv.addr(), &pki.ca, "alice", "phone")
        .await
        .expect("alice logs in over TLS");
    let (bob, mut bd) = connect_tls(srv.addr(), &pki.ca, "bob", "laptop")
        .await
        .expect("bob logs in over TLS");
    let ack = alice
        .send("bob", "text/plain", "hi over TLS")
        .await
        .expect("ack");
    let (seq, m) = next_message(&mut bd).await;
    assert_eq!(m.id, ack.server_msg_id);
    assert_eq!(&m.body[..], b"hi over TLS");
    bob.ack_delivery(seq).await.expect("delivery ack");
    // A bigger message than one TLS record (16 KiB) both ways.
    let big = vec![b'x'; 40_000];
    alice
        .send("bob", "application/octet-stream", big.clone())
        .await
        .expect("big ack");
    let (_, m) = next_message(&mut bd).await;
    assert_eq!(&m.body[..], &big[..]);
    // A sync page (many records in one answer) arrives whole.
    send_numbered(&alice, "bob", 0..50).await;
    let page = bob.sync(0, 100).await.expect("sync over TLS");
    assert_eq!(page.events.len(), 52);
}

/// The client trusts only its CA: a server certificate from another CA,
/// or for another name, is refused by the client, typed as a TLS error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_client_does_not_trust_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let other = make_pki(dir.path(), "other");
    let srv = tls_server(&pki, |_| {});
    match connect_tls(srv.addr(), &other.ca, "alice", "phone").await {
        Err(ClientError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a certificate from an untrusted CA was accepted"),
    }
    drop(srv);
    // The name is checked too: a certificate for localhost only is refused
    // at 127.0.0.1, and accepted at localhost.
    let named = make_pki_for(dir.path(), "named", &["localhost"]);
    let srv = tls_server(&named, |_| {});
    match connect_tls(srv.addr(), &named.ca, "alice", "phone").await {
        Err(ClientError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a certificate for another name was accepted"),
    }
    let addr = format!("localhost:{}", srv.addr().port());
    let cfg = ClientConfig::new(addr, token("alice"), "phone").with_tls(trusting(&named.ca));
    Client::connect(cfg)
        .await
        .expect("localhost is in the certificate");
}

/// WSS: the bridge's WebSocket over TLS, with a real WebSocket client on
/// the client library's connector, chatting with a TCP+TLS user; and an
/// HTTPS request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_wss_and_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |_| {});
    let http = trusting(&pki.ca).for_http();
    let host = srv.http_addr().to_string();

    let tcp = TcpStream::connect(srv.http_addr()).await.expect("connect");
    let tls = http
        .connect(&host, tcp)
        .await
        .expect("TLS to the HTTP port");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://{host}/ws");
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket upgrade over TLS");
    assert_eq!(resp.status().as_u16(), 101);
    let hello = Envelope::new(
        1,
        Body::Hello(pb::Hello {
            protocol_version: swiftlet_client::PROTOCOL_VERSION,
            token: token("carol"),
            device_id: "browser".into(),
            skip_own_sends: false,
        }),
    );
    ws.send(WsMessage::Binary(hello.encode_to_vec()))
        .await
        .expect("send Hello");
    let welcome = next_ws_envelope(&mut ws).await;
    assert!(
        matches!(welcome.body, Some(Body::Welcome(_))),
        "{welcome:?}"
    );

    let (dave, _dd) = connect_tls(srv.addr(), &pki.ca, "dave", "phone")
        .await
        .expect("dave over TCP+TLS");
    let ack = dave
        .send("carol", "text/plain", "to the browser")
        .await
        .expect("ack");
    let deliver = next_ws_envelope(&mut ws).await;
    match deliver.body {
        Some(Body::Deliver(pb::Deliver { event: Some(e) })) => match e.kind {
            Some(pb::event::Kind::Message(m)) => {
                assert_eq!(m.id, ack.server_msg_id);
                assert_eq!(&m.body[..], b"to the browser");
            }
            other => panic!("expected a message, got {other:?}"),
        },
        other => panic!("expected a Deliver, got {other:?}"),
    }
    ws.close(None).await.expect("close");

    // Plain HTTPS: the health check, over the same connector.
    let (status, body) = https_get(&http, srv.http_addr(), "/healthz").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
}

async fn next_ws_envelope<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Envelope
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a WebSocket message in time")
            .expect("stream open")
            .expect("a WebSocket message");
        if let WsMessage::Binary(b) = msg {
            return Envelope::decode(b.as_slice()).expect("an Envelope");
        }
    }
}

/// `GET path` over HTTPS; (status, body). The server closes after it.
async fn https_get(tls: &TlsConnector, addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut s = tls.connect(&addr.to_string(), tcp).await.expect("TLS");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read answer");
    parse_http(&raw)
}

fn parse_http(raw: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| raw[p + 4..].to_vec())
        .unwrap_or_default();
    (status, body)
}

/// A reload serves the new certificate to new connections and keeps the
/// ones established before it; a bad certificate is refused and the one
/// in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_established_sessions_and_serves_the_new_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = make_pki(dir.path(), "old");
    let new = make_pki(dir.path(), "new");
    let (cert, key) = serve_files(dir.path(), &old);
    let srv = TestServer::start_with(|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    });
    let (alice, mut ad) = connect_tls(srv.addr(), &old.ca, "alice", "phone")
        .await
        .expect("alice, before the reload");

    serve_files(dir.path(), &new);
    assert!(srv.server().reload_tls().expect("reload"));

    // New connections get the new certificate: trusted by the new CA only.
    assert!(matches!(
        connect_tls(srv.addr(), &old.ca, "bob", "laptop").await,
        Err(ClientError::Tls(_))
    ));
    let (bob, mut bd) = connect_tls(srv.addr(), &new.ca, "bob", "laptop")
        .await
        .expect("bob, after the reload, trusting the new CA");
    // The connection made before the reload carries on, both ways.
    let ack = alice
        .send("bob", "text/plain", "still here")
        .await
        .expect("ack");
    assert_eq!(next_from(&mut bd, "alice").await.id, ack.server_msg_id);
    let ack = bob
        .send("alice", "text/plain", "hello old")
        .await
        .expect("ack");
    assert_eq!(next_from(&mut ad, "bob").await.id, ack.server_msg_id);

    // A bad certificate file: refused, the new certificate stays in use.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let err = srv
        .server()
        .reload_tls()
        .expect_err("a bad certificate is refused");
    assert!(err.to_string().contains("served-cert.pem"), "{err}");
    // A key that does not fit the certificate: refused too.
    std::fs::copy(&new.cert, &cert).expect("restore cert");
    std::fs::copy(&old.key, &key).expect("mismatched key");
    let err = srv
        .server()
        .reload_tls()
        .expect_err("a mismatched key is refused");
    assert!(err.to_string().contains("does not fit"), "{err}");
    connect_tls(srv.addr(), &new.ca, "carol", "tablet")
        .await
        .expect("the certificate in use stays after failed reloads");
    alice.ping().await.expect("alice still connected");
}

/// SIGHUP to the real binary reloads the certificate; a bad one is
/// logged and the old one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = make_pki(dir.path(), "old");
    let new = make_pki(dir.path(), "new");
    let (cert, key) = serve_files(dir.path(), &old);
    let port = free_port();
    let http_port = free_port();
    let log = dir.path().join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_swiftlet"))
        .args(["serve", "--shards", "1"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http", &format!("127.0.0.1:{http_port}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("SWIFTLET_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start swiftlet");
    let _guard = KillOnDrop(child.id());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    let (alice, mut ad) = eventually(|| connect_tls(addr, &old.ca, "alice", "phone")).await;
    serve_files(dir.path(), &new);
    sighup(child.id());
    // The signal is handled asynchronously: wait until new connections get
    // the new certificate.
    let (bob, _bd) = eventually(|| connect_tls(addr, &new.ca, "bob", "laptop")).await;
    let ack = bob
        .send("alice", "text/plain", "after SIGHUP")
        .await
        .expect("ack");
    assert_eq!(next_from(&mut ad, "bob").await.id, ack.server_msg_id);

    std::fs::write(&key, "garbage\n").expect("write");
    sighup(child.id());
    let logged = eventually_log(&log, "TLS certificate not reloaded").await;
    assert!(logged.contains("served-key.pem"), "{logged}");
    connect_tls(addr, &new.ca, "carol", "tablet")
        .await
        .expect("the certificate in use stays after a bad SIGHUP");
    alice.ping().await.expect("alice still connected");

    // SIGTERM still stops it.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait");
    assert!(status.success(), "{status}");
}

/// The next message from `from` (a user's own messages reach their
/// devices too).
async fn next_from(d: &mut swiftlet_client::Deliveries, from: &str) -> pb::Message {
    loop {
        let (_, m) = next_message(d).await;
        if m.from_user == from {
            return m;
        }
    }
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn sighup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(ok.success());
}

/// Retry `f` until it succeeds, for at most [`PATIENCE`].
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("never succeeded: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Wait until the log has a line containing `needle`; that line.
async fn eventually_log(log: &Path, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in the log:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A plaintext client on a TLS port is told so, in plaintext, in its own
/// framing: an Error frame on the protocol port, a 400 on the HTTP port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_a_tls_port_is_refused_in_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |_| {});

    let mut raw = Raw::connect(srv.addr()).await;
    raw.hello(swiftlet_client::PROTOCOL_VERSION, &token("alice"))
        .await;
    assert_eq!(raw.expect_fatal().await, ErrorCode::ProtocolViolation);

    let (status, body) = http(srv.http_addr(), "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("HTTPS"));

    // The library's plain client gets the same refusal, typed.
    let plain = ClientConfig::new(srv.addr().to_string(), token("alice"), "phone");
    assert_eq!(
        code_of(Client::connect(plain).await),
        ErrorCode::ProtocolViolation
    );

    // And the server goes on serving TLS.
    connect_tls(srv.addr(), &pki.ca, "alice", "phone")
        .await
        .expect("TLS still served");
}

/// A TLS client on a plain port fails its handshake at once (the server
/// answers its ClientHello as a bad frame and closes): no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_a_plain_port_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = TestServer::start();
    let cfg = ClientConfig::new(srv.addr().to_string(), token("alice"), "phone")
        .with_tls(trusting(&pki.ca));
    match tokio::time::timeout(PATIENCE, Client::connect(cfg)).await {
        Ok(Err(ClientError::Tls(_) | ClientError::Io(_))) => {}
        Ok(Err(e)) => panic!("expected a TLS or I/O failure, got {e}"),
        Ok(Ok(_)) => panic!("TLS to a plain port logged in"),
        Err(_) => panic!("TLS to a plain port hung"),
    }
    let http = trusting(&pki.ca).for_http();
    let tcp = TcpStream::connect(srv.http_addr()).await.expect("connect");
    let res = tokio::time::timeout(PATIENCE, http.connect(&srv.http_addr().to_string(), tcp)).await;
    assert!(
        matches!(res, Ok(Err(_))),
        "TLS to the plain HTTP port must fail, not hang"
    );
    // The plain server is unharmed.
    srv.connect("alice", "phone").await;
}

/// A client that starts a TLS handshake and never finishes it is closed
/// by the handshake timeout (which runs from the accept to the Hello).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_completes_meets_the_handshake_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |c| c.handshake_timeout_ms = 300);
    let hello = client_hello(false);
    for sent in [&hello[..0], &hello[..hello.len() / 2], &hello[..]] {
        let mut s = TcpStream::connect(srv.addr()).await.expect("connect");
        s.write_all(sent).await.expect("write");
        // Read whatever comes (a ServerHello flight, for a whole
        // ClientHello) until the server closes.
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, s.read_to_end(&mut sink)).await;
        assert!(
            closed.is_ok(),
            "a handshake stopped after {} bytes was not closed",
            sent.len()
        );
    }
    connect_tls(srv.addr(), &pki.ca, "alice", "phone")
        .await
        .expect("the server still serves");
}

/// Garbage after a ClientHello: the server answers with an alert and
/// closes, and goes on serving. Under TLS 1.2 the alert is in the clear
/// (type 21) at that point; under TLS 1.3 it is encrypted, so only the
/// close is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_client_hello_is_refused_with_an_alert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |_| {});
    let garbages = [
        vec![0xFF; 64],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5],
    ];
    for tls12 in [true, false] {
        for garbage in &garbages {
            let mut s = TcpStream::connect(srv.addr()).await.expect("connect");
            s.write_all(&client_hello(tls12)).await.expect("hello");
            s.write_all(garbage).await.expect("garbage");
            let mut got = Vec::new();
            let closed = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await;
            assert!(
                closed.is_ok(),
                "not closed after garbage (TLS 1.2: {tls12})"
            );
            let types = records(&got);
            assert_eq!(types.first(), Some(&22), "a ServerHello first: {types:?}");
            if tls12 {
                assert_eq!(types.last(), Some(&21), "an alert last: {types:?}");
            }
        }
    }
    connect_tls(srv.addr(), &pki.ca, "alice", "phone")
        .await
        .expect("the server still serves");
}

/// The content types of the TLS records in `bytes` (as far as whole).
fn records(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        types.push(bytes[at]);
        at += 5 + usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
    }
    types
}

/// The bytes of a real ClientHello (from rustls's client), for a server
/// at 127.0.0.1, offering TLS 1.2 only or TLS 1.3 (and 1.2).
fn client_hello(tls12_only: bool) -> Vec<u8> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// ALPN: each port accepts its own protocol (or none), and refuses a
/// client that offers only others in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_names_the_port_and_a_foreign_protocol_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "a");
    let srv = tls_server(&pki, |_| {});
    let pem = std::fs::read(&pki.ca).expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let handshake = |alpn: Vec<Vec<u8>>, addr: std::net::SocketAddr| {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
            let tls = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
                .await
                .expect("no hang")?;
            Ok::<_, std::io::Error>(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
    };
    let (tcp, http) = (srv.addr(), srv.http_addr());
    assert_eq!(
        handshake(vec![b"swiftlet".to_vec()], tcp)
            .await
            .expect("swiftlet on the TCP port"),
        Some(b"swiftlet".to_vec())
    );
    assert_eq!(
        handshake(vec![], tcp).await.expect("no ALPN is accepted"),
        None
    );
    assert_eq!(
        handshake(vec![b"h2".to_vec(), b"http/1.1".to_vec()], http)
            .await
            .expect("a browser's offer on the HTTP port"),
        Some(b"http/1.1".to_vec())
    );
    let refused = handshake(vec![b"h2".to_vec()], tcp)
        .await
        .expect_err("h2 on the TCP port");
    assert!(
        refused.to_string().contains("NoApplicationProtocol"),
        "{refused}"
    );
    assert!(handshake(vec![b"swiftlet".to_vec()], http).await.is_err());
}
