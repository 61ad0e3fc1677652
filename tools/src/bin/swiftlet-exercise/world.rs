//! What the exercise knows to be true, shared by its tasks: the users and
//! their devices, the groups, the ledger of every send and its outcome, and
//! the error counts. The verifier ([`crate::verify`]) compares the
//! server's inboxes against this.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use swiftlet_client::{pb, ClientError};

use crate::device::Device;

/// Lock a std mutex, recovering from poisoning (a panicking task must not
/// hide the state the report needs).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a send goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    Group(u64),
}

/// What became of a send.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Not answered yet (still being retried).
    Pending,
    /// Acknowledged: the message is durable and must be in every intended
    /// inbox exactly once.
    Acked(pb::Ack),
    /// No Ack before the deadline, or a non-retryable error: the message
    /// must be either in every intended inbox exactly once or in none.
    Unresolved(String),
}

#[derive(Debug, Clone)]
pub struct SendRecord {
    pub target: Target,
    pub outcome: Outcome,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub id: u64,
    pub members: Vec<String>,
}

pub struct User {
    pub name: String,
    pub devices: Vec<Arc<Device>>,
    /// False once the user left for good (soak churn): no new traffic to or
    /// from them, but their inbox is still verified.
    pub active: bool,
}

#[derive(Default)]
pub struct World {
    pub users: Mutex<Vec<User>>,
    pub groups: Mutex<Vec<Group>>,
    /// By (sender, client_msg_id).
    pub ledger: Mutex<HashMap<(String, String), SendRecord>>,
    /// Client errors by kind (what the exercise saw, expected or not).
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Incremented just before every `kill -9`: a device compares it across
    /// a logout to know whether its cursor may have been lost.
    pub kills: AtomicU64,
    /// Sends started and not yet ended (acknowledged or given up).
    pub in_flight: AtomicU64,
    /// Sends skipped because the chosen device had its in-flight budget
    /// full or was offline (open loop: the rate is not held back).
    pub skipped: AtomicU64,
}

impl World {
    pub fn count_error(&self, what: &str, e: &ClientError) {
        *lock(&self.errors)
            .entry(format!("{what}: {}", kind(e)))
            .or_default() += 1;
    }

    pub fn count(&self, what: &str) {
        *lock(&self.errors).entry(what.to_owned()).or_default() += 1;
    }

    pub fn kills(&self) -> u64 {
        self.kills.load(Ordering::SeqCst)
    }

    /// Every device of every user (active or not).
    pub fn all_devices(&self) -> Vec<Arc<Device>> {
        lock(&self.users)
            .iter()
            .flat_map(|u| u.devices.iter().cloned())
            .collect()
    }

    /// The members of group `id`.
    pub fn members(&self, id: u64) -> Vec<String> {
        lock(&self.groups)
            .iter()
            .find(|g| g.id == id)
            .map(|g| g.members.clone())
            .unwrap_or_default()
    }

    /// Who must hold a message sent by `from` to `target`.
    pub fn recipients(&self, from: &str, target: &Target) -> Vec<String> {
        let mut users = match target {
            Target::User(to) => vec![from.to_owned(), to.clone()],
            Target::Group(id) => self.members(*id),
        };
        users.sort();
        users.dedup();
        users
    }

    /// Counts of the ledger by outcome: (acked, pending, unresolved).
    pub fn ledger_counts(&self) -> (u64, u64, u64) {
        lock(&self.ledger)
            .values()
            .fold((0, 0, 0), |(a, p, u), r| match r.outcome {
                Outcome::Acked(_) => (a + 1, p, u),
                Outcome::Pending => (a, p + 1, u),
                Outcome::Unresolved(_) => (a, p, u + 1),
            })
    }
}

/// A short name for an error's kind, for the error counts.
pub fn kind(e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => format!("io {:?}", io.kind()),
        ClientError::Frame(_) => "bad frame".into(),
        ClientError::Server { code, .. } => {
            format!("server {}", swiftlet_client::code_name(*code))
        }
        ClientError::Timeout => "timeout".into(),
        ClientError::Disconnected(reason) => match reason {
            swiftlet_client::CloseReason::Server { code, .. } => {
                format!("disconnected {}", swiftlet_client::code_name(*code))
            }
            swiftlet_client::CloseReason::Io(_) => "disconnected i/o".into(),
            other => format!("disconnected {other}"),
        },
        ClientError::Protocol(_) => "protocol".into(),
        ClientError::TooLarge { .. } => "too large".into(),
        ClientError::Tls(_) => "tls".into(),
        ClientError::GaveUp { .. } => "gave up".into(),
    }
}
