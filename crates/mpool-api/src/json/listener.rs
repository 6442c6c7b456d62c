//! Serving the facade's router on a listener (Unix socket or TCP, TLS when configured): one
//! HTTP/1.1 connection per task, with
//!
//! - a cap on open connections ([`ConnectionLimits::max_connections`]): at the cap nothing more
//!   is accepted, so further connections wait in the listen backlog until one closes;
//! - a header timeout ([`ConnectionLimits::header_timeout`]): a client that does not finish its
//!   TLS handshake or a request's headers within it (a slow-loris, or a keep-alive connection
//!   left idle) is dropped, freeing its place;
//! - a graceful end: at shutdown nothing more is accepted, idle connections close, and requests
//!   under way run to their end (the caller of [`serve`] bounds that with the grace period).
//!
//! A caller that disconnects drops its request, which cancels a running command.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// How the listener treats connections (`[api] http_header_timeout`, `http_max_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest wait for a TLS handshake, and for a request's headers once a request started or
    /// while the connection is idle.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serves `router` on the connections `accept` yields until `shutdown` turns true, then waits
/// for the requests under way to end.
pub async fn serve<S, F, Fut>(
    router: Router,
    mut accept: F,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if places.available_permits() == 0 {
            tracing::debug!(
                max = limits.max_connections,
                "http_listen: at the connection cap, accepting none until one closes"
            );
        }
        let place = tokio::select! {
            place = places.clone().acquire_owned() => place,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Ok(place) = place else { break };
        let stream = tokio::select! {
            s = accept() => s,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: the next accept may work.
                tracing::warn!("http_listen accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (router, tls, watcher) = (router.clone(), tls.clone(), graceful.watcher());
        connections.spawn(async move {
            match tls {
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => connection(s, router, limits, watcher).await,
                    Ok(Err(e)) => tracing::debug!("http_listen TLS handshake: {e}"),
                    Err(_) => tracing::debug!("http_listen: no TLS handshake within {:?}", limits.header_timeout),
                },
                None => connection(stream, router, limits, watcher).await,
            }
            drop(place);
        });
    }
    graceful.shutdown().await;
}

/// Serves one connection until it closes.
async fn connection<S>(
    stream: S,
    router: Router,
    limits: ConnectionLimits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!("http_listen connection: {e}");
    }
}
