//! Retrying until done or stopped: the one way the service's loops wait
//! between failed attempts (a Redis apply, a dead letter, a copy to an id's
//! partition). Each gets an exponential schedule from `backon`, capped, with
//! no limit on attempts: the work must happen before the loop moves on, so
//! only the service stopping ends it (the work is then replayed from the log
//! by whoever resumes).

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use std::{future::Future, time::Duration};
use tokio_util::sync::CancellationToken;

/// An exponential schedule from `first` doubling up to `max`, without end.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub first: Duration,
    pub max: Duration,
}

impl Schedule {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    fn builder(self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .without_max_times()
    }

    /// The delays, for loops that keep state between attempts (see
    /// [`pause`]).
    pub fn delays(self) -> impl Iterator<Item = Duration> {
        self.builder().build()
    }
}

/// Runs `attempt` until it succeeds, waiting the schedule's delay after each
/// failure (`failed` sees the error and the delay, to log it). `None` if
/// `token` is cancelled first.
pub async fn until_done<T, E, F, Fut>(
    token: &CancellationToken,
    schedule: Schedule,
    attempt: F,
    failed: impl FnMut(&E, Duration),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let retried = attempt
        .retry(schedule.builder())
        .sleep(tokio::time::sleep)
        .notify(failed);
    tokio::select! {
        _ = token.cancelled() => None,
        // Without a limit on attempts, an error never comes out.
        done = retried => done.ok(),
    }
}

/// Waits `delay`, or until `token` is cancelled (then false).
pub async fn pause(token: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_with_doubling_delays_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let mut waited = Vec::new();
        let token = CancellationToken::new();
        let schedule = Schedule::new(Duration::from_millis(50), Duration::from_millis(300));
        let out = until_done(
            &token,
            schedule,
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 5 { Err(n) } else { Ok(n) }
            },
            |_, d| waited.push(d.as_millis()),
        )
        .await;
        assert_eq!(out, Some(5));
        assert_eq!(waited, [50, 100, 200, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_token_ends_the_retries() {
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            stop.cancel();
        });
        let out: Option<()> = until_done(
            &token,
            Schedule::new(Duration::from_millis(100), Duration::from_secs(1)),
            || async { Err::<(), _>("down") },
            |_, _| {},
        )
        .await;
        assert_eq!(out, None);
        assert!(!pause(&token, Duration::from_secs(60)).await);
    }
}
