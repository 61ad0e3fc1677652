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

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use swiftlet_protocol::codec::{decode_frame, encode_frame};
use swiftlet_protocol::{
    pb, Body, Envelope, ErrorCode, FrameError, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

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
    Server { code: i32, message: String },
    #[error("server closed the connection")]
    Eof,
    #[error("timed out")]
    Timeout,
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ConnError {
    /// A short stable name for the error counters of the summary.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("connect_{:?}", e.kind()).to_lowercase(),
            ConnError::Io(e) => format!("io_{:?}", e.kind()).to_lowercase(),
            ConnError::Frame(_) => "bad_frame".into(),
            ConnError::Server { code, .. } => swiftlet_client::code_name(*code).to_lowercase(),
            ConnError::Eof => "eof".into(),
            ConnError::Timeout => "timeout".into(),
            ConnError::Protocol(_) => "protocol".into(),
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
}

/// One logged-in connection.
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes to reserve before each read (0: let the buffer grow by itself).
    read_chunk: usize,
    next_request: u64,
    pub welcome: pb::Welcome,
}

impl Conn {
    /// Connect (from `target.source` if set), send Hello, wait for Welcome.
    pub async fn connect(target: &Target, timeout: Duration) -> Result<Conn, ConnError> {
        tokio::time::timeout(timeout, Self::connect_inner(target))
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    // `..Default::default()` on protobuf literals: the protocol grows fields
    // (groups, receipts) that loadgen leaves unset.
    #[allow(clippy::needless_update)]
    async fn connect_inner(target: &Target) -> Result<Conn, ConnError> {
        let socket = match target.server {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(ConnError::Connect)?;
        if let Some(src) = target.source {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(ConnError::Connect)?;
        }
        let stream = socket
            .connect(target.server)
            .await
            .map_err(ConnError::Connect)?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_chunk: 0,
            next_request: 1,
            welcome: pb::Welcome::default(),
        };
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
            Some(Body::Error(e)) => {
                return Err(ConnError::Server {
                    code: e.code,
                    message: e.message,
                })
            }
            other => {
                return Err(ConnError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        }
        Ok(conn)
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
        encode_frame(&Envelope::new(id, body), &mut self.wbuf);
        id
    }

    /// Write everything queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queue and write one request frame; returns its request id.
    pub async fn send(&mut self, body: Body) -> Result<u64, ConnError> {
        let id = self.queue(body);
        self.flush().await?;
        Ok(id)
    }

    /// The next frame already in the read buffer, without reading the socket.
    pub fn try_next(&mut self) -> Result<Option<Envelope>, ConnError> {
        match decode_frame(&self.rbuf, DEFAULT_MAX_FRAME)? {
            Some((env, used)) => {
                self.rbuf.advance(used);
                Ok(Some(env))
            }
            None => Ok(None),
        }
    }

    /// The next frame from the server. Cancel-safe: a cancelled call loses
    /// nothing (bytes read stay in the buffer), so it may sit in `select!`.
    pub async fn recv(&mut self) -> Result<Envelope, ConnError> {
        loop {
            if let Some(env) = self.try_next()? {
                return Ok(env);
            }
            if self.read_chunk > 0 {
                self.rbuf.reserve(self.read_chunk);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ConnError::Eof);
            }
        }
    }
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
    })
}
