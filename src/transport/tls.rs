//! gRPC over TLS (rustls), optionally requiring client certificates (mTLS)
//! signed by a configured CA. The files are read again when they change, so a
//! rotated certificate (a Kubernetes Secret swapped under its mount, a
//! cert-manager renewal) serves new connections without a restart, while
//! connections already open, and their streams, go on with the one they
//! began with. A handshake that does not finish in time is dropped, and no
//! more than `TLS_MAX_HANDSHAKES` run at once, so half-open connections
//! cannot pile up.

use super::{
    connections::Cap,
    ping_policy::{PingPolicy, Policed},
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

/// What went wrong with the TLS settings or files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS_CERT_FILE and TLS_KEY_FILE go together (one is set, not the other)")]
    Incomplete,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what} in PEM")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Where the server's certificate, key and (for mTLS) client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files as configured: none (plaintext), or a certificate and its key.
    pub fn from_settings(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (None, None) if client_ca.is_none() => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.map(Path::to_owned),
            })),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn read(&self) -> Result<Contents, TlsError> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
            .into_iter()
            .map(|path| match std::fs::read(&path) {
                Ok(bytes) => Ok((path, bytes)),
                Err(source) => Err(TlsError::Read { path, source }),
            })
            .collect()
    }

    /// Builds the rustls configuration from the files' current contents.
    fn load(&self, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
        let bytes_of = |path: &Path| {
            contents
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, b)| b.as_slice())
                .unwrap_or_default()
        };
        let invalid = |path: &Path, reason: String| TlsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(bytes_of(&self.cert))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                path: self.cert.clone(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(bytes_of(&self.key))
            .map_err(|e| invalid(&self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&self.cert, e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(bytes_of(ca)) {
                    let cert = cert.map_err(|e| invalid(ca, e.to_string()))?;
                    roots.add(cert).map_err(|e| invalid(ca, e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(TlsError::Empty {
                        path: ca.clone(),
                        what: "CA certificate",
                    });
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid(&self.cert, e.to_string()))?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Each file's path and contents, as last read.
type Contents = Vec<(PathBuf, Vec<u8>)>;

/// The configuration new connections get, replaced when the files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Contents, Arc<ServerConfig>)>,
    reloads: std::sync::atomic::AtomicU64,
}

impl ReloadingTls {
    /// Reads the files once; a bad file here stops the start-up.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let contents = files.read()?;
        let config = files.load(&contents)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new((contents, config)),
            reloads: Default::default(),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Times a changed file was loaded.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").1.clone()
    }

    /// Reads the files again; loads them if they changed. A file caught
    /// half-written, or a bad new one, leaves the last good configuration
    /// in place (and says so), to be tried again next time.
    fn check(&self) {
        let contents = match self.files.read() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "TLS files not readable; keeping the current certificate");
                return;
            }
        };
        if self.current.read().expect("tls lock").0 == contents {
            return;
        }
        match self.files.load(&contents) {
            Ok(config) => {
                *self.current.write().expect("tls lock") = (contents, config);
                self.reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded: new connections use it");
            }
            Err(e) => {
                tracing::warn!(error = %e, "changed TLS files do not load; keeping the current certificate");
            }
        }
    }

    /// Checks the files every `every` until `token` is cancelled.
    pub async fn watch(self: Arc<Self>, every: Duration, token: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => self.check(),
            }
        }
    }
}

/// How [`incoming`] takes connections.
pub struct Accepting {
    /// A handshake not done by then is dropped.
    pub handshake_timeout: Duration,
    /// Each connection's place, from the accept to its close.
    pub connections: Cap,
    /// Each handshake's place, while it runs.
    pub handshakes: Cap,
    /// Each decrypted stream is under it (see [`super::ping_policy`]).
    pub pings: PingPolicy,
}

/// The TLS connections accepted on `listener`, as tonic's incoming stream.
/// Handshakes run side by side (a slow one holds up no other), each bounded
/// by its timeout, at most `handshakes` at once: a connection accepted past
/// that cap, or past the cap on connections, is closed at once (and
/// counted). Failed handshakes are logged at debug and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    accepting: Accepting,
    token: CancellationToken,
    tasks: &crate::tasks::Tasks,
) -> tokio_stream::wrappers::ReceiverStream<Result<Policed<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = tasks.clone();
    let Accepting {
        handshake_timeout,
        connections,
        handshakes: handshake_cap,
        pings,
    } = accepting;
    tasks.spawn("TLS accept loop", async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = token.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Refused: dropped here, closed before a byte is read.
            let Some(admission) = connections.admit(Some(peer)) else {
                continue;
            };
            let Some(handshaking) = handshake_cap.admit(Some(peer)) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            let pings = pings.clone();
            handshakes.spawn("TLS handshake", async move {
                let done = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(handshaking);
                match done {
                    Ok(Ok(stream)) => {
                        let policed = pings.police(stream, Some(peer)).holding(admission);
                        let _ = tx.send(Ok(policed)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
