//! Turns a sequence of observations into figures: lag in records and in
//! seconds, consume rate, and a Burrow-like status per partition.
//!
//! Lag in seconds follows kafka-lag-exporter: each poll records when the log
//! end was seen at which offset; the time at which the log end passed the
//! committed offset is interpolated linearly between the two samples around
//! it, and the lag is the time since. When the committed offset is older than
//! the oldest sample, the time since that sample is a lower bound and is used.
//!
//! For the service's own (group, topic) the read model's checkpoint in Redis
//! is carried beside Kafka's figures, and a partition the read model is
//! rebuilding is REBUILDING (see `status`).

use super::model::{
    Member, Observation, PartitionProgress, PartitionStatus, ReadModelPosition, Snapshot, Totals,
};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

/// Samples kept per partition for the status window (Burrow's default is 10).
pub const STATUS_WINDOW: usize = 10;
/// Fewest samples before a partition can be called STALLED or LAGGING.
pub const MIN_WINDOW: usize = 3;
/// Log-end samples kept per partition for the lag-in-seconds lookup.
const LOG_END_SAMPLES: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Committed offset, or the log start when nothing was committed.
    position: i64,
    lag: i64,
}

#[derive(Debug, Default)]
struct PartitionHistory {
    window: VecDeque<Sample>,
    /// (time, log end), one entry per change of the log end.
    log_end: VecDeque<(Instant, i64)>,
    last_committed: Option<i64>,
    last_commit_time: Option<SystemTime>,
}

/// The history of one (group, topic), fed one observation per poll.
#[derive(Debug, Default)]
pub struct History {
    partitions: HashMap<i32, PartitionHistory>,
}

impl History {
    /// Records `obs` and returns the snapshot it makes. `applied` holds this
    /// instance's applied offsets (last applied, per owned partition);
    /// `read_model` what the read model's checkpoint in Redis says, per
    /// partition (empty for another group or topic, or when Redis failed).
    pub fn observe(
        &mut self,
        group: &str,
        topic: &str,
        obs: &Observation,
        applied: &BTreeMap<i32, i64>,
        read_model: &BTreeMap<i32, ReadModelPosition>,
    ) -> Snapshot {
        let owners: HashMap<i32, &Member> = obs
            .members
            .iter()
            .flat_map(|m| m.partitions.iter().map(move |p| (*p, m)))
            .collect();
        let mut partitions = Vec::with_capacity(obs.partitions.len());
        for raw in &obs.partitions {
            let h = self.partitions.entry(raw.partition).or_default();
            let position = raw.committed.unwrap_or(raw.log_start).max(raw.log_start);
            let lag = (raw.log_end - position).max(0);

            if h.log_end.back().is_none_or(|(_, end)| *end != raw.log_end) {
                h.log_end.push_back((obs.at, raw.log_end));
                if h.log_end.len() > LOG_END_SAMPLES {
                    h.log_end.pop_front();
                }
            }
            if raw.committed.is_some()
                && h.last_committed.is_some()
                && h.last_committed != raw.committed
            {
                h.last_commit_time = Some(obs.time);
            }
            h.last_committed = raw.committed.or(h.last_committed);
            h.window.push_back(Sample {
                at: obs.at,
                position,
                lag,
            });
            if h.window.len() > STATUS_WINDOW {
                h.window.pop_front();
            }

            let owner = owners.get(&raw.partition).map(|m| (*m).clone());
            let read = read_model.get(&raw.partition);
            let rebuild_target = read.and_then(|r| r.rebuild_target);
            partitions.push(PartitionProgress {
                partition: raw.partition,
                committed: raw.committed,
                applied: owner
                    .as_ref()
                    .and(applied.get(&raw.partition))
                    .map(|last| last + 1),
                read_model_offset: read.map(|r| r.next),
                rebuild_target,
                log_start: raw.log_start,
                log_end: raw.log_end,
                lag,
                lag_seconds: lag_seconds(&h.log_end, position, lag, obs.at),
                consume_rate: consume_rate(&h.window),
                status: status(&h.window, owner.is_some(), rebuild_target.is_some()),
                owner,
                last_commit_time: h.last_commit_time,
                unused: false,
            });
        }
        let totals = Totals {
            total_lag: partitions.iter().map(|p| p.lag).sum(),
            max_lag: partitions.iter().map(|p| p.lag).max().unwrap_or(0),
            max_lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
            total_lag_seconds: partitions.iter().map(|p| p.lag_seconds).sum(),
        };
        Snapshot {
            time: obs.time,
            taken: obs.at,
            group: group.to_owned(),
            topic: topic.to_owned(),
            state: obs.state,
            members: obs.members.clone(),
            partitions,
            totals,
        }
    }
}

