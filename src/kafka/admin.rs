//! Topic creation at start-up.

use super::KafkaError;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};
use std::time::Duration;

/// Creates the topics that are missing, keeping their records for ever;
/// existing ones are left as they are.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new_topics: Vec<_> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, partitions, TopicReplication::Fixed(replication))
                // The log is the only source of truth: keep every record, and
                // do not compact (the first event of an id decides, so a
                // compaction that kept only the last would change the outcome).
                .set("retention.ms", "-1")
                .set("cleanup.policy", "delete")
        })
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
            Ok(topic) => tracing::info!(%topic, partitions, replication, "created topic"),
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
