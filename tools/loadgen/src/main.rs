//! `loadgen`: the project's own load generator, on tonic's client, for
//! `scripts/bench` (and `scripts/scaleout`, `scripts/faults`). ghz (Go) may
//! saturate before the service does on a small machine; this one keeps many
//! calls in flight over a few HTTP/2 connections. A tool of the workspace
//! (`cargo build -p loadgen --release`), not part of the service.
//!
//! Modes (each prints one JSON object on stdout):
//!
//! - `get` (optionally waiting on `--min-position`), `create`, `health`: closed loop, `--concurrency` callers over
//!   `--connections` channels, for `--duration` or `--max-requests`;
//!   count, errors by code, rps, p50/p90/p99/p999/max latency in ms
//!   (from an HdrHistogram of microseconds, 3 significant digits); `create`
//!   also the created users' average JSON size (`avg_user_json_bytes`, as
//!   `produce-events` measures it). The Go peer (`../shared/peers`) speaks the
//!   same contract, so `scripts/bench` drives it with these three modes too.
//! - `freshness`: CreateUser at a fixed `--rate`, then the time from its answer
//!   until GetUser returns the user (with the returned position, or by polling
//!   without one).
//! - `produce-events`: valid `UserCreated` records straight to Kafka (rdkafka,
//!   acks=all, idempotent, Java murmur2 partitioning), for the catch-up run.
//! - `catchup`: waits until a service's projector has applied everything in its
//!   topic (Redis' applied positions) and its group's lag is 0 (GetProgress).
//! - `wait-ready`: waits until `grpc.health.v1.Health/Check` says SERVING.
//! - `cleanup`: deletes benchmark topics and consumer groups, only those named
//!   with the given `--prefix`, on brokers named explicitly, and only with
//!   `--delete` (without it, it lists what it would delete).
//!
//! Calls that fail with UNAVAILABLE, or INTERNAL mentioning h2/GOAWAY (a proxy
//! closing the connection), or hyper's CANCELLED for a call queued on that
//! connection, are retried a bounded number of times on a fresh connection
//! (CreateUser carries a request id, so a retry creates nothing twice). Every
//! loop is bounded in count and time.

use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::KafkaError,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    ops::ControlFlow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tonic::{
    Code, Request, Status,
    transport::{Channel, Endpoint},
};
use tools_common::{
    health::{self, NotServing},
    pool::Pool,
    retry,
};
use user_service::proto::user::v1::{
    CreateUserRequest, GetProgressRequest, GetUserRequest, Position,
    projection_service_client::ProjectionServiceClient, user_service_client::UserServiceClient,
};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "user-service's load generator (tonic client)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// GetUser on random ids in [id-min, id-max] (warm keys).
    Get(GetArgs),
    /// CreateUser with service-assigned ids (and a request id unless disabled).
    Create(CreateArgs),
    /// grpc.health.v1.Health/Check: the gRPC ceiling.
    Health(HealthArgs),
    /// CreateUser at a fixed rate, then time until GetUser sees the user.
    Freshness(FreshnessArgs),
    /// Produce valid UserCreated events straight to Kafka.
    ProduceEvents(ProduceArgs),
    /// Wait until the projector applied the whole topic and the lag is 0.
    Catchup(CatchupArgs),
    /// Wait until the service's health says SERVING.
    WaitReady(WaitArgs),
    /// GET straight to Redis through the Redis client the service uses (bb8
    /// pool, with or without its check-out PING) or one shared multiplexed
    /// connection: what the client library costs, without gRPC.
    RedisGet(RedisGetArgs),
    /// Create topics (if missing) before a baseline writes to them.
    CreateTopics(CreateTopicsArgs),
    /// Delete benchmark topics and consumer groups (a dry run without --delete).
    Cleanup(CleanupArgs),
}

#[derive(Args, Clone)]
struct CallOpts {
    /// The service, as a URI.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Calls in flight (closed loop: each caller waits for its answer).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many calls even if the duration is not over.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Deadline of each call (sent as grpc-timeout).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Retries of a call that failed with UNAVAILABLE, an h2/GOAWAY INTERNAL or
    /// a transport CANCELLED.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// A label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
    /// Codes that are the expected answer (e.g. `DeadlineExceeded`, as tonic
    /// names them): the run fails only on other errors, or with no answer at
    /// all. Without it, the run fails when no call succeeded.
    #[arg(long, value_delimiter = ',')]
    expect_codes: Vec<String>,
}

