//! The topic's partition map, learned from the log (the rule is in
//! [`crate::domain::partition_map`]): [`read_map`] finds the first map record
//! of partition 0, [`learn`] appends one when the log has none yet, and
//! [`Routing`] holds what this instance learned, beside the topic's current
//! partition count, for the command side, the readers and the projector.

use super::{EventPublisher, KafkaError, KafkaLink};
use crate::domain::{MapRecord, MoveRecord, PartitionMap};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError as RdError,
};
use std::{
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// What this instance knows of the routing: the map (fixed for the life of
/// the process once learned: the first record of a log never changes) and
/// the topic's partition count as the last probe saw it.
pub struct Routing {
    map: watch::Sender<Option<PartitionMap>>,
    topic_partitions: AtomicI32,
    /// Set when the log's map is not the one this instance routes with (the
    /// topic was deleted and made again under it): it must restart.
    superseded: std::sync::Mutex<Option<PartitionMap>>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            map: watch::Sender::new(None),
            topic_partitions: AtomicI32::new(0),
            superseded: std::sync::Mutex::new(None),
        }
    }
}

impl Routing {
    /// The map, once learned.
    pub fn map(&self) -> Option<PartitionMap> {
        *self.map.borrow()
    }

    /// Records the map read from the log. The first one stays: a different
    /// one later means the topic was made again under this instance, which
    /// then refuses to route (see [`Routing::refusal`]).
    pub fn set_map(&self, map: PartitionMap) {
        match self.map() {
            None => {
                self.map.send_replace(Some(map));
            }
            Some(held) if held == map => {}
            Some(held) => {
                tracing::error!(
                    held = %held.to_stored(),
                    log = %map.to_stored(),
                    "the topic's partition map is not the one this instance routes with \
                     (was the topic deleted and made again?): restart the instance"
                );
                *self.superseded.lock().expect("routing lock") = Some(map);
            }
        }
    }

    /// The map, waiting for it until `deadline` (it is learned at start-up,
    /// or by the health probe once a broker answers).
    pub async fn wait_map(&self, deadline: tokio::time::Instant) -> Option<PartitionMap> {
        let mut rx = self.map.subscribe();
        let known = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
        known.ok().and_then(|r| r.ok().and_then(|m| *m))
    }

    /// The map, waiting as long as it takes (select it against a shutdown).
    pub async fn known(&self) -> PartitionMap {
        let mut rx = self.map.subscribe();
        let known = rx.wait_for(Option::is_some).await.ok().and_then(|m| *m);
        match known {
            Some(map) => map,
            // The sender lives in self, so the channel cannot close first.
            None => std::future::pending().await,
        }
    }

    /// The topic's partition count as a broker last told this instance.
    pub fn set_topic_partitions(&self, n: i32) {
        self.topic_partitions.store(n, Ordering::Relaxed);
    }

