//! Retries with a request id answer the same and create nothing; ids are
//! unique across instances.

use crate::helpers::{inspector, spawn_app, spawn_app_with};
use rdkafka::consumer::Consumer;
use std::time::Duration;
use tonic::Code;
use user_service::proto::user::v1::CreateUserRequest;

fn log_size(topic: &str, partitions: i32) -> i64 {
    let c = inspector("log-size");
    (0..partitions)
        .map(|p| {
            let (low, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
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
            ..req
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(log_size(&app.config.topic, 3), 1);
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
        let oks = [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(oks, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = ra.err().or(rb.err()).unwrap();
        assert_eq!(loser.code(), Code::AlreadyExists);
    }
    assert_eq!(log_size(&a.config.topic, 3), 20, "one event per id");
    b.stop().await.expect("clean stop");
    a.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_request_id_whose_call_died_mid_way_is_usable_again() {
    use user_service::{
        cache::Reservation,
        domain::{NewUser, UserId},
    };
    let config = crate::helpers::test_config();
    let store = crate::helpers::test_store(&config);
    let id = UserId::parse(77).unwrap();
    let call =
        |request_id: &str| NewUser::parse(Some(77), "Ada", "ada@example.com", request_id).unwrap();
    let pending = Duration::from_secs(1);

    // A call reserves the id, then dies before publishing (no answer, no release).
    assert_eq!(
        store.reserve(&call("r1"), pending).await.unwrap(),
        Reservation::Reserved(id)
    );
    // Its retry, while the call could still be running, is told to wait.
    assert_eq!(
        store.reserve(&call("r1"), pending).await.unwrap(),
        Reservation::InProgress
    );
    // Another request for the same id finds it taken.
    assert_eq!(
        store.reserve(&call("r2"), pending).await.unwrap(),
        Reservation::Exists(id)
    );
    // Once the pending record has expired, the retry takes its id again...
    crate::helpers::wait_until(Duration::from_secs(10), || async {
        store.reserve(&call("r1"), pending).await.unwrap() == Reservation::Reserved(id)
    })
    .await
    .expect("the dead call's request id became usable again");
    // ...and nobody else can.
    assert_eq!(
        store.reserve(&call("r2"), pending).await.unwrap(),
        Reservation::Exists(id)
    );
    // Without a request id there is no retry identity: the id stays taken.
    let anonymous = NewUser::parse(Some(78), "Bob", "bob@example.com", "").unwrap();
    assert!(matches!(
        store.reserve(&anonymous, pending).await.unwrap(),
        Reservation::Reserved(_)
    ));
    assert!(matches!(
        store.reserve(&anonymous, pending).await.unwrap(),
        Reservation::Exists(_)
    ));
}
