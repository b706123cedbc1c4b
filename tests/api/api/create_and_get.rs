//! The CQRS round trip: CreateUser publishes, the projector applies, GetUser reads.

use crate::helpers::{kafka_link, raw_hget, spawn_app};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
};
use std::time::Duration;
use tonic::Code;
use user_service::proto::user::v1::{CreateUserRequest, Position};

#[tokio::test]
async fn created_user_is_readable_with_and_without_the_position() {
    let app = spawn_app().await;
    let created = app
        .create("Ada Lovelace", "ada@example.com")
        .await
        .expect("created");
    let user = created.user.clone().unwrap();
    let pos = created.position.unwrap();
    assert!(user.id > 0);
    assert_eq!(user.name, "Ada Lovelace");
    assert!(user.create_time.is_some());

    // Read-your-write: waits until the projector applied the event.
    let got = app
        .get_at(user.id, Some(pos), Duration::from_secs(20))
        .await
        .expect("found");
    assert_eq!(got, user);
    // Without the token, once applied, the same.
    let got = app
        .get_at(user.id, None, Duration::from_secs(5))
        .await
        .expect("found");
    assert_eq!(got, user);

    // The read model holds the user as field `<id>` of a bucket hash behind
    // its partition's hash tag, a JSON value without what the field and the
    // tag say (the id, the partition).
    let partition = created.position.unwrap().partition;
    let slot = user_service::store::Keys::new(&app.config.redis_key_prefix, &app.config.topic)
        .user(
            user_service::domain::UserId::parse(user.id).unwrap(),
            partition,
        );
    let tagged = format!(
        "{}{{{}:{partition}:",
        app.config.redis_key_prefix, app.config.topic
    );
    assert!(slot.key.starts_with(&tagged), "{slot:?}");
    assert!(slot.key.contains("}users:"), "{slot:?}");
    assert_eq!(slot.field, user.id.to_string());
    let raw = raw_hget(&app.config, &slot.key, &slot.field)
        .await
        .expect("the user's field");
    // One-letter names: the value holds little more than the user's bytes.
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(json["n"], "Ada Lovelace");
    assert_eq!(json["e"], "ada@example.com");
    assert_eq!(json["o"], pos.offset);
    assert!(
        json.get("id").is_none() && json.get("partition").is_none(),
        "{json}"
    );

    // The event on the topic: keyed by the id, on Java's murmur2 partition,
    // JSON with a schema version.
    let c: StreamConsumer = kafka_link()
        .client_config()
        .set("group.id", crate::helpers::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&app.config.topic]).unwrap();
    let m = crate::helpers::first_user_event(&c).await;
    assert_eq!(m.key(), Some(user.id.to_string().as_bytes()));
    assert_eq!((m.partition(), m.offset()), (pos.partition, pos.offset));
    assert_eq!(
        m.partition(),
        user_service::domain::partition_map::partition_for_key(user.id.to_string().as_bytes(), 3)
    );
    let event: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
    assert_eq!(event["schema_version"], 1);
    assert_eq!(event["type"], "UserCreated");
    assert_eq!(event["name"], "Ada Lovelace");
    // The article's fields with the article's types, so its Go consumer
    // reads the user whole: `create_time` in RFC 3339 (UTC), the same
    // instant as `created_at_ms` and as the answer's.
    let t = user.create_time.unwrap();
    let ms = t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
    assert_eq!(event["created_at_ms"], ms);
    let create_time = event["create_time"].as_str().expect("create_time");
    assert_eq!(
        Some(create_time.to_owned()),
        user_service::domain::go_time(ms)
    );
    assert!(create_time.ends_with('Z'), "{create_time}");
    assert_eq!(event["id"], user.id);
    assert_eq!(event["email"], "ada@example.com");

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_user_is_not_found_and_an_unapplied_position_times_out() {
    let app = spawn_app().await;
    // Until a projector has resumed the partition, the read model cannot
    // vouch that a user is absent.
    let err = app
        .get_at(987_654_321, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::NotFound),
        "{err:?}"
    );
    app.wait_opened().await;
    let err = app
        .get_at(987_654_321, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A position the log has not reached: refused at once (no wait would
    // see it applied).
    let far = Position {
        partition: 0,
        offset: 1_000_000_000,
    };
    let err = app
        .get_at(1, Some(far), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn client_chosen_id_is_kept_and_cannot_be_taken_twice() {
    let app = spawn_app().await;
    let id = 4_242_424_242;
    let created = app
        .create_req(CreateUserRequest {
            id: Some(id),
            name: "Grace".into(),
            email: "grace@example.com".into(),
            ..Default::default()
        })
        .await
        .expect("created");
    assert_eq!(created.user.as_ref().unwrap().id, id);
    let err = app
        .create_req(CreateUserRequest {
            id: Some(id),
            name: "Mallory".into(),
            email: "m@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let got = app
        .get_at(id, created.position, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(got.name, "Grace");

    // Service-assigned ids never collide with it either.
    for _ in 0..5 {
        let u = app
            .create("Anon", "anon@example.com")
            .await
            .unwrap()
            .user
            .unwrap();
        assert_ne!(u.id, id);
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_owning_projector_hands_over_the_verdict_without_a_poll_or_a_read_back() {
    let app = crate::helpers::spawn_app().await;
    app.wait_opened().await;
    let polls = app.handle.checkpoint_watch.polls();
    for k in 0..30 {
        let r = app
            .create_req(user_service::proto::user::v1::CreateUserRequest {
                id: None,
                name: format!("verdict {k}"),
                email: format!("v{k}@example.com"),
                request_id: format!("verdict-{k}"),
            })
            .await
            .unwrap();
        let user = r.user.unwrap();
        // The answer is the log's: the same user reads back at its position.
        assert_eq!(
            app.get_at(user.id, r.position, Duration::from_secs(5))
                .await
                .unwrap(),
            user
        );
    }
    assert_eq!(
        app.handle.checkpoint_watch.polls(),
        polls,
        "creates whose partition this instance's projector owns never wait on the poller"
    );
    app.stop().await.expect("clean stop");
}
