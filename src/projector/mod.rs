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
    domain::{
        EventFormat, EventPosition, MapRecord, MoveRecord, PartitionMap, User, UserCreated, UserId,
    },
    kafka::{
        EventPublisher, KafkaError, Routing, consumer_config,
        watchdog::{ClientHealth, Confirmations, cluster_reachable},
    },
    store::{ApplyOp, ApplyOutcome, ApplyResult, CheckpointWatch, Decided, RedisStore, Verdicts},
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
    pub link: crate::kafka::KafkaLink,
    pub group: String,
    pub topic: String,
    pub dlq_topic: String,
    pub batch_size: usize,
    pub store: RedisStore,
    /// Poked after each applied batch, so waiting calls see it at once.
    pub watch: Arc<CheckpointWatch>,
    /// How long the request index remembers a request id after its event.
    pub request_ttl: Duration,
    /// Used for the dead-letter topic only.
    pub publisher: EventPublisher,
    pub state: Arc<ProjectorState>,
    pub metrics: crate::telemetry::Metrics,
    /// The topic's partition map: an event outside its id's partition
    /// creates nothing (it is dead-lettered), so the projector starts only
    /// once the map is known.
    pub routing: Arc<Routing>,
    /// What each apply decided, handed to the creates of this instance that
    /// wait for it.
    pub verdicts: Arc<Verdicts>,
}

/// Keeps [`ProjectorState`]'s view of the assignment and of the group
/// membership current, and logs rebalances.
pub(crate) struct ProjectorContext {
    state: Arc<ProjectorState>,
    health: Arc<ClientHealth>,
    verdicts: Arc<Verdicts>,
}

