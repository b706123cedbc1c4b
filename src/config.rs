//! Configuration from flags and environment variables, as containers expect.
//!
//! Every setting has a flag and an environment variable; `--help` lists them.
//! Defaults keep the names of the Go service this one replaces (topic
//! `topic-user-creating`, cache key `user_<id>`) and point at the local stack
//! that `scripts/stack up` starts.
//!
//! Plain values only: this module names no other part of the service but
//! telemetry (the log format). The few kinds of setting that are more than a
//! string or a number ([`SecurityProtocol`], [`SaslMechanism`],
//! [`RedisClientKind`]) are defined here and used by the adapters, and
//! startup turns the settings into what the adapters take (`kafka_link`,
//! `redis_target`, `redis_auth`, in `startup::settings`).

use clap::Parser;
use std::{net::SocketAddr, time::Duration};

/// Log output format; telemetry's (it sets up the logs), named here too.
pub use crate::telemetry::LogFormat;

/// How the service finds its engines and behaves; parsed once in `main`, built
/// by hand in tests.
#[derive(Debug, Clone, Parser)]
#[command(name = "user-service", version, about)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// Where Prometheus scrapes `/metrics` (its own port, off the gRPC one);
    /// `off` turns the endpoint off. On by default: metrics are how such a
    /// service is watched, and an unscraped endpoint costs nothing. Port 0
    /// picks a free one (tests, several instances on one machine).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: MetricsAddr,

    /// The server's certificate chain (PEM): set with `TLS_KEY_FILE`, gRPC is
    /// served over TLS only; unset, plaintext (local development, or a mesh
    /// sidecar that terminates TLS). Read again when the file changes.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<std::path::PathBuf>,

    /// The certificate's private key (PEM).
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<std::path::PathBuf>,

    /// Set: every client must present a certificate signed by this CA (PEM):
    /// mutual TLS.
    #[arg(long, env = "TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<std::path::PathBuf>,

    /// How often the TLS files are checked for a change.
    #[arg(long, env = "TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,

    /// A TLS handshake not done by then is dropped.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Most TLS handshakes in flight; a connection accepted past it is
    /// closed at once (and counted), so half-open connections cost a bounded
    /// number of handshake tasks. A handshake takes about a millisecond of
    /// CPU: 256 let a whole fleet of clients reconnect at once.
    #[arg(long, env = "TLS_MAX_HANDSHAKES", default_value_t = 256)]
    pub tls_max_handshakes: usize,

    /// Kafka bootstrap servers, a comma-separated list of host:port.
    #[arg(long, env = "KAFKA_BROKER_URL", default_value = "127.0.0.1:19092")]
    pub kafka_broker_url: String,

    /// How the brokers are reached: `plaintext` (local development),
    /// `ssl`, `sasl_plaintext` or `sasl_ssl` (credentials over TLS).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_enum, ignore_case = true, default_value_t = SecurityProtocol::Plaintext)]
    pub kafka_security_protocol: SecurityProtocol,

    /// The SASL mechanism for `sasl_*` protocols.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_enum, ignore_case = true, default_value_t = SaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: SaslMechanism,

    /// The SASL user for `sasl_*` protocols.
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// The SASL password. Prefer `KAFKA_SASL_PASSWORD_FILE`. Never printed:
    /// not in `--help`, logs, errors, health or metrics.
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub kafka_sasl_password: Option<secrecy::SecretString>,

    /// A file holding the SASL password (its first line); wins over
    /// `KAFKA_SASL_PASSWORD`.
    #[arg(long, env = "KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,

    /// The CA (PEM) that signs the brokers' certificates, for `ssl` and
    /// `sasl_ssl`; unset, the system's trust store.
    #[arg(long, env = "KAFKA_TLS_CA_FILE")]
    pub kafka_tls_ca_file: Option<std::path::PathBuf>,

    /// Redis server: `redis://host:port[/db]` or a bare `host:port`.
    #[arg(
        long,
        env = "REDIS_SERVER_URL",
        default_value = "redis://127.0.0.1:16379"
    )]
    pub redis_server_url: String,

    /// Sentinels (comma-separated `host:port`) that name the Redis master;
    /// when set, `REDIS_SERVER_URL` is not used and a failover is followed.
    #[arg(long, env = "REDIS_SENTINEL_URLS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// Redis Cluster nodes (comma-separated `host:port` or `redis://...`;
    /// any of them finds the rest); when set, `REDIS_SERVER_URL` and
    /// Sentinel are not used.
    #[arg(long, env = "REDIS_CLUSTER_URLS", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// The Redis ACL user (with `REDIS_PASSWORD`); unset, the default user.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// The Redis password. Prefer `REDIS_PASSWORD_FILE` (a mounted secret):
    /// a value in the environment is seen by whoever can read the process's.
    /// Never printed: not in `--help`, logs, errors, health or metrics.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub redis_password: Option<secrecy::SecretString>,

    /// A file holding the Redis password (its first line), as container
    /// platforms mount secrets; wins over `REDIS_PASSWORD`.
    #[arg(long, env = "REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// The CA (PEM) that signs the Redis servers' certificates, for
    /// `rediss://` URLs (one server or Cluster nodes); unset, the system's
    /// trust store.
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<std::path::PathBuf>,

    /// Bytes of users kept in process memory in front of Redis (repeat
    /// GetUser calls need no round trip; users never change, so a cached
    /// one is never stale); `0` turns the cache off.
    #[arg(long, env = "USER_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub user_cache_bytes: u64,

    /// Let GetUser read from replicas (Sentinel's or the cluster's): a
    /// replica answers only what its own checkpoint covers, so a read with a
    /// position still sees its write; off by default (see the README's
    /// measurements before turning it on).
    #[arg(long, env = "REDIS_READ_FROM_REPLICAS", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_read_from_replicas: bool,

    /// The master's name in Sentinel.
    #[arg(long, env = "REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    pub redis_sentinel_master: String,

    /// Topic the `UserCreated` events are published to.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "topic-user-creating")]
    pub topic: String,

    /// Dead-letter topic for records the projector cannot decode
    /// (default: `<topic>.dlq`).
    #[arg(long, env = "KAFKA_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// Consumer group the projectors of all instances share.
    #[arg(
        long,
        env = "KAFKA_CONSUMER_GROUP",
        default_value = "user-service-projector"
    )]
    pub consumer_group: String,

    /// Partitions of the topic when the service creates it (see
    /// [`DEFAULT_TOPIC_PARTITIONS`]).
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = DEFAULT_TOPIC_PARTITIONS)]
    pub topic_partitions: i32,

    /// Replication factor of the topic when the service creates it.
    #[arg(long, env = "KAFKA_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,

    /// Longest time a CreateUser waits for the broker's acknowledgement before it
    /// answers UNAVAILABLE (librdkafka's `message.timeout.ms`).
    #[arg(long, env = "KAFKA_PUBLISH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,

    /// Producer linger: how long librdkafka waits to fill a batch. Kept to a few
    /// milliseconds so a lone caller never waits on it.
    #[arg(long, env = "KAFKA_LINGER", default_value = "2ms", value_parser = humantime::parse_duration)]
    pub producer_linger: Duration,

    /// Prefix of every Redis key the service writes (tests use one per test).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "")]
    pub redis_key_prefix: String,

    /// Longest time one Redis call (or the wait for a pooled connection) may take.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// How calls reach Redis: `shared` (one multiplexed connection that
    /// concurrent calls pipeline on; 2× the pool's GetUser rate in
    /// docs/benchmarks.md) or `pool` (a bb8 pool of connections).
    #[arg(long, env = "REDIS_CLIENT", value_enum, default_value_t = RedisClientKind::Shared)]
    pub redis_client: RedisClientKind,

    /// Connections in the Redis pool (with `REDIS_CLIENT=pool`).
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 16)]
    pub redis_pool_size: u32,

    /// How long the read model's index remembers which user a request id
    /// created: within it, the request id reused for another request (another
    /// client-chosen id) is refused. Retries are recognised for ever: the
    /// user names the request that created it.
    #[arg(long, env = "REQUEST_ID_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub request_id_ttl: Duration,

    /// Longest time GetUser waits for a position when the call has no deadline.
    #[arg(long, env = "MAX_POSITION_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_position_wait: Duration,

    /// Run the projector in this instance (off: a command-only instance).
    #[arg(long, env = "PROJECTOR_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub projector_enabled: bool,

    /// Most records the projector applies to Redis in one atomic batch.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = 500)]
    pub projector_batch_size: usize,

    /// Most concurrent WatchProgress streams on this instance; more get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_PROGRESS_WATCHERS", default_value_t = 100)]
    pub max_progress_watchers: usize,

    /// Most calls this instance handles at once (over all connections);
    /// more are answered RESOURCE_EXHAUSTED at once instead of queueing.
    /// Health checks are not counted, so probes see the truth under load.
    #[arg(long, env = "MAX_CONCURRENT_CALLS", default_value_t = 1000)]
    pub max_concurrent_calls: usize,

    /// Most concurrent calls (HTTP/2 streams) on one client connection; a
    /// client queues the rest on its side.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Most client connections open on this instance (plaintext or TLS, the
    /// handshaking ones included); one accepted past it is closed at once
    /// and counted. An idle HTTP/2 connection costs about 30 KiB and a
    /// descriptor: 4,096 stay near 128 MiB (keep it under `ulimit -n`).
    /// Clients multiplex their calls over a few connections each.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// A connection whose client has not sent HTTP/2's preface by then
    /// (after the TLS handshake, over TLS) is closed: silent sockets do not
    /// pile up. `0s`: off.
    #[arg(long, env = "HTTP2_PREFACE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_preface_timeout: Duration,

    /// A connection with no call open for this long gets GOAWAY (NO_ERROR,
    /// `max_idle`) and is closed, as grpc-go's `MaxConnectionIdle` does; its
    /// client reconnects for its next call. `0s`: off.
    #[arg(long, env = "MAX_CONNECTION_IDLE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_connection_idle: Duration,

    /// The server pings each client connection this often (HTTP/2 PING), so
    /// a proxy or NAT between sees traffic on a long quiet stream (a
    /// WatchProgress at a slow interval) and a dead peer is found; the
    /// clients ping no more often than this (their keepalive time, 30 s).
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// A ping unanswered this long closes the connection.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// A client PING sooner than this after its previous one is a strike;
    /// past HTTP2_MAX_PING_STRIKES the connection gets GOAWAY
    /// ENHANCE_YOUR_CALM "too_many_pings" and is closed (grpc-go's keepalive
    /// enforcement, its `MinTime`; see transport::ping_policy). A call in either
    /// direction resets the strikes. Well under the clients' keepalive
    /// (30 s, as HTTP2_KEEPALIVE_INTERVAL), so they are never struck, and
    /// not above grpc-go's floor for a client's keepalive (10 s); the
    /// server's own pings and their ACKs are not counted. `0s`: off.
    #[arg(long, env = "HTTP2_MIN_PING_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_min_ping_interval: Duration,

    /// Strikes (client pings under HTTP2_MIN_PING_INTERVAL apart, no call
    /// between) a connection may have before its GOAWAY; grpc-go's server
    /// allows 2 as well, so an early ping or two (a timer's jitter) are
    /// forgiven.
    #[arg(long, env = "HTTP2_MAX_PING_STRIKES", default_value_t = 2)]
    pub http2_max_ping_strikes: u32,

    /// Largest request message accepted by the user and progress services,
    /// in bytes; larger ones get OUT_OF_RANGE (tonic's code). A user is a few
    /// hundred bytes.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 64 * 1024)]
    pub max_request_bytes: usize,

    /// Other consumer groups whose progress callers may read, as `group` (on
    /// the service's topic) or `group:topic`, comma-separated. The service's
    /// own group and topic are always allowed; nothing else by default, since
    /// each watched group costs a Kafka client and shows its members' hosts.
    #[arg(long, env = "PROGRESS_ALLOWED_GROUPS", value_delimiter = ',')]
    pub progress_allowed_groups: Vec<String>,

    /// How often Kafka and Redis are probed for the health service.
    #[arg(long, env = "HEALTH_PROBE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_probe_interval: Duration,

    /// On SIGTERM, how long the service keeps serving while reporting
    /// NOT_SERVING, so that load balancers and sidecars stop sending to it.
    #[arg(long, env = "DRAIN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// Upper bound on the whole shutdown after the grace period: in-flight calls,
    /// producer flush, final commit.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Where to send traces (OTLP over gRPC, e.g. `http://otel-collector:4317`);
    /// unset, no spans are made and no trace context is propagated.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of the traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "user-service")]
    pub otel_service_name: String,

    /// A one-off operation instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operations run by the binary instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Moves the users of KAFKA_TOPIC to a new topic with more partitions
    /// (a topic's partition map is fixed for its life): copies the log,
    /// seals the old topic, records the new map. Reads go on; creates answer
    /// UNAVAILABLE (retryable) from the seal until the instances run on the
    /// new topic. See docs/design.md, "Moving to a new topic".
    MoveTopic {
        /// The new topic (must not exist yet, or be empty).
        #[arg(long)]
        to: String,
        /// Its partition count (a multiple of 12 keeps a Redis Cluster even).
        #[arg(long)]
        partitions: i32,
    },
}

