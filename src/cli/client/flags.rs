//! Flags the client commands share, turned into request fields: durations (`30m`), `--env
//! K=V`, and the command of `run` and `exec`.

use std::collections::HashMap;

use mpool_api::proto::v1;

/// A duration flag (`--ttl 30m`) as a proto duration; `None` when the flag is absent.
pub fn dur(flag: &str, s: &Option<String>) -> Result<Option<mpool_api::proto::Duration>, String> {
    s.as_deref()
        .map(|s| {
            mpool_config::parse_duration(s)
                .map(mpool_api::convert::proto_duration)
                .map_err(|e| format!("{flag} {s:?}: {e}"))
        })
        .transpose()
}

/// `--env K=V` flags as a map.
fn env(pairs: &[String]) -> Result<HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--env {p:?}: expected K=V"))
        })
        .collect()
}

/// The command of `run` and `exec`.
pub fn command(
    argv: Vec<String>,
    pairs: &[String],
    workdir: Option<String>,
    timeout: &Option<String>,
) -> Result<Option<v1::Command>, String> {
    Ok(Some(v1::Command {
        argv,
        env: env(pairs)?,
        workdir: workdir.unwrap_or_default(),
        timeout: dur("--timeout", timeout)?,
        ..Default::default()
    }))
}
