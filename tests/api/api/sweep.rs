//! Every field of every request at its extremes, on an instance with each
//! dependency down in turn (issue 25's sweep): every answer comes within the
//! service's own bound with a documented code, and across 10,000 such calls
//! memory, threads and metric series stay bounded; the instance then stops
//! cleanly. The figures are in the README's Errors section.

use crate::helpers::{BrokerGate, OwnRedis, free_port, scrape_at, test_config, wait_until};
use futures::StreamExt;
use std::{collections::BTreeMap, process::Stdio, time::Duration};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::proto::user::v1::{
    CreateUserRequest, GetProgressRequest, GetUserRequest, Position, WatchProgressRequest,
    projection_service_client::ProjectionServiceClient, user_service_client::UserServiceClient,
};

/// The service as a process of its own, so its memory and threads are its
/// own, and SIGTERM is real.
struct Service {
    /// Killed on drop, so a failed assertion leaves no process behind.
    child: Option<std::process::Child>,
    users: UserServiceClient<Channel>,
    progress: ProjectionServiceClient<Channel>,
    metrics: std::net::SocketAddr,
    group: String,
    topic: String,
}

/// The codes the README documents; anything else (INTERNAL, UNKNOWN, a
/// CANCELLED from the service's own cut-off) fails the sweep.
const DOCUMENTED: [Code; 10] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::OutOfRange,
    Code::ResourceExhausted,
    Code::PermissionDenied,
    Code::FailedPrecondition,
];

/// One request of the sweep.
#[derive(Debug, Clone)]
enum Call {
    Create(CreateUserRequest),
    Get(GetUserRequest),
    Progress(GetProgressRequest),
    Watch(WatchProgressRequest),
}

fn calls(own_group: &str, own_topic: &str) -> Vec<Call> {
    let base = CreateUserRequest {
        id: None,
        name: "Ada".into(),
        email: "ada@example.com".into(),
        request_id: String::new(),
    };
    let mut out = Vec::new();
    for id in [
        None,
        Some(0),
        Some(-1),
        Some(1),
        Some(i64::MAX),
        Some(i64::MIN),
    ] {
        out.push(Call::Create(CreateUserRequest { id, ..base.clone() }));
    }
    for name in [
        String::new(),
        " ".into(),
        "a".repeat(128),
        "a".repeat(129),
        "é".repeat(128),
        "\u{0}x".into(),
    ] {
        out.push(Call::Create(CreateUserRequest {
            name,
            ..base.clone()
        }));
    }
    for email in [
        String::new(),
        "no-at".into(),
        format!("{}@example.com", "x".repeat(64)),
        format!("{}@example.com", "x".repeat(65)),
        format!("a@{}.example", "d".repeat(250)),
    ] {
        out.push(Call::Create(CreateUserRequest {
            email,
            ..base.clone()
        }));
    }
    for request_id in [
        "r".to_owned(),
        "r".repeat(128),
        "r".repeat(129),
        "with space".into(),
        "\u{7f}".into(),
    ] {
        out.push(Call::Create(CreateUserRequest {
            request_id,
            ..base.clone()
        }));
    }
    for id in [0, -1, 1, i64::MAX, i64::MIN] {
        for position in [
            None,
            Some((-1, 0)),
            Some((0, -1)),
            Some((0, 0)),
            Some((0, i64::MAX)),
            Some((i32::MAX, 0)),
            Some((i32::MIN, i64::MIN)),
            Some((2, 1)),
        ] {
            out.push(Call::Get(GetUserRequest {
                id,
                min_position: position.map(|(partition, offset)| Position { partition, offset }),
            }));
        }
    }
    let long = "g".repeat(60_000);
    for (group, topic) in [
        ("", ""),
        (own_group, own_topic),
        ("other", ""),
        ("", "other"),
        (long.as_str(), ""),
    ] {
        for partitions in [vec![], vec![-1], vec![i32::MAX], (0..1000).collect()] {
            out.push(Call::Progress(GetProgressRequest {
                group: group.into(),
                topic: topic.into(),
                partitions: partitions.clone(),
            }));
        }
    }
    for interval in [
        None,
        Some((0, 0)),
        Some((0, 1)),
        Some((0, 99_000_000)),
        Some((3600, 0)),
        Some((3601, 0)),
        Some((-1, 0)),
        Some((i64::MAX, 999_999_999)),
    ] {
        out.push(Call::Watch(WatchProgressRequest {
            group: String::new(),
            topic: String::new(),
            partitions: vec![],
            interval: interval.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        }));
    }
    out
}

/// Sends one call; its code (a stream: its first answer's).
async fn send(app: &Service, call: Call) -> Code {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match call {
        Call::Create(r) => code(app.users.clone().create_user(r).await.map(drop)),
        Call::Get(r) => code(app.users.clone().get_user(r).await.map(drop)),
        Call::Progress(r) => code(app.progress.clone().get_progress(r).await.map(drop)),
        Call::Watch(r) => match app.progress.clone().watch_progress(r).await {
            Err(s) => s.code(),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                match stream.next().await {
                    Some(Err(s)) => s.code(),
                    _ => Code::Ok,
                }
            }
        },
    }
}

