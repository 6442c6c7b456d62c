//! The simulator's SSH endpoints (one per running instance).
//!
//! Every simulated running instance of `mpool sim` is a real SSH server on `127.0.0.1`, so
//! that tests and the product can run commands in it and move files over SFTP exactly as
//! they do against a Multipass VM:
//!
//! - [`SshKeys`] holds the key material, persisted under the simulator's data directory: the
//!   RSA client key whose verbatim text `ssh_info` hands out (the same key serves every
//!   instance, as with multipassd) and the Ed25519 host key of the endpoints.
//! - [`SshEndpoint`] is one instance's server. It accepts public-key authentication for user
//!   `ubuntu` with the client key only, runs `exec` requests as `sh -c CMD` in the instance's
//!   root directory (each command in its own process group, output streamed with channel
//!   flow control, signals and stdin forwarded, exit status or signal reported), and serves
//!   the `sftp` subsystem confined to that root directory.
//!
//! Stopping an endpoint ([`SshEndpoint::shutdown`]) closes its port, ends its sessions and
//! kills the process groups of the commands still running, and what finished commands left
//! running in the background, as a stopped VM would.
//!
//! Known difference from sshd: russh grants a client window as channel data arrives rather
//! than as the command consumes it, so a command's unread stdin is buffered in memory (up to
//! tens of MiB, see `StdinFlow`) before the connection is throttled.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData, RsaKeypair};
use russh::keys::ssh_key::rand_core::{TryCryptoRng, TryRng};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, MethodKind, MethodSet, Sig,
};
use russh_sftp::protocol::{
    Attrs, Data, File as SftpFile, FileAttributes, Handle as SftpHandleReply, Name, OpenFlags, Status, StatusCode,
    Version,
};
use russh_sftp::server::StatusReply;

use super::beneath::{Confined, OpenMode};
use super::vm_processes::{Command as VmCommand, Supervised, VmSupervisor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The only user name the endpoints accept.
const USER: &str = "ubuntu";
/// `PATH` of the commands run over SSH.
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Time a process group gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Upper bound on how long `shutdown` waits for sessions and commands to wind down.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Time a client has to authenticate after connecting.
const AUTH_DEADLINE: Duration = Duration::from_secs(120);
/// Stdin bytes buffered for a command before the channel stops being read, while the
/// command's output is idle. See [`StdinFlow`].
const STDIN_SOFT_LIMIT: usize = 16 << 20;
/// Stdin bytes buffered for a command before the channel stops being read in any case.
const STDIN_HARD_LIMIT: usize = 128 << 20;
/// Read size of the stdout/stderr pumps.
const PUMP_BUF: usize = 32 * 1024;
/// Largest SFTP read served at once.
const SFTP_MAX_READ: u32 = 256 * 1024;
/// Buffer between an SFTP channel and its server, each way.
const SFTP_PIPE: usize = 512 * 1024;
/// Open SFTP handles allowed per SFTP session.
const SFTP_MAX_HANDLES: usize = 1024;
/// Directory entries per SSH_FXP_NAME reply.
const READDIR_BATCH: usize = 128;
/// Environment variables a client may set per channel.
const MAX_CLIENT_ENV: usize = 256;

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Key material of the simulator's SSH side, persisted under a directory.
pub struct SshKeys {
    client_text: String,
    client_public: PublicKey,
    client_public_line: String,
    host_key: PrivateKey,
}

impl fmt::Debug for SshKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshKeys")
            .field("client_public", &self.client_public_line)
            .field("host_key", &self.host_key.public_key().algorithm())
            .finish_non_exhaustive()
    }
}

