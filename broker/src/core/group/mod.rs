//! Groups: members, roles and settings, and what each request may change (the owner's handling
//! of requests is in [`requests`]).
//!
//! A group is a conversation ([`super::conv::ConvKind::Group`]) whose owner shard keeps its
//! [`Group`] state: the members with their roles and the seq of the event that added them, the
//! members who left with the range they may still read, the name and whether anyone may join.
//! Every change is decided here ([`Group::decide`]: the permission table of the .proto) as a
//! `GroupEvent`, stored as a SYSTEM message of the group with the next seq, and applied
//! ([`Group::apply`]) in seq order — live, and again at start-up from the checkpoint and the log,
//! where an event at or below [`Group::applied`] is skipped, so applying is idempotent.
//!
//! What a user may read is decided by seqs ([`Group::window`]): a member reads from the seq of
//! the event that added it on; a former member from that seq up to the seq of the event that
//! ended its membership, both included; anyone else nothing.
//!
//! Read counts ([`Group::read_counts`]): the owner keeps each member's read cursor (reported by
//! the member's home when it moves, and by every home at start-up) in two histograms, so "how
//! many members read seq s" is one sweep over the distinct cursor values, whatever the member
//! count, and a read receipt costs O(log n), never a message to other members.
//!
//! ### Invariants
//! * A live group (not dissolved) has exactly one member with role owner.
//! * `read_hist` and `join_hist` each count every current member once.
//! * `per_shard[s]` is the number of members whose home is shard `s`.
//! * A user is never both in `members` and in `former`.

use std::collections::BTreeMap;
use std::sync::Arc;

use parley_proto::pb;

use super::FastMap;
use super::conv::{MAX_CONV_ID_BYTES, Placement};
use super::error::Refusal;

mod requests;

/// Longest group name (bytes of UTF-8).
pub(crate) const MAX_NAME_BYTES: usize = 256;

/// A member's role, in increasing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// An ordinary member.
    Member,
    /// May add and remove members and rename the group.
    Admin,
    /// May also change roles and dissolve the group.
    Owner,
}

impl Role {
    /// The wire form.
    pub(crate) fn to_pb(self) -> pb::GroupRole {
        match self {
            Role::Member => pb::GroupRole::Member,
            Role::Admin => pb::GroupRole::Admin,
            Role::Owner => pb::GroupRole::Owner,
        }
    }

    /// From the wire form (`None` for UNSPECIFIED or unknown).
    pub(crate) fn from_pb(role: i32) -> Option<Role> {
        match pb::GroupRole::try_from(role).ok()? {
            pb::GroupRole::Member => Some(Role::Member),
            pb::GroupRole::Admin => Some(Role::Admin),
            pb::GroupRole::Owner => Some(Role::Owner),
            pb::GroupRole::Unspecified => None,
        }
    }

    /// The byte a checkpoint stores.
    pub(crate) fn to_byte(self) -> u8 {
        self as u8
    }

    /// From a checkpoint's byte.
    pub(crate) fn from_byte(b: u8) -> Option<Role> {
        [Role::Member, Role::Admin, Role::Owner]
            .get(usize::from(b))
            .copied()
    }
}

/// A current member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    /// Its role.
    pub(crate) role: Role,
    /// The seq of the event that added it.
    pub(crate) joined: u64,
}

/// What a membership change means for the members' homes: who starts and who stops receiving.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Change {
    /// Users who are members from this event's seq on.
    pub(crate) joined: Vec<Arc<str>>,
    /// Users whose membership ends at this event's seq (they still receive it).
    pub(crate) left: Vec<Arc<str>>,
    /// Every member's membership ends at this event's seq.
    pub(crate) dissolved: bool,
}

/// What [`Group::decide`] makes of a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Store this event.
    Store(pb::GroupEvent),
    /// Nothing to change (already so): answer with the group as it is.
    Nothing,
}

