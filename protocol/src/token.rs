//! Login tokens: HS256 JSON Web Tokens, as real-time servers conventionally
//! take them. The claims are `sub` (the user id), `exp` and `iat` (seconds
//! since the Unix epoch). One module mints and verifies, so the server, the
//! CLI and loadgen can never disagree on the format.

use jsonwebtoken::{
    decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

/// The claims swiftlet reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mint a token for `user`, valid for `ttl_secs` from now.
pub fn mint(secret: &[u8], user: &str, ttl_secs: u64) -> String {
    let now = now_secs();
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl_secs,
        iat: now,
    };
    // Encoding claims made of a string and two integers with HS256 cannot fail.
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Verify `token`'s signature and expiry; return its claims.
pub fn verify(secret: &[u8], token: &str) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => match e.kind() {
            ErrorKind::ExpiredSignature => Err(TokenError::Expired),
            _ => Err(TokenError::Invalid(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = mint(b"s3cret", "alice", 60);
        assert_eq!(verify(b"s3cret", &t).map(|c| c.sub), Ok("alice".to_owned()));
    }

    #[test]
    fn forged_and_expired_are_refused() {
        let t = mint(b"s3cret", "alice", 60);
        assert!(matches!(verify(b"other", &t), Err(TokenError::Invalid(_))));
        let claims = Claims {
            sub: "alice".into(),
            exp: 1,
            iat: 0,
        };
        let old = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .expect("encode");
        assert_eq!(verify(b"s3cret", &old), Err(TokenError::Expired));
        assert!(matches!(
            verify(b"s3cret", "not a jwt"),
            Err(TokenError::Invalid(_))
        ));
    }
}
