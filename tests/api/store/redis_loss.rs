//! Redis is a projection of the log: when it loses its data the read model is
//! rebuilt by itself, no acknowledged user is ever reported missing, no id is
//! handed out twice, and a retried request still gets its first answer.

use crate::helpers::{delete_keys, spawn_app_with, test_config};
use std::{collections::HashSet, time::Duration};
use tonic::Code;
use user_service::proto::user::v1::{CreateUserRequest, CreateUserResponse, GetUserRequest};

#[tokio::test]
async fn a_redis_that_lost_its_data_is_rebuilt_and_never_reports_a_user_missing() {
    // The projection itself is under test: the instance's user cache would
    // answer the acknowledged users from memory and hide the rebuild.
    let mut config = test_config();
    config.user_cache_bytes = 0;
    let app = spawn_app_with(config).await;
    app.wait_opened().await;
    let requests: Vec<CreateUserRequest> = (0..60)
        .map(|i| CreateUserRequest {
            id: (i % 3 == 0).then_some(9_000 + i),
            name: format!("user {i}"),
            email: format!("u{i}@example.com"),
            request_id: format!("loss-{i}"),
        })
        .collect();
    let mut acked: Vec<CreateUserResponse> = Vec::new();
    for req in &requests {
        acked.push(app.create_req(req.clone()).await.unwrap());
    }
    let moves_before = app.stats().checkpoint_moves;

    // Redis loses everything this service wrote (FLUSHALL, for this test's keys).
    delete_keys(&app.config).await;

    // Every read answers the user or UNAVAILABLE (rebuilding), never NOT_FOUND.
    let mut pending: Vec<&CreateUserResponse> = acked.iter().collect();
    let mut unavailable = 0;
    let limit = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < limit,
            "the read model was not rebuilt"
        );
        let mut still = Vec::new();
        for a in pending {
            let user = a.user.as_ref().unwrap();
            let got = app
                .users
                .clone()
                .get_user(GetUserRequest {
                    id: user.id,
                    min_position: None,
                })
                .await;
            match got {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.user.as_ref(), Some(user));
                    assert_eq!(r.position, a.position, "created by its own event");
                }
                Err(e) if e.code() == Code::Unavailable => {
                    unavailable += 1;
                    still.push(a)
                }
                Err(e) => panic!("user {} reported {e:?} during the rebuild", user.id),
            }
        }
        pending = still;
    }
    assert!(
        app.stats().checkpoint_moves > moves_before,
        "the projector noticed the loss"
    );
    eprintln!("reads answered UNAVAILABLE during the rebuild: {unavailable}");

    // Retries get their first answers; new requests get new ids.
    for (req, first) in requests.iter().zip(&acked).step_by(7) {
        assert_eq!(&app.create_req(req.clone()).await.unwrap(), first);
    }
    let old_ids: HashSet<i64> = acked.iter().map(|a| a.user.as_ref().unwrap().id).collect();
    for i in 0..20 {
        let fresh = app
            .create_req(CreateUserRequest {
                id: None,
                name: format!("after {i}"),
                email: "after@example.com".into(),
                request_id: format!("after-loss-{i}"),
            })
            .await
            .unwrap();
        assert!(!old_ids.contains(&fresh.user.unwrap().id));
    }
    // A client-chosen id taken before the loss is still taken.
    let err = app
        .create_req(CreateUserRequest {
            id: Some(9_000),
            name: "impostor".into(),
            email: "i@example.com".into(),
            request_id: "impostor-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    app.stop().await.expect("clean stop");
}
