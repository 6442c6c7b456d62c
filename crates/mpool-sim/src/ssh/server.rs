//! One instance's SSH server on 127.0.0.1: it listens, authenticates (user `ubuntu`, the
//! client key of [`SshKeys`], public key only), runs the sessions, grants a session channel
//! its environment and one `exec` or `sftp` request (no shell, pty or X11), and hands the
//! channel to the exec or SFTP module. Its shutdown closes the port, ends the sessions and
//! kills every process the instance's commands started.
//!
//! It must not run commands or touch the instance's files itself: that is `exec` (through
//! the instance's process supervisor) and `sftp` (through the confined root).

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, Disconnect, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::keys::SshKeys;
use super::{Ctx, Tracker, USER, exec, sftp, stopped};
use crate::vm_processes::VmSupervisor;

/// Upper bound on how long `shutdown` waits for sessions and commands to wind down.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Time a client has to authenticate after connecting.
const AUTH_DEADLINE: Duration = Duration::from_secs(120);
/// Environment variables a client may set per channel.
const MAX_CLIENT_ENV: usize = 256;

/// One instance's SSH server on 127.0.0.1 (the address clients reach it at is an
/// `mpool_core::types::SshEndpoint`).
pub struct SshServer {
    port: u16,
    accepted: Arc<AtomicU64>,
    shutdown_tx: watch::Sender<bool>,
    stop: tokio::sync::Mutex<Option<StopState>>,
    /// The instance's processes (see [`crate::vm_processes`]).
    processes: Arc<VmSupervisor>,
}

impl fmt::Debug for SshServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshServer")
            .field("port", &self.port)
            .field("connections_accepted", &self.connections_accepted())
            .field("stopped", &*self.shutdown_tx.borrow())
            .finish()
    }
}

/// What `shutdown` waits for.
struct StopState {
    accept_task: JoinHandle<()>,
    /// Yields `None` once every task holding a [`Tracker`] has ended.
    done_rx: mpsc::Receiver<()>,
}

impl SshServer {
    /// Starts listening on 127.0.0.1 (port 0 = any free port) serving `root` (created if
    /// missing), with the shared host key of `keys`.
    pub async fn start(root: PathBuf, keys: Arc<SshKeys>, port: u16) -> io::Result<SshServer> {
        let host_key = keys.host_key().clone();
        SshServer::start_with_host_key(root, keys, host_key, port).await
    }

    /// [`SshServer::start`] with this host key (each simulated instance has its own, see
    /// `instance_host_key`).
    pub async fn start_with_host_key(
        root: PathBuf,
        keys: Arc<SshKeys>,
        host_key: PrivateKey,
        port: u16,
    ) -> io::Result<SshServer> {
        tokio::fs::create_dir_all(&root).await?;
        let root = tokio::fs::canonicalize(&root).await?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let port = listener.local_addr()?.port();
        let config = Arc::new(server_config(host_key));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (tracker_tx, done_rx) = mpsc::channel(1);
        let accepted = Arc::new(AtomicU64::new(0));
        // The fork waits for its child to close what it inherited: off the async threads.
        let processes = tokio::task::spawn_blocking(VmSupervisor::start).await.map_err(io::Error::other)??;
        let processes = Arc::new(processes);
        let ctx = Arc::new(Ctx { root, keys, processes: processes.clone() });
        info!(port, root = %ctx.root.display(), "ssh endpoint listening");
        let accept_task = tokio::spawn(accept_loop(
            listener,
            config,
            ctx,
            accepted.clone(),
            shutdown_rx,
            Tracker { _alive: tracker_tx },
        ));
        Ok(SshServer {
            port,
            accepted,
            shutdown_tx,
            stop: tokio::sync::Mutex::new(Some(StopState { accept_task, done_rx })),
            processes,
        })
    }

    /// The TCP port the endpoint listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP connections accepted so far (server-side count; tests use it to prove connection
    /// reuse).
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops listening, closes every session and kills every running command (whole process
    /// group). Idempotent.
    ///
    /// Every process the instance's commands started is killed too, however it detached
    /// (`nohup server &`, `setsid`, a double fork: sshd lets them run, and so does the endpoint
    /// while it is up), as they die with a stopped VM (see [`crate::vm_processes`]). Returns
    /// once the port is closed and the sessions and processes have ended (or, should
    /// something hang, after a bounded wait).
    pub async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        let mut stop = self.stop.lock().await;
        let Some(mut state) = stop.take() else {
            return;
        };
        if let Err(e) = (&mut state.accept_task).await {
            warn!(port = self.port, "ssh accept loop failed: {e}");
        }
        // A stopped VM's processes all die at once, however they detached.
        if let Err(e) = self.processes.kill_all().await {
            warn!(port = self.port, "killing the instance's processes: {e}");
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, state.done_rx.recv()).await.is_err() {
            warn!(port = self.port, "ssh endpoint tasks still running after shutdown wait");
        }
        // Anything a command started while its session wound down.
        if let Err(e) = self.processes.kill_all().await {
            warn!(port = self.port, "killing the instance's processes: {e}");
        }
        info!(port = self.port, "ssh endpoint stopped");
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        // Tasks notice and wind down on their own (killing their commands).
        self.shutdown_tx.send_replace(true);
    }
}

