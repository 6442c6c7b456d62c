//! Snapshots of stopped instances: `snapshot NAME [--name S]` and `restore NAME.S
//! [--destructive]`.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error};

use super::{Reply, print};

/// `snapshot` flags.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Instance.
    instance: String,
    /// Snapshot name (default: snapshotN).
    #[arg(short, long)]
    name: Option<String>,
    /// Comment.
    #[arg(long, default_value = "")]
    comment: String,
}

/// `restore` flags.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// INSTANCE.SNAPSHOT
    target: String,
    /// Discard the current state without a safety snapshot.
    #[arg(short, long)]
    destructive: bool,
}

/// `snapshot`.
pub async fn snapshot(client: &Client, reply: Reply, a: SnapshotArgs) -> Result<ExitCode, Error> {
    let s = client.snapshot(&a.instance, a.name.as_deref(), &a.comment).await?;
    if reply.json {
        print::json(&serde_json::json!({ "instance": a.instance, "snapshot": s }));
        return Ok(ExitCode::SUCCESS);
    }
    reply.done(format!("Snapshot taken: {}.{s}", a.instance))
}

/// `restore`.
pub async fn restore(client: &Client, reply: Reply, a: RestoreArgs) -> Result<ExitCode, Error> {
    let (i, s) = split_snapshot(&a.target)?;
    client.restore(i, s, a.destructive).await?;
    reply.done(format!("Snapshot restored: {i}.{s}"))
}

/// `INSTANCE.SNAPSHOT`, both parts non-empty.
fn split_snapshot(s: &str) -> Result<(&str, &str), Error> {
    s.split_once('.')
        .filter(|(i, n)| !i.is_empty() && !n.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("{s:?}: expected INSTANCE.SNAPSHOT")))
}
