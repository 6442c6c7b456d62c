//! `find [REMOTE:][STRING]`: the images and blueprints the daemon can launch, as the multipass
//! CLI prints them.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, FindResult, ImageEntry};

use super::Reply;
use crate::cli::output;

/// `find` flags.
#[derive(Args, Debug)]
pub struct FindArgs {
    /// Show only images.
    #[arg(long, conflicts_with = "only_blueprints")]
    only_images: bool,
    /// Show only blueprints.
    #[arg(long)]
    only_blueprints: bool,
    /// Show unsupported cloud images too.
    #[arg(long)]
    show_unsupported: bool,
    /// What to look for, `[remote:]string`.
    #[arg(default_value = "")]
    search: String,
}

/// Runs `find`.
pub async fn run(client: &Client, reply: Reply, args: FindArgs) -> Result<ExitCode, Error> {
    let (images, blueprints) = (!args.only_blueprints, !args.only_images);
    let found = client.find(&args.search, images, blueprints, args.show_unsupported).await?;
    reply.show(&found, || output::text(&format_find(&found, images, blueprints)));
    Ok(ExitCode::SUCCESS)
}

/// `find` as the multipass CLI prints it.
fn format_find(found: &FindResult, images: bool, blueprints: bool) -> String {
    let mut out = String::new();
    let mut table = |kind: &str, list: &[ImageEntry]| {
        out.push_str(&format!("{:<28}{:<18}{:<17}{}\n", kind, "Aliases", "Version", "Description"));
        for e in list {
            let name = e.aliases.first().map(|a| a.to_string()).unwrap_or_default();
            let aliases: Vec<&str> = e.aliases.iter().skip(1).map(|a| a.alias.as_str()).collect();
            let description = if e.os.is_empty() { e.release.clone() } else { format!("{} {}", e.os, e.release) };
            out.push_str(&format!("{:<28}{:<18}{:<17}{}\n", name, aliases.join(","), e.version, description));
        }
        out.push('\n');
    };
    if images {
        table("Image", &found.images);
    }
    if blueprints {
        table("Blueprint (deprecated)", &found.blueprints);
    }
    out
}
