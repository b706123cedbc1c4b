//! `grpc.health.v1.Health/Check`.

use std::time::Duration;
use tonic::{Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// What a health check got instead of SERVING.
pub enum NotServing {
    /// The status the service answered (`ServingStatus` as a number).
    Status(i32),
    /// The call failed.
    Failed(Status),
}

/// Whether `service` ("" = the whole server) says SERVING, asked with
/// `timeout` as the call's deadline.
pub async fn check(ch: Channel, service: &str, timeout: Duration) -> Result<(), NotServing> {
    let mut req = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    req.set_timeout(timeout);
    match HealthClient::new(ch).check(req).await {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(r) => Err(NotServing::Status(r.get_ref().status)),
        Err(s) => Err(NotServing::Failed(s)),
    }
}
