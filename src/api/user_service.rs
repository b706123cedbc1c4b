//! `user.v1.UserService`: CreateUser (the command side) and GetUser (the query
//! side).

use super::ApiError;
use crate::{
    command::{CreateUser, Created},
    domain::{EventPosition, FieldViolation, NewUser, User, UserId, ValidationError},
    kafka::user_partition,
    proto::user::v1::{
        CreateUserRequest, CreateUserResponse, GetUserRequest, GetUserResponse, Position,
        User as ProtoUser, user_service_server::UserService,
    },
    store::WaitError,
};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// The handlers' shared state; cheap to clone into spawned tasks.
#[derive(Clone)]
pub struct UserApi {
    pub create: CreateUser,
    /// Longest wait for the read model when the call has no deadline.
    pub max_position_wait: Duration,
    /// Tracks the task each CreateUser runs in, so shutdown waits for it.
    pub tracker: TaskTracker,
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[instrument(skip_all, fields(id = ?request.get_ref().id, request_id = %request.get_ref().request_id))]
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let new = NewUser::parse(r.id, &r.name, &r.email, &r.request_id).map_err(ApiError::from)?;
        // Run the command in its own task: a caller that hangs up mid-way
        // does not cut a publish off between the broker and the verdict.
        let create = self.create.clone();
        let created = self
            .tracker
            .spawn(async move { create.run(&new, deadline).await })
            .await
            .map_err(|e| ApiError::Task(e.to_string()))?
            .map_err(ApiError::from)?;
        let Created { user, position } = created;
        tracing::info!(id = %user.id, partition = position.partition, offset = position.offset, "user created");
        Ok(Response::new(CreateUserResponse {
            user: Some(to_proto(&user)),
            position: Some(to_position(position)),
        }))
    }

    #[instrument(skip_all, fields(id = request.get_ref().id))]
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let id = UserId::parse(r.id).map_err(ApiError::from)?;
        let publisher = &self.create.publisher;
        if let Some(pos) = r.min_position {
            let (partition, offset) = validate_position(pos, publisher.known_partitions())?;
            self.create
                .watch
                .wait_applied(partition, offset, deadline)
                .await
                .map_err(|e| match e {
                    WaitError::Timeout => ApiError::NotAppliedInTime { partition, offset },
                    WaitError::ShuttingDown => ApiError::ShuttingDown,
                    WaitError::Store(e) => e.into(),
                })?;
        }
        // The user's own partition vouches for its absence, if complete.
        let partitions = publisher.known_partitions().ok_or(ApiError::CannotTell)?;
        let partition = user_partition(id, partitions);
        let (state, stored) = self
            .create
            .store
            .lookup(id, partition)
            .await
            .map_err(ApiError::from)?;
        let stored = match stored {
            Some(s) => s,
            None if state.is_complete() => return Err(ApiError::NotFound(id).into()),
            None => return Err(ApiError::Rebuilding(partition).into()),
        };
        Ok(Response::new(GetUserResponse {
            user: Some(to_proto(&stored.user)),
            position: stored.position().map(to_position),
        }))
    }
}

impl UserApi {
    /// The call's deadline, or the longest wait when it has none.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        grpc_deadline(request).unwrap_or_else(|| Instant::now() + self.max_position_wait)
    }
}

/// A position must name a partition the topic has (when known) and an offset.
fn validate_position(pos: Position, partitions: Option<i32>) -> Result<(i32, i64), ApiError> {
    let mut violations = Vec::new();
    if pos.partition < 0 {
        violations.push(FieldViolation {
            field: "min_position.partition",
            description: "must not be negative".into(),
        });
    } else if let Some(n) = partitions.filter(|n| pos.partition >= *n) {
        violations.push(FieldViolation {
            field: "min_position.partition",
            description: format!("the topic has {n} partitions"),
        });
    }
    if pos.offset < 0 {
        violations.push(FieldViolation {
            field: "min_position.offset",
            description: "must not be negative".into(),
        });
    }
    if violations.is_empty() {
        Ok((pos.partition, pos.offset))
    } else {
        Err(ValidationError(violations).into())
    }
}

/// The call's deadline from its `grpc-timeout` header, a little early so that
/// the answer reaches the caller before it gives up.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    let margin = (timeout / 20).min(Duration::from_millis(20));
    Instant::now().checked_add(timeout - margin)
}

fn to_position(p: EventPosition) -> Position {
    Position {
        partition: p.partition,
        offset: p.offset,
    }
}

fn to_proto(user: &User) -> ProtoUser {
    ProtoUser {
        id: user.id.get(),
        name: user.name.as_str().to_owned(),
        email: user.email.as_str().to_owned(),
        create_time: Some(prost_types::Timestamp {
            seconds: user.created_at_ms.div_euclid(1000),
            nanos: (user.created_at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_sets_a_deadline() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        let d = grpc_deadline(&req).unwrap();
        let left = d - Instant::now();
        assert!(left <= Duration::from_secs(2) && left > Duration::from_millis(1900));
        req.metadata_mut()
            .insert("grpc-timeout", "bogus".parse().unwrap());
        assert!(grpc_deadline(&req).is_none());
    }
}
