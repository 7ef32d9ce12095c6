//! The shard's side of presence: requests and mail handled by the core (the state and its rules
//! are in the parent module).

use super::*;

impl<B: Backend> ShardCore<B> {
    /// A `PresenceRequest` from `conn`.
    pub(crate) fn on_presence_request(
        &mut self,
        conn: ConnId,
        request_id: u64,
        req: pb::PresenceRequest,
    ) {
        use pb::PresenceAction as A;
        match A::try_from(req.action).unwrap_or(A::Unspecified) {
            A::Set => self.presence_set(conn, request_id, req.status),
            A::Query => self.presence_ask(conn, request_id, &req.users, Op::Query),
            A::Subscribe => self.presence_ask(conn, request_id, &req.users, Op::Subscribe),
            A::Unsubscribe => self.presence_ask(conn, request_id, &req.users, Op::Unsubscribe),
            A::QueryGroup => self.presence_group_count(conn, request_id, &req.group_id),
            A::Unspecified => self.refuse(
                conn,
                request_id,
                0,
                &Refusal::BadPresenceRequest(
                    "action must be QUERY, SUBSCRIBE, UNSUBSCRIBE, SET or QUERY_GROUP".into(),
                ),
            ),
        }
    }

    /// The logged-in user of `conn` and its device.
    fn presence_who(&self, conn: ConnId) -> Option<Device> {
        self.conns
            .get(conn.slot as usize)
            .and_then(Option::as_ref)
            .filter(|c| c.id == conn)
            .and_then(|c| c.who.as_ref())
            .map(|w| w.device.clone())
    }

    /// SET: the connection's AWAY flag; answered with the user's presence after it.
    fn presence_set(&mut self, conn: ConnId, request_id: u64, status: i32) {
        let away = match pb::PresenceStatus::try_from(status) {
            Ok(pb::PresenceStatus::Away) => true,
            Ok(pb::PresenceStatus::Online) => false,
            _ => {
                return self.refuse(
                    conn,
                    request_id,
                    0,
                    &Refusal::BadPresenceRequest("SET takes status ONLINE or AWAY".into()),
                );
            }
        };
        let Some(me) = self.presence_who(conn) else {
            return;
        };
        self.presence.conns.entry(conn).or_default().away = away;
        self.presence_changed(&me.user);
        let now = snapshot(&self.home, &self.presence.conns, &me.user);
        let answer = now.to_pb(&me.user, self.home.last_seen(&me.user));
        self.write_presence(conn, request_id, vec![answer]);
    }

    /// QUERY, SUBSCRIBE, UNSUBSCRIBE of `users`: checked here, asked of their homes.
    fn presence_ask(&mut self, conn: ConnId, request_id: u64, users: &[String], op: Op) {
        if users.len() > self.cfg.presence_max_users {
            return self.refuse(conn, request_id, 0, &Refusal::PresenceTooManyUsers);
        }
        if users
            .iter()
            .any(|u| u.is_empty() || u.len() > MAX_CONV_ID_BYTES)
        {
            return self.refuse(
                conn,
                request_id,
                0,
                &Refusal::BadPresenceRequest("user ids must be 1..=128 bytes".into()),
            );
        }
        // Repeats count once; the order asked is the order answered.
        let mut seen: FastMap<&str, ()> = FastMap::default();
        let mut order: Vec<Arc<str>> = Vec::with_capacity(users.len());
        for u in users {
            if seen.insert(u.as_str(), ()).is_none() {
                order.push(Arc::from(u.as_str()));
            }
        }
        let max_subs = self.cfg.presence_max_subscriptions;
        let p = self.presence.conns.entry(conn).or_default();
        match op {
            Op::Subscribe => {
                let new = order.iter().filter(|u| !p.watching.contains(*u)).count();
                if p.watching.len() + new > max_subs {
                    return self.refuse(
                        conn,
                        request_id,
                        0,
                        &Refusal::PresenceTooManySubscriptions,
                    );
                }
                p.watching.extend(order.iter().cloned());
            }
            Op::Unsubscribe => {
                order.retain(|u| p.watching.remove(u));
                let from = self.origin(conn);
                self.presence_route_users(from, 0, Op::Unsubscribe, order);
                return self.write_presence(conn, request_id, Vec::new());
            }
            Op::Query => {}
        }
        if order.is_empty() {
            return self.write_presence(conn, request_id, Vec::new());
        }
        let from = self.origin(conn);
        let gather = self.next_gather_id();
        let homes = self.presence_route_users(from, gather, op, order.clone());
        self.presence_start_gather(
            conn,
            request_id,
            gather,
            homes,
            Collect::Users {
                order,
                got: FastMap::default(),
                // With `cluster.nodes`, every device of a user has its session at the user's
                // home, which answered: the index has nothing to add.
                cluster_wide: op == Op::Query
                    && self.cfg.cluster_node.is_some()
                    && self.placement.shards_per_node() == self.placement.shards(),
            },
        );
    }