impl SshKeys {
    /// Loads or creates `<dir>/ssh-keys/id_rsa` (RSA 2048 client key; file mode 0600; the text
    /// clients receive in ssh_info) and `<dir>/ssh-keys/ssh_host_ed25519_key` (the endpoints'
    /// host key).
    ///
    /// An existing key file is used as it is (PEM or OpenSSH text); a missing one is generated
    /// (OpenSSH text) and written atomically with mode 0600. This blocks (file I/O, RSA key
    /// generation): call it before starting the runtime or via `spawn_blocking`.
    pub fn load_or_create(dir: &Path) -> io::Result<SshKeys> {
        let keys_dir = dir.join("ssh-keys");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&keys_dir)?;
        let (client_text, client_key) = load_or_generate(&keys_dir.join("id_rsa"), || {
            let pair = RsaKeypair::random(&mut KeyRng(rand::rng()), 2048).map_err(invalid_data)?;
            PrivateKey::new(KeypairData::from(pair), "mpool-sim").map_err(invalid_data)
        })?;
        let (_, host_key) = load_or_generate(&keys_dir.join("ssh_host_ed25519_key"), || {
            let pair = Ed25519Keypair::random(&mut KeyRng(rand::rng()));
            PrivateKey::new(KeypairData::from(pair), "mpool-sim-host").map_err(invalid_data)
        })?;
        let client_public = client_key.public_key().clone();
        let client_public_line = client_public.to_openssh().map_err(invalid_data)?;
        Ok(SshKeys { client_text, client_public, client_public_line, host_key })
    }

    /// The client private key file's verbatim text (what SSHInfo.priv_key_base64 carries).
    pub fn client_key_text(&self) -> &str {
        &self.client_text
    }

    /// The client public key in OpenSSH `authorized_keys` form (so tests can let a real sshd
    /// accept it).
    pub fn client_public_openssh(&self) -> String {
        self.client_public_line.clone()
    }

    /// Whether `key` is the client key.
    fn is_client_key(&self, key: &PublicKey) -> bool {
        key.key_data() == self.client_public.key_data()
    }
}

/// Loads the Ed25519 host key at `path`, or generates one there (mode 0600): an instance's
/// own SSH host key, as a guest makes at its first boot. Blocks (file I/O).
pub fn instance_host_key(path: &Path) -> io::Result<PrivateKey> {
    let (_, key) = load_or_generate(path, || {
        let pair = Ed25519Keypair::random(&mut KeyRng(rand::rng()));
        PrivateKey::new(KeypairData::from(pair), "mpool-sim-instance").map_err(invalid_data)
    })?;
    Ok(key)
}

/// Adapts rand 0.9's thread RNG (a CSPRNG) to the rand_core 0.10 traits ssh-key wants.
struct KeyRng(rand::rngs::ThreadRng);

impl TryRng for KeyRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::RngCore::next_u32(&mut self.0))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::RngCore::next_u64(&mut self.0))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::RngCore::fill_bytes(&mut self.0, dst);
        Ok(())
    }
}

impl TryCryptoRng for KeyRng {}

fn invalid_data(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads the private key at `path`, or generates one and writes it there (mode 0600).
fn load_or_generate(
    path: &Path,
    generate: impl FnOnce() -> io::Result<PrivateKey>,
) -> io::Result<(String, PrivateKey)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = russh::keys::decode_secret_key(&text, None)
                .map_err(|e| invalid_data(format!("{}: {e}", path.display())))?;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode != 0o600 {
                std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
            }
            Ok((text, key))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate()?;
            let text = key.to_openssh(LineEnding::LF).map_err(invalid_data)?.to_string();
            write_private_file(path, &text)?;
            info!(path = %path.display(), "generated simulator ssh key");
            Ok((text, key))
        }
        Err(e) => Err(e),
    }
}

/// Writes `text` to `path` atomically (temporary file + rename) with mode 0600.
fn write_private_file(path: &Path, text: &str) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.set_permissions(Permissions::from_mode(0o600))?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------------------------
// Endpoint
// ---------------------------------------------------------------------------------------------

/// One instance's SSH endpoint on 127.0.0.1.
pub struct SshEndpoint {
    port: u16,
    accepted: Arc<AtomicU64>,
    shutdown_tx: watch::Sender<bool>,
    stop: tokio::sync::Mutex<Option<StopState>>,
    /// The instance's processes (see [`super::vm_processes`]).
    processes: Arc<VmSupervisor>,
}

impl fmt::Debug for SshEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshEndpoint")
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

/// Held by every task of an endpoint; `shutdown` waits until all clones are dropped.
#[derive(Clone)]
struct Tracker {
    _alive: mpsc::Sender<()>,
}

/// What the sessions of one endpoint share.
struct Ctx {
    /// Canonical absolute path of the instance's root directory.
    root: PathBuf,
    keys: Arc<SshKeys>,
    /// Starts the commands; everything they start dies with the endpoint.
    processes: Arc<VmSupervisor>,
}

impl SshEndpoint {
    /// Starts listening on 127.0.0.1 (port 0 = any free port) serving `root` (created if
    /// missing), with the shared host key of `keys`.
    pub async fn start(root: PathBuf, keys: Arc<SshKeys>, port: u16) -> io::Result<SshEndpoint> {
        let host_key = keys.host_key.clone();
        SshEndpoint::start_with_host_key(root, keys, host_key, port).await
    }

