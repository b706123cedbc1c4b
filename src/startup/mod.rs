//! [`Application`]: builds every part from a [`Config`], binds the listener,
//! and runs until a shutdown signal; `main` and every test start the service
//! through it.
//!
//! One cancellation token is shared by the server, the projector, the health
//! probe and every stream; [`Tasks`] joins them all at shutdown, and stops
//! the service if one panics.
//!
//! Beside it: [`metrics_endpoint`], the `/metrics` endpoint and the
//! collector that copies the parts' own figures into the metrics at each
//! scrape (here because it reads every part), and `settings`, which turns
//! the [`Config`]'s plain values into what the adapters take
//! ([`Config::kafka_link`], [`Config::redis_target`], [`Config::redis_auth`]).

pub mod metrics_endpoint;
mod settings;

pub use settings::KafkaLinkError;

use crate::{
    api::{
        HealthRegistry, Needs, ProjectionApi, UserApi, health::HealthService, limit::CallBudget,
    },
    command::CreateUser,
    config::Config,
    kafka::{self, EventPublisher, KafkaError, KafkaLink, Routing},
    progress::{OwnProjection, ProgressHub},
    projector::{Projector, ProjectorState},
    proto::{
        self,
        user::v1::{
            projection_service_server::ProjectionServiceServer,
            user_service_server::UserServiceServer,
        },
    },
    retry,
    store::{
        ADVISED_LISTPACK_VALUE, CheckpointWatch, Keys, RedisStore, StoreError, UserCache, Verdicts,
    },
    tasks::Tasks,
    transport::{self, connections::Cap, ping_policy::PingPolicy, tls},
};
use crate::{
    config::MetricsAddr,
    telemetry::{
        Metrics,
        grpc::{GrpcTelemetryLayer, Served},
    },
};
use metrics_endpoint::Sources;
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Router};
use tonic::{
    Status,
    service::{LayerExt, Routes},
};
use tower::layer::util::{Identity, Stack};
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};

/// The name the user service reports under in `grpc.health.v1`.
pub const USER_SERVICE_NAME: &str = "user.v1.UserService";
/// The name the progress service reports under in `grpc.health.v1`.
pub const PROJECTION_SERVICE_NAME: &str = "user.v1.ProjectionService";
/// The health name of this instance's projector: SERVING while it is in its
/// consumer group (and Kafka and Redis answer); registered only when the
/// projector runs here.
pub const PROJECTOR_HEALTH_NAME: &str = "projector";
/// SERVING while the process serves, NOT_SERVING only while draining: it
/// follows no dependency, so a liveness probe on it never restarts a healthy
/// instance during a Kafka or Redis outage.
pub const LIVENESS_HEALTH_NAME: &str = "liveness";
/// SERVING while Redis answers.
pub const REDIS_HEALTH_NAME: &str = "redis";
/// SERVING while a Kafka broker answers (CreateUser can publish).
pub const KAFKA_HEALTH_NAME: &str = "kafka";

