//! Results: what one process measured ([`WorkerResult`], also the wire
//! format from a worker process to its parent), how results of several
//! workers merge, and the final JSON summary printed on the last line of
//! stdout.
//!
//! Histograms cross the process boundary as HdrHistogram V2 blobs in
//! base64, so the parent's percentiles are exact over all workers, not an
//! average of percentiles.

use std::collections::BTreeMap;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::stats::new_hist;

/// `Histogram` as base64 of its V2 serialization.
mod hist_b64 {
    use super::*;

    pub fn encode(h: &Histogram<u64>) -> String {
        let mut buf = Vec::new();
        // Serializing into a Vec cannot fail for a valid histogram; an empty
        // blob decodes as an empty histogram.
        if V2Serializer::new().serialize(h, &mut buf).is_err() {
            buf.clear();
        }
        base64::engine::general_purpose::STANDARD.encode(buf)
    }

    pub fn decode(s: &str) -> Result<Histogram<u64>, String> {
        if s.is_empty() {
            return Ok(new_hist());
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| e.to_string())?;
        Deserializer::new()
            .deserialize(&mut raw.as_slice())
            .map_err(|e| format!("{e:?}"))
    }

    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(h))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }
}

/// Add `b` into `a`; a histogram that cannot take the values (never with
/// the shared bounds) is left as is.
pub fn merge_hist(a: &mut Histogram<u64>, b: &Histogram<u64>) {
    let _ = a.add(b);
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    #[serde(with = "hist_b64")]
    pub latency: Histogram<u64>,
}

/// Everything one process measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResult {
    pub connections: u64,
    pub open_at_ready: u64,
    pub logins: u64,
    /// storm: logins of the reconnect wave.
    pub relogins: u64,
    /// NOT_HOME redirects followed (logins made at a node not the user's home).
    #[serde(default)]
    pub redirects: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// group: deliveries owed (each acknowledged post × its online
    /// receivers); `None`: one per acknowledged message.
    #[serde(default)]
    pub expected: Option<u64>,
    pub echoes: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps: u64,
    pub errors: BTreeMap<String, u64>,
    /// Seconds of the measured phase (chat: sending after warm-up; offline:
    /// catch-up; idle/storm: the login phase).
    pub measured_s: f64,
    /// Deliveries counted within the measured phase.
    pub measured_delivered: u64,
    /// group: posts acknowledged within the measured phase.
    #[serde(default)]
    pub measured_posts: u64,
    /// Seconds the (first) login phase took.
    pub login_phase_s: f64,
    /// storm: seconds from the drop until every client logged in again.
    pub relogin_s: Option<f64>,
    /// storm, offline: seconds until every client caught up.
    pub catchup_s: Option<f64>,
    #[serde(with = "hist_b64")]
    pub latency: Histogram<u64>,
    #[serde(with = "hist_b64")]
    pub ack_latency: Histogram<u64>,
    #[serde(with = "hist_b64")]
    pub login_latency: Histogram<u64>,
    /// group: send → delivery to the post's last online member.
    #[serde(with = "hist_b64", default = "new_hist")]
    pub fanout: Histogram<u64>,
    pub timeline: Vec<Second>,
    /// This process's CPU time (user + system) in µs over its measured
    /// window: chat and group the sending phase after the warm-up, idle the
    /// hold; 0 where no window is measured (storm, offline).
    #[serde(default)]
    pub cpu_us: u64,
    /// This process's VmRSS before it opened any connection, and when every
    /// connection was logged in (at the barrier), in bytes.
    #[serde(default)]
    pub rss_before_bytes: u64,
    #[serde(default)]
    pub rss_ready_bytes: u64,
}