#[derive(Args)]
struct GetArgs {
    #[command(flatten)]
    call: CallOpts,
    #[arg(long, default_value_t = 1)]
    id_min: i64,
    #[arg(long, default_value_t = 1000)]
    id_max: i64,
    /// Wait for this position (PARTITION:OFFSET) before reading: with a
    /// position nothing will apply, every call waits out the service's bound.
    #[arg(long, value_parser = parse_position)]
    min_position: Option<Position>,
}

fn parse_position(s: &str) -> Result<Position, String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: want PARTITION:OFFSET"))?;
    Ok(Position {
        partition: p.parse().map_err(|e| format!("partition: {e}"))?,
        offset: o.parse().map_err(|e| format!("offset: {e}"))?,
    })
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    call: CallOpts,
    /// Prefix of request ids and emails; unique per run.
    #[arg(long, default_value = "loadgen")]
    run_id: String,
    /// Send no request id (no idempotency record in Redis).
    #[arg(long)]
    no_request_id: bool,
}

#[derive(Args)]
struct HealthArgs {
    #[command(flatten)]
    call: CallOpts,
    /// The service name to check ("" = the whole server).
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FreshMethod {
    /// GetUser with the position CreateUser returned: the server waits.
    Position,
    /// GetUser without a position, polled by the client until found.
    Poll,
}

#[derive(Args)]
struct FreshnessArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// CreateUser calls per second, issued on schedule (open loop).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, value_enum, default_value_t = FreshMethod::Position)]
    method: FreshMethod,
    /// Pause between polls (method poll).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Longest wait for a user to become readable.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// Deadline of each CreateUser.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Creates in flight beyond this are skipped (counted as shed).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    #[arg(long, default_value_t = 3)]
    retries: u32,
    #[arg(long, default_value = "loadgen-fresh")]
    run_id: String,
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Args)]
struct ProduceArgs {
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Id of the first event; the others follow.
    #[arg(long, default_value_t = 1)]
    id_start: i64,
    /// Partitions when the topic is created here (it is created if missing).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    #[arg(long, default_value_t = 20)]
    linger_ms: u64,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct CatchupArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The service's Redis (with its db), where the applied positions live.
    #[arg(long, default_value = "redis://127.0.0.1:16379")]
    redis_url: String,
    /// The service's REDIS_KEY_PREFIX.
    #[arg(long, default_value = "")]
    key_prefix: String,
    /// The service's topic.
    #[arg(long)]
    topic: String,
    /// How often Redis' applied positions are read.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    redis_poll: Duration,
    /// How often GetProgress is asked once everything is applied.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    progress_poll: Duration,
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Args)]
struct WaitArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum RedisClientKind {
    /// bb8 pool as the service builds it (test_on_check_out: a PING per checkout).
    Pool,
    /// bb8 pool without the check-out PING.
    PoolNoCheck,
    /// One multiplexed connection shared by all callers.
    Multiplexed,
}

