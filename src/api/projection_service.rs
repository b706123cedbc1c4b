//! `user.v1.ProjectionService`: the projector's progress, one snapshot or a
//! stream of them.

use super::ApiError;
use crate::{
    domain::{FieldViolation, ValidationError},
    progress::{self, GroupState, PartitionStatus, ProgressHub, Snapshot},
    proto::user::v1 as pb,
    proto::user::v1::projection_service_server::ProjectionService,
};
use futures::{Stream, StreamExt, stream};
use std::{pin::Pin, sync::Arc, time::Duration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// Shortest interval a watcher may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval a watcher may ask for.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The interval when the request leaves it unset.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The handlers over the shared [`ProgressHub`].
pub struct ProjectionApi {
    pub hub: Arc<ProgressHub>,
    /// The (group, topic) pairs callers may read: the service's own and the
    /// configured allowlist (`PROGRESS_ALLOWED_GROUPS`).
    pub allowed: Vec<(String, String)>,
    /// Ends every stream at shutdown.
    pub shutdown: CancellationToken,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::WatchProgressResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProjectionService for ProjectionApi {
    #[instrument(skip_all, fields(group = %request.get_ref().group, topic = %request.get_ref().topic))]
    async fn get_progress(
        &self,
        request: Request<pb::GetProgressRequest>,
    ) -> Result<Response<pb::GetProgressResponse>, Status> {
        let r = request.into_inner();
        validate_partitions(&r.partitions, None)?;
        let (group, topic) = self.names(&r.group, &r.topic)?;
        let (_sub, first) = self
            .hub
            .subscribe(&group, &topic, DEFAULT_INTERVAL)
            .await
            .map_err(ApiError::from)?;
        validate_partitions(&r.partitions, Some(&first))?;
        Ok(Response::new(pb::GetProgressResponse {
            snapshot: Some(to_proto(&first.filtered(&r.partitions))),
        }))
    }

    type WatchProgressStream = SnapshotStream;

    #[instrument(skip_all, fields(group = %request.get_ref().group, topic = %request.get_ref().topic))]
    async fn watch_progress(
        &self,
        request: Request<pb::WatchProgressRequest>,
    ) -> Result<Response<Self::WatchProgressStream>, Status> {
        let r = request.into_inner();
        let interval = parse_interval(r.interval)?;
        validate_partitions(&r.partitions, None)?;
        let (group, topic) = self.names(&r.group, &r.topic)?;
        let (sub, first) = self
            .hub
            .subscribe(&group, &topic, interval)
            .await
            .map_err(ApiError::from)?;
        validate_partitions(&r.partitions, Some(&first))?;
        tracing::info!(?interval, "progress watcher joined");

        let filter = r.partitions;
        // The stream is polled only as fast as the client reads; each item is
        // the newest poll at that moment, at most one per interval, never the
        // same twice. A slow watcher skips snapshots instead of queueing them,
        // and holds back nobody.
        let state = (
            sub,
            Some(first),
            None::<(std::time::Instant, Instant)>,
            false,
        );
        let stream = stream::unfold(state, move |(mut sub, first, last, done)| {
            let filter = filter.clone();
            async move {
                if done {
                    return None;
                }
                let snapshot = match (first, last) {
                    (Some(first), _) => Ok(first),
                    (None, Some((time, sent_at))) => {
                        sub.next_after(time, sent_at + interval).await?
                    }
                    (None, None) => return None,
                };
                let (item, last, done) = match snapshot {
                    Ok(s) => (
                        Ok(pb::WatchProgressResponse {
                            snapshot: Some(to_proto(&s.filtered(&filter))),
                        }),
                        Some((s.taken, Instant::now())),
                        false,
                    ),
                    Err(e) => (Err(Status::from(ApiError::from(e))), None, true),
                };
                Some((item, (sub, None, last, done)))
            }
        })
        .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}

impl ProjectionApi {
    /// The (group, topic) asked for, the service's own where left empty;
    /// refused unless allowed.
    fn names(&self, group: &str, topic: &str) -> Result<(String, String), ApiError> {
        let pick = |asked: &str, own: &str| {
            if asked.is_empty() {
                own.to_owned()
            } else {
                asked.to_owned()
            }
        };
        let asked = (
            pick(group, self.hub.own_group()),
            pick(topic, self.hub.own_topic()),
        );
        if self.allowed.contains(&asked) {
            Ok(asked)
        } else {
            // The names go back in the status message, a header: a caller's
            // 60 KB name would make an answer no client accepts.
            Err(ApiError::NotAllowed {
                group: shown(&asked.0),
                topic: shown(&asked.1),
            })
        }
    }
}

/// A caller's name as an answer may repeat it: at most 128 characters.
fn shown(name: &str) -> String {
    const MAX: usize = 128;
    match name.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_owned(),
    }
}

fn violation(field: &'static str, description: impl Into<String>) -> ApiError {
    ValidationError(vec![FieldViolation {
        field,
        description: description.into(),
    }])
    .into()
}

fn parse_interval(d: Option<prost_types::Duration>) -> Result<Duration, ApiError> {
    let Some(d) = d else {
        return Ok(DEFAULT_INTERVAL);
    };
    let out_of_range = || {
        violation(
            "interval",
            format!("must be between {MIN_INTERVAL:?} and {MAX_INTERVAL:?}"),
        )
    };
    let interval = Duration::try_from(d).map_err(|_| out_of_range())?;
    if (MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        Ok(interval)
    } else {
        Err(out_of_range())
    }
}

/// Negative partitions are refused up front; ones the topic lacks, once the
/// first snapshot says what it has.
fn validate_partitions(partitions: &[i32], snapshot: Option<&Snapshot>) -> Result<(), ApiError> {
    if partitions.iter().any(|p| *p < 0) {
        return Err(violation("partitions", "must not be negative"));
    }
    if let Some(s) = snapshot
        && let Some(missing) = partitions
            .iter()
            .find(|p| !s.partitions.iter().any(|q| q.partition == **p))
    {
        return Err(violation(
            "partitions",
            format!("topic {} has no partition {missing}", s.topic),
        ));
    }
    Ok(())
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    t.into()
}

fn member(m: &progress::Member) -> pb::GroupMember {
    pb::GroupMember {
        member_id: m.member_id.clone(),
        client_id: m.client_id.clone(),
        host: m.host.clone(),
        partitions: m.partitions.clone(),
    }
}

fn to_proto(s: &Snapshot) -> pb::ProgressSnapshot {
    let state = match s.state {
        GroupState::Stable => pb::GroupState::Stable,
        GroupState::Rebalancing => pb::GroupState::Rebalancing,
        GroupState::Empty => pb::GroupState::Empty,
        GroupState::Dead => pb::GroupState::Dead,
        GroupState::Unknown => pb::GroupState::Unspecified,
    };
    pb::ProgressSnapshot {
        time: Some(timestamp(s.time)),
        group: s.group.clone(),
        topic: s.topic.clone(),
        state: state.into(),
        members: s.members.iter().map(member).collect(),
        partitions: s
            .partitions
            .iter()
            .map(|p| pb::PartitionProgress {
                partition: p.partition,
                committed_offset: p.committed,
                applied_offset: p.applied,
                read_model_offset: p.read_model_offset,
                rebuild_target_offset: p.rebuild_target,
                unused: p.unused,
                log_start_offset: p.log_start,
                log_end_offset: p.log_end,
                lag: p.lag,
                lag_seconds: p.lag_seconds,
                consume_rate: p.consume_rate,
                owner: p.owner.as_ref().map(|m| pb::PartitionOwner {
                    member_id: m.member_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                }),
                status: match p.status {
                    PartitionStatus::Ok => pb::PartitionStatus::Ok,
                    PartitionStatus::Lagging => pb::PartitionStatus::Lagging,
                    PartitionStatus::Stalled => pb::PartitionStatus::Stalled,
                    PartitionStatus::Stopped => pb::PartitionStatus::Stopped,
                    PartitionStatus::Rebuilding => pb::PartitionStatus::Rebuilding,
                }
                .into(),
                last_commit_time: p.last_commit_time.map(timestamp),
            })
            .collect(),
        totals: Some(pb::GroupTotals {
            total_lag: s.totals.total_lag,
            max_lag: s.totals.max_lag,
            max_lag_seconds: s.totals.max_lag_seconds,
            total_lag_seconds: s.totals.total_lag_seconds,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_bounds() {
        let d = |ms: i64| {
            Some(prost_types::Duration {
                seconds: ms / 1000,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            })
        };
        assert_eq!(parse_interval(None).unwrap(), DEFAULT_INTERVAL);
        assert_eq!(parse_interval(d(250)).unwrap(), Duration::from_millis(250));
        assert!(parse_interval(d(99)).is_err());
        assert!(parse_interval(d(3_600_001)).is_err());
        assert!(parse_interval(d(-1000)).is_err());
    }
}