impl ClientContext for ProjectorContext {
    /// librdkafka's own view of its brokers and of the group membership
    /// (`cgrp.state` "up" and `join_state` "steady"), which health reports
    /// and the watchdog reads.
    fn stats(&self, statistics: Statistics) {
        self.health.record(&statistics);
        if statistics.cgrp.is_some() {
            self.state.set_membership(self.health.in_group());
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::watchdog::log_error(&error, reason, "projector");
    }
}

impl ConsumerContext for ProjectorContext {
    /// The assignment follows the rebalance's own lists (cooperative
    /// rebalancing hands out and takes back increments); asking the consumer
    /// from inside its callback is avoided, it may be closing.
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) | Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let assigned = matches!(rebalance, Rebalance::Assign(_));
                tracing::info!(?parts, assigned, "rebalance");
                let mut now = self.state.assignment();
                for p in parts {
                    if assigned {
                        now.insert(p);
                        self.verdicts.own(p);
                    } else {
                        now.remove(&p);
                        self.verdicts.forget(p);
                    }
                }
                self.state.set_assignment(now);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// The header a re-homed copy carries: `<topic>:<partition>:<offset>` of the
/// record it copies.
pub const REHOMED_FROM: &str = "rehomed-from";

/// What one record of the topic is to the read model.
enum Record {
    /// A user's event in its id's partition: the rule over the log applies.
    /// `legacy`: in the article's format, reported if it creates nothing.
    Event { event: UserCreated, legacy: bool },
    /// An event of the article's Go service outside its id's partition (its
    /// writer spread records with kafka-go's `LeastBytes`, not by key): copied
    /// to `home`, where the rule applies to the copy; creates nothing here.
    Rehome { id: UserId, home: i32 },
    /// A partition map record, or a move record on the topic moved to: it
    /// creates nothing, the checkpoint passes it.
    Control,
    /// `move-topic` sealed this topic (its users moved to this topic):
    /// later events of the partition create nothing.
    Seal(String),
    /// Not applicable: sent to the dead-letter topic with this reason.
    Dead(String),
}

/// Decodes a record and checks it sits where the partition map puts its id.
/// This service's event elsewhere (written by a client that routed over the
/// topic's current count after partitions were added) creates nothing, in
/// every replay alike, since the map is a fact of the log. The article's
/// event elsewhere is where its writer's balancer put it: it is re-homed,
/// copied to its id's partition, as a Kafka Streams repartition does, so the
/// rule keeps one partition per id and the copy is in the log for every
/// replay (docs/design.md, "The article's events").
fn classify(m: &OwnedMessage, map: PartitionMap, topic: &str) -> Record {
    if let Some(decoded) = MapRecord::decode(m.key(), m.payload()) {
        return match decoded {
            Ok(_) => Record::Control,
            Err(e) => Record::Dead(e.to_string()),
        };
    }
    if let Some(decoded) = MoveRecord::decode(m.key(), m.payload()) {
        return match decoded {
            Ok(r) if r.from == topic => Record::Seal(r.to),
            Ok(_) => Record::Control,
            Err(e) => Record::Dead(e.to_string()),
        };
    }
    match UserCreated::decode_with_format(m.key(), m.payload()) {
        Ok((event, format)) => {
            let home = map.home(event.user.id);
            let legacy = format == EventFormat::Legacy;
            if home == m.partition() {
                Record::Event { event, legacy }
            } else if legacy {
                Record::Rehome {
                    id: event.user.id,
                    home,
                }
            } else {
                Record::Dead(format!(
                    "user {}'s events belong in partition {home} (the topic's partition map \
                     routes ids over {} partitions), not in partition {}",
                    event.user.id,
                    map.partitions,
                    m.partition()
                ))
            }
        }
        Err(reason) => Record::Dead(reason.to_string()),
    }
}

/// What became of a batch in [`Projector::process`].
enum Processed {
    /// In Redis, the cursors past it, its offsets stored for the commit.
    Applied,
    /// Redis' checkpoint was not the one this member resumed from (Redis
    /// lost data, or another member applied): nothing was stored, and the
    /// partitions resume from what Redis holds.
    Resumed,
    /// The service stopped first: nothing stored, the batch will replay.
    Cancelled,
}

/// A batch made ready for Redis by [`Projector::prepare`].
struct Prepared {
    ops: Vec<ApplyOp>,
    /// Per operation: an event written by the article's service.
    legacy: Vec<bool>,
    /// Per source partition, the highest offset copied to its id's partition.
    rehomed: BTreeMap<i32, i64>,
    /// Records sent to the dead-letter topic.
    dead: u64,
}

/// Redis applies: retried quickly, since waiting creates wait on them.
const APPLY_RETRY: crate::retry::Schedule =
    crate::retry::Schedule::new(Duration::from_millis(50), Duration::from_secs(2));
/// Records the projector writes to Kafka (copies, dead letters).
const SIDE_RETRY: crate::retry::Schedule =
    crate::retry::Schedule::new(Duration::from_millis(100), Duration::from_secs(5));

/// Why [`Projector::consume`] returned.
enum Ended {
    /// Shutdown: commit and leave the group.
    Stopped,
    /// The consumer is cut off from a cluster that is there: replace it.
    Wedged,
}

type Consumer_ = StreamConsumer<ProjectorContext>;

impl Projector {
    /// Indexes the request ids of the events that created users under a
    /// client-chosen id (a guard, best effort: see
    /// `RedisStore::remember_request`). All at once: the
    /// connection pipelines them, so a batch costs about one round trip
    /// instead of one per user, and its waiters are told that much sooner.
    async fn remember_requests(&self, created: &[&ApplyOp]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let ttl = self.request_ttl.as_secs().min(i64::MAX as u64 / 2) as i64;
        let writes = created.iter().filter_map(|op| {
            let (Some(user), Some(r)) = (&op.user, &op.request_id) else {
                return None;
            };
            // A user under an id derived from its request id is found from
            // the request id alone: no index (and no Redis memory) for it.
            if crate::domain::ids::is_derived(r, user.id) {
                return None;
            }
            let expires = user.created_at_ms.div_euclid(1000).saturating_add(ttl);
            (expires > now).then_some(async move {
                if let Err(e) = self.store.remember_request(r, user.id, expires).await {
                    tracing::warn!(error = %e, request_id = r.as_str(), "request id not indexed");
                }
            })
        });
        futures::future::join_all(writes).await;
    }

