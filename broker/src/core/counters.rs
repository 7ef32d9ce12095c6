//! What a shard counts: plain integers in the core, read as a snapshot by the driver (the admin
//! and metrics endpoint reads these).

use super::histogram::Latencies;

/// What a shard's driver publishes (about every 100 ms) for the admin listener and
/// `Node::counters`: a copy of the core's counters and latency histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShardStats {
    /// The counters.
    pub(crate) counters: Counters,
    /// The latency histograms.
    pub(crate) latencies: Latencies,
}

/// A shard's counters. Totals since start unless noted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections open now (a gauge).
    pub connections: u64,
    /// Of those, WebSocket connections (a gauge; the others are TCP).
    pub websocket_connections: u64,
    /// Connections accepted or adopted.
    pub connections_opened: u64,
    /// Successful logins.
    pub logins: u64,
    /// Logins refused.
    pub logins_refused: u64,
    /// Frames decoded from clients.
    pub frames_in: u64,
    /// Frames written to clients.
    pub frames_out: u64,
    /// Bytes received from clients.
    pub bytes_in: u64,
    /// Bytes queued to clients.
    pub bytes_out: u64,
    /// Messages stored (appended) by this shard as owner.
    pub messages_stored: u64,
    /// Retried sends answered from the de-dup window.
    pub retries_deduplicated: u64,
    /// Live deliveries written.
    pub deliveries: u64,
    /// Messages re-sent by retransmit deadlines.
    pub retransmits: u64,
    /// Connections told they are `Behind`.
    pub behinds: u64,
    /// Syncs started.
    pub syncs: u64,
    /// Group-commit flushes completed.
    pub flushes: u64,
    /// Sum of flush latencies, ms.
    pub flush_ms_total: u64,
    /// Largest flush latency, ms.
    pub flush_ms_max: u64,
    /// Start-up checkpoints written.
    pub checkpoints: u64,
    /// Times a connection reached its budget and its input was held.
    pub holds: u64,
    /// Requests refused by a connection's request bucket.
    pub rate_limited: u64,
    /// Undecodable frames from logged-in connections (refused, not fatal).
    pub bad_frames: u64,
    /// Connections ended by a fatal framing error or garbage before login.
    pub fatal_frames: u64,
    /// Connections closed for more errors than `limits.max_errors` in a window.
    pub closed_for_errors: u64,
    /// Sessions ended because their token expired.
    pub tokens_expired: u64,
    /// Sessions whose token was refreshed by a fresh Login.
    pub token_refreshes: u64,
    /// WebSocket upgrades refused for their Origin.
    pub origins_refused: u64,
    /// Connections refused at accept (connection limits).
    pub refused_at_open: u64,
    /// Users forgotten by their home after their last device left with nothing pending.
    pub users_freed: u64,
    /// Log lines suppressed by the per-kind rate limit.
    pub log_lines_suppressed: u64,
    /// Group membership and settings events stored.
    pub group_events: u64,
    /// Group messages pushed live to a member's device (also counted in `deliveries`).
    pub group_deliveries: u64,
    /// READ receipts that moved a read cursor.
    pub receipts: u64,
    /// Conversation lists answered.
    pub conversation_lists: u64,
    /// Room messages sent by this shard as the room's owner.
    pub room_messages: u64,
    /// Room messages written to listeners on this shard (live, held, or history on a join).
    pub room_deliveries: u64,
    /// Room messages dropped for slow listeners on this shard (each told with `RoomLag`).
    pub room_drops: u64,
    /// `PresenceUpdate` pushes to subscribed connections (one per connection per flush turn).
    pub presence_updates_pushed: u64,
    /// Presence flush turns (a flush cut by `presence.max_notifications_per_turn` counts once
    /// per turn).
    pub presence_flushes: u64,
    /// Typing frames written to a recipient's connection.
    pub typing_relayed: u64,
    /// Typing frames dropped: over `presence.typing_min_interval_ms` from their sender, or for
    /// a recipient whose queue was at its budget.
    pub typing_dropped: u64,
    /// Requests parked on a hook that answered after it returned.
    pub hooks_parked: u64,
    /// Sends and group requests a hook denied.
    pub hooks_denied: u64,
    /// Connections ended by the application (admin API or embedding).
    pub kicked: u64,
    /// In-process connections opened by the application.
    pub local_connections_opened: u64,
    /// Routes asked of the cluster's presence index (logins in a cluster).
    pub routes_asked: u64,
    /// Logins closed with UNAVAILABLE because their route could not be registered in time.
    pub routes_failed: u64,
    /// Routes registered for a login that was gone by then (withdrawn at once).
    pub routes_orphaned: u64,
    /// Connections relayed to their session's home on another node.
    pub relays_opened: u64,
    /// Requests refused UNAVAILABLE because the node's lease had run out.
    pub fenced: u64,
    /// Mail to another node's shards sent on a link (cluster with `cluster.nodes`).
    pub remote_mail_out: u64,
    /// Mail from another node's shards handled here.
    pub remote_mail_in: u64,
    /// Mail for another node that could not be sent (no link to it): requests answered
    /// UNAVAILABLE, the rest repaired when the link comes up.
    pub unreachable_mail: u64,
    /// Connections closed UNAVAILABLE because a link went down while they waited for an
    /// answer (their clients resend and sync).
    pub closed_for_link: u64,
    /// Messages pulled from an owner for users online after a home learned of messages it
    /// was not delivered (a lost link, a crashed owner).
    pub fills: u64,
    /// TLS connections open now (a gauge; counted by the driver, which owns TLS).
    pub tls_connections: u64,
    /// TLS handshakes completed (counted by the driver).
    pub tls_handshakes: u64,
    /// TLS connections ended by a TLS error (e.g. garbage instead of a ClientHello) or by a
    /// handshake not done within `tls.handshake_timeout_ms` (counted by the driver).
    pub tls_failures: u64,
    /// UDP sessions open now (a gauge; counted by the driver, which owns the UDP sockets).
    pub udp_sessions: u64,
    /// UDP datagrams received.
    pub udp_datagrams_received: u64,
    /// UDP datagrams sent.
    pub udp_datagrams_sent: u64,
    /// UDP datagrams dropped unanswered: malformed, unauthenticated, replayed, for no session,
    /// or arriving while their session could take no input.
    pub udp_datagrams_dropped: u64,
    /// RETRY datagrams sent (UDP logins without a good cookie).
    pub udp_retries: u64,
    /// UDP sessions that moved to a new client address (NAT rebinding).
    pub udp_migrations: u64,
    /// UDP datagrams passed to the shard that owns their session.
    pub udp_forwarded: u64,
}

