//! The command side of CreateUser: choose the id, publish the event, and
//! answer with the log's verdict as the read model shows it.
//!
//! The rule that decides an outcome is a rule over the log (docs/design.md):
//! for each id, the first `UserCreated` in its partition creates the user. So
//! a create answers OK only once its event is applied and the read model says
//! this event, or an earlier attempt of the same request, created the user.
//! Redis holds no guard of its own: losing it loses nothing that decides.
//!
//! Retries are exact. A request id always names the same user: a service
//! assigned id is derived from it ([`ids`]), and the read model maps it to
//! the user its request created. A publish whose outcome is unknown (a
//! timeout) frees nothing; its retry publishes the same id again, and the
//! second event creates nothing.

use crate::{
    domain::{EventPosition, NewUser, PartitionMap, User, UserCreated, UserId, ids},
    kafka::{EventPublisher, KafkaError, Routing},
    store::{
        CheckpointWatch, Decided, Expect, PartitionState, RedisStore, StoreError, StoredUser,
        Verdicts, WaitError,
    },
};
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::time::Instant;

/// Service-assigned ids tried per call before giving up (each further one is
/// used only after the log gave the previous one to another request).
const MAX_ID_ATTEMPTS: u32 = ids::MAX_ATTEMPTS;

/// Why a create did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("user {0} already exists")]
    AlreadyExists(UserId),
    #[error("request_id was used before with different fields")]
    RequestIdReused,
    /// The read model cannot decide yet (it is rebuilding, or has not applied
    /// the event in time): retry with the same request id.
    #[error("the outcome is not known yet: {0}")]
    Undecided(String),
    #[error("no free id after {MAX_ID_ATTEMPTS} attempts")]
    NoFreeId,
    /// The topic's partition map cannot be honoured (the reason names the fix).
    #[error("{0}")]
    Unroutable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

impl From<WaitError> for CommandError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Store(e) => CommandError::Store(e),
            WaitError::Timeout => CommandError::Undecided(
                "the read model did not reach the event before the deadline".into(),
            ),
            WaitError::ShuttingDown => CommandError::Undecided("shutting down".into()),
        }
    }
}

/// A created user and where its event sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub user: User,
    pub position: EventPosition,
}

/// What the read model says of an existing user, for this request.
enum Verdict {
    /// This request created it (now or in an earlier attempt).
    Ours(Created),
    /// This request id created it, with other fields.
    Reused,
    /// Another request created it.
    Taken,
}

/// CreateUser's dependencies; cheap to clone into the task a call runs in.
#[derive(Clone)]
pub struct CreateUser {
    pub store: RedisStore,
    pub publisher: EventPublisher,
    pub watch: Arc<CheckpointWatch>,
    /// The topic's partition map: which partition an id's event goes to.
    pub routing: Arc<Routing>,
    /// Verdicts of the local projector, for events of partitions it owns.
    pub verdicts: Arc<Verdicts>,
}

impl CreateUser {
    /// Creates the user, or tells why not, by `deadline`. A request seen
    /// before gets its first answer: its ids are the same on every retry, and
    /// the user its event created names it.
    pub async fn run(&self, new: &NewUser, deadline: Instant) -> Result<Created, CommandError> {
        let map = self.partition_map(deadline).await?;
        let id_at = |attempt| match (new.id, &new.request_id) {
            (Some(id), _) => id,
            (None, Some(r)) => ids::assigned_id(r, attempt),
            (None, None) => ids::id_from_seed(rand::random()),
        };
        let first = id_at(0);
        // The request id's index and the first id's lookup at once: one
        // round trip's wait before the publish, not two.
        // A request id with a client-chosen id may have created a user under
        // its derived id before (sent without an id then): that user names it.
        let derived = match (new.id, &new.request_id) {
            (Some(_), Some(r)) => Some(ids::assigned_id(r, 0)),
            _ => None,
        };
        let (owner, first_lookup, derived_user) = tokio::join!(
            async {
                match &new.request_id {
                    Some(r) => self.store.request_owner(r).await,
                    None => Ok(None),
                }
            },
            self.store.lookup(first, map.home(first)),
            async {
                match derived {
                    Some(id) => self.store.get_user(id, map.home(id)).await,
                    None => Ok(None),
                }
            }
        );
        // A request id seen with another client-chosen id (the index says
        // which user it created), or without one (its derived id's user):
        // retries need neither, see try_id.
        let earlier = match owner? {
            Some(id) => self.store.get_user(id, map.home(id)).await?,
            None => derived_user?.filter(|u| u.request_id == new.request_id),
        };
        if let Some(existing) = earlier {
            match verdict(new, &existing)? {
                Verdict::Ours(created) => return Ok(created),
                Verdict::Reused => return Err(CommandError::RequestIdReused),
                Verdict::Taken => {}
            }
        }
        let mut prefetched = Some(first_lookup?);
        let mut attempt = 0;
        loop {
            let id = if attempt == 0 { first } else { id_at(attempt) };
            let looked_up = prefetched.take();
            match self.try_id(new, id, map, looked_up, deadline).await? {
                Verdict::Ours(created) => return Ok(created),
                Verdict::Reused => return Err(CommandError::RequestIdReused),
                Verdict::Taken if new.id.is_some() => return Err(CommandError::AlreadyExists(id)),
                Verdict::Taken => {
                    attempt += 1;
                    if attempt >= MAX_ID_ATTEMPTS {
                        return Err(CommandError::NoFreeId);
                    }
                    tracing::info!(%id, attempt, "assigned id taken in the log: trying the next");
                }
            }
        }
    }

