//! The Kestra examples in `deploy/kestra/` that need no Kestra to check: the grpcurl flow's shell
//! script runs as written (real grpcurl and jq, `mpool serve` + `mpool sim`, TLS and a bearer
//! token), with the env the flow sets pointing at the test stack. (The other flows are parsed
//! and validated by Kestra itself in `clients/kestra`, whose tests also run flows of the same
//! shapes on Kestra's test runner.)
//!
//! grpcurl missing is a failure that says how to install it; `MPOOL_SKIP_GRPCURL=1` skips.
mod common;

use std::path::Path;

use common::MPOOL;
use common::tools;
use mpool_testkit::{Stack, StackOptions};

/// The `- |` block of `commands:` in a flow file, un-indented.
fn script_of(flow: &str) -> String {
    let lines: Vec<&str> = flow.lines().collect();
    let start = lines.iter().position(|l| l.trim() == "commands:").expect("a commands: key");
    let block = lines[start + 1..].iter().position(|l| l.trim() == "- |").expect("a `- |` block") + start + 2;
    let indent = lines[block].len() - lines[block].trim_start().len();
    let mut out = String::new();
    for l in &lines[block..] {
        if !l.trim().is_empty() && l.len() - l.trim_start().len() < indent {
            break;
        }
        out.push_str(l.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpcurl_flow_runs_as_written() {
    let Some(grpcurl) = tools::grpcurl() else { return };
    let flow =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kestra/grpcurl.yaml")).unwrap();
    let script = script_of(&flow);
    assert!(script.contains("mpool.v1.Pool/Run") && script.contains("mpool.v1.Pool/Release"), "{script}");
    // Nothing Kestra would render: the script is plain shell, its inputs come from env.
    assert!(!script.contains("{{") && !script.contains("{%"), "{script}");

    let stack = Stack::start(StackOptions::tests(MPOOL, "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 3\n"))
        .await
        .expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let work = tempfile::tempdir().unwrap();
    let path = format!(
        "{}:{}",
        grpcurl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let addr = format!("localhost:{}", stack.tcp.port());
    let ca = stack.ca.display().to_string();
    let out = tools::run(
        Path::new("/bin/sh"),
        &["-c", &format!("cd '{}' && {script}", work.path().display())],
        None,
        &[
            ("PATH", &path),
            ("MPOOL_ADDR", &addr),
            ("MPOOL_CACERT", &ca),
            ("MPOOL_TOKEN", &stack.token),
            ("MPOOL_POOL", "ci"),
        ],
    )
    .await;
    out.expect_code(0, "the grpcurl flow's script");
    let outputs = out
        .stdout
        .lines()
        .find(|l| l.starts_with("::{\"outputs\""))
        .unwrap_or_else(|| panic!("no outputs line:\n{}", out.stdout));
    let v: serde_json::Value = serde_json::from_str(outputs.trim_start_matches("::").trim_end_matches("::")).unwrap();
    assert_eq!(v["outputs"]["exitCode"], 0, "{outputs}");
    assert!(v["outputs"]["vm"].as_str().is_some_and(|s| s.starts_with("mpool-")), "{outputs}");
    assert!(out.stdout.contains("done\n") && out.stdout.contains("step on "), "{}", out.stdout);
    // The hand-made lease was released.
    let mut c = stack.client().await;
    let leases = c
        .list_leases(mpool_api::proto::v1::ListLeasesRequest { pool: String::new() })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(leases.is_empty(), "{leases:?}");
}

#[test]
fn the_commands_block_is_extracted_verbatim() {
    let flow = "tasks:\n  - id: x\n    commands:\n      - |\n        a \\\n          b\n\n        c\n    env: {}\n";
    assert_eq!(script_of(flow), "a \\\n  b\n\nc\n");
}
