//! One authenticated SSH connection ([`Connection`]) to one VM endpoint ([`SshEndpoint`]).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, Disconnect};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::error::SshError;
use super::exec::{self, ExecHandle, ExecOutput, ExecRequest};
use super::files::{self, Sftp, TransferOptions, TransferReport};

/// Where and as whom to log in: the fields of multipassd's `ssh_info`.
pub use mpool_core::types::SshEndpoint;

/// Tunables of connections, execs and transfers. `Default` gives sensible values.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// Limit for TCP connect, handshake and authentication together (default 10 s).
    pub connect_timeout: Duration,
    /// Most channels (execs, SFTP sessions) open at once on one connection (default 8, below
    /// OpenSSH's default `MaxSessions 10`, leaving room for the short kill channels).
    pub max_channels: usize,
    /// Send a keepalive after this much silence from the server (default 15 s); after
    /// `keepalive_max` unanswered keepalives the connection counts as closed.
    pub keepalive_interval: Option<Duration>,
    /// Unanswered keepalives before giving up (default 3).
    pub keepalive_max: usize,
    /// On cancel or timeout: time between `kill -TERM` and `kill -KILL` of the remote process
    /// group (default 2 s).
    pub kill_grace: Duration,
    /// Events buffered between an exec and its consumer (default 16); when full, mpool stops
    /// reading the channel.
    pub event_buffer: usize,
    /// Limit for each single SFTP request (default 30 s).
    pub sftp_request_timeout: Duration,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            connect_timeout: Duration::from_secs(10),
            max_channels: 8,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            kill_grace: Duration::from_secs(2),
            event_buffer: 16,
            sftp_request_timeout: Duration::from_secs(30),
        }
    }
}

/// Parses private key text (OpenSSH, PKCS#1 or PKCS#8; RSA, ed25519 or ECDSA).
pub fn parse_private_key(text: &str) -> Result<PrivateKey, SshError> {
    // Tolerate CRLF, indentation and trailing blanks from copy-pasted or JSON-escaped keys.
    let normalized: String = text.lines().map(|l| format!("{}\n", l.trim())).collect();
    russh::keys::decode_secret_key(&normalized, None).map_err(|e| SshError::InvalidKey { detail: e.to_string() })
}

/// The SHA-256 fingerprint of a host key, `SHA256:...` as printed by `ssh-keygen -l`.
fn fingerprint(key: &PublicKeyOrCertificate) -> String {
    match key {
        PublicKeyOrCertificate::PublicKey { key, .. } => key.fingerprint(HashAlg::Sha256).to_string(),
        PublicKeyOrCertificate::Certificate(c) => c.public_key().fingerprint(HashAlg::Sha256).to_string(),
    }
}

/// russh callbacks: host key check (accept any, or only the pinned one).
struct ClientHandler {
    pinned: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let fp = fingerprint(key);
        let accept = self.pinned.as_ref().is_none_or(|p| *p == fp);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fp);
        }
        Ok(accept)
    }
}

