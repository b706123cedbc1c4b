//! The Redis adapter. Redis holds a projection of the log and nothing else:
//! everything here can be rebuilt by replaying the topic, and the checkpoint
//! says which part of the log it reflects.
//!
//! - [`connection`]: one server, a bb8 pool, Sentinel's master, or a Redis
//!   Cluster; timeouts.
//! - [`keys`]: every key name; a partition's keys share one hash tag.
//! - [`read_model`]: field `<id>` of the bucket hash `{<topic>:<p>}users:<b>`
//!   (the user, the position of the event that created it and its request
//!   id), written by the projector's apply script; `user-request:{<request
//!   id>}`, a guard index.
//! - [`checkpoint`]: `{<topic>:<p>}checkpoint` (partition p's last applied
//!   offset and, while it is replayed from the start, its rebuild target),
//!   written with the data; `projection:<topic>:partition-map`.
//! - [`checkpoint_watch`]: one poller per instance that tells waiting calls
//!   when the checkpoint passes their position.
//! - [`verdicts`]: the local projector's verdicts, handed to the creates
//!   waiting for them in process (no poll, no read-back).
//! - [`user_cache`]: users in process memory, in front of the read model
//!   (users never change, so a decided user is cached for good).

mod checkpoint;
mod checkpoint_watch;
mod connection;
mod error;
mod keys;
mod read_model;
mod user_cache;
mod verdicts;

pub use checkpoint::{Checkpoints, Opened, PartitionState};
pub use checkpoint_watch::{CheckpointWatch, WaitError};
pub use connection::{RedisAuth, RedisClientKind, RedisStore, RedisTarget};
pub use error::StoreError;
pub use keys::{Keys, UserSlot};
pub use read_model::{ADVISED_LISTPACK_VALUE, ApplyOp, ApplyOutcome, ApplyResult, StoredUser};
pub use user_cache::{CachedUser, UserCache};
pub use verdicts::{Decided, Expect, Verdicts};
