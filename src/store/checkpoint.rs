//! The read model's checkpoint, kept beside the data it describes: per
//! partition, the offset of the last applied event, and while a partition is
//! replayed from the start, the log end it must reach (its rebuild target).
//!
//! A projector resumes from here, not from Kafka's committed offsets, so a
//! Redis that lost its data (restart without persistence, FLUSHALL, a
//! failover to a replica that had not caught up) is rebuilt from the log by
//! itself; the committed offsets stay for the progress stream and the tools.

use super::{RedisStore, StoreError, read_model::decode};
use crate::domain::{PartitionMap, UserId};
use std::{collections::HashMap, sync::atomic::Ordering};

/// What the read model can say about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// No checkpoint: no projector has opened the partition since Redis
    /// started empty (or lost its data). Absence proves nothing.
    Unknown,
    /// Replaying from the start; absence proves nothing until `target`.
    Rebuilding { checkpoint: i64, target: i64 },
    /// Every event up to `checkpoint` is applied: absence means absent.
    Complete { checkpoint: i64 },
}

impl PartitionState {
    fn from_parts(checkpoint: Option<i64>, target: Option<i64>) -> Self {
        match (checkpoint, target) {
            (None, _) => Self::Unknown,
            (Some(checkpoint), Some(target)) if checkpoint < target - 1 => {
                Self::Rebuilding { checkpoint, target }
            }
            (Some(checkpoint), _) => Self::Complete { checkpoint },
        }
    }

    /// The offset of the last applied event, if any is known.
    pub fn checkpoint(self) -> Option<i64> {
        match self {
            Self::Unknown => None,
            Self::Rebuilding { checkpoint, .. } | Self::Complete { checkpoint } => Some(checkpoint),
        }
    }

    /// Whether an absent user is really absent (up to the checkpoint).
    pub fn is_complete(self) -> bool {
        matches!(self, Self::Complete { .. })
    }
}

/// Checkpoints and rebuild targets of the partitions read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoints {
    pub applied: HashMap<i32, i64>,
    pub rebuild: HashMap<i32, i64>,
}

impl Checkpoints {
    pub fn state(&self, partition: i32) -> PartitionState {
        PartitionState::from_parts(
            self.applied.get(&partition).copied(),
            self.rebuild.get(&partition).copied(),
        )
    }
}

/// Where a projector resumes a partition it was just given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Offset of the last applied event; -1 when nothing is.
    pub checkpoint: i64,
    /// Set when the partition is being replayed from the start.
    pub rebuild_target: Option<i64>,
    /// The highest offset whose copy to its id's partition was acknowledged
    /// (an article's event re-homed; -1: none): a replay does not copy those
    /// again.
    pub rehomed: i64,
}

