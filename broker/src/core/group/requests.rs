//! The owner's side of groups: a `GroupRequest` decided ([`super::Group::decide`]), its event
//! stored as the group's next SYSTEM message and applied, and the answer and the deliveries
//! released once the record is durable, like a send's.

use std::sync::Arc;

use bytes::Bytes;
use parley_proto::pb;
use parley_storage::Backend;

use super::{Decision, Group};
use crate::core::ShardCore;
use crate::core::conv::Conv;
use crate::core::error::Refusal;
use crate::core::mail::{Device, GroupOp, Origin, ShardMsg};
use crate::core::owner::{ConvState, KIND_GROUP_EVENT, Pending, Reply, Stored};

/// The owner's side of groups: requests decided, events stored and applied, answers released
/// once durable (like send-acks).
impl<B: Backend> ShardCore<B> {
    /// A group request, at the group's owner shard.
    pub(crate) fn on_group_op(&mut self, op: GroupOp) {
        let GroupOp {
            origin,
            request_id,
            actor,
            conv,
            req,
            unix_ms,
        } = op;
        let refuse = |core: &mut Self, refusal: Refusal| {
            core.route(
                origin.shard,
                ShardMsg::Refused {
                    to: origin,
                    request_id,
                    client_msg_id: 0,
                    refusal,
                },
            );
        };
        if let Some(refusal) = self.fenced() {
            return refuse(self, refusal);
        }
        let answer = |core: &mut Self, result: pb::GroupResult| {
            core.route(
                origin.shard,
                ShardMsg::GroupDone {
                    to: origin,
                    request_id,
                    result: Box::new(result),
                },
            );
        };
        let max = self.cfg.max_group_members;
        let group_id = conv.group_id().unwrap_or_default().to_owned();
        let action = pb::GroupAction::try_from(req.action).unwrap_or(pb::GroupAction::Unspecified);
        let id = conv.id;
        let existing = self.owner.convs.get(&id);
        if existing.is_some_and(|st| st.conv.key != conv.key || st.group.is_none()) {
            return refuse(self, Refusal::IdCollision);
        }
        let group = existing.and_then(|st| st.group.as_deref());
        let event = match (action, group) {
            (pb::GroupAction::Create, None) => match Group::create(&actor.user, &req, max) {
                Ok(e) => e,
                Err(r) => return refuse(self, r),
            },
            // A retried CREATE by the group's owner: the group as it is.
            (pb::GroupAction::Create, Some(g))
                if g.is_live() && g.owner().is_some_and(|o| **o == *actor.user) =>
            {
                return answer(self, g.result(&group_id, &actor.user, 0, None));
            }
            (_, None) => return refuse(self, Refusal::GroupNotFound),
            (pb::GroupAction::GetMembers, Some(g)) => {
                if !g.is_live() {
                    return refuse(self, Refusal::GroupNotFound);
                }
                if g.role(&actor.user).is_none() {
                    return refuse(self, Refusal::NotMember);
                }
                let limit = match req.limit as usize {
                    0 => self.cfg.max_members_page,
                    n => n.min(self.cfg.max_members_page),
                };
                let mut result =
                    g.result(&group_id, &actor.user, 0, Some((&req.after_user, limit)));
                // A page must fit a frame: cut it shorter (the client asks again from there).
                let budget = self.cfg.page_budget;
                while result.roster.len() > 1 && prost::Message::encoded_len(&result) > budget {
                    let keep = result.roster.len() / 2;
                    result.roster.truncate(keep);
                    result.members.truncate(keep);
                    result.more = true;
                }
                return answer(self, result);
            }
            (_, Some(g)) => match g.decide(&actor.user, &req, max) {
                Ok(Decision::Store(e)) => e,
                Ok(Decision::Nothing) => {
                    return answer(self, g.result(&group_id, &actor.user, 0, None));
                }
                Err(r) => return refuse(self, r),
            },
        };
        self.store_group_event(origin, request_id, actor, conv, &group_id, event, unix_ms);
    }

    /// Stores group event `event` of `actor` as the group's next SYSTEM message, applies it, and
    /// queues the answer and the deliveries until the record is durable.
    #[allow(clippy::too_many_arguments)]
    fn store_group_event(
        &mut self,
        origin: Origin,
        request_id: u64,
        actor: Device,
        conv: Arc<Conv>,
        group_id: &str,
        event: pb::GroupEvent,
        unix_ms: i64,
    ) {
        let id = conv.id;
        let placement = self.placement;
        let st = self
            .owner
            .convs
            .entry(id)
            .or_insert_with(|| ConvState::new(Arc::clone(&conv), 0));
        let seq = st.last_seq + 1;
        let msg_id = self.owner.ids.next(unix_ms.max(0) as u64);
        let message = pb::Message {
            conversation: Some(st.conv.stored.clone()),
            seq,
            msg_id,
            from_user: actor.user.to_string(),
            from_device: actor.device.to_string(),
            server_time: unix_ms,
            kind: pb::MessageKind::System as i32,
            event: Some(event),
            ..Default::default()
        };
        let stored = Bytes::from(prost::Message::encode_to_vec(&message));
        let lsn = match self.append_record(KIND_GROUP_EVENT, id, seq, msg_id, unix_ms, &stored) {
            Ok(lsn) => lsn,
            Err(refusal) => {
                return self.route(
                    origin.shard,
                    ShardMsg::Refused {
                        to: origin,
                        request_id,
                        client_msg_id: 0,
                        refusal,
                    },
                );
            }
        };
        let Some(st) = self.owner.convs.get_mut(&id) else {
            return;
        };
        debug_assert_eq!(st.last_seq + 1, seq, "seqs advance by one");
        st.last_seq = seq;
        let group = st.group.get_or_insert_default();
        // Homes with members before the event (a removed member still gets it) and after.
        let mut homes: Vec<usize> = group.home_shards().collect();
        let Some(event) = message.event.as_ref() else {
            return;
        };
        let change = group.apply(event, seq, &placement);
        group.set_read(&actor.user, seq);
        homes.extend(group.home_shards());
        homes.sort_unstable();
        homes.dedup();
        let result = group.result(group_id, &actor.user, seq, None);
        st.last_time = unix_ms;
        let conv = Arc::clone(&st.conv);
        self.counters.group_events += 1;
        self.owner.hold(Pending {
            lsn,
            origin,
            request_id,
            reply: Reply::Group(Box::new(result)),
            deliver: Some(Box::new(Stored {
                conv,
                seq,
                bytes: stored,
                time: unix_ms,
                sent_us: None,
                sender: actor,
                group: Some((homes, Some(Arc::new(change)))),
            })),
        });
        self.release_if_not_waiting();
    }
}
