//! Instances going and coming back: `delete` (instances, or `INSTANCE.SNAPSHOT` snapshots;
//! `--purge` for good), `purge` (every deleted instance) and `recover`.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, Names};

use super::{Instances, Reply};

/// `delete` flags.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Release the instances for good.
    #[arg(short, long)]
    purge: bool,
    /// Instances or INSTANCE.SNAPSHOT.
    #[arg(required = true)]
    names: Vec<String>,
}

/// `delete`: each snapshot on its own, then the instances in one call.
pub async fn delete(client: &Client, reply: Reply, a: DeleteArgs) -> Result<ExitCode, Error> {
    let mut instances = Vec::new();
    for item in a.names {
        match item.split_once('.') {
            Some((i, s)) => client.delete_snapshot(i, s).await?,
            None => instances.push(item),
        }
    }
    if !instances.is_empty() {
        client.delete(&Names::new(instances)?, a.purge).await?;
    }
    reply.done("")
}

/// `purge`: prints the purged instances.
pub async fn purge(client: &Client, reply: Reply) -> Result<ExitCode, Error> {
    let purged = client.purge().await?;
    reply.done(purged.join("\n"))
}

/// `recover`.
pub async fn recover(client: &Client, reply: Reply, a: Instances) -> Result<ExitCode, Error> {
    client.recover(&Names::new(a.names)?).await?;
    reply.done("")
}
