//! `mpool sim`: a multipassd stand-in speaking the same protocol on a Unix socket, with TLS and
//! client-certificate trust, multipassd's per-instance state rules and daemon-wide blocking, a
//! timing profile, one real SSH endpoint per running instance, persistence and fault injection.
//!
//! It replaces only multipassd, and only because multipassd cannot run on our machines: when
//! the protocol reference says multipassd behaves a way, the simulator behaves that way.

pub mod beneath;
mod daemon;
mod fork_window;
pub mod images;
pub mod instance_settings;
pub mod rules;
mod server;
mod service;
pub mod ssh;
pub mod trust;
pub mod vm_processes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mpool_core::types::SshEndpoint;
use tokio::sync::{broadcast, watch};

pub use daemon::{Daemon, Profile, op_name};
pub use service::NOT_AUTHENTICATED;

/// The simulator's settings (`mpool sim` flags).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Unix socket to listen on.
    pub socket: PathBuf,
    /// Optional TCP listener (no first-client trust there, as with multipassd).
    pub tcp: Option<SocketAddr>,
    /// Where instances, snapshots, certificates and the trust store live.
    pub state_dir: PathBuf,
    /// Multiplies every simulated duration (0 = instant).
    pub time_scale: f64,
    /// The `local.passphrase` for `authenticate`.
    pub passphrase: Option<String>,
    /// Point ssh_info at this endpoint (e.g. a real sshd) instead of the instances' own. Its
    /// `private_key` is the key ssh_info hands out; empty means the simulator's own client key
    /// (the usual case: the target authorizes [`ssh::SshKeys::client_public_openssh`]).
    pub ssh_target: Option<SshEndpoint>,
    /// Probability of a random INTERNAL failure on mutating calls.
    pub fail_rate: f64,
    /// Operations that always fail.
    pub fail_ops: Vec<String>,
    /// Operations that hang (until released in-process; forever from the CLI).
    pub hang_ops: Vec<String>,
    /// The version `version` reports.
    pub daemon_version: String,
    /// Interleave replies carrying only a log line before, between and after every call's
    /// replies, as multipassd's logger does (`--log-lines`).
    pub log_lines: bool,
    /// What `fail_ops` and `fail_rate` do: answer INTERNAL, or abort the daemon mid-call.
    pub fail_mode: FailMode,
    /// A `set` while other calls are in flight wedges the daemon as multipassd 1.16.3 did
    /// (socket gone, process alive, nothing answers; `--set-wedges-if-busy`). Off: `set`
    /// always ends the daemon with code 42.
    pub set_wedges_if_busy: bool,
    /// Whether the image servers answer (`--no-image-servers` turns them off: launches from
    /// the catalogue then fail with `Remote "" is unknown or unreachable.`, reference §0.1).
    pub image_servers_reachable: bool,
}

impl SimConfig {
    /// Defaults: time scale 1, no faults, version 1.16.3.
    pub fn new(socket: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            socket: socket.into(),
            tcp: None,
            state_dir: state_dir.into(),
            time_scale: 1.0,
            passphrase: None,
            ssh_target: None,
            fail_rate: 0.0,
            fail_ops: vec![],
            hang_ops: vec![],
            daemon_version: "1.16.3".into(),
            log_lines: false,
            image_servers_reachable: true,
            fail_mode: FailMode::Error,
            set_wedges_if_busy: false,
        }
    }
}

/// What happened inside the simulator, for tests that prove ordering without sleeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimEvent {
    /// The operation (RPC name; `delete` for `delet`).
    pub op: &'static str,
    /// The instance concerned, when known.
    pub instance: String,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of [`SimEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The first request message arrived and the call is being dispatched.
    Received,
    /// The call must wait for the daemon's main thread (someone else holds it).
    LockWaiting,
    /// The call holds the main thread.
    LockAcquired,
    /// The call is hung by fault injection.
    Hung,
    /// The operation's simulated work started on an instance.
    Working,
    /// A reply carrying only a log line was sent (see [`SimConfig::log_lines`]).
    LogLine,
    /// A reply (not a log-only one) was sent.
    Replied,
    /// The call ended OK.
    Done,
    /// The call ended with this code.
    Failed(tonic::Code),
    /// The daemon aborted during this call (the connection was cut).
    Aborted,
    /// The daemon wedged after this `set` (socket gone, process alive).
    Wedged,
}

/// What an injected failure does (`--fail-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// The call ends with INTERNAL.
    #[default]
    Error,
    /// The daemon aborts mid-call, as multipassd's log-writer race made it (reference §0.3):
    /// the connection drops and the process exits (134, as SIGABRT), leaving its socket file.
    Abort,
}

/// Why the simulator stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Shutdown,
    /// A daemon setting changed; multipassd exits with code 42 to be restarted.
    SettingsChanged,
    /// The daemon aborted mid-call (fault injection, [`FailMode::Abort`]).
    Aborted,
}

/// How the previous simulator on a state dir ended, as a restart sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Shut down cleanly (SIGTERM, or exit 42 after a `set`): suspended instances keep their
    /// suspend image and resume.
    Graceful,
    /// Killed (`kill -9`, an abort, a crash): suspended instances lost their suspend image and
    /// cold-boot, with a new SSH host key (reference §0.3).
    Killed,
}

/// The file a cleanly stopped simulator leaves in its state dir; its absence at start means
/// the previous one was killed.
const CLEAN_SHUTDOWN: &str = "clean-shutdown";

