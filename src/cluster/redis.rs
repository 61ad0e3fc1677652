//! The cluster's link to Redis, and the only module that imports the Redis
//! client (as only [`crate::store`] imports RocksDB).
//!
//! Every call has a deadline (the connection's read and write timeouts), so
//! a stalled or absent Redis costs the calling thread at most that long;
//! the callers are the cluster's own threads (`coordinator`, `shipper`,
//! `applier`), never a shard. A failed call drops the connection, and the
//! next call opens a fresh one: nothing here retries by itself, the callers
//! decide when to try again.
//!
//! What lives in Redis (everything can be rebuilt from the nodes' RocksDB,
//! see `coordinator`):
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `swiftlet:map` | hash | partition → `node:epoch`, the home of each partition |
//! | `swiftlet:map:version` | string | bumped on every change of the map |
//! | `swiftlet:nodes` | hash | node → `tcp_addr,http_addr` (advertised) |
//! | `swiftlet:lease:N` | string, PX | present while node N renews its lease |
//! | `swiftlet:in:N` | stream, group `apply` | hand-off entries bound for node N |
//! | `swiftlet:mark:N` | hash | dest → highest entry from N that dest applied |
//! | `swiftlet:backlog:N` | hash, EX | dest → N's outbox entries not yet applied there (for `cluster status`) |
//! | `swiftlet:online:N` | set | users with a device on node N (presence for other nodes) |
//! | `swiftlet:eph:N` | pub/sub | typing notices for node N's users (may be lost) |
//! | `swiftlet:presence` | pub/sub | presence changes, to every node (may be lost) |

use std::time::Duration;

use bytes::Bytes;
use redis::{Cmd, Connection, FromRedisValue, Script, Value};

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// The ownership map has never been written (`swiftlet cluster init`).
    #[error("the cluster has not been initialized")]
    NotInitialized,
}

