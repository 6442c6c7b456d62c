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
use crate::fleet::Fleet;
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
    let first = first_request(&a, inputs.files, &outputs)?;
    let waiting = Waiting::start(&a.pool);
    let (failed_tx, mut failed) = watch::channel(None);
    let call = client.run(inputs::requests(first, inputs.paths, failed_tx));
    let stream = tokio::select! {
        r = call => r.map_err(status_err)?.into_inner(),
        e = inputs::failure(&mut failed) => return Err(e),
    };
    follow(stream, waiting, failed, outputs).await
}

/// Runs `mpool run` on one of several hosts: the Run goes to the host [`Fleet::choose`] picks
/// (a host that cannot lease a VM in time is left for the next; the inputs are sent again).
pub async fn run_fleet(fleet: &mut Fleet, a: RunArgs) -> Result<ExitCode, String> {
    let inputs = inputs::Inputs::parse(&a.put)?;
    let outputs = Outputs::parse(&a.get)?;
    let wait = wait_flag(&a.wait)?;
    let first = first_request(&a, inputs.files, &outputs)?;
    let paths = inputs.paths;
    let waiting = Waiting::start(&a.pool);
    let chosen = fleet
        .choose(&a.pool, wait, |mut client, wait| {
            let first = v1::RunRequest { wait: wait.map(mpool_api::convert::proto_duration), ..first.clone() };
            let paths = paths.clone();
            async move {
                let (failed_tx, mut failed) = watch::channel(None);
                let call = client.run(inputs::requests(first, paths, failed_tx));
                let answer = tokio::select! {
                    r = call => Ok(r),
                    e = inputs::failure(&mut failed) => Err(e),
                };
                match answer {
                    Ok(r) => r.map(|stream| (stream.into_inner(), failed)),
                    Err(e) => Err(tonic::Status::cancelled(e)),
                }
            }
        })
        .await;
    let (_, (stream, failed)) = chosen.map_err(|e| e.to_string())?;
    follow(stream, waiting, failed, outputs).await
}

/// A Run's stream that failed after it started: a connection that broke (the host went away)
/// says so, since whether the command finished cannot be known; other failures as usual.
fn broken(s: tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Unavailable => format!(
            "Unavailable: the connection to mpool serve broke during the run ({}); whether the command finished \
             is unknown: run it again to be sure",
            s.message()
        ),
        _ => status_err(s),
    }
}

/// `--wait` as a duration.
pub fn wait_flag(wait: &Option<String>) -> Result<Option<std::time::Duration>, String> {
    wait.as_deref().map(|w| mpool_config::parse_duration(w).map_err(|e| format!("--wait {w:?}: {e}"))).transpose()
}

/// The Run's first message.
fn first_request(a: &RunArgs, files: Vec<v1::InputFile>, outputs: &Outputs) -> Result<v1::RunRequest, String> {
    Ok(v1::RunRequest {
        pool: a.pool.clone(),
        holder: "mpool run".into(),
        request_id: a.request_id.clone().unwrap_or_default(),
        command: command(a.argv.clone(), &a.env, a.workdir.clone(), &a.timeout)?,
        inputs: files,
        outputs: outputs.remotes(),
        wait: dur("--wait", &a.wait)?,
        ..Default::default()
    })
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
            ev = stream.message() => ev.map_err(broken)?,
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
            Some(Event::Dropped(d)) => eprintln!("{}", super::exec::dropped_marker(&d)),
            None => {}
        }
    }
    Err("the run ended without a result".into())
}
