//! `mpool serve --config FILE`: the pool daemon, until SIGINT/SIGTERM. While the pools warm up
//! it shows their progress (a live line on a terminal, log lines otherwise).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use mpool_api::serve::{Options, Running};
use mpool_config::Config;

/// `mpool serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The config file (see deploy/mpool.toml).
    #[arg(long, env = "MPOOL_CONFIG")]
    config: PathBuf,
    /// Check the config (and, if multipassd answers, that it knows each pool's image) and exit.
    #[arg(long)]
    check: bool,
    /// Turn the daemon scheduler's priorities off (for benchmarks only).
    #[arg(long, hide = true)]
    no_priorities: bool,
    /// Fail this share (0-1) of state store writes on purpose (chaos runs only).
    #[arg(long, hide = true, default_value_t = 0.0)]
    inject_store_faults: f64,
}

/// Runs the daemon.
pub async fn run(args: ServeArgs, data_dir: PathBuf) -> ExitCode {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            crate::cli::output::err_line(&format!("mpool serve: {e}"));
            return ExitCode::from(2);
        }
    };
    if args.check {
        // The same validation `serve` runs before it binds anything.
        if let Err(e) = mpool_api::server::check(&cfg.api) {
            crate::cli::output::err_line(&format!("mpool serve: {}: {e}", args.config.display()));
            return ExitCode::from(2);
        }
        crate::cli::output::line(&format!("{}: OK ({} pools)", args.config.display(), cfg.pools.len()));
        warn_exposed_listeners(&cfg);
        let images: Vec<(String, String)> = cfg.pools.iter().map(|p| (p.name.clone(), p.image.clone())).collect();
        let code =
            mpool_multipass::serve_check_images(mpool_api::serve::client_options(&cfg, data_dir.clone()), &images)
                .await;
        check_host_fit(&cfg, data_dir).await;
        return code;
    }
    let opts = Options {
        data_dir,
        priorities: !args.no_priorities,
        daemon_wait: None,
        store_faults: args.inject_store_faults,
        config_path: Some(args.config.clone()),
    };
    let running = match Running::start(cfg.clone(), opts).await {
        Ok(r) => r,
        Err(e) => {
            crate::cli::output::err_line(&format!("mpool serve: {e}"));
            return ExitCode::from(1);
        }
    };
    let progress = tokio::spawn(show_warmup(running.engine().clone(), cfg));
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            crate::cli::output::err_line(&format!("mpool serve: cannot watch SIGTERM: {e}"));
            return ExitCode::from(1);
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            crate::cli::output::err_line(&format!("mpool serve: cannot watch SIGHUP: {e}"));
            return ExitCode::from(1);
        }
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => match running.reload().await {
                Ok(r) if r.needs_restart.is_empty() => tracing::info!("SIGHUP: reloaded {:?}", r.applied),
                Ok(r) => tracing::warn!("SIGHUP: reloaded {:?}; needs a restart to apply: {:?}", r.applied, r.needs_restart),
                Err(e) => tracing::error!("SIGHUP: {e}"),
            },
        }
    }
    progress.abort();
    tracing::info!("shutting down: running calls get the grace period; leases stay in the store");
    running.stop().await;
    ExitCode::SUCCESS
}

/// Reports warm-up progress until every pool has its `min_ready` idle VMs.
async fn show_warmup(engine: mpool_engine::Engine, cfg: Config) {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let Ok(status) = engine.status().await else {
            return;
        };
        let mut done = status.reconciled;
        let mut parts = Vec::new();
        for p in &status.pools {
            let want = cfg.pool(&p.name).map(|c| c.min_ready).unwrap_or(0) as usize;
            let ready = p.counts.get("hot").copied().unwrap_or(0) + p.counts.get("warm").copied().unwrap_or(0);
            let coming = p.counts.get("provisioning").copied().unwrap_or(0);
            done &= ready >= want;
            parts.push(format!("{} {ready}/{want} ready ({coming} provisioning)", p.name));
        }
        let line = format!("warming pools: {}", parts.join(", "));
        if tty {
            crate::cli::output::err_text(&format!("\r\x1b[K{line}"));
        } else if line != last {
            tracing::info!("{line}");
        }
        last = line;
        if done {
            if tty {
                crate::cli::output::err_line(&format!(
                    "\r\x1b[K{} — all pools ready",
                    last.replace("warming pools: ", "pools: ")
                ));
            } else {
                tracing::info!("all pools ready");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 2000 })).await;
    }
}

/// Reports whether the pools fit the host at their max_size under the `[host]` limits (the
/// check still passes: at run time admission holds provisioning back at the limits).
async fn check_host_fit(cfg: &Config, data_dir: PathBuf) {
    let limits = mpool_api::serve::limits(&cfg.host);
    if limits.is_off() {
        crate::cli::output::line("host: no [host] limits set; pools are not checked against the host");
        return;
    }
    let client = match mpool_api::serve::client_options(cfg, data_dir) {
        Ok(mut o) => {
            o.connect_timeout = o.connect_timeout.min(Duration::from_secs(5));
            o.call_timeout = o.call_timeout.min(Duration::from_secs(30));
            mpool_multipass::Client::connect(o).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => return crate::cli::output::line(&format!("host: not checked: {e}")),
    };
    let dir = mpool_api::host::data_dir(&cfg.host);
    let facts = mpool_api::host::sample(&client, &cfg.host, dir.as_deref()).await;
    let problems = mpool_core::pool::admission::fits_at_max_size(&limits, &facts, &cfg.pools);
    if problems.is_empty() {
        crate::cli::output::line("host: the pools fit at max_size");
    }
    for p in problems {
        crate::cli::output::line(&format!("host: the pools do NOT fit: {p}"));
    }
}

/// Warns (on stderr; the check still passes) about TCP listeners the VMs on the Multipass
/// bridge could reach: mpool's API and metrics should not be a task's to call.
fn warn_exposed_listeners(cfg: &Config) {
    let subnet = cfg.isolation.detect_bridge().map(|b| b.subnet);
    for (key, addr) in cfg.api.tcp_listeners() {
        if let Some(why) = mpool_isolation::exposure::reachable_from_bridge(&addr, subnet.as_ref()) {
            crate::cli::output::err_line(&format!(
                "warning: {key}: {why}, so tasks in the VMs can reach it; bind it to 127.0.0.1 (or another \
                 interface) or apply `mpool isolation rules` on the host (README \"Isolation\")"
            ));
        }
    }
}
