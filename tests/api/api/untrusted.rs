//! Every caller is untrusted: waits end at the service's bound whatever the
//! caller asks, N waiting calls cost what one does, calls past the budget are
//! refused at once, progress serves only the allowed groups, health says what
//! still works, and nothing runs that the service does not track.

use crate::helpers::*;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::{
    proto::user::v1::{
        CreateUserRequest, GetProgressRequest, GetUserRequest, Position, WatchProgressRequest,
    },
    startup::{Application, KAFKA_HEALTH_NAME, PROJECTION_SERVICE_NAME, USER_SERVICE_NAME},
};

/// A call that should end by itself, bounded so a regression fails the test
/// instead of hanging it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within 60 s"))
}

/// A GetUser waiting on `position` with a caller deadline of an hour.
async fn get_waiting(app: &TestApp, position: Position) -> Result<(), tonic::Status> {
    app.get_at(1, Some(position), Duration::from_secs(3600))
        .await
        .map(drop)
}

/// An instance without a projector, and a position in its log that nothing
/// will ever apply.
async fn app_with_a_position_that_never_comes(max_wait: Duration) -> (TestApp, Position) {
    let mut config = test_config();
    config.projector_enabled = false;
    config.max_position_wait = max_wait;
    let app = spawn_app_with(config).await;
    let position = publish_user_created(&producer(), &app.config.topic, 77, "Never").await;
    (app, position)
}

