//! The id → partition mapping is a fact of the log (the topic's partition
//! map, `src/domain/partition_map.rs`), not of the partition count the broker
//! reports today: partitions added under load change nothing a caller sees, a
//! count that cannot be honoured is refused loudly, and growing for real is a
//! move to a new topic (`user-service move-topic`).

use crate::helpers::{
    TestApp, kafka_link, read_log, scrape, spawn_app_with, test_config, unique, wait_until,
};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewPartitions},
    client::DefaultClientContext,
};
use std::{collections::BTreeMap, time::Duration};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::{
    domain::{PartitionMap, partition_map::user_partition},
    kafka::ensure_topics,
    move_topic::Move,
    proto::user::v1::{CreateUserRequest, GetProgressRequest, Position, User},
};

/// An acknowledged create: what the caller was promised.
#[derive(Debug, Clone)]
struct Ack {
    request: CreateUserRequest,
    user: User,
    position: Position,
}

async fn alter_partitions(topic: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> = kafka_link().client_config().create().unwrap();
    let results = admin
        .create_partitions(&[NewPartitions::new(topic, total)], &AdminOptions::new())
        .await
        .expect("the admin request");
    for r in results {
        r.expect("partitions added");
    }
}

/// Client-chosen ids from `from` up whose partition differs between 3 and 6
/// partitions: the ones a count taken from today's metadata would move.
fn moving_ids(from: i64, n: usize) -> Vec<i64> {
    (from..)
        .filter(|id| {
            let id = user_service::domain::UserId::parse(*id).unwrap();
            user_partition(id, 3) != user_partition(id, 6)
        })
        .take(n)
        .collect()
}

async fn create_all(app: &TestApp, prefix: &str, ids: &[i64]) -> Vec<Ack> {
    let mut acks = Vec::new();
    for id in ids {
        let request = CreateUserRequest {
            id: Some(*id),
            name: format!("user {id}"),
            email: format!("u{id}@example.com"),
            request_id: format!("{prefix}-{id}"),
        };
        let r = app
            .create_req(request.clone())
            .await
            .unwrap_or_else(|s| panic!("create {id}: {s:?}"));
        acks.push(Ack {
            request,
            user: r.user.unwrap(),
            position: r.position.unwrap(),
        });
    }
    acks
}

/// Every acknowledged user reads back as acknowledged, with and without its
/// position; a read the rebuild cannot vouch for yet is retried.
async fn read_back(app: &TestApp, acks: &[Ack]) {
    for ack in acks {
        for position in [None, Some(ack.position)] {
            let mut got = app
                .get_at(ack.user.id, position, Duration::from_secs(5))
                .await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while matches!(&got, Err(s) if s.code() == Code::Unavailable)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got = app
                    .get_at(ack.user.id, position, Duration::from_secs(5))
                    .await;
            }
            let got = got.unwrap_or_else(|s| panic!("user {} lost: {s:?}", ack.user.id));
            assert_eq!(got, ack.user, "user {} as acknowledged", ack.user.id);
        }
    }
}

/// Creating each acknowledged id again under another request is refused.
async fn no_double(app: &TestApp, acks: &[Ack]) {
    for ack in acks {
        let mut other = ack.request.clone();
        other.request_id = format!("other-{}", other.request_id);
        other.name = "someone else".into();
        let r = app.create_req(other).await;
        assert_eq!(
            r.as_ref().map_err(|s| s.code()).err(),
            Some(Code::AlreadyExists),
            "id {} created twice: {r:?}",
            ack.user.id
        );
    }
}

