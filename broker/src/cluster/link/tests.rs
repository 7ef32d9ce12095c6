//! Unit tests of the link handshake's proofs.
use super::*;

#[test]
fn a_proof_checks_only_with_the_same_key_nonce_and_identity() {
    let key = [7u8; 32];
    let p = prove(&key, b"parley-link/1 dial", b"nonce", "n1", "b1");
    assert!(verify(
        &key,
        b"parley-link/1 dial",
        b"nonce",
        "n1",
        "b1",
        &p
    ));
    assert!(!verify(
        &[8u8; 32],
        b"parley-link/1 dial",
        b"nonce",
        "n1",
        "b1",
        &p
    ));
    assert!(!verify(
        &key,
        b"parley-link/1 accept",
        b"nonce",
        "n1",
        "b1",
        &p
    ));
    assert!(!verify(
        &key,
        b"parley-link/1 dial",
        b"other",
        "n1",
        "b1",
        &p
    ));
    assert!(!verify(
        &key,
        b"parley-link/1 dial",
        b"nonce",
        "n2",
        "b1",
        &p
    ));
    assert!(!verify(
        &key,
        b"parley-link/1 dial",
        b"nonce",
        "n1",
        "b2",
        &p
    ));
    // The separator keeps ("n1", "b1") and ("n1b", "1") apart.
    assert!(!verify(
        &key,
        b"parley-link/1 dial",
        b"nonce",
        "n1b",
        "1",
        &p
    ));
    assert!(!verify(
        &key,
        b"parley-link/1 dial",
        b"nonce",
        "n1",
        "b1",
        &p[..31]
    ));
}
