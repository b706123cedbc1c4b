//! A restarted projector resumes from the read model's checkpoint: nothing
//! lost, nothing applied twice. The apply is fenced by that checkpoint.

use crate::helpers::{group_lag, spawn_app, spawn_app_with, test_config};
use std::time::Duration;
use tonic::Code;
use user_service::{
    domain::{Email, EventPosition, User, UserId, UserName},
    proto::user::v1::{CreateUserRequest, GetUserRequest},
    store::{ApplyOp, ApplyOutcome, ApplyResult},
};

#[tokio::test]
async fn restart_resumes_from_the_read_models_checkpoint() {
    let first = spawn_app().await;
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(
            first
                .create(&format!("before {i}"), "b@example.com")
                .await
                .unwrap(),
        );
    }
    // CreateUser answers once its event is applied: all 10 are.
    assert_eq!(first.stats().applied, 10);
    let config = first.config.clone();
    first.stop().await.expect("clean stop");
    assert_eq!(
        group_lag(&config.consumer_group, &config.topic, 3),
        0,
        "applied offsets committed at shutdown"
    );

    // While no projector runs, a command-only instance cannot learn the
    // log's verdict: it publishes, then answers UNAVAILABLE (retry).
    let mut command_only = config.clone();
    command_only.projector_enabled = false;
    command_only.max_position_wait = Duration::from_millis(300);
    let writer = spawn_app_with(command_only).await;
    let during: Vec<CreateUserRequest> = (0..5)
        .map(|i| CreateUserRequest {
            id: None,
            name: format!("during {i}"),
            email: "d@example.com".into(),
            request_id: format!("during-{i}"),
        })
        .collect();
    for req in &during {
        let err = writer.create_req(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    assert_eq!(group_lag(&config.consumer_group, &config.topic, 3), 5);

    // The restarted projector applies exactly those 5 and replays nothing;
    // the retries get the users their first attempts left in the log (a
    // retry that came before the first attempt was applied published the
    // same id again: a second event that creates nothing).
    let second = spawn_app_with(config.clone()).await;
    // Once it has joined the group and opened its partitions at the read
    // model's checkpoint (a loaded machine can take longer to rebalance
    // than a create waits for its verdict).
    second.wait_opened().await;
    for req in &during {
        let created = writer.create_req(req.clone()).await.unwrap();
        let user = created.user.clone().unwrap();
        assert_eq!(user.name, req.name);
        let mut get = tonic::Request::new(GetUserRequest {
            id: user.id,
            min_position: created.position,
        });
        get.set_timeout(Duration::from_secs(30));
        let got = second
            .users
            .clone()
            .get_user(get)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.position, created.position, "one user per request");
    }
    for c in &before {
        let u = c.user.clone().unwrap();
        assert_eq!(
            second
                .get_at(u.id, c.position, Duration::from_secs(30))
                .await
                .unwrap(),
            u
        );
    }
    let stats = second.stats();
    assert_eq!((stats.applied, stats.skipped), (5, 0), "{stats:?}");
    writer.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
    assert_eq!(group_lag(&config.consumer_group, &config.topic, 3), 0);
}

