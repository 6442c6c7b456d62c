//! `mpool demo` (placeholder while it is written).
use std::process::ExitCode;

/// `mpool demo` flags.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> ExitCode {
    ExitCode::SUCCESS
}
