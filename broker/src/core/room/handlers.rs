//! The shard's side of room: requests and mail handled by the core (the state and its rules
//! are in the parent module).

use super::*;

impl<B: Backend> ShardCore<B> {
    /// A `RoomRequest`: join or leave, answered by the room's owner.
    pub(crate) fn on_room_request(&mut self, conn: ConnId, request_id: u64, req: pb::RoomRequest) {
        let join = match pb::RoomAction::try_from(req.action) {
            Ok(pb::RoomAction::Join) => true,
            Ok(pb::RoomAction::LeaveRoom) => false,
            _ => return self.refuse(conn, request_id, 0, &Refusal::BadRoomAction),
        };
        if !valid_room_id(&req.room_id) {
            return self.refuse(conn, request_id, 0, &Refusal::BadRoomId);
        }
        let max = self.cfg.room_max_per_connection;
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let rooms = c.rooms.get_or_insert_default();
        let found = rooms.find(&req.room_id);
        let mut unlisted = None;
        let op = match (join, found) {
            (true, Some(_)) => RoomOp::Query,
            (true, None) if rooms.joined.len() >= max => {
                return self.refuse(conn, request_id, 0, &Refusal::TooManyRooms);
            }
            (true, None) => {
                rooms.joined.push(Joined {
                    room: Arc::from(req.room_id.as_str()),
                    at: None,
                    lag: LagQueue::default(),
                });
                RoomOp::Join
            }
            (false, Some(i)) => {
                let j = rooms.joined.swap_remove(i);
                rooms.pending -= j.lag.len();
                match j.at {
                    Some(at) => {
                        unlisted = Some((j.room, at));
                        RoomOp::Leave
                    }
                    // The owner's answer to the join will be undone when it comes.
                    None => RoomOp::Query,
                }
            }
            (false, None) => RoomOp::Query,
        };
        rooms.check();
        if rooms.joined.is_empty() {
            c.rooms = None;
        }
        c.reserve(ACK_RESERVE);
        if let Some((room, at)) = unlisted {
            self.unlist(&room, at);
        }
        let owner = owner_of(&self.placement, &req.room_id);
        let reply = Some((self.origin(conn), request_id));
        self.route(
            owner,
            ShardMsg::RoomChange(Box::new(RoomChange {
                room: Arc::from(req.room_id),
                shard: self.index,
                op,
                reply,
            })),
        );
    }

    /// A `Send` to a room: checked here, numbered and fanned out by the room's owner.
    pub(crate) fn on_room_send(&mut self, conn: ConnId, request_id: u64, send: pb::Send) {
        let cmid = send.client_msg_id;
        let room = send.to.as_ref().map(|v| v.id.as_str()).unwrap_or_default();
        let refusal = match crate::core::conn::check_send(&send, &self.cfg, false) {
            Err(r) => Some(r),
            Ok(()) if send.kind != pb::MessageKind::Normal as i32 => {
                Some(Refusal::RoomKindNotAllowed)
            }
            Ok(()) if !valid_room_id(room) => Some(Refusal::BadRoomId),
            Ok(()) => None,
        };
        if let Some(r) = refusal {
            return self.refuse(conn, request_id, cmid, &r);
        }
        let origin = self.origin(conn);
        let unix_ms = self.now.unix_ms;
        let owner = owner_of(&self.placement, room);
        let Some(c) = self.live_conn_mut(conn) else {
            return;
        };
        let room: Arc<str> = match c.rooms.as_ref().and_then(|r| r.find(room)) {
            Some(i) => c
                .rooms
                .as_ref()
                .and_then(|r| r.joined.get(i))
                .map_or_else(|| Arc::from(room), |j| Arc::clone(&j.room)),
            None => return self.refuse(conn, request_id, cmid, &Refusal::NotInRoom),
        };
        let Some(sender) = c.who.as_ref().map(|w| w.device.clone()) else {
            return;
        };
        // Room for the ack in the connection's budget, until it comes back.
        c.reserve(ACK_RESERVE);
        self.route(
            owner,
            ShardMsg::RoomPost(Box::new(RoomPost {
                origin,
                request_id,
                room,
                sender,
                send,
                unix_ms,
            })),
        );
    }

