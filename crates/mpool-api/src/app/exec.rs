//! Exec: a command on a leased VM, its output streamed as it comes, its exit status last; and
//! CancelExec, which stops a running one by its id. The lease is in use (it cannot expire) while
//! the command runs; a caller that goes away cancels the command.

use mpool_ssh::{ExecEvent, ExecHandle, ExecRequest, SshEndpoint};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::command::{self, exit_status};
use super::error::AppError;
use super::lease_use::InUse;
use super::utf8::Utf8Chunks;
use super::validate::{self, MAX_EXEC_ID};
use super::{App, Events, scope};
use crate::auth::Principal;
use crate::proto::v1;
use mpool_engine::LeaseInfo;

use v1::exec_event::Event;

impl App {
    /// Runs `r.command` on the lease's VM: a `started` event with the exec id, then its output,
    /// then its exit status. Dropping the stream cancels the command.
    pub async fn exec(&self, p: Option<&Principal>, mut r: v1::ExecRequest) -> Result<Events<v1::ExecEvent>, AppError> {
        let req = command::command(r.command.take(), &self.limits)?;
        let keep = match v1::OnDisconnect::try_from(r.on_disconnect) {
            Ok(v1::OnDisconnect::Keep) => true,
            Ok(v1::OnDisconnect::Cancel) => false,
            Ok(v1::OnDisconnect::Unspecified) => !r.session.is_empty() || r.detach,
            Err(_) => {
                return Err(AppError::invalid_argument(format!(
                    "on_disconnect {} is not CANCEL or KEEP",
                    r.on_disconnect
                )));
            }
        };
        if keep || r.detach || !r.session.is_empty() {
            if r.detach && !keep {
                return Err(AppError::invalid_argument(
                    "detach with on_disconnect CANCEL: a detached session has no caller to follow; drop one of them",
                ));
            }
            return self.exec_session(p, r, req, keep).await;
        }
        let exec_id = if r.exec_id.is_empty() { format!("exec-{:016x}", rand::random::<u64>()) } else { r.exec_id };
        validate::capped("exec_id", &exec_id, MAX_EXEC_ID)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, p).await?;
        let events = self.start_exec(&info, &target, req, exec_id.clone(), guard).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(forward(exec_id, events, tx));
        Ok(ReceiverStream::new(rx))
    }

    /// Exec as a session: started detached in the VM, then followed (or, with `detach`, only its
    /// id sent).
    async fn exec_session(
        &self,
        p: Option<&Principal>,
        r: v1::ExecRequest,
        req: mpool_ssh::ExecRequest,
        keep: bool,
    ) -> Result<Events<v1::ExecEvent>, AppError> {
        let id = match (r.session.is_empty(), r.exec_id.is_empty()) {
            (false, false) if r.session != r.exec_id => {
                return Err(AppError::invalid_argument(format!(
                    "session {:?} and exec_id {:?} differ: a session's exec id is its session id; set one of them",
                    r.session, r.exec_id
                )));
            }
            (false, _) => r.session,
            (true, false) => r.exec_id,
            (true, true) => format!("s-{:016x}", rand::random::<u64>()),
        };
        if !mpool_ssh::session::valid_id(&id) {
            return Err(AppError::invalid_argument(format!(
                "session {id:?}: use 1-{} letters, digits, '.', '_' or '-', not starting with '.'",
                mpool_ssh::session::MAX_ID
            )));
        }
        if id == super::run::RUN_SESSION {
            return Err(AppError::invalid_argument(format!(
                "session {id:?} is the id of a Run's command (Attach to it, CancelExec it); choose another id"
            )));
        }
        let (info, target, guard) = self.use_lease(&r.lease_id, p).await?;
        self.start_session(&info, &target, &req, &id, keep).await?;
        if r.detach {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Ok(v1::ExecEvent { event: Some(Event::Started(id)), ..Default::default() }));
            return Ok(ReceiverStream::new(rx));
        }
        self.follow_session(&info, &target, &id, [0, 0], false, guard).await
    }

    /// Cancels a running exec; `cancelled` is false when it already ended (or never ran).
    pub async fn cancel_exec(
        &self,
        p: Option<&Principal>,
        r: v1::CancelExecRequest,
    ) -> Result<v1::CancelExecResponse, AppError> {
        validate::required("lease_id", &r.lease_id)?;
        validate::required("exec_id", &r.exec_id)?;
        // Checks the lease exists and belongs to the caller.
        let info = self.engine.begin_use(&r.lease_id, scope::owner(p)).await?;
        let guard = InUse::new(self.engine.clone(), info.record.id.clone());
        let mut cancelled = self.execs.canceller(&r.lease_id, &r.exec_id).map(|c| c.cancel()).is_some();
        if !cancelled {
            cancelled = self.cancel_session(&info, &r.exec_id).await;
        }
        drop(guard);
        Ok(v1::CancelExecResponse { cancelled })
    }

    /// Starts an exec and returns a channel of its events; the exec is cancelled when the
    /// receiver goes away. The lease stays in use (`guard`) until the command ended.
    pub(crate) async fn start_exec(
        &self,
        info: &LeaseInfo,
        target: &SshEndpoint,
        req: ExecRequest,
        exec_id: String,
        guard: InUse,
    ) -> Result<mpsc::Receiver<ExecEvent>, AppError> {
        let reg = self.execs.reserve(&info.record.id, exec_id)?;
        let handle = match self.ssh.exec(&info.record.vm, target, req.clone()).await {
            Ok(h) => h,
            // The VM's endpoint may have moved (a daemon restart): ask the daemon again, once.
            Err(e) if e.is_unreachable() => {
                let fresh = self.refreshed_target(info, target).await.ok_or(e)?;
                self.ssh.exec(&info.record.vm, &fresh, req).await?
            }
            Err(e) => return Err(e.into()),
        };
        reg.started(handle.canceller());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _guards = (guard, reg);
            pump(handle, tx).await;
        });
        Ok(rx)
    }
}

