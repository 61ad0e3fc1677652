//! Login: turns a Hello's token into a user id, and checks the shape of ids.
//!
//! Tokens are HS256 JWTs (see `swiftlet_protocol::token`). In dev mode a bare
//! user id is accepted as the token, for demos and load tests; the server
//! logs a warning at start when it is on.
//!
//! A token whose `iat` is before the time an operator revoked its user's
//! tokens from (`swiftlet admin revoke`) is refused `TOKEN_REVOKED`. The
//! revocations are held here in memory ([`Revocations`]), loaded from the
//! store at start and written through by the admin API, so a login reads
//! no disk for them: with none recorded it pays one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use swiftlet_protocol::token::{self, TokenError};
use swiftlet_protocol::ErrorCode;

/// Decides who a token belongs to.
#[derive(Clone)]
pub struct Authenticator {
    secret: Vec<u8>,
    dev_auth: bool,
    revoked: Arc<Revocations>,
}

/// Who a token proves, and when it was issued (its `iat`, seconds since
/// the Unix epoch; 0 for a token without one and for a dev-auth bare id,
/// which any revocation of the user therefore refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub issued_at: u64,
}

/// Per user, the time before which their tokens are refused: the durable
/// copy is in the store (`cf::REVOKED`), this one answers logins.
#[derive(Default)]
pub struct Revocations {
    /// Whether any user has one: a login of a server that never revoked
    /// anything reads this and nothing else.
    any: AtomicBool,
    before: RwLock<HashMap<String, u64>>,
}

impl Revocations {
    /// Revocations as the store holds them.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, u64)>) -> Self {
        let before: HashMap<String, u64> = entries.into_iter().collect();
        Revocations {
            any: AtomicBool::new(!before.is_empty()),
            before: RwLock::new(before),
        }
    }

    /// Refuse `user`'s tokens issued before `before` (seconds). The caller
    /// has made it durable first.
    pub fn set(&self, user: &str, before: u64) {
        self.before.write().insert(user.to_owned(), before);
        self.any.store(true, Ordering::Release);
    }

    /// The time before which `user`'s tokens are refused (0: none).
    pub fn before(&self, user: &str) -> u64 {
        if !self.any.load(Ordering::Acquire) {
            return 0;
        }
        self.before.read().get(user).copied().unwrap_or(0)
    }
}

/// A refused login: the code the client gets and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: ErrorCode,
    pub reason: String,
}

impl Authenticator {
    pub fn new(secret: Vec<u8>, dev_auth: bool, revoked: Arc<Revocations>) -> Self {
        Authenticator {
            secret,
            dev_auth,
            revoked,
        }
    }

    /// The revocations this authenticator refuses tokens by.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revoked
    }

    /// The user id `token` proves.
    pub fn authenticate(&self, token: &str) -> Result<String, AuthError> {
        self.identify(token).map(|id| id.user)
    }

    /// Who `token` proves, and when it was issued.
    pub fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        let id = self.verify(token)?;
        let before = self.revoked.before(&id.user);
        if id.issued_at < before {
            return Err(AuthError {
                code: ErrorCode::TokenRevoked,
                reason: format!(
                    "tokens of this user issued before {before} (Unix seconds) were revoked"
                ),
            });
        }
        Ok(id)
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let fail = |code, reason: String| AuthError { code, reason };
        let bare = |user: &str| Identity {
            user: user.to_owned(),
            issued_at: 0,
        };
        // A JWT always has two dots; a user id may contain dots, but never two
        // in a row followed by a base64 segment, so try the JWT first.
        // A bare id has no dots-separated JWT shape: in dev mode take it as
        // it is, without a failed JWT parse first.
        if self.dev_auth && token.bytes().filter(|&b| b == b'.').count() != 2 && valid_id(token) {
            return Ok(bare(token));
        }
        let id = match token::verify(&self.secret, token) {
            Ok(claims) => Identity {
                user: claims.sub,
                issued_at: claims.iat,
            },
            Err(TokenError::Expired) => {
                return Err(fail(ErrorCode::TokenExpired, "token expired".into()))
            }
            Err(TokenError::Invalid(e)) => {
                if self.dev_auth && valid_id(token) {
                    bare(token)
                } else {
                    return Err(fail(ErrorCode::AuthFailed, e));
                }
            }
        };
        if !valid_id(&id.user) {
            return Err(fail(
                ErrorCode::AuthFailed,
                "token names an invalid user id".into(),
            ));
        }
        Ok(id)
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
        let strict = Authenticator::new(b"k".to_vec(), false, Arc::default());
        let dev = Authenticator::new(b"k".to_vec(), true, Arc::default());
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
    fn tokens_issued_before_a_revocation_are_refused() {
        let revoked = Arc::new(Revocations::default());
        let auth = Authenticator::new(b"k".to_vec(), true, revoked.clone());
        let t = token::mint(b"k", "alice", 60);
        let iat = auth.identify(&t).expect("valid").issued_at;
        assert!(iat > 0);
        revoked.set("alice", iat);
        assert_eq!(auth.authenticate(&t).ok().as_deref(), Some("alice"));
        revoked.set("alice", iat + 1);
        assert_eq!(
            auth.authenticate(&t).map_err(|e| e.code),
            Err(ErrorCode::TokenRevoked)
        );
        // A bare dev-auth id has no iat: any revocation refuses it.
        assert_eq!(
            auth.authenticate("alice").map_err(|e| e.code),
            Err(ErrorCode::TokenRevoked)
        );
        assert_eq!(auth.authenticate("bob").ok().as_deref(), Some("bob"));
    }

    #[test]
    fn id_shapes() {
        assert!(valid_id("bob.smith@x-y_1"));
        assert!(!valid_id(""));
        assert!(!valid_id("a\0b"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
