//! What the projector has done, shared with the API (progress, tests).

use crate::store::ApplyOutcome;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

/// Counters and positions the projector updates and others read.
#[derive(Debug, Default)]
pub struct ProjectorState {
    applied: AtomicU64,
    duplicates: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    rehomed: AtomicU64,
    legacy_superseded: AtomicU64,
    apply_failures: AtomicU64,
    checkpoint_moves: AtomicU64,
    /// Assignments received or lost.
    rebalances: AtomicU64,
    /// librdkafka says this member is in its group (stats `cgrp.state` up,
    /// `join_state` steady); refreshed every statistics interval.
    in_group: AtomicBool,
    /// Consumers the watchdog replaced (cut off from a reachable cluster).
    client_replacements: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    assignment: BTreeSet<i32>,
    /// Last offset applied to Redis per partition by this instance; committed
    /// at the next auto-commit.
    applied_offsets: BTreeMap<i32, i64>,
    /// The read model's checkpoint of each partition this member opened.
    checkpoints: BTreeMap<i32, i64>,
}

/// A copy of [`ProjectorState`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectorStats {
    /// Users written to the read model.
    pub applied: u64,
    /// Events for ids the read model already had.
    pub duplicates: u64,
    /// Replayed events that changed nothing.
    pub skipped: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// The article's events copied to their ids' partitions (acknowledged).
    pub rehomed: u64,
    /// The article's events that created nothing because their id was
    /// already taken by another user (the first event wins here, the Go
    /// service kept the last): ids whose users the two read models disagree on.
    pub legacy_superseded: u64,
    /// Failed attempts to apply a batch or to open a partition (Redis or
    /// Kafka down).
    pub apply_failures: u64,
    /// Partitions this instance owns now.
    pub assignment: BTreeSet<i32>,
    /// Last offset this instance applied per partition.
    pub applied_offsets: BTreeMap<i32, i64>,
    /// The read model's checkpoint of each partition this member resumed.
    pub checkpoints: BTreeMap<i32, i64>,
    /// Times Redis was found holding another checkpoint than the one this
    /// member resumed from (Redis lost data, or a rebalance overlapped).
    pub checkpoint_moves: u64,
    /// Whether librdkafka reports this member in its group.
    pub in_group: bool,
    /// Times this member's assignment changed.
    pub rebalances: u64,
}

impl ProjectorState {
    pub(super) fn set_assignment(&self, assignment: BTreeSet<i32>) {
        let mut inner = self.inner.lock().expect("projector state lock poisoned");
        inner.applied_offsets.retain(|p, _| assignment.contains(p));
        if inner.assignment != assignment {
            self.rebalances.fetch_add(1, Ordering::Relaxed);
        }
        inner.assignment = assignment;
    }

    pub(super) fn record_batch(&self, outcome: ApplyOutcome, dead: u64, last: &BTreeMap<i32, i64>) {
        self.applied.fetch_add(outcome.applied, Ordering::Relaxed);
        self.duplicates
            .fetch_add(outcome.duplicates, Ordering::Relaxed);
        self.skipped.fetch_add(outcome.skipped, Ordering::Relaxed);
        self.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("projector state lock poisoned");
        inner.applied_offsets.extend(last);
    }

    /// The partitions this member owns now (cheaper than [`Self::stats`]).
    pub fn assignment(&self) -> BTreeSet<i32> {
        let inner = self.inner.lock().expect("projector state lock poisoned");
        inner.assignment.clone()
    }

    pub(super) fn set_checkpoints(&self, checkpoints: BTreeMap<i32, i64>) {
        let mut inner = self.inner.lock().expect("projector state lock poisoned");
        inner.checkpoints = checkpoints;
    }

    pub(super) fn set_membership(&self, in_group: bool) {
        self.in_group.store(in_group, Ordering::Relaxed);
    }

    pub(super) fn record_rehomed(&self, n: u64) {
        self.rehomed.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn record_legacy_superseded(&self) {
        self.legacy_superseded.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_checkpoint_moved(&self) {
        self.checkpoint_moves.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_client_replaced(&self) {
        self.client_replacements.fetch_add(1, Ordering::Relaxed);
    }

    /// Times the watchdog replaced this instance's consumer.
    pub fn client_replacements(&self) -> u64 {
        self.client_replacements.load(Ordering::Relaxed)
    }

    pub(super) fn record_apply_failure(&self) {
        self.apply_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ProjectorStats {
        let inner = self.inner.lock().expect("projector state lock poisoned");
        ProjectorStats {
            applied: self.applied.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            rehomed: self.rehomed.load(Ordering::Relaxed),
            legacy_superseded: self.legacy_superseded.load(Ordering::Relaxed),
            apply_failures: self.apply_failures.load(Ordering::Relaxed),
            assignment: inner.assignment.clone(),
            applied_offsets: inner.applied_offsets.clone(),
            checkpoints: inner.checkpoints.clone(),
            checkpoint_moves: self.checkpoint_moves.load(Ordering::Relaxed),
            in_group: self.in_group.load(Ordering::Relaxed),
            rebalances: self.rebalances.load(Ordering::Relaxed),
        }
    }
}
