//! Reads from replicas (`REDIS_READ_FROM_REPLICAS`): a replica answers what
//! its own checkpoint covers, the master the rest, so a read with a position
//! still sees its write while replication lags; and the partitions' slots
//! spread evenly over a cluster's masters.

use crate::{
    helpers::{TestApp, redis_cluster_nodes, spawn_app_with, test_config, unique, wait_until},
    store::sentinel::{SentinelSet, cmd},
};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::store::Keys;

/// Stops `replicas` from applying their master's stream (reads still
/// answered) until dropped: `CLIENT PAUSE ... WRITE` holds back the
/// replication link's commands too.
struct PausedReplication(Vec<u16>);

impl PausedReplication {
    fn start(replicas: &[u16]) -> Self {
        for port in replicas {
            cmd(*port, &["CLIENT", "PAUSE", "30000", "WRITE"]).expect("replica paused");
        }
        Self(replicas.to_vec())
    }
}

impl Drop for PausedReplication {
    fn drop(&mut self) {
        for port in &self.0 {
            let _ = cmd(*port, &["CLIENT", "UNPAUSE"]);
        }
    }
}

/// The scenario, in any mode with replicas: a tokenless read is served by a
/// replica (so it can miss a fresh write), a read with the write's position
/// never misses it.
async fn own_write_survives_a_lagging_replica(app: &TestApp, replicas: &[u16]) {
    let store = &app.handle.store;
    assert!(store.reads_from_replicas());
    let first = app
        .create("Before Pause", "before@example.com")
        .await
        .unwrap();
    let first_user = first.user.unwrap();
    // Replicas catch up: a read without a position is served by a replica,
    // and finds the user there.
    wait_until(Duration::from_secs(30), || async {
        let (served, _) = store.replica_read_counts();
        let found = app
            .get_at(first_user.id, None, Duration::from_secs(5))
            .await
            .is_ok();
        found && store.replica_read_counts().0 > served
    })
    .await
    .expect("a replica caught up and served the read");

    let paused = PausedReplication::start(replicas);
    let created = app
        .create("During Pause", "during@example.com")
        .await
        .unwrap();
    let user = created.user.unwrap();
    let (_, fell_back_before) = store.replica_read_counts();
    // With its position, the caller reads its own write: the replica is
    // behind, so the master answers.
    let got = app
        .get_at(user.id, created.position, Duration::from_secs(10))
        .await
        .expect("a read with the position sees the write");
    assert_eq!(got, user);
    let (_, fell_back) = store.replica_read_counts();
    assert!(
        fell_back > fell_back_before,
        "the master took the read over"
    );
    // Without it, the lagging replica answers (what a tokenless read may see).
    let stale = app
        .get_at(user.id, None, Duration::from_secs(5))
        .await
        .expect_err("the replica has not applied it yet");
    assert_eq!(stale.code(), Code::NotFound, "{stale:?}");

    drop(paused);
    wait_until(Duration::from_secs(30), || async {
        app.get_at(user.id, None, Duration::from_secs(5)).await.ok() == Some(user.clone())
    })
    .await
    .expect("the replica catches up once replication resumes");
}

#[tokio::test]
async fn a_sentinel_replica_that_lags_never_hides_a_callers_own_write() {
    let set = SentinelSet::start().await;
    let mut config = set.config();
    config.redis_read_from_replicas = true;
    config.user_cache_bytes = 0; // the replica's path, not the process's cache
    let app = spawn_app_with(config).await;
    app.wait_health(ServingStatus::Serving).await;
    own_write_survives_a_lagging_replica(&app, &[set.replica]).await;
    app.stop().await.expect("clean stop");
}

/// The ports of the cluster's masters and replicas (`CLUSTER NODES`).
fn cluster_roles(node: &str) -> (Vec<u16>, Vec<u16>) {
    let port: u16 = node.rsplit(':').next().unwrap().parse().unwrap();
    let nodes: String = redis::from_redis_value(cmd(port, &["CLUSTER", "NODES"]).unwrap()).unwrap();
    let (mut masters, mut replicas) = (vec![], vec![]);
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let addr = f[1].split('@').next().unwrap();
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        if f[2].contains("fail") {
            continue;
        }
        if f[2].contains("master") {
            masters.push(port);
        } else if f[2].contains("slave") {
            replicas.push(port);
        }
    }
    (masters, replicas)
}

#[tokio::test]
#[ignore = "needs a Redis Cluster: scripts/test's cluster pass runs it (REDIS_CLUSTER_URLS, --include-ignored)"]
async fn a_cluster_replica_that_lags_never_hides_a_callers_own_write() {
    let nodes = redis_cluster_nodes();
    assert!(
        !nodes.is_empty(),
        "REDIS_CLUSTER_URLS names the cluster (scripts/stack up --redis cluster)"
    );
    let (_, replicas) = cluster_roles(&nodes[0]);
    assert!(!replicas.is_empty(), "the stack's cluster has replicas");
    let mut config = test_config();
    config.redis_read_from_replicas = true;
    config.user_cache_bytes = 0; // the replica's path, not the process's cache
    let app = spawn_app_with(config).await;
    app.wait_health(ServingStatus::Serving).await;
    own_write_survives_a_lagging_replica(&app, &replicas).await;
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn replica_reads_need_replicas() {
    let mut config = test_config();
    config.redis_cluster_nodes.clear();
    config.redis_read_from_replicas = true;
    let err = user_service::startup::Application::build(config)
        .await
        .err()
        .expect("a single server has no replicas to read from");
    assert!(
        err.to_string().contains("REDIS_READ_FROM_REPLICAS"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs a Redis Cluster: scripts/test's cluster pass runs it (REDIS_CLUSTER_URLS, --include-ignored)"]
async fn the_default_partition_count_spreads_evenly_over_the_masters() {
    let nodes = redis_cluster_nodes();
    assert!(
        !nodes.is_empty(),
        "REDIS_CLUSTER_URLS names the cluster (scripts/stack up --redis cluster)"
    );
    let (masters, _) = cluster_roles(&nodes[0]);
    let partitions = user_service::config::DEFAULT_TOPIC_PARTITIONS;
    let keys = Keys::new(&unique("spread"), &unique("topic"));
    let mut per_master = std::collections::BTreeMap::new();
    for p in 0..partitions {
        // The node that serves the partition's checkpoint key, as the
        // cluster itself says (MOVED names it; the node itself answers).
        let key = keys.checkpoint(p);
        let owner = masters
            .iter()
            .find(|m| cmd(**m, &["EXISTS", &key]).is_ok())
            .copied()
            .unwrap_or_else(|| panic!("no master serves {key}"));
        *per_master.entry(owner).or_insert(0) += 1;
    }
    assert_eq!(per_master.len(), masters.len(), "{per_master:?}");
    let counts: Vec<i32> = per_master.values().copied().collect();
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "{partitions} partitions over {} masters: {per_master:?}",
        masters.len()
    );
}
