//! Remote commands: [`ExecRequest`] in, a stream of [`ExecEvent`]s out ([`ExecHandle`]).
//!
//! How a command runs: the exec string (built by [`super::quote`]) prints a marker line with the
//! shell's PID on stderr, `cd`s, exports the environment and `exec`s the program, so the program
//! keeps that PID. sshd starts every session with `setsid()`, so the PID is also the process-group
//! id of the command and all its children. The marker line is stripped from stderr.
//!
//! Cancel, timeout, dropping the handle and closing the connection stop the remote command for
//! real: a `signal TERM` channel request, then a script on a second channel of the same
//! connection that sends `TERM` to the process group and `KILL` after
//! [`super::SshOptions::kill_grace`]; the stream ends when the command's channel closes (mpool
//! closes it itself after a deadline). Without a PTY, OpenSSH kills nothing when a channel
//! closes, and it honours `signal` requests only under post-auth privilege separation, which it
//! skips for root logins (sshd logs "session signalling requires privilege separation"), hence
//! the second channel. Processes that leave the process group (`setsid`, double-forked daemons)
//! survive; processes of other users (under `sudo`) only get what `sudo` relays.
//!
//! Back-pressure: events go through a bounded channel ([`super::SshOptions::event_buffer`]); the
//! SSH channel is read only when the consumer has room. Note that russh delivers all channels of a
//! connection from one task and opens the SSH window as data arrives, so a consumer that stops
//! reading eventually stalls the other channels of the same connection too.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::connection::{Connection, TaskGuard};
use super::error::SshError;
use super::quote::{self, CommandLine};
use super::stream::{ExecTask, PidMarker};

/// The shell that reads a script from stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptShell {
    /// `bash -s`.
    Bash,
    /// `sh -s` (POSIX).
    Sh,
}

impl ScriptShell {
    fn program(self) -> &'static str {
        match self {
            ScriptShell::Bash => "bash",
            ScriptShell::Sh => "sh",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
enum Program {
    Argv(Vec<String>),
    Script { shell: ScriptShell, script: Bytes, args: Vec<String> },
}

/// A command to run in the VM, built with [`ExecRequest::argv`], [`ExecRequest::shell`] or
/// [`ExecRequest::script`] and the builder methods.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    program: Program,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<Bytes>,
    /// Stdin streamed from a channel (taken by the first exec of this request or its clones).
    stdin_stream: Option<Arc<std::sync::Mutex<Option<mpsc::Receiver<Bytes>>>>>,
    timeout: Option<Duration>,
}

/// What a command reads on stdin.
pub(crate) enum Stdin {
    /// Nothing: closed at once.
    None,
    /// These bytes, then EOF.
    Bytes(Bytes),
    /// What arrives on the channel, then EOF when it closes.
    Stream(mpsc::Receiver<Bytes>),
}

impl ExecRequest {
    /// Runs a program with arguments; every element is quoted, so nothing in them is
    /// interpreted by the remote shell. The program is looked up on the remote `PATH` (exit 127
    /// if absent; it must be an executable, not a shell builtin).
    pub fn argv<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest::with(Program::Argv(argv.into_iter().map(Into::into).collect()))
    }

    /// Runs a line of POSIX shell code: `sh -c LINE` (the line is interpreted, by design).
    pub fn shell(line: impl Into<String>) -> ExecRequest {
        ExecRequest::argv(["sh".to_string(), "-c".to_string(), line.into()])
    }

    /// Runs a script by sending it on stdin to `bash -s` or `sh -s`, so it is never quoted or
    /// length-limited. Stdin then carries the script: [`ExecRequest::stdin`] is refused, and
    /// commands in the script must not read stdin.
    pub fn script(shell: ScriptShell, script: impl Into<Bytes>) -> ExecRequest {
        ExecRequest::with(Program::Script { shell, script: script.into(), args: Vec::new() })
    }

    fn with(program: Program) -> ExecRequest {
        ExecRequest { program, env: Vec::new(), cwd: None, stdin: None, stdin_stream: None, timeout: None }
    }