    /// A fresh gather id (never 0: 0 asks for no answer).
    fn next_gather_id(&mut self) -> u64 {
        self.presence.next_gather += 1;
        self.presence.next_gather
    }

    /// Records answer `id` under way for `conn`, waiting for `remaining` shards; holds room
    /// for it in the connection's budget.
    fn presence_start_gather(
        &mut self,
        conn: ConnId,
        request_id: u64,
        id: u64,
        remaining: usize,
        collect: Collect,
    ) {
        debug_assert!(remaining > 0, "a gather waits for at least one shard");
        self.presence.gathers.insert(
            id,
            Gather {
                conn,
                request_id,
                remaining,
                collect,
            },
        );
        self.presence
            .conns
            .entry(conn)
            .or_default()
            .gathers
            .push(id);
        if let Some(c) = self.live_conn_mut(conn) {
            c.reserve(ACK_RESERVE);
        }
    }

    /// Sends `users` (an [`Op`] of connection `from`) to their homes, one mail per home;
    /// returns how many homes were asked.
    fn presence_route_users(
        &mut self,
        from: Origin,
        gather: u64,
        op: Op,
        users: Vec<Arc<str>>,
    ) -> usize {
        let mut by_home: BTreeMap<usize, Vec<Arc<str>>> = BTreeMap::new();
        for u in users {
            by_home.entry(self.placement.home(&u)).or_default().push(u);
        }
        let homes = by_home.len();
        for (home, users) in by_home {
            self.route(
                home,
                ShardMsg::Presence(Box::new(Mail::Users {
                    from,
                    gather,
                    op,
                    users,
                })),
            );
        }
        homes
    }

    /// QUERY_GROUP: a member asks every shard for its members of the group online.
    fn presence_group_count(&mut self, conn: ConnId, request_id: u64, group_id: &str) {
        let Some(conv) = Conv::group(group_id) else {
            return self.refuse(
                conn,
                request_id,
                0,
                &Refusal::BadPresenceRequest("group_id must be 1..=128 bytes".into()),
            );
        };
        let Some(me) = self.presence_who(conn) else {
            return;
        };
        if !self.is_current_member(&me.user, conv.id) {
            return self.refuse(conn, request_id, 0, &Refusal::NotMember);
        }
        let from = self.origin(conn);
        let gather = self.next_gather_id();
        let shards = self.placement.shards();
        for shard in 0..shards {
            self.route(
                shard,
                ShardMsg::Presence(Box::new(Mail::CountGroup {
                    from,
                    gather,
                    conv: conv.id,
                })),
            );
        }
        self.presence_start_gather(
            conn,
            request_id,
            gather,
            shards,
            Collect::GroupCount {
                group_id: group_id.to_owned(),
                count: 0,
            },
        );
    }

    /// Whether `user` (homed here) is a current member of group `conv`, as its inbox says.
    fn is_current_member(&self, user: &str, conv: u64) -> bool {
        self.home
            .users
            .get(user)
            .and_then(|u| u.inbox.get(&conv))
            .and_then(|e| e.window)
            .is_some_and(|(_, to)| to == u64::MAX)
    }

