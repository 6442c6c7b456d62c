//! `mpool preheat POOL COUNT --for 5m`: raises the pool's ready floor to COUNT VMs for a while
//! (before a fan-out); prints the pool's sizing as one line of JSON.

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::flags::dur;
use super::print::status_err;
use super::{Client, output};

/// `mpool preheat` flags.
#[derive(Args, Debug)]
pub struct PreheatArgs {
    /// Pool.
    pool: String,
    /// Ready VMs wanted (at most the pool's max_size).
    count: u32,
    /// For how long, e.g. 10m (at most 24h).
    #[arg(long = "for", value_name = "DURATION")]
    duration: String,
}

/// Runs `mpool preheat`.
pub async fn run(client: &mut Client, a: PreheatArgs) -> Result<ExitCode, String> {
    let duration = dur("--for", &Some(a.duration))?;
    let r = client
        .preheat(v1::PreheatRequest { pool: a.pool.clone(), count: a.count, duration })
        .await
        .map_err(status_err)?
        .into_inner();
    let until = r.preheat_until.map(|t| t.to_string()).unwrap_or_default();
    let line = serde_json::json!({
        "pool": a.pool,
        "ready_target": r.ready_target,
        "preheat": r.preheat,
        "preheat_until": until,
    });
    output::line(&line.to_string());
    Ok(ExitCode::SUCCESS)
}
