//! `mpool exec LEASE -- ARGV`: runs a command on a leased VM, passes its output through as it
//! arrives, and exits with the remote exit code. With `--detach` (or `--session ID`, `--keep`)
//! the command runs as a session that outlives this process; `mpool attach LEASE SESSION`
//! follows it again and `mpool sessions LEASE` lists them.

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::Client;
use super::flags::command;
use super::print::status_err;
use super::remote::{exit_code, write_out};

/// `mpool exec` flags.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Lease id, or the handle `mpool acquire` printed.
    pub lease: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the VM.
    #[arg(long)]
    workdir: Option<String>,
    /// Kill the command after this long.
    #[arg(long)]
    timeout: Option<String>,
    /// Start the command as a session and print its id at once; follow it with `mpool attach`.
    #[arg(long)]
    detach: bool,
    /// Run as a session with this id (it survives this process; `mpool attach` follows it).
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// Run as a session and keep it running if this process goes away (Ctrl-C included).
    #[arg(long)]
    keep: bool,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// `mpool attach` flags.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Lease id, or the handle `mpool acquire` printed.
    pub lease: String,
    /// Session id (`mpool exec --detach` printed it).
    session: String,
    /// Start at this byte offset of stdout (0: everything kept).
    #[arg(long, default_value_t = 0)]
    stdout_offset: u64,
    /// Start at this byte offset of stderr.
    #[arg(long, default_value_t = 0)]
    stderr_offset: u64,
}

/// `mpool sessions` flags.
#[derive(Args, Debug)]
pub struct SessionsArgs {
    /// Lease id, or the handle `mpool acquire` printed.
    pub lease: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `mpool exec`.
pub async fn run(client: &mut Client, lease_id: String, a: ExecArgs) -> Result<ExitCode, String> {
    let keep = a.keep || a.detach || a.session.is_some();
    let req = v1::ExecRequest {
        lease_id,
        command: command(a.argv, &a.env, a.workdir, &a.timeout)?,
        session: a.session.unwrap_or_default(),
        detach: a.detach,
        on_disconnect: if keep { v1::OnDisconnect::Keep } else { v1::OnDisconnect::Unspecified } as i32,
        ..Default::default()
    };
    let detach = req.detach;
    let stream = client.exec(req).await.map_err(status_err)?.into_inner();
    follow(stream, detach).await
}

/// Runs `mpool attach`.
pub async fn attach(client: &mut Client, lease_id: String, a: AttachArgs) -> Result<ExitCode, String> {
    let req = v1::AttachRequest {
        lease_id,
        session: a.session,
        stdout_offset: a.stdout_offset,
        stderr_offset: a.stderr_offset,
    };
    let stream = client.attach(req).await.map_err(status_err)?.into_inner();
    follow(stream, false).await
}

/// Runs `mpool sessions`.
pub async fn sessions(client: &mut Client, lease_id: String, a: SessionsArgs) -> Result<ExitCode, String> {
    let r = client.list_sessions(v1::ListSessionsRequest { lease_id }).await.map_err(status_err)?.into_inner();
    if a.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        crate::cli::output::line(&text);
        return Ok(ExitCode::SUCCESS);
    }
    crate::cli::output::line(&format!(
        "{:<24} {:<8} {:>12} {:>12} {:>5}  COMMAND",
        "SESSION", "STATE", "STDOUT", "STDERR", "EXIT"
    ));
    for s in r.sessions {
        let running = s.state == v1::SessionState::Running as i32;
        let exit = match (&s.exit, running) {
            (Some(x), false) if x.code >= 0 => x.code.to_string(),
            (Some(x), false) => x.signal.clone(),
            _ => "-".into(),
        };
        let state = if running { "running" } else { "exited" };
        crate::cli::output::line(&format!(
            "{:<24} {:<8} {:>12} {:>12} {:>5}  {}",
            s.id, state, s.stdout_bytes, s.stderr_bytes, exit, s.command
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// Passes an exec's (or attach's) events through until the exit; with `detach`, prints the
/// session id the `started` event carries and returns.
async fn follow(mut stream: tonic::Streaming<v1::ExecEvent>, detach: bool) -> Result<ExitCode, String> {
    while let Some(ev) = stream.message().await.map_err(status_err)? {
        use v1::exec_event::Event;
        match ev.event {
            Some(Event::Started(id)) if detach => {
                crate::cli::output::line(&id);
                return Ok(ExitCode::SUCCESS);
            }
            Some(Event::Stdout(t)) => write_out(true, &t),
            Some(Event::Stderr(t)) => write_out(false, &t),
            Some(Event::Dropped(d)) => write_out(false, &format!("{}\n", dropped_marker(&d))),
            Some(Event::Exit(x)) => return Ok(exit_code(&x)),
            _ => {}
        }
    }
    Err("the command ended without an exit status".into())
}

/// The line that stands where a session's output was dropped (above the server's cap).
pub fn dropped_marker(d: &v1::Dropped) -> String {
    format!("[mpool: {} bytes of {} dropped here (output cap)]", d.to.saturating_sub(d.from), d.stream)
}