#[tokio::test]
async fn a_position_past_the_log_end_is_out_of_range_at_once() {
    let app = spawn_app().await;
    let created = app.create("Ada", "ada@example.com").await.expect("created");
    let at = created.position.expect("a position");
    let past = Position {
        partition: at.partition,
        offset: at.offset + 1_000_000,
    };
    let err = bounded("GetUser past the log end", get_waiting(&app, past))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("past the end"), "{}", err.message());
    // The position itself is in the log: answered.
    app.get_at(created.user.unwrap().id, Some(at), Duration::from_secs(20))
        .await
        .expect("the user at its own position");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn waits_end_at_the_service_bound_whatever_the_callers_deadline() {
    let (app, position) = app_with_a_position_that_never_comes(Duration::from_secs(1)).await;
    let err = bounded(
        "a wait with an hour's deadline",
        get_waiting(&app, position),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // A thousand such calls share one poller: Redis is polled no more often
    // than for one (the poller backs off while the checkpoints stand still).
    let polls_before = app.handle.checkpoint_watch.polls();
    let started = Instant::now();
    let calls = (0..1000).map(|_| get_waiting(&app, position));
    let results = bounded("1,000 waits", futures::future::join_all(calls)).await;
    let took = started.elapsed();
    let polls = app.handle.checkpoint_watch.polls() - polls_before;
    for r in &results {
        assert_eq!(r.as_ref().unwrap_err().code(), Code::DeadlineExceeded);
    }
    // At the longest interval (50 ms) plus the ramp up to it after a wake.
    let bound = (took.as_millis() / 50) as u64 + 10;
    assert!(
        polls <= bound,
        "{polls} polls of Redis in {took:?} for 1,000 waiting calls (one poller at most {bound})"
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn calls_past_the_budget_are_refused_at_once_and_health_still_answers() {
    let mut config = test_config();
    config.projector_enabled = false;
    config.max_position_wait = Duration::from_secs(3);
    config.max_concurrent_calls = 4;
    let app = spawn_app_with(config).await;
    let position = publish_user_created(&producer(), &app.config.topic, 78, "Never").await;

    let waits: Vec<_> = (0..4)
        .map(|_| {
            let users = app.users.clone();
            tokio::spawn(async move {
                users
                    .clone()
                    .get_user(GetUserRequest {
                        id: 1,
                        min_position: Some(position),
                    })
                    .await
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), || async {
        app.handle.calls.in_flight() == 4
    })
    .await
    .expect("four calls in flight");

    let err = app
        .get_at(1, None, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(app.handle.calls.refused(), 1);
    assert_eq!(
        app.health_status("")
            .await
            .expect("health is outside the budget"),
        ServingStatus::Serving
    );

    for w in waits {
        let r = bounded("a budgeted wait", w).await.unwrap();
        assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    }
    // The budget is back.
    let err = app
        .get_at(1, None, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::ResourceExhausted, "{err:?}");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn oversize_requests_are_refused_and_the_service_goes_on() {
    let app = spawn_app().await;
    let huge = "x".repeat(app.config.max_request_bytes + 1);
    let err = app
        .users
        .clone()
        .create_user(CreateUserRequest {
            name: huge,
            email: "big@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // gRPC's code for a message over the limit (not tonic's OUT_OF_RANGE).
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    app.create("Small", "small@example.com")
        .await
        .expect("a normal create after it");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn progress_serves_the_own_group_and_only_the_allowed_others() {
    let allowed_group = unique("allowed");
    let mut config = test_config();
    config.progress_allowed_groups = vec![allowed_group.clone()];
    let app = spawn_app_with(config).await;
    let mut progress = app.progress.clone();

    // The own group: served (Kafka may take a moment to describe a new group
    // while many tests run; this waits on the answer, not on time).
    wait_until(Duration::from_secs(30), || app.progress_answers())
        .await
        .expect("the own group's progress");
    let err = progress
        .get_progress(GetProgressRequest {
            group: unique("someone-else"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = progress
        .watch_progress(WatchProgressRequest {
            topic: "__consumer_offsets".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Allowed, but no such group: past the gate, answered by Kafka.
    let err = progress
        .get_progress(GetProgressRequest {
            group: allowed_group,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn every_progress_call_takes_a_watcher_slot() {
    let mut config = test_config();
    config.max_progress_watchers = 1;
    let app = spawn_app_with(config).await;
    let mut progress = app.progress.clone();

    let mut stream = progress
        .watch_progress(WatchProgressRequest::default())
        .await
        .expect("one watcher")
        .into_inner();
    stream.message().await.expect("a snapshot").expect("open");
    let err = progress
        .get_progress(GetProgressRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    drop(stream);
    wait_until(Duration::from_secs(10), || app.progress_answers())
        .await
        .expect("the slot is given back when the watcher leaves");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reads_are_served_while_kafka_is_away() {
    // One instance writes a user while Kafka is there.
    let app = spawn_app().await;
    let created = app.create("Ada", "ada@example.com").await.expect("created");
    let id = created.user.unwrap().id;
    app.get_at(id, created.position, Duration::from_secs(20))
        .await
        .expect("applied");
    let mut config = app.config.clone();
    app.stop().await.expect("clean stop");

    // Another starts against the same read model with no broker at all.
    config.kafka_broker_url = format!("127.0.0.1:{}", free_port());
    config.publish_timeout = Duration::from_secs(1);
    let app = spawn_app_with(config).await;
    wait_until(Duration::from_secs(30), || async {
        app.health_status(KAFKA_HEALTH_NAME).await.ok() == Some(ServingStatus::NotServing)
            && app.health_status(USER_SERVICE_NAME).await.ok() == Some(ServingStatus::Serving)
    })
    .await
    .expect("the user service serving, Kafka not");
    assert_eq!(
        app.health_status("").await.unwrap(),
        ServingStatus::Serving,
        "the instance still serves reads"
    );
    assert_eq!(
        app.health_status(PROJECTION_SERVICE_NAME).await.unwrap(),
        ServingStatus::NotServing,
        "progress is read from Kafka"
    );
    let got = app
        .get_at(id, None, Duration::from_secs(10))
        .await
        .expect("a stored user is served without Kafka");
    assert_eq!(got.name, "Ada");
    let err = app
        .create("Bob", "bob@example.com")
        .await
        .expect_err("no broker, no create");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_failed_bind_starts_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = test_config();
    config.listen_addr = taken.local_addr().unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let err = Application::build(config)
        .await
        .err()
        .expect("the port is taken");
    assert!(err.to_string().contains("cannot bind"), "{err}");
    assert_eq!(
        metrics.num_alive_tasks(),
        before,
        "tasks were left running after a failed start"
    );
}

/// The binary, run with fail points, for the tests that make it panic: a
/// panic must stop the process with a non-zero status, in its own process
/// since fail points are global.
#[cfg(feature = "failpoints")]
mod panics {
    use super::*;
    use std::process::{Command, Stdio};
    use tonic::transport::Channel;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use user_service::proto::user::v1::user_service_client::UserServiceClient;

    struct Service {
        child: std::process::Child,
        users: UserServiceClient<Channel>,
    }

    async fn start(failpoints: &str) -> Service {
        let config = test_config();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_user-service"))
            .env("FAILPOINTS", failpoints)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("KAFKA_BROKER_URL", &config.kafka_broker_url)
            .env("REDIS_SERVER_URL", &config.redis_server_url)
            .env("KAFKA_TOPIC", &config.topic)
            .env("KAFKA_CONSUMER_GROUP", &config.consumer_group)
            .env("REDIS_KEY_PREFIX", &config.redis_key_prefix)
            .env("DRAIN_GRACE", "0s")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the service binary starts");
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let health = HealthClient::new(channel.clone());
        wait_until(Duration::from_secs(60), || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: "projector".into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
            }
        })
        .await
        .expect("the service comes up with its projector in the group");
        Service {
            child,
            users: UserServiceClient::new(channel),
        }
    }

    impl Service {
        /// The exit status, waited for on a blocking thread.
        async fn exit(mut self) -> std::process::ExitStatus {
            bounded(
                "the process exit",
                tokio::task::spawn_blocking(move || self.child.wait()),
            )
            .await
            .unwrap()
            .unwrap()
        }
    }

    fn request() -> CreateUserRequest {
        CreateUserRequest {
            name: "Pan".into(),
            email: "pan@example.com".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_stops_the_process() {
        let service = start("create-user=panic").await;
        let err = service
            .users
            .clone()
            .create_user(request())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        let status = service.exit().await;
        assert!(!status.success(), "exited with {status}");
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_process() {
        let service = start("projector-apply=panic").await;
        // The create publishes; the projector panics applying it.
        let _ = service.users.clone().create_user(request()).await;
        let status = service.exit().await;
        assert!(!status.success(), "exited with {status}");
    }
}
