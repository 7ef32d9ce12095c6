//! The node's configuration: one struct with documented defaults, loaded in layers.
//!
//! Layers, each overriding the one before:
//! 1. the defaults below (a node runs with no file, no environment and no flags);
//! 2. a TOML file (`broker serve --config parley.toml`), same shape as [`Config`];
//! 3. environment variables `PARLEY_<KEY>`, where `__` separates nesting levels:
//!    `PARLEY_STORAGE__DURABILITY=never`, `PARLEY_LISTEN__TCP=0.0.0.0:7400`, `PARLEY_DATA_DIR=/srv`;
//! 4. command-line settings `--set storage.durability=never` (and the named flags of `broker
//!    serve`, which are shorthands for the same keys).
//!
//! Values from the environment and flags are read as TOML values (`64`, `true`, `"text"`); a bare
//! word that is not valid TOML is taken as a string. Unknown keys are an error, so a typo never
//! silently leaves a default in force — except an environment variable whose first part names no
//! section or top-level setting at all (`PARLEY_BIN`, `PARLEY_BROKER_LOG`): that one is another
//! program's, merely sharing the prefix, and is left alone ([`Config::foreign_env`] lists them, so
//! the node can say so). `PARLEY_STORAGE__DURABILTY` (a typo inside a section) stays an error. [`Config::display_redacted`] prints the effective
//! configuration without secrets, as the node does at start-up.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod reference;

/// Prefix of the environment variables that configure a node.
pub const ENV_PREFIX: &str = "PARLEY_";

/// Settings renamed since they were introduced: the old name is still read, as the new one, in
/// every layer (so a file with the old name and a flag with the new one agree on which wins).
const RENAMED: &[(&str, &str)] = &[
    ("limits.send_rate_per_sec", "limits.request_rate_per_sec"),
    ("limits.send_burst", "limits.request_burst"),
];

/// The current name of setting `key`.
fn current_name(key: &str) -> &str {
    RENAMED
        .iter()
        .find(|(old, _)| *old == key)
        .map_or(key, |(_, new)| new)
}

/// The whole configuration of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name, used in logs and (in a cluster) in the presence index. Default `node-1`.
    pub node: String,
    /// Where the logs and the generated secret live. Default `./data`.
    pub data_dir: PathBuf,
    /// Number of shard threads; 0 means one per available core. Default 0.
    pub shards: usize,
    /// Listening addresses.
    pub listen: Listen,
    /// TLS for `listen.tls` and `listen.wss`: the certificate and the handshake's limits.
    pub tls: Tls,
    /// UDP sessions (`listen.udp`): datagram size, pacing, session limit.
    pub udp: Udp,
    /// Authentication.
    pub auth: Auth,
    /// The message logs.
    pub storage: Storage,
    /// Limits that protect the node from clients.
    pub limits: Limits,
    /// Timeouts and retransmission.
    pub timeouts: Timeouts,
    /// Groups.
    pub groups: Groups,
    /// Rooms (ephemeral broadcast).
    pub rooms: Rooms,
    /// Presence and typing indicators.
    pub presence: Presence,
    /// The admin HTTP listener (`/healthz`, `/readyz`, `/metrics`, the JSON API under `/v1/`).
    pub admin: Admin,
    /// The node's log lines (stderr).
    pub log: Log,
    /// Webhooks: events POSTed to an application's HTTP endpoint.
    pub webhooks: WebhookConfig,
    /// Several nodes over one Redis: the node registry (off unless `cluster.redis` is set).
    pub cluster: Cluster,
}

/// Several nodes over one Redis. With `redis` set, the node registers itself in Redis under a
/// lease renewed by heartbeat, keeps a view of every live node (`/metrics`: `parley_cluster_*`;
/// the admin API: `GET /v1/cluster`) and writes its devices' routes to the presence index; with
/// `nodes` (and `listen`), conversations and users are placed over the listed nodes and messages
/// cross nodes over the links. Without `redis` nothing changes: one node needs no Redis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// The Redis shared by the nodes, a `redis://HOST:PORT[/DB]` URL. Default: unset, no
    /// cluster. A password in the URL (`redis://:PASSWORD@HOST:PORT`) is used for `AUTH` and
    /// shown as `<redacted>` when the configuration is printed.
    #[serde(serialize_with = "redacted_url")]
    pub redis: Option<String>,
    /// This node's id in the registry: letters, digits, `.`, `_`, `-` and `:`, at most 128 bytes.
    /// Two processes must never share one (a second process with a live node's id refuses to
    /// start). Default: unset, the node's `node` name.
    pub node_id: Option<String>,
    /// The address other nodes will reach this node's links at (`HOST:PORT`), published in the
    /// registry. Default: unset, and then the address `listen` is bound to (with `listen` unset,
    /// nothing is published and no node links to this one).
    pub advertise: Option<String>,
    /// Where this node accepts links from the other nodes of its cluster (`IP:PORT`, port 0 for
    /// any). Links are TCP, authenticated by the link key (see `secret`); each pair of nodes keeps
    /// one. Default: unset, no links.
    pub listen: Option<SocketAddr>,
    /// The key nodes prove to each other when they link, at least 32 bytes, the same on every
    /// node. Default: unset, and then a key derived from the token secret (`auth.secret` or its
    /// file), which the nodes of a cluster share anyway so that a token is good on every node.
    pub secret: Option<Secret>,
    /// The lease of the node's registration, in milliseconds: a node that has not renewed it for
    /// this long is dead to the others (and reports its own lease lost). 100 to 3600000, more
    /// than twice `heartbeat_ms`. Default 10000.
    pub lease_ms: u64,
    /// How often the node renews its lease and reads the membership, in milliseconds (at least
    /// 20). Default 2000.
    pub heartbeat_ms: u64,
    /// How long a route in the presence index (user, device → node) lives in Redis without
    /// being refreshed, in milliseconds. The node refreshes its routes' TTLs in a rolling cycle
    /// of a third of this, so only routes of a node that is gone for good expire (readers
    /// already ignore a route naming a dead boot). At least 3 × `heartbeat_ms`. Default 300000.
    pub route_ttl_ms: u64,
    /// How long a login may wait for its route to be registered in the presence index, in
    /// milliseconds; past it (Redis unreachable) the login is closed with UNAVAILABLE and a
    /// retry hint. 100 to 60000. Default 3000.
    pub route_timeout_ms: u64,
    /// Most route changes a node queues for Redis (while Redis is slow or unreachable); past it
    /// a new login is closed with UNAVAILABLE at once instead of waiting. Withdrawals always
    /// queue (at most one per route). At least 1. Default 100000.
    pub max_pending_routes: usize,
    /// The cluster's nodes, by node id: the same list on every node, this node among them (at
    /// most 32). Conversations and users' homes are placed over these nodes (rendezvous
    /// hashing), and messages cross nodes over the links, so `listen` must be set. The list is
    /// part of the data: a node refuses to start when it differs from the one its data
    /// directory was created with. Default: empty, and then each node serves only what its own
    /// clients send (the registry and the presence index are shared, messages are not).
    pub nodes: Vec<String>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            redis: None,
            node_id: None,
            advertise: None,
            listen: None,
            secret: None,
            lease_ms: 10_000,
            heartbeat_ms: 2_000,
            route_ttl_ms: 300_000,
            route_timeout_ms: 3_000,
            max_pending_routes: 100_000,
            nodes: Vec::new(),
        }
    }
}

impl Cluster {
    /// The node id this node registers under: `node_id`, else the node's name `node`.
    pub fn effective_node_id<'a>(&'a self, node: &'a str) -> &'a str {
        self.node_id.as_deref().unwrap_or(node)
    }

