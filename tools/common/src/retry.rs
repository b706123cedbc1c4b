//! Retries: which failed calls a tool retries ([`Rule`]), the guard that
//! keeps a call from hanging ([`guarded`]), and the one retry loop
//! ([`with_backoff`]) with its pauses ([`doubling`], [`growing`]).

use std::{future::Future, ops::ControlFlow, sync::Arc, time::Duration};
use tonic::{Code, Status};
pub use user_service::transport::is_transport_error;

/// Which failed calls a tool retries: those answered with a code of
/// `always`, and those with a code of `on_transport` that the connection
/// caused (a GOAWAY, a reset connection; told by the error's source chain,
/// see [`user_service::transport`], never by its message).
pub struct Rule {
    pub always: &'static [Code],
    pub on_transport: &'static [Code],
}

impl Rule {
    pub fn retries(&self, s: &Status) -> bool {
        self.always.contains(&s.code())
            || (self.on_transport.contains(&s.code()) && is_transport_error(s))
    }
}

/// What a call gets when the guard beyond its deadline ran out: marked as a
/// transport error (its source), so the caller's slot gets a new connection.
pub fn guard_expired() -> Status {
    let mut s = Status::deadline_exceeded("client-side timeout");
    s.set_source(Arc::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer within the deadline and the guard",
    )));
    s
}

/// `call`, given at most `guard` (a bound beyond the deadline the server
/// sees, so that nothing hangs): past it, [`guard_expired`].
pub async fn guarded<T>(
    guard: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(guard, call)
        .await
        .unwrap_or_else(|_| Err(guard_expired()))
}

/// Runs `attempt(state, 0)`, `attempt(state, 1)`, ... until one breaks
/// with the result, pausing `pause(n)` after attempt `n` continued with the
/// state for the next (what the attempts keep count of: failures, the last
/// error), `first` for the first. What an attempt does between its call and
/// its verdict (count it, replace the connection) is its own.
pub async fn with_backoff<S, T, F>(
    first: S,
    pause: impl Fn(u32) -> Duration,
    mut attempt: impl FnMut(S, u32) -> F,
) -> T
where
    F: Future<Output = ControlFlow<T, S>>,
{
    let mut state = first;
    let mut n = 0u32;
    loop {
        match attempt(state, n).await {
            ControlFlow::Break(out) => return out,
            ControlFlow::Continue(next) => state = next,
        }
        tokio::time::sleep(pause(n)).await;
        n += 1;
    }
}

/// 50 ms doubling up to 1 s, each ±20 % so that the callers do not retry in
/// lockstep: how a client rides out an outage (faultcheck).
pub fn doubling(attempt: u32) -> Duration {
    let base = 50u64.saturating_mul(1 << attempt.min(5)).min(1000);
    let jitter = rand::random_range(0.8..1.2);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// `step`, then 2 × `step`, 3 × `step`, ...: short pauses that keep a
/// measurement going (loadgen).
pub fn growing(step: Duration) -> impl Fn(u32) -> Duration {
    move |attempt| step * (attempt + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pauses() {
        for (n, base) in [(0, 50), (1, 100), (4, 800), (5, 1000), (30, 1000)] {
            let d = doubling(n).as_millis() as f64;
            assert!(
                d >= base as f64 * 0.8 - 1.0 && d < base as f64 * 1.2,
                "{n}: {d}"
            );
        }
        let g = growing(Duration::from_millis(5));
        assert_eq!(
            (g(0), g(2)),
            (Duration::from_millis(5), Duration::from_millis(15))
        );
    }

    #[test]
    fn the_loop_stops_on_the_first_break_and_pauses_between() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let start = std::time::Instant::now();
        let pause = growing(Duration::from_millis(10));
        let out = rt.block_on(with_backoff(Vec::new(), pause, |mut seen, n| async move {
            seen.push(n);
            if n == 3 {
                ControlFlow::Break(seen)
            } else {
                ControlFlow::Continue(seen)
            }
        }));
        assert_eq!(out, vec![0, 1, 2, 3]);
        // 10 + 20 + 30 ms of pauses.
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn a_rule_retries_its_codes_and_transport_failures_of_the_others() {
        let rule = Rule {
            always: &[Code::Unavailable],
            on_transport: &[Code::Internal],
        };
        assert!(rule.retries(&Status::unavailable("x")));
        assert!(!rule.retries(&Status::internal("h2 protocol error: GOAWAY")));
        let mut reset = Status::internal("x");
        reset.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(rule.retries(&reset));
        assert!(
            !rule.retries(&guard_expired()),
            "DEADLINE_EXCEEDED is not in the rule"
        );
        assert!(is_transport_error(&guard_expired()));
    }
}