impl Default for WorkerResult {
    fn default() -> Self {
        WorkerResult {
            connections: 0,
            open_at_ready: 0,
            logins: 0,
            relogins: 0,
            redirects: 0,
            sent: 0,
            acked: 0,
            delivered: 0,
            expected: None,
            echoes: 0,
            duplicated: 0,
            reordered: 0,
            gaps: 0,
            errors: BTreeMap::new(),
            measured_s: 0.0,
            measured_delivered: 0,
            measured_posts: 0,
            login_phase_s: 0.0,
            relogin_s: None,
            catchup_s: None,
            latency: new_hist(),
            ack_latency: new_hist(),
            login_latency: new_hist(),
            fanout: new_hist(),
            timeline: Vec::new(),
            cpu_us: 0,
            rss_before_bytes: 0,
            rss_ready_bytes: 0,
        }
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl WorkerResult {
    /// Fold another worker's result into this one: counts add up, phase
    /// times take the slowest worker (they ran concurrently), histograms
    /// and timelines merge second by second.
    pub fn merge(&mut self, o: &WorkerResult) {
        self.connections += o.connections;
        self.open_at_ready += o.open_at_ready;
        self.logins += o.logins;
        self.relogins += o.relogins;
        self.redirects += o.redirects;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.expected = match (self.expected, o.expected) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.echoes += o.echoes;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.gaps += o.gaps;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.measured_s = self.measured_s.max(o.measured_s);
        self.measured_delivered += o.measured_delivered;
        self.measured_posts += o.measured_posts;
        self.login_phase_s = self.login_phase_s.max(o.login_phase_s);
        self.relogin_s = max_opt(self.relogin_s, o.relogin_s);
        self.catchup_s = max_opt(self.catchup_s, o.catchup_s);
        merge_hist(&mut self.latency, &o.latency);
        merge_hist(&mut self.ack_latency, &o.ack_latency);
        merge_hist(&mut self.login_latency, &o.login_latency);
        merge_hist(&mut self.fanout, &o.fanout);
        self.cpu_us += o.cpu_us;
        self.rss_before_bytes += o.rss_before_bytes;
        self.rss_ready_bytes += o.rss_ready_bytes;
        for (i, s) in o.timeline.iter().enumerate() {
            match self.timeline.get_mut(i) {
                Some(mine) => {
                    mine.sent += s.sent;
                    mine.acked += s.acked;
                    mine.delivered += s.delivered;
                    merge_hist(&mut mine.latency, &s.latency);
                }
                None => self.timeline.push(s.clone()),
            }
        }
    }

    /// Deliveries owed but never made (after the drain): one per
    /// acknowledged message, or (group) one per online receiver of each.
    pub fn lost(&self) -> u64 {
        self.expected
            .unwrap_or(self.acked)
            .saturating_sub(self.delivered)
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Percentiles of a µs histogram, in milliseconds; `null` when empty.
pub fn percentiles_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": ms(h.mean().round() as u64),
        "count": h.len(),
    })
}

/// The server's memory, measured by the process that owns `--server-pid`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerMemory {
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    pub sockstat_mem_before_bytes: Option<u64>,
    pub sockstat_mem_after_bytes: Option<u64>,
    pub slab_before_bytes: Option<u64>,
    pub slab_after_bytes: Option<u64>,
    /// The server's CPU time in µs over the measured window (the same window
    /// as [`WorkerResult::cpu_us`], timed by the process that watches it).
    pub cpu_us: Option<u64>,
}

fn per_conn(before: Option<u64>, after: Option<u64>, conns: u64) -> Value {
    match (before, after) {
        (Some(b), Some(a)) if conns > 0 => {
            json!(((a as f64 - b as f64) / conns as f64).round() as i64)
        }
        _ => Value::Null,
    }
}