/// Largest response message: a progress snapshot of a big group is the
/// largest; a user is a few hundred bytes.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The methods of every service the server serves, by service: ours, health
/// and reflection (both versions), from their descriptor sets; the calls'
/// metrics are labelled by them (see [`GrpcTelemetryLayer`]).
static SERVED: LazyLock<Served> = LazyLock::new(|| {
    Served::from_descriptor_sets(&[
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
});

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Secret(#[from] crate::config::SecretFileError),
    #[error(transparent)]
    KafkaSettings(#[from] KafkaLinkError),
    #[error("a task panicked ({0}); the service stopped")]
    Panicked(String),
    #[error("shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
}

/// A built service: listening, projecting, probing. Dropping it without
/// calling [`Application::run_until_stopped`] cancels everything.
pub struct Application {
    config: Config,
    addr: SocketAddr,
    /// Cancelled once at shutdown; every task and stream ends on it.
    token: CancellationToken,
    /// Every background task, joined at shutdown.
    tasks: Tasks,
    server: ServerTask,
    health: Arc<HealthRegistry>,
    publisher: EventPublisher,
    projector: Option<Arc<ProjectorState>>,
    progress: Arc<ProgressHub>,
    calls: CallBudget,
    checkpoint_watch: Arc<CheckpointWatch>,
    store: RedisStore,
    metrics: Metrics,
    metrics_addr: Option<SocketAddr>,
    /// Stops the checkpoint poller, once the server has finished its
    /// in-flight calls (they may be waiting on it).
    watch_stop: CancellationToken,
}

/// What tests and tools may look at while the application runs.
#[derive(Clone)]
pub struct AppHandle {
    pub addr: SocketAddr,
    pub health: Arc<HealthRegistry>,
    /// `None` when the projector is disabled.
    pub projector: Option<Arc<ProjectorState>>,
    pub progress: Arc<ProgressHub>,
    /// The shared budget of concurrent calls (and how many it refused).
    pub calls: CallBudget,
    /// The poller every waiting call shares.
    pub checkpoint_watch: Arc<CheckpointWatch>,
    /// The Redis adapter (its replica read counts, for one).
    pub store: RedisStore,
    pub metrics: Metrics,
    /// Where `/metrics` is served (the real port when configured with 0).
    pub metrics_addr: Option<SocketAddr>,
}

impl Application {
    /// Binds the ports (port 0 picks one), builds the adapters and creates
    /// the topics if missing, then starts the server, the projector and the
    /// health probe ([`Application::start`]). Every step that may fail comes
    /// before anything starts, so a failure leaves nothing behind. Kafka or
    /// Redis being down is not fatal: health reports it.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let listeners = Listeners::open(&config).await?;
        let metrics = Metrics::new();
        let reflection = reflection()?;
        let adapters = Adapters::connect(&config, &metrics).await?;
        Ok(Self::start(
            config, metrics, listeners, reflection, adapters,
        ))
    }

    /// Starts the tasks and the server from parts already built. It returns
    /// no `Result`, nor does any step it takes: a failure once a task runs
    /// would leave that task running, its token never cancelled.
    fn start(
        config: Config,
        metrics: Metrics,
        listeners: Listeners,
        reflection: Routes,
        adapters: Adapters,
    ) -> Self {
        let wiring = Wiring {
            config,
            metrics,
            token: CancellationToken::new(),
            tasks: Tasks::new(),
        };
        let health = Arc::new(wiring.health_registry());
        let background = wiring.spawn_background(&adapters, &health);
        let Handlers {
            users,
            projection,
            progress,
            cache,
            calls,
        } = wiring.handlers(&adapters, &background);
        let router = wiring.router(&health, reflection, users, projection, &calls);
        let addr = listeners.grpc.addr;
        let server = wiring.spawn_server(router, listeners.grpc);
        let metrics_addr = listeners.metrics_addr;
        if let Some(listener) = listeners.metrics {
            let sources = Sources {
                metrics: wiring.metrics.clone(),
                calls: calls.clone(),
                health: health.clone(),
                projector: background.projector.clone(),
                progress: progress.clone(),
                store: adapters.store.clone(),
                watch: background.watch.clone(),
                producer: adapters.publisher.client_health(),
                users: cache,
                routing: adapters.routing.clone(),
            };
            tracing::info!(addr = ?metrics_addr, "metrics endpoint at /metrics");
            wiring.tasks.spawn(
                "metrics endpoint",
                metrics_endpoint::serve(listener, sources, wiring.token.clone()),
            );
        }

        let Wiring {
            config,
            metrics,
            token,
            tasks,
        } = wiring;
        Self {
            config,
            addr,
            token,
            tasks,
            server,
            health,
            publisher: adapters.publisher,
            projector: background.projector,
            progress,
            calls,
            checkpoint_watch: background.watch,
            store: adapters.store,
            metrics,
            metrics_addr,
            watch_stop: background.watch_stop,
        }
    }

    /// The address the server listens on (the real port when built with 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> AppHandle {
        AppHandle {
            addr: self.addr,
            health: self.health.clone(),
            projector: self.projector.clone(),
            progress: self.progress.clone(),
            calls: self.calls.clone(),
            checkpoint_watch: self.checkpoint_watch.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            metrics_addr: self.metrics_addr,
        }
    }

    /// Serves until `shutdown` resolves or a task panics, then drains:
    /// NOT_SERVING for the grace period (sidecars and balancers move away),
    /// stop accepting, end the streams, finish in-flight calls, commit what
    /// was applied, flush the producer. Bounded by the configured shutdown
    /// timeout. A panic anywhere makes the result an error, so the process
    /// exits non-zero.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartupError> {
        let Self {
            config,
            token,
            tasks,
            mut server,
            health,
            publisher,
            watch_stop,
            ..
        } = self;

        let ended_alone = tokio::select! {
            _ = shutdown => None,
            _ = tasks.fatal().cancelled() => None,
            r = &mut server => Some(r),
        };
        let served = match ended_alone {
            Some(r) => {
                // The server ended on its own: stop the rest and report why.
                token.cancel();
                watch_stop.cancel();
                tasks.close();
                tasks.wait().await;
                r
            }
            None => {
                tracing::info!(grace = ?config.drain_grace, "draining: reporting NOT_SERVING");
                health.set_draining();
                tokio::time::sleep(config.drain_grace).await;

                token.cancel();
                tasks.close();
                let drained = async {
                    let served = server.await;
                    watch_stop.cancel();
                    tasks.wait().await;
                    if let Err(e) = publisher.flush(config.shutdown_timeout).await {
                        tracing::warn!(error = %e, "producer flush incomplete");
                    }
                    served
                };
                match tokio::time::timeout(config.shutdown_timeout, drained).await {
                    Ok(r) => r,
                    Err(_) => return Err(StartupError::ShutdownTimeout(config.shutdown_timeout)),
                }
            }
        };
        if let Some(panic) = tasks.first_panic() {
            return Err(StartupError::Panicked(panic));
        }
        match served {
            Ok(Some(Ok(()))) => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) => Err(StartupError::Panicked("gRPC server".into())),
            Err(e) => Err(StartupError::Panicked(format!("gRPC server: {e}"))),
        }
    }
}

