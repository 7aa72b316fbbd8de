//! `resume_token`: resume tokens (`paystream::session::resume::ResumeKeys`), on arbitrary
//! strings and on issued tokens altered: bytes flipped, characters replaced, dropped, added or
//! re-cased, segments swapped with another token's (other claims, another secret), the header
//! replaced (another algorithm, `none`, the same one written differently), the claims re-signed
//! with HS384 or HS512 under the same secret, padding added, truncated.
//!
//! Properties:
//! - `verify` never panics, and refuses every arbitrary string;
//! - a token verifies iff it is exactly one issued under the same secret (and not expired):
//!   no alteration, however small, verifies; another secret's token never does;
//! - the claims read back are the ones issued (session, channel, token id, issue and expiry
//!   times), whatever the session and token ids contain.

use std::time::{SystemTime, UNIX_EPOCH};

use alloy::primitives::B256;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use paystream::session::resume::{ResumeClaims, ResumeKeys, TOKEN_LIFETIME_SECS};

use crate::input::Input;

/// jsonwebtoken's default leeway on `exp`.
const LEEWAY_SECS: u64 = 60;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// HMAC pads a key of up to 64 bytes (SHA-256's block) with zeros: `k` and `k || 0x00` are
/// the same key (found by this target, with one-byte secrets; a secret from the environment is
/// 32 random bytes or more, so no other secret anyone would configure is the same key).
fn same_hmac_key(a: &[u8], b: &[u8]) -> bool {
    let pad = |k: &[u8]| {
        let mut block = [0u8; 64];
        block[..k.len()].copy_from_slice(k);
        block
    };
    pad(a) == pad(b)
}

