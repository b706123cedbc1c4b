//! The metrics endpoint: `GET /metrics` on its own port (`METRICS_ADDR`),
//! off the gRPC port so a mesh can leave it out of its traffic rules. At each
//! scrape the figures the service keeps for itself are copied in first
//! ([`Sources::collect`]). It reads every part (the call budget, health, the
//! projector, progress, the store, the producer), so it lives beside the
//! wiring; telemetry, which every part records through, imports none of them.

use crate::{
    api::{health::HealthRegistry, limit::CallBudget},
    kafka::{Routing, watchdog::ClientHealth},
    progress::{PartitionStatus, ProgressHub},
    projector::ProjectorState,
    store::{CheckpointWatch, RedisStore, UserCache},
    telemetry::Metrics,
};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Where the scrape-time figures come from.
#[derive(Clone)]
pub struct Sources {
    pub metrics: Metrics,
    pub calls: CallBudget,
    pub health: Arc<HealthRegistry>,
    pub projector: Option<Arc<ProjectorState>>,
    pub progress: Arc<ProgressHub>,
    pub store: RedisStore,
    pub watch: Arc<CheckpointWatch>,
    pub producer: Arc<ClientHealth>,
    pub users: UserCache,
    pub routing: Arc<Routing>,
}

impl Sources {
    /// Copies the service's own figures into the metrics.
    pub async fn collect(&self) {
        let m = &self.metrics;
        m.gauge("grpc_server_in_flight_calls", &[])
            .set(self.calls.in_flight() as f64);
        m.counter("user_service_calls_shed_total", &[])
            .absolute(self.calls.refused());
        for (name, serving) in self.health.statuses() {
            m.gauge("user_service_health_serving", &[("service", &name)])
                .set(f64::from(u8::from(serving)));
        }
        let (served, fell_back) = self.store.replica_read_counts();
        if self.store.reads_from_replicas() {
            m.counter(
                "user_service_redis_replica_reads_total",
                &[("outcome", "served")],
            )
            .absolute(served);
            m.counter(
                "user_service_redis_replica_reads_total",
                &[("outcome", "master")],
            )
            .absolute(fell_back);
        }
        m.gauge("user_service_partition_map_partitions", &[])
            .set(f64::from(self.routing.map().map_or(0, |m| m.partitions)));
        m.gauge("user_service_topic_partitions", &[])
            .set(f64::from(self.routing.topic_partitions().unwrap_or(0)));
        m.gauge("user_service_topic_partitions_unused", &[])
            .set(f64::from(self.routing.unused_partitions()));
        m.counter("user_service_checkpoint_polls_total", &[])
            .absolute(self.watch.polls());
        if let Some((entries, bytes)) = self.users.size() {
            let (hits, misses) = self.users.counts();
            m.counter(
                "user_service_user_cache_lookups_total",
                &[("outcome", "hit")],
            )
            .absolute(hits);
            m.counter(
                "user_service_user_cache_lookups_total",
                &[("outcome", "miss")],
            )
            .absolute(misses);
            m.gauge("user_service_user_cache_entries", &[])
                .set(entries as f64);
            m.gauge("user_service_user_cache_bytes", &[])
                .set(bytes as f64);
        }
        m.counter(
            "user_service_kafka_client_replacements_total",
            &[("client", "producer")],
        )
        .absolute(self.producer.replacements());
        if let Some(figures) = self.producer.figures() {
            m.gauge("kafka_producer_queue_messages", &[])
                .set(figures.queue_messages as f64);
            m.gauge("kafka_producer_queue_bytes", &[])
                .set(figures.queue_bytes as f64);
            for (broker, rtt) in &figures.rtt {
                m.gauge("kafka_producer_broker_rtt_seconds", &[("broker", broker)])
                    .set(rtt.as_secs_f64());
            }
        }
        if let Some(state) = &self.projector {
            let s = state.stats();
            m.counter("user_service_projector_events_duplicate_total", &[])
                .absolute(s.duplicates);
            m.counter("user_service_projector_events_replayed_total", &[])
                .absolute(s.skipped);
            m.counter("user_service_projector_dead_lettered_total", &[])
                .absolute(s.dead_lettered);
            m.counter("user_service_projector_events_rehomed_total", &[])
                .absolute(s.rehomed);
            m.counter("user_service_projector_legacy_superseded_total", &[])
                .absolute(s.legacy_superseded);
            m.counter("user_service_projector_apply_failures_total", &[])
                .absolute(s.apply_failures);
            m.counter("user_service_projector_checkpoint_moves_total", &[])
                .absolute(s.checkpoint_moves);
            m.counter("user_service_projector_rebalances_total", &[])
                .absolute(s.rebalances);
            m.counter(
                "user_service_kafka_client_replacements_total",
                &[("client", "projector")],
            )
            .absolute(state.client_replacements());
            m.gauge("user_service_projector_assigned_partitions", &[])
                .set(s.assignment.len() as f64);
            m.gauge("user_service_projector_in_group", &[])
                .set(f64::from(u8::from(s.in_group)));
        }
        // The progress RPC's own snapshot of the service's group and topic
        // (the shared poller's newest): lag in records and seconds.
        let hub = &self.progress;
        let subscribed = tokio::time::timeout(
            Duration::from_secs(5),
            hub.subscribe(hub.own_group(), hub.own_topic(), Duration::from_secs(1)),
        )
        .await;
        if let Ok(Ok((_subscription, snapshot))) = subscribed {
            let mut rebuilding = 0;
            for p in &snapshot.partitions {
                let partition = p.partition.to_string();
                let labels = [("partition", partition.as_str())];
                m.gauge("user_service_projection_lag_records", &labels)
                    .set(p.lag as f64);
                m.gauge("user_service_projection_lag_seconds", &labels)
                    .set(p.lag_seconds);
                m.gauge("user_service_projection_log_end_offset", &labels)
                    .set(p.log_end as f64);
                if let Some(c) = p.committed {
                    m.gauge("user_service_projection_committed_offset", &labels)
                        .set(c as f64);
                }
                if p.status == PartitionStatus::Rebuilding {
                    rebuilding += 1;
                }
            }
            m.gauge("user_service_projection_partitions_rebuilding", &[])
                .set(f64::from(rebuilding));
        }
    }
}

async fn scrape(State(sources): State<Sources>) -> impl IntoResponse {
    sources.collect().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sources.metrics.render(),
    )
}

/// Serves `/metrics` on `listener` until `token` is cancelled, and keeps the
/// histograms drained meanwhile.
pub async fn serve(listener: tokio::net::TcpListener, sources: Sources, token: CancellationToken) {
    let upkeep = {
        let metrics = sources.metrics.clone();
        let token = token.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = every.tick() => metrics.upkeep(),
                }
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(sources);
    let server = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned());
    let (served, ()) = tokio::join!(server, upkeep);
    if let Err(e) = served {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
