//! Consumer-group progress, as `kafka-consumer-groups --describe` and Burrow
//! report it, for the `ProjectionService` RPCs.
//!
//! - [`kafka_reader`]: one poll of Kafka (committed offsets, watermarks, the
//!   group's members and assignments);
//! - [`history`]: figures over time (lag in seconds, rate, status);
//! - [`hub`]: one shared poller per watched group, many watchers; for the
//!   service's own group it also reads the read model's checkpoint in Redis.

pub mod history;
pub mod hub;
pub mod kafka_reader;
pub mod model;

pub use hub::{OwnProjection, ProgressHub, Subscription, WatchError};
pub use kafka_reader::ProgressError;
pub use model::{
    GroupState, Member, PartitionProgress, PartitionStatus, ReadModelPosition, Snapshot, Totals,
};
