//! Runs the command of an SSH `exec` request: `sh -c CMD` in the instance's root directory,
//! started by the instance's process supervisor in its own process group, with a login-like
//! environment plus what the client set; stdout and stderr streamed to the channel under its
//! flow control, channel data fed to stdin, SSH signals delivered to the process group, and
//! the exit status or exit signal reported. A channel that goes away, or an endpoint that
//! stops, terminates the command's process group.
//!
//! It must not start processes other than through the supervisor (everything a VM runs dies
//! with it), nor deal with connections, authentication or files; signal names and numbers
//! come from `mpool_ssh`'s one signal table.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

use super::{Ctx, USER, stopped};
use crate::vm_processes::{Command as VmCommand, Supervised};

/// `PATH` of the commands run over SSH.
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Time a process group gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Stdin bytes buffered for a command before the channel stops being read, while the
/// command's output is idle. See [`StdinFlow`].
const STDIN_SOFT_LIMIT: usize = 16 << 20;
/// Stdin bytes buffered for a command before the channel stops being read in any case.
const STDIN_HARD_LIMIT: usize = 128 << 20;
/// Read size of the stdout/stderr pumps.
const PUMP_BUF: usize = 32 * 1024;

/// How a command ended.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(u32),
    Signal { signal: i32, core_dumped: bool },
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code as u32),
            (None, Some(signal)) => Exit::Signal { signal, core_dumped: status.core_dumped() },
            (None, None) => Exit::Code(255),
        }
    }
}

/// Why the exec loop ended.
enum ExecEnd {
    /// The command exited and its output was sent.
    Finished(Exit),
    /// The client closed the channel or the session went away.
    ClientGone,
    /// The endpoint is shutting down.
    Shutdown,
}

