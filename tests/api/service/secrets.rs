//! Credentials to Redis (an ACL user) and to Kafka (SASL/SCRAM over TLS)
//! from mounted files, and secrets that never show: the real binary, on
//! servers that refuse the default user, with the right password, a wrong
//! one and, for Kafka, a CA that did not sign the broker's certificate.

use crate::helpers::{free_port, kafka_brokers, unique, wait_until};
use std::{path::PathBuf, process::Stdio, time::Duration};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::proto::user::v1::{
    CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient,
};

/// A redis-server whose only user is `svc` with `password`; over TLS only
/// when given the certificate files (server cert, key).
struct AclRedis {
    port: u16,
    child: std::process::Child,
}

impl AclRedis {
    fn start(password: &str) -> Self {
        Self::start_with(password, None)
    }

    fn start_with(
        password: &str,
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
    ) -> Self {
        let port = free_port();
        let mut listen = vec!["--port".to_owned(), port.to_string()];
        if let Some((cert, key, ca)) = tls {
            listen = vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-ca-cert-file".into(),
                ca.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ];
        }
        let child = std::process::Command::new("redis-server")
            .args(&listen)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--user",
                "default",
                "off",
                "--user",
                "svc",
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        Self { port, child }
    }
}

impl Drop for AclRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Service {
    child: tokio::process::Child,
    port: u16,
    metrics_port: u16,
    log: PathBuf,
}

fn start(redis: &AclRedis, password_env: Option<&str>, password_file: Option<&PathBuf>) -> Service {
    let mut env = vec![
        (
            "REDIS_SERVER_URL".to_owned(),
            format!("redis://127.0.0.1:{}", redis.port),
        ),
        ("REDIS_USERNAME".to_owned(), "svc".to_owned()),
        ("KAFKA_BROKER_URL".to_owned(), kafka_brokers()),
    ];
    // The suite's own broker, as secured as the pass runs it.
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("KAFKA_")));
    if let Some(p) = password_env {
        env.push(("REDIS_PASSWORD".into(), p.into()));
    }
    if let Some(f) = password_file {
        env.push(("REDIS_PASSWORD_FILE".into(), f.display().to_string()));
    }
    start_binary(&env)
}

/// The real binary with `env` on top of settings of its own (ports, topic,
/// group, key prefix) and nothing inherited that names a backend or a
/// secret: each test says which Redis and Kafka it talks to, and how.
fn start_binary(env: &[(String, String)]) -> Service {
    let name = unique("secrets");
    let (port, metrics_port) = (free_port(), free_port());
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
    for (key, _) in std::env::vars() {
        if key.starts_with("REDIS_") || key.starts_with("KAFKA_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("KAFKA_TOPIC", format!("{name}-users"))
        .env("KAFKA_CONSUMER_GROUP", format!("{name}-projector"))
        .env("REDIS_KEY_PREFIX", format!("{name}:"))
        .env("DRAIN_GRACE", "0s")
        .env("HEALTH_PROBE_INTERVAL", "200ms")
        .env("LOG_FORMAT", "json")
        // As much as the service logs: none of it may hold a secret.
        .env(
            "RUST_LOG",
            "debug,rdkafka=info,h2=info,hyper=info,tower=info",
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true);
    Service {
        child: cmd.spawn().expect("the binary starts"),
        port,
        metrics_port,
        log,
    }
}

/// A CreateUser on `s`, then a GetUser with its position that finds it.
async fn create_and_read(s: &Service, name: &str, email: &str) {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", s.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel);
    let created = users
        .create_user(CreateUserRequest {
            name: name.into(),
            email: email.into(),
            request_id: unique("req"),
            ..Default::default()
        })
        .await
        .expect("created")
        .into_inner();
    let user = created.user.clone().unwrap();
    let mut read = tonic::Request::new(GetUserRequest {
        id: user.id,
        min_position: created.position,
    });
    read.set_timeout(Duration::from_secs(10));
    let got = users.get_user(read).await.expect("read back").into_inner();
    assert_eq!(got.user, Some(user));
}

async fn status(port: u16) -> Option<ServingStatus> {
    status_of(port, "").await
}

/// The status the service reports for one health name.
async fn status_of(port: u16, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status())
}

async fn stop(mut s: Service) -> String {
    let pid = s.child.id().unwrap().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.child.wait()).await;
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    let _ = std::fs::remove_file(&s.log);
    log
}

