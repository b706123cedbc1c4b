//! A few HTTP/2 connections per target, shared by a tool's callers.

use std::{
    sync::{
        RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tonic::transport::{Channel, Endpoint};

/// Channels to one or more targets (service instances), a few per target.
/// Each slot holds a channel and its generation: a caller whose call failed
/// on the connection replaces the slot's channel ([`Pool::replace`],
/// [`Pool::reconnect`]) unless another caller already did since the
/// generation it used.
pub struct Pool {
    slots: Vec<Slot>,
    /// The slots [`Pool::pick`] chooses from: all of them, until
    /// [`Pool::activate`].
    active: RwLock<Vec<usize>>,
    next: AtomicUsize,
    reconnects: AtomicU64,
}

struct Slot {
    target: usize,
    endpoint: Endpoint,
    ch: RwLock<(u64, Channel)>,
}

impl Pool {
    /// `per_target` lazily connected channels to each of `uris` (target `t`
    /// is `uris[t]`), each endpoint set up by `settings`.
    pub fn lazy(
        uris: &[String],
        per_target: usize,
        settings: impl Fn(Endpoint) -> Endpoint,
    ) -> anyhow::Result<Self> {
        let mut slots = Vec::new();
        for (t, uri) in uris.iter().enumerate() {
            let endpoint = settings(Endpoint::from_shared(uri.clone())?);
            for _ in 0..per_target.max(1) {
                let ch = endpoint.connect_lazy();
                slots.push(Slot {
                    target: t,
                    endpoint: endpoint.clone(),
                    ch: RwLock::new((0, ch)),
                });
            }
        }
        Ok(Self::of(slots))
    }

    /// `n` channels to `uri`, each connected now (within `timeout`), the
    /// endpoint set up by `settings`.
    pub async fn connect(
        uri: &str,
        n: usize,
        timeout: Duration,
        settings: impl Fn(Endpoint) -> Endpoint,
    ) -> anyhow::Result<Self> {
        let endpoint = settings(Endpoint::from_shared(uri.to_owned())?);
        let mut slots = Vec::new();
        for _ in 0..n.max(1) {
            let ch = tokio::time::timeout(timeout, endpoint.connect())
                .await
                .map_err(|_| anyhow::anyhow!("connecting to {uri}: timed out"))??;
            slots.push(Slot {
                target: 0,
                endpoint: endpoint.clone(),
                ch: RwLock::new((0, ch)),
            });
        }
        Ok(Self::of(slots))
    }

    fn of(slots: Vec<Slot>) -> Self {
        Self {
            active: RwLock::new((0..slots.len()).collect()),
            slots,
            next: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    fn slot(&self, i: usize) -> &Slot {
        &self.slots[i % self.slots.len()]
    }

    /// Slot `i` (modulo the slots): (generation, channel).
    pub fn get(&self, i: usize) -> (u64, Channel) {
        let s = self.slot(i).ch.read().expect("slot lock");
        (s.0, s.1.clone())
    }

    /// The next slot among the active ones, round-robin: (slot, generation,
    /// channel).
    pub fn pick(&self) -> (usize, u64, Channel) {
        let i = {
            let active = self.active.read().expect("active lock");
            active[self.next.fetch_add(1, Ordering::Relaxed) % active.len()]
        };
        let (generation, ch) = self.get(i);
        (i, generation, ch)
    }

    /// A slot of target `t` (round-robin over its connections).
    pub fn pick_target(&self, t: usize) -> (usize, u64, Channel) {
        let of_t: Vec<usize> = (0..self.slots.len())
            .filter(|i| self.slots[*i].target == t)
            .collect();
        let i = of_t[self.next.fetch_add(1, Ordering::Relaxed) % of_t.len()];
        let (generation, ch) = self.get(i);
        (i, generation, ch)
    }

    /// The channel of target `t`'s first slot.
    pub fn for_target(&self, t: usize) -> Channel {
        let slot = self
            .slots
            .iter()
            .find(|s| s.target == t)
            .expect("every target has a slot");
        slot.ch.read().expect("slot lock").1.clone()
    }

    /// The target a slot belongs to.
    pub fn target_of(&self, slot: usize) -> usize {
        self.slot(slot).target
    }

    /// [`Pool::pick`] chooses among the targets `from..to` only (their slots).
    pub fn activate(&self, from: usize, to: usize) {
        let slots: Vec<usize> = (0..self.slots.len())
            .filter(|i| (from..to).contains(&self.slots[*i].target))
            .collect();
        assert!(!slots.is_empty(), "no slot among targets {from}..{to}");
        *self.active.write().expect("active lock") = slots;
    }

    /// Replaces slot `i` with a new lazy connection unless someone already did
    /// since generation `seen`.
    pub fn replace(&self, i: usize, seen: u64) {
        let slot = self.slot(i);
        let mut s = slot.ch.write().expect("slot lock");
        if s.0 == seen {
            *s = (seen + 1, slot.endpoint.connect_lazy());
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Replaces slot `i` with a connection made now (within `timeout`)
    /// unless someone already did since generation `seen`. If none can be
    /// made, the slot keeps its channel, which reconnects lazily.
    pub async fn reconnect(&self, i: usize, seen: u64, timeout: Duration) {
        let slot = self.slot(i);
        if slot.ch.read().expect("slot lock").0 != seen {
            return;
        }
        let Ok(Ok(ch)) = tokio::time::timeout(timeout, slot.endpoint.connect()).await else {
            return;
        };
        let mut s = slot.ch.write().expect("slot lock");
        if s.0 == seen {
            *s = (seen + 1, ch);
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many times a slot got a new connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime to enter: connect_lazy wants one.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    fn pool(targets: usize, per_target: usize) -> Pool {
        let uris: Vec<String> = (1..=targets)
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        Pool::lazy(&uris, per_target, |e| e).expect("a pool")
    }

    #[test]
    fn the_pool_picks_only_the_active_targets() {
        let rt = runtime();
        let _guard = rt.enter();
        let pool = pool(3, 2);
        pool.activate(0, 2);
        for _ in 0..12 {
            let (slot, _, _) = pool.pick();
            assert!(pool.target_of(slot) < 2);
        }
        pool.activate(2, 3);
        for _ in 0..12 {
            let (slot, _, _) = pool.pick();
            assert_eq!(pool.target_of(slot), 2);
        }
    }

    #[test]
    fn a_slot_is_replaced_once_per_generation() {
        let rt = runtime();
        let _guard = rt.enter();
        let pool = pool(1, 2);
        let (generation, _) = pool.get(3);
        pool.replace(3, generation);
        // A second caller that saw the same generation: already done.
        pool.replace(1, generation);
        assert_eq!(pool.get(1).0, generation + 1);
        assert_eq!(pool.get(0).0, 0);
        assert_eq!(pool.reconnects(), 1);
    }
}
