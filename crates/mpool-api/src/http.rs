//! Plain HTTP endpoints: Prometheus `/metrics` (on its own listener).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use mpool_engine::Engine;
use mpool_metrics::Metrics;

/// Serves `GET /metrics` until the listener fails; other paths get 404 `try /metrics`.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Metrics, engine: Engine) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (metrics, engine) = (metrics.clone(), engine.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (metrics, engine) = (metrics.clone(), engine.clone());
                async move { answer(req.uri().path(), &metrics, &engine).await }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The answer to a GET of `path`. The engine's status is fetched first (a message to the
/// engine's actor, which holds nothing while the text is encoded), then the metrics and the
/// pool-state gauges are encoded.
async fn answer(path: &str, metrics: &Metrics, engine: &Engine) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (status, content_type, body) = if path == "/metrics" {
        let state = engine.status().await.ok();
        match metrics.render(state.as_ref()) {
            Ok(text) => (StatusCode::OK, mpool_metrics::CONTENT_TYPE, Bytes::from(text)),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                Bytes::from_static(b"the metrics could not be encoded\n"),
            ),
        }
    } else {
        (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"try /metrics\n"))
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .map_err(std::io::Error::other)
}
