//! Redis behind Sentinel: the service finds the master through Sentinel and
//! follows a failover, losing nothing that was applied before it.

use crate::helpers::{free_port, spawn_app_with, test_config, unique, wait_until};
use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A server process of the test's own, killed when dropped.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server(args: &[&str]) -> Proc {
    Proc(
        Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/stack up installs it)"),
    )
}

pub fn cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    cmd_at(port, None, args)
}

/// [`cmd`], over TLS when given the CA (PEM) that signed the server.
fn cmd_at(port: u16, ca: Option<&str>, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = match ca {
        None => redis::Client::open(format!("redis://127.0.0.1:{port}"))?,
        Some(ca) => redis::Client::build_with_tls(
            format!("rediss://127.0.0.1:{port}"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.as_bytes().to_vec()),
            },
        )?,
    };
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(&mut conn)
}

fn master_port(sentinel: u16) -> Option<u16> {
    master_port_at(sentinel, None)
}

fn master_port_at(sentinel: u16, ca: Option<&str>) -> Option<u16> {
    let addr: Vec<String> = redis::from_redis_value(
        cmd_at(
            sentinel,
            ca,
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        )
        .ok()?,
    )
    .ok()?;
    addr.get(1)?.parse().ok()
}

fn replicas_known(sentinel: u16, ca: Option<&str>) -> usize {
    cmd_at(sentinel, ca, &["SENTINEL", "replicas", "mymaster"])
        .ok()
        .and_then(|v| redis::from_redis_value::<Vec<redis::Value>>(v).ok())
        .map_or(0, |r| r.len())
}

/// The server certificate, its key and the CA (PEM files) of a TLS-only set.
pub struct SetTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// A master, its replica and one Sentinel, of a test's own (in every mode of
/// the suite), stopped when dropped.
pub struct SentinelSet {
    pub master: u16,
    pub replica: u16,
    pub sentinel: u16,
    pub dir: std::path::PathBuf,
    _procs: Vec<Proc>,
}

