//! `user-service move-topic --to <new> --partitions <n>`: spreads the users
//! over more partitions by moving them to a new topic, rebuilt from the old
//! log, with no acknowledged user lost or doubled and reads going on.
//!
//! A topic's partition map is fixed for its life (see
//! [`crate::domain::partition_map`]), so growing means a new topic. The move,
//! step by step, each a record in a log (docs/design.md, "Moving to a new
//! topic"):
//!
//! 1. The new topic is made with the new count; its first record (partition
//!    0) is a [`MoveRecord`]: while no map follows it, no instance may record
//!    a map on it, so none can route a create there before the copy is done.
//! 2. Every event the old topic's rule applies (a valid `UserCreated` in its
//!    id's partition by the old map) is copied, bytes unchanged, to its id's
//!    partition by the new map. An id's events all sit in one old partition,
//!    are read in order and sent in order (idempotent producer), so the first
//!    of each id stays the first: the new log elects the same users.
//! 3. Every partition of the old topic is sealed with a [`MoveRecord`]: its
//!    later events create nothing (the projector's rule), so a create an old
//!    instance publishes after the seal answers UNAVAILABLE, and its retry
//!    (same request id, same id) goes to the new topic.
//! 4. What was appended between step 2's read and the seals is copied.
//! 5. The new topic's partition map is recorded: instances on it start routing.
//!
//! Reads go on throughout: the old instances keep serving the old read model,
//! which holds every user acknowledged before the seals. Creates answer
//! UNAVAILABLE (retryable) from the seals until the instances run on the new
//! topic. Instances may start on it once the move has marked it (step 1):
//! they wait for its map. Not before: an instance that finds no topic makes
//! it and records a map, and the move then refuses the topic.

use crate::{
    domain::{MapRecord, MoveRecord, PartitionMap, UserCreated},
    kafka::{KafkaError, KafkaLink, ensure_topics, partition_map::read_map},
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use std::{collections::BTreeMap, time::Duration};

/// How many sends are awaited together while copying.
const WINDOW: usize = 5_000;

/// Why a move did not happen (or stopped; running it again is safe only on a
/// new, empty target: see the design notes).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0} has no partition map: run the service on it once first")]
    NoMap(String),
    #[error("{0} already holds records: a move needs a new, empty topic")]
    TargetNotEmpty(String),
    #[error("the target topic must differ from the source")]
    SameTopic,
    #[error("partitions must be 1 to {max}", max = crate::domain::partition_map::MAX_PARTITIONS)]
    BadCount,
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

impl From<rdkafka::error::KafkaError> for MoveError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        MoveError::Kafka(KafkaError::Client(e))
    }
}

/// What a move did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveReport {
    /// The old topic's map and the new one's.
    pub from_map: PartitionMap,
    pub to_map: PartitionMap,
    /// Events copied to the new topic.
    pub copied: u64,
    /// Records not copied: they create nothing in the old topic (dead
    /// letters, misplaced events, control records, events after a seal).
    pub skipped: u64,
    /// Each old partition's seal offset.
    pub seals: BTreeMap<i32, i64>,
}

/// The settings of one move.
pub struct Move {
    pub link: KafkaLink,
    pub from: String,
    pub to: String,
    pub partitions: i32,
    pub replication: i32,
    pub timeout: Duration,
}

