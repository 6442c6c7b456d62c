//! The typed multipassd client. Every call sends its request before awaiting the call (the
//! daemon sends no headers until it has read one), keeps the request stream open until the call
//! ends (so prompts can be answered), routes `log_line`s to tracing, has a deadline, and returns
//! the last reply that carries an answer (replies carrying only a log line are logged, never
//! taken for the answer). The API cannot express an empty instance list (which multipassd reads as ALL).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::trust::{self, ClientIdentity, ServerVerification};
use super::{DaemonAddress, Error, Version};
use crate::proto::multipass as pb;
use crate::proto::multipass::rpc_client::RpcClient;

pub use mpool_core::types::{InstanceState, LaunchOptions, SshEndpoint};

/// How to reach and trust the daemon.
#[derive(Clone)]
pub struct ClientOptions {
    /// The daemon's address; `None` discovers it (`MULTIPASS_SERVER_ADDRESS`, snap socket, `/run`).
    pub address: Option<DaemonAddress>,
    /// mpool's data dir (its own client certificate lives here).
    pub data_dir: PathBuf,
    /// Which client certificate to present.
    pub identity: ClientIdentity,
    /// How to verify the daemon.
    pub verification: ServerVerification,
    /// The daemon's `local.passphrase`, used to `authenticate` when we are not trusted yet.
    pub passphrase: Option<String>,
    /// How the passphrase was given, so a refusal's hint names the right place (None: the
    /// config's `[daemon] passphrase_file`).
    pub passphrase_origin: Option<PassphraseOrigin>,
    /// Talk to daemons outside the tested 1.13-1.16 range anyway.
    pub allow_untested_daemon: bool,
    /// Deadline for establishing the connection.
    pub connect_timeout: Duration,
    /// Deadline of every call unless a method says otherwise.
    pub call_timeout: Duration,
    /// At most this many daemon calls in flight at once, across all clones of the client
    /// (0: no cap). Default [`DEFAULT_MAX_IN_FLIGHT`]; see [`ClientOptions::with_max_in_flight`].
    pub max_in_flight: usize,
    /// When reads cut by their connection are sent again (see [`SAFE_TO_RETRY`]).
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("address", &self.address)
            .field("data_dir", &self.data_dir)
            .field("identity", &self.identity)
            .field("verification", &self.verification)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "<redacted>"))
            .field("allow_untested_daemon", &self.allow_untested_daemon)
            .finish()
    }
}

impl ClientOptions {
    /// Defaults: discovered address, automatic identity and verification, 5 s to connect, 60 s
    /// per call.
    pub fn new(data_dir: impl Into<PathBuf>) -> ClientOptions {
        ClientOptions {
            address: None,
            data_dir: data_dir.into(),
            identity: ClientIdentity::Auto,
            verification: ServerVerification::Auto,
            passphrase: None,
            passphrase_origin: None,
            allow_untested_daemon: false,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(60),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            retry: RetryPolicy::default(),
        }
    }

    /// Caps the daemon calls in flight at once (0: no cap). A call waits for a slot within
    /// its deadline. Fewer concurrent calls make multipassd's abort on a log-writer race rarer.
    pub fn with_max_in_flight(mut self, calls: usize) -> ClientOptions {
        self.max_in_flight = calls;
        self
    }

    /// Sets when cut reads are sent again ([`RetryPolicy::NONE`]: never).
    pub fn with_retry(mut self, policy: RetryPolicy) -> ClientOptions {
        self.retry = policy;
        self
    }
}

/// Where a passphrase came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassphraseOrigin {
    /// `[daemon] passphrase_file` of mpool's config.
    ConfigFile(PathBuf),
    /// A `--passphrase-file` flag.
    FlagFile(PathBuf),
    /// Typed on the command line (`mpool multipass authenticate PASSPHRASE`).
    Argument,
}

impl PassphraseOrigin {
    fn describe(origin: Option<&PassphraseOrigin>) -> String {
        match origin {
            Some(PassphraseOrigin::ConfigFile(p)) => {
                format!("the passphrase in `[daemon] passphrase_file` ({})", p.display())
            }
            Some(PassphraseOrigin::FlagFile(p)) => {
                format!("the passphrase in --passphrase-file {}", p.display())
            }
            Some(PassphraseOrigin::Argument) => "the passphrase given to `authenticate`".into(),
            None => "the configured passphrase (`[daemon] passphrase_file`)".into(),
        }
    }

    fn fix(origin: Option<&PassphraseOrigin>) -> &'static str {
        match origin {
            Some(PassphraseOrigin::Argument) => {
                "check what you typed against `multipass get local.passphrase` on a trusted client (it prints true/false; set it anew with `multipass set local.passphrase`)"
            }
            Some(PassphraseOrigin::FlagFile(_)) => "check the file's first line",
            _ => "check `passphrase_file`",
        }
    }
}

/// A non-empty list of instance names. multipassd reads an empty list as ALL instances, so
/// the typed API cannot send one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names(Vec<String>);

impl Names {
    /// One instance.
    pub fn one(name: impl Into<String>) -> Names {
        Names(vec![name.into()])
    }

    /// Several instances; refuses an empty list.
    pub fn new(names: Vec<String>) -> Result<Names, Error> {
        if names.is_empty() {
            return Err(Error::InvalidArgument(
                "no instance named: multipassd would apply this to ALL instances".into(),
            ));
        }
        Ok(Names(names))
    }

    /// The names.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    fn proto(&self) -> Option<pb::InstanceNames> {
        Some(pb::InstanceNames { instance_name: self.0.clone() })
    }

    fn pairs(&self) -> Vec<pb::InstanceSnapshotPair> {
        self.0.iter().map(|n| pb::InstanceSnapshotPair { instance_name: n.clone(), snapshot_name: None }).collect()
    }
}

