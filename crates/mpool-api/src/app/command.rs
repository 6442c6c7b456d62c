//! A command as the API describes it (argv or a script, env, workdir, stdin, timeout), checked
//! and turned into an SSH exec request; and a command's exit as the API reports it.

use mpool_ssh::{ExecEvent, ExecRequest, ScriptShell};

use super::Limits;
use super::error::AppError;
use super::validate::{self, MAX_ENV, MAX_PATH};
use crate::convert;
use crate::proto::v1;

/// Turns the API's command into an SSH exec request, validating everything.
pub fn command(cmd: Option<v1::Command>, limits: &Limits) -> Result<ExecRequest, AppError> {
    let cmd = cmd.ok_or_else(|| {
        AppError::invalid_argument("command is required: give argv (e.g. [\"uname\", \"-a\"]) or a script")
    })?;
    let req = match (cmd.argv.is_empty(), cmd.script.is_empty()) {
        (true, true) => {
            return Err(AppError::invalid_argument("empty command: give argv (e.g. [\"uname\", \"-a\"]) or a script"));
        }
        (false, false) => return Err(AppError::invalid_argument("give either argv or script, not both")),
        (false, true) => argv(cmd.argv, cmd.stdin, limits)?,
        (true, false) => script(cmd.script, cmd.shell, &cmd.stdin)?,
    };
    let req = environment(req, cmd.env, &cmd.workdir)?;
    timeout(req, cmd.timeout.as_ref())
}

/// An argv command, with its stdin.
fn argv(argv: Vec<String>, stdin: Vec<u8>, limits: &Limits) -> Result<ExecRequest, AppError> {
    let size: usize = argv.iter().map(String::len).sum();
    if size > limits.max_argv {
        return Err(AppError::invalid_argument(format!(
            "argv is {size} bytes; the limit is {} (send large inputs with Upload)",
            limits.max_argv
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(AppError::invalid_argument(
            "argv elements cannot contain NUL bytes; pass binary data as stdin or with Upload",
        ));
    }
    let r = ExecRequest::argv(argv);
    Ok(if stdin.is_empty() { r } else { r.stdin(stdin) })
}

/// A script, sent to the shell on stdin (so it cannot have stdin of its own).
fn script(script: String, shell: i32, stdin: &[u8]) -> Result<ExecRequest, AppError> {
    if !stdin.is_empty() {
        return Err(AppError::invalid_argument("a script is sent on stdin: it cannot have stdin of its own"));
    }
    let shell = match v1::ScriptShell::try_from(shell).unwrap_or(v1::ScriptShell::Unspecified) {
        v1::ScriptShell::Sh => ScriptShell::Sh,
        _ => ScriptShell::Bash,
    };
    Ok(ExecRequest::script(shell, script))
}

/// The command's environment (sorted by name) and working directory.
fn environment(
    mut req: ExecRequest,
    env: std::collections::HashMap<String, String>,
    workdir: &str,
) -> Result<ExecRequest, AppError> {
    let env_size: usize = env.iter().map(|(k, v)| k.len().saturating_add(v.len())).fold(0, usize::saturating_add);
    if env_size > MAX_ENV {
        return Err(AppError::invalid_argument(format!(
            "command.env is {env_size} bytes (names and values); the limit is {MAX_ENV} bytes: pass large values as files"
        )));
    }
    validate::capped("command.workdir", workdir, MAX_PATH)?;
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    for (k, v) in env {
        if !mpool_ssh::quote::is_valid_env_name(&k) {
            return Err(AppError::invalid_argument(format!(
                "env name {k:?} is invalid: use letters, digits and underscores, not starting with a digit"
            )));
        }
        req = req.env(k, v);
    }
    if !workdir.is_empty() {
        req = req.cwd(workdir.to_string());
    }
    Ok(req)
}

/// The command's time limit, if any (zero is refused: omitting it means no limit).
fn timeout(req: ExecRequest, timeout: Option<&crate::proto::Duration>) -> Result<ExecRequest, AppError> {
    match validate::duration("command.timeout", timeout)? {
        Some(t) if t.is_zero() => {
            Err(AppError::invalid_argument("command.timeout must be above zero (omit it for no limit)"))
        }
        Some(t) => Ok(req.timeout(t)),
        None => Ok(req),
    }
}

/// The API's exit status of an exec's `Exit` event (`None` for output events).
pub fn exit_status(ev: &ExecEvent) -> Option<v1::ExitStatus> {
    match ev {
        ExecEvent::Exit { code, signal, duration, timed_out, cancelled } => Some(v1::ExitStatus {
            code: code.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1),
            signal: signal.clone().unwrap_or_default(),
            duration: Some(convert::proto_duration(*duration)),
            timed_out: *timed_out,
            cancelled: *cancelled,
        }),
        _ => None,
    }
}
