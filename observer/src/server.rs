//! The HTTP endpoint: `/metrics` (Prometheus text, or OpenMetrics when the scraper asks
//! for it) and `/healthz` (the pump is reporting), on TCP, TCP with TLS, or a Unix socket.
//! Only GET and HEAD are answered (405 otherwise); nothing else is served.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{django::expo, selfmetrics::SelfStats};

/// What the `/metrics` endpoint reads: every app's registry (by its root pid) and the
/// agent's own stats. The pipeline writes it; the server only reads it.
#[derive(Default)]
pub struct Exposition {
    pub registries: std::collections::BTreeMap<u32, prometheus::Registry>,
    pub stats: SelfStats,
    /// When the pump last reported (for /healthz).
    pub last_report: Option<std::time::Instant>,
}

/// The pump reports every second; this much silence means it is stuck.
const STALE: Duration = Duration::from_secs(15);
/// A TLS client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 64;

type Shared = Arc<Mutex<Exposition>>;

/// Where /metrics is served: `ADDR:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(path) => Ok(Self::Unix(path.into())),
            None => s.parse().map(Self::Tcp).map_err(|_| format!("{s:?} is neither ADDR:PORT nor unix:PATH")),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks both files now, so that a bad one stops the agent at start.
    fn acceptor(&self) -> Result<TlsAcceptor> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| anyhow::anyhow!("reading the TLS certificate {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("no certificate in {}", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| anyhow::anyhow!("reading the TLS key {}: {e}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the TLS certificate and key do not make a server configuration")?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let (registries, stats) = {
        let e = crate::fault::lock(&shared);
        (e.registries.values().cloned().collect::<Vec<_>>(), e.stats.clone())
    };
    let mut sets: Vec<_> = registries.iter().map(prometheus::Registry::gather).collect();
    sets.push(stats.families());
    let families = expo::merge(sets);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if expo::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, expo::OPENMETRICS_CONTENT_TYPE)], expo::encode_openmetrics(&families))
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, expo::TEXT_CONTENT_TYPE)], expo::encode_text(&families)).into_response()
    }
}

async fn healthz(State(shared): State<Shared>) -> Response {
    let fresh = crate::fault::lock(&shared).last_report.is_some_and(|t| t.elapsed() < STALE);
    if fresh {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stale\n").into_response()
    }
}

/// `get` routes answer GET and HEAD and give 405 (with `Allow`) to every other method.
fn router(shared: Shared) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(shared)
}

/// Binds `listen` (with TLS when `tls` is given) and serves until the runtime stops.
/// Returns where it is bound (the port chosen, when 0 was asked).
pub async fn serve(listen: &Listen, tls: Option<&TlsFiles>, shared: Shared) -> Result<Listen> {
    let app = router(shared);
    match (listen, tls) {
        (Listen::Tcp(addr), None) => {
            let listener = bind_tcp(*addr).await?;
            let bound = Listen::Tcp(listener.local_addr()?);
            spawn(axum::serve(listener, app).into_future());
            Ok(bound)
        }
        (Listen::Tcp(addr), Some(files)) => {
            let acceptor = files.acceptor()?;
            let listener = bind_tcp(*addr).await?;
            let bound = Listen::Tcp(listener.local_addr()?);
            spawn(axum::serve(TlsListener::new(listener, acceptor), app).into_future());
            Ok(bound)
        }
        (Listen::Unix(path), None) => {
            let listener = bind_unix(path)?;
            spawn(axum::serve(listener, app).into_future());
            Ok(listen.clone())
        }
        (Listen::Unix(_), Some(_)) => bail!("TLS is for TCP: a Unix socket is protected by its file mode"),
    }
}

fn spawn(server: impl std::future::Future<Output = std::io::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            anyhow::anyhow!("listening on {addr}: the address is already in use")
        }
        _ => anyhow::Error::new(e).context(format!("listening on {addr}")),
    })
}

/// A Unix socket at `path`. A socket file left by an agent that died is replaced; one that
/// a live process still accepts on is not.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("listening on unix:{}: the path exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("listening on unix:{}: another process is serving on it", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listening on unix:{}", path.display()))
}

/// TCP with TLS for axum: handshakes run in their own tasks (at most MAX_HANDSHAKES at
/// once, each under HANDSHAKE_TIMEOUT), so a client that stalls its handshake holds up
/// nobody; finished ones are handed to the server through a small queue.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: TlsAcceptor) -> Self {
        let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a metrics connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Self { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::Listen;

    #[test]
    fn listen_takes_tcp_or_unix() {
        assert_eq!("127.0.0.1:9807".parse(), Ok(Listen::Tcp("127.0.0.1:9807".parse().unwrap())));
        assert_eq!("[::1]:0".parse(), Ok(Listen::Tcp("[::1]:0".parse().unwrap())));
        assert_eq!("unix:/run/observer.sock".parse(), Ok(Listen::Unix("/run/observer.sock".into())));
        assert!("unix:".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().unwrap_err().contains("neither ADDR:PORT nor unix:PATH"));
        assert_eq!(Listen::Unix("/a".into()).to_string(), "unix:/a");
    }
}
