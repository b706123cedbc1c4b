//! Shared set-up: start the application in-process (as `main` does) with
//! names of its own, talk to it over gRPC, and wait on facts, not on time.

#![allow(dead_code)]

pub mod certs;

use clap::Parser;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use std::{future::Future, net::SocketAddr, sync::Once, time::Duration};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::{
    config::{Config, LogFormat},
    domain::{Email, User as DomainUser, UserCreated, UserId, UserName},
    projector::ProjectorStats,
    proto::user::v1::{
        CreateUserRequest, CreateUserResponse, GetUserRequest, Position, User,
        projection_service_client::ProjectionServiceClient, user_service_client::UserServiceClient,
    },
    startup::{AppHandle, Application, StartupError},
};

/// The broker `scripts/stack up` starts, unless the environment names another.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKER_URL").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// How the suite's own Kafka clients reach the brokers: the same settings
/// as the service's (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, ...), so
/// the suite runs against a secured broker as it does against a plain one.
pub fn kafka_link() -> user_service::kafka::KafkaLink {
    test_config()
        .kafka_link()
        .expect("the Kafka settings of the environment fit together")
}

/// For Kafka's own tools (`--command-config`): the suite's security
/// settings as a Java client's properties, written to a file of the test's
/// own; `None` on a plaintext broker.
pub fn kafka_tool_properties() -> Option<std::path::PathBuf> {
    use secrecy::ExposeSecret;
    use user_service::kafka::SecurityProtocol;
    let c = test_config();
    if c.kafka_security_protocol == SecurityProtocol::Plaintext {
        return None;
    }
    let name =
        |v: Option<clap::builder::PossibleValue>| v.expect("a named value").get_name().to_owned();
    let protocol = name(clap::ValueEnum::to_possible_value(
        &c.kafka_security_protocol,
    ));
    let mechanism = name(clap::ValueEnum::to_possible_value(&c.kafka_sasl_mechanism));
    let mut props = format!("security.protocol={}\n", protocol.to_uppercase());
    if let (Some(user), Some(password)) = (
        &c.kafka_sasl_username,
        c.kafka_sasl_password_file
            .as_ref()
            .map(|f| std::fs::read_to_string(f).unwrap().trim().to_owned())
            .or_else(|| {
                c.kafka_sasl_password
                    .as_ref()
                    .map(|p| p.expose_secret().to_owned())
            }),
    ) {
        props += &format!(
            "sasl.mechanism={mechanism}\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"{user}\" password=\"{password}\";\n"
        );
    }
    if let Some(ca) = &c.kafka_tls_ca_file {
        props += &format!(
            "ssl.truststore.type=PEM\nssl.truststore.location={}\n",
            ca.display()
        );
    }
    let path = std::env::temp_dir().join(format!("{}.properties", unique("kafka-tool")));
    std::fs::write(&path, props).unwrap();
    Some(path)
}

/// The Redis `scripts/stack up` starts, unless the environment names another.
pub fn redis_url() -> String {
    std::env::var("REDIS_SERVER_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Logs only when asked: `TEST_LOG=1 cargo test` (with `RUST_LOG` to filter).
/// Traces always: every span the suite makes goes to one in-memory exporter
/// ([`finished_spans`]), as an OTLP exporter would send it.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let format = std::env::var_os("TEST_LOG").map(|_| LogFormat::Text);
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(span_exporter().clone())
            .build();
        user_service::telemetry::init_with(
            format,
            "info,user_service=debug,rdkafka=warn",
            Some(&provider),
        );
        // The provider lives as long as the test process.
        std::mem::forget(provider);
    });
}

fn span_exporter() -> &'static opentelemetry_sdk::trace::InMemorySpanExporter {
    static EXPORTER: std::sync::OnceLock<opentelemetry_sdk::trace::InMemorySpanExporter> =
        std::sync::OnceLock::new();
    EXPORTER.get_or_init(opentelemetry_sdk::trace::InMemorySpanExporter::default)
}

/// Every span ended so far in this test process.
pub fn finished_spans() -> Vec<opentelemetry_sdk::trace::SpanData> {
    span_exporter().get_finished_spans().unwrap_or_default()
}