    /// Checks the section (`node` is the node's name, the default id).
    fn validate(&self, node: &str) -> Result<(), String> {
        let Some(url) = &self.redis else {
            return Ok(());
        };
        if !url.starts_with("redis://") {
            return Err(format!(
                "cluster.redis must be a redis://HOST:PORT URL, not {:?}",
                redact_url(url)
            ));
        }
        let id = self.effective_node_id(node);
        if !valid_node_id(id) {
            return Err(format!(
                "cluster.node_id (default: node) {id:?} must be 1 to 128 letters, digits, \
                 '.', '_', '-' or ':'"
            ));
        }
        if self.advertise.as_deref().is_some_and(str::is_empty) {
            return Err("cluster.advertise must not be empty (leave it unset)".into());
        }
        if !(100..=3_600_000).contains(&self.lease_ms)
            || self.heartbeat_ms < 20
            || self.heartbeat_ms.saturating_mul(2) >= self.lease_ms
        {
            return Err(
                "cluster.lease_ms must be between 100 and 3600000, cluster.heartbeat_ms at least \
                 20, and lease_ms more than twice heartbeat_ms"
                    .into(),
            );
        }
        if self.route_ttl_ms < self.heartbeat_ms.saturating_mul(3) {
            return Err("cluster.route_ttl_ms must be at least 3 x cluster.heartbeat_ms".into());
        }
        if !(100..=60_000).contains(&self.route_timeout_ms) {
            return Err("cluster.route_timeout_ms must be between 100 and 60000".into());
        }
        if self.max_pending_routes == 0 {
            return Err("cluster.max_pending_routes must be at least 1".into());
        }
        if self.secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
            return Err("cluster.secret must be at least 32 bytes".into());
        }
        self.validate_nodes(id)
    }

    /// Checks `nodes` (`me`: this node's id).
    fn validate_nodes(&self, me: &str) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        if self.nodes.len() > MAX_CLUSTER_NODES {
            return Err(format!(
                "cluster.nodes lists {} nodes; a cluster has at most {MAX_CLUSTER_NODES}",
                self.nodes.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for n in &self.nodes {
            if !valid_node_id(n) {
                return Err(format!(
                    "cluster.nodes: {n:?} is not a node id (1 to 128 letters, digits, '.', '_', \
                     '-' or ':')"
                ));
            }
            if !seen.insert(n.as_str()) {
                return Err(format!("cluster.nodes lists {n:?} twice"));
            }
        }
        if !seen.contains(me) {
            return Err(format!(
                "cluster.nodes must list this node's id {me:?} (cluster.node_id, default: node)"
            ));
        }
        if self.nodes.len() > 1 && self.listen.is_none() {
            return Err(
                "cluster.nodes names other nodes, so cluster.listen must be set (messages \
                        cross nodes over the links)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Most nodes `cluster.nodes` may list.
pub const MAX_CLUSTER_NODES: usize = 32;

/// Whether `id` may be a node id: 1 to 128 letters, digits, `.`, `_`, `-` and `:`.
fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

/// `url` with the password (if any) replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let slash = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{user}:<redacted>@{host}{slash}{path}")
}

/// Serializes `cluster.redis` with its password redacted (the configuration is printed).
fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redact_url(u)),
        None => s.serialize_none(),
    }
}

/// The admin HTTP listener: health and readiness probes, Prometheus metrics and the JSON API
/// (post, kick, online, presence, conversations, groups), on its own address and threads (see
/// `broker/src/admin`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Where it listens. Default `127.0.0.1:7402` (loopback); `"none"` disables it.
    #[serde(deserialize_with = "address_or_none")]
    pub listen: Option<SocketAddr>,
    /// The bearer token every endpoint but `/healthz` and `/readyz` requires
    /// (`Authorization: Bearer <token>`), at least 16 bytes. Default: unset, and then those
    /// endpoints, `/metrics` and the whole JSON API, answer 401 saying to set it.
    pub token: Option<Secret>,
    /// Largest request head (request line and headers) read, in bytes; past it the answer is
    /// 431. Default 8192.
    pub max_request_bytes: usize,
    /// Largest request body the JSON API reads, in bytes; a larger `Content-Length` is
    /// answered 413 without reading the body. 256 to 67108864 (64 MiB); default 1048576
    /// (1 MiB).
    pub max_body_bytes: usize,
    /// Time a client has to send its whole request (head and body), in milliseconds (408 past
    /// it); also the bound of writing the answer. Default 5000.
    pub request_timeout_ms: u64,
    /// Most admin connections served at once; one more is answered 503 at once. Default 16.
    pub max_connections: usize,
    /// DEV ONLY. Serves the browser chat page at `/chat/` and, without the bearer token, a
    /// token minting endpoint `/dev/token?user=U&device=D` that signs a token for ANY user with
    /// the node's secret: whoever reaches the admin listener can then log in as anyone. Never
    /// turn it on where the admin listener is reachable by others (it listens on loopback by
    /// default). The node logs a warning at start while it is on. Default false.
    pub web: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7402))),
            token: None,
            max_request_bytes: 8192,
            max_body_bytes: 1 << 20,
            request_timeout_ms: 5000,
            max_connections: 16,
            web: false,
        }
    }
}

/// Largest `admin.max_body_bytes` accepted (a body is held in memory while it is served).
pub const MAX_ADMIN_BODY_BYTES: usize = 64 << 20;

/// Shortest `admin.token` accepted, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Reads an address, or `"none"` / `"off"` for no address.
fn address_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    match s.trim() {
        "none" | "off" => Ok(None),
        t => t.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("{t:?} is not an IP:PORT address nor \"none\""))
        }),
    }
}

/// Groups (members, roles, settings: see `GroupRequest` in the .proto).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Groups {
    /// Most members a group may have (CREATE, ADD_MEMBERS and JOIN past it answer
    /// GROUP_FULL). Per message, the work grows with the members online, not with this.
    /// Default 10000.
    pub max_members: u32,
    /// Most members one GET_MEMBERS answer lists (a smaller `limit` asks for fewer); pages
    /// larger than the frame limit are cut shorter. Default 1000.
    pub max_members_page: u32,
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            max_members: 10_000,
            max_members_page: 1000,
        }
    }
}

/// Presence and typing indicators (see `PresenceRequest` and `Typing` in the .proto). Presence is
/// kept in memory only: after a restart every user is OFFLINE with `last_seen` 0 until it connects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Presence {
    /// The coalescing window, in milliseconds: a user's home pushes at most one update per user
    /// per window, and none if the user's status and devices at the end of the window are what
    /// subscribers were last told (a device that drops and reconnects within it causes none).
    /// Default 1000.
    pub coalesce_ms: u64,
    /// Most users one QUERY, SUBSCRIBE or UNSUBSCRIBE may name; past it the request is refused
    /// with INVALID_ARGUMENT. Default 1000.
    pub max_users_per_request: u32,
    /// Most users one connection may be subscribed to at once; a SUBSCRIBE past it is refused
    /// whole with INVALID_ARGUMENT. Subscriptions end with the connection. Default 5000.
    pub max_subscriptions_per_connection: u32,
    /// Most subscriber notifications (one changed user for one watching connection) a shard
    /// sends per turn of its loop; the rest follow on the next turns, so a user with very many
    /// subscribers never stalls the shard's other work. Default 10000.
    pub max_notifications_per_turn: u32,
    /// Per connection and conversation, at most one `Typing{typing: true}` and one
    /// `Typing{typing: false}` are relayed per this many milliseconds; more are dropped silently
    /// (and counted). Default 1000.
    pub typing_min_interval_ms: u64,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            coalesce_ms: 1000,
            max_users_per_request: 1000,
            max_subscriptions_per_connection: 5000,
            max_notifications_per_turn: 10_000,
            typing_min_interval_ms: 1000,
        }
    }
}

/// The node's log lines, written to stderr by `broker serve` (an application that embeds the
/// broker installs its own `tracing` subscriber and reads neither setting).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// Which lines are written: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a
    /// `tracing` filter of comma-separated directives, e.g. `info,parley_broker::core=debug`
    /// (`debug` adds one line per connection opened, logged in and closed). The `RUST_LOG`
    /// environment variable, when set, replaces it. Default `info`.
    pub level: String,
    /// `text` (one human-readable line per event) or `json` (one JSON object per line, with
    /// `timestamp`, `level`, `target` and `fields`). Default `text`.
    pub format: LogFormat,
}

