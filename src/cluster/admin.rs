//! The operator's commands on a cluster (`swiftlet cluster ...`): they talk
//! to Redis only, never to a node, so they work while nodes are down.

use std::collections::BTreeMap;
use std::time::Duration;

use super::redis::{Link, LinkError};
use super::PARTITIONS;

/// Why a cluster command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the cluster is already initialized (map version {0}); use `cluster move-partition` to change it")]
    AlreadyInitialized(u64),
    #[error("give at least one node id")]
    NoNodes,
    #[error("partition {0} does not exist (there are {PARTITIONS})")]
    NoSuchPartition(u16),
    #[error("partition {0} has no home yet: run `cluster init`")]
    NoHome(u16),
    #[error("node {0} does not hold its lease (is it running?)")]
    NodeDown(u16),
    #[error("partition {0}'s home, node {1}, is down: a move needs it running (`--force` gives the partition away without its rows)")]
    HomeDown(u16, u16),
    #[error("a move of partition {0} is already under way")]
    MoveUnderway(u16),
    #[error("moving partition {0} failed: {1}")]
    MoveFailed(u16, String),
    #[error(
        "partition {0} has not moved after {1:?}; the move may still finish (see `cluster status`)"
    )]
    MoveTimeout(u16, Duration),
}

fn link(url: &str) -> Result<Link, AdminError> {
    Ok(Link::new(url, Duration::from_secs(2))?)
}

/// Give every partition a home among `nodes` (round robin, epoch 1).
/// Refused when the cluster already has a map.
pub fn init(url: &str, nodes: &[u16]) -> Result<u64, AdminError> {
    if nodes.is_empty() {
        return Err(AdminError::NoNodes);
    }
    let mut l = link(url)?;
    if let Some(v) = l.map_version()? {
        return Err(AdminError::AlreadyInitialized(v));
    }
    let homes: Vec<(u16, u16, u64)> = (0..PARTITIONS)
        .map(|p| (p, nodes[usize::from(p) % nodes.len()], 1))
        .collect();
    Ok(l.restore(&homes)?)
}

/// One node as `cluster status` shows it.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    pub addrs: String,
    pub alive: bool,
    pub partitions: usize,
    /// Hand-off entries waiting in its Redis stream.
    pub stream_len: u64,
    /// Its outbox entries not yet applied, per destination.
    pub backlog: Vec<(u16, u64)>,
}

/// The whole cluster as Redis sees it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub map_version: Option<u64>,
    pub unassigned: usize,
    pub nodes: BTreeMap<u16, NodeStatus>,
}

pub fn status(url: &str) -> Result<Status, AdminError> {
    let mut l = link(url)?;
    let mut st = Status {
        map_version: l.map_version()?,
        ..Status::default()
    };
    for (n, addrs, alive) in l.nodes()? {
        st.nodes.insert(
            n,
            NodeStatus {
                addrs,
                alive,
                ..NodeStatus::default()
            },
        );
    }
    let map = l.read_map()?;
    st.unassigned = usize::from(PARTITIONS).saturating_sub(map.len());
    for (_, node, _) in map {
        st.nodes.entry(node).or_default().partitions += 1;
    }
    for (n, ns) in st.nodes.iter_mut() {
        ns.stream_len = l.stream_len(*n)?;
        ns.backlog = l.backlog(*n)?;
    }
    Ok(st)
}

/// Move partition `p` to node `to` with its rows, under traffic (see
/// `super::mover`): ask, then wait up to `wait` for the map to say so.
/// Both nodes must be running. Returns the new epoch.
pub fn move_partition(url: &str, p: u16, to: u16, wait: Duration) -> Result<u64, AdminError> {
    if p >= PARTITIONS {
        return Err(AdminError::NoSuchPartition(p));
    }
    let mut l = link(url)?;
    let (node, epoch) = l.home_of(p)?.ok_or(AdminError::NoHome(p))?;
    if node == to {
        return Ok(epoch);
    }
    let alive: BTreeMap<u16, bool> = l.nodes()?.into_iter().map(|(n, _, a)| (n, a)).collect();
    if !alive.get(&to).copied().unwrap_or(false) {
        return Err(AdminError::NodeDown(to));
    }
    if !alive.get(&node).copied().unwrap_or(false) {
        return Err(AdminError::HomeDown(p, node));
    }
    if !l.request_move(p, to)? {
        return Err(AdminError::MoveUnderway(p));
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some((n, e)) = l.home_of(p)? {
            if n == to && e > epoch {
                return Ok(e);
            }
        }
        if let Some(why) = l.move_failure(p)? {
            return Err(AdminError::MoveFailed(p, why));
        }
        if std::time::Instant::now() > deadline {
            return Err(AdminError::MoveTimeout(p, wait));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Give partition `p` to node `to` although its home is down (its lease
/// has expired): what only the old home's disk held is lost to the
/// partition's users, who start over on `to`. For disaster recovery only.
pub fn force_move(url: &str, p: u16, to: u16) -> Result<u64, AdminError> {
    if p >= PARTITIONS {
        return Err(AdminError::NoSuchPartition(p));
    }
    let mut l = link(url)?;
    let (node, epoch) = l
        .read_map()?
        .into_iter()
        .find(|(q, _, _)| *q == p)
        .map(|(_, n, e)| (n, e))
        .ok_or(AdminError::NoHome(p))?;
    Ok(l.move_partition(p, (node, epoch), to, true)?)
}