    /// [`SshEndpoint::start`] with this host key (each simulated instance has its own, see
    /// [`instance_host_key`]).
    pub async fn start_with_host_key(
        root: PathBuf,
        keys: Arc<SshKeys>,
        host_key: PrivateKey,
        port: u16,
    ) -> io::Result<SshEndpoint> {
        tokio::fs::create_dir_all(&root).await?;
        let root = tokio::fs::canonicalize(&root).await?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let port = listener.local_addr()?.port();
        let config = Arc::new(server_config(host_key));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (tracker_tx, done_rx) = mpsc::channel(1);
        let accepted = Arc::new(AtomicU64::new(0));
        let processes = Arc::new(VmSupervisor::start()?);
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
        Ok(SshEndpoint {
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
    /// while it is up), as they die with a stopped VM (see [`super::vm_processes`]). Returns
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

impl Drop for SshEndpoint {
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

/// Resolves once shutdown is requested (or the endpoint is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
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
                run_exec(rx, tx, handle, &ctx, &mut shutdown, command, env).await;
                return;
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                let (rx, tx) = channel.split();
                run_sftp(rx, tx, &ctx, &mut shutdown, tracker).await;
                return;
            }
            Some(_) => {}
        }
    }
}

/// Serves the `sftp` subsystem on a channel until the client is done, then reports exit
/// status 0 as sshd does for a normal sftp-server exit (`scp` insists on it).
async fn run_sftp(
    mut rx: ChannelReadHalf,
    tx: ChannelWriteHalf<Msg>,
    ctx: &Ctx,
    shutdown: &mut watch::Receiver<bool>,
    tracker: Tracker,
) {
    debug!(root = %ctx.root.display(), "sftp session started");
    let root = ctx.root.clone();
    let confined = match tokio::task::spawn_blocking(move || Confined::open(&root)).await {
        Ok(Ok(c)) => Arc::new(c),
        other => {
            warn!(root = %ctx.root.display(), "cannot open the instance directory for SFTP: {other:?}");
            let _ = tx.exit_status(1).await;
            let _ = tx.close().await;
            return;
        }
    };
    let (ours, theirs) = tokio::io::duplex(SFTP_PIPE);
    russh_sftp::server::run(
        theirs,
        SftpSession { root: confined, handles: HashMap::new(), next_handle: 0, initialized: false, _tracker: tracker },
    )
    .await;
    let (mut from_sftp, mut to_sftp) = tokio::io::split(ours);
    // Replies go out in their own task, waiting for window space as needed, so that a
    // server blocked on replying never stops requests from being read.
    let mut out = tx.make_writer();
    let mut replies = tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from_sftp, &mut out).await {
            debug!("sending sftp replies failed: {e}");
        }
    });
    let end = loop {
        tokio::select! {
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if to_sftp.write_all(&data).await.is_err() {
                        break SftpEnd::Done;
                    }
                }
                Some(ChannelMsg::Eof) => break SftpEnd::Done,
                Some(ChannelMsg::Close) | None => break SftpEnd::ClientGone,
                Some(_) => {}
            },
            _ = stopped(shutdown) => break SftpEnd::Shutdown,
        }
    };
    // End of requests: the SFTP server finishes and drops its end, which ends the replies.
    let _ = to_sftp.shutdown().await;
    drop(to_sftp);
    let end = match end {
        SftpEnd::Done => loop {
            tokio::select! {
                _ = &mut replies => break SftpEnd::Done,
                msg = rx.wait() => {
                    if matches!(msg, Some(ChannelMsg::Close) | None) {
                        break SftpEnd::ClientGone;
                    }
                }
                _ = stopped(shutdown) => break SftpEnd::Shutdown,
            }
        },
        other => other,
    };
    match end {
        SftpEnd::Done => {
            let _ = tx.exit_status(0).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
        }
        SftpEnd::ClientGone => replies.abort(),
        SftpEnd::Shutdown => {
            replies.abort();
            let _ = tx.close().await;
        }
    }
    debug!("sftp session ended");
}

// ---------------------------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------------------------

/// How a command ended.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(u32),
    Signal { signal: i32, core_dumped: bool },
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code as u32),
            (None, Some(signal)) => Exit::Signal { signal, core_dumped: status.core_dumped() },
            (None, None) => Exit::Code(255),
        }
    }
}

/// Why the exec loop ended.
enum ExecEnd {
    /// The command exited and its output was sent.
    Finished(Exit),
    /// The client closed the channel or the session went away.
    ClientGone,
    /// The endpoint is shutting down.
    Shutdown,
}

/// Why an SFTP channel ended.
enum SftpEnd {
    /// The client sent EOF (or the SFTP server stopped reading).
    Done,
    /// The client closed the channel or the session went away.
    ClientGone,
    /// The endpoint is shutting down.
    Shutdown,
}

