//! The projector: a Kafka consumer-group member that keeps the Redis read model.
//!
//! The read model's checkpoint lives in Redis beside the data (see
//! [`crate::store`]), as Kafka Connect sinks and Kafka Streams' state stores
//! keep theirs: when this member is given a partition it resumes from the
//! offset Redis says was applied last, not from Kafka's committed offset. A
//! Redis that lost its data has no checkpoint, so the partition is replayed
//! from the start of the log, by itself.
//!
//! A batch is applied by one atomic Lua call that also advances the
//! checkpoint and that first checks the checkpoint is still the one this
//! member resumed from (a fence: if Redis lost its data meanwhile, or another
//! member applied during a rebalance, nothing is written and the partition is
//! resumed again from what Redis holds). Only then are the offsets stored for
//! librdkafka's auto-commit, as in rdkafka's `at_least_once` example: Kafka's
//! committed offsets follow the read model, for the progress stream and for
//! the tools people point at the group. If Redis fails, nothing is stored or
//! committed and the batch is retried with back-off.

mod partitions;
mod state;

pub use state::{ProjectorState, ProjectorStats};

use crate::{
    domain::{EventPosition, UserCreated},
    kafka::{EventPublisher, KafkaError, consumer_config},
    store::{ApplyOp, ApplyResult, CheckpointWatch, RedisStore},
};
use futures::FutureExt;
use partitions::Cursors;
use rdkafka::{
    ClientContext, Message, Statistics,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{Header, OwnedHeaders, OwnedMessage},
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// How often the projector checks that Redis still holds the checkpoint it
/// resumed from: a Redis that lost its data, or went back in time in a
/// failover, is found within this, and its partitions marked as rebuilding.
const VERIFY_INTERVAL: Duration = Duration::from_millis(100);

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
    /// Poked after each applied batch, so waiting calls see it at once.
    pub watch: Arc<CheckpointWatch>,
    /// How long the read model remembers a request id after its event.
    pub request_ttl: Duration,
    /// Used for the dead-letter topic only.
    pub publisher: EventPublisher,
    pub state: Arc<ProjectorState>,
}

/// Keeps [`ProjectorState`]'s view of the assignment and of the group
/// membership current, and logs rebalances.
pub(crate) struct ProjectorContext {
    state: Arc<ProjectorState>,
}

impl ClientContext for ProjectorContext {
    /// librdkafka's own view of the group membership (`cgrp.state` "up" and
    /// `join_state` "steady"), which health reports.
    fn stats(&self, statistics: Statistics) {
        if let Some(cgrp) = statistics.cgrp {
            self.state
                .set_membership(cgrp.state == "up" && cgrp.join_state == "steady");
        }
    }
}

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

type Consumer_ = StreamConsumer<ProjectorContext>;

impl Projector {
    /// Consumes until `token` is cancelled, then commits what it applied and
    /// leaves the group.
    pub async fn run(self, token: CancellationToken) -> Result<(), ProjectorError> {
        let consumer: Arc<Consumer_> = Arc::new(
            consumer_config(&self.brokers, &self.group).create_with_context(ProjectorContext {
                state: self.state.clone(),
            })?,
        );
        consumer.subscribe(&[&self.topic])?;
        tracing::info!(topic = %self.topic, group = %self.group, "projector started");

        let mut cursors = Cursors::new(consumer.clone(), self.topic.clone(), self.store.clone());
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(self.batch_size);
        let mut consecutive_errors = 0u32;
        let mut verify = tokio::time::interval(VERIFY_INTERVAL);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Partitions given or taken since the last round; resume the new
            // ones from the read model's checkpoint.
            cursors
                .sync(&self.state.stats().assignment, &self.state)
                .await;
            let first = tokio::select! {
                _ = token.cancelled() => break,
                _ = verify.tick() => {
                    cursors.verify(&self.state).await;
                    continue;
                }
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
            let fresh: Vec<OwnedMessage> = batch
                .drain(..)
                .filter(|m| cursors.admit(m.partition(), m.offset()))
                .collect();
            if !fresh.is_empty() && !self.process(&consumer, &mut cursors, &fresh, &token).await {
                break; // cancelled before the batch was applied: not stored, will replay
            }
        }

        // Commit what was applied, then leave the group (dropping the consumer
        // closes it). Both block, so they run off the async workers.
        drop(cursors);
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
        consumer: &Consumer_,
        cursors: &mut Cursors,
        batch: &[OwnedMessage],
        token: &CancellationToken,
    ) -> bool {
        let mut ops = Vec::with_capacity(batch.len());
        let mut dead = 0u64;
        for m in batch {
            let position = EventPosition {
                partition: m.partition(),
                offset: m.offset(),
            };
            let (user, request_id) = match UserCreated::decode(m.key(), m.payload()) {
                Ok(event) => (Some(event.user), event.request_id),
                Err(reason) => {
                    if !self.dead_letter(m, &reason.to_string(), token).await {
                        return false;
                    }
                    dead += 1;
                    (None, None)
                }
            };
            ops.push(ApplyOp {
                position,
                user,
                request_id,
            });
        }
        let expected = cursors.expected(ops.iter().map(|o| o.position.partition));

        let mut backoff = Duration::from_millis(50);
        let outcome = loop {
            match self.store.apply(&ops, &expected, self.request_ttl).await {
                Ok(ApplyResult::Applied(outcome)) => break outcome,
                Ok(ApplyResult::Moved {
                    partition,
                    checkpoint,
                }) => {
                    tracing::warn!(
                        partition,
                        redis = ?checkpoint,
                        resumed_from = ?expected.get(&partition),
                        "the read model's checkpoint moved (Redis lost data, or another member applied): resuming from Redis"
                    );
                    self.state.record_checkpoint_moved();
                    cursors.forget(expected.keys().copied());
                    return true;
                }
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
        self.watch.poke();

        // The last offset of each partition in the batch: the new checkpoint,
        // and stored so the next auto-commit (or the final one) commits it.
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for op in &ops {
            last.insert(op.position.partition, op.position.offset);
        }
        for (&partition, &offset) in &last {
            cursors.advance(partition, offset);
            // rd_kafka_offset_store stores offset + 1, the next to read. It fails
            // for a partition revoked meanwhile; its new owner resumes from Redis.
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
