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

/// The status of each service name, with a watch channel per name so that
/// `Watch` streams see every change.
pub struct HealthRegistry {
    services: Mutex<HashMap<String, watch::Sender<ServingStatus>>>,
    state: Mutex<State>,
    /// The name that also needs the projector in its group, if one runs here.
    projector_name: Option<String>,
    /// Ends every `Watch` stream at shutdown.
    shutdown: CancellationToken,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// Kafka and Redis answer.
    reachable: bool,
    /// Shutdown has begun.
    draining: bool,
    /// librdkafka reports the projector in its consumer group.
    projector_in_group: bool,
}

impl HealthRegistry {
    /// Registers `names` as NOT_SERVING until someone says otherwise.
    pub fn new(names: &[&str], shutdown: CancellationToken) -> Self {
        let services = names
            .iter()
            .map(|n| (n.to_string(), watch::Sender::new(ServingStatus::NotServing)))
            .collect();
        Self {
            services: Mutex::new(services),
            state: Mutex::new(State::default()),
            projector_name: None,
            shutdown,
        }
    }

    /// Registers `name` too, SERVING only while the projector is in its
    /// group as well: a projector that fell out after a broker blip and did
    /// not come back shows there.
    pub fn with_projector(mut self, name: &str) -> Self {
        self.lock().insert(
            name.to_owned(),
            watch::Sender::new(ServingStatus::NotServing),
        );
        self.projector_name = Some(name.to_owned());
        self
    }

    /// Records whether the dependencies answer; SERVING needs both, and no drain.
    pub fn set_dependencies(&self, reachable: bool) {
        self.update(|s| s.reachable = reachable);
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
        let serving = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let base = state.reachable && !state.draining;
        for (name, tx) in self.lock().iter() {
            let status = if Some(name) == self.projector_name.as_ref() {
                serving(base && state.projector_in_group)
            } else {
                serving(base)
            };
            tx.send_if_modified(|s| std::mem::replace(s, status) != status);
        }
    }

    pub fn status(&self, name: &str) -> Option<ServingStatus> {
        self.lock().get(name).map(|tx| *tx.borrow())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<ServingStatus>>> {
        // Nothing panics while holding this lock.
        self.services.lock().expect("health lock poisoned")
    }

    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ServingStatus>> {
        self.lock().get(name).map(|tx| tx.subscribe())
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
