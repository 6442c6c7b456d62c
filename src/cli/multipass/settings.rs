//! Daemon settings: `get KEY` (printed as the multipass CLI prints them) and `set KEY=VALUE`
//! (after which the daemon restarts).

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error};

use super::Reply;
use crate::cli::output;

/// `get` flags.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// Print an empty value as nothing instead of `<empty>`.
    #[arg(long)]
    raw: bool,
    /// Key, e.g. local.driver.
    key: String,
}

/// `set` flags.
#[derive(Args, Debug)]
pub struct SetArgs {
    /// KEY=VALUE
    assignment: String,
}

/// `get`.
pub async fn get(client: &Client, reply: Reply, a: GetArgs) -> Result<ExitCode, Error> {
    let value = setting_text(&a.key, &client.get(&a.key).await?, a.raw);
    reply.show(&serde_json::json!({ "key": a.key, "value": value }), || output::line(&value));
    Ok(ExitCode::SUCCESS)
}

/// `set`.
pub async fn set(client: &Client, reply: Reply, a: SetArgs) -> Result<ExitCode, Error> {
    let (k, v) = a
        .assignment
        .split_once('=')
        .ok_or_else(|| Error::InvalidArgument(format!("{:?}: expected KEY=VALUE", a.assignment)))?;
    client.set(k, v).await?;
    reply.done("")
}

/// A setting as the multipass CLI prints it: `local.passphrase` as whether one is set (the
/// daemon returns its hash), an empty value as `<empty>` unless `raw`.
fn setting_text(key: &str, value: &str, raw: bool) -> String {
    if key == "local.passphrase" {
        return if value.is_empty() { "false" } else { "true" }.into();
    }
    if value.is_empty() && !raw {
        return "<empty>".into();
    }
    value.to_string()
}
