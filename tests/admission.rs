//! Admission against `mpool serve` + `mpool sim`: with `[host]` limits the host cannot meet,
//! no VM is provisioned, the pool says why (GetPool, `mpool status`, a log line),
//! and a caller waiting for a VM gets RESOURCE_EXHAUSTED with the reason at once instead of
//! waiting out its wait; `serve --check` reports that the pools do not fit at max_size.
mod common;

use std::path::Path;
use std::time::Duration;

use common::MPOOL;
use common::tools;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions, wait};

/// One pool that wants no VM until asked (min_ready 0), on a host that admits 0.01 CPU per CPU.
const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 0\nhot = 0\nmax_size = 2\nmax_wait = \"10m\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_with_the_reason_and_serve_check_reports_the_misfit() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.host_toml = "cpu_overcommit = 0.01".into();
    let stack = Stack::start(opts).await.expect("stack starts");
    let mut c = stack.client().await;
    wait("the host is sampled", Duration::from_secs(30))
        .until(|| async {
            c.clone().get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.ok()?.into_inner().host_capacity
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));

    // A 10-minute wait ends at once: no VM can come.
    let t = std::time::Instant::now();
    let req = v1::AcquireRequest {
        pool: "ci".into(),
        holder: "t".into(),
        wait: Some(mpool_api::proto::Duration { seconds: 600, nanos: 0 }),
        ..Default::default()
    };
    let err = c.acquire(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("cpu_overcommit 0.01"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(300), "refused, not timed out");

    let p = c.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.unwrap().into_inner();
    assert!(p.held_back.contains("CPUs"), "{p:?}");
    assert_eq!(p.vms.values().sum::<u32>(), 0, "nothing was provisioned: {:?}", p.vms);
    assert!(stack.log().contains("provisioning held back"), "one log line says why");

    let ep = format!("unix:{}", stack.socket.display());
    let o = tools::run(Path::new(MPOOL), &["status", "--endpoint", &ep], None, &[]).await;
    o.expect_code(0, "mpool status");
    assert!(o.stdout.contains("HELD BACK ci: CPUs"), "{}", o.stdout);

    let config = stack.path().join("mpool.toml");
    let o =
        tools::run(Path::new(MPOOL), &["serve", "--config", &config.display().to_string(), "--check"], None, &[]).await;
    o.expect_code(0, "serve --check");
    assert!(o.stdout.contains("host: the pools do NOT fit: at max_size the pools need 2 CPUs"), "{}", o.stdout);
    stack.stop().await;
}

/// A VM whose disk usage (`df` in the guest over mpool's SSH) is over the pool's
/// `max_disk_usage` is rebuilt at release, not restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_over_max_disk_usage_is_rebuilt_at_release() {
    let pools = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 0\nmax_size = 1\nmax_disk_usage = \"1K\"\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = mpool_testkit::api::acquire(&mut c, "ci", "t").await.expect("acquire");
    let mut events = stack.sim().events();
    c.release(v1::ReleaseRequest { lease_id: lease.id.clone() }).await.expect("release");
    stack.wait_idle("ci", 1).await;
    let mut restored = false;
    while let Ok(e) = events.try_recv() {
        restored |= e.op == "restore";
    }
    assert!(!restored, "rebuilt, not restored");
    assert!(stack.log().contains("over the pool's max_disk_usage"), "the log says why");
    stack.stop().await;
}

/// The host's view of each VM: its files on the data volume (`vault/instances/<name>`, where
/// multipassd keeps the image; the simulator keeps the guest's files there), sampled with the
/// host's facts: a VM that writes 4 MB grows by as much in ListVms, GetPool and the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_view_of_a_vms_image_follows_what_the_guest_writes() {
    let pools = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 0\nmax_size = 1\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = mpool_testkit::api::acquire(&mut c, "ci", "t").await.expect("acquire");
    let image = |c: mpool_api::client::Client| {
        let vm = lease.vm.clone();
        async move {
            let vms = c.clone().list_vms(v1::ListVmsRequest { pool: String::new() }).await.ok()?.into_inner().vms;
            vms.into_iter().find(|v| v.name == vm)?.image_bytes
        }
    };
    let before = wait("the VM's image is sampled", Duration::from_secs(30))
        .until(|| image(c.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    let out = mpool_testkit::api::exec(&mut c, &lease.id, &["sh", "-c", "head -c 4194304 /dev/urandom > big.bin"])
        .await
        .expect("exec");
    assert_eq!(out.0, 0, "{out:?}");
    let after = wait("the image grows by what the guest wrote", Duration::from_secs(30))
        .until(|| async { image(c.clone()).await.filter(|b| *b >= before + (4 << 20)) })
        .await
        .unwrap_or_else(|e| panic!("{e} (before: {before}); log:\n{}", stack.log()));
    let pool = c.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.unwrap().into_inner();
    assert!(pool.image_bytes >= after, "the pool sums its VMs: {} < {after}", pool.image_bytes);
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(stack.metrics).await.expect("connect to /metrics");
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", stack.metrics);
        s.write_all(req.as_bytes()).await.expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        raw
    };
    assert!(
        metrics.lines().any(|l| l.starts_with("mpool_pool_image_bytes{") && l.contains("pool=\"ci\"")),
        "{metrics}"
    );
    let endpoint = format!("unix:{}", stack.socket.display());
    let cli = |args: &[&str]| {
        let o = std::process::Command::new(MPOOL)
            .args(["--endpoint", &endpoint])
            .args(args)
            .env_remove("MPOOL_TOKEN")
            .output()
            .expect("mpool runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let vms = cli(&["vms"]);
    let row = vms.lines().find(|l| l.starts_with(&lease.vm)).unwrap_or_else(|| panic!("{vms}"));
    assert!(row.split_whitespace().nth(6).is_some_and(|image| image.ends_with('M') || image.ends_with('G')), "{vms}");
    let status = cli(&["status"]);
    assert!(status.contains("DISK ci: ") && status.contains("of VM files on the host's data volume"), "{status}");
}
