//! The API's listeners, in one place: a Unix socket (mode 0660; its file mode is the access
//! control) and/or TCP (bearer tokens or mTLS required; TLS required off loopback), each serving
//! the Pool service, `grpc.health.v1` and reflection v1 + v1alpha (health and reflection stay
//! open so probes and grpcurl `list`/`describe` work), plus Prometheus `/metrics` on its own
//! listener. Shutdown stops accepting, lets running calls finish for a grace period, then cuts
//! them (leases stay in the store). `http_listen` serves the HTTP/JSON facade ([`super::json`])
//! with the same authentication layer as the gRPC listeners.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tower::Layer;

use super::auth::{Auth, AuthLayer, Tokens, grpc_refusal};
use super::credentials::{self, LiveCert, LiveTokens};
use super::json::listener::ConnectionLimits;
use super::service::PoolService;
use crate::app::App;
use crate::proto::v1::pool_server::PoolServer;
use mpool_config::{ApiConfig, Listen};
use mpool_engine::Engine;
use mpool_metrics::Metrics;

/// Largest request message accepted (a 10 MB JSON string is refused with RESOURCE_EXHAUSTED).
pub const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Everything the listeners serve.
#[derive(Clone)]
pub struct Served {
    /// The application: the use cases the gRPC service and the HTTP/JSON facade call.
    pub app: App,
    /// The engine (health, gauges).
    pub engine: Engine,
    /// The metrics registry.
    pub metrics: Metrics,
}

fn loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Decides how a TCP listener authenticates, refusing insecure setups with the fix.
fn tcp_auth(cfg: &ApiConfig, addr: &SocketAddr, tokens: &Option<Arc<LiveTokens>>) -> Result<Auth, String> {
    if !loopback(addr) && cfg.tls_cert.is_none() {
        return Err(format!(
            "[api] listen {addr}: TCP beyond loopback needs TLS; set tls_cert and tls_key (and tokens_file or client_ca)"
        ));
    }
    match (tokens, &cfg.client_ca) {
        (Some(t), _) => Ok(Auth::Tokens(t.clone())),
        (None, Some(_)) => Ok(Auth::ClientCert),
        (None, None) => Err(format!(
            "[api] listen {addr}: a TCP listener needs callers to authenticate; set tokens_file (bearer tokens) or client_ca (mTLS)"
        )),
    }
}

/// How long a client has for its TLS handshake on a gRPC listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The API's credentials of the moment, which a reload replaces in place (see
/// [`crate::credentials`]): the tokens (with `tokens_file`) and the certificate (with
/// `tls_cert`).
#[derive(Clone, Default)]
pub struct Credentials {
    /// The tokens.
    pub tokens: Option<Arc<LiveTokens>>,
    /// The TLS certificate and key.
    pub cert: Option<Arc<LiveCert>>,
}

/// What [`check`] derived from the config: the credentials and the TLS configs of the gRPC
/// listeners (HTTP/2) and the HTTP/JSON facade (HTTP/1.1), ready to serve with.
pub struct Checked {
    creds: Credentials,
    grpc_tls: Option<tokio_rustls::TlsAcceptor>,
    http_tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Validates the `[api]` section as serving it would, without binding anything: the tokens
/// file, the TLS files, and that every TCP listener (gRPC and HTTP) is one `serve` accepts
/// (authentication set; TLS beyond loopback). `mpool serve --check` and `mpool serve` both
/// call this, so a config that passes the check is one serve starts with.
pub fn check(cfg: &ApiConfig) -> Result<Checked, String> {
    let tokens = match &cfg.tokens_file {
        Some(p) => Some(Arc::new(LiveTokens::new(Tokens::load(p)?))),
        None => None,
    };
    for listen in cfg.listen.iter().chain(cfg.http_listen.iter()) {
        if let Listen::Tcp(addr) = listen {
            tcp_auth(cfg, addr, &tokens)?;
        }
    }
    let cert = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(Arc::new(LiveCert::load(c, k)?)),
        _ => None,
    };
    let acceptor = |alpn: &[&[u8]]| -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        let Some(cert) = &cert else { return Ok(None) };
        let config = credentials::server_config(cert.clone(), cfg.client_ca.as_deref(), alpn)?;
        Ok(Some(tokio_rustls::TlsAcceptor::from(config)))
    };
    let grpc_tls = acceptor(&[b"h2"])?;
    let http_tls = match &cfg.http_listen {
        Some(Listen::Tcp(_)) => acceptor(&[b"http/1.1"])?,
        _ => None,
    };
    Ok(Checked { creds: Credentials { tokens, cert }, grpc_tls, http_tls })
}

