//! Prometheus metrics: one registry per running application (so tests that
//! run several side by side each read their own), rendered in Prometheus'
//! text format by `metrics-exporter-prometheus`.
//!
//! Two kinds of figures. Those that happen on a call's path (a gRPC call, a
//! Kafka acknowledgement, a projector batch, a Redis call) are recorded where
//! they happen, through this module's helpers. Those that the service already
//! keeps for its own use (the projector's counters, the call budget, health,
//! the progress snapshot the progress RPC serves) are copied in at scrape
//! time, from the same structures, so the metrics and the RPCs never
//! disagree; the collector lives where those parts are wired
//! (`startup::metrics_endpoint`), so that this module imports none of them.

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::{sync::Arc, time::Duration};

/// Latency buckets, in seconds: from a fast Redis call to a call that hit
/// the service's longest wait.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Records per projector batch (up to `PROJECTOR_BATCH_SIZE`, 500 by default).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// What every metric is: name, kind, unit and help, described once.
const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (
        "grpc_server_started_total",
        Kind::Counter,
        "gRPC calls started, by service and method",
    ),
    (
        "grpc_server_handled_total",
        Kind::Counter,
        "gRPC calls completed, by service, method and status code",
    ),
    (
        "grpc_server_handling_seconds",
        Kind::Histogram,
        "time from a call's start to its status, by service and method",
    ),
    (
        "grpc_server_in_flight_calls",
        Kind::Gauge,
        "calls of UserService and ProjectionService in flight (the budget MAX_CONCURRENT_CALLS counts them)",
    ),
    (
        "user_service_calls_shed_total",
        Kind::Counter,
        "calls refused at once because MAX_CONCURRENT_CALLS were in flight",
    ),
    (
        "user_service_events_sent_total",
        Kind::Counter,
        "UserCreated records handed to the Kafka producer",
    ),
    (
        "user_service_events_acknowledged_total",
        Kind::Counter,
        "records the brokers acknowledged (acks=all)",
    ),
    (
        "user_service_events_failed_total",
        Kind::Counter,
        "records not acknowledged, by class (timeout: no ack in KAFKA_PUBLISH_TIMEOUT; broker: refused or unreachable)",
    ),
    (
        "user_service_events_in_flight",
        Kind::Gauge,
        "records sent and not yet acknowledged or failed",
    ),
    (
        "user_service_event_ack_seconds",
        Kind::Histogram,
        "time from send to the brokers' acknowledgement or failure",
    ),
    (
        "kafka_producer_queue_messages",
        Kind::Gauge,
        "messages in librdkafka's producer queue (statistics msg_cnt)",
    ),
    (
        "kafka_producer_queue_bytes",
        Kind::Gauge,
        "bytes in librdkafka's producer queue (statistics msg_size)",
    ),
    (
        "kafka_producer_broker_rtt_seconds",
        Kind::Gauge,
        "librdkafka's request round trip to each broker, mean over the last statistics window",
    ),
    (
        "user_service_projector_events_applied_total",
        Kind::Counter,
        "users written to the read model by this instance, by partition",
    ),
    (
        "user_service_projector_events_duplicate_total",
        Kind::Counter,
        "events for an id the read model already had (the first in the log won)",
    ),
    (
        "user_service_projector_events_replayed_total",
        Kind::Counter,
        "events at or below the checkpoint, replayed without effect",
    ),
    (
        "user_service_projector_dead_lettered_total",
        Kind::Counter,
        "records that cannot be applied (undecodable, or this service's events outside their id's partition) sent to the dead-letter topic",
    ),
    (
        "user_service_projector_events_rehomed_total",
        Kind::Counter,
        "events of the article's Go service copied from the partition its writer picked to their id's partition (re-homed)",
    ),
    (
        "user_service_projector_legacy_superseded_total",
        Kind::Counter,
        "events of the article's Go service that created nothing because another user already had their id: the Go service's read model kept the last such event, this one keeps the first (each logged with the id)",
    ),
    (
        "user_service_projector_apply_failures_total",
        Kind::Counter,
        "failed attempts to apply a batch or open a partition (Redis or Kafka away); each is retried",
    ),
    (
        "user_service_projector_checkpoint_moves_total",
        Kind::Counter,
        "times the read model held another checkpoint than the projector resumed from (Redis lost data): the partition is replayed",
    ),
    (
        "user_service_kafka_client_replacements_total",
        Kind::Counter,
        "librdkafka clients the watchdog replaced for being cut off from a reachable cluster, by client (producer, projector)",
    ),
    (
        "user_service_projector_batch_records",
        Kind::Histogram,
        "records per partition per apply (one Lua script)",
    ),
    (
        "user_service_projector_apply_seconds",
        Kind::Histogram,
        "time of one partition's apply script",
    ),
    (
        "user_service_projector_rebalances_total",
        Kind::Counter,
        "partition assignments this instance received or lost",
    ),
    (
        "user_service_partition_map_partitions",
        Kind::Gauge,
        "partitions the topic's partition map routes ids over (0 until read from the log)",
    ),
    (
        "user_service_topic_partitions",
        Kind::Gauge,
        "partitions the topic has, as a broker last said (0 until then)",
    ),
    (
        "user_service_topic_partitions_unused",
        Kind::Gauge,
        "partitions of the topic no id is routed to (added after the partition map was recorded)",
    ),
    (
        "user_service_projector_assigned_partitions",
        Kind::Gauge,
        "partitions this instance owns",
    ),
    (
        "user_service_projector_in_group",
        Kind::Gauge,
        "1 while librdkafka reports this instance in its consumer group",
    ),
    (
        "user_service_projection_lag_records",
        Kind::Gauge,
        "records of the partition not yet committed by the group (log end minus committed offset), as the progress RPC reports it",
    ),
    (
        "user_service_projection_lag_seconds",
        Kind::Gauge,
        "how far behind the partition's projection is in time, as the progress RPC reports it",
    ),
    (
        "user_service_projection_log_end_offset",
        Kind::Gauge,
        "the partition's log end offset at the last progress poll",
    ),
    (
        "user_service_projection_committed_offset",
        Kind::Gauge,
        "the group's committed offset of the partition at the last progress poll",
    ),
    (
        "user_service_projection_partitions_rebuilding",
        Kind::Gauge,
        "partitions the read model is replaying from the log",
    ),
    (
        "user_service_dependency_up",
        Kind::Gauge,
        "1 while the last probe of the dependency (redis, kafka) succeeded",
    ),
    (
        "user_service_health_serving",
        Kind::Gauge,
        "1 while the health name answers SERVING",
    ),
    (
        "user_service_dependency_probe_seconds",
        Kind::Histogram,
        "time of one health probe of the dependency",
    ),
    (
        "user_service_redis_call_seconds",
        Kind::Histogram,
        "time of one Redis call (a command, a pipeline or a script), by outcome",
    ),
    (
        "user_service_redis_replica_reads_total",
        Kind::Counter,
        "GetUser lookups sent to a replica, by outcome (served, or taken over by the master)",
    ),
    (
        "user_service_http2_too_many_pings_total",
        Kind::Counter,
        "connections sent GOAWAY ENHANCE_YOUR_CALM for pinging more often than HTTP2_MIN_PING_INTERVAL allows",
    ),
    (
        "user_service_connections_open",
        Kind::Gauge,
        "client connections open (admitted under MAX_CONNECTIONS, TLS handshakes in flight included)",
    ),
    (
        "user_service_connections_refused_total",
        Kind::Counter,
        "connections closed at accept, by reason (max_connections: MAX_CONNECTIONS open; tls_handshakes: TLS_MAX_HANDSHAKES in flight)",
    ),
    (
        "user_service_connections_closed_total",
        Kind::Counter,
        "connections the server closed, by reason (no_preface: none within HTTP2_PREFACE_TIMEOUT; idle: GOAWAY after MAX_CONNECTION_IDLE with no call)",
    ),
    (
        "user_service_user_cache_lookups_total",
        Kind::Counter,
        "GetUser lookups of the in-process user cache, by outcome (hit: no Redis round trip)",
    ),
    (
        "user_service_user_cache_entries",
        Kind::Gauge,
        "users held in the in-process cache",
    ),
    (
        "user_service_user_cache_bytes",
        Kind::Gauge,
        "bytes the in-process cache counts for its users (bounded by USER_CACHE_BYTES)",
    ),
    (
        "user_service_checkpoint_polls_total",
        Kind::Counter,
        "polls of the read model's checkpoints for calls waiting on a position",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The application's metrics. Cheap to clone; a default one records into a
/// registry nobody scrapes (tools and tests that build parts alone).
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                SECONDS_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_records".into()),
                    BATCH_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        for (name, kind, help) in DESCRIPTIONS {
            let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
            match kind {
                Kind::Counter => recorder.describe_counter((*name).into(), unit, (*help).into()),
                Kind::Gauge => recorder.describe_gauge((*name).into(), unit, (*help).into()),
                Kind::Histogram => {
                    recorder.describe_histogram((*name).into(), unit, (*help).into())
                }
            }
        }
        let handle = recorder.handle();
        Self(Arc::new(Inner { recorder, handle }))
    }

    /// The exposition, in Prometheus' text format.
    pub fn render(&self) -> String {
        self.0.handle.run_upkeep();
        self.0.handle.render()
    }

    /// Drains the histograms' buffers into their buckets; run every few
    /// seconds, or memory grows with every sample between scrapes.
    pub fn upkeep(&self) {
        self.0.handle.run_upkeep();
    }

    // The recorder's own registry finds a series by its key: a handle is
    // looked up there each time, no cache of ours on top.
    pub(crate) fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.0
            .recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    pub(crate) fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Histogram {
        self.0
            .recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    pub(crate) fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.0
            .recorder
            .register_gauge(&key(name, labels), &METADATA)
    }

    // ---- what happens on a call's path

    /// A gRPC call began.
    pub fn grpc_started(&self, service: &str, method: &str) {
        self.counter(
            "grpc_server_started_total",
            &[("grpc_service", service), ("grpc_method", method)],
        )
        .increment(1);
    }

    /// A gRPC call ended with `code` (its name, e.g. `OK`) after `took`.
    pub fn grpc_handled(&self, service: &str, method: &str, code: &str, took: Duration) {
        self.counter(
            "grpc_server_handled_total",
            &[
                ("grpc_service", service),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
        .increment(1);
        self.histogram(
            "grpc_server_handling_seconds",
            &[("grpc_service", service), ("grpc_method", method)],
        )
        .record(took.as_secs_f64());
    }

    /// A record was handed to the producer.
    pub fn event_sent(&self) {
        self.counter("user_service_events_sent_total", &[])
            .increment(1);
        self.gauge("user_service_events_in_flight", &[])
            .increment(1.0);
    }

    /// The record was acknowledged (`failure` None) or not, after `took`.
    pub fn event_done(&self, failure: Option<&'static str>, took: Duration) {
        match failure {
            None => self
                .counter("user_service_events_acknowledged_total", &[])
                .increment(1),
            Some(class) => self
                .counter("user_service_events_failed_total", &[("class", class)])
                .increment(1),
        }
        self.gauge("user_service_events_in_flight", &[])
            .decrement(1.0);
        self.histogram("user_service_event_ack_seconds", &[])
            .record(took.as_secs_f64());
    }

    /// One partition's apply script ran (`applied` users written).
    pub fn projector_applied(&self, partition: i32, records: usize, applied: u64, took: Duration) {
        let p = partition.to_string();
        self.counter(
            "user_service_projector_events_applied_total",
            &[("partition", &p)],
        )
        .increment(applied);
        self.histogram("user_service_projector_batch_records", &[])
            .record(records as f64);
        self.histogram("user_service_projector_apply_seconds", &[])
            .record(took.as_secs_f64());
    }

    /// One Redis call took `took` and succeeded or not.
    pub fn redis_call(&self, ok: bool, took: Duration) {
        self.histogram(
            "user_service_redis_call_seconds",
            &[("outcome", if ok { "ok" } else { "error" })],
        )
        .record(took.as_secs_f64());
    }

    /// One health probe of `dependency` took `took`.
    pub fn probe(&self, dependency: &str, up: bool, took: Duration) {
        self.histogram(
            "user_service_dependency_probe_seconds",
            &[("dependency", dependency)],
        )
        .record(took.as_secs_f64());
        self.gauge("user_service_dependency_up", &[("dependency", dependency)])
            .set(if up { 1.0 } else { 0.0 });
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

/// The gRPC status code's name, as grpc-go and the Prometheus gRPC
/// middlewares write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's metrics table lists every metric the service describes,
    /// with its type (the table is written from DESCRIPTIONS).
    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        for (name, kind, _) in DESCRIPTIONS {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert!(
                readme.contains(&format!("| `{name}` | {kind} |")),
                "README.md's metrics table lacks {name} ({kind})"
            );
        }
    }

    #[test]
    fn renders_prometheus_text_with_help_and_types() {
        let m = Metrics::new();
        m.grpc_started("user.v1.UserService", "GetUser");
        m.grpc_handled(
            "user.v1.UserService",
            "GetUser",
            "OK",
            Duration::from_millis(3),
        );
        let text = m.render();
        assert!(
            text.contains("# TYPE grpc_server_handled_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP grpc_server_handled_total"), "{text}");
        assert!(
            text.contains(
                "grpc_server_handled_total{grpc_service=\"user.v1.UserService\",grpc_method=\"GetUser\",grpc_code=\"OK\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE grpc_server_handling_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("grpc_server_handling_seconds_bucket{"),
            "{text}"
        );
    }

    #[test]
    fn every_metric_is_described_once() {
        let mut names: Vec<&str> = DESCRIPTIONS.iter().map(|d| d.0).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }
}
