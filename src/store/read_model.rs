//! The read model: users as the log's rule made them, written by the
//! projector in one atomic step with the checkpoint, read by GetUser and by
//! the command side (which learns from it whether its event won).

use super::{RedisStore, StoreError};
use crate::domain::{Email, EventPosition, RequestId, User, UserId, UserName};
use serde::{Deserialize, Serialize};

/// A user as the read model holds it (field `<id>` of its bucket): the Go service's JSON,
/// plus the position of the event that created it and that event's request
/// id, which make the log's verdict visible: a CreateUser whose event sits
/// elsewhere did not create it, unless an earlier attempt of the same
/// request did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUser {
    #[serde(flatten)]
    pub user: User,
    /// Absent in values written before positions were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// The request whose event created the user, if it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
}

impl StoredUser {
    pub fn new(user: User, position: EventPosition, request_id: Option<RequestId>) -> Self {
        Self {
            user,
            partition: Some(position.partition),
            offset: Some(position.offset),
            request_id,
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

/// A user's value in its bucket: what the field (the id) and the bucket's
/// tag (the partition) do not already say, under one-letter names, so that a
/// user costs Redis little more than its own bytes (the names alone were 38
/// of a value's ~140 bytes; docs/benchmarks-notes.md). Values written under
/// the long names by earlier builds still read.
#[derive(Serialize, Deserialize)]
struct Packed {
    #[serde(rename = "n", alias = "name")]
    name: UserName,
    #[serde(rename = "e", alias = "email")]
    email: Email,
    #[serde(rename = "t", alias = "created_at_ms")]
    created_at_ms: i64,
    #[serde(rename = "o", alias = "offset")]
    offset: i64,
    #[serde(
        rename = "r",
        alias = "request_id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    request_id: Option<RequestId>,
}

impl StoredUser {
    /// The value the apply script writes for this user.
    pub(super) fn pack(&self) -> String {
        serde_json::to_string(&Packed {
            name: self.user.name.clone(),
            email: self.user.email.clone(),
            created_at_ms: self.user.created_at_ms,
            offset: self.offset.unwrap_or(-1),
            request_id: self.request_id.clone(),
        })
        .expect("a user serialises")
    }
}

/// One record for the projector to apply, in log order.
#[derive(Debug, Clone)]
pub struct ApplyOp {
    pub position: EventPosition,
    /// `None` moves the checkpoint only (a record sent to the dead-letter
    /// topic, or copied to its id's partition).
    pub user: Option<User>,
    /// The request id the event carries, if any.
    pub request_id: Option<RequestId>,
    /// Set for the seal `move-topic` writes (the topic the users moved to):
    /// the partition's later events create nothing.
    pub sealed_to: Option<String>,
}

/// What a batch did to the read model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Users written.
    pub applied: u64,
    /// Events for an id the read model already had (the first in the log wins).
    pub duplicates: u64,
    /// Events at or below the checkpoint: replays, changed nothing.
    pub skipped: u64,
    /// The indexes (in the batch) of the events that created a user.
    pub created: Vec<usize>,
}

/// The answer of [`RedisStore::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The user, if the read model has it (`partition`: its id's partition).
    pub async fn get_user(
        &self,
        id: UserId,
        partition: i32,
    ) -> Result<Option<StoredUser>, StoreError> {
        let slot = self.keys.user(id, partition);
        self.timed(async {
            let mut conn = self.conn().await?;
            let raw: Option<String> = redis::cmd("HGET")
                .arg(&slot.key)
                .arg(&slot.field)
                .query_async(&mut conn)
                .await?;
            raw.map(|r| decode(&slot.key, id, partition, &r))
                .transpose()
        })
        .await
    }

    /// Applies one partition's records in log order, atomically with its
    /// checkpoint, if the checkpoint is still `expected` (the offset the
    /// projector resumed after; -1 for none). `rehomed`: the highest offset of
    /// the batch whose copy to its id's partition was acknowledged, kept
    /// beside the checkpoint (see [`Opened::rehomed`](super::Opened)).
    pub async fn apply(
        &self,
        partition: i32,
        ops: &[ApplyOp],
        expected: i64,
        rehomed: Option<i64>,
    ) -> Result<ApplyResult, StoreError> {
        if ops.is_empty() {
            return Ok(ApplyResult::Applied(ApplyOutcome::default()));
        }
        let projection = self.keys.checkpoint(partition);
        let mut invocation = self.scripts.apply.key(&projection);
        invocation
            .arg(expected)
            .arg(rehomed.map(|o| o.to_string()).unwrap_or_default());
        for op in ops {
            debug_assert_eq!(op.position.partition, partition);
            match &op.user {
                Some(user) => {
                    let value =
                        StoredUser::new(user.clone(), op.position, op.request_id.clone()).pack();
                    let slot = self.keys.user(user.id, partition);
                    invocation
                        .key(slot.key)
                        .arg(op.position.offset)
                        .arg(slot.field)
                        .arg(value);
                }
                None => {
                    invocation
                        .key(&projection)
                        .arg(op.position.offset)
                        .arg("")
                        .arg(op.sealed_to.as_deref().unwrap_or(""));
                }
            }
        }
        self.timed(async {
            let mut conn = self.conn().await?;
            let reply: Vec<redis::Value> = invocation.invoke_async(&mut conn).await?;
            parse_apply(partition, &reply)
        })
        .await
    }
}

/// The `hash-max-listpack-value` the read model's buckets want: a user's
/// value (a few hundred bytes at most) then keeps its bucket a compact
/// listpack. Redis' default is 64.
pub const ADVISED_LISTPACK_VALUE: i64 = 512;

impl RedisStore {
    /// Redis' `hash-max-listpack-value`; `None` if Redis does not say (a
    /// managed Redis may refuse `CONFIG`).
    pub async fn listpack_value_limit(&self) -> Result<Option<i64>, StoreError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            let reply: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("hash-max-listpack-value")
                .query_async(&mut conn)
                .await?;
            Ok(reply.get(1).and_then(|v| v.parse().ok()))
        })
        .await
    }
}

