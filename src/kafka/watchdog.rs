//! Noticing a librdkafka client that is cut off from a cluster which is
//! there, and saying when to replace it.
//!
//! Why: a single KRaft broker paused for longer than its heartbeat session
//! (`broker.session.timeout.ms`, 9 s) fences itself as it resumes, and for a
//! few milliseconds answers metadata requests with no brokers. librdkafka
//! (2.10 and later, issue #5301, open in the bundled 2.12) then forgets every
//! broker it knew and may never bootstrap again: every send times out, or the
//! consumer stays out of its group, while a fresh client connects at once.
//! Nothing in the configuration turns that off, so the service watches its
//! clients' own statistics and replaces a client that is cut off while a
//! throwaway client reaches the cluster.

use rdkafka::{
    ClientContext, Statistics,
    error::KafkaError,
    producer::{BaseProducer, Producer},
};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// What a client's statistics (every `statistics.interval.ms`) say about its
/// links to the cluster and, for a consumer, to its group.
#[derive(Debug, Default)]
pub struct ClientHealth {
    inner: Mutex<Inner>,
    /// Times the client this describes was replaced (kept across [`Self::reset`]).
    replacements: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Since when no broker (a learned one, `nodeid >= 0`) has been UP.
    no_broker_since: Option<Instant>,
    /// Since when the consumer group handler has not been `up`.
    out_of_group_since: Option<Instant>,
    /// Whether librdkafka reports this member in its group (`up`, `steady`).
    in_group: bool,
    /// The last report's figures worth exporting.
    figures: Option<Figures>,
    /// When the brokers last refused the client's credentials or its TLS
    /// handshake failed, and which of the two.
    refused: Option<(Instant, Refusal)>,
}

/// Why the brokers would not talk to the client: not a network fault, so
/// retrying alone will not help and the operator must change a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// SASL authentication failed (wrong user, password or mechanism).
    Credentials,
    /// The TLS handshake failed (the broker's certificate did not verify
    /// against the CA, or the broker does not speak TLS).
    Tls,
}

/// What the last statistics report says about the client's queue and its
/// round trips to each broker (as metrics show them).
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Messages and bytes waiting in the producer's queue.
    pub queue_messages: u64,
    pub queue_bytes: u64,
    /// Mean request round trip of each learned broker (`host:port/id`) over
    /// the last window.
    pub rtt: Vec<(String, Duration)>,
}

impl ClientHealth {
    /// Folds one statistics report in.
    pub fn record(&self, s: &Statistics) {
        let now = Instant::now();
        let mut h = self.inner.lock().expect("client health lock poisoned");
        let broker_up = s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        h.no_broker_since = if broker_up {
            None
        } else {
            h.no_broker_since.or(Some(now))
        };
        h.figures = Some(Figures {
            queue_messages: s.msg_cnt,
            queue_bytes: s.msg_size,
            rtt: s
                .brokers
                .values()
                .filter(|b| b.nodeid >= 0)
                .filter_map(|b| {
                    let avg = b.rtt.as_ref()?.avg;
                    Some((b.name.clone(), Duration::from_micros(avg.max(0) as u64)))
                })
                .collect(),
        });
        if let Some(cgrp) = &s.cgrp {
            h.in_group = cgrp.state == "up" && cgrp.join_state == "steady";
            h.out_of_group_since = if cgrp.state == "up" {
                None
            } else {
                h.out_of_group_since.or(Some(now))
            };
        }
    }

    /// How long the client has had no broker UP, if it has none now.
    pub fn no_broker_for(&self) -> Option<Duration> {
        let h = self.inner.lock().expect("client health lock poisoned");
        h.no_broker_since.map(|t| t.elapsed())
    }

    /// How long the consumer's group handler has not been up, if it is not.
    pub fn out_of_group_for(&self) -> Option<Duration> {
        let h = self.inner.lock().expect("client health lock poisoned");
        h.out_of_group_since.map(|t| t.elapsed())
    }

    /// Whether librdkafka reports this consumer in its group.
    pub fn in_group(&self) -> bool {
        self.inner
            .lock()
            .expect("client health lock poisoned")
            .in_group
    }

    /// The last statistics report's figures, once one came.
    pub fn figures(&self) -> Option<Figures> {
        self.inner
            .lock()
            .expect("client health lock poisoned")
            .figures
            .clone()
    }

