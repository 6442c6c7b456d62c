//! `mpool exec LEASE -- ARGV`: runs a command on a leased VM, passes its output through as it
//! arrives, and exits with the remote exit code.

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
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// Runs `mpool exec`.
pub async fn run(client: &mut Client, lease_id: String, a: ExecArgs) -> Result<ExitCode, String> {
    let req =
        v1::ExecRequest { lease_id, command: command(a.argv, &a.env, a.workdir, &a.timeout)?, exec_id: String::new() };
    let mut stream = client.exec(req).await.map_err(status_err)?.into_inner();
    while let Some(ev) = stream.message().await.map_err(status_err)? {
        use v1::exec_event::Event;
        match ev.event {
            Some(Event::Stdout(t)) => write_out(true, &t),
            Some(Event::Stderr(t)) => write_out(false, &t),
            Some(Event::Exit(x)) => return Ok(exit_code(&x)),
            _ => {}
        }
    }
    Err("the command ended without an exit status".into())
}
