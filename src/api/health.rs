//! `grpc.health.v1.Health`, written to the health protocol's spec.
//!
//! tonic-health answers `Watch` on an unknown service with NOT_FOUND; the spec
//! says to stream SERVICE_UNKNOWN and keep the stream open, since the service
//! may appear later. Every `Watch` stream ends when the shared shutdown token
//! fires, so an open watcher never holds graceful shutdown hostage.

use futures::{Stream, StreamExt, stream};
use std::{collections::HashMap, pin::Pin, sync::Mutex};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};

/// What a health name needs to be SERVING (besides not draining).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub redis: bool,
    pub kafka: bool,
    /// The projector in its consumer group.
    pub projector: bool,
}

impl Needs {
    /// Nothing but the process: SERVING from the start until draining (a
    /// liveness probe's name, which no dependency's outage may fail).
    pub const NOTHING: Self = Self {
        redis: false,
        kafka: false,
        projector: false,
    };
    pub const REDIS: Self = Self {
        redis: true,
        kafka: false,
        projector: false,
    };
    pub const KAFKA: Self = Self {
        redis: false,
        kafka: true,
        projector: false,
    };
    pub const PROJECTOR: Self = Self {
        redis: true,
        kafka: true,
        projector: true,
    };
}

/// The status of each service name, each following the dependencies it
/// needs ([`Needs`]), with a watch channel per name so that `Watch` streams
/// see every change.
pub struct HealthRegistry {
    services: Mutex<HashMap<String, (Needs, watch::Sender<ServingStatus>)>>,
    state: Mutex<State>,
    /// Ends every `Watch` stream at shutdown.
    shutdown: CancellationToken,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    redis: bool,
    kafka: bool,
    /// Shutdown has begun.
    draining: bool,
    /// librdkafka reports the projector in its consumer group.
    projector_in_group: bool,
}

impl State {
    fn serves(&self, needs: Needs) -> bool {
        !self.draining
            && (self.redis || !needs.redis)
            && (self.kafka || !needs.kafka)
            && (self.projector_in_group || !needs.projector)
    }
}

impl HealthRegistry {
    /// Registers each name with what it needs, NOT_SERVING until the probes
    /// say otherwise (a name that needs nothing is SERVING at once).
    pub fn new(names: &[(&str, Needs)], shutdown: CancellationToken) -> Self {
        let services = names
            .iter()
            .map(|(n, needs)| {
                let status = if State::default().serves(*needs) {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                (n.to_string(), (*needs, watch::Sender::new(status)))
            })
            .collect();
        Self {
            services: Mutex::new(services),
            state: Mutex::new(State::default()),
            shutdown,
        }
    }

    /// Records whether Redis and Kafka answer.
    pub fn set_dependencies(&self, redis: bool, kafka: bool) {
        self.update(|s| {
            s.redis = redis;
            s.kafka = kafka;
        });
    }

    /// Records whether the projector is in its group.
    pub fn set_projector_in_group(&self, in_group: bool) {
        self.update(|s| s.projector_in_group = in_group);
    }

    /// Shutdown has begun: NOT_SERVING from now on, whatever the probes say.
    pub fn set_draining(&self) {
        self.update(|s| s.draining = true);
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let state = {
            let mut state = self.state.lock().expect("health lock poisoned");
            f(&mut state);
            *state
        };
        for (needs, tx) in self.lock().values() {
            let status = if state.serves(*needs) {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tx.send_if_modified(|s| std::mem::replace(s, status) != status);
        }
    }

    /// Every health name and whether it is SERVING now (for metrics).
    pub fn statuses(&self) -> Vec<(String, bool)> {
        self.lock()
            .iter()
            .map(|(n, (_, tx))| (n.clone(), *tx.borrow() == ServingStatus::Serving))
            .collect()
    }

    pub fn status(&self, name: &str) -> Option<ServingStatus> {
        self.lock().get(name).map(|(_, tx)| *tx.borrow())
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Needs, watch::Sender<ServingStatus>)>> {
        // Nothing panics while holding this lock.
        self.services.lock().expect("health lock poisoned")
    }

    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ServingStatus>> {
        self.lock().get(name).map(|(_, tx)| tx.subscribe())
    }
}

/// The tonic service over a shared [`HealthRegistry`].
pub struct HealthService(pub std::sync::Arc<HealthRegistry>);

impl HealthService {
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }
}

type WatchStreamBox = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status.into(),
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let name = request.into_inner().service;
        match self.0.status(&name) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(Status::not_found(format!("unknown service {name:?}"))),
        }
    }

    type WatchStream = WatchStreamBox;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let name = request.into_inner().service;
        let stop = self.0.shutdown.clone().cancelled_owned();
        let stream: WatchStreamBox = match self.0.subscribe(&name) {
            Some(rx) => Box::pin(
                WatchStream::new(rx)
                    .map(|s| Ok(response(s)))
                    .take_until(stop),
            ),
            None => Box::pin(
                stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) })
                    .chain(stream::pending())
                    .take_until(stop),
            ),
        };
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> HealthRegistry {
        HealthRegistry::new(
            &[
                ("", Needs::REDIS),
                ("kafka", Needs::KAFKA),
                ("projector", Needs::PROJECTOR),
                ("liveness", Needs::NOTHING),
            ],
            CancellationToken::new(),
        )
    }

    #[test]
    fn each_name_follows_what_it_needs() {
        let h = registry();
        let status = |n| h.status(n).unwrap();
        assert_eq!(status(""), ServingStatus::NotServing, "until probed");
        assert_eq!(status("liveness"), ServingStatus::Serving, "at once");
        h.set_dependencies(false, false);
        assert_eq!(status("liveness"), ServingStatus::Serving);
        h.set_dependencies(true, false);
        h.set_projector_in_group(true);
        assert_eq!(status(""), ServingStatus::Serving);
        assert_eq!(status("kafka"), ServingStatus::NotServing);
        assert_eq!(status("projector"), ServingStatus::NotServing);
        h.set_dependencies(false, true);
        assert_eq!(status(""), ServingStatus::NotServing);
        assert_eq!(status("kafka"), ServingStatus::Serving);
        h.set_dependencies(true, true);
        assert_eq!(status("projector"), ServingStatus::Serving);
        h.set_draining();
        for n in ["", "kafka", "projector", "liveness"] {
            assert_eq!(status(n), ServingStatus::NotServing);
        }
    }

    #[tokio::test]
    async fn watchers_see_each_change() {
        let h = registry();
        let mut rx = h.subscribe("kafka").unwrap();
        h.set_dependencies(true, true);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), ServingStatus::Serving);
        h.set_dependencies(true, false);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), ServingStatus::NotServing);
        h.set_dependencies(true, false);
        assert!(!rx.has_changed().unwrap(), "no change, no message");
    }
}
