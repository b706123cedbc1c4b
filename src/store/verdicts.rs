//! [`Verdicts`]: the local projector tells a waiting CreateUser what the
//! apply of its event decided, in process.
//!
//! A create learns the log's verdict once the read model has applied its
//! event. Through Redis that is a poll of the checkpoint, then a read of the
//! user: two round trips after the apply, and the poller's wake-ups. When
//! this instance's projector applies the event, it already knows whether the
//! event created the user (the apply script says so), so it hands the
//! verdict to the waiting call directly. The log still decides; only the
//! messenger changes. A call whose partition another instance owns, or whose
//! event was applied before it asked, takes the Redis path as before.

use crate::domain::EventPosition;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Mutex,
};

/// How many of the latest verdicts are kept for a call that asks just after
/// its event was applied (the projector's fetch can beat the producer's
/// acknowledgement back to the call).
const RECENT: usize = 8192;
use tokio::sync::oneshot;

/// What the apply of one event decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// The event created its user: the user is the event's.
    Created,
    /// The event created nothing (its id was taken, or its partition sealed).
    NotCreated,
}

/// Shared by the projector and every CreateUser on an instance.
#[derive(Default)]
pub struct Verdicts {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Calls waiting for the event at a position.
    waiting: HashMap<EventPosition, oneshot::Sender<Decided>>,
    /// Per partition, the last offset the local projector applied: a call
    /// that asks for a position at or below it was decided already.
    applied: HashMap<i32, i64>,
    /// The partitions the local projector owns: only their events get a
    /// verdict here.
    owned: HashSet<i32>,
    /// The latest verdicts, oldest first, at most [`RECENT`].
    recent: HashMap<EventPosition, Decided>,
    recent_order: VecDeque<EventPosition>,
}

/// What a call learns when it asks for its event's verdict.
pub enum Expect<'a> {
    /// Decided already, just before the call asked.
    Decided(Decided),
    /// Registered: the verdict comes when the local projector applies it.
    Pending(Pending<'a>),
    /// Not decided here (another instance owns the partition, or the verdict
    /// is no longer kept): ask Redis.
    Elsewhere,
}

/// A registered wait; dropping it unregisters.
pub struct Pending<'a> {
    verdicts: &'a Verdicts,
    position: EventPosition,
    rx: Option<oneshot::Receiver<Decided>>,
}

impl Verdicts {
    /// The verdict of the event at `position`, or a wait for it if the local
    /// projector owns its partition and has not applied it yet.
    pub fn expect(&self, position: EventPosition) -> Expect<'_> {
        let mut inner = self.inner.lock().expect("verdicts lock");
        if !inner.owned.contains(&position.partition) {
            return Expect::Elsewhere;
        }
        if inner
            .applied
            .get(&position.partition)
            .is_some_and(|a| *a >= position.offset)
        {
            return match inner.recent.get(&position) {
                Some(d) => Expect::Decided(*d),
                None => Expect::Elsewhere,
            };
        }
        let (tx, rx) = oneshot::channel();
        inner.waiting.insert(position, tx);
        Expect::Pending(Pending {
            verdicts: self,
            position,
            rx: Some(rx),
        })
    }

    /// The projector applied `partition` up to `last`; `decided` lists what
    /// each applied event decided. Called after the apply succeeded.
    pub fn decided(
        &self,
        partition: i32,
        last: i64,
        decided: impl IntoIterator<Item = (i64, Decided)>,
    ) {
        let mut inner = self.inner.lock().expect("verdicts lock");
        let applied = inner.applied.entry(partition).or_insert(last);
        *applied = (*applied).max(last);
        for (offset, d) in decided {
            let position = EventPosition { partition, offset };
            if let Some(tx) = inner.waiting.remove(&position) {
                let _ = tx.send(d);
            }
            if inner.recent.insert(position, d).is_none() {
                inner.recent_order.push_back(position);
            }
            if inner.recent_order.len() > RECENT
                && let Some(old) = inner.recent_order.pop_front()
            {
                inner.recent.remove(&old);
            }
        }
    }

    /// The local projector was given `partition`.
    pub fn own(&self, partition: i32) {
        self.inner
            .lock()
            .expect("verdicts lock")
            .owned
            .insert(partition);
    }

    /// The local projector no longer applies `partition` (revoked, or its
    /// consumer replaced): the partition's waits end and go to Redis.
    pub fn forget(&self, partition: i32) {
        let mut inner = self.inner.lock().expect("verdicts lock");
        inner.owned.remove(&partition);
        inner.applied.remove(&partition);
        inner.waiting.retain(|p, _| p.partition != partition);
        inner.recent.retain(|p, _| p.partition != partition);
        inner.recent_order.retain(|p| p.partition != partition);
    }

    /// Calls waiting now (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.inner.lock().expect("verdicts lock").waiting.len()
    }
}

