//! Who is connecting: token verification behind a trait, with HS256 JWT as the default.
//!
//! A token names a user and a device and has an expiry. The broker only ever asks a
//! [`TokenVerifier`] "who is this?"; an application that embeds the broker plugs in its own
//! verifier (its session store, an RS256 key set, ...). [`Hs256`] is the default: a JWT
//! (RFC 7519) signed with HMAC-SHA256 under a shared secret, with the claims
//!
//! * `sub`: the user id (1..=128 bytes),
//! * `dev`: the device id (1..=64 bytes),
//! * `exp`: expiry, seconds since the Unix epoch (required),
//! * `nbf` (optional): not valid before, seconds since the Unix epoch.
//!
//! Only `alg: HS256` is accepted (never `none`, never an algorithm the token picks). Signatures are
//! compared in constant time. Time is passed in; nothing here reads a clock.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Longest token accepted, in bytes; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest user id accepted in a token, in bytes.
pub const MAX_USER_BYTES: usize = 128;
/// Longest device id accepted in a token, in bytes.
pub const MAX_DEVICE_BYTES: usize = 64;

/// The identity a valid token proves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The user id (`sub`).
    pub user: String,
    /// The device id (`dev`).
    pub device: String,
    /// Expiry, seconds since the Unix epoch (`exp`).
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no token was presented")]
    Missing,
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// The token is not three base64url parts of JSON, or a claim is missing or malformed.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than HS256.
    #[error("unsupported token algorithm (only HS256 is accepted)")]
    UnsupportedAlgorithm,
    /// The signature does not verify under the configured secret.
    #[error("bad token signature")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` lies in the future.
    #[error("token not yet valid")]
    NotYetValid,
}

/// Decides who a token belongs to. Implement this to plug an application's own authentication
/// into an embedded broker.
pub trait TokenVerifier: Send + Sync + fmt::Debug {
    /// Verifies `token` at `now_secs` (seconds since the Unix epoch) and returns who it names.
    fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, AuthError>;
}

/// HS256 JWTs under one shared secret: the default [`TokenVerifier`], and the minter behind
/// `broker token`.
#[derive(Clone)]
pub struct Hs256 {
    secret: Vec<u8>,
}

impl fmt::Debug for Hs256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Hs256")
            .field("secret", &"<redacted>")
            .finish()
    }
}

const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"; // {"alg":"HS256","typ":"JWT"}

#[derive(serde::Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: &'a str,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Claims {
    sub: String,
    dev: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

impl Hs256 {
    /// A verifier and minter for `secret` (use at least 32 random bytes).
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// A 32-byte key derived from the secret for another purpose (HMAC-SHA256 of `label`
    /// under the secret), so the secret itself is used for tokens only.
    pub(crate) fn derive_key(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// Mints a token for `user` on `device`, valid until `expires_at` (seconds since the epoch).
    pub fn mint(&self, user: &str, device: &str, expires_at: u64) -> String {
        let claims = Claims {
            sub: user.to_owned(),
            dev: device.to_owned(),
            exp: expires_at,
            nbf: None,
        };
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = String::with_capacity(256);
        token.push_str(HEADER_B64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(json, &mut token);
        let mut mac = self.mac();
        mac.update(token.as_bytes());
        let sig = mac.finalize().into_bytes();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);
        token
    }
}

impl TokenVerifier for Hs256 {
    fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let parsed: Header<'_> = serde_json::from_slice(&header_json)
            .map_err(|_| AuthError::Malformed("header is not a JSON object with alg"))?;
        if parsed.alg != "HS256" {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let signed_len = header.len() + 1 + payload.len();
        let mut mac = self.mac();
        mac.update(&token.as_bytes()[..signed_len]);
        mac.verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
        // Only a correctly signed payload is parsed.
        let claims_json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AuthError::Malformed("payload is not base64url"))?;
        let claims: Claims = serde_json::from_slice(&claims_json)
            .map_err(|_| AuthError::Malformed("claims need string sub, string dev, integer exp"))?;
        if claims.sub.is_empty() || claims.sub.len() > MAX_USER_BYTES {
            return Err(AuthError::Malformed("sub must be 1..=128 bytes"));
        }
        if claims.dev.is_empty() || claims.dev.len() > MAX_DEVICE_BYTES {
            return Err(AuthError::Malformed("dev must be 1..=64 bytes"));
        }
        if claims.exp <= now_secs {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now_secs) {
            return Err(AuthError::NotYetValid);
        }
        Ok(Identity {
            user: claims.sub,
            device: claims.dev,
            expires_at: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn hs() -> Hs256 {
        Hs256::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    #[test]
    fn minted_token_verifies_to_its_user_and_device() {
        let t = hs().mint("alice", "phone", NOW + 60);
        let id = hs().verify(&t, NOW).expect("valid");
        assert_eq!(id.user, "alice");
        assert_eq!(id.device, "phone");
        assert_eq!(id.expires_at, NOW + 60);
    }

    #[test]
    fn token_signed_with_another_secret_is_refused() {
        let t = Hs256::new(b"another secret".to_vec()).mint("alice", "phone", NOW + 60);
        assert_eq!(hs().verify(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn expired_token_is_refused() {
        let t = hs().mint("alice", "phone", NOW);
        assert_eq!(hs().verify(&t, NOW), Err(AuthError::Expired));
    }

    #[test]
    fn empty_token_is_missing() {
        assert_eq!(hs().verify("", NOW), Err(AuthError::Missing));
    }

    #[test]
    fn alg_none_is_refused_even_without_signature() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","dev":"x","exp":9999999999}"#);
        let t = format!("{header}.{claims}.");
        assert_eq!(hs().verify(&t, NOW), Err(AuthError::UnsupportedAlgorithm));
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let t = hs().mint("alice", "phone", NOW + 60);
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","dev":"phone","exp":9999999999}"#);
        parts[1] = &forged;
        assert_eq!(
            hs().verify(&parts.join("."), NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for t in ["x", "a.b", "a.b.c.d", "!!!.!!!.!!!", "e30.e30.e30", "...."] {
            let r = hs().verify(t, NOW);
            assert!(
                matches!(
                    r,
                    Err(AuthError::Malformed(_)) | Err(AuthError::BadSignature)
                ),
                "{t}: {r:?}"
            );
        }
    }

    #[test]
    fn overlong_token_is_refused_before_parsing() {
        let t = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(hs().verify(&t, NOW), Err(AuthError::TooLong));
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let s = format!("{:?}", hs());
        assert!(!s.contains("0123456789"), "{s}");
    }
}