#[derive(Args)]
struct RedisGetArgs {
    #[arg(long, default_value = "redis://127.0.0.1:16379")]
    redis_url: String,
    #[arg(long, value_enum, default_value_t = RedisClientKind::Pool)]
    client: RedisClientKind,
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Keys are `key:%012d` below this (redis-benchmark's names).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Args)]
struct CreateTopicsArgs {
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    #[arg(long, value_delimiter = ',', required = true)]
    topics: Vec<String>,
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

#[derive(Args)]
struct CleanupArgs {
    /// The brokers: no default, so a slip cannot reach a stack by accident.
    #[arg(long)]
    brokers: String,
    /// Every topic and group named must start with this (a benchmark run's
    /// own prefix, at least 8 characters); any other name refuses the whole run.
    #[arg(long)]
    prefix: String,
    /// Topics to delete.
    #[arg(long, value_delimiter = ',')]
    topics: Vec<String>,
    /// Consumer groups to delete.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Delete them. Without it, only list what would be deleted.
    #[arg(long)]
    delete: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        // librdkafka's producer is driven synchronously, off any runtime.
        Mode::ProduceEvents(a) => produce_events(a),
        mode => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(run_async(mode)),
    };
    match result {
        Ok(out) => {
            let ok = out.get("failed").and_then(Value::as_bool) != Some(true);
            println!("{out}");
            if !ok {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run_async(mode: Mode) -> anyhow::Result<Value> {
    match mode {
        Mode::Get(a) => {
            let (lo, hi) = (a.id_min, a.id_max.max(a.id_min));
            let min_position = a.min_position;
            closed_loop("get", &a.call, move |ch, _seq, timeout| async move {
                let id = rand::random_range(lo..=hi);
                let mut req = Request::new(GetUserRequest { id, min_position });
                req.set_timeout(timeout);
                UserServiceClient::new(ch).get_user(req).await.map(|_| ())
            })
            .await
        }
        Mode::Create(a) => {
            let run = a.run_id.clone();
            let with_req = !a.no_request_id;
            // The created users' JSON, summed over the answers: what the
            // report weighs Redis' memory per created user against.
            let json_bytes = Arc::new(AtomicU64::new(0));
            let answered = Arc::new(AtomicU64::new(0));
            let (sum, n) = (json_bytes.clone(), answered.clone());
            let mut out = closed_loop("create", &a.call, move |ch, seq, timeout| {
                let run = run.clone();
                let (sum, n) = (sum.clone(), n.clone());
                async move {
                    let mut req = Request::new(new_user(&run, seq, with_req));
                    req.set_timeout(timeout);
                    let r = UserServiceClient::new(ch).create_user(req).await?;
                    if let Some(u) = &r.get_ref().user {
                        sum.fetch_add(user_json_len(u) as u64, Ordering::Relaxed);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                }
            })
            .await?;
            let n = answered.load(Ordering::Relaxed);
            if n > 0 {
                out["avg_user_json_bytes"] =
                    json!(json_bytes.load(Ordering::Relaxed) as f64 / n as f64);
            }
            Ok(out)
        }
        Mode::Health(a) => {
            let service = a.service.clone();
            closed_loop("health", &a.call, move |ch, _seq, timeout| {
                let service = service.clone();
                async move {
                    match health::check(ch, &service, timeout).await {
                        Ok(()) => Ok(()),
                        Err(NotServing::Status(_)) => {
                            Err(Status::unavailable("health: not SERVING"))
                        }
                        Err(NotServing::Failed(s)) => Err(s),
                    }
                }
            })
            .await
        }
        Mode::Freshness(a) => freshness(a).await,
        Mode::Catchup(a) => catchup(a).await,
        Mode::WaitReady(a) => wait_ready(&a.addr, a.timeout).await,
        Mode::RedisGet(a) => redis_get(a).await,
        Mode::CreateTopics(a) => {
            for t in &a.topics {
                create_topic(&a.brokers, t, a.partitions).await?;
            }
            Ok(json!({"tool": "loadgen", "mode": "create-topics", "topics": a.topics}))
        }
        Mode::Cleanup(a) => cleanup(a).await,
        Mode::ProduceEvents(_) => unreachable!("handled in main"),
    }
}

fn new_user(run: &str, seq: u64, with_request_id: bool) -> CreateUserRequest {
    CreateUserRequest {
        id: None,
        name: format!("Loadgen User {seq}"),
        email: format!("lg.{seq}@example.com"),
        request_id: if with_request_id {
            format!("{run}-{seq}")
        } else {
            String::new()
        },
    }
}

/// The length of a user's JSON as `produce-events` writes it (`id`, `name`,
/// `email`, `created_at_ms`), so that both memory figures of the report are
/// weighed against the same measure.
fn user_json_len(u: &user_service::proto::user::v1::User) -> usize {
    let ms = u
        .create_time
        .as_ref()
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    json!({"id": u.id, "name": u.name, "email": u.email, "created_at_ms": ms})
        .to_string()
        .len()
}

// ------------------------------------------------------------------ channels

/// A few HTTP/2 connections to `addr` shared by all callers, connected now; a
/// slot is replaced when a call fails in a way that means its connection is
/// gone (GOAWAY from a proxy).
async fn connect(addr: &str, n: usize) -> anyhow::Result<Arc<Pool>> {
    let pool = Pool::connect(addr, n, Duration::from_secs(5), |e| {
        e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true)
    })
    .await?;
    Ok(Arc::new(pool))
}

/// UNAVAILABLE, or an INTERNAL or CANCELLED that the connection caused (a
/// GOAWAY, a reset connection; hyper's CANCELLED for a call still queued on
/// a connection that went away, as behind nginx, which sends GOAWAY after
/// `keepalive_requests` calls), told by the error's source chain (see
/// `user_service::transport`), not its message.
const RETRY: retry::Rule = retry::Rule {
    always: &[Code::Unavailable],
    on_transport: &[Code::Internal, Code::Cancelled],
};

/// One call with bounded retries on a fresh connection, pausing 5 ms, then
/// 10 ms, ...; returns its result and its latency as the caller saw it
/// (retries included).
async fn call_with_retries<F, Fut, T>(
    conns: &Pool,
    slot: usize,
    retries: u32,
    timeout: Duration,
    retried: &AtomicU64,
    f: &F,
) -> Result<T, Status>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let pause = retry::growing(Duration::from_millis(5));
    retry::with_backoff((), pause, |(), attempt| async move {
        let (generation, ch) = conns.get(slot);
        // A guard beyond the deadline the server sees, so nothing hangs.
        match retry::guarded(timeout + Duration::from_secs(1), f(ch)).await {
            Err(s) if RETRY.retries(&s) && attempt < retries => {
                retried.fetch_add(1, Ordering::Relaxed);
                conns
                    .reconnect(slot, generation, Duration::from_secs(3))
                    .await;
                ControlFlow::Continue(())
            }
            r => ControlFlow::Break(r),
        }
    })
    .await
}

// ------------------------------------------------------------------ stats

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The longest latency a histogram tells apart (longer ones count as this).
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// An HdrHistogram of latencies in microseconds, 3 significant digits (an
/// error below 0.1 %), of fixed size whatever the number of calls.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
}

/// Latencies recorded by many callers: a few histograms behind their own
/// locks (caller `i` uses shard `i % SHARDS`), merged at the end.
struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    const SHARDS: usize = 16;

    fn new() -> Arc<Self> {
        Arc::new(Self {
            shards: (0..Self::SHARDS).map(|_| Mutex::new(histogram())).collect(),
        })
    }

    fn record(&self, caller: usize, d: Duration) {
        record(
            &mut self.shards[caller % Self::SHARDS]
                .lock()
                .expect("histogram lock"),
            d,
        );
    }

    fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            all.add(&*s.lock().expect("histogram lock"))
                .expect("histograms of the same bounds");
        }
        all
    }
}

/// Count, mean, min, p50/p90/p99/p99.9 and max in ms, from the histogram.
fn latency_json(h: &Histogram<u64>) -> Value {
    let us_ms = |us: u64| us as f64 / 1e3;
    let q = |q: f64| us_ms(h.value_at_quantile(q));
    json!({
        "n": h.len(),
        "mean": h.mean().round() / 1e3,
        "min": us_ms(h.min()),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": us_ms(h.max()),
        "histogram": "hdrhistogram, µs, 3 significant digits",
    })
}

/// This process' CPU time (utime + stime), from /proc (Linux; USER_HZ = 100).
fn self_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let tick = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Answers by code (the latencies go to a histogram of their own).
#[derive(Default)]
struct Tally {
    calls: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    sample_errors: BTreeMap<String, String>,
}

impl Tally {
    fn record<T>(&mut self, r: &Result<T, Status>) {
        self.calls += 1;
        match r {
            Ok(_) => self.ok += 1,
            Err(s) => {
                let name = code_name(s.code());
                *self.errors.entry(name.clone()).or_default() += 1;
                self.sample_errors
                    .entry(name)
                    .or_insert_with(|| s.message().chars().take(200).collect());
            }
        }
    }

