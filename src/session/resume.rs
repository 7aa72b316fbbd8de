//! Resume tokens (DESIGN.md section 6): a JWT (HS256) bound to a session and its channel, with
//! a one-time `jti` that rotates on every resume.

use alloy::primitives::B256;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// How long a token's signature stays valid at most (the resume window, counted from the
/// disconnect, is checked separately by the registry).
pub const TOKEN_LIFETIME_SECS: u64 = 30 * 24 * 3600;

/// The claims of a resume token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeClaims {
    /// The session id.
    pub sid: String,
    /// The channel.
    pub ch: B256,
    /// One-time id: only the latest issued for the session is accepted.
    pub jti: String,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Expiry (unix seconds).
    pub exp: u64,
}

/// Why a resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Forged, expired, already used, for a session that is gone, or past the resume window:
    /// open the channel again with the latest voucher (close 4401).
    #[error("bad resume token: {0}")]
    BadToken(&'static str),
    /// An `open` on the session's channel is being stored right now, or the connection the
    /// session is on has not let go of it yet; the token stays good: retry in a moment
    /// (`channel_busy`, the connection stays open).
    #[error("the session's channel is busy; retry the resume in a moment")]
    Busy,
}

/// Issues and checks resume tokens with one server secret.
#[derive(Clone)]
pub struct ResumeKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for ResumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeKeys(..)")
    }
}

impl ResumeKeys {
    /// Keys from a secret (at least 32 bytes; from the environment, never a default outside
    /// the demo).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A token for `sid` on `channel` with one-time id `jti`, issued at `now_secs`.
    pub fn issue(&self, sid: &str, channel: B256, jti: &str, now_secs: u64) -> String {
        let claims = ResumeClaims {
            sid: sid.to_string(),
            ch: channel,
            jti: jti.to_string(),
            iat: now_secs,
            exp: now_secs + TOKEN_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 over serializable claims cannot fail")
    }

    /// The claims of a token signed with this secret and not expired.
    pub fn verify(&self, token: &str) -> Result<ResumeClaims, ResumeError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<ResumeClaims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| ResumeError::BadToken("invalid or expired token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let keys = ResumeKeys::new(&[7u8; 32]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = keys.issue("s1", B256::repeat_byte(1), "j1", now);
        let claims = keys.verify(&token).unwrap();
        assert_eq!(
            (claims.sid.as_str(), claims.jti.as_str(), claims.ch),
            ("s1", "j1", B256::repeat_byte(1))
        );
        assert!(
            ResumeKeys::new(&[8u8; 32]).verify(&token).is_err(),
            "another secret"
        );
        let mut tampered = token.clone();
        tampered.push('x');
        assert!(keys.verify(&tampered).is_err());
        let expired = keys.issue("s1", B256::ZERO, "j", 1_000);
        assert!(keys.verify(&expired).is_err());
    }
}