    /// Records a refusal that librdkafka reported through its error callback.
    pub fn record_refusal(&self, refusal: Refusal) {
        self.inner
            .lock()
            .expect("client health lock poisoned")
            .refused = Some((Instant::now(), refusal));
    }

    /// The refusal seen within `within`, if any: librdkafka retries the
    /// handshake at most `reconnect.backoff.max.ms` apart, so a refusal that
    /// stopped recurring for longer means the client got in.
    pub fn refused_within(&self, within: Duration) -> Option<Refusal> {
        let h = self.inner.lock().expect("client health lock poisoned");
        h.refused
            .filter(|(at, _)| at.elapsed() <= within)
            .map(|(_, r)| r)
    }

    /// Forgets everything: the client it described was replaced (counted).
    pub fn reset(&self) {
        *self.inner.lock().expect("client health lock poisoned") = Inner::default();
        self.replacements.fetch_add(1, Ordering::Relaxed);
    }

    /// Times the client was replaced.
    pub fn replacements(&self) -> u64 {
        self.replacements.load(Ordering::Relaxed)
    }
}

/// A client context that keeps a [`ClientHealth`] and logs librdkafka's
/// errors (all brokers down, fatal errors) where operators look.
#[derive(Clone, Default)]
pub struct HealthContext(pub Arc<ClientHealth>);

impl ClientContext for HealthContext {
    fn stats(&self, statistics: Statistics) {
        self.0.record(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(refusal) = refusal_of(&error) {
            self.0.record_refusal(refusal);
        }
        log_error(&error, reason, "producer");
    }
}

/// Whether an error callback means the brokers refuse this client.
pub fn refusal_of(error: &KafkaError) -> Option<Refusal> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::Authentication | Code::SaslAuthenticationFailed) => Some(Refusal::Credentials),
        Some(Code::SSL) => Some(Refusal::Tls),
        _ => None,
    }
}

/// Logs a librdkafka error callback at a level that matches what it means:
/// failed connection attempts repeat every few milliseconds while a broker is
/// away (librdkafka logs them itself), losing every broker is worth a warning,
/// a fatal error an error.
pub fn log_error(error: &KafkaError, reason: &str, client: &str) {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::Fatal) => tracing::error!(%error, reason, client, "librdkafka fatal error"),
        Some(Code::AllBrokersDown) => {
            tracing::warn!(%error, reason, client, "librdkafka: all brokers down")
        }
        _ => tracing::debug!(%error, reason, client, "librdkafka error"),
    }
}

/// Whether a fresh client reaches the cluster (it learns at least one
/// broker): proof that a client which cannot is wedged, not the cluster down.
/// Takes up to a few seconds, on a blocking thread.
pub async fn cluster_reachable(link: &super::KafkaLink) -> bool {
    let link = link.clone();
    tokio::task::spawn_blocking(move || reachable_now(&link))
        .await
        .unwrap_or(false)
}

fn reachable_now(link: &super::KafkaLink) -> bool {
    let Ok(client) = link
        .client_config()
        .set("socket.connection.setup.timeout.ms", "2000")
        .create::<BaseProducer>()
    else {
        return false;
    };
    client
        .client()
        .fetch_metadata(None, Duration::from_secs(2))
        .is_ok_and(|m| !m.brokers().is_empty())
}

/// Counts consecutive checks on which a client looked wedged while the
/// cluster answered a fresh one; says "replace it" after `needed` of them, so
/// that an ordinary reconnection (well under a second) never triggers it.
#[derive(Debug)]
pub struct Confirmations {
    needed: u32,
    seen: u32,
}

impl Confirmations {
    pub fn new(needed: u32) -> Self {
        Self { needed, seen: 0 }
    }

    /// Records one check; true when the client is to be replaced.
    pub fn check(&mut self, wedged: bool) -> bool {
        self.seen = if wedged { self.seen + 1 } else { 0 };
        if self.seen >= self.needed {
            self.seen = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Confirmations;

    #[test]
    fn replaces_only_after_consecutive_confirmations() {
        let mut c = Confirmations::new(3);
        assert!(!c.check(true));
        assert!(!c.check(true));
        assert!(!c.check(false));
        assert!(!c.check(true));
        assert!(!c.check(true));
        assert!(c.check(true));
        assert!(!c.check(true), "counting starts again after a replacement");
    }
}
