//! `mpool sim`: runs the simulator until SIGINT/SIGTERM (exit 0) or until a `set` changes a
//! daemon setting (exit 42, as multipassd does to be restarted by its service manager).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use mpool_core::types::SshEndpoint;
use mpool_sim::{Exit, FailMode, SimConfig, Simulator};

/// `mpool sim` flags.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Unix socket to serve multipassd's protocol on.
    #[arg(long)]
    socket: PathBuf,
    /// Directory for instances, snapshots, certificates and the trust store (kept across restarts).
    #[arg(long)]
    state_dir: PathBuf,
    /// Also listen on TCP (e.g. 127.0.0.1:50051); no first-client trust there.
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// Multiplies the realistic timing profile (0 = instant; 0.01 = 100x faster).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// The daemon's `local.passphrase` for `authenticate` (visible in `ps`; prefer --passphrase-file).
    #[arg(long, conflicts_with = "passphrase_file")]
    passphrase: Option<String>,
    /// Read the passphrase from this file (first line).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Make ssh_info point at this SSH server instead of the simulator's own endpoints.
    #[arg(long, value_name = "[USER@]HOST:PORT")]
    ssh_target: Option<String>,
    /// Probability (0-1) that a mutating call fails with INTERNAL.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// What --fail and --fail-rate do: `error` (INTERNAL) or `abort` (the daemon dies
    /// mid-call, as multipassd's log-writer race made it: connection cut, exit 134, socket
    /// file left behind).
    #[arg(long, value_enum, default_value_t = FailModeArg::Error)]
    fail_mode: FailModeArg,
    /// A `set` while other calls are in flight wedges the daemon as multipassd 1.16.3 did:
    /// socket gone, process alive (only SIGKILL ends it), nothing answers.
    #[arg(long)]
    set_wedges_if_busy: bool,
    /// Make this operation always fail (repeatable), e.g. `--fail suspend`.
    #[arg(long = "fail", value_name = "OP")]
    fail: Vec<String>,
    /// Make this operation hang forever, holding the daemon lock if it takes it (repeatable).
    #[arg(long = "hang", value_name = "OP")]
    hang: Vec<String>,
    /// The version the simulator reports.
    #[arg(long, default_value = "1.16.3")]
    daemon_version: String,
    /// Interleave replies that carry only a log line before, between and after every call's
    /// replies, as multipassd's logger does.
    #[arg(long)]
    log_lines: bool,
    /// Model a host without access to the image servers: catalogue launches and `find` fail as
    /// multipassd does (local `file://` images still work).
    #[arg(long)]
    no_image_servers: bool,
}

/// `--fail-mode` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FailModeArg {
    /// The call ends with INTERNAL.
    Error,
    /// The daemon aborts mid-call.
    Abort,
}

fn parse_target(s: &str) -> Result<SshEndpoint, String> {
    let (username, hostport) = match s.split_once('@') {
        Some((u, hp)) => (u.to_string(), hp),
        None => ("ubuntu".to_string(), s),
    };
    let (host, port) =
        hostport.rsplit_once(':').ok_or_else(|| format!("--ssh-target {s:?}: expected [USER@]HOST:PORT"))?;
    let port = port.parse().map_err(|_| format!("--ssh-target {s:?}: bad port"))?;
    // No key: ssh_info hands out the simulator's own.
    Ok(SshEndpoint { host: host.to_string(), port, username, private_key: String::new() })
}

/// Runs the simulator.
pub async fn run(args: SimArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            crate::cli::output::err_line(&format!("mpool sim: {e}"));
            ExitCode::from(1)
        }
    }
}

async fn run_inner(args: SimArgs) -> Result<ExitCode, String> {
    let socket = args.socket.clone();
    let time_scale = args.time_scale;
    let sim = Simulator::start(config(args)?).await?;
    tracing::info!(
        socket = %socket.display(),
        root_cert = %sim.root_cert().display(),
        time_scale,
        "mpool sim is serving multipassd's protocol"
    );
    serve_until_exit(sim).await
}

/// The simulator's configuration from the flags, checked.
fn config(args: SimArgs) -> Result<SimConfig, String> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(format!("--fail-rate {} is not a probability between 0 and 1", args.fail_rate));
    }
    if !(args.time_scale >= 0.0 && args.time_scale.is_finite()) {
        return Err(format!("--time-scale {} must be a finite number >= 0", args.time_scale));
    }
    let passphrase = match (&args.passphrase, &args.passphrase_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(mpool_multipass::trust::read_passphrase_file(f, "--passphrase-file")?),
        (None, None) => None,
    };
    let mut cfg = SimConfig::new(&args.socket, &args.state_dir);
    cfg.tcp = args.tcp;
    cfg.time_scale = args.time_scale;
    cfg.passphrase = passphrase;
    cfg.ssh_target = args.ssh_target.as_deref().map(parse_target).transpose()?;
    cfg.fail_rate = args.fail_rate;
    cfg.fail_ops = args.fail;
    cfg.hang_ops = args.hang;
    cfg.daemon_version = args.daemon_version;
    cfg.log_lines = args.log_lines;
    cfg.fail_mode = match args.fail_mode {
        FailModeArg::Error => FailMode::Error,
        FailModeArg::Abort => FailMode::Abort,
    };
    cfg.set_wedges_if_busy = args.set_wedges_if_busy;
    cfg.image_servers_reachable = !args.no_image_servers;
    Ok(cfg)
}

/// Serves until SIGINT/SIGTERM or until the simulated daemon exits; returns the exit code.
async fn serve_until_exit(sim: Simulator) -> Result<ExitCode, String> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = term.recv() => ExitCode::SUCCESS,
        exit = sim.exited() => match exit {
            Exit::SettingsChanged => {
                tracing::info!("a daemon setting changed: exiting with code 42 to be restarted, as multipassd does");
                ExitCode::from(42)
            }
            Exit::Aborted => {
                tracing::error!("aborted mid-call (simulated proto_buffer_writer.h assertion): exiting with 134, as SIGABRT");
                sim.kill().await;
                return Ok(ExitCode::from(134));
            }
            Exit::Shutdown => ExitCode::SUCCESS,
        },
    };
    if sim.daemon().is_wedged() {
        // multipassd never exited after this; neither do we (only SIGKILL ends the process).
        tracing::error!("wedged: socket gone, process alive; only SIGKILL ends this process, as with multipassd");
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
    }
    sim.shutdown().await;
    Ok(code)
}
