//! What the kernel says a process costs: VmRSS from /proc/PID/status, CPU
//! time (user + system, all threads) from /proc/PID/stat, TCP socket buffer
//! pages from /proc/net/sockstat, and the kernel slab total from
//! /proc/meminfo. Read for the server (`--server-pid`) and for loadgen
//! itself (`/proc/self`), so the summary can set loadgen's own cost beside
//! the server's. Sockstat and slab are machine-wide: on loopback they include
//! both ends of every connection (and anything else the machine does
//! meanwhile), so they are reported as an upper bound beside the server's
//! own RSS.

use crate::summary::ServerMemory;

const PAGE: u64 = 4096;

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kb_field(&s, "VmRSS:")
}

fn parse_kb_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// VmRSS of this process in bytes (0 if /proc cannot tell).
pub fn self_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_kb_field(&s, "VmRSS:"))
        .unwrap_or(0)
}

/// Clock ticks per second of /proc's `utime`/`stime`: USER_HZ, which the
/// kernel fixes at 100 for userspace on every mainstream architecture
/// (whatever its internal HZ).
const USER_HZ: u64 = 100;

/// CPU time (user + system, every thread) of `pid` in µs, at /proc's
/// resolution of 10 ms.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_us(&s)
}

/// CPU time of this process in µs (0 if /proc cannot tell).
pub fn self_cpu_us() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat_cpu_us(&s))
        .unwrap_or(0)
}

/// `utime + stime` of a /proc/PID/stat line, in µs. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last
/// `)`: utime and stime are fields 14 and 15, the 12th and 13th after it.
fn parse_stat_cpu_us(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) * (1_000_000 / USER_HZ))
}

/// `TCP: ... mem N` of /proc/net/sockstat, in bytes.
pub fn sockstat_tcp_mem_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    parse_sockstat_mem(&s)
}

fn parse_sockstat_mem(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse::<u64>().ok().map(|p| p * PAGE);
        }
    }
    None
}

/// Kernel slab memory (`Slab:` of /proc/meminfo), in bytes.
pub fn slab_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kb_field(&s, "Slab:")
}

/// Fill the "before" half of `m`.
pub fn before(pid: u32, m: &mut ServerMemory) {
    m.rss_before_bytes = rss_bytes(pid);
    m.sockstat_mem_before_bytes = sockstat_tcp_mem_bytes();
    m.slab_before_bytes = slab_bytes();
}

/// Fill the "after" half of `m`.
pub fn after(pid: u32, m: &mut ServerMemory) {
    m.rss_after_bytes = rss_bytes(pid);
    m.sockstat_mem_after_bytes = sockstat_tcp_mem_bytes();
    m.slab_after_bytes = slab_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let status = "Name:\tswiftlet\nVmPeak:\t  9999 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_kb_field(status, "VmRSS:"), Some(12345 * 1024));
        let sockstat =
            "sockets: used 300\nTCP: inuse 5 orphan 0 tw 2 alloc 9 mem 17\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_sockstat_mem(sockstat), Some(17 * 4096));
        assert!(rss_bytes(std::process::id()).is_some());
        assert!(self_rss_bytes() > 0);
        let stat = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 9 0 1";
        assert_eq!(parse_stat_cpu_us(stat), Some(280 * 10_000));
        assert!(cpu_us(std::process::id()).is_some());
    }
}
