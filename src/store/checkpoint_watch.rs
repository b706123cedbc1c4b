//! [`CheckpointWatch`]: one poller per instance for every call that waits
//! until the read model has applied a position (GetUser's read-your-write,
//! CreateUser's wait for the log's verdict). Redis sees one `HMGET` per
//! partition waited on per poll, however many calls wait; nobody polls while nobody waits, and the
//! local projector pokes the poller after each batch, so a wait ends within a
//! round trip of the apply.
//!
//! The poll interval starts at [`POLL_INTERVAL`] and doubles up to
//! [`MAX_POLL_INTERVAL`] while the checkpoints stand still; a poke, a moved
//! checkpoint or the first waiter after a quiet spell brings it back. Calls
//! waiting on a position that does not come thus cost Redis about 40 commands
//! a second, however many there are and however often they come.

use super::{Checkpoints, PartitionState, RedisStore, StoreError};
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// Pause between polls while someone waits and the checkpoints move (a poke
/// cuts it short).
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// The longest pause between polls, reached while the checkpoints stand still.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a wait ended without the position.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("position not applied before the deadline")]
    Timeout,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// The newest poll: when it was taken, and what it found.
#[derive(Debug, Clone)]
struct Snapshot {
    taken: Instant,
    result: Result<Arc<Checkpoints>, String>,
}

/// Shared by every waiting call on an instance; see the module docs.
pub struct CheckpointWatch {
    store: RedisStore,
    tx: watch::Sender<Option<Snapshot>>,
    waiters: AtomicUsize,
    /// The partitions waited on, and by how many calls: only they are polled.
    waited: std::sync::Mutex<HashMap<i32, usize>>,
    wake: Notify,
    shutdown: CancellationToken,
    /// Polls made so far, for tests and the benchmark.
    polls: AtomicU64,
}

impl CheckpointWatch {
    pub fn new(store: RedisStore, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            store,
            tx: watch::Sender::new(None),
            waiters: AtomicUsize::new(0),
            waited: std::sync::Mutex::default(),
            wake: Notify::new(),
            shutdown,
            polls: AtomicU64::new(0),
        })
    }

    /// How many times Redis was polled so far.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Polls while anyone waits, until shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut interval = POLL_INTERVAL;
        let mut last: Option<Arc<Checkpoints>> = None;
        loop {
            if self.waiters.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = self.wake.notified() => {
                        interval = POLL_INTERVAL;
                        continue;
                    }
                }
            }
            let partitions: Vec<i32> = self
                .waited
                .lock()
                .expect("waited lock poisoned")
                .keys()
                .copied()
                .collect();
            let result = self
                .store
                .checkpoints(partitions)
                .await
                .map(Arc::new)
                .map_err(|e| e.to_string());
            self.polls.fetch_add(1, Ordering::Relaxed);
            let moved = match &result {
                Ok(c) => last.as_deref() != Some(c),
                Err(_) => false,
            };
            if let Ok(c) = &result {
                last = Some(c.clone());
            }
            interval = if moved {
                POLL_INTERVAL
            } else {
                (interval * 2).min(MAX_POLL_INTERVAL)
            };
            self.tx.send_replace(Some(Snapshot {
                taken: Instant::now(),
                result,
            }));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => interval = POLL_INTERVAL,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Something was applied here: poll now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Waits until the read model has applied `partition` up to `offset`, by a
    /// poll taken after the call began; answers the partition's state then.
    pub async fn wait_applied(
        &self,
        partition: i32,
        offset: i64,
        deadline: Instant,
    ) -> Result<PartitionState, WaitError> {
        self.wait_for(partition, deadline, |s| {
            s.checkpoint().is_some_and(|c| c >= offset)
        })
        .await
    }

    /// Waits until the read model vouches for every event of `partition` up
    /// to its checkpoint (no rebuild under way).
    pub async fn wait_complete(
        &self,
        partition: i32,
        deadline: Instant,
    ) -> Result<PartitionState, WaitError> {
        self.wait_for(partition, deadline, PartitionState::is_complete)
            .await
    }

    async fn wait_for(
        &self,
        partition: i32,
        deadline: Instant,
        done: impl Fn(PartitionState) -> bool,
    ) -> Result<PartitionState, WaitError> {
        let since = Instant::now();
        let _waiting = Waiting::register(self, partition);
        let mut rx = self.tx.subscribe();
        let mut last_error = None;
        loop {
            if let Some(snapshot) = rx.borrow_and_update().as_ref().filter(|s| s.taken >= since) {
                match &snapshot.result {
                    Ok(c) => {
                        let state = c.state(partition);
                        if done(state) {
                            return Ok(state);
                        }
                        last_error = None;
                    }
                    Err(e) => last_error = Some(e.clone()),
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Err(WaitError::ShuttingDown) },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(match last_error {
                        Some(e) => WaitError::Store(StoreError::Unavailable(e)),
                        None => WaitError::Timeout,
                    });
                }
                _ = self.shutdown.cancelled() => return Err(WaitError::ShuttingDown),
            }
        }
    }
}

/// Counts a waiter (and its partition) for as long as it lives, and wakes
/// the poller.
struct Waiting<'a>(&'a CheckpointWatch, i32);

impl<'a> Waiting<'a> {
    fn register(watch: &'a CheckpointWatch, partition: i32) -> Self {
        *watch
            .waited
            .lock()
            .expect("waited lock poisoned")
            .entry(partition)
            .or_default() += 1;
        // Only the first waiter wakes an idle poller; later ones take the
        // next poll, so a stream of new waiters cannot speed it up.
        if watch.waiters.fetch_add(1, Ordering::AcqRel) == 0 {
            watch.wake.notify_one();
        }
        Self(watch, partition)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
        let mut waited = self.0.waited.lock().expect("waited lock poisoned");
        if let Some(n) = waited.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                waited.remove(&self.1);
            }
        }
    }
}