    fn merge(&mut self, o: Tally) {
        self.calls += o.calls;
        self.ok += o.ok;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in o.sample_errors {
            self.sample_errors.entry(k).or_insert(v);
        }
    }
}

// ------------------------------------------------------------------ closed loop

/// `concurrency` callers, each waiting for its answer before the next call,
/// until the duration is over or `max_requests` calls were started.
async fn closed_loop<F, Fut>(mode: &str, o: &CallOpts, f: F) -> anyhow::Result<Value>
where
    F: Fn(Channel, u64, Duration) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send,
{
    let conns = connect(&o.addr, o.connections).await?;
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let latencies = Latencies::new();
    let cpu0 = self_cpu_seconds();
    let start = Instant::now();
    let deadline = start + o.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..o.concurrency.max(1) {
        let (conns, f, next, retried) = (conns.clone(), f.clone(), next.clone(), retried.clone());
        let latencies = latencies.clone();
        let (max, timeout, retries) = (o.max_requests, o.timeout, o.retries);
        workers.spawn(async move {
            let mut t = Tally::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= max || Instant::now() >= deadline {
                    break;
                }
                let call = |ch: Channel| f(ch, seq, timeout);
                let t0 = Instant::now();
                let r = call_with_retries(&conns, w, retries, timeout, &retried, &call).await;
                latencies.record(w, t0.elapsed());
                t.record(&r);
            }
            t
        });
    }
    let mut all = Tally::default();
    while let Some(t) = workers.join_next().await {
        all.merge(t?);
    }
    let elapsed = start.elapsed();
    let count = all.calls;
    Ok(json!({
        "tool": "loadgen",
        "mode": mode,
        "label": o.label,
        "concurrency": o.concurrency,
        "connections": o.connections,
        "count": count,
        "ok": all.ok,
        "errors": all.errors,
        "error_samples": all.sample_errors,
        "retries": retried.load(Ordering::Relaxed),
        "reconnects": conns.reconnects(),
        "elapsed_s": elapsed.as_secs_f64(),
        "rps": count as f64 / elapsed.as_secs_f64().max(1e-9),
        "ok_rps": all.ok as f64 / elapsed.as_secs_f64().max(1e-9),
        "latency_ms": latency_json(&latencies.merged()),
        "client_cpu_s": self_cpu_seconds() - cpu0,
        "failed": if o.expect_codes.is_empty() {
            all.ok == 0
        } else {
            count == 0 || all.errors.keys().any(|c| !o.expect_codes.contains(c))
        },
    }))
}