/// How log lines are written (see [`Log::format`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Webhooks: what happens on the node (messages stored for offline users, logins, group
/// changes...) POSTed as signed JSON to an application's HTTP endpoint, so that applications not
/// written in Rust can react (offline pushes, audit, analytics). Off unless `url` is set. Events
/// wait in a bounded queue and are sent by their own threads, never the shards'; delivery is
/// at-least-once, de-duplicable by each event's `id`. `docs/WEBHOOKS.md` describes the requests,
/// the events and how to check their signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed, an `http://` or `https://` URL. Default: unset, webhooks off. The
    /// URL is printed at start-up like every setting: put no credential in it (one with a user or
    /// password is refused); the endpoint authenticates the node by `secret`.
    pub url: Option<String>,
    /// The key of the `X-Parley-Signature` header (hex HMAC-SHA256 of the body), at least 16 bytes;
    /// required when `url` is set. Default: unset.
    pub secret: Option<Secret>,
    /// Which events are sent: any of `message.offline` (a message stored for users with no device
    /// online), `message.stored` (every stored message, its body in base64), `login`, `logout`,
    /// `presence` (a user online or offline), `group` (a group change). Default
    /// `["message.offline", "login", "logout", "group"]`.
    pub events: Vec<WebhookEvent>,
    /// Most events waiting to be sent; an event that finds the queue full is dropped and counted
    /// (`parley_webhook_dropped_queue_full_total`): the shards never wait for the endpoint. With
    /// `message.stored` on, a full queue holds as many message bodies (each up to
    /// `limits.max_body_bytes`). At most 10000000. Default 10000.
    pub queue_capacity: usize,
    /// Most events in one POST (the body is `{"events":[...]}`, also for one event), 1 to 10000.
    /// Default 100.
    pub max_batch: usize,
    /// Largest body of one POST, in bytes: a batch stops growing before it would pass this (an
    /// event larger than this on its own is sent alone). Default 1048576 (1 MiB).
    pub max_batch_bytes: usize,
    /// Time to connect to the endpoint, in milliseconds (at most 3600000). Default 5000.
    pub connect_timeout_ms: u64,
    /// Time for one whole POST (resolve, connect, TLS, send, answer), in milliseconds; past it the
    /// attempt failed and is retried. At most 3600000. Default 10000.
    pub timeout_ms: u64,
    /// Attempts per batch, the first included: after a network error, a timeout, 408, 429 or a 5xx
    /// the batch is tried again, and after the last attempt its events are counted failed and
    /// dropped. Any other answer but a 2xx fails at once. 1 to 100. Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds; it doubles with every further attempt, up to
    /// `backoff_max_ms`, and each delay is drawn between half of it and all of it (jitter). Default
    /// 500.
    pub backoff_base_ms: u64,
    /// Longest delay between two attempts, in milliseconds; a longer `Retry-After` from the
    /// endpoint is cut to it. At most 3600000. Default 30000.
    pub backoff_max_ms: u64,
    /// Sender threads, each with one POST in flight at most. With one, events are sent in the order
    /// they were observed; with more, a slow or retried batch no longer holds up the others, but
    /// events may arrive out of order. 1 to 64. Default 1.
    pub threads: usize,
    /// At shutdown, how long the senders may go on delivering what is queued, in milliseconds; what
    /// is still queued then is dropped and counted (`parley_webhook_dropped_shutdown_total`). At
    /// most 3600000. Default 5000.
    pub shutdown_drain_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            secret: None,
            events: vec![
                WebhookEvent::MessageOffline,
                WebhookEvent::Login,
                WebhookEvent::Logout,
                WebhookEvent::Group,
            ],
            queue_capacity: 10_000,
            max_batch: 100,
            max_batch_bytes: 1 << 20,
            connect_timeout_ms: 5_000,
            timeout_ms: 10_000,
            max_attempts: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            threads: 1,
            shutdown_drain_ms: 5_000,
        }
    }
}

/// Shortest `webhooks.secret` accepted, in bytes.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;

/// A kind of webhook event (see [`WebhookConfig::events`]); its name is the event's `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WebhookEvent {
    /// `message.offline`: a message was stored for recipients with no device online.
    #[serde(rename = "message.offline")]
    MessageOffline,
    /// `message.stored`: a message was stored (body included).
    #[serde(rename = "message.stored")]
    MessageStored,
    /// `login`: a device logged in.
    #[serde(rename = "login")]
    Login,
    /// `logout`: a logged-in device left.
    #[serde(rename = "logout")]
    Logout,
    /// `presence`: a user came online (first device) or went offline (last device).
    #[serde(rename = "presence")]
    Presence,
    /// `group`: a group changed.
    #[serde(rename = "group")]
    Group,
}

impl WebhookEvent {
    /// Every kind.
    pub const ALL: [WebhookEvent; 6] = [
        WebhookEvent::MessageOffline,
        WebhookEvent::MessageStored,
        WebhookEvent::Login,
        WebhookEvent::Logout,
        WebhookEvent::Presence,
        WebhookEvent::Group,
    ];

    /// The event's `type` in its payload (and its name in `webhooks.events`).
    pub fn name(self) -> &'static str {
        match self {
            WebhookEvent::MessageOffline => "message.offline",
            WebhookEvent::MessageStored => "message.stored",
            WebhookEvent::Login => "login",
            WebhookEvent::Logout => "logout",
            WebhookEvent::Presence => "presence",
            WebhookEvent::Group => "group",
        }
    }
}

impl WebhookConfig {
    /// Checks the section (called by [`Config::validate`]).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            check_webhook_url(url)?;
            match &self.secret {
                None => return Err("webhooks.secret must be set when webhooks.url is".into()),
                Some(s) if s.expose().len() < MIN_WEBHOOK_SECRET_BYTES => {
                    return Err("webhooks.secret must be at least 16 bytes".into());
                }
                Some(_) => {}
            }
            if self.events.is_empty() {
                return Err(
                    "webhooks.events is empty: name at least one event, or unset webhooks.url"
                        .into(),
                );
            }
        }
        if self.queue_capacity == 0 || self.queue_capacity > MAX_WEBHOOK_QUEUE {
            return Err("webhooks.queue_capacity must be between 1 and 10000000".into());
        }
        if self.max_batch == 0 || self.max_batch > MAX_WEBHOOK_BATCH {
            return Err("webhooks.max_batch must be between 1 and 10000".into());
        }
        if self.max_batch_bytes < 1024 {
            return Err("webhooks.max_batch_bytes must be at least 1024".into());
        }
        let within_an_hour = |ms: u64| (1..=MAX_WEBHOOK_WAIT_MS).contains(&ms);
        if !within_an_hour(self.connect_timeout_ms) || !within_an_hour(self.timeout_ms) {
            return Err(
                "webhooks.connect_timeout_ms and webhooks.timeout_ms must be between 1 and 3600000"
                    .into(),
            );
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_WEBHOOK_ATTEMPTS {
            return Err("webhooks.max_attempts must be between 1 and 100".into());
        }
        if self.backoff_base_ms == 0
            || self.backoff_max_ms < self.backoff_base_ms
            || self.backoff_max_ms > MAX_WEBHOOK_WAIT_MS
        {
            return Err("webhooks: need 0 < backoff_base_ms <= backoff_max_ms <= 3600000".into());
        }
        if self.shutdown_drain_ms > MAX_WEBHOOK_WAIT_MS {
            return Err("webhooks.shutdown_drain_ms must be at most 3600000".into());
        }
        if self.threads == 0 || self.threads > MAX_WEBHOOK_THREADS {
            return Err("webhooks.threads must be between 1 and 64".into());
        }
        Ok(())
    }
}

/// Largest `webhooks.queue_capacity` (each queued event holds its strings, and the body of a
/// `message.stored`, in memory).
const MAX_WEBHOOK_QUEUE: usize = 10_000_000;
/// Largest `webhooks.max_batch`.
const MAX_WEBHOOK_BATCH: usize = 10_000;
/// Largest `webhooks.max_attempts`.
const MAX_WEBHOOK_ATTEMPTS: u32 = 100;
/// Largest `webhooks.threads`.
const MAX_WEBHOOK_THREADS: usize = 64;
/// Longest timeout, back-off delay or drain of `[webhooks]`, in milliseconds (an hour).
const MAX_WEBHOOK_WAIT_MS: u64 = 3_600_000;

/// Refuses a `webhooks.url` that is not an absolute `http://` or `https://` URL with a host, or
/// that carries a user or password.
fn check_webhook_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("webhooks.url {url:?} {why}"));
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return bad("is not a URL");
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return bad("must start with http:// or https://");
    }
    let Some(authority) = uri.authority() else {
        return bad("has no host");
    };
    if authority.as_str().contains('@') {
        // Printed at start-up: credentials belong in webhooks.secret.
        return Err("webhooks.url must not carry a user or password (it is printed at start-up; the endpoint checks webhooks.secret)".into());
    }
    if authority.host().is_empty() {
        return bad("has no host");
    }
    Ok(())
}