    /// At the owner: a join, leave or query of a room.
    pub(crate) fn on_room_change(&mut self, ch: RoomChange) {
        let max_idle = self.cfg.room_max_idle;
        let result = match ch.op {
            RoomOp::Join => {
                let (shards, max) = (self.placement.shards(), self.cfg.room_max_listeners);
                self.rooms
                    .join(&ch.room, ch.shard, shards, max)
                    .map(|r| RoomFigures {
                        audience: r.audience,
                        last_seq: r.last_seq,
                        history: r.history.iter().cloned().collect(),
                    })
            }
            RoomOp::Leave => {
                self.rooms.leave(&ch.room, ch.shard, max_idle);
                Ok(self.figures(&ch.room))
            }
            RoomOp::Query => Ok(self.figures(&ch.room)),
        };
        if result.is_err() {
            // A refused join may have made the room: forget it again if it is empty.
            self.rooms.settle(&ch.room, max_idle);
        }
        let Some((to, request_id)) = ch.reply else {
            return;
        };
        self.route(
            to.shard,
            ShardMsg::RoomAnswer(Box::new(RoomAnswer {
                to,
                request_id,
                room: ch.room,
                op: ch.op,
                result,
            })),
        );
    }

    /// A room's figures without its history (a room this shard does not have: all zero).
    fn figures(&self, room: &str) -> RoomFigures {
        let (audience, last_seq) = self
            .rooms
            .owned
            .get(room)
            .map_or((0, 0), |r| (r.audience, r.last_seq));
        RoomFigures {
            audience,
            last_seq,
            history: Vec::new(),
        }
    }

    /// At the listener's shard: the owner answered a join, leave or query.
    pub(crate) fn on_room_answer(&mut self, a: RoomAnswer) {
        let counted = a.counted();
        let undo = |core: &mut Self, room: Arc<str>| {
            let owner = owner_of(&core.placement, &room);
            core.route(
                owner,
                ShardMsg::RoomChange(Box::new(RoomChange {
                    room,
                    shard: core.index,
                    op: RoomOp::Leave,
                    reply: None,
                })),
            );
        };
        let Some(conn) = self.conn_of(a.to) else {
            if counted {
                undo(self, a.room);
            }
            return;
        };
        self.unreserve(conn, ACK_RESERVE);
        let figures = match a.result {
            Ok(f) => f,
            Err(r) => {
                if a.op == RoomOp::Join
                    && let Some(c) = self.live_conn_mut(conn)
                    && let Some(rooms) = c.rooms.as_mut()
                    && let Some(i) = rooms.find(&a.room)
                    && rooms.joined[i].at.is_none()
                {
                    rooms.joined.swap_remove(i);
                    if rooms.joined.is_empty() {
                        c.rooms = None;
                    }
                }
                return self.refuse(conn, a.request_id, 0, &r);
            }
        };
        let mut history = Vec::new();
        if counted {
            let waiting = self.live_conn_mut(conn).and_then(|c| {
                let rooms = c.rooms.as_mut()?;
                let i = rooms.find(&a.room)?;
                rooms.joined[i].at.is_none().then_some(i)
            });
            match waiting {
                Some(i) => {
                    let (key, at) = self.rooms.list(&a.room, conn);
                    if let Some(j) = self
                        .live_conn_mut(conn)
                        .and_then(|c| c.rooms.as_mut())
                        .and_then(|r| r.joined.get_mut(i))
                    {
                        j.room = key;
                        j.at = Some(at);
                    }
                    history = figures.history;
                }
                // Left before the answer came, or counted already: one count too many.
                None => undo(self, Arc::clone(&a.room)),
            }
        }
        self.write_frame(
            conn,
            &pb::Frame {
                request_id: a.request_id,
                body: Some(Body::RoomResult(pb::RoomResult {
                    room_id: a.room.to_string(),
                    audience: figures.audience,
                    last_seq: figures.last_seq,
                })),
            },
        );
        if !history.is_empty() {
            let mut held = LagQueue {
                pending: history.into(),
                dropped: 0,
            };
            while !held.is_empty() {
                let mut batch = Vec::new();
                held.take_batch(self.cfg.page_budget, &mut batch);
                self.write_room_batch(conn, &batch);
            }
        }
    }

