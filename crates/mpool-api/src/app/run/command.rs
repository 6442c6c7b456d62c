//! A Run's command: started on the lease (under its own use of it, with the exec id
//! `run-<lease>` so CancelExec can stop it), its stdout and stderr streamed as events, its exit
//! status kept for the result.

use mpool_ssh::{ExecEvent, ExecRequest};

use super::super::App;
use super::super::command::exit_status;
use super::super::error::AppError;
use super::super::exec::rest_of_text;
use super::super::utf8::Utf8Chunks;
use super::{Sender, event, gone};
use crate::auth::Principal;
use crate::proto::v1;
use v1::run_event::Event;

impl App {
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
