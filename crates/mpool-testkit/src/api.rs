//! `mpool.v1` calls tests and benchmarks make again and again: acquire, exec, release.
//! Errors are the calls' own `tonic::Status`.

use std::time::{Duration, Instant};

use mpool_api::client::Client;
use mpool_api::proto::v1;
use tonic::Status;

/// Acquires a lease from `pool` for `holder`.
pub async fn acquire(c: &mut Client, pool: &str, holder: &str) -> Result<v1::Lease, Status> {
    Ok(c.acquire(v1::AcquireRequest { pool: pool.into(), holder: holder.into(), ..Default::default() })
        .await?
        .into_inner())
}

/// Releases a lease.
pub async fn release(c: &mut Client, lease: &str) -> Result<(), Status> {
    c.release(v1::ReleaseRequest { lease_id: lease.into() }).await?;
    Ok(())
}

/// How a lease was served, as a word (`hot`, `warm`, `cold`, `repeat`, `unknown`).
pub fn served(l: &v1::Lease) -> &'static str {
    match v1::Served::try_from(l.served) {
        Ok(v1::Served::Hot) => "hot",
        Ok(v1::Served::Warm) => "warm",
        Ok(v1::Served::Cold) => "cold",
        Ok(v1::Served::Repeat) => "repeat",
        _ => "unknown",
    }
}

/// What an exec through the API printed, how it ended and when.
#[derive(Clone, Debug)]
pub struct ExecRun {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// From the call to the first stdout event (`None`: no output).
    pub first_output: Option<Duration>,
    /// From the call to the exit event.
    pub total: Duration,
}

/// Runs `argv` on a lease through the API, timing it.
pub async fn exec_timed(c: &mut Client, lease: &str, argv: &[&str]) -> Result<ExecRun, Status> {
    let t = Instant::now();
    let mut s = c
        .exec(v1::ExecRequest {
            lease_id: lease.into(),
            command: Some(v1::Command { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }),
            exec_id: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut stdout, mut stderr, mut first_output) = (String::new(), String::new(), None);
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(v1::exec_event::Event::Stdout(text)) => {
                first_output.get_or_insert_with(|| t.elapsed());
                stdout.push_str(&text);
            }
            Some(v1::exec_event::Event::Stderr(text)) => stderr.push_str(&text),
            Some(v1::exec_event::Event::Exit(x)) => {
                return Ok(ExecRun { code: x.code, stdout, stderr, first_output, total: t.elapsed() });
            }
            _ => {}
        }
    }
    Err(Status::internal("the exec stream ended without an exit status"))
}

/// Runs `argv` on a lease through the API; returns (exit code, stdout, stderr).
pub async fn exec(c: &mut Client, lease: &str, argv: &[&str]) -> Result<(i32, String, String), Status> {
    let r = exec_timed(c, lease, argv).await?;
    Ok((r.code, r.stdout, r.stderr))
}