fn secs_between(earlier: Instant, later: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64()
}

/// Seconds since the log end passed `position` (see the module doc).
fn lag_seconds(log_end: &VecDeque<(Instant, i64)>, position: i64, lag: i64, now: Instant) -> f64 {
    if lag == 0 {
        return 0.0;
    }
    // The record at `position` was appended when the log end went from
    // `position` to `position + 1`.
    let target = position + 1;
    let Some(j) = log_end.iter().position(|(_, end)| *end >= target) else {
        return 0.0;
    };
    if j == 0 {
        return secs_between(log_end[0].0, now);
    }
    let (t0, e0) = log_end[j - 1];
    let (t1, e1) = log_end[j];
    let span = secs_between(t0, t1);
    let fraction = (target - e0) as f64 / (e1 - e0) as f64;
    let appended = t0 + Duration::from_secs_f64(span * fraction);
    secs_between(appended, now)
}

/// Records per second the position moved over the window.
fn consume_rate(window: &VecDeque<Sample>) -> f64 {
    match (window.front(), window.back()) {
        (Some(first), Some(last)) => {
            let secs = secs_between(first.at, last.at);
            if secs > 0.0 {
                (last.position - first.position).max(0) as f64 / secs
            } else {
                0.0
            }
        }
        _ => 0.0,
    }
}

