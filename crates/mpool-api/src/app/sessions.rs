//! Sessions: commands that outlive their caller (see [`mpool_ssh::session`] for how they run in
//! the VM). Here: starting one, following one (Exec's stream, Attach, a Run's retry), listing
//! them, cancelling one, and the watch that keeps a lease alive while a session runs.
//!
//! Following reads the session's files over one SFTP session: each stream from its offset, as
//! fast as bytes come, then politely (2 ms, growing by half each time up to 250 ms) while the
//! command is quiet, until the session is done. Memory stays flat whatever the command writes: 64 KiB per read, passed
//! on through a bounded channel.
//!
//! The watch (one task per lease with sessions, started with the first session and found again
//! after a restart of mpool by [`App::recover_sessions`]): holds the lease in use while any of
//! its sessions runs, renews its stored expiry (so a restart finds it alive), enforces each
//! session's timeout, and at the pool's `max_ttl` from the grant kills the sessions and ends the
//! lease. When a KEEP Run's session (`run`) has ended, it records the exit status on the Run's
//! request id, so a retry after the lease expired (nobody came back) still gets it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mpool_engine::LeaseInfo;
use mpool_ssh::session::{self, KillReason, Layout, Meta, Read, SessionFiles, Stream};
use mpool_ssh::{ExecRequest, RemoteFs, ScriptShell, SshEndpoint};
use tokio::sync::mpsc;

use super::error::AppError;
use super::lease_use::InUse;
use super::run::RUN_SESSION;
use super::utf8::Utf8Chunks;
use super::{App, Events};
use crate::auth::Principal;
use crate::proto::v1;
use tokio_stream::wrappers::ReceiverStream;
use v1::exec_event::Event;

/// Bytes read per request.
const READ: usize = 64 * 1024;
/// The first pause when a session is quiet (then half as long again each time).
const FIRST_PAUSE: Duration = Duration::from_millis(2);
/// The longest pause between two looks at a quiet session.
const MAX_PAUSE: Duration = Duration::from_millis(250);
/// How often the watch looks at a lease's sessions.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long after the exit a stream may stay open (a background process holding it) before a
/// follower reports the exit anyway.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The leases whose sessions are watched.
#[derive(Clone, Default)]
pub struct Watched(Arc<Mutex<HashSet<String>>>);

impl Watched {
    /// Marks `lease` watched; false if it already was.
    fn claim(&self, lease: &str) -> bool {
        self.0.lock().map(|mut s| s.insert(lease.to_string())).unwrap_or(false)
    }

    fn drop_lease(&self, lease: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(lease);
        }
    }
}

/// Now, unix ms.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The API's exit status of a session.
fn exit_of(st: &session::Status) -> v1::ExitStatus {
    let code = st.code.unwrap_or(-1);
    let killed = st.cancelled || st.timed_out;
    let signal = if killed && code > 128 { mpool_ssh::signal_name_of(code - 128) } else { None };
    v1::ExitStatus {
        code: if signal.is_some() { -1 } else { code },
        signal: signal.unwrap_or_default().to_string(),
        duration: st.duration_ms.map(|ms| crate::convert::proto_duration(Duration::from_millis(ms))),
        timed_out: st.timed_out,
        cancelled: st.cancelled,
    }
}

/// Text of stream `i` (0: stdout, 1: stderr) as its event.
fn text_event(i: usize, text: String) -> Event {
    if i == 0 { Event::Stdout(text) } else { Event::Stderr(text) }
}

/// A message for an event.
fn msg(event: Event, offset: u64, replayed: bool) -> v1::ExecEvent {
    v1::ExecEvent { event: Some(event), offset, replayed }
}