/// Listening addresses. A node listens on loopback unless configured otherwise: the plain
/// listeners (`tcp`, `ws`) default to 127.0.0.1, and the TLS ones (`tls`, `wss`), which are the
/// ones to expose beyond the machine, are off until given an address (and `tls.cert_path`,
/// `tls.key_path`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Raw TCP (length-delimited protobuf frames). Default `127.0.0.1:7400`; unset to disable.
    pub tcp: Option<SocketAddr>,
    /// WebSocket. Default `127.0.0.1:7401`; unset to disable.
    pub ws: Option<SocketAddr>,
    /// Raw TCP inside TLS (same framing as `tcp`), e.g. `0.0.0.0:7443`. Default none (off);
    /// needs `tls.cert_path` and `tls.key_path`.
    pub tls: Option<SocketAddr>,
    /// WebSocket inside TLS (`wss://`), e.g. `0.0.0.0:7444`. Default none (off); needs
    /// `tls.cert_path` and `tls.key_path`.
    #[serde(deserialize_with = "address_or_none")]
    pub wss: Option<SocketAddr>,
    /// UDP sessions (the authenticated datagram envelope of `proto/src/udp.rs`), e.g.
    /// `127.0.0.1:7403` (7402 is the admin listener). Default none (off). Every shard binds its own socket on this address
    /// (`SO_REUSEPORT`); a session holds no file descriptor. See `[udp]`.
    #[serde(deserialize_with = "address_or_none")]
    pub udp: Option<SocketAddr>,
    /// Origins a browser may open a WebSocket from (the upgrade request's `Origin` header,
    /// compared exactly, e.g. `"https://chat.example.com"`). Default empty: any origin. When set,
    /// an upgrade whose `Origin` is not in the list is refused with HTTP 403; a request without
    /// an `Origin` (not a browser) is served.
    pub ws_allowed_origins: Vec<String>,
}

/// TLS for the `listen.tls` and `listen.wss` listeners (rustls; TLS 1.2 and 1.3, no client
/// certificates). The certificate is read at start and again on SIGHUP (`broker serve`) or
/// `Handle::reload_tls`: new connections get the new one, open connections keep theirs, and a
/// reload that fails keeps the old one. `broker devcert --out DIR` makes a self-signed pair for
/// local use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// The certificate chain, PEM (end-entity certificate first). Default none; required when
    /// `listen.tls` or `listen.wss` is set.
    pub cert_path: Option<PathBuf>,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1). Default none; required when `listen.tls`
    /// or `listen.wss` is set.
    pub key_path: Option<PathBuf>,
    /// A connection that has not finished its TLS handshake this long after it was accepted is
    /// dropped (counted in `tls_failures`). `timeouts.login_ms` also runs from the accept, so
    /// the login timeout bounds a stalled handshake too; this one drops it without the close
    /// linger, and may be set shorter. Default 10000.
    pub handshake_timeout_ms: u64,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert_path: None,
            key_path: None,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl Tls {
    /// Whether any TLS listener is on in `listen`.
    pub fn enabled(listen: &Listen) -> bool {
        listen.tls.is_some() || listen.wss.is_some()
    }
}

/// UDP sessions on `listen.udp`. A login is answered first with a stateless retry cookie, so
/// the node keeps nothing and sends nothing larger than what it received for an address that has
/// not shown it can receive; every later datagram is authenticated with the session's key and
/// checked against replay; a session follows its client to a new address (NAT rebinding) only
/// on an authenticated, newest datagram. Deliveries are retransmitted until acked as on every
/// transport; clients retry their own requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Udp {
    /// Largest datagram the node sends, in bytes of UDP payload: frames are packed into
    /// datagrams up to this size (the path MTU setting). A frame larger than fits goes alone in
    /// a datagram of its own size (the IP layer fragments it); one larger than a datagram can
    /// carry at all (64 KiB less the envelope) ends the session with FRAME_TOO_LARGE. Default
    /// 1200 (safe on any path); up to 65507.
    pub max_datagram_bytes: usize,
    /// UDP sessions the node holds at most (they hold no file descriptor, so this is apart from
    /// `limits.max_connections`); a login past it is answered with CONNECTION_LIMIT. Default
    /// 1000000.
    pub max_sessions: usize,
    /// Pacing: bytes per second the node sends one session at most, so that a burst (a sync, a
    /// busy group) does not overflow the client's socket buffer; what waits stays in the
    /// connection's bounded queue (`limits.max_outbound_bytes`). Default 8388608 (8 MiB/s).
    pub pacing_rate_bytes_per_sec: u64,
    /// Pacing: bytes one session may be sent at once after being quiet. Default 262144.
    pub pacing_burst_bytes: u64,
    /// `SO_RCVBUF` and `SO_SNDBUF` of each shard's UDP socket (the kernel may cap them at
    /// `net.core.rmem_max` / `wmem_max`). Default 4194304.
    pub socket_buffer_bytes: usize,
    /// How long a retry cookie stays good, ms: a LOGIN must come back with it within this.
    /// Default 10000.
    pub cookie_lifetime_ms: u64,
}

impl Default for Udp {
    fn default() -> Self {
        Self {
            max_datagram_bytes: parley_proto::udp::DEFAULT_MAX_DATAGRAM_BYTES,
            max_sessions: 1_000_000,
            pacing_rate_bytes_per_sec: 8 << 20,
            pacing_burst_bytes: 256 << 10,
            socket_buffer_bytes: 4 << 20,
            cookie_lifetime_ms: 10_000,
        }
    }
}

/// A secret value: never printed, never logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the code that uses it (never for printing).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Authentication of connections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// The HS256 token secret. Default: unset, in which case it is read from `secret_file`.
    pub secret: Option<Secret>,
    /// File holding the secret; default `<data_dir>/secret`. If neither `secret` is set nor the
    /// file exists, the node generates 32 random bytes into it (mode 0600) and says so. A secret
    /// shorter than 32 bytes is refused at start-up.
    pub secret_file: Option<PathBuf>,
    /// Longest a token may still be valid when presented: a token whose expiry lies further
    /// ahead is refused (BAD_TOKEN). Sessions end when their token expires (TOKEN_EXPIRED);
    /// a client sends a fresh `Login` on the same connection to go on. Default 2592000 (30 days).
    pub max_token_lifetime_secs: u64,
}

/// When an appended message counts as stored, and so when the send-ack goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityPolicy {
    /// Group commit: acks go out after the flush that covers the message. Survives power loss.
    Always,
    /// Flush every `storage.flush_interval_ms`; acks go out at once (a crash of the machine may
    /// lose the last interval).
    Interval,
    /// Never flush explicitly (the OS writes back); acks go out at once. Survives a process
    /// crash, not a machine crash.
    Never,
}

/// The per-shard message logs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// Durability policy. Default `always`: out of the box, no acknowledged message is lost.
    pub durability: DurabilityPolicy,
    /// Flush period for `interval`, in milliseconds. Default 10.
    pub flush_interval_ms: u64,
    /// Size of one preallocated log segment, in bytes. Default 64 MiB.
    pub segment_bytes: u64,
    /// Drop the oldest segments while a shard's log is larger than this. Default: unset (keep).
    pub retention_max_bytes: Option<u64>,
    /// Drop segments whose newest message is older than this many seconds. Default: unset.
    pub retention_max_age_secs: Option<u64>,
    /// Write a start-up checkpoint (the conversations) after this many bytes of log; a restart
    /// replays at most twice this much of the log, whatever its size (the first half rebuilds
    /// the de-dup windows of recent sends). Default 16 MiB.
    pub checkpoint_every_bytes: u64,
}

