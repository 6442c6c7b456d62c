//! `mpool serve`: wires the pieces together from the config: the multipassd client (waiting
//! for the daemon if it is not up yet), the store, the SSH connection cache, the engine, the
//! application over them and the API listeners. `mpool demo` and the tests start the same thing in-process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::{App, Limits};
use crate::reload::{ReloadReport, Reloader};
use crate::server::{self, Served};
use mpool_config::Config;
use mpool_core::ports::Ports;
use mpool_engine::{Engine, Settings};
use mpool_metrics::Metrics;
use mpool_multipass::port::MultipassPort;
use mpool_multipass::{Client, ClientOptions, DaemonAddress};
use mpool_ssh::port::SshAdapter;
use mpool_ssh::{ConnectionCache, SshOptions};
use mpool_store::faulty::FaultyStore;
use mpool_store::{StateStore, Store};

/// Knobs that are not in the config file.
#[derive(Clone, Debug)]
pub struct Options {
    /// mpool's data dir (client certificate), unless `[daemon] data_dir` says otherwise.
    pub data_dir: PathBuf,
    /// Scheduler priorities (benchmarks turn them off to compare).
    pub priorities: bool,
    /// Give up waiting for multipassd at start after this long (None: wait forever).
    pub daemon_wait: Option<Duration>,
    /// Fail this share of store writes on purpose (chaos runs only; 0 in production).
    pub store_faults: f64,
    /// The config file it was read from (reload re-reads it; `None`: nothing to reload).
    pub config_path: Option<PathBuf>,
}

/// A running pool daemon.
pub struct Running {
    engine: Engine,
    shutdown: watch::Sender<bool>,
    api: tokio::task::JoinHandle<()>,
    client: Client,
    reloader: Arc<Reloader>,
    /// The host sampler (`crate::host`).
    host: tokio::task::JoinHandle<()>,
}

/// The `[host]` limits new VMs are admitted under.
pub fn limits(h: &mpool_config::HostConfig) -> mpool_core::pool::admission::Limits {
    mpool_core::pool::admission::Limits {
        min_free_disk: h.min_free_disk,
        cpu_overcommit: h.cpu_overcommit,
        memory_overcommit: h.memory_overcommit,
    }
}

/// The multipassd client options of a config.
pub fn client_options(cfg: &Config, data_dir: PathBuf) -> Result<ClientOptions, String> {
    let mut o = ClientOptions::new(cfg.daemon.data_dir.clone().unwrap_or(data_dir));
    o.address = cfg.daemon.address.as_deref().map(DaemonAddress::parse).transpose().map_err(|e| e.to_string())?;
    o.identity = cfg.daemon.client_identity();
    o.verification = cfg.daemon.server_verification();
    o.passphrase = match &cfg.daemon.passphrase_file {
        Some(p) => Some(mpool_multipass::trust::read_passphrase_file(p, "[daemon] passphrase_file")?),
        None => None,
    };
    o.allow_untested_daemon = cfg.daemon.allow_untested_daemon;
    o.call_timeout = cfg.daemon.call_timeout;
    o.max_in_flight = cfg.daemon.max_in_flight;
    Ok(o)
}

/// The isolation probe's settings: the host's address on the Multipass bridge (detected, or
/// unknown when there is no such bridge: the simulator's VMs are on loopback and probed there),
/// mpool's TCP ports, and the interval (`None` when `[isolation] probe_interval = "0"`).
pub fn probe_settings(cfg: &Config) -> Option<mpool_engine::ProbeSettings> {
    if cfg.isolation.probe_interval.is_zero() {
        return None;
    }
    let host = cfg.isolation.detect_bridge().map(|b| std::net::IpAddr::V4(b.subnet.address));
    let host_ports = cfg.api.tcp_listeners().iter().map(|(_, a)| a.port()).filter(|p| *p != 0).collect();
    Some(mpool_engine::ProbeSettings { host, host_ports, interval: cfg.isolation.probe_interval })
}