    /// At the owner: a send to a room. Numbered, encoded once, kept for joiners, acked, and cast
    /// to every shard with listeners.
    pub(crate) fn on_room_post(&mut self, p: RoomPost) {
        let RoomPost {
            origin,
            request_id,
            room,
            sender,
            send,
            unix_ms,
        } = p;
        let history = self.cfg.room_history;
        let Some(r) = self.rooms.owned.get_mut(&*room) else {
            // Its join was refused (the room was full) after the send left.
            self.route(
                origin.shard,
                ShardMsg::Refused {
                    to: origin,
                    request_id,
                    client_msg_id: send.client_msg_id,
                    refusal: Refusal::NotInRoom,
                },
            );
            return;
        };
        let msg_id = self.owner.ids.next(unix_ms.max(0) as u64);
        let seq = r.last_seq + 1;
        r.last_seq = seq;
        // The one encode of this message: every listener's frame carries these bytes.
        let stored = Bytes::from(splice::encode_message(&splice::MessageRef {
            conversation: &r.conv,
            seq,
            msg_id,
            from_user: &sender.user,
            from_device: &sender.device,
            client_msg_id: send.client_msg_id,
            content_type: send.content_type,
            body: &send.body,
            server_time: unix_ms,
            kind: send.kind,
            ref_seq: send.ref_seq,
        }));
        if history > 0 {
            if r.history.len() >= history {
                r.history.pop_front();
            }
            r.history.push_back((seq, stored.clone()));
        }
        let shards: Vec<usize> = (0..r.per_shard.len())
            .filter(|&s| r.per_shard[s] > 0)
            .collect();
        self.counters.room_messages += 1;
        let ack = pb::SendAck {
            client_msg_id: send.client_msg_id,
            msg_id,
            seq,
            server_time: unix_ms,
            conversation: send.to,
            durability: pb::Durability::Memory as i32,
        };
        self.route(
            origin.shard,
            ShardMsg::Acked(Acked {
                to: origin,
                request_id,
                ack,
            }),
        );
        for shard in shards {
            self.route(
                shard,
                ShardMsg::RoomCast(Box::new(RoomCast {
                    room: Arc::clone(&room),
                    seq,
                    stored: stored.clone(),
                    exclude: origin,
                })),
            );
        }
    }