/// The ports, bound before anything starts, and the TLS the gRPC port
/// accepts with.
struct Listeners {
    grpc: GrpcListener,
    metrics: Option<TcpListener>,
    /// Where `/metrics` is served (the real port when configured with 0).
    metrics_addr: Option<SocketAddr>,
}

/// The gRPC port.
struct GrpcListener {
    tcp: TcpListener,
    /// The real port when configured with 0.
    addr: SocketAddr,
    /// `None`: plaintext.
    tls: Option<Arc<tls::ReloadingTls>>,
}

impl Listeners {
    /// Binds both ports, then reads the TLS files: a bad one stops here.
    async fn open(config: &Config) -> Result<Self, StartupError> {
        let tcp = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let addr = tcp.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen_addr,
            source,
        })?;
        let metrics = match config.metrics_addr {
            MetricsAddr::Off => None,
            MetricsAddr::At(at) => Some(
                TcpListener::bind(at)
                    .await
                    .map_err(|source| StartupError::Bind { addr: at, source })?,
            ),
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let tls = tls::TlsFiles::from_settings(
            config.tls_cert_file.as_deref(),
            config.tls_key_file.as_deref(),
            config.tls_client_ca_file.as_deref(),
        )?
        .map(tls::ReloadingTls::new)
        .transpose()?;
        Ok(Self {
            grpc: GrpcListener { tcp, addr, tls },
            metrics,
            metrics_addr,
        })
    }
}

/// The reflection services, both versions, as the routes the router starts
/// from. Our contract, the health service's, and google.rpc's error
/// details, so grpcurl can print a BadRequest.
fn reflection() -> Result<Routes, StartupError> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(Routes::new(v1).add_service(v1alpha))
}

/// Redis and Kafka, and what start-up learnt of the topic.
struct Adapters {
    link: KafkaLink,
    store: RedisStore,
    publisher: EventPublisher,
    routing: Arc<Routing>,
}

impl Adapters {
    /// Fails only on settings that cannot work; the clients connect lazily,
    /// and a broker that does not answer yet is logged, not fatal.
    async fn connect(config: &Config, metrics: &Metrics) -> Result<Self, StartupError> {
        let auth = config.redis_auth()?;
        let link = config.kafka_link()?;
        let mut store = RedisStore::with_auth(
            &config.redis_target(),
            &auth,
            Keys::new(&config.redis_key_prefix, &config.topic),
            config.redis_client,
            config.redis_pool_size,
            config.redis_timeout,
        )?;
        if config.redis_read_from_replicas {
            store = store.with_replica_reads(&config.redis_target(), &auth)?;
        }
        let store = store.with_metrics(metrics.clone());
        let publisher = EventPublisher::new(
            &link,
            &config.topic,
            config.publish_timeout,
            config.producer_linger,
        )?
        .with_metrics(metrics.clone());
        let adapters = Self {
            link,
            store,
            publisher,
            routing: Arc::new(Routing::default()),
        };
        adapters.prepare_topic(config).await;
        Ok(adapters)
    }

