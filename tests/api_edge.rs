//! Hostile callers at the API's edge (issue 10): every duration range-checked (a huge
//! `Command.timeout` over gRPC and HTTP is INVALID_ARGUMENT and the server keeps serving),
//! metrics labels bounded whatever method or pool names callers send, free-text fields capped,
//! a duplicate `exec_id` refused, other owners' lease ids hidden from scoped tokens, `mpool
//! leases` without `SERVED_UNSPECIFIED`, the CLI quiet on a closed pipe, and `serve --check` /
//! `serve` agreeing on listeners, binding no Unix socket for a config they refuse and removing
//! theirs on exit. Everything runs against `mpool serve` + `mpool sim` processes.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions};
use serde_json::json;
use tonic::Code;

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 3\n";

/// The status a Run with this one request message fails with.
async fn run_error(c: &mut mpool::cli::client::Client, req: v1::RunRequest) -> tonic::Status {
    match c.run(futures::stream::iter([req])).await {
        Ok(mut s) => loop {
            match s.get_mut().message().await {
                Ok(Some(ev)) => {
                    assert!(!matches!(ev.event, Some(v1::run_event::Event::Result(_))), "the Run succeeded: {ev:?}")
                }
                Ok(None) => panic!("the Run ended without an error"),
                Err(e) => break e,
            }
        },
        Err(e) => e,
    }
}

/// The serve process is still alive and a normal lease cycle works.
async fn still_serving(stack: &mut Stack) {
    if let Some(c) = stack.serve_child() {
        assert!(c.try_wait().expect("try_wait").is_none(), "mpool serve exited; log:\n{}", stack.log());
    }
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "after").await.expect("acquire after the bad calls");
    assert_eq!(exec(&mut c, &lease.id, &["echo", "ok"]).await.expect("exec").1, "ok\n");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
    assert!(!stack.log().contains("panicked"), "a panic in the log:\n{}", stack.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_invalid_argument_over_grpc_and_http() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let huge = mpool_api::proto::Duration { seconds: i64::MAX, nanos: 0 };
    let lease = acquire(&mut c, "ci", "durations").await.expect("acquire");
    let cmd = v1::Command { argv: vec!["true".into()], timeout: Some(huge), ..Default::default() };

    let e = c
        .exec(v1::ExecRequest {
            lease_id: lease.id.clone(),
            command: Some(cmd.clone()),
            exec_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("Exec with a huge timeout");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("command.timeout") && e.message().contains("31622400s"), "{}", e.message());

    let e = run_error(&mut c, v1::RunRequest { pool: "ci".into(), command: Some(cmd), ..Default::default() }).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for (field, req) in [
        ("ttl", v1::AcquireRequest { pool: "ci".into(), ttl: Some(huge), ..Default::default() }),
        ("wait", v1::AcquireRequest { pool: "ci".into(), wait: Some(huge), ..Default::default() }),
    ] {
        let e = c.acquire(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = c.renew(v1::RenewRequest { lease_id: lease.id.clone(), ttl: Some(huge) }).await.expect_err("renew");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The same over the HTTP/JSON facade.
    let t = Some(stack.token.as_str());
    let body = json!({"command": {"argv": ["true"], "timeout": "9223372036854775807s"}});
    let a = stack.http("POST", &format!("/v1/leases/{}/exec", lease.id), t, Some(&body)).await;
    assert_eq!((a.status, a.json["code"].as_str()), (400, Some("INVALID_ARGUMENT")), "{a:?}");
    assert!(a.json["message"].as_str().is_some_and(|m| m.contains("command.timeout")), "{a:?}");
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&body)).await;
    assert_eq!((a.status, a.json["code"].as_str()), (400, Some("INVALID_ARGUMENT")), "{a:?}");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
    still_serving(&mut stack).await;
}

/// A GET of `/metrics`.
async fn metrics(stack: &Stack) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(stack.metrics).await.expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    raw
}

