//! The use cases called directly, as a transport would, against a real engine with no pools and
//! a daemon that has no instances and can make none: what they refuse, and with which kind,
//! before any VM is needed.

use std::sync::Arc;

use futures::stream;
use mpool_core::ports::{BoxFut, DaemonPort, Observed, Ports, SshPort, StepError};
use mpool_core::types::{LaunchOptions, SshEndpoint};
use mpool_engine::{Engine, Settings};
use mpool_metrics::Metrics;
use mpool_ssh::{ConnectionCache, SshOptions};
use mpool_store::memory::MemStore;

use super::{App, AppError, ErrorKind, Limits};
use crate::auth::Principal;
use crate::proto::v1;

/// A daemon with no instances that cannot make any (and SSH that reaches nothing): reads answer
/// empty, everything else fails as unavailable.
struct Empty;

fn down<T>() -> BoxFut<'static, Result<T, StepError>> {
    Box::pin(async { Err(StepError::unavailable("no daemon in this test")) })
}

impl DaemonPort for Empty {
    fn ping(&self) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }
    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn launch(&self, _: LaunchOptions) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn start(&self, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn stop(&self, _: String, _: bool) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn suspend(&self, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn snapshot(&self, _: String, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn restore(&self, _: String, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn clone_vm(&self, _: String, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn delete(&self, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn delete_snapshot(&self, _: String, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn ssh_info(&self, _: String) -> BoxFut<'_, Result<SshEndpoint, StepError>> {
        down()
    }
}

impl SshPort for Empty {
    fn ready(&self, _: String, _: SshEndpoint) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn run_script(&self, _: String, _: SshEndpoint, _: String) -> BoxFut<'_, Result<(), StepError>> {
        down()
    }
    fn output(&self, _: String, _: SshEndpoint, _: String) -> BoxFut<'_, Result<String, StepError>> {
        down()
    }
    fn disk_used(&self, _: String, _: SshEndpoint) -> BoxFut<'_, Result<u64, StepError>> {
        down()
    }
    fn forget(&self, _: String) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}

/// The application over a fresh engine, once the engine has reconciled with the daemon (before
/// that, calls on leases are unavailable).
async fn app() -> App {
    app_with(Metrics::default()).await
}

/// [`app`] recording into `metrics`.
async fn app_with(metrics: Metrics) -> App {
    let ports = Ports::new(Arc::new(Empty), Arc::new(Empty));
    let engine = Engine::start(Settings::default(), vec![], ports, Arc::new(MemStore::new())).expect("engine");
    for _ in 0..500 {
        if engine.status().await.is_ok_and(|s| s.reconciled) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let ssh = Arc::new(ConnectionCache::new(SshOptions::default()));
    App::new(engine, ssh, Limits::default(), metrics)
}

/// A token that may use pool `ci` only.
fn ci_token() -> Principal {
    Principal { name: "kestra".into(), pools: vec!["ci".into()], admin: false }
}

fn command(argv: &[&str]) -> Option<v1::Command> {
    Some(v1::Command { argv: argv.iter().map(|a| a.to_string()).collect(), ..Default::default() })
}

fn kind<T>(r: Result<T, AppError>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

#[tokio::test]
async fn a_token_without_the_pool_is_refused_before_anything_runs() {
    let app = app().await;
    let p = ci_token();
    let acquire = v1::AcquireRequest { pool: "gpu".into(), ..Default::default() };
    let e = app.acquire(Some(&p), acquire).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.message().contains("may not use pool \"gpu\""), "{e}");
    let get = v1::GetPoolRequest { pool: "gpu".into() };
    assert_eq!(kind(app.get_pool(Some(&p), get).await), ErrorKind::PermissionDenied);
    let run = v1::RunRequest { pool: "gpu".into(), command: command(&["true"]), ..Default::default() };
    assert_eq!(kind(app.run(Some(&p), stream::iter([Ok(run)])).await), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn unknown_pools_and_leases_are_not_found_with_the_next_step() {
    let app = app().await;
    let acquire = v1::AcquireRequest { pool: "ci".into(), ..Default::default() };
    let e = app.acquire(None, acquire).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("`mpool status` lists the configured pools"), "{e}");
    let renew = v1::RenewRequest { lease_id: "l-none".into(), ttl: None };
    let e = app.renew(Some(&ci_token()), renew).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().ends_with("acquire a new lease (ListLeases shows the leases you hold)"), "{e}");
    let exec = v1::ExecRequest {
        lease_id: "l-none".into(),
        command: command(&["true"]),
        exec_id: String::new(),
        ..Default::default()
    };
    assert_eq!(kind(app.exec(None, exec).await), ErrorKind::NotFound);
    let cancel = v1::CancelExecRequest { lease_id: "l-none".into(), exec_id: "x".into() };
    assert_eq!(kind(app.cancel_exec(None, cancel).await), ErrorKind::NotFound);
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_that_say_what_to_send() {
    let app = app().await;
    let exec = v1::ExecRequest { lease_id: "l-1".into(), command: None, exec_id: String::new(), ..Default::default() };
    let e = app.exec(None, exec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().starts_with("command is required"), "{e}");
    let release = v1::ReleaseRequest { lease_id: String::new() };
    assert_eq!(kind(app.release(None, release).await), ErrorKind::InvalidArgument);
    let e = app.run(None, stream::empty()).await.unwrap_err();
    assert!(e.message().starts_with("empty Run"), "{e}");
    let first = v1::RunRequest {
        pool: "ci".into(),
        command: command(&["true"]),
        chunk: Some(v1::InputChunk::default()),
        ..Default::default()
    };
    assert_eq!(kind(app.run(None, stream::iter([Ok(first)])).await), ErrorKind::InvalidArgument);
    let e = app.upload(None, stream::empty()).await.unwrap_err();
    assert!(e.message().starts_with("empty upload"), "{e}");
    let download = v1::DownloadRequest { lease_id: "l-1".into(), path: "a/../../etc".into(), base: "/tmp".into() };
    assert_eq!(kind(app.download(None, download).await), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn a_broken_request_stream_ends_the_use_case_with_its_error() {
    let app = app().await;
    let broken = AppError::new(ErrorKind::OutOfRange, "decoded message length too large");
    let e = app.upload(None, stream::iter([Err(broken.clone())])).await.unwrap_err();
    assert_eq!(e, broken);
}

#[tokio::test]
async fn listings_show_what_the_caller_may_see() {
    let app = app().await;
    let pools = app.list_pools(Some(&ci_token()), v1::ListPoolsRequest {}).await.expect("pools");
    assert!(pools.pools.is_empty());
    let leases = app.list_leases(None, v1::ListLeasesRequest { pool: String::new() }).await.expect("leases");
    assert!(leases.leases.is_empty());
    let long = v1::ListVmsRequest { pool: "p".repeat(super::MAX_ID + 1) };
    assert_eq!(kind(app.list_vms(None, long).await), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn history_shows_only_the_pools_the_caller_may_use_and_health_the_engine_s() {
    let metrics = Metrics::default();
    metrics.set_pools(["ci".to_string(), "gpu".to_string()]);
    metrics.reset_took("ci", std::time::Duration::from_secs(1));
    metrics.reset_took("gpu", std::time::Duration::from_secs(3));
    let app = app_with(metrics).await;
    let pools =
        |h: mpool_metrics::history::HistorySnapshot| -> Vec<String> { h.pools.into_iter().map(|p| p.pool).collect() };
    assert_eq!(pools(app.history(Some(&ci_token()))), ["ci"]);
    assert_eq!(pools(app.history(None)), ["ci", "gpu"]);
    let admin = Principal { name: "ops".into(), pools: vec!["*".into()], admin: true };
    let h = app.history(Some(&admin));
    assert_eq!(h.pools[1].reset.last().map(|p| (p.count, p.max)), Some((1, 3.0)));

    let health = app.health(Some(&ci_token())).await.expect("health");
    assert!(health.daemon_ok && health.store_ok && health.reconciled, "{health:?}");
    assert_eq!(health.store_error, None);
}
