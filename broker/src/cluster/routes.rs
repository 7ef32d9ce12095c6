//! The presence index in Redis: user, device → (node, boot, connection). Its data model, the
//! scripts that write and read it, and this node's own copy of its routes with the digest that
//! tells whether Redis still holds them (pure code, no I/O).
//!
//! Data model (one Redis, not Redis Cluster: the scripts touch keys they compute):
//!
//! * `parley:presence:<user>`, a hash: device → `<node id> <boot id> <tag>` (the tag names the
//!   connection within its process, [`RouteTag`]), with a TTL of `cluster.route_ttl_ms` that
//!   each writer renews. A device has one route: the connection that logged in last, wherever.
//! * `parley:cluster:digest:<node id>`, a hash: `boot`, `count`, `xor`: how many route writes
//!   of this boot Redis has applied, net, and the XOR of their 32-bit fingerprints. The route
//!   script ([`ROUTES`]) updates it in the same atomic step as the routes and returns it.
//!
//! The node keeps its routes ([`Mirror`]) and the same digest. After every batch it compares
//! the two; a difference (Redis restarted empty, failed over to a replica that missed writes,
//! a batch whose answer was lost and that ran twice) makes it **replay**: reset the digest and
//! write every route again. An idle node checks with an empty batch at each heartbeat.
//!
//! Withdrawing a route deletes it only if it still names the same connection, so a device that
//! logged in again (here or elsewhere) keeps its newer route. Readers ([`LOOKUP`]) drop routes
//! that name a node whose registration is gone or held by another boot; if that boot's digest
//! is still there (the node was paused or cut off past its lease, not dead), they spoil it, so
//! that the node, once it renews its lease, finds the difference and writes its routes again.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::core::{RouteOp, RouteTag};

/// The prefix of the per-user route keys.
pub(crate) const PRESENCE_PREFIX: &str = "parley:presence:";

/// The digest key of node `id`.
pub(crate) fn digest_key(id: &str) -> String {
    format!("{}{id}", digest_prefix())
}

/// The key prefix of digests.
pub(crate) fn digest_prefix() -> String {
    format!("{}digest:", super::registry::KEY_PREFIX)
}

/// Most route ops in one script run.
pub(crate) const BATCH: usize = 512;

/// Writes routes. KEYS: the node's digest key. ARGV: boot id, route TTL (ms), the presence key
/// prefix, `1` to start the digest again from `{0, 0}` (the first run of a boot, a replay) else
/// `0`, then 5 strings per op: `U` (register), `D` (withdraw), `X` (withdraw a route the digest
/// does not count), `R` (renew the TTL only); user, device, value (`<node> <boot> <tag>`),
/// fingerprint (a 32-bit integer). Returns the digest after the batch, `{count, xor}`, or
/// `{-1, xor}` while the digest is **spoiled**: Redis lost it (restarted, failed over: it is
/// missing or of another boot without a reset) or a reader dropped routes of this boot
/// ([`LOOKUP`]). Only a reset clears that, so no later drift can make a spoiled digest match.
pub(crate) const ROUTES: &str = r"
local d = KEYS[1]
local boot, ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local h = redis.call('HMGET', d, 'boot', 'count', 'xor', 'spoiled')
local count, x, spoiled = 0, 0, '1'
if ARGV[4] == '1' then
  spoiled = '0'
elseif h[1] == boot then
  count, x, spoiled = tonumber(h[2]) or 0, tonumber(h[3]) or 0, h[4] or '0'
end
for i = 5, #ARGV, 5 do
  local op, key, dev, val, f = ARGV[i], prefix .. ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  if op == 'U' then
    redis.call('HSET', key, dev, val)
    redis.call('PEXPIRE', key, ttl)
    count = count + 1
    x = bit.bxor(x, f)
  elseif op == 'D' or op == 'X' then
    if redis.call('HGET', key, dev) == val then
      redis.call('HDEL', key, dev)
    end
    if op == 'D' then
      count = count - 1
      x = bit.bxor(x, f)
    end
  else
    redis.call('PEXPIRE', key, ttl)
  end
end
redis.call('HSET', d, 'boot', boot, 'count', count, 'xor', x, 'spoiled', spoiled)
redis.call('PEXPIRE', d, ttl)
if spoiled == '1' then
  return {-1, x}
end
return {count, x}
";

