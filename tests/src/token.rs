//! Token minting, written independently of the broker's verifier: an HS256 JWT (RFC 7519) with
//! the claims `sub` (user), `dev` (device) and `exp` (expiry, Unix seconds), header
//! `{"alg":"HS256","typ":"JWT"}`, every part base64url without padding.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The JWT header every token carries.
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// How long a token minted by [`mint`]'s callers in the harness stays valid.
pub const VALIDITY_SECS: u64 = 3600;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// A token for `user` on `device`, signed with `secret`, expiring at `exp` (Unix seconds).
pub fn mint(secret: &[u8], user: &str, device: &str, exp: u64) -> String {
    let claims = serde_json::json!({ "sub": user, "dev": device, "exp": exp });
    sign(secret, HEADER, &claims.to_string())
}

/// A token valid for [`VALIDITY_SECS`] from now.
pub fn mint_valid(secret: &[u8], user: &str, device: &str) -> String {
    mint(secret, user, device, unix_now() + VALIDITY_SECS)
}

/// A JWT from the literal JSON of its header and claims: `b64(header).b64(claims).b64(mac)`,
/// where the MAC is HMAC-SHA256 over the first two parts joined by a dot.
pub fn sign(secret: &[u8], header_json: &str, claims_json: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(claims_json)
    );
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(signing_input.as_bytes());
    let signature = mac.finalize().into_bytes();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_well_known_jwt_example_identically() {
        // The HS256 example token published on jwt.io, secret "your-256-bit-secret".
        let token = sign(
            b"your-256-bit-secret",
            HEADER,
            r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
        );
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
             SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
        );
    }

    #[test]
    fn minted_claims_name_user_device_and_expiry() {
        let token = mint(b"k", "alice", "phone", 1_900_000_000);
        let claims = token.split('.').nth(1).expect("three parts");
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("base64url"))
                .expect("JSON claims");
        assert_eq!(json["sub"], "alice");
        assert_eq!(json["dev"], "phone");
        assert_eq!(json["exp"], 1_900_000_000u64);
    }
}