struct Inner {
    handle: Handle<ClientHandler>,
    addr: String,
    host_key: String,
    channels: Arc<Semaphore>,
    max_channels: usize,
    options: SshOptions,
    /// Set by `close`: running execs stop and kill their remote process groups.
    closing: watch::Sender<bool>,
    /// Each exec task holds a clone; `close` drops this one and waits on `tasks_done` until all
    /// clones are gone (the usual mpsc shutdown pattern).
    task_token: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    tasks_done: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// What an exec task needs from its connection to stop when the connection closes.
pub(crate) struct TaskGuard {
    /// Turns true when the connection is closing.
    pub(crate) closing: watch::Receiver<bool>,
    /// Held until the task ends; `close` waits for all of them.
    pub(crate) _token: mpsc::Sender<()>,
}

/// One authenticated SSH connection. Cheap to clone; all clones share the connection, which
/// carries every exec and transfer as its own channel (at most [`SshOptions::max_channels`] at
/// once; further requests wait for a free slot).
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.inner.addr)
            .field("host_key", &self.inner.host_key)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// Connects and authenticates, accepting any host key (as Multipass does).
    pub async fn connect(target: &SshEndpoint, options: &SshOptions) -> Result<Connection, SshError> {
        Self::connect_pinned(target, options, None).await
    }

    /// Connects and authenticates; with `expected_host_key` (a `SHA256:...` fingerprint) any
    /// other host key is refused with [`SshError::HostKeyMismatch`].
    pub async fn connect_pinned(
        target: &SshEndpoint,
        options: &SshOptions,
        expected_host_key: Option<&str>,
    ) -> Result<Connection, SshError> {
        let key = parse_private_key(&target.private_key)?;
        let addr = target.addr();
        let limit = options.connect_timeout;
        match tokio::time::timeout(limit, Self::establish(target, options, key, expected_host_key)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::Timeout { what: format!("connecting to {addr}"), after: limit }),
        }
    }

    async fn establish(
        target: &SshEndpoint,
        options: &SshOptions,
        key: PrivateKey,
        expected_host_key: Option<&str>,
    ) -> Result<Connection, SshError> {
        let addr = target.addr();
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| SshError::Unreachable { addr: addr.clone(), source })?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%addr, "set_nodelay failed: {e}");
        }
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: options.keepalive_interval,
            keepalive_max: options.keepalive_max,
            nodelay: true,
            ..Default::default()
        });
        let seen = Arc::new(Mutex::new(None));
        let handler = ClientHandler { pinned: expected_host_key.map(str::to_string), seen: seen.clone() };
        let seen_key = || seen.lock().ok().and_then(|s| s.clone());
        let mut handle = match client::connect_stream(config, stream, handler).await {
            Ok(h) => h,
            Err(russh::Error::UnknownKey) => {
                return Err(SshError::HostKeyMismatch {
                    addr,
                    expected: expected_host_key.unwrap_or_default().to_string(),
                    actual: seen_key().unwrap_or_else(|| "<none>".into()),
                });
            }
            Err(e) => return Err(SshError::Handshake { addr, detail: e.to_string() }),
        };
        let host_key = seen_key().unwrap_or_default();

        let hash = if key.algorithm().is_rsa() {
            match handle.best_supported_rsa_hash().await {
                // The server listed what it accepts (None inside = only legacy ssh-rsa).
                Ok(Some(hash)) => hash,
                // No server-sig-algs: assume a modern server (OpenSSH >= 8.8 refuses SHA-1).
                Ok(None) => Some(HashAlg::Sha256),
                Err(e) => return Err(SshError::Handshake { addr, detail: e.to_string() }),
            }
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(&target.username, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .map_err(|e| SshError::Handshake { addr: addr.clone(), detail: e.to_string() })?;
        if !auth.success() {
            return Err(SshError::AuthRefused { user: target.username.clone(), addr });
        }
        tracing::debug!(%addr, %host_key, "SSH connection established");
        let max_channels = options.max_channels.max(1);
        let (token, tasks_done) = mpsc::channel(1);
        Ok(Connection {
            inner: Arc::new(Inner {
                handle,
                addr,
                host_key,
                channels: Arc::new(Semaphore::new(max_channels)),
                max_channels,
                options: options.clone(),
                closing: watch::Sender::new(false),
                task_token: std::sync::Mutex::new(Some(token)),
                tasks_done: tokio::sync::Mutex::new(tasks_done),
            }),
        })
    }

    /// The server's host key fingerprint (`SHA256:...`) seen at connect time.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.inner.host_key
    }

    /// True when both values are clones of the same connection.
    pub fn same_as(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// True once the connection is gone (closed by either side, network failure, keepalive
    /// timeout). A closed connection cannot be revived; connect again.
    pub fn is_closed(&self) -> bool {
        self.inner.handle.is_closed()
    }

    /// One round trip on the connection: an OpenSSH keepalive request, which servers answer
    /// without starting anything (no channel, no process). Proves the server and this
    /// connection are alive now.
    pub async fn ping(&self, limit: Duration) -> Result<(), SshError> {
        let addr = self.inner.addr.clone();
        match tokio::time::timeout(limit, self.inner.handle.send_ping()).await {
            Err(_) => {
                return Err(SshError::Timeout { what: format!("a keepalive round trip to {addr}"), after: limit });
            }
            Ok(Err(e)) => return Err(SshError::ConnectionLost { addr, detail: e.to_string() }),
            Ok(Ok(())) => {}
        }
        // russh also completes the ping when the connection ends before the reply.
        if self.is_closed() {
            return Err(SshError::ConnectionLost { addr, detail: "closed before answering a keepalive".into() });
        }
        Ok(())
    }

    /// Channels (execs, SFTP sessions) currently open, at most `max_channels`.
    pub fn channels_in_use(&self) -> usize {
        self.inner.max_channels.saturating_sub(self.inner.channels.available_permits())
    }

    /// Starts a command; events stream through the returned handle. Waits for a free channel
    /// slot first. Dropping the handle cancels the command (the remote process is killed).
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecHandle, SshError> {
        let prepared = exec::Prepared::new(request)?;
        exec::start(exec::open(self).await?, prepared).await
    }

    /// Runs a command to completion and collects its output in memory (for small outputs; use
    /// [`Connection::exec`] to stream). A non-zero exit is not an error here: see
    /// [`ExecOutput::check`].
    pub async fn run(&self, request: ExecRequest) -> Result<ExecOutput, SshError> {
        Ok(self.exec(request).await?.collect().await)
    }

    /// Copies a local file or directory tree to `remote` (the path of the copy, not its parent).
    pub async fn upload(
        &self,
        local: impl AsRef<Path>,
        remote: &str,
        options: &TransferOptions,
    ) -> Result<TransferReport, SshError> {
        let sftp = self.sftp().await?;
        files::upload(&sftp, local.as_ref(), remote, options).await
    }

    /// Copies a remote file or directory tree to `local` (the path of the copy, not its parent).
    pub async fn download(
        &self,
        remote: &str,
        local: impl AsRef<Path>,
        options: &TransferOptions,
    ) -> Result<TransferReport, SshError> {
        let sftp = self.sftp().await?;
        files::download(&sftp, remote, local.as_ref(), options).await
    }

    /// Closes the connection: running commands are stopped first (their remote process groups
    /// killed, their streams end with `cancelled: true`), then it disconnects; transfers in
    /// progress fail. Waits at most `kill_grace` + 10 s for the commands.
    pub async fn close(&self) {
        self.inner.closing.send_replace(true);
        let token = self.inner.task_token.lock().map(|mut t| t.take()).unwrap_or_default();
        drop(token);
        let all_stopped = async { while self.inner.tasks_done.lock().await.recv().await.is_some() {} };
        let limit = self.inner.options.kill_grace + Duration::from_secs(10);
        if tokio::time::timeout(limit, all_stopped).await.is_err() {
            tracing::warn!(addr = %self.inner.addr, "commands still running at close");
        }
        let _ = self.inner.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }

    /// Registers a new exec task; fails once the connection is closing.
    pub(crate) fn task_guard(&self) -> Result<TaskGuard, SshError> {
        let token = self.inner.task_token.lock().ok().and_then(|t| t.clone());
        match token {
            Some(token) if !*self.inner.closing.borrow() => {
                Ok(TaskGuard { closing: self.inner.closing.subscribe(), _token: token })
            }
            _ => Err(SshError::ConnectionLost {
                addr: self.inner.addr.clone(),
                detail: "the connection was closed".into(),
            }),
        }
    }

    /// Waits for a channel slot, then opens a session channel.
    pub(crate) async fn open_channel(&self) -> Result<(Channel<Msg>, OwnedSemaphorePermit), SshError> {
        let permit = self
            .inner
            .channels
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SshError::ConnectionLost { addr: self.inner.addr.clone(), detail: "closed".into() })?;
        let channel = self.open_control_channel().await?;
        Ok((channel, permit))
    }

    /// Opens a session channel without taking a slot: for the short kill commands, which must
    /// not wait behind the commands they stop.
    pub(crate) async fn open_control_channel(&self) -> Result<Channel<Msg>, SshError> {
        if self.is_closed() {
            return Err(SshError::ConnectionLost {
                addr: self.inner.addr.clone(),
                detail: "the connection is closed".into(),
            });
        }
        self.inner
            .handle
            .channel_open_session()
            .await
            .map_err(|e| SshError::from_russh(&self.inner.addr, "a session channel", e))
    }

    /// Opens an SFTP session on a new channel (holding a channel slot while it lives).
    pub(crate) async fn sftp(&self) -> Result<Sftp, SshError> {
        let (channel, permit) = self.open_channel().await?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| SshError::from_russh(&self.inner.addr, "the sftp subsystem", e))?;
        let timeout = self.inner.options.sftp_request_timeout;
        Sftp::new(channel, permit, timeout, &self.inner.addr).await
    }

    pub(crate) fn options(&self) -> &SshOptions {
        &self.inner.options
    }
}