/// Validates everything ([`check`]), binds the TCP listeners, then the Unix sockets last (so a
/// config error leaves no socket behind), and returns the future that serves until `shutdown`
/// turns true and then removes the Unix sockets it bound.
pub async fn bind(
    cfg: &ApiConfig,
    served: Served,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(impl std::future::Future<Output = ()> + Send + 'static, Credentials), String> {
    let Checked { creds, grpc_tls, http_tls } = check(cfg)?;
    let tokens = creds.tokens.clone();
    // TCP listeners first: "address in use" and the like surface before any Unix socket exists.
    let mut tcp = std::collections::HashMap::new();
    for listen in cfg.listen.iter().map(|l| (l, "listen")).chain(cfg.http_listen.iter().map(|l| (l, "http_listen"))) {
        if let (Listen::Tcp(addr), key) = listen {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("[api] {key} {addr}: {e}"))?;
            tcp.insert((key, *addr), l);
        }
    }
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("[api] metrics_listen {addr}: {e}"))?)
        }
        None => None,
    };
    // Then the Unix sockets; each is removed when serving ends (or if binding a later one fails).
    let mut sockets = Vec::new();
    let mut unix = std::collections::HashMap::new();
    for (listen, key) in
        cfg.listen.iter().map(|l| (l, "listen")).chain(cfg.http_listen.iter().map(|l| (l, "http_listen")))
    {
        if let Listen::Unix(path) = listen {
            let (l, guard) = bind_unix(path, key)?;
            sockets.push(guard);
            unix.insert((key, path.clone()), l);
        }
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    spawn_health(served.engine.clone(), health_reporter);
    // The descriptor set also holds multipassd's protocol (`multipass.Rpc`), which these
    // listeners do not serve: advertise only the services that answer here.
    let reflection = |own: &str| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("mpool.v1.Pool")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(own)
    };
    let v1 = reflection("grpc.reflection.v1.ServerReflection").build_v1().map_err(|e| format!("reflection: {e}"))?;
    let v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let mut servers = tokio::task::JoinSet::new();
    for listen in &cfg.listen {
        let auth = match listen {
            Listen::Unix(_) => Auth::Open,
            Listen::Tcp(addr) => tcp_auth(cfg, addr, &tokens)?,
        };
        let pool = AuthLayer::new(auth, grpc_refusal as fn(_) -> _)
            .layer(PoolServer::new(PoolService::new(served.app.clone())).max_decoding_message_size(MAX_MESSAGE));
        let mut builder = Server::builder().layer(super::errors::ErrorCounter::layer(served.metrics.clone()));
        let router =
            builder.add_service(health.clone()).add_service(v1.clone()).add_service(v1alpha.clone()).add_service(pool);
        let mut sd = shutdown.clone();
        let stop = async move {
            let _ = sd.wait_for(|s| *s).await;
        };
        match listen {
            Listen::Unix(path) => {
                let l = unix
                    .remove(&("listen", path.clone()))
                    .ok_or_else(|| format!("[api] listen unix:{}: listed twice", path.display()))?;
                servers
                    .spawn(async move { router.serve_with_incoming_shutdown(UnixListenerStream::new(l), stop).await });
            }
            Listen::Tcp(addr) => {
                let l = tcp.remove(&("listen", *addr)).ok_or_else(|| format!("[api] listen {addr}: listed twice"))?;
                // TCP_NODELAY: with a custom incoming stream tonic does not set it, and Nagle's
                // algorithm then holds a reply's last frames until the client's delayed ACK
                // (~40 ms per call).
                let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(l), |s| {
                    if let Ok(s) = &s
                        && let Err(e) = s.set_nodelay(true)
                    {
                        tracing::debug!("TCP_NODELAY on an API connection: {e}");
                    }
                    s
                });
                match grpc_tls.clone() {
                    None => {
                        servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await });
                    }
                    Some(tls) => {
                        let incoming = tls_incoming(incoming, tls);
                        servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await });
                    }
                }
            }
        }
    }
    if let Some(l) = metrics_listener {
        let (metrics, engine, mut sd) = (served.metrics.clone(), served.engine.clone(), shutdown.clone());
        servers.spawn(async move {
            tokio::select! {
                _ = super::http::serve_metrics(l, metrics, engine) => {}
                _ = sd.wait_for(|s| *s) => {}
            }
            Ok(())
        });
    }
    if let Some(listen) = &cfg.http_listen {
        let auth = match listen {
            Listen::Unix(_) => Auth::Open,
            Listen::Tcp(addr) => tcp_auth(cfg, addr, &tokens)?,
        };
        let router = super::json::router(served.app.clone(), auth);
        let limits =
            ConnectionLimits { header_timeout: cfg.http_header_timeout, max_connections: cfg.http_max_connections };
        let sd = shutdown.clone();
        match listen {
            Listen::Unix(path) => {
                let l = unix
                    .remove(&("http_listen", path.clone()))
                    .ok_or_else(|| format!("[api] http_listen unix:{}: also a gRPC listener", path.display()))?;
                let l = Arc::new(l);
                let accept = move || {
                    let l = l.clone();
                    async move { l.accept().await.map(|(s, _)| s) }
                };
                servers.spawn(async move {
                    super::json::listener::serve(router, accept, None, limits, sd).await;
                    Ok(())
                });
            }
            Listen::Tcp(addr) => {
                let tls = http_tls.clone();
                let l = tcp
                    .remove(&("http_listen", *addr))
                    .ok_or_else(|| format!("[api] http_listen {addr}: also a gRPC listener"))?;
                let l = Arc::new(l);
                let accept = move || {
                    let l = l.clone();
                    async move {
                        let (s, _) = l.accept().await?;
                        // Small JSON answers: do not wait for delayed ACKs.
                        let _ = s.set_nodelay(true);
                        Ok(s)
                    }
                };
                servers.spawn(async move {
                    super::json::listener::serve(router, accept, tls, limits, sd).await;
                    Ok(())
                });
            }
        }
    }
    let mut sd = shutdown;
    let ssh = served.app.ssh_cache();
    let serving = async move {
        let _ = sd.wait_for(|s| *s).await;
        // Running calls get `grace` to finish; then their commands are killed.
        if tokio::time::timeout(grace, async { while servers.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!("calls still running after the {grace:?} grace period: cancelling them");
            ssh.close_all().await;
            servers.abort_all();
        }
        drop(sockets);
    };
    Ok((serving, creds))
}

