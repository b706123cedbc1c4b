//! The projector: a Kafka consumer-group member that keeps the Redis read model.
//!
//! Guarantee: at-least-once delivery, effectively once in Redis. A batch is
//! fetched, applied to Redis by one atomic Lua call that also advances the
//! applied position per partition (so a replay is skipped), and only then are
//! its offsets stored for librdkafka's auto-commit, as in rdkafka's
//! `at_least_once` example. A crash between apply and commit replays events
//! that change nothing. If Redis fails, nothing is stored or committed and the
//! batch is retried with back-off until Redis returns or the service stops.
//!
//! Limit: a Redis outage longer than `max.poll.interval.ms` (5 min) makes this
//! member leave the group; it rejoins when it polls again and resumes from the
//! committed offsets.

mod state;

pub use state::{ProjectorState, ProjectorStats};

use crate::{
    cache::{ApplyOp, RedisStore},
    domain::UserCreated,
    kafka::{EventPublisher, KafkaError, consumer_config},
};
use futures::FutureExt;
use rdkafka::{
    ClientContext, Message,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{Header, OwnedHeaders, OwnedMessage},
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Errors that stop the projector before it starts.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("cannot create the Kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
}

/// What the projector needs; built by `startup`.
pub struct Projector {
    pub brokers: String,
    pub group: String,
    pub topic: String,
    pub dlq_topic: String,
    pub batch_size: usize,
    pub store: RedisStore,
    /// Used for the dead-letter topic only.
    pub publisher: EventPublisher,
    pub state: Arc<ProjectorState>,
}

/// Keeps [`ProjectorState`]'s view of the assignment current and logs
/// rebalances; librdkafka's auto-commit commits the stored offsets of revoked
/// partitions itself.
struct ProjectorContext {
    state: Arc<ProjectorState>,
}

impl ClientContext for ProjectorContext {}

impl ConsumerContext for ProjectorContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) | Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let assigned = matches!(rebalance, Rebalance::Assign(_));
                tracing::info!(?parts, assigned, "rebalance");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        if let Ok(tpl) = consumer.assignment() {
            self.state
                .set_assignment(tpl.elements().iter().map(|e| e.partition()).collect());
        }
    }
}

impl Projector {
    /// Consumes until `token` is cancelled, then commits what it applied and
    /// leaves the group.
    pub async fn run(self, token: CancellationToken) -> Result<(), ProjectorError> {
        let consumer: StreamConsumer<ProjectorContext> =
            consumer_config(&self.brokers, &self.group).create_with_context(ProjectorContext {
                state: self.state.clone(),
            })?;
        consumer.subscribe(&[&self.topic])?;
        tracing::info!(topic = %self.topic, group = %self.group, "projector started");

        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(self.batch_size);
        let mut consecutive_errors = 0u32;
        loop {
            let first = tokio::select! {
                _ = token.cancelled() => break,
                m = consumer.recv() => m,
            };
            match first {
                Ok(m) => batch.push(m.detach()),
                Err(e) => {
                    consecutive_errors += 1;
                    // Kafka going away shows here; health reports it, logs stay calm.
                    if consecutive_errors == 1 || consecutive_errors.is_power_of_two() {
                        tracing::warn!(error = %e, consecutive_errors, "consumer error");
                    }
                    continue;
                }
            }
            consecutive_errors = 0;
            // Take whatever else is already fetched, without waiting.
            while batch.len() < self.batch_size {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m.detach()),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if !self.process(&consumer, &batch, &token).await {
                break; // cancelled before the batch was applied: not stored, will replay
            }
            batch.clear();
        }

        // Commit what was applied, then leave the group (dropping the consumer
        // closes it). Both block, so they run off the async workers.
        let consumer = Arc::new(consumer);
        let c = consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            match c.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => tracing::info!("committed applied offsets"),
                Err(e) => tracing::debug!(error = %e, "final commit (nothing to commit?)"),
            }
            c.unsubscribe();
        })
        .await;
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        self.state.set_assignment(Default::default());
        tracing::info!("projector stopped");
        Ok(())
    }

    /// Applies one batch and stores its offsets. Returns false if cancelled
    /// before Redis took it.
    async fn process(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        batch: &[OwnedMessage],
        token: &CancellationToken,
    ) -> bool {
        let mut ops = Vec::with_capacity(batch.len());
        let mut dead = 0u64;
        for m in batch {
            let user = match UserCreated::decode(m.key(), m.payload()) {
                Ok(event) => Some(event.user),
                Err(reason) => {
                    if !self.dead_letter(m, &reason.to_string(), token).await {
                        return false;
                    }
                    dead += 1;
                    None
                }
            };
            ops.push(ApplyOp {
                partition: m.partition(),
                offset: m.offset(),
                user,
            });
        }

        let mut backoff = Duration::from_millis(50);
        let outcome = loop {
            match self.store.apply(&ops).await {
                Ok(outcome) => break outcome,
                Err(e) => {
                    self.state.record_apply_failure();
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot apply batch to Redis");
                    tokio::select! {
                        _ = token.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };

        // The last offset of each partition in the batch: stored so the next
        // auto-commit (or the final one) commits it.
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for op in &ops {
            last.insert(op.partition, op.offset);
        }
        for (&partition, &offset) in &last {
            // rd_kafka_offset_store stores offset + 1, the next to read. It fails
            // for a partition revoked meanwhile; its new owner replays harmlessly.
            if let Err(e) = consumer.store_offset(&self.topic, partition, offset) {
                tracing::debug!(partition, offset, error = %e, "offset not stored");
            }
        }
        self.state.record_batch(outcome, dead, &last);
        tracing::debug!(
            records = ops.len(),
            applied = outcome.applied,
            duplicates = outcome.duplicates,
            skipped = outcome.skipped,
            dead_lettered = dead,
            "batch applied"
        );
        true
    }

    /// Sends an undecodable record to the dead-letter topic, with the reason
    /// and its origin in headers; retries until it lands or the service stops.
    async fn dead_letter(&self, m: &OwnedMessage, reason: &str, token: &CancellationToken) -> bool {
        tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, "dead-lettering record");
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "dlq.reason",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "dlq.topic",
                    value: Some(m.topic()),
                })
                .insert(Header {
                    key: "dlq.partition",
                    value: Some(&m.partition().to_string()),
                })
                .insert(Header {
                    key: "dlq.offset",
                    value: Some(&m.offset().to_string()),
                })
                .insert(Header {
                    key: "dlq.group",
                    value: Some(&self.group),
                });
            let sent: Result<_, KafkaError> = self
                .publisher
                .publish_raw(&self.dlq_topic, m.key(), m.payload(), headers)
                .await;
            match sent {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish to the dead-letter topic");
                    tokio::select! {
                        _ = token.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