impl SentinelSet {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// With `tls`, every server (and replication, and Sentinel's links to the
    /// nodes) speaks TLS only, and Sentinel announces the TLS ports.
    pub async fn start_with(tls: Option<&SetTls>) -> Self {
        let (m, r, s) = (free_port(), free_port(), free_port());
        // Files (the replica's copy of the master's data, Sentinel's config) go
        // to a directory of the test's own, not the working directory.
        let dir = std::env::temp_dir().join(unique("sentinel"));
        std::fs::create_dir_all(&dir).unwrap();
        let dir_arg = dir.to_str().unwrap().to_owned();
        let common = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_arg,
        ];
        let listen = |port: u16| -> Vec<String> {
            match tls {
                None => vec!["--port".into(), port.to_string()],
                Some(t) => vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                    "--tls-cert-file".into(),
                    t.cert.display().to_string(),
                    "--tls-key-file".into(),
                    t.key.display().to_string(),
                    "--tls-ca-cert-file".into(),
                    t.ca.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                    "--tls-replication".into(),
                    "yes".into(),
                ],
            }
        };
        let (lm, lr) = (listen(m), listen(r));
        let lm: Vec<&str> = lm.iter().map(String::as_str).collect();
        let lr: Vec<&str> = lr.iter().map(String::as_str).collect();
        let master = redis_server(&[&lm[..], &common].concat());
        let replica = redis_server(
            &[
                &lr[..],
                &["--replicaof", "127.0.0.1", &m.to_string()][..],
                &common,
            ]
            .concat(),
        );
        let conf = dir.join("sentinel.conf");
        let listen = match tls {
            None => format!("port {s}\n"),
            Some(t) => format!(
                "port 0\ntls-port {s}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {m} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n",
                dir.display()
            ),
        )
        .unwrap();
        let sentinel = redis_server(&[conf.to_str().unwrap(), "--sentinel"]);
        let ca = tls.map(|t| std::fs::read_to_string(&t.ca).unwrap());
        wait_until(Duration::from_secs(60), || async {
            master_port_at(s, ca.as_deref()) == Some(m) && replicas_known(s, ca.as_deref()) > 0
        })
        .await
        .expect("Sentinel watches the master and knows its replica");
        Self {
            master: m,
            replica: r,
            sentinel: s,
            dir,
            _procs: vec![sentinel, replica, master],
        }
    }

    /// A test config that finds Redis through this Sentinel only.
    pub fn config(&self) -> user_service::config::Config {
        let mut config = test_config();
        config.redis_server_url = "redis://127.0.0.1:1".into(); // not used with Sentinel
        config.redis_sentinels = vec![format!("127.0.0.1:{}", self.sentinel)];
        // Its own Redis: none of the suite's credentials.
        config.redis_username = None;
        config.redis_password = None;
        config.redis_password_file = None;
        config.redis_tls_ca_file = None;
        config.redis_cluster_nodes.clear(); // its own Sentinel, in every mode
        config.redis_timeout = Duration::from_millis(500);
        config
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        self._procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_service_follows_a_sentinel_failover() {
    let set = SentinelSet::start().await;
    let (m, r, s) = (set.master, set.replica, set.sentinel);
    let app = spawn_app_with(set.config()).await;
    app.wait_health(ServingStatus::Serving).await;

    let before = app
        .create("Before Failover", "before@example.com")
        .await
        .expect("created via the master");
    let user = before.user.clone().unwrap();
    assert_eq!(
        app.get_at(user.id, before.position, Duration::from_secs(30))
            .await
            .unwrap(),
        user
    );

    // Let the replica catch up (replication is asynchronous: a failover
    // before that would lose writes, as with any Redis failover).
    let info = |port: u16| -> String {
        cmd(port, &["INFO", "replication"])
            .ok()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .unwrap_or_default()
    };
    let field = |text: &str, name: &str| -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    let written = field(&info(m), "master_repl_offset").expect("the master reports its offset");
    wait_until(Duration::from_secs(60), || async {
        let replica = info(r);
        replica.contains("master_link_status:up")
            && field(&replica, "slave_repl_offset").is_some_and(|o| o >= written)
    })
    .await
    .expect("the replica caught up");

    // Promote the replica.
    cmd(s, &["SENTINEL", "FAILOVER", "mymaster"]).expect("failover starts");
    wait_until(Duration::from_secs(60), || async {
        master_port(s) == Some(r)
    })
    .await
    .expect("the replica became the master");
    // ...and Sentinel demoted the old master, which now refuses writes.
    wait_until(Duration::from_secs(60), || async {
        cmd(m, &["ROLE"])
            .ok()
            .and_then(|v| redis::from_redis_value::<Vec<redis::Value>>(v).ok())
            .and_then(|v| redis::from_redis_value::<String>(v.first()?.clone()).ok())
            .as_deref()
            == Some("slave")
    })
    .await
    .expect("the old master became a replica");

    // Writes go to the new master: calls may say UNAVAILABLE while it switches,
    // never anything else, and then succeed.
    let mut after = None;
    for _ in 0..600 {
        match app.create("After Failover", "after@example.com").await {
            Ok(c) => {
                after = Some(c);
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = after.expect("CreateUser works against the new master");
    let new_user = after.user.clone().unwrap();
    assert_eq!(
        app.get_at(new_user.id, after.position, Duration::from_secs(30))
            .await
            .unwrap(),
        new_user
    );
    // The new user was written to the new master, not to the demoted one.
    let slot = user_service::store::Keys::new(&app.config.redis_key_prefix, &app.config.topic)
        .user(
            user_service::domain::UserId::parse(new_user.id).unwrap(),
            after.position.unwrap().partition,
        );
    let on_new_master: i64 =
        redis::from_redis_value(cmd(r, &["HEXISTS", &slot.key, &slot.field]).unwrap()).unwrap();
    assert_eq!(on_new_master, 1);
    // What was applied before the failover is still there.
    assert_eq!(
        app.get_at(user.id, None, Duration::from_secs(5))
            .await
            .unwrap(),
        user
    );
    app.wait_health(ServingStatus::Serving).await;
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn sentinel_over_tls_with_the_right_ca_only() {
    let files = crate::helpers::certs::Files::redis_server();
    let tls = SetTls {
        cert: files.path("redis.pem"),
        key: files.path("redis.key"),
        ca: files.path("ca.pem"),
    };
    let set = SentinelSet::start_with(Some(&tls)).await;
    let config_with = |ca_file: &str| {
        let mut c = set.config();
        c.redis_sentinels = vec![format!("rediss://127.0.0.1:{}", set.sentinel)];
        c.redis_tls_ca_file = Some(files.path(ca_file));
        c
    };

    // The right CA: Sentinel and the master it names, both over TLS.
    let app = spawn_app_with(config_with("ca.pem")).await;
    app.wait_health(ServingStatus::Serving).await;
    let created = app
        .create("Sentinel Tls", "sentinel-tls@example.com")
        .await
        .expect("created on the master Sentinel named, over TLS");
    let user = created.user.unwrap();
    assert_eq!(
        app.get_at(user.id, created.position, Duration::from_secs(10))
            .await
            .expect("read over TLS"),
        user
    );
    app.stop().await.expect("clean stop");

    // A CA that signed neither: the read model stays NOT_SERVING through
    // several probes (NOT_SERVING is where it starts: the probes must have
    // run, and found Redis down).
    let app = spawn_app_with(config_with("other-ca.pem")).await;
    crate::helpers::wait_probed_down(&app, "redis", 3.0).await;
    assert_eq!(
        app.health_status("redis").await.unwrap(),
        ServingStatus::NotServing
    );
    app.stop().await.expect("clean stop");
}
