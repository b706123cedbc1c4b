//! A CQRS user service: commands become events on Kafka, queries are answered
//! from a Redis read model that a projector keeps up to date.
//!
//! # Layout
//!
//! Read this list first, then [`startup::Application`], which wires it all.
//!
//! - [`proto`]: the generated gRPC contract (`proto/user/v1/user.proto`).
//! - [`api`]: gRPC handlers. They decode requests, validate them into domain
//!   types, call the adapters and map every error to a `tonic::Status`. Also the
//!   `grpc.health.v1` service, which follows the health protocol's spec.
//! - [`domain`]: the user, its `UserCreated` event and the validated value types
//!   (`UserId`, `UserName`, `Email`). No I/O.
//! - [`kafka`]: the Kafka adapter: the shared idempotent producer, topic
//!   creation, and the consumer configuration the projector uses.
//! - [`cache`]: the Redis adapter: the read model (users and the applied
//!   position per partition, written in one atomic step) and the command side's
//!   id and request-id reservations; one server or behind Sentinel.
//! - [`projector`]: the consumer-group loop: fetch, apply to Redis idempotently,
//!   then store the offset for commit (at-least-once, effectively once in Redis).
//! - [`progress`]: the consumer group's progress per partition (committed
//!   offset, log end, lag, Burrow-like status), read from Kafka by one shared
//!   poller per watched group, for `ProjectionService`.
//! - [`config`]: flags and environment variables (`KAFKA_BROKER_URL`,
//!   `REDIS_SERVER_URL`, ...).
//! - [`startup`]: `Application::build` binds the listener and starts the server,
//!   the projector and the dependency probe under one cancellation token.
//! - [`telemetry`]: `tracing` set-up (`RUST_LOG`, text or JSON).

pub mod api;
pub mod command;
pub mod config;
pub mod domain;
pub mod kafka;
pub mod progress;
pub mod projector;
pub mod proto;
pub mod startup;
pub mod store;
pub mod telemetry;
