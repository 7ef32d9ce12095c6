//! Frames out: every frame the core writes to a connection goes through here — encoded in the
//! connection's wire form (or spliced around stored bytes), counted, and checked against the
//! connection's budget; refusals count against the client's error budget; a connection past its
//! queue bound goes `Behind`.

use bytes::BytesMut;
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_storage::Backend;

use super::conn::{self, ConnId};
use super::error::{CloseReason, Refusal};
use super::{Effect, ShardCore};
use crate::loglimit::LogKind;
use crate::transport::{Transport, TransportError};

impl<B: Backend> ShardCore<B> {
    /// Writes `frame` to `conn` in its transport's form.
    pub(super) fn write_frame(&mut self, conn: ConnId, frame: &pb::Frame) {
        self.write_with(conn, |t, out| t.encode(frame, out));
    }

    /// Writes a frame already encoded as protobuf (spliced around stored messages).
    pub(super) fn write_encoded(&mut self, conn: ConnId, encoded: &[u8]) {
        debug_assert!(
            <pb::Frame as prost::Message>::decode(encoded).is_ok(),
            "a spliced frame decodes"
        );
        self.write_with(conn, |t, out| t.encode_prebuilt(encoded, out));
    }

    /// Appends one frame to `conn`'s queue with `encode` (its buffer taken from the pool when
    /// it has none), and counts it.
    pub(super) fn write_with(
        &mut self,
        conn: ConnId,
        encode: impl FnOnce(&mut Transport, &mut BytesMut) -> Result<(), TransportError>,
    ) {
        let (pool, cfg) = (&mut self.pool, &self.cfg);
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn {
            return;
        }
        c.fill_from(pool);
        c.make_room(cfg);
        let before = c.out.len();
        let result = encode(&mut c.transport, &mut c.out);
        let written = c.out.len() - before;
        self.wrote(conn, written, result);
    }

    /// Encodes a frame with `build` into the shard's scratch buffer, then writes it to `conn`.
    pub(super) fn write_spliced(&mut self, conn: ConnId, build: impl FnOnce(&mut BytesMut)) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        build(&mut scratch);
        self.write_encoded(conn, &scratch);
        self.scratch = scratch;
    }

    pub(super) fn wrote(
        &mut self,
        conn: ConnId,
        written: usize,
        result: Result<(), TransportError>,
    ) {
        match result {
            Ok(()) => {
                self.counters.frames_out += 1;
                self.counters.bytes_out += written as u64;
                self.mark_dirty(conn);
            }
            // A connection that is not open for frames (closing, or a WebSocket before its
            // upgrade) simply gets nothing.
            Err(TransportError::NotOpen) => {}
            Err(e) => self.log_line(LogKind::Encode, format_args!("cannot encode a frame: {e}")),
        }
    }

    /// Answers a request with a refusal. One the client caused counts against its error
    /// budget; one too many closes the connection (TOO_MANY_ERRORS) instead.
    pub(super) fn refuse(
        &mut self,
        conn: ConnId,
        request_id: u64,
        client_msg_id: u64,
        r: &Refusal,
    ) {
        let now = self.now.ms;
        let cfg = &self.cfg;
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id != conn {
            return;
        }
        if r.is_clients_fault()
            && let Some(who) = c.who.as_mut()
            && who.count_error(cfg, now)
        {
            self.counters.closed_for_errors += 1;
            return self.close(conn, request_id, Some(CloseReason::TooManyErrors));
        }
        self.write_frame(conn, &r.frame(request_id, client_msg_id));
    }

    /// A connection held at its budget is under it again: it takes input once more.
    pub(super) fn maybe_resume(&mut self, conn: ConnId) {
        if self.relay_full(conn) {
            return;
        }
        let cfg = &self.cfg;
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        if c.id == conn && c.input == conn::Input::Held && !c.over_budget(cfg) {
            c.input = conn::Input::Backlog;
            self.effects.push(Effect::Resume(conn));
        }
    }

    /// After a delivery: past the queue bound (or too many unacked), the connection goes behind.
    pub(super) fn check_backlog(&mut self, conn: ConnId) {
        let max_out = self.cfg.max_outbound_bytes;
        let max_unacked = self.cfg.max_unacked;
        let timers = &mut self.timers;
        let Some(Some(c)) = self.conns.get_mut(conn.slot as usize) else {
            return;
        };
        let reason = if c.out.len() > max_out {
            "outbound queue over limits.max_outbound_bytes"
        } else if c.delivery.unacked() > max_unacked {
            "too many unacknowledged deliveries (limits.max_unacked_deliveries)"
        } else {
            return;
        };
        if c.delivery.go_behind(timers) {
            self.counters.behinds += 1;
            self.write_frame(
                conn,
                &pb::Frame {
                    request_id: 0,
                    body: Some(Body::Behind(pb::Behind {
                        reason: reason.to_owned(),
                    })),
                },
            );
        }
    }
}
