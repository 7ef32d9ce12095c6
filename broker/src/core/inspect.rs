//! What the application may ask a conversation's owner about it (the admin API's "inspect").

use parley_storage::Backend;

use super::ShardCore;
use super::conv::{Conv, ConvKind};
use super::group::Role;
use crate::hooks::ConversationRef;

/// Most members an inspection lists (the count is always exact).
pub const INSPECT_MAX_MEMBERS: usize = 1000;

/// A conversation as its owner holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConversationInfo {
    /// Which conversation.
    pub conversation: ConversationRef,
    /// The seq of its newest message (0: none).
    pub last_seq: u64,
    /// When its newest message was stored (ms since the Unix epoch; 0: not known without a
    /// read of the log, e.g. just after a restart).
    pub last_time_ms: i64,
    /// A group's members and settings.
    pub group: Option<GroupInfo>,
}

/// A group's members and settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    /// Its name.
    pub name: String,
    /// Whether anyone may join.
    pub open: bool,
    /// Dissolved (at this seq).
    pub dissolved_at: Option<u64>,
    /// Current members.
    pub member_count: usize,
    /// The first [`INSPECT_MAX_MEMBERS`] members (sorted by user id), with their role
    /// (`owner`, `admin`, `member`) and the seq they joined at.
    pub members: Vec<MemberInfo>,
}

/// A group member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberInfo {
    /// The user.
    pub user: String,
    /// `owner`, `admin` or `member`.
    pub role: &'static str,
    /// The seq of the event that added it.
    pub joined_seq: u64,
}

impl<B: Backend> ShardCore<B> {
    /// The conversation with canonical key `key`, if this shard owns it and it exists (a group
    /// was created; a direct conversation has a message).
    pub fn inspect(&self, key: &str) -> Option<ConversationInfo> {
        let conv = Conv::from_key(key)?;
        if self.placement.owner(conv.id) != self.index {
            return None;
        }
        let state = self.owner.convs.get(&conv.id);
        if let Some(st) = state
            && st.conv.key != conv.key
        {
            return None;
        }
        let (last_seq, last_time_ms) = match state {
            Some(st) => (st.last_seq, st.last_time),
            None => (self.owner.log.latest_seq(conv.id)?, 0),
        };
        if conv.kind == ConvKind::Direct && last_seq == 0 {
            return None;
        }
        let group = match conv.kind {
            ConvKind::Direct => None,
            ConvKind::Group => {
                let g = state.and_then(|st| st.group.as_deref())?;
                Some(GroupInfo {
                    name: g.name.clone(),
                    open: g.open,
                    dissolved_at: g.dissolved,
                    member_count: g.members.len(),
                    members: g
                        .members
                        .iter()
                        .take(INSPECT_MAX_MEMBERS)
                        .map(|(u, m)| MemberInfo {
                            user: u.to_string(),
                            role: match m.role {
                                Role::Owner => "owner",
                                Role::Admin => "admin",
                                Role::Member => "member",
                            },
                            joined_seq: m.joined,
                        })
                        .collect(),
                })
            }
        };
        Some(ConversationInfo {
            conversation: super::gate::conversation_ref(&conv),
            last_seq,
            last_time_ms,
            group,
        })
    }
}
