//! Bytes on the wire, written by hand: connecting from a chosen source
//! address, frames and WebSocket frames built without the client library's
//! checks, and reading a connection to its end to name what the server
//! answered (`Error` code, WebSocket close code, HTTP status).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use swiftlet_client::codec::{decode_frame, encode_frame};
use swiftlet_client::{code_name, pb, token, Body, Envelope};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// How long a hostile client waits for the server's answer before it
/// calls it "no answer" (every case here is answered within the
/// handshake timeout, 10 s by default, or at once).
pub const ANSWER_WAIT: Duration = Duration::from_secs(20);
/// Bytes of a connection's answer kept for classifying it.
const KEEP: usize = 64 * 1024;

pub struct Target {
    pub server: SocketAddr,
    pub http: SocketAddr,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    dev_auth: bool,
    secret: Option<String>,
    pub max_frame: usize,
}

impl Target {
    pub fn new(args: &crate::Args, sources: Vec<IpAddr>) -> Self {
        Target {
            server: args.server,
            http: args.http_server,
            sources,
            next: AtomicUsize::new(0),
            dev_auth: args.dev_auth,
            secret: args.jwt_secret.clone(),
            max_frame: args.max_frame,
        }
    }

    /// Connect to the TCP port (`http` false) or the HTTP port, from the
    /// next source address.
    pub async fn connect(&self, http: bool) -> io::Result<TcpStream> {
        let to = if http { self.http } else { self.server };
        let sock = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let src = self.sources[self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len()];
            if src.is_ipv4() == to.is_ipv4() {
                sock.bind(SocketAddr::new(src, 0))?;
            }
        }
        let s = tokio::time::timeout(Duration::from_secs(10), sock.connect(to))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        s.set_nodelay(true)?;
        Ok(s)
    }

    pub fn token(&self, user: &str) -> String {
        match (&self.secret, self.dev_auth) {
            (Some(secret), _) => token::mint(secret.as_bytes(), user, 3600),
            (None, _) => user.to_owned(),
        }
    }

    pub fn hello(&self, user: &str, device: &str) -> Envelope {
        Envelope::new(
            1,
            Body::Hello(pb::Hello {
                protocol_version: 1,
                token: self.token(user),
                device_id: device.into(),
                skip_own_sends: false,
            }),
        )
    }
}

/// Run `task(k)` for every `k` in `0..n` as tasks of their own; return
/// once all of them ended (each kind of abuse runs its clients this way).
pub async fn each<F, Fut>(n: usize, task: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..n {
        tasks.spawn(task(k));
    }
    while tasks.join_next().await.is_some() {}
}

pub fn frame(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(env, &mut out);
    out
}

/// The Envelope's bytes without the length prefix (one WebSocket message).
pub fn envelope_bytes(env: &Envelope) -> Vec<u8> {
    prost::Message::encode_to_vec(env)
}

/// A client WebSocket frame: FIN set, `masked` as a client must.
pub fn ws_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = ws_header(0x80 | opcode, payload.len() as u64, masked);
    let mask = [0x5au8, 0xc3, 0x17, 0x99];
    if masked {
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A WebSocket frame header claiming `len` payload bytes (the payload
/// itself not included).
pub fn ws_header(first: u8, len: u64, masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match len {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&[0x5a, 0xc3, 0x17, 0x99]);
    }
    out
}

pub fn ws_upgrade(host: SocketAddr) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Read until the server closes (or `wait` passes) and keep the first
/// 64 KiB. `Err` names what ended it other than a clean close.
pub async fn read_to_end(s: &mut TcpStream, wait: Duration) -> (Vec<u8>, Option<&'static str>) {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (kept, Some("no answer")),
            Ok(Ok(0)) => return (kept, None),
            Ok(Ok(n)) => {
                let room = KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                return (kept, Some("reset"))
            }
            Ok(Err(_)) => return (kept, Some("read error")),
        }
    }
}

/// The answer on the TCP port: the code of the last `Error` frame in what
/// was read, else how the connection ended ("closed": a close without a
/// word).
pub fn tcp_answer(bytes: &[u8], end: Option<&'static str>) -> String {
    let mut rest = bytes;
    let mut last_error = None;
    while let Ok(Some((env, used))) = decode_frame(rest, usize::MAX) {
        if let Some(Body::Error(e)) = env.body {
            last_error = Some(code_name(e.code));
        }
        rest = &rest[used..];
    }
    match (last_error, end) {
        (Some(code), None) => code.to_owned(),
        (Some(code), Some(end)) => format!("{code}, then {end}"),
        (None, None) => "closed".to_owned(),
        (None, Some(end)) => end.to_owned(),
    }
}

/// The answer on the HTTP port: `http NNN` when the status is not 101;
/// after a 101, the `Error` the server sent in a binary message (if any)
/// and the close frame's code, e.g. `FRAME_TOO_LARGE/1009`.
pub fn web_answer(bytes: &[u8], end: Option<&'static str>) -> String {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match end {
            None if bytes.is_empty() => "closed".to_owned(),
            None => "closed mid-head".to_owned(),
            Some(e) => e.to_owned(),
        };
    };
    let status = bytes
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|s| std::str::from_utf8(s).ok())
        .unwrap_or("?")
        .to_owned();
    if status != "101" {
        return format!("http {status}");
    }
    let mut rest = &bytes[head_end + 4..];
    let mut error = None;
    let mut close = None;
    while let Some((opcode, payload, used)) = parse_server_frame(rest) {
        match opcode {
            0x2 => {
                if let Ok(env) = <Envelope as prost::Message>::decode(payload) {
                    if let Some(Body::Error(e)) = env.body {
                        error = Some(code_name(e.code));
                    }
                }
            }
            0x8 if payload.len() >= 2 => close = Some(u16::from_be_bytes([payload[0], payload[1]])),
            _ => {}
        }
        rest = &rest[used..];
    }
    let mut out = match (error, close) {
        (Some(e), Some(c)) => format!("{e}/{c}"),
        (Some(e), None) => format!("{e}/no close frame"),
        (None, Some(c)) => format!("close {c}"),
        (None, None) => "101, then closed".to_owned(),
    };
    if let Some(end) = end {
        out.push_str(", then ");
        out.push_str(end);
    }
    out
}

/// One unmasked server frame: (opcode, payload, bytes used).
fn parse_server_frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    let (len, at): (usize, usize) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let end = at.checked_add(len)?;
    (b.len() >= end).then(|| (opcode, &b[at..end], end))
}

/// Read `rd`'s frames into `buf` and hand each to `classify` until it
/// returns an end (a fatal error), the socket ends, or the stop: the
/// connection's end as a report line ("" at the stop). The reading half of
/// every logged-in abuser that reads its answers.
pub async fn read_answers(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut bytes::BytesMut,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut classify: impl FnMut(swiftlet_client::Envelope) -> Option<String>,
) -> String {
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    loop {
        loop {
            match swiftlet_client::codec::decode_frame(buf, usize::MAX) {
                Ok(Some((env, used))) => {
                    buf.advance(used);
                    if let Some(end) = classify(env) {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(_) => return "undecodable answer".to_owned(),
            }
        }
        tokio::select! {
            r = rd.read_buf(buf) => match r {
                Ok(0) => return "closed".to_owned(),
                Ok(_) => {}
                Err(e) => return format!("read error: {}", e.kind()),
            },
            _ = stop.changed() => return String::new(),
        }
    }
}
