//! A remote command's output and exit status, as `mpool exec` and `mpool run` pass them
//! through.

use std::process::ExitCode;

use mpool_api::proto::v1;

use crate::cli::{output, signal};

/// Passes remote output through. A closed pipe ends `mpool` quietly (see [`output`]); the
/// server then sees the call go away and stops the command.
pub fn write_out(stdout: bool, text: &str) {
    if stdout { output::text(text) } else { output::err_text(text) }
}

/// The exit code to exit with: the remote one, or 128+N for a signal, as shells do.
pub fn exit_code(x: &v1::ExitStatus) -> ExitCode {
    if x.code >= 0 {
        ExitCode::from(u8::try_from(x.code).unwrap_or(255))
    } else {
        ExitCode::from(signal::exit_code(&x.signal))
    }
}
