//! [`ProgressHub`]: one poller per watched (group, topic), shared by all its
//! watchers, so Kafka is asked once per interval however many watch.

use super::{
    history::History,
    kafka_reader::{GroupReader, ProgressError},
    model::{GroupState, ReadModelPosition, Snapshot},
};
use crate::tasks::Tasks;
use crate::{
    kafka::KafkaLink,
    projector::ProjectorState,
    store::{Checkpoints, PartitionState, RedisStore},
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

type Latest = Option<Result<Arc<Snapshot>, Arc<ProgressError>>>;
type Pollers = Arc<Mutex<HashMap<(String, String), Arc<Poller>>>>;

/// Why a watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("too many progress watchers on this instance (at most {0})")]
    TooManyWatchers(usize),
    #[error(transparent)]
    Progress(#[from] Arc<ProgressError>),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// The service's own group and topic, and where their applied offsets live.
#[derive(Clone)]
pub struct OwnProjection {
    pub group: String,
    pub topic: String,
    /// This instance's projector (applied but uncommitted offsets).
    pub state: Option<Arc<ProjectorState>>,
    /// The read model, whose own checkpoint (and rebuild target) each poll of
    /// the own group reads beside Kafka's figures.
    pub store: Option<RedisStore>,
    /// The topic's partition map: partitions it routes no id to are marked
    /// unused.
    pub routing: Option<Arc<crate::kafka::Routing>>,
}

/// Hands out subscriptions to shared pollers.
pub struct ProgressHub {
    link: KafkaLink,
    own: OwnProjection,
    max_watchers: usize,
    watchers: Arc<Semaphore>,
    /// Shared with the poller tasks, which remove themselves when unwatched.
    pollers: Pollers,
    /// Every poller ends on it at shutdown.
    token: CancellationToken,
    /// Pollers are joined with the other tasks at shutdown.
    tasks: Tasks,
    kafka_timeout: Duration,
    /// Polls of Kafka made by all pollers, for tests and metrics.
    polls: Arc<AtomicU64>,
}

struct Poller {
    latest: watch::Sender<Latest>,
    /// Wakes the poller for a new watcher that needs a snapshot now.
    poke: Notify,
    /// Active subscriptions and their intervals; the poller runs at the fastest.
    intervals: Mutex<HashMap<u64, Duration>>,
    next_id: AtomicU64,
    /// The period the poller sleeps now (nanoseconds), so a faster watcher
    /// knows to wake it.
    period_nanos: AtomicU64,
}

/// A watcher's hold on a poller; dropping it (the client left) unregisters it,
/// and the poller stops when nobody is left.
pub struct Subscription {
    poller: Arc<Poller>,
    id: u64,
    rx: watch::Receiver<Latest>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.poller.intervals).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks.
    m.lock().expect("progress lock poisoned")
}

impl Poller {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            latest: watch::Sender::new(None),
            poke: Notify::new(),
            intervals: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            period_nanos: AtomicU64::new(0),
        })
    }
}

impl ProgressHub {
    pub fn new(
        link: &KafkaLink,
        own: OwnProjection,
        max_watchers: usize,
        kafka_timeout: Duration,
        token: CancellationToken,
        tasks: Tasks,
    ) -> Self {
        Self {
            link: link.clone(),
            own,
            max_watchers,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            pollers: Pollers::default(),
            token,
            tasks,
            kafka_timeout,
            polls: Arc::default(),
        }
    }

