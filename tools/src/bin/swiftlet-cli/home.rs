//! Where the CLI logs in, in a cluster: the address the user gave (the
//! entry), and the user's home node a login was redirected to.
//!
//! The client library follows `NOT_HOME` inside `Client::connect` and says
//! where it landed (`Client::addr`); this module decides what the CLI makes
//! of that: reconnect straight to the home (as `ReliableSender` does), go
//! back through the entry once the home cannot be reached (the entry node
//! knows where the user lives now, or that the home is down), and tell the
//! user about a redirect once, not at every reconnect. It also words a
//! failed login, `HOME_UNAVAILABLE` apart from an unreachable server, and
//! sets its wait. Pure (no client, no printing), so it is tested alone.

use std::time::Duration;

use swiftlet_client::{ClientError, ErrorCode};

/// The shortest wait after `HOME_UNAVAILABLE`: the server's hint today
/// (`Error.retry_after_ms`, which the client library does not pass on).
pub const HOME_RETRY: Duration = Duration::from_secs(2);

/// The entry address, the home once known, and the home last announced.
#[derive(Debug)]
pub struct Home {
    entry: String,
    home: Option<String>,
    announced: Option<String>,
}

impl Home {
    pub fn new(entry: &str) -> Home {
        Home {
            entry: entry.to_owned(),
            home: None,
            announced: None,
        }
    }

    /// Where the next login goes: the home once a login landed there, else
    /// the entry.
    pub fn addr(&self) -> &str {
        self.home.as_deref().unwrap_or(&self.entry)
    }

    /// A login succeeded at `at`. Returns the line to print when it was
    /// redirected to a home not announced before.
    pub fn landed(&mut self, at: &str) -> Option<String> {
        if at == self.entry {
            self.home = None;
            return None;
        }
        self.home = Some(at.to_owned());
        if self.announced.as_deref() == Some(at) {
            return None;
        }
        self.announced = Some(at.to_owned());
        Some(format!(
            "redirected to your home node at {at} (the cluster serves each user from one node)"
        ))
    }

    /// A login failed: the next goes through the entry, which knows where
    /// the user lives now (a moved partition, a home that is down).
    pub fn failed(&mut self) {
        self.home = None;
    }
}

/// The line for a failed (retryable) login at `at`, and how long to wait:
/// `backoff`, or at least [`HOME_RETRY`] when the user's home is down.
pub fn retry(e: &ClientError, at: &str, backoff: Duration) -> (String, Duration) {
    if e.code() == Some(ErrorCode::HomeUnavailable as i32) {
        let wait = backoff.max(HOME_RETRY);
        let why = match e {
            ClientError::Server { message, .. } if !message.is_empty() => message.as_str(),
            _ => "down, or its partition moving",
        };
        return (
            format!("your home node is unavailable ({why}); retrying in {wait:.1?}"),
            wait,
        );
    }
    (
        // Through an entry node the failure may be the home's (the library
        // followed a redirect), so the line names where the login started.
        format!("cannot log in via {at} ({e}); retrying in {backoff:.1?}"),
        backoff,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_is_announced_once_and_reconnects_go_home() {
        let mut h = Home::new("n1:7400");
        assert_eq!(h.addr(), "n1:7400");
        let line = h.landed("n2:7400").expect("first redirect announced");
        assert!(line.contains("n2:7400"), "{line}");
        assert_eq!(h.addr(), "n2:7400", "reconnect straight home");
        assert_eq!(h.landed("n2:7400"), None, "not again at each reconnect");
        // The home went away: back through the entry, which redirects to
        // the same home (not announced again) or to a new one (announced).
        h.failed();
        assert_eq!(h.addr(), "n1:7400");
        assert_eq!(h.landed("n2:7400"), None);
        h.failed();
        assert!(h.landed("n3:7400").is_some(), "a new home is announced");
    }

    #[test]
    fn no_redirect_no_line() {
        let mut h = Home::new("n1:7400");
        assert_eq!(h.landed("n1:7400"), None);
        assert_eq!(h.addr(), "n1:7400");
    }

    #[test]
    fn home_unavailable_has_its_own_line_and_waits_at_least_the_hint() {
        let e = ClientError::Server {
            code: ErrorCode::HomeUnavailable as i32,
            message: "this user's home, node 3, is down; retry later".into(),
        };
        let (line, wait) = retry(&e, "n1:7400", Duration::from_millis(100));
        assert!(
            line.starts_with("your home node is unavailable (this user's home, node 3, is down"),
            "{line}"
        );
        assert_eq!(wait, HOME_RETRY);
        let (_, wait) = retry(&e, "n1:7400", Duration::from_secs(4));
        assert_eq!(wait, Duration::from_secs(4), "backoff grows past the floor");

        let io = ClientError::Io(std::io::ErrorKind::ConnectionRefused.into());
        let (line, wait) = retry(&io, "n1:7400", Duration::from_millis(100));
        assert!(line.starts_with("cannot log in via n1:7400"), "{line}");
        assert_eq!(wait, Duration::from_millis(100));
    }
}
