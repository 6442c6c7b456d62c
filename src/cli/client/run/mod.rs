//! `mpool run --pool P [--put LOCAL:REMOTE]... [--get REMOTE:LOCAL]... -- ARGV`: a command in a
//! clean VM in one call (the server acquires, copies the inputs in, runs, sends the outputs
//! back, releases). Streams `--put` files in (`inputs.rs`) and `--get` files out
//! (`outputs.rs`), passes the output through, and exits with the remote exit code.

mod inputs;
mod outputs;

use std::process::ExitCode;

use clap::Args;
use tokio::sync::watch;

use mpool_api::proto::v1;

use super::Client;
use super::flags::{command, dur};
use super::print::status_err;
use super::remote::write_out;
use super::waiting::Waiting;
use outputs::Outputs;

/// `mpool run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Pool.
    #[arg(long)]
    pool: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the VM.
    #[arg(long)]
    workdir: Option<String>,
    /// Copy a local file into the VM first (repeatable).
    #[arg(long = "put", value_name = "LOCAL:REMOTE")]
    put: Vec<String>,
    /// Copy a file out of the VM afterwards (repeatable).
    #[arg(long = "get", value_name = "REMOTE:LOCAL")]
    get: Vec<String>,
    /// Kill the command after this long, e.g. 10m.
    #[arg(long)]
    timeout: Option<String>,
    /// Wait at most this long for a VM.
    #[arg(long)]
    wait: Option<String>,
    /// Idempotency key.
    #[arg(long)]
    request_id: Option<String>,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// Runs `mpool run`.
pub async fn run(client: &mut Client, a: RunArgs) -> Result<ExitCode, String> {
    let inputs = inputs::Inputs::parse(&a.put)?;
    let outputs = Outputs::parse(&a.get)?;
    let first = v1::RunRequest {
        pool: a.pool.clone(),
        holder: "mpool run".into(),
        request_id: a.request_id.unwrap_or_default(),
        command: command(a.argv, &a.env, a.workdir, &a.timeout)?,
        inputs: inputs.files,
        outputs: outputs.remotes(),
        wait: dur("--wait", &a.wait)?,
        ..Default::default()
    };
    let waiting = Waiting::start(&a.pool);
    let (failed_tx, mut failed) = watch::channel(None);
    let call = client.run(inputs::requests(first, inputs.paths, failed_tx));
    let stream = tokio::select! {
        r = call => r.map_err(status_err)?.into_inner(),
        e = inputs::failure(&mut failed) => return Err(e),
    };
    follow(stream, waiting, failed, outputs).await
}

/// Follows the Run's events to its result: the lease ends the wait, output passes through,
/// output files are written. A `--put` file that cannot be read ends it with that error
/// (dropping the call cancels the Run on the server: no command runs with a partial input).
async fn follow(
    mut stream: tonic::Streaming<v1::RunEvent>,
    waiting: Waiting,
    mut failed: watch::Receiver<Option<String>>,
    mut outputs: Outputs,
) -> Result<ExitCode, String> {
    let mut waiting = Some(waiting);
    loop {
        let ev = tokio::select! {
            ev = stream.message() => ev.map_err(status_err)?,
            e = inputs::failure(&mut failed) => return Err(e),
        };
        let Some(ev) = ev else { break };
        use v1::run_event::Event;
        match ev.event {
            Some(Event::Lease(_)) => drop(waiting.take()),
            Some(Event::Stdout(t)) => write_out(true, &t),
            Some(Event::Stderr(t)) => write_out(false, &t),
            Some(Event::Output(c)) => outputs.write(&c)?,
            Some(Event::Result(r)) => return outputs.finish(&r),
            None => {}
        }
    }
    Err("the run ended without a result".into())
}