/// Limits that protect the node and its clients from each other. Exceeding one gets the client
/// a clear error frame (or, for a connection's budget, a pause in reading its requests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, in bytes of its protobuf encoding. Default 65536.
    pub max_frame_bytes: u32,
    /// Largest frame accepted before login (the login frame; for WebSocket, the message that
    /// carries it), so that an anonymous connection cannot make the node buffer a large frame.
    /// Default 4096.
    pub max_login_frame_bytes: u32,
    /// Largest WebSocket upgrade request (request line and headers) accepted; a longer one is
    /// refused with HTTP 431. Default 4096.
    pub max_handshake_bytes: u32,
    /// Largest message body accepted, in bytes. Default 32768.
    pub max_body_bytes: u32,
    /// Most connections the node holds at once; further ones get TOO_MANY_CONNECTIONS. The
    /// node uses the lower of this and its open-file limit minus a reserve for its own files,
    /// and says so at start-up. Default 100000.
    pub max_connections: usize,
    /// Most connections that have not logged in yet, node-wide; further ones get
    /// TOO_MANY_CONNECTIONS, so anonymous sockets cannot take every slot. Default 4096.
    pub max_unauthenticated: usize,
    /// Most connections not logged in yet from one source address. Default 1024.
    pub max_unauthenticated_per_source: usize,
    /// The connection's budget: bytes queued for one connection (deliveries, replies, errors,
    /// sync pages) and reserved for replies it is owed. Past it, live push pauses (the client is
    /// told it is Behind and catches up by sync) and the node stops reading the connection's
    /// requests until its queue drains (they wait in the kernel, not in the node's memory).
    /// In a cluster it is also the window of a session relayed between nodes, each way.
    /// Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// Most live deliveries one connection may have awaiting its `DeliverAck` (each is held for
    /// retransmit). One more and live push pauses: the client is told it is Behind and catches
    /// up by sync, as past `max_outbound_bytes`. Default 4096.
    pub max_unacked_deliveries: usize,
    /// Sustained requests per second per connection (a token bucket; a send or a ping costs
    /// one request, a sync or history request five, an ack a tenth). Past it, a request is
    /// refused with RATE_LIMITED and a retry hint. Default 2000.
    pub request_rate_per_sec: u32,
    /// Burst of requests allowed above the rate. Default 4000.
    pub request_burst: u32,
    /// Protocol errors (undecodable frames, refused requests) one connection may cause within
    /// `error_window_ms`; one more closes it with TOO_MANY_ERRORS. Default 32.
    pub max_errors: u32,
    /// The window of `max_errors`, in milliseconds. Default 10000.
    pub error_window_ms: u64,
    /// Client message ids remembered per device for de-duplication of retried sends.
    /// Default 4096.
    pub dedup_window: usize,
    /// Most messages in one sync or history page. Default 500.
    pub max_page: u32,
    /// Most bytes read from one connection per event-loop turn before serving others.
    /// Default 65536.
    pub read_budget_bytes: usize,
    /// Most frames handled from one connection per event-loop turn before serving others.
    /// Default 128.
    pub frames_per_turn: u32,
    /// Most bytes read (and thrown away) from a connection the node is closing, before it drops
    /// the socket without waiting for the peer's EOF: a peer that goes on sending after a fatal
    /// error is cut off. Default 65536.
    pub close_discard_bytes: usize,
}

/// Timeouts and retransmission, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// A connection must log in within this. Default 10000.
    pub login_ms: u64,
    /// Interval at which clients are asked to send something (a Ping at least). Default 30000.
    pub heartbeat_ms: u64,
    /// A connection silent for this long is closed as dead (IDLE_TIMEOUT). Default 75000.
    pub idle_ms: u64,
    /// A connection whose queued output makes no progress for this long is closed
    /// (SLOW_CONSUMER). Default 30000.
    pub write_stall_ms: u64,
    /// First retransmit of an unacknowledged delivery. Default 2000.
    pub retransmit_initial_ms: u64,
    /// Cap of the exponential retransmit back-off. Default 16000.
    pub retransmit_max_ms: u64,
    /// Retransmits before the connection is closed as broken (RETRANSMIT_EXHAUSTED); the client
    /// re-syncs on reconnect. Default 5.
    pub retransmit_tries: u32,
    /// How long a closed connection may take to read its last bytes and close its side; what
    /// it sends meanwhile is discarded, at most `limits.close_discard_bytes` of it. Default 1000.
    pub close_linger_ms: u64,
}

/// Rooms: ephemeral, at-most-once broadcast to the connections that joined (see the `RoomRequest`
/// comments in `proto/parley.proto`). Room messages are kept in memory only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rooms {
    /// Most rooms one connection may be in at once; a further JOIN is refused with
    /// INVALID_ARGUMENT. Default 64.
    pub max_per_connection: usize,
    /// Most connections in one room across the node; a further JOIN is refused with FORBIDDEN.
    /// Default 100000.
    pub max_listeners: u64,
    /// Latest messages of each room kept in memory and sent to a connection when it joins.
    /// Default 0 (none: a room is then forgotten as soon as its last listener leaves).
    pub history: usize,
    /// Rooms with no listener kept for their history (`history` > 0), per shard; past it the
    /// room idle longest is forgotten. Default 1024.
    pub max_idle_rooms: usize,
    /// Room messages held for one listener of one room while its connection is slow (its queue
    /// is over half of `limits.max_outbound_bytes`); when full, the oldest is dropped and the
    /// listener is told how many with `RoomLag`. Holds references to the one copy of each
    /// message, not copies. Default 256.
    pub listener_queue: usize,
}

impl Default for Rooms {
    fn default() -> Self {
        Self {
            max_per_connection: 64,
            max_listeners: 100_000,
            history: 0,
            max_idle_rooms: 1024,
            listener_queue: 256,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: "node-1".into(),
            data_dir: PathBuf::from("./data"),
            shards: 0,
            listen: Listen::default(),
            tls: Tls::default(),
            udp: Udp::default(),
            auth: Auth::default(),
            storage: Storage::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            groups: Groups::default(),
            rooms: Rooms::default(),
            presence: Presence::default(),
            admin: Admin::default(),
            log: Log::default(),
            webhooks: WebhookConfig::default(),
            cluster: Cluster::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 7400))),
            ws: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            tls: None,
            wss: None,
            udp: None,
            ws_allowed_origins: Vec::new(),
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            max_token_lifetime_secs: 30 * 24 * 3600,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            durability: DurabilityPolicy::Always,
            flush_interval_ms: 10,
            segment_bytes: 64 << 20,
            retention_max_bytes: None,
            retention_max_age_secs: None,
            checkpoint_every_bytes: 16 << 20,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 10,
            max_login_frame_bytes: 4 << 10,
            max_handshake_bytes: 4 << 10,
            max_body_bytes: 32 << 10,
            max_connections: 100_000,
            max_unauthenticated: 4096,
            max_unauthenticated_per_source: 1024,
            max_outbound_bytes: 1 << 20,
            max_unacked_deliveries: 4096,
            request_rate_per_sec: 2000,
            request_burst: 4000,
            max_errors: 32,
            error_window_ms: 10_000,
            dedup_window: 4096,
            max_page: 500,
            read_budget_bytes: 64 << 10,
            frames_per_turn: 128,
            close_discard_bytes: 64 << 10,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            login_ms: 10_000,
            heartbeat_ms: 30_000,
            idle_ms: 75_000,
            write_stall_ms: 30_000,
            retransmit_initial_ms: 2_000,
            retransmit_max_ms: 16_000,
            retransmit_tries: 5,
            close_linger_ms: 1_000,
        }
    }
}

