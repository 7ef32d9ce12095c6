//! Where a cluster places users and conversations: the hash and the rendezvous choice every node
//! (and any client that wants to connect straight to its home node) computes alike.
//!
//! * [`stable_hash`]: a stable 64-bit hash of bytes (FNV-1a, then a SplitMix64 finalizer for an
//!   even spread). A conversation's id is the stable hash of its key and is stored in the logs,
//!   so it must never change.
//! * [`rendezvous`]: of a cluster's node ids, the one with the highest weight for a hash
//!   (highest-random-weight hashing): every node computes the same node with no shared state,
//!   and adding a node moves only what the new node takes.
//!
//! A user's home node is `rendezvous(nodes, stable_hash(user))` ([`home_node`]); a
//! conversation's owner node is `rendezvous(nodes, id)` of its id.

/// A SplitMix64 finalizer.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Stable 64-bit hash of `bytes` (never 0).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone spreads poorly in its low bits, which pick the shard.
    mix(h).max(1)
}

/// The index in `salts` (each node's [`stable_hash`] of its id) of the node with the highest
/// rendezvous weight for `h` (0 if `salts` is empty).
pub fn rendezvous_of_salts(salts: &[u64], h: u64) -> usize {
    let mut best = (0, 0);
    for (i, &salt) in salts.iter().enumerate() {
        let w = mix(salt ^ h);
        if i == 0 || w > best.1 {
            best = (i, w);
        }
    }
    best.0
}

/// The index in `nodes` (node ids, in any order) of the node with the highest rendezvous weight
/// for `h`.
pub fn rendezvous<S: AsRef<str>>(nodes: &[S], h: u64) -> usize {
    let salts: Vec<u64> = nodes
        .iter()
        .map(|n| stable_hash(n.as_ref().as_bytes()))
        .collect();
    rendezvous_of_salts(&salts, h)
}

/// The index in `nodes` (node ids, in any order) of `user`'s home node.
pub fn home_node<S: AsRef<str>>(nodes: &[S], user: &str) -> usize {
    rendezvous(nodes, stable_hash(user.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_across_versions() {
        // Conversation ids are stored in logs: this value must never change.
        assert_eq!(stable_hash(b"d5:alicebob"), 4_452_409_486_685_702_869);
    }

    #[test]
    fn the_home_does_not_depend_on_the_order_of_the_list() {
        let a = ["n1", "n2", "n3"];
        let b = ["n3", "n1", "n2"];
        for i in 0..500 {
            let user = format!("user{i}");
            assert_eq!(a[home_node(&a, &user)], b[home_node(&b, &user)]);
        }
    }
}