/// Kills the process group with SIGKILL when dropped while armed (e.g. the task was aborted).
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Sends `signal` to process group `pgid`; true if it was delivered.
fn signal_group(pgid: i32, signal: i32) -> bool {
    // Never 0 or 1: kill(0) and kill(-1) would hit our own group or every process.
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`] if anything is left, leader reaped.
async fn terminate_group(pgid: i32, child: &mut Supervised, leader_exited: bool) {
    signal_group(pgid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    if !leader_exited {
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    while signal_group(pgid, 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_group(pgid, libc::SIGKILL);
    if !leader_exited && tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        warn!(pgid, "command did not exit after SIGKILL");
    }
}

/// The SSH form of a signal a command died of, for its exit-signal message (a number
/// without a name travels as its digits).
fn exit_signal(signal: i32) -> Sig {
    match mpool_ssh::signal_name_of(signal) {
        Some(name) => mpool_ssh::sig_from_name(name),
        None => Sig::Custom(signal.to_string()),
    }
}

/// Flow control between a channel's incoming data and the command's stdin.
///
/// russh's server grants the client more window as data arrives, not as the command
/// consumes it, so the only brake on stdin is to stop reading the channel, which stops the
/// reader of the whole connection until the command catches up. That is harmless while the
/// command's output is idle, so then stdin is buffered up to [`STDIN_SOFT_LIMIT`] only. But
/// while output is being sent, a stopped reader can deadlock: the client's window
/// adjustment that the output waits for may sit behind stdin data in the same TCP stream
/// (command blocked on stdout, output on window, reader on stdin). So while an output pump
/// is sending, stdin is buffered up to [`STDIN_HARD_LIMIT`]; only a client that floods
/// stdin without reading the output (which deadlocks against sshd as well) reaches it.
#[derive(Default)]
struct StdinFlow {
    /// Bytes handed to the stdin writer and not yet written to the pipe.
    buffered: AtomicUsize,
    /// Output pumps currently sending to the channel.
    pumps_sending: AtomicUsize,
    /// Signalled when either count changes in a way that may allow more stdin.
    changed: Notify,
}

impl StdinFlow {
    fn can_accept(&self) -> bool {
        let buffered = self.buffered.load(Ordering::SeqCst);
        buffered < STDIN_SOFT_LIMIT || (self.pumps_sending.load(Ordering::SeqCst) > 0 && buffered < STDIN_HARD_LIMIT)
    }
}

/// Copies a child's output pipe to the channel; the channel writer waits for window space,
/// so a slow client slows the command down instead of growing a buffer.
async fn pump(mut src: impl AsyncRead + Unpin, mut dst: impl AsyncWrite + Unpin, flow: Arc<StdinFlow>) {
    let mut buf = vec![0u8; PUMP_BUF];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                debug!("reading command output failed: {e}");
                return;
            }
        };
        let Some(chunk) = buf.get(..n) else { return };
        flow.pumps_sending.fetch_add(1, Ordering::SeqCst);
        flow.changed.notify_one();
        let sent = dst.write_all(chunk).await;
        flow.pumps_sending.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = sent {
            debug!("sending command output failed: {e}");
            return;
        }
    }
}

/// Writes queued channel data to the child's stdin; closes stdin when the queue closes.
async fn feed_stdin(
    mut stdin: tokio::net::unix::pipe::Sender,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    flow: Arc<StdinFlow>,
) {
    while let Some(chunk) = rx.recv().await {
        let written = stdin.write_all(&chunk).await;
        flow.buffered.fetch_sub(chunk.len(), Ordering::SeqCst);
        flow.changed.notify_one();
        if let Err(e) = written {
            debug!("writing command stdin failed: {e}");
            return;
        }
    }
}

/// Hands `data` to the stdin writer if the buffer has room, or gives it back to be held
/// (and the channel not read) until it has. Data for a closed stdin is dropped, as a pipe
/// nobody reads would.
fn offer_stdin(queue: &mut Option<mpsc::UnboundedSender<Bytes>>, flow: &StdinFlow, data: Bytes) -> Option<Bytes> {
    let tx = queue.as_ref()?;
    if tx.is_closed() {
        *queue = None;
        return None;
    }
    if !flow.can_accept() {
        return Some(data);
    }
    let len = data.len();
    flow.buffered.fetch_add(len, Ordering::SeqCst);
    if tx.send(data).is_err() {
        flow.buffered.fetch_sub(len, Ordering::SeqCst);
        *queue = None;
    }
    None
}

/// Runs `sh -c command` for an exec request and serves the channel until it ends.
async fn run_exec(
    mut rx: ChannelReadHalf,
    tx: ChannelWriteHalf<Msg>,
    handle: russh::server::Handle,
    ctx: &Ctx,
    shutdown: &mut watch::Receiver<bool>,
    command: Vec<u8>,
    env: Vec<(String, String)>,
) {
    let id = tx.id();
    debug!(command = %String::from_utf8_lossy(&command), "ssh exec");
    let var = |k: &str, v: &std::ffi::OsStr| {
        let mut kv = OsString::from(k);
        kv.push("=");
        kv.push(v);
        kv
    };
    let mut vars = vec![
        var("HOME", ctx.root.as_os_str()),
        var("USER", USER.as_ref()),
        var("LOGNAME", USER.as_ref()),
        var("SHELL", "/bin/sh".as_ref()),
        var("PATH", PATH_ENV.as_ref()),
    ];
    for (k, v) in env {
        // A later definition of a name replaces an earlier one, as with `Command::envs`.
        let prefix = format!("{k}=");
        vars.retain(|kv| !kv.as_bytes().starts_with(prefix.as_bytes()));
        vars.push(var(&k, v.as_ref()));
    }
    let cmd = VmCommand {
        program: "/bin/sh".into(),
        args: vec!["sh".into(), "-c".into(), OsString::from_vec(command)],
        env: vars,
        cwd: ctx.root.clone(),
    };
    let mut child = match ctx.processes.spawn(&cmd).await {
        Ok(child) => child,
        Err(e) => {
            warn!("cannot start command: {e}");
            let msg = format!("mpool sim: cannot start command: {e}\n");
            let _ = tx.extended_data_bytes(1, Bytes::from(msg)).await;
            let _ = tx.exit_status(127).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
    };
    let pgid = child.pid;
    let mut guard = GroupGuard { pgid, armed: true };

    let flow = Arc::new(StdinFlow::default());
    let stdout_pump = child.stdout.take().map(|out| tokio::spawn(pump(out, tx.make_writer(), flow.clone())));
    let stderr_pump = child.stderr.take().map(|err| tokio::spawn(pump(err, tx.make_writer_ext(Some(1)), flow.clone())));
    let pump_aborts: Vec<_> = stdout_pump.iter().chain(stderr_pump.iter()).map(|h| h.abort_handle()).collect();
    let mut output_done = Box::pin(async move {
        if let Some(h) = stdout_pump {
            let _ = h.await;
        }
        if let Some(h) = stderr_pump {
            let _ = h.await;
        }
    });

    let (stdin_queue, stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let stdin_task = child.stdin.take().map(|stdin| tokio::spawn(feed_stdin(stdin, stdin_rx, flow.clone())));
    let mut stdin_queue = stdin_task.as_ref().map(|_| stdin_queue);
    // Data held back (and the channel not read) until the stdin buffer has room.
    let mut pending: Option<Bytes> = None;
    let mut exit: Option<Exit> = None;
    let mut outputs_finished = false;

    let end = loop {
        if let (Some(exit), true) = (exit, outputs_finished) {
            break ExecEnd::Finished(exit);
        }
        tokio::select! {
            status = child.wait(), if exit.is_none() => {
                exit = Some(Exit::from(status));
                // Nobody reads stdin any more (background jobs excepted): close it.
                stdin_queue = None;
                pending = None;
                if let Some(task) = &stdin_task {
                    task.abort();
                }
            }
            _ = &mut output_done, if !outputs_finished => outputs_finished = true,
            _ = flow.changed.notified(), if pending.is_some() => {
                if let Some(data) = pending.take() {
                    pending = offer_stdin(&mut stdin_queue, &flow, data);
                }
            }
            msg = rx.wait(), if pending.is_none() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    pending = offer_stdin(&mut stdin_queue, &flow, data);
                    if pending.is_some() {
                        debug!(
                            buffered = flow.buffered.load(Ordering::SeqCst),
                            "stdin buffer full: pausing the channel"
                        );
                    }
                }
                Some(ChannelMsg::Eof) => stdin_queue = None,
                Some(ChannelMsg::Signal { signal }) => {
                    let name = mpool_ssh::signal_name(&signal);
                    match mpool_ssh::signal_number(name) {
                        Some(number) => {
                            debug!(pgid, signal = name, "delivering signal");
                            signal_group(pgid, number);
                        }
                        None => debug!(signal = name, "unknown signal ignored"),
                    }
                }
                Some(ChannelMsg::Close) | None => break ExecEnd::ClientGone,
                Some(_) => {}
            },
            _ = stopped(shutdown) => break ExecEnd::Shutdown,
        }
    };

    if let Some(task) = &stdin_task {
        task.abort();
    }
    match end {
        ExecEnd::Finished(exit) => {
            guard.armed = false;
            match exit {
                Exit::Code(code) => {
                    let _ = tx.exit_status(code).await;
                }
                Exit::Signal { signal, core_dumped } => {
                    let _ = handle
                        .exit_signal_request(id, exit_signal(signal), core_dumped, String::new(), "en".into())
                        .await;
                }
            }
            let _ = tx.eof().await;
            let _ = tx.close().await;
            // What it left running in the background keeps running, as under sshd, until
            // the instance stops (its supervisor then kills it).
        }
        ExecEnd::ClientGone | ExecEnd::Shutdown => {
            debug!(pgid, "channel gone or endpoint stopping: terminating command");
            terminate_group(pgid, &mut child, exit.is_some()).await;
            guard.armed = false;
            for abort in &pump_aborts {
                abort.abort();
            }
            if matches!(end, ExecEnd::Shutdown) {
                let _ = tx.close().await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SFTP
// ---------------------------------------------------------------------------------------------

/// An open SFTP handle.
enum SftpHandle {
    File(Arc<File>),
    Dir {
        /// The open directory (for its attributes).
        dir: Arc<File>,
        /// `None` once exhausted (or while a batch is being read).
        entries: Option<std::fs::ReadDir>,
        /// Whether "." and ".." are still to be listed.
        dots_pending: bool,
    },
}

/// SFTP server of one channel, confined to the instance root: every path is resolved by the
/// kernel beneath it (see [`super::beneath`]), so no symlink, not even one swapped in while a
/// call runs, leads out of it.
struct SftpSession {
    root: Arc<Confined>,
    handles: HashMap<String, SftpHandle>,
    next_handle: u64,
    initialized: bool,
    _tracker: Tracker,
}

fn status_ok(id: u32) -> Status {
    Status { id, status_code: StatusCode::Ok, error_message: "Ok".to_string(), language_tag: "en-US".to_string() }
}

/// Maps an I/O error to an SFTP status.
fn io_status(e: io::Error) -> StatusReply {
    match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile.with_message(e.to_string()),
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied.with_message(e.to_string()),
        _ => StatusCode::Failure.with_message(e.to_string()),
    }
}

fn outside_root() -> io::Error {
    super::beneath::outside()
}

fn invalid_handle() -> StatusReply {
    StatusCode::Failure.with_message("invalid handle")
}

/// Runs blocking file-system work off the async threads, mapping errors to SFTP statuses.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> Result<T, StatusReply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io_status(e)),
        Err(e) => Err(StatusCode::Failure.with_message(format!("internal error: {e}"))),
    }
}

fn unix_time(t: io::Result<SystemTime>) -> Option<u32> {
    let secs = t.ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// SFTP attributes of a file (the mode carries the file type bits).
fn attrs_of(meta: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(meta.len()),
        uid: Some(meta.uid()),
        user: None,
        gid: Some(meta.gid()),
        group: None,
        permissions: Some(meta.mode()),
        atime: unix_time(meta.accessed()),
        mtime: unix_time(meta.modified()),
    }
}

fn file_times(attrs: &FileAttributes) -> Option<FileTimes> {
    if attrs.atime.is_none() && attrs.mtime.is_none() {
        return None;
    }
    let mut times = FileTimes::new();
    if let Some(atime) = attrs.atime {
        times = times.set_accessed(UNIX_EPOCH + Duration::from_secs(atime.into()));
    }
    if let Some(mtime) = attrs.mtime {
        times = times.set_modified(UNIX_EPOCH + Duration::from_secs(mtime.into()));
    }
    Some(times)
}

/// Applies size, permissions and times (uid/gid are ignored) to an open file.
fn apply_attrs_file(file: &File, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        file.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(times) = file_times(attrs) {
        file.set_times(times)?;
    }
    Ok(())
}

/// Applies size, permissions and times (uid/gid are ignored) to a path.
fn apply_attrs_path(path: &Path, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(times) = file_times(attrs) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => OpenOptions::new().write(true).open(path)?,
            Err(e) => return Err(e),
        };
        file.set_times(times)?;
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset` (short only at end of file).
fn read_at_most(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while let Some(dst) = buf.get_mut(filled..).filter(|d| !d.is_empty()) {
        let at = offset
            .checked_add(filled as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        match file.read_at(dst, at) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Lists up to [`READDIR_BATCH`] entries (with lstat attributes) of an open directory.
fn read_dir_batch(
    dir: &File,
    mut entries: std::fs::ReadDir,
    dots_pending: bool,
) -> io::Result<(Vec<SftpFile>, Option<std::fs::ReadDir>)> {
    let mut files = Vec::new();
    if dots_pending {
        let attrs = attrs_of(&dir.metadata()?);
        files.push(SftpFile::new(".", attrs.clone()));
        files.push(SftpFile::new("..", attrs));
    }
    while files.len() < READDIR_BATCH {
        match entries.next() {
            None => return Ok((files, None)),
            Some(Ok(entry)) => {
                // DirEntry::metadata does not follow symlinks; entries deleted meanwhile
                // are skipped.
                if let Ok(meta) = entry.metadata() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    files.push(SftpFile::new(name, attrs_of(&meta)));
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
    Ok((files, Some(entries)))
}

impl SftpSession {
    fn file(&self, handle: &str) -> Result<Arc<File>, StatusReply> {
        match self.handles.get(handle) {
            Some(SftpHandle::File(file)) => Ok(file.clone()),
            _ => Err(invalid_handle()),
        }
    }

    fn insert_handle(&mut self, handle: SftpHandle) -> Result<String, StatusReply> {
        if self.handles.len() >= SFTP_MAX_HANDLES {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        self.next_handle += 1;
        let name = self.next_handle.to_string();
        self.handles.insert(name.clone(), handle);
        Ok(name)
    }

    /// Resolves `path` inside the root on a blocking thread and runs `f` on the result.
    /// Maps `path` into the root on a blocking thread and runs `f` with the root and the
    /// relative path (which `f` must use through the root, confined).
    async fn at_path<T: Send + 'static>(
        &self,
        path: String,
        f: impl FnOnce(&Confined, PathBuf) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StatusReply> {
        let root = self.root.clone();
        blocking(move || {
            let rel = root.relative(&path)?;
            f(&root, rel)
        })
        .await
    }
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(&mut self, version: u32, _extensions: HashMap<String, String>) -> Result<Version, Self::Error> {
        if self.initialized {
            return Err(StatusCode::Failure.with_message("duplicate SSH_FXP_INIT"));
        }
        self.initialized = true;
        debug!(version, "sftp init");
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<SftpHandleReply, Self::Error> {
        let how = OpenMode {
            read: pflags.contains(OpenFlags::READ),
            write: pflags.contains(OpenFlags::WRITE),
            append: pflags.contains(OpenFlags::APPEND),
            create: pflags.contains(OpenFlags::CREATE),
            create_new: pflags.contains(OpenFlags::CREATE) && pflags.contains(OpenFlags::EXCLUDE),
            truncate: pflags.contains(OpenFlags::TRUNCATE),
            mode: attrs.permissions.map_or(0o666, |m| m & 0o7777),
        };
        let file = self.at_path(filename, move |root, rel| root.open_file(&rel, how)).await?;
        let handle = self.insert_handle(SftpHandle::File(Arc::new(file)))?;
        Ok(SftpHandleReply { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(status_ok(id)),
            None => Err(invalid_handle()),
        }
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let len = len.min(SFTP_MAX_READ) as usize;
        let data = blocking(move || read_at_most(&file, offset, len)).await?;
        if data.is_empty() && len > 0 {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Data { id, data })
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || file.write_all_at(&data, offset)).await?;
        Ok(status_ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = self.at_path(path, |root, rel| root.metadata(&rel, false)).await?;
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = self.at_path(path, |root, rel| root.metadata(&rel, true)).await?;
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = match self.handles.get(&handle) {
            Some(SftpHandle::File(file)) => {
                let file = file.clone();
                blocking(move || file.metadata()).await?
            }
            Some(SftpHandle::Dir { dir, .. }) => {
                let dir = dir.clone();
                blocking(move || dir.metadata()).await?
            }
            None => return Err(invalid_handle()),
        };
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn setstat(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        self.at_path(path, move |root, rel| root.with_resolved(&rel, |p| apply_attrs_path(p, &attrs))).await?;
        Ok(status_ok(id))
    }

    async fn fsetstat(&mut self, id: u32, handle: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        match self.handles.get(&handle) {
            Some(SftpHandle::File(file)) => {
                let file = file.clone();
                blocking(move || apply_attrs_file(&file, &attrs)).await?;
            }
            Some(SftpHandle::Dir { dir, .. }) => {
                let dir = dir.clone();
                blocking(move || apply_attrs_file(&dir, &attrs)).await?;
            }
            None => return Err(invalid_handle()),
        }
        Ok(status_ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<SftpHandleReply, Self::Error> {
        let (dir, entries) = self.at_path(path, |root, rel| root.read_dir(&rel)).await?;
        let handle =
            self.insert_handle(SftpHandle::Dir { dir: Arc::new(dir), entries: Some(entries), dots_pending: true })?;
        Ok(SftpHandleReply { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(SftpHandle::Dir { dir, entries, dots_pending }) = self.handles.get_mut(&handle) else {
            return Err(invalid_handle());
        };
        let Some(iter) = entries.take() else {
            return Err(StatusReply::new(StatusCode::Eof));
        };
        let dots = std::mem::replace(dots_pending, false);
        let dir = dir.clone();
        let (files, rest) = blocking(move || read_dir_batch(&dir, iter, dots)).await?;
        if let Some(SftpHandle::Dir { entries, .. }) = self.handles.get_mut(&handle) {
            *entries = rest;
        }
        if files.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        self.at_path(filename, |root, rel| root.remove_file(&rel)).await?;
        Ok(status_ok(id))
    }

    async fn mkdir(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        let mode = attrs.permissions.map_or(0o777, |m| m & 0o7777);
        self.at_path(path, move |root, rel| root.create_dir(&rel, mode)).await?;
        Ok(status_ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        self.at_path(path, |root, rel| {
            if rel.as_os_str().is_empty() {
                return Err(outside_root());
            }
            root.remove_dir(&rel)
        })
        .await?;
        Ok(status_ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let real = self.at_path(path, |root, rel| root.real_path(&rel)).await?;
        Ok(Name { id, files: vec![SftpFile::dummy(real.to_string_lossy())] })
    }

    async fn rename(&mut self, id: u32, oldpath: String, newpath: String) -> Result<Status, Self::Error> {
        let root = self.root.clone();
        blocking(move || {
            let (old, new) = (root.relative(&oldpath)?, root.relative(&newpath)?);
            if old.as_os_str().is_empty() || new.as_os_str().is_empty() {
                return Err(outside_root());
            }
            root.rename(&old, &new)
        })
        .await?;
        Ok(status_ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = self.at_path(path, |root, rel| root.read_link(&rel)).await?;
        Ok(Name { id, files: vec![SftpFile::dummy(target.to_string_lossy())] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_signals_carry_the_tables_names() {
        assert!(matches!(exit_signal(libc::SIGTERM), Sig::TERM));
        assert!(matches!(exit_signal(libc::SIGUSR2), Sig::Custom(ref n) if n == "USR2"));
        assert!(matches!(exit_signal(4242), Sig::Custom(ref n) if n == "4242"));
    }

    #[test]
    fn env_validation() {
        assert!(valid_env("LANG", "C.UTF-8"));
        assert!(!valid_env("", "x"));
        assert!(!valid_env("A=B", "x"));
        assert!(!valid_env("A", "x\0y"));
    }

    #[test]
    fn keys_are_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SshKeys::load_or_create(dir.path()).unwrap();
        let id_rsa = dir.path().join("ssh-keys/id_rsa");
        let host = dir.path().join("ssh-keys/ssh_host_ed25519_key");
        assert_eq!(std::fs::read_to_string(&id_rsa).unwrap(), keys.client_key_text());
        for path in [&id_rsa, &host] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let key = russh::keys::decode_secret_key(keys.client_key_text(), None).unwrap();
        assert!(matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }));
        assert!(keys.client_public_openssh().starts_with("ssh-rsa "));
        assert_eq!(keys.host_key.public_key().algorithm(), russh::keys::Algorithm::Ed25519);

        let again = SshKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again.client_key_text(), keys.client_key_text());
        assert_eq!(again.client_public_openssh(), keys.client_public_openssh());
        assert_eq!(again.host_key.public_key().key_data(), keys.host_key.public_key().key_data());
    }

    #[test]
    fn corrupt_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ssh-keys")).unwrap();
        std::fs::write(dir.path().join("ssh-keys/id_rsa"), "garbage").unwrap();
        let err = SshKeys::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn read_at_most_stops_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello world").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_at_most(&file, 6, 100).unwrap(), b"world");
        assert_eq!(read_at_most(&file, 0, 5).unwrap(), b"hello");
        assert!(read_at_most(&file, 11, 5).unwrap().is_empty());
        // Reading past any possible offset is an error or end of file, never a panic.
        assert!(read_at_most(&file, u64::MAX, 5).map_or(true, |data| data.is_empty()));
    }
}
