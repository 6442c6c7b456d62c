//! The `mpool` command line: clap definitions and dispatch. Each subcommand's work lives in its
//! own file (`sim.rs`, `multipass.rs`, ...; `output.rs` prints without panicking on a closed
//! pipe); this file only parses and sets up logging.

pub mod client;
mod demo;
mod multipass;
pub mod output;
mod serve;
mod signal;
mod sim;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Warm pools of clean Multipass VMs for workflow tasks.
#[derive(Parser, Debug)]
#[command(name = "mpool", version, about, propagate_version = true)]
pub struct Cli {
    /// mpool's own files (its client certificate and key). Default: $XDG_DATA_HOME/mpool or
    /// ~/.local/share/mpool.
    #[arg(long, global = true, env = "MPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More logging (-v info, -vv debug, -vvv trace). `MPOOL_LOG` (an env-filter) overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    connect: client::Connect,
    #[command(subcommand)]
    command: Command,
}

/// Log output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the multipassd simulator (same protocol, TLS, trust and state rules; real SSH).
    Sim(sim::SimArgs),
    /// Talk to multipassd (or the simulator) directly: an operator's debugging tool.
    Multipass(multipass::MultipassArgs),
    /// Run the pool daemon: warm VMs, leases, the mpool.v1 API.
    Serve(serve::ServeArgs),
    /// Simulator + pool daemon + a sample task through the public API, with timings.
    Demo(demo::DemoArgs),
    /// Benchmarks against a simulator it starts: figures, baselines and ratios (see README).
    Bench(crate::bench::BenchArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Token subcommands.
#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new random token and the line to add to the tokens file (only its hash is stored).
    New {
        /// The token's name (owner of the leases it acquires).
        #[arg(long)]
        name: String,
        /// A pool it may use (repeatable; `*` for all).
        #[arg(long = "pool", required_unless_present = "admin")]
        pools: Vec<String>,
        /// Admin: all pools, every lease.
        #[arg(long)]
        admin: bool,
    },
}

/// mpool's data dir: the flag/env, else `$XDG_DATA_HOME/mpool`, else `~/.local/share/mpool`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d;
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("mpool");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/mpool")
}

fn init_logging(format: LogFormat, verbose: u8, default: &str) {
    let level = match verbose {
        0 => default,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Entry point of the `mpool` binary.
pub fn main() -> ExitCode {
    mpool_multipass::startup::mark("main");
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Sim(_) | Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, cli.verbose, default_level);
    // One-shot commands (one connection, a few calls) need no worker threads: a thread
    // pool's start-up would be most of their run.
    let one_shot = matches!(cli.command, Command::Multipass(_));
    let mut builder = if one_shot {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            output::err_line(&format!("mpool: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    mpool_multipass::startup::mark("runtime-built");
    let data_dir = data_dir(cli.data_dir);
    runtime.block_on(async move {
        match cli.command {
            Command::Sim(args) => sim::run(args).await,
            Command::Multipass(args) => multipass::run(args, data_dir).await,
            Command::Serve(args) => serve::run(args, data_dir).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => crate::bench::run(args).await,
            Command::Token(TokenCommand::New { name, pools, admin }) => {
                let token = mpool_api::auth::new_token();
                let hash = mpool_api::auth::hex(&mpool_api::auth::hash(&token));
                output::line(&format!("token (give it to the client; it is not stored):\n  {token}\n"));
                output::line(&format!(
                    "add to the tokens file:\n[[tokens]]\nname = {name:?}\nsha256 = \"{hash}\"\npools = {pools:?}\nadmin = {admin}"
                ));
                ExitCode::SUCCESS
            }
            Command::Client(cmd) => client::run(cli.connect, cmd).await,
        }
    })
}
