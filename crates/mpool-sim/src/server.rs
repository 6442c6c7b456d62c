//! The simulator's listeners: a Unix socket (and optionally TCP), each connection's TLS
//! handshake in its own task with a deadline (one stalled client must not block the others),
//! then tonic serving the handshaken streams.
//!
//! Every connection can be cut at once ([`Daemon::kill_connections`]): what clients see when
//! multipassd aborts mid-call or is killed. The socket file is unlinked only by the simulator
//! that created it: a new simulator may already have bound the same path.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::SimConfig;
use super::daemon::Daemon;
use super::service::Service;
use mpool_multipass::proto::multipass::rpc_server::RpcServer;

/// Socket mode as multipassd sets it: 0660 while nobody is trusted, 0666 once someone is.
pub fn open_socket_permissions(cfg: &SimConfig) {
    let _ = std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666));
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket file this simulator bound: its path and identity (device, inode), so that it
/// is unlinked only while it is still ours.
#[derive(Clone, Debug)]
pub struct OwnedSocket {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl OwnedSocket {
    fn bound(path: &Path) -> OwnedSocket {
        let id = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        OwnedSocket { path: path.to_path_buf(), id }
    }

    /// Whether the file at the path is still the one we bound.
    pub fn still_ours(&self) -> bool {
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        now.is_some() && now == self.id
    }

    /// Unlinks the socket file if it is still ours; leaves another simulator's alone.
    pub fn remove(&self) {
        if self.still_ours() {
            let _ = std::fs::remove_file(&self.path);
        } else {
            tracing::debug!(socket = %self.path.display(), "socket file now belongs to another server: left in place");
        }
    }
}

/// A connection that ends (with an error, as a reset) once `killed` turns true.
struct Killable<S> {
    inner: S,
    killed: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    dead: bool,
}

impl<S> Killable<S> {
    fn new(inner: S, mut rx: watch::Receiver<bool>) -> Killable<S> {
        let killed = Box::pin(async move {
            let _ = rx.wait_for(|k| *k).await;
        });
        Killable { inner, killed, dead: false }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the daemon died"))
        } else {
            Ok(())
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Killable<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections with `accept` until the server stops, handshakes each in its own task,
/// and queues the TLS streams (cut together when `kill` turns true) for tonic.
fn accept_loop<S, F, Fut>(
    mut accept: F,
    acceptor: tokio_rustls::TlsAcceptor,
    kill: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<Killable<tokio_rustls::server::TlsStream<S>>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // Stop accepting (and drop the listener: new clients are refused) once tonic has
            // stopped taking connections.
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = accept() => a,
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx, kill) = (acceptor.clone(), tx.clone(), kill.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Killable::new(tls, kill))).await;
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
/// socket it owns and the future that serves the daemon until `shutdown` turns true or the
/// daemon stops serving by itself (abort, wedge).
pub fn serve(
    daemon: Arc<Daemon>,
    tls: rustls::ServerConfig,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(OwnedSocket, impl std::future::Future<Output = std::io::Result<()>> + Send)> {
    let cfg = daemon.cfg.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // As multipassd: a socket file left by a previous daemon is replaced.
    if std::fs::symlink_metadata(&cfg.socket).is_ok() {
        std::fs::remove_file(&cfg.socket)?;
    }
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let unix = tokio::net::UnixListener::bind(&cfg.socket)?;
    let owned = OwnedSocket::bound(&cfg.socket);
    let mode = if daemon.trust.is_empty() { 0o660 } else { 0o666 };
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
    let stopping = {
        let d = daemon.clone();
        move || {
            let (d, mut rx) = (d.clone(), shutdown.clone());
            async move {
                tokio::select! {
                    _ = rx.wait_for(|s| *s) => {}
                    _ = d.stopped_serving() => {}
                }
            }
        }
    };
    let socket = owned.clone();
    Ok((owned, async move {
        let mut servers = tokio::task::JoinSet::new();
        let unix = Arc::new(unix);
        let incoming = accept_loop(
            move || {
                let l = unix.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            acceptor.clone(),
            daemon.connection_kill_switch(),
        );
        let svc = RpcServer::from_arc(service.clone());
        let sd = stopping();
        servers.spawn(async move {
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(incoming, sd).await
        });
        if let Some(tcp) = tcp {
            let tcp = Arc::new(tcp);
            let incoming = accept_loop(
                move || {
                    let l = tcp.clone();
                    async move { l.accept().await.map(|(s, _)| s) }
                },
                acceptor,
                daemon.connection_kill_switch(),
            );
            let svc = RpcServer::from_arc(service);
            let sd = stopping();
            servers.spawn(async move {
                tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(incoming, sd).await
            });
        }
        while let Some(res) = servers.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        // An aborted daemon leaves its socket file behind (clients get "connection refused"
        // until it is restarted); otherwise remove it, if it is still ours.
        if !daemon.aborted() {
            socket.remove();
        }
        Ok(())
    }))
}
