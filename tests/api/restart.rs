//! A restarted projector resumes from the committed offsets: nothing lost,
//! nothing applied twice. A replayed batch changes nothing.

use crate::helpers::{group_lag, spawn_app, spawn_app_with, test_config};
use std::time::Duration;
use user_service::{
    cache::ApplyOp,
    domain::{Email, User, UserId, UserName},
};

#[tokio::test]
async fn restart_resumes_from_committed_offsets() {
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
    for c in &before {
        first
            .get_at(
                c.user.as_ref().unwrap().id,
                c.position,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    assert_eq!(first.stats().applied, 10);
    let config = first.config.clone();
    first.stop().await.expect("clean stop");
    assert_eq!(
        group_lag(&config.consumer_group, &config.topic, 3),
        0,
        "applied offsets committed at shutdown"
    );

    // While no projector runs, a command-only instance takes 5 more.
    let mut command_only = config.clone();
    command_only.projector_enabled = false;
    let writer = spawn_app_with(command_only).await;
    let mut during = Vec::new();
    for i in 0..5 {
        during.push(
            writer
                .create(&format!("during {i}"), "d@example.com")
                .await
                .unwrap(),
        );
    }
    assert_eq!(group_lag(&config.consumer_group, &config.topic, 3), 5);

    // The restarted projector applies exactly those 5 and replays nothing.
    let second = spawn_app_with(config.clone()).await;
    for c in before.iter().chain(&during) {
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
    assert_eq!(
        (stats.applied, stats.skipped, stats.duplicates),
        (5, 0, 0),
        "{stats:?}"
    );
    writer.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
    assert_eq!(group_lag(&config.consumer_group, &config.topic, 3), 0);
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing() {
    let config = test_config();
    let store = crate::helpers::test_store(&config);
    let user = |id: i64, name: &str| User {
        id: UserId::parse(id).unwrap(),
        name: UserName::parse(name).unwrap(),
        email: Email::parse("r@example.com").unwrap(),
        created_at_ms: 1,
    };
    let batch = vec![
        ApplyOp {
            partition: 0,
            offset: 0,
            user: Some(user(1, "one")),
        },
        ApplyOp {
            partition: 1,
            offset: 0,
            user: Some(user(2, "two")),
        },
        ApplyOp {
            partition: 0,
            offset: 1,
            user: None,
        },
        ApplyOp {
            partition: 0,
            offset: 2,
            user: Some(user(3, "three")),
        },
    ];
    let first = store.apply(&batch).await.unwrap();
    assert_eq!((first.applied, first.duplicates, first.skipped), (3, 0, 0));
    let again = store.apply(&batch).await.unwrap();
    assert_eq!((again.applied, again.duplicates, again.skipped), (0, 0, 4));
    // A later event for an id already created: the first in the log wins.
    let later = store
        .apply(&[ApplyOp {
            partition: 0,
            offset: 3,
            user: Some(user(1, "impostor")),
        }])
        .await
        .unwrap();
    assert_eq!(later.duplicates, 1);
    assert_eq!(
        store
            .get_user(UserId::parse(1).unwrap())
            .await
            .unwrap()
            .unwrap()
            .name
            .as_str(),
        "one"
    );
    let positions = store.applied_positions().await.unwrap();
    assert_eq!((positions[&0], positions[&1]), (3, 0));
}
