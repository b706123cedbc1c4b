//! What the workspace's tools, `faultcheck` (tools/faultcheck) and `loadgen`
//! (tools/loadgen), share: a few HTTP/2 connections per service instance
//! whose dead ones get replaced ([`pool`]), one retry loop with its pauses and
//! the rules a tool picks what to retry by ([`retry`]), and the gRPC health
//! check ([`health`]). The service's generated types and its test for a
//! transport error come from the `user-service` library.

pub mod health;
pub mod pool;
pub mod retry;
