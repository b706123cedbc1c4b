//! The read model: users as the log's rule made them, written by the
//! projector in one atomic step with the checkpoint, read by GetUser and by
//! the command side (which learns from it whether its event won).

use super::{RedisStore, StoreError};
use crate::domain::{EventPosition, RequestId, User, UserId};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A user as the read model holds it (`user_<id>`): the Go service's JSON,
/// plus the position of the event that created it, which makes the log's
/// verdict visible: a CreateUser whose event sits elsewhere did not create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUser {
    #[serde(flatten)]
    pub user: User,
    /// Absent in values written before positions were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

impl StoredUser {
    pub fn new(user: User, position: EventPosition) -> Self {
        Self {
            user,
            partition: Some(position.partition),
            offset: Some(position.offset),
        }
    }

    /// Where the event that created this user sits in the log.
    pub fn position(&self) -> Option<EventPosition> {
        Some(EventPosition {
            partition: self.partition?,
            offset: self.offset?,
        })
    }
}

/// One record for the projector to apply, in log order.
#[derive(Debug, Clone)]
pub struct ApplyOp {
    pub position: EventPosition,
    /// `None` moves the checkpoint only (a record sent to the dead-letter topic).
    pub user: Option<User>,
    /// The request id the event carries, if any.
    pub request_id: Option<RequestId>,
}

/// What a batch did to the read model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Users written.
    pub applied: u64,
    /// Events for an id the read model already had (the first in the log wins).
    pub duplicates: u64,
    /// Events at or below the checkpoint: replays, changed nothing.
    pub skipped: u64,
}

/// The answer of [`RedisStore::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyResult {
    Applied(ApplyOutcome),
    /// Nothing was written: Redis holds another checkpoint for `partition`
    /// than the projector resumed from (`None`: none at all, Redis lost it).
    Moved {
        partition: i32,
        checkpoint: Option<i64>,
    },
}

impl RedisStore {
    /// The user, if the read model has it.
    pub async fn get_user(&self, id: UserId) -> Result<Option<StoredUser>, StoreError> {
        let key = self.keys.user(id);
        self.timed(async {
            let mut conn = self.conn().await?;
            let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            raw.map(|r| decode(&key, &r)).transpose()
        })
        .await
    }

    /// The id of the user that `request_id`'s request created, while the
    /// read model remembers it (`REQUEST_ID_TTL` after the event).
    pub async fn request_owner(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<UserId>, StoreError> {
        let key = self.keys.request(request_id);
        self.timed(async {
            let mut conn = self.conn().await?;
            let raw: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            Ok(raw.and_then(|id| UserId::parse(id).ok()))
        })
        .await
    }

    /// Applies a batch in log order, atomically with the checkpoint, if the
    /// checkpoint of every partition in it is still `expected` (the offset
    /// the projector resumed after; -1 for none). Request ids are remembered
    /// until `request_ttl` after their event's time.
    pub async fn apply(
        &self,
        ops: &[ApplyOp],
        expected: &BTreeMap<i32, i64>,
        request_ttl: Duration,
    ) -> Result<ApplyResult, StoreError> {
        if ops.is_empty() {
            return Ok(ApplyResult::Applied(ApplyOutcome::default()));
        }
        let checkpoint = self.keys.checkpoint();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut invocation = self.scripts.apply.key(&checkpoint);
        invocation.key(self.keys.rebuild()).arg(expected.len());
        for (partition, offset) in expected {
            invocation.arg(partition).arg(offset);
        }
        for op in ops {
            let p = op.position;
            match &op.user {
                Some(user) => {
                    let value = serde_json::to_string(&StoredUser::new(user.clone(), p))
                        .expect("a user serialises");
                    let expires = user.created_at_ms.div_euclid(1000)
                        + request_ttl.as_secs().min(i64::MAX as u64 / 2) as i64;
                    match op.request_id.as_ref().filter(|_| expires > now) {
                        Some(r) => invocation
                            .key(self.keys.user(user.id))
                            .key(self.keys.request(r)),
                        None => invocation.key(self.keys.user(user.id)).key(&checkpoint),
                    };
                    invocation
                        .arg(p.partition)
                        .arg(p.offset)
                        .arg(value)
                        .arg(user.id.get())
                        .arg(expires);
                }
                None => {
                    invocation
                        .key(&checkpoint)
                        .key(&checkpoint)
                        .arg(p.partition)
                        .arg(p.offset)
                        .arg("")
                        .arg("")
                        .arg(0);
                }
            }
        }
        self.timed(async {
            let mut conn = self.conn().await?;
            let reply: Vec<redis::Value> = invocation.invoke_async(&mut conn).await?;
            parse_apply(&reply)
        })
        .await
    }
}

fn parse_apply(reply: &[redis::Value]) -> Result<ApplyResult, StoreError> {
    let bad = || StoreError::Protocol(format!("apply returned {reply:?}"));
    let text = |v: &redis::Value| redis::from_redis_value::<String>(v.clone()).ok();
    let int = |v: &redis::Value| redis::from_redis_value::<u64>(v.clone()).ok();
    match reply {
        [tag, a, d, s] if text(tag).as_deref() == Some("ok") => {
            Ok(ApplyResult::Applied(ApplyOutcome {
                applied: int(a).ok_or_else(bad)?,
                duplicates: int(d).ok_or_else(bad)?,
                skipped: int(s).ok_or_else(bad)?,
            }))
        }
        [tag, p, c] if text(tag).as_deref() == Some("moved") => Ok(ApplyResult::Moved {
            partition: text(p).and_then(|p| p.parse().ok()).ok_or_else(bad)?,
            checkpoint: text(c).and_then(|c| c.parse().ok()),
        }),
        _ => Err(bad()),
    }
}

pub(super) fn decode(key: &str, raw: &str) -> Result<StoredUser, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
