//! Admission: how many connections the node holds, in all and per source
//! address, decided at accept, before a connection costs anything.
//!
//! Shared by every shard (the kernel spreads one address's connections
//! over them). A connection past a cap is refused at once, in its own
//! protocol, and closed: a `TOO_MANY_CONNECTIONS` Error frame on the TCP
//! port, `503` with `Retry-After` on the HTTP port (a WebSocket upgrade
//! sees its handshake fail), nothing on a TLS port (no session exists to
//! speak in). So a flood past the cap costs one accept and one write per
//! connection, and the node keeps accepting: the cap sits below the
//! process's file limit, so `EMFILE` is not how the node learns it is full.
//!
//! That cost is still the server's, and a client refused at the cap may
//! reconnect at once, forever: each shard answers at most
//! [`RefusalBudget`]'s share of `--max-refusals-per-sec` per tick, then
//! accepts nothing more until the next tick. What comes meanwhile waits in
//! the kernel's listen backlog (once that is full, the kernel leaves the
//! flooders' handshakes unanswered and their clients back off), so a flood
//! past the cap takes a bounded share of the node's CPU, not all of it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Files kept for RocksDB, listeners, Redis links and logs when the
/// connection cap is derived from the process's open-file limit.
pub const FILES_KEPT: usize = 1024;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `max_connections`.
    Full,
    /// Its source address holds `max_conns_per_ip`.
    PerAddress,
}

/// The node's connection counts (see the module doc).
pub struct Admission {
    max: usize,
    per_ip_max: usize,
    /// Each shard's [`RefusalBudget`] per tick (0: no limit).
    refusals_per_tick: u32,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl Admission {
    /// Caps of `max` connections in all and `per_ip_max` per source
    /// address (0: no cap per address); each shard refuses at most
    /// `refusals_per_tick` connections a tick (0: no limit; see
    /// [`RefusalBudget::per_shard`]).
    pub fn new(max: usize, per_ip_max: usize, refusals_per_tick: u32) -> Admission {
        Admission {
            max,
            per_ip_max,
            refusals_per_tick,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Whether addresses are counted (then the shard remembers each
    /// connection's, to [`Admission::release`] it).
    pub fn counts_addresses(&self) -> bool {
        self.per_ip_max > 0
    }

    /// Take a place for a connection from `ip`, or say why not.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Full);
        }
        if self.per_ip_max > 0 {
            let mut m = self.per_ip.lock();
            let n = m.entry(ip).or_insert(0);
            if *n as usize >= self.per_ip_max {
                drop(m);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::PerAddress);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Give back the place of a connection from `ip` (None when addresses
    /// are not counted).
    pub fn release(&self, ip: Option<IpAddr>) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = ip {
            let mut m = self.per_ip.lock();
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// A shard's budget of refusals (see [`RefusalBudget`]).
    pub fn refusal_budget(&self) -> RefusalBudget {
        RefusalBudget::new(self.refusals_per_tick)
    }
}

/// One shard's refusals per tick of its loop: while some are left it
/// accepts (and refuses past a cap); once they are spent it accepts nothing
/// until the next tick. Driven by tick numbers, so it needs no clock.
#[derive(Debug, Clone, Copy)]
pub struct RefusalBudget {
    per_tick: u32,
    left: u32,
    tick: u32,
}

impl RefusalBudget {
    /// `per_tick` refusals a tick (0: no limit).
    pub fn new(per_tick: u32) -> RefusalBudget {
        RefusalBudget {
            per_tick,
            left: per_tick,
            tick: 0,
        }
    }

    /// Each of `shards` shards' share of `per_sec` refusals a second, per
    /// tick of `tick_ms`, rounded up and at least 1 (0 stays 0: no limit).
    pub fn per_shard(per_sec: u32, shards: usize, tick_ms: u64) -> u32 {
        if per_sec == 0 {
            return 0;
        }
        let per_tick = u64::from(per_sec) * tick_ms;
        let div = 1000 * shards.max(1) as u64;
        u32::try_from(per_tick.div_ceil(div))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// Whether the shard may accept at tick `now` (a new tick refills).
    pub fn open(&mut self, now: u32) -> bool {
        if self.per_tick == 0 {
            return true;
        }
        if now != self.tick {
            self.tick = now;
            self.left = self.per_tick;
        }
        self.left > 0
    }

    /// One connection refused.
    pub fn spend(&mut self) {
        self.left = self.left.saturating_sub(1);
    }
}

/// The open-file limit of this process (its soft `RLIMIT_NOFILE`, from
/// `/proc/self/limits`; 1,024 if that cannot be read).
pub fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|soft| match soft.as_str() {
            "unlimited" => Some(usize::MAX),
            n => n.parse().ok(),
        })
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_address_and_places_come_back() {
        let a = Admission::new(3, 2, 0);
        let x = IpAddr::from([10, 0, 0, 1]);
        let y = IpAddr::from([10, 0, 0, 2]);
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Err(Refusal::PerAddress));
        assert_eq!(a.admit(y), Ok(()));
        assert_eq!(a.admit(y), Err(Refusal::Full));
        assert_eq!(a.held(), 3);
        a.release(Some(x));
        assert_eq!(a.admit(y), Ok(()));
        a.release(Some(y));
        a.release(Some(y));
        a.release(Some(x));
        assert_eq!(a.held(), 0);
        assert!(a.per_ip.lock().is_empty(), "no address lingers");
    }

    #[test]
    fn refusals_are_counted_per_tick() {
        assert_eq!(RefusalBudget::per_shard(1000, 2, 100), 50);
        assert_eq!(RefusalBudget::per_shard(10, 4, 100), 1);
        assert_eq!(RefusalBudget::per_shard(0, 2, 100), 0);
        let mut b = RefusalBudget::new(2);
        assert!(b.open(0));
        b.spend();
        assert!(b.open(0));
        b.spend();
        assert!(!b.open(0), "spent for this tick");
        assert!(b.open(1), "a new tick refills");
        b.spend();
        b.spend();
        b.spend();
        assert!(!b.open(1));
        let mut off = RefusalBudget::new(0);
        for _ in 0..1000 {
            off.spend();
        }
        assert!(off.open(0), "0 is no limit");
    }

    #[test]
    fn the_file_limit_is_read() {
        assert!(open_file_limit() >= 64);
    }
}