/// One instance as `list` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceSummary {
    /// Name.
    pub name: String,
    /// State.
    #[serde(serialize_with = "ser_state")]
    pub state: InstanceState,
    /// IPv4 addresses (only when asked for).
    pub ipv4: Vec<String>,
    /// Release.
    pub release: String,
}

fn ser_state<S: serde::Serializer>(s: &InstanceState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str_name())
}

/// One snapshot as `list --snapshots` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    /// Instance.
    pub instance: String,
    /// Snapshot name.
    pub name: String,
    /// Parent snapshot.
    pub parent: String,
    /// Comment.
    pub comment: String,
}

/// Detailed information on one instance. The runtime fields (CPUs, memory and disk totals
/// and usage, load, addresses, current release) are gathered over SSH in the guest and are
/// only filled by [`Client::info_with_runtime`] for a running instance; [`Client::info`] leaves
/// them empty, as multipassd does (reference §0.3).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceInfo {
    /// Name.
    pub name: String,
    /// State.
    #[serde(serialize_with = "ser_state")]
    pub state: InstanceState,
    /// CPUs (runtime).
    pub cpus: String,
    /// Memory total in bytes (runtime).
    pub memory: String,
    /// Disk total in bytes (runtime).
    pub disk: String,
    /// Image release.
    pub image_release: String,
    /// Number of snapshots.
    pub snapshots: i32,
    /// IPv4 addresses (runtime).
    pub ipv4: Vec<String>,
    /// Load averages, e.g. `0.00 0.00 0.00` (runtime).
    pub load: String,
    /// Memory in use, bytes (runtime).
    pub memory_usage: String,
    /// Disk in use, bytes (runtime).
    pub disk_usage: String,
    /// The release the guest reports (runtime).
    pub current_release: String,
    /// The image's hash.
    pub image_hash: String,
}

/// One image or blueprint alias as `find` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageAlias {
    /// The remote to name with it (empty: the default remote).
    pub remote: String,
    /// The alias.
    pub alias: String,
}

impl std::fmt::Display for ImageAlias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.remote.is_empty() { write!(f, "{}", self.alias) } else { write!(f, "{}:{}", self.remote, self.alias) }
    }
}

/// One image or blueprint `find` reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageEntry {
    /// Its aliases; the first is how the multipass CLI names it.
    pub aliases: Vec<ImageAlias>,
    /// OS (`Ubuntu`; empty for blueprints).
    pub os: String,
    /// Release or description.
    pub release: String,
    /// Version.
    pub version: String,
    /// Code name.
    pub codename: String,
}

/// What `find` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FindResult {
    /// Images.
    pub images: Vec<ImageEntry>,
    /// Blueprints.
    pub blueprints: Vec<ImageEntry>,
}

/// Host resources reported by `daemon_info`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DaemonInfo {
    /// Bytes of the data volume.
    pub available_space: u64,
    /// CPUs.
    pub cpus: u32,
    /// Memory bytes.
    pub memory: u64,
}

/// Access to a daemon's `log_line` of any reply, and whether a reply carries more than one.
///
/// multipassd writes its log lines into every call in flight, from any thread, as replies of
/// the call's own type that carry nothing but `log_line`. Such a reply can arrive before,
/// between or after the reply that carries the answer (reference §0.3), so it must never be
/// taken for the answer.
trait Reply: Send + 'static {
    fn log_line(&self) -> &str;
    /// True unless the reply carries only a log line.
    fn carries_answer(&self) -> bool;
}

macro_rules! replies {
    ($($t:ty),* $(,)?) => { $(impl Reply for $t {
        fn log_line(&self) -> &str { &self.log_line }
        fn carries_answer(&self) -> bool {
            if self.log_line.is_empty() {
                return true;
            }
            let mut rest = self.clone();
            rest.log_line.clear();
            rest != <$t>::default()
        }
    })* };
}
replies!(
    pb::LaunchReply,
    pb::PurgeReply,
    pb::InfoReply,
    pb::ListReply,
    pb::RecoverReply,
    pb::SshInfoReply,
    pb::StartReply,
    pb::StopReply,
    pb::SuspendReply,
    pb::RestartReply,
    pb::DeleteReply,
    pb::VersionReply,
    pb::GetReply,
    pb::SetReply,
    pb::KeysReply,
    pb::AuthenticateReply,
    pb::SnapshotReply,
    pb::RestoreReply,
    pb::CloneReply,
    pb::DaemonInfoReply,
    pb::FindReply,
);

/// A connected, trusted, version-checked multipassd client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    rpc: RpcClient<Channel>,
    address: Arc<DaemonAddress>,
    version: Version,
    version_text: Arc<str>,
    timeout: Duration,
    passphrase: Option<Arc<str>>,
    passphrase_origin: Option<PassphraseOrigin>,
    /// Why the daemon's certificate last failed verification (see [`trust::TrustFailureSlot`]).
    trust_failures: trust::TrustFailureSlot,
    /// The in-flight cap, shared by all clones (None: no cap).
    cap: Option<Arc<tokio::sync::Semaphore>>,
    cap_size: Option<usize>,
    /// Calls waiting for a slot under the cap.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// When to send a cut read again.
    retry: RetryPolicy,
}

/// The calls a client sends again when their connection was cut (an HTTP/2 error: multipassd
/// aborted or restarted under them) or could not be made: reads that change nothing in the
/// daemon, so a second copy is harmless whether or not the first one ran. Everything else
/// (launch, start, stop, suspend, snapshot, restore, clone, delete, purge, recover, set,
/// authenticate, ...) is not sent again: a cut one may or may not have happened (a second
/// `snapshot` without a name takes a second snapshot, a second `launch` finds the half-made
/// instance), so it fails with [`Error::ConnectionLost`] and the caller re-observes the
/// daemon's state before acting again.
pub const SAFE_TO_RETRY: &[&str] =
    &["ping", "version", "list", "info", "find", "ssh_info", "get", "keys", "daemon_info", "networks"];