/// A running simulator.
pub struct Simulator {
    daemon: Arc<Daemon>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Simulator {
    /// Loads or creates the state dir, opens the socket and, like multipassd after a restart,
    /// brings back the instances that were running or suspended: each passes through Starting
    /// (boot or resume time, scaled) before Running, on new SSH ports. If the previous
    /// simulator was killed rather than stopped, suspended instances cold-boot with a new SSH
    /// host key. The `autostart` fault op (`--hang autostart`, [`Daemon::set_hang`]) holds
    /// them in Starting.
    pub async fn start(cfg: SimConfig) -> Result<Simulator, String> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| format!("{}: {e}", cfg.state_dir.display()))?;
        let certs = trust::ServerCerts::load_or_create(&cfg.state_dir, "localhost").map_err(|e| e.to_string())?;
        if let Some(dir) = cfg.socket.parent()
            && dir != cfg.state_dir
        {
            let copy = dir.join(mpool_multipass::trust::ROOT_CERT_FILE);
            let pem = std::fs::read(&certs.root_cert).map_err(|e| e.to_string())?;
            mpool_tls::write_with_mode(&copy, &pem, 0o644).map_err(|e| e.to_string())?;
        }
        // Generating an RSA key takes a while: off the async threads.
        let dir = cfg.state_dir.clone();
        let keys = tokio::task::spawn_blocking(move || ssh::SshKeys::load_or_create(&dir))
            .await
            .map_err(|e| format!("SSH keys: {e}"))?
            .map_err(|e| format!("SSH keys: {e}"))?;
        let keys = Arc::new(keys);
        let trust = trust::TrustStore::load(&cfg.state_dir).map_err(|e| e.to_string())?;
        let tls = certs.server_config().map_err(|e| e.to_string())?;
        // How did the previous simulator on this state end? (None: there was none.)
        let marker = cfg.state_dir.join(CLEAN_SHUTDOWN);
        let previous = if !cfg.state_dir.join("state.json").is_file() {
            None
        } else if marker.is_file() {
            Some(Stop::Graceful)
        } else {
            Some(Stop::Killed)
        };
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", marker.display())),
        }
        let daemon = Arc::new(Daemon::load(cfg, keys, trust)?);
        let (shutdown, rx) = watch::channel(false);
        let (socket, serve) = server::serve(daemon.clone(), tls, rx)
            .map_err(|e| format!("cannot listen on {}: {e}", daemon.cfg.socket.display()))?;
        daemon.set_socket(socket);
        let server = tokio::spawn(serve);
        let d = daemon.clone();
        let killed = previous == Some(Stop::Killed);
        tokio::spawn(async move { d.resume_after_restart(killed).await });
        Ok(Simulator { daemon, shutdown, server })
    }

    /// The daemon (state, events, fault knobs).
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// The root CA certificate clients verify the simulator against.
    pub fn root_cert(&self) -> PathBuf {
        self.daemon.cfg.state_dir.join(mpool_multipass::trust::ROOT_CERT_FILE)
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.daemon.cfg.socket
    }

    /// The config it runs with (to start another on the same state).
    pub fn config(&self) -> &SimConfig {
        &self.daemon.cfg
    }

    /// Subscribes to the event log.
    pub fn events(&self) -> broadcast::Receiver<SimEvent> {
        self.daemon.events()
    }

    /// Waits until a `set` asks for a restart; returns [`Exit::SettingsChanged`] then.
    pub async fn settings_changed(&self) -> Exit {
        loop {
            if self.daemon.exited().await == Exit::SettingsChanged {
                return Exit::SettingsChanged;
            }
            // Aborted: a `set` can no longer come.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when the daemon ends by itself: [`Exit::SettingsChanged`] after a `set`,
    /// [`Exit::Aborted`] after an abort mid-call. Never for a wedge (multipassd's process
    /// stayed alive), see [`Daemon::is_wedged`].
    pub async fn exited(&self) -> Exit {
        self.daemon.exited().await
    }

    /// Stops serving, closes every SSH endpoint (killing what the instances run), removes the
    /// socket if it is still this simulator's, and records a clean shutdown (SIGTERM, or the
    /// exit after a `set`). An aborted daemon is not recorded as clean.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        self.daemon.mark_shut();
        // Let calls in flight finish, but not forever (a hung call must not block the exit).
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
            server.abort();
        }
        self.daemon.close_all_endpoints().await;
        if !self.daemon.aborted() {
            if let Some(socket) = self.daemon.owned_socket() {
                socket.remove();
            }
            let _ = std::fs::write(self.daemon.cfg.state_dir.join(CLEAN_SHUTDOWN), b"");
        }
    }

    /// Ends like `kill -9`: every connection is cut mid-call, the instances' SSH endpoints and
    /// processes die, the socket file stays behind (clients get "connection refused"), and no
    /// clean shutdown is recorded (the next simulator cold-boots suspended instances).
    pub async fn kill(self) {
        self.daemon.kill_connections();
        self.shutdown.send_replace(true);
        self.daemon.mark_shut();
        self.server.abort();
        let _ = self.server.await;
        self.daemon.close_all_endpoints().await;
    }

    /// Restarts the daemon on the same state dir and socket, as its service manager would:
    /// [`Stop::Graceful`] shuts it down first, [`Stop::Killed`] kills it. Returns the new
    /// simulator; see [`Simulator::start`] for what the instances then do.
    pub async fn restart(self, how: Stop) -> Result<Simulator, String> {
        self.restart_with(how, |_| {}).await
    }

    /// [`Simulator::restart`], after `tweak` adjusts the new simulator's config (e.g. to hold
    /// auto-started instances with `hang_ops = ["autostart"]`).
    pub async fn restart_with(self, how: Stop, tweak: impl FnOnce(&mut SimConfig)) -> Result<Simulator, String> {
        let mut cfg = self.daemon.cfg.clone();
        match how {
            Stop::Graceful => self.shutdown().await,
            Stop::Killed => self.kill().await,
        }
        tweak(&mut cfg);
        Simulator::start(cfg).await
    }
}
