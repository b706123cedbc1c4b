//! A CQRS user service: commands become events on Kafka, queries are answered
//! from a Redis read model that a projector keeps up to date.
//!
//! # Layout
//!
//! Read this list first, then [`startup::Application`], which wires it all.
//! The modules are in layers, each importing only the layers below it
//! (docs/design.md, "Architecture"; checked by `tests/layers.rs`).
//!
//! - [`proto`]: the generated gRPC contract (`proto/user/v1/user.proto`).
//! - [`api`]: gRPC handlers. They decode requests, validate them into domain
//!   types, call the adapters and map every error to a `tonic::Status`. Also the
//!   `grpc.health.v1` service, which follows the health protocol's spec.
//! - [`domain`]: the user, its `UserCreated` event (this service's format and
//!   the article's Go service's, read alike) and the validated value types
//!   (`UserId`, `UserName`, `Email`). No I/O.
//! - [`command`]: CreateUser's command: choose the id, publish, and answer
//!   with the log's verdict as the read model shows it.
//! - [`kafka`]: the Kafka adapter: the shared idempotent producer, topic
//!   creation, the topic's partition map read from the log, the consumer configuration the projector uses, and the
//!   watchdog that replaces a librdkafka client cut off from its cluster.
//! - [`move_topic`]: `user-service move-topic`, the move of a topic's users
//!   to a new topic with more partitions (a topic's partition map is fixed).
//! - [`store`]: the Redis adapter, a projection of the log and nothing else:
//!   the read model (users, request ids) and its checkpoint (the last applied
//!   offset per partition, rebuilds), written in one atomic step; one server,
//!   a pool, behind Sentinel, or a Redis Cluster (keys tagged per partition),
//!   with reads from replicas when asked.
//! - [`projector`]: the consumer-group loop: resume from the read model's
//!   checkpoint, fetch, re-home the Go service's events that sit outside their
//!   id's partition, apply to Redis (fenced, idempotently), then store the
//!   offset for commit.
//! - [`progress`]: the consumer group's progress per partition (committed
//!   offset, log end, lag, Burrow-like status), read from Kafka by one shared
//!   poller per watched group, for `ProjectionService`.
//! - [`config`]: flags and environment variables (`KAFKA_BROKER_URL`,
//!   `REDIS_SERVER_URL`, ...).
//! - [`startup`]: `Application::build` binds the listener and starts the server,
//!   the projector and the dependency probe under one cancellation token;
//!   beside it, the `/metrics` endpoint and its scrape-time collector.
//! - [`tasks`]: every task the service starts, tracked and joined at
//!   shutdown; a panic in any of them stops the service.
//! - [`telemetry`]: logs (`RUST_LOG`, text or JSON), Prometheus metrics,
//!   traces propagated from the call through Kafka to the projector. A leaf:
//!   it imports nothing of the crate, every layer records through it.
//! - [`transport`]: the connection level: connection caps, gRPC over TLS or
//!   mutual TLS (certificates reloaded on change), the HTTP/2 frame watcher
//!   (client pings, silent and idle connections); and, for the tools'
//!   clients, whether a failed call failed on its connection.

pub mod api;
pub mod command;
pub mod config;
pub mod domain;
pub mod kafka;
pub mod move_topic;
pub mod progress;
pub mod projector;
pub mod proto;
pub mod retry;
pub mod startup;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod transport;
