//! How the service reaches Redis: one server (a shared multiplexed connection
//! or a bb8 pool), the master that Sentinel names, or a Redis Cluster, with a
//! timeout on every call. What the calls do lives in the files named after
//! what they hold.

use super::{Keys, StoreError};
use bb8_redis::RedisConnectionManager;
use futures::future::Either;
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Script, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    sentinel::{SentinelClient, SentinelServerType},
};
use std::{future::Future, sync::Arc, time::Duration};

/// The Lua scripts, loaded once (EVALSHA, with EVAL as the fallback).
pub(super) struct Scripts {
    pub(super) apply: Script,
    pub(super) open: Script,
}

pub use crate::config::RedisClientKind;

/// The Redis ACL credentials every connection authenticates with (in every
/// mode); the password never leaves its `SecretString` but to the connection.
#[derive(Debug, Clone, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<secrecy::SecretString>,
    /// The CA (PEM) that signs the servers' certificates, for `rediss://`;
    /// `None`: the system's trust store.
    pub tls_ca: Option<Vec<u8>>,
}

impl RedisAuth {
    fn apply(&self, mut redis: redis::RedisConnectionInfo) -> redis::RedisConnectionInfo {
        use secrecy::ExposeSecret;
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p.expose_secret());
        }
        redis
    }

    fn is_set(&self) -> bool {
        self.username.is_some() || self.password.is_some()
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: self.tls_ca.clone(),
        }
    }
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
    /// A Redis Cluster, found from any of these nodes (`redis://host:port`);
    /// the `redis` crate's cluster client routes by slot, follows `MOVED`
    /// and `ASK`, and refreshes the topology.
    Cluster(Vec<String>),
}

/// The cluster connection, made on first use (it needs a node to answer).
struct ClusterSource {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl ClusterSource {
    fn new(nodes: &[String], auth: &RedisAuth, timeout: Duration) -> Result<Self, StoreError> {
        let nodes: Vec<String> = nodes.iter().map(|s| with_scheme(s)).collect();
        let tls = nodes.iter().any(|n| n.starts_with("rediss://"));
        let mut builder = redis::cluster::ClusterClient::builder(nodes);
        if tls {
            builder = builder.certs(auth.certificates());
        }
        if let Some(u) = &auth.username {
            builder = builder.username(u);
        }
        if let Some(p) = &auth.password {
            use secrecy::ExposeSecret;
            builder = builder.password(p.expose_secret());
        }
        let client = builder
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(|e| bad("cluster nodes", e))?;
        Ok(Self {
            client,
            conn: tokio::sync::OnceCell::new(),
        })
    }

    async fn connection(&self) -> Result<redis::cluster_async::ClusterConnection, StoreError> {
        Ok(self
            .conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await?
            .clone())
    }

    /// Runs a read-only pipeline on a replica of `key`'s slot (the crate's
    /// own routing sends `READONLY` first).
    async fn query_replica<T: redis::FromRedisValue>(
        &self,
        key: &str,
        pipe: &Pipeline,
        commands: usize,
    ) -> Result<T, StoreError> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            key.as_bytes(),
            SlotAddr::ReplicaRequired,
        ));
        let values = self
            .connection()
            .await?
            .route_pipeline(pipe.clone(), 0, commands, route)
            .await?;
        redis::from_redis_value(Value::Array(values))
            .map_err(|e| StoreError::Protocol(e.to_string()))
    }
}

