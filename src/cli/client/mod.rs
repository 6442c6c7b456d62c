//! The client commands of `mpool` (for shell scripts and Kestra shell tasks): talk to a running
//! `mpool serve` over `--endpoint` (`unix:PATH` or `http(s)://HOST:PORT`, env `MPOOL_ENDPOINT`)
//! with an optional `--token` (env `MPOOL_TOKEN`). With several hosts (`--endpoint` repeated,
//! or `MPOOL_ENDPOINTS=a,b`), `run` and `acquire` choose a host ([`crate::fleet`]), `acquire`
//! prints a lease handle naming its host (which `exec`, `renew` and `release` follow), and
//! `status` shows every host (`fleet.rs`).
//!
//! This file is the command table. Each command's flags, call and output live in a file of its
//! own (`run/`, `acquire.rs`, `exec.rs`, ...); `flags.rs` turns shared flags into request
//! fields, `print.rs` prints leases and errors, `remote.rs` passes a remote command's output and
//! exit status through, `waiting.rs` shows the wait for a VM on a terminal.

mod acquire;
mod drain;
mod exec;
mod flags;
mod fleet;
mod gc;
mod leases;
mod preheat;
mod print;
mod release;
mod reload;
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

/// How to reach `mpool serve`: one host, or several.
#[derive(Args, Debug, Clone, Default)]
pub struct Connect {
    /// `unix:PATH` or `http(s)://HOST:PORT` [default: unix:/run/mpool/mpool.sock]. Repeat it for
    /// several hosts: `run` and `acquire` choose the one with the most ready VMs, `status` shows
    /// them all.
    #[arg(long, env = "MPOOL_ENDPOINT", global = true)]
    pub endpoint: Vec<String>,
    /// Several hosts, comma separated (used when no --endpoint is given).
    #[arg(long, env = "MPOOL_ENDPOINTS", global = true, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Bearer token for TCP endpoints.
    #[arg(long, env = "MPOOL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to verify an https endpoint.
    #[arg(long, env = "MPOOL_CA", global = true)]
    pub ca: Option<PathBuf>,
}

impl Connect {
    /// One host at `endpoint`, without token or CA.
    pub fn single(endpoint: String) -> Connect {
        Connect { endpoint: vec![endpoint], ..Connect::default() }
    }

    /// The hosts: the `--endpoint`s (or `MPOOL_ENDPOINT`), else `MPOOL_ENDPOINTS`, else the
    /// default socket; blanks dropped, each once.
    pub fn all(&self) -> Vec<String> {
        let given = if self.endpoint.iter().any(|e| !e.trim().is_empty()) { &self.endpoint } else { &self.endpoints };
        let mut all: Vec<String> = Vec::new();
        for e in given.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if !all.iter().any(|x| x == e) {
                all.push(e.to_string());
            }
        }
        if all.is_empty() {
            all.push(DEFAULT_ENDPOINT.to_string());
        }
        all
    }

    /// The one host a command that talks to a single host goes to.
    fn one(&self) -> Result<String, String> {
        match self.all().as_slice() {
            [one] => Ok(one.clone()),
            many => Err(format!(
                "this command talks to one host, and {} endpoints are given ({}): pass one --endpoint",
                many.len(),
                many.join(", ")
            )),
        }
    }

    /// These settings, at `endpoint`.
    fn at(&self, endpoint: String) -> mpool_api::client::Connect {
        mpool_api::client::Connect { endpoint, token: self.token.clone(), ca: self.ca.clone() }
    }

    /// The hosts as a [`crate::fleet::Fleet`].
    fn fleet(&self) -> crate::fleet::Fleet {
        crate::fleet::Fleet::new(self.all(), self.token.clone(), self.ca.clone())
    }
}

/// Connects to the API of the one host `c` names.
pub async fn connect(c: &Connect) -> Result<Client, String> {
    mpool_api::client::connect(&c.at(c.one()?)).await
}

/// Connects to the host that holds `lease` (a handle `mpool acquire` printed, or a plain lease
/// id with one endpoint); answers the client and the lease id that host knows.
async fn connect_for_lease(c: &Connect, lease: &str) -> Result<(Client, String), String> {
    let h = crate::fleet::handle::decode(lease)?;
    let endpoint = match h.endpoint {
        Some(e) => e,
        None => c.one().map_err(|e| {
            format!(
                "{lease:?} is a plain lease id, which names no host; {e}, or use the handle `mpool acquire` printed"
            )
        })?,
    };
    Ok((mpool_api::client::connect(&c.at(endpoint)).await?, h.lease_id))
}

/// Client subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Run a command in a clean VM: acquire, copy files in, run, copy files out, release.
    Run(run::RunArgs),
    /// Acquire a lease; prints its id (or the lease as JSON with --json).
    Acquire(acquire::AcquireArgs),
    /// Run a command on a lease; exits with the remote exit code (`--detach`: as a session).
    Exec(exec::ExecArgs),
    /// Follow a session (`mpool exec --detach`): its output so far, then live, then its exit.
    Attach(exec::AttachArgs),
    /// A lease's sessions.
    Sessions(exec::SessionsArgs),
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
    /// Keep more VMs of a pool ready for a while (before a fan-out).
    Preheat(preheat::PreheatArgs),
    /// Make the server re-read its config: tokens and TLS certificate rotate without a restart.
    Reload(reload::ReloadArgs),
    /// Drain the host (refuse new leases, let the current ones finish), or undo it; admins only.
    Drain(drain::DrainArgs),
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
    let several = c.all().len() > 1;
    match cmd {
        ClientCommand::Run(a) if several => run::run_fleet(&mut c.fleet(), a).await,
        ClientCommand::Acquire(a) if several => acquire::run_fleet(&mut c.fleet(), a).await,
        ClientCommand::Status(a) if several => fleet::status(&mut c.fleet(), a).await,
        ClientCommand::Exec(a) => {
            let (mut client, lease) = connect_for_lease(&c, &a.lease).await?;
            exec::run(&mut client, lease, a).await
        }
        ClientCommand::Attach(a) => {
            let (mut client, lease) = connect_for_lease(&c, &a.lease).await?;
            exec::attach(&mut client, lease, a).await
        }
        ClientCommand::Sessions(a) => {
            let (mut client, lease) = connect_for_lease(&c, &a.lease).await?;
            exec::sessions(&mut client, lease, a).await
        }
        ClientCommand::Renew(a) => {
            let (mut client, lease) = connect_for_lease(&c, &a.lease).await?;
            renew::run(&mut client, lease, a).await
        }
        ClientCommand::Release(a) => {
            let (mut client, lease) = connect_for_lease(&c, &a.lease).await?;
            release::run(&mut client, lease).await
        }
        ClientCommand::Run(a) => run::run(&mut connect(&c).await?, a).await,
        ClientCommand::Acquire(a) => acquire::run(&mut connect(&c).await?, a).await,
        ClientCommand::Status(a) => status::run(&mut connect(&c).await?, a).await,
        ClientCommand::Vms(a) => vms::run(&mut connect(&c).await?, a).await,
        ClientCommand::Leases(a) => leases::run(&mut connect(&c).await?, a).await,
        ClientCommand::Drain(a) => drain::run(&mut connect(&c).await?, a).await,
        ClientCommand::Preheat(a) => preheat::run(&mut connect(&c).await?, a).await,
        ClientCommand::Reload(a) => reload::run(&mut connect(&c).await?, a).await,
        ClientCommand::Gc(a) => gc::run(&mut connect(&c).await?, a).await,
    }
}
