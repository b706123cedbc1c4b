//! The in-process user cache: users the log decided are answered from
//! memory (so a Redis outage does not hide them), an unknown id never is, and
//! a position the cached user does not cover is waited for or refused just
//! as without the cache.

use crate::helpers::{OwnRedis, samples, scrape, spawn_app_with, sum_of, test_config};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::proto::user::v1::Position;

async fn created_then_redis_gone(cache_bytes: u64) -> (crate::helpers::TestApp, OwnRedis, i64) {
    let redis = OwnRedis::start();
    let mut config = test_config();
    redis.use_in(&mut config);
    config.redis_timeout = Duration::from_millis(300);
    config.user_cache_bytes = cache_bytes;
    let app = spawn_app_with(config).await;
    app.wait_health(ServingStatus::Serving).await;
    let created = app
        .create("Cached Once", "cached@example.com")
        .await
        .expect("created");
    let user = created.user.unwrap();
    assert_eq!(
        app.get_at(user.id, created.position, Duration::from_secs(10))
            .await
            .unwrap(),
        user
    );
    (app, redis, user.id)
}

#[tokio::test]
async fn a_decided_user_is_served_from_memory_while_redis_is_away() {
    let (app, mut redis, id) = created_then_redis_gone(1 << 20).await;
    redis.stop();
    app.wait_health(ServingStatus::NotServing).await;

    // The user the create decided: answered, with its creating position.
    let got = app
        .get_at(id, None, Duration::from_secs(5))
        .await
        .expect("a cached user needs no Redis");
    assert_eq!(got.id, id);
    // An id nobody created is never answered from memory: Redis must say.
    let unknown = app
        .get_at(id + 1, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown:?}");
    // A position the cached user's event does not cover still goes through
    // the log: one past the log end of another partition than the user's
    // (whose own would be read first, from the absent Redis) is refused at
    // once, cache or not.
    let partitions = app.config.topic_partitions;
    let own = user_service::domain::partition_map::user_partition(
        user_service::domain::UserId::parse(id).unwrap(),
        partitions,
    );
    let far = app
        .get_at(
            id,
            Some(Position {
                partition: (own + 1) % partitions,
                offset: 1_000_000,
            }),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert_eq!(far.code(), Code::OutOfRange, "{far:?}");

    let s = samples(&scrape(&app).await);
    assert!(
        sum_of(
            &s,
            "user_service_user_cache_lookups_total",
            &["outcome=\"hit\""]
        ) >= 1.0,
        "the hit is counted"
    );
    assert_eq!(
        sum_of(&s, "user_service_user_cache_entries", &[]),
        1.0,
        "one user held"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn with_the_cache_off_every_read_asks_redis() {
    let (app, mut redis, id) = created_then_redis_gone(0).await;
    redis.stop();
    app.wait_health(ServingStatus::NotServing).await;
    let err = app
        .get_at(id, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    app.stop().await.unwrap();
}
