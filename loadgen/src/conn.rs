//! A lean raw protocol connection: one `TcpStream` bound to a chosen local
//! address, hand-written Hello/Welcome, and frames read into a buffer owned
//! by the connection and decoded with the protocol crate's slice codec.
//!
//! Why not `swiftlet_client::Client` everywhere: it connects without a
//! source address (so it cannot spread over 127.0.0.x), and it spawns three
//! tasks with channels and a 8 KiB framed buffer per connection. An idle
//! loadgen connection here is one task, a socket and two buffers that are
//! emptied after login, so one worker holds ~19,000 of them in little
//! memory; a chat user is one task that reads, sends and checks in one
//! loop, so loadgen costs less CPU than the server it measures on a shared
//! machine. The offline scenario's senders do use the client library.
//!
//! Two framings behind one interface (`queue`/`flush`/`recv`/`try_next`):
//! TCP (`varint(len) ‖ Envelope`) and WebSocket (`--transport ws`: an HTTP
//! upgrade written by hand over the same socket, then one Envelope per
//! masked binary frame; see [`crate::ws`]).
//!
//! A cluster node answers the Hello of a user it is not home to with a
//! fatal `NOT_HOME` Error naming the home's addresses; [`Conn::connect`]
//! follows it there (the TCP address, or the HTTP one for WebSocket), from
//! the same source address, and records it in the [`Target`] so that a
//! reconnect goes straight home. The one place every scenario logs in
//! through, so the redirect costs no memory per connection beyond the
//! target the task already holds.
//!
//! With a source address the socket gets `IP_BIND_ADDRESS_NO_PORT` before
//! `bind`, so the kernel picks the port at `connect` by the whole 4-tuple:
//! otherwise a bind to port 0 must find a port free on that address, and the
//! TIME_WAIT sockets of a previous run (two per connection) count as used.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use swiftlet_protocol::codec::{decode_head, encode_frame};
use swiftlet_protocol::{
    pb, Body, Envelope, ErrorCode, FrameError, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use swiftlet_client::MaybeTls;

use crate::body::{self, Header};
use crate::cli::Transport;
use crate::peek::Delivered;
use crate::ws;

/// Everything a raw connection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("server error {code}: {message}")]
    Server {
        code: i32,
        message: String,
        /// The server's hint of when to try again (HOME_UNAVAILABLE), ms.
        retry_after_ms: u32,
    },
    /// NOT_HOME: the user's home node listens at this address.
    #[error("not this user's home node; redirected to {0}")]
    NotHome(String),
    #[error("server closed the connection")]
    Eof,
    #[error("timed out")]
    Timeout,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("websocket: {0}")]
    Ws(#[from] ws::WsError),
    #[error("websocket closed by the server (code {0})")]
    WsClosed(u16),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

impl ConnError {
    /// A short stable name for the error counters of the summary.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("connect_{:?}", e.kind()).to_lowercase(),
            ConnError::Io(e) => format!("io_{:?}", e.kind()).to_lowercase(),
            ConnError::Frame(_) => "bad_frame".into(),
            ConnError::Server { code, .. } => swiftlet_client::code_name(*code).to_lowercase(),
            ConnError::NotHome(_) => "not_home".into(),
            ConnError::Eof => "eof".into(),
            ConnError::Timeout => "timeout".into(),
            ConnError::Protocol(_) => "protocol".into(),
            ConnError::Ws(_) => "bad_ws_frame".into(),
            ConnError::WsClosed(code) => format!("ws_close_{code}"),
            ConnError::Tls(_) => "tls".into(),
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: SocketAddr,
    pub source: Option<IpAddr>,
    pub token: String,
    pub device: String,
    /// TCP framing, or WebSocket (then `server` is the HTTP listener).
    pub transport: Transport,
    /// TLS (`--tls`): the client library's connector, offering the ALPN
    /// of `transport`'s port.
    pub tls: Option<swiftlet_client::TlsConnector>,
}

/// One logged-in connection.
pub struct Conn {
    stream: MaybeTls<TcpStream>,
    /// WebSocket framing (`--transport ws`) instead of varint frames.
    ws: bool,
    /// A Pong is queued in `wbuf`: `recv` flushes it before reading.
    pong_pending: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes to reserve before each read (0: let the buffer grow by itself).
    read_chunk: usize,
    next_request: u64,
    pub welcome: pb::Welcome,
}

impl Conn {
    /// Connect (from `target.source` if set), send Hello, wait for Welcome,
    /// following NOT_HOME redirects (at most [`MAX_REDIRECTS`]); `timeout`
    /// bounds the whole chain. After a redirect `target.server` is the home
    /// node's address. Returns the connection and the redirects followed.
    pub async fn connect(target: &mut Target, timeout: Duration) -> Result<(Conn, u32), ConnError> {
        tokio::time::timeout(timeout, async {
            let mut hops = 0;
            loop {
                match Self::connect_inner(target).await {
                    Err(ConnError::NotHome(home)) if hops < MAX_REDIRECTS => {
                        target.server = resolve(&home).await?;
                        hops += 1;
                    }
                    other => return other.map(|c| (c, hops)),
                }
            }
        })
        .await
        .map_err(|_| ConnError::Timeout)?
    }

    // `..Default::default()` on protobuf literals: the protocol grows fields
    // (groups, receipts) that loadgen leaves unset.
    #[allow(clippy::needless_update)]
    async fn connect_inner(target: &Target) -> Result<Conn, ConnError> {
        let stream = open(target.server, target.source).await?;
        stream.set_nodelay(true)?;
        let stream = MaybeTls::connect(stream, target.tls.as_ref(), &target.server.to_string())
            .await
            .map_err(ConnError::Tls)?;
        let mut conn = Conn {
            stream,
            ws: target.transport == Transport::Ws,
            pong_pending: false,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_chunk: 0,
            next_request: 1,
            welcome: pb::Welcome::default(),
        };
        if conn.ws {
            conn.upgrade(&target.server.to_string()).await?;
        }
        conn.send(Body::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            token: target.token.clone(),
            device_id: target.device.clone(),
            ..Default::default()
        }))
        .await?;
        let env = conn.recv().await?;
        match env.body {
            Some(Body::Welcome(w)) => conn.welcome = w,
            Some(Body::Error(e)) => return Err(login_refused(e, target.transport)),
            other => {
                return Err(ConnError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        }
        Ok(conn)
    }

    /// The WebSocket upgrade: request, then read the response head (any
    /// bytes after it stay in the read buffer) and require status 101.
    /// Sec-WebSocket-Accept is not checked (that needs SHA-1; the server is
    /// ours and the status line suffices for a load generator).
    async fn upgrade(&mut self, host: &str) -> Result<(), ConnError> {
        let req = ws::upgrade_request(host, rand::random());
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            if let Some(end) = ws::head_end(&self.rbuf) {
                ws::check_upgrade(&self.rbuf[..end]).map_err(ConnError::Protocol)?;
                self.rbuf.advance(end);
                return Ok(());
            }
            if self.rbuf.len() > 16 * 1024 {
                return Err(ConnError::Protocol("upgrade response head too long".into()));
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ConnError::Eof);
            }
        }
    }

    /// Reserve `chunk` bytes before each read (busy connections); the
    /// default 0 keeps idle connections' buffers tiny.
    pub fn set_read_chunk(&mut self, chunk: usize) {
        self.read_chunk = chunk;
    }

    /// Free both buffers if they hold nothing (after a burst).
    pub fn shrink(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
    }

    /// Queue one request frame into the write buffer; returns its request id.
    /// Nothing is written until [`Conn::flush`].
    pub fn queue(&mut self, body: Body) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let env = Envelope::new(id, body);
        if self.ws {
            ws::encode_envelope(&mut self.wbuf, &env, rand::random());
        } else {
            encode_frame(&env, &mut self.wbuf);
        }
        id
    }

    /// Queue a `Send` of a loadgen body (`header`, zero-padded to
    /// `body_len`) with client_msg_id `m<counter>`, encoded straight into the
    /// write buffer: no `pb::Send`, no String or body allocation per message
    /// (see [`encode_send`]). Returns its request id.
    pub fn queue_send(&mut self, to_user: &str, group_id: u64, h: &Header, body_len: usize) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let msg = SendRef {
            request_id: id,
            counter: h.counter,
            to_user,
            group_id,
            header: h,
            body_len: body_len.max(body::HEADER_LEN),
        };
        if self.ws {
            let mask = rand::random();
            let len = msg.envelope_len();
            ws::put_header(&mut self.wbuf, ws::OP_BINARY, len, mask);
            let start = self.wbuf.len();
            msg.encode(&mut self.wbuf);
            ws::apply_mask(&mut self.wbuf[start..], mask);
        } else {
            prost::encoding::encode_varint(msg.envelope_len() as u64, &mut self.wbuf);
            msg.encode(&mut self.wbuf);
        }
        id
    }

    /// Write everything queued. Cancel-safe: the buffer is advanced by what
    /// each write took, so a cancelled flush resumes where it stopped.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        while !self.wbuf.is_empty() {
            let n = self.stream.write(&self.wbuf).await?;
            if n == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        self.pong_pending = false;
        Ok(())
    }

    /// Queue and write one request frame; returns its request id.
    pub async fn send(&mut self, body: Body) -> Result<u64, ConnError> {
        let id = self.queue(body);
        self.flush().await?;
        Ok(id)
    }

    /// The next frame already in the read buffer, without reading the socket.
    /// WebSocket: Pings are answered (a Pong queued, written by the next
    /// flush or `recv`), Pongs skipped, a Close ends the connection.
    pub fn try_next(&mut self) -> Result<Option<Envelope>, ConnError> {
        loop {
            match parse_frame(&self.rbuf, self.ws, &mut self.wbuf)? {
                Parsed::Frame(env, used) => {
                    self.rbuf.advance(used);
                    return Ok(Some(env));
                }
                Parsed::Control { used, pong } => {
                    self.pong_pending |= pong;
                    self.rbuf.advance(used);
                }
                // parse_frame never reads in place (only try_next_frame asks).
                Parsed::Message(..) => {
                    return Err(ConnError::Protocol(
                        "a message read in place unasked".into(),
                    ))
                }
                Parsed::More => return Ok(None),
            }
        }
    }

    /// A logged-in plain (not TLS) connection with nothing left to write,
    /// taken apart for [`crate::hold`]: its socket, whether it speaks
    /// WebSocket, the bytes read but not yet parsed, and its next request
    /// id. A TLS connection (or one with bytes to write) comes back whole;
    /// if tokio would not let go of the socket the connection is lost, like
    /// a failed one.
    pub fn into_parts(self) -> Taken {
        if !self.wbuf.is_empty() || self.pong_pending {
            return Taken::Kept(Box::new(self));
        }
        let stream = match self.stream {
            MaybeTls::Plain(s) => s,
            tls => {
                return Taken::Kept(Box::new(Conn {
                    stream: tls,
                    ..self
                }))
            }
        };
        match stream.into_std() {
            Ok(socket) => Taken::Parts(Parts {
                socket,
                ws: self.ws,
                unread: self.rbuf.to_vec(),
                next_request: self.next_request,
            }),
            Err(e) => Taken::Lost(ConnError::Io(e)),
        }
    }

    /// The next frame from the server. Cancel-safe: a cancelled call loses
    /// nothing (bytes read stay in the buffer), so it may sit in `select!`.
    pub async fn recv(&mut self) -> Result<Envelope, ConnError> {
        loop {
            if let Some(env) = self.try_next()? {
                return Ok(env);
            }
            self.fill().await?;
        }
    }

    /// [`Conn::recv`] for the sending scenarios: a delivered message comes
    /// as the few fields the checks need ([`crate::peek`]), anything else
    /// as its Envelope.
    pub async fn recv_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            if let Some(f) = self.try_next_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// [`Conn::try_next`] with delivered messages read in place.
    pub fn try_next_frame(&mut self) -> Result<Option<Frame>, ConnError> {
        loop {
            match parse_frame_with(&self.rbuf, self.ws, &mut self.wbuf, true)? {
                Parsed::Message(d, used) => {
                    self.rbuf.advance(used);
                    return Ok(Some(Frame::Message(d)));
                }
                Parsed::Frame(env, used) => {
                    self.rbuf.advance(used);
                    return Ok(Some(Frame::Envelope(env)));
                }
                Parsed::Control { used, pong } => {
                    self.pong_pending |= pong;
                    self.rbuf.advance(used);
                }
                Parsed::More => return Ok(None),
            }
        }
    }

    /// Read once more from the socket (after writing a pending Pong).
    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.pong_pending {
            self.flush().await?;
        }
        if self.read_chunk > 0 {
            self.rbuf.reserve(self.read_chunk);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(ConnError::Eof);
        }
        Ok(())
    }
}