/// The in-flight cap of [`ClientOptions::new`]: small, as fewer concurrent calls make
/// multipassd's abort on a log-writer race rarer (reference §0.3).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// When a client sends a cut read again (see [`SAFE_TO_RETRY`]). The call's deadline bounds
/// all attempts together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never again).
    pub attempts: u32,
    /// The wait before the second attempt; it doubles after each.
    pub first_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// No second attempt.
    pub const NONE: RetryPolicy =
        RetryPolicy { attempts: 1, first_backoff: Duration::ZERO, max_backoff: Duration::ZERO };
}

impl Default for RetryPolicy {
    /// Three attempts, 200 ms then 400 ms apart: rides out a cut connection and a daemon that
    /// is back within a second or so; longer outages surface as unavailable.
    fn default() -> RetryPolicy {
        RetryPolicy { attempts: 3, first_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(1) }
    }
}

type Rpc = RpcClient<Channel>;

impl Client {
    /// Connects, establishes trust and reads the daemon's version, in one call where one is
    /// enough: `version` (on a Unix socket with an empty trust store it trusts us, as any call
    /// but `ping` does); if the daemon does not trust us, `authenticate` with the passphrase
    /// and `version` again. Then checks the version is one mpool speaks.
    pub async fn connect(opts: ClientOptions) -> Result<Client, Error> {
        let mut client = Client::open(&opts).await?;
        let text = client.trusted_version().await?;
        let version = Version::parse(&text)
            .ok_or_else(|| Error::Unsupported(format!("multipassd reported an unreadable version {text:?}")))?;
        if !version.is_tested() && !opts.allow_untested_daemon {
            return Err(Error::Unsupported(format!(
                "multipassd {version} is outside the versions mpool speaks (1.13.0 to 1.16.x); \
                 set `allow_untested_daemon` (`--allow-untested-daemon`) to try anyway"
            )));
        }
        client.version = version;
        client.version_text = Arc::from(text);
        Ok(client)
    }

    /// Opens the TLS channel only: no trust handshake, no version check (its version reads as
    /// 0.0.0). For diagnostics and tests of the daemon's trust rules; use [`Client::connect`].
    pub async fn open(opts: &ClientOptions) -> Result<Client, Error> {
        let (address, discovered) = match &opts.address {
            Some(a) => (a.clone(), None),
            None => {
                let d = super::Discovered::find()?;
                (d.address.clone(), Some(d))
            }
        };
        super::startup::mark("open");
        let identity = trust::load_identity(&opts.identity, &opts.data_dir)?;
        super::startup::mark("identity-loaded");
        let failures = trust::TrustFailureSlot::default();
        let (verifier, _) = trust::checked_server_verifier(&opts.verification, &address, failures.clone())?;
        let tls = Arc::new(trust::client_config(identity, verifier)?);
        super::startup::mark("tls-config-built");
        let channel =
            channel(&address, tls, opts.connect_timeout, &failures).await.map_err(|e| match (e, &discovered) {
                (Error::Unavailable { address, detail }, Some(d)) => {
                    Error::Unavailable { address: format!("{address} ({})", d.explain()), detail }
                }
                (e, _) => e,
            })?;
        Ok(Client {
            rpc: RpcClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            address: Arc::new(address),
            version: Version { major: 0, minor: 0, patch: 0 },
            version_text: Arc::from(""),
            timeout: opts.call_timeout,
            passphrase: opts.passphrase.as_deref().map(Arc::from),
            passphrase_origin: opts.passphrase_origin.clone(),
            trust_failures: failures,
            cap: (opts.max_in_flight > 0).then(|| Arc::new(tokio::sync::Semaphore::new(opts.max_in_flight))),
            cap_size: (opts.max_in_flight > 0).then_some(opts.max_in_flight),
            queued: Arc::default(),
            retry: opts.retry,
        })
    }

    /// The daemon's version (read at connect).
    pub fn daemon_version(&self) -> Version {
        self.version
    }

    /// The daemon's version as it reported it at connect, e.g. "1.16.3" (empty from
    /// [`Client::open`]).
    pub fn daemon_version_text(&self) -> &str {
        &self.version_text
    }

    /// The daemon's address.
    pub fn address(&self) -> &DaemonAddress {
        &self.address
    }

    /// A clone of this client (sharing its in-flight cap) that sends cut reads again per
    /// `policy` instead.
    pub fn with_retry(&self, policy: RetryPolicy) -> Client {
        Client { retry: policy, ..self.clone() }
    }

    /// A clone of this client whose calls use `deadline` instead.
    pub fn with_timeout(&self, deadline: Duration) -> Client {
        Client { timeout: deadline, ..self.clone() }
    }

    /// `version`, authenticating first if the daemon does not trust us (and we have a
    /// passphrase). On a Unix socket with an empty trust store, `version` itself trusts us.
    async fn trusted_version(&self) -> Result<String, Error> {
        match self.version_text().await {
            Ok(text) => return Ok(text),
            Err(Error::Untrusted { message }) if self.passphrase.is_none() => {
                return Err(Error::Untrusted { message });
            }
            Err(Error::Untrusted { .. }) => {}
            Err(e) => return Err(e),
        }
        let passphrase = self.passphrase.clone().unwrap_or_else(|| Arc::from(""));
        let origin = self.passphrase_origin.as_ref();
        self.authenticate(&passphrase).await.map_err(|e| match e {
            Error::Daemon { op, code: tonic::Code::InvalidArgument, message, .. } => Error::Daemon {
                op,
                code: tonic::Code::InvalidArgument,
                message: format!(
                    "{message} ({} was refused; {})",
                    PassphraseOrigin::describe(origin),
                    PassphraseOrigin::fix(origin)
                ),
                launch_error: None,
                start_error: None,
            },
            Error::Daemon { code: tonic::Code::FailedPrecondition, message, .. } => Error::Untrusted {
                message: format!(
                    "{message} (mpool tried to authenticate with {}.)",
                    PassphraseOrigin::describe(origin)
                ),
            },
            other => other,
        })?;
        self.version_text().await
    }