    /// The topic's partition map (an id's event goes to the partition it
    /// names): learned at start-up or by the health probe, waited for a
    /// little when no broker has answered yet.
    async fn partition_map(&self, deadline: Instant) -> Result<PartitionMap, CommandError> {
        let wait = deadline.min(Instant::now() + Duration::from_secs(2));
        let map = self.routing.wait_map(wait).await.ok_or_else(|| {
            CommandError::Kafka(KafkaError::Unavailable(
                "the topic's partition map is not known yet (no broker has answered)".into(),
            ))
        })?;
        match self.routing.refusal() {
            Some(reason) => Err(CommandError::Unroutable(reason)),
            None => Ok(map),
        }
    }

    /// One id: look in the read model (unless `looked_up` already did),
    /// publish if it is free, learn the verdict.
    async fn try_id(
        &self,
        new: &NewUser,
        id: UserId,
        map: PartitionMap,
        looked_up: Option<(PartitionState, Option<StoredUser>)>,
        deadline: Instant,
    ) -> Result<Verdict, CommandError> {
        let p = map.home(id);
        // The fast check: a user the read model has is the log's winner.
        let (state, existing) = match looked_up {
            Some(l) => l,
            None => self.store.lookup(id, p).await?,
        };
        let existing = if existing.is_none() && !state.is_complete() {
            // Rebuilding after a loss: the id may be taken by an event not
            // yet replayed. Publish only once the read model can tell; the
            // verdict would wait for the rebuild anyway.
            tracing::info!(
                partition = p,
                ?state,
                "waiting for the read model to rebuild"
            );
            self.watch
                .wait_complete(p, deadline)
                .await
                .map_err(|e| match e {
                    WaitError::Timeout => {
                        CommandError::Undecided("the read model is rebuilding from the log".into())
                    }
                    e => e.into(),
                })?;
            self.store.get_user(id, p).await?
        } else {
            existing
        };
        if let Some(existing) = existing {
            return verdict(new, &existing);
        }

        let user = User {
            id,
            name: new.name.clone(),
            email: new.email.clone(),
            created_at_ms: now_ms(),
        };
        let event = UserCreated::new(user, new.request_id.clone());
        let published = self.publisher.publish(&event, p).await?;
        let position = EventPosition {
            partition: published.partition,
            offset: published.offset,
        };
        // This instance's projector owns the partition: it hands over the
        // verdict as it applies the event. "Created" is the whole answer (the
        // stored user is the event's); anything else asks Redis below.
        let decided = match self.verdicts.expect(position) {
            Expect::Decided(d) => Some(d),
            Expect::Pending(mut pending) => tokio::select! {
                d = pending.decided() => d,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(WaitError::Timeout.into());
                }
            },
            Expect::Elsewhere => None,
        };
        if decided == Some(Decided::Created) {
            return Ok(Verdict::Ours(Created {
                user: event.user,
                position,
            }));
        }
        self.watch
            .wait_applied(position.partition, position.offset, deadline)
            .await?;
        let Some(stored) = self.store.get_user(id, position.partition).await? else {
            // Applied, yet absent: Redis lost its data just now, or the
            // partition was sealed by a move to another topic (the log says
            // which: a WARN line of the projector names the new topic).
            return Err(CommandError::Undecided(
                "the event created nothing yet: the read model lost its data and is rebuilding, \
                 or the topic was moved to another (move-topic)"
                    .into(),
            ));
        };
        if stored.position() == Some(position) {
            return Ok(Verdict::Ours(Created {
                user: stored.user,
                position,
            }));
        }
        verdict(new, &stored)
    }
}

/// Whether `existing` is this request's user: created by an event that
/// carried this request's id.
fn verdict(new: &NewUser, existing: &StoredUser) -> Result<Verdict, CommandError> {
    if new.request_id.is_none() || existing.request_id != new.request_id {
        return Ok(Verdict::Taken);
    }
    let same = existing.user.name == new.name
        && existing.user.email == new.email
        && new.id.is_none_or(|id| id == existing.user.id);
    match (same, existing.position()) {
        (true, Some(position)) => Ok(Verdict::Ours(Created {
            user: existing.user.clone(),
            position,
        })),
        (true, None) => Err(CommandError::Undecided(
            "the user was written without its position".into(),
        )),
        (false, _) => Ok(Verdict::Reused),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