fn series(text: &str, name: &str) -> usize {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels_stay_bounded_whatever_callers_send() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    // A raw channel over the Unix socket, to call methods the client does not have.
    let mut grpc = stack.raw_channel().await;
    let before = metrics(&stack).await;
    for i in 0..1000 {
        grpc.ready().await.expect("ready");
        let path: tonic::codegen::http::uri::PathAndQuery =
            format!("/mpool.v1.Pool/NoSuchMethod{i}x{:08x}", rand::random::<u32>()).parse().expect("path");
        let codec = tonic_prost::ProstCodec::<v1::ListPoolsRequest, v1::ListPoolsResponse>::default();
        let e =
            grpc.unary(tonic::Request::new(v1::ListPoolsRequest {}), path, codec).await.expect_err("unknown method");
        assert_eq!(e.code(), Code::Unimplemented);
    }
    // Unknown pools, with and without a token.
    let mut c = stack.client().await;
    for i in 0..50 {
        let e = acquire(&mut c, &format!("no-such-pool-{i}"), "x").await.expect_err("unknown pool");
        assert_eq!(e.code(), Code::NotFound);
    }
    let after = metrics(&stack).await;
    let grew = series(&after, "mpool_grpc_errors_total") - series(&before, "mpool_grpc_errors_total");
    assert!(grew <= 2, "1000 unknown methods and 50 unknown pools added {grew} error series:\n{after}");
    assert!(
        !after.contains("NoSuchMethod") && !after.contains("no-such-pool"),
        "caller names leaked into labels:\n{after}"
    );
    // Every series starts with this host's label (`[api] host_name`, by default the hostname).
    let host = format!("host={:?}", mpool_config::machine_host_name());
    let unimplemented = format!("mpool_grpc_errors_total{{{host},method=\"unknown\",code=\"Unimplemented\"}} 1000");
    assert!(after.contains(&unimplemented), "{unimplemented} in:\n{after}");
    let unknown_pool = format!("mpool_acquires_total{{{host},pool=\"unknown\",outcome=\"error\"}} 50");
    assert!(after.contains(&unknown_pool), "{unknown_pool} in:\n{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_text_fields_are_capped() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.tokens.push(("scoped".into(), "scoped-token".into(), vec!["ci".into()]));
    let mut stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;

    // A 7 MiB holder (under the 8 MiB message limit) used to be stored and break ListLeases.
    let big = "h".repeat(7 << 20);
    let e = c
        .acquire(v1::AcquireRequest { pool: "ci".into(), holder: big.clone(), ..Default::default() })
        .await
        .expect_err("7 MiB holder");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("holder") && e.message().contains("256 bytes"), "{}", e.message());
    for (field, req) in [
        ("request_id", v1::AcquireRequest { pool: "ci".into(), request_id: "r".repeat(4096), ..Default::default() }),
        ("pool", v1::AcquireRequest { pool: "p".repeat(4096), ..Default::default() }),
    ] {
        let e = c.acquire(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(e.message().contains(field) && e.message().contains("limit"), "{field}: {}", e.message());
    }
    let e = run_error(
        &mut c,
        v1::RunRequest {
            pool: "ci".into(),
            holder: big,
            command: Some(v1::Command { argv: vec!["true".into()], ..Default::default() }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(c.list_leases(v1::ListLeasesRequest::default()).await.is_ok());

    still_serving(&mut stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_exec_id_is_refused() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.tokens.push(("scoped".into(), "scoped-token".into(), vec!["ci".into()]));
    let mut stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    // A second exec with the id of a running one is refused; the first can still be cancelled.
    let mine = acquire(&mut c, "ci", "first").await.expect("acquire");
    let sleep = |id: &str| v1::ExecRequest {
        lease_id: mine.id.clone(),
        command: Some(v1::Command { argv: vec!["sleep".into(), "600".into()], ..Default::default() }),
        exec_id: id.into(),
        ..Default::default()
    };
    let mut first = c.exec(sleep("job")).await.expect("first exec").into_inner();
    let started = first.message().await.expect("event").expect("started");
    assert!(matches!(started.event, Some(v1::exec_event::Event::Started(ref id)) if id == "job"), "{started:?}");
    let e = c.exec(sleep("job")).await.expect_err("duplicate exec id");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("job"), "{}", e.message());
    let cancelled = c
        .cancel_exec(v1::CancelExecRequest { lease_id: mine.id.clone(), exec_id: "job".into() })
        .await
        .expect("cancel");
    assert!(cancelled.into_inner().cancelled);
    let mut exit = None;
    while let Some(ev) = first.message().await.expect("events") {
        if let Some(v1::exec_event::Event::Exit(x)) = ev.event {
            exit = Some(x);
        }
    }
    assert!(exit.is_some_and(|x| x.cancelled), "the first exec was the one cancelled");

    c.release(v1::ReleaseRequest { lease_id: mine.id }).await.expect("release");
    still_serving(&mut stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_see_only_their_own_lease_ids_and_leases_show_no_unspecified() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.tokens.push(("scoped".into(), "scoped-token".into(), vec!["ci".into()]));
    let mut stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let mine = acquire(&mut c, "ci", "first").await.expect("acquire");
    // A scoped token sees VMs, but only its own lease ids.
    let mut scoped = stack.tcp_client(Some("scoped-token")).await;
    let theirs = acquire(&mut scoped, "ci", "scoped").await.expect("scoped acquire");
    let vms = scoped.list_vms(v1::ListVmsRequest::default()).await.expect("list vms").into_inner().vms;
    let ids: Vec<&str> = vms.iter().map(|v| v.lease_id.as_str()).filter(|s| !s.is_empty()).collect();
    assert_eq!(ids, vec![theirs.id.as_str()], "a scoped token sees only its own lease ids: {vms:?}");
    assert!(
        vms.iter().any(|v| v.state == "leased" && v.lease_id.is_empty()),
        "the other lease's VM is listed, its id hidden: {vms:?}"
    );
    // The Unix socket (no token) sees everything.
    let all = c.list_vms(v1::ListVmsRequest::default()).await.expect("list vms").into_inner().vms;
    assert!(all.iter().any(|v| v.lease_id == mine.id) && all.iter().any(|v| v.lease_id == theirs.id), "{all:?}");

    // `mpool leases` shows no SERVED_UNSPECIFIED.
    let ep = format!("unix:{}", stack.socket.display());
    let o = common::tools::run(Path::new(MPOOL), &["--endpoint", &ep, "leases"], None, &[]).await;
    o.expect_code(0, "leases");
    assert!(o.stdout.contains(&mine.id) && !o.stdout.contains("UNSPECIFIED"), "{}", o.stdout);
    still_serving(&mut stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_ends_quietly_on_a_closed_pipe() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = format!("unix:{}", stack.socket.display());
    for args in [
        &["vms"][..],
        &["status"],
        &["status", "--json"],
        &["leases"],
        &["acquire", "--pool", "ci"],
        &["token", "new", "--name", "x", "--admin"],
    ] {
        // A pipe whose reader is gone before mpool writes: every write is EPIPE.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = std::process::Command::new(MPOOL)
            .arg("--endpoint")
            .arg(&ep)
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("mpool runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(0) && stderr.is_empty(),
            "mpool {args:?} into a closed pipe: {:?} {stderr}",
            out.status
        );
    }
}

/// `mpool serve --config CFG --check`.
async fn serve_check(cfg: &Path) -> common::tools::Output {
    common::tools::run(Path::new(MPOOL), &["serve", "--config", &cfg.display().to_string(), "--check"], None, &[]).await
}

/// A config with the given `[api]` section and a daemon that is not there.
fn config(dir: &Path, api: &str) -> std::path::PathBuf {
    let p = dir.join("mpool.toml");
    std::fs::write(
        &p,
        format!(
            "[daemon]\naddress = \"unix:{d}/no-daemon.sock\"\ndata_dir = \"{d}/data\"\n\n[api]\n{api}\n\n[store]\npath = \"{d}/mpool.redb\"\n\n[[pools]]\nname = \"ci\"\n",
            d = dir.display()
        ),
    )
    .expect("config");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_check_and_serve_refuse_the_same_listeners_and_leave_no_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("api.sock");
    let port = mpool_testkit::free_port().expect("a free port");
    for (api, why) in [
        (
            format!(
                "listen = [\"unix:{}\", \"0.0.0.0:{port}\"]\ntokens_file = \"{}/tokens.toml\"",
                sock.display(),
                dir.path().display()
            ),
            "needs TLS",
        ),
        (format!("listen = [\"unix:{}\", \"127.0.0.1:{port}\"]", sock.display()), "authenticate"),
        (format!("listen = [\"unix:{}\"]\nhttp_listen = \"127.0.0.1:{port}\"", sock.display()), "authenticate"),
    ] {
        std::fs::write(dir.path().join("tokens.toml"), "tokens = []\n").expect("tokens");
        let cfg = config(dir.path(), &api);
        let check = serve_check(&cfg).await;
        assert_ne!(check.code, 0, "serve --check accepted {api}: {}", check.stdout);
        assert!(check.stderr.contains(why), "{api}: {}", check.stderr);
        // serve itself refuses at once (before waiting for multipassd), binding no Unix socket.
        let serve =
            common::tools::run(Path::new(MPOOL), &["serve", "--config", &cfg.display().to_string()], None, &[]).await;
        assert_ne!(serve.code, 0, "serve accepted {api}");
        assert!(serve.stderr.contains(why), "{api}: {}", serve.stderr);
        assert!(!sock.exists(), "serve left {} behind for {api}", sock.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_removes_its_unix_socket_when_it_exits() {
    let mut stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&stack.socket).expect("the API socket");
    assert!(meta.file_type().is_socket() && meta.permissions().mode() & 0o777 == 0o660, "{meta:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = stack.term_serve().expect("serve was running");
    assert!(Instant::now() < deadline);
    assert!(status.success(), "serve exit status {status}; log:\n{}", stack.log());
    assert!(!stack.socket.exists(), "the API socket {} is left behind", stack.socket.display());
}

/// `serve --check` warns about a listener the VMs on the Multipass bridge could reach (bound to
/// every address), and says nothing of one on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_check_warns_about_listeners_the_vms_can_reach() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("api.sock");
    let port = mpool_testkit::free_port().expect("a free port");
    for (host, warned) in [("0.0.0.0", true), ("127.0.0.1", false)] {
        let api = format!("listen = [\"unix:{}\"]\nmetrics_listen = \"{host}:{port}\"", sock.display());
        let cfg = config(dir.path(), &api);
        let check = serve_check(&cfg).await;
        assert!(check.stdout.contains("OK"), "{api}: {}{}", check.stdout, check.stderr);
        let warning = check.stderr.contains("warning: api.metrics_listen") && check.stderr.contains("isolation rules");
        assert_eq!(warning, warned, "{api}: {}", check.stderr);
    }
}
