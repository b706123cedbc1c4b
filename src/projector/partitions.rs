//! [`Cursors`]: where this member is in each partition it owns, as the read
//! model's checkpoint says, and the seeks that put the consumer there.

use super::{Consumer_, ProjectorState};
use crate::store::RedisStore;
use rdkafka::{Offset, consumer::Consumer};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

/// Bound on the blocking Kafka calls made when a partition is opened.
const KAFKA_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// After this many seeks that did not take, a jump in offsets is accepted as
/// a gap in the log (transaction markers, or retention).
const MAX_RESEEKS: u8 = 3;

#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Offset of the last event applied to the read model (-1: none).
    checkpoint: i64,
    /// After a seek: the offset the next record must have.
    first: Option<i64>,
    /// The highest offset whose copy to its id's partition was acknowledged
    /// (-1: none), as the checkpoint keeps it: not copied again.
    rehomed: i64,
}

/// The partitions this member has opened, each with its cursor.
pub(super) struct Cursors {
    consumer: Arc<Consumer_>,
    topic: String,
    store: RedisStore,
    open: HashMap<i32, Cursor>,
    /// Seeks that did not take, per partition, since it was last applied.
    reseeks: HashMap<i32, u8>,
    /// The checkpoint a partition had when this member last let it go
    /// because Redis held another: what is known to have been applied.
    floors: HashMap<i32, i64>,
}

impl Cursors {
    pub(super) fn new(consumer: Arc<Consumer_>, topic: String, store: RedisStore) -> Self {
        Self {
            consumer,
            topic,
            store,
            open: HashMap::new(),
            reseeks: HashMap::new(),
            floors: HashMap::new(),
        }
    }

    /// Drops the partitions no longer assigned and opens the new ones. A
    /// partition that cannot be opened now (Kafka or Redis away) is tried
    /// again on the next round; its records are not applied meanwhile.
    pub(super) async fn sync(&mut self, assignment: &BTreeSet<i32>, state: &ProjectorState) {
        self.open.retain(|p, _| assignment.contains(p));
        for &partition in assignment {
            if !self.open.contains_key(&partition) {
                match self.open_one(partition).await {
                    Ok(cursor) => {
                        self.open.insert(partition, cursor);
                    }
                    Err(e) => {
                        state.record_apply_failure();
                        tracing::warn!(partition, error = %e, "cannot open partition yet");
                    }
                }
            }
        }
        state.set_checkpoints(self.open.iter().map(|(p, c)| (*p, c.checkpoint)).collect());
    }

