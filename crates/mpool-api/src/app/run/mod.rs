//! Run, the one-call use case: acquire a VM, write the inputs, run the command, read the
//! outputs, release, all in one stream of events (`lease`, output, `result`). The Run owns its
//! lease: it is released when the Run ends, however it ends, with how it ended recorded, so a
//! retry with the same request id (Kestra re-runs a task) gets the first run's result instead of
//! running the command again.
//!
//! `plan` checks the first message, `pending` acquires, `inputs`, `command` and `outputs` do the
//! work on the lease, `outcome` records and replays.

mod command;
mod inputs;
pub(super) mod outcome;
mod outputs;
mod pending;
mod plan;

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use mpool_engine::{EngineError, LeaseInfo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::AppError;
use super::{App, Events, scope};
use crate::auth::Principal;
use crate::convert;
use crate::proto::v1;
use command::RunEnd;
use inputs::Chunks;
use pending::PendingAcquire;
use plan::RunPlan;
use v1::run_event::Event;

/// The session a Run with `on_disconnect = KEEP` runs its command as (one Run per lease).
pub const RUN_SESSION: &str = "run";

/// Where a Run's events go.
type Sender = mpsc::Sender<Result<v1::RunEvent, AppError>>;

/// An event.
fn event(e: Event) -> v1::RunEvent {
    v1::RunEvent { event: Some(e), replayed: false }
}

/// The Run's caller went away.
fn gone() -> AppError {
    AppError::cancelled("the caller went away")
}

/// What a Run did on its lease: the result (without timings and served) and how long each part
/// took.
pub struct Ran {
    /// The exit status, the outputs' listing and the VM.
    pub result: v1::RunResult,
    /// Writing the inputs.
    pub upload: Duration,
    /// The command.
    pub exec: Duration,
    /// Reading the outputs.
    pub download: Duration,
}

/// When the Run started and how long its acquire took.
#[derive(Clone, Copy)]
struct Clock {
    started: Instant,
    acquire: Duration,
}

impl App {
    /// Runs over any stream of request messages (the first describes the Run, the rest carry
    /// input chunks): checks the first message, acquires, then streams the events of the run.
    /// Dropping the returned stream cancels the Run (its lease is released).
    pub async fn run<S>(&self, p: Option<&Principal>, mut input: S) -> Result<Events<v1::RunEvent>, AppError>
    where
        S: Stream<Item = Result<v1::RunRequest, AppError>> + Send + Unpin + 'static,
    {
        let first = input.next().await.ok_or_else(|| {
            AppError::invalid_argument(
                "empty Run: the first message needs pool and command (then input chunks, if any)",
            )
        })??;
        let (acquire, plan) = plan::plan(p, first, &self.limits)?;
        self.check_open(p, &acquire.pool, acquire.request_id.as_deref()).await?;
        let keep = plan.keep;
        let pool = acquire.pool.clone();
        let started = Instant::now();
        let acquired = PendingAcquire::start(&self.engine, acquire, scope::owner(p)).wait().await;
        self.metrics.acquired(&pool, acquired.as_ref().ok().map(|i| i.served), started.elapsed());
        let lease = match acquired {
            Ok(lease) => lease,
            // A retry of a Run that already ran: its recorded result, never a second run.
            Err(EngineError::RequestEnded { outcome: Some(o), lease, request_id }) => {
                let result = outcome::replayed(&o, &lease, &request_id)?;
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(Ok(event(Event::Result(result))));
                return Ok(ReceiverStream::new(rx));
            }
            // A retry of a KEEP Run whose command runs on: it attaches to it.
            Err(EngineError::InProgress { lease, .. }) if keep && !lease.is_empty() => {
                let info = self.engine.begin_use(&lease, scope::owner(p)).await?;
                self.engine.end_use(&lease).await;
                // The retry's input chunks are not needed (the first attempt wrote the inputs).
                tokio::spawn(async move { while input.next().await.is_some() {} });
                let clock = Clock { started, acquire: started.elapsed() };
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(self.clone().run_leased::<S>(p.cloned(), info, plan, None, clock, tx));
                return Ok(ReceiverStream::new(rx));
            }
            Err(e) => return Err(e.into()),
        };
        let clock = Clock { started, acquire: started.elapsed() };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().run_leased(p.cloned(), lease, plan, Some(Chunks::new(input)), clock, tx));
        Ok(ReceiverStream::new(rx))
    }

    /// The Run once it has its lease: announces the lease, does the work, releases the lease
    /// with the outcome, and sends the result (or the error that ended the Run). Without
    /// `chunks`, it resumes a KEEP Run whose command was started by an earlier attempt. A KEEP
    /// Run whose caller went away leaves its lease to the command (and a retry).
    async fn run_leased<S>(
        self,
        p: Option<Principal>,
        lease: LeaseInfo,
        plan: RunPlan,
        chunks: Option<Chunks<S>>,
        clock: Clock,
        tx: Sender,
    ) where
        S: Stream<Item = Result<v1::RunRequest, AppError>> + Unpin,
    {
        let lease_id = lease.record.id.clone();
        let _ = tx.send(Ok(event(Event::Lease(convert::lease(&lease))))).await;
        let result = match self.run_on_lease(&lease_id, p.as_ref(), plan, chunks, &tx).await {
            Ok(ran) => Ok(ran),
            Err(RunEnd::Failed(e)) => Err(e),
            Err(RunEnd::Left) => {
                tracing::info!(lease = %lease_id, "the Run's caller went away; its command runs on for a retry to attach to");
                return;
            }
        };
        // Recorded with the release, so a retry with the same request id gets it.
        let outcome = outcome::outcome_of(&result, &lease.record.vm);
        if let Err(e) = self.engine.release_with_outcome(&lease_id, scope::owner(p.as_ref()), outcome).await {
            tracing::warn!(lease = %lease_id, "releasing after Run: {e}");
        }
        let _ = tx.send(result.map(|ran| event(Event::Result(finished(ran, &lease, clock))))).await;
    }

    /// The Run on its lease: inputs, command, outputs (without `chunks`: the command an earlier
    /// attempt started, then outputs). An error before the command ran fails the Run; once it
    /// ran, the result always carries its exit status.
    async fn run_on_lease<S>(
        &self,
        lease_id: &str,
        p: Option<&Principal>,
        plan: RunPlan,
        chunks: Option<Chunks<S>>,
        tx: &Sender,
    ) -> Result<Ran, RunEnd>
    where
        S: Stream<Item = Result<v1::RunRequest, AppError>> + Unpin,
    {
        // This use of the lease covers inputs and outputs; the exec takes its own.
        let (info, target, _guard) = self.use_lease(lease_id, p).await?;
        let vm = info.record.vm.clone();
        let t = Instant::now();
        let RunPlan { exec, keep, inputs, outputs } = plan;
        let resume = chunks.is_none();
        if let Some(mut chunks) = chunks {
            self.write_inputs(&vm, &target, &inputs, &mut chunks).await?;
        }
        let upload = t.elapsed();
        let t = Instant::now();
        let exit = if keep {
            self.run_session(lease_id, p, (!resume).then_some(exec), tx).await?
        } else {
            self.run_command(lease_id, p, exec, tx).await?
        };
        let exec = t.elapsed();
        let t = Instant::now();
        let outputs = match self.send_outputs(&vm, &target, &outputs, tx).await {
            Some(outputs) => outputs,
            // A KEEP Run's caller went away after its command: a retry reads them again.
            None if keep => return Err(RunEnd::Left),
            None => return Err(gone().into()),
        };
        let download = t.elapsed();
        let result = v1::RunResult { exit: Some(exit), outputs, vm, timings: None, served: 0 };
        Ok(Ran { result, upload, exec, download })
    }
}

/// The Run's result with how its lease was served and its timings.
fn finished(ran: Ran, lease: &LeaseInfo, clock: Clock) -> v1::RunResult {
    let d = |d: Duration| Some(convert::proto_duration(d));
    v1::RunResult {
        served: convert::served(lease.served) as i32,
        timings: Some(v1::Timings {
            acquire: d(clock.acquire),
            upload: d(ran.upload),
            exec: d(ran.exec),
            download: d(ran.download),
            total: d(clock.started.elapsed()),
        }),
        ..ran.result
    }
}
