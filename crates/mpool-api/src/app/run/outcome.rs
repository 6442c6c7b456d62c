//! How a Run ended, as the engine records it with the lease's release, and the answer a retry
//! of the same request id gets from that record instead of running the command again.

use std::time::Duration;

use mpool_core::store::RunOutcome;

use super::super::error::AppError;
use super::Ran;
use crate::convert;
use crate::proto::v1;

/// How a Run ended, as the engine records it for retries with the same request id.
pub fn outcome_of(result: &Result<Ran, AppError>, vm: &str) -> RunOutcome {
    match result {
        Ok(ran) => of_exit(&ran.result.exit.clone().unwrap_or_default(), &ran.result.vm),
        Err(e) => RunOutcome {
            error: Some(format!("{:?}: {}", e.kind(), e.message())),
            vm: vm.to_string(),
            ..Default::default()
        },
    }
}

/// How a command that ended with `exit` on `vm` is recorded.
pub fn of_exit(exit: &v1::ExitStatus, vm: &str) -> RunOutcome {
    let duration = exit.duration.map(|d| {
        u64::try_from(d.seconds)
            .unwrap_or(0)
            .saturating_mul(1000)
            .saturating_add(u64::try_from(d.nanos / 1_000_000).unwrap_or(0))
    });
    RunOutcome {
        code: (exit.code >= 0).then_some(exit.code),
        signal: (!exit.signal.is_empty()).then(|| exit.signal.clone()),
        duration_ms: duration.unwrap_or(0),
        timed_out: exit.timed_out,
        cancelled: exit.cancelled,
        error: None,
        vm: vm.to_string(),
    }
}

/// The result a retried Run gets: the first run's exit status (its outputs are not kept), or
/// the error that ended it before its command finished.
pub fn replayed(o: &RunOutcome, lease: &str, request_id: &str) -> Result<v1::RunResult, AppError> {
    if o.code.is_none() && o.signal.is_none() {
        return Err(AppError::failed_precondition(format!(
            "the Run with request id {request_id:?} (lease {lease}) already ended without an exit status ({}); \
             use a new request id to run it again",
            o.error.as_deref().unwrap_or("no result recorded")
        )));
    }
    Ok(v1::RunResult {
        exit: Some(v1::ExitStatus {
            code: o.code.unwrap_or(-1),
            signal: o.signal.clone().unwrap_or_default(),
            duration: Some(convert::proto_duration(Duration::from_millis(o.duration_ms))),
            timed_out: o.timed_out,
            cancelled: o.cancelled,
        }),
        outputs: vec![],
        vm: o.vm.clone(),
        timings: None,
        served: v1::Served::Repeat as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_is_recorded_with_its_kind_and_replayed_as_failed() {
        let failed: Result<Ran, AppError> = Err(AppError::cancelled("the caller went away"));
        let o = outcome_of(&failed, "mpool-ci-abc");
        assert_eq!(o.error.as_deref(), Some("Cancelled: the caller went away"));
        let e = replayed(&o, "l-1", "r-1").unwrap_err();
        assert_eq!(e.kind(), crate::app::ErrorKind::FailedPrecondition);
        assert!(e.message().contains("(Cancelled: the caller went away)"), "{e}");
    }

    #[test]
    fn a_finished_run_is_replayed_with_its_exit() {
        let o = RunOutcome { code: Some(3), duration_ms: 1500, vm: "vm".into(), ..Default::default() };
        let r = replayed(&o, "l-1", "r-1").unwrap();
        assert_eq!(r.exit.as_ref().map(|x| x.code), Some(3));
        assert_eq!(r.served, v1::Served::Repeat as i32);
        assert_eq!(r.vm, "vm");
    }
}