impl Move {
    /// Runs the move (see the module's doc). Blocking Kafka calls run off the
    /// async workers.
    pub async fn run(self) -> Result<MoveReport, MoveError> {
        if self.from == self.to {
            return Err(MoveError::SameTopic);
        }
        if !(1..=crate::domain::partition_map::MAX_PARTITIONS).contains(&self.partitions) {
            return Err(MoveError::BadCount);
        }
        let from_map = {
            let (link, from, timeout) = (self.link.clone(), self.from.clone(), self.timeout);
            blocking(move || read_map(&link, &from, None, timeout.max(Duration::from_secs(60))))
                .await??
                .ok_or_else(|| MoveError::NoMap(self.from.clone()))?
        };
        let existing = {
            let (link, to, timeout) = (self.link.clone(), self.to.clone(), self.timeout);
            blocking(move || records_in(&link, &to, timeout)).await??
        };
        if existing > 0 {
            return Err(MoveError::TargetNotEmpty(self.to.clone()));
        }
        ensure_topics(
            &self.link,
            &[&self.to, &format!("{}.dlq", self.to)],
            self.partitions,
            self.replication,
            self.timeout,
        )
        .await?;
        let producer: FutureProducer = self
            .link
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", self.timeout.as_millis().to_string())
            .create()?;
        let to_map = PartitionMap {
            partitions: self.partitions,
            offset: 0,
        };
        let marker = MoveRecord::new(&self.from, &self.to).to_json();
        let at = self
            .send(
                &producer,
                &self.to,
                0,
                crate::domain::partition_map::MOVE_KEY,
                &marker,
                None,
            )
            .await?;
        tracing::info!(to = %self.to, offset = at, "the new topic is marked as being filled");

        // 2. Copy up to the log ends seen now.
        let ends = {
            let (link, from, timeout) = (self.link.clone(), self.from.clone(), self.timeout);
            blocking(move || watermarks(&link, &from, timeout)).await??
        };
        let starts: BTreeMap<i32, i64> = ends.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let highs: BTreeMap<i32, i64> = ends.iter().map(|(p, (_, high))| (*p, *high)).collect();
        let mut report = MoveReport {
            from_map,
            to_map,
            copied: 0,
            skipped: 0,
            seals: BTreeMap::new(),
        };
        let mut sealed = BTreeMap::new();
        self.copy(
            &producer,
            from_map,
            to_map,
            &starts,
            &highs,
            &mut sealed,
            &mut report,
        )
        .await?;
        tracing::info!(
            copied = report.copied,
            "copied the old topic up to its ends"
        );

        // 3. Seal every old partition.
        let seal = MoveRecord::new(&self.from, &self.to).to_json();
        for &p in highs.keys() {
            let offset = self
                .send(
                    &producer,
                    &self.from,
                    p,
                    crate::domain::partition_map::MOVE_KEY,
                    &seal,
                    None,
                )
                .await?;
            report.seals.insert(p, offset);
        }
        tracing::info!(seals = ?report.seals, "sealed the old topic");

        // 4. What was appended before the seals.
        let tail_ends: BTreeMap<i32, i64> = report.seals.iter().map(|(p, o)| (*p, o + 1)).collect();
        self.copy(
            &producer,
            from_map,
            to_map,
            &highs,
            &tail_ends,
            &mut sealed,
            &mut report,
        )
        .await?;

        // 5. The new topic's map: from now on it takes creates.
        let map_json = MapRecord::new(self.partitions).to_json();
        let offset = self
            .send(
                &producer,
                &self.to,
                0,
                crate::domain::partition_map::MAP_KEY,
                &map_json,
                None,
            )
            .await?;
        report.to_map.offset = offset;
        tracing::info!(
            to = %self.to,
            partitions = self.partitions,
            copied = report.copied,
            skipped = report.skipped,
            "move done: the new topic's partition map is recorded"
        );
        Ok(report)
    }

