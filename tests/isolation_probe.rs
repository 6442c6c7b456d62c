//! The isolation probe against `mpool sim`: the simulator's VMs share the host's network, so the
//! probe, run over the pooled SSH connection of a VM, reaches the host (port 22 and mpool's own
//! listeners) and the other VM, and reports "not isolated" in GetPool, `/v1/health`,
//! `mpool status` and the metrics; a pool with `require_isolation` refuses leases with
//! FAILED_PRECONDITION naming the fix, while a pool without it serves and only reports.
mod common;

use std::time::Duration;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::api::acquire;
use mpool_testkit::{Stack, StackOptions, wait};

const POOLS: &str = "[isolation]\nprobe_interval = \"1s\"\n\n\
    [[pools]]\nname = \"strict\"\nmin_ready = 2\nhot = 2\nmax_size = 2\nrequire_isolation = true\n\n\
    [[pools]]\nname = \"plain\"\nmin_ready = 1\nmax_size = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reports_the_simulator_not_isolated_and_a_strict_pool_refuses() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("strict", 2).await;
    stack.wait_idle("plain", 1).await;
    let mut c = stack.client().await;

    // Measured from one hot VM against the host and the other hot VM (the periodic probe
    // runs with the hot VMs' health checks, so a later run has a peer to try).
    let info = wait("the probe reached the other VM", Duration::from_secs(60))
        .until(|| {
            let mut c = c.clone();
            async move {
                let p = c.get_pool(v1::GetPoolRequest { pool: "strict".into() }).await.ok()?.into_inner();
                p.isolation_detail.contains("VM mpool-").then_some(p)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert_eq!(info.isolation, "not isolated", "{info:?}");
    assert!(info.isolation_checked_at.is_some(), "{info:?}");
    let http_port = stack.http.port().to_string();
    assert!(info.isolation_detail.contains("the host at 127.0.0.1:22"), "{}", info.isolation_detail);
    assert!(info.isolation_detail.contains(&format!("127.0.0.1:{http_port} connected")), "{}", info.isolation_detail);
    assert!(info.config.as_ref().is_some_and(|c| c.require_isolation), "{info:?}");

    // The strict pool refuses, naming what was reached and the fix; nothing is leased.
    let err = acquire(&mut c, "strict", "t").await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("pool strict requires isolation") && msg.contains("not isolated"), "{msg}");
    assert!(msg.contains("127.0.0.1:22") && msg.contains("mpool isolation rules | nft -f -"), "{msg}");
    let leases = c.list_leases(v1::ListLeasesRequest { pool: String::new() }).await.unwrap().into_inner().leases;
    assert!(leases.is_empty(), "{leases:?}");

    // A pool without the requirement serves on the same host.
    let lease = acquire(&mut c, "plain", "t").await.expect("plain serves");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.unwrap();

    // The same verdict in /v1/health, `mpool status` and the metrics.
    let health = stack.http("GET", "/v1/health", Some(&stack.token), None).await;
    assert_eq!(health.status, 200, "{:?}", health.json);
    assert_eq!(health.json["isolation"]["state"], "not isolated", "{}", health.json);
    assert!(health.json["isolation"]["vm"].as_str().is_some_and(|v| v.starts_with("mpool-strict-")), "{}", health.json);
    assert!(health.json["isolation"]["checkedAt"].is_string(), "{}", health.json);

    let endpoint = format!("unix:{}", stack.socket.display());
    let out = std::process::Command::new(MPOOL)
        .args(["--endpoint", &endpoint, "status"])
        .env_remove("MPOOL_TOKEN")
        .output()
        .expect("mpool status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("isolation: not isolated (pools with require_isolation refuse leases): a VM reached"),
        "{text}"
    );

    let metrics = scrape(stack.metrics).await;
    let isolated =
        metrics.lines().find(|l| l.starts_with("mpool_network_isolated{") || l.starts_with("mpool_network_isolated "));
    assert!(isolated.is_some_and(|l| l.ends_with(" 0")), "{isolated:?} in {metrics}");
}

/// `/metrics`, read to the end of a `Connection: close` answer.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text
}
