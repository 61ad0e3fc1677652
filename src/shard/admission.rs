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
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl Admission {
    /// Caps of `max` connections in all and `per_ip_max` per source
    /// address (0: no cap per address).
    pub fn new(max: usize, per_ip_max: usize) -> Admission {
        Admission {
            max,
            per_ip_max,
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
        let a = Admission::new(3, 2);
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
    fn the_file_limit_is_read() {
        assert!(open_file_limit() >= 64);
    }
}