/// Reads a user's routes. KEYS: the user's presence key. ARGV: the key prefix of node
/// registrations, the key prefix of digests. Returns 3 strings per live route: device, node id,
/// boot id. A route naming a node that is not registered under that boot any more is deleted on
/// the way, and that boot's digest, if it has one, is spoiled (see [`ROUTES`]), so a node that
/// comes back from a pause replays its routes.
pub(crate) const LOOKUP: &str = r"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local dev, val = all[i], all[i + 1]
  local node, boot = string.match(val, '^(%S+) (%S+) ')
  if node and redis.call('HGET', ARGV[1] .. node, 'boot') == boot then
    table.insert(out, dev)
    table.insert(out, node)
    table.insert(out, boot)
  else
    redis.call('HDEL', KEYS[1], dev)
    if node and redis.call('HGET', ARGV[2] .. node, 'boot') == boot then
      redis.call('HSET', ARGV[2] .. node, 'spoiled', '1')
    end
  end
end
return out
";

/// The digest of a set of routes: how many, and the XOR of their fingerprints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Digest {
    /// Net registrations.
    pub(crate) count: i64,
    /// XOR of the fingerprints (Lua's `bit` works on signed 32-bit integers).
    pub(crate) xor: i32,
}

impl Digest {
    /// The digest after adding or removing a route with fingerprint `f`.
    fn toggle(&mut self, f: i32, up: bool) {
        self.count += if up { 1 } else { -1 };
        self.xor ^= f;
    }
}

/// The fingerprint of one route (FNV-1a over user, device and tag, folded to 32 bits).
pub(crate) fn fingerprint(user: &str, device: &str, tag: RouteTag) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let tag = tag.to_string();
    for part in [
        user.as_bytes(),
        &[0],
        device.as_bytes(),
        &[0],
        tag.as_bytes(),
    ] {
        for &b in part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    ((h >> 32) ^ h) as u32 as i32
}

/// The value of a route: `<node id> <boot id> <tag>`.
pub(crate) fn value(node_id: &str, boot_id: &str, tag: RouteTag) -> String {
    format!("{node_id} {boot_id} {tag}")
}

/// One route of this node, as the mirror keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) user: Arc<str>,
    pub(crate) device: Arc<str>,
}

/// This node's routes as it last wrote them to Redis, and their digest.
#[derive(Debug, Default)]
pub(crate) struct Mirror {
    routes: BTreeMap<RouteTag, Route>,
    digest: Digest,
    /// Where the rolling TTL renewal goes on from.
    cursor: Option<RouteTag>,
}

impl Mirror {
    /// Takes in a written op (an `R` changes nothing).
    pub(crate) fn apply(&mut self, op: &RouteOp) {
        match op {
            RouteOp::Up {
                user, device, tag, ..
            } => {
                let route = Route {
                    user: Arc::clone(user),
                    device: Arc::clone(device),
                };
                if let Some(old) = self.routes.insert(*tag, route) {
                    // The same tag twice (cannot happen: tags are unique per process); keep the
                    // digest equal to the set's.
                    self.digest
                        .toggle(fingerprint(&old.user, &old.device, *tag), false);
                }
                self.digest.toggle(fingerprint(user, device, *tag), true);
            }
            RouteOp::Down { tag, .. } => {
                if let Some(old) = self.routes.remove(tag) {
                    self.digest
                        .toggle(fingerprint(&old.user, &old.device, *tag), false);
                }
            }
        }
        debug_assert_eq!(self.digest.count, self.routes.len() as i64);
    }

    /// The digest of the routes held.
    pub(crate) fn digest(&self) -> Digest {
        self.digest
    }

    /// How many routes are held.
    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the route of `tag` is held.
    pub(crate) fn holds(&self, tag: RouteTag) -> bool {
        self.routes.contains_key(&tag)
    }

    /// Every route, as `Up` ops (a replay).
    pub(crate) fn all(&self) -> Vec<RouteOp> {
        self.routes.iter().map(|(tag, r)| up(*tag, r)).collect()
    }

    /// The next `n` routes of the rolling TTL renewal (wrapping around).
    pub(crate) fn next_to_renew(&mut self, n: usize) -> Vec<(RouteTag, Route)> {
        let mut out = Vec::with_capacity(n.min(self.routes.len()));
        let start = self.cursor;
        let after = |t: &RouteTag| start.is_none_or(|s| *t > s);
        for (tag, r) in self.routes.iter().filter(|(t, _)| after(t)).take(n) {
            out.push((*tag, r.clone()));
        }
        if out.len() < n {
            let more = n - out.len();
            for (tag, r) in self.routes.iter().take(more) {
                if out.iter().any(|(t, _)| t == tag) {
                    break;
                }
                out.push((*tag, r.clone()));
            }
        }
        self.cursor = out.last().map(|(t, _)| *t);
        out
    }
}

/// The `Up` op of a held route.
fn up(tag: RouteTag, r: &Route) -> RouteOp {
    RouteOp::Up {
        ticket: None,
        user: Arc::clone(&r.user),
        device: Arc::clone(&r.device),
        tag,
    }
}

