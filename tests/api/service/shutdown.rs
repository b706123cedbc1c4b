//! The real binary on SIGTERM: NOT_SERVING for the grace period, then it
//! drains, commits and exits 0.

use crate::helpers::{free_port, group_lag, kafka_brokers, redis_url, unique, wait_until};
use futures::StreamExt;
use std::{process::Stdio, time::Duration};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::proto::user::v1::{
    CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient,
};

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let name = unique("sigterm");
    let port = free_port();
    let (topic, group) = (format!("{name}-users"), format!("{name}-projector"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("KAFKA_BROKER_URL", kafka_brokers())
        .env("REDIS_SERVER_URL", redis_url())
        .env("KAFKA_TOPIC", &topic)
        .env("KAFKA_CONSUMER_GROUP", &group)
        .env("REDIS_KEY_PREFIX", format!("{name}:"))
        .env("DRAIN_GRACE", "1s")
        .env("HEALTH_PROBE_INTERVAL", "200ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");

    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    wait_until(Duration::from_secs(30), || async {
        endpoint.connect().await.is_ok()
    })
    .await
    .expect("the binary listens");
    let channel = endpoint.connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut users = UserServiceClient::new(channel);
    wait_until(Duration::from_secs(30), || {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status())
                .ok()
                == Some(ServingStatus::Serving)
        }
    })
    .await
    .expect("SERVING");

    let created = users
        .create_user(CreateUserRequest {
            name: "Ada".into(),
            email: "ada@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    // The sidecar sees NOT_SERVING while calls still work during the grace period.
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // So does the liveness name: draining is the one thing it follows.
    let liveness = health
        .clone()
        .check(HealthCheckRequest {
            service: user_service::startup::LIVENESS_HEALTH_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status(), ServingStatus::NotServing);
    let mut req = tonic::Request::new(GetUserRequest {
        id: created.user.as_ref().unwrap().id,
        min_position: created.position,
    });
    req.set_timeout(Duration::from_millis(900));
    let got = users
        .get_user(req)
        .await
        .expect("served during the grace period");
    assert_eq!(got.into_inner().user, created.user);

    // Then the stream ends and the process exits 0.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(_)) = watch.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the Watch stream ended");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        group_lag(&group, &topic, 3),
        0,
        "applied offsets committed before exit"
    );
}
