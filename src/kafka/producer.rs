//! The shared event producer of the command side.

use super::{
    KafkaError, KafkaLink,
    log_end::{LogEnds, Reach},
    watchdog::{ClientHealth, Confirmations, HealthContext, Refusal, cluster_reachable},
};
use crate::domain::UserCreated;
use rdkafka::{
    producer::{FutureProducer, FutureRecord, Producer, PurgeConfig},
    types::RDKafkaErrorCode,
    util::Timeout,
};
use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

type Client = FutureProducer<HealthContext>;

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
    /// Replaced by [`EventPublisher::watch`] if librdkafka wedges.
    producer: Arc<RwLock<Client>>,
    health: Arc<ClientHealth>,
    link: KafkaLink,
    linger: Duration,
    /// Sends that timed out in a row, and when one last succeeded.
    timeouts_in_a_row: Arc<AtomicU32>,
    last_ack: Arc<std::sync::Mutex<Instant>>,
    topic: String,
    timeout: Duration,
    /// How far each partition's log reaches, as far as this instance knows.
    log_ends: Arc<LogEnds>,
    metrics: crate::telemetry::Metrics,
}

impl EventPublisher {
    pub fn new(
        link: &KafkaLink,
        topic: &str,
        timeout: Duration,
        linger: Duration,
    ) -> Result<Self, KafkaError> {
        let health = Arc::new(ClientHealth::default());
        let producer = Self::client(link, timeout, linger, &health)?;
        Ok(Self {
            producer: Arc::new(RwLock::new(producer)),
            health,
            link: link.clone(),
            linger,
            timeouts_in_a_row: Arc::default(),
            last_ack: Arc::new(std::sync::Mutex::new(Instant::now())),
            topic: topic.to_owned(),
            timeout,
            log_ends: Arc::default(),
            metrics: Default::default(),
        })
    }

    fn client(
        link: &KafkaLink,
        timeout: Duration,
        linger: Duration,
        health: &Arc<ClientHealth>,
    ) -> Result<Client, KafkaError> {
        Ok(link
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Every record names its partition (the partition map's, see
            // crate::domain::partition_map); the Java client's partitioner
            // stands for any record that would not.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger.as_millis().to_string())
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
            .set(
                "request.timeout.ms",
                timeout.as_millis().clamp(1, 30_000).to_string(),
            )
            .set("client.id", super::client_id())
            // Its own view of its brokers, for the watchdog.
            .set("statistics.interval.ms", "1000")
            .create_with_context(HealthContext(health.clone()))?)
    }

    /// The current client (cheap: an `Arc` inside).
    fn current(&self) -> Client {
        self.producer
            .read()
            .expect("producer lock poisoned")
            .clone()
    }

    /// Replaces the client if it is wedged (see [`super::watchdog`]): no
    /// broker UP for 5 s, or sends timing out in a row for 12 s, while a
    /// fresh client reaches the cluster, on three checks a second apart. The
    /// old client's messages are purged: their callers get UNAVAILABLE and
    /// retry with their request ids, which name the same users.
    pub async fn watch(self, token: CancellationToken) {
        let mut confirmations = Confirmations::new(3);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let cut_off = self
                .health
                .no_broker_for()
                .is_some_and(|d| d > Duration::from_secs(5));
            let timing_out = self.timeouts_in_a_row.load(Ordering::Relaxed) >= 8
                && self.last_ack.lock().expect("ack lock poisoned").elapsed()
                    > Duration::from_secs(12);
            let wedged = (cut_off || timing_out) && cluster_reachable(&self.link).await;
            if confirmations.check(wedged) {
                self.replace();
            }
        }
    }

