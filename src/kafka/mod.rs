//! The Kafka adapter (rdkafka over librdkafka).
//!
//! - [`EventPublisher`]: the one producer all CreateUser calls share:
//!   idempotent, acks=all, Java-compatible murmur2 partitioning, a short linger;
//! - [`ensure_topics`]: creates the topic and its dead-letter topic at start-up;
//! - [`consumer_config`]: the consumer-group settings of the projector.

mod admin;
mod error;
pub mod link;
pub mod log_end;
mod producer;
pub mod watchdog;

pub use admin::ensure_topics;
pub use error::KafkaError;
pub use link::{KafkaLink, LinkError, SaslMechanism, SecurityProtocol};
pub use log_end::Reach;
pub use producer::{EventPublisher, Published};

use rdkafka::ClientConfig;

/// The partition Kafka's Java client (and our producer, `murmur2_random`)
/// puts `key` on: `toPositive(murmur2(key)) % partitions`. Readers use it to
/// find which partition's checkpoint vouches for a user's absence.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32;
    (hash & 0x7fff_ffff) % partitions.max(1)
}

/// The partition of a user's events (its key is the id in decimal).
pub fn user_partition(id: crate::domain::UserId, partitions: i32) -> i32 {
    partition_for_key(id.to_string().as_bytes(), partitions)
}

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

#[cfg(test)]
mod tests {
    use super::partition_for_key;

    #[test]
    fn partitions_like_kafkas_java_client() {
        // Kafka's UtilsTest murmur2 vectors, through toPositive(h) % n.
        for (key, hash) in [
            (&b"21"[..], -973_932_308i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
        ] {
            assert_eq!(murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32, hash);
            for n in [1, 3, 7, 1000] {
                assert_eq!(
                    partition_for_key(key, n),
                    (hash & 0x7fff_ffff) % n,
                    "{key:?}"
                );
            }
        }
    }
}
