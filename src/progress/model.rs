//! The progress figures, independent of Kafka's client and of protobuf.

use std::time::{Instant, SystemTime};

/// The group's state, as Kafka's DescribeGroups names it, folded to what an
/// operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Stable,
    Rebalancing,
    Empty,
    Dead,
    Unknown,
}

impl GroupState {
    /// From the broker's state name (`Stable`, `PreparingRebalance`, ...).
    pub fn from_kafka(state: &str) -> Self {
        match state {
            "Stable" => Self::Stable,
            "PreparingRebalance"
            | "CompletingRebalance"
            | "AwaitingSync"
            | "Assigning"
            | "Reconciling" => Self::Rebalancing,
            "Empty" => Self::Empty,
            "Dead" => Self::Dead,
            _ => Self::Unknown,
        }
    }
}

/// A member of the group and what it owns of the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    pub partitions: Vec<i32>,
}

/// What Kafka said about one partition at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPartition {
    pub partition: i32,
    /// The next offset the group will read; `None` if it never committed.
    pub committed: Option<i64>,
    pub log_start: i64,
    pub log_end: i64,
}

/// One poll of Kafka.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When, as shown to callers.
    pub time: SystemTime,
    /// When, for ordering and durations: wall-clock time can step.
    pub at: Instant,
    pub state: GroupState,
    pub members: Vec<Member>,
    pub partitions: Vec<RawPartition>,
}

/// What the read model's own checkpoint, kept in Redis beside the data, says
/// of one partition (the service's own group and topic only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadModelPosition {
    /// The next offset the read model will apply (last applied + 1).
    pub next: i64,
    /// Set while the partition is replayed from the start of the log (Redis
    /// lost its data, or never had it): the log end it must reach.
    pub rebuild_target: Option<i64>,
}

/// Burrow's verdict on a partition, plus the read model's own: see
/// `history::status` for the rules and their precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionStatus {
    Ok,
    Lagging,
    Stalled,
    /// No member owns the partition; wins over every other verdict.
    Stopped,
    /// The read model is replaying the partition from the log (Redis lost
    /// its data); wins over OK, LAGGING and STALLED.
    Rebuilding,
}

/// One partition's figures in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionProgress {
    pub partition: i32,
    pub committed: Option<i64>,
    /// Next offset after what this instance applied, for partitions it owns.
    pub applied: Option<i64>,
    /// The read model's checkpoint in Redis: the next offset it will apply
    /// (last applied + 1). `None` when Redis holds none for the partition, when
    /// it could not be read, or for a (group, topic) other than the service's.
    pub read_model_offset: Option<i64>,
    /// Set while the read model rebuilds the partition: the log end to reach.
    pub rebuild_target: Option<i64>,
    pub log_start: i64,
    pub log_end: i64,
    pub lag: i64,
    pub lag_seconds: f64,
    pub consume_rate: f64,
    pub owner: Option<Member>,
    pub status: PartitionStatus,
    pub last_commit_time: Option<SystemTime>,
    /// No id is routed here (a partition added after the topic's partition
    /// map was recorded); the service's own topic only.
    pub unused: bool,
}

/// Group-wide sums.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub total_lag: i64,
    pub max_lag: i64,
    pub max_lag_seconds: f64,
    pub total_lag_seconds: f64,
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub time: SystemTime,
    /// When the poll was taken, by the monotonic clock: snapshots are ordered
    /// and aged by it.
    pub taken: Instant,
    pub group: String,
    pub topic: String,
    pub state: GroupState,
    pub members: Vec<Member>,
    pub partitions: Vec<PartitionProgress>,
    pub totals: Totals,
}

impl Snapshot {
    /// The same snapshot with only `partitions` (all when empty); totals stay
    /// the group's.
    pub fn filtered(&self, partitions: &[i32]) -> Snapshot {
        let mut s = self.clone();
        if !partitions.is_empty() {
            s.partitions.retain(|p| partitions.contains(&p.partition));
        }
        s
    }
}
