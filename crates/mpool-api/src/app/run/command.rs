//! A Run's command: started on the lease (under its own use of it, with the exec id
//! `run-<lease>` so CancelExec can stop it), its stdout and stderr streamed as events, its exit
//! status kept for the result.

use mpool_ssh::{ExecEvent, ExecRequest};

use super::super::App;
use super::super::command::exit_status;
use futures::StreamExt;

use super::super::error::{AppError, ErrorKind};
use super::super::exec::rest_of_text;
use super::super::utf8::Utf8Chunks;
use super::{Sender, event, gone};
use crate::auth::Principal;
use crate::proto::v1;
use v1::run_event::Event;

impl App {
    /// Runs the command as session [`super::RUN_SESSION`] (started unless `exec` is `None`,
    /// then followed from its start, what it wrote before marked replayed), streaming its output
    /// into `tx`; its exit status. When the caller goes away the session runs on
    /// ([`RunEnd::Left`]).
    pub(super) async fn run_session(
        &self,
        lease_id: &str,
        p: Option<&Principal>,
        exec: Option<ExecRequest>,
        tx: &Sender,
    ) -> Result<v1::ExitStatus, RunEnd> {
        let (info, target, guard) = self.use_lease(lease_id, p).await?;
        let resume = exec.is_none();
        if let Some(exec) = &exec {
            self.start_session(&info, &target, exec, super::RUN_SESSION, true).await?;
        }
        let mut events = self.follow_session(&info, &target, super::RUN_SESSION, [0, 0], resume, guard).await.map_err(
            |e| match e.kind() {
                ErrorKind::NotFound => RunEnd::Failed(AppError::failed_precondition(format!(
                    "the Run on lease {lease_id} never started its command (it was interrupted before): \
                     use a new request id to run it again"
                ))),
                _ => RunEnd::Failed(e),
            },
        )?;
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let e = match ev.event {
                Some(v1::exec_event::Event::Stdout(t)) => Event::Stdout(t),
                Some(v1::exec_event::Event::Stderr(t)) => Event::Stderr(t),
                Some(v1::exec_event::Event::Dropped(d)) => Event::Dropped(d),
                Some(v1::exec_event::Event::Exit(x)) => return Ok(x),
                _ => continue,
            };
            let msg = v1::RunEvent { event: Some(e), replayed: ev.replayed };
            if tx.send(Ok(msg)).await.is_err() {
                return Err(RunEnd::Left);
            }
        }
        if tx.is_closed() {
            return Err(RunEnd::Left);
        }
        Err(RunEnd::Failed(AppError::unavailable(format!(
            "following the Run's command on lease {lease_id} ended without an exit status"
        ))))
    }

    /// Runs the command, streaming its output into `tx`; its exit status.
    pub(super) async fn run_command(
        &self,
        lease_id: &str,
        p: Option<&Principal>,
        exec: ExecRequest,
        tx: &Sender,
    ) -> Result<v1::ExitStatus, AppError> {
        let (info, target, guard) = self.use_lease(lease_id, p).await?;
        let vm = info.record.vm.clone();
        let mut events = self.start_exec(&info, &target, exec, format!("run-{lease_id}"), guard).await?;
        let (mut out, mut err) = (Utf8Chunks::default(), Utf8Chunks::default());
        let mut exit = None;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return Err(gone()),
            };
            let Some(ev) = ev else { break };
            let e = match &ev {
                ExecEvent::Stdout(b) => Event::Stdout(out.push(b)),
                ExecEvent::Stderr(b) => Event::Stderr(err.push(b)),
                ExecEvent::Exit { .. } => {
                    exit = exit_status(&ev);
                    continue;
                }
            };
            tx.send(Ok(event(e))).await.map_err(|_| gone())?;
        }
        for e in rest_of_text(&mut out, &mut err, Event::Stdout, Event::Stderr) {
            let _ = tx.send(Ok(event(e))).await;
        }
        exit.ok_or_else(|| {
            AppError::unavailable(format!(
                "the command's stream on {vm} ended without an exit status (the VM's SSH connection was lost)"
            ))
        })
    }
}

/// Why a Run's command gave no exit status.
pub enum RunEnd {
    /// It failed.
    Failed(AppError),
    /// The caller went away from a Run whose command runs on as a session: the lease stays
    /// (alive while the command runs) for a retry to attach to.
    Left,
}

impl From<AppError> for RunEnd {
    fn from(e: AppError) -> RunEnd {
        RunEnd::Failed(e)
    }
}