/// librdkafka's `security.protocol`: how the bytes travel and who vouches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No encryption, no authentication: local development.
    #[default]
    Plaintext,
    /// TLS, the broker's certificate checked against the CA.
    Ssl,
    /// SASL credentials in the clear (only inside a trusted network).
    SaslPlaintext,
    /// SASL credentials over TLS: what a production cluster asks for.
    SaslSsl,
}

/// The SASL mechanisms librdkafka has built in (GSSAPI and OAUTHBEARER need
/// more than a user and a password, and are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SaslMechanism {
    #[default]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "PLAIN")]
    Plain,
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

fn parse_secret(s: &str) -> Result<secrecy::SecretString, String> {
    Ok(secrecy::SecretString::from(s.to_owned()))
}

/// A setting that names a file whose contents are a secret: the error names
/// the setting and the path, never what the file holds.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: cannot read {path}: {source}")]
pub struct SecretFileError {
    pub setting: &'static str,
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Reads a secret from `path` (its first line, without the newline that
/// `echo` and most secret stores add).
pub fn read_secret_file(
    setting: &'static str,
    path: &std::path::Path,
) -> Result<secrecy::SecretString, SecretFileError> {
    let raw = std::fs::read_to_string(path).map_err(|source| SecretFileError {
        setting,
        path: path.to_owned(),
        source,
    })?;
    let line = raw.lines().next().unwrap_or_default();
    Ok(secrecy::SecretString::from(line.to_owned()))
}

/// Where the metrics endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "off" | "none" => Ok(Self::Off),
            addr => addr
                .parse()
                .map(Self::At)
                .map_err(|e| format!("{addr:?}: {e} (host:port, or off)")),
        }
    }
}

