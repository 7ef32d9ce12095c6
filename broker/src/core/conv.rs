//! Conversation identity, kind and placement.
//!
//! * **Identity.** A conversation has a canonical key. A direct conversation between users `a`
//!   and `b` has the key `d<len(a)>:<a><b>` with `a <= b` (byte order), unambiguous whatever
//!   characters user ids contain. A group `g` has the key `g:<g>`. Its id is a stable 64-bit hash of the key (FNV-1a, then a
//!   SplitMix64 finalizer for an even spread); ids are stored in the log, so the hash must never
//!   change. Two keys with the same id (a collision) are detected by the owner, which keeps the
//!   key beside the id, and refused.
//! * **Kind** ([`ConvKind`]): direct (its two users come from the key) or group (its members
//!   come from membership records, kept by the owner: [`super::group`]).
//! * **Placement** ([`Placement`]): which shard owns a conversation (its seq counter, de-dup
//!   windows and log) and which shard is a user's home (connections, inbox). In a cluster the
//!   same seam answers which node.

use std::sync::Arc;

use parley_proto::pb;

pub(crate) use parley_proto::placement::stable_hash;

/// Longest conversation id a client may name (bytes of UTF-8).
pub(crate) const MAX_CONV_ID_BYTES: usize = 128;

/// What kind of conversation a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvKind {
    /// Two users (a user may also write to itself).
    Direct,
    /// A group with an explicit member list.
    Group,
}

/// A conversation as the core knows it: key, id, kind and the users who receive its messages.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    /// The canonical key (stored in each message).
    pub(crate) key: Arc<str>,
    /// The stable id (stored in each record's header).
    pub(crate) id: u64,
    /// The kind.
    pub(crate) kind: ConvKind,
    /// Who receives its messages: for a direct conversation, its one or two users; empty for a
    /// group (its owner keeps the members).
    pub(crate) members: Vec<Arc<str>>,
    /// The conversation as stored in each message (kind and canonical key).
    pub(crate) stored: pb::Conversation,
}

impl Conv {
    /// The conversation a canonical key names, or `None` if the key names none.
    pub(crate) fn from_key(key: &str) -> Option<Conv> {
        if let Some(group) = key.strip_prefix(GROUP_PREFIX) {
            return Conv::group(group);
        }
        let (a, b) = direct_users(key)?;
        let mut members: Vec<Arc<str>> = vec![a.into()];
        if a != b {
            members.push(b.into());
        }
        Some(Conv {
            key: key.into(),
            id: conv_id(key),
            kind: ConvKind::Direct,
            members,
            stored: pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: key.to_owned(),
            },
        })
    }

    /// The group `group_id` (1..=128 bytes), or `None` if the id is not one.
    pub(crate) fn group(group_id: &str) -> Option<Conv> {
        if group_id.is_empty() || group_id.len() > MAX_CONV_ID_BYTES {
            return None;
        }
        let key = format!("{GROUP_PREFIX}{group_id}");
        Some(Conv {
            id: conv_id(&key),
            stored: pb::Conversation {
                r#type: pb::ConversationType::Group as i32,
                id: key.clone(),
            },
            key: key.into(),
            kind: ConvKind::Group,
            members: Vec::new(),
        })
    }

    /// The group id of a group conversation (`None` for a direct one).
    pub(crate) fn group_id(&self) -> Option<&str> {
        match self.kind {
            ConvKind::Group => self.key.strip_prefix(GROUP_PREFIX),
            ConvKind::Direct => None,
        }
    }

    /// How `user` names this conversation.
    pub(crate) fn view_for(&self, user: &str) -> pb::Conversation {
        match self.kind {
            ConvKind::Direct => view_for(&self.key, user),
            ConvKind::Group => pb::Conversation {
                r#type: pb::ConversationType::Group as i32,
                id: self.group_id().unwrap_or_default().to_owned(),
            },
        }
    }
}

/// What a group's conversation key starts with.
const GROUP_PREFIX: &str = "g:";

/// The canonical key of the direct conversation between `u1` and `u2`.
pub(crate) fn direct_key(u1: &str, u2: &str) -> String {
    let (a, b) = if u1 <= u2 { (u1, u2) } else { (u2, u1) };
    format!("d{}:{a}{b}", a.len())
}

/// The two users of a direct conversation key, or `None` if `key` is not one.
pub(crate) fn direct_users(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix('d')?;
    let (len, users) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !users.is_char_boundary(len) {
        return None;
    }
    let (a, b) = users.split_at(len);
    Some((a, b))
}

/// The id of the conversation with key `key`.
pub(crate) fn conv_id(key: &str) -> u64 {
    stable_hash(key.as_bytes())
}

