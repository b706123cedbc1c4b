//! [`LogEnds`]: what this instance knows of each partition's log end, so a
//! read that asks for a position the log has not reached is refused at once
//! instead of waiting for it.
//!
//! Acknowledgements keep the figures fresh for free; a position past them is
//! checked against the broker. Only a fetch that started after the call
//! began can refuse it: a position acknowledged to anyone before the call
//! began (on this instance or another) is below the high watermark any later
//! fetch sees. Fetches go one at a time per instance, and every call waiting
//! for one shares its answer, so a flood of such reads keeps at most one
//! request in flight to Kafka whatever its size.

use std::{collections::HashMap, sync::Mutex, time::Instant};

/// Whether the log holds an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The offset is in the log (below its end).
    Within,
    /// The log ends at `log_end`, at or before the offset.
    Beyond { log_end: i64 },
    /// No broker said; the caller decides (reads wait, bounded).
    Unknown,
}

#[derive(Debug, Default, Clone, Copy)]
struct Known {
    /// The highest end seen: an acknowledged offset + 1, or a fetched end.
    end: i64,
    /// When the broker was last asked.
    fetched: Option<Instant>,
}

/// Per-partition log ends; see the module docs.
#[derive(Debug, Default)]
pub struct LogEnds {
    known: Mutex<HashMap<i32, Known>>,
    /// One fetch at a time: concurrent callers wait and read its result.
    fetching: tokio::sync::Mutex<()>,
}

impl LogEnds {
    /// The broker acknowledged `offset` on `partition`: the log reaches past it.
    pub fn acknowledged(&self, partition: i32, offset: i64) {
        self.raise(partition, offset.saturating_add(1), None);
    }

    fn raise(&self, partition: i32, end: i64, fetched: Option<Instant>) {
        let mut known = self.known.lock().expect("log end lock poisoned");
        let k = known.entry(partition).or_default();
        k.end = k.end.max(end);
        if fetched.is_some() {
            k.fetched = fetched;
        }
    }

    fn known(&self, partition: i32) -> Known {
        self.known
            .lock()
            .expect("log end lock poisoned")
            .get(&partition)
            .copied()
            .unwrap_or_default()
    }

    /// Whether `offset` of `partition` is in the log, asking the broker
    /// through `fetch` (a blocking call returning the high watermark) only
    /// when what is known does not say.
    pub async fn reach<F>(&self, partition: i32, offset: i64, fetch: F) -> Reach
    where
        F: FnOnce() -> Option<i64> + Send + 'static,
    {
        let began = Instant::now();
        if offset < self.known(partition).end {
            return Reach::Within;
        }
        let _one = self.fetching.lock().await;
        // Someone may have fetched while this call waited: its answer holds
        // for this call if it was asked after this call began.
        let known = self.known(partition);
        if offset < known.end {
            return Reach::Within;
        }
        if known.fetched.is_some_and(|asked| asked >= began) {
            return Reach::Beyond { log_end: known.end };
        }
        let asked = Instant::now();
        match tokio::task::spawn_blocking(fetch).await.ok().flatten() {
            Some(end) => {
                self.raise(partition, end, Some(asked));
                if offset < end {
                    Reach::Within
                } else {
                    Reach::Beyond { log_end: end }
                }
            }
            None => Reach::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    #[tokio::test]
    async fn acknowledged_offsets_need_no_fetch() {
        let ends = LogEnds::default();
        ends.acknowledged(1, 41);
        assert_eq!(ends.reach(1, 41, || panic!("fetched")).await, Reach::Within);
        assert_eq!(
            ends.reach(1, 42, || Some(42)).await,
            Reach::Beyond { log_end: 42 }
        );
        assert_eq!(ends.reach(0, 0, || None).await, Reach::Unknown);
    }

    #[tokio::test]
    async fn an_older_fetch_never_refuses_a_newer_call() {
        let ends = LogEnds::default();
        assert_eq!(
            ends.reach(2, 154, || Some(154)).await,
            Reach::Beyond { log_end: 154 }
        );
        // Another instance's create was acknowledged at 154 since: a call
        // that began after that fetch asks again.
        assert_eq!(ends.reach(2, 154, || Some(155)).await, Reach::Within);
    }

    #[tokio::test]
    async fn a_flood_past_the_end_shares_its_fetches() {
        let ends = Arc::new(LogEnds::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let calls = (0..1000).map(|i| {
            let (ends, fetches) = (ends.clone(), fetches.clone());
            tokio::spawn(async move {
                ends.reach(0, 1_000 + i, move || {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Some(10)
                })
                .await
            })
        });
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap(), Reach::Beyond { log_end: 10 });
        }
        // The first call's fetch, and one shared by every call that began
        // while it ran.
        assert!(fetches.load(Ordering::SeqCst) <= 2, "{fetches:?}");
    }
}
