//! Integration tests: one binary, all against the real Kafka and Redis that
//! `scripts/stack up` starts. Each test has its own topic, consumer group and
//! key prefix, so they run in parallel on one stack.
//!
//! A module per part of the service, as `src/` names them, so the tests of a
//! part are found by its name. `scripts/test` runs the binary three times:
//!
//! - whole, on one Redis server and one broker over plain links;
//! - on a Redis Cluster (`REDIS_CLUSTER_URLS`), the modules that read or write
//!   the read model, whose keys then spread over hash slots: `api`, `store`,
//!   `projector` and `kafka::partition_map` (the map's copy in Redis), with
//!   the ignored tests that need a cluster (`store::replica_reads`). Not
//!   `store::sentinel` (it starts servers of its own), `api::sweep` (its
//!   bounds do not depend on Redis' topology), `transport` or `service`;
//! - over secured links (`scripts/stack up --secure`: SASL_SSL to Kafka, TLS
//!   and an ACL user to Redis), the modules whose calls cross those links and
//!   would break if a client were set up wrong: a create and a read, health,
//!   the producer's watchdog and the partition map, the projector, Redis'
//!   loss and the cache, the drain and the README's round trip.
//!   `service::secrets` starts the secured stack itself, in the first run.

mod helpers;

mod api;
mod kafka;
mod projector;
mod service;
mod store;
mod transport;