/// Burrow's rules, over the window, in this order: no owner is STOPPED; a
/// partition the read model is rebuilding (replaying from the log after Redis
/// lost its data, until its checkpoint reaches the rebuild target) is
/// REBUILDING, whatever Kafka's figures say; a position that did not move
/// while lag stayed above 0 is STALLED; lag that grew at every step of the
/// window, while the position moved, is LAGGING; otherwise OK.
fn status(window: &VecDeque<Sample>, owned: bool, rebuilding: bool) -> PartitionStatus {
    if !owned {
        return PartitionStatus::Stopped;
    }
    if rebuilding {
        return PartitionStatus::Rebuilding;
    }
    if window.len() < MIN_WINDOW {
        return PartitionStatus::Ok;
    }
    let first = window.front().expect("window has samples");
    let last = window.back().expect("window has samples");
    if window.iter().all(|s| s.lag > 0) && first.position == last.position {
        return PartitionStatus::Stalled;
    }
    let growing = window
        .iter()
        .zip(window.iter().skip(1))
        .all(|(a, b)| b.lag >= a.lag)
        && last.lag > first.lag;
    if growing && window.iter().all(|s| s.lag > 0) {
        return PartitionStatus::Lagging;
    }
    PartitionStatus::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::model::{GroupState, RawPartition};

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    /// The same moment by the monotonic clock.
    fn mono(secs: u64) -> Instant {
        static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *BASE + Duration::from_secs(secs)
    }

    fn obs(secs: u64, committed: Option<i64>, log_end: i64, owned: bool) -> Observation {
        Observation {
            time: at(secs),
            at: mono(secs),
            state: GroupState::Stable,
            members: owned
                .then(|| Member {
                    member_id: "m1".into(),
                    client_id: "c1".into(),
                    host: "/127.0.0.1".into(),
                    partitions: vec![0],
                })
                .into_iter()
                .collect(),
            partitions: vec![RawPartition {
                partition: 0,
                committed,
                log_start: 0,
                log_end,
            }],
        }
    }

    fn run(steps: &[(u64, Option<i64>, i64, bool)]) -> Snapshot {
        let mut h = History::default();
        let mut last = None;
        for &(t, c, e, owned) in steps {
            last = Some(h.observe(
                "g",
                "t",
                &obs(t, c, e, owned),
                &BTreeMap::new(),
                &BTreeMap::new(),
            ));
        }
        last.unwrap()
    }

    #[test]
    fn a_consumer_that_keeps_up_is_ok_with_no_lag() {
        let s = run(&[
            (0, Some(10), 10, true),
            (1, Some(20), 20, true),
            (2, Some(30), 30, true),
        ]);
        let p = &s.partitions[0];
        assert_eq!(
            (p.lag, p.status, p.lag_seconds),
            (0, PartitionStatus::Ok, 0.0)
        );
        assert!((p.consume_rate - 10.0).abs() < 1e-9);
        assert_eq!(p.last_commit_time, Some(at(2)));
    }

    #[test]
    fn a_position_that_does_not_move_under_lag_is_stalled() {
        let s = run(&[
            (0, Some(5), 10, true),
            (1, Some(5), 12, true),
            (2, Some(5), 12, true),
        ]);
        assert_eq!(s.partitions[0].status, PartitionStatus::Stalled);
        assert_eq!(s.partitions[0].lag, 7);
        assert_eq!(s.totals.total_lag, 7);
    }

    #[test]
    fn growing_lag_while_committing_is_lagging() {
        let s = run(&[
            (0, Some(0), 10, true),
            (1, Some(5), 20, true),
            (2, Some(10), 30, true),
        ]);
        assert_eq!(s.partitions[0].status, PartitionStatus::Lagging);
    }

    #[test]
    fn no_owner_is_stopped_and_a_short_window_is_ok() {
        assert_eq!(
            run(&[(0, Some(5), 10, false)]).partitions[0].status,
            PartitionStatus::Stopped
        );
        assert_eq!(
            run(&[(0, Some(5), 10, true), (1, Some(5), 10, true)]).partitions[0].status,
            PartitionStatus::Ok
        );
    }

    #[test]
    fn a_rebuilding_read_model_wins_over_every_verdict_but_stopped() {
        let rebuilding = BTreeMap::from([(
            0,
            ReadModelPosition {
                next: 5,
                rebuild_target: Some(100),
            },
        )]);
        // Committed offset stuck under lag: STALLED by Kafka's figures alone.
        let steps = [(0, Some(5), 10), (1, Some(5), 12), (2, Some(5), 12)];
        let mut h = History::default();
        let mut last = None;
        for (t, c, e) in steps {
            last = Some(h.observe("g", "t", &obs(t, c, e, true), &BTreeMap::new(), &rebuilding));
        }
        let p = &last.unwrap().partitions[0];
        assert_eq!(p.status, PartitionStatus::Rebuilding);
        assert_eq!(
            (p.read_model_offset, p.rebuild_target),
            (Some(5), Some(100))
        );

        let s = h.observe(
            "g",
            "t",
            &obs(3, Some(5), 12, false),
            &BTreeMap::new(),
            &rebuilding,
        );
        assert_eq!(s.partitions[0].status, PartitionStatus::Stopped);
        assert_eq!(s.partitions[0].read_model_offset, Some(5), "still reported");

        // Done rebuilding: the checkpoint alone, and Kafka's verdict again.
        let done = BTreeMap::from([(
            0,
            ReadModelPosition {
                next: 12,
                rebuild_target: None,
            },
        )]);
        let s = h.observe(
            "g",
            "t",
            &obs(4, Some(12), 12, true),
            &BTreeMap::new(),
            &done,
        );
        let p = &s.partitions[0];
        assert_eq!(p.status, PartitionStatus::Ok);
        assert_eq!((p.read_model_offset, p.rebuild_target), (Some(12), None));
    }

    #[test]
    fn lag_seconds_interpolates_when_the_log_end_passed_the_position() {
        // Log end 100 at t=0 and 200 at t=10: offset 150 was appended near t=5.
        let s = run(&[
            (0, Some(100), 100, true),
            (10, Some(100), 200, true),
            (20, Some(150), 200, true),
        ]);
        let p = &s.partitions[0];
        assert_eq!(p.lag, 50);
        // Record 150 appended at 0 + 10 * (151 - 100) / 100 = 5.1 s; now is 20 s.
        assert!((p.lag_seconds - 14.9).abs() < 1e-6, "{}", p.lag_seconds);
        assert_eq!(s.totals.max_lag_seconds, p.lag_seconds);
    }

    #[test]
    fn lag_seconds_is_a_lower_bound_before_the_first_sample() {
        let s = run(&[(0, None, 100, true), (30, None, 100, true)]);
        let p = &s.partitions[0];
        assert_eq!(p.lag, 100);
        assert!((p.lag_seconds - 30.0).abs() < 1e-9);
        assert_eq!(p.committed, None);
    }
}