#[tokio::test]
async fn redis_credentials_from_a_file_work_and_no_secret_is_ever_shown() {
    let secret = format!("s3cret-{}", unique("pw"));
    let wrong = format!("wr0ng-{}", unique("pw"));
    let redis = AclRedis::start(&secret);
    let dir = std::env::temp_dir().join(unique("secret-files"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("redis-password");
    std::fs::write(&file, format!("{secret}\n")).unwrap();

    // Right credentials (from the file): serving, and the read model works.
    let good = start(&redis, Some(&wrong), Some(&file)); // the file wins
    wait_until(Duration::from_secs(60), || async {
        status(good.port).await == Some(ServingStatus::Serving)
    })
    .await
    .expect("SERVING with the right credentials");
    create_and_read(&good, "Secret Keeper", "keeper@example.com").await;
    let scrape = crate::helpers::scrape_at(([127, 0, 0, 1], good.metrics_port).into()).await;
    assert!(
        scrape.contains("user_service_dependency_up"),
        "a real scrape"
    );

    // Wrong credentials (from the environment): never SERVING, and the log
    // says which settings to check.
    let bad = start(&redis, Some(&wrong), None);
    // NOT_SERVING is where it starts: first a few probes must have found
    // Redis down.
    crate::helpers::wait_probed_down_at(([127, 0, 0, 1], bad.metrics_port).into(), "redis", 3.0)
        .await;
    assert_eq!(status(bad.port).await, Some(ServingStatus::NotServing));

    // --help with the secret in the environment does not print it.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("--help")
        .env("REDIS_PASSWORD", &secret)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("REDIS_PASSWORD"), "the setting is documented");

    let good_log = stop(good).await;
    let bad_log = stop(bad).await;
    assert!(
        bad_log.contains("REDIS_PASSWORD"),
        "the refusal names the setting: {}",
        &bad_log[..bad_log.len().min(2000)]
    );
    for (what, text) in [
        ("log", &good_log),
        ("log", &bad_log),
        ("help", &help),
        ("metrics", &scrape),
    ] {
        for s in [&secret, &wrong] {
            assert!(!text.contains(s.as_str()), "a secret in the {what}");
        }
    }
    assert!(good_log.lines().count() > 10, "the service did log");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn redis_over_tls_with_an_acl_user_and_only_with_the_right_ca() {
    let files = crate::helpers::certs::Files::redis_server();
    let secret = format!("tls-{}", unique("pw"));
    let redis = AclRedis::start_with(
        &secret,
        Some((
            &files.path("redis.pem"),
            &files.path("redis.key"),
            &files.path("ca.pem"),
        )),
    );

    let config_with = |ca_file: &str| {
        let mut c = crate::helpers::test_config();
        c.redis_cluster_nodes.clear(); // its own Redis, in every mode
        c.redis_server_url = format!("rediss://127.0.0.1:{}", redis.port);
        c.redis_username = Some("svc".into());
        c.redis_password = Some(secrecy::SecretString::from(secret.clone()));
        c.redis_password_file = None;
        c.redis_tls_ca_file = Some(files.path(ca_file));
        c
    };
    // The right CA: the read model over TLS, a create and its read.
    let app = crate::helpers::spawn_app_with(config_with("ca.pem")).await;
    app.wait_health(ServingStatus::Serving).await;
    let created = app
        .create_req(CreateUserRequest {
            name: "Over TLS".into(),
            email: "tls@example.com".into(),
            request_id: unique("req"),
            ..Default::default()
        })
        .await
        .expect("created over TLS");
    let user = created.user.unwrap();
    let got = app
        .get_at(user.id, created.position, Duration::from_secs(10))
        .await
        .expect("read over TLS");
    assert_eq!(got, user);
    app.stop().await.expect("clean stop");

    // A CA that did not sign Redis's certificate: never SERVING.
    let app = crate::helpers::spawn_app_with(config_with("other-ca.pem")).await;
    crate::helpers::wait_probed_down(&app, "redis", 3.0).await;
    assert_eq!(
        app.health_status("").await.unwrap(),
        ServingStatus::NotServing,
        "an untrusted Redis certificate is refused"
    );
    app.stop().await.expect("clean stop");
}

/// The secured stack (`scripts/stack up --secure`: a broker whose clients
/// speak SASL_SSL with SCRAM-SHA-512, a TLS-only Redis with an ACL user),
/// started once per test process; its settings as the script prints them.
async fn secure_stack() -> Vec<(String, String)> {
    // One start for all the tests that need it: two concurrent starts would
    // each write the stack's certificates and secrets under the other.
    static ENV: tokio::sync::OnceCell<Vec<(String, String)>> = tokio::sync::OnceCell::const_new();
    ENV.get_or_init(|| async {
        let out =
            tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack"))
                .args(["up", "--secure"])
                .stderr(Stdio::inherit())
                .output()
                .await
                .expect("scripts/stack runs");
        assert!(out.status.success(), "scripts/stack up --secure failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
    .await
    .clone()
}

fn setting<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("scripts/stack up --secure prints {key}"))
}

fn with(env: &[(String, String)], key: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| k != key).cloned().collect();
    if let Some(v) = value {
        env.push((key.to_owned(), v.to_owned()));
    }
    env
}

async fn log_says(s: &Service, what: &str) -> bool {
    std::fs::read_to_string(&s.log).is_ok_and(|l| l.contains(what))
}

#[tokio::test]
async fn kafka_over_sasl_ssl_needs_the_right_credentials_and_ca_and_no_secret_is_ever_shown() {
    let stack = secure_stack().await;
    let kafka_secret = std::fs::read_to_string(setting(&stack, "KAFKA_SASL_PASSWORD_FILE"))
        .unwrap()
        .trim()
        .to_owned();
    let redis_secret = std::fs::read_to_string(setting(&stack, "REDIS_PASSWORD_FILE"))
        .unwrap()
        .trim()
        .to_owned();
    let wrong = format!("wr0ng-{}", unique("pw"));

    // Every link secured, every secret from a file: serving, in its group,
    // and a create and its read go through the broker and Redis over TLS.
    let good = start_binary(&stack);
    wait_until(Duration::from_secs(60), || async {
        status_of(good.port, "projector").await == Some(ServingStatus::Serving)
    })
    .await
    .expect("the projector SERVING over SASL_SSL");
    create_and_read(&good, "Scram Writer", "scram@example.com").await;
    let scrape = crate::helpers::scrape_at(([127, 0, 0, 1], good.metrics_port).into()).await;

    // A wrong password (from the environment, no file): the brokers refuse
    // it, Kafka's health names stay NOT_SERVING, a create is UNAVAILABLE,
    // and the log names the settings to check.
    let bad_password = with(
        &with(&stack, "KAFKA_SASL_PASSWORD_FILE", None),
        "KAFKA_SASL_PASSWORD",
        Some(&wrong),
    );
    let bad = start_binary(&with(&bad_password, "KAFKA_PUBLISH_TIMEOUT", Some("1s")));
    wait_until(Duration::from_secs(30), || {
        log_says(&bad, "the brokers refused the SASL credentials")
    })
    .await
    .expect("the refusal is logged");
    for name in ["kafka", "projector", "user.v1.ProjectionService"] {
        assert_eq!(
            status_of(bad.port, name).await,
            Some(ServingStatus::NotServing),
            "{name} with a wrong Kafka password"
        );
    }
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", bad.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = UserServiceClient::new(channel)
        .create_user(CreateUserRequest {
            name: "Never Written".into(),
            email: "never@example.com".into(),
            request_id: unique("req"),
            ..Default::default()
        })
        .await
        .expect_err("nothing is acknowledged without the broker");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // A CA that did not sign the broker's certificate: the handshake fails,
    // and the log says to check the CA setting.
    let files = crate::helpers::certs::Files::new();
    files.write(
        "other-ca.pem",
        &crate::helpers::certs::Ca::new("another CA").pem(),
    );
    let other_ca = files.path("other-ca.pem").display().to_string();
    let untrusted = start_binary(&with(&stack, "KAFKA_TLS_CA_FILE", Some(&other_ca)));
    wait_until(Duration::from_secs(30), || {
        log_says(
            &untrusted,
            "check KAFKA_SECURITY_PROTOCOL and KAFKA_TLS_CA_FILE",
        )
    })
    .await
    .expect("the failed handshake is logged");
    assert_eq!(
        status_of(untrusted.port, "kafka").await,
        Some(ServingStatus::NotServing)
    );

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("--help")
        .env("KAFKA_SASL_PASSWORD", &kafka_secret)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(
        help.contains("KAFKA_SASL_PASSWORD"),
        "the setting is documented"
    );

    let logs = [stop(good).await, stop(bad).await, stop(untrusted).await];
    for text in logs.iter().chain([&help, &scrape]) {
        for secret in [&kafka_secret, &redis_secret, &wrong] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret shown: {}",
                &text[..text.len().min(300)]
            );
        }
    }
    assert!(logs[0].lines().count() > 10, "the service did log");
}

/// Not a secret, but read from the same place: the binary's log. A Redis
/// whose `hash-max-listpack-value` is below what the read model's buckets
/// want gets a warning at start that names the setting; one set as the stack
/// sets it gets none.
#[tokio::test]
async fn a_redis_that_would_store_users_loosely_is_named_at_start() {
    for (limit, warned) in [("64", true), ("1024", false)] {
        let redis = crate::helpers::OwnRedis::start();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("hash-max-listpack-value")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .unwrap();
        let s = start_binary(&[
            ("REDIS_SERVER_URL".into(), redis.url()),
            ("KAFKA_BROKER_URL".into(), kafka_brokers()),
        ]);
        wait_until(Duration::from_secs(30), || async {
            log_says(&s, "hash-max-listpack-value checked").await
                || log_says(&s, "hash-max-listpack-value is below").await
        })
        .await
        .expect("the start checks Redis' hash-max-listpack-value");
        let log = stop(s).await;
        assert_eq!(
            log.contains("hash-max-listpack-value is below"),
            warned,
            "limit {limit}: {log}"
        );
    }
}
