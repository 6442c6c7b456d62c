//! `exec NAME [-d DIR] -- ARGV`: runs a command in an instance over one SSH connection, as
//! `multipass exec` does: starts the instance first if it is not running, forwards our stdin
//! (closed at EOF), streams stdout and stderr as they arrive, and exits with the remote code.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::{Client, Error, Names};

use crate::cli::{output, signal};

/// `exec` flags.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Instance.
    name: String,
    /// Working directory in the instance.
    #[arg(short = 'd', long)]
    working_directory: Option<String>,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// Runs `exec`: ssh_info (starting the instance first if it is not running, as the multipass
/// CLI does), then one SSH connection streaming stdout/stderr; exits with the remote code.
pub async fn run(client: &Client, a: ExecArgs) -> Result<ExitCode, Error> {
    let info = match client.ssh_info(&a.name).await {
        Err(Error::Daemon { code: tonic::Code::Aborted, .. }) => {
            client.start(&Names::one(&a.name), 0).await?;
            client.ssh_info(&a.name).await?
        }
        other => other?,
    };
    let exec_err = |e: mpool_ssh::SshError| Error::InvalidArgument(format!("exec failed: {e}"));
    let conn = mpool_ssh::Connection::connect(&info, &mpool_ssh::SshOptions::default()).await.map_err(exec_err)?;
    let mut req = mpool_ssh::ExecRequest::argv(a.argv).stdin_stream(forward_stdin());
    if let Some(dir) = a.working_directory {
        req = req.cwd(dir);
    }
    let mut handle = conn.exec(req).await.map_err(exec_err)?;
    let code = relay(&mut handle).await;
    conn.close().await;
    Ok(ExitCode::from(code))
}

/// Our stdin as it arrives, for the remote command (as `multipass exec` forwards it): read on
/// a thread of its own (a terminal may never reach EOF; the process exits without waiting for
/// it), closed at EOF or on a read error.
fn forward_stdin() -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = bytes::Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("reading stdin: {e}");
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot forward stdin: {e}");
    }
    rx
}

/// Copies an exec's output to our stdout/stderr as it arrives (a closed pipe ends `mpool`
/// quietly, see [`output`], and with it the connection and the remote command); returns the exit code to exit
/// with (128+N for a signal, as shells do; 255 when the connection was lost).
async fn relay(handle: &mut mpool_ssh::ExecHandle) -> u8 {
    while let Some(ev) = handle.next_event().await {
        match ev {
            mpool_ssh::ExecEvent::Stdout(b) => output::bytes(&b),
            mpool_ssh::ExecEvent::Stderr(b) => output::err_bytes(&b),
            mpool_ssh::ExecEvent::Exit { code: Some(c), .. } => {
                return u8::try_from(c).unwrap_or(255);
            }
            mpool_ssh::ExecEvent::Exit { signal: Some(s), .. } => return signal::exit_code(&s),
            mpool_ssh::ExecEvent::Exit { .. } => return 255,
        }
    }
    255
}
