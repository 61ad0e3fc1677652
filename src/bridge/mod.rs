//! Browsers and socket-less clients: WebSocket and HTTP on the shards.
//!
//! The HTTP listener is served by the same shards as the TCP protocol (each
//! shard has a second `SO_REUSEPORT` listener), so a browser tab is just
//! another connection in a shard's slab, running the same session code with
//! a different framing: after the `GET /ws` upgrade, each binary WebSocket
//! message carries one `Envelope`. This keeps one session implementation and
//! one set of guarantees, and keeps an idle WebSocket as cheap as an idle
//! TCP connection (no task, no per-connection buffers).
//!
//! Plain HTTP requests are answered on the connection and closed:
//! `/v1/sync` (with a long-poll form that parks the connection in the
//! registry like a device until an event arrives or the wait ends),
//! `/v1/messages`, `/healthz`, `/metrics`, and the embedded web page.
//!
//! - [`ws`]: WebSocket framing and handshake key.
//! - [`http`]: request parsing, routing, responses, JSON.
//! - [`web`]: the embedded page and its scripts.
//!
//! `/metrics` renders [`crate::metrics`], which the shards and the commit
//! pipeline record into as well.

pub mod http;
pub mod web;
pub mod ws;
