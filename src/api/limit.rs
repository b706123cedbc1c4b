//! [`CallLimit`]: one budget of concurrent calls shared by the services it
//! wraps. A call past the budget is refused at once with RESOURCE_EXHAUSTED
//! instead of queueing: queued calls hold memory and time out anyway, while a
//! refused caller backs off or tries another instance.
//!
//! A streaming call holds its slot until its stream starts; open streams are
//! bounded by their own limits (`MAX_PROGRESS_WATCHERS`).

use futures::future::BoxFuture;
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};
use tokio::sync::Semaphore;
use tonic::{
    Status,
    body::Body,
    codegen::http::{Request, Response},
    server::NamedService,
};
use tower::{Layer, Service};

/// The shared budget; clone it into a [`CallLimitLayer`] per service.
#[derive(Clone)]
pub struct CallBudget {
    permits: Arc<Semaphore>,
    limit: usize,
    refused: Arc<AtomicU64>,
}

impl CallBudget {
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            refused: Arc::default(),
        }
    }

    /// Calls refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }
}

impl<S> Layer<S> for CallBudget {
    type Service = CallLimit<S>;

    fn layer(&self, inner: S) -> CallLimit<S> {
        CallLimit {
            inner,
            budget: self.clone(),
        }
    }
}

/// A service under a [`CallBudget`]; keeps its inner service's gRPC name.
#[derive(Clone)]
pub struct CallLimit<S> {
    inner: S,
    budget: CallBudget,
}

impl<S: NamedService> NamedService for CallLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<Request<B>> for CallLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.budget.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                self.budget.refused.fetch_add(1, Ordering::Relaxed);
                let status = Status::resource_exhausted(format!(
                    "the service is at its limit of {} concurrent calls; retry with backoff",
                    self.budget.limit
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