/// A group's state at its owner shard.
#[derive(Debug, Clone, Default)]
pub(crate) struct Group {
    /// Its name.
    pub(crate) name: String,
    /// Whether anyone may join.
    pub(crate) open: bool,
    /// Current members, by user id (sorted: member pages are ranges).
    pub(crate) members: BTreeMap<Arc<str>, Member>,
    /// Former members: the seqs of their last membership, `(joined, left)`.
    pub(crate) former: FastMap<Arc<str>, (u64, u64)>,
    /// The seq of the event that dissolved it.
    pub(crate) dissolved: Option<u64>,
    /// The seq of the newest event applied.
    pub(crate) applied: u64,
    /// Members per home shard.
    pub(crate) per_shard: Vec<u32>,
    /// Read cursors members reported (see [`Group::read_counts`]).
    reads: FastMap<Arc<str>, u64>,
    /// How many members have each effective read cursor (`max(read, joined - 1)`).
    read_hist: BTreeMap<u64, u32>,
    /// How many members joined at each seq.
    join_hist: BTreeMap<u64, u32>,
}

fn hist_add(h: &mut BTreeMap<u64, u32>, key: u64) {
    *h.entry(key).or_insert(0) += 1;
}

fn hist_remove(h: &mut BTreeMap<u64, u32>, key: u64) {
    if let Some(n) = h.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            h.remove(&key);
        }
    }
}

/// Checks a user id named in a request.
fn check_user(u: &str) -> Result<(), Refusal> {
    if u.is_empty() || u.len() > MAX_CONV_ID_BYTES {
        return Err(Refusal::BadGroupRequest(
            "user ids must be 1..=128 bytes".into(),
        ));
    }
    Ok(())
}

/// `users` without repeats, in the order given, each checked, leaving out `except`.
fn distinct<'a>(users: &'a [String], except: &str) -> Result<Vec<&'a str>, Refusal> {
    let mut seen: Vec<&str> = Vec::with_capacity(users.len());
    for u in users {
        check_user(u)?;
        if u != except && !seen.contains(&u.as_str()) {
            seen.push(u);
        }
    }
    Ok(seen)
}

fn event(kind: pb::GroupEventType, actor: &str) -> pb::GroupEvent {
    pb::GroupEvent {
        r#type: kind as i32,
        actor: actor.to_owned(),
        ..Default::default()
    }
}

impl Group {
    /// The event that creates a group: `actor` owns it, `req.members` are members.
    pub(crate) fn create(
        actor: &str,
        req: &pb::GroupRequest,
        max_members: usize,
    ) -> Result<pb::GroupEvent, Refusal> {
        if req.name.len() > MAX_NAME_BYTES {
            return Err(Refusal::BadGroupRequest(
                "name longer than 256 bytes".into(),
            ));
        }
        let users = distinct(&req.members, actor)?;
        if users.len() + 1 > max_members {
            return Err(Refusal::GroupFull);
        }
        let mut e = event(pb::GroupEventType::Created, actor);
        e.users = users.into_iter().map(str::to_owned).collect();
        e.name = req.name.clone();
        e.open = req.open;
        Ok(e)
    }

    /// Whether the group still exists.
    pub(crate) fn is_live(&self) -> bool {
        self.dissolved.is_none()
    }

    /// The member that owns the group.
    pub(crate) fn owner(&self) -> Option<&Arc<str>> {
        self.members
            .iter()
            .find(|(_, m)| m.role == Role::Owner)
            .map(|(u, _)| u)
    }

    /// `user`'s role, if it is a member.
    pub(crate) fn role(&self, user: &str) -> Option<Role> {
        self.members.get(user).map(|m| m.role)
    }

    /// The seqs `user` may read, `(from, to)` inclusive, or `None` if it may read none.
    pub(crate) fn window(&self, user: &str) -> Option<(u64, u64)> {
        if let Some(m) = self.members.get(user) {
            return Some((m.joined, u64::MAX));
        }
        self.former.get(user).copied()
    }

