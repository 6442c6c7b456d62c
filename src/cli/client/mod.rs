//! The client commands of `mpool` (for shell scripts and Kestra shell tasks): talk to a running
//! `mpool serve` over `--endpoint` (`unix:PATH` or `http(s)://HOST:PORT`, env `MPOOL_ENDPOINT`)
//! with an optional `--token` (env `MPOOL_TOKEN`).
//!
//! This file is the command table. Each command's flags, call and output live in a file of its
//! own (`run/`, `acquire.rs`, `exec.rs`, ...); `flags.rs` turns shared flags into request
//! fields, `print.rs` prints leases and errors, `remote.rs` passes a remote command's output and
//! exit status through, `waiting.rs` shows the wait for a VM on a terminal.

mod acquire;
mod exec;
mod flags;
mod gc;
mod leases;
mod print;
mod release;
mod remote;
mod renew;
mod run;
mod status;
mod vms;
mod waiting;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output;
pub use mpool_api::client::{Client, DEFAULT_ENDPOINT};

/// How to reach `mpool serve`.
#[derive(Args, Debug, Clone)]
pub struct Connect {
    /// `unix:PATH` or `http(s)://HOST:PORT`.
    #[arg(long, env = "MPOOL_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    /// Bearer token for TCP endpoints.
    #[arg(long, env = "MPOOL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to verify an https endpoint.
    #[arg(long, env = "MPOOL_CA", global = true)]
    pub ca: Option<PathBuf>,
}

/// Connects to the API.
pub async fn connect(c: &Connect) -> Result<Client, String> {
    mpool_api::client::connect(&mpool_api::client::Connect {
        endpoint: c.endpoint.clone(),
        token: c.token.clone(),
        ca: c.ca.clone(),
    })
    .await
}

/// Client subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Run a command in a clean VM: acquire, copy files in, run, copy files out, release.
    Run(run::RunArgs),
    /// Acquire a lease; prints its id (or the lease as JSON with --json).
    Acquire(acquire::AcquireArgs),
    /// Run a command on a lease; exits with the remote exit code.
    Exec(exec::ExecArgs),
    /// Extend a lease.
    Renew(renew::RenewArgs),
    /// End a lease (its VM is reset in the background).
    Release(release::ReleaseArgs),
    /// Pools and their VM states.
    Status(status::StatusArgs),
    /// VMs.
    Vms(vms::VmsArgs),
    /// Leases.
    Leases(leases::LeasesArgs),
    /// Cleanup now (admins): purge mpool's deleted instances, delete snapshots that are not
    /// mpool's; anything without mpool's prefix is only listed.
    Gc(gc::GcArgs),
}

/// Runs a client command.
pub async fn run(c: Connect, cmd: ClientCommand) -> ExitCode {
    match run_inner(c, cmd).await {
        Ok(code) => code,
        Err(e) => {
            output::err_line(&format!("mpool: {e}"));
            ExitCode::from(2)
        }
    }
}

async fn run_inner(c: Connect, cmd: ClientCommand) -> Result<ExitCode, String> {
    let mut client = connect(&c).await?;
    match cmd {
        ClientCommand::Run(a) => run::run(&mut client, a).await,
        ClientCommand::Acquire(a) => acquire::run(&mut client, a).await,
        ClientCommand::Exec(a) => exec::run(&mut client, a).await,
        ClientCommand::Renew(a) => renew::run(&mut client, a).await,
        ClientCommand::Release(a) => release::run(&mut client, a).await,
        ClientCommand::Status(a) => status::run(&mut client, a).await,
        ClientCommand::Vms(a) => vms::run(&mut client, a).await,
        ClientCommand::Leases(a) => leases::run(&mut client, a).await,
        ClientCommand::Gc(a) => gc::run(&mut client, a).await,
    }
}