    /// How many times Kafka was polled so far, over all watched groups.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    pub fn own_group(&self) -> &str {
        &self.own.group
    }

    pub fn own_topic(&self) -> &str {
        &self.own.topic
    }

    /// Subscribes to (group, topic) at `interval`, taking one of the
    /// instance's watcher slots for as long as the subscription lives (a
    /// one-off GetProgress too). Returns once the first snapshot is in.
    pub async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        interval: Duration,
    ) -> Result<(Subscription, Arc<Snapshot>), WatchError> {
        if self.token.is_cancelled() {
            return Err(WatchError::ShuttingDown);
        }
        let permit = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchError::TooManyWatchers(self.max_watchers))?;
        let poller = {
            let mut pollers = lock(&self.pollers);
            let key = (group.to_owned(), topic.to_owned());
            pollers
                .entry(key.clone())
                .or_insert_with(|| self.start_poller(key))
                .clone()
        };
        let id = poller.next_id.fetch_add(1, Ordering::Relaxed);
        // Under the intervals lock, which the poller also holds while it plans
        // its period: either it sees this interval, or this sees its period.
        let faster = {
            let mut intervals = lock(&poller.intervals);
            intervals.insert(id, interval);
            interval < Duration::from_nanos(poller.period_nanos.load(Ordering::Relaxed))
        };
        if faster {
            // The poller may be sleeping a longer period: wake it to re-plan.
            poller.poke.notify_one();
        }
        let mut sub = Subscription {
            rx: poller.latest.subscribe(),
            poller,
            id,
            _permit: permit,
        };
        let first = sub.first(interval, &self.token).await?;
        if group != self.own.group
            && first.state == GroupState::Dead
            && first.partitions.iter().all(|p| p.committed.is_none())
        {
            return Err(Arc::new(ProgressError::UnknownGroup(group.to_owned())).into());
        }
        Ok((sub, first))
    }

    fn start_poller(&self, key: (String, String)) -> Arc<Poller> {
        let poller = Poller::new();
        let task = PollerTask {
            poller: poller.clone(),
            key,
            link: self.link.clone(),
            own: self.own.clone(),
            timeout: self.kafka_timeout,
            token: self.token.clone(),
            polls: self.polls.clone(),
        };
        self.tasks
            .spawn("progress poller", task.run(self.pollers.clone()));
        poller
    }
}

impl Subscription {
    /// The first snapshot: the poller's latest if it is recent enough,
    /// otherwise a fresh poll, right away.
    async fn first(
        &mut self,
        interval: Duration,
        token: &CancellationToken,
    ) -> Result<Arc<Snapshot>, WatchError> {
        let fresh = |l: &Latest| match l {
            Some(Ok(s)) => s.taken.elapsed() <= interval,
            _ => false,
        };
        let latest = self.rx.borrow_and_update().clone();
        if !fresh(&latest) {
            // A new poller polls at once by itself; an existing one is woken.
            if latest.is_some() {
                self.poller.poke.notify_one();
            }
            loop {
                tokio::select! {
                    _ = token.cancelled() => return Err(WatchError::ShuttingDown),
                    changed = self.rx.changed() => {
                        if changed.is_err() {
                            return Err(WatchError::ShuttingDown);
                        }
                    }
                }
                if self.rx.borrow_and_update().is_some() {
                    break;
                }
            }
        }
        self.latest().ok_or(WatchError::ShuttingDown)?
    }

    /// The next snapshot newer than `after`, no sooner than `not_before`:
    /// each call gives a fresh poll, never the same snapshot twice. `None`
    /// when the poller is gone (shutdown).
    pub async fn next_after(
        &mut self,
        after: std::time::Instant,
        not_before: tokio::time::Instant,
    ) -> Option<Result<Arc<Snapshot>, WatchError>> {
        tokio::time::sleep_until(not_before).await;
        loop {
            match self.latest() {
                Some(Ok(s)) if s.taken > after => return Some(Ok(s)),
                Some(Err(e)) => return Some(Err(e)),
                _ => {}
            }
            self.rx.changed().await.ok()?;
        }
    }

    /// The newest result of the shared poller.
    pub fn latest(&self) -> Option<Result<Arc<Snapshot>, WatchError>> {
        self.rx
            .borrow()
            .as_ref()
            .map(|r| r.clone().map_err(WatchError::from))
    }
}

struct PollerTask {
    poller: Arc<Poller>,
    key: (String, String),
    link: KafkaLink,
    own: OwnProjection,
    timeout: Duration,
    token: CancellationToken,
    polls: Arc<AtomicU64>,
}

impl PollerTask {
    async fn run(self, pollers: Pollers) {
        let (group, topic) = self.key.clone();
        let mut history = History::default();
        let mut reader = None;
        tracing::debug!(%group, %topic, "progress poller started");
        loop {
            // Stop when nobody watches; checked under the hub's lock so that a
            // new subscriber either finds this poller alive or starts another.
            let period = {
                let mut map = lock(&pollers);
                let intervals = lock(&self.poller.intervals);
                match intervals.values().min().copied() {
                    Some(p) => {
                        let nanos = u64::try_from(p.as_nanos()).unwrap_or(u64::MAX);
                        self.poller.period_nanos.store(nanos, Ordering::Relaxed);
                        p
                    }
                    None => {
                        map.remove(&self.key);
                        break;
                    }
                }
            };

            let own = group == self.own.group && topic == self.own.topic;
            // Redis before Kafka: whatever the read model applied was in the
            // log by then, so its offset never passes the log end reported.
            let read_model = match &self.own.store {
                Some(store) if own => read_model(store).await,
                _ => BTreeMap::new(),
            };
            let result = self.poll(&mut reader, &group, &topic).await;
            self.polls.fetch_add(1, Ordering::Relaxed);
            let latest = result.map(|obs| {
                let applied = match &self.own.state {
                    Some(state) if own => state.stats().applied_offsets,
                    _ => BTreeMap::new(),
                };
                let mut snapshot = history.observe(&group, &topic, &obs, &applied, &read_model);
                if own && let Some(map) = self.own.routing.as_ref().and_then(|r| r.map()) {
                    for p in &mut snapshot.partitions {
                        p.unused = !map.routes(p.partition);
                    }
                }
                Arc::new(snapshot)
            });
            self.poller
                .latest
                .send_replace(Some(latest.map_err(Arc::new)));

            tokio::select! {
                _ = self.token.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
                _ = self.poller.poke.notified() => {}
            }
        }
        tracing::debug!(%group, %topic, "progress poller stopped");
    }