    /// Runs one bidirectional call: sends `first` before awaiting the call, answers prompts
    /// with `answer`, forwards log lines to tracing, and returns the last reply that carries
    /// more than a log line. Waits for a slot under the in-flight cap first; a read (see
    /// [`SAFE_TO_RETRY`]) cut by its connection or refused by a restarting daemon is sent
    /// again per the retry policy. All of it within the call's deadline.
    ///
    /// Each attempt runs to its end on its own task, even when the caller gives up on it (its
    /// task aborted, its deadline passed): a call cancelled before its request reached the
    /// daemon reads there as a stream closed without a request, which multipassd serves as the
    /// default request, and for `delete` an empty name list means every instance on the host.
    async fn bidi<Req, Rep, F, Fut, A>(
        &self,
        op: &'static str,
        first: Req,
        call: F,
        answer: A,
    ) -> Result<Option<Rep>, Error>
    where
        Req: Clone + Send + 'static,
        Rep: Reply,
        F: Fn(Rpc, ReceiverStream<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<Rep>>, tonic::Status>> + Send,
        A: Fn(&Rep) -> Option<Req> + Send + Sync + 'static,
    {
        let how = Arc::new((call, answer));
        let work = self.retrying(op, |slot| {
            let (this, first, how) = (self.clone(), first.clone(), how.clone());
            let attempt = tokio::spawn(async move {
                let _slot = slot;
                let once = this.bidi_once(op, first, &how.0, &how.1);
                tokio::time::timeout(this.timeout, once)
                    .await
                    .unwrap_or(Err(Error::Timeout { op, after: this.timeout }))
            });
            async move {
                attempt
                    .await
                    .unwrap_or_else(|e| Err(Error::Protocol { op, detail: format!("the call's task ended: {e}") }))
            }
        });
        tokio::time::timeout(self.timeout, work).await.map_err(|_| Error::Timeout { op, after: self.timeout })?
    }

    /// Runs `attempt` (with its slot under the in-flight cap, held until the attempt ends) again
    /// after a retryable failure of a safe call (with backoff), until it succeeds, fails
    /// otherwise, or the policy's attempts run out.
    async fn retrying<T, Fut>(
        &self,
        op: &'static str,
        mut attempt: impl FnMut(Option<tokio::sync::OwnedSemaphorePermit>) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>>,
    {
        let safe = SAFE_TO_RETRY.contains(&op);
        let mut backoff = self.retry.first_backoff;
        let mut tries = 0u32;
        let mut cut: Option<Error> = None;
        loop {
            tries += 1;
            let result = attempt(self.slot().await).await;
            match result {
                Err(e) if safe && e.is_retryable() && tries < self.retry.attempts => {
                    tracing::debug!(op, tries, "sending again after: {e}");
                    if e.is_connection_lost() && cut.is_none() {
                        cut = Some(e);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                // The call was cut, and the daemon is not back: say both.
                Err(Error::Unavailable { detail: later, .. })
                    if let Some(Error::ConnectionLost { op, address, detail }) = cut =>
                {
                    return Err(Error::ConnectionLost {
                        op,
                        address,
                        detail: format!("{detail}; sent again {} times: {later}", tries - 1),
                    });
                }
                other => return other,
            }
        }
    }

    /// A slot under the in-flight cap (none when the cap is off).
    async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let cap = self.cap.as_ref()?;
        self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let permit = cap.clone().acquire_owned().await.ok();
        self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        permit
    }

    /// Calls waiting for a slot under the in-flight cap right now (shared by all clones).
    pub fn queued_calls(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The cap on concurrent daemon calls (shared by all clones; None: no cap).
    pub fn max_in_flight(&self) -> Option<usize> {
        self.cap_size
    }

    async fn bidi_once<Req, Rep, F, Fut>(
        &self,
        op: &'static str,
        first: Req,
        call: &F,
        answer: &(impl Fn(&Rep) -> Option<Req> + Send + Sync),
    ) -> Result<Option<Rep>, Error>
    where
        Req: Send + 'static,
        Rep: Reply,
        F: Fn(Rpc, ReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<Rep>>, tonic::Status>>,
    {
        let addr = self.address.to_string();
        let to_err = |s: tonic::Status| self.call_error(op, &addr, s);
        let (tx, rx) = mpsc::channel(4);
        // The receiver is alive: this cannot fail. Sending first avoids the header deadlock.
        let _ = tx.send(first).await;
        let mut stream = call(self.rpc.clone(), ReceiverStream::new(rx)).await.map_err(to_err)?.into_inner();
        let mut last = None;
        while let Some(reply) = stream.message().await.map_err(to_err)? {
            let line = reply.log_line().trim_end();
            if !line.is_empty() {
                tracing::debug!(target: "multipassd", op, "{line}");
            }
            // A log-only reply is never the answer (nor a prompt), wherever it comes.
            if !reply.carries_answer() {
                continue;
            }
            if let Some(req) = answer(&reply) {
                tx.send(req)
                    .await
                    .map_err(|_| Error::Protocol { op, detail: "the call ended while answering a prompt".into() })?;
            }
            last = Some(reply);
        }
        drop(tx);
        Ok(last)
    }

    /// The error of a failed call. A call that could not reach the daemon because its
    /// certificate no longer verifies (e.g. regenerated after a daemon upgrade) is a trust
    /// problem, not an outage.
    fn call_error(&self, op: &'static str, addr: &str, status: tonic::Status) -> Error {
        let err = Error::from_status(op, addr, status);
        if err.is_unavailable()
            && let Some(what) = self.trust_failures.lock().ok().and_then(|s| s.clone())
        {
            return Error::ServerNotTrusted { address: addr.to_string(), detail: format!("{what} (on reconnecting)") };
        }
        err
    }

    fn need<T>(op: &'static str, reply: Option<T>) -> Result<T, Error> {
        reply.ok_or(Error::Protocol { op, detail: "no reply before the end of the call".into() })
    }

    /// `ping`: OK only if our certificate is trusted (never trusts on first use).
    pub async fn ping(&self) -> Result<(), Error> {
        let addr = self.address.to_string();
        let work = self.retrying("ping", |_slot| async {
            let _slot = _slot;
            let mut rpc = self.rpc.clone();
            rpc.ping(pb::PingRequest {}).await.map(|_| ()).map_err(|s| self.call_error("ping", &addr, s))
        });
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Error::Timeout { op: "ping", after: self.timeout })?
    }

    /// The daemon's version text, e.g. "1.16.3".
    pub async fn version_text(&self) -> Result<String, Error> {
        let r = self
            .bidi("version", pb::VersionRequest::default(), |mut c, s| async move { c.version(s).await }, |_| None)
            .await?;
        Ok(Self::need("version", r)?.version)
    }

    /// Asks the daemon to trust our certificate.
    pub async fn authenticate(&self, passphrase: &str) -> Result<(), Error> {
        let req = pb::AuthenticateRequest { passphrase: passphrase.to_string(), verbosity_level: 0 };
        self.bidi("authenticate", req, |mut c, s| async move { c.authenticate(s).await }, |_| None).await?;
        Ok(())
    }

    /// Instances, cheaply (no IP collection over SSH).
    pub async fn list(&self) -> Result<Vec<InstanceSummary>, Error> {
        self.list_request(false).await
    }

    /// All instances with their IPv4 addresses, as `multipass list` shows them. multipassd
    /// asks each running guest over SSH on its main thread, blocking every other call
    /// meanwhile (reference §7): an operator's command, never a hot path.
    pub async fn list_with_ipv4(&self) -> Result<Vec<InstanceSummary>, Error> {
        self.list_request(true).await
    }

    async fn list_request(&self, request_ipv4: bool) -> Result<Vec<InstanceSummary>, Error> {
        let req = pb::ListRequest { verbosity_level: 0, snapshots: false, request_ipv4 };
        let r = self.bidi("list", req, |mut c, s| async move { c.list(s).await }, |_| None).await?;
        match Self::need("list", r)?.list_contents {
            Some(pb::list_reply::ListContents::InstanceList(l)) => Ok(l
                .instances
                .into_iter()
                .map(|i| InstanceSummary {
                    state: status_of(i.instance_status.as_ref()),
                    name: i.name,
                    ipv4: i.ipv4,
                    release: i.current_release,
                })
                .collect()),
            None => Ok(Vec::new()),
            Some(_) => Err(Error::Protocol { op: "list", detail: "snapshots returned for an instance list".into() }),
        }
    }

    /// All snapshots of all instances.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotSummary>, Error> {
        let req = pb::ListRequest { verbosity_level: 0, snapshots: true, request_ipv4: false };
        let r = self.bidi("list", req, |mut c, s| async move { c.list(s).await }, |_| None).await?;
        match Self::need("list", r)?.list_contents {
            Some(pb::list_reply::ListContents::SnapshotList(l)) => Ok(l
                .snapshots
                .into_iter()
                .map(|s| {
                    let f = s.fundamentals.unwrap_or_default();
                    SnapshotSummary { instance: s.name, name: f.snapshot_name, parent: f.parent, comment: f.comment }
                })
                .collect()),
            None => Ok(Vec::new()),
            Some(_) => Err(Error::Protocol { op: "list", detail: "instances returned for a snapshot list".into() }),
        }
    }

    /// Details of instances, without runtime information: cheap, no SSH inside the daemon;
    /// the runtime fields stay empty.
    pub async fn info(&self, names: &Names) -> Result<Vec<InstanceInfo>, Error> {
        self.info_request(names, false).await
    }

    /// Details of instances with runtime information (CPUs, memory, disk usage, load, IPv4),
    /// as `multipass info` shows them. multipassd gathers them over SSH in each running guest
    /// on its main thread, blocking every other call meanwhile (reference §0.4): an operator's
    /// command, never a hot path.
    pub async fn info_with_runtime(&self, names: &Names) -> Result<Vec<InstanceInfo>, Error> {
        self.info_request(names, true).await
    }

    async fn info_request(&self, names: &Names, runtime: bool) -> Result<Vec<InstanceInfo>, Error> {
        let req = pb::InfoRequest {
            instance_snapshot_pairs: names.pairs(),
            verbosity_level: 0,
            no_runtime_information: !runtime,
            snapshots: false,
        };
        let r = self.bidi("info", req, |mut c, s| async move { c.info(s).await }, |_| None).await?;
        Ok(Self::need("info", r)?
            .details
            .into_iter()
            .map(|d| {
                let i = match d.extra_info {
                    Some(pb::detailed_info_item::ExtraInfo::InstanceInfo(i)) => i,
                    _ => pb::InstanceDetails::default(),
                };
                InstanceInfo {
                    state: status_of(d.instance_status.as_ref()),
                    name: d.name,
                    cpus: d.cpu_count,
                    memory: d.memory_total,
                    disk: d.disk_total,
                    image_release: i.image_release,
                    snapshots: i.num_snapshots.unwrap_or(0),
                    ipv4: i.ipv4,
                    load: i.load,
                    memory_usage: i.memory_usage,
                    disk_usage: i.disk_usage,
                    current_release: i.current_release,
                    image_hash: i.id,
                }
            })
            .collect())
    }

    /// Images and blueprints the daemon can launch: `search` as the multipass CLI takes it
    /// (`[remote:]string`, empty for all), optionally only images or only blueprints.
    pub async fn find(
        &self,
        search: &str,
        images: bool,
        blueprints: bool,
        unsupported: bool,
    ) -> Result<FindResult, Error> {
        let (remote, search) = match search.split(':').count() {
            1 => ("", search),
            2 => search.split_once(':').unwrap_or(("", search)),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{search:?}: invalid remote and search string supplied (expected [remote:]string)"
                )));
            }
        };
        let req = pb::FindRequest {
            search_string: search.to_string(),
            remote_name: remote.to_string(),
            verbosity_level: 0,
            allow_unsupported: unsupported,
            show_images: images,
            show_blueprints: blueprints,
            force_manifest_network_download: false,
        };
        let r = self.bidi("find", req, |mut c, s| async move { c.find(s).await }, |_| None).await?;
        let r = Self::need("find", r)?;
        let convert = |list: Vec<pb::find_reply::ImageInfo>| {
            list.into_iter()
                .map(|i| ImageEntry {
                    aliases: i
                        .aliases_info
                        .into_iter()
                        .map(|a| ImageAlias { remote: a.remote_name, alias: a.alias })
                        .collect(),
                    os: i.os,
                    release: i.release,
                    version: i.version,
                    codename: i.codename,
                })
                .collect()
        };
        Ok(FindResult { images: convert(r.images_info), blueprints: convert(r.blueprints_info) })
    }

    fn launch_request(o: &LaunchOptions) -> Result<pb::LaunchRequest, Error> {
        if o.name.is_empty() {
            return Err(Error::InvalidArgument("launch needs an instance name".into()));
        }
        let image = super::ImageRef::parse(&o.image)?;
        Ok(pb::LaunchRequest {
            instance_name: o.name.clone(),
            image: image.image,
            remote_name: image.remote,
            num_cores: o.cpus,
            mem_size: o.memory.clone(),
            disk_space: o.disk.clone(),
            cloud_init_user_data: o.cloud_init.clone(),
            timeout: o.timeout_secs,
            ..Default::default()
        })
    }

    /// Creates and starts an instance; returns its name.
    pub async fn launch(&self, opts: &LaunchOptions) -> Result<String, Error> {
        let req = Self::launch_request(opts)?;
        let r = self.bidi("launch", req, |mut c, s| async move { c.launch(s).await }, |_| None).await?;
        match Self::need("launch", r)?.create_oneof {
            Some(pb::launch_reply::CreateOneof::VmInstanceName(n)) => Ok(n),
            _ => Ok(opts.name.clone()),
        }
    }

    /// Creates an instance without starting it.
    pub async fn create(&self, opts: &LaunchOptions) -> Result<(), Error> {
        let req = Self::launch_request(opts)?;
        self.bidi("create", req, |mut c, s| async move { c.create(s).await }, |_| None).await?;
        Ok(())
    }

    /// Starts stopped instances and resumes suspended ones; waits up to `timeout_secs` for SSH
    /// (0: the daemon's 300 s).
    pub async fn start(&self, names: &Names, timeout_secs: i32) -> Result<(), Error> {
        let req = pb::StartRequest { instance_names: names.proto(), timeout: timeout_secs, ..Default::default() };
        self.bidi("start", req, |mut c, s| async move { c.start(s).await }, |_| None).await?;
        Ok(())
    }

    /// Stops instances: gracefully, or `force` (kill; discards a suspend image; 1.14+).
    pub async fn stop(&self, names: &Names, force: bool) -> Result<(), Error> {
        if force && !self.version.has_force_stop() {
            return Err(Error::Unsupported(format!("forced stop needs multipassd 1.14+, this is {}", self.version)));
        }
        let req = pb::StopRequest { instance_names: names.proto(), force_stop: force, ..Default::default() };
        self.bidi("stop", req, |mut c, s| async move { c.stop(s).await }, |_| None).await?;
        Ok(())
    }

    /// Suspends running instances (stopped or suspended ones are ignored by the daemon).
    pub async fn suspend(&self, names: &Names) -> Result<(), Error> {
        let req = pb::SuspendRequest { instance_names: names.proto(), verbosity_level: 0 };
        self.bidi("suspend", req, |mut c, s| async move { c.suspend(s).await }, |_| None).await?;
        Ok(())
    }

    /// Reboots running instances.
    pub async fn restart(&self, names: &Names, timeout_secs: i32) -> Result<(), Error> {
        let req = pb::RestartRequest { instance_names: names.proto(), timeout: timeout_secs, ..Default::default() };
        self.bidi("restart", req, |mut c, s| async move { c.restart(s).await }, |_| None).await?;
        Ok(())
    }

    /// Deletes instances; `purge` releases them for good. Returns the purged names.
    pub async fn delete(&self, names: &Names, purge: bool) -> Result<Vec<String>, Error> {
        let req = pb::DeleteRequest {
            instance_snapshot_pairs: names.pairs(),
            purge,
            verbosity_level: 0,
            purge_snapshots: true,
        };
        let r = self
            .bidi(
                "delete",
                req,
                |mut c, s| async move { c.delet(s).await },
                |r: &pb::DeleteReply| {
                    r.confirm_snapshot_purging
                        .then(|| pb::DeleteRequest { purge_snapshots: true, ..Default::default() })
                },
            )
            .await?;
        Ok(r.map(|r| r.purged_instances).unwrap_or_default())
    }

    /// Deletes one snapshot (permanently; answers the purge prompt).
    pub async fn delete_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), Error> {
        let req = pb::DeleteRequest {
            instance_snapshot_pairs: vec![pb::InstanceSnapshotPair {
                instance_name: instance.to_string(),
                snapshot_name: Some(snapshot.to_string()),
            }],
            purge: false,
            verbosity_level: 0,
            purge_snapshots: true,
        };
        self.bidi(
            "delete",
            req,
            |mut c, s| async move { c.delet(s).await },
            |r: &pb::DeleteReply| {
                r.confirm_snapshot_purging.then(|| pb::DeleteRequest { purge_snapshots: true, ..Default::default() })
            },
        )
        .await?;
        Ok(())
    }

    /// Purges all deleted instances; returns their names.
    pub async fn purge(&self) -> Result<Vec<String>, Error> {
        let r = self
            .bidi("purge", pb::PurgeRequest::default(), |mut c, s| async move { c.purge(s).await }, |_| None)
            .await?;
        Ok(r.map(|r| r.purged_instances).unwrap_or_default())
    }

    /// Recovers deleted (not purged) instances.
    pub async fn recover(&self, names: &Names) -> Result<(), Error> {
        let req = pb::RecoverRequest { instance_names: names.proto(), verbosity_level: 0 };
        self.bidi("recover", req, |mut c, s| async move { c.recover(s).await }, |_| None).await?;
        Ok(())
    }

    /// Takes a snapshot of a stopped instance; returns its name (generated when `name` is None).
    pub async fn snapshot(&self, instance: &str, name: Option<&str>, comment: &str) -> Result<String, Error> {
        let req = pb::SnapshotRequest {
            instance: instance.to_string(),
            snapshot: name.unwrap_or_default().to_string(),
            comment: comment.to_string(),
            verbosity_level: 0,
        };
        let r = self.bidi("snapshot", req, |mut c, s| async move { c.snapshot(s).await }, |_| None).await?;
        Ok(Self::need("snapshot", r)?.snapshot)
    }

    /// Restores a stopped instance to a snapshot. `destructive` discards the current state;
    /// otherwise the daemon first takes a safety snapshot. The prompt is answered accordingly.
    pub async fn restore(&self, instance: &str, snapshot: &str, destructive: bool) -> Result<(), Error> {
        let req = pb::RestoreRequest {
            instance: instance.to_string(),
            snapshot: snapshot.to_string(),
            destructive,
            verbosity_level: 0,
        };
        let (i, s) = (instance.to_string(), snapshot.to_string());
        self.bidi(
            "restore",
            req,
            |mut c, st| async move { c.restore(st).await },
            move |r: &pb::RestoreReply| {
                r.confirm_destructive.then(|| pb::RestoreRequest {
                    instance: i.clone(),
                    snapshot: s.clone(),
                    destructive,
                    verbosity_level: 0,
                })
            },
        )
        .await?;
        Ok(())
    }

    /// Clones a stopped instance to `destination` (1.15+). Snapshots are not copied.
    pub async fn clone_instance(&self, source: &str, destination: &str) -> Result<(), Error> {
        if !self.version.has_clone() {
            return Err(Error::Unsupported(format!("clone needs multipassd 1.15+, this is {}", self.version)));
        }
        if destination.is_empty() {
            return Err(Error::InvalidArgument("clone needs a destination name".into()));
        }
        let req = pb::CloneRequest {
            source_name: source.to_string(),
            destination_name: Some(destination.to_string()),
            verbosity_level: 0,
        };
        self.bidi("clone", req, |mut c, s| async move { RpcClient::clone(&mut c, s).await }, |_| None).await?;
        Ok(())
    }

    /// SSH endpoint of a running instance.
    pub async fn ssh_info(&self, instance: &str) -> Result<SshEndpoint, Error> {
        let req = pb::SshInfoRequest { instance_name: vec![instance.to_string()], verbosity_level: 0 };
        let r = self.bidi("ssh_info", req, |mut c, s| async move { c.ssh_info(s).await }, |_| None).await?;
        let mut map = Self::need("ssh_info", r)?.ssh_info;
        let info = map
            .remove(instance)
            .ok_or_else(|| Error::Protocol { op: "ssh_info", detail: format!("no entry for {instance}") })?;
        let port = u16::try_from(info.port)
            .map_err(|_| Error::Protocol { op: "ssh_info", detail: format!("bad port {}", info.port) })?;
        Ok(SshEndpoint { host: info.host, port, username: info.username, private_key: info.priv_key_base64 })
    }

    /// Reads a daemon setting.
    pub async fn get(&self, key: &str) -> Result<String, Error> {
        let req = pb::GetRequest { key: key.to_string(), verbosity_level: 0 };
        let r = self.bidi("get", req, |mut c, s| async move { c.get(s).await }, |_| None).await?;
        Ok(r.map(|r| r.value).unwrap_or_default())
    }

    /// Writes a setting. For a daemon setting multipassd exits after replying and is restarted
    /// by its service manager: expect UNAVAILABLE for a while afterwards (see
    /// [`Client::wait_ready`]). Per-instance sizes (`local.<vm>.cpus|memory|disk`, stopped
    /// instances only) do not restart it (reference §0.4).
    pub async fn set(&self, key: &str, value: &str) -> Result<(), Error> {
        let req =
            pb::SetRequest { key: key.to_string(), val: value.to_string(), verbosity_level: 0, authorized: false };
        self.bidi(
            "set",
            req,
            |mut c, s| async move { c.set(s).await },
            |r: &pb::SetReply| {
                // Never authorise bridging implicitly: decline, and the daemon fails the call.
                r.needs_authorization.then(|| pb::SetRequest { authorized: false, ..Default::default() })
            },
        )
        .await?;
        Ok(())
    }

    /// Host resources (1.15+).
    pub async fn daemon_info(&self) -> Result<DaemonInfo, Error> {
        let r = self
            .bidi(
                "daemon_info",
                pb::DaemonInfoRequest::default(),
                |mut c, s| async move { c.daemon_info(s).await },
                |_| None,
            )
            .await?;
        let r = Self::need("daemon_info", r)?;
        Ok(DaemonInfo { available_space: r.available_space, cpus: r.cpus, memory: r.memory })
    }

    /// Waits until the daemon answers `ping` again (after `set`, or a daemon restart), retrying
    /// with exponential backoff (100 ms doubling to 2 s) until `deadline` has passed.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<(), Error> {
        let until = tokio::time::Instant::now() + deadline;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_unavailable() && tokio::time::Instant::now() + backoff < until => {
                    tracing::debug!("multipassd not ready: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The wire state as mpool's own enum.
pub fn state_of(s: pb::instance_status::Status) -> InstanceState {
    use pb::instance_status::Status as W;
    match s {
        W::Unknown => InstanceState::Unknown,
        W::Running => InstanceState::Running,
        W::Starting => InstanceState::Starting,
        W::Restarting => InstanceState::Restarting,
        W::Stopped => InstanceState::Stopped,
        W::Deleted => InstanceState::Deleted,
        W::DelayedShutdown => InstanceState::DelayedShutdown,
        W::Suspending => InstanceState::Suspending,
        W::Suspended => InstanceState::Suspended,
    }
}

fn status_of(s: Option<&pb::InstanceStatus>) -> InstanceState {
    s.and_then(|s| pb::instance_status::Status::try_from(s.status).ok()).map(state_of).unwrap_or(InstanceState::Unknown)
}

/// Opens the HTTP/2 channel: TLS (server name `localhost` on a Unix socket, the host on TCP)
/// over our own connector, so the authority is never derived from a socket path. tonic redials
/// through the same connector when the daemon restarts.
async fn channel(
    address: &DaemonAddress,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    trust_failures: &trust::TrustFailureSlot,
) -> Result<Channel, Error> {
    let server_name = ServerName::try_from(address.server_name().to_string())
        .map_err(|e| Error::Tls(format!("server name {:?}: {e}", address.server_name())))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let addr = address.clone();
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(connect_timeout);
    let svc = tower::service_fn(move |_: Uri| {
        let (connector, server_name, addr) = (connector.clone(), server_name.clone(), addr.clone());
        async move {
            super::startup::mark("socket-connect");
            let tls = match &addr {
                DaemonAddress::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    super::startup::mark("socket-connected");
                    let t = tokio_rustls::TlsStream::from(connector.connect(server_name, s).await?).into_boxed();
                    super::startup::mark("tls-handshake-done");
                    t
                }
                DaemonAddress::Tcp { host, port } => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    tokio_rustls::TlsStream::from(connector.connect(server_name, s).await?).into_boxed()
                }
            };
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    tokio::time::timeout(connect_timeout, endpoint.connect_with_connector(svc))
        .await
        .map_err(|_| Error::Unavailable {
            address: address.to_string(),
            detail: format!(
                "no connection within {connect_timeout:?}. Is multipassd running (`snap services multipass`), or frozen?"
            ),
        })?
        .map_err(|e| connect_error(address, &e, trust_failures))
}

/// Why the channel could not be opened: a certificate that did not verify is a trust problem
/// (which certificate, checked against what, and the fix); anything else names the errno.
fn connect_error(
    address: &DaemonAddress,
    e: &(dyn std::error::Error + 'static),
    trust_failures: &trust::TrustFailureSlot,
) -> Error {
    use super::reach::{self, Server};
    let recorded = trust_failures.lock().ok().and_then(|s| s.clone());
    let cert_failed = reach::tls_cause(e).is_some_and(reach::is_certificate_failure);
    if let Some(what) = recorded.filter(|_| cert_failed) {
        return Error::ServerNotTrusted {
            address: address.to_string(),
            detail: format!(
                "{what}. Point mpool at the daemon's own multipass_root_cert.pem (`--root-cert` / \
                 `[daemon] root_cert`; on a snap install /var/snap/multipass/common/data/multipassd/\
                 multipass_root_cert.pem), or pin its certificate (`--pin-cert` / `[daemon] pin_cert`)"
            ),
        };
    }
    let detail = match reach::io_cause(e) {
        Some(_) if let Some(t) = reach::tls_cause(e) => {
            format!("the TLS handshake failed ({t}). Is this multipassd's socket, and a Multipass 1.13-1.16 daemon?")
        }
        Some(io) => reach::describe_io(Server::Multipassd, io),
        None => {
            format!("{}. Is multipassd running (`snap services multipass`), and is the address right?", source_chain(e))
        }
    };
    Error::Unavailable { address: address.to_string(), detail }
}

/// The error and its sources on one line (tonic's transport errors hide the cause).
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Boxed TLS streams over either transport.
trait IntoBoxed {
    fn into_boxed(self) -> BoxedIo;
}

/// A TLS stream over a Unix or TCP socket.
type BoxedIo = std::pin::Pin<Box<dyn AsyncIo>>;

/// Read + write + Send, for the boxed stream.
trait AsyncIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send> AsyncIo for T {}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> IntoBoxed
    for tokio_rustls::TlsStream<S>
{
    fn into_boxed(self) -> BoxedIo {
        Box::pin(self)
    }
}
