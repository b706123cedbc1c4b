//! How many connections an instance holds. `MAX_CONNECTIONS` caps them at
//! accept and, over TLS, `TLS_MAX_HANDSHAKES` caps the handshakes in flight.
//! A connection past a cap is closed at once, before any of its bytes is
//! read, and counted (`user_service_connections_refused_total`, by reason):
//! a flood of connections costs the instance a bounded number of
//! descriptors and buffers, and the clients it already serves go on.
//! Silent and idle connections are closed by the connection policy (see
//! [`super::ping_policy`]), which also holds each admitted connection's
//! place until h2 drops it.

use super::ping_policy::{PingPolicy, Policed};
use crate::telemetry::Metrics;
use futures::{Stream, StreamExt};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::TcpIncoming;

/// Counts the connections refused at a cap, by reason.
const REFUSED_METRIC: &str = "user_service_connections_refused_total";
/// The connections admitted and not yet closed.
const OPEN_METRIC: &str = "user_service_connections_open";
/// At most one warning per this, however many are refused.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A cap on things in flight (connections, or TLS handshakes); cheap to
/// clone, shared by the accept loop.
#[derive(Clone)]
pub struct Cap {
    permits: Arc<Semaphore>,
    max: usize,
    /// The `reason` label of a refusal, and the setting named in the log.
    reason: &'static str,
    setting: &'static str,
    /// Whether admissions are counted in `user_service_connections_open`.
    counts_open: bool,
    metrics: Metrics,
    last_warned: Arc<Mutex<Option<Instant>>>,
}

/// A place under a [`Cap`], given back when dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    open: Option<metrics::Gauge>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.decrement(1.0);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

impl Cap {
    /// At most `max` connections open (at least one).
    pub fn connections(max: usize, metrics: Metrics) -> Self {
        Self::new(max, "max_connections", "MAX_CONNECTIONS", true, metrics)
    }

    /// At most `max` TLS handshakes in flight (at least one).
    pub fn handshakes(max: usize, metrics: Metrics) -> Self {
        Self::new(max, "tls_handshakes", "TLS_MAX_HANDSHAKES", false, metrics)
    }

    fn new(
        max: usize,
        reason: &'static str,
        setting: &'static str,
        counts_open: bool,
        metrics: Metrics,
    ) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            reason,
            setting,
            counts_open,
            metrics,
            last_warned: Arc::default(),
        }
    }

    /// A place for one more, or `None` (counted, and logged now and then)
    /// when all are taken; `peer` is for the log line.
    pub fn admit(&self, peer: Option<SocketAddr>) -> Option<Admission> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let open = self
                    .counts_open
                    .then(|| self.metrics.gauge(OPEN_METRIC, &[]));
                if let Some(open) = &open {
                    open.increment(1.0);
                }
                Some(Admission {
                    _permit: permit,
                    open,
                })
            }
            Err(_) => {
                self.metrics
                    .counter(REFUSED_METRIC, &[("reason", self.reason)])
                    .increment(1);
                self.warn(peer);
                None
            }
        }
    }

    /// How many places are taken.
    pub fn in_use(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    fn warn(&self, peer: Option<SocketAddr>) {
        let mut last = self.last_warned.lock().expect("warn lock");
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            peer = ?peer,
            max = self.max,
            "{} reached: new connections are closed at once (more are counted in {REFUSED_METRIC}, not logged, for {WARN_EVERY:?})",
            self.setting
        );
    }
}

/// The plaintext connections accepted on `listener`, as tonic's incoming
/// stream: each admitted under `cap` (the rest are closed at once) and
/// under `pings` (see [`super::ping_policy`]).
pub fn plaintext(
    listener: TcpListener,
    cap: Cap,
    pings: PingPolicy,
) -> impl Stream<Item = std::io::Result<Policed<TcpStream>>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(tcp) => {
                    let peer = tcp.peer_addr().ok();
                    // Refused: dropped here, closed before a byte is read.
                    cap.admit(peer)
                        .map(|a| Ok(pings.police(tcp, peer).holding(a)))
                }
                Err(e) => Some(Err(e)),
            };
            std::future::ready(admitted)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_admits_up_to_its_max_and_counts_the_rest() {
        let metrics = Metrics::new();
        let cap = Cap::connections(2, metrics.clone());
        let (a, b) = (cap.admit(None).unwrap(), cap.admit(None).unwrap());
        assert!(cap.admit(None).is_none());
        assert!(cap.admit(None).is_none());
        assert_eq!(cap.in_use(), 2);
        drop(a);
        let c = cap.admit(None).expect("a place given back is free again");
        let text = metrics.render();
        assert!(
            text.contains(r#"user_service_connections_refused_total{reason="max_connections"} 2"#),
            "{text}"
        );
        assert!(text.contains("user_service_connections_open 2"), "{text}");
        drop((b, c));
        assert!(metrics.render().contains("user_service_connections_open 0"));
        assert_eq!(cap.in_use(), 0);
    }

    #[test]
    fn a_cap_of_zero_still_admits_one() {
        let cap = Cap::handshakes(0, Metrics::new());
        let _one = cap.admit(None).unwrap();
        assert!(cap.admit(None).is_none());
    }
}
