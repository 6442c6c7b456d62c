//! What the daemon says about itself: `version` (multipassd's and ours) and `daemon-info` (the
//! host's CPUs, memory and free space).

use std::process::ExitCode;

use mpool_multipass::{Client, Error};

use super::Reply;
use crate::cli::output;

/// `version`: read while connecting, so it costs no call of its own.
pub fn version(client: &Client, reply: Reply) -> Result<ExitCode, Error> {
    let v = client.daemon_version_text().to_string();
    let ours = env!("CARGO_PKG_VERSION");
    reply.show(&serde_json::json!({ "daemon": v, "mpool": ours }), || {
        output::line(&format!("multipassd  {v}\nmpool       {ours}"))
    });
    Ok(ExitCode::SUCCESS)
}

/// `daemon-info`.
pub async fn info(client: &Client, reply: Reply) -> Result<ExitCode, Error> {
    let d = client.daemon_info().await?;
    reply.show(&d, || {
        output::line(&format!("CPUs:    {}\nMemory:  {} bytes\nSpace:   {} bytes", d.cpus, d.memory, d.available_space))
    });
    Ok(ExitCode::SUCCESS)
}
