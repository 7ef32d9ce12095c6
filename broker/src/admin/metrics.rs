//! The `/metrics` exposition: every field of the shards' [`Counters`], per shard (label `shard`)
//! and for the node, in the Prometheus/OpenMetrics text format written by `prometheus-client`.
//!
//! Names: a counter field `x` is exposed as `parley_x_total{shard="i"}` and `parley_node_x_total`
//! (`flush_ms_total` becomes `parley_flush_ms_total`); a gauge field (`connections`,
//! `websocket_connections`, `tls_connections`, `flush_ms_max`) as `parley_x{shard="i"}` and `parley_node_x` (the node's `flush_ms_max` is the
//! largest of any shard's). Each metric's HELP line is the field's doc line.
//!
//! The shards' [`Latencies`] are Prometheus histograms in seconds, per shard and for the node
//! (all shards' buckets merged): `parley_send_to_deliver_seconds{shard="i"}` and
//! `parley_node_send_to_deliver_seconds`, `parley_flush_seconds{shard="i"}` and
//! `parley_node_flush_seconds`, each as `_bucket{le="…"}` (cumulative, the buckets of
//! [`crate::core::histogram`]), `_sum` and `_count` series.
//! With webhooks on, their node-wide counters follow (`parley_webhook_*`, see
//! [`register_webhooks`]). In a cluster (`cluster.redis` set), the registry's follow
//! (`parley_cluster_*`, see [`register_cluster`]); without one there is none of them.

use std::fmt;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cluster::Snapshot as ClusterSnapshot;
use crate::core::{Counters, Histogram, Latencies, ShardStats};
use crate::webhook::WebhookCounts;

/// The media type of the exposition (`prometheus-client` writes OpenMetrics text, which
/// Prometheus reads).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metric name prefix.
const PREFIX: &str = "parley";

/// How a field is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A total since start (`_total` suffix).
    Counter,
    /// A value now (or a maximum).
    Gauge,
}

/// One field of [`Counters`] as a metric.
#[derive(Debug)]
struct Field {
    /// The field's name in [`Counters`] (checked against the struct by a unit test).
    field: &'static str,
    /// The metric's name, without the prefix and the `_total` suffix.
    metric: &'static str,
    /// Counter or gauge.
    kind: Kind,
    /// The HELP line (the field's doc).
    help: &'static str,
    /// Reads the field.
    get: fn(&Counters) -> u64,
}

/// A [`Field`] for the field `$f` of [`Counters`].
macro_rules! field {
    ($f:ident, $metric:literal, $kind:ident, $help:literal) => {
        Field {
            field: stringify!($f),
            metric: $metric,
            kind: Kind::$kind,
            help: $help,
            get: |c| c.$f,
        }
    };
}

