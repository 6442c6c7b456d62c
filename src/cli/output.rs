//! Output for the CLI that ends quietly on a closed pipe.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`mpool vms | head -1`: Rust
//! ignores SIGPIPE, so the write fails with EPIPE and the macro panics). Every line the CLI prints
//! goes through these helpers instead: a closed pipe ends the process at once with exit code 0 and
//! no message (the reader took what it wanted); any other write error is ignored, as `print!`
//! would have panicked on it too and there is nowhere left to report it.

use std::io::Write;

fn write(mut w: impl Write, bytes: &[u8]) {
    let r = w.write_all(bytes).and_then(|()| w.flush());
    if let Err(e) = r
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Writes `text` and a newline to stdout.
pub fn line(text: &str) {
    let mut s = String::with_capacity(text.len() + 1);
    s.push_str(text);
    s.push('\n');
    write(std::io::stdout().lock(), s.as_bytes());
}

/// Writes `text` to stdout as is (no newline) and flushes.
pub fn text(text: &str) {
    bytes(text.as_bytes());
}

/// Writes `bytes` to stdout as they are (a remote command's output) and flushes.
pub fn bytes(bytes: &[u8]) {
    write(std::io::stdout().lock(), bytes);
}

/// Writes `text` and a newline to stderr.
pub fn err_line(text: &str) {
    let mut s = String::with_capacity(text.len() + 1);
    s.push_str(text);
    s.push('\n');
    write(std::io::stderr().lock(), s.as_bytes());
}

/// Writes `text` to stderr as is (no newline) and flushes.
pub fn err_text(text: &str) {
    err_bytes(text.as_bytes());
}

/// Writes `bytes` to stderr as they are (a remote command's output) and flushes.
pub fn err_bytes(bytes: &[u8]) {
    write(std::io::stderr().lock(), bytes);
}
