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
    /// Whether Kafka and Redis answer, and whether shutdown has begun.
    state: Mutex<(bool, bool)>,
    /// Ends every `Watch` stream at shutdown.
    shutdown: CancellationToken,
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
            state: Mutex::new((false, false)),
            shutdown,
        }
    }

    /// Records whether the dependencies answer; SERVING needs both, and no drain.
    pub fn set_dependencies(&self, reachable: bool) {
        self.update(|s| s.0 = reachable);
    }

    /// Shutdown has begun: NOT_SERVING from now on, whatever the probes say.
    pub fn set_draining(&self) {
        self.update(|s| s.1 = true);
    }

    fn update(&self, f: impl FnOnce(&mut (bool, bool))) {
        let status = {
            let mut state = self.state.lock().expect("health lock poisoned");
            f(&mut state);
            if state.0 && !state.1 {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        self.set_all(status);
    }

    fn set_all(&self, status: ServingStatus) {
        for tx in self.lock().values() {
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
