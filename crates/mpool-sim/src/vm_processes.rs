//! Every process a simulated VM starts dies with the VM, however it detached.
//!
//! On a real VM a forced stop (or a daemon that dies) ends everything the guest ran. The
//! simulator runs a VM's commands on the host, where a task can escape its process group with
//! `setsid`, double-fork, or `nohup`, and would keep running (and writing into the VM's
//! directory, the next tenant's) after the VM stopped. So each simulated VM gets a
//! [`VmSupervisor`]: a small process of its own, forked from the simulator, that is a child
//! subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`). The VM's commands are started by it, so every
//! process they start stays below it whatever it does: an orphan is re-parented to the
//! supervisor, not to init. [`VmSupervisor::kill_all`] kills everything below it, round after
//! round until nothing is left; the supervisor does the same on its own when the simulator
//! goes away (its control socket closes), even after `kill -9` of the simulator.
//!
//! The supervisor is forked without exec (so it works in any binary that embeds the
//! simulator, test harnesses included). A forked child of a multi-threaded process may only
//! make system calls: the supervisor's loop uses raw `libc` calls on buffers allocated before
//! the fork, never allocates, locks, logs or panics. It speaks a small binary protocol with
//! the simulator over a Unix socket pair: "spawn" (argv, environment, directory and the three
//! standard descriptors, passed with `SCM_RIGHTS`), "kill all", and back "spawned", "exited"
//! (a command's wait status) and "all killed".
//!
//! Until it has closed them, the supervisor holds a copy of every descriptor the simulator
//! had open when it forked; [`VmSupervisor::start`] holds the fork window of
//! `crate::fork_window` until the supervisor says (over a pipe) that it has closed them, so
//! that no file the simulator wrote and reported closed is still open for writing here.
//!
//! This is the one mechanism for "the processes of a VM"; exec sessions that outlive their
//! channel will use it too.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsString, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::fork_window::ForkWindow;

/// Largest spawn request (command line, arguments, environment) the supervisor takes.
const MAX_REQUEST: usize = 4 << 20;
/// Most arguments plus environment entries of one command.
const MAX_STRINGS: usize = 8192;
/// Most commands a VM runs at once (direct children of its supervisor).
const MAX_COMMANDS: usize = 4096;
/// The buffer for listing the supervisor's children.
const LIST_BUF: usize = 256 * 1024;

const OP_SPAWN: u32 = 1;
const OP_KILL_ALL: u32 = 2;
const REPLY_SPAWNED: u32 = 1;
const REPLY_EXITED: u32 = 2;
const REPLY_KILLED_ALL: u32 = 3;

/// What to run: a program with its arguments, environment and working directory.
#[derive(Clone, Debug)]
pub struct Command {
    /// The program (an absolute path; no `PATH` lookup).
    pub program: String,
    /// Its arguments, `argv[0]` included.
    pub args: Vec<OsString>,
    /// Its whole environment, as `NAME=value`.
    pub env: Vec<OsString>,
    /// Its working directory.
    pub cwd: std::path::PathBuf,
}

/// A command running under a supervisor: its process id (also its process group: each
/// command leads a group of its own), its standard streams and its end.
#[derive(Debug)]
pub struct Supervised {
    /// Process id (= process group id).
    pub pid: i32,
    /// Its stdin.
    pub stdin: Option<pipe::Sender>,
    /// Its stdout.
    pub stdout: Option<pipe::Receiver>,
    /// Its stderr.
    pub stderr: Option<pipe::Receiver>,
    exit: oneshot::Receiver<i32>,
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Waits for the command to end (cancel-safe). A supervisor gone before it reported the
    /// end counts as a SIGKILL.
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let raw = (&mut self.exit).await.unwrap_or(libc::SIGKILL);
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        status
    }
}

/// A started command as the reply reader hands it over: its pid and where its end comes.
type Started = io::Result<(i32, oneshot::Receiver<i32>)>;

/// Who waits for what from the supervisor.
#[derive(Default)]
struct Waiters {
    spawns: VecDeque<oneshot::Sender<Started>>,
    exits: HashMap<i32, oneshot::Sender<i32>>,
    kills: VecDeque<oneshot::Sender<()>>,
    /// The supervisor is gone: nothing more will be answered.
    gone: bool,
}

