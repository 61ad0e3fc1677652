//! Sending that survives disconnects, restarts and `kill -9`.
//!
//! [`ReliableSender`] keeps one connection, and when a send fails in a way a
//! retry can fix ([`ClientError::is_retryable`]) it waits (jittered
//! exponential [`Backoff`]), reconnects if the failure calls for it, and
//! resends with the **same** `client_msg_id`, until an Ack arrives or the
//! deadline passes. Correctness rests on the server's promise that a retry
//! of a `client_msg_id` is stored once and answered with the same Ack: a
//! send whose Ack was lost with the connection is indistinguishable, to us,
//! from one that never arrived, and the same id makes both safe to repeat.
//!
//! Deliveries pushed to the sender's connections are discarded: this type
//! only sends. Use a separate device id if it shares a user with a reader.

use std::time::Duration;

use bytes::Bytes;
use swiftlet_protocol::{pb, ErrorCode};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::client::{new_client_msg_id, Client};
use crate::config::ClientConfig;
use crate::error::ClientError;

/// `UNAVAILABLE` answers in a row after which a send reconnects before its
/// next attempt (the first may be a moment of a partition's move; one that
/// persists means the user's writes belong to another node now).
const UNAVAILABLE_BEFORE_RECONNECT: u32 = 2;

/// How hard [`ReliableSender`] tries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First backoff delay; doubles per failed attempt.
    pub initial_backoff: Duration,
    /// Cap on the backoff delay.
    pub max_backoff: Duration,
    /// Total time one send may take, all attempts included.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// 100 ms doubling to 5 s, for at most 60 s.
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
}

/// A sender that reconnects and retries with the same `client_msg_id`.
#[derive(Debug)]
pub struct ReliableSender {
    cfg: ClientConfig,
    policy: RetryPolicy,
    client: Option<Client>,
    connects: u64,
}

impl ReliableSender {
    /// Connects lazily, on the first send.
    pub fn new(cfg: ClientConfig, policy: RetryPolicy) -> Self {
        ReliableSender {
            cfg,
            policy,
            client: None,
            connects: 0,
        }
    }

    /// The current connection, if one is up.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// How many connections were established so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Send with a fresh random `client_msg_id`.
    pub async fn send(
        &mut self,
        to_user: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        self.send_with_id(&new_client_msg_id(), to_user, content_type, body)
            .await
    }

    /// Send until acknowledged or the policy's deadline passes. A
    /// non-retryable error (e.g. INVALID_RECIPIENT, AUTH_FAILED) is returned
    /// at once; running out of time is [`ClientError::GaveUp`] with the last
    /// attempt's error.
    pub async fn send_with_id(
        &mut self,
        client_msg_id: &str,
        to_user: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<pb::Ack, ClientError> {
        let body = body.into();
        let deadline = Instant::now() + self.policy.deadline;
        let mut backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        let mut attempts = 0u32;
        // UNAVAILABLE answers in a row: once it persists, the node may have
        // lost the user's partition, so the next attempt reconnects
        // (protocol section 10).
        let mut unavailable = 0u32;
        loop {
            attempts += 1;
            let attempt = self.attempt(client_msg_id, to_user, content_type, body.clone());
            let err = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(ack)) => return Ok(ack),
                Ok(Err(e)) => e,
                Err(_) => ClientError::Timeout,
            };
            if !err.is_retryable() {
                return Err(err);
            }
            if err.code() == Some(ErrorCode::Unavailable as i32) {
                unavailable += 1;
            } else {
                unavailable = 0;
            }
            if err.needs_reconnect() || unavailable >= UNAVAILABLE_BEFORE_RECONNECT {
                self.client = None;
                unavailable = 0;
            }
            let wait = backoff.next_delay();
            if Instant::now() + wait >= deadline {
                return Err(ClientError::GaveUp {
                    attempts,
                    last: Box::new(err),
                });
            }
            tracing::debug!(client_msg_id, attempts, error = %err, ?wait, "send failed, retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &mut self,
        client_msg_id: &str,
        to_user: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<pb::Ack, ClientError> {
        if self.client.as_ref().is_some_and(|c| c.closed().is_some()) {
            self.client = None;
        }
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                // Deliveries dropped: this connection only sends.
                let (c, _deliveries) = Client::connect(self.cfg.clone()).await?;
                self.connects += 1;
                // A cluster redirected us home: reconnect there directly.
                self.cfg.addr = c.addr().to_owned();
                self.client = Some(c.clone());
                c
            }
        };
        client
            .send_with_id(client_msg_id, to_user, content_type, body)
            .await
    }

    /// Close the current connection, if any.
    pub async fn close(&mut self) {
        if let Some(c) = self.client.take() {
            c.close().await;
        }
    }
}

/// One reliable send on a connection of its own (see [`ReliableSender`]).
pub async fn send_reliably(
    cfg: &ClientConfig,
    policy: &RetryPolicy,
    client_msg_id: &str,
    to_user: &str,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Result<pb::Ack, ClientError> {
    let mut sender = ReliableSender::new(cfg.clone(), policy.clone());
    let result = sender
        .send_with_id(client_msg_id, to_user, content_type, body)
        .await;
    sender.close().await;
    result
}