/// How `user` names the conversation `key`: for a direct one, `{DIRECT, other user}`.
pub(crate) fn view_for(key: &str, user: &str) -> pb::Conversation {
    match direct_users(key) {
        Some((a, b)) => pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: if a == user { b } else { a }.to_owned(),
        },
        None => pb::Conversation {
            r#type: pb::ConversationType::Unspecified as i32,
            id: key.to_owned(),
        },
    }
}

/// The canonical key of the conversation `user` names `view`, or `None` if the view names no
/// conversation this node serves (unknown type, empty or overlong id).
pub(crate) fn key_for(user: &str, view: &pb::Conversation) -> Option<String> {
    if view.id.is_empty() || view.id.len() > MAX_CONV_ID_BYTES {
        return None;
    }
    match pb::ConversationType::try_from(view.r#type).ok()? {
        pb::ConversationType::Direct => Some(direct_key(user, &view.id)),
        pb::ConversationType::Group => Some(format!("{GROUP_PREFIX}{}", view.id)),
        _ => None,
    }
}

/// Most nodes a cluster layout spans ([`crate::config::MAX_CLUSTER_NODES`]).
const MAX_NODES: usize = crate::config::MAX_CLUSTER_NODES;

/// Where conversations and users live: which shard owns a conversation (its seq counter, de-dup
/// windows and log) and which shard is a user's home (connections, inbox).
///
/// Shards are numbered across the cluster: node `n` (its position in the sorted node list)
/// holds shards `n * shards .. (n + 1) * shards`, every node running `shards` of them (one node
/// alone: `0 .. shards`). A conversation's node is chosen by rendezvous hashing of its id over
/// the node ids, and within the node by `id % shards`; a user's home likewise by the hash of
/// the user id. The layout (node ids and shard count) of a data directory never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    shards: usize,
    nodes: usize,
    node: usize,
    /// Each node's rendezvous salt (the stable hash of its id), by position.
    salts: [u64; MAX_NODES],
}

impl Placement {
    /// Placement over `shards` shards of one node (at least 1). The shard count of a data dir
    /// is fixed at its first start: conversations are placed by `id % shards`.
    pub(crate) fn new(shards: usize) -> Self {
        Placement {
            shards: shards.max(1),
            nodes: 1,
            node: 0,
            salts: [0; MAX_NODES],
        }
    }

    /// Placement over the cluster `nodes` (node ids, in any order; at most 32), each with
    /// `shards` shards, seen from node `me`; `None` if `me` is not among them or the list is
    /// empty or too long.
    pub(crate) fn cluster(shards: usize, nodes: &[String], me: &str) -> Option<Self> {
        if nodes.is_empty() || nodes.len() > MAX_NODES {
            return None;
        }
        let mut sorted: Vec<&str> = nodes.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let node = sorted.iter().position(|n| *n == me)?;
        let mut salts = [0; MAX_NODES];
        for (salt, id) in salts.iter_mut().zip(&sorted) {
            *salt = stable_hash(id.as_bytes());
        }
        Some(Placement {
            shards: shards.max(1),
            nodes: sorted.len(),
            node,
            salts,
        })
    }

    /// The number of shards of the whole cluster (of the node, alone).
    pub(crate) fn shards(&self) -> usize {
        self.shards * self.nodes
    }

    /// The number of shards each node runs.
    pub(crate) fn shards_per_node(&self) -> usize {
        self.shards
    }

    /// The node holding shard `shard`.
    pub(crate) fn node_of(&self, shard: usize) -> usize {
        shard / self.shards
    }

    /// This node's position in the cluster's node list (0 without a cluster).
    pub(crate) fn this_node(&self) -> usize {
        self.node
    }

    /// The index on this node of shard `shard`, if it is one of this node's.
    pub(crate) fn local(&self, shard: usize) -> Option<usize> {
        (self.node_of(shard) == self.node).then_some(shard % self.shards)
    }

    /// The cluster-wide index of this node's shard `local`.
    pub(crate) fn global(&self, local: usize) -> usize {
        self.node * self.shards + local
    }

    /// The shard that owns conversation `id`.
    pub(crate) fn owner(&self, id: u64) -> usize {
        self.place(id)
    }

    /// The home shard of `user`.
    pub(crate) fn home(&self, user: &str) -> usize {
        self.place(stable_hash(user.as_bytes()))
    }

