//! The settings turned into what the adapters take: where Redis is and the
//! credentials for it, how every Kafka client reaches the brokers. `config`
//! holds the operator's values and names no adapter; these conversions are
//! methods of [`Config`] all the same, defined here, where config and the
//! adapters meet.

use crate::{
    config::{Config, SecretFileError, read_secret_file},
    kafka::{KafkaLink, LinkError},
    store::{RedisAuth, RedisTarget},
};

/// Kafka settings that cannot work together, or a secret file that cannot
/// be read; names settings, never values.
#[derive(Debug, thiserror::Error)]
pub enum KafkaLinkError {
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl Config {
    /// Where Redis is: Sentinel when sentinels are given, else the server URL.
    pub fn redis_target(&self) -> RedisTarget {
        let cluster: Vec<String> = self
            .redis_cluster_nodes
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if !cluster.is_empty() {
            return RedisTarget::Cluster(cluster);
        }
        if self.redis_sentinels.iter().any(|s| !s.trim().is_empty()) {
            RedisTarget::Sentinel {
                sentinels: self
                    .redis_sentinels
                    .iter()
                    .map(|s| s.trim().to_owned())
                    .collect(),
                master: self.redis_sentinel_master.clone(),
            }
        } else {
            RedisTarget::Server(self.redis_url())
        }
    }

    /// The Redis credentials: `REDIS_USERNAME` and the password from
    /// `REDIS_PASSWORD_FILE` or `REDIS_PASSWORD`.
    pub fn redis_auth(&self) -> Result<RedisAuth, SecretFileError> {
        let password = match &self.redis_password_file {
            Some(path) => Some(read_secret_file("REDIS_PASSWORD_FILE", path)?),
            None => self.redis_password.clone(),
        };
        let tls_ca = match &self.redis_tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| SecretFileError {
                setting: "REDIS_TLS_CA_FILE",
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        Ok(RedisAuth {
            username: self.redis_username.clone(),
            password,
            tls_ca,
        })
    }

    /// How every Kafka client of the service reaches the brokers; the
    /// settings are checked together here, before anything starts.
    pub fn kafka_link(&self) -> Result<KafkaLink, KafkaLinkError> {
        let password = match &self.kafka_sasl_password_file {
            Some(path) => Some(read_secret_file("KAFKA_SASL_PASSWORD_FILE", path)?),
            None => self.kafka_sasl_password.clone(),
        };
        Ok(KafkaLink::new(
            &self.kafka_broker_url,
            self.kafka_security_protocol,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username.clone(),
            password,
            self.kafka_tls_ca_file.clone(),
        )?)
    }
}
