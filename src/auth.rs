//! Login: turns a Hello's token into a user id, and checks the shape of ids.
//!
//! Tokens are HS256 JWTs (see `swiftlet_protocol::token`). In dev mode a bare
//! user id is accepted as the token, for demos and load tests; the server
//! logs a warning at start when it is on.

use swiftlet_protocol::token::{self, TokenError};
use swiftlet_protocol::ErrorCode;

/// Decides who a token belongs to.
#[derive(Clone)]
pub struct Authenticator {
    secret: Vec<u8>,
    dev_auth: bool,
}

/// A refused login: the code the client gets and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: ErrorCode,
    pub reason: String,
}

impl Authenticator {
    pub fn new(secret: Vec<u8>, dev_auth: bool) -> Self {
        Authenticator { secret, dev_auth }
    }

    /// The user id `token` proves.
    pub fn authenticate(&self, token: &str) -> Result<String, AuthError> {
        let fail = |code, reason: String| AuthError { code, reason };
        // A JWT always has two dots; a user id may contain dots, but never two
        // in a row followed by a base64 segment, so try the JWT first.
        // A bare id has no dots-separated JWT shape: in dev mode take it as
        // it is, without a failed JWT parse first.
        if self.dev_auth && token.bytes().filter(|&b| b == b'.').count() != 2 && valid_id(token) {
            return Ok(token.to_owned());
        }
        let user = match token::verify(&self.secret, token) {
            Ok(claims) => claims.sub,
            Err(TokenError::Expired) => {
                return Err(fail(ErrorCode::TokenExpired, "token expired".into()))
            }
            Err(TokenError::Invalid(e)) => {
                if self.dev_auth && valid_id(token) {
                    token.to_owned()
                } else {
                    return Err(fail(ErrorCode::AuthFailed, e));
                }
            }
        };
        if !valid_id(&user) {
            return Err(fail(
                ErrorCode::AuthFailed,
                "token names an invalid user id".into(),
            ));
        }
        Ok(user)
    }
}

/// User ids, device ids and client message ids: 1-64 bytes of
/// `[A-Za-z0-9._@-]`. Never NUL, which the store's key layout relies on.
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_dev_and_bad_tokens() {
        let strict = Authenticator::new(b"k".to_vec(), false);
        let dev = Authenticator::new(b"k".to_vec(), true);
        let t = token::mint(b"k", "alice", 60);
        assert_eq!(strict.authenticate(&t).ok().as_deref(), Some("alice"));
        assert_eq!(
            strict.authenticate("alice").map_err(|e| e.code),
            Err(ErrorCode::AuthFailed)
        );
        assert_eq!(dev.authenticate("alice").ok().as_deref(), Some("alice"));
        assert_eq!(
            dev.authenticate("al ice").map_err(|e| e.code),
            Err(ErrorCode::AuthFailed)
        );
        let forged = token::mint(b"other", "alice", 60);
        assert_eq!(
            dev.authenticate(&forged).map_err(|e| e.code),
            Err(ErrorCode::AuthFailed)
        );
    }

    #[test]
    fn id_shapes() {
        assert!(valid_id("bob.smith@x-y_1"));
        assert!(!valid_id(""));
        assert!(!valid_id("a\0b"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