// ------------------------------------------------------------------ freshness

struct FreshSample {
    create: Result<(), Status>,
    create_took: Duration,
    /// From CreateUser's answer to GetUser's answer with the user.
    fresh: Option<Duration>,
    read_error: Option<Code>,
    polls: u64,
}

async fn freshness(a: FreshnessArgs) -> anyhow::Result<Value> {
    let conns = connect(&a.addr, a.connections).await?;
    let retried = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let total = (a.rate * a.duration.as_secs_f64()).round().max(1.0) as u64;
    let mut shed = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let cpu0 = self_cpu_seconds();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued = 0u64;
    let mut done: Vec<FreshSample> = Vec::with_capacity(total as usize);
    while issued < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * a.rate) as u64 + 1).min(total);
        while issued < due {
            let seq = issued;
            issued += 1;
            if in_flight.load(Ordering::Relaxed) >= a.max_in_flight {
                shed += 1;
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (conns, retried, in_flight) = (conns.clone(), retried.clone(), in_flight.clone());
            let run = a.run_id.clone();
            let (method, poll, max_wait, timeout, retries) =
                (a.method, a.poll_interval, a.max_wait, a.timeout, a.retries);
            let slot = seq as usize;
            tasks.spawn(async move {
                let s = fresh_one(
                    &conns, slot, &run, seq, method, poll, max_wait, timeout, retries, &retried,
                )
                .await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                s
            });
        }
        // Collect finished tasks as we go, so the set stays small.
        while let Some(r) = tasks.try_join_next() {
            done.push(r?);
        }
    }
    let schedule_s = start.elapsed().as_secs_f64();
    while let Some(r) = tasks.join_next().await {
        done.push(r?);
    }
    let elapsed = start.elapsed();

    let mut creates = Tally::default();
    let (mut create_latency, mut fresh) = (histogram(), histogram());
    let mut read_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut polls = 0;
    for s in done {
        creates.record(&s.create);
        record(&mut create_latency, s.create_took);
        if let Some(f) = s.fresh {
            record(&mut fresh, f);
        }
        if let Some(c) = s.read_error {
            *read_errors.entry(code_name(c)).or_default() += 1;
        }
        polls += s.polls;
    }
    let seen = fresh.len();
    Ok(json!({
        "tool": "loadgen",
        "mode": "freshness",
        "label": a.label,
        "method": match a.method { FreshMethod::Position => "position", FreshMethod::Poll => "poll" },
        "target_rate": a.rate,
        "achieved_rate": issued.saturating_sub(shed) as f64 / schedule_s.max(1e-9),
        "issued": issued,
        "shed": shed,
        "creates_ok": creates.ok,
        "create_errors": creates.errors,
        "error_samples": creates.sample_errors,
        "create_latency_ms": latency_json(&create_latency),
        "seen": seen,
        "not_seen": creates.ok.saturating_sub(seen),
        "read_errors": read_errors,
        "get_calls": polls,
        "freshness_ms": latency_json(&fresh),
        "retries": retried.load(Ordering::Relaxed),
        "reconnects": conns.reconnects(),
        "elapsed_s": elapsed.as_secs_f64(),
        "client_cpu_s": self_cpu_seconds() - cpu0,
        "failed": seen == 0,
    }))
}

