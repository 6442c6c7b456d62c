//! The `mpool` client commands as a shell script uses them, against `mpool serve` + `mpool sim`:
//! `run` passes remote stdout/stderr through and exits with the remote code, `--put`/`--get`
//! carry files both ways (content and mode), `acquire` / `exec` / `renew` / `release`,
//! `status` / `vms` / `leases`, and the same over `https://` with `--ca` and `--token`.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::MPOOL;
use common::tools::{self, Output};
use mpool_testkit::{Stack, StackOptions};

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 3\n";

/// `mpool ARGS...` with a clean environment for its client flags.
async fn mpool(args: &[&str]) -> Output {
    // Clear the env fallbacks of the client flags so only the arguments count.
    let mut cmd = vec!["-u", "MPOOL_ENDPOINT", "-u", "MPOOL_TOKEN", "-u", "MPOOL_CA", MPOOL];
    cmd.extend_from_slice(args);
    tools::run(Path::new("env"), &cmd, None, &[]).await
}

fn unix(stack: &Stack) -> String {
    format!("unix:{}", stack.socket.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_output_and_exit_codes_through() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = unix(&stack);

    let o = mpool(&["--endpoint", &ep, "run", "--pool", "ci", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2"])
        .await;
    o.expect_code(0, "run exit 0");
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("to-stdout\n", "to-stderr\n"));

    let o =
        mpool(&["--endpoint", &ep, "run", "--pool", "ci", "--", "sh", "-c", "echo partial; echo failing >&2; exit 3"])
            .await;
    o.expect_code(3, "run exit 3");
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("partial\n", "failing\n"));

    let o = mpool(&["--endpoint", &ep, "run", "--pool", "ci", "--", "no-such-command-mpool-test"]).await;
    o.expect_code(127, "run of a missing command");
    assert!(o.stderr.contains("no-such-command-mpool-test") && o.stderr.contains("not found"), "{}", o.stderr);

    // argv arrives intact (no word splitting or globbing); env and workdir apply.
    let o = mpool(&[
        "--endpoint",
        &ep,
        "run",
        "--pool",
        "ci",
        "--env",
        "GREETING=hello world",
        "--workdir",
        "/",
        "--",
        "sh",
        "-c",
        "printf '[%s]' \"$GREETING\" \"$1\" \"$(pwd)\"",
        "sh",
        "two  spaces *",
    ])
    .await;
    o.expect_code(0, "run with env and workdir");
    assert_eq!(o.stdout, "[hello world][two  spaces *][/]");

    // A bad request is the client's error: exit 2 with the status and the server's advice.
    let o = mpool(&["--endpoint", &ep, "run", "--pool", "nope", "--", "true"]).await;
    o.expect_code(2, "run on an unknown pool");
    assert!(o.stderr.contains("NotFound") && o.stderr.contains("mpool status"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_round_trip_content_and_mode() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = unix(&stack);
    let dir = tempfile::tempdir().expect("tempdir");
    let tool = dir.path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\necho \"tool ran with $1\"\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o750)).unwrap();
    let data = dir.path().join("data.bin");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    std::fs::write(&data, &bytes).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o604)).unwrap();
    let (back_tool, back_data, made) =
        (dir.path().join("back.sh"), dir.path().join("back.bin"), dir.path().join("made.txt"));

    let put_tool = format!("{}:bin/tool.sh", tool.display());
    let put_data = format!("{}:data.bin", data.display());
    let get_tool = format!("bin/tool.sh:{}", back_tool.display());
    let get_data = format!("data.bin:{}", back_data.display());
    let get_made = format!("made.txt:{}", made.display());
    let get_missing = format!("absent.txt:{}", dir.path().join("absent.txt").display());
    let o = mpool(&[
        "--endpoint",
        &ep,
        "run",
        "--pool",
        "ci",
        "--put",
        &put_tool,
        "--put",
        &put_data,
        "--get",
        &get_tool,
        "--get",
        &get_data,
        "--get",
        &get_made,
        "--get",
        &get_missing,
        "--",
        "sh",
        "-c",
        // The tool is executable in the VM (mode kept), the data arrived whole.
        "./bin/tool.sh arg && stat -c %a bin/tool.sh data.bin && cksum < data.bin > made.txt && chmod 0640 made.txt",
    ])
    .await;
    o.expect_code(0, "run with --put/--get");
    assert_eq!(o.stdout, "tool ran with arg\n750\n604\n");
    assert!(o.stderr.contains("absent.txt: no such file in the VM"), "a missing --get is reported: {}", o.stderr);
    assert!(!dir.path().join("absent.txt").exists());

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(std::fs::read(&back_tool).unwrap(), std::fs::read(&tool).unwrap());
    assert_eq!(mode(&back_tool), 0o750, "--get keeps the mode");
    assert_eq!(std::fs::read(&back_data).unwrap(), bytes);
    assert_eq!(mode(&back_data), 0o604);
    let local_sum = tools::run(Path::new("sh"), &["-c", &format!("cksum < {}", data.display())], None, &[]).await;
    assert_eq!(std::fs::read_to_string(&made).unwrap(), local_sum.stdout, "cksum in the VM = cksum here");
    assert_eq!(mode(&made), 0o640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_exec_renew_release_and_listings() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = unix(&stack);

    let a = mpool(&["--endpoint", &ep, "acquire", "--pool", "ci", "--holder", "cli-test", "--ttl", "10m"]).await;
    a.expect_code(0, "acquire");
    let lease = a.stdout.trim().to_string();
    assert!(
        lease.starts_with("lease-") && a.stdout.lines().count() == 1,
        "acquire prints the lease id only: {:?}",
        a.stdout
    );

    let j = mpool(&["--endpoint", &ep, "acquire", "--pool", "ci", "--json", "--request-id", "cli-rid"]).await;
    j.expect_code(0, "acquire --json");
    let v: serde_json::Value = serde_json::from_str(j.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", j.stdout));
    let second = v["id"].as_str().expect("id").to_string();
    assert!(second.starts_with("lease-") && second != lease, "{v}");
    assert_eq!(
        (v["pool"].as_str(), v["holder"].as_str(), v["requestId"].as_str()),
        (Some("ci"), Some("cli"), Some("cli-rid")),
        "{v}"
    );
    assert!(v["vm"].as_str().is_some_and(|s| s.starts_with("mpool-ci-")), "{v}");
    assert!(
        v["expiresAt"].as_str().is_some_and(|s| !s.is_empty())
            && v["served"].as_str().is_some_and(|s| s.starts_with("SERVED_")),
        "{v}"
    );
    // The same request id: the same lease.
    let again = mpool(&["--endpoint", &ep, "acquire", "--pool", "ci", "--request-id", "cli-rid"]).await;
    assert_eq!(again.expect_code(0, "repeat").stdout.trim(), second);

    let e = mpool(&[
        "--endpoint",
        &ep,
        "exec",
        &lease,
        "--env",
        "X=42",
        "--",
        "sh",
        "-c",
        "echo x=$X; echo err >&2; exit 7",
    ])
    .await;
    e.expect_code(7, "exec");
    assert_eq!((e.stdout.as_str(), e.stderr.as_str()), ("x=42\n", "err\n"));
    mpool(&["--endpoint", &ep, "exec", &lease, "--", "true"]).await.expect_code(0, "exec true");

    let r = mpool(&["--endpoint", &ep, "renew", &lease, "--ttl", "20m"]).await;
    let v: serde_json::Value =
        serde_json::from_str(r.expect_code(0, "renew").stdout.trim()).expect("renew prints the lease");
    assert_eq!(v["id"].as_str(), Some(lease.as_str()));

    let s = mpool(&["--endpoint", &ep, "status"]).await;
    s.expect_code(0, "status");
    let header = s.stdout.lines().next().unwrap_or_default();
    for col in ["POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "WAITERS", "MAX"] {
        assert!(header.split_whitespace().any(|c| c == col), "status header has {col}: {header}");
    }
    let row: Vec<&str> =
        s.stdout.lines().find(|l| l.starts_with("ci ")).expect("a row for pool ci").split_whitespace().collect();
    assert_eq!((row[3], row[8]), ("2", "3"), "two leased, max 3: {row:?}");
    let sj = mpool(&["--endpoint", &ep, "status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&sj.expect_code(0, "status --json").stdout).expect("JSON");
    assert_eq!(
        (v[0]["name"].as_str(), v[0]["vms"]["leased"].as_u64(), v[0]["daemon_ok"].as_bool()),
        (Some("ci"), Some(2), Some(true)),
        "{v}"
    );

    let vms = mpool(&["--endpoint", &ep, "vms", "--pool", "ci"]).await;
    vms.expect_code(0, "vms");
    assert!(vms.stdout.lines().filter(|l| l.contains(&lease) || l.contains(&second)).count() == 2, "{}", vms.stdout);
    let leases = mpool(&["--endpoint", &ep, "leases"]).await;
    leases.expect_code(0, "leases");
    assert_eq!(leases.stdout.lines().count(), 2, "{}", leases.stdout);
    assert!(leases.stdout.contains(&lease) && leases.stdout.contains("\"holder\":\"cli-test\""), "{}", leases.stdout);

    for l in [&lease, &second] {
        mpool(&["--endpoint", &ep, "release", l]).await.expect_code(0, "release");
    }
    mpool(&["--endpoint", &ep, "release", &lease]).await.expect_code(0, "release again is fine");
    let e = mpool(&["--endpoint", &ep, "exec", &lease, "--", "true"]).await;
    e.expect_code(2, "exec on a released lease");
    assert!(e.stderr.contains("FailedPrecondition") && e.stderr.contains("acquire a new one"), "{}", e.stderr);
    let leases = mpool(&["--endpoint", &ep, "leases"]).await;
    assert_eq!(leases.expect_code(0, "leases").stdout, "");

    // A server that is not there: exit 2 and what to check.
    let gone = format!("unix:{}", stack.path().join("nothing-here.sock").display());
    let o = mpool(&["--endpoint", &gone, "status"]).await;
    o.expect_code(2, "no server");
    assert!(o.stderr.contains(&format!("mpool serve at {gone} is unreachable: no such file")), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_with_ca_and_token() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = format!("https://localhost:{}", stack.tcp.port());
    let ca = stack.ca.display().to_string();
    let tls = |extra: &[&str]| {
        let mut v = vec!["--endpoint".to_string(), ep.clone(), "--ca".into(), ca.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let call = |args: Vec<String>| async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        mpool(&a).await
    };
    let tok = stack.token.clone();

    let o = call(tls(&["--token", &tok, "run", "--pool", "ci", "--", "sh", "-c", "echo over https; exit 4"])).await;
    o.expect_code(4, "run over https");
    assert_eq!(o.stdout, "over https\n");

    let a = call(tls(&["--token", &tok, "acquire", "--pool", "ci"])).await;
    let lease = a.expect_code(0, "acquire over https").stdout.trim().to_string();
    let e = call(tls(&["--token", &tok, "exec", &lease, "--", "echo", "hi"])).await;
    assert_eq!(e.expect_code(0, "exec over https").stdout, "hi\n");
    // Another token may not use this lease.
    let e = call(tls(&["--token", "other-token", "exec", &lease, "--", "true"])).await;
    e.expect_code(2, "exec with another token");
    assert!(e.stderr.contains("PermissionDenied") && e.stderr.contains("belongs to another client"), "{}", e.stderr);
    let s = call(tls(&["--token", &tok, "status"])).await;
    assert!(s.expect_code(0, "status over https").stdout.lines().any(|l| l.starts_with("ci ")), "{}", s.stdout);
    call(tls(&["--token", &tok, "release", &lease])).await.expect_code(0, "release over https");

    // The token from the environment, as a Kestra task would pass it.
    let env_run = tools::run(
        Path::new(MPOOL),
        &["run", "--pool", "ci", "--", "echo", "env token"],
        None,
        &[("MPOOL_ENDPOINT", &ep), ("MPOOL_TOKEN", &tok), ("MPOOL_CA", &ca)],
    )
    .await;
    assert_eq!(env_run.expect_code(0, "MPOOL_ENDPOINT/MPOOL_TOKEN/MPOOL_CA").stdout, "env token\n");

    // No token, a wrong one, and no CA: refused, saying why.
    let o = call(tls(&["status"])).await;
    o.expect_code(2, "no token");
    assert!(o.stderr.contains("Unauthenticated") && o.stderr.contains("authorization: Bearer"), "{}", o.stderr);
    let o = call(tls(&["--token", "wrong", "status"])).await;
    o.expect_code(2, "wrong token");
    assert!(o.stderr.contains("Unauthenticated") && o.stderr.contains("invalid token"), "{}", o.stderr);
    let o = mpool(&["--endpoint", &ep, "--token", &tok, "status"]).await;
    o.expect_code(2, "a certificate not trusted without --ca");
}
