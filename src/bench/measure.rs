//! What the scenarios measure with: API calls with their wall time, child processes with
//! theirs (`mpool multipass ...`, shell recipes), a VM made the shell-recipe way, and `/proc`
//! readings. The world they run in (simulator, `mpool serve`, sshd) is `mpool_testkit`'s.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cli::client::Client;
use mpool_api::proto::v1;
use mpool_multipass as multipass;
use mpool_testkit::Stack;
pub use mpool_testkit::api::{ExecRun, served};

/// Acquires a lease; returns it and the call's wall time.
pub async fn acquire(c: &mut Client, pool: &str, holder: &str) -> Result<(v1::Lease, Duration), String> {
    let t = Instant::now();
    let l = mpool_testkit::api::acquire(c, pool, holder)
        .await
        .map_err(|e| format!("acquire from {pool}: {}", e.message()))?;
    Ok((l, t.elapsed()))
}

/// Releases a lease; returns the call's wall time.
pub async fn release(c: &mut Client, lease: &str) -> Result<Duration, String> {
    let t = Instant::now();
    mpool_testkit::api::release(c, lease).await.map_err(|e| format!("release: {}", e.message()))?;
    Ok(t.elapsed())
}

/// Runs `argv` on a lease through the API: time to the first stdout bytes, time to the exit,
/// exit code.
pub async fn exec(c: &mut Client, lease: &str, argv: &[&str]) -> Result<ExecRun, String> {
    mpool_testkit::api::exec_timed(c, lease, argv).await.map_err(|e| format!("exec: {}", e.message()))
}

/// What a child process did.
#[derive(Debug)]
pub struct ProcRun {
    /// Spawn to exit.
    pub wall: Duration,
    /// Spawn to the first line of stdout containing the marker (if asked and seen).
    pub marker_at: Option<Duration>,
    /// Its stdout.
    pub stdout: String,
}

/// Runs `program args` with `env`, waiting for it (bounded by `limit`); fails on a non-zero exit.
pub async fn run_process(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    marker: Option<&str>,
    limit: Duration,
) -> Result<ProcRun, String> {
    use tokio::io::AsyncBufReadExt;
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stderr), &mut s).await;
        s
    });
    let body = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut out = String::new();
        let mut marker_at = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if marker_at.is_none() && marker.is_some_and(|m| line.contains(m)) {
                marker_at = Some(t.elapsed());
            }
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, out, marker_at))
    };
    let (status, stdout, marker_at) =
        tokio::time::timeout(limit, body).await.map_err(|_| format!("{what}: no exit within {limit:?}"))??;
    let wall = t.elapsed();
    if !status.success() {
        let err = err_task.await.unwrap_or_default();
        return Err(format!("{what}: {status}: {}", err.trim()));
    }
    Ok(ProcRun { wall, marker_at, stdout })
}

/// `mpool multipass ARGS` against the stack's simulator.
pub async fn mp(exe: &Path, stack: &Stack, args: &[&str], marker: Option<&str>) -> Result<ProcRun, String> {
    let mut full = vec!["multipass"];
    full.extend_from_slice(args);
    run_process(exe, &full, &stack.cli_env(), marker, Duration::from_secs(600)).await
}

/// `sh -c LINE` with `$MPOOL` set to this binary and the simulator's environment.
pub async fn sh(exe: &Path, stack: &Stack, line: &str) -> Result<ProcRun, String> {
    let mut env = stack.cli_env();
    env.push(("MPOOL".into(), exe.display().to_string()));
    run_process(Path::new("/bin/sh"), &["-c", line], &env, None, Duration::from_secs(600)).await
}

/// Creates `name` directly on the daemon the way a shell recipe would keep it: launched,
/// stopped, with a `clean` snapshot, started and suspended.
pub async fn recipe_vm(d: &multipass::Client, name: &str) -> Result<(), String> {
    use multipass::{LaunchOptions, Names};
    let e = |e: multipass::Error| format!("{name}: {e}");
    d.launch(&LaunchOptions { name: name.into(), ..Default::default() }).await.map_err(e)?;
    d.stop(&Names::one(name), false).await.map_err(e)?;
    d.snapshot(name, Some("clean"), "").await.map_err(e)?;
    d.start(&Names::one(name), 0).await.map_err(e)?;
    d.suspend(&Names::one(name)).await.map_err(e)?;
    Ok(())
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}
