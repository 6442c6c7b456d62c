//! The output side of `mpool run`: each `--get REMOTE:LOCAL` file is received into a temporary
//! file beside its destination and renamed into place only when the result says it arrived
//! whole; the result also decides the exit code.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tempfile::NamedTempFile;

use mpool_api::proto::v1;

use super::super::remote::exit_code;
use crate::cli::output;

/// The `--get` files, in flag order (the server refers to them by index).
pub struct Outputs(Vec<Getting>);

/// An output file being received.
struct Getting {
    /// Path in the VM.
    remote: String,
    /// Where it goes.
    local: PathBuf,
    /// The temporary file beside `local`, from the first chunk on.
    file: Option<NamedTempFile>,
}

impl Outputs {
    /// Reads the `--get REMOTE:LOCAL` flags.
    pub fn parse(gets: &[String]) -> Result<Outputs, String> {
        let mut outputs = Vec::new();
        for g in gets {
            let (remote, local) = g.split_once(':').ok_or_else(|| format!("--get {g:?}: expected REMOTE:LOCAL"))?;
            outputs.push(Getting { remote: remote.to_string(), local: PathBuf::from(local), file: None });
        }
        Ok(Outputs(outputs))
    }

    /// The paths in the VM, for the request.
    pub fn remotes(&self) -> Vec<String> {
        self.0.iter().map(|g| g.remote.clone()).collect()
    }

    /// Appends a chunk to its output's temporary file (a chunk of no requested output is
    /// ignored).
    pub fn write(&mut self, c: &v1::OutputChunk) -> Result<(), String> {
        let Some(g) = self.0.get_mut(c.output as usize) else {
            return Ok(());
        };
        let f = match &mut g.file {
            Some(f) => f,
            None => g.file.insert(
                tempfile::Builder::new()
                    .prefix(".mpool-get-")
                    .tempfile_in(g.dir())
                    .map_err(|e| format!("--get {}: {e}", g.local.display()))?,
            ),
        };
        f.write_all(&c.data).map_err(|e| format!("--get {}: {e}", g.local.display()))
    }

    /// Puts each output that arrived whole in place (with its mode) and reports the others;
    /// returns the exit code: the remote one, but 2 when the command succeeded and an output
    /// could not be fetched (a missing file is reported, not a failure).
    pub fn finish(&mut self, r: &v1::RunResult) -> Result<ExitCode, String> {
        let code = r.exit.as_ref().map(exit_code).unwrap_or(ExitCode::from(255));
        let mut failed = false;
        for (f, g) in r.outputs.iter().zip(self.0.iter_mut()) {
            if f.missing {
                output::err_line(&format!("mpool: --get {}: no such file in the VM", f.path));
            } else if !f.error.is_empty() {
                output::err_line(&format!("mpool: --get {}: {}", f.path, f.error));
                failed = true;
            } else {
                g.persist(f.mode)?;
            }
        }
        let ok = r.exit.as_ref().is_some_and(|x| x.code == 0);
        Ok(if failed && ok { ExitCode::from(2) } else { code })
    }
}

impl Getting {
    /// The directory the output goes to (where its temporary file is made).
    fn dir(&self) -> &Path {
        self.local.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }

    /// Renames the received file into place (an empty one when no chunk came) and gives it
    /// `mode` (if the server sent one).
    fn persist(&mut self, mode: u32) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("--get {}: {e}", self.local.display());
        let file = match self.file.take() {
            Some(f) => f,
            None => NamedTempFile::new_in(self.dir()).map_err(|e| err(&e))?,
        };
        let file = file.persist(&self.local).map_err(|e| err(&e.error))?;
        if mode != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| err(&e))?;
        }
        Ok(())
    }
}