#[tokio::test]
async fn the_apply_is_fenced_by_the_checkpoint_and_the_first_create_wins() {
    let config = test_config();
    let store = crate::helpers::test_store(&config);
    let user = |id: i64, name: &str| User {
        id: UserId::parse(id).unwrap(),
        name: UserName::parse(name).unwrap(),
        email: Email::parse("r@example.com").unwrap(),
        created_at_ms: 1,
    };
    let op = |partition, offset, u: Option<User>| ApplyOp {
        position: EventPosition { partition, offset },
        user: u,
        request_id: None,
        sealed_to: None,
    };
    // Nothing in the log yet: both partitions start at -1, not rebuilding.
    for p in [0, 1] {
        let opened = store.open_partition(p, 0, -1).await.unwrap();
        assert_eq!((opened.checkpoint, opened.rebuild_target), (-1, None));
    }
    // One atomic apply per partition (its keys share one hash slot).
    let batch0 = vec![
        op(0, 0, Some(user(1, "one"))),
        op(0, 1, None),
        op(0, 2, Some(user(3, "three"))),
    ];
    assert_eq!(
        store.apply(0, &batch0, -1, None).await.unwrap(),
        ApplyResult::Applied(ApplyOutcome {
            applied: 2,
            duplicates: 0,
            skipped: 0,
            created: vec![0, 2],
        })
    );
    assert_eq!(
        store
            .apply(1, &[op(1, 0, Some(user(2, "two")))], -1, None)
            .await
            .unwrap(),
        ApplyResult::Applied(ApplyOutcome {
            applied: 1,
            duplicates: 0,
            skipped: 0,
            created: vec![0],
        })
    );
    // A member that resumed from an older checkpoint (a zombie after a
    // rebalance) is fenced off: nothing is written, it learns where Redis is.
    assert_eq!(
        store.apply(0, &batch0, -1, None).await.unwrap(),
        ApplyResult::Moved {
            partition: 0,
            checkpoint: Some(2)
        }
    );
    // A later event for an id already created: the first in the log wins.
    let later = store
        .apply(0, &[op(0, 3, Some(user(1, "impostor")))], 2, None)
        .await
        .unwrap();
    assert!(matches!(later, ApplyResult::Applied(o) if o.duplicates == 1));
    let one = store
        .get_user(UserId::parse(1).unwrap(), 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.user.name.as_str(), "one");
    assert_eq!(
        one.position(),
        Some(EventPosition {
            partition: 0,
            offset: 0
        })
    );
    let held = store.checkpoints([0, 1]).await.unwrap();
    assert_eq!((held.applied[&0], held.applied[&1]), (3, 0));

    // A batch whose copies to their ids' partitions (the article's events,
    // re-homed) were acknowledged keeps the highest such offset beside the
    // checkpoint, for a replay to skip; a lower one or a fenced apply leaves it.
    assert_eq!(store.open_partition(1, 1, -1).await.unwrap().rehomed, -1);
    store
        .apply(1, &[op(1, 1, None), op(1, 2, None)], 0, Some(2))
        .await
        .unwrap();
    assert_eq!(store.open_partition(1, 3, -1).await.unwrap().rehomed, 2);
    store.apply(1, &[op(1, 3, None)], 2, Some(1)).await.unwrap();
    assert!(matches!(
        store.apply(1, &[op(1, 9, None)], 0, Some(9)).await.unwrap(),
        ApplyResult::Moved { .. }
    ));
    let opened = store.open_partition(1, 4, -1).await.unwrap();
    assert_eq!((opened.checkpoint, opened.rehomed), (3, 2));

    // Redis loses the checkpoint: the next apply is refused, and opening the
    // partition again says "replay from the start, up to the log end".
    crate::helpers::delete_keys(&config).await;
    assert_eq!(
        store.apply(0, &[op(0, 4, None)], 3, None).await.unwrap(),
        ApplyResult::Moved {
            partition: 0,
            checkpoint: None
        }
    );
    let reopened = store.open_partition(0, 5, -1).await.unwrap();
    assert_eq!(
        (reopened.checkpoint, reopened.rebuild_target),
        (-1, Some(5))
    );
    assert!(!store.checkpoints([0]).await.unwrap().state(0).is_complete());

    // A Redis that went back in time (a failover to a replica that had not
    // caught up): its checkpoint is behind what was applied before, so the
    // partition is rebuilding up to there, not trusted.
    store.open_partition(1, 0, -1).await.unwrap();
    store.apply(1, &[op(1, 0, None)], -1, None).await.unwrap();
    let behind = store.open_partition(1, 9, 6).await.unwrap();
    assert_eq!((behind.checkpoint, behind.rebuild_target), (0, Some(7)));
    assert!(!store.checkpoints([1]).await.unwrap().state(1).is_complete());
}
