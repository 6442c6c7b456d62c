//! The `mpool` command line.

/// Entry point of the `mpool` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