/// Largest `rooms.history`: a joiner gets the history in one go.
const MAX_ROOM_HISTORY: usize = 10_000;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// A `--set` or environment setting is not `key.path=value`.
    #[error("setting {0:?} is not of the form key.path=value")]
    BadSetting(String),
    /// A key path does not lead through tables (e.g. `node.x` where `node` is a string).
    #[error("setting {0:?}: its parent is not a table")]
    NotATable(String),
    /// The merged settings do not fit the configuration (unknown key, wrong type, bad value).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the configuration: defaults, then `file` (if any), then environment variables from
    /// `env` (pairs of name and value; pass `std::env::vars()`), then `settings`
    /// (`key.path=value` strings, e.g. from `--set` flags).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        settings: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            for (old, new) in RENAMED {
                let (Some((section, old_key)), Some((_, new_key))) =
                    (old.split_once('.'), new.split_once('.'))
                else {
                    continue;
                };
                if let Some(t) = table.get_mut(section).and_then(toml::Value::as_table_mut)
                    && let Some(v) = t.remove(old_key)
                {
                    // The new name wins if the file has both.
                    t.entry(new_key.to_owned()).or_insert(v);
                }
            }
        }
        let known = Self::top_level_keys();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix(ENV_PREFIX)?;
                let key = key.to_ascii_lowercase().replace("__", ".");
                let top = key.split('.').next().unwrap_or_default();
                known.iter().any(|k| k == top).then_some((key, v))
            })
            .collect();
        env.sort();
        for (key, value) in env {
            set_path(&mut table, &key, &value, &format!("{ENV_PREFIX}{key}"))?;
        }
        for setting in settings {
            let (key, value) = setting
                .split_once('=')
                .ok_or_else(|| ConfigError::BadSetting(setting.clone()))?;
            set_path(&mut table, key.trim(), value.trim(), setting)?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// The names of the top-level settings and sections.
    fn top_level_keys() -> Vec<String> {
        match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The `PARLEY_*` variables of `env` that name no setting (another program's, sharing the
    /// prefix): [`Config::load`] leaves them alone.
    pub fn foreign_env<'a>(env: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let known = Self::top_level_keys();
        env.into_iter()
            .filter(|name| {
                name.strip_prefix(ENV_PREFIX).is_some_and(|key| {
                    let key = key.to_ascii_lowercase().replace("__", ".");
                    let top = key.split('.').next().unwrap_or_default();
                    !known.iter().any(|k| k == top)
                })
            })
            .map(str::to_owned)
            .collect()
    }

    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let l = &self.listen;
        if l.tcp.is_none()
            && l.ws.is_none()
            && l.tls.is_none()
            && l.wss.is_none()
            && l.udp.is_none()
        {
            return fail("listen: at least one of tcp, ws, tls, wss and udp must be set");
        }
        let u = &self.udp;
        if !(parley_proto::udp::MIN_DATAGRAM_BYTES + 64..=parley_proto::udp::MAX_DATAGRAM_BYTES)
            .contains(&u.max_datagram_bytes)
        {
            return fail("udp.max_datagram_bytes must be between 99 and 65507");
        }
        if u.max_sessions == 0
            || u.pacing_rate_bytes_per_sec == 0
            || u.pacing_burst_bytes < u.max_datagram_bytes as u64
            || u.cookie_lifetime_ms == 0
        {
            return fail(
                "udp.max_sessions, udp.pacing_rate_bytes_per_sec and udp.cookie_lifetime_ms \
                 must be positive, and udp.pacing_burst_bytes at least udp.max_datagram_bytes",
            );
        }
        if Tls::enabled(l) && (self.tls.cert_path.is_none() || self.tls.key_path.is_none()) {
            return fail(
                "tls.cert_path and tls.key_path must be set when listen.tls or listen.wss is on \
                 (PEM files; `broker devcert --out DIR` makes a pair for local use)",
            );
        }
        if self.tls.handshake_timeout_ms == 0 {
            return fail("tls.handshake_timeout_ms must be positive");
        }
        if self.limits.max_frame_bytes < 256 {
            return fail("limits.max_frame_bytes must be at least 256");
        }
        if self.limits.max_body_bytes >= self.limits.max_frame_bytes {
            return fail("limits.max_body_bytes must be below limits.max_frame_bytes");
        }
        if self.storage.segment_bytes < (1 << 20) || self.storage.segment_bytes > (1 << 32) - 1 {
            return fail("storage.segment_bytes must be between 1 MiB and 4 GiB");
        }
        if u64::from(self.limits.max_frame_bytes) * 2 > self.storage.segment_bytes {
            return fail("storage.segment_bytes must hold at least two maximal frames");
        }
        if self.storage.durability == DurabilityPolicy::Interval
            && self.storage.flush_interval_ms == 0
        {
            return fail("storage.flush_interval_ms must be positive for durability = interval");
        }
        if self.timeouts.retransmit_initial_ms == 0
            || self.timeouts.retransmit_max_ms < self.timeouts.retransmit_initial_ms
        {
            return fail("timeouts: need 0 < retransmit_initial_ms <= retransmit_max_ms");
        }
        if self.timeouts.idle_ms <= self.timeouts.heartbeat_ms {
            return fail("timeouts.idle_ms must exceed timeouts.heartbeat_ms");
        }
        if self.limits.request_rate_per_sec == 0 || self.limits.request_burst == 0 {
            return fail("limits.request_rate_per_sec and limits.request_burst must be positive");
        }
        if self.limits.max_login_frame_bytes < 256
            || self.limits.max_login_frame_bytes > self.limits.max_frame_bytes
        {
            return fail("limits.max_login_frame_bytes must be between 256 and max_frame_bytes");
        }
        if self.limits.max_handshake_bytes < 256 {
            return fail("limits.max_handshake_bytes must be at least 256");
        }
        if self.limits.max_errors == 0 || self.limits.error_window_ms == 0 {
            return fail("limits.max_errors and limits.error_window_ms must be positive");
        }
        if self.groups.max_members == 0 || self.groups.max_members_page == 0 {
            return fail("groups.max_members and groups.max_members_page must be positive");
        }
        if self.limits.frames_per_turn == 0 || self.limits.read_budget_bytes == 0 {
            return fail("limits.frames_per_turn and limits.read_budget_bytes must be positive");
        }
        if self.limits.max_unacked_deliveries == 0 {
            return fail("limits.max_unacked_deliveries must be positive");
        }
        if self.limits.max_unauthenticated == 0 || self.limits.max_unauthenticated_per_source == 0 {
            return fail(
                "limits.max_unauthenticated and limits.max_unauthenticated_per_source must be positive",
            );
        }
        if self.auth.max_token_lifetime_secs == 0 {
            return fail("auth.max_token_lifetime_secs must be positive");
        }
        if self.rooms.max_per_connection == 0
            || self.rooms.max_listeners == 0
            || self.rooms.listener_queue == 0
        {
            return fail(
                "rooms.max_per_connection, rooms.max_listeners and rooms.listener_queue must be positive",
            );
        }
        if self.rooms.history > MAX_ROOM_HISTORY {
            return fail("rooms.history must be at most 10000");
        }
        if self.presence.coalesce_ms == 0 || self.presence.coalesce_ms > 3_600_000 {
            return fail("presence.coalesce_ms must be between 1 and 3600000");
        }
        if self.presence.max_users_per_request == 0
            || self.presence.max_subscriptions_per_connection == 0
            || self.presence.max_notifications_per_turn == 0
        {
            return fail(
                "presence.max_users_per_request, presence.max_subscriptions_per_connection and \
                 presence.max_notifications_per_turn must be positive",
            );
        }
        if self
            .admin
            .token
            .as_ref()
            .is_some_and(|t| t.expose().len() < MIN_ADMIN_TOKEN_BYTES)
        {
            return fail("admin.token must be at least 16 bytes");
        }
        if self.admin.max_request_bytes < 256
            || self.admin.request_timeout_ms == 0
            || self.admin.max_connections == 0
        {
            return fail(
                "admin: max_request_bytes must be at least 256, request_timeout_ms and \
                 max_connections positive",
            );
        }
        if self.admin.max_body_bytes < 256 || self.admin.max_body_bytes > MAX_ADMIN_BODY_BYTES {
            return fail("admin.max_body_bytes must be between 256 and 67108864 (64 MiB)");
        }
        self.webhooks.validate().map_err(ConfigError::Invalid)?;
        self.cluster
            .validate(&self.node)
            .map_err(ConfigError::Invalid)?;

        Ok(())
    }

    /// The number of shard threads to run: `shards`, or one per available core if 0.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Where the token secret lives.
    pub fn secret_path(&self) -> PathBuf {
        self.auth
            .secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secret"))
    }

    /// The effective configuration as TOML, secrets replaced by `<redacted>`.
    pub fn display_redacted(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("<config not printable: {e}>"))
    }
}

/// Sets `key` (dotted path) in `table` to `raw`, read as a TOML value (or a string).
fn set_path(
    table: &mut toml::Table,
    key: &str,
    raw: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let mut parts: Vec<&str> = current_name(key).split('.').collect();
    let last = parts
        .pop()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ConfigError::BadSetting(origin.to_owned()))?;
    let mut t = table;
    for part in parts {
        if part.is_empty() {
            return Err(ConfigError::BadSetting(origin.to_owned()));
        }
        let entry = t
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::NotATable(origin.to_owned()))?;
    }
    t.insert(last.to_owned(), parse_value(raw));
    Ok(())
}