/// TLS over accepted TCP connections: each handshake runs in its own task with a deadline (one
/// slow client never holds up the others), with the certificate of the moment; the connections
/// whose handshake succeeded come out, the others are dropped with a debug line.
fn tls_incoming(
    tcp: impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
    tls: tokio_rustls::TlsAcceptor,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        tokio::pin!(tcp);
        while let Some(conn) = tokio_stream::StreamExt::next(&mut tcp).await {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("accepting an API connection: {e}");
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let (tls, conn_tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let _ = conn_tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake on an API connection: {e}"),
                    Err(_) => {
                        tracing::debug!("TLS handshake on an API connection: no handshake within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A Unix socket this process bound: removed when dropped, unless another process has replaced
/// it since (a newer `mpool serve` on the same path keeps its socket).
pub struct SocketFile {
    path: std::path::PathBuf,
    inode: Option<(u64, u64)>,
}

fn inode(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.inode.is_some() && inode(&self.path) == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds an API Unix socket (replacing a stale one, creating its directory) with mode 0660:
/// the file mode is its access control. `key` names the config key in errors.
///
/// The socket is bound under a temporary name beside `path`, made 0660, and renamed into place:
/// the path appears only once it listens with its final mode, so a client that sees the file can
/// connect, and nobody ever meets it with the default mode.
fn bind_unix(path: &std::path::Path, key: &str) -> Result<(tokio::net::UnixListener, SocketFile), String> {
    let shown = |e: std::io::Error| format!("[api] {key} unix:{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staged = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let l = tokio::net::UnixListener::bind(&staged).map_err(shown)?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(shown(e));
    }
    let guard = SocketFile { path: path.to_path_buf(), inode: inode(path) };
    Ok((l, guard))
}

/// Keeps `grpc.health.v1` in step with the daemon: NOT_SERVING while multipassd does not answer.
fn spawn_health(engine: Engine, reporter: tonic_health::server::HealthReporter) {
    let mut healthy = engine.healthy();
    tokio::spawn(async move {
        loop {
            let ok = *healthy.borrow_and_update();
            let status =
                if ok { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            reporter.set_service_status("mpool.v1.Pool", status).await;
            if healthy.changed().await.is_err() {
                return;
            }
        }
    });
}
