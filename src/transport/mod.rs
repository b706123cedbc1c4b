//! The connection level, under gRPC: how connections are accepted and held.
//!
//! - [`connections`]: `MAX_CONNECTIONS` and `TLS_MAX_HANDSHAKES`, caps on
//!   what is open or in flight, and the plaintext accept stream.
//! - [`tls`]: TLS and mutual TLS, certificates reloaded on change, bounded
//!   handshakes.
//! - [`ping_policy`]: the frame watcher around each accepted connection:
//!   client pings (GOAWAY `too_many_pings`), the preface deadline, idle
//!   connections.
//! - [`client`]: for the tools' clients, whether a failed call failed on its
//!   connection ([`is_transport_error`]).
//!
//! Nothing here knows a handler: what it counts goes to the telemetry leaf.

pub mod client;
pub mod connections;
pub mod ping_policy;
pub mod tls;

pub use client::is_transport_error;
