//! How `mpool multipass` verbs print a reply: JSON with `--json`, the multipass CLI's text
//! otherwise, always through [`output`] (a closed pipe ends the command quietly).

use std::process::ExitCode;

use mpool_multipass::Error;

use crate::cli::output;

/// Whether to print JSON (`--json`) or text.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    /// `--json`.
    pub json: bool,
}

impl Reply {
    /// Prints `value` as JSON with `--json`, else calls `text` to print it as the multipass CLI
    /// does.
    pub fn show<T: serde::Serialize>(self, value: &T, text: impl FnOnce()) {
        if self.json { json(value) } else { text() }
    }

    /// The reply of a verb that only reports success: `{"ok": true, "message": ...}` with
    /// `--json`, else the message on a line of its own (nothing when it is empty).
    pub fn done(self, message: impl Into<String>) -> Result<ExitCode, Error> {
        let message = message.into();
        if self.json {
            json(&serde_json::json!({ "ok": true, "message": message }));
        } else if !message.is_empty() {
            output::line(&message);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Prints `v` as pretty JSON on lines of its own.
pub fn json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => output::line(&s),
        Err(e) => output::err_line(&format!("cannot encode JSON: {e}")),
    }
}

/// A state as the multipass CLI names it (`SUSPENDING` -> `Suspending`, `DELAYED_SHUTDOWN` ->
/// `Delayed shutdown`).
pub fn title(s: &str) -> String {
    let lower = s.to_lowercase().replace('_', " ");
    let mut c = lower.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