    /// What request `req` of `actor` changes (the permission table of the .proto); GET_MEMBERS
    /// and CREATE are not changes of an existing group and are refused here.
    pub(crate) fn decide(
        &self,
        actor: &str,
        req: &pb::GroupRequest,
        max_members: usize,
    ) -> Result<Decision, Refusal> {
        use pb::GroupAction as A;
        use pb::GroupEventType as E;
        let action = A::try_from(req.action).unwrap_or(A::Unspecified);
        if action == A::Create {
            // Even a dissolved group's id is not used again.
            return Err(Refusal::GroupExists);
        }
        if !self.is_live() {
            return Err(Refusal::GroupNotFound);
        }
        let role = self.role(actor);
        let at_least = |needed: Role| -> Result<Role, Refusal> {
            match role {
                Some(r) if r >= needed => Ok(r),
                Some(_) => Err(Refusal::GroupForbidden(
                    match needed {
                        Role::Owner => "only the group's owner may do this",
                        _ => "only the group's owner and admins may do this",
                    }
                    .into(),
                )),
                None => Err(Refusal::NotMember),
            }
        };
        match action {
            A::AddMembers => {
                at_least(Role::Admin)?;
                let new: Vec<&str> = distinct(&req.members, "")?
                    .into_iter()
                    .filter(|u| !self.members.contains_key(*u))
                    .collect();
                if new.is_empty() {
                    return Ok(Decision::Nothing);
                }
                if self.members.len() + new.len() > max_members {
                    return Err(Refusal::GroupFull);
                }
                let mut e = event(E::MembersAdded, actor);
                e.users = new.into_iter().map(str::to_owned).collect();
                Ok(Decision::Store(e))
            }
            A::RemoveMembers => {
                let mine = at_least(Role::Admin)?;
                let mut gone = Vec::new();
                for u in distinct(&req.members, "")? {
                    let Some(m) = self.members.get(u) else {
                        continue;
                    };
                    if u == actor {
                        return Err(Refusal::GroupForbidden(
                            "to leave a group, use LEAVE, not REMOVE_MEMBERS".into(),
                        ));
                    }
                    if m.role >= mine {
                        return Err(Refusal::GroupForbidden(
                            "admins may remove members only; the owner anyone but itself".into(),
                        ));
                    }
                    gone.push(u.to_owned());
                }
                if gone.is_empty() {
                    return Ok(Decision::Nothing);
                }
                let mut e = event(E::MembersRemoved, actor);
                e.users = gone;
                Ok(Decision::Store(e))
            }
            A::Leave => {
                let Some(mine) = role else {
                    return Ok(Decision::Nothing);
                };
                if self.members.len() == 1 {
                    return Ok(Decision::Store(event(E::Dissolved, actor)));
                }
                let mut e = event(E::MemberLeft, actor);
                if mine == Role::Owner {
                    e.new_owner = self
                        .successor(actor)
                        .map(|u| u.to_string())
                        .unwrap_or_default();
                }
                Ok(Decision::Store(e))
            }
            A::JoinGroup => {
                if role.is_some() {
                    return Ok(Decision::Nothing);
                }
                if !self.open {
                    return Err(Refusal::GroupForbidden(
                        "the group is not open: ask its owner or an admin to add you".into(),
                    ));
                }
                if self.members.len() + 1 > max_members {
                    return Err(Refusal::GroupFull);
                }
                Ok(Decision::Store(event(E::MemberJoined, actor)))
            }
            A::Rename => {
                at_least(Role::Admin)?;
                if req.name.len() > MAX_NAME_BYTES {
                    return Err(Refusal::BadGroupRequest(
                        "name longer than 256 bytes".into(),
                    ));
                }
                if req.name == self.name {
                    return Ok(Decision::Nothing);
                }
                let mut e = event(E::Renamed, actor);
                e.name = req.name.clone();
                Ok(Decision::Store(e))
            }
            A::SetRole => {
                at_least(Role::Owner)?;
                let Some(new_role) = Role::from_pb(req.role) else {
                    return Err(Refusal::BadGroupRequest("SET_ROLE needs a role".into()));
                };
                let users = distinct(&req.members, "")?;
                for u in &users {
                    if !self.members.contains_key(*u) {
                        return Err(Refusal::GroupForbidden(
                            "roles are given to members only".into(),
                        ));
                    }
                    if *u == actor {
                        return Err(Refusal::GroupForbidden(
                            "the owner changes its own role by giving OWNER to another member"
                                .into(),
                        ));
                    }
                }
                if new_role == Role::Owner && users.len() != 1 {
                    return Err(Refusal::BadGroupRequest(
                        "OWNER is given to exactly one member".into(),
                    ));
                }
                let changed: Vec<String> = users
                    .into_iter()
                    .filter(|u| self.role(u) != Some(new_role))
                    .map(str::to_owned)
                    .collect();
                if changed.is_empty() {
                    return Ok(Decision::Nothing);
                }
                let mut e = event(E::RoleChanged, actor);
                e.users = changed;
                e.role = new_role.to_pb() as i32;
                Ok(Decision::Store(e))
            }
            A::Dissolve => {
                at_least(Role::Owner)?;
                Ok(Decision::Store(event(E::Dissolved, actor)))
            }
            A::Create => Err(Refusal::GroupExists),
            A::GetMembers | A::Unspecified => {
                Err(Refusal::BadGroupRequest("not a change of a group".into()))
            }
        }
    }

