//! [`RedisStore`]: every Redis call the service makes, behind a bb8 pool.

use super::CacheError;
use crate::domain::{NewUser, User, UserId};
use bb8_redis::RedisConnectionManager;
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Script, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    sentinel::{SentinelClient, SentinelServerType},
};
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

/// Key names, so that every part of the service (and every test, by its own
/// prefix) agrees on them.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    topic: String,
}

impl Keys {
    pub fn new(prefix: &str, topic: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// `user_<id>`, the Go service's cache key.
    pub fn user(&self, id: UserId) -> String {
        format!("{}user_{id}", self.prefix)
    }

    /// Hash of partition → offset of the last event applied to the read model.
    pub fn applied(&self) -> String {
        format!("{}projection:{}:applied", self.prefix, self.topic)
    }

    fn user_prefix(&self) -> String {
        format!("{}user_", self.prefix)
    }

    fn reservation_prefix(&self) -> String {
        format!("{}user-id-reserved:", self.prefix)
    }

    fn reservation(&self, id: UserId) -> String {
        format!("{}{id}", self.reservation_prefix())
    }

    fn request(&self, request_id: Option<&str>) -> String {
        match request_id {
            Some(r) => format!("{}user-request:{r}", self.prefix),
            // Lua scripts must name their keys; this one is never written.
            None => format!("{}user-request-none", self.prefix),
        }
    }

    fn id_sequence(&self) -> String {
        format!("{}user-id-seq", self.prefix)
    }
}

/// The answer a CreateUser gave, kept so that a retry gets it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    pub user: User,
    pub partition: i32,
    pub offset: i64,
}

/// What the id reservation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The id is ours: publish the event.
    Reserved(UserId),
    /// The id belongs to another user.
    Exists(UserId),
    /// This request id was answered before, with these fields: answer the same.
    Replay(StoredAnswer),
    /// This request id is being handled right now by another call.
    InProgress,
    /// This request id was used before with other fields.
    Conflict,
}

/// One record for the projector to apply, in log order.
#[derive(Debug, Clone)]
pub struct ApplyOp {
    pub partition: i32,
    pub offset: i64,
    /// `None` moves the position only (a record sent to the dead-letter topic).
    pub user: Option<User>,
}

/// What a batch did to the read model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Users written.
    pub applied: u64,
    /// Events for an id the read model already had (the first in the log wins).
    pub duplicates: u64,
    /// Events at or below the applied position: replays, changed nothing.
    pub skipped: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestRecord {
    state: String,
    fingerprint: String,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    answer: Option<StoredAnswer>,
}

struct Scripts {
    reserve: Script,
    release: Script,
    apply: Script,
}

/// How calls reach Redis. Every call the service makes is a single command, a
/// pipeline or a Lua script (atomic by itself), so none needs a connection to
/// itself: both kinds serve all of them, and the benchmarks compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisClientKind {
    /// A bb8 pool of multiplexed connections: each call takes one.
    Pool,
    /// One shared multiplexed connection (redis-rs `ConnectionManager`, which
    /// reconnects): concurrent calls pipeline on it.
    Shared,
}

/// Where Redis is: one server, or the master that Sentinel names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`.
    Server(String),
    /// Ask these sentinels (`host:port` or `redis://` URLs) for `master`; after
    /// a failover the next call finds the new master.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// The master's connection, found through Sentinel and found again when a
