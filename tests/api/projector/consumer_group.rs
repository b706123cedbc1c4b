//! Several instances share the partitions; each event is applied once.

use crate::helpers::{group_lag, spawn_app, spawn_app_with, wait_until};
use std::{collections::BTreeSet, time::Duration};

#[tokio::test]
async fn two_instances_split_the_partitions_and_apply_each_event_once() {
    let a = spawn_app().await;
    a.wait_assigned().await;
    let b = spawn_app_with(a.config.clone()).await;
    // Cooperative rebalance: wait until both own partitions and together all 3.
    wait_until(Duration::from_secs(60), || async {
        let (sa, sb) = (a.stats().assignment, b.stats().assignment);
        !sa.is_empty()
            && !sb.is_empty()
            && sa.union(&sb).copied().collect::<BTreeSet<_>>() == BTreeSet::from([0, 1, 2])
    })
    .await
    .expect("the group split the partitions");

    let mut created = Vec::new();
    for i in 0..30 {
        let app = if i % 2 == 0 { &a } else { &b };
        created.push(
            app.create(&format!("user {i}"), &format!("u{i}@example.com"))
                .await
                .unwrap(),
        );
    }
    // Every user is visible from either instance, whichever applied it.
    for (i, c) in created.iter().enumerate() {
        let reader = if i % 2 == 0 { &b } else { &a };
        let user = c.user.clone().unwrap();
        let got = reader
            .get_at(user.id, c.position, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(got, user);
    }
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(
        sa.applied + sb.applied,
        30,
        "each event applied exactly once: {sa:?} {sb:?}"
    );
    assert_eq!(sa.duplicates + sb.duplicates, 0);
    assert!(
        sa.applied > 0 && sb.applied > 0,
        "both instances worked: {sa:?} {sb:?}"
    );

    let config = a.config.clone();
    b.stop().await.expect("clean stop");
    a.stop().await.expect("clean stop");
    assert_eq!(
        group_lag(&config.consumer_group, &config.topic, 3),
        0,
        "all committed"
    );
}