    /// Who owns the group when its owner `leaving` leaves: the admin who joined first, else the
    /// member who joined first (ties by user id).
    fn successor(&self, leaving: &str) -> Option<&Arc<str>> {
        let candidates = self.members.iter().filter(|(u, _)| ***u != *leaving);
        let pick = |role: Role| {
            candidates
                .clone()
                .filter(|(_, m)| m.role == role)
                .min_by_key(|(u, m)| (m.joined, Arc::clone(u)))
                .map(|(u, _)| u)
        };
        pick(Role::Admin).or_else(|| pick(Role::Member))
    }

    /// Applies event `e` stored at `seq` (skipped if the group already reflects it); returns
    /// what it changes for the members' homes.
    pub(crate) fn apply(&mut self, e: &pb::GroupEvent, seq: u64, placement: &Placement) -> Change {
        use pb::GroupEventType as E;
        let mut change = Change::default();
        if seq <= self.applied {
            return change;
        }
        self.applied = seq;
        if self.per_shard.len() != placement.shards() {
            self.per_shard = vec![0; placement.shards()];
            for u in self.members.keys() {
                self.per_shard[placement.home(u)] += 1;
            }
        }
        let kind = E::try_from(e.r#type).unwrap_or(E::Unspecified);
        match kind {
            E::Created => {
                self.name = e.name.clone();
                self.open = e.open;
                self.add(&e.actor, Role::Owner, seq, placement, &mut change);
                for u in &e.users {
                    self.add(u, Role::Member, seq, placement, &mut change);
                }
            }
            E::MembersAdded => {
                for u in &e.users {
                    self.add(u, Role::Member, seq, placement, &mut change);
                }
            }
            E::MemberJoined => self.add(&e.actor, Role::Member, seq, placement, &mut change),
            E::MembersRemoved => {
                for u in &e.users {
                    self.remove(u, seq, placement, &mut change);
                }
            }
            E::MemberLeft => {
                self.remove(&e.actor, seq, placement, &mut change);
                if let Some(m) = self.members.get_mut(e.new_owner.as_str()) {
                    m.role = Role::Owner;
                }
            }
            E::Renamed => self.name = e.name.clone(),
            E::RoleChanged => {
                let role = Role::from_pb(e.role).unwrap_or(Role::Member);
                for u in &e.users {
                    if let Some(m) = self.members.get_mut(u.as_str()) {
                        m.role = role;
                    }
                }
                if role == Role::Owner
                    && let Some(m) = self.members.get_mut(e.actor.as_str())
                {
                    m.role = Role::Admin;
                }
            }
            E::Dissolved => {
                let members: Vec<Arc<str>> = self.members.keys().cloned().collect();
                for u in members {
                    self.remove(&u, seq, placement, &mut change);
                }
                change.left.clear();
                change.dissolved = true;
                self.dissolved = Some(seq);
            }
            E::Unspecified => {}
        }
        debug_assert!(
            !self.is_live()
                || self
                    .members
                    .values()
                    .filter(|m| m.role == Role::Owner)
                    .count()
                    == 1,
            "a live group has one owner"
        );
        change
    }

    fn add(&mut self, user: &str, role: Role, seq: u64, p: &Placement, change: &mut Change) {
        if self.members.contains_key(user) {
            return;
        }
        let user: Arc<str> = self
            .former
            .remove_entry(user)
            .map_or_else(|| user.into(), |(u, _)| u);
        self.per_shard[p.home(&user)] += 1;
        self.members
            .insert(Arc::clone(&user), Member { role, joined: seq });
        hist_add(&mut self.join_hist, seq);
        hist_add(&mut self.read_hist, seq.saturating_sub(1));
        change.joined.push(user);
    }

    /// Puts back a member from a checkpoint (no event: the group already reflects it).
    pub(crate) fn restore_member(&mut self, user: Arc<str>, m: Member, p: &Placement) {
        if self.per_shard.len() != p.shards() {
            self.per_shard = vec![0; p.shards()];
        }
        if self.members.contains_key(&user) {
            return;
        }
        self.per_shard[p.home(&user)] += 1;
        hist_add(&mut self.join_hist, m.joined);
        hist_add(&mut self.read_hist, m.joined.saturating_sub(1));
        self.members.insert(user, m);
    }

    /// A member's effective read cursor: nothing before its join counts.
    fn effective_read(&self, user: &str, joined: u64) -> u64 {
        self.reads
            .get(user)
            .copied()
            .unwrap_or(0)
            .max(joined.saturating_sub(1))
    }

    /// Member `user` read up to `read` (ignored for non-members; cursors only move forward).
    pub(crate) fn set_read(&mut self, user: &str, read: u64) {
        let Some(m) = self.members.get(user).copied() else {
            return;
        };
        let old = self.effective_read(user, m.joined);
        if read <= old {
            return;
        }
        hist_remove(&mut self.read_hist, old);
        hist_add(&mut self.read_hist, read);
        match self.reads.get_mut(user) {
            Some(r) => *r = read,
            None => {
                if let Some((u, _)) = self.members.get_key_value(user) {
                    self.reads.insert(Arc::clone(u), read);
                }
            }
        }
    }

    /// For each seq of `from..from+count` up to `last_seq`: how many current members joined at
    /// or before it and read it.
    pub(crate) fn read_counts(&self, from: u64, count: u32, last_seq: u64) -> Vec<u32> {
        let from = from.max(1);
        let to = from
            .saturating_add(u64::from(count))
            .saturating_sub(1)
            .min(last_seq);
        if to < from {
            return Vec::new();
        }
        let sum = |h: &BTreeMap<u64, u32>, lo: u64| -> u64 {
            h.range(lo..).map(|(_, n)| u64::from(*n)).sum()
        };
        // count(s) = members with effective read >= s, minus members who joined after s.
        let mut read_at_least = sum(&self.read_hist, to.saturating_add(1));
        let mut joined_after = sum(&self.join_hist, to.saturating_add(1));
        let mut counts = vec![0u32; (to - from + 1) as usize];
        for s in (from..=to).rev() {
            read_at_least += u64::from(self.read_hist.get(&s).copied().unwrap_or(0));
            let n = read_at_least.saturating_sub(joined_after);
            counts[(s - from) as usize] = u32::try_from(n).unwrap_or(u32::MAX);
            joined_after += u64::from(self.join_hist.get(&s).copied().unwrap_or(0));
        }
        counts
    }

    fn remove(&mut self, user: &str, seq: u64, p: &Placement, change: &mut Change) {
        let Some((user, m)) = self.members.remove_entry(user) else {
            return;
        };
        let read = self.effective_read(&user, m.joined);
        hist_remove(&mut self.read_hist, read);
        hist_remove(&mut self.join_hist, m.joined);
        self.reads.remove(&user);
        let n = &mut self.per_shard[p.home(&user)];
        *n = n.saturating_sub(1);
        self.former.insert(Arc::clone(&user), (m.joined, seq));
        change.left.push(user);
    }

    /// The shards that are home to at least one member.
    pub(crate) fn home_shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.per_shard
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| s)
    }

    /// The answer to a request of `actor` about group `group_id`, after event `seq` (0: none);
    /// with `page`, one page of members after `after` (at most `limit`).
    pub(crate) fn result(
        &self,
        group_id: &str,
        actor: &str,
        seq: u64,
        page: Option<(&str, usize)>,
    ) -> pb::GroupResult {
        let mut r = pb::GroupResult {
            group_id: group_id.to_owned(),
            name: self.name.clone(),
            seq,
            member_count: self.members.len() as u64,
            open: self.open,
            your_role: self
                .role(actor)
                .map_or(pb::GroupRole::Unspecified, Role::to_pb) as i32,
            ..Default::default()
        };
        if let Some((after, limit)) = page {
            use std::ops::Bound;
            let mut range = self
                .members
                .range::<str, _>((Bound::Excluded(after), Bound::Unbounded));
            for (u, m) in range.by_ref().take(limit) {
                r.members.push(u.to_string());
                r.roster.push(pb::GroupMember {
                    user: u.to_string(),
                    role: m.role.to_pb() as i32,
                    joined_seq: m.joined,
                });
            }
            r.more = range.next().is_some();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::GroupAction as A;

    fn req(action: A, members: &[&str]) -> pb::GroupRequest {
        pb::GroupRequest {
            action: action as i32,
            group_id: "g".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// A group created by `owner` with `members`, at seq 1, over 2 shards.
    fn group(owner: &str, members: &[&str]) -> (Group, Placement) {
        let p = Placement::new(2);
        let mut g = Group::default();
        let e = Group::create(owner, &req(A::Create, members), 100).expect("create");
        g.apply(&e, 1, &p);
        (g, p)
    }

    /// Decides and applies `r` of `actor` at `seq`.
    fn act(g: &mut Group, p: &Placement, actor: &str, r: &pb::GroupRequest, seq: u64) -> Change {
        match g.decide(actor, r, 100).expect("allowed") {
            Decision::Store(e) => g.apply(&e, seq, p),
            Decision::Nothing => Change::default(),
        }
    }

    #[test]
    fn the_creator_owns_the_group_and_the_listed_users_are_members_from_its_seq() {
        let (g, _) = group("alice", &["bob", "carol", "bob", "alice"]);
        assert_eq!(g.role("alice"), Some(Role::Owner));
        assert_eq!(g.role("bob"), Some(Role::Member));
        assert_eq!(
            g.members.len(),
            3,
            "repeats and the creator listed again count once"
        );
        assert_eq!(g.window("carol"), Some((1, u64::MAX)));
        assert_eq!(g.window("dave"), None);
        assert_eq!(g.per_shard.iter().sum::<u32>(), 3);
    }

    #[test]
    fn a_member_removed_reads_up_to_its_removal_and_a_member_added_later_from_its_join() {
        let (mut g, p) = group("alice", &["bob"]);
        let ch = act(&mut g, &p, "alice", &req(A::AddMembers, &["carol"]), 5);
        assert_eq!(ch.joined, vec![Arc::<str>::from("carol")]);
        assert_eq!(g.window("carol"), Some((5, u64::MAX)));
        let ch = act(&mut g, &p, "alice", &req(A::RemoveMembers, &["bob"]), 9);
        assert_eq!(ch.left, vec![Arc::<str>::from("bob")]);
        assert_eq!(g.window("bob"), Some((1, 9)));
        // Back again: from the new join on.
        act(&mut g, &p, "alice", &req(A::AddMembers, &["bob"]), 12);
        assert_eq!(g.window("bob"), Some((12, u64::MAX)));
        assert!(g.former.is_empty());
    }

    #[test]
    fn members_may_not_manage_the_group_and_admins_may_not_touch_admins() {
        let (mut g, p) = group("alice", &["bob", "carol", "dave"]);
        assert_eq!(
            g.decide("bob", &req(A::AddMembers, &["eve"]), 100),
            Err(Refusal::GroupForbidden(
                "only the group's owner and admins may do this".into()
            ))
        );
        assert_eq!(
            g.decide("eve", &req(A::RemoveMembers, &["bob"]), 100),
            Err(Refusal::NotMember)
        );
        let mut promote = req(A::SetRole, &["bob", "carol"]);
        promote.role = pb::GroupRole::Admin as i32;
        act(&mut g, &p, "alice", &promote, 2);
        assert!(matches!(
            g.decide("bob", &req(A::RemoveMembers, &["carol"]), 100),
            Err(Refusal::GroupForbidden(_))
        ));
        assert!(matches!(
            g.decide("bob", &req(A::RemoveMembers, &["alice"]), 100),
            Err(Refusal::GroupForbidden(_))
        ));
        let ch = act(&mut g, &p, "bob", &req(A::RemoveMembers, &["dave"]), 3);
        assert_eq!(ch.left.len(), 1);
        assert!(matches!(
            g.decide("bob", &req(A::Dissolve, &[]), 100),
            Err(Refusal::GroupForbidden(_))
        ));
    }

    #[test]
    fn an_owner_who_leaves_hands_the_group_to_the_first_admin_else_the_first_member() {
        let (mut g, p) = group("alice", &["bob"]);
        act(&mut g, &p, "alice", &req(A::AddMembers, &["carol"]), 2);
        let mut promote = req(A::SetRole, &["carol"]);
        promote.role = pb::GroupRole::Admin as i32;
        act(&mut g, &p, "alice", &promote, 3);
        act(&mut g, &p, "alice", &req(A::Leave, &[]), 4);
        assert_eq!(
            g.role("carol"),
            Some(Role::Owner),
            "the admin, though bob joined first"
        );
        act(&mut g, &p, "carol", &req(A::Leave, &[]), 5);
        assert_eq!(g.role("bob"), Some(Role::Owner));
        // The last member leaving dissolves it.
        let ch = act(&mut g, &p, "bob", &req(A::Leave, &[]), 6);
        assert!(ch.dissolved);
        assert!(!g.is_live());
        assert_eq!(g.window("bob"), Some((1, 6)));
        assert_eq!(
            g.decide("bob", &req(A::JoinGroup, &[]), 100),
            Err(Refusal::GroupNotFound)
        );
    }

    #[test]
    fn giving_ownership_away_makes_the_old_owner_an_admin() {
        let (mut g, p) = group("alice", &["bob"]);
        let mut give = req(A::SetRole, &["bob"]);
        give.role = pb::GroupRole::Owner as i32;
        act(&mut g, &p, "alice", &give, 2);
        assert_eq!(g.role("bob"), Some(Role::Owner));
        assert_eq!(g.role("alice"), Some(Role::Admin));
    }

    #[test]
    fn only_open_groups_may_be_joined_and_none_past_the_member_limit() {
        let (mut g, p) = group("alice", &["bob"]);
        assert!(matches!(
            g.decide("eve", &req(A::JoinGroup, &[]), 100),
            Err(Refusal::GroupForbidden(_))
        ));
        g.open = true;
        assert_eq!(
            g.decide("eve", &req(A::JoinGroup, &[]), 2),
            Err(Refusal::GroupFull)
        );
        act(&mut g, &p, "eve", &req(A::JoinGroup, &[]), 2);
        assert_eq!(g.role("eve"), Some(Role::Member));
        assert_eq!(
            g.decide("alice", &req(A::AddMembers, &["x", "y"]), 4),
            Err(Refusal::GroupFull)
        );
        assert_eq!(
            Group::create("alice", &req(A::Create, &["a", "b"]), 2),
            Err(Refusal::GroupFull)
        );
    }

    #[test]
    fn a_request_that_changes_nothing_stores_nothing() {
        let (g, _) = group("alice", &["bob"]);
        for r in [
            req(A::AddMembers, &["bob"]),
            req(A::RemoveMembers, &["nobody"]),
            req(A::Rename, &[]),
        ] {
            assert_eq!(g.decide("alice", &r, 100), Ok(Decision::Nothing));
        }
        assert_eq!(
            g.decide("stranger", &req(A::Leave, &[]), 100),
            Ok(Decision::Nothing)
        );
    }

    #[test]
    fn applying_an_event_again_changes_nothing() {
        let (mut g, p) = group("alice", &["bob"]);
        let e = match g.decide("alice", &req(A::RemoveMembers, &["bob"]), 100) {
            Ok(Decision::Store(e)) => e,
            other => panic!("{other:?}"),
        };
        g.apply(&e, 2, &p);
        let add = match g.decide("alice", &req(A::AddMembers, &["bob"]), 100) {
            Ok(Decision::Store(e)) => e,
            other => panic!("{other:?}"),
        };
        g.apply(&add, 3, &p);
        // A replay of the removal (seq 2) after the re-add (seq 3) must not remove bob.
        assert_eq!(g.apply(&e, 2, &p), Change::default());
        assert_eq!(g.window("bob"), Some((3, u64::MAX)));
    }

    #[test]
    fn read_counts_count_members_who_read_a_seq_and_joined_before_it() {
        let (mut g, p) = group("alice", &["bob", "carol"]);
        // Messages 2..=5, then dave joins at 6.
        act(&mut g, &p, "alice", &req(A::AddMembers, &["dave"]), 6);
        // Nobody reported: every member read nothing (dave's join makes 1..=5 not his).
        assert_eq!(g.read_counts(1, 6, 6), vec![0, 0, 0, 0, 0, 0]);
        g.set_read("bob", 4);
        g.set_read("carol", 2);
        g.set_read("dave", 6);
        g.set_read("bob", 3); // backwards: ignored
        assert_eq!(g.read_counts(1, 10, 6), vec![2, 2, 1, 1, 0, 1]);
        assert_eq!(g.read_counts(3, 2, 6), vec![1, 1]);
        // A member who leaves no longer counts.
        act(&mut g, &p, "alice", &req(A::RemoveMembers, &["bob"]), 7);
        assert_eq!(g.read_counts(1, 7, 7), vec![1, 1, 0, 0, 0, 1, 0]);
        g.set_read("bob", 7);
        assert_eq!(
            g.read_counts(7, 1, 7),
            vec![0],
            "a former member's receipt is ignored"
        );
    }

    #[test]
    fn member_pages_are_sorted_ranges() {
        let (g, _) = group("alice", &["bob", "carol", "dave"]);
        let first = g.result("g", "alice", 0, Some(("", 2)));
        assert_eq!(first.members, vec!["alice", "bob"]);
        assert!(first.more);
        let next = g.result("g", "alice", 0, Some(("bob", 2)));
        assert_eq!(next.members, vec!["carol", "dave"]);
        assert!(!next.more);
        assert_eq!(next.member_count, 4);
        assert_eq!(next.your_role, pb::GroupRole::Owner as i32);
    }
}
