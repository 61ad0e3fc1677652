//! The soak: traffic at a steady rate for a long time while connections
//! churn, with the server's RSS and open files sampled from /proc.
//!
//! Churn, as a population of phones makes it: every `churn_every` a random
//! device logs out (mostly cleanly: everything acknowledged; sometimes by
//! just dropping the connection) and comes back after a pause, resuming
//! from its cursor; every `user_churn` a random user leaves for good and a
//! new one joins, so logins of never-seen users and devices go on too and
//! the population stays the same size.
//!
//! After the warm-up, RSS saw-tooths: RocksDB's memtables fill (16 MiB per
//! column family, all of them within the server's `--memtable-budget-bytes`)
//! and their memory goes back to the system when they are flushed, every
//! few minutes at these rates. So "flat" compares the envelope, not single samples: the measured
//! period is cut in two halves, each several cycles long, and the highest
//! and the lowest RSS of the second half must be within the tolerance of
//! the first half's ([`Halves`]); a leak raises both. File descriptors are
//! reported the same way, less the connected devices (which churn). RSS is
//! also taken apart ([`RssParts`], from the server's heap gauges), so a
//! rise can be put down to RocksDB's caches, its other memory, glibc's
//! free chunks or the server's own. At the end traffic stops and one
//! verification pass checks every send and every stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;

use crate::device::{Cmd, DeviceOpts};
use crate::population;
use crate::server::ServerProc;
use crate::traffic::{self, TrafficOpts};
use crate::verify;
use crate::world::{lock, World};

#[derive(Debug, Clone)]
pub struct SoakOpts {
    pub minutes: f64,
    pub warmup_minutes: f64,
    pub sample_secs: f64,
    /// Mean RSS over this many minutes at each end of the measured part.
    pub churn_every: Duration,
    pub user_churn: Duration,
    pub devices: usize,
    /// RSS peaks and troughs may drift this much (percent) between the
    /// two halves of the measured period.
    pub rss_tolerance_pct: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    rss_kib: u64,
    fds: u64,
    online: usize,
    acked: u64,
    /// RocksDB's memtables and block cache (from `/metrics`), KiB: bounded
    /// by configuration, and most of what moves RSS.
    rocks_kib: u64,
    /// RSS taken apart, KiB, to say where a rise is (see [`RssParts`]).
    parts: RssParts,
}

/// RSS taken apart, KiB. RocksDB allocates with the C library's malloc,
/// the server's own code with mimalloc, so `/metrics`' heap gauges split
/// the anonymous memory in two: what RocksDB holds besides its memtables
/// and block cache, what the C library's malloc keeps free, and the rest
/// of the anonymous memory, which is mimalloc's resident pages and the
/// threads' stacks. The file-backed rest of RSS is the binary's pages.
#[derive(Debug, Clone, Copy, Default)]
struct RssParts {
    rocksdb_other: u64,
    libc_free: u64,
    own: u64,
    files: u64,
}

