//! Topic creation at start-up.

use super::KafkaError;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};
use std::time::Duration;

/// Replication factor from which the topics get `min.insync.replicas=2`.
const MIN_ISR_FROM_REPLICATION: i32 = 3;

/// Creates the topics that are missing, keeping their records for ever;
/// existing ones are left as they are.
///
/// Settings of a topic it creates:
/// - `retention.ms=-1`, `cleanup.policy=delete`: the log is the only source of
///   truth (the read model is rebuilt from it), so every record is kept; and no
///   compaction, which keeps the *last* record of a key, while the *first*
///   event of an id decides (a compacted log would change who created a user).
/// - With `replication` of 3 or more, `min.insync.replicas=2`: the producer
///   sends with acks=all, which waits for the replicas *in sync*, and with the
///   broker's default of 1 the in-sync set may shrink to the leader alone, so
///   an OK would then stand on one disk. With 2, an acknowledged event is on
///   at least two brokers and survives losing any one; with fewer than two in
///   sync, writes are refused (`NOT_ENOUGH_REPLICAS`, CreateUser answers
///   UNAVAILABLE) rather than acknowledged on one copy. Below 3 replicas the
///   broker's default stands (with 2 replicas, a minimum of 2 would stop every
///   write whenever one broker is down).
pub async fn ensure_topics(
    link: &super::KafkaLink,
    topics: &[&str],
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = link.client_config().create()?;
    let new_topics: Vec<_> = topics
        .iter()
        .map(|t| topic_spec(t, partitions, replication))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(&new_topics, &opts)
        .await
        .map_err(|e| KafkaError::Unavailable(format!("creating topics: {e}")))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(
                %topic,
                partitions,
                replication,
                min_insync_replicas = min_insync_replicas(replication),
                "created topic"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Unavailable(format!(
                    "creating topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// `min.insync.replicas` the service sets on a topic it creates (None: the
/// broker's default). See [`ensure_topics`].
fn min_insync_replicas(replication: i32) -> Option<&'static str> {
    (replication >= MIN_ISR_FROM_REPLICATION).then_some("2")
}

/// The topic as the service creates it. See [`ensure_topics`] for why.
fn topic_spec(topic: &str, partitions: i32, replication: i32) -> NewTopic<'_> {
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
        .set("retention.ms", "-1")
        .set("cleanup.policy", "delete");
    match min_insync_replicas(replication) {
        Some(n) => t.set("min.insync.replicas", n),
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(replication: i32) -> Vec<(&'static str, &'static str)> {
        topic_spec("t", 3, replication).config
    }

    #[test]
    fn three_replicas_need_two_in_sync() {
        assert_eq!(
            config(3),
            [
                ("retention.ms", "-1"),
                ("cleanup.policy", "delete"),
                ("min.insync.replicas", "2"),
            ]
        );
        assert!(config(5).contains(&("min.insync.replicas", "2")));
    }

    #[test]
    fn fewer_replicas_keep_the_broker_default() {
        for r in [1, 2] {
            assert_eq!(
                config(r),
                [("retention.ms", "-1"), ("cleanup.policy", "delete")],
                "replication {r}"
            );
        }
    }
}