    /// Replaces the librdkafka client now, purging the old one's messages:
    /// what the watchdog does to a wedged producer.
    pub fn replace(&self) {
        let fresh = match Self::client(&self.link, self.timeout, self.linger, &self.health) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a new producer");
                return;
            }
        };
        tracing::warn!(
            "the producer is cut off from a reachable cluster (librdkafka #5301): replacing it"
        );
        self.health.reset();
        self.timeouts_in_a_row.store(0, Ordering::Relaxed);
        *self.last_ack.lock().expect("ack lock poisoned") = Instant::now();
        let old = std::mem::replace(
            &mut *self.producer.write().expect("producer lock poisoned"),
            fresh,
        );
        // Closing a wedged client can block: off the async workers.
        std::thread::spawn(move || {
            old.purge(PurgeConfig::default().queue().inflight());
            drop(old);
        });
    }

    /// Times the librdkafka client was replaced (by the watchdog, or
    /// [`EventPublisher::replace`]).
    pub fn replacements(&self) -> u64 {
        self.health.replacements()
    }

    fn record_send(&self, ok: bool, timed_out: bool) {
        if ok {
            self.timeouts_in_a_row.store(0, Ordering::Relaxed);
            *self.last_ack.lock().expect("ack lock poisoned") = Instant::now();
        } else if timed_out {
            self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes the event keyed by the user id to `partition` (its id's
    /// partition by the topic's partition map, never the partitioner's pick
    /// over today's count) and waits for the broker's acknowledgement, at
    /// most about the configured timeout.
    pub async fn publish(
        &self,
        event: &UserCreated,
        partition: i32,
    ) -> Result<Published, KafkaError> {
        let key = event.key();
        let payload = event.to_json();
        let mut record = FutureRecord::to(&self.topic)
            .key(&key)
            .payload(&payload)
            .partition(partition);
        // With tracing on, the record carries its publish span's context.
        let traced = crate::telemetry::trace::publish_span(&self.topic, &key);
        let span = match traced {
            Some((span, headers)) => {
                record = record.headers(headers);
                span
            }
            None => tracing::Span::none(),
        };
        // librdkafka's message.timeout.ms bounds delivery; the outer timeout is a
        // guard against a queue that never drains.
        let producer = self.current();
        let began = Instant::now();
        self.metrics.event_sent();
        let send = producer.send(record, Timeout::After(self.timeout));
        let send = tracing::Instrument::instrument(send, span.clone());
        let (result, timed_out) =
            match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
                Ok(Ok(delivery)) => (
                    Ok({
                        self.log_ends
                            .acknowledged(delivery.partition, delivery.offset);
                        Published {
                            partition: delivery.partition,
                            offset: delivery.offset,
                        }
                    }),
                    false,
                ),
                Ok(Err((e, _))) => (
                    Err(KafkaError::Unavailable(format!(
                        "publishing to {}: {e}",
                        self.topic
                    ))),
                    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut),
                ),
                Err(_) => (
                    Err(KafkaError::Unavailable(format!(
                        "no acknowledgement from the broker within {:?}",
                        self.timeout
                    ))),
                    true,
                ),
            };
        self.record_send(result.is_ok(), timed_out);
        let failure = match (&result, timed_out) {
            (Ok(_), _) => None,
            (Err(_), true) => Some("timeout"),
            (Err(_), false) => Some("broker"),
        };
        self.metrics.event_done(failure, began.elapsed());
        if let Ok(p) = &result {
            span.record("messaging.destination.partition.id", p.partition);
            span.record("messaging.kafka.offset", p.offset);
        }
        result
    }

    /// Records sends and acknowledgements into `metrics` (the application's).
    pub fn with_metrics(mut self, metrics: crate::telemetry::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// What librdkafka's statistics say about the producer (for metrics).
    pub fn client_health(&self) -> Arc<ClientHealth> {
        self.health.clone()
    }

    /// Asks a broker for the topic's metadata: the health probe. Returns the
    /// topic's partition count (0 while the topic does not exist).
    pub async fn ping(&self, timeout: Duration) -> Result<i32, KafkaError> {
        let producer = self.current();
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
        .map_err(|e| KafkaError::Unavailable(format!("metadata probe panicked: {e}")))?
        .map_err(|e| self.blame_refusal(e))?;
        Ok(count)
    }

    /// Turns a failed probe into the reason an operator can act on when the
    /// brokers have been refusing this client (within the last 30 s: after a
    /// few failed attempts librdkafka waits up to `reconnect.backoff.max.ms`,
    /// 10 s plus 20 % jitter, before it tries the handshake again).
    fn blame_refusal(&self, e: KafkaError) -> KafkaError {
        match self.health.refused_within(Duration::from_secs(30)) {
            Some(Refusal::Credentials) => KafkaError::Refused(format!(
                "the brokers refused the SASL credentials ({})",
                self.link.refusal_hint()
            )),
            Some(Refusal::Tls) => KafkaError::Refused(
                "the TLS handshake with the brokers failed (check KAFKA_SECURITY_PROTOCOL and KAFKA_TLS_CA_FILE)"
                    .into(),
            ),
            None => e,
        }
    }

    /// Whether the topic's log holds `offset` of `partition` (see
    /// [`LogEnds`]): a broker is asked only when this instance's own
    /// acknowledgements do not already say so.
    pub async fn reach(&self, partition: i32, offset: i64) -> Reach {
        let producer = self.current();
        let topic = self.topic.clone();
        let timeout = self.timeout.min(Duration::from_secs(1));
        self.log_ends
            .reach(partition, offset, move || {
                producer
                    .client()
                    .fetch_watermarks(&topic, partition, timeout)
                    .ok()
                    .map(|(_, high)| high)
            })
            .await
    }

    /// Appends a partition map record (see [`crate::domain::MapRecord`]) to
    /// partition 0 of the topic and waits for it.
    pub async fn publish_map(&self, partitions: i32) -> Result<Published, KafkaError> {
        let payload = crate::domain::MapRecord::new(partitions).to_json();
        let record = FutureRecord::to(&self.topic)
            .key(crate::domain::partition_map::MAP_KEY)
            .payload(&payload)
            .partition(0);
        match self
            .current()
            .send(record, Timeout::After(self.timeout))
            .await
        {
            Ok(d) => Ok(Published {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(KafkaError::Unavailable(format!(
                "recording the partition map of {}: {e}",
                self.topic
            ))),
        }
    }

    /// Publishes raw bytes with headers and waits: the dead-letter path
    /// (`partition` None: the partitioner's pick), and the copy of an
    /// article's event to its id's partition (named).
    pub async fn publish_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<Published, KafkaError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        match self
            .current()
            .send(record, Timeout::After(self.timeout))
            .await
        {
            Ok(d) => {
                if topic == self.topic {
                    self.log_ends.acknowledged(d.partition, d.offset);
                }
                Ok(Published {
                    partition: d.partition,
                    offset: d.offset,
                })
            }
            Err((e, _)) => Err(KafkaError::Unavailable(format!(
                "publishing to {topic}: {e}"
            ))),
        }
    }

    /// Sends what is queued. Dropping a producer purges its queue, so shutdown
    /// calls this first; it blocks, so it runs off the async workers.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.current();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| KafkaError::Unavailable(format!("flush panicked: {e}")))??;
        Ok(())
    }
}