/// A server frame as the sending scenarios see it.
pub enum Frame {
    /// A `Deliver` of a message: what the checks need of it.
    Message(Delivered),
    Envelope(Envelope),
}

/// A `Send` envelope by reference, encoded by hand (protobuf wire format,
/// the fields of `Envelope{request_id = 1, send = 20}` and `Send{client_msg_id
/// = 1, to_user = 2, content_type = 3, body = 4, group_id = 5}`); a unit test
/// checks it byte for byte against prost's encoding of the same message.
struct SendRef<'a> {
    request_id: u64,
    counter: u64,
    to_user: &'a str,
    group_id: u64,
    header: &'a Header,
    body_len: usize,
}

/// `m<counter>` as ASCII in a stack buffer.
fn msg_id(counter: u64, buf: &mut [u8; 21]) -> &[u8] {
    let mut i = buf.len();
    let mut n = counter;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    i -= 1;
    buf[i] = b'm';
    &buf[i..]
}

impl SendRef<'_> {
    fn send_len(&self, id_len: usize) -> usize {
        use prost::encoding::{encoded_len_varint as v, key_len};
        let field = |tag: u32, len: usize| {
            if len == 0 {
                0
            } else {
                key_len(tag) + v(len as u64) + len
            }
        };
        field(1, id_len)
            + field(2, self.to_user.len())
            + field(3, body::CONTENT_TYPE.len())
            + field(4, self.body_len)
            + if self.group_id != 0 {
                key_len(5) + v(self.group_id)
            } else {
                0
            }
    }

    fn envelope_len(&self) -> usize {
        use prost::encoding::{encoded_len_varint as v, key_len};
        let mut id = [0; 21];
        let send = self.send_len(msg_id(self.counter, &mut id).len());
        key_len(1) + v(self.request_id) + key_len(20) + v(send as u64) + send
    }

    fn encode(&self, out: &mut BytesMut) {
        use bytes::BufMut;
        use prost::encoding::{encode_key, encode_varint, WireType};
        let mut idb = [0; 21];
        let id = msg_id(self.counter, &mut idb);
        let send = self.send_len(id.len());
        out.reserve(send + 16);
        encode_key(1, WireType::Varint, out);
        encode_varint(self.request_id, out);
        encode_key(20, WireType::LengthDelimited, out);
        encode_varint(send as u64, out);
        let bytes_field = |tag: u32, b: &[u8], out: &mut BytesMut| {
            if !b.is_empty() {
                encode_key(tag, WireType::LengthDelimited, out);
                encode_varint(b.len() as u64, out);
                out.put_slice(b);
            }
        };
        bytes_field(1, id, out);
        bytes_field(2, self.to_user.as_bytes(), out);
        bytes_field(3, body::CONTENT_TYPE.as_bytes(), out);
        encode_key(4, WireType::LengthDelimited, out);
        encode_varint(self.body_len as u64, out);
        body::put(self.header, self.body_len, out);
        if self.group_id != 0 {
            encode_key(5, WireType::Varint, out);
            encode_varint(self.group_id, out);
        }
    }
}