/// Kills the process group with SIGKILL when dropped while armed (e.g. the task was aborted).
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Sends `signal` to process group `pgid`; true if it was delivered.
fn signal_group(pgid: i32, signal: i32) -> bool {
    // Never 0 or 1: kill(0) and kill(-1) would hit our own group or every process.
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`] if anything is left, leader reaped.
async fn terminate_group(pgid: i32, child: &mut Supervised, leader_exited: bool) {
    signal_group(pgid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    if !leader_exited {
        let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    }
    while signal_group(pgid, 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_group(pgid, libc::SIGKILL);
    if !leader_exited && tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        warn!(pgid, "command did not exit after SIGKILL");
    }
}

/// The SSH form of a signal a command died of, for its exit-signal message (a number
/// without a name travels as its digits).
fn exit_signal(signal: i32) -> Sig {
    match mpool_ssh::signal_name_of(signal) {
        Some(name) => mpool_ssh::sig_from_name(name),
        None => Sig::Custom(signal.to_string()),
    }
}

/// Flow control between a channel's incoming data and the command's stdin.
///
/// russh's server grants the client more window as data arrives, not as the command
/// consumes it, so the only brake on stdin is to stop reading the channel, which stops the
/// reader of the whole connection until the command catches up. That is harmless while the
/// command's output is idle, so then stdin is buffered up to [`STDIN_SOFT_LIMIT`] only. But
/// while output is being sent, a stopped reader can deadlock: the client's window
/// adjustment that the output waits for may sit behind stdin data in the same TCP stream
/// (command blocked on stdout, output on window, reader on stdin). So while an output pump
/// is sending, stdin is buffered up to [`STDIN_HARD_LIMIT`]; only a client that floods
/// stdin without reading the output (which deadlocks against sshd as well) reaches it.
#[derive(Default)]
struct StdinFlow {
    /// Bytes handed to the stdin writer and not yet written to the pipe.
    buffered: AtomicUsize,
    /// Output pumps currently sending to the channel.
    pumps_sending: AtomicUsize,
    /// Signalled when either count changes in a way that may allow more stdin.
    changed: Notify,
}

impl StdinFlow {
    fn can_accept(&self) -> bool {
        let buffered = self.buffered.load(Ordering::SeqCst);
        buffered < STDIN_SOFT_LIMIT || (self.pumps_sending.load(Ordering::SeqCst) > 0 && buffered < STDIN_HARD_LIMIT)
    }
}

/// Copies a child's output pipe to the channel; the channel writer waits for window space,
/// so a slow client slows the command down instead of growing a buffer.
async fn pump(mut src: impl AsyncRead + Unpin, mut dst: impl AsyncWrite + Unpin, flow: Arc<StdinFlow>) {
    let mut buf = vec![0u8; PUMP_BUF];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                debug!("reading command output failed: {e}");
                return;
            }
        };
        let Some(chunk) = buf.get(..n) else { return };
        flow.pumps_sending.fetch_add(1, Ordering::SeqCst);
        flow.changed.notify_one();
        let sent = dst.write_all(chunk).await;
        flow.pumps_sending.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = sent {
            debug!("sending command output failed: {e}");
            return;
        }
    }
}

/// Writes queued channel data to the child's stdin; closes stdin when the queue closes.
async fn feed_stdin(
    mut stdin: tokio::net::unix::pipe::Sender,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    flow: Arc<StdinFlow>,
) {
    while let Some(chunk) = rx.recv().await {
        let written = stdin.write_all(&chunk).await;
        flow.buffered.fetch_sub(chunk.len(), Ordering::SeqCst);
        flow.changed.notify_one();
        if let Err(e) = written {
            debug!("writing command stdin failed: {e}");
            return;
        }
    }
}

/// Hands `data` to the stdin writer if the buffer has room, or gives it back to be held
/// (and the channel not read) until it has. Data for a closed stdin is dropped, as a pipe
/// nobody reads would.
fn offer_stdin(queue: &mut Option<mpsc::UnboundedSender<Bytes>>, flow: &StdinFlow, data: Bytes) -> Option<Bytes> {
    let tx = queue.as_ref()?;
    if tx.is_closed() {
        *queue = None;
        return None;
    }
    if !flow.can_accept() {
        return Some(data);
    }
    let len = data.len();
    flow.buffered.fetch_add(len, Ordering::SeqCst);
    if tx.send(data).is_err() {
        flow.buffered.fetch_sub(len, Ordering::SeqCst);
        *queue = None;
    }
    None
}

/// Runs `sh -c command` for an exec request and serves the channel until it ends.
pub(super) async fn run_exec(
    mut rx: ChannelReadHalf,
    tx: ChannelWriteHalf<Msg>,
    handle: russh::server::Handle,
    ctx: &Ctx,
    shutdown: &mut watch::Receiver<bool>,
    command: Vec<u8>,
    env: Vec<(String, String)>,
) {
    let id = tx.id();
    debug!(command = %String::from_utf8_lossy(&command), "ssh exec");
    let var = |k: &str, v: &std::ffi::OsStr| {
        let mut kv = OsString::from(k);
        kv.push("=");
        kv.push(v);
        kv
    };
    let mut vars = vec![
        var("HOME", ctx.root.as_os_str()),
        var("USER", USER.as_ref()),
        var("LOGNAME", USER.as_ref()),
        var("SHELL", "/bin/sh".as_ref()),
        var("PATH", PATH_ENV.as_ref()),
    ];
    for (k, v) in env {
        // A later definition of a name replaces an earlier one, as with `Command::envs`.
        let prefix = format!("{k}=");
        vars.retain(|kv| !kv.as_bytes().starts_with(prefix.as_bytes()));
        vars.push(var(&k, v.as_ref()));
    }
    let cmd = VmCommand {
        program: "/bin/sh".into(),
        args: vec!["sh".into(), "-c".into(), OsString::from_vec(command)],
        env: vars,
        cwd: ctx.root.clone(),
    };
    let mut child = match ctx.processes.spawn(&cmd).await {
        Ok(child) => child,
        Err(e) => {
            warn!("cannot start command: {e}");
            let msg = format!("mpool sim: cannot start command: {e}\n");
            let _ = tx.extended_data_bytes(1, Bytes::from(msg)).await;
            let _ = tx.exit_status(127).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
    };
    let pgid = child.pid;
    let mut guard = GroupGuard { pgid, armed: true };

    let flow = Arc::new(StdinFlow::default());
    let stdout_pump = child.stdout.take().map(|out| tokio::spawn(pump(out, tx.make_writer(), flow.clone())));
    let stderr_pump = child.stderr.take().map(|err| tokio::spawn(pump(err, tx.make_writer_ext(Some(1)), flow.clone())));
    let pump_aborts: Vec<_> = stdout_pump.iter().chain(stderr_pump.iter()).map(|h| h.abort_handle()).collect();
    let mut output_done = Box::pin(async move {
        if let Some(h) = stdout_pump {
            let _ = h.await;
        }
        if let Some(h) = stderr_pump {
            let _ = h.await;
        }
    });

    let (stdin_queue, stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let stdin_task = child.stdin.take().map(|stdin| tokio::spawn(feed_stdin(stdin, stdin_rx, flow.clone())));
    let mut stdin_queue = stdin_task.as_ref().map(|_| stdin_queue);
    // Data held back (and the channel not read) until the stdin buffer has room.
    let mut pending: Option<Bytes> = None;
    let mut exit: Option<Exit> = None;
    let mut outputs_finished = false;

    let end = loop {
        if let (Some(exit), true) = (exit, outputs_finished) {
            break ExecEnd::Finished(exit);
        }
        tokio::select! {
            status = child.wait(), if exit.is_none() => {
                exit = Some(Exit::from(status));
                // Nobody reads stdin any more (background jobs excepted): close it.
                stdin_queue = None;
                pending = None;
                if let Some(task) = &stdin_task {
                    task.abort();
                }
            }
            _ = &mut output_done, if !outputs_finished => outputs_finished = true,
            _ = flow.changed.notified(), if pending.is_some() => {
                if let Some(data) = pending.take() {
                    pending = offer_stdin(&mut stdin_queue, &flow, data);
                }
            }
            msg = rx.wait(), if pending.is_none() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    pending = offer_stdin(&mut stdin_queue, &flow, data);
                    if pending.is_some() {
                        debug!(
                            buffered = flow.buffered.load(Ordering::SeqCst),
                            "stdin buffer full: pausing the channel"
                        );
                    }
                }
                Some(ChannelMsg::Eof) => stdin_queue = None,
                Some(ChannelMsg::Signal { signal }) => {
                    let name = mpool_ssh::signal_name(&signal);
                    match mpool_ssh::signal_number(name) {
                        Some(number) => {
                            debug!(pgid, signal = name, "delivering signal");
                            signal_group(pgid, number);
                        }
                        None => debug!(signal = name, "unknown signal ignored"),
                    }
                }
                Some(ChannelMsg::Close) | None => break ExecEnd::ClientGone,
                Some(_) => {}
            },
            _ = stopped(shutdown) => break ExecEnd::Shutdown,
        }
    };

    if let Some(task) = &stdin_task {
        task.abort();
    }
    match end {
        ExecEnd::Finished(exit) => {
            guard.armed = false;
            match exit {
                Exit::Code(code) => {
                    let _ = tx.exit_status(code).await;
                }
                Exit::Signal { signal, core_dumped } => {
                    let _ = handle
                        .exit_signal_request(id, exit_signal(signal), core_dumped, String::new(), "en".into())
                        .await;
                }
            }
            let _ = tx.eof().await;
            let _ = tx.close().await;
            // What it left running in the background keeps running, as under sshd, until
            // the instance stops (its supervisor then kills it).
        }
        ExecEnd::ClientGone | ExecEnd::Shutdown => {
            debug!(pgid, "channel gone or endpoint stopping: terminating command");
            terminate_group(pgid, &mut child, exit.is_some()).await;
            guard.armed = false;
            for abort in &pump_aborts {
                abort.abort();
            }
            if matches!(end, ExecEnd::Shutdown) {
                let _ = tx.close().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_signals_carry_the_tables_names() {
        assert!(matches!(exit_signal(libc::SIGTERM), Sig::TERM));
        assert!(matches!(exit_signal(libc::SIGUSR2), Sig::Custom(ref n) if n == "USR2"));
        assert!(matches!(exit_signal(4242), Sig::Custom(ref n) if n == "4242"));
    }
}