/// The Redis Cluster the suite runs against instead of one server, when
/// `REDIS_CLUSTER_URLS` is set (as `scripts/stack up --redis cluster` prints
/// it): the same tests, the other mode.
pub fn redis_cluster_nodes() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// HGET of one field of the read model, in whichever mode the suite runs.
pub async fn raw_hget(config: &Config, key: &str, field: &str) -> Option<String> {
    let mut hget = redis::cmd("HGET");
    hget.arg(key).arg(field);
    if config.redis_cluster_nodes.is_empty() {
        let mut conn = redis_client(config)
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        hget.query_async(&mut conn).await.unwrap()
    } else {
        let client =
            redis::cluster::ClusterClient::new(config.redis_cluster_nodes.clone()).unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        hget.query_async(&mut conn).await.unwrap()
    }
}

/// HSET of one field of the read model, in whichever mode the suite runs.
pub async fn raw_hset(config: &Config, key: &str, field: &str, value: &str) {
    let mut hset = redis::cmd("HSET");
    hset.arg(key).arg(field).arg(value);
    if config.redis_cluster_nodes.is_empty() {
        let mut conn = redis_client(config)
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: i64 = hset.query_async(&mut conn).await.unwrap();
    } else {
        let client =
            redis::cluster::ClusterClient::new(config.redis_cluster_nodes.clone()).unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        let _: i64 = hset.query_async(&mut conn).await.unwrap();
    }
}

/// A configuration of its own for one test: fresh topic, group and key prefix,
/// port 0, no drain grace.
pub fn test_config() -> Config {
    let name = unique("t");
    let mut c = Config::parse_from(["user-service"]);
    c.listen_addr = "127.0.0.1:0".parse().unwrap();
    c.metrics_addr = user_service::config::MetricsAddr::At("127.0.0.1:0".parse().unwrap());
    c.kafka_broker_url = kafka_brokers();
    c.redis_server_url = redis_url();
    c.redis_cluster_nodes = redis_cluster_nodes();
    c.topic = format!("{name}-users");
    c.dlq_topic = None;
    c.consumer_group = format!("{name}-projector");
    c.redis_key_prefix = format!("{name}:");
    c.topic_partitions = 3;
    c.health_probe_interval = Duration::from_millis(200);
    c.drain_grace = Duration::ZERO;
    c.shutdown_timeout = Duration::from_secs(30);
    c
}

/// A client of the suite's one Redis server, with the suite's credentials
/// and CA (the secure pass runs on a TLS Redis with an ACL user).
pub fn redis_client(config: &Config) -> redis::Client {
    use secrecy::ExposeSecret;
    let auth = config
        .redis_auth()
        .expect("the Redis settings are readable");
    let info = redis::IntoConnectionInfo::into_connection_info(config.redis_url()).unwrap();
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &auth.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &auth.password {
        settings = settings.set_password(p.expose_secret());
    }
    let info = info.set_redis_settings(settings);
    if config.redis_url().starts_with("rediss://") {
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: auth.tls_ca,
            },
        )
        .unwrap()
    } else {
        redis::Client::open(info).unwrap()
    }
}

/// A Redis adapter of the test's own (its key prefix), without the service.
pub fn test_store(config: &Config) -> user_service::store::RedisStore {
    use user_service::store::{Keys, RedisClientKind, RedisStore};
    RedisStore::with_auth(
        &config.redis_target(),
        &config
            .redis_auth()
            .expect("the Redis settings are readable"),
        Keys::new(&config.redis_key_prefix, &config.topic),
        RedisClientKind::Shared,
        2,
        Duration::from_secs(2),
    )
    .expect("a Redis adapter")
}