    /// Writes a `PresenceUpdate` answering `request_id` (0: a push) with `users`, in as many
    /// frames as the frame limit needs (answers mark all but the last `more`).
    fn write_presence(&mut self, conn: ConnId, request_id: u64, users: Vec<pb::UserPresence>) {
        let budget = self.cfg.page_budget;
        let mut chunk: Vec<pb::UserPresence> = Vec::new();
        let mut bytes = 0;
        let mut rest = users.into_iter().peekable();
        loop {
            let next = rest
                .peek()
                .map(|u| prost::Message::encoded_len(u) + ENTRY_OVERHEAD);
            let full = next.is_some_and(|n| !chunk.is_empty() && bytes + n > budget);
            if full || next.is_none() {
                let more = next.is_some();
                let frame = pb::Frame {
                    request_id,
                    body: Some(Body::PresenceUpdate(pb::PresenceUpdate {
                        users: std::mem::take(&mut chunk),
                        more: more && request_id != 0,
                        ..Default::default()
                    })),
                };
                self.write_frame(conn, &frame);
                bytes = 0;
                if !more {
                    return;
                }
            }
            if let (Some(n), Some(u)) = (next, rest.next()) {
                bytes += n;
                chunk.push(u);
            }
        }
    }

    /// A connection's presence (an AWAY flag, a device) may have changed at its user's home.
    pub(crate) fn presence_changed(&mut self, user: &Arc<str>) {
        let current = snapshot(&self.home, &self.presence.conns, user);
        let arm =
            self.presence
                .board
                .changed(user, current, self.now.ms, self.cfg.presence_coalesce_ms);
        if let Some(at) = arm {
            self.timers.insert(at, TimerFor::Presence);
        }
    }

    /// `conn` of `user` is gone: its subscriptions end, its AWAY flag goes, and the user's
    /// presence is looked at again (its last device may have left).
    /// A service connection (`service`) only ends its subscriptions: it was never one of the
    /// user's devices.
    pub(crate) fn presence_conn_gone(&mut self, conn: ConnId, user: &Arc<str>, service: bool) {
        if let Some(p) = self.presence.conns.remove(&conn) {
            let from = self.origin(conn);
            let watching: Vec<Arc<str>> = p.watching.into_iter().collect();
            if !watching.is_empty() {
                self.presence_route_users(from, 0, Op::Unsubscribe, watching);
            }
        }
        if service {
            return;
        }
        let online = self
            .home
            .users
            .get(&**user)
            .is_some_and(|u| !u.devices.is_empty());
        if !online {
            let unix_ms = self.now.unix_ms;
            self.presence.board.left(user, unix_ms);
            if let Some(u) = self.home.users.get_mut(&**user) {
                u.last_seen = unix_ms;
            }
            if let Some(h) = self.gate.observer() {
                h.presence_changed(&crate::hooks::PresenceChange {
                    user: user.to_string(),
                    online: false,
                });
            }
        }
        self.presence_changed(user);
    }

    /// The presence deadline: one flush turn.
    pub(crate) fn presence_flush(&mut self) {
        self.counters.presence_flushes += 1;
        let mut out = Vec::new();
        let (home, conns, board) = (&self.home, &self.presence.conns, &mut self.presence.board);
        let next = board.flush(
            self.now.ms,
            self.cfg.presence_coalesce_ms,
            self.cfg.presence_notifications_per_turn,
            |u| snapshot(home, conns, u),
            &mut out,
        );
        if let Some(at) = next {
            self.timers.insert(at, TimerFor::Presence);
        }
        // One mail per target shard, each update once with its watchers there.
        let mut per_shard: Vec<Vec<(Arc<pb::UserPresence>, Vec<Watcher>)>> =
            (0..self.placement.shards()).map(|_| Vec::new()).collect();
        for (w, update) in out {
            let Some(updates) = per_shard.get_mut(w.shard) else {
                continue;
            };
            match updates.last_mut() {
                Some((u, ws)) if Arc::ptr_eq(u, &update) => ws.push(w),
                _ => updates.push((update, vec![w])),
            }
        }
        for (shard, updates) in per_shard.into_iter().enumerate() {
            if !updates.is_empty() {
                self.route(shard, ShardMsg::Presence(Box::new(Mail::Push { updates })));
            }
        }
    }