/// 12 partitions: the read model's keys spread them exactly evenly over 1, 2,
/// 3, 4 or 6 Redis Cluster masters (`store::keys`), and up to 12 instances
/// share the projection. A topic's count is fixed for its life: a user's
/// partition follows from its id and the count.
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 12;

impl Config {
    /// The dead-letter topic, derived from the main topic unless set.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }

    /// The longest any unary call may run, whatever deadline its caller sends:
    /// CreateUser's publish and its wait for the verdict, with a margin. A
    /// call cut there (one that never sent its message, say) frees its slot
    /// of `MAX_CONCURRENT_CALLS`; tonic answers it CANCELLED.
    pub fn call_timeout(&self) -> Duration {
        self.max_position_wait + self.publish_timeout + Duration::from_secs(2)
    }

    /// The (group, topic) pairs the progress RPCs serve: the service's own,
    /// and the allowlist.
    pub fn progress_allowed(&self) -> Vec<(String, String)> {
        let mut allowed = vec![(self.consumer_group.clone(), self.topic.clone())];
        for entry in &self.progress_allowed_groups {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            // Topic names cannot hold ':'; group ids can, so split at the last.
            allowed.push(match entry.rsplit_once(':') {
                Some((group, topic)) => (group.to_owned(), topic.to_owned()),
                None => (entry.to_owned(), self.topic.clone()),
            });
        }
        allowed
    }

