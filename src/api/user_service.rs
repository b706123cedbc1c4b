//! `user.v1.UserService`: CreateUser (the command side) and GetUser (the query
//! side).

use super::ApiError;
use crate::{
    cache::{RedisStore, Reservation, StoredAnswer},
    domain::{FieldViolation, NewUser, User, UserCreated, UserId, ValidationError},
    kafka::EventPublisher,
    proto::user::v1::{
        CreateUserRequest, CreateUserResponse, GetUserRequest, GetUserResponse, Position,
        User as ProtoUser, user_service_server::UserService,
    },
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// The handlers' shared state; cheap to clone into spawned tasks.
#[derive(Clone)]
pub struct UserApi {
    pub store: RedisStore,
    pub publisher: EventPublisher,
    /// How long a request id's answer is kept for retries.
    pub request_ttl: Duration,
    /// How long a request id stays "in progress" without an answer: longer
    /// than a publish can take, so a call that died mid-way (a crash) leaves
    /// its request id usable again soon after.
    pub pending_ttl: Duration,
    /// Longest wait for a position when the call has no deadline.
    pub max_position_wait: Duration,
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[instrument(skip_all, fields(id = ?request.get_ref().id, request_id = %request.get_ref().request_id))]
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let r = request.into_inner();
        let new = NewUser::parse(r.id, &r.name, &r.email, &r.request_id).map_err(ApiError::from)?;
        // Run the command in its own task: a caller that hangs up mid-way must
        // not leave an id reserved and a request id pending without an answer.
        let api = self.clone();
        let answer = tokio::spawn(async move { api.create(new).await })
            .await
            .map_err(|e| ApiError::Task(e.to_string()))??;
        tracing::info!(id = %answer.user.id, partition = answer.partition, offset = answer.offset, "user created");
        Ok(Response::new(CreateUserResponse {
            user: Some(to_proto(&answer.user)),
            position: Some(Position {
                partition: answer.partition,
                offset: answer.offset,
            }),
        }))
    }

    #[instrument(skip_all, fields(id = request.get_ref().id))]
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let deadline = grpc_deadline(&request);
        let r = request.into_inner();
        let id = UserId::parse(r.id).map_err(ApiError::from)?;
        let user = match r.min_position {
            None => self.store.get_user(id).await.map_err(ApiError::from)?,
            Some(pos) => {
                let pos = validate_position(pos, self.publisher.known_partitions())?;
                let deadline = deadline.unwrap_or_else(|| Instant::now() + self.max_position_wait);
                self.wait_for(id, pos, deadline).await?
            }
        };
        let user = user.ok_or(ApiError::NotFound(id))?;
        Ok(Response::new(GetUserResponse {
            user: Some(to_proto(&user)),
            position: None,
        }))
    }
}

impl UserApi {
    /// Reserve the id, publish, remember the answer: the command side.
    async fn create(&self, new: NewUser) -> Result<StoredAnswer, ApiError> {
        let id = match self.store.reserve(&new, self.pending_ttl).await? {
            Reservation::Reserved(id) => id,
            Reservation::Exists(id) => return Err(ApiError::AlreadyExists(id)),
            Reservation::Replay(answer) => {
                tracing::info!("request id seen before: same answer");
                return Ok(answer);
            }
            Reservation::InProgress => return Err(ApiError::InProgress),
            Reservation::Conflict => return Err(ApiError::RequestIdReused),
        };
        let user = User {
            id,
            name: new.name.clone(),
            email: new.email.clone(),
            created_at_ms: now_ms(),
        };
        match self
            .publisher
            .publish(&UserCreated::new(user.clone(), new.request_id.clone()))
            .await
        {
            Ok(published) => {
                let answer = StoredAnswer {
                    user,
                    partition: published.partition,
                    offset: published.offset,
                };
                if let Err(e) = self.store.complete(&new, &answer, self.request_ttl).await {
                    // The user exists; only a retry of this request id would
                    // now see "in progress" until the record expires.
                    tracing::error!(error = %e, "could not record the answer for the request id");
                }
                Ok(answer)
            }
            Err(e) => {
                if let Err(release) = self.store.release(&new, id).await {
                    tracing::error!(error = %release, %id, "could not release the id after a failed publish");
                }
                Err(e.into())
            }
        }
    }

    /// Polls the read model until it has applied `pos`, or the deadline.
    async fn wait_for(
        &self,
        id: UserId,
        pos: (i32, i64),
        deadline: Instant,
    ) -> Result<Option<User>, ApiError> {
        let mut pause = Duration::from_millis(1);
        loop {
            let (applied, user) = self.store.get_user_at(id, pos.0, pos.1).await?;
            if applied {
                return Ok(user);
            }
            let now = Instant::now();
            if now + pause >= deadline {
                return Err(ApiError::NotAppliedInTime {
                    partition: pos.0,
                    offset: pos.1,
                });
            }
            tokio::time::sleep(pause).await;
            // Short pauses: the projector applies within milliseconds, and a
            // long back-off would add up to its length to the read's latency.
            pause = (pause * 2).min(Duration::from_millis(4));
        }
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
    Some(Instant::now() + timeout - margin)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
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
