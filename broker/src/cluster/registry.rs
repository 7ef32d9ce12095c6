//! The node registry in Redis: what a registration is, the two scripts that read and write it,
//! and the membership view built from their answers (pure code, no I/O).
//!
//! Data model (one Redis, not Redis Cluster: the scripts touch keys they compute):
//!
//! * `parley:cluster:node:<id>`, a hash: `boot` (the boot id of the process holding the id),
//!   `advertise`, `started_ms`, `renewed_ms`, `expires_ms`, with a TTL of the node's `lease_ms`
//!   (`PEXPIRE`), so a dead node's registration goes away on its own.
//! * `parley:cluster:nodes`, a sorted set: node id → lease expiry (ms), the membership index.
//!
//! Every time is Redis's own (`TIME` inside the scripts), so the nodes' clocks never have to
//! agree. A heartbeat is one script run ([`HEARTBEAT`]): renew (or create) this node's lease
//! unless another boot holds the id, drop expired entries from the index, and return every
//! live member. Leaving is another ([`LEAVE`]): delete the registration if this boot holds it.

use std::collections::BTreeMap;

/// The prefix of every key of the registry.
pub(crate) const KEY_PREFIX: &str = "parley:cluster:";

/// The registration key of node `id`.
pub(crate) fn node_key(id: &str) -> String {
    format!("{KEY_PREFIX}node:{id}")
}

/// The membership index (sorted set of node id → lease expiry).
pub(crate) fn index_key() -> String {
    format!("{KEY_PREFIX}nodes")
}

/// The heartbeat. KEYS: the node's key, the index. ARGV: node id, boot id, advertise address
/// (`""` for none), start time (ms), lease (ms), the key prefix of registrations. Returns, as
/// strings: `ok` or `conflict`, Redis's time now (ms), the holder's boot id and last renewal
/// (`""` when the id was free), then 6 strings per live member: id, boot, advertise,
/// started_ms, renewed_ms, expires_ms.
pub(crate) const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('HMGET', KEYS[1], 'boot', 'renewed_ms')
local status = 'ok'
if holder[1] and holder[1] ~= ARGV[2] then
  status = 'conflict'
else
  local lease = tonumber(ARGV[5])
  redis.call('HSET', KEYS[1], 'boot', ARGV[2], 'advertise', ARGV[3], 'started_ms', ARGV[4],
    'renewed_ms', string.format('%.0f', now), 'expires_ms', string.format('%.0f', now + lease))
  redis.call('PEXPIRE', KEYS[1], lease)
  redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local out = {status, string.format('%.0f', now), holder[1] or '', holder[2] or ''}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local h = redis.call('HMGET', ARGV[6] .. id, 'boot', 'advertise', 'started_ms', 'renewed_ms',
    'expires_ms')
  if h[1] then
    table.insert(out, id)
    for i = 1, 5 do table.insert(out, h[i] or '') end
  end
end
return out
";

/// Leaving. KEYS: the node's key, the index. ARGV: node id, boot id. Deletes the registration
/// and the index entry if this boot holds them; returns 1 if it did, else 0.
pub(crate) const LEAVE: &str = r"
if redis.call('HGET', KEYS[1], 'boot') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
";

/// One live node, as the registry says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Member {
    /// Its node id.
    pub(crate) node_id: String,
    /// The boot id of the process holding it (new at every start).
    pub(crate) boot_id: String,
    /// The address other nodes reach it at, if it published one.
    pub(crate) advertise: Option<String>,
    /// When it started (Unix ms, its own clock).
    pub(crate) started_ms: u64,
    /// When it last renewed its lease (Unix ms, Redis's clock).
    pub(crate) renewed_ms: u64,
    /// When its lease expires unless renewed (Unix ms, Redis's clock).
    pub(crate) lease_expires_ms: u64,
}

/// What one heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Beat {
    /// Whether this process holds its node id (false: another boot does).
    pub(crate) held: bool,
    /// Redis's time (Unix ms).
    pub(crate) now_ms: u64,
    /// The boot id that held the node id before this heartbeat, if any.
    pub(crate) holder_boot: Option<String>,
    /// When that holder last renewed (Redis's ms), if any.
    pub(crate) holder_renewed_ms: Option<u64>,
    /// Every live member, by node id.
    pub(crate) members: BTreeMap<String, Member>,
}

/// A heartbeat's answer that is not what [`HEARTBEAT`] returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected answer from the registry script: {0}")]
pub(crate) struct BadReply(pub(crate) String);