/// Runs `n` calls (the sweep's, round and round), 100 at a time; every one
/// answers within `bound` with a documented code. Returns the count by code.
async fn sweep(app: &Service, n: usize, bound: Duration) -> BTreeMap<String, usize> {
    let all = calls(&app.group, &app.topic);
    let answers: Vec<(String, Code, Duration)> = futures::stream::iter((0..n).map(|i| {
        let call = all[i % all.len()].clone();
        async move {
            let began = std::time::Instant::now();
            let label = format!("{call:?}").chars().take(160).collect::<String>();
            let code = tokio::time::timeout(bound * 2, send(app, call))
                .await
                .unwrap_or(Code::Unknown);
            (label, code, began.elapsed())
        }
    }))
    .buffer_unordered(100)
    .collect()
    .await;
    let mut by_code = BTreeMap::new();
    for (label, code, took) in answers {
        assert!(
            DOCUMENTED.contains(&code),
            "{label}: undocumented code {code:?}"
        );
        assert!(
            took <= bound,
            "{label}: answered after {took:?} (bound {bound:?})"
        );
        *by_code.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    by_code
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A field of /proc/<pid>/status, as a number (kB for sizes).
fn status(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The metric series the endpoint shows (sample lines).
async fn series(app: &Service) -> usize {
    scrape_at(app.metrics)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

const MAX_POSITION_WAIT: Duration = Duration::from_secs(1);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

async fn start(kafka: &str, redis: &OwnRedis) -> Service {
    let config = test_config();
    let (port, metrics_port) = (free_port(), free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("KAFKA_BROKER_URL", kafka)
        .env("REDIS_SERVER_URL", redis.url())
        .env("KAFKA_TOPIC", &config.topic)
        .env("KAFKA_CONSUMER_GROUP", &config.consumer_group)
        .env("REDIS_KEY_PREFIX", &config.redis_key_prefix)
        .env("KAFKA_TOPIC_PARTITIONS", "3")
        .env("MAX_POSITION_WAIT", "1s")
        .env("KAFKA_PUBLISH_TIMEOUT", "1s")
        .env("REDIS_TIMEOUT", "300ms")
        .env("DRAIN_GRACE", "0s")
        .env("RUST_LOG", "error")
        // The test's own plain Redis, whatever the suite's pass uses.
        .env_remove("REDIS_CLUSTER_URLS")
        .env_remove("REDIS_SENTINEL_URLS")
        .env_remove("REDIS_USERNAME")
        .env_remove("REDIS_PASSWORD")
        .env_remove("REDIS_PASSWORD_FILE")
        .env_remove("REDIS_TLS_CA_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the service binary starts");
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    // Up: its health service answers (whatever it says).
    let health = HealthClient::new(channel.clone());
    wait_until(Duration::from_secs(60), || {
        let mut health = health.clone();
        async move { health.check(HealthCheckRequest::default()).await.is_ok() }
    })
    .await
    .expect("the service answers");
    Service {
        child: Some(child),
        users: UserServiceClient::new(channel.clone()),
        progress: ProjectionServiceClient::new(channel),
        metrics: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
        group: config.consumer_group,
        topic: config.topic,
    }
}

#[tokio::test]
async fn every_field_at_its_extremes_with_each_dependency_down() {
    // The service's own bound on any unary call (Config::call_timeout), and
    // a second of slack for a loaded host.
    let bound = MAX_POSITION_WAIT + PUBLISH_TIMEOUT + Duration::from_secs(3);
    for state in ["no broker yet", "Redis down", "both down"] {
        let gate = BrokerGate::closed();
        let mut redis = OwnRedis::start();
        let kafka = if state == "Redis down" {
            test_config().kafka_broker_url
        } else {
            gate.addr()
        };
        if state != "no broker yet" {
            redis.stop();
        }
        let mut app = start(&kafka, &redis).await;
        let pid = app.child.as_ref().expect("running").id();
        // One pass makes every (method, code) series there is to make.
        let first = sweep(&app, calls("", "").len(), bound).await;
        let (threads_before, rss_before, series_before) = (
            status(pid, "Threads:"),
            status(pid, "VmRSS:"),
            series(&app).await,
        );
        let by_code = sweep(&app, 10_000, bound).await;
        let (threads_after, rss_after, series_after) = (
            status(pid, "Threads:"),
            status(pid, "VmRSS:"),
            series(&app).await,
        );
        println!(
            "sweep, {state}: first pass {first:?}; 10,000 calls {by_code:?}; threads \
             {threads_before} -> {threads_after}; RSS {rss_before} -> {rss_after} KiB; \
             metric series {series_before} -> {series_after}"
        );
        assert!(
            threads_after <= threads_before + 16,
            "{state}: threads {threads_before} -> {threads_after}"
        );
        assert!(
            rss_after <= rss_before + 64 * 1024,
            "{state}: RSS {rss_before} -> {rss_after} KiB"
        );
        assert!(
            series_after <= series_before + 40,
            "{state}: metric series {series_before} -> {series_after}"
        );
        // SIGTERM: a clean stop, exit 0.
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let mut child = app.child.take().expect("running");
        let exit = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        .unwrap_or_else(|_| panic!("{state}: no exit within 60 s of SIGTERM"))
        .unwrap()
        .unwrap();
        assert!(exit.success(), "{state}: exited with {exit}");
        drop(redis);
    }
}