/// `us` per message, 2 decimals; `null` without messages.
fn per_msg(us: Option<u64>, msgs: u64) -> Value {
    match us {
        Some(us) if msgs > 0 => json!((us as f64 / msgs as f64 * 100.0).round() / 100.0),
        _ => Value::Null,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn rate(n: u64, secs: f64) -> Value {
    if secs > 0.0 {
        json!((n as f64 / secs).round())
    } else {
        Value::Null
    }
}

/// Build the final summary object.
pub fn summary(scenario: &str, params: Value, r: &WorkerResult, mem: &ServerMemory) -> Value {
    let connected = r.open_at_ready;
    let timeline: Vec<Value> = r
        .timeline
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let q = |p: f64| {
                if s.latency.is_empty() {
                    Value::Null
                } else {
                    json!(s.latency.value_at_quantile(p) as f64 / 1000.0)
                }
            };
            json!({"t": i + 1, "sent": s.sent, "acked": s.acked, "delivered": s.delivered,
                   "p50_ms": q(0.5), "p99_ms": q(0.99)})
        })
        .collect();
    let logins_per_s = match r.relogin_s {
        Some(s) => rate(r.relogins, s),
        None => rate(r.logins, r.login_phase_s),
    };
    let mut out = json!({
        "scenario": scenario,
        "params": params,
        "connections": connected,
        "connections_target": r.connections,
        "logins": r.logins,
        "redirects": r.redirects,
        "sent": r.sent,
        "acked": r.acked,
        "delivered": r.delivered,
        "echoes": r.echoes,
        "lost": r.lost(),
        "duplicated": r.duplicated,
        "reordered": r.reordered,
        "gaps": r.gaps,
        "errors": r.errors,
        "errors_total": r.error_total(),
        "measured_s": round3(r.measured_s),
        "msgs_per_s": rate(r.measured_delivered, r.measured_s),
        "delivered_per_s": rate(r.measured_delivered, r.measured_s),
        "posts_per_s": if r.expected.is_some() { rate(r.measured_posts, r.measured_s) } else { Value::Null },
        "expected": r.expected,
        "fanout_ms": percentiles_ms(&r.fanout),
        "latency_ms": percentiles_ms(&r.latency),
        "ack_latency_ms": percentiles_ms(&r.ack_latency),
        "login_latency_ms": percentiles_ms(&r.login_latency),
        "login_phase_s": round3(r.login_phase_s),
        "initial_logins_per_s": rate(r.logins - r.relogins.min(r.logins), r.login_phase_s),
        "logins_per_s": logins_per_s,
        "relogin_s": r.relogin_s.map(round3),
        "catchup_s": r.catchup_s.map(round3),
        "server_rss_before_bytes": mem.rss_before_bytes,
        "server_rss_after_bytes": mem.rss_after_bytes,
        "server_rss_bytes_per_conn": per_conn(mem.rss_before_bytes, mem.rss_after_bytes, connected),
        "kernel_sockstat_bytes_per_conn": per_conn(mem.sockstat_mem_before_bytes, mem.sockstat_mem_after_bytes, connected),
        "kernel_slab_bytes_per_conn": per_conn(mem.slab_before_bytes, mem.slab_after_bytes, connected),
        "timeline": timeline,
    });
    if let Some(o) = out.as_object_mut() {
        o.extend(cost(r, mem, connected));
    }
    out
}

