//! The verbs that change whether instances run: `start`, `stop`, `suspend` and `restart`.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, Names};

use super::{Instances, Reply};

/// `start` flags.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// Seconds to wait for the instances to come up (0: the daemon's 300).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
    timeout: i32,
    /// Instances.
    #[arg(required = true)]
    names: Vec<String>,
}

/// `stop` flags.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Kill instead of powering down (also stops suspended instances).
    #[arg(long)]
    force: bool,
    /// Instances.
    #[arg(required = true)]
    names: Vec<String>,
}

/// `start` (or resume).
pub async fn start(client: &Client, reply: Reply, a: StartArgs) -> Result<ExitCode, Error> {
    client.start(&Names::new(a.names)?, a.timeout).await?;
    reply.done("")
}

/// `stop`.
pub async fn stop(client: &Client, reply: Reply, a: StopArgs) -> Result<ExitCode, Error> {
    client.stop(&Names::new(a.names)?, a.force).await?;
    reply.done("")
}

/// `suspend`.
pub async fn suspend(client: &Client, reply: Reply, a: Instances) -> Result<ExitCode, Error> {
    client.suspend(&Names::new(a.names)?).await?;
    reply.done("")
}

/// `restart` (a reboot).
pub async fn restart(client: &Client, reply: Reply, a: Instances) -> Result<ExitCode, Error> {
    client.restart(&Names::new(a.names)?, 0).await?;
    reply.done("")
}