/// call fails (the master went away, or was demoted and answers READONLY).
struct SentinelSource {
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl SentinelSource {
    async fn connection(&self) -> Result<MultiplexedConnection, CacheError> {
        if let Some(c) = self.current.lock().expect("sentinel lock poisoned").clone() {
            return Ok(c);
        }
        // One resolution at a time; a caller that waited finds it done.
        let mut client = self.client.lock().await;
        if let Some(c) = self.current.lock().expect("sentinel lock poisoned").clone() {
            return Ok(c);
        }
        let master = client.async_get_client().await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = master
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        tracing::info!(master = ?master.get_connection_info().addr(), "Redis master found through Sentinel");
        *self.current.lock().expect("sentinel lock poisoned") = Some(conn.clone());
        Ok(conn)
    }

    fn forget(&self) {
        self.current.lock().expect("sentinel lock poisoned").take();
    }
}

/// The connection a call runs on.
enum Conn<'a> {
    Pooled(bb8::PooledConnection<'a, RedisConnectionManager>),
    Shared(ConnectionManager),
    Sentinel(MultiplexedConnection),
}

impl ConnectionLike for Conn<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Pooled(c) => c.req_packed_command(cmd),
            Conn::Shared(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Shared(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Pooled(c) => c.get_db(),
            Conn::Shared(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// The service's Redis client, with a timeout on every call so a stalled
/// Redis becomes `Unavailable`, not a hang.
#[derive(Clone)]
pub struct RedisStore {
    pool: bb8::Pool<RedisConnectionManager>,
    /// Set when calls go over one shared connection instead of the pool.
    shared: Option<ConnectionManager>,
    /// Set when Sentinel names the master; it then serves every call.
    sentinel: Option<Arc<SentinelSource>>,
    keys: Keys,
    timeout: Duration,
    scripts: Arc<Scripts>,
}

impl RedisStore {
    /// Builds the client without connecting: the service starts while Redis is
    /// down and reports it through health instead of failing.
    pub fn new(
        target: &RedisTarget,
        keys: Keys,
        kind: RedisClientKind,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, CacheError> {
        let bad = |what: &str, e: redis::RedisError| {
            CacheError::Unavailable(format!("bad Redis {what}: {e}"))
        };
        let (url, sentinel) = match target {
            RedisTarget::Server(url) => (url.as_str(), None),
            RedisTarget::Sentinel { sentinels, master } => {
                let urls: Vec<String> = sentinels
                    .iter()
                    .map(|s| {
                        if s.contains("://") {
                            s.clone()
                        } else {
                            format!("redis://{s}")
                        }
                    })
                    .collect();
                let client =
                    SentinelClient::build(urls, master.clone(), None, SentinelServerType::Master)
                        .map_err(|e| bad("Sentinel settings", e))?;
                let source = SentinelSource {
                    client: tokio::sync::Mutex::new(client),
                    current: std::sync::Mutex::new(None),
                    timeout,
                };
                // The pool and the shared connection are not used with Sentinel.
                ("redis://127.0.0.1:6379", Some(Arc::new(source)))
            }
        };
        let manager = RedisConnectionManager::new(url).map_err(|e| bad("URL", e))?;
        let pool = bb8::Pool::builder()
            .max_size(pool_size)
            // bb8 PINGs each connection it hands out (one more round trip per
            // call): it is how the pool notices a connection to a Redis that
            // went away; without it, dead connections are handed out forever.
            .connection_timeout(timeout)
            .build_unchecked(manager);
        let shared = match (kind, &sentinel) {
            (RedisClientKind::Shared, None) => {
                let client = redis::Client::open(url).map_err(|e| bad("URL", e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Some(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| bad("URL", e))?,
                )
            }
            _ => None,
        };
        Ok(Self {
            pool,
            shared,
            sentinel,
            keys,
            timeout,
            scripts: Arc::new(Scripts {
                reserve: Script::new(include_str!("lua/reserve.lua")),
                release: Script::new(include_str!("lua/release.lua")),
                apply: Script::new(include_str!("lua/apply.lua")),
            }),
        })
    }

    /// A connection for one call: the shared one, or one from the pool.
    async fn conn(&self) -> Result<Conn<'_>, CacheError> {
        Ok(match (&self.sentinel, &self.shared) {
            (Some(sentinel), _) => Conn::Sentinel(sentinel.connection().await?),
            (None, Some(shared)) => Conn::Shared(shared.clone()),
            (None, None) => Conn::Pooled(self.pool.get().await?),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let result = tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or_else(|_| Err(CacheError::Unavailable("Redis call timed out".into())));
        if let (Err(CacheError::Unavailable(_)), Some(sentinel)) = (&result, &self.sentinel) {
            // The master may have moved: ask Sentinel again on the next call.
            sentinel.forget();
        }
        result
    }

    /// PING, for the health probe.
    pub async fn ping(&self) -> Result<(), CacheError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(CacheError::Protocol(format!("PING answered {pong:?}")))
            }
        })
        .await
    }

    /// The user, if the read model has it.
    pub async fn get_user(&self, id: UserId) -> Result<Option<User>, CacheError> {
        let key = self.keys.user(id);
        self.timed(async {
            let mut conn = self.conn().await?;
            let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            raw.map(|r| decode_user(&key, &r)).transpose()
        })
        .await
    }

    /// Whether `partition` has been applied up to `offset`, and the user as of
    /// that answer: one round trip for GetUser's read-your-write wait.
    pub async fn get_user_at(
        &self,
        id: UserId,
        partition: i32,
        offset: i64,
    ) -> Result<(bool, Option<User>), CacheError> {
        let key = self.keys.user(id);
        self.timed(async {
            let mut conn = self.conn().await?;
            // The position is read first: the apply script writes both at once,
            // so a position at or past `offset` means the user read after it is
            // at least that fresh.
            let (applied, raw): (Option<i64>, Option<String>) = redis::pipe()
                .hget(self.keys.applied(), partition)
                .get(&key)
                .query_async(&mut conn)
                .await?;
            let user = raw.map(|r| decode_user(&key, &r)).transpose()?;
            Ok((applied.is_some_and(|a| a >= offset), user))
        })
        .await
    }

    /// Offset of the last applied event, per partition.
    pub async fn applied_positions(&self) -> Result<HashMap<i32, i64>, CacheError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            Ok(redis::cmd("HGETALL")
                .arg(self.keys.applied())
                .query_async(&mut conn)
                .await?)
        })
        .await
    }