    /// Consumes until `token` is cancelled, then commits what it applied and
    /// leaves the group. A consumer that librdkafka leaves cut off from a
    /// reachable cluster (see [`crate::kafka::watchdog`]) is replaced by a new
    /// one, which joins the group and resumes from the read model's checkpoint.
    pub async fn run(self, token: CancellationToken) -> Result<(), ProjectorError> {
        let map = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            map = self.routing.known() => map,
        };
        tracing::info!(
            partitions = map.partitions,
            "partition map known: the projector starts"
        );
        loop {
            let health = Arc::new(ClientHealth::default());
            let consumer: Arc<Consumer_> = Arc::new(
                consumer_config(&self.link, &self.group).create_with_context(ProjectorContext {
                    state: self.state.clone(),
                    health: health.clone(),
                    verdicts: self.verdicts.clone(),
                })?,
            );
            consumer.subscribe(&[&self.topic])?;
            tracing::info!(topic = %self.topic, group = %self.group, "projector started");
            match self.consume(consumer.clone(), &health, map, &token).await {
                Ended::Stopped => {
                    self.leave(consumer).await;
                    return Ok(());
                }
                Ended::Wedged => {
                    tracing::warn!(
                        "the projector's consumer is cut off from a reachable cluster (librdkafka #5301): replacing it"
                    );
                    for p in self.state.assignment() {
                        self.verdicts.forget(p);
                    }
                    self.state.set_assignment(Default::default());
                    self.state.set_membership(false);
                    self.state.record_client_replaced();
                    // Closing a wedged consumer can block: let a thread do it.
                    std::thread::spawn(move || drop(consumer));
                }
            }
        }
    }

    /// Commits what was applied, then leaves the group (dropping the consumer
    /// closes it). Both block, so they run off the async workers.
    async fn leave(&self, consumer: Arc<Consumer_>) {
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
    }

    /// The consume loop of one consumer.
    async fn consume(
        &self,
        consumer: Arc<Consumer_>,
        health: &ClientHealth,
        map: PartitionMap,
        token: &CancellationToken,
    ) -> Ended {
        let mut confirmations = Confirmations::new(3);
        let mut last_wedge_check = tokio::time::Instant::now();
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
                _ = token.cancelled() => return Ended::Stopped,
                _ = verify.tick() => {
                    cursors.verify(&self.state).await;
                    if last_wedge_check.elapsed() >= Duration::from_secs(1) {
                        last_wedge_check = tokio::time::Instant::now();
                        if confirmations.check(self.looks_wedged(health).await) {
                            return Ended::Wedged;
                        }
                    }
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
            if !fresh.is_empty() {
                match self
                    .process(&consumer, &mut cursors, &fresh, map, token)
                    .await
                {
                    Processed::Applied | Processed::Resumed => {}
                    // Not stored: replayed by whoever resumes the partition.
                    Processed::Cancelled => return Ended::Stopped,
                }
            }
        }
    }

    /// No broker UP for 8 s, or the group handler not up for 20 s, while a
    /// fresh client reaches the cluster.
    async fn looks_wedged(&self, health: &ClientHealth) -> bool {
        let cut_off = health
            .no_broker_for()
            .is_some_and(|d| d > Duration::from_secs(8))
            || health
                .out_of_group_for()
                .is_some_and(|d| d > Duration::from_secs(20));
        if !cut_off {
            return false;
        }
        cluster_reachable(&self.link).await
    }

