//! Bad input gets INVALID_ARGUMENT with `google.rpc.BadRequest` field
//! violations, and creates nothing.

use crate::helpers::{log_end_offsets, producer, publish_user_created, spawn_app};
use tonic::Code;
use tonic_types::StatusExt;
use user_service::proto::user::v1::{CreateUserRequest, GetUserRequest, Position};

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn each_invalid_field_is_reported_and_nothing_is_published() {
    let app = spawn_app().await;
    // The log as it is before any call: the service created the topic, empty.
    let before = log_end_offsets(&app.config.topic);
    assert_eq!(
        before.len(),
        app.config.topic_partitions as usize,
        "the broker knows the service's topic: {before:?}"
    );
    let cases: Vec<(CreateUserRequest, Vec<&str>)> = vec![
        (
            CreateUserRequest {
                name: "".into(),
                email: "a@example.com".into(),
                ..Default::default()
            },
            vec!["name"],
        ),
        (
            CreateUserRequest {
                name: "   ".into(),
                email: "a@example.com".into(),
                ..Default::default()
            },
            vec!["name"],
        ),
        (
            CreateUserRequest {
                name: "x".repeat(129),
                email: "a@example.com".into(),
                ..Default::default()
            },
            vec!["name"],
        ),
        (
            CreateUserRequest {
                name: "Ada".into(),
                email: "not-an-email".into(),
                ..Default::default()
            },
            vec!["email"],
        ),
        (
            CreateUserRequest {
                name: "Ada".into(),
                email: format!("{}@example.com", "a".repeat(250)),
                ..Default::default()
            },
            vec!["email"],
        ),
        (
            CreateUserRequest {
                id: Some(0),
                name: "Ada".into(),
                email: "a@example.com".into(),
                ..Default::default()
            },
            vec!["id"],
        ),
        (
            CreateUserRequest {
                id: Some(-5),
                name: "Ada".into(),
                email: "a@example.com".into(),
                ..Default::default()
            },
            vec!["id"],
        ),
        (
            CreateUserRequest {
                name: "Ada".into(),
                email: "a@example.com".into(),
                request_id: "has spaces".into(),
                ..Default::default()
            },
            vec!["request_id"],
        ),
        (
            CreateUserRequest {
                id: Some(-1),
                name: "".into(),
                email: "".into(),
                request_id: "r".repeat(200),
            },
            vec!["id", "name", "email", "request_id"],
        ),
    ];
    for (req, fields) in cases {
        let err = app.create_req(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert_eq!(violated_fields(&err), fields, "{req:?}");
    }

    let err = app
        .users
        .clone()
        .get_user(GetUserRequest {
            id: 0,
            min_position: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["id"]);
    let err = app
        .users
        .clone()
        .get_user(GetUserRequest {
            id: 1,
            min_position: Some(Position {
                partition: -1,
                offset: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["min_position.partition"]);
    // A partition the topic does not have is refused at once, not waited for.
    crate::helpers::wait_until(std::time::Duration::from_secs(30), || async {
        app.users
            .clone()
            .get_user(GetUserRequest {
                id: 1,
                min_position: Some(Position {
                    partition: 99,
                    offset: 0,
                }),
            })
            .await
            .is_err_and(|e| e.code() == Code::InvalidArgument)
    })
    .await
    .expect("partition 99 of a 3-partition topic is INVALID_ARGUMENT once the topic is known");

    // Nothing reached the log: its end offsets are where they were. Read
    // after the stop, which flushes the producer and joins every task a call
    // started, so a publish still on its way would be counted too.
    let topic = app.config.topic.clone();
    app.stop().await.expect("clean stop");
    let after = log_end_offsets(&topic);
    assert_eq!(after, before, "records reached the log from invalid calls");

    // The check sees a record when there is one.
    publish_user_created(&producer(), &topic, 1, "control").await;
    let control = log_end_offsets(&topic);
    assert_eq!(
        control.values().sum::<i64>(),
        after.values().sum::<i64>() + 1,
        "one record published: {after:?} -> {control:?}"
    );
}