    /// The Redis URL with a scheme, accepting the Go service's bare `host:port`.
    pub fn redis_url(&self) -> String {
        if self.redis_server_url.contains("://") {
            self.redis_server_url.clone()
        } else {
            format!("redis://{}", self.redis_server_url)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_flags() {
        let c = Config::parse_from(["user-service", "--drain-grace", "250ms"]);
        assert_eq!(c.drain_grace, Duration::from_millis(250));
        assert!(Config::try_parse_from(["user-service", "--drain-grace", "5 parsecs"]).is_err());
    }

    #[test]
    fn progress_allowlist_holds_the_own_group_and_the_listed_ones() {
        let c = Config::parse_from([
            "user-service",
            "--progress-allowed-groups",
            "billing, audit:app:events,",
        ]);
        assert_eq!(
            c.progress_allowed(),
            [
                ("user-service-projector", "topic-user-creating"),
                ("billing", "topic-user-creating"),
                ("audit:app", "events"),
            ]
            .map(|(g, t)| (g.to_owned(), t.to_owned()))
        );
    }

    #[test]
    fn bare_redis_address_gets_a_scheme() {
        let mut c = Config::parse_from(["user-service"]);
        c.redis_server_url = "redis:6379".into();
        assert_eq!(c.redis_url(), "redis://redis:6379");
        assert_eq!(c.dlq_topic(), "topic-user-creating.dlq");
    }
}