#[allow(clippy::too_many_arguments)]
async fn fresh_one(
    conns: &Pool,
    slot: usize,
    run: &str,
    seq: u64,
    method: FreshMethod,
    poll: Duration,
    max_wait: Duration,
    timeout: Duration,
    retries: u32,
    retried: &AtomicU64,
) -> FreshSample {
    let t0 = Instant::now();
    let create = |ch: Channel| {
        let mut req = Request::new(new_user(run, seq, true));
        req.set_timeout(timeout);
        async move { UserServiceClient::new(ch).create_user(req).await }
    };
    let created = call_with_retries(conns, slot, retries, timeout, retried, &create).await;
    let acked = Instant::now();
    let mut sample = FreshSample {
        create: created.as_ref().map(|_| ()).map_err(Clone::clone),
        create_took: acked - t0,
        fresh: None,
        read_error: None,
        polls: 0,
    };
    let Ok(resp) = created else {
        return sample;
    };
    let resp = resp.into_inner();
    let (Some(user), Some(pos)) = (resp.user, resp.position) else {
        sample.read_error = Some(Code::Internal);
        return sample;
    };
    let give_up = acked + max_wait;
    loop {
        let min_position = (method == FreshMethod::Position).then_some(Position {
            partition: pos.partition,
            offset: pos.offset,
        });
        let wait = give_up.saturating_duration_since(Instant::now());
        let get = |ch: Channel| {
            let mut req = Request::new(GetUserRequest {
                id: user.id,
                min_position,
            });
            req.set_timeout(wait.max(Duration::from_millis(1)));
            async move { UserServiceClient::new(ch).get_user(req).await }
        };
        sample.polls += 1;
        match call_with_retries(conns, slot, retries, wait, retried, &get).await {
            Ok(_) => {
                sample.fresh = Some(acked.elapsed());
                return sample;
            }
            Err(s) if s.code() == Code::NotFound && method == FreshMethod::Poll => {
                if Instant::now() + poll >= give_up {
                    sample.read_error = Some(Code::DeadlineExceeded);
                    return sample;
                }
                tokio::time::sleep(poll).await;
            }
            Err(s) => {
                sample.read_error = Some(s.code());
                return sample;
            }
        }
    }
}

// ------------------------------------------------------------------ produce-events

struct Counting {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("lock");
                if first.is_none() {
                    *first = Some(e.to_string());
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn produce_events(a: ProduceArgs) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(create_topic(&a.brokers, &a.topic, a.partitions))?;

    let ctx = Counting {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    };
    let producer: BaseProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", a.linger_ms.to_string())
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "500000")
        .set("message.timeout.ms", "60000")
        .set("client.id", "user-service-loadgen")
        .create_with_context(ctx)?;

    let start = Instant::now();
    let deadline = start + a.timeout;
    let created_at = now_ms();
    let mut bytes = 0u64;
    // The users as the Go service's JSON (`id`, `name`, `email`,
    // `created_at_ms`): what the report weighs Redis' memory per user against.
    let mut user_json_bytes = 0u64;
    let mut sent = 0u64;
    for i in 0..a.count {
        let id = a.id_start + i as i64;
        let key = id.to_string();
        let user = format!(
            r#"{{"id":{id},"name":"Bench User {id}","email":"bench.{id}@example.com","created_at_ms":{created_at}}}"#
        );
        user_json_bytes += user.len() as u64;
        let value = format!(
            r#"{{"schema_version":1,"type":"UserCreated",{}"#,
            &user[1..]
        );
        bytes += value.len() as u64;
        let mut record = BaseRecord::to(&a.topic).key(&key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                    if Instant::now() > deadline {
                        anyhow::bail!("timed out after {sent} events (queue full)");
                    }
                }
                Err((e, _)) => anyhow::bail!("producing event {id}: {e}"),
            }
        }
        sent += 1;
        if sent % 1000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    producer.flush(left.max(Duration::from_secs(1)))?;
    let elapsed = start.elapsed();
    let ctx = producer.context();
    let (ok, failed) = (
        ctx.ok.load(Ordering::Relaxed),
        ctx.failed.load(Ordering::Relaxed),
    );
    let first_error = ctx.first_error.lock().expect("lock").clone();
    Ok(json!({
        "tool": "loadgen",
        "mode": "produce-events",
        "topic": a.topic,
        "count": sent,
        "delivered": ok,
        "delivery_errors": failed,
        "first_error": first_error,
        "id_start": a.id_start,
        "avg_value_bytes": bytes as f64 / sent.max(1) as f64,
        "avg_user_json_bytes": user_json_bytes as f64 / sent.max(1) as f64,
        "elapsed_s": elapsed.as_secs_f64(),
        "rps": ok as f64 / elapsed.as_secs_f64().max(1e-9),
        "client_cpu_s": self_cpu_seconds(),
        "failed": ok != a.count,
    }))
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&t], &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => anyhow::bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ catch-up