    /// Presence mail from another shard (or this one).
    pub(crate) fn on_presence_mail(&mut self, mail: Mail) {
        match mail {
            Mail::Users {
                from,
                gather,
                op,
                users,
            } => self.on_presence_users(from, gather, op, users),
            Mail::Answer { to, gather, users } => {
                debug_assert_eq!(to.shard, self.index);
                self.on_presence_answer(gather, users, 0);
            }
            Mail::Push { updates } => self.on_presence_push(updates),
            Mail::CountGroup { from, gather, conv } => {
                let count = self
                    .home
                    .groups
                    .get(&conv)
                    .map_or(0, |g| g.online.len() as u64);
                self.route(
                    from.shard,
                    ShardMsg::Presence(Box::new(Mail::Counted {
                        to: from,
                        gather,
                        count,
                    })),
                );
            }
            Mail::Counted { to, gather, count } => {
                debug_assert_eq!(to.shard, self.index);
                self.on_presence_answer(gather, Vec::new(), count);
            }
            Mail::Typing(relay) => self.on_typing_relay(relay),
        }
    }

    /// At the users' home: a QUERY, SUBSCRIBE or UNSUBSCRIBE of connection `from`.
    fn on_presence_users(&mut self, from: Origin, gather: u64, op: Op, users: Vec<Arc<str>>) {
        let watcher = Watcher::from(from);
        let (now, coalesce) = (self.now.ms, self.cfg.presence_coalesce_ms);
        let mut answer = Vec::new();
        for user in users {
            debug_assert_eq!(self.placement.home(&user), self.index, "asked at its home");
            let current = snapshot(&self.home, &self.presence.conns, &user);
            let last_seen = self.home.last_seen(&user);
            match op {
                Op::Query => {
                    answer.push(current.to_pb(&user, self.home.last_seen(&user)));
                }
                Op::Subscribe => {
                    let (p, arm) = self.presence.board.subscribe(
                        &user,
                        watcher,
                        (current, last_seen),
                        now,
                        coalesce,
                    );
                    answer.push(p);
                    if let Some(at) = arm {
                        self.timers.insert(at, TimerFor::Presence);
                    }
                }
                Op::Unsubscribe => self.presence.board.unsubscribe(&user, watcher),
            }
        }
        if op != Op::Unsubscribe {
            self.route(
                from.shard,
                ShardMsg::Presence(Box::new(Mail::Answer {
                    to: from,
                    gather,
                    users: answer,
                })),
            );
        }
    }

    /// One shard's reply to gather `id`: `users` answered, `count` online members counted. The
    /// last reply writes the answer.
    fn on_presence_answer(&mut self, id: u64, users: Vec<pb::UserPresence>, count: u64) {
        let Some(g) = self.presence.gathers.get_mut(&id) else {
            return;
        };
        match &mut g.collect {
            Collect::Users { got, .. } => {
                for u in users {
                    got.insert(Arc::from(u.user.as_str()), u);
                }
            }
            Collect::GroupCount { count: sum, .. } => *sum += count,
        }
        g.remaining -= 1;
        if g.remaining > 0 {
            return;
        }
        let Some(g) = self.presence.gathers.remove(&id) else {
            return;
        };
        if let Some(p) = self.presence.conns.get_mut(&g.conn) {
            p.gathers.retain(|&x| x != id);
        }
        if self.live_conn_mut(g.conn).is_none() {
            return;
        }
        if let Collect::Users {
            order,
            cluster_wide: true,
            ..
        } = &g.collect
        {
            // In a cluster the user may be online on other nodes too: ask the presence index
            // before answering.
            let users = order.clone();
            self.presence.looking.insert(id, g);
            self.effects
                .push(crate::core::Effect::Lookup { gather: id, users });
            return;
        }
        self.answer_gather(g);
    }

    /// The routes the presence index holds for the users of answer `gather` (parked by
    /// [`crate::core::Effect::Lookup`]): `(user, [(device, node id)])`. Devices connected to
    /// other nodes join the answer (a user online only there is ONLINE here too: whether
    /// those devices set AWAY is not in the index), then it is written. With nothing found
    /// (or the index unreadable) the answer says what this node knows.
    pub fn handle_found(
        &mut self,
        gather: u64,
        found: Vec<(String, Vec<(String, String)>)>,
        now: crate::core::Now,
    ) {
        self.now = now;
        let Some(mut g) = self.presence.looking.remove(&gather) else {
            return;
        };
        if self.live_conn_mut(g.conn).is_none() {
            return;
        }
        if let Collect::Users { got, .. } = &mut g.collect {
            let me = self.cfg.cluster_node.clone();
            for (user, routes) in found {
                let remote: Vec<String> = routes
                    .into_iter()
                    .filter(|(_, node)| Some(node.as_str()) != me.as_deref())
                    .map(|(device, _)| device)
                    .collect();
                if let Some(p) = got.get_mut(user.as_str()) {
                    merge_remote(p, remote);
                }
            }
        }
        let conn = g.conn;
        self.answer_gather(g);
        self.after_io(conn);
        self.drain_local();
    }