    /// Creates the topics if missing and learns the topic's partition map and
    /// count, as far as the brokers answer.
    async fn prepare_topic(&self, config: &Config) {
        let Self {
            link,
            store,
            publisher,
            routing,
        } = self;
        if let Err(e) = kafka::ensure_topics(
            link,
            &[&config.topic, &config.dlq_topic()],
            config.topic_partitions,
            config.topic_replication,
            config.publish_timeout,
        )
        .await
        {
            // The broker may come later; the projector's subscription waits for it.
            tracing::warn!(error = %e, "could not ensure topics at start-up");
        }
        // The topic's partition map, from the log (recorded now if the topic
        // has none yet). Without a broker, a task keeps trying; until then
        // creates wait and reads use the copy beside the read model.
        let map_hint = store.partition_map().await.ok().flatten().map(|m| m.offset);
        match kafka::partition_map::learn(
            link,
            publisher,
            &config.topic,
            map_hint,
            config.publish_timeout,
        )
        .await
        {
            Ok(map) => adopt_map(routing, map),
            Err(e) => tracing::warn!(error = %e, "the topic's partition map is not known yet"),
        }
        // The topic's count beside it before any call: a map the topic cannot
        // honour is refused from the first create, not from the first probe.
        if let Ok(n) = publisher.ping(config.publish_timeout).await {
            routing.set_topic_partitions(n);
            store.record_partition_count(n);
        }
    }
}

/// What every step of [`Application::start`] reads: the settings, the
/// metrics, the one token every task and stream ends on, and the tasks
/// joined at shutdown.
struct Wiring {
    config: Config,
    metrics: Metrics,
    token: CancellationToken,
    tasks: Tasks,
}

/// What the background tasks share with the handlers.
struct Background {
    /// The poller every waiting call shares.
    watch: Arc<CheckpointWatch>,
    /// Stops `watch`, once the server has finished its in-flight calls
    /// (they may be waiting on it).
    watch_stop: CancellationToken,
    /// `None` when the projector is disabled.
    projector: Option<Arc<ProjectorState>>,
    verdicts: Arc<Verdicts>,
}

/// The two services' handlers, and what of theirs the metrics and the
/// handle read.
struct Handlers {
    users: UserApi,
    projection: ProjectionApi,
    progress: Arc<ProgressHub>,
    cache: UserCache,
    /// Shared by the user and progress services (see api::limit).
    calls: CallBudget,
}

/// The layers every call passes through, as [`Wiring::router`] adds them
/// (the first outermost).
type Layers = Stack<
    crate::api::oversize::OversizeLayer,
    Stack<CatchPanicLayer<OnPanic>, Stack<GrpcTelemetryLayer, Identity>>,
>;

/// The gRPC server's task.
type ServerTask = tokio::task::JoinHandle<Option<Result<(), tonic::transport::Error>>>;

/// A panicking handler answers INTERNAL and stops the service (see
/// crate::tasks).
#[derive(Clone)]
struct OnPanic(Tasks);

impl ResponseForPanic for OnPanic {
    type ResponseBody = tonic::body::Body;

    fn response_for_panic(
        &mut self,
        panic: Box<dyn std::any::Any + Send + 'static>,
    ) -> http::Response<Self::ResponseBody> {
        self.0.panicked("gRPC handler", panic.as_ref());
        Status::internal("internal error").into_http::<tonic::body::Body>()
    }
}

impl Wiring {
    fn health_registry(&self) -> HealthRegistry {
        let mut names = vec![
            ("", Needs::REDIS),
            (USER_SERVICE_NAME, Needs::REDIS),
            (PROJECTION_SERVICE_NAME, Needs::KAFKA),
            (REDIS_HEALTH_NAME, Needs::REDIS),
            (KAFKA_HEALTH_NAME, Needs::KAFKA),
            (LIVENESS_HEALTH_NAME, Needs::NOTHING),
        ];
        if self.config.projector_enabled {
            names.push((PROJECTOR_HEALTH_NAME, Needs::PROJECTOR));
        }
        HealthRegistry::new(&names, self.token.clone())
    }