    /// One observation of Kafka; the reader is built on first use and kept.
    async fn poll(
        &self,
        reader: &mut Option<GroupReader>,
        group: &str,
        topic: &str,
    ) -> Result<super::model::Observation, ProgressError> {
        let r = match reader.take() {
            Some(r) => r,
            None => GroupReader::new(&self.link, group, topic, self.timeout)?,
        };
        // The reader's calls block: run them off the async workers.
        let (r, result) = tokio::task::spawn_blocking(move || {
            let result = r.observe();
            (r, result)
        })
        .await
        .map_err(|e| ProgressError::Unavailable(format!("progress poll panicked: {e}")))?;
        *reader = Some(r);
        result
    }
}

/// The read model's checkpoint per partition; empty when Redis cannot be
/// read (the snapshot then goes without it, it does not fail).
async fn read_model(store: &RedisStore) -> BTreeMap<i32, ReadModelPosition> {
    match store.all_checkpoints().await {
        Ok(checkpoints) => positions(&checkpoints),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the read model's checkpoints for progress");
            BTreeMap::new()
        }
    }
}

/// Per partition Redis holds a checkpoint for: the next offset to apply, and
/// the rebuild target while the partition is rebuilding.
fn positions(checkpoints: &Checkpoints) -> BTreeMap<i32, ReadModelPosition> {
    checkpoints
        .applied
        .keys()
        .filter_map(|p| {
            let position = match checkpoints.state(*p) {
                PartitionState::Unknown => return None,
                PartitionState::Rebuilding { checkpoint, target } => ReadModelPosition {
                    next: checkpoint + 1,
                    rebuild_target: Some(target),
                },
                PartitionState::Complete { checkpoint } => ReadModelPosition {
                    next: checkpoint + 1,
                    rebuild_target: None,
                },
            };
            Some((*p, position))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_read_models_checkpoint_is_the_next_offset_and_a_target_only_while_rebuilding() {
        let checkpoints = Checkpoints {
            applied: HashMap::from([(0, 41), (1, 9), (2, -1)]),
            // Partition 1 reached its target (9 = 10 - 1): done rebuilding.
            rebuild: HashMap::from([(0, 100), (1, 10), (3, 7)]),
        };
        let at = |next, target| ReadModelPosition {
            next,
            rebuild_target: target,
        };
        assert_eq!(
            positions(&checkpoints),
            BTreeMap::from([(0, at(42, Some(100))), (1, at(10, None)), (2, at(0, None)),])
        );
    }

    fn snapshot(time: std::time::SystemTime, taken: std::time::Instant) -> Latest {
        Some(Ok(Arc::new(Snapshot {
            time,
            taken,
            group: "g".into(),
            topic: "t".into(),
            state: GroupState::Stable,
            members: vec![],
            partitions: vec![],
            totals: Default::default(),
        })))
    }

    #[tokio::test]
    async fn snapshots_are_ordered_by_the_monotonic_clock_not_the_wall() {
        let poller = Poller::new();
        let mut sub = Subscription {
            rx: poller.latest.subscribe(),
            poller: poller.clone(),
            id: 0,
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        };
        let wall = std::time::SystemTime::now();
        let first = std::time::Instant::now();
        poller.latest.send_replace(snapshot(wall, first));
        // The next poll, after the wall clock stepped back an hour.
        let later = first + Duration::from_millis(1);
        poller
            .latest
            .send_replace(snapshot(wall - Duration::from_secs(3600), later));
        let next = tokio::time::timeout(
            Duration::from_secs(5),
            sub.next_after(first, tokio::time::Instant::now()),
        )
        .await
        .expect("the newer poll is delivered")
        .expect("the poller is there")
        .expect("a snapshot");
        assert_eq!(next.taken, later);
    }
}
