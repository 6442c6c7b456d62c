//! `info NAME...`: details of instances as `multipass info` prints them, with the runtime
//! information (CPUs, load, disk and memory usage, IPv4) the daemon gathers over SSH in the
//! guests unless `--no-runtime-information`.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, InstanceInfo, Names};

use super::Reply;
use super::print::title;
use crate::cli::output;

/// `info` flags.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Leave out runtime information (no SSH inside the daemon; those fields show `--`).
    #[arg(long)]
    no_runtime_information: bool,
    /// Instances.
    #[arg(required = true)]
    names: Vec<String>,
}

/// Runs `info`.
pub async fn run(client: &Client, reply: Reply, args: InfoArgs) -> Result<ExitCode, Error> {
    let n = Names::new(args.names)?;
    let info = if args.no_runtime_information { client.info(&n).await? } else { client.info_with_runtime(&n).await? };
    reply.show(&info, || {
        let blocks: Vec<String> = info.iter().map(format_info).collect();
        output::text(&blocks.join("\n"));
    });
    Ok(ExitCode::SUCCESS)
}

/// One instance of `info` as the multipass CLI prints it.
fn format_info(i: &InstanceInfo) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<16}{v}\n"));
    line("Name:", &i.name);
    line("State:", &title(i.state.as_str_name()));
    line("Snapshots:", &i.snapshots.to_string());
    line("IPv4:", i.ipv4.first().map(String::as_str).unwrap_or("--"));
    for extra in i.ipv4.iter().skip(1) {
        line("", extra);
    }
    line("Release:", or_dashes(&i.current_release));
    line("Image hash:", &image_hash(i));
    line("CPU(s):", or_dashes(&i.cpus));
    line("Load:", or_dashes(&i.load));
    line("Disk usage:", &usage(&i.disk_usage, &i.disk));
    line("Memory usage:", &usage(&i.memory_usage, &i.memory));
    line("Mounts:", "--");
    out
}

/// The image's short hash and release, e.g. `0123456789ab (Ubuntu 24.04 LTS)`.
fn image_hash(i: &InstanceInfo) -> String {
    if i.image_hash.is_empty() {
        return "Not Available".to_string();
    }
    let short: String = i.image_hash.chars().take(12).collect();
    if i.image_release.is_empty() { short } else { format!("{short} (Ubuntu {})", i.image_release) }
}

/// Bytes as the multipass CLI shows sizes (`MemorySize::human_readable`: one decimal, binary
/// units).
fn human_size(bytes: &str) -> Option<String> {
    let b: f64 = bytes.trim().parse().ok()?;
    for (unit, suffix) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        let q = b / unit as f64;
        if q >= 1.0 {
            return Some(format!("{q:.1}{suffix}"));
        }
    }
    Some(format!("{b}B"))
}

/// `USED out of TOTAL`, or `--` when either is unknown.
fn usage(used: &str, total: &str) -> String {
    match (human_size(used), human_size(total)) {
        (Some(u), Some(t)) if !used.is_empty() && !total.is_empty() => format!("{u} out of {t}"),
        _ => "--".into(),
    }
}

fn or_dashes(s: &str) -> &str {
    if s.is_empty() { "--" } else { s }
}