impl App {
    /// Starts `req` as session `id` on the lease's VM and has its lease watched.
    /// ALREADY_EXISTS when the VM has a session with that id.
    pub(crate) async fn start_session(
        &self,
        info: &LeaseInfo,
        target: &SshEndpoint,
        req: &ExecRequest,
        id: &str,
        keep: bool,
    ) -> Result<(), AppError> {
        let (line, stdin, timeout) = req.detached_parts()?;
        let meta = Meta {
            id: id.to_string(),
            command: shorten(&req.describe(), 200),
            layout: Layout::for_cap(self.limits.session_output_cap),
            started_ms: now_ms(),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0),
            keep,
        };
        let script = session::launch_script(&meta, &line, &stdin)?;
        let out = self.ssh.run(&info.record.vm, target, ExecRequest::script(ScriptShell::Bash, script)).await?;
        match out.code {
            Some(0) => {}
            Some(c) if c == session::EXISTS as u32 => {
                return Err(AppError::already_exists(format!(
                    "session {id:?} exists on lease {}: follow it with Attach (or choose another id)",
                    info.record.id
                )));
            }
            _ => {
                return Err(AppError::unavailable(format!(
                    "starting session {id:?} on {} failed: {}",
                    info.record.vm,
                    out.stderr_text().trim()
                )));
            }
        }
        self.watch_sessions(info.record.id.clone());
        Ok(())
    }

    /// Follows session `id` from `from` (stdout, stderr offsets): `started`, its output (bytes
    /// written before now marked `replayed` when `replay` is set), then its exit. If the
    /// receiver goes away, a session that does not `keep` is cancelled.
    pub(crate) async fn follow_session(
        &self,
        info: &LeaseInfo,
        target: &SshEndpoint,
        id: &str,
        from: [u64; 2],
        replay: bool,
        guard: InUse,
    ) -> Result<Events<v1::ExecEvent>, AppError> {
        let fs = self.remote_fs(info, target).await?;
        let Some(files) = SessionFiles::open(&fs, id).await? else {
            return Err(AppError::not_found(format!("no session {id:?} on lease {}", info.record.id)));
        };
        let seen = if replay { [files.written(Stream::Out).await?, files.written(Stream::Err).await?] } else { [0, 0] };
        let keep = files.meta.keep;
        let (tx, rx) = mpsc::channel(16);
        let (app, vm, id) = (self.clone(), info.record.vm.clone(), id.to_string());
        let target = target.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let gone = follow(files, from, seen, &tx).await;
            if gone && !keep {
                app.kill_session(&vm, &target, &id, KillReason::Cancelled).await;
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// An SFTP session to the lease's VM (asking the daemon for its endpoint again once when it
    /// moved).
    async fn remote_fs(&self, info: &LeaseInfo, target: &SshEndpoint) -> Result<Arc<RemoteFs>, AppError> {
        match self.ssh.remote_fs(&info.record.vm, target).await {
            Ok(fs) => Ok(Arc::new(fs)),
            Err(e) if e.is_unreachable() => {
                let fresh = self.refreshed_target(info, target).await.ok_or(e)?;
                Ok(Arc::new(self.ssh.remote_fs(&info.record.vm, &fresh).await?))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Kills session `id` on `vm`; whether it was running.
    pub(crate) async fn kill_session(&self, vm: &str, target: &SshEndpoint, id: &str, why: KillReason) -> bool {
        let grace = u64::try_from(self.ssh.options().kill_grace.as_millis()).unwrap_or(2000);
        let script = session::kill_script(id, why, grace);
        match self.ssh.run(vm, target, ExecRequest::script(ScriptShell::Bash, script)).await {
            Ok(out) => {
                let said = out.stdout_text();
                tracing::debug!(%vm, session = %id, said = %said.trim(), code = ?out.code, stderr = %out.stderr_text().trim(), "kill script");
                // `signalled` alone: the script was cut short after its signal (the command's
                // end let its lease end, and the VM's reset took the script along).
                said.lines().any(|l| l == "killed" || l == "signalled")
            }
            Err(e) => {
                tracing::warn!(%vm, session = %id, "killing the session failed: {e}");
                false
            }
        }
    }

    /// Follows a session again: Attach.
    pub async fn attach(&self, p: Option<&Principal>, r: v1::AttachRequest) -> Result<Events<v1::ExecEvent>, AppError> {
        super::validate::required("session", &r.session)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, p).await?;
        self.follow_session(&info, &target, &r.session, [r.stdout_offset, r.stderr_offset], true, guard).await
    }

    /// The sessions of a lease, oldest first.
    pub async fn list_sessions(
        &self,
        p: Option<&Principal>,
        r: v1::ListSessionsRequest,
    ) -> Result<v1::ListSessionsResponse, AppError> {
        let (info, target, _guard) = self.use_lease(&r.lease_id, p).await?;
        let fs = self.remote_fs(&info, &target).await?;
        let mut sessions = Vec::new();
        for id in SessionFiles::ids(&fs).await? {
            let Some(files) = SessionFiles::open(&fs, &id).await? else { continue };
            let st = files.status().await?;
            sessions.push(v1::Session {
                id,
                command: files.meta.command.clone(),
                state: if st.code.is_some() { v1::SessionState::Exited } else { v1::SessionState::Running } as i32,
                stdout_bytes: files.written(Stream::Out).await?,
                stderr_bytes: files.written(Stream::Err).await?,
                exit: st.code.is_some().then(|| exit_of(&st)),
                started_at: Some(crate::convert::timestamp(files.meta.started_ms)),
            });
        }
        sessions.sort_by_key(|s| s.started_at.as_ref().map(|t| (t.seconds, t.nanos)));
        Ok(v1::ListSessionsResponse { sessions })
    }

    /// Cancels session `id` of a lease the caller holds; whether it was running.
    pub(crate) async fn cancel_session(&self, info: &LeaseInfo, id: &str) -> bool {
        let Some(target) = info.ssh.as_ref() else { return false };
        session::valid_id(id) && self.kill_session(&info.record.vm, target, id, KillReason::Cancelled).await
    }

    /// Watches the sessions of `lease` (once per lease).
    pub(crate) fn watch_sessions(&self, lease: String) {
        if !self.watched.claim(&lease) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            if let Err(e) = app.watch(&lease).await {
                tracing::debug!(%lease, "watching sessions ended: {e}");
            }
            app.watched.drop_lease(&lease);
        });
    }

    /// Finds the sessions of every live lease again (after mpool restarted): running ones are
    /// watched.
    pub async fn recover_sessions(&self) {
        let Ok(status) = self.engine.status().await else { return };
        for lease in status.leases {
            self.watch_sessions(lease.id);
        }
    }

    /// The watch of one lease: see the module's doc.
    async fn watch(&self, lease: &str) -> Result<(), AppError> {
        let info = self.engine.begin_use(lease, None).await?;
        let guard = InUse::new(self.engine.clone(), lease.to_string());
        let max_ttl = self.pool_max_ttl(&info.record.pool).await;
        let deadline =
            max_ttl.map(|t| info.record.granted_ms.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)));
        // The window the lease was granted (or last renewed) with; renewed by a third of it.
        let ttl =
            Duration::from_millis(info.record.expires_ms.saturating_sub(info.record.granted_ms)).max(WATCH_EVERY * 3);
        let ttl = max_ttl.map_or(ttl, |m| ttl.min(m));
        let mut renewed = tokio::time::Instant::now();
        let target = match info.ssh.clone() {
            Some(t) => t,
            None => self.endpoint_of(lease).await?,
        };
        let mut fs = None;
        // Sessions seen ended are not looked at again.
        let mut ended = HashSet::new();
        loop {
            // A failure to look (the VM's SSH, the store) is retried at the next round: the
            // lease stays in use meanwhile; only the lease's end ends the watch.
            let running = match self.running_sessions(&info, &target, &mut fs, &mut ended).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%lease, "looking at the lease's sessions failed (retrying): {e}");
                    fs = None;
                    tokio::time::sleep(WATCH_EVERY).await;
                    self.engine.begin_use(lease, None).await?;
                    self.engine.end_use(lease).await;
                    continue;
                }
            };
            if running.is_empty() {
                drop(guard);
                return Ok(());
            }
            let now = now_ms();
            if deadline.is_some_and(|d| now >= d) {
                tracing::warn!(%lease, "the lease reached its pool's max_ttl with sessions running: killing them and ending the lease");
                for (id, _, _) in &running {
                    self.kill_session(&info.record.vm, &target, id, KillReason::Cancelled).await;
                }
                drop(guard);
                let _ = self.engine.release(lease, None).await;
                return Ok(());
            }
            for (id, until, timeout) in &running {
                if *timeout > 0 && now >= *until {
                    tracing::info!(%lease, session = %id, "the session's timeout passed: killing it");
                    self.kill_session(&info.record.vm, &target, id, KillReason::TimedOut).await;
                }
            }
            if renewed.elapsed() >= ttl / 3 {
                // Keeps the stored expiry ahead, so a restart of mpool finds the lease alive.
                match self.engine.renew(lease, Some(ttl), None).await {
                    Ok(_) => renewed = tokio::time::Instant::now(),
                    Err(e) => tracing::warn!(%lease, "renewing the lease of a running session failed (retrying): {e}"),
                }
            }
            tokio::time::sleep(WATCH_EVERY).await;
            // The lease may have ended meanwhile (released: its VM is being reset).
            self.engine.begin_use(lease, None).await?;
            self.engine.end_use(lease).await;
        }
    }

    /// The SSH endpoint of a lease the engine knows none for yet (mpool restarted moments ago
    /// and has not asked the daemon): asked for until it is known or the lease ended. The
    /// watch holds the lease in use meanwhile, so it does not expire under a running session.
    async fn endpoint_of(&self, lease: &str) -> Result<SshEndpoint, AppError> {
        loop {
            match self.engine.refresh(lease, None).await {
                Ok(fresh) => {
                    if let Some(target) = fresh.ssh {
                        return Ok(target);
                    }
                }
                Err(e) if e.kind() == mpool_engine::ErrorKind::Unavailable => {}
                Err(e) => return Err(e.into()),
            }
            tracing::debug!(%lease, "the lease's SSH endpoint is not known yet: asking again");
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// The lease's running sessions: (id, when its timeout passes, its timeout), both ms.
    async fn running_sessions(
        &self,
        info: &LeaseInfo,
        target: &SshEndpoint,
        fs: &mut Option<Arc<RemoteFs>>,
        ended: &mut HashSet<String>,
    ) -> Result<Vec<(String, u64, u64)>, AppError> {
        let fs = match fs {
            Some(fs) => fs.clone(),
            None => fs.insert(self.remote_fs(info, target).await?).clone(),
        };
        let mut running = Vec::new();
        for id in SessionFiles::ids(&fs).await? {
            if ended.contains(&id) {
                continue;
            }
            let Some(files) = SessionFiles::open(&fs, &id).await? else { continue };
            let st = files.status().await?;
            if st.code.is_none() {
                let until = files.meta.started_ms.saturating_add(files.meta.timeout_ms);
                running.push((id, until, files.meta.timeout_ms));
                continue;
            }
            if id == RUN_SESSION {
                // A KEEP Run's command ended: recorded now, so a retry after the lease expired
                // (nobody came back for its outputs) still gets its exit status. Retried at the
                // next round while mpool cannot write it (the session is not counted ended).
                let outcome = super::run::outcome::of_exit(&exit_of(&st), &info.record.vm);
                if let Err(e) = self.engine.note_outcome(&info.record.id, outcome).await {
                    if e.kind() == mpool_engine::ErrorKind::Unavailable {
                        return Err(AppError::unavailable(format!("recording the Run's exit status: {e}")));
                    }
                    tracing::debug!(lease = %info.record.id, "no Run outcome to record: {e}");
                }
            }
            ended.insert(id);
        }
        Ok(running)
    }

    /// The pool's `max_ttl`, if it is known.
    async fn pool_max_ttl(&self, pool: &str) -> Option<Duration> {
        let status = self.engine.status().await.ok()?;
        status.pools.into_iter().find(|p| p.name == pool)?.config.map(|c| c.max_ttl)
    }
}

/// Follows a session into `tx` from `off`; chunks below `seen` are marked replayed. Returns
/// true when the receiver went away before the end.
async fn follow(
    files: SessionFiles,
    mut off: [u64; 2],
    seen: [u64; 2],
    tx: &mpsc::Sender<Result<v1::ExecEvent, AppError>>,
) -> bool {
    let send = |ev: v1::ExecEvent| async { tx.send(Ok(ev)).await.is_err() };
    if send(msg(Event::Started(files.meta.id.clone()), 0, false)).await {
        return true;
    }
    let mut text = [Utf8Chunks::default(), Utf8Chunks::default()];
    let mut pause = FIRST_PAUSE;
    let mut exited_at: Option<tokio::time::Instant> = None;
    let mut finishing = false;
    loop {
        let mut progressed = false;
        for (i, stream) in [Stream::Out, Stream::Err].into_iter().enumerate() {
            for _ in 0..8 {
                let read = match files.read(stream, off[i], READ).await {
                    Ok(r) => r,
                    Err(e) => return tx.send(Err(e.into())).await.is_err(),
                };
                let ev = match read {
                    Read::Nothing => break,
                    Read::Data(bytes) => {
                        let start = off[i];
                        off[i] = off[i].saturating_add(bytes.len() as u64);
                        let chunk = text[i].push(&bytes);
                        if chunk.is_empty() {
                            continue;
                        }
                        let held = text[i].held() as u64;
                        let e = text_event(i, chunk);
                        msg(e, off[i].saturating_sub(held), start < seen[i])
                    }
                    Read::Gap { to } => {
                        let rest = text[i].finish();
                        if !rest.is_empty() {
                            let e = text_event(i, rest);
                            if send(msg(e, off[i], off[i] <= seen[i])).await {
                                return true;
                            }
                        }
                        let d = v1::Dropped { stream: stream.name().into(), from: off[i], to };
                        off[i] = to;
                        msg(Event::Dropped(d), to, to <= seen[i])
                    }
                };
                progressed = true;
                if send(ev).await {
                    return true;
                }
            }
        }
        if progressed {
            pause = FIRST_PAUSE;
            continue;
        }
        if finishing {
            for (i, rest) in [text[0].finish(), text[1].finish()].into_iter().enumerate() {
                if !rest.is_empty() {
                    let e = text_event(i, rest);
                    if send(msg(e, off[i], false)).await {
                        return true;
                    }
                }
            }
            let st = match files.status().await {
                Ok(st) => st,
                Err(e) => return tx.send(Err(e.into())).await.is_err(),
            };
            return send(msg(Event::Exit(exit_of(&st)), 0, false)).await;
        }
        let st = match files.status().await {
            Ok(st) => st,
            Err(e) => return tx.send(Err(e.into())).await.is_err(),
        };
        if st.code.is_some() {
            let at = *exited_at.get_or_insert_with(tokio::time::Instant::now);
            if st.done || at.elapsed() >= EXIT_GRACE {
                // One more round: bytes may have landed between the read and the status.
                finishing = true;
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tx.closed() => return true,
        }
        pause = (pause * 3 / 2).min(MAX_PAUSE);
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), with "..." when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
