//! One tower layer around every gRPC call: counts it and times it by
//! service, method and status code. The status is read where gRPC puts it:
//! in the response headers for an answer without a body (an error), else in
//! the trailers at the end of the body; a call whose body is dropped before
//! its trailers (the client went away) counts as `Canceled`. With tracing on,
//! the call runs in its server span, child of the caller's `traceparent`.
//!
//! The service and method labels come from a closed set, the names the server
//! serves ([`Served`], given by whoever wires the server); any other path
//! counts as `unknown`, so that callers making up names cannot grow the
//! metrics without bound.

use super::{Metrics, metrics::code_name};
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use prost::Message;
use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};
use tower::{Layer, Service};
use tracing::Instrument;

/// Wraps the server's services in [`GrpcTelemetry`].
#[derive(Clone)]
pub struct GrpcTelemetryLayer {
    metrics: Metrics,
    served: &'static Served,
}

impl GrpcTelemetryLayer {
    /// Labels the calls by the services and methods in `served`.
    pub fn new(metrics: Metrics, served: &'static Served) -> Self {
        Self { metrics, served }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> GrpcTelemetry<S> {
        GrpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
            served: self.served,
        }
    }
}

#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    metrics: Metrics,
    served: &'static Served,
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = self.served.labels(request.uri().path());
        self.metrics.grpc_started(service, method);
        let mut call = CallEnd {
            metrics: self.metrics.clone(),
            service,
            method,
            began: Instant::now(),
            recorded: false,
        };
        let span = super::trace::server_span(request.headers(), call.service, call.method);
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(async move {
            let response = response.instrument(span).await?;
            let (parts, body) = response.into_parts();
            // Trailers-only: the status is in the headers, no body follows.
            if let Some(code) = grpc_status(&parts.headers) {
                call.record(code);
            }
            Ok(http::Response::from_parts(
                parts,
                MeteredBody {
                    inner: body,
                    call: Some(call),
                },
            ))
        })
    }
}

/// The label of a service or method the server does not serve.
const UNKNOWN: &str = "unknown";

/// The methods of every service the server serves, by service, read from
/// their descriptor sets: the closed set of label values.
#[derive(Debug, Default)]
pub struct Served(HashMap<String, HashSet<String>>);

impl Served {
    /// The services (and their methods) of these encoded descriptor sets.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut served = HashMap::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set).expect("a valid descriptor set");
            for file in set.file {
                for service in &file.service {
                    let name = format!("{}.{}", file.package(), service.name());
                    let methods = service.method.iter().map(|m| m.name().to_owned());
                    served
                        .entry(name)
                        .or_insert_with(HashSet::new)
                        .extend(methods);
                }
            }
        }
        Self(served)
    }

    /// `/user.v1.UserService/GetUser` → (`user.v1.UserService`, `GetUser`); a
    /// service or method the server does not serve → `unknown`.
    pub fn labels<'a>(&'a self, path: &str) -> (&'a str, &'a str) {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or_default();
        match self.0.get_key_value(service) {
            Some((service, methods)) => {
                (service, methods.get(method).map_or(UNKNOWN, String::as_str))
            }
            None => (UNKNOWN, UNKNOWN),
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}

/// Records a call's end once: at its status, or as cancelled when dropped
/// before one.
struct CallEnd {
    metrics: Metrics,
    service: &'static str,
    method: &'static str,
    began: Instant,
    recorded: bool,
}

impl CallEnd {
    fn record(&mut self, code: tonic::Code) {
        if !self.recorded {
            self.recorded = true;
            self.metrics.grpc_handled(
                self.service,
                self.method,
                code_name(code),
                self.began.elapsed(),
            );
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's status from its trailers.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<CallEnd>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_status)
                    && let Some(call) = this.call
                {
                    call.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call {
                    call.record(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                // A body that ends without trailers: the status came in the
                // headers (recorded), or there was none (not gRPC).
                if let Some(call) = this.call
                    && !call.recorded
                {
                    call.record(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        let served = Served::from_descriptor_sets(&[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        for (path, want) in [
            (
                "/grpc.health.v1.Health/Check",
                ("grpc.health.v1.Health", "Check"),
            ),
            // A served service, a method it does not have.
            (
                "/grpc.health.v1.Health/Nope",
                ("grpc.health.v1.Health", "unknown"),
            ),
            (
                "/grpc.health.v1.Health/Check/x",
                ("grpc.health.v1.Health", "unknown"),
            ),
            ("/random.Svc/Check", ("unknown", "unknown")),
            ("/grpc.health.v1.Health", ("unknown", "unknown")),
            ("grpc.health.v1.Health/Check", ("unknown", "unknown")),
            ("/", ("unknown", "unknown")),
            ("", ("unknown", "unknown")),
        ] {
            assert_eq!(served.labels(path), want, "{path}");
        }
    }
}