/// Reads a setting's value as TOML (`64`, `true`, `"x"`, `[1, 2]`), else as a plain string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], settings: &[&str]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        Config::load(None, env, &settings)
    }

    #[test]
    fn defaults_listen_on_loopback_with_always_durability() {
        let c = load(&[], &[]).expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert!(c.listen.tcp.is_some_and(|a| a.ip().is_loopback()));
        assert!(c.listen.ws.is_some_and(|a| a.ip().is_loopback()));
        // The TLS listeners (the ones to expose) are off until configured.
        assert_eq!((c.listen.tls, c.listen.wss), (None, None));
        assert_eq!(c.storage.durability, DurabilityPolicy::Always);
    }

    #[test]
    fn a_tls_listener_needs_a_certificate_and_key() {
        let e = load(&[], &["listen.tls=127.0.0.1:0"]).expect_err("no cert");
        assert!(
            e.to_string().contains("tls.cert_path and tls.key_path"),
            "{e}"
        );
        let e = load(&[], &["listen.wss=127.0.0.1:0", "tls.cert_path=/x.pem"]).expect_err("no key");
        assert!(e.to_string().contains("tls.key_path"), "{e}");
        let c = load(
            &[("PARLEY_TLS__KEY_PATH", "/k.pem")],
            &["listen.tls=0.0.0.0:7443", "tls.cert_path=/c.pem"],
        )
        .expect("valid");
        assert_eq!(c.listen.tls, Some(SocketAddr::from(([0, 0, 0, 0], 7443))));
        assert_eq!(c.tls.key_path.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(c.tls.handshake_timeout_ms, 10_000);
        assert!(load(&[], &["tls.handshake_timeout_ms=0"]).is_err());
        // TLS alone is a listener.
        let mut c = Config::default();
        c.listen.tcp = None;
        c.listen.ws = None;
        c.listen.tls = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.tls.cert_path = Some(PathBuf::from("/c.pem"));
        c.tls.key_path = Some(PathBuf::from("/k.pem"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_variable_that_merely_shares_the_prefix_is_left_alone_but_a_typo_in_a_section_is_not() {
        let c = load(&[("PARLEY_BIN", "/usr/bin/x"), ("PARLEY_SHARDS", "3")], &[])
            .expect("PARLEY_BIN names no setting: not ours");
        assert_eq!(c.shards, 3);
        assert_eq!(
            Config::foreign_env([
                "PARLEY_BIN",
                "PARLEY_SHARDS",
                "HOME",
                "PARLEY_LIMITS__MAX_PAGE"
            ]),
            vec!["PARLEY_BIN".to_owned()]
        );
        let e = load(&[("PARLEY_STORAGE__DURABILTY", "never")], &[])
            .expect_err("a typo inside a section is refused");
        assert!(e.to_string().contains("durabilty"), "{e}");
    }

    #[test]
    fn file_then_env_then_flags_override_in_order() {
        let dir = std::env::temp_dir().join(format!("parley-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("parley.toml");
        std::fs::write(
            &file,
            "shards = 3\n[storage]\ndurability = \"interval\"\nflush_interval_ms = 5\n",
        )
        .expect("write config");
        let env = vec![
            ("PARLEY_SHARDS".to_string(), "4".to_string()),
            ("PARLEY_LIMITS__MAX_PAGE".to_string(), "100".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = Config::load(Some(&file), env, &["limits.max_page=50".to_string()])
            .expect("valid config");
        assert_eq!(c.shards, 4, "env overrides the file");
        assert_eq!(
            c.storage.durability,
            DurabilityPolicy::Interval,
            "file overrides defaults"
        );
        assert_eq!(c.storage.flush_interval_ms, 5);
        assert_eq!(c.limits.max_page, 50, "flags override env");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bare_words_are_strings_and_addresses_parse() {
        let c = load(
            &[],
            &[
                "node=edge-7",
                "listen.tcp=0.0.0.0:9000",
                "data_dir=/srv/parley",
            ],
        )
        .expect("valid");
        assert_eq!(c.node, "edge-7");
        assert_eq!(c.listen.tcp, Some(SocketAddr::from(([0, 0, 0, 0], 9000))));
        assert_eq!(c.data_dir, PathBuf::from("/srv/parley"));
    }

    #[test]
    fn unknown_key_is_an_error_not_a_silent_default() {
        let e = load(&[], &["limits.max_frame_byte=10"]).expect_err("typo must fail");
        assert!(e.to_string().contains("max_frame_byte"), "{e}");
    }

    #[test]
    fn renamed_settings_are_read_under_their_new_name_in_every_layer() {
        let c = load(
            &[("PARLEY_LIMITS__SEND_BURST", "7")],
            &["limits.request_burst=9", "limits.send_rate_per_sec=5"],
        )
        .expect("old and new names mix");
        assert_eq!(c.limits.request_burst, 9, "the later layer wins");
        assert_eq!(c.limits.request_rate_per_sec, 5);

        let dir = std::env::temp_dir().join(format!("parley-renamed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("parley.toml");
        std::fs::write(&file, "[limits]\nsend_burst = 11\n").expect("write config");
        let c = Config::load(Some(&file), Vec::new(), &[]).expect("old name in a file");
        assert_eq!(c.limits.request_burst, 11);
        let c = Config::load(
            Some(&file),
            Vec::new(),
            &["limits.request_burst=12".to_string()],
        )
        .expect("old name in the file, new name in a flag");
        assert_eq!(c.limits.request_burst, 12);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn wrong_type_is_an_error() {
        assert!(load(&[], &["shards=many"]).is_err());
        assert!(load(&[], &["storage.durability=sometimes"]).is_err());
    }

    #[test]
    fn setting_without_equals_is_rejected() {
        assert!(matches!(
            load(&[], &["shards"]),
            Err(ConfigError::BadSetting(_))
        ));
    }

    #[test]
    fn inconsistent_limits_are_rejected() {
        assert!(load(&[], &["limits.max_body_bytes=70000"]).is_err());
        assert!(load(&[], &["timeouts.idle_ms=1000"]).is_err());
    }

    #[test]
    fn max_unacked_deliveries_defaults_to_4096_is_set_in_every_layer_and_must_be_positive() {
        assert_eq!(Config::default().limits.max_unacked_deliveries, 4096);
        let c = load(&[("PARLEY_LIMITS__MAX_UNACKED_DELIVERIES", "64")], &[]).expect("valid");
        assert_eq!(c.limits.max_unacked_deliveries, 64);
        let c = load(
            &[("PARLEY_LIMITS__MAX_UNACKED_DELIVERIES", "64")],
            &["limits.max_unacked_deliveries=16"],
        )
        .expect("valid");
        assert_eq!(c.limits.max_unacked_deliveries, 16, "flags override env");
        assert!(
            c.display_redacted().contains("max_unacked_deliveries = 16"),
            "printed at start-up"
        );
        let e = load(&[], &["limits.max_unacked_deliveries=0"]).expect_err("0 is refused");
        assert!(e.to_string().contains("max_unacked_deliveries"), "{e}");
    }

    #[test]
    fn room_limits_are_settings_with_safe_defaults_and_zero_is_refused() {
        let c = load(
            &[("PARLEY_ROOMS__HISTORY", "50")],
            &["rooms.listener_queue=8"],
        )
        .expect("valid");
        assert_eq!(c.rooms.history, 50);
        assert_eq!(c.rooms.listener_queue, 8);
        assert_eq!(c.rooms.max_per_connection, 64);
        assert_eq!(c.rooms.max_listeners, 100_000);
        assert!(
            c.display_redacted().contains("[rooms]"),
            "printed at start-up"
        );
        assert!(load(&[], &["rooms.listener_queue=0"]).is_err());
        assert!(load(&[], &["rooms.max_per_connection=0"]).is_err());
        assert!(load(&[], &["rooms.history=1000000"]).is_err());
    }

    #[test]
    fn presence_settings_have_safe_defaults_are_set_by_flags_and_must_be_positive() {
        let d = Config::default().presence;
        assert_eq!(
            (
                d.coalesce_ms,
                d.max_users_per_request,
                d.max_subscriptions_per_connection,
                d.max_notifications_per_turn,
                d.typing_min_interval_ms
            ),
            (1000, 1000, 5000, 10_000, 1000)
        );
        let c = load(&[], &["presence.coalesce_ms=100"]).expect("valid");
        assert_eq!(c.presence.coalesce_ms, 100);
        for bad in [
            "presence.coalesce_ms=0",
            "presence.max_users_per_request=0",
            "presence.max_subscriptions_per_connection=0",
            "presence.max_notifications_per_turn=0",
        ] {
            let e = load(&[], &[bad]).expect_err(bad);
            assert!(e.to_string().contains("presence."), "{e}");
        }
    }

    #[test]
    fn admin_listens_on_loopback_by_default_can_be_disabled_and_its_limits_must_be_sane() {
        let d = Config::default().admin;
        assert!(
            d.listen
                .is_some_and(|a| a.ip().is_loopback() && a.port() == 7402)
        );
        assert!(d.token.is_none(), "no token unless configured");
        assert_eq!(
            (
                d.max_request_bytes,
                d.max_body_bytes,
                d.request_timeout_ms,
                d.max_connections
            ),
            (8192, 1 << 20, 5000, 16)
        );
        let c = load(&[("PARLEY_ADMIN__MAX_BODY_BYTES", "4096")], &[]).expect("valid");
        assert_eq!(c.admin.max_body_bytes, 4096);
        let c = load(&[("PARLEY_ADMIN__LISTEN", "none")], &[]).expect("valid");
        assert_eq!(c.admin.listen, None);
        let c = load(&[], &["admin.listen=127.0.0.1:0"]).expect("valid");
        assert_eq!(c.admin.listen, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
        assert!(load(&[], &["admin.listen=nowhere"]).is_err());
        for bad in [
            "admin.token=short",
            "admin.max_request_bytes=10",
            "admin.max_body_bytes=10",
            "admin.max_body_bytes=1000000000",
            "admin.request_timeout_ms=0",
            "admin.max_connections=0",
        ] {
            let e = load(&[], &[bad]).expect_err(bad);
            assert!(e.to_string().contains("admin"), "{e}");
        }
        assert!(
            !d.web,
            "the dev-only browser page and token endpoint are off by default"
        );
        let c = load(&[("PARLEY_ADMIN__WEB", "true")], &[]).expect("valid");
        assert!(c.admin.web);
        let c = load(&[("PARLEY_ADMIN__TOKEN", "admin-token-0123456789")], &[]).expect("valid");
        let shown = c.display_redacted();
        assert!(shown.contains("[admin]"), "printed at start-up");
        assert!(!shown.contains("admin-token-0123456789"), "{shown}");
    }

    #[test]
    fn log_settings_default_to_info_text_and_are_set_in_every_layer() {
        let c = load(&[], &[]).expect("valid");
        assert_eq!(c.log, Log::default());
        assert_eq!(
            (c.log.level.as_str(), c.log.format),
            ("info", LogFormat::Text)
        );
        assert!(
            c.display_redacted().contains("[log]"),
            "printed at start-up"
        );
        let c = load(
            &[("PARLEY_LOG__LEVEL", "warn,parley_broker::core=debug")],
            &["log.format=json"],
        )
        .expect("valid");
        assert_eq!(c.log.level, "warn,parley_broker::core=debug");
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(load(&[], &["log.format=xml"]).is_err());
        assert!(load(&[], &["log.colour=true"]).is_err());
    }

    #[test]
    fn webhooks_are_off_by_default_set_in_every_layer_and_checked() {
        let d = Config::default().webhooks;
        assert_eq!(d.url, None, "off unless a url is set");
        assert_eq!(
            d.events,
            [
                WebhookEvent::MessageOffline,
                WebhookEvent::Login,
                WebhookEvent::Logout,
                WebhookEvent::Group
            ]
        );
        assert_eq!(
            (d.queue_capacity, d.max_batch, d.max_attempts, d.threads),
            (10_000, 100, 5, 1)
        );
        let c = load(
            &[
                ("PARLEY_WEBHOOKS__URL", "https://hooks.example.com/parley"),
                ("PARLEY_WEBHOOKS__SECRET", "webhook-secret-0123456789"),
            ],
            &[
                r#"webhooks.events=["login", "message.stored"]"#,
                "webhooks.threads=2",
            ],
        )
        .expect("valid");
        assert_eq!(
            c.webhooks.url.as_deref(),
            Some("https://hooks.example.com/parley")
        );
        assert_eq!(
            c.webhooks.events,
            [WebhookEvent::Login, WebhookEvent::MessageStored]
        );
        assert_eq!(c.webhooks.threads, 2);
        let shown = c.display_redacted();
        assert!(shown.contains("[webhooks]"), "printed at start-up");
        assert!(
            shown.contains(r#"events = ["login", "message.stored"]"#),
            "{shown}"
        );
        assert!(!shown.contains("webhook-secret-0123456789"), "{shown}");

        let url = "webhooks.url=http://127.0.0.1:9000/hook";
        let secret = "webhooks.secret=webhook-secret-0123456789";
        assert!(load(&[], &[url, secret]).is_ok());
        for (bad, says) in [
            (vec![url], "webhooks.secret must be set"),
            (vec![url, "webhooks.secret=short"], "16 bytes"),
            (vec!["webhooks.url=ftp://x/y", secret], "http://"),
            (vec!["webhooks.url=not a url", secret], "webhooks.url"),
            (
                vec!["webhooks.url=https://user:pw@x.example/", secret],
                "user or password",
            ),
            (vec![url, secret, "webhooks.events=[]"], "webhooks.events"),
            (vec![url, secret, r#"webhooks.events=["logins"]"#], "logins"),
            (vec!["webhooks.queue_capacity=0"], "queue_capacity"),
            (vec!["webhooks.max_batch=0"], "max_batch"),
            (vec!["webhooks.max_batch_bytes=10"], "max_batch_bytes"),
            (vec!["webhooks.timeout_ms=0"], "timeout_ms"),
            (vec!["webhooks.max_attempts=0"], "max_attempts"),
            (vec!["webhooks.backoff_base_ms=0"], "backoff_base_ms"),
            (vec!["webhooks.backoff_max_ms=10"], "backoff_max_ms"),
            (vec!["webhooks.backoff_max_ms=3600001"], "backoff_max_ms"),
            (vec!["webhooks.timeout_ms=3600001"], "timeout_ms"),
            (
                vec!["webhooks.shutdown_drain_ms=3600001"],
                "shutdown_drain_ms",
            ),
            (vec!["webhooks.threads=0"], "threads"),
        ] {
            let e = load(&[], &bad).expect_err(&format!("{bad:?}"));
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn cluster_is_off_by_default_checked_and_its_password_never_printed() {
        let c = Config::default();
        assert_eq!(c.cluster.redis, None);
        assert_eq!(c.cluster.effective_node_id(&c.node), "node-1");
        assert_eq!(
            (c.cluster.lease_ms, c.cluster.heartbeat_ms),
            (10_000, 2_000)
        );
        let c = load(
            &[(
                "PARLEY_CLUSTER__REDIS",
                "redis://:hunter2secret@127.0.0.1:6379/0",
            )],
            &[
                "cluster.node_id=n-2",
                "cluster.lease_ms=1000",
                "cluster.heartbeat_ms=200",
            ],
        )
        .expect("valid");
        assert_eq!(c.cluster.effective_node_id(&c.node), "n-2");
        let shown = c.display_redacted();
        assert!(!shown.contains("hunter2secret"), "{shown}");
        assert!(
            shown.contains("redis://:<redacted>@127.0.0.1:6379/0"),
            "{shown}"
        );
        for bad in [
            &["cluster.redis=\"http://x\""][..],
            &["cluster.redis=\"redis://h:1\"", "cluster.node_id=\"a b\""],
            &["cluster.redis=\"redis://h:1\"", "cluster.heartbeat_ms=5000"],
            &["cluster.redis=\"redis://h:1\"", "cluster.advertise=\"\""],
        ] {
            assert!(load(&[], bad).is_err(), "{bad:?} must be refused");
        }
        // Without cluster.redis, the other cluster settings are not checked (no cluster).
        assert!(load(&[], &["cluster.heartbeat_ms=5000"]).is_ok());
    }

    #[test]
    fn printed_config_never_shows_the_secret() {
        let c = load(&[("PARLEY_AUTH__SECRET", "hunter2-very-secret")], &[]).expect("valid");
        assert_eq!(
            c.auth.secret.as_ref().map(Secret::expose),
            Some("hunter2-very-secret")
        );
        let shown = c.display_redacted();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
