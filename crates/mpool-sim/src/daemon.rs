//! The simulated daemon: instances and their files, the daemon-wide "main thread" lock, the
//! timing profile, persistence, SSH endpoints and fault injection. Each RPC handler lives here as
//! a method; `service.rs` only adapts them to tonic.
//!
//! Locking: `main` (a fair tokio mutex) models multipassd's Qt main thread: every call's
//! synchronous part runs under it; stop, suspend, snapshot, restore, clone and delete hold it for
//! their whole simulated duration; launch, start and restart let go of it while they wait for
//! the guest. `state` is a short std mutex never held across an await.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Code, Status, Streaming};

use super::images;
use super::instance_settings;
use super::rules::{self, Refusal, StartPlan, StopPlan, VmState};
use super::server::OwnedSocket;
use super::ssh::{SshKeys, SshServer};
use super::trust::TrustStore;
use super::{EventKind, Exit, FailMode, SimConfig, SimEvent};
use mpool_multipass::proto::multipass as pb;

/// The timing profile of real Multipass (qemu on Linux), before `--time-scale`.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// Image download and preparation in launch (off the main thread).
    pub prepare: Duration,
    /// Boot until SSH answers (off the main thread).
    pub boot: Duration,
    /// Resume from suspended until SSH answers (off the main thread).
    pub resume: Duration,
    /// The post-resume clock sync over SSH (ON the main thread).
    pub clock_sync: Duration,
    /// Graceful stop.
    pub stop: Duration,
    /// Forced stop.
    pub force_stop: Duration,
    /// Suspend (savevm).
    pub suspend: Duration,
    /// Snapshot.
    pub snapshot: Duration,
    /// Restore.
    pub restore: Duration,
    /// Clone (disk copy).
    pub clone: Duration,
    /// Delete.
    pub delete: Duration,
    /// A per-instance setting (`local.<vm>.cpus|memory|disk`) on a stopped instance.
    pub instance_setting: Duration,
    /// `info` with runtime information: commands over SSH in one guest (ON the main thread).
    pub runtime_info: Duration,
    /// `list` with IPv4: one guest's addresses over SSH (ON the main thread).
    pub ip_query: Duration,
}

impl Default for Profile {
    fn default() -> Profile {
        let s = Duration::from_secs;
        Profile {
            prepare: s(20),
            boot: s(20),
            resume: s(3),
            clock_sync: s(1),
            stop: s(6),
            force_stop: s(1),
            suspend: s(3),
            snapshot: s(1),
            restore: s(1),
            clone: s(8),
            delete: Duration::from_millis(300),
            instance_setting: Duration::from_millis(40),
            runtime_info: Duration::from_millis(300),
            ip_query: Duration::from_millis(100),
        }
    }
}

/// A snapshot's metadata (its files live in `<instance>/snapshots/<name>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SnapshotMeta {
    name: String,
    parent: String,
    comment: String,
    created: u64,
    /// The instance's CPUs, memory and disk when it was taken: a restore brings them back
    /// (None in state files of older simulators).
    #[serde(default)]
    sizes: Option<SnapshotSizes>,
}

/// An instance's sizes as a snapshot records them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SnapshotSizes {
    cpus: i32,
    memory: String,
    disk: String,
}

/// One instance as persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Instance {
    name: String,
    state: VmState,
    deleted: bool,
    image: String,
    cpus: i32,
    memory: String,
    disk: String,
    cloud_init: String,
    snapshots: Vec<SnapshotMeta>,
    snapshot_count: u32,
    clone_count: u32,
    current_snapshot: String,
    created: u64,
    /// The remote the image came from (`release`, `daily`; empty when none was named).
    #[serde(default)]
    remote: String,
    /// The release text `list` and `info` report (None in state files of older simulators).
    #[serde(default)]
    release: Option<String>,
    /// The SSH port of the instance's last endpoint: a restarted daemon never hands it out
    /// again (multipassd's instances come back on new ports).
    #[serde(default)]
    last_ssh_port: u16,
}

/// What survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    instances: BTreeMap<String, Instance>,
    passphrase: Option<String>,
}

/// Which instances a selection accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selection {
    /// Existing ones, deleted or not (info, delete, recover).
    Existing,
    /// Existing and not deleted (stop, suspend, restart, ssh_info).
    Operative,
}

/// A reply type that can carry a log line alone, as multipassd writes its log into every call
/// in flight.
pub trait LogReply: Sized {
    /// A reply carrying only `line`.
    fn log_only(line: String) -> Self;
}

macro_rules! log_replies {
    ($($t:ty),* $(,)?) => { $(impl LogReply for $t {
        fn log_only(line: String) -> Self {
            let mut reply = <$t>::default();
            reply.log_line = line;
            reply
        }
    })* };
}

log_replies!(
    pb::LaunchReply,
    pb::PurgeReply,
    pb::FindReply,
    pb::InfoReply,
    pb::ListReply,
    pb::NetworksReply,
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
    pb::MountReply,
    pb::UmountReply,
);

/// A log line as multipassd forwards it: `[timestamp] [level] [category] message`.
fn log_line(op: &str, what: &str) -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("[{}.{:03}] [debug] [daemon] {op}: {what}\n", t.as_secs(), t.subsec_millis())
}

/// The reply side of a call: sends replies, interleaving log-only ones when asked, and records
/// each in the event log.
pub struct Replier<Rep> {
    tx: mpsc::Sender<Result<Rep, Status>>,
    op: &'static str,
    /// Interleave log-only replies (see [`Daemon::set_log_lines`]).
    log_lines: bool,
    events: broadcast::Sender<SimEvent>,
    /// True once the daemon wedged: nothing is sent any more.
    wedged: watch::Receiver<bool>,
    /// True once the simulator is shut down (a wedged call may end then).
    shut: watch::Receiver<bool>,
}

impl<Rep: LogReply> Replier<Rep> {
    /// A replier for `op` of `daemon`'s calls, writing to `tx`.
    pub fn new(tx: mpsc::Sender<Result<Rep, Status>>, op: &'static str, daemon: &Daemon) -> Replier<Rep> {
        Replier {
            tx,
            op,
            log_lines: daemon.log_lines(),
            events: daemon.events.clone(),
            wedged: daemon.wedged.subscribe(),
            shut: daemon.shut.subscribe(),
        }
    }

    fn emit(&self, kind: EventKind) {
        let _ = self.events.send(SimEvent { op: self.op, instance: String::new(), kind });
    }

    /// A wedged daemon answers nothing: wait (until the simulator is shut down).
    async fn hold_if_wedged(&self) {
        if *self.wedged.borrow() {
            let mut shut = self.shut.clone();
            let _ = shut.wait_for(|s| *s).await;
        }
    }

    /// Sends a log-only reply if log lines are on (a gone client is ignored).
    pub async fn log(&self, what: &str) {
        if self.log_lines {
            self.log_anyway(what).await;
        }
    }

    /// Sends a log-only reply, log lines on or not.
    pub async fn log_anyway(&self, what: &str) {
        self.hold_if_wedged().await;
        let _ = self.tx.send(Ok(Rep::log_only(log_line(self.op, what)))).await;
        self.emit(EventKind::LogLine);
    }

    /// Sends a reply, preceded by a log-only one if log lines are on.
    pub async fn reply(&self, rep: Rep) {
        self.log("about to reply").await;
        self.hold_if_wedged().await;
        let _ = self.tx.send(Ok(rep)).await;
        self.emit(EventKind::Replied);
    }

    /// Ends the call with an error status.
    pub async fn fail(&self, status: Status) {
        self.hold_if_wedged().await;
        let _ = self.tx.send(Err(status)).await;
    }
}

impl<Rep> Clone for Replier<Rep> {
    fn clone(&self) -> Self {
        Replier {
            tx: self.tx.clone(),
            op: self.op,
            log_lines: self.log_lines,
            events: self.events.clone(),
            wedged: self.wedged.clone(),
            shut: self.shut.clone(),
        }
    }
}

/// One call in progress: its replier and the rest of its request stream (for prompts).
pub struct Call<Req, Rep> {
    out: Replier<Rep>,
    rx: Streaming<Req>,
}

impl<Req, Rep: LogReply> Call<Req, Rep> {
    /// Wraps a call.
    pub fn new(out: Replier<Rep>, rx: Streaming<Req>) -> Call<Req, Rep> {
        Call { out, rx }
    }

    /// Sends a log-only reply if log lines are on.
    pub async fn log(&self, what: &str) {
        self.out.log(what).await;
    }

    /// Sends a reply (a gone client is ignored, as the daemon carries on).
    async fn send(&self, rep: Rep) {
        self.out.reply(rep).await;
    }

