//! The settings the core enforces, taken once from the node's [`Config`].

use std::sync::Arc;

use crate::config::{Config, DurabilityPolicy};

/// The core's view of the node configuration.
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    pub(crate) node: String,
    pub(crate) login_ms: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) idle_ms: u64,
    pub(crate) write_stall_ms: u64,
    pub(crate) retransmit_initial_ms: u64,
    pub(crate) retransmit_max_ms: u64,
    pub(crate) retransmit_tries: u32,
    /// Request tokens per second, in thousandths of a request (see [`cost`]); a multiple of
    /// 1000 (whole requests per second).
    pub(crate) request_rate_milli: u64,
    /// Most request tokens a connection may bank, in thousandths.
    pub(crate) request_burst_milli: u64,
    pub(crate) max_errors: u32,
    pub(crate) error_window_ms: u64,
    pub(crate) frames_per_turn: u32,
    pub(crate) max_token_lifetime_secs: u64,
    /// Allowed WebSocket origins (empty: any).
    pub(crate) ws_allowed_origins: Vec<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_frame_bytes: u32,
    pub(crate) max_page: u32,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) dedup_window: usize,
    /// Most deliveries awaiting an ack on one connection before it counts as behind
    /// (`limits.max_unacked_deliveries`).
    pub(crate) max_unacked: usize,
    /// Acks wait for the flush (`always`); otherwise they go out once appended.
    pub(crate) wait_for_flush: bool,
    /// Bytes of messages one page or `Deliver` may carry.
    pub(crate) page_budget: usize,
    /// Period of the shard's maintenance tick (log retention, interval flush), in ms.
    pub(crate) maintenance_ms: u64,
    /// Bytes of log between start-up checkpoints.
    pub(crate) checkpoint_every_bytes: u64,
    /// Most members of a group.
    pub(crate) max_group_members: usize,
    /// Most members one GET_MEMBERS answer lists.
    pub(crate) max_members_page: usize,
    /// Rooms one connection may be in (`rooms.max_per_connection`).
    pub(crate) room_max_per_connection: usize,
    /// Connections one room may have across the node (`rooms.max_listeners`).
    pub(crate) room_max_listeners: u64,
    /// Latest messages kept per room for joiners (`rooms.history`).
    pub(crate) room_history: usize,
    /// Rooms kept idle for their history per shard (`rooms.max_idle_rooms`).
    pub(crate) room_max_idle: usize,
    /// Room messages held per slow listener and room (`rooms.listener_queue`).
    pub(crate) room_listener_queue: usize,
    /// Bytes of a connection's queue (and reservations) under which room messages go straight
    /// to it; over it they wait in the listener's room queue: half of the connection's budget,
    /// so room traffic alone never reaches the budget (never `Behind`, never a hold).
    pub(crate) room_share_bytes: usize,
    /// The presence coalescing window, ms (`presence.coalesce_ms`).
    pub(crate) presence_coalesce_ms: u64,
    /// Most users one presence request names (`presence.max_users_per_request`).
    pub(crate) presence_max_users: usize,
    /// Most users one connection watches (`presence.max_subscriptions_per_connection`).
    pub(crate) presence_max_subscriptions: usize,
    /// Most subscriber notifications per turn (`presence.max_notifications_per_turn`).
    pub(crate) presence_notifications_per_turn: usize,
    /// Least ms between two relayed typing frames of one kind, per connection and conversation
    /// (`presence.typing_min_interval_ms`).
    pub(crate) typing_min_interval_ms: u64,
    /// In a cluster (`cluster.redis` set): logins wait for their route ([`super::route`]).
    pub(crate) cluster_routes: bool,
    /// In a cluster: this node's id (routes naming it are this node's own devices).
    pub(crate) cluster_node: Option<Arc<str>>,
    /// The retry hint of a request for a node this shard has no link to, ms (a heartbeat, as
    /// the carrier's).
    pub(crate) link_retry_ms: u32,
}

impl CoreConfig {
    /// The core's settings from the node's.
    pub(crate) fn from_config(c: &Config) -> Self {
        Self {
            node: c.node.clone(),
            login_ms: c.timeouts.login_ms,
            heartbeat_ms: c.timeouts.heartbeat_ms,
            idle_ms: c.timeouts.idle_ms,
            write_stall_ms: c.timeouts.write_stall_ms,
            retransmit_initial_ms: c.timeouts.retransmit_initial_ms,
            retransmit_max_ms: c.timeouts.retransmit_max_ms,
            retransmit_tries: c.timeouts.retransmit_tries,
            request_rate_milli: u64::from(c.limits.request_rate_per_sec.max(1)) * 1000,
            request_burst_milli: u64::from(c.limits.request_burst.max(1)) * 1000,
            max_errors: c.limits.max_errors.max(1),
            error_window_ms: c.limits.error_window_ms.max(1),
            frames_per_turn: c.limits.frames_per_turn.max(1),
            max_token_lifetime_secs: c.auth.max_token_lifetime_secs,
            ws_allowed_origins: c.listen.ws_allowed_origins.clone(),
            max_body_bytes: c.limits.max_body_bytes as usize,
            max_frame_bytes: c.limits.max_frame_bytes,
            max_page: c.limits.max_page.max(1),
            max_outbound_bytes: c.limits.max_outbound_bytes,
            dedup_window: c.limits.dedup_window.max(1),
            max_unacked: c.limits.max_unacked_deliveries.max(1),
            wait_for_flush: c.storage.durability == DurabilityPolicy::Always,
            page_budget: (c.limits.max_frame_bytes as usize)
                .saturating_sub(1024)
                .max(1),
            maintenance_ms: 20,
            checkpoint_every_bytes: c.storage.checkpoint_every_bytes.max(1),
            max_group_members: c.groups.max_members.max(1) as usize,
            max_members_page: c.groups.max_members_page.max(1) as usize,
            room_max_per_connection: c.rooms.max_per_connection.max(1),
            room_max_listeners: c.rooms.max_listeners.max(1),
            room_history: c.rooms.history,
            room_max_idle: c.rooms.max_idle_rooms,
            room_listener_queue: c.rooms.listener_queue.max(1),
            room_share_bytes: c.limits.max_outbound_bytes / 2,
            presence_coalesce_ms: c.presence.coalesce_ms.max(1),
            presence_max_users: c.presence.max_users_per_request.max(1) as usize,
            presence_max_subscriptions: c.presence.max_subscriptions_per_connection.max(1) as usize,
            presence_notifications_per_turn: c.presence.max_notifications_per_turn.max(1) as usize,
            typing_min_interval_ms: c.presence.typing_min_interval_ms,
            cluster_routes: c.cluster.redis.is_some(),
            cluster_node: c
                .cluster
                .redis
                .as_ref()
                .map(|_| Arc::from(c.cluster.effective_node_id(&c.node))),
            link_retry_ms: u32::try_from(c.cluster.heartbeat_ms).unwrap_or(u32::MAX),
        }
    }
}

/// What each kind of request costs of a connection's request bucket, in thousandths of a
/// request (`limits.request_rate_per_sec` counts whole requests).
pub(crate) mod cost {
    /// A send, a ping, a login refresh, anything not named below.
    pub(crate) const REQUEST: u64 = 1000;
    /// A sync or history request (reads pages of the log).
    pub(crate) const READ: u64 = 5000;
    /// A delivery ack (acks keep the client's promise; they are cheap).
    pub(crate) const ACK: u64 = 100;
}
