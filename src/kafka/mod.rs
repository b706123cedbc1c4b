//! The Kafka adapter (rdkafka over librdkafka).
//!
//! - [`EventPublisher`]: the one producer all CreateUser calls share:
//!   idempotent, acks=all, Java-compatible murmur2 partitioning, a short linger;
//! - [`ensure_topics`]: creates the topic and its dead-letter topic at start-up;
//! - [`consumer_config`]: the consumer-group settings of the projector.

mod admin;
mod error;
mod producer;

pub use admin::ensure_topics;
pub use error::KafkaError;
pub use producer::{EventPublisher, Published};

use rdkafka::ClientConfig;

/// Settings of the projector's consumer, following rdkafka's at-least-once
/// example: offsets are stored by the code only once Redis holds an event's
/// effect, and the auto-committer commits only what was stored.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Cooperative rebalancing: adding an instance moves only the partitions
        // it takes, the others keep flowing.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
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
