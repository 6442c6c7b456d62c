//! `mpool isolation rules`: prints the host's nftables ruleset isolating the instances on the
//! Multipass bridge (or, with `--undo`, the commands removing it), for `nft -f -`. The bridge's
//! subnet is read from the host's interfaces unless given; `[isolation]` in the config file
//! gives defaults for the flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use mpool_config::Config;
use mpool_isolation::{Bridge, DEFAULT_BRIDGE, Subnet};

use super::output;

/// Isolation subcommands.
#[derive(Subcommand, Debug)]
pub enum IsolationCommand {
    /// Print the nftables ruleset that keeps instances from reaching each other and the host
    /// (apply with `mpool isolation rules | nft -f -`; README "Isolation").
    Rules(RulesArgs),
}

/// `mpool isolation rules` flags.
#[derive(Args, Debug)]
pub struct RulesArgs {
    /// mpool's config file, for its `[isolation]` section (flags override its keys).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The bridge the instances are on. Default: `[isolation] bridge`, else mpqemubr0.
    #[arg(long)]
    bridge: Option<String>,
    /// The host's address on the bridge with the prefix length (e.g. 10.1.2.1/24). Default: read
    /// from the bridge interface.
    #[arg(long)]
    subnet: Option<Subnet>,
    /// A TCP port on the host the instances may reach besides DHCP and DNS (repeatable).
    /// Default: `[isolation] allow_host_ports`.
    #[arg(long = "allow-host-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    allow_host_ports: Vec<u16>,
    /// Print the commands removing mpool's rules instead.
    #[arg(long, conflicts_with_all = ["config", "bridge", "subnet", "allow_host_ports"])]
    undo: bool,
}

/// Runs an isolation subcommand.
pub fn run(cmd: IsolationCommand) -> ExitCode {
    match cmd {
        IsolationCommand::Rules(args) => match rules(args) {
            Ok(text) => {
                output::text(&text);
                ExitCode::SUCCESS
            }
            Err(message) => {
                output::err_line(&format!("mpool isolation rules: {message}"));
                ExitCode::from(1)
            }
        },
    }
}

/// The ruleset (or the undo commands) for `args`.
fn rules(args: RulesArgs) -> Result<String, String> {
    if args.undo {
        return Ok(mpool_isolation::undo());
    }
    let configured = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?.isolation,
        None => Default::default(),
    };
    let name = args.bridge.or(configured.bridge).unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
    let ports = if args.allow_host_ports.is_empty() { configured.allow_host_ports } else { args.allow_host_ports };
    let bridge = match args.subnet {
        Some(subnet) => Bridge::new(&name, subnet),
        None => Bridge::detect(&name),
    }
    .map_err(|e| e.to_string())?;
    Ok(mpool_isolation::rules(&bridge, &ports))
}