/// The master's connection (or, for replica reads, a replica's), found
/// through Sentinel and found again when a call fails (the node went away,
/// or a master was demoted and answers READONLY).
struct SentinelSource {
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl SentinelSource {
    fn new(
        sentinels: &[String],
        master: &str,
        kind: SentinelServerType,
        auth: &RedisAuth,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let urls: Vec<String> = sentinels.iter().map(|s| with_scheme(s)).collect();
        let client = if urls.iter().any(|u| u.starts_with("rediss://")) {
            Self::tls_client(&urls, master, kind, auth)
        } else {
            // The credentials are for the Redis nodes Sentinel names (a
            // sentinel of its own ACL takes them in its URL).
            let node = auth.is_set().then(|| {
                redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(auth.apply(Default::default()))
            });
            SentinelClient::build(urls, master, node, kind)
        }
        .map_err(|e| bad("Sentinel settings", e))?;
        Ok(Self {
            client: tokio::sync::Mutex::new(client),
            current: std::sync::Mutex::new(None),
            timeout,
        })
    }

    /// `rediss://` sentinels: TLS to the sentinels and to the nodes they
    /// name (a Sentinel that speaks TLS announces its nodes' TLS ports), each
    /// certificate checked against `REDIS_TLS_CA_FILE` (else the system's
    /// roots); the ACL credentials go to the nodes.
    fn tls_client(
        urls: &[String],
        master: &str,
        kind: SentinelServerType,
        auth: &RedisAuth,
    ) -> Result<SentinelClient, redis::RedisError> {
        use secrecy::ExposeSecret;
        let addrs = urls
            .iter()
            .map(|u| {
                redis::IntoConnectionInfo::into_connection_info(u.as_str())
                    .map(|i| i.addr().clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = redis::sentinel::SentinelClientBuilder::new(addrs, master, kind)?
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_certificates(auth.certificates())
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(auth.certificates());
        if let Some(u) = &auth.username {
            builder = builder.set_client_to_redis_username(u);
        }
        if let Some(p) = &auth.password {
            builder = builder.set_client_to_redis_password(p.expose_secret());
        }
        builder.build()
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
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
        tracing::info!(node = ?master.get_connection_info().addr(), "Redis node found through Sentinel");
        *self.current.lock().expect("sentinel lock poisoned") = Some(conn.clone());
        Ok(conn)
    }

    fn forget(&self) {
        self.current.lock().expect("sentinel lock poisoned").take();
    }

    /// Runs a pipeline on the node found; a failure makes the next call ask
    /// Sentinel again (for replica reads: that replica may be gone).
    async fn query<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        let result = pipe.query_async(&mut conn).await;
        if result.is_err() {
            self.forget();
        }
        Ok(result?)
    }
}

/// The connection a call runs on.
pub(super) enum Conn<'a> {
    Pooled(bb8::PooledConnection<'a, RedisConnectionManager>),
    Shared(ConnectionManager),
    Sentinel(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Calls `$call` on whichever connection `$conn` holds: the one place that
/// lists them.
macro_rules! on_conn {
    ($conn:expr, $c:ident => $call:expr) => {
        match $conn {
            Conn::Pooled($c) => $call,
            Conn::Shared($c) => $call,
            Conn::Sentinel($c) => $call,
            Conn::Cluster($c) => $call,
        }
    };
}

impl ConnectionLike for Conn<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        on_conn!(self, c => c.req_packed_command(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        on_conn!(self, c => c.req_packed_commands(cmd, offset, count))
    }

    fn get_db(&self) -> i64 {
        on_conn!(self, c => c.get_db())
    }
}

/// Where the calls go. Replica reads (GetUser's, see
/// [`RedisStore::with_replica_reads`]) live in the backends that have
/// replicas.
#[derive(Clone)]
enum Backend {
    /// One server, a bb8 pool of connections.
    Pool(bb8::Pool<RedisConnectionManager>),
    /// One server, one multiplexed connection that reconnects by itself.
    Shared(ConnectionManager),
    /// The master Sentinel names; `replicas`: a replica it names, when reads
    /// may go there.
    Sentinel {
        master: Arc<SentinelSource>,
        replicas: Option<Arc<SentinelSource>>,
    },
    /// A Redis Cluster; `replica_reads`: reads may go to a replica of the
    /// slot's master.
    Cluster {
        nodes: Arc<ClusterSource>,
        replica_reads: bool,
    },
}

impl Backend {
    /// One server at `url`, reached as `kind` says.
    fn server(
        url: &str,
        auth: &RedisAuth,
        kind: RedisClientKind,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let info =
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| bad("URL", e))?;
        let redis_settings = auth.apply(info.redis_settings().clone());
        let mut info = info.set_redis_settings(redis_settings);
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // rediss://: the connection info then carries the trust roots.
            info = redis::Client::build_with_tls(info, auth.certificates())
                .map_err(|e| bad("TLS settings", e))?
                .get_connection_info()
                .clone();
        }
        Ok(match kind {
            RedisClientKind::Pool => {
                let manager = RedisConnectionManager::new(info).map_err(|e| bad("URL", e))?;
                Self::Pool(
                    bb8::Pool::builder()
                        .max_size(pool_size)
                        // bb8 PINGs each connection it hands out (one more
                        // round trip per call): it is how the pool notices a
                        // connection to a Redis that went away; without it,
                        // dead connections are handed out forever.
                        .connection_timeout(timeout)
                        .build_unchecked(manager),
                )
            }
            RedisClientKind::Shared => {
                let client = redis::Client::open(info).map_err(|e| bad("URL", e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Self::Shared(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| bad("URL", e))?,
                )
            }
        })
    }
}

/// How often reads went to a replica, and how often the replica could not
/// answer for the position asked (or at all) and the master did.
#[derive(Debug, Default)]
pub struct ReplicaReadCounts {
    pub served: std::sync::atomic::AtomicU64,
    pub fell_back: std::sync::atomic::AtomicU64,
}

/// The service's Redis client, with a timeout on every call so a stalled
/// Redis becomes `Unavailable`, not a hang.
#[derive(Clone)]
pub struct RedisStore {
    backend: Backend,
    pub(super) replica_counts: Arc<ReplicaReadCounts>,
    metrics: crate::telemetry::Metrics,
    pub(super) keys: Keys,
    /// The topic's partition count once known (0 until then); shared by clones.
    pub(super) partitions: Arc<std::sync::atomic::AtomicI32>,
    timeout: Duration,
    pub(super) scripts: Arc<Scripts>,
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
    ) -> Result<Self, StoreError> {
        Self::with_auth(
            target,
            &RedisAuth::default(),
            keys,
            kind,
            pool_size,
            timeout,
        )
    }

    /// [`RedisStore::new`] with ACL credentials for every connection.
    pub fn with_auth(
        target: &RedisTarget,
        auth: &RedisAuth,
        keys: Keys,
        kind: RedisClientKind,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let backend = match target {
            RedisTarget::Server(url) => Backend::server(url, auth, kind, pool_size, timeout)?,
            RedisTarget::Sentinel { sentinels, master } => Backend::Sentinel {
                master: Arc::new(SentinelSource::new(
                    sentinels,
                    master,
                    SentinelServerType::Master,
                    auth,
                    timeout,
                )?),
                replicas: None,
            },
            RedisTarget::Cluster(nodes) => Backend::Cluster {
                nodes: Arc::new(ClusterSource::new(nodes, auth, timeout)?),
                replica_reads: false,
            },
        };
        Ok(Self {
            backend,
            replica_counts: Arc::default(),
            metrics: Default::default(),
            keys,
            partitions: Arc::default(),
            timeout,
            scripts: Arc::new(Scripts {
                apply: Script::new(include_str!("lua/apply.lua")),
                open: Script::new(include_str!("lua/open.lua")),
            }),
        })
    }

    /// A connection for one call, from whichever backend there is.
    pub(super) async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        Ok(match &self.backend {
            Backend::Pool(pool) => Conn::Pooled(pool.get().await?),
            Backend::Shared(shared) => Conn::Shared(shared.clone()),
            Backend::Sentinel { master, .. } => Conn::Sentinel(master.connection().await?),
            Backend::Cluster { nodes, .. } => Conn::Cluster(nodes.connection().await?),
        })
    }

    /// Lets GetUser read from replicas, to spread reads over more nodes. A
    /// replica answers only for what it has applied (its own checkpoint says
    /// so), and the master answers what it cannot; a single server has no
    /// replicas to read from, so asking for them there is a setup error.
    pub fn with_replica_reads(
        mut self,
        target: &RedisTarget,
        auth: &RedisAuth,
    ) -> Result<Self, StoreError> {
        match (&mut self.backend, target) {
            (Backend::Cluster { replica_reads, .. }, RedisTarget::Cluster(_)) => {
                *replica_reads = true;
            }
            (Backend::Sentinel { replicas, .. }, RedisTarget::Sentinel { sentinels, master }) => {
                *replicas = Some(Arc::new(SentinelSource::new(
                    sentinels,
                    master,
                    SentinelServerType::Replica,
                    auth,
                    self.timeout,
                )?));
            }
            (Backend::Pool(_) | Backend::Shared(_), _) => {
                return Err(StoreError::Unavailable(
                    "REDIS_READ_FROM_REPLICAS needs REDIS_SENTINEL_URLS or REDIS_CLUSTER_URLS"
                        .into(),
                ));
            }
            _ => {
                return Err(StoreError::Unavailable(
                    "replica reads asked for another Redis than the store's".into(),
                ));
            }
        }
        Ok(self)
    }

    /// Records its calls' latency into `metrics` (the application's).
    pub fn with_metrics(mut self, metrics: crate::telemetry::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Whether GetUser may read from replicas.
    pub fn reads_from_replicas(&self) -> bool {
        match &self.backend {
            Backend::Cluster { replica_reads, .. } => *replica_reads,
            Backend::Sentinel { replicas, .. } => replicas.is_some(),
            Backend::Pool(_) | Backend::Shared(_) => false,
        }
    }

    /// Reads served by replicas, and reads the master took over.
    pub fn replica_read_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.replica_counts.served.load(Relaxed),
            self.replica_counts.fell_back.load(Relaxed),
        )
    }

    /// Runs a read-only pipeline on a replica of `key`'s slot: `None` when
    /// replica reads are off.
    pub(super) async fn query_replica<T: redis::FromRedisValue>(
        &self,
        key: &str,
        pipe: &Pipeline,
        commands: usize,
    ) -> Option<Result<T, StoreError>> {
        let run = match &self.backend {
            Backend::Cluster {
                nodes,
                replica_reads: true,
            } => Either::Left(nodes.query_replica(key, pipe, commands)),
            Backend::Sentinel {
                replicas: Some(replica),
                ..
            } => Either::Right(replica.query(pipe)),
            _ => return None,
        };
        Some(
            tokio::time::timeout(self.timeout, run)
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("Redis replica timed out".into()))),
        )
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(super) async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let began = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("Redis call timed out".into())));
        self.metrics.redis_call(result.is_ok(), began.elapsed());
        if let (Err(StoreError::Unavailable(_)), Backend::Sentinel { master, .. }) =
            (&result, &self.backend)
        {
            // The master may have moved: ask Sentinel again on the next call.
            master.forget();
        }
        result
    }

    /// PING, for the health probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed(async {
            let mut conn = self.conn().await?;
            let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreError::Protocol(format!("PING answered {pong:?}")))
            }
        })
        .await
    }
}

/// A setting the `redis` crate refused.
fn bad(what: &str, e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("bad Redis {what}: {e}"))
}

/// A node given as `host:port` (as the Go service takes it) gets the scheme.
fn with_scheme(node: &str) -> String {
    if node.contains("://") {
        node.to_owned()
    } else {
        format!("redis://{node}")
    }
}
