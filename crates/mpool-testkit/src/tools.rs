//! External tools the API tests drive as a user would: the real `grpcurl` binary, Python with
//! `grpcio` + `grpcio-tools`, and Python's `prometheus-client` (its text-format parser). A
//! missing tool FAILS the test with the command that installs it (`.ci/run` installs them);
//! `MPOOL_SKIP_GRPCURL=1` / `MPOOL_SKIP_PYTHON=1` skip on purpose.
//! Test code (feature `tests`): these panic, as assertions do.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The grpcurl version `.ci/run` installs.
pub const GRPCURL_VERSION: &str = "v1.9.3";

fn skip(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// The grpcurl binary: `$GRPCURL`, else `grpcurl` on PATH, else `$(go env GOPATH)/bin/grpcurl`.
/// `None` only when `MPOOL_SKIP_GRPCURL=1`; otherwise a missing grpcurl fails the test.
pub fn grpcurl() -> Option<PathBuf> {
    if skip("MPOOL_SKIP_GRPCURL") {
        eprintln!("MPOOL_SKIP_GRPCURL=1: skipping the grpcurl checks");
        return None;
    }
    let from_env = std::env::var_os("GRPCURL").map(PathBuf::from);
    let gopath = std::process::Command::new("go")
        .args(["env", "GOPATH"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/grpcurl"));
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join("go/bin/grpcurl"));
    let found = [from_env, on_path("grpcurl"), gopath, home].into_iter().flatten().find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None => panic!(
            "grpcurl is not installed, and these tests run the real binary. Install it with\n    \
             go install github.com/fullstorydev/grpcurl/cmd/grpcurl@{GRPCURL_VERSION}\n\
             (it lands in $(go env GOPATH)/bin; put that on PATH or set GRPCURL=/path/to/grpcurl), \
             or run `bash .ci/run`, which installs it. To skip these tests on purpose: MPOOL_SKIP_GRPCURL=1"
        ),
    }
}

/// `python3` with `grpc` and `grpc_tools` importable. `None` only when `MPOOL_SKIP_PYTHON=1`;
/// otherwise a missing interpreter or package fails the test.
pub fn python() -> Option<String> {
    python_with(
        "grpc, grpc_tools.protoc",
        "Python with grpcio and grpcio-tools is needed for the generated-client test",
        "python3 -m pip install grpcio==1.76.0 grpcio-tools==1.76.0",
    )
}

/// The version of Python's `prometheus-client` (the Prometheus project's Python client, whose
/// text-format parser reads `/metrics` in the tests) that `.ci/run` installs.
pub const PROMETHEUS_CLIENT_VERSION: &str = "0.26.0";

/// `python3` with `prometheus_client` importable. `None` only when `MPOOL_SKIP_PYTHON=1`;
/// otherwise a missing interpreter or package fails the test.
pub fn python_prometheus() -> Option<String> {
    python_with(
        "prometheus_client.parser",
        "Python with prometheus-client is needed to read /metrics with the Prometheus project's parser",
        &format!("python3 -m pip install prometheus-client=={PROMETHEUS_CLIENT_VERSION}"),
    )
}

/// `$PYTHON` (default `python3`) if it can import `imports`; panics saying `why` and `install`
/// otherwise, unless `MPOOL_SKIP_PYTHON=1`.
fn python_with(imports: &str, why: &str, install: &str) -> Option<String> {
    if skip("MPOOL_SKIP_PYTHON") {
        eprintln!("MPOOL_SKIP_PYTHON=1: skipping the Python checks");
        return None;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe =
        std::process::Command::new(&python).args(["-c", &format!("import {imports}")]).stdin(Stdio::null()).output();
    match probe {
        Ok(o) if o.status.success() => Some(python),
        other => {
            let cause = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => format!("{python}: {e}"),
            };
            panic!(
                "{why} ({cause}). Install it with\n    {install}\n\
                 or run `bash .ci/run`, which installs it. To skip this test on purpose: MPOOL_SKIP_PYTHON=1"
            )
        }
    }
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Panics with everything the process printed unless it exited with `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Output {
        assert_eq!(
            self.code, code,
            "{what}: expected exit {code}, got {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// stdout parsed as a sequence of JSON values (grpcurl prints one object per message).
    pub fn json(&self) -> Vec<serde_json::Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("not JSON: {e}\n{}", self.stdout))
    }
}

/// Runs a program to completion (without blocking the runtime), feeding `stdin`.
pub async fn run(program: &Path, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    let out = child.wait_with_output().await.expect("process finishes");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
