//! `clone SRC --name DST`: a copy of a stopped instance.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error};

use super::Reply;

/// `clone` flags.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// Source instance.
    source: String,
    /// Destination name.
    #[arg(short, long)]
    name: String,
}

/// Runs `clone`.
pub async fn run(client: &Client, reply: Reply, a: CloneArgs) -> Result<ExitCode, Error> {
    client.clone_instance(&a.source, &a.name).await?;
    reply.done(format!("Cloned from {} to {}.", a.source, a.name))
}
