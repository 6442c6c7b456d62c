//! A Python client generated from `proto/` with grpcio-tools (`python3 -m grpc_tools.protoc`),
//! run against `mpool serve` over its Unix socket: `tests/python/client.py` does a Run and a
//! whole lease cycle (Acquire, Exec, Upload in chunks, Download, Renew, Release, the errors after
//! it), and the README's host choice (`pick_host`) over a host that is down and one that is up,
//! and prints what it checked. Proves the proto compiles with the reference compiler and the
//! server interoperates with grpc's C-core client.
//!
//! Python or the packages missing is a failure that says how to install them;
//! `MPOOL_SKIP_PYTHON=1` skips.
mod common;

use std::path::Path;

use common::MPOOL;
use common::tools;
use mpool_testkit::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_runs_a_task_and_a_lease_cycle() {
    let Some(python) = tools::python() else { return };
    let python = Path::new(&python);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::Builder::new().prefix("mpool-pystubs-").tempdir().expect("tempdir");
    let out = format!("{}", stubs.path().display());
    let protoc = tools::run(
        python,
        &[
            "-m",
            "grpc_tools.protoc",
            &format!("-I{}", root.join("proto").display()),
            &format!("--python_out={out}"),
            &format!("--grpc_python_out={out}"),
            &root.join("proto/mpool/v1/pool.proto").display().to_string(),
        ],
        None,
        &[],
    )
    .await;
    protoc.expect_code(0, "grpc_tools.protoc");
    for f in ["mpool/v1/pool_pb2.py", "mpool/v1/pool_pb2_grpc.py"] {
        assert!(stubs.path().join(f).is_file(), "protoc generated {f}");
    }

    let stack =
        Stack::start(StackOptions::tests(MPOOL, "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 2\n"))
            .await
            .expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let script = root.join("tests/python/client.py");
    let run = tools::run(
        python,
        &[
            &script.display().to_string(),
            &stack.socket.display().to_string(),
            "ci",
            &format!("localhost:{}", stack.tcp.port()),
            &stack.ca.display().to_string(),
            &stack.token,
        ],
        None,
        &[("PYTHONPATH", &out), ("PYTHONDONTWRITEBYTECODE", "1")],
    )
    .await;
    run.expect_code(0, "tests/python/client.py");
    let lines: Vec<&str> = run.stdout.lines().collect();
    let has = |prefix: &str| {
        assert!(lines.iter().any(|l| l.starts_with(prefix)), "client.py printed {prefix:?}:\n{}", run.stdout)
    };
    has("ok run exit=5 stdout='from python\\n'");
    has("ok acquire lease-");
    has("ok exec exit=7 stdout='env-a arg with space\\n'");
    let transfer = run.stdout.lines().find(|l| l.starts_with(&format!("ok upload+download {} bytes", 3 << 20)));
    assert!(transfer.is_some_and(|l| l.ends_with("mode=0o750")), "client.py printed the transfer:\n{}", run.stdout);
    has("ok release (twice), then exec refused: FAILED_PRECONDITION");
    has("ok unknown pool: NOT_FOUND");
    has("ok pick host: ");
    has("ok tls with token; without: UNAUTHENTICATED");
    // For the record (grpc/grpc#38142): the C core's default `:authority` on a Unix socket.
    if let Some(l) = lines.iter().find(|l| l.starts_with("info ")) {
        eprintln!("client.py: {l}");
    }
    assert_eq!(lines.last(), Some(&"ok all"), "{}", run.stdout);

    // The server is still there, and the leases are gone.
    let mut c = stack.client().await;
    let leases = c
        .list_leases(mpool_api::proto::v1::ListLeasesRequest { pool: String::new() })
        .await
        .expect("ListLeases")
        .into_inner();
    assert!(leases.leases.is_empty(), "{:?}", leases.leases);
}

/// The README's Python host choice is the one `client.py` runs, word for word.
#[test]
fn the_readme_shows_the_host_choice_the_client_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let client = std::fs::read_to_string(root.join("tests/python/client.py")).expect("client.py");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = client.find("def pick_host(").expect("client.py defines pick_host");
    let end = client[start..].find("\n\n").map_or(client.len(), |e| start + e);
    let snippet = &client[start..end];
    assert!(snippet.contains("return best and best[1]"), "{snippet}");
    assert!(readme.contains(snippet), "README.md shows pick_host as client.py has it:\n{snippet}");
}