    /// Reads the read model's checkpoint (recording "replay from the start"
    /// if it has none) and seeks the consumer just past it.
    async fn open_one(&self, partition: i32) -> Result<Cursor, String> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // The log's ends, and the group's committed offset: what some member
        // applied before (the committed offsets follow the read model), so a
        // Redis that went back in time is rebuilt, not trusted.
        let ((low, high), committed) = tokio::task::spawn_blocking(move || {
            let marks = consumer
                .fetch_watermarks(&topic, partition, KAFKA_CALL_TIMEOUT)
                .map_err(|e| format!("watermarks: {e}"))?;
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let committed = consumer
                .committed_offsets(tpl, KAFKA_CALL_TIMEOUT)
                .map_err(|e| format!("committed offsets: {e}"))?
                .find_partition(&topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            Ok::<_, String>((marks, committed))
        })
        .await
        .map_err(|e| e.to_string())??;
        let floor = committed
            .map(|c| c - 1)
            .into_iter()
            .chain(self.floors.get(&partition).copied())
            .max()
            .unwrap_or(-1)
            .min(high - 1);
        let opened = self
            .store
            .open_partition(partition, high, floor)
            .await
            .map_err(|e| e.to_string())?;
        let mut next = opened.checkpoint + 1;
        if next < low {
            tracing::error!(
                partition,
                next,
                log_start = low,
                "events the read model never applied were deleted from the log (retention): they are lost to it"
            );
            next = low;
        }
        let position = self.position(partition);
        if position != Some(next) {
            let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
            // A seek with a timeout waits until the fetcher moved, so no record
            // from the old position is delivered after it returns.
            tokio::task::spawn_blocking(move || {
                consumer.seek(&topic, partition, Offset::Offset(next), KAFKA_CALL_TIMEOUT)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("seek: {e}"))?;
        }
        tracing::info!(
            partition,
            checkpoint = opened.checkpoint,
            rebuild_target = ?opened.rebuild_target,
            consumer_position = ?position,
            "partition opened at the read model's checkpoint"
        );
        Ok(Cursor {
            checkpoint: opened.checkpoint,
            first: (position != Some(next) && next < high).then_some(next),
            rehomed: opened.rehomed,
        })
    }

    fn position(&self, partition: i32) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        match tpl.find_partition(&self.topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// Whether a fetched record is to be applied: its partition is open, it
    /// is past the checkpoint, and it is where a seek said the log resumes.
    pub(super) fn admit(&mut self, partition: i32, offset: i64) -> bool {
        let Some(cursor) = self.open.get_mut(&partition) else {
            return false;
        };
        if offset <= cursor.checkpoint {
            return false;
        }
        if let Some(first) = cursor.first {
            if offset > first {
                let tries = self.reseeks.entry(partition).or_default();
                if *tries < MAX_RESEEKS {
                    // The seek did not take (librdkafka may restart a fetch
                    // at the committed offset right after an assignment):
                    // open the partition again, which seeks again.
                    *tries += 1;
                    tracing::warn!(
                        partition,
                        offset,
                        expected = first,
                        "record past the resume point: seeking again"
                    );
                    self.open.remove(&partition);
                    return false;
                }
                tracing::warn!(
                    partition,
                    offset,
                    expected = first,
                    "gap in the log accepted"
                );
            }
            cursor.first = None;
        }
        true
    }

    /// The checkpoint each partition was resumed from, for the apply's fence.
    pub(super) fn expected(&self, partitions: impl Iterator<Item = i32>) -> BTreeMap<i32, i64> {
        partitions
            .filter_map(|p| self.open.get(&p).map(|c| (p, c.checkpoint)))
            .collect()
    }

    /// A batch was applied up to `offset`, its copies acknowledged up to
    /// `rehomed`.
    pub(super) fn advance(&mut self, partition: i32, offset: i64, rehomed: Option<i64>) {
        if let Some(c) = self.open.get_mut(&partition) {
            c.checkpoint = offset;
            c.rehomed = c.rehomed.max(rehomed.unwrap_or(-1));
        }
        self.reseeks.remove(&partition);
    }

    /// Whether the record at `offset` of `partition` was already copied to
    /// its id's partition (by this member or, as the checkpoint says, an
    /// earlier one).
    pub(super) fn rehomed(&self, partition: i32, offset: i64) -> bool {
        self.open
            .get(&partition)
            .is_some_and(|c| offset <= c.rehomed)
    }

    /// Reopen these partitions from Redis' checkpoint on the next round,
    /// remembering how far they were applied.
    pub(super) fn forget(&mut self, partitions: impl Iterator<Item = i32>) {
        for p in partitions {
            if let Some(c) = self.open.remove(&p) {
                let floor = self.floors.entry(p).or_insert(-1);
                *floor = (*floor).max(c.checkpoint);
            }
        }
    }

    /// Checks that Redis still holds the checkpoint of every open partition;
    /// reopens those where it does not (Redis lost its data while idle).
    pub(super) async fn verify(&mut self, state: &ProjectorState) {
        if self.open.is_empty() {
            return;
        }
        match self.store.checkpoints(self.open.keys().copied()).await {
            Ok(held) => {
                let moved: Vec<i32> = self
                    .open
                    .iter()
                    .filter(|(p, c)| held.applied.get(p) != Some(&c.checkpoint))
                    .map(|(p, _)| *p)
                    .collect();
                if !moved.is_empty() {
                    tracing::warn!(partitions = ?moved, "the read model no longer holds the checkpoint (Redis lost data?): resuming from Redis");
                    state.record_checkpoint_moved();
                    self.forget(moved.into_iter());
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot verify checkpoints"),
        }
    }
}