impl Counters {
    /// Adds `other` into `self` (for node totals; the gauge adds too).
    pub fn add(&mut self, other: &Counters) {
        self.connections += other.connections;
        self.websocket_connections += other.websocket_connections;
        self.connections_opened += other.connections_opened;
        self.logins += other.logins;
        self.logins_refused += other.logins_refused;
        self.frames_in += other.frames_in;
        self.frames_out += other.frames_out;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.messages_stored += other.messages_stored;
        self.retries_deduplicated += other.retries_deduplicated;
        self.deliveries += other.deliveries;
        self.retransmits += other.retransmits;
        self.behinds += other.behinds;
        self.syncs += other.syncs;
        self.flushes += other.flushes;
        self.flush_ms_total += other.flush_ms_total;
        self.flush_ms_max = self.flush_ms_max.max(other.flush_ms_max);
        self.checkpoints += other.checkpoints;
        self.holds += other.holds;
        self.rate_limited += other.rate_limited;
        self.bad_frames += other.bad_frames;
        self.fatal_frames += other.fatal_frames;
        self.closed_for_errors += other.closed_for_errors;
        self.tokens_expired += other.tokens_expired;
        self.token_refreshes += other.token_refreshes;
        self.origins_refused += other.origins_refused;
        self.refused_at_open += other.refused_at_open;
        self.users_freed += other.users_freed;
        self.log_lines_suppressed += other.log_lines_suppressed;
        self.group_events += other.group_events;
        self.group_deliveries += other.group_deliveries;
        self.receipts += other.receipts;
        self.conversation_lists += other.conversation_lists;
        self.room_messages += other.room_messages;
        self.room_deliveries += other.room_deliveries;
        self.room_drops += other.room_drops;
        self.presence_updates_pushed += other.presence_updates_pushed;
        self.presence_flushes += other.presence_flushes;
        self.typing_relayed += other.typing_relayed;
        self.typing_dropped += other.typing_dropped;
        self.hooks_parked += other.hooks_parked;
        self.hooks_denied += other.hooks_denied;
        self.kicked += other.kicked;
        self.local_connections_opened += other.local_connections_opened;
        self.routes_asked += other.routes_asked;
        self.routes_failed += other.routes_failed;
        self.routes_orphaned += other.routes_orphaned;
        self.relays_opened += other.relays_opened;
        self.fenced += other.fenced;
        self.remote_mail_out += other.remote_mail_out;
        self.remote_mail_in += other.remote_mail_in;
        self.unreachable_mail += other.unreachable_mail;
        self.closed_for_link += other.closed_for_link;
        self.fills += other.fills;
        self.tls_connections += other.tls_connections;
        self.tls_handshakes += other.tls_handshakes;
        self.tls_failures += other.tls_failures;
        self.udp_sessions += other.udp_sessions;
        self.udp_datagrams_received += other.udp_datagrams_received;
        self.udp_datagrams_sent += other.udp_datagrams_sent;
        self.udp_datagrams_dropped += other.udp_datagrams_dropped;
        self.udp_retries += other.udp_retries;
        self.udp_migrations += other.udp_migrations;
        self.udp_forwarded += other.udp_forwarded;
    }
}
