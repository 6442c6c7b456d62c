//! `list [--snapshots]`: the instances (with their IPv4 addresses, which the daemon gathers
//! over SSH in the guests, as the multipass CLI asks it to) or the snapshots, as the multipass
//! CLI prints them.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, InstanceSummary, SnapshotSummary};

use super::Reply;
use super::print::title;
use crate::cli::output;

/// `list` flags.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// List snapshots instead.
    #[arg(long)]
    snapshots: bool,
}

/// Runs `list`.
pub async fn run(client: &Client, reply: Reply, args: ListArgs) -> Result<ExitCode, Error> {
    if args.snapshots {
        let list = client.list_snapshots().await?;
        reply.show(&list, || print_snapshots(&list));
    } else {
        let list = client.list_with_ipv4().await?;
        reply.show(&list, || output::text(&format_list(&list)));
    }
    Ok(ExitCode::SUCCESS)
}

/// `list` as the multipass CLI prints it.
fn format_list(list: &[InstanceSummary]) -> String {
    if list.is_empty() {
        return "No instances found.\n".into();
    }
    let width = list.iter().map(|i| i.name.len() + 1).max().unwrap_or(0).max(24);
    let mut out = format!("{:<width$}{:<18}{:<17}{}\n", "Name", "State", "IPv4", "Image");
    for i in list {
        let image = if i.release.is_empty() { "Not Available".to_string() } else { format!("Ubuntu {}", i.release) };
        let ip = i.ipv4.first().map(String::as_str).unwrap_or("--");
        out.push_str(&format!("{:<width$}{:<18}{:<17}{}\n", i.name, title(i.state.as_str_name()), ip, image));
        for extra in i.ipv4.iter().skip(1) {
            out.push_str(&format!("{:<width$}{:<18}{}\n", "", "", extra));
        }
    }
    out
}

/// `list --snapshots` as the multipass CLI prints it.
fn print_snapshots(list: &[SnapshotSummary]) {
    if list.is_empty() {
        output::line("No snapshots found.");
        return;
    }
    output::line(&format!("{:<24} {:<16} {:<16} Comment", "Instance", "Snapshot", "Parent"));
    for s in list {
        let parent = if s.parent.is_empty() { "--" } else { &s.parent };
        output::line(&format!("{:<24} {:<16} {:<16} {}", s.instance, s.name, parent, s.comment));
    }
}
