//! Where connections go and come from: the server list, the local source
//! addresses (`--source`), and the login token for a user. Pure parsing plus
//! one DNS lookup, so it is unit-tested without a network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A `--source` or `--server` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("bad address {0:?}")]
    BadAddress(String),
    #[error("bad range {0:?}: the end must not be below the start, and both IPv4")]
    BadRange(String),
    #[error("range {0:?} has more than 65,536 addresses")]
    TooMany(String),
    #[error("empty list")]
    Empty,
}

/// Parse `--source`: `A`, `A-B` (IPv4, inclusive), or a comma list of those.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, AddrError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            None => out.push(
                part.parse::<IpAddr>()
                    .map_err(|_| AddrError::BadAddress(part.to_owned()))?,
            ),
            Some((a, b)) => {
                let parse = |s: &str| {
                    s.trim()
                        .parse::<Ipv4Addr>()
                        .map_err(|_| AddrError::BadRange(part.to_owned()))
                };
                let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
                if b < a {
                    return Err(AddrError::BadRange(part.to_owned()));
                }
                if b - a >= 65_536 {
                    return Err(AddrError::TooMany(part.to_owned()));
                }
                out.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
        }
    }
    if out.is_empty() {
        return Err(AddrError::Empty);
    }
    Ok(out)
}

/// Resolve `--server` (comma-separated `host:port`) to socket addresses.
pub async fn resolve_servers(spec: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = tokio::net::lookup_host(part)
            .await
            .map_err(|e| anyhow::anyhow!("cannot resolve {part:?}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| anyhow::anyhow!("{part:?} has no IPv4 address"))?;
        out.push(addr);
    }
    anyhow::ensure!(!out.is_empty(), "--server is empty");
    Ok(out)
}

/// How a connection logs in.
#[derive(Debug, Clone)]
pub enum Auth {
    /// The server runs with `--dev-auth`: the token is the user id.
    Dev,
    /// HS256 tokens minted with the server's secret.
    Jwt(String),
}

/// Token lifetime: longer than any run.
const TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

impl Auth {
    pub fn token(&self, user: &str) -> String {
        match self {
            Auth::Dev => user.to_owned(),
            Auth::Jwt(secret) => {
                swiftlet_protocol::token::mint(secret.as_bytes(), user, TOKEN_TTL_SECS)
            }
        }
    }
}

/// The global index range `[start, end)` of `total` items that worker
/// `index` of `count` owns. Shares differ by at most one.
pub fn share(total: u64, index: u32, count: u32) -> std::ops::Range<u64> {
    let count = u64::from(count.max(1));
    let index = u64::from(index);
    (total * index / count)..(total * (index + 1) / count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_single_range_and_list() {
        assert_eq!(
            parse_sources("127.0.0.2").expect("single"),
            vec!["127.0.0.2".parse::<IpAddr>().expect("ip")]
        );
        let r = parse_sources("127.0.0.2-127.0.0.9").expect("range");
        assert_eq!(r.len(), 8);
        assert_eq!(r[0].to_string(), "127.0.0.2");
        assert_eq!(r[7].to_string(), "127.0.0.9");
        let l = parse_sources("127.0.0.1, 127.0.1.254-127.0.2.1").expect("list");
        let l: Vec<String> = l.iter().map(ToString::to_string).collect();
        assert_eq!(
            l,
            [
                "127.0.0.1",
                "127.0.1.254",
                "127.0.1.255",
                "127.0.2.0",
                "127.0.2.1"
            ]
        );
    }

    #[test]
    fn sources_reject_garbage() {
        assert!(matches!(
            parse_sources("nope"),
            Err(AddrError::BadAddress(_))
        ));
        assert!(matches!(
            parse_sources("127.0.0.9-127.0.0.2"),
            Err(AddrError::BadRange(_))
        ));
        assert!(matches!(
            parse_sources("10.0.0.0-11.0.0.0"),
            Err(AddrError::TooMany(_))
        ));
        assert_eq!(parse_sources(" , "), Err(AddrError::Empty));
    }

    #[test]
    fn shares_cover_everything_once() {
        let parts: Vec<_> = (0..3).map(|i| share(10, i, 3)).collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..10]);
        assert_eq!(share(5, 0, 1), 0..5);
    }
}