    pub fn topic_partitions(&self) -> Option<i32> {
        Some(self.topic_partitions.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    /// Partitions of the topic that no id is routed to (added after the map
    /// was recorded): 0 when none or not known.
    pub fn unused_partitions(&self) -> i32 {
        match (self.map(), self.topic_partitions()) {
            (Some(map), Some(n)) => (n - map.partitions).max(0),
            _ => 0,
        }
    }

    /// Why the map cannot be honoured, if it cannot: the topic has fewer
    /// partitions than the map routes over, or the log's map changed under
    /// this instance. Each names what fixes it.
    pub fn refusal(&self) -> Option<String> {
        let map = self.map()?;
        if let Some(log) = *self.superseded.lock().expect("routing lock") {
            return Some(format!(
                "the topic's partition map changed under this instance (it routes over {} \
                 partitions, the log now says {}): the topic was made again; restart the instance",
                map.partitions, log.partitions
            ));
        }
        match self.topic_partitions() {
            Some(n) if n < map.partitions => Some(format!(
                "the topic has {n} partitions but its partition map (offset {} of partition 0) \
                 routes ids over {}: the topic was made again by hand with fewer partitions; \
                 restore it, or point KAFKA_TOPIC at a topic made by `user-service move-topic`",
                map.offset, map.partitions
            )),
            _ => None,
        }
    }
}

/// A consumer that reads partition 0 by assignment. librdkafka wants a group
/// id even so; nothing joins it and nothing is committed to it.
fn reader(link: &KafkaLink) -> Result<BaseConsumer, KafkaError> {
    Ok(link
        .client_config()
        .set("group.id", "user-service-partition-map")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .create()?)
}

/// The first map record of `topic`'s partition 0, reading from the start of
/// the partition (or, first, at `hint`, an offset where an earlier full read
/// found it). `None` when the partition holds none. Blocking: run it off the
/// async workers.
pub fn read_map(
    link: &KafkaLink,
    topic: &str,
    hint: Option<i64>,
    timeout: Duration,
) -> Result<Option<PartitionMap>, KafkaError> {
    let deadline = Instant::now() + timeout;
    let consumer = reader(link)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| KafkaError::Unavailable(format!("reading {topic}'s partition 0: {e}")))?;
    if high <= low {
        return Ok(None);
    }
    // Where an earlier read found it: a record there that is a map is the
    // first, since that read scanned everything before it.
    if let Some(at) = hint.filter(|o| (low..high).contains(o))
        && let Ok(Some(map)) = scan(&consumer, topic, at, Some(at), deadline)
    {
        return Ok(Some(map));
    }
    scan(&consumer, topic, low, None, deadline)
}

/// Reads partition 0 from `from` to its end (or to `last`), returning the
/// first map record. A topic that `move-topic` is still filling (its first
/// record says so, and no map follows yet) is an error: no instance may
/// record a map, and so route a create, before the move is done.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    from: i64,
    last: Option<i64>,
    deadline: Instant,
) -> Result<Option<PartitionMap>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let mut filling: Option<String> = None;
    let not_found = |filling: Option<String>| match filling {
        None => Ok(None),
        Some(from) => Err(KafkaError::Unavailable(format!(
            "topic {topic} is being filled from {from} by `user-service move-topic`: \
             it has no partition map until the move is done"
        ))),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KafkaError::Unavailable(format!(
                "{topic}'s partition map not read in time"
            )));
        }
        match consumer.poll(left.min(Duration::from_millis(200))) {
            None => {}
            Some(Err(RdError::PartitionEOF(_))) => return not_found(filling),
            Some(Err(e)) => tracing::debug!(error = %e, "reading the partition map"),
            Some(Ok(m)) => {
                if let Some(Ok(partitions)) = MapRecord::decode(m.key(), m.payload()) {
                    return Ok(Some(PartitionMap {
                        partitions,
                        offset: m.offset(),
                    }));
                }
                if let Some(Ok(r)) = MoveRecord::decode(m.key(), m.payload())
                    && r.to == topic
                {
                    filling = Some(r.from);
                }
                if last.is_some_and(|l| m.offset() >= l) {
                    return not_found(filling);
                }
            }
        }
    }
}

/// The topic's map: read from the log, or, if partition 0 holds none yet,
/// recorded with the topic's current partition count and read back (two
/// instances that both found none each append one; the first in the log is
/// the map for both). Written once in a topic's life, whoever made the topic:
/// this service, an older build, or the Go service.
pub async fn learn(
    link: &KafkaLink,
    publisher: &EventPublisher,
    topic: &str,
    hint: Option<i64>,
    timeout: Duration,
) -> Result<PartitionMap, KafkaError> {
    let read = |hint: Option<i64>| {
        let link = link.clone();
        let topic = topic.to_owned();
        async move {
            tokio::task::spawn_blocking(move || read_map(&link, &topic, hint, timeout))
                .await
                .map_err(|e| KafkaError::Unavailable(format!("partition map read panicked: {e}")))?
        }
    };
    if let Some(map) = read(hint).await? {
        return Ok(map);
    }
    let count = publisher.ping(timeout).await?;
    if count <= 0 {
        return Err(KafkaError::Unavailable(format!(
            "topic {topic} has no partitions yet"
        )));
    }
    let at = publisher.publish_map(count).await?;
    tracing::info!(
        topic,
        partitions = count,
        offset = at.offset,
        "recorded the topic's partition map"
    );
    read(None).await?.ok_or_else(|| {
        KafkaError::Unavailable(format!(
            "{topic}'s partition map not found after writing it"
        ))
    })
}
