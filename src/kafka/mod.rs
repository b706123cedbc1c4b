//! The Kafka adapter (rdkafka over librdkafka).
//!
//! - [`EventPublisher`]: the one producer all CreateUser calls share:
//!   idempotent, acks=all, each record to its id's partition by the topic's
//!   partition map ([`partition_map`]), a short linger;
//! - [`ensure_topics`]: creates the topic and its dead-letter topic at start-up;
//! - [`consumer_config`]: the consumer-group settings of the projector.

mod admin;
mod error;
pub mod link;
pub mod log_end;
pub mod partition_map;
mod producer;
pub mod watchdog;

pub use admin::ensure_topics;
pub use error::KafkaError;
pub use link::{KafkaLink, LinkError, SaslMechanism, SecurityProtocol};
pub use log_end::Reach;
pub use partition_map::Routing;
pub use producer::{EventPublisher, Published};

use rdkafka::ClientConfig;

/// Settings of the projector's consumer, following rdkafka's at-least-once
/// example: offsets are stored by the code only once Redis holds an event's
/// effect, and the auto-committer commits only what was stored.
pub fn consumer_config(link: &KafkaLink, group: &str) -> ClientConfig {
    let mut c = link.client_config();
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Cooperative rebalancing: adding an instance moves only the partitions
        // it takes, the others keep flowing.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Measured both ways (docs/faults.md): a longer session rides out a
        // longer broker pause, but after a broker restart the group waits for
        // the old member's session before it settles (20 s: the first write
        // 19.5 s after a kill -9 and restart, against 9 s with 10 s). A member
        // that lost its session to a pause rejoins in about 10 s by itself,
        // and one that librdkafka leaves cut off is replaced (kafka::watchdog).
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
        // librdkafka's own view of the membership, for health (ClientContext::stats).
        .set("statistics.interval.ms", "1000")
        .set("client.id", client_id());
    c
}

/// `user-service@<host>`: shown by `kafka-consumer-groups --describe`.
pub fn client_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("user-service@{host}")
}