    /// Positional parameters (`$1`...) for a script; ignored for argv commands.
    pub fn script_args<I, S>(mut self, args: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let Program::Script { args: a, .. } = &mut self.program {
            *a = args.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Sets an environment variable, exported in the command line (sshd refuses SSH `env`
    /// requests by default). The name must match `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> ExecRequest {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs in this directory (`cd` first; a failing `cd` ends the command with its error). A
    /// leading `~` means the user's home; relative paths start at the home directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> ExecRequest {
        self.cwd = Some(dir.into());
        self
    }

    /// Bytes for the command's stdin (closed after them). Without this, stdin is closed at once.
    pub fn stdin(mut self, data: impl Into<Bytes>) -> ExecRequest {
        self.stdin = Some(data.into());
        self
    }

    /// Streams the command's stdin from `chunks` as they arrive, closing it (EOF) when the
    /// sender is dropped; replaces [`ExecRequest::stdin`]. Clones of the request share the
    /// stream: only the first command started takes it.
    pub fn stdin_stream(mut self, chunks: mpsc::Receiver<Bytes>) -> ExecRequest {
        self.stdin = None;
        self.stdin_stream = Some(Arc::new(std::sync::Mutex::new(Some(chunks))));
        self
    }

    /// Kills the command (and its process group) if it runs longer than this.
    pub fn timeout(mut self, limit: Duration) -> ExecRequest {
        self.timeout = Some(limit);
        self
    }

    /// The exec string sent to the server, without the PID marker (for logs and tests).
    pub fn command_line(&self) -> Result<String, SshError> {
        self.render(None)
    }

    /// A short human description: the argv, or `bash -s <script>`.
    pub fn describe(&self) -> String {
        match &self.program {
            Program::Argv(argv) => quote::join(argv),
            Program::Script { shell, .. } => format!("{} -s <script>", shell.program()),
        }
    }

    fn render(&self, marker_id: Option<&str>) -> Result<String, SshError> {
        let argv = match &self.program {
            Program::Argv(argv) => argv.clone(),
            Program::Script { shell, args, .. } => {
                if self.stdin.is_some() || self.stdin_stream.is_some() {
                    return Err(SshError::InvalidRequest(
                        "a script is sent on stdin; it cannot have other stdin data".into(),
                    ));
                }
                let mut argv = vec![shell.program().to_string(), "-s".to_string()];
                if !args.is_empty() {
                    argv.push("--".into());
                    argv.extend(args.iter().cloned());
                }
                argv
            }
        };
        CommandLine { cwd: self.cwd.as_deref(), env: &self.env, argv: &argv, marker_id }.render()
    }

    /// What a detached session needs of this command: the command line (without the PID
    /// marker), the bytes for its stdin (a script's text, or the stdin given) and its timeout.
    /// A streamed stdin cannot be kept for a command that outlives its caller: refused.
    pub fn detached_parts(&self) -> Result<(String, Bytes, Option<Duration>), SshError> {
        if self.stdin_stream.is_some() {
            return Err(SshError::InvalidRequest(
                "a session cannot read a streamed stdin (it outlives its caller): pass stdin as bytes".into(),
            ));
        }
        let line = self.render(None)?;
        Ok((line, self.stdin_bytes().unwrap_or_default(), self.timeout))
    }

    fn stdin_bytes(&self) -> Option<Bytes> {
        match &self.program {
            Program::Script { script, .. } => Some(script.clone()),
            Program::Argv(_) => self.stdin.clone(),
        }
    }

    /// What the command reads on stdin (takes a streamed stdin).
    fn take_stdin(&self) -> Stdin {
        if let Some(shared) = &self.stdin_stream
            && let Some(rx) = shared.lock().ok().and_then(|mut slot| slot.take())
        {
            return Stdin::Stream(rx);
        }
        match self.stdin_bytes() {
            Some(b) => Stdin::Bytes(b),
            None => Stdin::None,
        }
    }
}

/// One piece of an exec's output, or its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of stdout, as it arrived.
    Stdout(Bytes),
    /// A chunk of stderr, as it arrived.
    Stderr(Bytes),
    /// The last event. `code` and `signal` both `None` means the connection was lost before the
    /// status arrived.
    Exit {
        /// Exit status, when the command exited.
        code: Option<u32>,
        /// Signal name without `SIG` (`TERM`, `KILL`), when the command was killed.
        signal: Option<String>,
        /// Time from start to the end of the stream.
        duration: Duration,
        /// The timeout fired and the command was killed.
        timed_out: bool,
        /// The command was cancelled (or its handle dropped) and killed.
        cancelled: bool,
    },
}

/// Cancels an exec from anywhere; cheap to clone.
#[derive(Debug, Clone)]
pub struct ExecCanceller(Arc<watch::Sender<bool>>);

impl ExecCanceller {
    /// Kills the remote command and its process group; the stream then ends with an `Exit`
    /// event with `cancelled: true`. Does nothing once the command has ended.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

/// A running command: its events (also a [`futures::Stream`]) and its cancel switch. Dropping
/// the handle cancels the command.
#[derive(Debug)]
pub struct ExecHandle {
    events: mpsc::Receiver<ExecEvent>,
    canceller: ExecCanceller,
    command: String,
    timeout: Option<Duration>,
}

impl ExecHandle {
    /// The next event; `None` after the `Exit` event.
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Kills the remote command (see [`ExecCanceller::cancel`]).
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// A cancel switch usable while this handle is being read elsewhere.
    pub fn canceller(&self) -> ExecCanceller {
        self.canceller.clone()
    }

