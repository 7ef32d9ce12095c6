//! HS256 JWTs with the claims `sub`, `dev`, `exp` (RFC 7519), as the broker verifies them.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn mint(secret: &[u8], user: &str, device: &str, exp: u64) -> String {
    let claims = serde_json::json!({ "sub": user, "dev": device, "exp": exp }).to_string();
    sign(secret, HEADER, &claims)
}

/// `b64(header).b64(claims).b64(HMAC-SHA256 over the first two)`.
pub(crate) fn sign(secret: &[u8], header: &str, claims: &str) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_jwt_io_example() {
        let t = super::sign(
            b"your-256-bit-secret",
            super::HEADER,
            r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
        );
        assert!(
            t.ends_with(".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
            "{t}"
        );
    }
}