impl RedisStore {
    /// Returns where to resume `partition`. If the read model holds nothing
    /// for it, or a checkpoint below `floor` (the highest offset known to
    /// have been applied before; -1 for none), records "rebuilding until
    /// `log_end` (or `floor`)" first.
    pub async fn open_partition(
        &self,
        partition: i32,
        log_end: i64,
        floor: i64,
    ) -> Result<Opened, StoreError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            let (checkpoint, target, rehomed): (String, String, String) = self
                .scripts
                .open
                .key(self.keys.checkpoint(partition))
                .arg(log_end)
                .arg(floor)
                .invoke_async(&mut conn)
                .await?;
            Ok(Opened {
                checkpoint: checkpoint.parse().map_err(|_| {
                    StoreError::Protocol(format!("checkpoint {checkpoint:?} is not an offset"))
                })?,
                rebuild_target: target.parse().ok(),
                rehomed: rehomed.parse().unwrap_or(-1),
            })
        })
        .await
    }

    /// The checkpoint and rebuild target of each of `partitions`: one small
    /// read per partition (each lives in its own hash slot), concurrently.
    pub async fn checkpoints(
        &self,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Result<Checkpoints, StoreError> {
        self.timed(async {
            let reads = partitions.into_iter().map(|p| async move {
                let mut conn = self.conn().await?;
                let (applied, rebuild): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                    .arg(self.keys.checkpoint(p))
                    .arg("applied")
                    .arg("rebuild")
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, StoreError>((p, applied, rebuild))
            });
            let mut out = Checkpoints::default();
            for r in futures::future::join_all(reads).await {
                let (p, applied, rebuild) = r?;
                if let Some(a) = applied {
                    out.applied.insert(p, a);
                }
                if let Some(t) = rebuild {
                    out.rebuild.insert(p, t);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Every partition's checkpoint, if the partition count is known.
    pub async fn all_checkpoints(&self) -> Result<Checkpoints, StoreError> {
        match self.partition_count() {
            Some(n) => self.checkpoints(0..n).await,
            None => Ok(Checkpoints::default()),
        }
    }

    /// The user and what the read model can say about its partition, in one
    /// round trip (one hash slot); the state is read first, so a complete
    /// partition's answer covers everything up to its checkpoint.
    pub async fn lookup(
        &self,
        id: UserId,
        partition: i32,
    ) -> Result<(PartitionState, Option<super::StoredUser>), StoreError> {
        let (key, pipe) = self.lookup_pipe(id, partition);
        self.timed(async {
            let mut conn = self.conn().await?;
            let reply = pipe.query_async(&mut conn).await?;
            parse_lookup(&key, id, partition, reply)
        })
        .await
    }

    /// [`RedisStore::lookup`] on a replica, if replica reads are on and the
    /// replica's answer is good enough: it has applied `at_least` (an offset
    /// of the user's partition), and it knows the user or vouches for its
    /// absence. `None` sends the caller to the master (counted, like the
    /// replica's errors, which never fail the read).
    pub async fn lookup_on_replica(
        &self,
        id: UserId,
        partition: i32,
        at_least: Option<i64>,
    ) -> Option<(PartitionState, Option<super::StoredUser>)> {
        use std::sync::atomic::Ordering::Relaxed;
        let (key, pipe) = self.lookup_pipe(id, partition);
        let answer = match self.query_replica(&key, &pipe, 2).await? {
            Ok(reply) => parse_lookup(&key, id, partition, reply),
            Err(e) => Err(e),
        };
        let good = match answer {
            Ok((state, user)) => {
                let caught_up = at_least.is_none_or(|o| state.checkpoint() >= Some(o));
                (caught_up && (user.is_some() || state.is_complete())).then_some((state, user))
            }
            Err(e) => {
                tracing::debug!(error = %e, partition, "replica read failed; asking the master");
                None
            }
        };
        let counter = match good {
            Some(_) => &self.replica_counts.served,
            None => &self.replica_counts.fell_back,
        };
        counter.fetch_add(1, Relaxed);
        good
    }

    fn lookup_pipe(&self, id: UserId, partition: i32) -> (String, redis::Pipeline) {
        let slot = self.keys.user(id, partition);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.keys.checkpoint(partition))
            .arg("applied")
            .arg("rebuild")
            .cmd("HGET")
            .arg(&slot.key)
            .arg(&slot.field);
        (slot.key, pipe)
    }

    /// The topic's partition count as a broker last told this instance (the
    /// progress stream reads every partition's checkpoint).
    pub fn partition_count(&self) -> Option<i32> {
        Some(self.partitions.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    pub fn record_partition_count(&self, n: i32) {
        self.partitions.store(n, Ordering::Relaxed);
    }

    /// The partition map as an instance that read it from the log left it
    /// beside the read model (a copy: the log is the truth).
    pub async fn partition_map(&self) -> Result<Option<PartitionMap>, StoreError> {
        let key = self.keys.partition_map();
        let stored: Option<String> = self
            .timed(async {
                let mut conn = self.conn().await?;
                Ok(redis::cmd("GET").arg(&key).query_async(&mut conn).await?)
            })
            .await?;
        Ok(stored.as_deref().and_then(PartitionMap::from_stored))
    }

    /// Leaves the map read from the log beside the read model unless one is
    /// there already, and returns the one that was there (`None` if none
    /// was): an instance that finds another map there re-reads the log to
    /// learn which of the two is stale. Written on every probe, so a Redis
    /// that lost its data gets it back.
    pub async fn offer_partition_map(
        &self,
        map: PartitionMap,
    ) -> Result<Option<PartitionMap>, StoreError> {
        let key = self.keys.partition_map();
        let held: Option<String> = self
            .timed(async {
                let mut conn = self.conn().await?;
                Ok(redis::cmd("SET")
                    .arg(&key)
                    .arg(map.to_stored())
                    .arg("NX")
                    .arg("GET")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok(held.as_deref().and_then(PartitionMap::from_stored))
    }

    /// Replaces a stale copy of the map with the log's.
    pub async fn replace_partition_map(&self, map: PartitionMap) -> Result<(), StoreError> {
        let key = self.keys.partition_map();
        self.timed(async {
            let mut conn = self.conn().await?;
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(map.to_stored())
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }
}

type LookupReply = ((Option<i64>, Option<i64>), Option<String>);

fn parse_lookup(
    key: &str,
    id: UserId,
    partition: i32,
    ((checkpoint, target), raw): LookupReply,
) -> Result<(PartitionState, Option<super::StoredUser>), StoreError> {
    let user = raw.map(|r| decode(key, id, partition, &r)).transpose()?;
    Ok((PartitionState::from_parts(checkpoint, target), user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absence_counts_only_in_a_complete_partition() {
        assert_eq!(
            PartitionState::from_parts(None, None),
            PartitionState::Unknown
        );
        assert!(!PartitionState::from_parts(Some(3), Some(10)).is_complete());
        assert!(PartitionState::from_parts(Some(9), Some(10)).is_complete());
        assert!(PartitionState::from_parts(Some(-1), None).is_complete());
    }
}
