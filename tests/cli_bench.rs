//! `mpool bench` prints through the CLI's output helpers: piped into a reader that is gone
//! (`mpool bench all | head -0`), it ends quietly with 0 instead of panicking on EPIPE.

use std::process::{Command, Stdio};

const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

#[test]
fn mpool_bench_ends_quietly_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(MPOOL)
        .args(["bench", "daemon-calls", "--quick", "--json"])
        .arg(dir.path().join("report.json"))
        .env("MPOOL_DATA_DIR", dir.path().join("data"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) && !stderr.contains("panicked"),
        "mpool bench into a closed pipe: {:?} {stderr}",
        out.status
    );
}
