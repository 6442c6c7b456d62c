//! `mpool multipass <verb>`: talks to multipassd (or `mpool sim`) directly, with the multipass
//! CLI's own argument shapes. Human output by default, `--json` for scripts. Exit codes follow
//! the multipass CLI: 0 ok, 2 the command failed, 3 the daemon is unreachable; `exec` exits
//! with the remote command's code.
//!
//! This file is the verb table. Each verb's flags, call and output live in a file of its own
//! (`list.rs`, `exec.rs`, ...; `power.rs` holds start, stop, suspend and restart, `delete.rs`
//! delete, purge and recover); `connect.rs` reaches the daemon and `print.rs` prints replies.

mod authenticate;
mod clone;
mod connect;
mod daemon;
mod delete;
mod exec;
mod find;
mod info;
mod launch;
mod list;
mod power;
mod print;
mod settings;
mod snapshot;
mod ssh_info;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output;
use mpool_multipass::{Client, Error};
use print::Reply;

/// `mpool multipass` flags.
#[derive(Args, Debug)]
pub struct MultipassArgs {
    #[command(flatten)]
    connect: connect::ConnectArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// The daemon's version.
    Version,
    /// Instances (or snapshots).
    List(list::ListArgs),
    /// Details of instances, with runtime information (CPUs, load, disk and memory usage,
    /// IPv4) as `multipass info` shows them.
    Info(info::InfoArgs),
    /// Images and blueprints to launch: `find [REMOTE:][STRING]`.
    Find(find::FindArgs),
    /// Create and start an instance.
    Launch(launch::LaunchArgs),
    /// Start (or resume) instances.
    Start(power::StartArgs),
    /// Stop instances.
    Stop(power::StopArgs),
    /// Suspend instances.
    Suspend(Instances),
    /// Reboot instances.
    Restart(Instances),
    /// Snapshot a stopped instance.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore a stopped instance: `restore NAME.SNAPSHOT --destructive`.
    Restore(snapshot::RestoreArgs),
    /// Clone a stopped instance: `clone SRC --name DST`.
    Clone(clone::CloneArgs),
    /// Delete instances (or INSTANCE.SNAPSHOT snapshots).
    Delete(delete::DeleteArgs),
    /// Purge all deleted instances.
    Purge,
    /// Recover deleted instances.
    Recover(Instances),
    /// Ask the daemon to trust this client.
    Authenticate(authenticate::AuthenticateArgs),
    /// SSH endpoint of a running instance.
    SshInfo(ssh_info::SshInfoArgs),
    /// Read a daemon setting (`local.passphrase` prints whether one is set: true/false).
    Get(settings::GetArgs),
    /// Write a setting: `set KEY=VALUE` (a daemon setting restarts the daemon; an instance's
    /// `local.<vm>.cpus|memory|disk`, stopped only, does not).
    Set(settings::SetArgs),
    /// Host resources.
    DaemonInfo,
    /// Run a command in a running instance over SSH: `exec NAME -- ARGV`.
    Exec(exec::ExecArgs),
}

/// The instances a verb acts on (one or more names).
#[derive(Args, Debug)]
pub struct Instances {
    /// Instances.
    #[arg(required = true)]
    names: Vec<String>,
}

/// Runs one verb.
pub async fn run(args: MultipassArgs, data_dir: PathBuf) -> ExitCode {
    match run_inner(args, data_dir).await {
        Ok(code) => code,
        Err(e) => {
            output::err_line(&format!("mpool multipass: {e}"));
            if e.is_unavailable() && !e.is_trust_problem() { ExitCode::from(3) } else { ExitCode::from(2) }
        }
    }
}

async fn run_inner(args: MultipassArgs, data_dir: PathBuf) -> Result<ExitCode, Error> {
    let passphrase = match &args.verb {
        Verb::Authenticate(a) => a.passphrase.clone(),
        _ => None,
    };
    let client = connect::connect(&args.connect, passphrase, data_dir).await?;
    dispatch(&client, Reply { json: args.json }, args.verb).await
}

async fn dispatch(client: &Client, reply: Reply, verb: Verb) -> Result<ExitCode, Error> {
    match verb {
        Verb::Version => daemon::version(client, reply),
        Verb::List(a) => list::run(client, reply, a).await,
        Verb::Info(a) => info::run(client, reply, a).await,
        Verb::Find(a) => find::run(client, reply, a).await,
        Verb::Launch(a) => launch::run(client, reply, a).await,
        Verb::Start(a) => power::start(client, reply, a).await,
        Verb::Stop(a) => power::stop(client, reply, a).await,
        Verb::Suspend(a) => power::suspend(client, reply, a).await,
        Verb::Restart(a) => power::restart(client, reply, a).await,
        Verb::Snapshot(a) => snapshot::snapshot(client, reply, a).await,
        Verb::Restore(a) => snapshot::restore(client, reply, a).await,
        Verb::Clone(a) => clone::run(client, reply, a).await,
        Verb::Delete(a) => delete::delete(client, reply, a).await,
        Verb::Purge => delete::purge(client, reply).await,
        Verb::Recover(a) => delete::recover(client, reply, a).await,
        Verb::Authenticate(_) => authenticate::run(reply),
        Verb::SshInfo(a) => ssh_info::run(client, reply, a).await,
        Verb::Get(a) => settings::get(client, reply, a).await,
        Verb::Set(a) => settings::set(client, reply, a).await,
        Verb::DaemonInfo => daemon::info(client, reply).await,
        Verb::Exec(a) => exec::run(client, a).await,
    }
}
