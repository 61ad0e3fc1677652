//! `swiftlet admin ...`: one request to a running node's operator API, on
//! its HTTP port (plain HTTP: against a node that serves TLS, use an HTTPS
//! client such as curl with the same paths, see protocol/README.md).
//!
//! Blocking and tiny on purpose: one request per run, written whole, the
//! answer read to EOF (the server closes after every answer).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} did not answer in HTTP")]
    NotHttp { addr: String },
    /// The node refused: the HTTP status and its JSON error body.
    #[error("refused ({status}): {body}")]
    Refused { status: u16, body: String },
}

/// Send `method path` (with a JSON `body`, if any) to the node at `addr`
/// with the admin `token`; the answer's JSON body on a 200.
pub fn call(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<String, ClientError> {
    let io = |source| ClientError::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut s = TcpStream::connect(addr).map_err(|source| ClientError::Connect {
        addr: addr.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::NotHttp {
            addr: addr.to_owned(),
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    if status == 200 {
        Ok(body)
    } else {
        Err(ClientError::Refused { status, body })
    }
}