/// One VM's process supervisor (see the module docs). Dropping it ends the supervisor, which
/// kills whatever the VM still runs.
pub struct VmSupervisor {
    pid: i32,
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    waiters: Arc<Mutex<Waiters>>,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for VmSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSupervisor").field("pid", &self.pid).finish()
    }
}

fn lock(w: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the VM's process supervisor is gone")
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks until one byte or the end arrives on `fd` (a pipe's read end), or reading fails.
fn wait_for_byte_or_eof(fd: OwnedFd) {
    use std::io::Read;
    let mut file = std::fs::File::from(fd);
    let mut byte = [0u8; 1];
    while matches!(file.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::Interrupted) {}
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VmSupervisor {
    /// Forks the supervisor. Must be called within a tokio runtime. Returns once the
    /// supervisor has closed every descriptor it inherited (see `crate::fork_window`), which
    /// may block for a moment (call it off the async threads, e.g. with `spawn_blocking`).
    pub fn start() -> io::Result<VmSupervisor> {
        let mut fds = [0 as c_int; 2];
        // SAFETY: `fds` has room for the pair.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The supervisor says on this pipe that it has closed what it inherited.
        let (closed_r, closed_w) = pipe_pair()?;
        // Everything the supervisor will need, allocated now: after the fork it must not.
        let mut mem = ChildMemory {
            request: vec![0u8; MAX_REQUEST],
            strings: vec![std::ptr::null(); MAX_STRINGS + 2],
            env: vec![std::ptr::null(); MAX_STRINGS + 2],
            commands: vec![0i32; MAX_COMMANDS],
            list: vec![0u8; LIST_BUF],
        };
        // The child inherits every descriptor we have, files the SFTP server writes among
        // them: no such file is reported closed until the child has closed its copy.
        let window = ForkWindow::open();
        // SAFETY: fork has no preconditions; the child runs only system calls (see
        // `supervise`) on memory allocated above, and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let (ctl, closed) = (theirs.as_raw_fd(), closed_w.as_raw_fd());
            // SAFETY: we are the freshly forked child.
            unsafe { supervise(ctl, closed, &mut mem) }
        }
        drop((theirs, closed_w));
        wait_for_byte_or_eof(closed_r);
        drop(window);
        drop(mem);
        let std = std::os::unix::net::UnixStream::from(ours);
        std.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std)?;
        let (read, write) = stream.into_split();
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let reader = tokio::spawn(read_replies(read, waiters.clone()));
        Ok(VmSupervisor { pid, writer: tokio::sync::Mutex::new(write), waiters, reader })
    }

    /// The supervisor's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Starts `cmd` under the supervisor, in a process group of its own, with piped stdin,
    /// stdout and stderr.
    pub async fn spawn(&self, cmd: &Command) -> io::Result<Supervised> {
        let (stdin_r, stdin_w) = pipe_pair()?;
        let (stdout_r, stdout_w) = pipe_pair()?;
        let (stderr_r, stderr_w) = pipe_pair()?;
        let payload = encode(cmd)?;
        let header = encode_header(OP_SPAWN, payload.len(), cmd.args.len(), cmd.env.len())?;
        let (tx, rx) = oneshot::channel();
        {
            let mut writer = self.writer.lock().await;
            {
                let mut w = lock(&self.waiters);
                if w.gone {
                    return Err(gone());
                }
                w.spawns.push_back(tx);
            }
            let fds = [stdin_r.as_raw_fd(), stdout_w.as_raw_fd(), stderr_w.as_raw_fd()];
            let sent = async {
                send_with_fds(writer.as_ref(), &header, &fds).await?;
                writer.write_all(&payload).await
            };
            if let Err(e) = sent.await {
                lock(&self.waiters).spawns.pop_back();
                return Err(e);
            }
        }
        // The supervisor has its copies now.
        drop((stdin_r, stdout_w, stderr_w));
        let (pid, exit) = rx.await.map_err(|_| gone())??;
        for fd in [&stdin_w, &stdout_r, &stderr_r] {
            set_nonblocking(fd)?;
        }
        Ok(Supervised {
            pid,
            stdin: Some(pipe::Sender::from_owned_fd(stdin_w)?),
            stdout: Some(pipe::Receiver::from_owned_fd(stdout_r)?),
            stderr: Some(pipe::Receiver::from_owned_fd(stderr_r)?),
            exit,
            status: None,
        })
    }

    /// Kills every process the VM started, detached or not, and returns once none is left.
    pub async fn kill_all(&self) -> io::Result<()> {
        let header = encode_header(OP_KILL_ALL, 0, 0, 0)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut writer = self.writer.lock().await;
            {
                let mut w = lock(&self.waiters);
                if w.gone {
                    return Err(gone());
                }
                w.kills.push_back(tx);
            }
            // As in spawn: a request that was not sent takes its waiter back, so the next
            // reply is not matched to it.
            if let Err(e) = writer.write_all(&header).await {
                lock(&self.waiters).kills.pop_back();
                return Err(e);
            }
        }
        rx.await.map_err(|_| gone())
    }

    /// Kills everything the VM runs and ends the supervisor (reaping it).
    pub async fn shutdown(mut self) {
        if let Err(e) = self.kill_all().await {
            tracing::debug!(pid = self.pid, "supervisor kill_all: {e}");
        }
        // Closing our end makes the supervisor kill what is left (nothing) and exit.
        let _ = self.writer.lock().await.shutdown().await;
        self.reader.abort();
        let pid = std::mem::replace(&mut self.pid, 0);
        if pid > 0 {
            reap(pid).await;
        }
    }
}