/// Deletes every key of the test's prefix: Redis "losing its data" for this
/// test only (FLUSHALL would hit the tests running beside it).
pub async fn delete_keys(config: &Config) {
    if !config.redis_cluster_nodes.is_empty() {
        // Every master's share of the prefix, key by key (no cross-slot DEL).
        for node in &config.redis_cluster_nodes {
            let url = if node.contains("://") {
                node.clone()
            } else {
                format!("redis://{node}")
            };
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
            if redis::from_redis_value::<String>(role[0].clone()).unwrap() != "master" {
                continue;
            }
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", config.redis_key_prefix))
                .query_async(&mut conn)
                .await
                .unwrap();
            for k in keys {
                let _: () = redis::cmd("DEL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        return;
    }
    let mut conn = redis_client(config)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", config.redis_key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// One running application and clients to it.
pub struct TestApp {
    pub config: Config,
    pub addr: SocketAddr,
    pub handle: AppHandle,
    pub users: UserServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    pub progress: ProjectionServiceClient<Channel>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), StartupError>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_config()).await
}

pub async fn spawn_app_with(config: Config) -> TestApp {
    init_logs();
    let app = Application::build(config.clone())
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let handle = app.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    // A TLS server's tests make their own channels; these stay unused.
    let channel = if config.tls_cert_file.is_some() {
        endpoint.connect_lazy()
    } else {
        endpoint
            .connect()
            .await
            .expect("the server accepts connections")
    };
    TestApp {
        config,
        addr,
        handle,
        users: UserServiceClient::new(channel.clone()),
        health: HealthClient::new(channel.clone()),
        progress: ProjectionServiceClient::new(channel),
        stop,
        task,
    }
}

impl TestApp {
    /// Graceful shutdown, as on SIGTERM; returns how it ended.
    pub async fn stop(self) -> Result<(), StartupError> {
        self.stop.cancel();
        self.task
            .await
            .expect("the application task does not panic")
    }

    pub fn stats(&self) -> ProjectorStats {
        self.handle
            .projector
            .as_ref()
            .expect("projector enabled")
            .stats()
    }

    pub async fn create(
        &self,
        name: &str,
        email: &str,
    ) -> Result<CreateUserResponse, tonic::Status> {
        self.create_req(CreateUserRequest {
            name: name.into(),
            email: email.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn create_req(
        &self,
        req: CreateUserRequest,
    ) -> Result<CreateUserResponse, tonic::Status> {
        self.users
            .clone()
            .create_user(req)
            .await
            .map(|r| r.into_inner())
    }

    /// GetUser with a read-your-write position and a deadline.
    pub async fn get_at(
        &self,
        id: i64,
        position: Option<Position>,
        deadline: Duration,
    ) -> Result<User, tonic::Status> {
        let mut req = tonic::Request::new(GetUserRequest {
            id,
            min_position: position,
        });
        req.set_timeout(deadline);
        self.users
            .clone()
            .get_user(req)
            .await
            .map(|r| r.into_inner().user.expect("a found user has a body"))
    }

    pub async fn health_status(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let r = self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(r.into_inner().status())
    }

    /// Whether GetProgress of the service's own group answers now.
    pub async fn progress_answers(&self) -> bool {
        self.progress
            .clone()
            .get_progress(user_service::proto::user::v1::GetProgressRequest::default())
            .await
            .is_ok()
    }

    /// Waits until the health of the whole server reads `want`.
    pub async fn wait_health(&self, want: ServingStatus) {
        wait_until(Duration::from_secs(30), || async {
            self.health_status("").await.ok() == Some(want)
        })
        .await
        .unwrap_or_else(|_| panic!("health never became {want:?}"));
    }

    /// Waits until this instance's projector has resumed every partition it
    /// owns from the read model's checkpoint (so GetUser can vouch for absence).
    pub async fn wait_opened(&self) {
        wait_until(Duration::from_secs(60), || async {
            let s = self.stats();
            !s.assignment.is_empty() && s.assignment.iter().all(|p| s.checkpoints.contains_key(p))
        })
        .await
        .expect("the projector never opened its partitions");
    }

    /// Waits until this instance's projector owns at least one partition.
    pub async fn wait_assigned(&self) {
        wait_until(Duration::from_secs(60), || async {
            !self.stats().assignment.is_empty()
        })
        .await
        .expect("the projector never got partitions");
    }
}

/// Polls `check` until it holds; `Err` after `limit` (a guard against a hung
/// test, not a speed assertion).
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn producer() -> FutureProducer {
    kafka_link()
        .client_config()
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "0")
        .create()
        .expect("a producer")
}

/// Publishes a valid `UserCreated` for `id` (named `name`) straight to
/// `topic`, as another instance's command side would, and returns its position.
pub async fn publish_user_created(
    producer: &FutureProducer,
    topic: &str,
    id: i64,
    name: &str,
) -> Position {
    let event = UserCreated::new(
        DomainUser {
            id: UserId::parse(id).unwrap(),
            name: UserName::parse(name).unwrap(),
            email: Email::parse("direct@example.com").unwrap(),
            created_at_ms: 0,
        },
        None,
    );
    let d = producer
        .send(
            FutureRecord::to(topic)
                .key(&event.key())
                .payload(&event.to_json()),
            Duration::from_secs(10),
        )
        .await
        .expect("the broker acknowledges");
    Position {
        partition: d.partition,
        offset: d.offset,
    }
}

/// A consumer in `group` that does not subscribe: reads offsets and watermarks.
pub fn inspector(group: &str) -> BaseConsumer {
    kafka_link()
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer")
}

/// Sum over partitions of (high watermark − committed offset) for `group`.
pub fn group_lag(group: &str, topic: &str, partitions: i32) -> i64 {
    let c = inspector(group);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            let done = committed
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(0);
            high - done
        })
        .sum()
}

/// The topic's partition count, from the broker's metadata (0 if the broker
/// does not know the topic).
pub fn partition_count(topic: &str) -> i32 {
    let metadata = inspector("partition-count")
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32)
}

/// Each partition's log end offset (high watermark), read from the broker:
/// what the log holds, whoever consumed it. Every partition the metadata
/// lists is there, so a map for a topic the broker lacks is empty.
pub fn log_end_offsets(topic: &str) -> std::collections::BTreeMap<i32, i64> {
    let c = inspector("log-end-offsets");
    (0..partition_count(topic))
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// One record as the log holds it.
pub struct LogRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Its headers, as text (a copy's `moved-from` or `rehomed-from`).
    pub headers: Vec<(String, String)>,
}

impl LogRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every user event of `topic` from the start of its log to its end offsets
/// as they are now, by partition, in each partition's order; the control
/// records (the partition map, a move's marks) are left out.
pub fn read_log(topic: &str) -> Vec<LogRecord> {
    read_log_all(topic)
        .into_iter()
        .filter(|r| !is_control(r.key.as_deref()))
        .collect()
}

/// Whether a record's key is one of the control records' (the partition
/// map, a move's marks): they create no user.
pub fn is_control(key: Option<&[u8]>) -> bool {
    use user_service::domain::partition_map::{MAP_KEY, MOVE_KEY};
    key == Some(MAP_KEY.as_bytes()) || key == Some(MOVE_KEY.as_bytes())
}

/// The first user event a subscribed consumer receives, past the control
/// records (partition 0 of a topic the service made starts with its map).
pub async fn first_user_event(
    c: &rdkafka::consumer::StreamConsumer,
) -> rdkafka::message::BorrowedMessage<'_> {
    use rdkafka::Message;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .expect("a record within 30 s")
            .expect("no consumer error");
        if !is_control(m.key()) {
            return m;
        }
    }
}

