//! Credentials to Redis (an ACL user) from a mounted file, and secrets that
//! never show: the real binary, on a Redis of its own that refuses the
//! default user, with the right password and with a wrong one.

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
    let name = unique("secrets");
    let (port, metrics_port) = (free_port(), free_port());
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
    // Its own Redis, whatever mode the suite runs in (the cluster pass sets
    // REDIS_CLUSTER_URLS, which would win).
    for inherited in [
        "REDIS_CLUSTER_URLS",
        "REDIS_SENTINEL_URLS",
        "REDIS_PASSWORD",
        "REDIS_PASSWORD_FILE",
    ] {
        cmd.env_remove(inherited);
    }
    cmd.env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("KAFKA_BROKER_URL", kafka_brokers())
        .env(
            "REDIS_SERVER_URL",
            format!("redis://127.0.0.1:{}", redis.port),
        )
        .env("REDIS_USERNAME", "svc")
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
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true);
    if let Some(p) = password_env {
        cmd.env("REDIS_PASSWORD", p);
    }
    if let Some(f) = password_file {
        cmd.env("REDIS_PASSWORD_FILE", f);
    }
    Service {
        child: cmd.spawn().expect("the binary starts"),
        port,
        metrics_port,
        log,
    }
}

async fn status(port: u16) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
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
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", good.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel);
    let created = users
        .create_user(CreateUserRequest {
            name: "Secret Keeper".into(),
            email: "keeper@example.com".into(),
            request_id: unique("req"),
            ..Default::default()
        })
        .await
        .expect("created through the ACL user")
        .into_inner();
    let id = created.user.unwrap().id;
    let mut read = tonic::Request::new(GetUserRequest {
        id,
        min_position: created.position,
    });
    read.set_timeout(Duration::from_secs(10));
    users.get_user(read).await.expect("read back");
    let scrape = crate::helpers::scrape_at(([127, 0, 0, 1], good.metrics_port).into()).await;
    assert!(
        scrape.contains("user_service_dependency_up"),
        "a real scrape"
    );

    // Wrong credentials (from the environment): never SERVING, and the log
    // says which settings to check.
    let bad = start(&redis, Some(&wrong), None);
    wait_until(Duration::from_secs(30), || async {
        status(bad.port).await == Some(ServingStatus::NotServing)
    })
    .await
    .expect("answers NOT_SERVING");
    tokio::time::sleep(Duration::from_millis(1000)).await; // a few probes
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
    use crate::tls::{Ca, Files};
    let (ca, other) = (Ca::new("redis CA"), Ca::new("another CA"));
    let files = Files::new();
    let (cert, key) = ca.leaf("redis", true);
    files.write("redis.pem", &cert);
    files.write("redis.key", &key);
    files.write("ca.pem", &ca.pem());
    files.write("other-ca.pem", &other.pem());
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
    tokio::time::sleep(Duration::from_millis(1500)).await; // several probes
    assert_eq!(
        app.health_status("").await.unwrap(),
        ServingStatus::NotServing,
        "an untrusted Redis certificate is refused"
    );
    app.stop().await.expect("clean stop");
}