impl Drop for VmSupervisor {
    fn drop(&mut self) {
        // The socket closes with us: the supervisor kills everything and exits. Reap it off
        // the async threads (it exits promptly; a thread is cheap and never blocks the caller).
        self.reader.abort();
        let pid = self.pid;
        if pid > 0 {
            let _ = std::thread::Builder::new().name("reap".into()).spawn(move || {
                let mut status = 0;
                // SAFETY: waitpid on our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            });
            self.pid = 0;
        }
    }
}

/// Waits for the supervisor process to exit (it was told to).
async fn reap(pid: i32) {
    let _ = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    })
    .await;
}

fn encode_header(op: u32, len: usize, argc: usize, envc: usize) -> io::Result<[u8; 16]> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "command too large for the VM supervisor");
    let n = |v: usize| u32::try_from(v).map_err(|_| too_big());
    let mut h = [0u8; 16];
    for (i, v) in [op, n(len)?, n(argc)?, n(envc)?].iter().enumerate() {
        if let Some(slot) = h.get_mut(i * 4..i * 4 + 4) {
            slot.copy_from_slice(&v.to_le_bytes());
        }
    }
    Ok(h)
}

/// The spawn payload: program, cwd, args, env, each NUL-terminated.
fn encode(cmd: &Command) -> io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let strings = std::iter::once(cmd.program.as_bytes())
        .chain(std::iter::once(cmd.cwd.as_os_str().as_bytes()))
        .chain(cmd.args.iter().map(|a| a.as_bytes()))
        .chain(cmd.env.iter().map(|e| e.as_bytes()));
    for s in strings {
        if s.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a command"));
        }
        out.extend_from_slice(s);
        out.push(0);
    }
    if out.len() > MAX_REQUEST || cmd.args.len() + cmd.env.len() > MAX_STRINGS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "command too large for the VM supervisor"));
    }
    Ok(out)
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) on a non-blocking Unix stream.
async fn send_with_fds(stream: &tokio::net::UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let rest = bytes.get(sent..).unwrap_or_default();
        let attach = if sent == 0 { fds } else { &[] };
        match stream.try_io(tokio::io::Interest::WRITABLE, || sendmsg_fds(stream.as_raw_fd(), rest, attach)) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg` of `bytes` with `fds` as SCM_RIGHTS.
fn sendmsg_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: zeroed msghdr is valid; fields set below point to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(len) } as usize;
        if space > std::mem::size_of_val(&cmsg_buf) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
        }
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is large enough for one header with `len` bytes of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), len as usize);
        }
    }
    // SAFETY: `msg` describes valid buffers.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads the supervisor's replies and hands them to their waiters until it is gone.
async fn read_replies(mut read: tokio::net::unix::OwnedReadHalf, waiters: Arc<Mutex<Waiters>>) {
    let mut rec = [0u8; 16];
    loop {
        if read.read_exact(&mut rec).await.is_err() {
            break;
        }
        let field = |i: usize| {
            rec.get(i * 4..i * 4 + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes).unwrap_or(0)
        };
        let (op, pid, value) = (field(0), field(1) as i32, field(2) as i32);
        let mut w = lock(&waiters);
        match op {
            REPLY_SPAWNED => {
                let Some(tx) = w.spawns.pop_front() else {
                    continue;
                };
                if value != 0 {
                    let _ = tx.send(Err(io::Error::from_raw_os_error(value)));
                } else {
                    let (exit_tx, exit_rx) = oneshot::channel();
                    w.exits.insert(pid, exit_tx);
                    let _ = tx.send(Ok((pid, exit_rx)));
                }
            }
            REPLY_EXITED => {
                if let Some(tx) = w.exits.remove(&pid) {
                    let _ = tx.send(value);
                }
            }
            REPLY_KILLED_ALL => {
                if let Some(tx) = w.kills.pop_front() {
                    let _ = tx.send(());
                }
            }
            _ => {}
        }
    }
    // Gone: every waiter learns it (exits read as SIGKILL).
    let mut w = lock(&waiters);
    w.gone = true;
    w.spawns.clear();
    w.exits.clear();
    w.kills.clear();
}

// ---------------------------------------------------------------------------------------------
// The supervisor process (after fork): system calls only.
// ---------------------------------------------------------------------------------------------

/// Memory the supervisor uses, allocated before the fork.
struct ChildMemory {
    request: Vec<u8>,
    strings: Vec<*const c_char>,
    env: Vec<*const c_char>,
    commands: Vec<i32>,
    list: Vec<u8>,
}

fn errno() -> c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Sets every catchable signal's disposition to `disposition`.
unsafe fn all_signals(disposition: libc::sighandler_t) {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: zeroed sigaction with a handler constant is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = disposition;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Closes every descriptor from 3 up, except `keep` (ascending order not required).
unsafe fn close_all_except(keep: &[c_int]) {
    let mut from: c_int = 3;
    let mut sorted = [c_int::MAX; 4];
    for (slot, k) in sorted.iter_mut().zip(keep.iter().filter(|k| **k >= 3)) {
        *slot = *k;
    }
    sorted.sort_unstable();
    for k in sorted.iter().chain(std::iter::once(&c_int::MAX)) {
        let to = if *k == c_int::MAX { c_int::MAX } else { k - 1 };
        if to >= from {
            // SAFETY: close_range only closes descriptors.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32) };
            if r < 0 {
                // Old kernel: close one by one up to a sane limit.
                let last = to.min(65535);
                let mut fd = from;
                while fd <= last {
                    // SAFETY: closing a descriptor number.
                    unsafe { libc::close(fd) };
                    fd += 1;
                }
            }
        }
        if *k == c_int::MAX {
            break;
        }
        from = k + 1;
    }
}

/// Writes all of `bytes` (blocking). False if the simulator is gone.
unsafe fn write_all(fd: c_int, bytes: &[u8]) -> bool {
    let mut done = 0usize;
    while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
        // SAFETY: a valid buffer of the given length.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

/// Reads exactly `buf.len()` bytes (blocking). False at EOF or on error.
unsafe fn read_exact(fd: c_int, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: a valid buffer of the given length.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n == 0 {
            return false;
        }
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

unsafe fn reply(ctl: c_int, op: u32, pid: i32, value: i32) -> bool {
    let mut rec = [0u8; 16];
    for (i, v) in [op, pid as u32, value as u32, 0].iter().enumerate() {
        if let Some(slot) = rec.get_mut(i * 4..i * 4 + 4) {
            slot.copy_from_slice(&v.to_le_bytes());
        }
    }
    // SAFETY: forwarding to write_all.
    unsafe { write_all(ctl, &rec) }
}

/// Reaps every ended child; reports the commands' ends. False if the simulator is gone.
unsafe fn reap_children(ctl: c_int, commands: &mut [i32]) -> bool {
    let mut alive = true;
    loop {
        let mut status: c_int = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return alive;
        }
        if let Some(slot) = commands.iter_mut().find(|c| **c == pid) {
            *slot = 0;
            // SAFETY: forwarding.
            alive &= unsafe { reply(ctl, REPLY_EXITED, pid, status) };
        }
    }
}

/// Parses a decimal number at the start of `s`.
fn parse_num(s: &[u8]) -> Option<(i32, usize)> {
    let mut n: i32 = 0;
    let mut len = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(i32::from(b - b'0'))?;
        len += 1;
    }
    (len > 0).then_some((n, len))
}

/// SIGKILLs every child of the supervisor (the descendants of a killed child become its
/// children in turn). Returns how many were signalled.
unsafe fn kill_children(list: &mut [u8]) -> usize {
    let path = c"/proc/thread-self/children";
    // SAFETY: a valid path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: a valid buffer.
        let n = unsafe { libc::read(fd, list.as_mut_ptr().cast(), list.len()) };
        // SAFETY: closing our descriptor.
        unsafe { libc::close(fd) };
        let text = list.get(..n.max(0) as usize).unwrap_or_default();
        let mut killed = 0;
        let mut i = 0;
        while i < text.len() {
            match text.get(i..).and_then(parse_num) {
                Some((pid, len)) => {
                    if pid > 1 {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        killed += 1;
                    }
                    i += len;
                }
                None => i += 1,
            }
        }
        return killed;
    }
    // No /proc/.../children: scan /proc for our children.
    // SAFETY: as above.
    unsafe { kill_children_by_scan(list) }
}

/// [`kill_children`] by reading the parent pid of every process in /proc.
unsafe fn kill_children_by_scan(buf: &mut [u8]) -> usize {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let (dents, stat) = buf.split_at_mut(buf.len() / 2);
    // SAFETY: a valid path.
    let dir = unsafe { libc::open(c"/proc".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dir < 0 {
        return 0;
    }
    let mut killed = 0;
    loop {
        // SAFETY: a valid buffer for getdents64.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, dents.as_mut_ptr(), dents.len()) };
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[].
            let reclen = dents.get(off + 16..off + 18).map(|b| u16::from_ne_bytes([b[0], b[1]])).unwrap_or(0) as usize;
            if reclen == 0 {
                break;
            }
            let name = dents.get(off + 19..off + reclen).unwrap_or_default();
            if let Some((pid, _)) = parse_num(name)
                && pid > 1
                && pid != me
                // SAFETY: forwarding.
                && unsafe { parent_of(pid, stat) } == Some(me)
            {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
            off += reclen;
        }
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(dir) };
    killed
}

/// The parent pid from /proc/<pid>/stat.
unsafe fn parent_of(pid: i32, buf: &mut [u8]) -> Option<i32> {
    let mut path = [0u8; 32];
    let prefix = b"/proc/";
    path.get_mut(..prefix.len())?.copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = pid;
    let mut len = 0;
    while n > 0 && len < digits.len() {
        *digits.get_mut(len)? = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
    }
    let mut at = prefix.len();
    for d in digits.get(..len)?.iter().rev() {
        *path.get_mut(at)? = *d;
        at += 1;
    }
    path.get_mut(at..at + 5)?.copy_from_slice(b"/stat");
    // SAFETY: `path` is NUL-terminated (zeroed tail).
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a valid buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    let text = buf.get(..n.max(0) as usize)?;
    let close = text.iter().rposition(|b| *b == b')')?;
    // ") S PPID ..."
    let rest = text.get(close + 4..)?;
    parse_num(rest).map(|(p, _)| p)
}

/// Kills everything below the supervisor, round after round, until nothing is left.
unsafe fn kill_everything(ctl: c_int, sigfd: c_int, mem: &mut ChildMemory) -> bool {
    let mut alive = true;
    loop {
        // SAFETY: forwarding.
        let signalled = unsafe { kill_children(&mut mem.list) };
        // SAFETY: forwarding.
        alive &= unsafe { reap_children(ctl, &mut mem.commands) };
        if signalled == 0 {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r < 0 && errno() == libc::ECHILD {
                return alive;
            }
        }
        // Wait for a child to end (or a moment) before the next round.
        let mut pfd = libc::pollfd { fd: sigfd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        // SAFETY: forwarding.
        unsafe { drain_signalfd(sigfd) };
    }
}

unsafe fn drain_signalfd(sigfd: c_int) {
    let mut info = [0u8; 128];
    // SAFETY: a valid buffer; the descriptor is non-blocking.
    while unsafe { libc::read(sigfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
}

/// Receives a request header and the descriptors sent with it. None at EOF or on error.
unsafe fn recv_header(ctl: c_int, header: &mut [u8; 16], fds: &mut [c_int; 3]) -> Option<usize> {
    let mut iov = libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() };
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; pointers set to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
    let n = loop {
        // SAFETY: `msg` describes valid buffers.
        let n = unsafe { libc::recvmsg(ctl, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n <= 0 {
        return None;
    }
    let mut got = 0;
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<c_int>();
                for i in 0..count {
                    let fd = *data.add(i);
                    match fds.get_mut(got) {
                        Some(slot) => {
                            *slot = fd;
                            got += 1;
                        }
                        None => {
                            libc::close(fd);
                        }
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let rest = header.get_mut(n as usize..).unwrap_or_default();
    // SAFETY: forwarding.
    if !rest.is_empty() && !unsafe { read_exact(ctl, rest) } {
        return None;
    }
    Some(got)
}

/// Runs a spawn request; returns the new command's pid, or an errno.
unsafe fn spawn_command(
    mem: &mut ChildMemory,
    len: usize,
    argc: usize,
    envc: usize,
    fds: &[c_int; 3],
) -> Result<i32, c_int> {
    let buf = mem.request.get(..len).ok_or(libc::E2BIG)?;
    if buf.last() != Some(&0) {
        return Err(libc::EINVAL);
    }
    // Split into NUL-terminated strings: program, cwd, args..., env...
    let mut starts = buf.split(|b| *b == 0).map(|s| s.as_ptr().cast::<c_char>());
    let program = starts.next().ok_or(libc::EINVAL)?;
    let cwd = starts.next().ok_or(libc::EINVAL)?;
    for i in 0..argc {
        *mem.strings.get_mut(i).ok_or(libc::E2BIG)? = starts.next().ok_or(libc::EINVAL)?;
    }
    *mem.strings.get_mut(argc).ok_or(libc::E2BIG)? = std::ptr::null();
    for i in 0..envc {
        *mem.env.get_mut(i).ok_or(libc::E2BIG)? = starts.next().ok_or(libc::EINVAL)?;
    }
    *mem.env.get_mut(envc).ok_or(libc::E2BIG)? = std::ptr::null();
    let slot = mem.commands.iter().position(|c| *c == 0).ok_or(libc::EAGAIN)?;
    let mut errpipe = [0 as c_int; 2];
    // SAFETY: room for two descriptors.
    if unsafe { libc::pipe2(errpipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(errno());
    }
    // SAFETY: the grandchild only makes system calls before exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = errno();
        // SAFETY: closing our descriptors.
        unsafe {
            libc::close(errpipe[0]);
            libc::close(errpipe[1]);
        }
        return Err(e);
    }
    if pid == 0 {
        // The command: its own process group, default signals, the given stdio.
        // SAFETY: system calls on valid arguments; never returns.
        unsafe {
            libc::setpgid(0, 0);
            all_signals(libc::SIG_DFL);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for (i, fd) in fds.iter().enumerate() {
                libc::dup2(*fd, i as c_int);
            }
            close_all_except(&[errpipe[1]]);
            if libc::chdir(cwd) == 0 {
                libc::execve(program, mem.strings.as_ptr(), mem.env.as_ptr());
            }
            let bytes = errno().to_ne_bytes();
            write_all(errpipe[1], &bytes);
            libc::_exit(127);
        }
    }
    // SAFETY: closing our descriptors; reading the exec report.
    unsafe {
        libc::close(errpipe[1]);
        let mut report = [0u8; 4];
        let ok = !read_exact(errpipe[0], &mut report);
        libc::close(errpipe[0]);
        if !ok {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            return Err(c_int::from_ne_bytes(report));
        }
    }
    if let Some(c) = mem.commands.get_mut(slot) {
        *c = pid;
    }
    Ok(pid)
}

/// The supervisor's life: become a subreaper, close what it inherited (and say so on
/// `closed`), then serve requests until the simulator is gone, and kill everything on the way
/// out. Never returns.
unsafe fn supervise(ctl: c_int, closed: c_int, mem: &mut ChildMemory) -> ! {
    // SAFETY: system calls only, on memory allocated before the fork.
    unsafe {
        // No signal handler of the parent may run here; a terminal's signals do not reach us.
        all_signals(libc::SIG_DFL);
        libc::setsid();
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_SETMASK, &chld, std::ptr::null_mut());
        let sigfd = libc::signalfd(-1, &chld, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        close_all_except(&[ctl, sigfd, closed]);
        // Nothing of the simulator's is open here any more: its fork window may close.
        write_all(closed, &[1]);
        libc::close(closed);
        if sigfd < 0 {
            libc::_exit(1);
        }
        let mut header = [0u8; 16];
        loop {
            let mut pfds = [
                libc::pollfd { fd: ctl, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: sigfd, events: libc::POLLIN, revents: 0 },
            ];
            if libc::poll(pfds.as_mut_ptr(), 2, -1) < 0 && errno() != libc::EINTR {
                break;
            }
            if pfds[1].revents != 0 {
                drain_signalfd(sigfd);
                if !reap_children(ctl, &mut mem.commands) {
                    break;
                }
            }
            if pfds[0].revents == 0 {
                continue;
            }
            let mut fds = [-1 as c_int; 3];
            let Some(got) = recv_header(ctl, &mut header, &mut fds) else {
                break;
            };
            let word = |i: usize| {
                header.get(i * 4..i * 4 + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0) as usize
            };
            let (op, len, argc, envc) = (word(0) as u32, word(1), word(2), word(3));
            let alive = match op {
                OP_SPAWN => {
                    let fits = len <= mem.request.len();
                    let read = match mem.request.get_mut(..len) {
                        Some(buf) if fits => read_exact(ctl, buf),
                        _ => false,
                    };
                    if !read {
                        break;
                    }
                    let result = if got == 3 { spawn_command(mem, len, argc, envc, &fds) } else { Err(libc::EBADF) };
                    for fd in fds {
                        if fd >= 0 {
                            libc::close(fd);
                        }
                    }
                    match result {
                        Ok(pid) => reply(ctl, REPLY_SPAWNED, pid, 0),
                        Err(e) => reply(ctl, REPLY_SPAWNED, 0, e.max(1)),
                    }
                }
                OP_KILL_ALL => kill_everything(ctl, sigfd, mem) && reply(ctl, REPLY_KILLED_ALL, 0, 0),
                _ => false,
            };
            if !alive {
                break;
            }
        }
        // The simulator is gone (or broke the protocol): the VM dies with it.
        kill_everything(-1, sigfd, mem);
        libc::_exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_without_allocating() {
        assert_eq!(parse_num(b"1234 56"), Some((1234, 4)));
        assert_eq!(parse_num(b"x"), None);
        assert_eq!(parse_num(b"99999999999"), None);
    }

    #[test]
    fn requests_are_encoded_with_nul_separators() {
        let cmd = Command {
            program: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["A=1".into()],
            cwd: "/tmp".into(),
        };
        assert_eq!(encode(&cmd).unwrap(), b"/bin/sh\0/tmp\0sh\0-c\0true\0A=1\0");
        let bad = Command { args: vec!["a\0b".into()], ..cmd };
        assert!(encode(&bad).is_err());
    }

    #[test]
    fn header_round_trips() {
        let h = encode_header(OP_SPAWN, 10, 3, 2).unwrap();
        assert_eq!(h.get(..4), Some(&1u32.to_le_bytes()[..]));
        assert_eq!(h.get(4..8), Some(&10u32.to_le_bytes()[..]));
    }
}