fn server_config(host_key: PrivateKey) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    russh::server::Config {
        methods,
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        // Connections are pooled and may idle for long; dead peers are found by keepalives.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<russh::server::Config>,
    ctx: Arc<Ctx>,
    accepted: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
) {
    loop {
        let result = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        match result {
            Ok((socket, peer)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                debug!(%peer, "ssh connection accepted");
                tokio::spawn(serve_connection(
                    socket,
                    peer,
                    config.clone(),
                    ctx.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                ));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!("ssh accept failed: {e}");
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    // Dropping the listener here closes the port.
}

async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    config: Arc<russh::server::Config>,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
) {
    let _ = socket.set_nodelay(true);
    let (authed_tx, authed_rx) = oneshot::channel();
    let handler = SessionHandler {
        ctx,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        peer,
        authed_tx: Some(authed_tx),
        started: HashSet::new(),
    };
    let running = tokio::select! {
        r = russh::server::run_stream(config, socket, handler) => match r {
            Ok(running) => running,
            Err(e) => {
                debug!(%peer, "ssh handshake failed: {e}");
                return;
            }
        },
        _ = stopped(&mut shutdown) => return,
    };
    let handle = running.handle();
    let mut running = Box::pin(running);
    let auth_deadline = async {
        if tokio::time::timeout(AUTH_DEADLINE, authed_rx).await.is_err() {
            return;
        }
        std::future::pending::<()>().await
    };
    let reason = tokio::select! {
        r = &mut running => {
            match r {
                Ok(()) => debug!(%peer, "ssh session ended"),
                Err(e) => debug!(%peer, "ssh session ended: {e}"),
            }
            return;
        }
        _ = stopped(&mut shutdown) => "instance stopped",
        _ = auth_deadline => "authentication timeout",
    };
    debug!(%peer, reason, "disconnecting ssh session");
    let _ = handle.disconnect(Disconnect::ByApplication, reason.into(), "en".into()).await;
    if tokio::time::timeout(SHUTDOWN_WAIT, &mut running).await.is_err() {
        warn!(%peer, "ssh session did not end after disconnect");
    }
}

// ---------------------------------------------------------------------------------------------
// Session handler
// ---------------------------------------------------------------------------------------------

/// russh handler of one connection. Channel requests are answered here, in order; the work
/// (commands, SFTP) happens in one task per channel fed by the channel's message stream.
struct SessionHandler {
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
    tracker: Tracker,
    peer: SocketAddr,
    authed_tx: Option<oneshot::Sender<()>>,
    /// Channels that have started a command or subsystem.
    started: HashSet<ChannelId>,
}

impl SessionHandler {
    fn accepts(&self, user: &str, key: &PublicKey) -> Auth {
        if user == USER && self.ctx.keys.is_client_key(key) {
            Auth::Accept
        } else {
            debug!(peer = %self.peer, user, "ssh public key refused");
            Auth::reject()
        }
    }
}

impl russh::server::Handler for SessionHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(self.accepts(user, offer.public_key))
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        Ok(self.accepts(user, key.public_key))
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        debug!(peer = %self.peer, "ssh client authenticated");
        if let Some(tx) = self.authed_tx.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(run_channel(
            channel,
            session.handle(),
            self.ctx.clone(),
            self.shutdown.clone(),
            self.tracker.clone(),
        ));
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.started.remove(&channel);
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if valid_env(variable_name, variable_value) && !self.started.contains(&channel) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.started.insert(channel) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" && self.started.insert(channel) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }
}

/// Whether a client-supplied environment variable can be passed to a command.
fn valid_env(name: &str, value: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0']) && !value.contains('\0')
}

/// Serves one session channel: collects `env`, then runs the first `exec` or `sftp`.
async fn run_channel(
    mut channel: Channel<Msg>,
    handle: russh::server::Handle,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
) {
    let mut env: Vec<(String, String)> = Vec::new();
    loop {
        let msg = tokio::select! {
            m = channel.wait() => m,
            _ = stopped(&mut shutdown) => {
                let _ = channel.close().await;
                return;
            }
        };
        match msg {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }) => {
                if valid_env(&variable_name, &variable_value) && env.len() < MAX_CLIENT_ENV {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::Exec { command, .. }) => {
                let (rx, tx) = channel.split();
                exec::run_exec(rx, tx, handle, &ctx, &mut shutdown, command, env).await;
                return;
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                let (rx, tx) = channel.split();
                sftp::run_sftp(rx, tx, &ctx, &mut shutdown, tracker).await;
                return;
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_validation() {
        assert!(valid_env("LANG", "C.UTF-8"));
        assert!(!valid_env("", "x"));
        assert!(!valid_env("A=B", "x"));
        assert!(!valid_env("A", "x\0y"));
    }
}
