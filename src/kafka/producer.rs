//! The shared event producer of the command side.

use super::KafkaError;
use crate::domain::UserCreated;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicI32, Ordering},
    },
    time::Duration,
};

/// Where the broker put an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
}

/// One producer for all requests, so librdkafka batches concurrent calls into
/// few requests. Cloning is cheap and shares the producer.
///
/// Unlike the Go service's writer (no acks, a 1 s batch timeout), it waits for
/// every in-sync replica (acks=all) with idempotence on, and lingers only a few
/// milliseconds, so writes are neither lost nor stalled.
#[derive(Clone)]
pub struct EventPublisher {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
    /// The topic's partition count as last seen by [`EventPublisher::ping`];
    /// 0 until then.
    partitions: Arc<AtomicI32>,
}

impl EventPublisher {
    pub fn new(
        brokers: &str,
        topic: &str,
        timeout: Duration,
        linger: Duration,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The Java client's partitioner, so Java and kafka-go's
            // Murmur2Balancer put a key where we do (librdkafka's default differs).
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger.as_millis().to_string())
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .set(
                "request.timeout.ms",
                timeout.as_millis().clamp(1, 30_000).to_string(),
            )
            .set("client.id", super::client_id())
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            timeout,
            partitions: Arc::default(),
        })
    }

    /// Publishes the event keyed by the user id and waits for the broker's
    /// acknowledgement, at most about the configured timeout.
    pub async fn publish(&self, event: &UserCreated) -> Result<Published, KafkaError> {
        let key = event.key();
        let payload = event.to_json();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        // librdkafka's message.timeout.ms bounds delivery; the outer timeout is a
        // guard against a queue that never drains.
        let send = self.producer.send(record, Timeout::After(self.timeout));
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
            Ok(Ok(delivery)) => Ok(Published {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((e, _))) => Err(KafkaError::Unavailable(format!(
                "publishing to {}: {e}",
                self.topic
            ))),
            Err(_) => Err(KafkaError::Unavailable(format!(
                "no acknowledgement from the broker within {:?}",
                self.timeout
            ))),
        }
    }

    /// Asks a broker for the topic's metadata: the health probe. Also notes
    /// the topic's partition count.
    pub async fn ping(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        // fetch_metadata blocks: keep it off the async workers.
        let count = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map_or(0, |t| t.partitions().len() as i32)
                })
                .map_err(|e| KafkaError::Unavailable(e.to_string()))
        })
        .await
        .map_err(|e| KafkaError::Unavailable(format!("metadata probe panicked: {e}")))??;
        self.partitions.store(count, Ordering::Relaxed);
        Ok(())
    }

    /// The topic's partition count, once a probe has seen the topic.
    pub fn known_partitions(&self) -> Option<i32> {
        Some(self.partitions.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    /// Publishes raw bytes with headers (the dead-letter path) and waits.
    pub async fn publish_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<Published, KafkaError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        match self
            .producer
            .send(record, Timeout::After(self.timeout))
            .await
        {
            Ok(d) => Ok(Published {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(KafkaError::Unavailable(format!(
                "publishing to {topic}: {e}"
            ))),
        }
    }

    /// Sends what is queued. Dropping a producer purges its queue, so shutdown
    /// calls this first; it blocks, so it runs off the async workers.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| KafkaError::Unavailable(format!("flush panicked: {e}")))??;
        Ok(())
    }
}
