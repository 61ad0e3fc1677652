//! The server's memory as the kernel reports it: VmRSS of `--server-pid`
//! from /proc/PID/status, TCP socket buffer pages from /proc/net/sockstat,
//! and the kernel slab total from /proc/meminfo. Sockstat and slab are
//! machine-wide: on loopback they include both ends of every connection (and
//! anything else the machine does meanwhile), so they are reported as an
//! upper bound beside the server's own RSS.

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
    }
}
