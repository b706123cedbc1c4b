//! The connections under the calls (src/transport, src/api/connections): limits on
//! connections, hostile HTTP/2, the ping policy, TLS.

mod connections;
mod hostile_wire;
mod ping_policy;
mod tls;
