//! Integration tests: one binary, one module per feature, all against the real
//! Kafka and Redis that `scripts/stack up` starts. Each test has its own topic,
//! consumer group and key prefix, so they run in parallel on one stack.

mod helpers;

mod connections;
mod consumer_group;
mod create_and_get;
mod dead_letter;
mod go_compat;
mod health;
mod hostile_wire;
mod idempotency;
mod metrics;
mod partition_map;
mod ping_policy;
mod producer_watchdog;
mod progress;
mod redis_loss;
mod replica_reads;
mod restart;
mod secrets;
mod sentinel;
mod shutdown;
mod stack_round_trip;
mod sweep;
mod tls;
mod traces;
mod untrusted;
mod user_cache;
mod validation;
