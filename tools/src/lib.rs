//! swiftlet's Rust client library: connect and log in, send with
//! idempotent retries, receive pushed events, page through the inbox by
//! cursor. The CLI (`swiftlet-cli`), loadgen and the server's end-to-end
//! tests all talk to the server through this crate, so it is the reference
//! client for `protocol/README.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), swiftlet_client::ClientError> {
//! use swiftlet_client::{Client, ClientConfig, DeliveryItem};
//! let cfg = ClientConfig::new("127.0.0.1:7400", "alice", "laptop");
//! let (client, mut deliveries) = Client::connect(cfg).await?;
//! let ack = client.send("bob", "text/plain", "hi").await?;
//! println!("stored as {}", ack.server_msg_id);
//! while let Some(DeliveryItem::Event(ev)) = deliveries.next().await {
//!     client.ack_delivery(ev.seq).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`client`]: one connection: handshake, the reader / writer / heartbeat
//!   tasks, request routing by `request_id`, [`Deliveries`].
//! - [`reliable`]: [`ReliableSender`] and [`send_reliably`]: reconnect with
//!   backoff and resend under the same `client_msg_id` until acknowledged.
//! - [`cursor`]: [`CursorTracker`], the client-side check of exactly-once,
//!   in-order delivery, and the value to acknowledge; it starts over when
//!   the server's inbox epoch changes.
//! - [`backoff`]: jittered exponential backoff for reconnect loops.
//! - [`config`]: [`ClientConfig`] and its defaults.
//! - [`tls`]: [`TlsConnector`], the TLS set-up the CLI and loadgen share
//!   (`--tls`, `--ca FILE`), and [`MaybeTls`], a plain or TLS stream.
//! - [`error`]: [`ClientError`], [`CloseReason`], and which errors to retry.
//!
//! The protocol crate is re-exported ([`pb`], [`Envelope`], [`Body`],
//! [`ErrorCode`], [`token`], ...) so users need only this one.

pub mod backoff;
pub mod client;
pub mod config;
pub mod cursor;
pub mod error;
pub mod features;
pub mod reliable;
pub mod tls;

pub use backoff::Backoff;
pub use client::{new_client_msg_id, Client, Deliveries, DeliveryItem, Gap};
pub use config::{ClientConfig, DEFAULT_DELIVERY_BUFFER, DEFAULT_REQUEST_TIMEOUT};
pub use cursor::{CursorTracker, Observed};
pub use error::{code_name, ClientError, CloseReason};
pub use features::{with_group, with_user};
pub use reliable::{send_reliably, ReliableSender, RetryPolicy};
pub use tls::{MaybeTls, TlsArgs, TlsConnector, TlsError};

pub use swiftlet_protocol::{
    codec, pb, token, Body, Envelope, ErrorCode, FrameCodec, FrameError, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};
