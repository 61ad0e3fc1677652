//! The protocol as one connection lives it, without I/O: state machines the
//! shard drives with decoded frames, pushes, store pages and ticks, and
//! whose answers it carries out. Nothing here touches a socket or a thread,
//! and time is read only from the node's [`Clock`](crate::clock::Clock) or
//! given as a tick, so tests drive it deterministically.
//!
//! - [`delivery`]: where a connection stands in its user's inbox
//!   (exactly-once, in-order delivery of pushes and store pages, and
//!   acknowledgements).
//! - [`unacked`]: what each connection was sent and has not acknowledged
//!   (the delivered receipts an acknowledgement implies).
//! - [`requests`]: what each client frame does.
//! - [`services`]: what the protocol code may ask of its node (the
//!   [`NodeServices`](services::NodeServices) trait) and the node's real
//!   implementation; tests use a scripted one (`scripted.rs`, with the
//!   property tests of request handling in `request_props.rs`).
//! - [`state`]: a connection's protocol state as a view of the shard's
//!   slab slot, and where answers go.
//! - [`bucket`]: the token bucket that limits a connection's typing and
//!   presence requests.

pub mod bucket;
pub mod delivery;
pub mod requests;
pub mod services;
pub mod state;
pub mod unacked;

#[cfg(test)]
mod request_props;
#[cfg(test)]
mod scripted;
