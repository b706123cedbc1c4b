//! The read model's checkpoint, kept beside the data it describes: per
//! partition, the offset of the last applied event, and while a partition is
//! replayed from the start, the log end it must reach (its rebuild target).
//!
//! A projector resumes from here, not from Kafka's committed offsets, so a
//! Redis that lost its data (restart without persistence, FLUSHALL, a
//! failover to a replica that had not caught up) is rebuilt from the log by
//! itself; the committed offsets stay for the progress stream and the tools.

use super::{RedisStore, StoreError, read_model::decode};
use crate::domain::UserId;
use std::collections::HashMap;

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

/// Every partition's checkpoint and rebuild target, read in one round trip.
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
            let (checkpoint, target): (String, String) = self
                .scripts
                .open
                .key(self.keys.checkpoint())
                .key(self.keys.rebuild())
                .arg(partition)
                .arg(log_end)
                .arg(floor)
                .invoke_async(&mut conn)
                .await?;
            Ok(Opened {
                checkpoint: checkpoint.parse().map_err(|_| {
                    StoreError::Protocol(format!("checkpoint {checkpoint:?} is not an offset"))
                })?,
                rebuild_target: target.parse().ok(),
            })
        })
        .await
    }

    /// Every partition's checkpoint and rebuild target.
    pub async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            let (applied, rebuild): (HashMap<i32, i64>, HashMap<i32, i64>) = redis::pipe()
                .hgetall(self.keys.checkpoint())
                .hgetall(self.keys.rebuild())
                .query_async(&mut conn)
                .await?;
            Ok(Checkpoints { applied, rebuild })
        })
        .await
    }

    /// The user and what the read model can say about its partition, in one
    /// round trip; the state is read first, so a complete partition's answer
    /// covers everything up to its checkpoint.
    pub async fn lookup(
        &self,
        id: UserId,
        partition: i32,
    ) -> Result<(PartitionState, Option<super::StoredUser>), StoreError> {
        let key = self.keys.user(id);
        self.timed(async {
            let mut conn = self.conn().await?;
            let (checkpoint, target, raw): (Option<i64>, Option<i64>, Option<String>) =
                redis::pipe()
                    .hget(self.keys.checkpoint(), partition)
                    .hget(self.keys.rebuild(), partition)
                    .get(&key)
                    .query_async(&mut conn)
                    .await?;
            let user = raw.map(|r| decode(&key, &r)).transpose()?;
            Ok((PartitionState::from_parts(checkpoint, target), user))
        })
        .await
    }
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
