//! `cargo bench --bench suite [-- SCENARIO] [-- --quick]`: the `mpool bench` suite (see the
//! README's Performance section) with the `mpool` binary cargo built for this bench profile.
//! Without a scenario it runs them all.

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let quick = args.iter().any(|a| a == "--quick");
    let scenario = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "all".into());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mpool"));
    runtime.block_on(mpool::bench::run_with(exe, &scenario, quick, None))
}
