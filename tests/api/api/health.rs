//! `grpc.health.v1` follows the dependencies, and the spec for unknown names.

use crate::helpers::{
    BrokerGate, OwnRedis, kafka_link, log_end_offsets, producer, publish_user_created, read_log,
    spawn_app, spawn_app_with, test_config,
};
use futures::StreamExt;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use user_service::{
    domain::{RequestId, UserCreated, ids},
    kafka::ensure_topics,
    proto::user::v1::CreateUserRequest,
    startup::LIVENESS_HEALTH_NAME,
    store::RedisClientKind,
};

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
    redis.use_in(&mut config);
    config.redis_timeout = Duration::from_millis(500);
    let app = spawn_app_with(config).await;
    app.wait_health(ServingStatus::Serving).await;
    assert_eq!(
        app.health_status("user.v1.UserService").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        app.health_status(LIVENESS_HEALTH_NAME).await.unwrap(),
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
    // The liveness name follows no dependency: a probe on it never restarts
    // an instance for a Redis outage, which a restart cannot heal.
    assert_eq!(
        app.health_status(LIVENESS_HEALTH_NAME).await.unwrap(),
        ServingStatus::Serving,
        "liveness must not follow Redis"
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

/// A create while Kafka is absent answers UNAVAILABLE within the publish
/// timeout (plus the publisher's one-second guard), not whenever librdkafka
/// gives up; and since nothing is reserved before a publish, the retry with
/// the same request id once the broker is back names the same id: the one
/// derived from the request id, the only one the log holds for that request.
#[tokio::test]
async fn an_absent_broker_is_unavailable_within_the_publish_timeout_and_a_retry_gets_the_same_id() {
    let mut gate = BrokerGate::closed();
    let mut config = test_config();
    config.kafka_broker_url = gate.addr();
    config.publish_timeout = Duration::from_secs(1);
    // The topic exists (created through the real broker); the service
    // cannot reach it until the gate opens.
    ensure_topics(
        &kafka_link(),
        &[&config.topic],
        config.topic_partitions,
        1,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let app = spawn_app_with(config).await;
    let request = CreateUserRequest {
        name: "Ada".into(),
        email: "ada@example.com".into(),
        request_id: "absent-broker-1".into(),
        ..Default::default()
    };

    let started = Instant::now();
    let err = app.create_req(request.clone()).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The publish waits for librdkafka's message timeout (publish_timeout),
    // guarded by an outer timeout one second longer; one more second covers
    // the Redis reads before it on a busy machine. A correctness bound.
    let bound = app.config.publish_timeout + Duration::from_secs(2);
    assert!(
        took < bound,
        "UNAVAILABLE after {took:?}, more than the publish timeout {:?} allows ({bound:?})",
        app.config.publish_timeout
    );
    // Creates need Kafka; reads need only Redis, so the instance serves on.
    assert_eq!(
        app.health_status(user_service::startup::KAFKA_HEALTH_NAME)
            .await
            .unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        app.health_status(LIVENESS_HEALTH_NAME).await.unwrap(),
        ServingStatus::Serving,
        "liveness must not follow Kafka"
    );
    assert_eq!(
        log_end_offsets(&app.config.topic).values().sum::<i64>(),
        0,
        "nothing reached the log while the broker was absent"
    );

    // The broker comes back: the retry with the same request id succeeds
    // (after UNAVAILABLE answers while the producer and the projector
    // reconnect) and names the id derived from the request id.
    gate.open().await;
    let back = Instant::now();
    let mut retries = 0;
    let created = loop {
        retries += 1;
        match app.create_req(request.clone()).await {
            Ok(c) => break c,
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "retry {retries}: {e:?}"),
        }
        assert!(
            back.elapsed() < Duration::from_secs(90),
            "no retry succeeded in 90 s after the broker came back ({retries} tried)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let user = created.user.unwrap();
    let position = created.position.unwrap();
    let request_id = RequestId::parse(&request.request_id).unwrap().unwrap();
    assert_eq!(
        user.id,
        ids::assigned_id(&request_id, 0).get(),
        "the retry names the id derived from the request id"
    );

    // The log agrees: every event of this request (one per publish that
    // reached the broker) carries that id, and the first one is the answer.
    let events: Vec<_> = read_log(&app.config.topic)
        .into_iter()
        .map(|r| {
            let event = UserCreated::decode(r.key.as_deref(), r.payload.as_deref()).unwrap();
            (r.partition, r.offset, event)
        })
        .filter(|(_, _, e)| e.request_id.as_ref() == Some(&request_id))
        .collect();
    assert!(!events.is_empty(), "the retry's event is in the log");
    for (p, o, e) in &events {
        assert_eq!(e.user.id.get(), user.id, "event at {p}:{o}");
    }
    assert_eq!(
        (events[0].0, events[0].1),
        (position.partition, position.offset),
        "the answer is the first event of the request"
    );
    eprintln!(
        "UNAVAILABLE after {took:?}; {retries} call(s) until the retry succeeded; {} event(s) of the request in the log",
        events.len()
    );
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