    /// Writes the answer of a complete gather.
    fn answer_gather(&mut self, g: Gather) {
        self.unreserve(g.conn, ACK_RESERVE);
        match g.collect {
            Collect::Users { order, mut got, .. } => {
                let users = order.iter().filter_map(|u| got.remove(u)).collect();
                self.write_presence(g.conn, g.request_id, users);
            }
            Collect::GroupCount { group_id, count } => self.write_frame(
                g.conn,
                &pb::Frame {
                    request_id: g.request_id,
                    body: Some(Body::PresenceUpdate(pb::PresenceUpdate {
                        online_count: count,
                        group_id,
                        ..Default::default()
                    })),
                },
            ),
        }
    }

    /// At the watchers' shard: changed users for connections here. Each connection that still
    /// watches the user gets it: in the answer it waits for, if that answer names the user
    /// (the answer then goes out with the newer presence), else in one `PresenceUpdate` with
    /// every other changed user it watches.
    fn on_presence_push(&mut self, updates: Vec<(Arc<pb::UserPresence>, Vec<Watcher>)>) {
        let mut per_conn: Vec<(ConnId, usize)> = Vec::new();
        for (i, (update, watchers)) in updates.iter().enumerate() {
            for w in watchers {
                debug_assert_eq!(w.shard, self.index);
                let conn = w.conn();
                let Some(p) = self.presence.conns.get_mut(&conn) else {
                    continue;
                };
                if !p.watching.contains(update.user.as_str()) {
                    continue;
                }
                let gathers = &mut self.presence.gathers;
                let absorbed =
                    p.gathers
                        .iter()
                        .any(|id| match gathers.get_mut(id).map(|g| &mut g.collect) {
                            Some(Collect::Users { got, .. }) => {
                                match got.get_mut(update.user.as_str()) {
                                    Some(slot) => {
                                        *slot = (**update).clone();
                                        true
                                    }
                                    None => false,
                                }
                            }
                            _ => false,
                        });
                if !absorbed {
                    per_conn.push((conn, i));
                }
            }
        }
        per_conn.sort_unstable();
        let mut at = 0;
        while at < per_conn.len() {
            let conn = per_conn[at].0;
            let mut users = Vec::new();
            while let Some(&(c, i)) = per_conn.get(at)
                && c == conn
            {
                if let Some((u, _)) = updates.get(i) {
                    users.push((**u).clone());
                }
                at += 1;
            }
            if self.live_conn_mut(conn).is_some() {
                self.counters.presence_updates_pushed += 1;
                self.write_presence(conn, 0, users);
            }
        }
    }

    /// A `Typing` frame from `conn`: checked, limited, relayed to the conversation's devices.
    pub(crate) fn on_typing(&mut self, conn: ConnId, request_id: u64, t: pb::Typing) {
        let now = self.now.ms;
        let interval = self.cfg.typing_min_interval_ms;
        let Some(view) = t.conversation else {
            return self.refuse(conn, request_id, 0, &Refusal::ConversationRequired);
        };
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let Some(who) = c.who.as_mut() else {
            return;
        };
        let Some(conv) = who.conv(&view) else {
            return self.refuse(conn, request_id, 0, &Refusal::UnknownConversation);
        };
        let from = who.device.clone();
        if conv.kind == ConvKind::Group && !self.is_current_member(&from.user, conv.id) {
            return self.refuse(conn, request_id, 0, &Refusal::NotMember);
        }
        let p = self.presence.conns.entry(conn).or_default();
        if !p.admit_typing(conv.id, t.typing, now, interval) {
            self.counters.typing_dropped += 1;
            return;
        }
        match conv.kind {
            ConvKind::Direct => {
                let mut by_home: BTreeMap<usize, Vec<Arc<str>>> = BTreeMap::new();
                for u in &conv.members {
                    by_home
                        .entry(self.placement.home(u))
                        .or_default()
                        .push(Arc::clone(u));
                }
                for (home, users) in by_home {
                    let relay = TypingRelay {
                        conv: Arc::clone(&conv),
                        from: from.clone(),
                        typing: t.typing,
                        users,
                    };
                    self.route(home, ShardMsg::Presence(Box::new(Mail::Typing(relay))));
                }
            }
            ConvKind::Group => {
                for shard in 0..self.placement.shards() {
                    let relay = TypingRelay {
                        conv: Arc::clone(&conv),
                        from: from.clone(),
                        typing: t.typing,
                        users: Vec::new(),
                    };
                    self.route(shard, ShardMsg::Presence(Box::new(Mail::Typing(relay))));
                }
            }
        }
    }