/// A [`ROUTES`] answer that is not `{count, xor}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected answer from the route script: {0}")]
pub(crate) struct BadDigest(pub(crate) String);

/// Reads the answer of [`ROUTES`].
pub(crate) fn parse_digest(reply: &[i64]) -> Result<Digest, BadDigest> {
    match reply {
        [count, xor] => Ok(Digest {
            count: *count,
            xor: i32::try_from(*xor).map_err(|_| BadDigest(format!("xor {xor}")))?,
        }),
        other => Err(BadDigest(format!("{} integers, expected 2", other.len()))),
    }
}

/// One live route of a user, as [`LOOKUP`] answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Found {
    /// The device.
    pub(crate) device: String,
    /// The node it is connected to.
    pub(crate) node_id: String,
    /// That node's boot.
    pub(crate) boot_id: String,
}

/// Reads the answer of [`LOOKUP`].
pub(crate) fn parse_lookup(reply: &[String]) -> Result<Vec<Found>, BadDigest> {
    if !reply.len().is_multiple_of(3) {
        return Err(BadDigest(format!(
            "{} strings, not 3 per route",
            reply.len()
        )));
    }
    let mut out: Vec<Found> = reply
        .chunks_exact(3)
        .map(|c| Found {
            device: c[0].clone(),
            node_id: c[1].clone(),
            boot_id: c[2].clone(),
        })
        .collect();
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(slot: u32) -> RouteTag {
        RouteTag {
            shard: 0,
            slot,
            generation: 1,
        }
    }

    fn op_up(user: &str, device: &str, slot: u32) -> RouteOp {
        RouteOp::Up {
            ticket: None,
            user: user.into(),
            device: device.into(),
            tag: tag(slot),
        }
    }

    fn op_down(user: &str, device: &str, slot: u32) -> RouteOp {
        RouteOp::Down {
            user: user.into(),
            device: device.into(),
            tag: tag(slot),
        }
    }

    #[test]
    fn digest_is_that_of_the_set_whatever_the_order() {
        let mut a = Mirror::default();
        let mut b = Mirror::default();
        a.apply(&op_up("alice", "phone", 1));
        a.apply(&op_up("bob", "laptop", 2));
        a.apply(&op_up("carol", "tab", 3));
        a.apply(&op_down("bob", "laptop", 2));
        b.apply(&op_up("carol", "tab", 3));
        b.apply(&op_up("alice", "phone", 1));
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().count, 2);
        assert_ne!(a.digest(), Digest::default());
    }

    #[test]
    fn a_replay_of_all_routes_gives_the_same_digest_from_zero() {
        let mut m = Mirror::default();
        for i in 0..50 {
            m.apply(&op_up(&format!("u{i}"), "d", i));
        }
        let mut again = Mirror::default();
        for op in m.all() {
            again.apply(&op);
        }
        assert_eq!(again.digest(), m.digest());
    }

    #[test]
    fn a_withdrawal_of_an_unknown_route_changes_nothing() {
        let mut m = Mirror::default();
        m.apply(&op_up("alice", "phone", 1));
        let before = m.digest();
        m.apply(&op_down("alice", "phone", 9));
        assert_eq!(m.digest(), before);
    }

    #[test]
    fn renewal_walks_every_route_once_per_cycle() {
        let mut m = Mirror::default();
        for i in 0..10 {
            m.apply(&op_up(&format!("u{i}"), "d", i));
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend(m.next_to_renew(3).into_iter().map(|(t, _)| t.slot));
        }
        // 12 renewals over 10 routes: each once, then the first two again.
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
        let mut one = Mirror::default();
        one.apply(&op_up("a", "d", 7));
        assert_eq!(one.next_to_renew(5).len(), 1);
    }

    #[test]
    fn fingerprints_tell_routes_apart() {
        let a = fingerprint("ab", "c", tag(1));
        assert_ne!(a, fingerprint("a", "bc", tag(1)));
        assert_ne!(a, fingerprint("ab", "c", tag(2)));
    }

    #[test]
    fn lookup_answers_are_read_three_strings_per_route() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let found = parse_lookup(&s(&["tab", "n2", "b2", "phone", "n1", "b1"])).expect("parses");
        assert_eq!(found[0].device, "phone");
        assert_eq!(found[1].node_id, "n2");
        assert!(parse_lookup(&s(&["x"])).is_err());
        assert!(parse_digest(&[1]).is_err());
        assert_eq!(
            parse_digest(&[3, -5]).expect("parses"),
            Digest { count: 3, xor: -5 }
        );
    }
}
