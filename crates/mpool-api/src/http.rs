//! Plain HTTP endpoints: Prometheus `/metrics` (on its own listener).

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use mpool_engine::Engine;
use mpool_metrics::Metrics;

/// Pool-state gauges from the engine's status, in the Prometheus text format.
pub async fn gauges(engine: &Engine) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Ok(status) = engine.status().await else { return out };
    let _ = writeln!(out, "# HELP mpool_vms VMs per pool and state.\n# TYPE mpool_vms gauge");
    for p in &status.pools {
        for (state, n) in &p.counts {
            let _ = writeln!(out, "mpool_vms{{pool=\"{}\",state=\"{state}\"}} {n}", p.name);
        }
    }
    let _ = writeln!(out, "# HELP mpool_leases Leases per pool.\n# TYPE mpool_leases gauge");
    for p in &status.pools {
        let _ = writeln!(out, "mpool_leases{{pool=\"{}\"}} {}", p.name, p.leases);
    }
    let _ = writeln!(out, "# HELP mpool_waiters Callers waiting for a VM, per pool.\n# TYPE mpool_waiters gauge");
    for p in &status.pools {
        let _ = writeln!(out, "mpool_waiters{{pool=\"{}\"}} {}", p.name, p.waiters);
    }
    let _ = writeln!(out, "# HELP mpool_daemon_up 1 when multipassd answers.\n# TYPE mpool_daemon_up gauge");
    let _ = writeln!(out, "mpool_daemon_up {}", u8::from(status.daemon_ok));
    let _ = writeln!(
        out,
        "# HELP mpool_daemon_queue Daemon calls waiting for the scheduler.\n# TYPE mpool_daemon_queue gauge"
    );
    let _ = writeln!(out, "mpool_daemon_queue {}", status.queued_daemon_calls);
    let _ = writeln!(out, "# HELP mpool_store_up 1 when the state store takes writes.\n# TYPE mpool_store_up gauge");
    let _ = writeln!(out, "mpool_store_up {}", u8::from(status.store_ok));
    out
}

/// Serves `GET /metrics` until the listener fails.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Metrics, engine: Engine) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (metrics, engine) = (metrics.clone(), engine.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (metrics, engine) = (metrics.clone(), engine.clone());
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let body = metrics.render(&gauges(&engine).await);
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"try /metrics\n")))
                    };
                    resp.map_err(std::io::Error::other)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
