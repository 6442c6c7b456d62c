//! `launch --name NAME [IMAGE]`: creates and starts an instance (images as multipass takes
//! them: `24.04`, `noble`, `daily:noble`, `docker`, `file://...`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, LaunchOptions};

use super::Reply;

/// `launch` flags.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Instance name.
    #[arg(short, long)]
    name: String,
    /// CPUs.
    #[arg(short, long, default_value_t = 0)]
    cpus: i32,
    /// Memory, e.g. 2G.
    #[arg(short, long, default_value = "")]
    memory: String,
    /// Disk, e.g. 10G.
    #[arg(short, long, default_value = "")]
    disk: String,
    /// cloud-init user data file.
    #[arg(long)]
    cloud_init: Option<PathBuf>,
    /// Seconds to wait for the instance (0: the daemon's 300).
    #[arg(long, default_value_t = 0)]
    launch_timeout: i32,
    /// Image, e.g. 24.04.
    #[arg(default_value = "")]
    image: String,
}

/// Runs `launch`.
pub async fn run(client: &Client, reply: Reply, a: LaunchArgs) -> Result<ExitCode, Error> {
    let cloud_init = match a.cloud_init {
        Some(f) => std::fs::read_to_string(&f)
            .map_err(|e| Error::InvalidArgument(format!("--cloud-init {}: {e}", f.display())))?,
        None => String::new(),
    };
    let opts = LaunchOptions {
        name: a.name,
        image: a.image,
        cpus: a.cpus,
        memory: a.memory,
        disk: a.disk,
        cloud_init,
        timeout_secs: a.launch_timeout,
    };
    let n = client.launch(&opts).await?;
    reply.done(format!("Launched: {n}"))
}