/// What [`Conn::into_parts`] made of a connection.
pub enum Taken {
    Parts(Parts),
    /// TLS, or bytes still to write: it stays a [`Conn`].
    Kept(Box<Conn>),
    Lost(ConnError),
}

/// A plain connection taken apart by [`Conn::into_parts`].
pub struct Parts {
    pub socket: std::net::TcpStream,
    pub ws: bool,
    pub unread: Vec<u8>,
    pub next_request: u64,
}

/// What [`parse_frame`] found at the front of a read buffer.
pub enum Parsed {
    /// An Envelope and the bytes it took.
    Frame(Envelope, usize),
    /// A delivered message read in place ([`crate::peek`]), and its bytes.
    Message(Delivered, usize),
    /// A WebSocket control frame, handled; `pong`: a Pong was queued.
    Control { used: usize, pong: bool },
    /// Not a whole frame yet.
    More,
}

/// The first server frame in `buf`: TCP (`varint(len) ‖ Envelope`) or,
/// with `ws`, a WebSocket frame: a binary one holds an Envelope, a Ping is
/// answered with a Pong queued in `out`, a Pong is skipped, a Close ends the
/// connection with its code.
pub fn parse_frame(buf: &[u8], ws: bool, out: &mut BytesMut) -> Result<Parsed, ConnError> {
    parse_frame_with(buf, ws, out, false)
}