/// Reads the answer of [`HEARTBEAT`].
pub(crate) fn parse_beat(reply: &[String]) -> Result<Beat, BadReply> {
    let [status, now, holder, holder_renewed, rest @ ..] = reply else {
        return Err(BadReply(format!(
            "{} strings, expected at least 4",
            reply.len()
        )));
    };
    let held = match status.as_str() {
        "ok" => true,
        "conflict" => false,
        other => return Err(BadReply(format!("status {other:?}"))),
    };
    let number = |what: &str, s: &str| {
        s.parse::<u64>()
            .map_err(|_| BadReply(format!("{what} {s:?} is not a number")))
    };
    let optional = |s: &String| (!s.is_empty()).then(|| s.clone());
    if rest.len() % 6 != 0 {
        return Err(BadReply(format!(
            "{} member strings, not a multiple of 6",
            rest.len()
        )));
    }
    let mut members = BTreeMap::new();
    for m in rest.chunks_exact(6) {
        let member = Member {
            node_id: m[0].clone(),
            boot_id: m[1].clone(),
            advertise: optional(&m[2]),
            started_ms: number("started_ms", &m[3])?,
            renewed_ms: number("renewed_ms", &m[4])?,
            lease_expires_ms: number("expires_ms", &m[5])?,
        };
        members.insert(member.node_id.clone(), member);
    }
    Ok(Beat {
        held,
        now_ms: number("time", now)?,
        holder_boot: optional(holder),
        holder_renewed_ms: if holder_renewed.is_empty() {
            None
        } else {
            Some(number("holder renewed_ms", holder_renewed)?)
        },
        members,
    })
}

/// A change of the membership between two views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A node appeared.
    Joined(Member),
    /// A node's id is now held by a new boot (it restarted within its lease, or was replaced).
    Restarted {
        /// The boot id before.
        old_boot: String,
        /// The member now.
        member: Member,
    },
    /// A node disappeared (it left, or its lease expired).
    Left(Member),
}

/// The changes from `before` to `after`, in node id order (joins and restarts, then leaves).
pub(crate) fn diff(
    before: &BTreeMap<String, Member>,
    after: &BTreeMap<String, Member>,
) -> Vec<Change> {
    let mut out = Vec::new();
    for (id, m) in after {
        match before.get(id) {
            None => out.push(Change::Joined(m.clone())),
            Some(old) if old.boot_id != m.boot_id => out.push(Change::Restarted {
                old_boot: old.boot_id.clone(),
                member: m.clone(),
            }),
            Some(_) => {}
        }
    }
    for (id, m) in before {
        if !after.contains_key(id) {
            out.push(Change::Left(m.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_heartbeat_answer_is_parsed_and_bad_ones_are_errors() {
        let beat = parse_beat(&strings(&[
            "ok", "1000", "", "", "a", "b1", "", "5", "900", "2000", "b", "b2", "h:1", "6", "950",
            "1950",
        ]))
        .expect("parses");
        assert!(beat.held);
        assert_eq!(beat.now_ms, 1000);
        assert_eq!(beat.holder_boot, None);
        assert_eq!(beat.members.len(), 2);
        assert_eq!(beat.members["b"].advertise.as_deref(), Some("h:1"));
        assert_eq!(beat.members["a"].lease_expires_ms, 2000);
        let conflict = parse_beat(&strings(&["conflict", "7", "other", "5"])).expect("parses");
        assert!(!conflict.held);
        assert_eq!(conflict.holder_boot.as_deref(), Some("other"));
        assert_eq!(conflict.holder_renewed_ms, Some(5));
        assert!(parse_beat(&strings(&["ok"])).is_err());
        assert!(parse_beat(&strings(&["maybe", "1", "", ""])).is_err());
        assert!(parse_beat(&strings(&["ok", "x", "", ""])).is_err());
        assert!(parse_beat(&strings(&["ok", "1", "", "", "a", "b"])).is_err());
        assert!(parse_beat(&strings(&["ok", "1", "", "", "a", "b", "", "x", "1", "1"])).is_err());
    }

    #[test]
    fn diff_names_joins_restarts_and_leaves() {
        let m = |id: &str, boot: &str| Member {
            node_id: id.into(),
            boot_id: boot.into(),
            advertise: None,
            started_ms: 0,
            renewed_ms: 0,
            lease_expires_ms: 0,
        };
        let view = |ms: &[Member]| {
            ms.iter()
                .map(|m| (m.node_id.clone(), m.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let before = view(&[m("a", "1"), m("b", "1")]);
        let after = view(&[m("a", "1"), m("b", "2"), m("c", "1")]);
        assert_eq!(
            diff(&before, &after),
            vec![
                Change::Restarted {
                    old_boot: "1".into(),
                    member: m("b", "2")
                },
                Change::Joined(m("c", "1")),
            ]
        );
        assert_eq!(diff(&after, &before)[1], Change::Left(m("c", "1")));
        assert!(diff(&before, &before).is_empty());
    }
}