#[tokio::test]
async fn added_partitions_change_nothing_a_caller_sees() {
    let config = test_config();
    let a = spawn_app_with(config.clone()).await;
    a.wait_opened().await;
    let ids = moving_ids(1, 90);
    let mut acks = create_all(&a, "before", &ids[..60]).await;

    alter_partitions(&config.topic, 6).await;
    // The instance sees the new partitions, reports them unused, and routes
    // as before.
    wait_until(Duration::from_secs(30), || async {
        a.progress
            .clone()
            .get_progress(GetProgressRequest::default())
            .await
            .ok()
            .and_then(|r| r.into_inner().snapshot)
            .is_some_and(|s| {
                s.partitions.len() == 6
                    && s.partitions.iter().all(|p| p.unused == (p.partition >= 3))
            })
    })
    .await
    .expect("the progress stream marks the added partitions unused");
    wait_until(Duration::from_secs(30), || async {
        scrape(&a)
            .await
            .contains("user_service_topic_partitions_unused 3")
    })
    .await
    .expect("the metric reports the 3 added partitions unused");
    // Creates go on, every one OK at once (no UNAVAILABLE), on a routed
    // partition.
    acks.extend(create_all(&a, "after", &ids[60..]).await);
    assert!(acks.iter().all(|a| a.position.partition < 3), "{acks:?}");

    // A second instance with the cache off, which learned the map from the
    // log, not from metadata: every user, no double.
    let mut b_config = config.clone();
    b_config.user_cache_bytes = 0;
    let b = spawn_app_with(b_config).await;
    wait_until(Duration::from_secs(60), || async {
        !b.stats().assignment.is_empty()
    })
    .await
    .expect("the second instance joins");
    for app in [&a, &b] {
        read_back(app, &acks).await;
        no_double(app, &acks).await;
        assert_eq!(
            app.health_status("kafka").await.unwrap(),
            ServingStatus::Serving
        );
    }

    // The log: every event in its id's partition by the map, one per id.
    let map = PartitionMap {
        partitions: 3,
        offset: 0,
    };
    let mut seen = BTreeMap::new();
    for r in read_log(&config.topic) {
        let id: i64 = String::from_utf8(r.key.unwrap()).unwrap().parse().unwrap();
        let home = map.home(user_service::domain::UserId::parse(id).unwrap());
        assert_eq!(r.partition, home, "user {id}'s event");
        *seen.entry(id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert_eq!(seen.len(), acks.len());
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn a_topic_with_fewer_partitions_than_its_map_is_refused_loudly() {
    let config = test_config();
    // A topic made by hand with 2 partitions whose log says 3.
    ensure_topics(
        &kafka_link(),
        &[&config.topic],
        2,
        1,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let publisher = user_service::kafka::EventPublisher::new(
        &kafka_link(),
        &config.topic,
        Duration::from_secs(5),
        Duration::from_millis(1),
    )
    .unwrap();
    publisher.publish_map(3).await.unwrap();

    let app = spawn_app_with(config.clone()).await;
    // NOT_SERVING is also the state before the first probe: wait until a
    // probe has seen the topic's count, then for the verdict.
    wait_until(Duration::from_secs(30), || async {
        scrape(&app)
            .await
            .contains("user_service_dependency_up{dependency=\"kafka\"} 1")
    })
    .await
    .expect("a probe reached the broker");
    wait_until(Duration::from_secs(30), || async {
        // NOT_SERVING is where it starts: two probes must have run first.
        crate::helpers::probed(&app.handle.metrics.render(), "kafka").0 >= 2.0
            && app.health_status("kafka").await.ok() == Some(ServingStatus::NotServing)
    })
    .await
    .expect("kafka NOT_SERVING");
    let refused = app
        .create_req(CreateUserRequest {
            id: Some(7),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("move-topic") && refused.message().contains("2 partitions"),
        "the reason names the fix: {}",
        refused.message()
    );
    // Reads are not refused for it.
    assert_eq!(
        app.health_status("redis").await.unwrap(),
        ServingStatus::Serving
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn move_topic_moves_every_user_with_none_lost_or_doubled_while_reads_go_on() {
    let config = test_config();
    let a = spawn_app_with(config.clone()).await;
    a.wait_opened().await;
    let mut acks = create_all(&a, "first", &moving_ids(1, 40)).await;
    // Service-assigned ids too (derived from the request id).
    for k in 0..20 {
        let request = CreateUserRequest {
            id: None,
            name: format!("assigned {k}"),
            email: format!("a{k}@example.com"),
            request_id: format!("assigned-{k}"),
        };
        let r = a.create_req(request.clone()).await.unwrap();
        acks.push(Ack {
            request,
            user: r.user.unwrap(),
            position: r.position.unwrap(),
        });
    }

    // Creates and reads keep coming on the old topic while it moves.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (users, stop) = (a.users.clone(), stop.clone());
        let reads: Vec<i64> = acks.iter().map(|a| a.user.id).collect();
        tokio::spawn(async move {
            let (mut ok, mut unavailable, mut reads_ok) = (Vec::new(), Vec::new(), 0);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let request = CreateUserRequest {
                    id: None,
                    name: format!("during {n}"),
                    email: format!("d{n}@example.com"),
                    request_id: format!("during-{n}"),
                };
                match users.clone().create_user(request.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        ok.push(Ack {
                            request,
                            user: r.user.unwrap(),
                            position: r.position.unwrap(),
                        });
                    }
                    Err(s) if s.code() == Code::Unavailable => unavailable.push(request),
                    Err(s) => panic!("create during the move: {s:?}"),
                }
                let id = reads[n as usize % reads.len()];
                users
                    .clone()
                    .get_user(user_service::proto::user::v1::GetUserRequest {
                        id,
                        min_position: None,
                    })
                    .await
                    .unwrap_or_else(|s| panic!("a read during the move failed: {s:?}"));
                reads_ok += 1;
            }
            (ok, unavailable, reads_ok)
        })
    };
    wait_until(Duration::from_secs(30), || async { !load.is_finished() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let new_topic = format!("{}-moved", config.topic);
    let report = Move {
        link: kafka_link(),
        from: config.topic.clone(),
        to: new_topic.clone(),
        partitions: 6,
        replication: 1,
        timeout: Duration::from_secs(10),
    }
    .run()
    .await
    .expect("the move");
    assert_eq!(report.seals.len(), 3);
    assert_eq!(report.to_map.partitions, 6);

    // After the seals the old topic takes no create: they answer UNAVAILABLE.
    wait_until(Duration::from_secs(30), || async {
        let r = a
            .create_req(CreateUserRequest {
                id: None,
                name: "late".into(),
                email: "late@example.com".into(),
                request_id: unique("late"),
            })
            .await;
        matches!(r, Err(s) if s.code() == Code::Unavailable)
    })
    .await
    .expect("creates on the sealed topic answer UNAVAILABLE");
    stop.cancel();
    let (during, unavailable, reads_ok) = load.await.unwrap();
    assert!(reads_ok > 0);
    acks.extend(during);

    // The instances move to the new topic (a new group; the cache off).
    let mut b_config = config.clone();
    b_config.topic = new_topic.clone();
    b_config.dlq_topic = None;
    b_config.consumer_group = unique("moved-projector");
    b_config.user_cache_bytes = 0;
    let b = spawn_app_with(b_config).await;
    b.wait_opened().await;
    for ack in &acks {
        // Positions belong to the old topic: read without one.
        let mut got = b.get_at(ack.user.id, None, Duration::from_secs(5)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while matches!(&got, Err(s) if s.code() == Code::Unavailable)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            got = b.get_at(ack.user.id, None, Duration::from_secs(5)).await;
        }
        assert_eq!(
            got.unwrap_or_else(|s| panic!("user {} lost in the move: {s:?}", ack.user.id)),
            ack.user
        );
    }
    no_double(&b, &acks[..40]).await;
    // A create the sealed topic left undecided is decided by its retry on
    // the new topic: the same request names the same user, once.
    for request in unavailable.iter().take(5) {
        let first = b.create_req(request.clone()).await.unwrap();
        let again = b.create_req(request.clone()).await.unwrap();
        assert_eq!(first, again);
    }
    // The new log: every event in its id's partition by the new map.
    for r in read_log(&new_topic) {
        let id: i64 = String::from_utf8(r.key.unwrap()).unwrap().parse().unwrap();
        assert_eq!(
            r.partition,
            user_partition(user_service::domain::UserId::parse(id).unwrap(), 6),
            "user {id}"
        );
    }
    // The old read model still serves reads.
    a.get_at(acks[0].user.id, None, Duration::from_secs(5))
        .await
        .unwrap();
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn without_a_broker_a_far_partition_is_refused_at_once_and_reads_go_on() {
    // An instance with a broker leaves the map beside the read model.
    let config = test_config();
    let a = spawn_app_with(config.clone()).await;
    a.wait_opened().await;
    let ada = a
        .create_req(CreateUserRequest {
            id: Some(11),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: "far-1".into(),
        })
        .await
        .unwrap();
    let store = crate::helpers::test_store(&config);
    wait_until(Duration::from_secs(30), || async {
        store.partition_map().await.unwrap().is_some()
    })
    .await
    .expect("the map's copy beside the read model");
    a.stop().await.unwrap();

    // An instance that never reached a broker (issue 25: a partition of
    // i32::MAX filled a table up to it, under a lock, until memory ran out).
    let gate = crate::helpers::BrokerGate::closed();
    let mut b_config = config.clone();
    b_config.kafka_broker_url = gate.addr();
    b_config.publish_timeout = Duration::from_secs(1);
    b_config.user_cache_bytes = 0;
    let b = spawn_app_with(b_config).await;
    // Refused, not waited for: a wait would end in DEADLINE_EXCEEDED.
    for partition in [i32::MAX, 3, 1_000_000] {
        let r = b
            .get_at(
                11,
                Some(Position {
                    partition,
                    offset: 0,
                }),
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            r.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "partition {partition}"
        );
    }
    // A plain read is served from the read model meanwhile.
    let got = b.get_at(11, None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(Some(got), ada.user);
    b.stop().await.unwrap();
}
