//! The report: per kind of abuse, counters (attempts, bytes, ...) and the
//! answers the server gave, each marked allowed or not by the wire spec.
//! Shared by every task behind one mutex: the counts are bumped once per
//! connection or per batch of frames, never per byte, so the lock is cold.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{json, Value};

#[derive(Default)]
struct Kind {
    counters: BTreeMap<String, u64>,
    answers: BTreeMap<String, u64>,
    unexpected: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Report {
    kinds: Mutex<BTreeMap<&'static str, Kind>>,
}

impl Report {
    fn with<R>(&self, kind: &'static str, f: impl FnOnce(&mut Kind) -> R) -> R {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        f(kinds.entry(kind).or_default())
    }

    /// Add `n` to a counter of `kind`.
    pub fn count(&self, kind: &'static str, counter: &str, n: u64) {
        self.with(kind, |k| {
            *k.counters.entry(counter.to_owned()).or_default() += n
        });
    }

    /// Record one answer of the server to `kind`; `allowed` says whether
    /// the wire spec allows it for what was sent.
    pub fn answer(&self, kind: &'static str, answer: &str, allowed: bool) {
        self.with(kind, |k| {
            *k.answers.entry(answer.to_owned()).or_default() += 1;
            if !allowed {
                *k.unexpected.entry(answer.to_owned()).or_default() += 1;
            }
        });
    }

    pub fn unexpected_total(&self) -> u64 {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .values()
            .map(|k| k.unexpected.values().sum::<u64>())
            .sum()
    }

    /// One line for stderr: each kind's answers so far.
    pub fn progress(&self) -> String {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter()
            .map(|(name, k)| {
                let answers: u64 = k.answers.values().sum();
                let bad: u64 = k.unexpected.values().sum();
                format!(
                    "{name}: {answers} answers{}",
                    if bad > 0 {
                        format!(" ({bad} unexpected)")
                    } else {
                        String::new()
                    }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn to_json(&self, elapsed_s: f64, args: &crate::Args) -> Value {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = serde_json::Map::new();
        for (name, k) in kinds.iter() {
            out.insert(
                (*name).to_owned(),
                json!({ "counters": k.counters, "answers": k.answers, "unexpected": k.unexpected }),
            );
        }
        json!({
            "elapsed_s": (elapsed_s * 1000.0).round() / 1000.0,
            "params": {
                "server": args.server.to_string(),
                "http_server": args.http_server.to_string(),
                "duration_s": args.duration,
                "slowloris": args.slowloris,
                "flood": args.flood,
                "flood_every_s": args.flood_every,
                "fast": args.fast,
                "stall": args.stall,
                "malformed_loops_per_transport": args.malformed,
                "source": args.source,
            },
            "kinds": out,
            "unexpected_total": kinds.values().map(|k| k.unexpected.values().sum::<u64>()).sum::<u64>(),
        })
    }
}
