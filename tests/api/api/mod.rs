//! The gRPC contract as a caller meets it (src/api): creates and reads, validation,
//! idempotency, the bounds every untrusted call has, health and the progress stream.

mod create_and_get;
mod health;
mod idempotency;
mod progress;
mod sweep;
mod untrusted;
mod validation;
