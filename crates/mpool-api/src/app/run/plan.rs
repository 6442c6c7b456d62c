//! A Run's first message, checked: what to acquire, the command, the inputs to write and the
//! outputs to read, with the limit that applies to outputs. Everything a Run could refuse is
//! refused here, before a VM is taken out of the pool.

use mpool_core::store::RequestKind;
use mpool_engine::AcquireRequest;
use mpool_ssh::ExecRequest;

use super::super::error::AppError;
use super::super::validate::{self, MAX_FILES, MAX_HOLDER, MAX_ID};
use super::super::{Limits, command, scope};
use super::outputs::Outputs;
use crate::auth::Principal;
use crate::proto::v1;

/// A validated Run: what its task needs after the first message.
pub struct RunPlan {
    /// The command.
    pub exec: ExecRequest,
    /// The command runs as session [`super::RUN_SESSION`], which survives the Run's caller.
    pub keep: bool,
    /// The files to write before it, in order.
    pub inputs: Vec<v1::InputFile>,
    /// The files to read after it.
    pub outputs: Outputs,
}

/// Checks a Run's first message: the lease to ask for and the plan to run on it.
pub fn plan(p: Option<&Principal>, r: v1::RunRequest, limits: &Limits) -> Result<(AcquireRequest, RunPlan), AppError> {
    validate::required("pool", &r.pool)?;
    validate::capped("holder", &r.holder, MAX_HOLDER)?;
    validate::capped("request_id", &r.request_id, MAX_ID)?;
    scope::check_pool(p, &r.pool)?;
    if r.chunk.is_some() {
        return Err(AppError::invalid_argument(
            "the first message of a Run describes it; send input content as `chunk` messages after it \
             (or inline in inputs[].data)",
        ));
    }
    let exec = command::command(r.command, limits)?;
    let keep = match v1::OnDisconnect::try_from(r.on_disconnect) {
        Ok(v1::OnDisconnect::Keep) => true,
        Ok(_) => false,
        Err(_) => {
            return Err(AppError::invalid_argument(format!("on_disconnect {} is not CANCEL or KEEP", r.on_disconnect)));
        }
    };
    check_counts(r.inputs.len(), r.outputs.len())?;
    check_inputs(&r.inputs, limits.max_upload)?;
    check_outputs(&r.outputs)?;
    let (limit, limit_name) = output_limit(r.max_output_size, limits.max_download);
    let acquire = AcquireRequest {
        pool: r.pool,
        holder: if r.holder.is_empty() { "run".into() } else { r.holder },
        request_id: (!r.request_id.is_empty()).then_some(r.request_id),
        ttl: validate::duration("ttl", r.ttl.as_ref())?,
        wait: validate::duration("wait", r.wait.as_ref())?,
        owner: scope::acquirer(p),
        kind: RequestKind::Run,
    };
    let outputs = Outputs { paths: r.outputs, limit, limit_name };
    Ok((acquire, RunPlan { exec, keep, inputs: r.inputs, outputs }))
}

/// At most [`MAX_FILES`] inputs and outputs.
fn check_counts(inputs: usize, outputs: usize) -> Result<(), AppError> {
    for (what, n) in [("inputs", inputs), ("outputs", outputs)] {
        if n > MAX_FILES {
            return Err(AppError::invalid_argument(format!(
                "{what} lists {n} files; the limit is {MAX_FILES}: pack them (e.g. with tar) into fewer files"
            )));
        }
    }
    Ok(())
}

/// Every input has a usable path, and the inline content fits in `[api] max_upload`.
fn check_inputs(inputs: &[v1::InputFile], max_upload: u64) -> Result<(), AppError> {
    let mut inline: u64 = 0;
    for i in inputs {
        validate::required("inputs[].path", &i.path)?;
        mpool_ssh::resolve_remote_path(&i.path, None)?;
        let size = (i.data.len() as u64).saturating_add(i.text.len() as u64);
        inline = inline.saturating_add(size);
    }
    if inline > max_upload {
        return Err(AppError::resource_exhausted(format!(
            "inputs are {inline} bytes together, above the server's {max_upload} byte limit; send fewer or smaller \
             files, or ask the operator to raise [api] max_upload"
        )));
    }
    Ok(())
}

/// Every output is a usable path.
fn check_outputs(outputs: &[String]) -> Result<(), AppError> {
    for o in outputs {
        validate::required("outputs[]", o)?;
        mpool_ssh::resolve_remote_path(o, None)?;
    }
    Ok(())
}

/// The limit on each output: the request's `max_output_size` when it is below the server's
/// `[api] max_download` (0: the server's), and its name for messages.
fn output_limit(requested: u64, max_download: u64) -> (u64, &'static str) {
    match requested {
        0 => (max_download, "the server's [api] max_download"),
        n if n >= max_download => (max_download, "the server's [api] max_download"),
        n => (n, "the request's max_output_size"),
    }
}