    /// At a recipients' home: writes the typing frame to their devices online (not the sending
    /// device; not a connection whose queue is at its budget), encoded once per view.
    fn on_typing_relay(&mut self, relay: TypingRelay) {
        let TypingRelay {
            conv,
            from,
            typing,
            users,
        } = relay;
        // The connections to write to, grouped by the view they read the conversation in (a
        // group has one view; a direct conversation one per user).
        let mut batches: Vec<(pb::Conversation, Vec<ConnId>)> = Vec::new();
        let mut add = |home: &Home, user: &Arc<str>, view: pb::Conversation| {
            let Some(u) = home.users.get(user) else {
                return;
            };
            let own = **user == *from.user;
            let conns = u
                .devices
                .iter()
                .filter(|(d, _)| !(own && **d == *from.device))
                .map(|&(_, c)| c);
            match batches.last_mut() {
                Some((v, targets)) if *v == view => targets.extend(conns),
                _ => batches.push((view, conns.collect())),
            }
        };
        match conv.kind {
            ConvKind::Direct => {
                for user in &users {
                    add(&self.home, user, conv.view_for(user));
                }
            }
            ConvKind::Group => {
                if let Some(g) = self.home.groups.get(&conv.id) {
                    let view = conv.view_for("");
                    for user in &g.online {
                        add(&self.home, user, view.clone());
                    }
                }
            }
        }
        for (view, targets) in batches {
            // Encoded once per view.
            let frame = pb::Frame {
                request_id: 0,
                body: Some(Body::Typing(pb::Typing {
                    conversation: Some(view),
                    typing,
                    user: from.user.to_string(),
                    device: from.device.to_string(),
                })),
            };
            let bytes = prost::Message::encode_to_vec(&frame);
            for conn in targets {
                let cfg = &self.cfg;
                let room = self
                    .conns
                    .get(conn.slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.id == conn && !c.over_budget(cfg));
                if room {
                    self.counters.typing_relayed += 1;
                    self.write_encoded(conn, &bytes);
                } else {
                    self.counters.typing_dropped += 1;
                }
            }
        }
    }
}

/// Adds `remote` devices (connected to other nodes) to presence `p`: a user with any is ONLINE.
fn merge_remote(p: &mut pb::UserPresence, remote: Vec<String>) {
    if remote.is_empty() {
        return;
    }
    p.devices.extend(remote);
    p.devices.sort_unstable();
    p.devices.dedup();
    p.status = pb::PresenceStatus::Online as i32;
    p.last_seen = 0;
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn devices_on_other_nodes_make_a_user_online_and_join_its_devices() {
        let mut p = pb::UserPresence {
            user: "bob".into(),
            status: pb::PresenceStatus::Offline as i32,
            devices: Vec::new(),
            last_seen: 42,
        };
        merge_remote(&mut p, Vec::new());
        assert_eq!(
            (p.status, p.last_seen),
            (pb::PresenceStatus::Offline as i32, 42)
        );
        merge_remote(&mut p, vec!["tablet".into(), "phone".into()]);
        assert_eq!(p.status, pb::PresenceStatus::Online as i32);
        assert_eq!(p.devices, ["phone", "tablet"]);
        assert_eq!(p.last_seen, 0);
        let mut away = pb::UserPresence {
            user: "carol".into(),
            status: pb::PresenceStatus::Away as i32,
            devices: vec!["laptop".into()],
            last_seen: 0,
        };
        merge_remote(&mut away, vec!["laptop".into(), "phone".into()]);
        assert_eq!(away.status, pb::PresenceStatus::Online as i32);
        assert_eq!(away.devices, ["laptop", "phone"]);
    }
}