/// loadgen's own cost beside the server's: CPU over the measured window
/// (total and per delivered message) and RSS per connection.
fn cost(r: &WorkerResult, mem: &ServerMemory, connected: u64) -> serde_json::Map<String, Value> {
    // A measured window with CPU in it (storm and offline have none).
    let own_cpu = (r.cpu_us > 0).then_some(r.cpu_us);
    let ratio = match (own_cpu, mem.cpu_us) {
        (Some(l), Some(s)) if s > 0 => json!(round3(l as f64 / s as f64)),
        _ => Value::Null,
    };
    let rss_per_conn = if r.rss_ready_bytes > 0 {
        per_conn(Some(r.rss_before_bytes), Some(r.rss_ready_bytes), connected)
    } else {
        Value::Null
    };
    let v = json!({
        "loadgen_cpu_s": own_cpu.map(|us| round3(us as f64 / 1e6)),
        "server_cpu_s": mem.cpu_us.map(|us| round3(us as f64 / 1e6)),
        "loadgen_cpu_us_per_msg": per_msg(own_cpu, r.measured_delivered),
        "server_cpu_us_per_msg": per_msg(mem.cpu_us, r.measured_delivered),
        "loadgen_server_cpu_ratio": ratio,
        "loadgen_rss_ready_bytes": (r.rss_ready_bytes > 0).then_some(r.rss_ready_bytes),
        "loadgen_rss_bytes_per_conn": rss_per_conn,
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result_with(values: &[u64]) -> WorkerResult {
        let mut r = WorkerResult::default();
        for &v in values {
            r.latency.record(v).expect("in range");
        }
        let mut sec = Second {
            sent: 1,
            acked: 1,
            delivered: values.len() as u64,
            latency: new_hist(),
        };
        sec.latency.record(values[0]).expect("in range");
        r.timeline.push(sec);
        r.sent = values.len() as u64;
        r.acked = values.len() as u64;
        r.delivered = values.len() as u64;
        r.errors.insert("timeout".into(), 1);
        r
    }

    #[test]
    fn histograms_survive_the_wire_and_merge_exactly() {
        let a = result_with(&[100, 200, 300]);
        let b = result_with(&[5_000, 6_000]);
        let wire = serde_json::to_string(&b).expect("serialize");
        let b2: WorkerResult = serde_json::from_str(&wire).expect("deserialize");
        assert_eq!(b2.latency.len(), 2);
        let mut m = a.clone();
        m.merge(&b2);
        assert_eq!(m.latency.len(), 5);
        assert_eq!(m.latency.max(), b.latency.max());
        assert_eq!(m.latency.min(), a.latency.min());
        assert_eq!(m.sent, 5);
        assert_eq!(m.errors["timeout"], 2);
        assert_eq!(m.timeline.len(), 1);
        assert_eq!(m.timeline[0].latency.len(), 2);
        assert_eq!(m.lost(), 0);
    }

    #[test]
    fn group_lost_counts_owed_deliveries_and_fanout_merges() {
        let mut a = WorkerResult {
            acked: 2,
            delivered: 1_998,
            expected: Some(1_998),
            ..Default::default()
        };
        a.fanout.record(4_000).expect("in range");
        let b = WorkerResult {
            acked: 1,
            delivered: 998,
            expected: Some(999),
            ..Default::default()
        };
        let wire = serde_json::to_string(&b).expect("serialize");
        let b: WorkerResult = serde_json::from_str(&wire).expect("deserialize");
        a.merge(&b);
        assert_eq!(a.lost(), 1, "one member missed one post");
        assert_eq!(a.fanout.len(), 1);
        let s = summary("group", json!({}), &a, &ServerMemory::default());
        let p50 = s["fanout_ms"]["p50"].as_f64().expect("a number");
        assert!((p50 - 4.0).abs() < 0.01, "p50 {p50}");
        assert_eq!(s["expected"], 2_997);
    }

    #[test]
    fn summary_has_the_documented_shape() {
        let mut r = result_with(&[1_000, 2_000, 3_000]);
        r.acked = 4;
        r.measured_s = 1.5;
        r.measured_delivered = 3;
        r.open_at_ready = 10;
        let mem = ServerMemory {
            rss_before_bytes: Some(1_000_000),
            rss_after_bytes: Some(1_005_000),
            ..Default::default()
        };
        let s = summary("chat", json!({"users": 10}), &r, &mem);
        for key in [
            "scenario",
            "params",
            "connections",
            "sent",
            "acked",
            "delivered",
            "lost",
            "duplicated",
            "errors",
            "msgs_per_s",
            "latency_ms",
            "ack_latency_ms",
            "logins_per_s",
            "server_rss_bytes_per_conn",
        ] {
            assert!(s.get(key).is_some(), "missing {key}");
        }
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(s["latency_ms"][p].is_number(), "latency_ms.{p}");
        }
        assert_eq!(s["lost"], 1);
        assert_eq!(s["msgs_per_s"], 2.0);
        assert_eq!(s["server_rss_bytes_per_conn"], 500);
        assert_eq!(s["kernel_slab_bytes_per_conn"], Value::Null);
        assert_eq!(
            s["ack_latency_ms"],
            Value::Null,
            "empty histograms are null"
        );
        assert_eq!(s["latency_ms"]["p50"], 2.0);
        assert_eq!(s["loadgen_cpu_us_per_msg"], Value::Null, "no CPU window");

        // loadgen's own cost beside the server's.
        r.cpu_us = 1_500;
        r.rss_before_bytes = 10_000;
        r.rss_ready_bytes = 12_000;
        let mem = ServerMemory {
            cpu_us: Some(6_000),
            ..mem
        };
        let s = summary("chat", json!({}), &r, &mem);
        assert_eq!(s["loadgen_cpu_us_per_msg"], 500.0);
        assert_eq!(s["server_cpu_us_per_msg"], 2_000.0);
        assert_eq!(s["loadgen_server_cpu_ratio"], 0.25);
        assert_eq!(s["loadgen_rss_bytes_per_conn"], 200);
    }
}
