//! Connection settings for [`Client::connect`](crate::Client::connect).
//!
//! Plain data with documented defaults; nothing here touches the network.
//! A config is cheap to clone because the reliable sender and the CLI
//! reconnect from the same one again and again.

use std::time::Duration;

use swiftlet_protocol::DEFAULT_MAX_FRAME;

/// Default time to wait for any response (and for connect + handshake).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Default capacity of the delivery queue between the reader task and
/// [`Deliveries`](crate::Deliveries).
pub const DEFAULT_DELIVERY_BUFFER: usize = 1024;

/// How to reach and log in to a swiftlet server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server's TCP listener.
    pub addr: String,
    /// An HS256 JWT (or, against a `--dev-auth` server, the bare user id).
    pub token: String,
    /// This device's id; keep it stable across reconnects, since the server
    /// keeps one delivery cursor per device.
    pub device_id: String,
    /// Largest frame accepted from the server, in bytes.
    pub max_frame: usize,
    /// Ping period. `None`: a third of `Welcome.idle_timeout_ms`, or no
    /// heartbeat if the server announces no idle timeout.
    pub heartbeat: Option<Duration>,
    /// How long a request (and connect + handshake) may take.
    pub request_timeout: Duration,
    /// Capacity of the delivery queue. When it is full the reader task stops
    /// reading the socket, so the server sees a slow consumer and falls back
    /// to cursor sync, instead of this process buffering without bound.
    /// Responses queue behind deliveries, so drain [`Deliveries`] (or drop
    /// it, which discards events) or requests will time out.
    ///
    /// [`Deliveries`]: crate::Deliveries
    pub delivery_buffer: usize,
    /// Speak TLS to the server, trusting what this connector trusts (the
    /// server runs with `--tls-cert`). `None`: plain TCP.
    pub tls: Option<crate::tls::TlsConnector>,
    /// Ask the server not to push this connection's own messages back to it
    /// (`Hello.skip_own_sends`, protocol section 7, "Own sends"): each
    /// `Ack` then carries the message's seq in the sender's inbox instead
    /// ([`Ack::seq`](swiftlet_protocol::pb::Ack)). Off by default: a
    /// client that shows its sends from the inbox wants them pushed.
    pub skip_own_sends: bool,
}

impl ClientConfig {
    /// The same, over TLS through `tls`.
    pub fn with_tls(mut self, tls: crate::tls::TlsConnector) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A config with the default limits and timeouts.
    pub fn new(
        addr: impl Into<String>,
        token: impl Into<String>,
        device_id: impl Into<String>,
    ) -> Self {
        ClientConfig {
            addr: addr.into(),
            token: token.into(),
            device_id: device_id.into(),
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            delivery_buffer: DEFAULT_DELIVERY_BUFFER,
            tls: None,
            skip_own_sends: false,
        }
    }
}
