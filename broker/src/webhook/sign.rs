//! What proves a POST came from this node and names it for de-duplication: the body's HMAC
//! signature and the batch's idempotency key.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The `X-Parley-Signature` value of `body` under `secret`: `sha256=` and the lower-case hex
/// HMAC-SHA256 of the exact bytes sent.
pub(crate) fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// The `Idempotency-Key` of a POST carrying the events `ids` (in body order): the event's own id
/// for one event; for several, `batch-` and the first 32 hex digits of the SHA-256 of the ids
/// joined by newlines, so a retry of the same batch carries the same key and another batch
/// another key.
pub(crate) fn idempotency_key<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids = ids.into_iter();
    let Some(first) = ids.next() else {
        return "batch-empty".to_owned();
    };
    let Some(second) = ids.next() else {
        return first.to_owned();
    };
    let mut hash = Sha256::new();
    hash.update(first.as_bytes());
    for id in std::iter::once(second).chain(ids) {
        hash.update(b"\n");
        hash.update(id.as_bytes());
    }
    let digest = hex(&hash.finalize());
    format!("batch-{}", &digest[..32])
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_rfc_4231_vectors() {
        // RFC 4231, test case 2 (a short key, as HMAC allows).
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // RFC 4231, test case 1: a 20-byte key of 0x0b.
        assert_eq!(
            signature(&[0x0b; 20], b"Hi There"),
            "sha256=b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn the_key_of_one_event_is_its_id_and_of_a_batch_a_hash_of_the_ids_in_order() {
        assert_eq!(idempotency_key(["n-1-7"]), "n-1-7");
        let ab = idempotency_key(["n-1-7", "n-1-8"]);
        assert!(
            ab.starts_with("batch-") && ab.len() == "batch-".len() + 32,
            "{ab}"
        );
        assert_eq!(ab, idempotency_key(["n-1-7", "n-1-8"]), "stable");
        assert_ne!(ab, idempotency_key(["n-1-8", "n-1-7"]), "order matters");
        assert_ne!(ab, idempotency_key(["n-1-7", "n-1-8", "n-1-9"]));
        // Joined with a separator no id contains: ["a", "bc"] is not ["ab", "c"].
        assert_ne!(idempotency_key(["a", "bc"]), idempotency_key(["ab", "c"]));
    }
}
