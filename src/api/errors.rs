//! A tower layer that counts API calls ending with an error status, by method and code, for
//! `mpool_grpc_errors_total` (errors a handler returns are trailers-only responses, so the
//! status is in the response headers).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::metrics::Metrics;

/// The layer.
#[derive(Clone)]
pub struct ErrorCounter {
    metrics: Metrics,
}

impl ErrorCounter {
    /// A layer recording into `metrics`.
    pub fn layer(metrics: Metrics) -> ErrorCounter {
        ErrorCounter { metrics }
    }
}

impl<S> tower::Layer<S> for ErrorCounter {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.metrics.clone() }
    }
}

/// The wrapped service.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(code) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<i32>().ok())
                && code != 0
            {
                let code = format!("{:?}", tonic::Code::from_i32(code));
                metrics.count("mpool_grpc_errors_total", vec![("method", method), ("code", code)], 1);
            }
            Ok(resp)
        })
    }
}
