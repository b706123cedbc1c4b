//! Retries are exact: a request id always names the same user, also when the
//! first attempt's outcome was unknown; of concurrent creates of one id, the
//! log decides which one created it, and every caller learns that verdict.

use crate::helpers::{producer, spawn_app, spawn_app_with};
use rdkafka::producer::FutureRecord;
use std::time::Duration;
use tonic::Code;
use user_service::{
    domain::{Email, RequestId, User as DomainUser, UserCreated, UserName, ids},
    proto::user::v1::{CreateUserRequest, Position},
};

/// User events in the topic (the partition map's record left out).
fn log_size(topic: &str, _partitions: i32) -> i64 {
    crate::helpers::read_log(topic).len() as i64
}

#[tokio::test]
async fn a_retried_request_id_gets_the_same_answer_and_one_event() {
    let app = spawn_app().await;
    let req = CreateUserRequest {
        id: None,
        name: "Ada".into(),
        email: "ada@example.com".into(),
        request_id: "retry-me-1".into(),
    };
    let first = app.create_req(req.clone()).await.unwrap();
    let second = app.create_req(req.clone()).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(log_size(&app.config.topic, 3), 1, "one event for two calls");

    // The same key with other fields is a client bug, not a retry.
    let err = app
        .create_req(CreateUserRequest {
            email: "eve@example.com".into(),
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // And so is the same key with a client-chosen id.
    let err = app
        .create_req(CreateUserRequest { id: Some(5), ..req })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(log_size(&app.config.topic, 3), 1);
    app.stop().await.expect("clean stop");
}

/// A publish whose acknowledgement was lost (a timeout): the event is in the
/// log, the caller got UNAVAILABLE and retries with its request id. The retry
/// must name the same user, not leave a second one under another id.
#[tokio::test]
async fn a_retry_after_an_unknown_outcome_finds_the_first_event() {
    let app = spawn_app().await;
    let request_id = RequestId::parse("ambiguous-1").unwrap().unwrap();
    let id = ids::assigned_id(&request_id, 0);
    // A second ago.
    let first_attempt_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 1000;
    let event = UserCreated::new(
        DomainUser {
            id,
            name: UserName::parse("Ada").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: first_attempt_ms,
        },
        Some(request_id),
    );
    let delivery = producer()
        .send(
            FutureRecord::to(&app.config.topic)
                .key(&event.key())
                .payload(&event.to_json()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let (partition, offset) = (delivery.partition, delivery.offset);

    let retry = app
        .create_req(CreateUserRequest {
            id: None,
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: "ambiguous-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(retry.user.as_ref().unwrap().id, id.get());
    assert_eq!(retry.position, Some(Position { partition, offset }));
    assert_eq!(
        retry.user.unwrap().create_time.unwrap().seconds,
        first_attempt_ms / 1000,
        "the first event's user, not a new one"
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn concurrent_creates_of_one_id_on_two_instances_let_exactly_one_win() {
    let a = spawn_app().await;
    let mut config = a.config.clone();
    config.projector_enabled = false;
    let b = spawn_app_with(config).await;

    for round in 0..20 {
        let id = 7_000_000 + round;
        let req = |name: &str| CreateUserRequest {
            id: Some(id),
            name: name.into(),
            email: "x@example.com".into(),
            ..Default::default()
        };
        let (ra, rb) = tokio::join!(a.create_req(req("from-a")), b.create_req(req("from-b")));
        let (won, lost) = match (ra, rb) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        assert_eq!(lost.code(), Code::AlreadyExists, "round {round}");
        // The winner is the user the read model (the log's first event) holds.
        let got = a
            .users
            .clone()
            .get_user(user_service::proto::user::v1::GetUserRequest {
                id,
                min_position: won.position,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.user, won.user, "round {round}");
        assert_eq!(got.position, won.position, "round {round}");
    }
    b.stop().await.expect("clean stop");
    a.stop().await.expect("clean stop");
}

fn ids_of(id: i64) -> user_service::domain::UserId {
    user_service::domain::UserId::parse(id).unwrap()
}

/// A request whose id the service derived needs no index entry (the request
/// id names the user), so the clients' default creates cost Redis only the
/// user; one with a client-chosen id is indexed, and a request id first used
/// without an id is still refused with one.
#[tokio::test]
async fn only_client_chosen_ids_are_indexed_by_request_id() {
    let app = spawn_app().await;
    let derived = app
        .create_req(CreateUserRequest {
            id: None,
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: "index-derived".into(),
        })
        .await
        .unwrap();
    let chosen = app
        .create_req(CreateUserRequest {
            id: Some(77),
            name: "Bob".into(),
            email: "bob@example.com".into(),
            request_id: "index-chosen".into(),
        })
        .await
        .unwrap();
    let store = crate::helpers::test_store(&app.config);
    let owner = |r: &str| RequestId::parse(r).unwrap().unwrap();
    crate::helpers::wait_until(Duration::from_secs(10), || async {
        store.request_owner(&owner("index-chosen")).await.unwrap() == Some(ids_of(77))
    })
    .await
    .expect("the client-chosen id is indexed");
    assert_eq!(
        store.request_owner(&owner("index-derived")).await.unwrap(),
        None,
        "a derived id needs no index"
    );
    // The guard still holds: the derived request again with an id is refused.
    let err = app
        .create_req(CreateUserRequest {
            id: Some(78),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: "index-derived".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        derived.user.unwrap().id,
        ids::assigned_id(&RequestId::parse("index-derived").unwrap().unwrap(), 0).get()
    );
    assert_eq!(chosen.user.unwrap().id, 77);
    app.stop().await.expect("clean stop");
}

/// Client-chosen ids may be any positive id, the service's own range
/// included: when the eight ids a request id derives are all taken that
/// way, a create with that request id and no id answers ABORTED (retry with
/// a new request id), not INTERNAL, which is kept for bugs.
#[tokio::test]
async fn a_request_id_whose_derived_ids_are_all_taken_is_aborted() {
    let app = spawn_app().await;
    let request_id = crate::helpers::unique("crowded");
    let parsed = RequestId::parse(&request_id).unwrap().unwrap();
    for attempt in 0..8 {
        let id = ids::assigned_id(&parsed, attempt).get();
        app.create_req(CreateUserRequest {
            id: Some(id),
            name: "Squatter".into(),
            email: "squatter@example.com".into(),
            request_id: crate::helpers::unique("squat"),
        })
        .await
        .unwrap_or_else(|s| panic!("client-chosen id {id}: {s:?}"));
    }
    let crowded = CreateUserRequest {
        id: None,
        name: "Ada".into(),
        email: "ada@example.com".into(),
        request_id,
    };
    let refused = app
        .create_req(crowded.clone())
        .await
        .expect_err("every id of this request id is taken");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("new request_id"),
        "the message says what to do: {refused:?}"
    );
    let retried = app
        .create_req(CreateUserRequest {
            request_id: crate::helpers::unique("fresh"),
            ..crowded
        })
        .await
        .expect("a new request id gets a user");
    assert!(retried.user.is_some());
    app.stop().await.expect("clean stop");
}