impl RedisStore {
    /// Remembers, for `ttl`, that `request_id`'s request created `id`. The
    /// index only guards against a client reusing a request id for another
    /// request (another client-chosen id): retries need it not, since their
    /// ids follow from the request id and the user names its request. So it
    /// is written after the apply, in its own hash slot, first writer wins;
    /// a crash between the two leaves that guard off for that request.
    pub async fn remember_request(
        &self,
        request_id: &RequestId,
        id: UserId,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.request(request_id);
        self.timed(async {
            let mut conn = self.conn().await?;
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(id.get())
                .arg("NX")
                .arg("EXAT")
                .arg(expires_at_s)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// The id of the user that `request_id`'s request created, while the
    /// index remembers it (see [`RedisStore::remember_request`]).
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
}

fn parse_apply(partition: i32, reply: &[redis::Value]) -> Result<ApplyResult, StoreError> {
    let bad = || StoreError::Protocol(format!("apply returned {reply:?}"));
    let text = |v: &redis::Value| redis::from_redis_value::<String>(v.clone()).ok();
    let int = |v: &redis::Value| redis::from_redis_value::<u64>(v.clone()).ok();
    match reply {
        [tag, a, d, s, created @ ..] if text(tag).as_deref() == Some("ok") => {
            Ok(ApplyResult::Applied(ApplyOutcome {
                applied: int(a).ok_or_else(bad)?,
                duplicates: int(d).ok_or_else(bad)?,
                skipped: int(s).ok_or_else(bad)?,
                created: created
                    .iter()
                    .map(|e| int(e).map(|e| e as usize).ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
            }))
        }
        [tag, c] if text(tag).as_deref() == Some("moved") => Ok(ApplyResult::Moved {
            partition,
            checkpoint: text(c).and_then(|c| c.parse().ok()),
        }),
        _ => Err(bad()),
    }
}

/// A user's value as [`StoredUser::pack`] wrote it, at field `id` of a
/// bucket of `partition`.
pub(super) fn decode(
    key: &str,
    id: UserId,
    partition: i32,
    raw: &str,
) -> Result<StoredUser, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: format!("{key} {id}"),
        reason,
    };
    let p: Packed = serde_json::from_str(raw).map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredUser {
        user: User {
            id,
            name: p.name,
            email: p.email,
            created_at_ms: p.created_at_ms,
        },
        partition: Some(partition),
        offset: Some(p.offset).filter(|o| *o >= 0),
        request_id: p.request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_user_reads_back_whole() {
        let user = User {
            id: UserId::parse(1453).unwrap(),
            name: UserName::parse("Ada \"Countess\" Lovelace").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: 1_796_305_527_071,
        };
        let position = EventPosition {
            partition: 7,
            offset: 42,
        };
        for request_id in [None, RequestId::parse("req-1").unwrap()] {
            let stored = StoredUser::new(user.clone(), position, request_id);
            let packed = stored.pack();
            assert!(!packed.contains("1453"), "the id is the field: {packed}");
            assert_eq!(decode("k", user.id, 7, &packed).unwrap(), stored);
        }
        assert!(matches!(
            decode("k", user.id, 7, "{not json"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn values_under_the_long_names_of_earlier_builds_still_read() {
        let old = r#"{"name":"Ada","email":"ada@example.com","created_at_ms":5,"offset":42,"request_id":"req-1"}"#;
        let stored = decode("k", UserId::parse(1453).unwrap(), 7, old).unwrap();
        assert_eq!(stored.user.name.as_str(), "Ada");
        assert_eq!(stored.user.email.as_str(), "ada@example.com");
        assert_eq!(stored.user.created_at_ms, 5);
        assert_eq!(
            stored.position().map(|p| (p.partition, p.offset)),
            Some((7, 42))
        );
        assert_eq!(
            stored.request_id.as_ref().map(|r| r.as_str()),
            Some("req-1")
        );
        // And what this build writes is shorter by the names.
        assert_eq!(stored.pack().len(), old.len() - 33, "{}", stored.pack());
    }
}