/// Passes a command's events on until it ends; if the receiver goes away first (noticed even
/// while the command is silent), stops the command and drains it to its end.
async fn pump(mut handle: ExecHandle, tx: mpsc::Sender<ExecEvent>) {
    loop {
        tokio::select! {
            ev = handle.next_event() => match ev {
                Some(ev) => {
                    if tx.send(ev).await.is_err() {
                        break;
                    }
                }
                None => return,
            },
            _ = tx.closed() => break,
        }
    }
    handle.cancel();
    while handle.next_event().await.is_some() {}
}

/// An exec's events as the API's: `started`, output as text, the rest of the text at the exit,
/// then the exit status. Returning drops `events`, which cancels the command.
async fn forward(
    exec_id: String,
    mut events: mpsc::Receiver<ExecEvent>,
    tx: mpsc::Sender<Result<v1::ExecEvent, AppError>>,
) {
    let send = |e: Event| Ok(v1::ExecEvent { event: Some(e), ..Default::default() });
    if tx.send(send(Event::Started(exec_id))).await.is_err() {
        return;
    }
    let (mut out, mut err) = (Utf8Chunks::default(), Utf8Chunks::default());
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tx.closed() => return,
        };
        let Some(ev) = ev else { break };
        let msg = match &ev {
            ExecEvent::Stdout(b) => Event::Stdout(out.push(b)),
            ExecEvent::Stderr(b) => Event::Stderr(err.push(b)),
            ExecEvent::Exit { .. } => {
                for e in rest_of_text(&mut out, &mut err, Event::Stdout, Event::Stderr) {
                    let _ = tx.send(send(e)).await;
                }
                match exit_status(&ev) {
                    Some(x) => Event::Exit(x),
                    None => continue,
                }
            }
        };
        if tx.send(send(msg)).await.is_err() {
            return;
        }
    }
}

/// The text still held back in stdout and stderr (an incomplete character at the very end), as
/// the events to send before the exit (made with `stdout` and `stderr`).
pub(crate) fn rest_of_text<E>(
    out: &mut Utf8Chunks,
    err: &mut Utf8Chunks,
    stdout: fn(String) -> E,
    stderr: fn(String) -> E,
) -> Vec<E> {
    let mut events = Vec::new();
    for (text, make) in [(out.finish(), stdout), (err.finish(), stderr)] {
        if !text.is_empty() {
            events.push(make(text));
        }
    }
    events
}