    /// Starts the producer's watchdog, the checkpoint poller, the projector,
    /// the partition map's learning if still needed, and the dependency
    /// probe.
    fn spawn_background(&self, adapters: &Adapters, health: &Arc<HealthRegistry>) -> Background {
        let Self {
            config,
            metrics,
            token,
            tasks,
        } = self;
        let Adapters {
            link,
            store,
            publisher,
            routing,
        } = adapters;

        // Replaces the producer if librdkafka leaves it cut off from a
        // cluster that is there (see kafka::watchdog).
        tasks.spawn("producer watchdog", publisher.clone().watch(token.clone()));

        // Calls in flight at shutdown still wait on the poller: it stops
        // after the server has drained, not with the streams.
        let watch_stop = CancellationToken::new();
        let watch = CheckpointWatch::new(store.clone(), watch_stop.clone());
        tasks.spawn("checkpoint watch", watch.clone().run());

        let projector = config
            .projector_enabled
            .then(|| Arc::new(ProjectorState::default()));
        let verdicts = Arc::new(Verdicts::default());
        if let Some(state) = &projector {
            let p = Projector {
                link: link.clone(),
                group: config.consumer_group.clone(),
                topic: config.topic.clone(),
                dlq_topic: config.dlq_topic(),
                batch_size: config.projector_batch_size.max(1),
                store: store.clone(),
                watch: watch.clone(),
                request_ttl: config.request_id_ttl,
                publisher: publisher.clone(),
                state: state.clone(),
                metrics: metrics.clone(),
                routing: routing.clone(),
                verdicts: verdicts.clone(),
            };
            let t = token.clone();
            tasks.spawn("projector", async move {
                if let Err(e) = p.run(t).await {
                    tracing::error!(error = %e, "projector stopped with an error");
                }
            });
        }

        if routing.map().is_none() {
            tasks.spawn(
                "partition map",
                learn_partition_map(
                    link.clone(),
                    publisher.clone(),
                    config.topic.clone(),
                    routing.clone(),
                    token.clone(),
                ),
            );
        }
        tasks.spawn(
            "dependency probe",
            probe_dependencies(
                Probed {
                    store: store.clone(),
                    publisher: publisher.clone(),
                    projector: projector.clone(),
                    health: health.clone(),
                    routing: routing.clone(),
                    link: link.clone(),
                    topic: config.topic.clone(),
                },
                config.health_probe_interval,
                metrics.clone(),
                token.clone(),
            ),
        );
        Background {
            watch,
            watch_stop,
            projector,
            verdicts,
        }
    }

    fn handlers(&self, adapters: &Adapters, background: &Background) -> Handlers {
        let Self {
            config,
            token,
            tasks,
            ..
        } = self;
        let progress = Arc::new(ProgressHub::new(
            &adapters.link,
            OwnProjection {
                group: config.consumer_group.clone(),
                topic: config.topic.clone(),
                state: background.projector.clone(),
                store: Some(adapters.store.clone()),
                routing: Some(adapters.routing.clone()),
            },
            config.max_progress_watchers,
            config.publish_timeout,
            token.clone(),
            tasks.clone(),
        ));
        let projection = ProjectionApi {
            hub: progress.clone(),
            allowed: config.progress_allowed(),
            shutdown: token.clone(),
        };
        let cache = UserCache::new(config.user_cache_bytes);
        let users = UserApi {
            create: CreateUser {
                store: adapters.store.clone(),
                publisher: adapters.publisher.clone(),
                watch: background.watch.clone(),
                routing: adapters.routing.clone(),
                verdicts: background.verdicts.clone(),
            },
            max_position_wait: config.max_position_wait,
            tasks: tasks.clone(),
            users: cache.clone(),
        };
        Handlers {
            users,
            projection,
            progress,
            cache,
            // Health and reflection stay outside the budget, so a probe sees
            // the truth under load.
            calls: CallBudget::new(config.max_concurrent_calls),
        }
    }

