//! The Redis read model (src/store): rebuilt after a loss, behind Sentinel, read
//! from replicas, cached in process.

mod redis_loss;
mod replica_reads;
pub(crate) mod sentinel;
mod user_cache;
