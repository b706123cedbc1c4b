//! [`Tasks`]: every task the service starts, tracked so shutdown joins them
//! all, and supervised so that a panic in any of them stops the service
//! instead of leaving it half alive.
//!
//! A panic is a bug whose damage nobody can bound: the service drains what
//! it can and exits non-zero, and the orchestrator starts a fresh process.
//! Handler panics are caught by the same rule (see `startup`), so the caller
//! gets INTERNAL and the process still stops.

use futures::FutureExt;
use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Cheap to clone; all clones share one tracker and one record of panics.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    /// Cancelled by the first panic.
    fatal: CancellationToken,
    /// What panicked, and where; the first one is reported.
    panics: Arc<Mutex<Vec<String>>>,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `future` on the tracker; a panic in it is recorded as fatal.
    pub fn spawn<F>(
        &self,
        name: &'static str,
        future: F,
    ) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            match AssertUnwindSafe(future).catch_unwind().await {
                Ok(out) => Some(out),
                Err(panic) => {
                    this.panicked(name, panic.as_ref());
                    None
                }
            }
        })
    }

    /// Records a panic in `place` and starts the stop.
    pub fn panicked(&self, place: &str, panic: &(dyn Any + Send)) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let what = format!("{place}: {message}");
        tracing::error!(panic = %what, "panic: the service stops");
        self.panics
            .lock()
            .expect("panic record poisoned")
            .push(what);
        self.fatal.cancel();
    }

    /// Cancelled by the first panic.
    pub fn fatal(&self) -> &CancellationToken {
        &self.fatal
    }

    /// The first panic, if any.
    pub fn first_panic(&self) -> Option<String> {
        self.panics
            .lock()
            .expect("panic record poisoned")
            .first()
            .cloned()
    }

    /// No new tasks from now on; [`Tasks::wait`] then ends with the last one.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Waits for every task (after [`Tasks::close`]).
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_recorded_and_fatal() {
        let tasks = Tasks::new();
        let ok = tasks.spawn("fine", async { 7 });
        assert_eq!(ok.await.unwrap(), Some(7));
        assert!(!tasks.fatal().is_cancelled());
        let bad = tasks.spawn("bad", async { panic!("boom") });
        assert_eq!(bad.await.unwrap(), None::<()>);
        assert!(tasks.fatal().is_cancelled());
        assert_eq!(tasks.first_panic().as_deref(), Some("bad: boom"));
        tasks.close();
        tasks.wait().await;
    }
}