async fn wait_ready(addr: &str, timeout: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    let mut last = String::from("never connected");
    while start.elapsed() < timeout {
        if let Ok(Ok(ch)) = tokio::time::timeout(
            Duration::from_secs(1),
            Endpoint::from_shared(addr.to_owned())?.connect(),
        )
        .await
        {
            match health::check(ch, "", Duration::from_secs(1)).await {
                Ok(()) => {
                    return Ok(json!({
                        "tool": "loadgen", "mode": "wait-ready",
                        "ready_after_s": start.elapsed().as_secs_f64(),
                    }));
                }
                Err(NotServing::Status(n)) => last = format!("status {n}"),
                Err(NotServing::Failed(s)) => last = format!("{:?}: {}", s.code(), s.message()),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} not SERVING after {timeout:?} (last: {last})")
}

async fn catchup(a: CatchupArgs) -> anyhow::Result<Value> {
    let start = Instant::now();
    let deadline = start + a.timeout;
    let ready = wait_ready(&a.addr, a.timeout).await?;
    let t_serving = start.elapsed();
    let ch = Endpoint::from_shared(a.addr.clone())?.connect().await?;
    let mut progress = ProjectionServiceClient::new(ch);

    // The log to apply: from the group's progress (watermarks from Kafka).
    let (starts, ends) = loop {
        let r = progress
            .get_progress(GetProgressRequest::default())
            .await
            .map(|r| r.into_inner().snapshot);
        if let Ok(Some(snap)) = r {
            let starts: HashMap<i32, i64> = snap
                .partitions
                .iter()
                .map(|p| (p.partition, p.log_start_offset))
                .collect();
            let ends: HashMap<i32, i64> = snap
                .partitions
                .iter()
                .map(|p| (p.partition, p.log_end_offset))
                .collect();
            if !ends.is_empty() {
                break (starts, ends);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no progress snapshot in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let events: i64 = ends.iter().map(|(p, e)| e - starts[p]).sum();

    // Applied positions, read straight from the read model (one hash per
    // partition, as the service lays them out).
    let keys = user_service::store::Keys::new(&a.key_prefix, &a.topic);
    let redis = redis::Client::open(a.redis_url.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let mut t_first = None;
    let mut samples = Vec::new();
    let mut last_sample = Duration::ZERO;
    let t_applied = loop {
        let mut pipe = redis::pipe();
        for p in ends.keys() {
            pipe.hget(keys.checkpoint(*p), "applied");
        }
        let offsets: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        let applied: HashMap<i32, i64> = ends
            .keys()
            .zip(offsets)
            .filter_map(|(p, o)| Some((*p, o?)))
            .collect();
        let now = start.elapsed();
        let done: i64 = ends
            .iter()
            .map(|(p, e)| {
                let next = applied.get(p).map_or(starts[p], |o| o + 1);
                (next.min(*e) - starts[p]).max(0)
            })
            .sum();
        if done > 0 && t_first.is_none() {
            t_first = Some(now);
        }
        if now - last_sample >= Duration::from_millis(250) || done >= events {
            samples.push(json!([ms(now), done]));
            last_sample = now;
        }
        if done >= events {
            break now;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "catch-up not done after {:?}: {done} of {events} applied",
            a.timeout
        );
        tokio::time::sleep(a.redis_poll).await;
    };

    // Then the group's committed lag, as Kafka reports it (auto-commit runs
    // every second, and GetProgress' poller every second).
    let t_lag0 = loop {
        let lag = progress
            .get_progress(GetProgressRequest::default())
            .await
            .ok()
            .and_then(|r| r.into_inner().snapshot)
            .and_then(|s| s.totals)
            .map(|t| t.total_lag);
        if lag == Some(0) {
            break Some(start.elapsed());
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(a.progress_poll).await;
    };
    let first = t_first.unwrap_or(t_applied);
    let applying = (t_applied - first).as_secs_f64();
    Ok(json!({
        "tool": "loadgen",
        "mode": "catchup",
        "label": a.label,
        "events": events,
        "ready": ready,
        "t_serving_s": t_serving.as_secs_f64(),
        "t_first_applied_s": first.as_secs_f64(),
        "t_applied_s": t_applied.as_secs_f64(),
        "t_lag0_s": t_lag0.map(|t| t.as_secs_f64()),
        // From the first applied batch to the last: the projector's own pace.
        "rate_applying": if applying > 0.0 { events as f64 / applying } else { 0.0 },
        // From the start of the service (this tool starts beside it) to all applied.
        "rate_from_start": events as f64 / t_applied.as_secs_f64().max(1e-9),
        "samples": samples,
        "failed": t_lag0.is_none(),
    }))
}

// ------------------------------------------------------------------ redis-get

enum RedisClient {
    Pool(bb8::Pool<bb8_redis::RedisConnectionManager>),
    Mux(redis::aio::MultiplexedConnection),
}

impl RedisClient {
    async fn get(&self, key: &str) -> redis::RedisResult<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        match self {
            RedisClient::Pool(p) => {
                let mut c = p.get().await.map_err(|e| match e {
                    bb8::RunError::User(e) => e,
                    bb8::RunError::TimedOut => {
                        redis::RedisError::from((redis::ErrorKind::Io, "pool timed out"))
                    }
                })?;
                cmd.query_async(&mut *c).await
            }
            RedisClient::Mux(m) => cmd.query_async(&mut m.clone()).await,
        }
    }
}

async fn redis_get(a: RedisGetArgs) -> anyhow::Result<Value> {
    let client = match a.client {
        RedisClientKind::Multiplexed => RedisClient::Mux(
            redis::Client::open(a.redis_url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        kind => RedisClient::Pool(
            bb8::Pool::builder()
                .max_size(a.pool_size)
                .test_on_check_out(kind == RedisClientKind::Pool)
                .connection_timeout(Duration::from_secs(2))
                .build(bb8_redis::RedisConnectionManager::new(
                    a.redis_url.as_str(),
                )?)
                .await?,
        ),
    };
    let client = Arc::new(client);
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Latencies::new();
    let cpu0 = self_cpu_seconds();
    let start = Instant::now();
    let deadline = start + a.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..a.concurrency.max(1) {
        let (client, next, max, keys) = (client.clone(), next.clone(), a.max_requests, a.keys);
        let latencies = latencies.clone();
        workers.spawn(async move {
            let (mut calls, mut errors) = (0u64, 0u64);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= max || Instant::now() >= deadline {
                    break;
                }
                let key = format!("key:{:012}", rand::random_range(0..keys.max(1)));
                let t0 = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(3), client.get(&key)).await;
                latencies.record(w, t0.elapsed());
                calls += 1;
                if !matches!(r, Ok(Ok(_))) {
                    errors += 1;
                }
            }
            (calls, errors)
        });
    }
    let (mut count, mut errors) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (c, e) = r?;
        count += c;
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "tool": "loadgen",
        "mode": "redis-get",
        "label": a.label,
        "client": match a.client {
            RedisClientKind::Pool => "bb8 pool (PING on checkout)",
            RedisClientKind::PoolNoCheck => "bb8 pool (no checkout PING)",
            RedisClientKind::Multiplexed => "one multiplexed connection",
        },
        "concurrency": a.concurrency,
        "count": count,
        "ok": count - errors,
        "errors": if errors > 0 { json!({"error": errors}) } else { json!({}) },
        "elapsed_s": elapsed,
        "rps": count as f64 / elapsed.max(1e-9),
        "latency_ms": latency_json(&latencies.merged()),
        "client_cpu_s": self_cpu_seconds() - cpu0,
        "failed": count == errors,
    }))
}

// ------------------------------------------------------------------ cleanup

/// The shortest `--prefix` cleanup accepts: a run's own prefix, not a
/// pattern that many names share.
const CLEANUP_MIN_PREFIX: usize = 8;

async fn cleanup(a: CleanupArgs) -> anyhow::Result<Value> {
    let topics: Vec<&str> = a
        .topics
        .iter()
        .map(String::as_str)
        .filter(|t| !t.is_empty())
        .collect();
    let groups: Vec<&str> = a
        .groups
        .iter()
        .map(String::as_str)
        .filter(|g| !g.is_empty())
        .collect();
    anyhow::ensure!(
        a.prefix.chars().count() >= CLEANUP_MIN_PREFIX,
        "cleanup: --prefix {:?} is shorter than {CLEANUP_MIN_PREFIX} characters",
        a.prefix
    );
    let strangers: Vec<&str> = topics
        .iter()
        .chain(&groups)
        .copied()
        .filter(|n| !n.starts_with(&a.prefix))
        .collect();
    anyhow::ensure!(
        strangers.is_empty(),
        "cleanup: refusing to delete anything: {strangers:?} do not start with --prefix {:?}",
        a.prefix
    );
    let mut out = serde_json::Map::new();
    out.insert("tool".into(), json!("loadgen"));
    out.insert("mode".into(), json!("cleanup"));
    if !a.delete {
        out.insert("dry_run".into(), json!(true));
        out.insert("would_delete_topics".into(), json!(topics));
        out.insert("would_delete_groups".into(), json!(groups));
        return Ok(Value::Object(out));
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    if !topics.is_empty() {
        let r = admin.delete_topics(&topics, &opts).await?;
        let res: Vec<String> = r
            .iter()
            .map(|x| match x {
                Ok(t) => format!("{t}: deleted"),
                Err((t, c)) => format!("{t}: {c}"),
            })
            .collect();
        out.insert("topics".into(), json!(res));
    }
    if !groups.is_empty() {
        let r = admin.delete_groups(&groups, &opts).await?;
        let res: Vec<String> = r
            .iter()
            .map(|x| match x {
                Ok(g) => format!("{g}: deleted"),
                Err((g, c)) => format!("{g}: {c}"),
            })
            .collect();
        out.insert("groups".into(), json!(res));
    }
    Ok(Value::Object(out))
}