    /// Reserves the user's id (or assigns one) and, with a request id, records
    /// the request as pending for `pending_ttl`; all in one atomic script.
    pub async fn reserve(
        &self,
        user: &NewUser,
        pending_ttl: Duration,
    ) -> Result<Reservation, CacheError> {
        let request_id = user.request_id.as_ref().map(|r| r.as_str());
        let fingerprint = user.fingerprint();
        let (state, value): (String, String) = self
            .timed(async {
                let mut conn = self.conn().await?;
                Ok(self
                    .scripts
                    .reserve
                    .key(self.keys.request(request_id))
                    .key(self.keys.id_sequence())
                    .arg(if request_id.is_some() { "1" } else { "0" })
                    .arg(&fingerprint)
                    .arg(user.id.map(|i| i.to_string()).unwrap_or_default())
                    .arg(pending_ttl.as_secs().max(1))
                    .arg(self.keys.reservation_prefix())
                    .arg(self.keys.user_prefix())
                    .arg(owner(user))
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        let parse_id = |v: &str| {
            v.parse::<i64>()
                .ok()
                .and_then(|i| UserId::parse(i).ok())
                .ok_or_else(|| CacheError::Protocol(format!("reserve returned id {v:?}")))
        };
        match state.as_str() {
            "reserved" => Ok(Reservation::Reserved(parse_id(&value)?)),
            "exists" => Ok(Reservation::Exists(parse_id(&value)?)),
            "replay" => {
                let key = self.keys.request(request_id);
                let record: RequestRecord =
                    serde_json::from_str(&value).map_err(|e| CacheError::Corrupt {
                        key,
                        reason: e.to_string(),
                    })?;
                Ok(match record {
                    r if r.fingerprint != fingerprint => Reservation::Conflict,
                    RequestRecord {
                        answer: Some(a), ..
                    } => Reservation::Replay(a),
                    _ => Reservation::InProgress,
                })
            }
            other => Err(CacheError::Protocol(format!("reserve returned {other:?}"))),
        }
    }

    /// Records the answer of a request with a request id, for its retries.
    pub async fn complete(
        &self,
        user: &NewUser,
        answer: &StoredAnswer,
        request_ttl: Duration,
    ) -> Result<(), CacheError> {
        let Some(request_id) = &user.request_id else {
            return Ok(());
        };
        let record = RequestRecord {
            state: "done".into(),
            fingerprint: user.fingerprint(),
            id: answer.user.id.to_string(),
            answer: Some(answer.clone()),
        };
        // Serialising strings and integers cannot fail.
        let json = serde_json::to_string(&record).expect("a request record serialises");
        self.timed(async {
            let mut conn = self.conn().await?;
            let _: () = redis::cmd("SET")
                .arg(self.keys.request(Some(request_id.as_str())))
                .arg(json)
                .arg("EX")
                .arg(request_ttl.as_secs().max(1))
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Gives the id back after a failed publish, so a retry can take it.
    pub async fn release(&self, user: &NewUser, id: UserId) -> Result<(), CacheError> {
        let request_id = user.request_id.as_ref().map(|r| r.as_str());
        self.timed(async {
            let mut conn = self.conn().await?;
            let _: i64 = self
                .scripts
                .release
                .key(self.keys.reservation(id))
                .key(self.keys.request(request_id))
                .arg(owner(user))
                .arg(if request_id.is_some() { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Applies a batch in log order, atomically with the applied positions.
    pub async fn apply(&self, ops: &[ApplyOp]) -> Result<ApplyOutcome, CacheError> {
        if ops.is_empty() {
            return Ok(ApplyOutcome::default());
        }
        let applied_key = self.keys.applied();
        let mut invocation = self.scripts.apply.key(&applied_key);
        for op in ops {
            match &op.user {
                Some(user) => {
                    // Serialising strings and integers cannot fail.
                    let json = serde_json::to_string(user).expect("a user serialises");
                    invocation
                        .key(self.keys.user(user.id))
                        .arg(op.partition)
                        .arg(op.offset)
                        .arg(json);
                }
                None => {
                    invocation
                        .key(&applied_key)
                        .arg(op.partition)
                        .arg(op.offset)
                        .arg("");
                }
            }
        }
        self.timed(async {
            let mut conn = self.conn().await?;
            let (applied, duplicates, skipped): (u64, u64, u64) =
                invocation.invoke_async(&mut conn).await?;
            Ok(ApplyOutcome {
                applied,
                duplicates,
                skipped,
            })
        })
        .await
    }
}

/// Who holds an id reservation: the request id when there is one (so that its
/// retry can take the id again), else the request's fields.
fn owner(user: &NewUser) -> String {
    match &user.request_id {
        Some(r) => format!("req:{}", r.as_str()),
        None => format!("fp:{}", user.fingerprint()),
    }
}

fn decode_user(key: &str, raw: &str) -> Result<User, CacheError> {
    serde_json::from_str(raw).map_err(|e| CacheError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