fn any_secret(input: &mut Input<'_>) -> Vec<u8> {
    if input.below(4) == 0 {
        let len = 1 + input.below(64);
        input.bytes(len).to_vec()
    } else {
        vec![7u8; 32]
    }
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let secret = any_secret(&mut input);
    let keys = ResumeKeys::new(&secret);
    if input.below(4) == 0 {
        let text = String::from_utf8_lossy(input.rest());
        assert!(
            keys.verify(&text).is_err(),
            "an arbitrary string verified: {text:?}"
        );
        return;
    }
    let now = now_secs();
    let sid = input.string(24);
    let jti = input.string(24);
    let channel = B256::from(input.array::<32>());
    // Issued now, a while ago, just inside or outside the lifetime, or in the future.
    let issued_at = match input.below(6) {
        // (Ten seconds from the edges: the clock moves while the target runs.)
        0 => now - TOKEN_LIFETIME_SECS - LEEWAY_SECS - 10 - u64::from(input.u8()),
        1 => now - TOKEN_LIFETIME_SECS + LEEWAY_SECS + 10 + u64::from(input.u8()),
        2 => now + u64::from(input.u64() as u32),
        _ => now - u64::from(input.u64() as u32 % 1_000_000),
    };
    let expires = issued_at + TOKEN_LIFETIME_SECS;
    let token = keys.issue(&sid, channel, &jti, issued_at);
    let expired = expires + LEEWAY_SECS < now;
    let verified = keys.verify(&token);
    if expired {
        assert!(verified.is_err(), "an expired token verified");
    } else {
        let claims = verified.expect("a fresh token verifies");
        let issued = ResumeClaims {
            sid: sid.clone(),
            ch: channel,
            jti: jti.clone(),
            iat: issued_at,
            exp: expires,
        };
        assert_eq!(claims, issued);
    }

    // Another secret verifies it only if it is the same HMAC key.
    let other = any_secret(&mut input);
    let under_other = ResumeKeys::new(&other).verify(&token);
    if same_hmac_key(&other, &secret) {
        assert_eq!(under_other.is_ok(), !expired);
    } else {
        assert!(under_other.is_err(), "verified under another secret");
    }

    // Alterations, each applied to the last: only a token issued with this key verifies
    // (a segment swap can rebuild another one issued here, whole).
    let mut issued = vec![(token.clone(), issued_at)];
    let mut altered = token.clone();
    let n = 1 + input.below(4);
    for _ in 0..n {
        altered = alter(
            &mut input,
            &altered,
            &mut issued,
            &keys,
            &secret,
            &sid,
            channel,
            &jti,
            issued_at,
        );
    }
    let result = keys.verify(&altered);
    if let Some((_, iat)) = issued.iter().find(|(t, _)| *t == altered) {
        if *iat + TOKEN_LIFETIME_SECS + LEEWAY_SECS < now {
            assert!(result.is_err(), "an expired token verified");
        } else {
            let claims = result.expect("an issued token verifies");
            assert_eq!((claims.iat, claims.exp), (*iat, iat + TOKEN_LIFETIME_SECS));
        }
    } else {
        assert!(
            result.is_err(),
            "an altered token verified: {token} -> {altered}"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn alter(
    input: &mut Input<'_>,
    token: &str,
    issued: &mut Vec<(String, u64)>,
    keys: &ResumeKeys,
    secret: &[u8],
    sid: &str,
    channel: B256,
    jti: &str,
    issued_at: u64,
) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let segments: Vec<&str> = token.split('.').collect();
    let len = bytes.len().max(1);
    match input.below(11) {
        0 => {
            let i = input.below(256) * len / 256;
            if let Some(b) = bytes.get_mut(i) {
                *b ^= 1 << input.below(8);
            }
        }
        1 => {
            let i = input.below(256) * len / 256;
            if let Some(b) = bytes.get_mut(i) {
                *b = ALPHABET[input.below(ALPHABET.len())];
            }
        }
        2 => {
            let i = input.below(256) * len / 256;
            if i < bytes.len() {
                bytes.remove(i);
            }
        }
        3 => {
            let i = input.below(256) * (len + 1) / 256;
            bytes.insert(i.min(bytes.len()), ALPHABET[input.below(ALPHABET.len())]);
        }
        4 => {
            // A segment from another token: other claims, or another secret.
            let (other, at) = match input.below(4) {
                0 => (
                    keys.issue(&format!("{sid}x"), channel, jti, issued_at),
                    Some(issued_at),
                ),
                1 => (
                    keys.issue(sid, channel, &format!("{jti}x"), issued_at),
                    Some(issued_at),
                ),
                2 => (
                    keys.issue(sid, channel, jti, issued_at + 1),
                    Some(issued_at + 1),
                ),
                _ => {
                    let elsewhere = ResumeKeys::new(&[secret, b"x"].concat());
                    (elsewhere.issue(sid, channel, jti, issued_at), None)
                }
            };
            if let Some(at) = at {
                issued.push((other.clone(), at));
            }
            let other: Vec<&str> = other.split('.').collect();
            let k = input.below(3);
            let mut mixed: Vec<&str> = segments.clone();
            if k < mixed.len() {
                mixed[k] = other[k];
            }
            return mixed.join(".");
        }
        5 => {
            let headers = [
                r#"{"typ":"JWT","alg":"HS256"}"#,
                r#"{"alg":"HS256"}"#,
                r#"{"alg":"HS384","typ":"JWT"}"#,
                r#"{"alg":"HS512","typ":"JWT"}"#,
                r#"{"alg":"none","typ":"JWT"}"#,
                r#"{"alg":"RS256","typ":"JWT"}"#,
                r#"{"alg":"ES256","typ":"JWT"}"#,
                r#"{"alg":"HS256","typ":"JWT","kid":"x"}"#,
            ];
            let header = b64(headers[input.below(headers.len())].as_bytes());
            let mut mixed: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
            if let Some(first) = mixed.first_mut() {
                *first = header;
            }
            if input.bool() && mixed.len() == 3 {
                // `none`'s form: no signature.
                mixed[2].clear();
            }
            return mixed.join(".");
        }
        6 => {
            // The same claims, signed under the same secret with another HMAC.
            let alg = [Algorithm::HS384, Algorithm::HS512][input.below(2)];
            let claims = ResumeClaims {
                sid: sid.to_string(),
                ch: channel,
                jti: jti.to_string(),
                iat: issued_at,
                exp: issued_at + TOKEN_LIFETIME_SECS,
            };
            return jsonwebtoken::encode(
                &Header::new(alg),
                &claims,
                &EncodingKey::from_secret(secret),
            )
            .expect("HMAC over serializable claims");
        }
        7 => {
            let i = input.below(256) * len / 256;
            bytes.truncate(i);
        }
        8 => {
            let i = input.below(256) * len / 256;
            if let Some(b) = bytes.get_mut(i) {
                if b.is_ascii_lowercase() {
                    b.make_ascii_uppercase();
                } else {
                    b.make_ascii_lowercase();
                }
            }
        }
        9 => {
            let k = input.below(3);
            let mut mixed: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
            if let Some(s) = mixed.get_mut(k) {
                s.push_str(["=", "==", "\n", " "][input.below(4)]);
            }
            return mixed.join(".");
        }
        _ => {
            let k = input.below(3);
            let mut mixed: Vec<&str> = segments.clone();
            if k < mixed.len() {
                let s = mixed[k];
                mixed.insert(k, s);
            }
            return mixed.join(".");
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