    /// Sends a prompt and reads the answer. A client that half-closed cannot answer.
    async fn prompt(&mut self, rep: Rep) -> Result<Req, Status> {
        self.send(rep).await;
        match self.rx.message().await {
            Ok(Some(req)) => Ok(req),
            _ => Err(Status::internal("Cannot get confirmation from client. Aborting...")),
        }
    }
}

/// The simulated daemon.
pub struct Daemon {
    pub(super) cfg: SimConfig,
    main: tokio::sync::Mutex<()>,
    state: Mutex<Persisted>,
    preparing: Mutex<HashSet<String>>,
    endpoints: Mutex<HashMap<String, Arc<SshServer>>>,
    changed: watch::Sender<u64>,
    hangs: Mutex<HashMap<String, watch::Sender<bool>>>,
    fail_rate: Mutex<f64>,
    time_scale: Mutex<f64>,
    log_lines: std::sync::atomic::AtomicBool,
    pub(super) keys: Arc<SshKeys>,
    pub(super) trust: TrustStore,
    events: broadcast::Sender<SimEvent>,
    /// Set when the daemon ends by itself: a `set` (exit 42 once the reply is out) or an
    /// abort mid-call.
    exit: watch::Sender<Option<Exit>>,
    /// Turns true to cut every client connection at once (abort, kill).
    kill: watch::Sender<bool>,
    /// Turns true when the daemon wedged: socket gone, process alive, nothing answers.
    wedged: watch::Sender<bool>,
    /// Turns true when the simulator is shut down (releases calls left hanging).
    shut: watch::Sender<bool>,
    /// The socket file this daemon's server bound.
    socket: std::sync::OnceLock<OwnedSocket>,
    /// A `set` with other calls in flight: wedge once it has ended (the count of the others).
    pending_wedge: Mutex<Option<usize>>,
    /// Operations whose next call aborts the daemon (in-process fault injection).
    abort_next: Mutex<HashMap<String, u32>>,
    /// Calls between their first request and their end.
    in_flight: AtomicUsize,
    /// The most calls ever in flight at once.
    max_in_flight: AtomicUsize,
    profile: Profile,
}

/// A call counted in flight until dropped.
pub(super) struct InFlight<'a>(&'a Daemon);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn timestamp(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs as i64, nanos: 0 }
}

