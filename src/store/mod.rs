//! The Redis adapter. Redis holds a projection of the log and nothing else:
//! everything here can be rebuilt by replaying the topic, and the checkpoint
//! says which part of the log it reflects.
//!
//! - [`connection`]: one server, a bb8 pool, or Sentinel's master; timeouts.
//! - [`keys`]: every key name, behind the configurable prefix.
//! - [`read_model`]: `user_<id>` (the user and the position of the event that
//!   created it) and `user-request:<request id>` (the user its request
//!   created), written by the projector's apply script.
//! - [`checkpoint`]: `projection:<topic>:applied` (the last applied offset per
//!   partition) and `projection:<topic>:rebuild` (the log end a partition
//!   replayed from the start must reach), written with the data.
//! - [`checkpoint_watch`]: one poller per instance that tells waiting calls
//!   when the checkpoint passes their position.

mod checkpoint;
mod checkpoint_watch;
mod connection;
mod error;
mod keys;
mod read_model;

pub use checkpoint::{Checkpoints, Opened, PartitionState};
pub use checkpoint_watch::{CheckpointWatch, WaitError};
pub use connection::{RedisClientKind, RedisStore, RedisTarget};
pub use error::StoreError;
pub use keys::Keys;
pub use read_model::{ApplyOp, ApplyOutcome, ApplyResult, StoredUser};