impl LinkError {
    /// The stream or its consumer group is gone (Redis lost its data).
    pub fn is_no_group(&self) -> bool {
        matches!(self, LinkError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

pub const MAP: &str = "swiftlet:map";
pub const MAP_VERSION: &str = "swiftlet:map:version";
pub const NODES: &str = "swiftlet:nodes";
const GROUP: &str = "apply";
const CONSUMER: &str = "applier";

/// Partition moves asked for: partition → destination node.
pub const MOVES: &str = "swiftlet:moves";
/// Destinations ready for a move: partition → destination node.
pub const MOVES_READY: &str = "swiftlet:moves:ready";
/// Moves that gave up: partition → why.
pub const MOVES_FAILED: &str = "swiftlet:moves:failed";

pub fn lease_key(node: u16) -> String {
    format!("swiftlet:lease:{node}")
}

pub fn stream_key(node: u16) -> String {
    format!("swiftlet:in:{node}")
}

pub fn marks_key(src: u16) -> String {
    format!("swiftlet:mark:{src}")
}

pub fn online_key(node: u16) -> String {
    format!("swiftlet:online:{node}")
}

pub fn notice_channel(node: u16) -> String {
    format!("swiftlet:eph:{node}")
}

pub const PRESENCE_CHANNEL: &str = "swiftlet:presence";

pub fn backlog_key(src: u16) -> String {
    format!("swiftlet:backlog:{src}")
}

/// Set each listed partition's home unless Redis holds a newer epoch for
/// it: `ARGV = p1, node1, epoch1, p2, ...`. Returns how many changed, and
/// bumps the version if any did. Used to restore the map after Redis lost
/// it, from what each node recorded, and by `cluster init` (epoch 1).
const RESTORE: &str = r#"
local changed = 0
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local epoch = tonumber(ARGV[i + 2])
  local older = true
  if cur then
    local e = tonumber(string.match(cur, ':(%d+)$'))
    older = e == nil or e < epoch
  end
  if older then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ':' .. ARGV[i + 2])
    changed = changed + 1
  end
end
if changed > 0 then redis.call('INCR', KEYS[2]) end
return changed
"#;

/// Move one partition: `ARGV = partition, expected "node:epoch", new node,
/// force`. Only if the map still says `expected` (compare-and-set); the new
/// epoch is the old one plus one. Without `force` the old home must be the
/// caller's concern (a cooperative move); with it, the old home's lease
/// (KEYS[3]) must have expired. Returns the new `node:epoch`, or an error
/// naming what is there now.
const MOVE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur ~= ARGV[2] then
  return redis.error_reply('CHANGED ' .. tostring(cur))
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  return redis.error_reply('ALIVE the old home still holds its lease')
end
local e = tonumber(string.match(cur, ':(%d+)$')) + 1
local v = ARGV[3] .. ':' .. e
redis.call('HSET', KEYS[1], ARGV[1], v)
redis.call('INCR', KEYS[2])
return v
"#;

/// One connection to Redis, opened on demand, with a deadline on every call.
pub struct Link {
    client: redis::Client,
    conn: Option<Connection>,
    deadline: Duration,
}

impl Link {
    /// A link to `url` (`redis://host:port[/db]`); connects on first use.
    pub fn new(url: &str, deadline: Duration) -> Result<Link, LinkError> {
        Ok(Link {
            client: redis::Client::open(url)?,
            conn: None,
            deadline,
        })
    }

    fn conn(&mut self, read_extra: Duration) -> Result<&mut Connection, LinkError> {
        if self.conn.is_none() {
            let c = self.client.get_connection_with_timeout(self.deadline)?;
            c.set_write_timeout(Some(self.deadline))?;
            self.conn = Some(c);
        }
        let c = self
            .conn
            .as_mut()
            .ok_or(LinkError::Reply("no connection".into()))?;
        c.set_read_timeout(Some(self.deadline + read_extra))?;
        Ok(c)
    }

    /// Run `f` on the connection; on any failure drop the connection so
    /// the next call starts afresh (a timed-out reply would otherwise be
    /// read as the answer to the next command).
    fn with<T>(
        &mut self,
        read_extra: Duration,
        f: impl FnOnce(&mut Connection) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        let r = self.conn(read_extra).and_then(f);
        if let Err(e) = &r {
            if !matches!(e, LinkError::NotInitialized) && !e.is_no_group() {
                self.conn = None;
            }
        }
        r
    }

    fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, LinkError> {
        self.with(Duration::ZERO, |c| Ok(cmd.query(c)?))
    }

    /// Whether Redis answers.
    pub fn ping(&mut self) -> Result<(), LinkError> {
        self.query::<String>(&redis::cmd("PING")).map(|_| ())
    }

    /// Hold (or renew) node `node`'s lease for `lease`, and advertise its
    /// addresses.
    pub fn renew(&mut self, node: u16, addrs: &str, lease: Duration) -> Result<(), LinkError> {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(lease_key(node))
            .arg(addrs)
            .arg("PX")
            .arg(lease.as_millis() as u64)
            .ignore()
            .cmd("HSET")
            .arg(NODES)
            .arg(node)
            .arg(addrs)
            .ignore();
        self.with(Duration::ZERO, |c| Ok(p.query::<()>(c)?))
    }

    /// The map's version, or None when Redis holds no map.
    pub fn map_version(&mut self) -> Result<Option<u64>, LinkError> {
        self.query(redis::cmd("GET").arg(MAP_VERSION))
    }

    /// Every partition's home as Redis holds it: (partition, node, epoch).
    pub fn read_map(&mut self) -> Result<Vec<(u16, u16, u64)>, LinkError> {
        let raw: Vec<(String, String)> = self.query(redis::cmd("HGETALL").arg(MAP))?;
        raw.iter()
            .map(|(p, v)| {
                let bad = || LinkError::Reply(format!("map entry {p} = {v}"));
                let (node, epoch) = v.split_once(':').ok_or_else(bad)?;
                Ok((
                    p.parse().map_err(|_| bad())?,
                    node.parse().map_err(|_| bad())?,
                    epoch.parse().map_err(|_| bad())?,
                ))
            })
            .collect()
    }

    /// One partition's home as Redis holds it: (node, epoch).
    pub fn home_of(&mut self, p: u16) -> Result<Option<(u16, u64)>, LinkError> {
        let v: Option<String> = self.query(redis::cmd("HGET").arg(MAP).arg(p))?;
        let Some(v) = v else { return Ok(None) };
        let bad = || LinkError::Reply(format!("map entry {p} = {v}"));
        let (node, epoch) = v.split_once(':').ok_or_else(bad)?;
        Ok(Some((
            node.parse().map_err(|_| bad())?,
            epoch.parse().map_err(|_| bad())?,
        )))
    }

    /// Write homes unless Redis holds newer epochs (see [`RESTORE`]).
    pub fn restore(&mut self, homes: &[(u16, u16, u64)]) -> Result<u64, LinkError> {
        let script = Script::new(RESTORE);
        let mut total = 0;
        for chunk in homes.chunks(1024) {
            let mut inv = script.key(MAP);
            inv.key(MAP_VERSION);
            for (p, node, epoch) in chunk {
                inv.arg(p).arg(node).arg(epoch);
            }
            let n: u64 = self.with(Duration::ZERO, |c| Ok(inv.invoke(c)?))?;
            total += n;
        }
        Ok(total)
    }

    /// Compare-and-set one partition's home (see [`MOVE`]); returns the new
    /// epoch.
    pub fn move_partition(
        &mut self,
        partition: u16,
        from: (u16, u64),
        to: u16,
        force: bool,
    ) -> Result<u64, LinkError> {
        let script = Script::new(MOVE);
        let mut inv = script.key(MAP);
        inv.key(MAP_VERSION)
            .key(lease_key(from.0))
            .arg(partition)
            .arg(format!("{}:{}", from.0, from.1))
            .arg(to)
            .arg(if force { "1" } else { "0" });
        let v: String = self.with(Duration::ZERO, |c| Ok(inv.invoke(c)?))?;
        v.split_once(':')
            .and_then(|(_, e)| e.parse().ok())
            .ok_or(LinkError::Reply(v))
    }

    /// Ask for partition `p` to move to node `to` (see `super::mover`);
    /// false if a move of it is already asked for.
    pub fn request_move(&mut self, p: u16, to: u16) -> Result<bool, LinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(MOVES_FAILED).arg(p).ignore();
        pipe.cmd("HDEL").arg(MOVES_READY).arg(p).ignore();
        pipe.cmd("HSETNX").arg(MOVES).arg(p).arg(to);
        let (set,): (bool,) = self.with(Duration::ZERO, |c| Ok(pipe.query(c)?))?;
        Ok(set)
    }

    /// The moves asked for: (partition, destination, destination ready).
    pub fn moves(&mut self) -> Result<Vec<(u16, u16, bool)>, LinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(MOVES)
            .cmd("HGETALL")
            .arg(MOVES_READY);
        type Pairs = Vec<(u16, u16)>;
        let (asked, ready): (Pairs, Pairs) = self.with(Duration::ZERO, |c| Ok(pipe.query(c)?))?;
        Ok(asked
            .into_iter()
            .map(|(p, to)| (p, to, ready.contains(&(p, to))))
            .collect())
    }