    /// Applies one batch and stores its offsets, in four steps: the records
    /// become operations (copies and dead letters sent first), each
    /// partition's operations go to Redis in one atomic call, the verdicts
    /// and side records follow, then the cursors and the offsets to commit.
    async fn process(
        &self,
        consumer: &Consumer_,
        cursors: &mut Cursors,
        batch: &[OwnedMessage],
        map: PartitionMap,
        token: &CancellationToken,
    ) -> Processed {
        // With tracing on, one span per record, child of the publish span its
        // headers carry; each ends once its batch is in Redis.
        let _spans = self.process_spans(batch);
        let Some(Prepared {
            ops,
            legacy,
            rehomed,
            dead,
        }) = self.prepare(batch, map, cursors, token).await
        else {
            return Processed::Cancelled;
        };
        let expected = cursors.expected(ops.iter().map(|o| o.position.partition));
        // Tests make this panic (FAILPOINTS=projector-apply=panic) to check
        // that a panicking task stops the service with a non-zero exit; on a
        // user's event, so that the service starts first (the partition map's
        // record is the first record applied).
        if ops.iter().any(|op| op.user.is_some()) {
            fail::fail_point!("projector-apply");
        }

        // One atomic script per partition: a partition's keys share a hash
        // slot, a batch's partitions may not (Redis Cluster).
        let mut by_partition: BTreeMap<i32, (Vec<ApplyOp>, Vec<bool>)> = BTreeMap::new();
        for (op, &legacy) in ops.iter().zip(&legacy) {
            let (part_ops, part_legacy) = by_partition.entry(op.position.partition).or_default();
            part_ops.push(op.clone());
            part_legacy.push(legacy);
        }
        let mut outcome = ApplyOutcome::default();
        let mut created = Vec::new();
        let mut superseded = Vec::new();
        for (&partition, (part_ops, part_legacy)) in &by_partition {
            let resumed_from = expected.get(&partition).copied().unwrap_or(-1);
            let applied = match self
                .apply_partition(
                    partition,
                    part_ops,
                    resumed_from,
                    rehomed.get(&partition).copied(),
                    token,
                )
                .await
            {
                None => return Processed::Cancelled,
                Some(ApplyResult::Moved { checkpoint, .. }) => {
                    tracing::warn!(
                        partition,
                        redis = ?checkpoint,
                        resumed_from,
                        "the read model's checkpoint moved (Redis lost data, or another member applied): resuming from Redis"
                    );
                    self.state.record_checkpoint_moved();
                    // Partitions applied before this one are resumed
                    // from Redis too: past what they just applied.
                    cursors.forget(expected.keys().copied());
                    self.watch.poke();
                    return Processed::Resumed;
                }
                Some(ApplyResult::Applied(o)) => o,
            };
            outcome.applied += applied.applied;
            outcome.duplicates += applied.duplicates;
            outcome.skipped += applied.skipped;
            self.hand_verdicts(partition, part_ops, &applied.created);
            created.extend(applied.created.iter().filter_map(|e| part_ops.get(*e)));
            // The article's events past the checkpoint that created nothing.
            superseded.extend(
                part_ops
                    .iter()
                    .zip(part_legacy)
                    .enumerate()
                    .filter(|(i, (op, legacy))| {
                        **legacy
                            && op.user.is_some()
                            && op.position.offset > resumed_from
                            && !applied.created.contains(i)
                    })
                    .map(|(_, (op, _))| op),
            );
        }
        self.remember_requests(&created).await;
        self.report_superseded(&superseded).await;
        self.watch.poke();
        let last = Self::advance(consumer, &self.topic, cursors, &ops, &rehomed);
        self.state.record_batch(outcome.clone(), dead, &last);
        tracing::debug!(
            records = ops.len(),
            applied = outcome.applied,
            duplicates = outcome.duplicates,
            skipped = outcome.skipped,
            dead_lettered = dead,
            "batch applied"
        );
        Processed::Applied
    }

    /// One `process` span per record when tracing is on (none otherwise).
    fn process_spans(&self, batch: &[OwnedMessage]) -> Vec<tracing::Span> {
        if !crate::telemetry::trace::enabled() {
            return Vec::new();
        }
        batch
            .iter()
            .map(|m| {
                crate::telemetry::trace::process_span(
                    m.headers(),
                    &self.topic,
                    m.partition(),
                    m.offset(),
                )
            })
            .collect()
    }

