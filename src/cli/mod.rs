//! The `mpool` command line: the command tree, the async runtime each command runs on, and
//! logging. Each command's work lives in a module of its own (`sim.rs`, `multipass/`,
//! `serve.rs`, `demo.rs`, `token.rs`, `isolation.rs`, the client commands in `client/`, benchmarks in
//! [`crate::bench`]); `output.rs` prints without panicking on a closed pipe, `signal.rs` turns
//! a remote signal into an exit code, `data_dir.rs` finds mpool's own files.

pub mod client;
mod data_dir;
mod demo;
mod isolation;
mod multipass;
pub mod output;
mod serve;
mod signal;
mod sim;
mod token;

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
    Token(token::TokenCommand),
    /// Host-side tenant isolation: the nftables rules for the Multipass bridge.
    #[command(subcommand)]
    Isolation(isolation::IsolationCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Entry point of the `mpool` binary.
pub fn main() -> ExitCode {
    mpool_multipass::startup::mark("main");
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.verbose, &cli.command);
    let runtime = match runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            output::err_line(&format!("mpool: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    mpool_multipass::startup::mark("runtime-built");
    let data_dir = data_dir::data_dir(cli.data_dir);
    runtime.block_on(run(cli.command, cli.connect, data_dir))
}

/// The runtime `command` runs on. One-shot commands (one connection, a few calls) need no
/// worker threads: a thread pool's start-up would be most of their run.
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Multipass(_) | Command::Isolation(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Runs `command` to its exit code.
async fn run(command: Command, connect: client::Connect, data_dir: PathBuf) -> ExitCode {
    match command {
        Command::Sim(args) => sim::run(args).await,
        Command::Multipass(args) => multipass::run(args, data_dir).await,
        Command::Serve(args) => serve::run(args, data_dir).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Token(cmd) => token::run(cmd),
        Command::Isolation(cmd) => isolation::run(cmd),
        Command::Client(cmd) => client::run(connect, cmd).await,
    }
}

/// Logs to stderr: `-v`s choose the level (by default info for the daemons, warnings for the
/// rest), `MPOOL_LOG` overrides it.
fn init_logging(format: LogFormat, verbose: u8, command: &Command) {
    let level = match (verbose, command) {
        (0, Command::Sim(_) | Command::Serve(_)) => "info",
        (0, _) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    // The simulated VMs' SFTP server (russh-sftp) warns "I/O: broken pipe" each time a client
    // closes its session, which every transfer does: not worth a line unless asked for (-v).
    let mut directive = if verbose == 0 { format!("{level},russh_sftp::server=error") } else { level.to_string() };
    // The demo's simulated VMs share the host's network: its table shows the probe's verdict
    // instead of the warning a real host deserves.
    if verbose == 0 && matches!(command, Command::Demo(_)) {
        directive.push_str(",mpool_engine::isolation=error");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("MPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directive));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
