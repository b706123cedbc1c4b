//! The whole service as operators run it (src/startup, src/telemetry): drain on
//! SIGTERM, metrics, traces, the README's round trip, secrets on secured links.

mod metrics;
mod secrets;
mod shutdown;
mod stack_round_trip;
mod traces;
