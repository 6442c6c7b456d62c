//! `ssh-info NAME`: where a running instance's SSH server listens, as `USER@HOST:PORT`.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error};

use super::Reply;
use crate::cli::output;

/// `ssh-info` flags.
#[derive(Args, Debug)]
pub struct SshInfoArgs {
    /// Instance.
    name: String,
}

/// Runs `ssh-info`.
pub async fn run(client: &Client, reply: Reply, a: SshInfoArgs) -> Result<ExitCode, Error> {
    let info = client.ssh_info(&a.name).await?;
    reply.show(&info, || output::line(&format!("{}@{}:{}", info.username, info.host, info.port)));
    Ok(ExitCode::SUCCESS)
}