/// Connects to multipassd, retrying with backoff while it is unreachable (it may be starting or
/// restarting); other errors (trust, version) are final.
pub async fn connect(opts: &ClientOptions, wait: Option<Duration>) -> Result<Client, String> {
    let until = wait.map(|w| tokio::time::Instant::now() + w);
    let mut backoff = Duration::from_millis(200);
    loop {
        match Client::connect(opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_unavailable() && until.is_none_or(|u| tokio::time::Instant::now() + backoff < u) => {
                tracing::warn!("waiting for multipassd: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Running {
    /// Starts everything; returns once the API listens.
    pub async fn start(cfg: Config, opts: Options) -> Result<Running, String> {
        // The listeners' settings first: a config `serve` would refuse fails before anything
        // (daemon connection, store, sockets) is touched.
        server::check(&cfg.api)?;
        let client = connect(&client_options(&cfg, opts.data_dir.clone())?, opts.daemon_wait).await?;
        tracing::info!(daemon = %client.address(), version = %client.daemon_version(), "connected to multipassd");
        let mut store: Arc<dyn StateStore> = Arc::new(Store::open(&cfg.store.path).map_err(|e| e.to_string())?);
        if opts.store_faults > 0.0 {
            tracing::warn!(rate = opts.store_faults, "injecting state store write failures (chaos run)");
            store = Arc::new(FaultyStore::new(store, opts.store_faults));
        }
        let ssh = Arc::new(ConnectionCache::new(SshOptions::default()));
        let metrics = Metrics::for_host(&cfg.api.host_name);
        metrics.set_pools(cfg.pools.iter().map(|p| p.name.clone()));
        let daemon = MultipassPort::new(client.clone(), cfg.daemon.call_timeout, cfg.daemon.blocking_call_timeout)
            .with_metrics(metrics.clone());
        let ports = Ports::new(Arc::new(daemon), Arc::new(SshAdapter::new(ssh.clone())));
        let settings = Settings {
            prefix: cfg.engine.name_prefix.clone(),
            delete_strays: cfg.engine.delete_strays,
            reconcile_interval: cfg.engine.reconcile_interval,
            health_interval: cfg.engine.health_interval,
            priorities: opts.priorities,
            isolation: probe_settings(&cfg),
            gc_interval: cfg.engine.gc_interval,
            limits: limits(&cfg.host),
            ..Settings::default()
        };
        let engine = Engine::start_with_metrics(settings, cfg.pools.clone(), ports, store, metrics.clone())?;
        let reloader = Arc::new(Reloader::new(opts.config_path.clone(), cfg.clone(), engine.clone(), metrics.clone()));
        let app = App::new(
            engine.clone(),
            ssh,
            Limits {
                max_upload: cfg.api.max_upload,
                max_download: cfg.api.max_download,
                session_output_cap: cfg.api.session_output_cap,
                ..Limits::default()
            },
            metrics.clone(),
        )
        .with_reloader(reloader.clone())
        .with_host_name(cfg.api.host_name.clone());
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(recover_sessions(app.clone()));
        let served = Served { app, engine: engine.clone(), metrics };
        let (api, creds) = server::bind(&cfg.api, served, rx, cfg.engine.shutdown_grace).await?;
        reloader.set_credentials(creds);
        for l in &cfg.api.listen {
            tracing::info!(listen = %l, "mpool.v1 API listening");
        }
        let host = crate::host::spawn(client.clone(), cfg.host.clone(), engine.clone(), cfg.engine.health_interval);
        Ok(Running { engine, shutdown, api: tokio::spawn(api), client, reloader, host })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Re-reads the config file and applies what can change in place (SIGHUP).
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        self.reloader.reload().await
    }

    /// The multipassd client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Stops: the API drains (running calls get the grace period), then the engine stops.
    /// Leases and VMs stay in the store for the next start.
    pub async fn stop(self) {
        self.host.abort();
        self.shutdown.send_replace(true);
        let _ = self.api.await;
        self.engine.shutdown().await;
    }
}

/// Once the engine has reached multipassd (leases have their SSH endpoints), finds the sessions
/// of every live lease again: running ones keep their lease alive and their limits enforced.
async fn recover_sessions(app: App) {
    loop {
        match app.engine().status().await {
            Ok(s) if s.reconciled => {
                app.recover_sessions().await;
                return;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            Err(_) => return,
        }
    }
}
