//! `user.v1.UserService`: CreateUser (the command side) and GetUser (the query
//! side).

use super::ApiError;
use crate::{
    command::{CreateUser, Created},
    domain::{EventPosition, FieldViolation, NewUser, User, UserId, ValidationError},
    kafka::Reach,
    proto::user::v1::{
        CreateUserRequest, CreateUserResponse, GetUserRequest, GetUserResponse, Position,
        User as ProtoUser, user_service_server::UserService,
    },
    store::{PartitionState, StoredUser, UserCache, WaitError},
    tasks::Tasks,
};
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, instrument};

/// The handlers' shared state; cheap to clone into spawned tasks.
#[derive(Clone)]
pub struct UserApi {
    pub create: CreateUser,
    /// Longest wait for the read model when the call has no deadline.
    pub max_position_wait: Duration,
    /// Tracks the task each CreateUser runs in, so shutdown waits for it.
    pub tasks: Tasks,
    /// Users the log has decided, answered without Redis (see
    /// [`crate::store::UserCache`] for why that is never stale).
    pub users: UserCache,
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[instrument(skip_all, fields(id = ?request.get_ref().id, request_id = %request.get_ref().request_id))]
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        // Tests make this panic (FAILPOINTS=create-user=panic) to check that
        // a panicking handler answers INTERNAL and stops the service.
        fail::fail_point!("create-user");
        let deadline = self.deadline();
        let r = request.into_inner();
        let new = NewUser::parse(r.id, &r.name, &r.email, &r.request_id).map_err(ApiError::from)?;
        // Run the command in its own task: a caller that hangs up mid-way
        // does not cut a publish off between the broker and the verdict.
        let create = self.create.clone();
        let created = self
            .tasks
            .spawn(
                "create user",
                async move { create.run(&new, deadline).await }.instrument(Span::current()),
            )
            .await
            .ok()
            .flatten()
            .ok_or_else(|| ApiError::Task("the create task panicked".into()))?
            .map_err(ApiError::from)?;
        let Created { user, position } = created;
        self.users.insert(user.clone(), position);
        tracing::info!(id = %user.id, partition = position.partition, offset = position.offset, "user created");
        Ok(Response::new(CreateUserResponse {
            user: Some(to_proto(&user)),
            position: Some(to_position(position)),
        }))
    }

    // At debug: a read logs nothing of its own at info, and an info span per
    // call (allocated, its fields formatted) cost about 1 µs of a cached
    // read's 17 (scripts/bench.d/ab-commit). Traced calls keep their server
    // span (telemetry::grpc).
    #[instrument(level = "debug", skip_all, fields(id = request.get_ref().id))]
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let deadline = self.deadline();
        let r = request.into_inner();
        let id = UserId::parse(r.id).map_err(ApiError::from)?;
        let routing = &self.create.routing;
        let wanted = r
            .min_position
            .map(|pos| validate_position(pos, routing.map().map(|m| m.partitions)))
            .transpose()?;
        // A cached user answers when the call asks for no position, or for
        // one its creating event already covers (a create's own position):
        // any other position is waited for or refused exactly as without it.
        if let Some(cached) = self.users.get(id) {
            let covered = wanted.is_none_or(|(p, offset)| {
                p == cached.position.partition && offset <= cached.position.offset
            });
            if covered {
                return Ok(Response::new(GetUserResponse {
                    user: Some(to_proto(&cached.user)),
                    position: Some(to_position(cached.position)),
                }));
            }
        }
        // The partition map as this instance read it from the log, or as
        // any instance left it beside the read model: reads need no broker.
        // Without either, no partition can vouch for anything (and no
        // position can be bounded): refused at once.
        let map = match routing.map() {
            Some(map) => map,
            None => {
                let map = self
                    .create
                    .store
                    .partition_map()
                    .await
                    .map_err(ApiError::from)?
                    .ok_or(ApiError::CannotTell)?;
                if let Some(pos) = r.min_position {
                    validate_position(pos, Some(map.partitions))?;
                }
                map
            }
        };
        // The user's own partition vouches for its absence, if complete.
        let partition = map.home(id);
        let answer = match wanted {
            None => self.read(id, partition, None).await?,
            Some((p, offset)) => {
                // A position on the user's own partition (a create's is) is
                // checked by the lookup itself, whose checkpoint comes with
                // the user: applied already, one round trip and no wait.
                let at_least = (p == partition).then_some(offset);
                let ready = match at_least {
                    Some(_) => self.read(id, partition, at_least).await?,
                    None => None,
                };
                match ready {
                    Some(answer) => Some(answer),
                    None => {
                        self.wait_for_position(p, offset, deadline).await?;
                        self.read(id, partition, at_least).await?
                    }
                }
            }
        };
        // Applied by the wait's poll, behind by the read after it: Redis
        // lost data in between, and the partition is being rebuilt.
        let (state, stored) = answer.ok_or(ApiError::Rebuilding(partition))?;
        let stored = match stored {
            Some(s) => s,
            None if state.is_complete() => return Err(ApiError::NotFound(id).into()),
            None => return Err(ApiError::Rebuilding(partition).into()),
        };
        if let Some(position) = stored.position() {
            self.users.insert(stored.user.clone(), position);
        }
        Ok(Response::new(to_response(&stored)))
    }
}

fn to_response(stored: &StoredUser) -> GetUserResponse {
    GetUserResponse {
        user: Some(to_proto(&stored.user)),
        position: stored.position().map(to_position),
    }
}

impl UserApi {
    /// When the call's waits end. The caller's own deadline (`grpc-timeout`)
    /// is tonic's to enforce: it drops the handler then. The service's own
    /// bound is what keeps a caller who asks for hours from holding a wait.
    fn deadline(&self) -> Instant {
        Instant::now() + self.max_position_wait
    }

    /// The user and its partition's state, from a replica when replica reads
    /// are on and it is good enough, else from the master; `None` when the
    /// read model has not applied `at_least` (an offset of `partition`) yet.
    async fn read(
        &self,
        id: UserId,
        partition: i32,
        at_least: Option<i64>,
    ) -> Result<Option<(PartitionState, Option<StoredUser>)>, ApiError> {
        let store = &self.create.store;
        if store.reads_from_replicas()
            && let Some(answer) = store.lookup_on_replica(id, partition, at_least).await
        {
            return Ok(Some(answer));
        }
        let (state, stored) = store.lookup(id, partition).await?;
        if at_least.is_some_and(|o| state.checkpoint() < Some(o)) {
            return Ok(None);
        }
        Ok(Some((state, stored)))
    }

    /// Waits until the read model (its master) has applied `offset` of
    /// `partition`; a position the log has not reached is refused at once,
    /// since no wait would see it applied.
    async fn wait_for_position(
        &self,
        partition: i32,
        offset: i64,
        deadline: Instant,
    ) -> Result<(), ApiError> {
        let publisher = &self.create.publisher;
        if let Reach::Beyond { log_end } = publisher.reach(partition, offset).await {
            return Err(ApiError::PastLogEnd {
                partition,
                offset,
                log_end,
            });
        }
        self.create
            .watch
            .wait_applied(partition, offset, deadline)
            .await
            .map_err(|e| match e {
                WaitError::Timeout => ApiError::NotAppliedInTime { partition, offset },
                WaitError::ShuttingDown => ApiError::ShuttingDown,
                WaitError::Store(e) => e.into(),
            })?;
        Ok(())
    }
}

/// A position must name a partition the partition map routes to (when known)
/// and an offset.
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
            description: format!("the topic's partition map routes users over {n} partitions"),
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