/// The fault-injection name of the wait for a guest to come up during `op`, off the daemon's
/// main thread: `boot` for a client's `start` (so `--hang boot` holds a start in Starting
/// without freezing the daemon, as a guest that never answers does), `autostart` for the
/// instances a restarted daemon brings back.
fn guest_wait(op: &'static str) -> &'static str {
    if op == "start" { "boot" } else { op }
}

/// Normalises an operation name for fault injection (`delet` and `delete` are the same).
pub fn op_name(op: &str) -> String {
    match op.trim().to_ascii_lowercase().as_str() {
        "delet" => "delete".into(),
        "ssh-info" => "ssh_info".into(),
        other => other.into(),
    }
}

const MUTATING: &[&str] = &[
    "launch", "create", "start", "stop", "suspend", "restart", "delete", "purge", "recover", "snapshot", "restore",
    "clone",
];

impl Daemon {
    /// Loads persisted state and key material from the state dir.
    pub fn load(cfg: SimConfig, keys: Arc<SshKeys>, trust: TrustStore) -> Result<Daemon, String> {
        let path = cfg.state_dir.join("state.json");
        let state: Persisted = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            Persisted::default()
        };
        let hangs = cfg.hang_ops.iter().map(|op| (op_name(op), watch::channel(true).0)).collect();
        let fail_rate = cfg.fail_rate;
        Ok(Daemon {
            main: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
            preparing: Mutex::new(HashSet::new()),
            endpoints: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            hangs: Mutex::new(hangs),
            fail_rate: Mutex::new(fail_rate),
            time_scale: Mutex::new(cfg.time_scale),
            log_lines: std::sync::atomic::AtomicBool::new(cfg.log_lines),
            keys,
            trust,
            events: broadcast::channel(4096).0,
            exit: watch::channel(None).0,
            kill: watch::channel(false).0,
            wedged: watch::channel(false).0,
            shut: watch::channel(false).0,
            socket: std::sync::OnceLock::new(),
            pending_wedge: Mutex::new(None),
            abort_next: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            profile: Profile::default(),
            cfg,
        })
    }

    /// The simulator's config (to start another on the same state, as a daemon restart).
    pub fn cfg_clone(&self) -> SimConfig {
        self.cfg.clone()
    }

    /// Subscribes to the event log.
    pub fn events(&self) -> broadcast::Receiver<SimEvent> {
        self.events.subscribe()
    }

    /// Counts a call in flight until the guard is dropped.
    pub(super) fn call_started(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    /// Calls in flight now (between their first request and their end; `ping` not counted).
    pub fn calls_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls that were ever in flight at once.
    pub fn max_calls_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Makes the next `times` calls of `op` abort the daemon mid-call, as multipassd's
    /// `proto_buffer_writer` assertion does (reference §0.3): the connection drops, the
    /// simulator stops serving and [`crate::Simulator::exited`] returns
    /// [`Exit::Aborted`]. Its socket file is left behind, as a dead process leaves it.
    pub fn abort_next(&self, op: &str, times: u32) {
        if let Ok(mut a) = self.abort_next.lock() {
            a.insert(op_name(op), times);
        }
    }

    /// Whether this call of `op` aborts the daemon: [`Daemon::abort_next`], or `--fail OP` /
    /// `--fail-rate P` in [`FailMode::Abort`].
    pub(super) fn aborts(&self, op: &'static str) -> bool {
        if let Ok(mut a) = self.abort_next.lock()
            && let Some(n) = a.get_mut(op)
            && *n > 0
        {
            *n -= 1;
            return true;
        }
        if self.cfg.fail_mode != FailMode::Abort {
            return false;
        }
        if self.cfg.fail_ops.iter().any(|f| op_name(f) == op) {
            return true;
        }
        let rate = self.fail_rate.lock().map(|r| *r).unwrap_or(0.0);
        rate > 0.0 && MUTATING.contains(&op) && rand::random::<f64>() < rate
    }

    /// Dies mid-call: cuts every connection, stops serving, drops the running instances'
    /// SSH endpoints and processes (the VMs die with the daemon), and ends with
    /// [`Exit::Aborted`]. No clean-shutdown record is written.
    pub(super) async fn abort(&self, op: &'static str) {
        tracing::warn!(op, "simulating multipassd's abort mid-call (proto_buffer_writer.h assertion)");
        self.emit(op, "", EventKind::Aborted);
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(Exit::Aborted);
                true
            } else {
                false
            }
        });
        self.kill.send_replace(true);
        self.close_all_endpoints().await;
    }

    /// Cuts every client connection (the daemon process died).
    pub(super) fn kill_connections(&self) {
        self.kill.send_replace(true);
    }

    /// Follows [`Daemon::kill_connections`].
    pub(super) fn connection_kill_switch(&self) -> watch::Receiver<bool> {
        self.kill.subscribe()
    }

    /// Whether the daemon aborted.
    pub(super) fn aborted(&self) -> bool {
        *self.exit.borrow() == Some(Exit::Aborted)
    }

    /// Resolves once the daemon stopped serving by itself (aborted or wedged).
    pub(super) async fn stopped_serving(&self) {
        let mut exit = self.exit.subscribe();
        let mut wedged = self.wedged.subscribe();
        tokio::select! {
            _ = exit.wait_for(|e| *e == Some(Exit::Aborted)) => {}
            _ = wedged.wait_for(|w| *w) => {}
        }
    }

    /// Resolves when the daemon ends by itself (never for a wedge).
    pub(super) async fn exited(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.unwrap_or(Exit::Shutdown),
            Err(_) => Exit::Shutdown,
        }
    }

    /// Why the daemon ended by itself, if it did ([`Exit::SettingsChanged`], [`Exit::Aborted`]).
    pub fn exit_reason(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Whether the daemon wedged (see [`SimConfig::set_wedges_if_busy`]).
    pub fn is_wedged(&self) -> bool {
        *self.wedged.borrow()
    }

    /// Records the socket file the server bound.
    pub(super) fn set_socket(&self, socket: OwnedSocket) {
        let _ = self.socket.set(socket);
    }

    /// The socket file the server bound.
    pub(super) fn owned_socket(&self) -> Option<&OwnedSocket> {
        self.socket.get()
    }

    /// Marks the simulator shut down (calls left hanging by a wedge end).
    pub(super) fn mark_shut(&self) {
        self.shut.send_replace(true);
    }

    /// Resolves once the simulator is shut down.
    pub(super) async fn shut_down(&self) {
        let mut rx = self.shut.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub(super) fn emit(&self, op: &'static str, instance: &str, kind: EventKind) {
        let _ = self.events.send(SimEvent { op, instance: instance.to_string(), kind });
    }

    /// Makes `op` hang (true) or lets hung calls of it go on (false).
    pub fn set_hang(&self, op: &str, hang: bool) {
        if let Ok(mut h) = self.hangs.lock() {
            h.entry(op_name(op)).or_insert_with(|| watch::channel(false).0).send_replace(hang);
        }
    }

    /// Changes the time scale (tests provision fast, then slow the daemon down).
    pub fn set_time_scale(&self, scale: f64) {
        if let Ok(mut s) = self.time_scale.lock() {
            *s = scale;
        }
    }

    /// Interleaves replies carrying only a log line before, between and after the replies of
    /// every call (on), as multipassd's logger does; off by default, tests turn it on.
    pub fn set_log_lines(&self, on: bool) {
        self.log_lines.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether log-only replies are interleaved.
    pub fn log_lines(&self) -> bool {
        self.log_lines.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes the random failure rate of mutating calls.
    pub fn set_fail_rate(&self, p: f64) {
        if let Ok(mut r) = self.fail_rate.lock() {
            *r = p;
        }
    }

    fn st(&self) -> Result<MutexGuard<'_, Persisted>, Status> {
        self.state.lock().map_err(|_| Status::internal("simulator state lock poisoned"))
    }

    /// Writes state.json (atomically). Called after every change.
    fn save(&self) -> Result<(), Status> {
        let text = {
            let st = self.st()?;
            serde_json::to_vec_pretty(&*st).map_err(|e| Status::internal(e.to_string()))?
        };
        mpool_tls::write_with_mode(&self.cfg.state_dir.join("state.json"), &text, 0o600)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    fn set_state(&self, name: &str, state: VmState) -> Result<(), Status> {
        if let Some(i) = self.st()?.instances.get_mut(name) {
            i.state = state;
        }
        self.save()
    }

    fn instance(&self, name: &str) -> Result<Instance, Status> {
        self.st()?.instances.get(name).cloned().ok_or_else(|| Refusal::missing(name).into())
    }

    /// An operative (existing, not deleted) instance.
    fn operative(&self, name: &str) -> Result<Instance, Status> {
        let i = self.instance(name)?;
        if i.deleted {
            return Err(Refusal::deleted(name).into());
        }
        Ok(i)
    }

    /// multipassd's `select_instances_and_react`: every named instance must exist (and with
    /// [`Selection::Operative`] not be deleted). All problems are reported at once, as "The
    /// following errors occurred:" and one line each; the code is the last kind's (missing
    /// instances are NOT_FOUND, deleted ones INVALID_ARGUMENT).
    fn select(&self, names: &[String], how: Selection) -> Result<(), Status> {
        let (mut deleted, mut missing) = (Vec::new(), Vec::new());
        {
            let st = self.st()?;
            for n in names {
                match st.instances.get(n) {
                    None => missing.push(Refusal::missing(n)),
                    Some(i) if i.deleted && how == Selection::Operative => deleted.push(Refusal::deleted(n)),
                    Some(_) => {}
                }
            }
        }
        let all: Vec<Refusal> = deleted.into_iter().chain(missing).collect();
        match all.last() {
            None => Ok(()),
            Some(last) => {
                let lines: Vec<&str> = all.iter().map(|r| r.message.as_str()).collect();
                Err(Status::new(last.code, format!("The following errors occurred:\n{}", lines.join("\n"))))
            }
        }
    }

    /// An instance's files, where multipassd keeps them under its data directory
    /// (`vault/instances/<name>`): here its guest files (`root`) and snapshots, so their size on
    /// disk stands for the instance's image.
    fn dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(mpool_core::host::INSTANCES_SUBDIR).join(name)
    }

    /// The directory a running instance's commands run in (its `/home/ubuntu`).
    pub fn root(&self, name: &str) -> PathBuf {
        self.dir(name).join("root")
    }

    fn snapshot_dir(&self, name: &str, snapshot: &str) -> PathBuf {
        self.dir(name).join("snapshots").join(snapshot)
    }

    /// All operative instance names (for the "empty list means all" rule).
    fn all_names(&self, include_deleted: bool) -> Result<Vec<String>, Status> {
        Ok(self.st()?.instances.values().filter(|i| include_deleted || !i.deleted).map(|i| i.name.clone()).collect())
    }

    /// Takes the main-thread lock, recording whether the call had to wait for it.
    pub(super) async fn main_thread(&self, op: &'static str, instance: &str) -> tokio::sync::MutexGuard<'_, ()> {
        match self.main.try_lock() {
            Ok(g) => {
                self.emit(op, instance, EventKind::LockAcquired);
                g
            }
            Err(_) => {
                self.emit(op, instance, EventKind::LockWaiting);
                let g = self.main.lock().await;
                self.emit(op, instance, EventKind::LockAcquired);
                g
            }
        }
    }

    /// Simulated work: waits while `op` is hung, then sleeps `base` times the time scale.
    async fn work(&self, op: &'static str, instance: &str, base: Duration) {
        let hang = self.hangs.lock().ok().and_then(|h| h.get(op).map(|s| s.subscribe()));
        if let Some(mut rx) = hang
            && *rx.borrow()
        {
            self.emit(op, instance, EventKind::Hung);
            let _ = rx.wait_for(|h| !*h).await;
        }
        let scale = self.time_scale.lock().map(|s| *s).unwrap_or(0.0);
        let d = base.mul_f64(scale.max(0.0));
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Fault injection: `--fail OP` always, `--fail-rate P` at random for mutating calls.
    fn maybe_fail(&self, op: &'static str) -> Result<(), Status> {
        if self.cfg.fail_mode == FailMode::Abort {
            // Decided when the call arrived (see `aborts`).
            return Ok(());
        }
        if self.cfg.fail_ops.iter().any(|f| op_name(f) == op) {
            return Err(Status::internal(format!("simulated failure of {op} (--fail {op})")));
        }
        let rate = self.fail_rate.lock().map(|r| *r).unwrap_or(0.0);
        if rate > 0.0 && MUTATING.contains(&op) && rand::random::<f64>() < rate {
            return Err(Status::internal(format!("simulated failure of {op} (--fail-rate {rate})")));
        }
        Ok(())
    }

    /// Where an instance keeps its SSH host key (made at its first boot; a cold boot after
    /// the daemon was killed makes a new one).
    fn host_key_path(&self, name: &str) -> PathBuf {
        self.dir(name).join("ssh_host_ed25519_key")
    }

    /// Opens the instance's SSH endpoint: its own host key, and a port it never had before
    /// (a restarted multipassd's instances come back on new ports).
    async fn open_endpoint(&self, name: &str) -> Result<(), Status> {
        if self.cfg.ssh_target.is_some() {
            return Ok(());
        }
        let err = |e: std::io::Error| Status::internal(format!("cannot open the SSH endpoint of {name}: {e}"));
        let key_path = self.host_key_path(name);
        tokio::fs::create_dir_all(self.dir(name)).await.map_err(err)?;
        let host_key = tokio::task::spawn_blocking(move || super::ssh::instance_host_key(&key_path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(err)?;
        let last = self.st()?.instances.get(name).map(|i| i.last_ssh_port).unwrap_or(0);
        let root = self.root(name);
        let mut ep =
            SshServer::start_with_host_key(root.clone(), self.keys.clone(), host_key.clone(), 0).await.map_err(err)?;
        if ep.port() == last {
            // The kernel handed back the old port: take another while holding this one.
            let other = SshServer::start_with_host_key(root, self.keys.clone(), host_key, 0).await.map_err(err)?;
            ep.shutdown().await;
            ep = other;
        }
        let port = ep.port();
        let old = self.endpoints.lock().ok().and_then(|mut m| m.insert(name.to_string(), Arc::new(ep)));
        if let Some(old) = old {
            old.shutdown().await;
        }
        if let Some(i) = self.st()?.instances.get_mut(name) {
            i.last_ssh_port = port;
        }
        self.save()
    }

    async fn close_endpoint(&self, name: &str) {
        let ep = self.endpoints.lock().ok().and_then(|mut m| m.remove(name));
        if let Some(ep) = ep {
            ep.shutdown().await;
        }
    }

    /// The SSH endpoint of a running instance (tests read its connection count).
    pub fn endpoint(&self, name: &str) -> Option<Arc<SshServer>> {
        self.endpoints.lock().ok().and_then(|m| m.get(name).cloned())
    }

    /// Closes every SSH endpoint (simulator shutdown).
    pub async fn close_all_endpoints(&self) {
        let all: Vec<_> = self.endpoints.lock().map(|mut m| m.drain().map(|(_, e)| e).collect()).unwrap_or_default();
        for ep in all {
            ep.shutdown().await;
        }
    }

    /// Like multipassd after a restart: resumes instances that were running or suspended.
    pub async fn resume_after_restart(self: &Arc<Self>, killed: bool) {
        let plans: Vec<(String, StartPlan, bool)> = match self.st() {
            Ok(mut st) => st
                .instances
                .values_mut()
                .filter(|i| !i.deleted && i.state != VmState::Stopped)
                .map(|i| {
                    // A suspended instance resumes from its suspend image, unless the daemon
                    // was killed: then the image is lost and it boots cold. Whatever else was
                    // running or in flight boots.
                    let suspended = matches!(i.state, VmState::Suspended | VmState::Suspending);
                    let plan = if suspended && !killed { StartPlan::Resume } else { StartPlan::Boot };
                    i.state = VmState::Starting;
                    (i.name.clone(), plan, suspended)
                })
                .collect(),
            Err(_) => return,
        };
        if plans.is_empty() {
            return;
        }
        for (name, plan, suspended) in &plans {
            if *suspended && *plan == StartPlan::Boot {
                // A suspended guest booted cold makes new SSH host keys (reference §0.3).
                let _ = std::fs::remove_file(self.host_key_path(name));
            }
        }
        let _ = self.save();
        for (name, plan, _) in plans {
            match self.run_start("autostart", &name, plan).await {
                Ok(()) => self.emit("autostart", &name, EventKind::Done),
                Err(e) => {
                    tracing::warn!(instance = %name, "auto-start after restart failed: {}", e.message());
                    self.emit("autostart", &name, EventKind::Failed(e.code()));
                }
            }
        }
    }

    // ---------------------------------------------------------------- RPC handlers

    /// version
    pub async fn version(
        &self,
        call: Call<pb::VersionRequest, pb::VersionReply>,
        _req: pb::VersionRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("version", "").await;
        self.work("version", "", Duration::ZERO).await;
        call.send(pb::VersionReply { version: self.cfg.daemon_version.clone(), ..Default::default() }).await;
        Ok(())
    }

    /// list
    pub async fn list(&self, call: Call<pb::ListRequest, pb::ListReply>, req: pb::ListRequest) -> Result<(), Status> {
        let _g = self.main_thread("list", "").await;
        self.work("list", "", Duration::ZERO).await;
        if req.request_ipv4 && !req.snapshots {
            // multipassd asks each running guest for its addresses, on its main thread.
            let running = self.st()?.instances.values().filter(|i| !i.deleted && i.state.is_up()).count();
            self.work("list", "", self.profile.ip_query * running as u32).await;
        }
        let contents = {
            let st = self.st()?;
            if req.snapshots {
                let snapshots = st
                    .instances
                    .values()
                    .filter(|i| !i.deleted)
                    .flat_map(|i| {
                        i.snapshots
                            .iter()
                            .map(|s| pb::ListVmSnapshot { name: i.name.clone(), fundamentals: Some(fundamentals(s)) })
                    })
                    .collect();
                pb::list_reply::ListContents::SnapshotList(pb::SnapshotsList { snapshots })
            } else {
                let instances = st
                    .instances
                    .values()
                    .map(|i| pb::ListVmInstance {
                        name: i.name.clone(),
                        instance_status: Some(status(i)),
                        ipv4: if req.request_ipv4 && i.state.is_up() && !i.deleted {
                            vec![GUEST_IPV4.into()]
                        } else {
                            vec![]
                        },
                        ipv6: vec![],
                        current_release: release_of(i),
                    })
                    .collect();
                pb::list_reply::ListContents::InstanceList(pb::InstancesList { instances })
            }
        };
        call.send(pb::ListReply { list_contents: Some(contents), ..Default::default() }).await;
        Ok(())
    }

    /// info
    pub async fn info(&self, call: Call<pb::InfoRequest, pb::InfoReply>, req: pb::InfoRequest) -> Result<(), Status> {
        let _g = self.main_thread("info", "").await;
        self.work("info", "", Duration::ZERO).await;
        let pairs = if req.instance_snapshot_pairs.is_empty() {
            self.all_names(true)?
                .into_iter()
                .map(|n| pb::InstanceSnapshotPair { instance_name: n, snapshot_name: None })
                .collect()
        } else {
            req.instance_snapshot_pairs
        };
        let names: Vec<String> = pairs.iter().map(|p| p.instance_name.clone()).collect();
        self.select(&names, Selection::Existing)?;
        let mut details = Vec::new();
        for pair in pairs {
            let i = self.instance(&pair.instance_name)?;
            // A snapshot's specs are its own; an instance's come from the guest (runtime
            // information), so without it the real daemon leaves them empty (reference §0.3).
            let specs = |extra| pb::DetailedInfoItem {
                name: i.name.clone(),
                instance_status: Some(status(&i)),
                memory_total: i.memory.clone(),
                disk_total: i.disk.clone(),
                cpu_count: i.cpus.to_string(),
                mount_info: Some(pb::MountInfo::default()),
                extra_info: Some(extra),
            };
            match pair.snapshot_name {
                Some(sn) => {
                    let s = i
                        .snapshots
                        .iter()
                        .find(|s| s.name == sn)
                        .ok_or_else(|| Status::from(rules::no_such_snapshot(&i.name, &sn)))?;
                    let children = i.snapshots.iter().filter(|c| c.parent == sn).map(|c| c.name.clone()).collect();
                    details.push(specs(pb::detailed_info_item::ExtraInfo::SnapshotInfo(pb::SnapshotDetails {
                        fundamentals: Some(fundamentals(s)),
                        size: String::new(),
                        children,
                    })));
                }
                None if req.snapshots => {
                    for s in &i.snapshots {
                        details.push(specs(pb::detailed_info_item::ExtraInfo::SnapshotInfo(pb::SnapshotDetails {
                            fundamentals: Some(fundamentals(s)),
                            size: String::new(),
                            children: vec![],
                        })));
                    }
                }
                None => {
                    let runtime = !req.no_runtime_information && i.state.is_up() && !i.deleted;
                    details.push(self.instance_details(&i, runtime).await?);
                }
            }
        }
        call.send(pb::InfoReply { details, snapshots: req.snapshots, ..Default::default() }).await;
        Ok(())
    }

    /// `info` of one instance. With `runtime` (asked for, and the instance runs) the daemon
    /// gathers CPUs, memory, disk, load and addresses over SSH in the guest, on its main thread
    /// (the caller holds it): here disk usage is the size of the instance's directory and memory
    /// is as configured. Without, those fields stay empty, as multipassd leaves them.
    async fn instance_details(&self, i: &Instance, runtime: bool) -> Result<pb::DetailedInfoItem, Status> {
        let mut item = pb::DetailedInfoItem {
            name: i.name.clone(),
            instance_status: Some(status(i)),
            mount_info: Some(pb::MountInfo::default()),
            ..Default::default()
        };
        let mut details = pb::InstanceDetails {
            image_release: release_of(i),
            num_snapshots: Some(i.snapshots.len() as i32),
            creation_timestamp: Some(timestamp(i.created)),
            id: image_id(&i.image),
            ..Default::default()
        };
        if runtime {
            self.work("info", &i.name, self.profile.runtime_info).await;
            let memory = rules::parse_size(&i.memory).unwrap_or(rules::DEFAULT_MEMORY);
            let root = self.root(&i.name);
            let used = tokio::task::spawn_blocking(move || tree_size(&root))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            item.cpu_count = i.cpus.to_string();
            item.memory_total = memory.to_string();
            item.disk_total = rules::parse_size(&i.disk).unwrap_or(rules::DEFAULT_DISK).to_string();
            details.memory_usage = (memory / 8).to_string();
            details.disk_usage = used.to_string();
            details.load = "0.00 0.00 0.00".into();
            details.ipv4 = vec![GUEST_IPV4.into()];
            details.current_release = release_of(i);
            details.uptime = "0 minutes".into();
            details.cpu_times = "cpu  0 0 0 0 0 0 0 0 0 0".into();
        }
        item.extra_info = Some(pb::detailed_info_item::ExtraInfo::InstanceInfo(details));
        Ok(item)
    }

    /// launch and create
    pub async fn launch(
        &self,
        call: Call<pb::LaunchRequest, pb::LaunchReply>,
        req: pb::LaunchRequest,
        start: bool,
    ) -> Result<(), Status> {
        let op = if start { "launch" } else { "create" };
        let name = if req.instance_name.is_empty() { pet_name() } else { req.instance_name.clone() };
        let servers = self.cfg.image_servers_reachable;
        let image = {
            let _g = self.main_thread(op, &name).await;
            self.work(op, &name, Duration::ZERO).await;
            // multipassd validates catalogue names first; local files and downloads are
            // fetched (and fail) once the instance is being prepared.
            let fetched_later = req.image.starts_with("file") || req.image.starts_with("http");
            let image = images::resolve(&req.image, &req.remote_name, servers);
            if let Err(refusal) = &image
                && !fetched_later
            {
                return Err(refusal.clone().into());
            }
            let mut errors = Vec::new();
            if !rules::valid_hostname(&name) {
                errors.push(pb::launch_error::ErrorCodes::InvalidHostname);
            }
            if !req.mem_size.is_empty() && rules::parse_size(&req.mem_size).is_none_or(|b| b < rules::MIN_MEMORY) {
                errors.push(pb::launch_error::ErrorCodes::InvalidMemSize);
            }
            if !req.disk_space.is_empty() && rules::parse_size(&req.disk_space).is_none_or(|b| b < rules::MIN_DISK) {
                errors.push(pb::launch_error::ErrorCodes::InvalidDiskSize);
            }
            if !errors.is_empty() {
                let le = pb::LaunchError { error_codes: errors.into_iter().map(|e| e as i32).collect() };
                return Err(Status::with_details(
                    Code::InvalidArgument,
                    "Invalid arguments supplied",
                    prost::Message::encode_to_vec(&le).into(),
                ));
            }
            if self.st()?.instances.contains_key(&name) {
                return Err(Refusal::exists(&name).into());
            }
            if !self.preparing.lock().map(|mut p| p.insert(name.clone())).unwrap_or(false) {
                return Err(Status::invalid_argument(format!("instance \"{name}\" is being prepared")));
            }
            image
        };
        let result = match image {
            Ok(image) => self.launch_body(&call, &req, &name, op, start, image).await,
            Err(refusal) => Err(refusal.into()),
        };
        if let Ok(mut p) = self.preparing.lock() {
            p.remove(&name);
        }
        result
    }

    async fn launch_body(
        &self,
        call: &Call<pb::LaunchRequest, pb::LaunchReply>,
        req: &pb::LaunchRequest,
        name: &str,
        op: &'static str,
        start: bool,
        image: images::Resolved,
    ) -> Result<(), Status> {
        use pb::launch_reply::CreateOneof;
        if let images::Resolved::Blueprint(_) = image {
            call.log("*** Warning! Blueprints are deprecated and will be removed in a future release. ***").await;
        }
        self.maybe_fail(op)?;
        let msg = |m: CreateOneof| pb::LaunchReply { create_oneof: Some(m), ..Default::default() };
        call.send(msg(CreateOneof::CreateMessage(format!("Creating {name}")))).await;
        for pct in ["0", "25", "50", "75", "100"] {
            call.send(msg(CreateOneof::LaunchProgress(pb::LaunchProgress {
                r#type: pb::launch_progress::ProgressTypes::Image as i32,
                percent_complete: pct.into(),
            })))
            .await;
            self.work(op, name, self.profile.prepare / 5).await;
        }
        call.send(msg(CreateOneof::CreateMessage(format!("Preparing image for {name}")))).await;
        let root = self.root(name);
        tokio::fs::create_dir_all(&root).await.map_err(|e| Status::internal(format!("{}: {e}", root.display())))?;
        {
            let _g = self.main_thread(op, name).await;
            let inst = Instance {
                name: name.to_string(),
                state: VmState::Stopped,
                deleted: false,
                image: if req.image.is_empty() { "default".into() } else { req.image.clone() },
                cpus: req.num_cores.max(1),
                memory: if req.mem_size.is_empty() { "1G".into() } else { req.mem_size.clone() },
                disk: if req.disk_space.is_empty() { "5G".into() } else { req.disk_space.clone() },
                cloud_init: req.cloud_init_user_data.clone(),
                snapshots: vec![],
                snapshot_count: 0,
                clone_count: 0,
                current_snapshot: String::new(),
                created: now(),
                remote: req.remote_name.clone(),
                release: Some(image.release_text()),
                last_ssh_port: 0,
            };
            self.st()?.instances.insert(name.to_string(), inst);
            self.save()?;
        }
        call.send(msg(CreateOneof::CreateMessage(format!("Configuring {name}")))).await;
        if !start {
            return Ok(());
        }
        call.send(msg(CreateOneof::CreateMessage(format!("Starting {name}")))).await;
        self.set_state(name, VmState::Starting)?;
        call.send(pb::LaunchReply {
            reply_message: "Waiting for initialization to complete".into(),
            ..Default::default()
        })
        .await;
        self.work(op, name, self.profile.boot).await;
        self.open_endpoint(name).await?;
        self.set_state(name, VmState::Running)?;
        call.send(msg(CreateOneof::VmInstanceName(name.to_string()))).await;
        Ok(())
    }

    /// Names from a request, or all operative instances when it named none.
    fn names_or_all(&self, names: Option<pb::InstanceNames>) -> Result<Vec<String>, Status> {
        match names {
            Some(n) if !n.instance_name.is_empty() => Ok(n.instance_name),
            _ => self.all_names(false),
        }
    }

    /// start
    pub async fn start(
        &self,
        call: Call<pb::StartRequest, pb::StartReply>,
        req: pb::StartRequest,
    ) -> Result<(), Status> {
        let names = self.names_or_all(req.instance_names)?;
        {
            let _g = self.main_thread("start", names.first().map_or("", |s| s)).await;
            self.work("start", "", Duration::ZERO).await;
            let mut missing = pb::StartError::default();
            for n in &names {
                match self.st()?.instances.get(n) {
                    None => {
                        missing.instance_errors.insert(n.clone(), pb::start_error::ErrorCode::DoesNotExist as i32);
                    }
                    Some(i) if i.deleted => {
                        missing.instance_errors.insert(n.clone(), pb::start_error::ErrorCode::InstanceDeleted as i32);
                    }
                    Some(_) => {}
                }
            }
            if !missing.instance_errors.is_empty() {
                return Err(Status::with_details(
                    Code::Aborted,
                    "instance(s) missing",
                    prost::Message::encode_to_vec(&missing).into(),
                ));
            }
            for n in &names {
                rules::start(n, self.instance(n)?.state)?;
            }
            self.maybe_fail("start")?;
        }
        for n in &names {
            self.start_one(n).await?;
        }
        call.send(pb::StartReply::default()).await;
        Ok(())
    }

    /// Starts or resumes one instance; the main-thread lock is taken only for the state change
    /// and for the post-resume clock sync.
    async fn start_one(&self, name: &str) -> Result<(), Status> {
        let plan = {
            let _g = self.main_thread("start", name).await;
            let plan = rules::start(name, self.operative(name)?.state)?;
            match plan {
                StartPlan::Boot | StartPlan::Resume => self.set_state(name, VmState::Starting)?,
                StartPlan::CancelShutdown => self.set_state(name, VmState::Running)?,
                StartPlan::Nothing | StartPlan::Join => {}
            }
            plan
        };
        self.run_start("start", name, plan).await
    }

    /// Boots or resumes an instance already marked Starting (or joins a start in progress).
    /// `op` names the work for events and fault injection (`start`, or `autostart` after a
    /// daemon restart).
    async fn run_start(&self, op: &'static str, name: &str, plan: StartPlan) -> Result<(), Status> {
        match plan {
            StartPlan::Boot => {
                self.emit(op, name, EventKind::Working);
                self.work(guest_wait(op), name, self.profile.boot).await;
                self.come_up(name).await
            }
            StartPlan::Resume => {
                self.emit(op, name, EventKind::Working);
                self.work(guest_wait(op), name, self.profile.resume).await;
                self.still_starting(name)?;
                self.open_endpoint(name).await?;
                // multipassd syncs the guest clock over SSH after a resume, on its main thread.
                let _g = self.main_thread(op, name).await;
                self.work(op, name, self.profile.clock_sync).await;
                self.still_starting(name)?;
                self.set_state(name, VmState::Running)
            }
            StartPlan::Join => {
                let mut rx = self.changed.subscribe();
                loop {
                    let s = self.operative(name)?.state;
                    if s.is_up() {
                        return Ok(());
                    }
                    if !matches!(s, VmState::Starting | VmState::Restarting) {
                        return Err(Status::failed_precondition(format!("instance {name} stopped while starting")));
                    }
                    let _ = rx.changed().await;
                }
            }
            StartPlan::Nothing | StartPlan::CancelShutdown => Ok(()),
        }
    }

    /// Refuses to finish a start that was overtaken (a forced stop or a delete meanwhile).
    fn still_starting(&self, name: &str) -> Result<(), Status> {
        match self.operative(name)?.state {
            VmState::Starting => Ok(()),
            _ => Err(Status::failed_precondition(format!("instance {name} stopped while starting"))),
        }
    }

    /// The guest answers over SSH: a new endpoint, Running.
    async fn come_up(&self, name: &str) -> Result<(), Status> {
        self.still_starting(name)?;
        self.open_endpoint(name).await?;
        self.set_state(name, VmState::Running)
    }

    /// stop
    pub async fn stop(&self, call: Call<pb::StopRequest, pb::StopReply>, req: pb::StopRequest) -> Result<(), Status> {
        let names = self.names_or_all(req.instance_names)?;
        let _g = self.main_thread("stop", names.first().map_or("", |s| s)).await;
        self.work("stop", "", Duration::ZERO).await;
        self.select(&names, Selection::Operative)?;
        let mut plans = Vec::new();
        for n in &names {
            let i = self.operative(n)?;
            if req.cancel_shutdown {
                if i.state == VmState::DelayedShutdown {
                    plans.push((n.clone(), None));
                }
                continue;
            }
            if req.time_minutes > 0 {
                if !i.state.is_up() {
                    return Err(Status::failed_precondition(format!(
                        "Cannot delay the shutdown of {n}: it is not running."
                    )));
                }
                plans.push((n.clone(), Some(StopPlan::Graceful)));
                continue;
            }
            plans.push((n.clone(), Some(rules::stop(n, i.state, req.force_stop)?)));
        }
        self.maybe_fail("stop")?;
        for (n, plan) in plans {
            match plan {
                None => self.set_state(&n, VmState::Running)?,
                Some(_) if req.time_minutes > 0 => self.set_state(&n, VmState::DelayedShutdown)?,
                Some(StopPlan::Nothing) => {}
                Some(p) => {
                    self.close_endpoint(&n).await;
                    let d = if p == StopPlan::Force { self.profile.force_stop } else { self.profile.stop };
                    self.work("stop", &n, d).await;
                    self.set_state(&n, VmState::Stopped)?;
                }
            }
        }
        call.send(pb::StopReply::default()).await;
        Ok(())
    }

    /// suspend
    pub async fn suspend(
        &self,
        call: Call<pb::SuspendRequest, pb::SuspendReply>,
        req: pb::SuspendRequest,
    ) -> Result<(), Status> {
        let names = self.names_or_all(req.instance_names)?;
        let _g = self.main_thread("suspend", names.first().map_or("", |s| s)).await;
        self.work("suspend", "", Duration::ZERO).await;
        self.select(&names, Selection::Operative)?;
        let mut todo = Vec::new();
        for n in &names {
            let i = self.operative(n)?;
            if rules::suspend(n, i.state)? {
                todo.push(n.clone());
            } else {
                call.send(pb::SuspendReply {
                    log_line: format!("[sim] Ignoring suspend issued while stopped/suspended: {n}\n"),
                })
                .await;
            }
        }
        self.maybe_fail("suspend")?;
        for n in todo {
            self.set_state(&n, VmState::Suspending)?;
            self.emit("suspend", &n, EventKind::Working);
            self.close_endpoint(&n).await;
            self.work("suspend", &n, self.profile.suspend).await;
            self.set_state(&n, VmState::Suspended)?;
        }
        Ok(())
    }

    /// restart
    pub async fn restart(
        &self,
        call: Call<pb::RestartRequest, pb::RestartReply>,
        req: pb::RestartRequest,
    ) -> Result<(), Status> {
        let names = self.names_or_all(req.instance_names)?;
        {
            let _g = self.main_thread("restart", names.first().map_or("", |s| s)).await;
            self.select(&names, Selection::Operative)?;
            for n in &names {
                rules::restart(n, self.operative(n)?.state)?;
            }
            self.maybe_fail("restart")?;
            for n in &names {
                self.close_endpoint(n).await;
                self.set_state(n, VmState::Restarting)?;
            }
        }
        for n in &names {
            self.work("restart", n, self.profile.boot).await;
            self.open_endpoint(n).await?;
            self.set_state(n, VmState::Running)?;
        }
        call.send(pb::RestartReply::default()).await;
        Ok(())
    }

    /// snapshot
    pub async fn snapshot(
        &self,
        call: Call<pb::SnapshotRequest, pb::SnapshotReply>,
        req: pb::SnapshotRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("snapshot", &req.instance).await;
        self.work("snapshot", &req.instance, Duration::ZERO).await;
        let name = self.take_snapshot(&req.instance, &req.snapshot, &req.comment).await?;
        call.send(pb::SnapshotReply { snapshot: name, ..Default::default() }).await;
        Ok(())
    }

    /// Takes a snapshot (the caller holds the main thread). Returns its name.
    async fn take_snapshot(&self, instance: &str, requested: &str, comment: &str) -> Result<String, Status> {
        let i = self.operative(instance)?;
        rules::snapshot(i.state)?;
        let name =
            if requested.is_empty() { format!("snapshot{}", i.snapshot_count + 1) } else { requested.to_string() };
        rules::snapshot_name(&name)?;
        if i.snapshots.iter().any(|s| s.name == name) {
            return Err(rules::snapshot_taken(instance, &name).into());
        }
        self.maybe_fail("snapshot")?;
        self.emit("snapshot", instance, EventKind::Working);
        copy_tree(self.root(instance), self.snapshot_dir(instance, &name)).await?;
        self.work("snapshot", instance, self.profile.snapshot).await;
        if let Some(i) = self.st()?.instances.get_mut(instance) {
            i.snapshot_count += 1;
            i.snapshots.push(SnapshotMeta {
                name: name.clone(),
                parent: i.current_snapshot.clone(),
                comment: comment.to_string(),
                created: now(),
                sizes: Some(SnapshotSizes { cpus: i.cpus, memory: i.memory.clone(), disk: i.disk.clone() }),
            });
            i.current_snapshot = name.clone();
        }
        self.save()?;
        Ok(name)
    }

    /// restore
    pub async fn restore(
        &self,
        mut call: Call<pb::RestoreRequest, pb::RestoreReply>,
        req: pb::RestoreRequest,
    ) -> Result<(), Status> {
        let check = |d: &Daemon| -> Result<(), Status> {
            let i = d.operative(&req.instance)?;
            if !i.snapshots.iter().any(|s| s.name == req.snapshot) {
                return Err(rules::no_such_snapshot(&req.instance, &req.snapshot).into());
            }
            rules::restore(i.state)?;
            Ok(())
        };
        let mut destructive = req.destructive;
        if !destructive {
            {
                let _g = self.main_thread("restore", &req.instance).await;
                check(self)?;
            }
            let answer = call.prompt(pb::RestoreReply { confirm_destructive: true, ..Default::default() }).await?;
            destructive = answer.destructive;
        }
        let _g = self.main_thread("restore", &req.instance).await;
        self.work("restore", &req.instance, Duration::ZERO).await;
        check(self)?;
        self.maybe_fail("restore")?;
        if !destructive {
            call.send(pb::RestoreReply {
                reply_message: format!("Taking snapshot before restoring {}", req.snapshot),
                ..Default::default()
            })
            .await;
            let taken = self.take_snapshot(&req.instance, "", &format!("Before restoring {}", req.snapshot)).await?;
            call.send(pb::RestoreReply {
                reply_message: format!("Snapshot taken: {}.{taken}\n", req.instance),
                ..Default::default()
            })
            .await;
        }
        call.send(pb::RestoreReply { reply_message: "Restoring snapshot".into(), ..Default::default() }).await;
        self.emit("restore", &req.instance, EventKind::Working);
        let root = self.root(&req.instance);
        replace_tree(self.snapshot_dir(&req.instance, &req.snapshot), root).await?;
        self.work("restore", &req.instance, self.profile.restore).await;
        if let Some(i) = self.st()?.instances.get_mut(&req.instance) {
            i.current_snapshot = req.snapshot.clone();
            // The snapshot's specs come back with it (reference §0.4).
            if let Some(s) = i.snapshots.iter().find(|s| s.name == req.snapshot).and_then(|s| s.sizes.clone()) {
                (i.cpus, i.memory, i.disk) = (s.cpus, s.memory, s.disk);
            }
        }
        self.save()?;
        call.send(pb::RestoreReply::default()).await;
        Ok(())
    }

    /// clone
    pub async fn clone_instance(
        &self,
        call: Call<pb::CloneRequest, pb::CloneReply>,
        req: pb::CloneRequest,
    ) -> Result<(), Status> {
        let src = req.source_name.clone();
        let _g = self.main_thread("clone", &src).await;
        self.work("clone", &src, Duration::ZERO).await;
        let i = self.operative(&src)?;
        rules::clone(i.state)?;
        let dest = req.destination_name.clone().unwrap_or_else(|| format!("{src}-clone{}", i.clone_count + 1));
        rules::clone_destination(&dest)?;
        if self.st()?.instances.contains_key(&dest) {
            return Err(Refusal::exists(&dest).into());
        }
        self.maybe_fail("clone")?;
        self.emit("clone", &src, EventKind::Working);
        copy_tree(self.root(&src), self.root(&dest)).await?;
        self.work("clone", &src, self.profile.clone).await;
        {
            let mut st = self.st()?;
            if let Some(s) = st.instances.get_mut(&src) {
                s.clone_count += 1;
            }
            let copy = Instance {
                name: dest.clone(),
                state: VmState::Stopped,
                snapshots: vec![],
                snapshot_count: 0,
                clone_count: 0,
                current_snapshot: String::new(),
                created: now(),
                ..i
            };
            st.instances.insert(dest.clone(), copy);
        }
        self.save()?;
        call.send(pb::CloneReply { reply_message: format!("Cloned from {src} to {dest}.\n"), ..Default::default() })
            .await;
        Ok(())
    }

    /// delet
    pub async fn delete(
        &self,
        mut call: Call<pb::DeleteRequest, pb::DeleteReply>,
        req: pb::DeleteRequest,
    ) -> Result<(), Status> {
        let pairs = if req.instance_snapshot_pairs.is_empty() {
            self.all_names(true)?
                .into_iter()
                .map(|n| pb::InstanceSnapshotPair { instance_name: n, snapshot_name: None })
                .collect()
        } else {
            req.instance_snapshot_pairs.clone()
        };
        let has_snapshots = pairs.iter().any(|p| p.snapshot_name.is_some());
        {
            let _g = self.main_thread("delete", "").await;
            let names: Vec<String> = pairs.iter().map(|p| p.instance_name.clone()).collect();
            self.select(&names, Selection::Existing)?;
            for p in &pairs {
                let i = self.instance(&p.instance_name)?;
                if let Some(s) = &p.snapshot_name {
                    if i.deleted {
                        return Err(Refusal::deleted(&i.name).into());
                    }
                    if !i.snapshots.iter().any(|x| &x.name == s) {
                        return Err(rules::no_such_snapshot(&i.name, s).into());
                    }
                }
            }
        }
        if has_snapshots && !req.purge && !req.purge_snapshots {
            let answer = call.prompt(pb::DeleteReply { confirm_snapshot_purging: true, ..Default::default() }).await?;
            if !answer.purge_snapshots {
                return Err(Status::cancelled("Cancelled."));
            }
        }
        let _g = self.main_thread("delete", "").await;
        self.work("delete", "", Duration::ZERO).await;
        self.maybe_fail("delete")?;
        let mut purged = Vec::new();
        for p in pairs {
            let name = p.instance_name;
            if let Some(s) = p.snapshot_name {
                remove_tree(self.snapshot_dir(&name, &s)).await?;
                if let Some(i) = self.st()?.instances.get_mut(&name) {
                    i.snapshots.retain(|x| x.name != s);
                    for c in i.snapshots.iter_mut().filter(|c| c.parent == s) {
                        c.parent.clear();
                    }
                    if i.current_snapshot == s {
                        i.current_snapshot.clear();
                    }
                }
                self.save()?;
                continue;
            }
            self.emit("delete", &name, EventKind::Working);
            self.close_endpoint(&name).await;
            self.work("delete", &name, self.profile.delete).await;
            if req.purge {
                self.st()?.instances.remove(&name);
                remove_tree(self.dir(&name)).await?;
                purged.push(name);
            } else if let Some(i) = self.st()?.instances.get_mut(&name) {
                i.deleted = true;
                i.state = VmState::Stopped;
            }
            self.save()?;
        }
        call.send(pb::DeleteReply { purged_instances: purged, ..Default::default() }).await;
        Ok(())
    }

    /// purge
    pub async fn purge(
        &self,
        call: Call<pb::PurgeRequest, pb::PurgeReply>,
        _req: pb::PurgeRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("purge", "").await;
        self.work("purge", "", Duration::ZERO).await;
        self.maybe_fail("purge")?;
        let names: Vec<String> = self.st()?.instances.values().filter(|i| i.deleted).map(|i| i.name.clone()).collect();
        for n in &names {
            self.st()?.instances.remove(n);
            remove_tree(self.dir(n)).await?;
        }
        self.save()?;
        call.send(pb::PurgeReply { purged_instances: names, ..Default::default() }).await;
        Ok(())
    }

    /// recover
    pub async fn recover(
        &self,
        call: Call<pb::RecoverRequest, pb::RecoverReply>,
        req: pb::RecoverRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("recover", "").await;
        self.work("recover", "", Duration::ZERO).await;
        let names = match req.instance_names {
            Some(n) if !n.instance_name.is_empty() => n.instance_name,
            _ => self.st()?.instances.values().filter(|i| i.deleted).map(|i| i.name.clone()).collect(),
        };
        self.select(&names, Selection::Existing)?;
        self.maybe_fail("recover")?;
        for n in &names {
            if let Some(i) = self.st()?.instances.get_mut(n) {
                i.deleted = false;
            }
        }
        self.save()?;
        call.send(pb::RecoverReply::default()).await;
        Ok(())
    }

    /// ssh_info
    pub async fn ssh_info(
        &self,
        call: Call<pb::SshInfoRequest, pb::SshInfoReply>,
        req: pb::SshInfoRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("ssh_info", "").await;
        self.work("ssh_info", "", Duration::ZERO).await;
        self.select(&req.instance_name, Selection::Operative)?;
        let mut map = std::collections::HashMap::new();
        for n in &req.instance_name {
            let i = self.operative(n)?;
            rules::ssh(n, i.state)?;
            let (host, port, user, key) = match &self.cfg.ssh_target {
                Some(t) => {
                    // An empty key stands for the simulator's own client key.
                    let key = if t.private_key.is_empty() { self.keys.client_key_text() } else { &t.private_key };
                    (t.host.clone(), t.port, t.username.clone(), key)
                }
                None => {
                    let port = self.endpoint(n).map(|e| e.port()).ok_or_else(|| {
                        Status::failed_precondition(format!("instance \"{n}\" has no SSH endpoint yet"))
                    })?;
                    ("127.0.0.1".to_string(), port, "ubuntu".to_string(), self.keys.client_key_text())
                }
            };
            map.insert(
                n.clone(),
                pb::SshInfo { port: i32::from(port), priv_key_base64: key.to_string(), host, username: user },
            );
        }
        call.send(pb::SshInfoReply { ssh_info: map, ..Default::default() }).await;
        Ok(())
    }

    fn passphrase(&self) -> Option<String> {
        self.cfg.passphrase.clone().or_else(|| self.st().ok().and_then(|s| s.passphrase.clone()))
    }

    /// authenticate (no trust check before it)
    pub async fn authenticate(
        &self,
        call: Call<pb::AuthenticateRequest, pb::AuthenticateReply>,
        req: pb::AuthenticateRequest,
        cert: Option<Vec<u8>>,
    ) -> Result<(), Status> {
        let _g = self.main_thread("authenticate", "").await;
        let Some(expected) = self.passphrase() else {
            return Err(Status::failed_precondition(
                "Passphrase is not set. Please `multipass set local.passphrase` with a trusted client.",
            ));
        };
        if req.passphrase != expected {
            return Err(Status::invalid_argument("Passphrase is not correct. Please try again."));
        }
        let cert = cert.ok_or_else(|| Status::internal("invalid certificate data"))?;
        self.trust.add(&cert).map_err(|e| Status::internal(e.to_string()))?;
        super::server::open_socket_permissions(&self.cfg);
        call.send(pb::AuthenticateReply::default()).await;
        Ok(())
    }

    /// get
    pub async fn get(&self, call: Call<pb::GetRequest, pb::GetReply>, req: pb::GetRequest) -> Result<(), Status> {
        let _g = self.main_thread("get", "").await;
        let value = match req.key.as_str() {
            "local.driver" => "qemu".to_string(),
            // multipassd returns what it stores: the passphrase's hash (the CLI prints
            // true/false instead; reference §0.3).
            "local.passphrase" => self.passphrase().map(|p| passphrase_hash(&p)).unwrap_or_default(),
            "local.privileged-mounts" => "true".into(),
            "local.bridged-network" | "local.image.mirror" => String::new(),
            k => match instance_settings::parse_key(k) {
                Some((name, property)) => {
                    let st = self.st()?;
                    let i =
                        st.instances.get(name).ok_or_else(|| Status::from(instance_settings::cannot_obtain(name)))?;
                    instance_settings::value(property, sizes_of(i))
                }
                None => return Err(Status::invalid_argument(format!("Unrecognized settings key: '{k}'"))),
            },
        };
        call.send(pb::GetReply { value, ..Default::default() }).await;
        Ok(())
    }

    /// set: replies, then asks the process to exit with code 42 (multipassd restarts on any
    /// daemon setting change).
    pub async fn set(&self, call: Call<pb::SetRequest, pb::SetReply>, req: pb::SetRequest) -> Result<(), Status> {
        let _g = self.main_thread("set", "").await;
        if let Some((name, _)) = instance_settings::parse_key(&req.key) {
            let name = name.to_string();
            return self.set_instance(call, &name, &req.key, &req.val).await;
        }
        match req.key.as_str() {
            "local.passphrase" => self.st()?.passphrase = Some(req.val.clone()),
            "local.driver" if req.val != "qemu" => {
                return Err(Status::invalid_argument(format!(
                    "Invalid driver '{}': mpool sim only simulates qemu",
                    req.val
                )));
            }
            "local.driver" | "local.privileged-mounts" | "local.bridged-network" | "local.image.mirror" => {}
            k => {
                return Err(Status::invalid_argument(format!("Unrecognized settings key: '{k}'")));
            }
        }
        self.save()?;
        let others = self.calls_in_flight().saturating_sub(1);
        call.send(pb::SetReply::default()).await;
        if others > 0 && self.cfg.set_wedges_if_busy {
            // Once this call has ended (its reply and trailers are out), as multipassd's.
            if let Ok(mut w) = self.pending_wedge.lock() {
                *w = Some(others);
            }
        } else {
            self.exit.send_if_modified(|e| {
                let first = e.is_none();
                if first {
                    *e = Some(Exit::SettingsChanged);
                }
                first
            });
        }
        Ok(())
    }

    /// A per-instance size setting (the caller holds the main thread): stopped instances only,
    /// the disk only grows; the daemon does not restart (reference §0.4).
    async fn set_instance(
        &self,
        call: Call<pb::SetRequest, pb::SetReply>,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), Status> {
        let (standing, current) = {
            let st = self.st()?;
            match st.instances.get(name) {
                None => (instance_settings::Standing::Missing, None),
                Some(i) if i.deleted => (instance_settings::Standing::Deleted, None),
                Some(i) => (instance_settings::Standing::Operative(i.state), Some(sizes_of(i))),
            }
        };
        let current = current.unwrap_or(instance_settings::Sizes { cpus: 1, memory: 0, disk: 0 });
        let next = instance_settings::update(key, value, standing, current)?;
        self.work("set", name, self.profile.instance_setting).await;
        if let Some(i) = self.st()?.instances.get_mut(name) {
            i.cpus = next.cpus;
            i.memory = next.memory.to_string();
            i.disk = next.disk.to_string();
        }
        self.save()?;
        call.send(pb::SetReply::default()).await;
        Ok(())
    }

    /// Wedges the daemon if a `set` that just ended asked for it.
    pub(super) fn wedge_if_pending(&self) {
        let others = self.pending_wedge.lock().ok().and_then(|mut w| w.take());
        if let Some(others) = others {
            self.wedge(others);
        }
    }

    /// What multipassd did when a setting changed while another call was in flight (reference
    /// §0.3): its socket disappears, it never exits, and nothing answers any more.
    fn wedge(&self, others: usize) {
        tracing::warn!(
            others,
            "a setting changed with calls in flight: wedged (socket gone, process alive), as multipassd"
        );
        self.emit("set", "", EventKind::Wedged);
        if let Some(socket) = self.owned_socket() {
            socket.remove();
        }
        self.wedged.send_replace(true);
    }

    /// keys
    pub async fn keys(&self, call: Call<pb::KeysRequest, pb::KeysReply>, _req: pb::KeysRequest) -> Result<(), Status> {
        let mut settings_keys = [
            "local.bridged-network",
            "local.driver",
            "local.image.mirror",
            "local.passphrase",
            "local.privileged-mounts",
        ]
        .map(String::from)
        .to_vec();
        // Each instance's size settings, as multipassd lists them.
        for name in self.st()?.instances.keys() {
            settings_keys.extend(["cpus", "disk", "memory"].map(|p| format!("local.{name}.{p}")));
        }
        call.send(pb::KeysReply { settings_keys, ..Default::default() }).await;
        Ok(())
    }

    /// daemon_info
    pub async fn daemon_info(
        &self,
        call: Call<pb::DaemonInfoRequest, pb::DaemonInfoReply>,
        _req: pb::DaemonInfoRequest,
    ) -> Result<(), Status> {
        let _g = self.main_thread("daemon_info", "").await;
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        // As multipassd: the *total* size of the volume holding its data, not the free space.
        let available_space = volume_total(&self.cfg.state_dir).unwrap_or(100 << 30);
        call.send(pb::DaemonInfoReply { available_space, cpus, memory, ..Default::default() }).await;
        Ok(())
    }

    /// find: the fixed catalogue (see [`images`]), with multipassd's rules for search strings,
    /// remotes and which remote names an alias carries.
    pub async fn find(&self, call: Call<pb::FindRequest, pb::FindReply>, req: pb::FindRequest) -> Result<(), Status> {
        let _g = self.main_thread("find", "").await;
        self.work("find", "", Duration::ZERO).await;
        let reply = images::find(&req, self.cfg.image_servers_reachable)?;
        call.send(reply).await;
        Ok(())
    }

    /// networks: none to bridge.
    pub async fn networks(
        &self,
        call: Call<pb::NetworksRequest, pb::NetworksReply>,
        _req: pb::NetworksRequest,
    ) -> Result<(), Status> {
        call.send(pb::NetworksReply::default()).await;
        Ok(())
    }
}

fn status(i: &Instance) -> pb::InstanceStatus {
    let s = if i.deleted { pb::instance_status::Status::Deleted } else { i.state.status() };
    pb::InstanceStatus { status: s as i32 }
}

/// The release text of an instance (state files of older simulators carry only the image).
fn release_of(i: &Instance) -> String {
    if let Some(r) = &i.release {
        return r.clone();
    }
    images::resolve(&i.image, &i.remote, true).map(|r| r.release_text()).unwrap_or_default()
}

/// What multipassd stores for `local.passphrase`: a 64-byte hash as 128 hex digits (scrypt
/// there, SHA-512 here; only the shape matters to clients).
fn passphrase_hash(passphrase: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, passphrase.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable stand-in for the image's hash (`info`'s "Image hash").
fn image_id(image: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, image.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The address `list`/`info` report for a running instance (its SSH endpoint's host).
const GUEST_IPV4: &str = "127.0.0.1";

/// Bytes used by a directory tree (what `df` inside the guest would count); unreadable parts
/// count as empty. Iterative: a task's deep directory nesting cannot exhaust the stack.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => total = total.saturating_add(e.metadata().map(|m| m.len()).unwrap_or(0)),
                _ => {}
            }
        }
    }
    total
}

/// An instance's sizes in bytes (as launched, or as last set).
fn sizes_of(i: &Instance) -> instance_settings::Sizes {
    instance_settings::Sizes {
        cpus: i.cpus,
        memory: rules::parse_size(&i.memory).unwrap_or(rules::DEFAULT_MEMORY),
        disk: rules::parse_size(&i.disk).unwrap_or(rules::DEFAULT_DISK),
    }
}

fn fundamentals(s: &SnapshotMeta) -> pb::SnapshotFundamentals {
    pb::SnapshotFundamentals {
        snapshot_name: s.name.clone(),
        parent: s.parent.clone(),
        comment: s.comment.clone(),
        creation_timestamp: Some(timestamp(s.created)),
    }
}

/// A multipass-style generated name.
fn pet_name() -> String {
    const A: &[&str] = &["brisk", "calm", "eager", "gentle", "jolly", "lucid", "merry", "proud", "quiet", "vivid"];
    const N: &[&str] = &["badger", "crane", "falcon", "heron", "lynx", "marten", "otter", "plover", "stoat", "wren"];
    format!("{}-{}", A[rand::random_range(0..A.len())], N[rand::random_range(0..N.len())])
}

/// Copies a directory tree (files, dirs, symlinks, modes), replacing `to`.
async fn copy_tree(from: PathBuf, to: PathBuf) -> Result<(), Status> {
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if to.exists() {
            std::fs::remove_dir_all(&to)?;
        }
        std::fs::create_dir_all(&from)?;
        copy_dir(&from, &to)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| Status::internal(format!("copying instance files: {e}")))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_dir(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Replaces `to` with a copy of `from`.
async fn replace_tree(from: PathBuf, to: PathBuf) -> Result<(), Status> {
    copy_tree(from, to).await
}

async fn remove_tree(path: PathBuf) -> Result<(), Status> {
    match tokio::fs::remove_dir_all(&path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!("{}: {e}", path.display()))),
    }
}

/// The total size in bytes of the filesystem holding `dir` (statvfs).
fn volume_total(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks().saturating_mul(st.fragment_size()))
}
