//! Errors of the Kafka adapter.

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The broker cannot be reached or did not acknowledge in time: retry later.
    #[error("kafka unavailable: {0}")]
    Unavailable(String),
    /// The brokers refuse this client's credentials or TLS handshake: a
    /// setting must change (the message names which, never its value).
    #[error("kafka refused the connection: {0}")]
    Refused(String),
    /// The client could not be built or the broker refused a request.
    #[error("kafka error: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}