    /// The batch as operations for Redis. The copies go first (a partition's
    /// checkpoint passes an event only once its copy is in its id's
    /// partition), and the records that apply nowhere go to the dead-letter
    /// topic. `None` if the service stops first.
    async fn prepare(
        &self,
        batch: &[OwnedMessage],
        map: PartitionMap,
        cursors: &Cursors,
        token: &CancellationToken,
    ) -> Option<Prepared> {
        let records: Vec<Record> = batch
            .iter()
            .map(|m| classify(m, map, &self.topic))
            .collect();
        let rehomed = self.rehome(batch, &records, cursors, token).await?;
        let mut prepared = Prepared {
            ops: Vec::with_capacity(batch.len()),
            legacy: Vec::with_capacity(batch.len()),
            rehomed,
            dead: 0,
        };
        for (m, record) in batch.iter().zip(records) {
            let position = EventPosition {
                partition: m.partition(),
                offset: m.offset(),
            };
            prepared
                .legacy
                .push(matches!(record, Record::Event { legacy: true, .. }));
            let (user, request_id, sealed_to) = match record {
                Record::Event { event, .. } => (Some(event.user), event.request_id, None),
                Record::Rehome { .. } | Record::Control => (None, None, None),
                Record::Seal(to) => {
                    tracing::warn!(
                        partition = m.partition(),
                        offset = m.offset(),
                        moved_to = %to,
                        "the topic's users moved to another topic: later events here create nothing"
                    );
                    (None, None, Some(to))
                }
                Record::Dead(reason) => {
                    if !self.dead_letter(m, &reason, token).await {
                        return None;
                    }
                    prepared.dead += 1;
                    (None, None, None)
                }
            };
            prepared.ops.push(ApplyOp {
                position,
                user,
                request_id,
                sealed_to,
            });
        }
        Some(prepared)
    }

    /// One partition's operations in one atomic call, retried while Redis
    /// fails; `None` if the service stops first.
    async fn apply_partition(
        &self,
        partition: i32,
        ops: &[ApplyOp],
        resumed_from: i64,
        rehomed: Option<i64>,
        token: &CancellationToken,
    ) -> Option<ApplyResult> {
        crate::retry::until_done(
            token,
            APPLY_RETRY,
            || async {
                let began = std::time::Instant::now();
                let result = self
                    .store
                    .apply(partition, ops, resumed_from, rehomed)
                    .await;
                if let Ok(ApplyResult::Applied(o)) = &result {
                    self.metrics.projector_applied(
                        partition,
                        ops.len(),
                        o.applied,
                        began.elapsed(),
                    );
                }
                result
            },
            |e, retry_in| {
                self.state.record_apply_failure();
                tracing::warn!(partition, error = %e, ?retry_in, "cannot apply batch to Redis");
            },
        )
        .await
    }

    /// Hands this instance's waiting creates what the apply decided. Only
    /// "created" is a verdict; anything else sends the waiting create to
    /// read the user from Redis.
    fn hand_verdicts(&self, partition: i32, ops: &[ApplyOp], created: &[usize]) {
        let last = ops.last().map_or(-1, |op| op.position.offset);
        self.verdicts.decided(
            partition,
            last,
            ops.iter().enumerate().map(|(i, op)| {
                let d = if created.binary_search(&i).is_ok() {
                    Decided::Created
                } else {
                    Decided::NotCreated
                };
                (op.position.offset, d)
            }),
        );
    }

    /// Moves each partition's cursor past the batch and stores the offsets,
    /// so the next auto-commit (or the final one) commits them. Returns the
    /// last offset of each partition: the new checkpoint.
    fn advance(
        consumer: &Consumer_,
        topic: &str,
        cursors: &mut Cursors,
        ops: &[ApplyOp],
        rehomed: &BTreeMap<i32, i64>,
    ) -> BTreeMap<i32, i64> {
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for op in ops {
            last.insert(op.position.partition, op.position.offset);
        }
        for (&partition, &offset) in &last {
            cursors.advance(partition, offset, rehomed.get(&partition).copied());
            // rd_kafka_offset_store stores offset + 1, the next to read. It fails
            // for a partition revoked meanwhile; its new owner resumes from Redis.
            if let Err(e) = consumer.store_offset(topic, partition, offset) {
                tracing::debug!(partition, offset, error = %e, "offset not stored");
            }
        }
        last
    }

