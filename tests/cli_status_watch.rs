//! `mpool status --watch` against a real stack: under a real pseudo-terminal it redraws the
//! same picture as `mpool status` in place (ANSI home + clear before each frame), a lease taken
//! meanwhile through the CLI shows up in a later frame with its holder, and Ctrl-C typed on the
//! terminal ends it quietly with 0; into a pipe it prints successive snapshots separated by a
//! blank line, and ends quietly with 0 once the reader has gone (EPIPE).
//!
//! Frames are read as the command writes them; the deadlines only guard against a hang.
mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{MPOOL, tools};
use mpool_testkit::{Stack, StackOptions};

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 2\n";

/// ANSI: cursor home, then clear the screen (what starts each frame on a terminal).
const CLEAR: &str = "\x1b[H\x1b[2J";

/// How long any one wait may take before the test fails.
const GUARD: Duration = Duration::from_secs(60);

/// Everything a process wrote to a terminal or pipe, as it arrives (a thread reads it until EOF,
/// or EIO once the terminal's other side is closed).
struct Screen {
    rx: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Screen {
    fn read_from(mut r: impl Read + Send + 'static) -> Screen {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Screen { rx, seen: String::new() }
    }

    /// Reads until `done(everything so far)` holds; panics at the guard deadline or at EOF.
    fn until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let end = Instant::now() + GUARD;
        while !done(&self.seen) {
            match self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                // A terminal turns "\n" into "\r\n".
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes).replace('\r', "")),
                Err(e) => panic!("waiting for {what}: {e:?}; output so far:\n{:?}", self.seen),
            }
        }
    }

    /// The complete frames so far (each one followed by the start of the next).
    fn frames(&self) -> Vec<&str> {
        let mut parts: Vec<&str> = self.seen.split(CLEAR).skip(1).collect();
        parts.pop();
        parts
    }
}

/// Waits for `child` to exit (at most the guard deadline); its exit code.
fn exit_code(mut child: Child) -> Option<i32> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|s| s.code()));
    });
    rx.recv_timeout(GUARD).expect("mpool status --watch ends").expect("wait")
}

fn endpoint(stack: &Stack) -> String {
    format!("unix:{}", stack.socket.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_redraws_in_place_on_a_terminal_and_ctrl_c_ends_it() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = endpoint(&stack);

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = |pty: &nix::pty::OpenptyResult| Stdio::from(OwnedFd::try_clone(&pty.slave).expect("dup the tty"));
    let mut cmd = Command::new(MPOOL);
    cmd.args(["--endpoint", &ep, "status", "--watch", "--interval", "200ms"])
        .env_remove("MPOOL_TOKEN")
        .stdin(slave(&pty))
        .stdout(slave(&pty))
        .stderr(Stdio::piped());
    // The terminal becomes the command's controlling terminal in a session of its own, so a ^C
    // typed on it sends SIGINT to the command, as in a shell.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn mpool status --watch");
    let nix::pty::OpenptyResult { master, slave: ours } = pty;
    drop(ours); // the terminal's only other side is the child's now: its exit ends the reads
    let mut keyboard = std::fs::File::from(master.try_clone().expect("dup the pty master"));
    let mut screen = Screen::read_from(std::fs::File::from(master));
    let mut stderr = child.stderr.take().expect("stderr");

    // The first frame: the same table as `mpool status`, and no lease yet.
    screen.until("the first frame", |s| s.matches(CLEAR).count() >= 2);
    let first = screen.frames()[0].to_string();
    let header = first.lines().next().unwrap_or_default();
    for col in ["POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "WAITERS", "MAX"] {
        assert!(header.split_whitespace().any(|c| c == col), "header has {col}: {first:?}");
    }
    assert!(first.lines().any(|l| l.starts_with("ci ")), "a row for pool ci: {first:?}");
    assert!(!first.contains("LEASE "), "no lease yet: {first:?}");

    // A lease taken through the CLI shows up, with its holder, in a later frame.
    let holder = format!("watch-holder-{:x}", rand::random::<u32>());
    let a =
        tools::run(Path::new(MPOOL), &["--endpoint", &ep, "acquire", "--pool", "ci", "--holder", &holder], None, &[])
            .await;
    let lease = a.expect_code(0, "acquire").stdout.trim().to_string();
    let shows = |frame: &str| frame.lines().any(|l| l.starts_with(&lease) && l.contains(&holder) && l.contains(" ci "));
    screen.until("a frame that shows the lease", |s| {
        s.split(CLEAR).collect::<Vec<_>>().iter().rev().skip(1).any(|f| shows(f))
    });
    let frame = screen.frames().into_iter().find(|f| shows(f)).expect("the frame").to_string();
    let row: Vec<&str> = frame.lines().find(|l| l.starts_with("ci ")).expect("ci row").split_whitespace().collect();
    assert_eq!(row[3], "1", "one leased VM in the same frame: {frame:?}");
    assert!(frame.lines().any(|l| l.starts_with("LEASE") && l.contains("HOLDER")), "{frame:?}");

    // Ctrl-C on the terminal: it ends quietly.
    keyboard.write_all(b"\x03").expect("type ^C");
    let code = exit_code(child);
    let mut err = String::new();
    stderr.read_to_string(&mut err).expect("stderr");
    assert_eq!((code, err.as_str()), (Some(0), ""), "Ctrl-C ends it with 0 and nothing on stderr");
    tools::run(Path::new(MPOOL), &["--endpoint", &ep, "release", &lease], None, &[]).await.expect_code(0, "release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_into_a_pipe_prints_snapshots_and_ends_quietly_when_the_reader_goes() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = endpoint(&stack);
    let mut child = Command::new(MPOOL)
        .args(["--endpoint", &ep, "status", "--watch", "--interval", "200ms"])
        .env_remove("MPOOL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpool status --watch");
    let mut screen = Screen::read_from(child.stdout.take().expect("stdout"));
    let mut stderr = child.stderr.take().expect("stderr");
    screen.until("three snapshots", |s| s.lines().filter(|l| l.starts_with("POOL ")).count() >= 3);
    assert!(!screen.seen.contains('\x1b'), "no escape sequences into a pipe: {:?}", screen.seen);
    let snapshots: Vec<&str> = screen.seen.split("\n\n").collect();
    assert!(snapshots.len() >= 3, "{:?}", screen.seen);
    for s in &snapshots[..snapshots.len() - 1] {
        assert!(s.starts_with("POOL ") && s.lines().any(|l| l.starts_with("ci ")), "a whole snapshot: {s:?}");
    }

    // The reader goes: the next frame's write fails with EPIPE and it ends quietly.
    drop(screen);
    let code = exit_code(child);
    let mut err = String::new();
    stderr.read_to_string(&mut err).expect("stderr");
    assert_eq!((code, err.as_str()), (Some(0), ""), "a closed pipe ends it with 0 and nothing on stderr");
}