/// Every field of [`Counters`] (a unit test checks that none is missing).
const FIELDS: &[Field] = &[
    field!(
        connections,
        "connections",
        Gauge,
        "Connections open now (a gauge)."
    ),
    field!(
        websocket_connections,
        "websocket_connections",
        Gauge,
        "Of those, WebSocket connections (a gauge; the others are TCP)."
    ),
    field!(
        connections_opened,
        "connections_opened",
        Counter,
        "Connections accepted or adopted."
    ),
    field!(logins, "logins", Counter, "Successful logins."),
    field!(logins_refused, "logins_refused", Counter, "Logins refused."),
    field!(
        frames_in,
        "frames_in",
        Counter,
        "Frames decoded from clients."
    ),
    field!(
        frames_out,
        "frames_out",
        Counter,
        "Frames written to clients."
    ),
    field!(
        bytes_in,
        "bytes_in",
        Counter,
        "Bytes received from clients."
    ),
    field!(bytes_out, "bytes_out", Counter, "Bytes queued to clients."),
    field!(
        messages_stored,
        "messages_stored",
        Counter,
        "Messages stored (appended) by this shard as owner."
    ),
    field!(
        retries_deduplicated,
        "retries_deduplicated",
        Counter,
        "Retried sends answered from the de-dup window."
    ),
    field!(
        deliveries,
        "deliveries",
        Counter,
        "Live deliveries written."
    ),
    field!(
        retransmits,
        "retransmits",
        Counter,
        "Messages re-sent by retransmit deadlines."
    ),
    field!(
        behinds,
        "behinds",
        Counter,
        "Connections told they are Behind."
    ),
    field!(syncs, "syncs", Counter, "Syncs started."),
    field!(
        flushes,
        "flushes",
        Counter,
        "Group-commit flushes completed."
    ),
    field!(
        flush_ms_total,
        "flush_ms",
        Counter,
        "Sum of flush latencies, ms."
    ),
    field!(
        flush_ms_max,
        "flush_ms_max",
        Gauge,
        "Largest flush latency, ms."
    ),
    field!(
        checkpoints,
        "checkpoints",
        Counter,
        "Start-up checkpoints written."
    ),
    field!(
        holds,
        "holds",
        Counter,
        "Times a connection reached its budget and its input was held."
    ),
    field!(
        rate_limited,
        "rate_limited",
        Counter,
        "Requests refused by a connection's request bucket."
    ),
    field!(
        bad_frames,
        "bad_frames",
        Counter,
        "Undecodable frames from logged-in connections (refused, not fatal)."
    ),
    field!(
        fatal_frames,
        "fatal_frames",
        Counter,
        "Connections ended by a fatal framing error or garbage before login."
    ),
    field!(
        closed_for_errors,
        "closed_for_errors",
        Counter,
        "Connections closed for more errors than limits.max_errors in a window."
    ),
    field!(
        tokens_expired,
        "tokens_expired",
        Counter,
        "Sessions ended because their token expired."
    ),
    field!(
        token_refreshes,
        "token_refreshes",
        Counter,
        "Sessions whose token was refreshed by a fresh Login."
    ),
    field!(
        origins_refused,
        "origins_refused",
        Counter,
        "WebSocket upgrades refused for their Origin."
    ),
    field!(
        refused_at_open,
        "refused_at_open",
        Counter,
        "Connections refused at accept (connection limits)."
    ),
    field!(
        users_freed,
        "users_freed",
        Counter,
        "Users forgotten by their home after their last device left with nothing pending."
    ),
    field!(
        log_lines_suppressed,
        "log_lines_suppressed",
        Counter,
        "Log lines suppressed by the per-kind rate limit."
    ),
    field!(
        group_events,
        "group_events",
        Counter,
        "Group membership and settings events stored."
    ),
    field!(
        group_deliveries,
        "group_deliveries",
        Counter,
        "Group messages pushed live to a member's device (also counted in deliveries)."
    ),
    field!(
        receipts,
        "receipts",
        Counter,
        "READ receipts that moved a read cursor."
    ),
    field!(
        conversation_lists,
        "conversation_lists",
        Counter,
        "Conversation lists answered."
    ),
    field!(
        room_messages,
        "room_messages",
        Counter,
        "Room messages sent by this shard as the room's owner."
    ),
    field!(
        room_deliveries,
        "room_deliveries",
        Counter,
        "Room messages written to listeners on this shard (live, held, or history on a join)."
    ),
    field!(
        room_drops,
        "room_drops",
        Counter,
        "Room messages dropped for slow listeners on this shard (each told with RoomLag)."
    ),
    field!(
        presence_updates_pushed,
        "presence_updates_pushed",
        Counter,
        "PresenceUpdate pushes to subscribed connections (one per connection per flush turn)."
    ),
    field!(
        presence_flushes,
        "presence_flushes",
        Counter,
        "Presence flush turns (a flush cut by presence.max_notifications_per_turn counts once per turn)."
    ),
    field!(
        typing_relayed,
        "typing_relayed",
        Counter,
        "Typing frames written to a recipient's connection."
    ),
    field!(
        typing_dropped,
        "typing_dropped",
        Counter,
        "Typing frames dropped: over presence.typing_min_interval_ms from their sender, or for a recipient whose queue was at its budget."
    ),
    field!(
        hooks_parked,
        "hooks_parked",
        Counter,
        "Requests parked on a hook that answered after it returned."
    ),
    field!(
        hooks_denied,
        "hooks_denied",
        Counter,
        "Sends and group requests a hook denied."
    ),
    field!(
        kicked,
        "kicked",
        Counter,
        "Connections ended by the application (admin API or embedding)."
    ),
    field!(
        local_connections_opened,
        "local_connections_opened",
        Counter,
        "In-process connections opened by the application."
    ),
    field!(
        routes_asked,
        "routes_asked",
        Counter,
        "Routes asked of the Redis presence index (device logins on a node that shares one)."
    ),
    field!(
        routes_failed,
        "routes_failed",
        Counter,
        "Logins closed with UNAVAILABLE because their route could not be registered in time."
    ),
    field!(
        routes_orphaned,
        "routes_orphaned",
        Counter,
        "Routes registered for a login that was gone by then (withdrawn at once)."
    ),
    field!(
        relays_opened,
        "relays_opened",
        Counter,
        "Connections relayed to their session's home on another node."
    ),
    field!(
        fenced,
        "fenced",
        Counter,
        "Sends and group requests refused UNAVAILABLE because the node's lease in Redis had run out."
    ),
    field!(
        remote_mail_out,
        "remote_mail_out",
        Counter,
        "Mail to another node's shards sent on a link between nodes."
    ),
    field!(
        remote_mail_in,
        "remote_mail_in",
        Counter,
        "Mail from another node's shards handled here."
    ),
    field!(
        unreachable_mail,
        "unreachable_mail",
        Counter,
        "Mail for a node without a link now: requests answered UNAVAILABLE, the rest repaired at link-up."
    ),
    field!(
        closed_for_link,
        "closed_for_link",
        Counter,
        "Connections closed UNAVAILABLE because a link went down while they waited for an answer."
    ),
    field!(
        fills,
        "fills",
        Counter,
        "Reads from an owner to push messages a home learned of without their delivery (after a lost link or a crashed owner)."
    ),
    field!(
        tls_connections,
        "tls_connections",
        Gauge,
        "TLS connections open now (a gauge; counted by the driver, which owns TLS)."
    ),
    field!(
        tls_handshakes,
        "tls_handshakes",
        Counter,
        "TLS handshakes completed (counted by the driver)."
    ),
    field!(
        tls_failures,
        "tls_failures",
        Counter,
        "TLS connections ended by a TLS error or a handshake past tls.handshake_timeout_ms."
    ),
    field!(
        udp_sessions,
        "udp_sessions",
        Gauge,
        "UDP sessions open now."
    ),
    field!(
        udp_datagrams_received,
        "udp_datagrams_received",
        Counter,
        "UDP datagrams received."
    ),
    field!(
        udp_datagrams_sent,
        "udp_datagrams_sent",
        Counter,
        "UDP datagrams sent."
    ),
    field!(
        udp_datagrams_dropped,
        "udp_datagrams_dropped",
        Counter,
        "UDP datagrams dropped unanswered: malformed, unauthenticated, replayed, for no session, or while their session took no input."
    ),
    field!(
        udp_retries,
        "udp_retries",
        Counter,
        "RETRY datagrams sent (UDP logins without a good cookie)."
    ),
    field!(
        udp_migrations,
        "udp_migrations",
        Counter,
        "UDP sessions that moved to a new client address (NAT rebinding)."
    ),
    field!(
        udp_forwarded,
        "udp_forwarded",
        Counter,
        "UDP datagrams passed to the shard that owns their session."
    ),
];