    /// Copies the article's events that sit outside their id's partition to
    /// it, key and value unchanged, with a [`REHOMED_FROM`] header, and waits
    /// for the brokers' acknowledgements; those at or below the partition's
    /// `rehomed` mark were copied by an earlier pass and are not copied again
    /// (a copy made twice creates nothing the second time: the first wins in
    /// the home partition). Retries until every copy lands; `None` if the
    /// service stops first (the batch is then not applied, and replayed).
    /// Returns, per source partition, the highest offset copied now.
    async fn rehome(
        &self,
        batch: &[OwnedMessage],
        records: &[Record],
        cursors: &Cursors,
        token: &CancellationToken,
    ) -> Option<BTreeMap<i32, i64>> {
        let mut pending: Vec<(&OwnedMessage, UserId, i32)> = batch
            .iter()
            .zip(records)
            .filter_map(|(m, r)| match *r {
                Record::Rehome { id, home } if !cursors.rehomed(m.partition(), m.offset()) => {
                    Some((m, id, home))
                }
                _ => None,
            })
            .collect();
        let mut copied = BTreeMap::new();
        let mut delays = SIDE_RETRY.delays();
        while !pending.is_empty() {
            // Queued in log order (an idempotent producer keeps it per
            // partition), acknowledged together.
            let sends = pending.iter().map(|&(m, _, home)| async move {
                let origin = format!("{}:{}:{}", m.topic(), m.partition(), m.offset());
                let headers = OwnedHeaders::new().insert(Header {
                    key: REHOMED_FROM,
                    value: Some(&origin),
                });
                self.publisher
                    .publish_raw(&self.topic, Some(home), m.key(), m.payload(), headers)
                    .await
            });
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            let mut error = None;
            for (entry, result) in pending.into_iter().zip(results) {
                let (m, id, home) = entry;
                match result {
                    Ok(at) => {
                        tracing::debug!(
                            user_id = %id,
                            partition = m.partition(),
                            offset = m.offset(),
                            home,
                            copy_offset = at.offset,
                            "re-homed an event of the article's service to its id's partition"
                        );
                        self.state.record_rehomed(1);
                        let high = copied.entry(m.partition()).or_insert(m.offset());
                        *high = (*high).max(m.offset());
                    }
                    Err(e) => {
                        error = Some(e);
                        failed.push(entry);
                    }
                }
            }
            pending = failed;
            if let Some(e) = error {
                let retry_in = delays.next().unwrap_or(SIDE_RETRY.max);
                tracing::warn!(error = %e, left = pending.len(), ?retry_in, "cannot re-home events to their ids' partitions");
                if !crate::retry::pause(token, retry_in).await {
                    return None;
                }
            }
        }
        Some(copied)
    }

    /// Reports the article's events that created nothing because their id
    /// was already taken by a different user: the Go service's read model
    /// (last write wins) and this one (first wins) disagree on that id. The
    /// same user again (a retried write, a copy made twice) is not reported.
    async fn report_superseded(&self, ops: &[&ApplyOp]) {
        let checks = ops.iter().filter_map(|op| {
            let user: &User = op.user.as_ref()?;
            Some(async move {
                let winner = self.store.get_user(user.id, op.position.partition).await;
                (op, user, winner)
            })
        });
        for (op, user, winner) in futures::future::join_all(checks).await {
            let winner = match winner {
                Ok(Some(w)) if &w.user == user => continue,
                // Created nothing for another reason (a sealed partition).
                Ok(None) => continue,
                Ok(Some(w)) => w
                    .position()
                    .map(|p| format!("{}:{}", p.partition, p.offset)),
                Err(e) => Some(format!("unknown ({e})")),
            };
            self.state.record_legacy_superseded();
            tracing::warn!(
                user_id = %user.id,
                partition = op.position.partition,
                offset = op.position.offset,
                winner = winner.as_deref().unwrap_or("?"),
                "an event of the article's Go service created nothing: user {} was already \
                 created by an earlier event (here the first event of an id wins; the Go \
                 service's read model kept the last)",
                user.id
            );
        }
    }

    /// Sends an undecodable record to the dead-letter topic, with the reason
    /// and its origin in headers; retries until it lands or the service stops.
    async fn dead_letter(&self, m: &OwnedMessage, reason: &str, token: &CancellationToken) -> bool {
        tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, "dead-lettering record");
        let sent = crate::retry::until_done(
            token,
            SIDE_RETRY,
            || {
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
                self.publisher
                    .publish_raw(&self.dlq_topic, None, m.key(), m.payload(), headers)
            },
            |e: &KafkaError, retry_in| {
                tracing::warn!(error = %e, ?retry_in, "cannot publish to the dead-letter topic");
            },
        )
        .await;
        sent.is_some()
    }
}
