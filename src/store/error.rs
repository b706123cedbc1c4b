//! Errors of the Redis adapter (the read model and its checkpoint).

/// What went wrong talking to Redis, sorted by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or did not answer in time: retry later.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered, but not as expected (a bug or a foreign writer).
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
    /// A stored value does not decode.
    #[error("stored value at {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        use redis::RetryMethod;
        // Wrong or missing credentials: say which settings, never their values.
        if matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
            || e.kind() == redis::ErrorKind::AuthenticationFailed
        {
            return StoreError::Unavailable(format!(
                "Redis refused the credentials (check REDIS_USERNAME and REDIS_PASSWORD / REDIS_PASSWORD_FILE): {}",
                e.code().unwrap_or("authentication failed")
            ));
        }
        // The redis crate's own verdict on whether a retry can help (it says
        // "wait and retry" for a Sentinel that knows no master yet, mid-failover).
        let retryable = !matches!(e.retry_method(), RetryMethod::NoRetry);
        if retryable
            || e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            // A demoted master (after a Sentinel failover) refuses writes.
            || e.code() == Some("READONLY")
            || e.to_string().contains("READONLY")
        {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Protocol(e.to_string())
        }
    }
}

impl From<bb8::RunError<redis::RedisError>> for StoreError {
    fn from(e: bb8::RunError<redis::RedisError>) -> Self {
        match e {
            bb8::RunError::User(e) => e.into(),
            bb8::RunError::TimedOut => {
                StoreError::Unavailable("no Redis connection within the timeout".into())
            }
        }
    }
}