/// One histogram of [`Latencies`] as a metric.
#[derive(Debug)]
struct HistogramField {
    /// The metric's name, without the prefix (the unit, seconds, is part of it).
    metric: &'static str,
    /// The HELP line.
    help: &'static str,
    /// Reads the histogram.
    get: fn(&Latencies) -> &Histogram,
}

/// Every histogram of [`Latencies`].
const HISTOGRAMS: &[HistogramField] = &[
    HistogramField {
        metric: "send_to_deliver_seconds",
        help: "Seconds from a send's arrival at its sender's shard to its live push to a \
               recipient's connection, once per connection pushed (measured at the shards' turn \
               starts; retransmits, sync pages and group events are not counted)",
        get: |l| &l.send_to_deliver,
    },
    HistogramField {
        metric: "flush_seconds",
        help: "Seconds each log flush (fsync) took on the shard's flusher thread",
        get: |l| &l.flush,
    },
];

/// Histograms as one Prometheus histogram metric: one series per shard (label `shard`), or
/// the node's one series.
#[derive(Debug)]
struct Exposed {
    /// Each shard's histogram in shard order, or the node's alone.
    series: Vec<Histogram>,
    /// `series` are the shards' (labelled), not the node's.
    per_shard: bool,
}

impl EncodeMetric for Exposed {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (i, h) in self.series.iter().enumerate() {
            if self.per_shard {
                let label: ShardLabel = [("shard", i.to_string())];
                encode_histogram(h, &mut encoder.encode_family(&label)?)?;
            } else {
                encode_histogram(h, &mut encoder)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes one histogram's `_sum`, `_count` and `_bucket` series, in seconds.
fn encode_histogram(h: &Histogram, encoder: &mut MetricEncoder<'_>) -> Result<(), fmt::Error> {
    let buckets: Vec<(f64, u64)> = h.buckets().map(|(le, n)| (le / 1e6, n)).collect();
    encoder.encode_histogram::<NoLabelSet>(h.sum_us() as f64 / 1e6, h.count(), &buckets, None)
}

/// The label set of a per-shard metric.
type ShardLabel = [(&'static str, String); 1];

/// The exposition of `shards` (each shard's counters and histograms, in shard order) and their
/// node totals, of the webhook counters if webhooks are on, and of the cluster registry if the
/// node is in a cluster.
pub(crate) fn encode(
    shards: &[ShardStats],
    webhooks: Option<&WebhookCounts>,
    cluster: Option<&ClusterSnapshot>,
) -> Result<String, fmt::Error> {
    let mut total = Counters::default();
    let mut latencies = Latencies::default();
    for s in shards {
        total.add(&s.counters);
        latencies.add(&s.latencies);
    }
    let mut registry = Registry::with_prefix(PREFIX);
    for f in FIELDS {
        // `prometheus-client` ends every HELP line with a full stop of its own.
        let help = f.help.trim_end_matches('.');
        let node_help = if f.field == "flush_ms_max" {
            format!("{help}; the largest of any shard")
        } else {
            format!("{help}; the node's total")
        };
        match f.kind {
            Kind::Counter => {
                let family = Family::<ShardLabel, Counter>::default();
                for (i, s) in shards.iter().enumerate() {
                    family
                        .get_or_create(&[("shard", i.to_string())])
                        .inc_by((f.get)(&s.counters));
                }
                registry.register(f.metric, help, family);
                let node = Counter::<u64>::default();
                node.inc_by((f.get)(&total));
                registry.register(format!("node_{}", f.metric), node_help, node);
            }
            Kind::Gauge => {
                let family = Family::<ShardLabel, Gauge<i64>>::default();
                for (i, s) in shards.iter().enumerate() {
                    family
                        .get_or_create(&[("shard", i.to_string())])
                        .set(saturating_i64((f.get)(&s.counters)));
                }
                registry.register(f.metric, help, family);
                let node = Gauge::<i64>::default();
                node.set(saturating_i64((f.get)(&total)));
                registry.register(format!("node_{}", f.metric), node_help, node);
            }
        }
    }
    for h in HISTOGRAMS {
        let per_shard = shards.iter().map(|s| *(h.get)(&s.latencies)).collect();
        let node = vec![*(h.get)(&latencies)];
        registry.register(
            h.metric,
            h.help,
            Exposed {
                series: per_shard,
                per_shard: true,
            },
        );
        registry.register(
            format!("node_{}", h.metric),
            format!("{}; the node's, every shard's buckets merged", h.help),
            Exposed {
                series: node,
                per_shard: false,
            },
        );
    }
    let shard_count = Gauge::<i64>::default();
    shard_count.set(saturating_i64(shards.len() as u64));
    registry.register("shards", "Shard threads of this node", shard_count);
    if let Some(w) = webhooks {
        register_webhooks(&mut registry, w);
    }
    if let Some(c) = cluster {
        register_cluster(&mut registry, c);
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Registers the webhook counters: one counter per [`WebhookCounts`] total
/// (`parley_webhook_<name>_total`, counted in events, not POSTs) and the queue's length now (a
/// gauge).
fn register_webhooks(registry: &mut Registry, w: &WebhookCounts) {
    let counters: [(&str, &str, u64); 6] = [
        ("queued", "Webhook events queued for sending", w.queued),
        (
            "delivered",
            "Webhook events the endpoint accepted (a 2xx)",
            w.delivered,
        ),
        (
            "retried",
            "Webhook event deliveries attempted again (an event retried twice counts 2)",
            w.retried,
        ),
        (
            "failed",
            "Webhook events given up: a final answer, or no success after webhooks.max_attempts",
            w.failed,
        ),
        (
            "dropped_queue_full",
            "Webhook events dropped because the queue (webhooks.queue_capacity) was full",
            w.dropped_queue_full,
        ),
        (
            "dropped_shutdown",
            "Webhook events dropped by a shutdown (not delivered within webhooks.shutdown_drain_ms)",
            w.dropped_shutdown,
        ),
    ];
    for (name, help, value) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(format!("webhook_{name}"), help, counter);
    }
    let queue = Gauge::<i64>::default();
    queue.set(saturating_i64(w.queue_len));
    registry.register(
        "webhook_queue_length",
        "Webhook events waiting in the queue now",
        queue,
    );
}

/// Registers the cluster bridge's metrics: `parley_cluster_nodes` (live nodes in this node's
/// view, itself included while it holds its lease), `parley_cluster_lease_ok` (1 while this
/// process holds an unexpired lease, else 0), `parley_cluster_redis_errors_total`, and the
/// presence index's `parley_cluster_routes` (routes held),
/// `parley_cluster_route_writes_total`, `parley_cluster_redis_calls_total` and
/// `parley_cluster_route_replays_total`.
fn register_cluster(registry: &mut Registry, c: &ClusterSnapshot) {
    let nodes = Gauge::<i64>::default();
    nodes.set(saturating_i64(c.members.len() as u64));
    registry.register(
        "cluster_nodes",
        "Live nodes in this node's view of the cluster registry (itself included)",
        nodes,
    );
    let lease = Gauge::<i64>::default();
    lease.set(i64::from(c.lease_ok));
    registry.register(
        "cluster_lease_ok",
        "1 while this node holds an unexpired lease in the cluster registry, else 0",
        lease,
    );
    let errors = Counter::<u64>::default();
    errors.inc_by(c.redis_errors);
    registry.register(
        "cluster_redis_errors",
        "Failed Redis calls of the cluster bridge (connect, I/O, bad answers)",
        errors,
    );
    let routes = Gauge::<i64>::default();
    routes.set(saturating_i64(c.routes));
    registry.register(
        "cluster_routes",
        "Routes (user, device -> this node) this node holds in the presence index",
        routes,
    );
    let links = Gauge::<i64>::default();
    links.set(saturating_i64(c.links.len() as u64));
    registry.register(
        "cluster_links",
        "Links to other nodes up now (with cluster.listen)",
        links,
    );
    for (name, help, v) in [
        (
            "cluster_links_opened",
            "Links to other nodes established since start",
            c.links_opened,
        ),
        (
            "cluster_link_handshake_failures",
            "Link handshakes that failed (a wrong key, garbage, a timeout)",
            c.link_handshake_failures,
        ),
        (
            "cluster_route_writes",
            "Route ops written to the presence index (registrations, withdrawals, replays)",
            c.route_writes,
        ),
        (
            "cluster_redis_calls",
            "Redis calls of the cluster bridge (each script run is one command on the wire)",
            c.redis_calls,
        ),
        (
            "cluster_route_replays",
            "Times every route was written again because Redis's digest differed",
            c.route_replays,
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(v);
        registry.register(name, help, counter);
    }
}

/// `v` as a gauge value (gauges are signed; a count past `i64::MAX` cannot happen in practice).
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counters_field_is_exposed_once() {
        let shown = format!("{:?}", Counters::default());
        let names: Vec<&str> = shown
            .trim_start_matches("Counters {")
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split(':').next())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names.len(), FIELDS.len(), "{names:?}");
        for (name, f) in names.iter().zip(FIELDS) {
            assert_eq!(*name, f.field, "FIELDS follows the struct's order");
        }
    }

    #[test]
    fn exposition_has_per_shard_counters_node_totals_and_gauges() {
        let a = Counters {
            messages_stored: 3,
            connections: 2,
            flush_ms_max: 7,
            flush_ms_total: 9,
            ..Counters::default()
        };
        let b = Counters {
            messages_stored: 4,
            connections: 1,
            flush_ms_max: 5,
            ..Counters::default()
        };
        let stats = |counters| ShardStats {
            counters,
            latencies: Latencies::default(),
        };
        let text = encode(&[stats(a), stats(b)], None, None).expect("encodes");
        for line in [
            "# HELP parley_messages_stored Messages stored (appended) by this shard as owner.",
            "# TYPE parley_messages_stored counter",
            "parley_messages_stored_total{shard=\"0\"} 3",
            "parley_messages_stored_total{shard=\"1\"} 4",
            "parley_node_messages_stored_total 7",
            "# TYPE parley_connections gauge",
            "parley_connections{shard=\"0\"} 2",
            "parley_node_connections 3",
            "parley_node_flush_ms_max 7",
            "parley_flush_ms_total{shard=\"0\"} 9",
            "parley_shards 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("webhook"),
            "no webhook metrics when they are off"
        );
    }

    #[test]
    fn webhook_counters_are_exposed_when_webhooks_are_on() {
        let w = WebhookCounts {
            queued: 10,
            delivered: 7,
            retried: 3,
            failed: 1,
            dropped_queue_full: 4,
            dropped_shutdown: 2,
            queue_len: 2,
        };
        let text = encode(&[ShardStats::default()], Some(&w), None).expect("encodes");
        for line in [
            "# TYPE parley_webhook_queued counter",
            "parley_webhook_queued_total 10",
            "parley_webhook_delivered_total 7",
            "parley_webhook_retried_total 3",
            "parley_webhook_failed_total 1",
            "parley_webhook_dropped_queue_full_total 4",
            "parley_webhook_dropped_shutdown_total 2",
            "# TYPE parley_webhook_queue_length gauge",
            "parley_webhook_queue_length 2",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn latencies_are_histograms_in_seconds_per_shard_and_for_the_node() {
        let mut a = ShardStats::default();
        a.latencies.send_to_deliver.record(50);
        a.latencies.send_to_deliver.record(1_000);
        a.latencies.flush.record(3_000);
        let mut b = ShardStats::default();
        b.latencies.send_to_deliver.record(100);
        let text = encode(&[a, b], None, None).expect("encodes");
        for line in [
            "# TYPE parley_send_to_deliver_seconds histogram",
            "# TYPE parley_node_send_to_deliver_seconds histogram",
            "# TYPE parley_flush_seconds histogram",
            "parley_send_to_deliver_seconds_count{shard=\"0\"} 2",
            "parley_send_to_deliver_seconds_count{shard=\"1\"} 1",
            "parley_send_to_deliver_seconds_sum{shard=\"0\"} 0.00105",
            "parley_send_to_deliver_seconds_bucket{le=\"0.000064\",shard=\"0\"} 1",
            "parley_send_to_deliver_seconds_bucket{le=\"+Inf\",shard=\"0\"} 2",
            "parley_node_send_to_deliver_seconds_count 3",
            "parley_node_send_to_deliver_seconds_bucket{le=\"0.000064\"} 1",
            "parley_node_send_to_deliver_seconds_bucket{le=\"0.000128\"} 2",
            "parley_node_send_to_deliver_seconds_bucket{le=\"+Inf\"} 3",
            "parley_flush_seconds_count{shard=\"0\"} 1",
            "parley_flush_seconds_count{shard=\"1\"} 0",
            "parley_node_flush_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let help = "# HELP parley_send_to_deliver_seconds Seconds from a send's arrival";
        assert!(text.lines().any(|l| l.starts_with(help)), "{text}");
        // Buckets are cumulative and end at +Inf.
        let node: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("parley_node_send_to_deliver_seconds_bucket"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(node.len(), crate::core::histogram::BUCKETS);
        assert!(node.windows(2).all(|w| w[0] <= w[1]), "{node:?}");
    }

    #[test]
    fn cluster_metrics_are_exposed_only_in_a_cluster() {
        let text = encode(&[ShardStats::default()], None, None).expect("encodes");
        assert!(
            !text.contains("cluster"),
            "no cluster metrics without a cluster"
        );
        let member = |id: &str| crate::cluster::Member {
            node_id: id.into(),
            boot_id: "b".into(),
            advertise: None,
            started_ms: 0,
            renewed_ms: 0,
            lease_expires_ms: 0,
        };
        let c = ClusterSnapshot {
            node_id: "a".into(),
            boot_id: "b".into(),
            lease_ok: true,
            redis_errors: 3,
            members: vec![member("a"), member("b")],
            routes: 5,
            route_writes: 9,
            redis_calls: 4,
            route_replays: 1,
            links: Vec::new(),
            links_opened: 2,
            link_handshake_failures: 1,
            settled: true,
        };
        let text = encode(&[ShardStats::default()], None, Some(&c)).expect("encodes");
        for line in [
            "# TYPE parley_cluster_nodes gauge",
            "parley_cluster_nodes 2",
            "parley_cluster_lease_ok 1",
            "# TYPE parley_cluster_redis_errors counter",
            "parley_cluster_redis_errors_total 3",
            "parley_cluster_routes 5",
            "parley_cluster_route_writes_total 9",
            "parley_cluster_redis_calls_total 4",
            "parley_cluster_route_replays_total 1",
            "parley_cluster_links 0",
            "parley_cluster_links_opened_total 2",
            "parley_cluster_link_handshake_failures_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }
}