    /// The command, as in [`ExecRequest::describe`].
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Reads all events into memory. Only for small outputs.
    pub async fn collect(mut self) -> ExecOutput {
        let mut out = ExecOutput {
            command: self.command.clone(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            code: None,
            signal: None,
            duration: Duration::ZERO,
            timed_out: false,
            timeout: self.timeout,
            cancelled: false,
        };
        while let Some(event) = self.events.recv().await {
            match event {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit { code, signal, duration, timed_out, cancelled } => {
                    out.code = code;
                    out.signal = signal;
                    out.duration = duration;
                    out.timed_out = timed_out;
                    out.cancelled = cancelled;
                }
            }
        }
        out
    }
}

impl futures::Stream for ExecHandle {
    type Item = ExecEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ExecEvent>> {
        self.events.poll_recv(cx)
    }
}

/// A finished command with its whole output ([`ExecHandle::collect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command, as in [`ExecRequest::describe`].
    pub command: String,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
    /// Exit status, when the command exited.
    pub code: Option<u32>,
    /// Signal name, when the command was killed.
    pub signal: Option<String>,
    /// Run time.
    pub duration: Duration,
    /// The timeout fired.
    pub timed_out: bool,
    /// The timeout that was set.
    pub timeout: Option<Duration>,
    /// The command was cancelled.
    pub cancelled: bool,
}

impl ExecOutput {
    /// Exit status 0, not killed.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none() && !self.timed_out && !self.cancelled
    }

    /// Exit status 127: the shell did not find the program.
    pub fn command_not_found(&self) -> bool {
        self.code == Some(127) && self.signal.is_none()
    }

    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// `Ok` on success, else the error explaining the outcome ([`SshError::from_exit`]: exit 127
    /// becomes [`SshError::CommandNotFound`]).
    pub fn check(&self) -> Result<(), SshError> {
        let timed_out = self.timed_out.then(|| self.timeout.unwrap_or_default());
        match SshError::from_exit(&self.command, self.code, self.signal.as_deref(), timed_out, self.cancelled) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// A validated request with its exec string (including the PID marker).
pub(crate) struct Prepared {
    id: String,
    line: String,
    request: ExecRequest,
}

impl Prepared {
    /// Validates and renders `request`; nothing is sent yet.
    pub(crate) fn new(request: ExecRequest) -> Result<Prepared, SshError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let line = request.render(Some(&id))?;
        Ok(Prepared { id, line, request })
    }
}

/// A session channel opened for a command. Opening can safely be retried on another
/// connection: nothing has run yet.
pub(crate) struct Opened {
    conn: Connection,
    channel: Channel<Msg>,
    permit: OwnedSemaphorePermit,
    guard: TaskGuard,
}

/// Waits for a channel slot and opens a session channel.
pub(crate) async fn open(conn: &Connection) -> Result<Opened, SshError> {
    let guard = conn.task_guard()?;
    let (channel, permit) = conn.open_channel().await?;
    Ok(Opened { conn: conn.clone(), channel, permit, guard })
}

/// Starts the command on an opened channel and spawns the task that streams it. Errors here
/// are final (the command may have started), never retried.
pub(crate) async fn start(opened: Opened, prepared: Prepared) -> Result<ExecHandle, SshError> {
    let Opened { conn, channel, permit, guard } = opened;
    let Prepared { id, line, request } = prepared;
    let (mut read, write) = channel.split();
    write.exec(true, line.into_bytes()).await.map_err(|e| SshError::ConnectionLost {
        addr: conn.addr().to_string(),
        detail: format!("sending the command: {e}"),
    })?;
    let started = Instant::now();
    // Wait for the server's answer to the exec request, keeping anything that came first.
    let mut early = VecDeque::new();
    loop {
        match read.wait().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) => {
                let _ = write.close().await;
                return Err(SshError::ChannelRefused {
                    what: "the exec request".into(),
                    detail: "the server answered failure".into(),
                });
            }
            Some(msg) => early.push_back(msg),
            None => {
                return Err(SshError::ConnectionLost {
                    addr: conn.addr().to_string(),
                    detail: "the channel closed before the server confirmed the command (it may \
                             or may not have run)"
                        .into(),
                });
            }
        }
    }
    let (tx, rx) = mpsc::channel(conn.options().event_buffer.max(1));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // Checked: a timeout too far in the future for the clock means no deadline, never a panic.
    let deadline = request.timeout.and_then(|t| started.checked_add(t));
    let task = ExecTask {
        conn,
        read,
        write,
        early,
        tx,
        cancel: cancel_rx,
        deadline,
        started,
        marker: PidMarker::new(&id),
        code: None,
        signal: None,
        guard,
        _permit: permit,
    };
    tokio::spawn(task.run(request.take_stdin()));
    Ok(ExecHandle {
        events: rx,
        canceller: ExecCanceller(Arc::new(cancel_tx)),
        command: request.describe(),
        timeout: request.timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_render() {
        let r = ExecRequest::argv(["echo", "a b"]).env("K", "v").cwd("/tmp");
        assert_eq!(r.command_line().unwrap(), "cd -- '/tmp' && export K='v' && exec 'echo' 'a b'");
        let s = ExecRequest::script(ScriptShell::Bash, "echo hi").script_args(["x"]);
        assert_eq!(s.command_line().unwrap(), "exec 'bash' '-s' '--' 'x'");
        assert!(s.clone().stdin("no").command_line().is_err());
        assert_eq!(s.stdin_bytes(), Some(Bytes::from_static(b"echo hi")));
        assert_eq!(ExecRequest::shell("a;b").describe(), "'sh' '-c' 'a;b'");
    }
}
