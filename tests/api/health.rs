//! `grpc.health.v1` follows the dependencies, and the spec for unknown names.

use crate::helpers::{
    OwnRedis, free_port, producer, publish_user_created, spawn_app, spawn_app_with, test_config,
};
use futures::StreamExt;
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use user_service::store::RedisClientKind;

#[tokio::test]
async fn health_follows_redis_and_nothing_is_lost_while_it_is_down() {
    redis_outage(RedisClientKind::Pool).await;
}

#[tokio::test]
async fn the_shared_redis_connection_recovers_too() {
    redis_outage(RedisClientKind::Shared).await;
}

async fn redis_outage(kind: RedisClientKind) {
    let mut redis = OwnRedis::start();
    let mut config = test_config();
    config.redis_client = kind;
    config.redis_server_url = redis.url();
    config.redis_timeout = Duration::from_millis(500);
    let app = spawn_app_with(config).await;
    app.wait_health(ServingStatus::Serving).await;
    assert_eq!(
        app.health_status("user.v1.UserService").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        app.health_status("user.v1.ProjectionService")
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    app.wait_assigned().await;

    let mut watch = app
        .health
        .clone()
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    redis.stop();
    // The watcher hears it, and so does Check.
    let next = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert_eq!(
        app.health_status("").await.unwrap(),
        ServingStatus::NotServing
    );
    // Calls that need Redis say UNAVAILABLE, not INTERNAL.
    let err = app.create("Ada", "ada@example.com").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = app
        .get_at(1, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // Events that arrive meanwhile wait for Redis: not committed, not lost.
    let p = producer();
    let mut positions = Vec::new();
    for id in 1..=6 {
        let pos = publish_user_created(&p, &app.config.topic, id, &format!("offline {id}")).await;
        positions.push((id, pos));
    }
    crate::helpers::wait_until(Duration::from_secs(30), || async {
        app.stats().apply_failures > 0
    })
    .await
    .expect("the projector tried and backed off");

    redis.restart();
    let next = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::Serving);
    for (id, pos) in positions {
        let u = app
            .get_at(id, Some(pos), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(u.name, format!("offline {id}"));
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_absent_broker_means_unavailable_after_a_bounded_time() {
    let mut config = test_config();
    config.kafka_broker_url = format!("127.0.0.1:{}", free_port());
    config.publish_timeout = Duration::from_secs(1);
    config.projector_enabled = false;
    let app = spawn_app_with(config).await;
    let err = app.create("Ada", "ada@example.com").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Creates need Kafka; reads need only Redis, so the instance serves on.
    assert_eq!(
        app.health_status(user_service::startup::KAFKA_HEALTH_NAME)
            .await
            .unwrap(),
        ServingStatus::NotServing
    );
    // The id it reserved was given back: a retry can succeed once Kafka is back.
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_services_follow_the_health_spec() {
    let app = spawn_app().await;
    let err = app.health_status("no.such.Service").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let mut watch = app
        .health
        .clone()
        .watch(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect("Watch on an unknown service is not an error")
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    // And the stream stays open (until shutdown ends it).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err()
    );
    app.stop()
        .await
        .expect("an open Watch does not hold shutdown");
    assert!(
        watch.next().await.is_none_or(|r| r.is_err()),
        "the stream ended at shutdown"
    );
}

#[tokio::test]
async fn the_projector_reports_its_group_membership() {
    let app = spawn_app().await;
    crate::helpers::wait_until(Duration::from_secs(30), || async {
        app.health_status("projector").await.ok() == Some(ServingStatus::Serving)
    })
    .await
    .expect("the projector's health turned SERVING once it joined its group");
    assert!(app.stats().in_group);
    app.stop().await.expect("clean stop");

    // Without a projector, the name is not registered.
    let mut config = test_config();
    config.projector_enabled = false;
    let app = spawn_app_with(config).await;
    let err = app.health_status("projector").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    app.stop().await.expect("clean stop");
}
