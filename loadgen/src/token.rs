//! Parley login tokens, minted from the broker's shared secret: HS256 JWTs with the claims
//! `sub` (user), `dev` (device) and `exp` (expiry, Unix seconds).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How long minted tokens stay valid.
pub const VALIDITY_SECS: u64 = 24 * 3600;

/// Signs tokens with one secret.
#[derive(Clone)]
pub struct Minter {
    mac: Hmac<Sha256>,
    header: String,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Minter(<secret>)")
    }
}

impl Minter {
    /// A minter for `secret` (its bytes, as the broker uses them).
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length, so this cannot fail; fall back to an empty key anyway.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
        Self {
            mac,
            header: URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        }
    }

    /// Reads the secret the way the broker does: the trimmed text of `<data_dir>/secret`.
    ///
    /// # Errors
    ///
    /// The file cannot be read or holds only whitespace.
    pub fn from_data_dir(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join("secret");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the token secret {}: {e}", path.display()))?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(format!("the token secret {} is empty", path.display()));
        }
        Ok(Self::new(secret.as_bytes()))
    }

    /// A token for `user` on `device`, valid for [`VALIDITY_SECS`].
    pub fn mint(&self, user: &str, device: &str) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + VALIDITY_SECS;
        let claims = serde_json::json!({ "sub": user, "dev": device, "exp": exp });
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut mac = self.mac.clone();
        mac.update(input.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_has_three_parts_and_names_user_and_device() {
        let t = Minter::new(b"k").mint("alice", "d0");
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["dev"], "d0");
    }

    #[test]
    fn the_secret_file_is_read_trimmed() {
        let dir = std::env::temp_dir().join(format!("lg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("secret"), "abc\n").expect("write");
        let a = Minter::from_data_dir(&dir).expect("reads").mint("u", "d");
        let b = Minter::new(b"abc").mint("u", "d");
        assert_eq!(a.split('.').nth(2), b.split('.').nth(2));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