/// [`parse_frame`]; with `peek`, a delivered message is read in place
/// ([`crate::peek`]) instead of decoded.
fn parse_frame_with(
    buf: &[u8],
    ws: bool,
    out: &mut BytesMut,
    peek: bool,
) -> Result<Parsed, ConnError> {
    let envelope = |payload: &[u8], used: usize| -> Result<Parsed, ConnError> {
        if peek {
            if let Some(d) = crate::peek::delivered_message(payload) {
                return Ok(Parsed::Message(d, used));
            }
        }
        let env = prost::Message::decode(payload).map_err(FrameError::from)?;
        Ok(Parsed::Frame(env, used))
    };
    if !ws {
        return match decode_head(buf, DEFAULT_MAX_FRAME)? {
            Some((len, head)) if buf.len() >= head + len => {
                envelope(&buf[head..head + len], head + len)
            }
            _ => Ok(Parsed::More),
        };
    }
    let Some(f) = ws::decode(buf, DEFAULT_MAX_FRAME)? else {
        return Ok(Parsed::More);
    };
    if f.mask.is_some() {
        return Err(ConnError::Protocol("masked server frame".into()));
    }
    let payload = &buf[f.payload];
    match f.opcode {
        ws::OP_BINARY => envelope(payload, f.used),
        ws::OP_PING => {
            ws::encode_masked(out, ws::OP_PONG, payload, rand::random());
            Ok(Parsed::Control {
                used: f.used,
                pong: true,
            })
        }
        ws::OP_PONG => Ok(Parsed::Control {
            used: f.used,
            pong: false,
        }),
        ws::OP_CLOSE => {
            let code = if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            };
            Err(ConnError::WsClosed(code))
        }
        op => Err(ConnError::Protocol(format!("unexpected ws opcode {op}"))),
    }
}

