//! The API layer's errors and their one mapping to gRPC status codes.
//!
//! Callers get a code they can act on and a message that names no internals;
//! the details go to the log.

use crate::{
    command::CommandError,
    domain::{UserId, ValidationError},
    kafka::KafkaError,
    progress::{ProgressError, WatchError},
    store::StoreError,
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("user {0} not found")]
    NotFound(UserId),
    /// The log has not reached the position: no wait would see it applied.
    #[error(
        "position {partition}:{offset} is past the end of the log (partition {partition} ends at {log_end})"
    )]
    PastLogEnd {
        partition: i32,
        offset: i64,
        log_end: i64,
    },
    #[error("position {partition}:{offset} not applied before the deadline")]
    NotAppliedInTime { partition: i32, offset: i64 },
    /// The read model is replaying this partition after a loss (or has not
    /// opened it yet): it cannot vouch that the user is absent.
    #[error("the read model is rebuilding partition {0}")]
    Rebuilding(i32),
    /// The topic's partition count is not known yet (no broker answered).
    #[error("the read model cannot tell yet")]
    CannotTell,
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Progress(#[from] WatchError),
    /// A progress call named a group or topic outside the allowlist.
    #[error(
        "the progress of group {group:?} on topic {topic:?} is not served here (see PROGRESS_ALLOWED_GROUPS)"
    )]
    NotAllowed { group: String, topic: String },
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(v) => {
                let mut details = ErrorDetails::new();
                for f in &v.0 {
                    details.add_bad_request_violation(f.field, &f.description);
                }
                Status::with_error_details(Code::InvalidArgument, v.to_string(), details)
            }
            ApiError::Command(CommandError::RequestIdReused) => Status::with_error_details(
                Code::InvalidArgument,
                e.to_string(),
                ErrorDetails::with_bad_request_violation(
                    "request_id",
                    "already used for a request with different fields",
                ),
            ),
            ApiError::Command(CommandError::AlreadyExists(_)) => {
                Status::already_exists(e.to_string())
            }
            ApiError::Command(CommandError::Undecided(detail)) => {
                tracing::info!(%detail, "create undecided");
                Status::unavailable(format!(
                    "the outcome is not known yet ({detail}); retry with the same request_id"
                ))
            }
            ApiError::Command(CommandError::NoFreeId) => {
                // Client-chosen ids may be any positive id, so they can hold
                // every id a request id derives: nothing was created, and a
                // retry with the same request id would meet the same ids.
                tracing::warn!("create refused: every id its request id derives is taken");
                Status::aborted(format!(
                    "{e}: the ids this request_id names are all taken (by client-chosen ids); \
                     nothing was created: retry with a new request_id"
                ))
            }
            ApiError::Command(CommandError::Unroutable(reason)) => {
                tracing::error!(%reason, "create refused: the partition map cannot be honoured");
                Status::failed_precondition(reason)
            }
            ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::NotAllowed { .. } => Status::permission_denied(e.to_string()),
            ApiError::PastLogEnd { .. } => Status::out_of_range(e.to_string()),
            ApiError::NotAppliedInTime { .. } => Status::deadline_exceeded(e.to_string()),
            ApiError::Rebuilding(_) | ApiError::CannotTell | ApiError::ShuttingDown => {
                Status::unavailable(format!("{e}; retry shortly"))
            }
            ApiError::Store(StoreError::Unavailable(detail))
            | ApiError::Command(CommandError::Store(StoreError::Unavailable(detail))) => {
                tracing::warn!(%detail, "redis unavailable");
                Status::unavailable("the read model (Redis) is unavailable; retry later")
            }
            ApiError::Kafka(KafkaError::Unavailable(detail) | KafkaError::Refused(detail))
            | ApiError::Command(CommandError::Kafka(
                KafkaError::Unavailable(detail) | KafkaError::Refused(detail),
            )) => {
                tracing::warn!(%detail, "kafka unavailable");
                Status::unavailable(
                    "the event log (Kafka) is unavailable; retry with the same request_id",
                )
            }
            ApiError::Progress(WatchError::TooManyWatchers(_)) => {
                Status::resource_exhausted(e.to_string())
            }
            ApiError::Progress(WatchError::ShuttingDown) => Status::unavailable(e.to_string()),
            ApiError::Progress(WatchError::Progress(p)) => match &*p {
                ProgressError::UnknownTopic(_) | ProgressError::UnknownGroup(_) => {
                    Status::not_found(p.to_string())
                }
                ProgressError::Unavailable(detail) => {
                    tracing::warn!(%detail, "kafka unavailable for progress");
                    Status::unavailable("the event log (Kafka) is unavailable; retry later")
                }
            },
            // Bugs, or a peer answering what the service cannot read (a
            // foreign writer in Redis, a broker refusing a request): the log
            // has the detail, the caller a code that says "not your fault".
            ApiError::Store(e @ (StoreError::Protocol(_) | StoreError::Corrupt { .. }))
            | ApiError::Command(CommandError::Store(
                e @ (StoreError::Protocol(_) | StoreError::Corrupt { .. }),
            )) => internal(&e),
            ApiError::Kafka(e @ KafkaError::Client(_))
            | ApiError::Command(CommandError::Kafka(e @ KafkaError::Client(_))) => internal(&e),
            ApiError::Task(_) => internal(&e),
        }
    }
}

/// INTERNAL, with the error in the log only.
fn internal(error: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %error, "internal error");
    Status::internal("internal error")
}