    /// The destination of a move of `p` is ready for its copy.
    pub fn move_ready(&mut self, p: u16, me: u16) -> Result<(), LinkError> {
        self.query::<()>(redis::cmd("HSET").arg(MOVES_READY).arg(p).arg(me))
    }

    /// The move of `p` is done: forget the request.
    pub fn move_done(&mut self, p: u16) -> Result<(), LinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(MOVES).arg(p).ignore();
        pipe.cmd("HDEL").arg(MOVES_READY).arg(p).ignore();
        self.with(Duration::ZERO, |c| Ok(pipe.query::<()>(c)?))
    }

    /// The move of `p` gave up, for `why`.
    pub fn move_failed(&mut self, p: u16, why: &str) -> Result<(), LinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(MOVES_FAILED).arg(p).arg(why).ignore();
        pipe.cmd("HDEL").arg(MOVES).arg(p).ignore();
        pipe.cmd("HDEL").arg(MOVES_READY).arg(p).ignore();
        self.with(Duration::ZERO, |c| Ok(pipe.query::<()>(c)?))
    }

    /// Why the last move of `p` gave up, if it did.
    pub fn move_failure(&mut self, p: u16) -> Result<Option<String>, LinkError> {
        self.query(redis::cmd("HGET").arg(MOVES_FAILED).arg(p))
    }

    /// Every advertised node with whether it holds its lease now.
    pub fn nodes(&mut self) -> Result<Vec<(u16, String, bool)>, LinkError> {
        let nodes: Vec<(u16, String)> = self.query(redis::cmd("HGETALL").arg(NODES))?;
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for (n, _) in &nodes {
            mget.arg(lease_key(*n));
        }
        let leases: Vec<Option<String>> = self.query(&mget)?;
        Ok(nodes
            .into_iter()
            .zip(leases)
            .map(|((n, addrs), lease)| (n, addrs, lease.is_some()))
            .collect())
    }

    /// Append one hand-off entry to `dest`'s stream: `entries` are outbox
    /// entries `first, first + 1, ...` from node `src`, each
    /// length-delimited in `data`.
    pub fn ship(&mut self, dest: u16, src: u16, first: u64, data: &[u8]) -> Result<(), LinkError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream_key(dest))
            .arg("*")
            .arg("src")
            .arg(src)
            .arg("first")
            .arg(first)
            .arg("data")
            .arg(data);
        self.query::<String>(&cmd).map(|_| ())
    }

    /// Create `node`'s stream and its consumer group if missing (after a
    /// first start, or after Redis lost them).
    pub fn ensure_group(&mut self, node: u16) -> Result<(), LinkError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(stream_key(node))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.query::<String>(&cmd) {
            Ok(_) => Ok(()),
            Err(LinkError::Redis(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Read up to `count` entries of `node`'s stream: those delivered
    /// before and never acknowledged when `pending`, else new ones,
    /// waiting up to `block` for one.
    pub fn read_stream(
        &mut self,
        node: u16,
        pending: bool,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, LinkError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(CONSUMER)
            .arg("COUNT")
            .arg(count);
        if !pending {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(stream_key(node))
            .arg(if pending { "0" } else { ">" });
        let v: Value = self.with(block, |c| Ok(cmd.query(c)?))?;
        parse_read(v)
    }

    /// Acknowledge and delete applied stream entries.
    pub fn ack(&mut self, node: u16, ids: &[String]) -> Result<(), LinkError> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = stream_key(node);
        let mut p = redis::pipe();
        p.cmd("XACK").arg(&key).arg(GROUP).arg(ids).ignore();
        p.cmd("XDEL").arg(&key).arg(ids).ignore();
        self.with(Duration::ZERO, |c| Ok(p.query::<()>(c)?))
    }

    /// Tell node `src` that `me` applied its entries up to `mark`.
    pub fn report_marks(&mut self, me: u16, marks: &[(u16, u64)]) -> Result<(), LinkError> {
        if marks.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for (src, mark) in marks {
            p.cmd("HSET")
                .arg(marks_key(*src))
                .arg(me)
                .arg(mark)
                .ignore();
        }
        self.with(Duration::ZERO, |c| Ok(p.query::<()>(c)?))
    }

    /// What each destination reported applying from `me`.
    pub fn marks(&mut self, me: u16) -> Result<Vec<(u16, u64)>, LinkError> {
        self.query(redis::cmd("HGETALL").arg(marks_key(me)))
    }

    /// Publish this node's outbox backlog per destination (expires, so a
    /// dead node's figures do not linger as if current).
    pub fn report_backlog(&mut self, me: u16, backlog: &[(u16, u64)]) -> Result<(), LinkError> {
        let key = backlog_key(me);
        let mut p = redis::pipe();
        p.cmd("DEL").arg(&key).ignore();
        for (dest, n) in backlog {
            p.cmd("HSET").arg(&key).arg(dest).arg(n).ignore();
        }
        p.cmd("EXPIRE").arg(&key).arg(30).ignore();
        self.with(Duration::ZERO, |c| Ok(p.query::<()>(c)?))
    }

    /// What node `src` last published as its backlog per destination.
    pub fn backlog(&mut self, src: u16) -> Result<Vec<(u16, u64)>, LinkError> {
        self.query(redis::cmd("HGETALL").arg(backlog_key(src)))
    }

    /// Publish `payload` on `channel` (fire and forget: a subscriber that
    /// is away loses it).
    pub fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), LinkError> {
        self.query::<u64>(redis::cmd("PUBLISH").arg(channel).arg(payload))
            .map(|_| ())
    }

    /// Add and remove users of node `node`'s online set; with `replace`,
    /// the set becomes exactly `add`.
    pub fn update_online(
        &mut self,
        node: u16,
        add: &[String],
        remove: &[String],
        replace: bool,
    ) -> Result<(), LinkError> {
        let key = online_key(node);
        let mut p = redis::pipe();
        p.atomic();
        if replace {
            p.cmd("DEL").arg(&key).ignore();
        }
        for chunk in add.chunks(1000) {
            p.cmd("SADD").arg(&key).arg(chunk).ignore();
        }
        for chunk in remove.chunks(1000) {
            p.cmd("SREM").arg(&key).arg(chunk).ignore();
        }
        self.with(Duration::ZERO, |c| Ok(p.query::<()>(c)?))
    }

    /// The users with a device on node `node`.
    pub fn online(&mut self, node: u16) -> Result<Vec<String>, LinkError> {
        self.query(redis::cmd("SMEMBERS").arg(online_key(node)))
    }

    /// Subscribe to `channels` and hand each message to `on_message`
    /// until `stop` is set (Ok) or the connection fails (Err). `on_subscribed`
    /// runs once the subscription holds: what was published before is
    /// lost, so that is when to read state afresh. `on_idle` runs whenever
    /// nothing arrived for a deadline.
    pub fn subscribe(
        &mut self,
        channels: &[String],
        stop: &std::sync::atomic::AtomicBool,
        mut on_subscribed: impl FnMut(),
        mut on_message: impl FnMut(&str, &[u8]),
        mut on_idle: impl FnMut(),
    ) -> Result<(), LinkError> {
        self.conn = None;
        let mut conn = self.client.get_connection_with_timeout(self.deadline)?;
        conn.set_write_timeout(Some(self.deadline))?;
        let mut ps = conn.as_pubsub();
        ps.set_read_timeout(Some(self.deadline))?;
        ps.subscribe(channels)?;
        on_subscribed();
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            match ps.get_message() {
                Ok(msg) => on_message(msg.get_channel_name(), msg.get_payload_bytes()),
                Err(e) if e.is_timeout() => on_idle(),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Entries waiting in `node`'s stream (for `cluster status`).
    pub fn stream_len(&mut self, node: u16) -> Result<u64, LinkError> {
        self.query(redis::cmd("XLEN").arg(stream_key(node)))
    }

    /// Redis's `run_id`: a new one means Redis restarted (and may have
    /// lost anything).
    pub fn run_id(&mut self) -> Result<String, LinkError> {
        let info: String = self.query(redis::cmd("INFO").arg("server"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_owned())
            .ok_or_else(|| LinkError::Reply("INFO without run_id".into()))
    }
}

/// One entry of a node's stream.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: String,
    pub src: u16,
    pub first: u64,
    pub data: Bytes,
}

/// `[[stream, [[id, [field, value, ...]], ...]]]`, or nil on a timeout.
fn parse_read(v: Value) -> Result<Vec<StreamEntry>, LinkError> {
    let bad = |what: &str| LinkError::Reply(format!("XREADGROUP: {what}"));
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return Err(bad("not an array")),
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(mut pair) = s else {
            return Err(bad("stream not a pair"));
        };
        let Some(Value::Array(entries)) = pair.pop() else {
            return Err(bad("no entries"));
        };
        for e in entries {
            let Value::Array(mut parts) = e else {
                return Err(bad("entry not an array"));
            };
            let fields = parts.pop();
            let id = match parts.pop() {
                Some(Value::BulkString(b)) => String::from_utf8(b).map_err(|_| bad("id"))?,
                _ => return Err(bad("entry id")),
            };
            // A pending entry deleted meanwhile comes back with nil fields.
            let Some(Value::Array(fields)) = fields else {
                out.push(StreamEntry {
                    id,
                    src: 0,
                    first: 0,
                    data: Bytes::new(),
                });
                continue;
            };
            let (mut src, mut first, mut data) = (None, None, None);
            for kv in fields.chunks(2) {
                let [Value::BulkString(k), Value::BulkString(v)] = kv else {
                    return Err(bad("field"));
                };
                let num = || {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                };
                match k.as_slice() {
                    b"src" => src = num().and_then(|n| u16::try_from(n).ok()),
                    b"first" => first = num(),
                    b"data" => data = Some(Bytes::copy_from_slice(v)),
                    _ => {}
                }
            }
            match (src, first, data) {
                (Some(src), Some(first), Some(data)) => out.push(StreamEntry {
                    id,
                    src,
                    first,
                    data,
                }),
                _ => return Err(bad("missing src, first or data")),
            }
        }
    }
    Ok(out)
}
