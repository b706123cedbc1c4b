//! The Redis adapter: the read model the projector writes and GetUser reads,
//! and the command side's reservations.
//!
//! Keys (all behind the configurable prefix):
//! - `user_<id>`: the user as JSON, the Go service's cache key and value;
//! - `projection:<topic>:applied`: hash partition → offset of the last applied
//!   event, written in the same Lua call as the users it covers;
//! - `user-id-reserved:<id>`: an id taken by a CreateUser (the uniqueness guard);
//! - `user-request:<request id>`: a request id's answer, for idempotent retries;
//! - `user-id-seq`: the counter behind service-assigned ids.

mod error;
mod store;

pub use error::CacheError;
pub use store::{
    ApplyOp, ApplyOutcome, Keys, RedisClientKind, RedisStore, RedisTarget, Reservation,
    StoredAnswer,
};