    /// The node of the highest rendezvous weight for `h`, then its shard `h % shards`.
    fn place(&self, h: u64) -> usize {
        let node = parley_proto::placement::rendezvous_of_salts(&self.salts[..self.nodes], h);
        node * self.shards + (h % self.shards as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_key_is_the_same_from_both_sides() {
        assert_eq!(direct_key("alice", "bob"), direct_key("bob", "alice"));
        assert_eq!(direct_key("alice", "bob"), "d5:alicebob");
    }

    #[test]
    fn direct_key_is_unambiguous_whatever_the_user_ids_contain() {
        // Without the length prefix, ("a:b", "c") and ("a", ":bc") would both read "a:bc".
        assert_ne!(direct_key("a:b", "c"), direct_key("a", ":bc"));
        assert_eq!(direct_users(&direct_key("a:b", "c")), Some(("a:b", "c")));
        assert_eq!(direct_users(&direct_key("ü", "ß")), Some(("ß", "ü")));
    }

    #[test]
    fn each_user_sees_the_other_as_the_conversation() {
        let key = direct_key("alice", "bob");
        assert_eq!(view_for(&key, "alice").id, "bob");
        assert_eq!(view_for(&key, "bob").id, "alice");
        let own = direct_key("carol", "carol");
        assert_eq!(view_for(&own, "carol").id, "carol");
    }

    #[test]
    fn ids_are_stable_across_versions() {
        // Stored in logs: this value must never change.
        assert_eq!(conv_id("d5:alicebob"), 4_452_409_486_685_702_869);
        assert_ne!(conv_id("d5:alicebob"), conv_id("d5:alicebon"));
    }

    #[test]
    fn malformed_keys_are_not_direct() {
        for k in ["", "x", "d", "d:", "dx:ab", "d9:ab", "d1:"] {
            assert_eq!(direct_users(k), None, "{k}");
        }
    }

    #[test]
    fn a_direct_conversation_reaches_both_users_once_and_a_self_chat_one() {
        let c = Conv::from_key(&direct_key("bob", "alice")).expect("direct");
        assert_eq!(c.kind, ConvKind::Direct);
        assert_eq!(&*c.members[0], "alice");
        assert_eq!(&*c.members[1], "bob");
        let own = Conv::from_key(&direct_key("carol", "carol")).expect("direct");
        assert_eq!(own.members.len(), 1);
    }

    #[test]
    fn views_of_unknown_types_name_no_conversation() {
        let v = pb::Conversation {
            r#type: pb::ConversationType::Unspecified as i32,
            id: "g".into(),
        };
        assert_eq!(key_for("alice", &v), None);
        let empty = pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: String::new(),
        };
        assert_eq!(key_for("alice", &empty), None);
    }

    #[test]
    fn a_group_is_named_the_same_by_every_member_and_never_like_a_direct_chat() {
        let g = Conv::group("team").expect("group");
        assert_eq!(g.kind, ConvKind::Group);
        assert_eq!(&*g.key, "g:team");
        assert_eq!(g.view_for("alice"), g.view_for("bob"));
        assert_eq!(g.view_for("alice").id, "team");
        let again = Conv::from_key(&g.key).expect("from its key");
        assert_eq!((again.id, again.kind), (g.id, ConvKind::Group));
        assert_eq!(
            key_for("alice", &g.view_for("alice")).as_deref(),
            Some("g:team")
        );
        assert!(Conv::group("").is_none());
        assert!(Conv::group(&"x".repeat(129)).is_none());
        assert_ne!(g.id, conv_id(&direct_key("g", "team")));
    }

    #[test]
    fn placement_spreads_by_id_and_user() {
        let p = Placement::new(4);
        assert_eq!(p.owner(9), 1);
        assert!(p.home("alice") < 4);
        assert_eq!(Placement::new(0).shards(), 1);
    }

    #[test]
    fn a_cluster_places_alike_on_every_node_and_spreads_over_all_of_them() {
        let nodes: Vec<String> = ["n3", "n1", "n2"].iter().map(|s| s.to_string()).collect();
        let views: Vec<Placement> = ["n1", "n2", "n3"]
            .iter()
            .map(|me| Placement::cluster(2, &nodes, me).expect("a member"))
            .collect();
        assert_eq!(
            views[1].node_of(views[1].global(0)),
            1,
            "positions follow the sorted ids"
        );
        let mut per_node = [0usize; 3];
        for i in 0..3000u64 {
            let owner = views[0].owner(stable_hash(&i.to_le_bytes()));
            assert!(
                views
                    .iter()
                    .all(|v| v.owner(stable_hash(&i.to_le_bytes())) == owner)
            );
            per_node[views[0].node_of(owner)] += 1;
            let user = format!("user-{i}");
            assert!(views.iter().all(|v| v.home(&user) == views[0].home(&user)));
        }
        assert!(per_node.iter().all(|&n| n > 800), "{per_node:?}");
        assert_eq!(views[2].local(5), Some(1));
        assert_eq!(views[2].local(1), None);
        assert_eq!(views[2].global(1), 5);
        assert_eq!(Placement::cluster(2, &nodes, "n9"), None);
    }

    #[test]
    fn adding_a_node_moves_only_what_the_new_node_takes() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let four: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p3 = Placement::cluster(1, &three, "a").expect("member");
        let p4 = Placement::cluster(1, &four, "a").expect("member");
        for i in 0..2000u64 {
            let (o3, o4) = (p3.owner(i), p4.owner(i));
            assert!(o3 == o4 || o4 == 3, "{i}: {o3} -> {o4}");
        }
    }
}