    /// Sends one record to `partition` and waits for it; its offset.
    async fn send(
        &self,
        producer: &FutureProducer,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<i64, MoveError> {
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .partition(partition);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        producer
            .send(record, Timeout::After(self.timeout))
            .await
            .map(|d| d.offset)
            .map_err(|(e, _)| {
                MoveError::Kafka(KafkaError::Unavailable(format!("writing to {topic}: {e}")))
            })
    }

    /// Copies the events of each old partition from `from[p]` up to (not
    /// including) `until[p]` that the old rule applies, to their partition by
    /// the new map; stops a partition at its first seal.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        producer: &FutureProducer,
        from_map: PartitionMap,
        to_map: PartitionMap,
        from: &BTreeMap<i32, i64>,
        until: &BTreeMap<i32, i64>,
        sealed: &mut BTreeMap<i32, i64>,
        report: &mut MoveReport,
    ) -> Result<(), MoveError> {
        let consumer: BaseConsumer = self
            .link
            .client_config()
            .set("group.id", "user-service-move-topic")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut left: BTreeMap<i32, i64> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for (&p, &start) in from {
            let end = until.get(&p).copied().unwrap_or(start);
            if end > start && !sealed.contains_key(&p) {
                tpl.add_partition_offset(&self.from, p, Offset::Offset(start))?;
                left.insert(p, end);
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        consumer.assign(&tpl)?;
        let mut pending = Vec::with_capacity(WINDOW);
        let mut idle_since = std::time::Instant::now();
        while !left.is_empty() {
            // Never blocks: the queue is read while a thread of librdkafka's fills it.
            let m = match consumer.poll(Duration::ZERO) {
                None => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if idle_since.elapsed() > self.timeout.max(Duration::from_secs(30)) {
                        return Err(MoveError::Kafka(KafkaError::Unavailable(format!(
                            "reading {}: no records for {:?} with partitions {:?} unfinished",
                            self.from,
                            idle_since.elapsed(),
                            left.keys().collect::<Vec<_>>()
                        ))));
                    }
                    continue;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "reading the old topic");
                    continue;
                }
                Some(Ok(m)) => m,
            };
            idle_since = std::time::Instant::now();
            let (p, offset) = (m.partition(), m.offset());
            let Some(&end) = left.get(&p) else { continue };
            if offset >= end {
                left.remove(&p);
                continue;
            }
            if offset + 1 >= end {
                left.remove(&p);
            }
            if let Some(Ok(seal)) = MoveRecord::decode(m.key(), m.payload())
                && seal.from == self.from
            {
                sealed.insert(p, offset);
                left.remove(&p);
                report.skipped += 1;
                continue;
            }
            let event = match UserCreated::decode(m.key(), m.payload()) {
                Ok(event) if from_map.home(event.user.id) == p => event,
                _ => {
                    report.skipped += 1;
                    continue;
                }
            };
            let target = to_map.home(event.user.id);
            let key = event.key();
            let origin = format!("{}:{p}:{offset}", self.from);
            let headers = OwnedHeaders::new().insert(Header {
                key: "moved-from",
                value: Some(&origin),
            });
            let payload = m.payload().unwrap_or_default().to_vec();
            let record = FutureRecord::to(&self.to)
                .key(&key)
                .payload(&payload)
                .partition(target)
                .headers(headers);
            // Queued in order; awaited a window at a time.
            let send = producer.send_result(record).map_err(|(e, _)| {
                MoveError::Kafka(KafkaError::Unavailable(format!("queueing a copy: {e}")))
            })?;
            pending.push(send);
            report.copied += 1;
            if pending.len() >= WINDOW {
                drain(&mut pending, &self.to).await?;
            }
        }
        drain(&mut pending, &self.to).await?;
        let _ = producer.flush(Timeout::After(self.timeout));
        Ok(())
    }
}

/// Waits for every queued copy; any failure stops the move.
async fn drain(
    pending: &mut Vec<rdkafka::producer::DeliveryFuture>,
    topic: &str,
) -> Result<(), MoveError> {
    for r in futures::future::join_all(pending.drain(..)).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                return Err(MoveError::Kafka(KafkaError::Unavailable(format!(
                    "copying to {topic}: {e}"
                ))));
            }
            Err(_) => {
                return Err(MoveError::Kafka(KafkaError::Unavailable(format!(
                    "copying to {topic}: the producer went away"
                ))));
            }
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, MoveError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        MoveError::Kafka(KafkaError::Unavailable(format!(
            "a Kafka call panicked: {e}"
        )))
    })
}

/// Each partition's (low, high) watermarks.
fn watermarks(
    link: &KafkaLink,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<i32, (i64, i64)>, MoveError> {
    let consumer: BaseConsumer = link
        .client_config()
        .set("group.id", "user-service-move-topic")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut out = BTreeMap::new();
    if let Some(t) = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
    {
        for p in t.partitions() {
            out.insert(p.id(), consumer.fetch_watermarks(topic, p.id(), timeout)?);
        }
    }
    Ok(out)
}

/// Records a topic holds (0 when it does not exist).
fn records_in(link: &KafkaLink, topic: &str, timeout: Duration) -> Result<i64, MoveError> {
    Ok(watermarks(link, topic, timeout)?
        .values()
        .map(|(low, high)| high - low)
        .sum())
}