    fn router(
        &self,
        health: &Arc<HealthRegistry>,
        reflection: Routes,
        users: UserApi,
        projection: ProjectionApi,
        calls: &CallBudget,
    ) -> Router<Layers> {
        let config = &self.config;
        let max_request = config.max_request_bytes;
        Server::builder()
            // Bounds the time a call holds its slot of the budget (a stream
            // only until it starts).
            .timeout(config.call_timeout())
            .max_concurrent_streams(config.max_concurrent_streams)
            .http2_keepalive_interval(Some(config.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
            .layer(GrpcTelemetryLayer::new(self.metrics.clone(), &SERVED))
            .layer(CatchPanicLayer::custom(OnPanic(self.tasks.clone())))
            // RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE, past MAX_REQUEST_BYTES.
            .layer(crate::api::oversize::OversizeLayer)
            .add_routes(reflection)
            .add_service(HealthService(health.clone()).into_server())
            .add_service(
                calls.named_layer(
                    UserServiceServer::new(users)
                        .max_decoding_message_size(max_request)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                ),
            )
            .add_service(
                calls.named_layer(
                    ProjectionServiceServer::new(projection)
                        .max_decoding_message_size(max_request)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                ),
            )
    }

    /// Serves `router` on the gRPC port until the token is cancelled.
    fn spawn_server(&self, router: Router<Layers>, grpc: GrpcListener) -> ServerTask {
        let Self {
            config,
            metrics,
            token,
            tasks,
        } = self;
        let GrpcListener { tcp, addr, tls } = grpc;
        let stop = token.clone().cancelled_owned();
        // A client that pings too often is sent GOAWAY (see transport::ping_policy);
        // each accepted connection is wrapped, plaintext or decrypted TLS.
        // It also closes silent and idle connections; each holds its place
        // under MAX_CONNECTIONS (see transport::connections).
        let pings = PingPolicy::new(
            config.http2_min_ping_interval,
            config.http2_max_ping_strikes,
        )
        .with_deadlines(config.http2_preface_timeout, config.max_connection_idle)
        .with_metrics(metrics.clone());
        let connections = Cap::connections(config.max_connections, metrics.clone());
        let server: futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>> =
            match &tls {
                None => {
                    tracing::info!(%addr, "gRPC in plaintext (no TLS_CERT_FILE)");
                    let incoming = transport::connections::plaintext(tcp, connections, pings);
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
                }
                Some(tls) => {
                    tracing::info!(%addr, mutual = tls.mutual(), "gRPC over TLS");
                    tasks.spawn(
                        "TLS reload",
                        tls.clone().watch(config.tls_reload_interval, token.clone()),
                    );
                    let incoming = tls::incoming(
                        tcp,
                        tls.clone(),
                        tls::Accepting {
                            handshake_timeout: config.tls_handshake_timeout,
                            connections,
                            handshakes: Cap::handshakes(config.tls_max_handshakes, metrics.clone()),
                            pings,
                        },
                        token.clone(),
                        tasks,
                    );
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
                }
            };
        tasks.spawn("gRPC server", server)
    }
}

/// Pings Redis and Kafka every `interval` and records what answers; each
/// health name follows the dependencies it needs (see [`Needs`]).
async fn probe_dependencies(
    probed: Probed,
    interval: Duration,
    metrics: Metrics,
    token: CancellationToken,
) {
    let Probed {
        store,
        publisher,
        projector,
        health,
        routing,
        link,
        topic,
    } = probed;
    let mut map_check = MapCheck::default();
    let mut last: Option<((bool, bool), bool)> = None;
    let mut last_in_group = false;
    let mut layout_checked = false;
    // At least a second whatever the interval: a metadata round trip on a
    // busy host can take a few hundred milliseconds, and a probe cut short
    // would report a reachable broker as down.
    let probe_timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(2));
    loop {
        let began = std::time::Instant::now();
        let ((redis, redis_took), (kafka, kafka_took)) =
            tokio::join!(async { (store.ping().await, began.elapsed()) }, async {
                (publisher.ping(probe_timeout).await, began.elapsed())
            },);
        metrics.probe("redis", redis.is_ok(), redis_took);
        metrics.probe("kafka", kafka.is_ok(), kafka_took);
        if let Ok(n) = &kafka {
            routing.set_topic_partitions(*n);
            store.record_partition_count(*n);
        }
        // A refusal may be recognised only after the first failed probe (the
        // handshake's error arrives later than a timeout): it is logged too.
        let refused = matches!(kafka, Err(KafkaError::Refused(_)));
        let kafka = kafka.map(|_| ());
        if redis.is_ok() {
            map_check.run(&store, &routing, &link, &topic).await;
        }
        map_check.report(&routing);
        // A map that cannot be honoured takes Kafka's names out: nothing
        // can be published where it belongs.
        let now = (redis.is_ok(), kafka.is_ok() && routing.refusal().is_none());
        if last != Some((now, refused)) {
            match (&redis, &kafka) {
                (Ok(()), Ok(())) => tracing::info!("Redis and Kafka reachable"),
                _ => tracing::warn!(
                    redis = ?redis.as_ref().err().map(ToString::to_string),
                    kafka = ?kafka.as_ref().err().map(ToString::to_string),
                    "dependency unreachable"
                ),
            }
            last = Some((now, refused));
        }
        health.set_dependencies(now.0, now.1);
        if now.0 && !layout_checked {
            layout_checked = true;
            check_listpack_value(&store).await;
        }
        if let Some(state) = &projector {
            let in_group = state.stats().in_group;
            if in_group != last_in_group {
                if in_group {
                    tracing::info!("projector in its consumer group");
                } else {
                    tracing::warn!("projector not in its consumer group");
                }
                last_in_group = in_group;
            }
            health.set_projector_in_group(in_group);
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Warns if Redis keeps the read model's buckets in a layout that takes
/// about twice the memory; checked once, the first time Redis answers.
async fn check_listpack_value(store: &RedisStore) {
    match store.listpack_value_limit().await {
        Ok(Some(limit)) if limit < ADVISED_LISTPACK_VALUE => tracing::warn!(
            limit,
            advised = ADVISED_LISTPACK_VALUE,
            "Redis' hash-max-listpack-value is below what the read model's buckets want: \
             users take about twice the memory (set it in redis.conf)"
        ),
        Ok(limit) => tracing::debug!(?limit, "hash-max-listpack-value checked"),
        Err(e) => tracing::debug!(error = %e, "cannot read hash-max-listpack-value"),
    }
}

/// What the dependency probe looks at.
struct Probed {
    store: RedisStore,
    publisher: EventPublisher,
    projector: Option<Arc<ProjectorState>>,
    health: Arc<HealthRegistry>,
    routing: Arc<Routing>,
    link: KafkaLink,
    topic: String,
}

/// The probe's watch over the partition map: it leaves the map beside the
/// read model (a Redis that lost it gets it back), notices instances that
/// disagree, and reports partitions no id is routed to.
#[derive(Default)]
struct MapCheck {
    /// When the log was last read because Redis held another map.
    last_reread: Option<std::time::Instant>,
    reported_unused: i32,
    reported_refusal: Option<String>,
}

impl MapCheck {
    /// Offers this instance's map to Redis; if another is there, one of the
    /// two instances is stale: the log says which (read at most every 10 s).
    async fn run(&mut self, store: &RedisStore, routing: &Routing, link: &KafkaLink, topic: &str) {
        let Some(map) = routing.map() else { return };
        let held = match store.offer_partition_map(map).await {
            Ok(held) => held,
            Err(e) => {
                tracing::debug!(error = %e, "cannot leave the partition map in Redis");
                return;
            }
        };
        let Some(other) = held.filter(|h| *h != map) else {
            return;
        };
        if self
            .last_reread
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.last_reread = Some(std::time::Instant::now());
        let (link, owned_topic) = (link.clone(), topic.to_owned());
        let read = tokio::task::spawn_blocking(move || {
            kafka::partition_map::read_map(&link, &owned_topic, None, Duration::from_secs(30))
        })
        .await;
        match read {
            Ok(Ok(Some(log))) if log == map => {
                tracing::warn!(
                    redis = %other.to_stored(),
                    log = %log.to_stored(),
                    "Redis held a stale partition map: replaced with the log's"
                );
                if let Err(e) = store.replace_partition_map(log).await {
                    tracing::debug!(error = %e, "cannot replace the partition map in Redis");
                }
            }
            Ok(Ok(Some(log))) => routing.set_map(log),
            Ok(Ok(None)) => routing.set_map(other),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot re-read the partition map"),
            Err(e) => tracing::debug!(error = %e, "partition map re-read panicked"),
        }
    }

    /// Logs a change in the unused partitions or in the refusal, once.
    fn report(&mut self, routing: &Routing) {
        let unused = routing.unused_partitions();
        if unused != self.reported_unused {
            if let (true, Some(map), Some(n)) =
                (unused > 0, routing.map(), routing.topic_partitions())
            {
                tracing::warn!(
                    topic_partitions = n,
                    routed = map.partitions,
                    unused,
                    "the topic has {n} partitions, but its partition map (offset {} of partition 0) \
                     routes ids over the first {}: partitions {}..{} stay unused. To spread users \
                     over more partitions, move to a new topic: `user-service move-topic`",
                    map.offset,
                    map.partitions,
                    map.partitions,
                    n - 1
                );
            }
            self.reported_unused = unused;
        }
        let refusal = routing.refusal();
        if refusal != self.reported_refusal {
            match &refusal {
                Some(reason) => tracing::error!(%reason, "the partition map cannot be honoured"),
                None => tracing::info!("the partition map is honoured again"),
            }
            self.reported_refusal = refusal;
        }
    }
}

/// Retries of the partition map's learning; the first waits too: start-up
/// has just failed one.
const MAP_RETRY: retry::Schedule =
    retry::Schedule::new(Duration::from_millis(200), Duration::from_secs(5));

/// Reads (or records) the topic's partition map until it is known, for an
/// instance that started while no broker answered.
async fn learn_partition_map(
    link: KafkaLink,
    publisher: EventPublisher,
    topic: String,
    routing: Arc<Routing>,
    token: CancellationToken,
) {
    let mut delays = MAP_RETRY.delays();
    while routing.map().is_none() {
        if !retry::pause(&token, delays.next().unwrap_or(MAP_RETRY.max)).await {
            return;
        }
        match kafka::partition_map::learn(&link, &publisher, &topic, None, Duration::from_secs(30))
            .await
        {
            Ok(map) => adopt_map(&routing, map),
            Err(e) => tracing::debug!(error = %e, "the topic's partition map is not known yet"),
        }
    }
}

/// Routes ids by the map read from the log, and says so once.
fn adopt_map(routing: &Routing, map: crate::domain::PartitionMap) {
    tracing::info!(
        partitions = map.partitions,
        offset = map.offset,
        "the topic's partition map"
    );
    routing.set_map(map);
}

#[cfg(test)]
mod tests {
    use super::{MAP_RETRY, SERVED};

    #[test]
    fn the_partition_map_is_retried_after_doubling_delays_up_to_5s() {
        let delays: Vec<u128> = MAP_RETRY.delays().take(8).map(|d| d.as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn calls_are_labelled_by_the_services_served() {
        for (path, want) in [
            (
                "/user.v1.UserService/GetUser",
                ("user.v1.UserService", "GetUser"),
            ),
            (
                "/user.v1.ProjectionService/WatchProgress",
                ("user.v1.ProjectionService", "WatchProgress"),
            ),
            (
                "/grpc.health.v1.Health/Check",
                ("grpc.health.v1.Health", "Check"),
            ),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                (
                    "grpc.reflection.v1.ServerReflection",
                    "ServerReflectionInfo",
                ),
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                (
                    "grpc.reflection.v1alpha.ServerReflection",
                    "ServerReflectionInfo",
                ),
            ),
            // A served service, a method it does not have.
            (
                "/user.v1.UserService/Nope",
                ("user.v1.UserService", "unknown"),
            ),
            (
                "/user.v1.UserService/GetUser/x",
                ("user.v1.UserService", "unknown"),
            ),
            ("/random.Svc/GetUser", ("unknown", "unknown")),
            ("/user.v1.UserService", ("unknown", "unknown")),
            ("user.v1.UserService/GetUser", ("unknown", "unknown")),
            ("/", ("unknown", "unknown")),
            ("", ("unknown", "unknown")),
        ] {
            assert_eq!(SERVED.labels(path), want, "{path}");
        }
    }
}