impl Pending<'_> {
    /// The verdict, once the local projector applies the event; `None` if it
    /// never will (the partition went elsewhere).
    pub async fn decided(&mut self) -> Option<Decided> {
        let rx = self.rx.as_mut()?;
        let d = rx.await.ok();
        self.rx = None;
        d
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.verdicts
                .inner
                .lock()
                .expect("verdicts lock")
                .waiting
                .remove(&self.position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> EventPosition {
        EventPosition {
            partition: 1,
            offset,
        }
    }

    impl<'a> Expect<'a> {
        fn pending(self) -> Pending<'a> {
            match self {
                Expect::Pending(p) => p,
                _ => panic!("expected a pending wait"),
            }
        }
    }

    #[test]
    fn only_the_latest_verdicts_are_kept() {
        let v = owning(&[1]);
        v.decided(
            1,
            RECENT as i64,
            (0..=RECENT as i64).map(|o| (o, Decided::Created)),
        );
        assert!(matches!(v.expect(at(0)), Expect::Elsewhere));
        assert!(matches!(v.expect(at(RECENT as i64)), Expect::Decided(_)));
    }

    fn owning(partitions: &[i32]) -> Verdicts {
        let v = Verdicts::default();
        for p in partitions {
            v.own(*p);
        }
        v
    }

    #[tokio::test]
    async fn a_wait_gets_its_events_verdict() {
        let v = owning(&[1]);
        let mut created = v.expect(at(5)).pending();
        let mut taken = v.expect(at(6)).pending();
        v.decided(1, 6, [(5, Decided::Created), (6, Decided::NotCreated)]);
        assert_eq!(created.decided().await, Some(Decided::Created));
        assert_eq!(taken.decided().await, Some(Decided::NotCreated));
        assert_eq!(v.waiting(), 0);
    }

    #[tokio::test]
    async fn a_position_applied_before_the_wait_or_owned_elsewhere_goes_to_redis() {
        let v = owning(&[1, 2]);
        v.decided(1, 9, [(8, Decided::NotCreated), (9, Decided::Created)]);
        // Asked just after the apply: the kept verdict.
        assert!(matches!(v.expect(at(9)), Expect::Decided(Decided::Created)));
        assert!(matches!(
            v.expect(at(8)),
            Expect::Decided(Decided::NotCreated)
        ));
        // Applied, but not by this projector (no verdict kept): Redis.
        assert!(matches!(v.expect(at(3)), Expect::Elsewhere));
        assert!(matches!(v.expect(at(10)), Expect::Pending(_)));
        // Another partition is not decided by this one.
        let other = |partition| EventPosition {
            partition,
            offset: 0,
        };
        assert!(matches!(v.expect(other(2)), Expect::Pending(_)));
        assert!(
            matches!(v.expect(other(3)), Expect::Elsewhere),
            "not owned here"
        );
    }

    #[tokio::test]
    async fn a_forgotten_partition_ends_its_waits_and_a_dropped_wait_unregisters() {
        let v = owning(&[1]);
        let mut w = v.expect(at(3)).pending();
        v.forget(1);
        assert_eq!(w.decided().await, None);
        assert!(
            matches!(v.expect(at(4)), Expect::Elsewhere),
            "no longer owned"
        );
        v.own(1);
        let dropped = v.expect(at(4)).pending();
        assert_eq!(v.waiting(), 1);
        drop(dropped);
        assert_eq!(v.waiting(), 0);
    }
}