pub async fn run(
    world: &Arc<World>,
    server: &mut ServerProc,
    opts: &SoakOpts,
    traffic_opts: &TrafficOpts,
    device_opts: &DeviceOpts,
    rng: &mut StdRng,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let started = Instant::now();
    let traffic = traffic::Running::start(world.clone(), traffic_opts.clone(), rng.gen());
    let total = Duration::from_secs_f64(opts.minutes * 60.0);
    let sample_every = Duration::from_secs_f64(opts.sample_secs);
    let mut samples = Vec::new();
    let mut next_sample = Instant::now();
    let mut next_churn = Instant::now() + opts.churn_every;
    let mut next_user = Instant::now() + opts.user_churn;
    let mut next_progress = Instant::now() + Duration::from_secs(60);
    let mut next_user_id = lock(&world.users).len();
    let (mut logouts, mut drops, mut joined, mut left) = (0u64, 0u64, 0u64, 0u64);
    let mut leaving = Vec::new();
    while started.elapsed() < total {
        let now = Instant::now();
        if now >= next_sample {
            next_sample += sample_every;
            let online = world
                .all_devices()
                .iter()
                .filter(|d| d.client().is_some())
                .count();
            let metrics = server.metrics().await.unwrap_or_default();
            let gauge = |name: &str| metrics.get(name).copied().unwrap_or(0.0) as u64 / 1024;
            let rss_kib = server.rss_kib().unwrap_or(0);
            let anon = server.rss_anon_kib().unwrap_or(0);
            let rocks_kib = gauge("swiftlet_rocksdb_memtable_bytes")
                + gauge("swiftlet_rocksdb_block_cache_bytes");
            let libc = gauge("swiftlet_heap_libc_in_use_bytes");
            let libc_free = gauge("swiftlet_heap_libc_free_bytes");
            samples.push(Sample {
                t: started.elapsed().as_secs_f64(),
                rss_kib,
                fds: server.open_fds().unwrap_or(0),
                online,
                acked: world.ledger_counts().0,
                rocks_kib,
                parts: RssParts {
                    rocksdb_other: libc.saturating_sub(rocks_kib),
                    libc_free,
                    own: anon.saturating_sub(libc + libc_free),
                    files: rss_kib.saturating_sub(anon),
                },
            });
        }
        if now >= next_churn {
            next_churn += opts.churn_every;
            let device = {
                let users = lock(&world.users);
                let active: Vec<_> = users
                    .iter()
                    .filter(|u| u.active)
                    .flat_map(|u| u.devices.iter())
                    .collect();
                active.choose(rng).map(|d| (*d).clone())
            };
            if let Some(d) = device {
                let clean = rng.gen_bool(0.8);
                let pause = Duration::from_millis(rng.gen_range(100..=5000));
                if d.command(Cmd::Logout { pause, clean }) {
                    if clean {
                        logouts += 1;
                    } else {
                        drops += 1;
                    }
                }
            }
        }
        if now >= next_user {
            next_user += opts.user_churn;
            let gone = {
                let mut users = lock(&world.users);
                let active: Vec<usize> = (0..users.len()).filter(|&i| users[i].active).collect();
                active.choose(rng).map(|&i| {
                    users[i].active = false;
                    users[i].devices.clone()
                })
            };
            if let Some(devices) = gone {
                for d in devices {
                    // A device busy with a logout gets Leave when it is back.
                    let d2 = d.clone();
                    leaving.push(tokio::spawn(async move {
                        while !d2.command(Cmd::Leave) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        d2.join().await;
                    }));
                }
                left += 1;
            }
            population::add_user(
                world,
                &server.addr(),
                &format!("u{next_user_id}"),
                opts.devices,
                device_opts,
                rng,
            );
            next_user_id += 1;
            joined += 1;
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(60);
            if let Some(s) = samples.last() {
                println!(
                    "{:>5.1} min: {} acked, {} skipped, RSS {} KiB (RocksDB memtables and cache {} KiB), {} fds, {} devices online",
                    s.t / 60.0,
                    s.acked,
                    world.skipped.load(Ordering::Relaxed),
                    s.rss_kib,
                    s.rocks_kib,
                    s.fds,
                    s.online
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    traffic.stop().await?;
    for l in leaving {
        l.await?;
    }
    let (resent, bad) = verify::resend_sample(world, 100, rng).await;
    let mut v = verify::verify(world, &server.addr()).await?;
    for b in bad {
        v.violations += 1;
        v.texts.push(b);
    }
    for t in &v.texts {
        println!("  VIOLATION {t}");
    }

    // Memory and files after the warm-up.
    let warm: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.t >= opts.warmup_minutes * 60.0 && s.rss_kib > 0)
        .collect();
    let rss = Halves::of(&warm.iter().map(|s| s.rss_kib as f64).collect::<Vec<_>>());
    // What the server holds besides RocksDB's memtables and block cache:
    // its own memory (connections, caches, buffers), which must be flat
    // whatever the memtables do.
    let own = Halves::of(
        &warm
            .iter()
            .map(|s| s.rss_kib.saturating_sub(s.rocks_kib) as f64)
            .collect::<Vec<_>>(),
    );
    let rocks = Halves::of(&warm.iter().map(|s| s.rocks_kib as f64).collect::<Vec<_>>());
    let part =
        |f: fn(&Sample) -> u64| Halves::of(&warm.iter().map(|s| f(s) as f64).collect::<Vec<_>>());
    let parts = [
        (
            "RocksDB besides memtables and block cache",
            part(|s| s.parts.rocksdb_other),
        ),
        (
            "free in the C library's malloc",
            part(|s| s.parts.libc_free),
        ),
        ("the server's own (mimalloc, stacks)", part(|s| s.parts.own)),
        ("file-backed (the binary)", part(|s| s.parts.files)),
    ];
    let rss_min = warm.iter().map(|s| s.rss_kib).min().unwrap_or(0);
    let rss_max = warm.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fd_min = warm.iter().map(|s| s.fds).min().unwrap_or(0);
    let fd_max = warm.iter().map(|s| s.fds).max().unwrap_or(0);
    // Open files minus connected devices: what the server holds besides
    // connections (RocksDB files, listeners, eventfds), which must not grow.
    let base = |s: &Sample| s.fds as i64 - s.online as i64;
    let base_min = warm.iter().map(base).min().unwrap_or(0);
    let base_max = warm.iter().map(base).max().unwrap_or(0);
    let files = Halves::of(&warm.iter().map(|s| base(s) as f64).collect::<Vec<_>>());
    let problems = server.log_problems();
    let log_errors = problems.iter().filter(|(l, _)| l == "ERROR").count();
    let log_warns = problems.len() - log_errors;
    let errors = lock(&world.errors).clone();
    let client_errors: u64 = errors.values().sum();
    let rss_flat = rss.flat_within(opts.rss_tolerance_pct);
    let secs = started.elapsed().as_secs_f64();
    let passed =
        v.violations == 0 && v.unresolved == 0 && rss_flat && client_errors == 0 && log_errors == 0;
    println!(
        "soak: {:.1} min, {} acked ({:.0}/s), {} unresolved, {} skipped; {logouts} clean logouts, {drops} dropped connections, \
         {joined} users joined, {left} left; verified {} events in {} inboxes ({} message copies removed by retention), {} devices, {} delivered, {} replayed, violations {}; \
         RSS after warm-up {rss_min}..{rss_max} KiB, first/second half peak {:.0}/{:.0} KiB ({:+.2}%), trough {:.0}/{:.0} KiB ({:+.2}%), \
         mean {:.0}/{:.0} KiB ({:+.2}%); RSS less RocksDB memtables and block cache: peak {:.0}/{:.0} KiB ({:+.2}%), \
         trough {:.0}/{:.0} KiB ({:+.2}%); memtables and block cache peak {:.0}/{:.0} KiB; \
         fds {fd_min}..{fd_max} (less connections {base_min}..{base_max}, first/second half {:.0}..{:.0}/{:.0}..{:.0}); client errors {client_errors}, server log ERROR {log_errors} WARN {log_warns} (besides --dev-auth)",
        secs / 60.0,
        v.acked,
        v.acked as f64 / secs,
        v.unresolved,
        world.skipped.load(Ordering::Relaxed),
        v.events,
        v.inboxes,
        v.trimmed,
        v.devices,
        v.delivered,
        v.replayed,
        v.violations,
        rss.first.max,
        rss.second.max,
        rss.peak_drift_pct(),
        rss.first.min,
        rss.second.min,
        rss.trough_drift_pct(),
        rss.first.mean,
        rss.second.mean,
        rss.mean_drift_pct(),
        own.first.max,
        own.second.max,
        own.peak_drift_pct(),
        own.first.min,
        own.second.min,
        own.trough_drift_pct(),
        rocks.first.max,
        rocks.second.max,
        files.first.min,
        files.first.max,
        files.second.min,
        files.second.max,
    );
    for (name, h) in &parts {
        println!(
            "  {name}: mean {:.0}/{:.0} KiB ({:+.2}%), peak {:.0}/{:.0}, trough {:.0}/{:.0}",
            h.first.mean,
            h.second.mean,
            h.mean_drift_pct(),
            h.first.max,
            h.second.max,
            h.first.min,
            h.second.min
        );
    }
    for (level, message) in problems.iter().take(10) {
        println!("  server log: {level} {message}");
    }
    let summary = json!({
        "mode": "soak",
        "minutes": secs / 60.0,
        "rate": traffic_opts.rate,
        "acked": v.acked,
        "acked_per_sec": v.acked as f64 / secs,
        "acked_after_retry": v.retried,
        "unresolved": v.unresolved,
        "removed_by_retention": v.trimmed,
        "resent_same_ack": resent,
        "skipped_sends": world.skipped.load(Ordering::Relaxed),
        "clean_logouts": logouts,
        "dropped_connections": drops,
        "users_joined": joined,
        "users_left": left,
        "inbox_events": v.events,
        "devices": v.devices,
        "delivered": v.delivered,
        "replayed": v.replayed,
        "violations": v.violations,
        "rss_kib": {
            "min": rss_min, "max": rss_max,
            "first_half": rss.first.json(),
            "second_half": rss.second.json(),
            "peak_drift_pct": rss.peak_drift_pct(), "trough_drift_pct": rss.trough_drift_pct(),
            "mean_drift_pct": rss.mean_drift_pct(), "flat": rss_flat,
        },
        "rss_less_rocksdb_kib": {
            "first_half": own.first.json(),
            "second_half": own.second.json(),
            "peak_drift_pct": own.peak_drift_pct(), "trough_drift_pct": own.trough_drift_pct(),
        },
        "rocksdb_memtables_and_cache_kib": {
            "first_half": rocks.first.json(),
            "second_half": rocks.second.json(),
        },
        "heap_parts_kib": parts.iter().map(|(name, h)| json!({
            "part": name,
            "first_half": h.first.json(),
            "second_half": h.second.json(),
            "mean_drift_pct": h.mean_drift_pct(),
        })).collect::<Vec<_>>(),
        "fds": {
            "min": fd_min, "max": fd_max, "less_connections_min": base_min, "less_connections_max": base_max,
            "less_connections_first_half": [files.first.min, files.first.max],
            "less_connections_second_half": [files.second.min, files.second.max],
        },
        "client_errors": errors,
        "server_log": {"error": log_errors, "warn": log_warns},
        "samples": samples.iter().map(|s| json!([s.t, s.rss_kib, s.rocks_kib, s.fds, s.online, s.acked, s.parts.rocksdb_other, s.parts.libc_free, s.parts.own, s.parts.files])).collect::<Vec<_>>(),
        "passed": passed,
    });
    Ok((summary, passed))
}

/// Lowest, highest and mean of some samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Span {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Span {
    /// `{"min", "max", "mean"}` for the summary.
    fn json(&self) -> serde_json::Value {
        json!({"min": self.min, "max": self.max, "mean": self.mean})
    }

    fn of(xs: &[f64]) -> Span {
        if xs.is_empty() {
            return Span::default();
        }
        Span {
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
        }
    }
}

/// A series cut into its first and second half, compared.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Halves {
    pub first: Span,
    pub second: Span,
}

fn pct(from: f64, to: f64) -> f64 {
    if from > 0.0 {
        (to - from) / from * 100.0
    } else {
        f64::NAN
    }
}

impl Halves {
    pub fn of(xs: &[f64]) -> Halves {
        let (a, b) = xs.split_at(xs.len() / 2);
        Halves {
            first: Span::of(a),
            second: Span::of(b),
        }
    }

    pub fn peak_drift_pct(&self) -> f64 {
        pct(self.first.max, self.second.max)
    }

    pub fn trough_drift_pct(&self) -> f64 {
        pct(self.first.min, self.second.min)
    }

    pub fn mean_drift_pct(&self) -> f64 {
        pct(self.first.mean, self.second.mean)
    }

    /// Peaks and troughs both moved by at most `tolerance` percent (NaN,
    /// too few samples, is not flat).
    pub fn flat_within(&self, tolerance: f64) -> bool {
        self.peak_drift_pct().abs() <= tolerance && self.trough_drift_pct().abs() <= tolerance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saw_tooth_is_flat_and_a_leak_is_not() {
        // Cycles of 10 samples rising 60 -> 87 and dropping back.
        let saw: Vec<f64> = (0..100).map(|i| 60.0 + f64::from(i % 10) * 3.0).collect();
        let h = Halves::of(&saw);
        assert!(h.flat_within(5.0), "{h:?}");
        // The same with 0.2 per sample on top: +20 over the run.
        let leak: Vec<f64> = saw
            .iter()
            .enumerate()
            .map(|(i, x)| x + i as f64 * 0.2)
            .collect();
        let h = Halves::of(&leak);
        assert!(!h.flat_within(5.0), "{h:?}");
        assert!(h.peak_drift_pct() > 5.0 && h.trough_drift_pct() > 5.0);
        assert!(!Halves::of(&[]).flat_within(5.0), "no samples, no verdict");
    }
}
