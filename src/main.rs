//! The `mpool` binary: see [`mpool::cli`].
fn main() -> std::process::ExitCode {
    mpool::cli::main()
}
