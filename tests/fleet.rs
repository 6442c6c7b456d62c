//! Several hosts (two `mpool sim` + `mpool serve` stacks) used as one through the CLI's
//! `--endpoint` list: leases spread over both (the host with the most ready VMs first), the
//! lease handle `mpool acquire` prints leads `exec` and `release` to the right host, `mpool
//! status` shows both; a host killed mid-run fails its running task cleanly and the other host
//! takes the new ones, with nothing lost or run twice (a ledger file every task appends to,
//! outside the VMs); a drained host takes no new lease, lets its lease finish and says when
//! it is empty.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::MPOOL;
use common::tools::{self, Output};
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions, eventually};
use tonic::Code;

/// Each host: pool `ci` with two ready VMs and no more, so which host a lease goes to is
/// decided by the ready counts alone.
const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nhot = 2\nmax_size = 2\n";

/// A host named `name` (`[api] host_name`).
async fn host(name: &str) -> Stack {
    let mut o = StackOptions::tests(MPOOL, POOLS);
    o.api_toml = format!("host_name = \"{name}\"");
    let stack = Stack::start(o).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    stack
}

fn unix(stack: &Stack) -> String {
    format!("unix:{}", stack.socket.display())
}

/// `mpool ARGS...` with none of the client flags' environment variables.
async fn mpool(args: &[&str]) -> Output {
    let mut cmd = vec!["-u", "MPOOL_ENDPOINT", "-u", "MPOOL_ENDPOINTS", "-u", "MPOOL_TOKEN", "-u", "MPOOL_CA", MPOOL];
    cmd.extend_from_slice(args);
    tools::run(Path::new("env"), &cmd, None, &[]).await
}

/// `mpool --endpoint A --endpoint B ARGS...`.
async fn fleet(a: &Stack, b: &Stack, args: &[&str]) -> Output {
    let (ea, eb) = (unix(a), unix(b));
    let mut all = vec!["--endpoint", ea.as_str(), "--endpoint", eb.as_str()];
    all.extend_from_slice(args);
    mpool(&all).await
}

/// Which of the two hosts holds the lease of `handle` ("a" or "b").
fn holder_of(handle: &str, a: &Stack, b: &Stack) -> &'static str {
    let (_, enc) = handle.rsplit_once('@').unwrap_or_else(|| panic!("{handle:?} is a lease handle"));
    use base64::Engine as _;
    let ep = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(enc).expect("base64 endpoint");
    let ep = String::from_utf8(ep).expect("UTF-8 endpoint");
    if ep == unix(a) {
        "a"
    } else if ep == unix(b) {
        "b"
    } else {
        panic!("{ep} is neither host")
    }
}

