//! How the service reaches its brokers: the bootstrap list and, on a secured
//! cluster, TLS and SASL credentials.
//!
//! Every client the service makes (the producer, the projector's consumer,
//! the admin client, the progress readers, the watchdog's probe) starts from
//! [`KafkaLink::client_config`], so none of them can forget the credentials,
//! and the password is handed to librdkafka there and nowhere else: the link
//! prints itself without it.

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};
use std::path::PathBuf;

/// The settings' values are plain configuration (config parses them); what
/// librdkafka calls them, and what each one asks of the link, is here.
pub use crate::config::{SaslMechanism, SecurityProtocol};

impl SecurityProtocol {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

impl SaslMechanism {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::Plain => "PLAIN",
        }
    }
}

/// A setting that does not fit with the others; names the settings only.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "KAFKA_SECURITY_PROTOCOL={0} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)"
    )]
    MissingCredentials(&'static str),
    #[error("KAFKA_TLS_CA_FILE: cannot read {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the brokers are and how to prove who we are to them.
#[derive(Clone, Default)]
pub struct KafkaLink {
    brokers: String,
    protocol: SecurityProtocol,
    sasl: Option<(SaslMechanism, String, SecretString)>,
    ca_file: Option<PathBuf>,
}

impl KafkaLink {
    /// A link without security, as local stacks and tests use.
    pub fn plaintext(brokers: &str) -> Self {
        Self {
            brokers: brokers.to_owned(),
            ..Self::default()
        }
    }

    /// Checks that the settings fit together: SASL needs a user and a
    /// password, a CA file must be readable (librdkafka would otherwise
    /// fail each connection later, far from the cause).
    pub fn new(
        brokers: &str,
        protocol: SecurityProtocol,
        mechanism: SaslMechanism,
        username: Option<String>,
        password: Option<SecretString>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, LinkError> {
        let sasl = if protocol.uses_sasl() {
            match (username, password) {
                (Some(u), Some(p)) if !u.is_empty() => Some((mechanism, u, p)),
                _ => return Err(LinkError::MissingCredentials(protocol.as_librdkafka())),
            }
        } else {
            None
        };
        if let Some(path) = &ca_file {
            std::fs::metadata(path).map_err(|source| LinkError::CaFile {
                path: path.clone(),
                source,
            })?;
        }
        Ok(Self {
            brokers: brokers.to_owned(),
            protocol,
            sasl,
            ca_file: ca_file.filter(|_| protocol.uses_tls()),
        })
    }

    /// The bootstrap list, as given.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Whether the link authenticates with a user and a password, so that
    /// a refusal can be blamed on them.
    pub fn has_credentials(&self) -> bool {
        self.sasl.is_some()
    }

    /// A client configuration with the bootstrap list and the security
    /// settings; each client adds its own settings on top.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("security.protocol", self.protocol.as_librdkafka());
        if let Some((mechanism, username, password)) = &self.sasl {
            c.set("sasl.mechanism", mechanism.as_librdkafka())
                .set("sasl.username", username)
                .set("sasl.password", password.expose_secret());
        }
        if let Some(ca) = &self.ca_file {
            c.set("ssl.ca.location", ca.to_string_lossy());
        }
        if self.protocol.uses_tls() {
            // Check that the certificate names the broker we dialled, as
            // HTTPS does (librdkafka's default since 2.0, said here on purpose).
            c.set("ssl.endpoint.identification.algorithm", "https");
        }
        c
    }

    /// What to tell an operator when the brokers refuse us: the settings to
    /// check, never their values.
    pub fn refusal_hint(&self) -> &'static str {
        if self.sasl.is_some() {
            "check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD / KAFKA_SASL_PASSWORD_FILE and KAFKA_SASL_MECHANISM"
        } else {
            "check KAFKA_SECURITY_PROTOCOL"
        }
    }
}

impl std::fmt::Debug for KafkaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("KafkaLink");
        d.field("brokers", &self.brokers)
            .field("protocol", &self.protocol);
        if let Some((mechanism, username, _)) = &self.sasl {
            d.field("mechanism", mechanism)
                .field("username", username)
                .field("password", &"[redacted]");
        }
        d.field("ca_file", &self.ca_file).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn sasl_needs_a_user_and_a_password_and_the_error_names_settings_only() {
        let e = KafkaLink::new(
            "b:9093",
            SecurityProtocol::SaslSsl,
            SaslMechanism::default(),
            Some("svc".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("KAFKA_SASL_PASSWORD"), "{e}");
        assert!(
            KafkaLink::new(
                "b:9093",
                SecurityProtocol::SaslSsl,
                SaslMechanism::default(),
                Some(String::new()),
                Some(secret("pw")),
                None,
            )
            .is_err()
        );
    }

    #[test]
    fn the_client_config_carries_the_credentials_and_debug_does_not() {
        let link = KafkaLink::new(
            "b:9093",
            SecurityProtocol::SaslSsl,
            SaslMechanism::ScramSha512,
            Some("svc".into()),
            Some(secret("hunter2-secret")),
            None,
        )
        .unwrap();
        let c = link.client_config();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.password"), Some("hunter2-secret"));
        assert!(!format!("{link:?}").contains("hunter2"));
        assert!(link.has_credentials());
    }

    #[test]
    fn plaintext_sets_no_credentials() {
        let c = KafkaLink::plaintext("b:9092").client_config();
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("sasl.username"), None);
        assert_eq!(c.get("ssl.ca.location"), None);
    }

    #[test]
    fn an_unreadable_ca_file_is_refused_at_once() {
        let e = KafkaLink::new(
            "b:9093",
            SecurityProtocol::Ssl,
            SaslMechanism::default(),
            None,
            None,
            Some("/nonexistent/ca.pem".into()),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("KAFKA_TLS_CA_FILE"), "{e}");
    }
}