/// Most NOT_HOME redirects one login follows, as in the client library: a
/// node redirects a login at most once, so more means the nodes disagree
/// (a partition moving) and the attempt should fail and be retried.
pub const MAX_REDIRECTS: u32 = 3;

/// The error for an `Error` answering the Hello: NOT_HOME with the home's
/// address for this transport, or the server's error as it is.
fn login_refused(e: pb::Error, transport: Transport) -> ConnError {
    let home = e.redirect.as_ref().map(|r| match transport {
        Transport::Tcp => &r.tcp_addr,
        Transport::Ws => &r.http_addr,
    });
    match home {
        Some(addr) if e.code == ErrorCode::NotHome as i32 && !addr.is_empty() => {
            ConnError::NotHome(addr.clone())
        }
        _ => ConnError::Server {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        },
    }
}

/// A redirect's `host:port`: parsed when it is an IP address (the usual
/// case, no lookup per connection), else resolved.
async fn resolve(addr: &str) -> Result<SocketAddr, ConnError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(ConnError::Connect)?
        .next()
        .ok_or_else(|| ConnError::Protocol(format!("redirect to {addr:?}: no address")))
}

/// Open a TCP connection to `server`, from `source` if given. With a source
/// the socket is made with socket2, gets `IP_BIND_ADDRESS_NO_PORT` (through
/// nix: socket2 and tokio have no setter, and the crate has no unsafe code),
/// is bound to `source:0`, and is handed to tokio to connect.
async fn open(server: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ConnError> {
    let socket = match source {
        None => match server {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(ConnError::Connect)?,
        Some(src) => {
            use socket2::{Domain, Protocol, Socket, Type};
            let s = Socket::new(
                Domain::for_address(server),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(ConnError::Connect)?;
            s.set_nonblocking(true).map_err(ConnError::Connect)?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
                .map_err(|e| ConnError::Connect(e.into()))?;
            s.bind(&SocketAddr::new(src, 0).into())
                .map_err(ConnError::Connect)?;
            TcpSocket::from_std_stream(std::net::TcpStream::from(s))
        }
    };
    socket.connect(server).await.map_err(ConnError::Connect)
}

/// A fatal server `Error` frame as a [`ConnError`], or `None` if not fatal.
pub fn fatal_error(e: &pb::Error) -> Option<ConnError> {
    let fatal = e.fatal
        || ErrorCode::try_from(e.code)
            .map(ErrorCode::is_fatal)
            .unwrap_or(e.code >= 2000);
    fatal.then(|| ConnError::Server {
        code: e.code,
        message: e.message.clone(),
        retry_after_ms: e.retry_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: ErrorCode, redirect: Option<pb::Redirect>, retry_after_ms: u32) -> pb::Error {
        pb::Error {
            code: code as i32,
            message: "m".into(),
            fatal: true,
            redirect,
            retry_after_ms,
        }
    }

    fn home() -> Option<pb::Redirect> {
        Some(pb::Redirect {
            node_id: 2,
            tcp_addr: "127.0.0.2:7400".into(),
            http_addr: "127.0.0.2:7480".into(),
        })
    }

    #[test]
    fn not_home_names_the_address_of_the_transport() {
        let e = login_refused(refusal(ErrorCode::NotHome, home(), 0), Transport::Tcp);
        assert!(
            matches!(&e, ConnError::NotHome(a) if a == "127.0.0.2:7400"),
            "{e}"
        );
        let e = login_refused(refusal(ErrorCode::NotHome, home(), 0), Transport::Ws);
        assert!(
            matches!(&e, ConnError::NotHome(a) if a == "127.0.0.2:7480"),
            "{e}"
        );
        assert_eq!(e.kind(), "not_home");
    }

    #[test]
    fn not_home_without_an_address_and_other_refusals_stay_server_errors() {
        let e = login_refused(refusal(ErrorCode::NotHome, None, 0), Transport::Tcp);
        assert!(matches!(e, ConnError::Server { code: 2010, .. }), "{e}");
        let e = login_refused(
            refusal(ErrorCode::HomeUnavailable, None, 1500),
            Transport::Tcp,
        );
        assert!(
            matches!(
                e,
                ConnError::Server {
                    code: 2011,
                    retry_after_ms: 1500,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.kind(), "home_unavailable");
    }

    // `..Default::default()`: fields loadgen leaves unset.
    #[allow(clippy::needless_update)]
    #[test]
    fn a_hand_encoded_send_is_what_prost_encodes() {
        for (to, group, counter, len) in [("lg-u7", 0, 0, 24), ("", 99_999, 1234567, 300)] {
            let h = Header {
                sent_unix_ns: 1_700_000_000_123_456_789,
                sender: 7,
                counter,
            };
            let msg = SendRef {
                request_id: 300,
                counter,
                to_user: to,
                group_id: group,
                header: &h,
                body_len: len,
            };
            let mut ours = BytesMut::new();
            msg.encode(&mut ours);
            assert_eq!(ours.len(), msg.envelope_len());
            let env = Envelope::new(
                300,
                Body::Send(pb::Send {
                    client_msg_id: format!("m{counter}"),
                    to_user: to.to_owned(),
                    group_id: group,
                    content_type: body::CONTENT_TYPE.to_owned(),
                    body: body::encode(&h, len).into(),
                    ..Default::default()
                }),
            );
            assert_eq!(&ours[..], &prost::Message::encode_to_vec(&env)[..]);
        }
    }

    #[tokio::test]
    async fn redirect_addresses_parse_without_a_lookup() {
        let a = resolve("127.0.0.3:9").await.expect("an IP address parses");
        assert_eq!(a, "127.0.0.3:9".parse::<SocketAddr>().expect("addr"));
    }
}
