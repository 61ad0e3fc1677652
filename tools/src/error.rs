//! The client's error and close-reason types.
//!
//! Owns the mapping from everything that can go wrong (socket, framing, a
//! server `Error` frame, a local timeout, a dead connection) onto one typed
//! enum, and the one place that decides which of those a caller may retry
//! ([`ClientError::is_retryable`]). The reliable sender and the CLI both lean
//! on that decision, so it must stay in step with the error-code ranges of
//! `swiftlet.proto` (1xxx request failed, 2xxx reconnect, 3xxx give up).

use std::fmt;

use swiftlet_protocol::{ErrorCode, FrameError};

/// Why a connection ended. Cheap to clone: every pending request and the
/// [`Deliveries`](crate::Deliveries) stream get a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// [`Client::close`](crate::Client::close) was called, or the last
    /// `Client` handle was dropped.
    Local,
    /// The server closed the TCP connection without saying why.
    Eof,
    /// The server sent a fatal `Error` frame (code >= 2000) and closed.
    Server { code: i32, message: String },
    /// The socket failed.
    Io(String),
    /// The server sent bytes that are not a valid frame.
    Frame(String),
    /// A heartbeat Ping went unanswered for a whole request timeout: the
    /// connection is presumed half-open.
    HeartbeatTimeout,
}

impl CloseReason {
    /// True when reconnecting unchanged can succeed: everything except a
    /// local close and server codes 3xxx (bad version, bad or expired token).
    pub fn may_reconnect(&self) -> bool {
        match self {
            CloseReason::Local => false,
            CloseReason::Server { code, .. } => *code < 3000,
            _ => true,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local => f.write_str("closed locally"),
            CloseReason::Eof => f.write_str("server closed the connection"),
            CloseReason::Server { code, message } => {
                write!(f, "server error {} ({}): {message}", code, code_name(*code))
            }
            CloseReason::Io(e) => write!(f, "i/o error: {e}"),
            CloseReason::Frame(e) => write!(f, "bad frame from server: {e}"),
            CloseReason::HeartbeatTimeout => f.write_str("heartbeat timed out"),
        }
    }
}

/// The symbolic name of a numeric error code, or `"UNKNOWN"`.
pub fn code_name(code: i32) -> &'static str {
    ErrorCode::try_from(code)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, reading or writing the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("framing: {0}")]
    Frame(FrameError),
    /// The server answered with an `Error` frame: a request-level error
    /// (1xxx) for a request, or a fatal one (2xxx/3xxx) during the handshake.
    #[error("server error {code} ({}): {message}", code_name(*.code))]
    Server { code: i32, message: String },
    /// No answer within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection is gone; the request may or may not have reached the
    /// server (retry a Send with the same `client_msg_id`).
    #[error("disconnected: {0}")]
    Disconnected(CloseReason),
    /// The server answered with a frame of the wrong kind.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The request would exceed the server's `max_frame_bytes`; it was not sent.
    #[error("frame of {len} bytes exceeds the server's limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// The TLS handshake failed: the server's certificate is not trusted
    /// or not for this host, the server does not speak TLS on this port,
    /// or they share no protocol version, suite or ALPN. Not retryable as
    /// is: the trust (`--ca`), the address or the port must change.
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// A reliable send ran out of time; `last` is the final attempt's error.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        attempts: u32,
        last: Box<ClientError>,
    },
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(io) => ClientError::Io(io),
            other => ClientError::Frame(other),
        }
    }
}

impl ClientError {
    /// An error of connecting TLS: a refusal by TLS itself (carried inside
    /// the I/O error) is [`ClientError::Tls`], anything else stays I/O.
    pub fn from_handshake(e: std::io::Error) -> ClientError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string);
        match tls {
            Some(why) => ClientError::Tls(why),
            None => ClientError::Io(e),
        }
    }

    /// The server's error code, if this is a server error (or a disconnect
    /// caused by a fatal server error).
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::Disconnected(CloseReason::Server { code, .. }) => Some(*code),
            _ => None,
        }
    }

    /// True when the same request may succeed if retried (possibly on a new
    /// connection): transport failures, timeouts, fatal 2xxx codes, and the
    /// three transient request codes RATE_LIMITED, STORE_UNAVAILABLE and
    /// UNAVAILABLE (protocol section 10).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Frame(_) | ClientError::Timeout => true,
            ClientError::Disconnected(reason) => reason.may_reconnect(),
            ClientError::Server { code, .. } => {
                (2000..3000).contains(code)
                    || *code == ErrorCode::RateLimited as i32
                    || *code == ErrorCode::StoreUnavailable as i32
                    || *code == ErrorCode::Unavailable as i32
            }
            ClientError::Protocol(_)
            | ClientError::Tls(_)
            | ClientError::TooLarge { .. }
            | ClientError::GaveUp { .. } => false,
        }
    }

    /// True when a retry should use a fresh connection rather than the
    /// current one (everything retryable except the transient 1xxx codes).
    pub fn needs_reconnect(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => *code >= 2000,
            other => other.is_retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classes_follow_the_code_ranges() {
        let server = |code: ErrorCode| ClientError::Server {
            code: code as i32,
            message: String::new(),
        };
        assert!(server(ErrorCode::StoreUnavailable).is_retryable());
        assert!(!server(ErrorCode::StoreUnavailable).needs_reconnect());
        // Section 10: UNAVAILABLE (a cluster node that may not write for the
        // user now, e.g. while its partition moves) changed nothing; retry
        // later, on the same connection first.
        assert!(server(ErrorCode::Unavailable).is_retryable());
        assert!(!server(ErrorCode::Unavailable).needs_reconnect());
        assert!(!server(ErrorCode::InvalidRecipient).is_retryable());
        assert!(server(ErrorCode::ShuttingDown).is_retryable());
        assert!(!server(ErrorCode::AuthFailed).is_retryable());
        assert!(ClientError::Timeout.needs_reconnect());
        assert!(ClientError::Disconnected(CloseReason::Eof).is_retryable());
        assert!(!ClientError::Disconnected(CloseReason::Local).is_retryable());
        assert_eq!(code_name(2004), "IDLE_TIMEOUT");
        assert_eq!(code_name(9999), "UNKNOWN");
    }
}