/// Every record of `topic`, control records included.
pub fn read_log_all(topic: &str) -> Vec<LogRecord> {
    use rdkafka::{Message, Offset, TopicPartitionList, message::Headers};
    let ends = log_end_offsets(topic);
    let c = inspector(&unique("read-log"));
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("a partition to read");
    }
    c.assign(&tpl).expect("assign the topic's partitions");
    let mut next: std::collections::BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(
            std::time::Instant::now() < deadline,
            "could not read {topic} up to {ends:?} (at {next:?})"
        );
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("a record");
        next.insert(m.partition(), m.offset() + 1);
        if m.offset() < ends[&m.partition()] {
            records.push(LogRecord {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// A broker address that is refused until [`BrokerGate::open`], then leads to
/// the stack's broker (it forwards to it; the broker's metadata then points
/// clients at the broker itself). A Kafka that is absent, then comes back,
/// for one test only.
pub struct BrokerGate {
    pub port: u16,
    forwarder: Option<JoinHandle<()>>,
}

impl BrokerGate {
    pub fn closed() -> Self {
        Self {
            port: free_port(),
            forwarder: None,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts listening and forwarding every connection to the broker.
    pub async fn open(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the gate's port is still free");
        let upstream = kafka_brokers()
            .split(',')
            .next()
            .expect("a broker")
            .to_owned();
        self.forwarder = Some(tokio::spawn(async move {
            // Dropped with the task: every forwarded connection ends with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut broker) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
            }
        }));
    }
}

impl Drop for BrokerGate {
    fn drop(&mut self) {
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
    }
}

/// A Redis server of the test's own (from the same Debian package as the
/// stack's), for tests that stop Redis without disturbing the others.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = free_port();
        let mut r = Self { port, child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Points `config` at this server alone: its URL, in every mode of the
    /// suite, and none of the suite's Redis credentials.
    pub fn use_in(&self, config: &mut Config) {
        config.redis_server_url = self.url();
        config.redis_cluster_nodes.clear();
        config.redis_sentinels.clear();
        config.redis_username = None;
        config.redis_password = None;
        config.redis_password_file = None;
        config.redis_tls_ca_file = None;
    }

    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/stack up installs it)");
        self.child = Some(child);
        // Wait until it answers PING.
        let url = self.url();
        for _ in 0..200 {
            if let Ok(client) = redis::Client::open(url.as_str())
                && let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("own redis-server on port {} never answered", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the instance knows its topic's partition map (read from the
/// log): before that a read can tell nothing and answers UNAVAILABLE at once.
/// Kafka's health alone is not enough: the probe can reach a slow broker
/// before the map's record has been read.
pub async fn wait_map_known(app: &TestApp) {
    wait_until(Duration::from_secs(30), || async {
        sum_of(
            &samples(&scrape(app).await),
            "user_service_partition_map_partitions",
            &[],
        ) > 0.0
    })
    .await
    .expect("the partition map learned from the log");
}

/// The service's `/metrics`, as Prometheus would scrape it (plain HTTP/1.1).
pub async fn scrape(app: &TestApp) -> String {
    scrape_at(app.handle.metrics_addr.expect("the metrics endpoint is on")).await
}

/// `/metrics` at `addr` (a service of the test's own, or another process).
pub async fn scrape_at(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A chunked body (axum streams it): join the chunks.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_owned()
    }
}

/// The samples of an exposition: `name{labels}` → value.
pub fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `with`.
pub fn sum_of(samples: &std::collections::BTreeMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let bare = series.split('{').next().unwrap();
            bare == name && with.iter().all(|w| series.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

/// What the health probes said of `dependency` in an exposition: how many
/// probes ran, and whether the last found it up (`None` before any).
pub fn probed(text: &str, dependency: &str) -> (f64, Option<bool>) {
    let s = samples(text);
    let label = format!("dependency=\"{dependency}\"");
    let runs = sum_of(&s, "user_service_dependency_probe_seconds_count", &[&label]);
    let up = s
        .iter()
        .find(|(series, _)| {
            series.starts_with("user_service_dependency_up{") && series.contains(&label)
        })
        .map(|(_, v)| *v == 1.0);
    (runs, up)
}

/// Waits until `n` probes of `dependency` have run in `app` and the last
/// found it down: NOT_SERVING is where every instance starts, so only then
/// does a NOT_SERVING say what the probes found.
pub async fn wait_probed_down(app: &TestApp, dependency: &str, n: f64) {
    wait_until(Duration::from_secs(30), || async {
        let (runs, up) = probed(&app.handle.metrics.render(), dependency);
        runs >= n && up == Some(false)
    })
    .await
    .unwrap_or_else(|()| {
        panic!(
            "{n} probes of {dependency}, the last one down: {:?}",
            probed(&app.handle.metrics.render(), dependency)
        )
    });
}

/// [`wait_probed_down`] for another process, by its `/metrics` at `addr`.
pub async fn wait_probed_down_at(addr: SocketAddr, dependency: &str, n: f64) {
    wait_until(Duration::from_secs(30), || async {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return false;
        }
        let (runs, up) = probed(&scrape_at(addr).await, dependency);
        runs >= n && up == Some(false)
    })
    .await
    .unwrap_or_else(|()| panic!("{n} probes of {dependency} at {addr}, the last one down"));
}

/// Reads `conn` until the server closes it (EOF or a reset): everything the
/// server sent; `None` if it is still open after `limit`.
pub async fn read_until_closed(
    conn: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(bytes)
}

/// The sum of `name`'s samples with all of `with`, in the app's metrics.
pub fn metric(app: &TestApp, name: &str, with: &[&str]) -> f64 {
    sum_of(&samples(&app.handle.metrics.render()), name, with)
}