async fn pool(stack: &Stack) -> v1::PoolInfo {
    stack.client().await.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.expect("GetPool").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_spread_over_both_hosts_and_handles_lead_back() {
    let (a, b) = (host("mp-a").await, host("mp-b").await);

    // GetPool reports what clients rank hosts by.
    let p = pool(&a).await;
    assert_eq!((p.host.as_str(), p.ready, p.coming, p.waiters, p.draining), ("mp-a", 2, 0, 0, false));

    // Four leases over two hosts of two VMs each: the host with the most ready VMs goes first,
    // so the second lease goes to the other host than the first, and they end two and two.
    let mut handles = Vec::new();
    for i in 0..4 {
        let holder = format!("t{i}");
        let mut args = vec!["acquire", "--pool", "ci", "--wait", "0s", "--holder", &holder];
        if i == 3 {
            args.push("--json");
        }
        let o = fleet(&a, &b, &args).await;
        o.expect_code(0, "acquire over two hosts");
        let handle = if i == 3 {
            // --json: the lease, its handle and its host's endpoint.
            let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("acquire --json");
            let (id, handle) = (j["id"].as_str().unwrap_or_default(), j["handle"].as_str().unwrap_or_default());
            assert!(handle.starts_with(&format!("{id}@")), "{j}");
            assert!(j["endpoint"] == unix(&a) || j["endpoint"] == unix(&b), "{j}");
            handle.to_string()
        } else {
            o.stdout.trim().to_string()
        };
        assert!(!handle.contains('/'), "URL-safe: {handle}");
        handles.push(handle);
    }
    let hosts: Vec<&str> = handles.iter().map(|h| holder_of(h, &a, &b)).collect();
    assert_ne!(hosts[0], hosts[1], "the second lease goes to the host with more ready VMs: {hosts:?}");
    assert_eq!(hosts.iter().filter(|h| **h == "a").count(), 2, "{hosts:?}");

    // Both full: a fifth lease without waiting fails, naming each host's answer.
    let o = fleet(&a, &b, &["acquire", "--pool", "ci", "--wait", "0s"]).await;
    o.expect_code(2, "no VM anywhere");
    assert!(o.stderr.contains("no host leased a VM from pool \"ci\""), "{}", o.stderr);
    assert!(o.stderr.contains(&unix(&a)) && o.stderr.contains(&unix(&b)), "{}", o.stderr);

    // `mpool status` over both: a row per host, the total, no silent host.
    let o = fleet(&a, &b, &["status"]).await;
    o.expect_code(0, "status over two hosts");
    let rows: Vec<Vec<&str>> = o.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(rows.iter().any(|r| r[..2] == ["mp-a", "ci"] && r[4] == "2"), "{}", o.stdout);
    assert!(rows.iter().any(|r| r[..2] == ["mp-b", "ci"] && r[4] == "2"), "{}", o.stdout);
    assert!(rows.iter().any(|r| r[..2] == ["TOTAL", "ci"] && r[4] == "4"), "{}", o.stdout);
    assert!(!o.stdout.contains("not answering"), "{}", o.stdout);

    // The handle alone leads exec and release to the host (no --endpoint at all); each VM's
    // directory is under its own stack's.
    for (handle, h) in handles.iter().zip(&hosts) {
        let o = mpool(&["exec", handle, "--", "sh", "-c", "pwd"]).await;
        o.expect_code(0, "exec by handle");
        let root = if *h == "a" { a.path() } else { b.path() };
        assert!(o.stdout.trim().starts_with(&root.display().to_string()), "{} under {}", o.stdout, root.display());
        mpool(&["release", handle]).await.expect_code(0, "release by handle");
    }
    // A plain lease id needs exactly one endpoint.
    let o = fleet(&a, &b, &["release", "lease-x"]).await;
    o.expect_code(2, "plain id with two endpoints");
    assert!(o.stderr.contains("plain lease id") && o.stderr.contains("one --endpoint"), "{}", o.stderr);
    let o = mpool(&["release", "lease-x@!!"]).await;
    o.expect_code(2, "a broken handle");
    assert!(o.stderr.contains("not an encoded endpoint"), "{}", o.stderr);

    // One host gone: status lists it as not answering and still shows the other.
    let mut a = a;
    a.kill_serve();
    let o = fleet(&a, &b, &["status"]).await;
    o.expect_code(0, "status with one host down");
    assert!(o.stdout.contains("not answering:") && o.stdout.contains(&unix(&a)), "{}", o.stdout);
    assert!(o.stdout.lines().any(|l| l.starts_with("mp-b ")), "{}", o.stdout);
}

/// A ledger outside the VMs (the simulator runs a VM's commands on this machine) that every
/// task appends `<event> <task> <VM directory>` to.
struct Ledger(PathBuf);

impl Ledger {
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// The command of task `task`: `start`, the body, `done`.
    fn task(&self, task: &str, body: &str) -> String {
        let l = self.0.display();
        format!("echo start {task} $PWD >> {l}; {body}; echo done {task} $PWD >> {l}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_fails_its_task_cleanly_and_the_other_takes_the_rest() {
    let (mut a, b) = (host("mp-a").await, host("mp-b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger(dir.path().join("ledger"));
    let never = dir.path().join("never");

    // A long task on host a, running when a dies.
    let held = ledger.task("t0", &format!("while [ ! -e {} ]; do sleep 0.05; done", never.display()));
    let ea = unix(&a);
    let mpool_t0 = tokio::spawn(async move {
        mpool(&["--endpoint", &ea, "run", "--pool", "ci", "--request-id", "t0", "--", "sh", "-c", &held]).await
    });
    eventually("t0 runs on host a", Duration::from_secs(30), || async {
        ledger.lines().iter().any(|l| l.starts_with("start t0 "))
    })
    .await;
    a.kill_serve();
    let t0 = mpool_t0.await.expect("t0's mpool ran");
    assert_ne!(t0.code, 0, "t0 fails");
    assert!(
        t0.stderr.starts_with("mpool: Unavailable: the connection to mpool serve broke during the run"),
        "{}",
        t0.stderr
    );
    assert!(!t0.stderr.contains("panicked"), "{}", t0.stderr);

    // New tasks over both endpoints all run, on host b.
    for i in 1..=6 {
        let task = format!("t{i}");
        let o = fleet(
            &a,
            &b,
            &["run", "--pool", "ci", "--request-id", &task, "--", "sh", "-c", &ledger.task(&task, "true")],
        )
        .await;
        o.expect_code(0, "a task with host a down");
    }
    // Kestra's retry of t0 (a new attempt: a new request id) runs too.
    fleet(&a, &b, &["run", "--pool", "ci", "--request-id", "t0-retry", "--", "sh", "-c", &ledger.task("t0", "true")])
        .await
        .expect_code(0, "t0 retried");

    // Each task finished exactly once; everything after the kill ran on host b.
    let lines = ledger.lines();
    let b_root = b.path().display().to_string();
    for i in 0..=6 {
        let done: Vec<&String> = lines.iter().filter(|l| l.starts_with(&format!("done t{i} "))).collect();
        assert_eq!(done.len(), 1, "t{i} done once:\n{}", lines.join("\n"));
        assert!(done[0].contains(&b_root), "t{i} ran on host b:\n{}", lines.join("\n"));
    }
    let starts_on_a = lines.iter().filter(|l| l.contains(&a.path().display().to_string())).count();
    assert_eq!(starts_on_a, 1, "only t0's first attempt ran on host a:\n{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_takes_no_new_lease_and_says_when_it_is_empty() {
    let (a, b) = (host("mp-a").await, host("mp-b").await);
    let ea = unix(&a);
    let mut ca = a.client().await;

    // A lease on host a, then the drain.
    let held = ca
        .acquire(v1::AcquireRequest { pool: "ci".into(), request_id: "held".into(), ..Default::default() })
        .await
        .expect("acquire on a")
        .into_inner();
    let o = mpool(&["--endpoint", &ea, "drain"]).await;
    o.expect_code(0, "drain");
    assert_eq!(o.stdout, "host mp-a: draining, 1 lease left\n");
    let o = mpool(&["--endpoint", &ea, "status"]).await;
    assert!(o.stdout.contains("\nhost mp-a is draining (mpool drain): it takes no new leases\n"), "{}", o.stdout);
    let o = mpool(&["--endpoint", &ea, "status", "--json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("status --json");
    assert_eq!((&j[0]["host"], &j[0]["draining"], &j[0]["ready"]), (&"mp-a".into(), &true.into(), &1.into()), "{j}");

    // Only admins drain: a token that is not one is refused.
    let mut tcp = a.tcp_client(Some(&a.token)).await;
    let e = tcp.drain(v1::DrainRequest { drain: false }).await.expect_err("not an admin");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{}", e.message());

    // Host a refuses new leases, saying it drains; a retry of its lease's request id still gets it.
    let e = ca.acquire(v1::AcquireRequest { pool: "ci".into(), ..Default::default() }).await.expect_err("draining");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("host mp-a is draining") && e.message().contains("another host"), "{}", e.message());
    let again = ca
        .acquire(v1::AcquireRequest { pool: "ci".into(), request_id: "held".into(), ..Default::default() })
        .await
        .expect("the same request id")
        .into_inner();
    assert_eq!(again.id, held.id);
    // Request ids are each owner's own: another owner's "held" is a new lease, refused.
    let e = tcp
        .acquire(v1::AcquireRequest { pool: "ci".into(), request_id: "held".into(), ..Default::default() })
        .await
        .expect_err("another owner's request id does not pass the drain");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let p = pool(&a).await;
    assert!(p.draining && p.ready == 1, "{p:?}");

    // Clients over both hosts go to b only, even though a has a ready VM.
    for _ in 0..2 {
        let o = fleet(&a, &b, &["acquire", "--pool", "ci", "--wait", "0s"]).await;
        o.expect_code(0, "acquire with a draining");
        assert_eq!(holder_of(o.stdout.trim(), &a, &b), "b", "{}", o.stdout);
    }
    let o = fleet(&a, &b, &["status"]).await;
    assert!(o.stdout.lines().any(|l| l.starts_with("mp-a ") && l.ends_with("draining")), "{}", o.stdout);

    // The health detail says draining, not yet empty; over HTTP, draining is for admins too.
    let h = a.http("GET", "/v1/health", Some(&a.token), None).await;
    assert_eq!(h.status, 200, "{:?}", h.json);
    assert_eq!(
        (&h.json["host"], &h.json["draining"], &h.json["leases"], &h.json["empty"]),
        (&"mp-a".into(), &true.into(), &1.into(), &false.into())
    );
    let refused = a.http("POST", "/v1/drain", Some(&a.token), Some(&serde_json::json!({"drain": false}))).await;
    assert_eq!((refused.status, &refused.json["code"]), (403, &"PERMISSION_DENIED".into()), "{:?}", refused.json);

    // Once the lease ends, the host is empty.
    ca.release(v1::ReleaseRequest { lease_id: held.id.clone() }).await.expect("release");
    let o = mpool(&["--endpoint", &ea, "drain", "--wait"]).await;
    o.expect_code(0, "drain --wait");
    assert!(o.stdout.ends_with("host mp-a: draining, empty\n"), "{}", o.stdout);

    // Undo: host a leases again.
    let o = mpool(&["--endpoint", &ea, "drain", "--undo"]).await;
    o.expect_code(0, "undo");
    assert!(o.stdout.starts_with("host mp-a: in service"), "{}", o.stdout);
    ca.acquire(v1::AcquireRequest {
        pool: "ci".into(),
        wait: Some(mpool_api::convert::proto_duration(Duration::from_secs(30))),
        ..Default::default()
    })
    .await
    .expect("host a leases again");
}

/// A Run that carries `rid` and prints a line.
fn run_request(rid: &str) -> v1::RunRequest {
    v1::RunRequest {
        pool: "ci".into(),
        request_id: rid.into(),
        command: Some(v1::Command { argv: vec!["echo".into(), "ran".into()], ..Default::default() }),
        ..Default::default()
    }
}

/// Runs `r` to its end: (stdout, result).
async fn run_to_end(
    c: &mut mpool_api::client::Client,
    r: v1::RunRequest,
) -> Result<(String, v1::RunResult), tonic::Status> {
    let mut events = c.run(futures::stream::iter([r])).await?.into_inner();
    let (mut out, mut result) = (String::new(), None);
    while let Some(ev) = events.message().await? {
        match ev.event {
            Some(v1::run_event::Event::Stdout(t)) => out.push_str(&t),
            Some(v1::run_event::Event::Result(r)) => result = Some(r),
            _ => {}
        }
    }
    Ok((out, result.expect("a result")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_host_still_answers_a_retried_run_it_finished() {
    let a = host("mp-a").await;
    let mut ca = a.client().await;
    let (out, first) = run_to_end(&mut ca, run_request("done")).await.expect("the first run");
    assert_eq!((out.as_str(), first.exit.as_ref().map(|e| e.code)), ("ran\n", Some(0)));
    let o = mpool(&["--endpoint", &unix(&a), "drain"]).await;
    o.expect_code(0, "drain");
    // The retry is answered here with the recorded result: it never runs on another host.
    let (out, again) = run_to_end(&mut ca, run_request("done")).await.expect("the retry is answered");
    assert_eq!(out, "", "nothing ran again");
    assert_eq!((again.exit.map(|e| e.code), again.served), (Some(0), v1::Served::Repeat as i32));
    // A new request id is refused: the host drains.
    let e = run_to_end(&mut ca, run_request("new")).await.expect_err("draining");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}
