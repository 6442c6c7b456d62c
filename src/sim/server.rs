//! The simulator's listeners: a Unix socket (and optionally TCP), each connection's TLS
//! handshake in its own task with a deadline (one stalled client must not block the others),
//! then tonic serving the handshaken streams.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::SimConfig;
use super::daemon::Daemon;
use super::service::Service;
use crate::proto::multipass::rpc_server::RpcServer;

/// Socket mode as multipassd sets it: 0660 while nobody is trusted, 0666 once someone is.
pub fn open_socket_permissions(cfg: &SimConfig) {
    let _ = std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666));
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections with `accept`, handshakes each in its own task, and queues the TLS
/// streams for tonic.
fn accept_loop<S, F, Fut>(
    mut accept: F,
    acceptor: tokio_rustls::TlsAcceptor,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = match accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds the listeners now (so clients can connect as soon as this returns) and gives the
/// future that serves the daemon until `shutdown` turns true.
pub fn serve(
    daemon: Arc<Daemon>,
    tls: rustls::ServerConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>> + Send> {
    let cfg = daemon.cfg.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    if cfg.socket.exists() {
        std::fs::remove_file(&cfg.socket)?;
    }
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let unix = tokio::net::UnixListener::bind(&cfg.socket)?;
    let mode = if daemon.trust.is_empty() {
        0o660
    } else {
        0o666
    };
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))?;
    let tcp = match cfg.tcp {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(l)?)
        }
        None => None,
    };
    let service = Arc::new(Service::new(daemon.clone()));
    Ok(async move {
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let mut servers = tokio::task::JoinSet::new();
        let unix = Arc::new(unix);
        let incoming = accept_loop(
            move || {
                let l = unix.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            acceptor.clone(),
        );
        let svc = RpcServer::from_arc(service.clone());
        let sd = wait(shutdown.clone());
        servers.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, sd)
                .await
        });
        if let Some(tcp) = tcp {
            let tcp = Arc::new(tcp);
            let incoming = accept_loop(
                move || {
                    let l = tcp.clone();
                    async move { l.accept().await.map(|(s, _)| s) }
                },
                acceptor,
            );
            let svc = RpcServer::from_arc(service);
            let sd = wait(shutdown.clone());
            servers.spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, sd)
                    .await
            });
        }
        while let Some(res) = servers.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let _ = std::fs::remove_file(&cfg.socket);
        Ok(())
    })
}