    /// At a listener's shard: one room message for this shard's listeners. Framed once per wire
    /// form; appended to each listener's queue, or held in its lag queue if it is slow.
    pub(crate) fn on_room_cast(&mut self, cast: RoomCast) {
        let Some(list) = self.rooms.local.get(&*cast.room) else {
            return;
        };
        let exclude = (cast.exclude.shard == self.index).then_some(ConnId {
            slot: cast.exclude.slot,
            generation: cast.exclude.generation,
        });
        let mut encoded = BytesMut::new();
        let message = [splice::Spliced {
            stored: &cast.stored,
            view: &[],
        }];
        splice::encode_deliver(0, &message, &mut encoded);
        let max_frame = self.cfg.max_frame_bytes as usize;
        let (share, capacity) = (self.cfg.room_share_bytes, self.cfg.room_listener_queue);
        let mut framed: [Option<Result<Bytes, String>>; 3] = [None, None, None];
        let (conns, cfg, pool, dirty, counters) = (
            &mut self.conns,
            &self.cfg,
            &mut self.pool,
            &mut self.dirty,
            &mut self.counters,
        );
        let mut failed = None;
        for &conn in list {
            if Some(conn) == exclude {
                continue;
            }
            let Some(Some(c)) = conns.get_mut(conn.slot as usize) else {
                continue;
            };
            if c.id != conn {
                continue;
            }
            let Some(form) = c.transport.wire_form() else {
                continue;
            };
            let Some(rooms) = c.rooms.as_mut() else {
                debug_assert!(false, "a listed connection has its rooms");
                continue;
            };
            let Some(j) = rooms
                .joined
                .iter_mut()
                .find(|j| Arc::ptr_eq(&j.room, &cast.room) || *j.room == *cast.room)
            else {
                debug_assert!(false, "a listed connection has the room's entry");
                continue;
            };
            if !j.lag.is_empty() || c.out.len() + c.reserved as usize >= share {
                let dropped = j.lag.push(cast.seq, cast.stored.clone(), capacity);
                rooms.pending = rooms.pending + 1 - dropped;
                counters.room_drops += dropped as u64;
                continue;
            }
            let bytes = framed[form_index(form)].get_or_insert_with(|| {
                let mut out = BytesMut::new();
                form.encode_prebuilt(&encoded, max_frame, &mut out)
                    .map(|()| out.freeze())
                    .map_err(|e| e.to_string())
            });
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    failed = Some(e.clone());
                    continue;
                }
            };
            c.fill_from(pool);
            c.make_room(cfg);
            c.out.extend_from_slice(bytes);
            counters.frames_out += 1;
            counters.bytes_out += bytes.len() as u64;
            counters.room_deliveries += 1;
            if !c.transmit_queued {
                c.transmit_queued = true;
                dirty.push(conn);
            }
        }
        if let Some(e) = failed {
            self.log_line(
                LogKind::Encode,
                format_args!("cannot frame a room message: {e}"),
            );
        }
    }

    /// After a write: a connection under its room share again gets what its lag queues hold,
    /// each room's preceded by a `RoomLag` if messages were dropped.
    pub(crate) fn pump_rooms(&mut self, conn: ConnId) {
        let (share, budget) = (self.cfg.room_share_bytes, self.cfg.page_budget);
        let mut batch = Vec::new();
        loop {
            let Some(c) = self.live_conn_mut(conn) else {
                return;
            };
            if c.out.len() + c.reserved as usize >= share || c.transport.wire_form().is_none() {
                return;
            }
            let Some(rooms) = c.rooms.as_mut().filter(|r| r.pending > 0) else {
                return;
            };
            let Some(j) = rooms.joined.iter_mut().find(|j| !j.lag.is_empty()) else {
                debug_assert!(false, "pending messages are in some lag queue");
                return;
            };
            let room = Arc::clone(&j.room);
            let lag = j.lag.take_lag();
            batch.clear();
            j.lag.take_batch(budget, &mut batch);
            rooms.pending -= batch.len();
            rooms.check();
            if let Some((dropped, next_seq)) = lag {
                self.write_frame(
                    conn,
                    &pb::Frame {
                        request_id: 0,
                        body: Some(Body::RoomLag(pb::RoomLag {
                            room_id: room.to_string(),
                            dropped,
                            next_seq,
                        })),
                    },
                );
            }
            self.write_room_batch(conn, &batch);
        }
    }

    /// Writes room messages to one connection in one `Deliver`.
    fn write_room_batch(&mut self, conn: ConnId, batch: &[(u64, Bytes)]) {
        if batch.is_empty() {
            return;
        }
        let messages: Vec<splice::Spliced<'_>> = batch
            .iter()
            .map(|(_, stored)| splice::Spliced { stored, view: &[] })
            .collect();
        self.counters.room_deliveries += batch.len() as u64;
        self.write_spliced(conn, |out| {
            splice::encode_deliver(0, &messages, out);
        });
    }

    /// Takes connection `conn`'s entry at `at` off the list of `room` (fixing the index of the
    /// connection moved into its place).
    fn unlist(&mut self, room: &Arc<str>, at: u32) {
        let Some(moved) = self.rooms.unlist(room, at) else {
            return;
        };
        let j = self
            .live_conn_mut(moved)
            .and_then(|c| c.rooms.as_mut())
            .and_then(|r| r.joined.iter_mut().find(|j| *j.room == **room));
        match j {
            Some(j) => j.at = Some(at),
            None => debug_assert!(false, "a listed connection has the room's entry"),
        }
    }

    /// A connection is gone: it leaves every room it was counted in.
    pub(crate) fn leave_rooms(&mut self, rooms: ConnRooms) {
        for j in rooms.joined {
            // A join still on its way is undone when its answer finds the connection gone.
            let Some(at) = j.at else {
                continue;
            };
            self.unlist(&j.room, at);
            let owner = owner_of(&self.placement, &j.room);
            self.route(
                owner,
                ShardMsg::RoomChange(Box::new(RoomChange {
                    room: j.room,
                    shard: self.index,
                    op: RoomOp::Leave,
                    reply: None,
                })),
            );
        }
    }
}
