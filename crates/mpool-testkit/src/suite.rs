//! The exec and file-transfer test suite, written against any SSH endpoint that runs commands
//! with a POSIX shell on a Linux host: OpenSSH (`tests/ssh.rs`, [`Remote::openssh`]) and the
//! simulator's SSH endpoints (`tests/ssh_sim.rs`). Test code (feature `tests`): every function
//! panics on failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mpool_ssh::{
    Connection, ConnectionCache, ExecEvent, ExecHandle, ExecRequest, ScriptShell, SshEndpoint, SshError, SshOptions,
    TransferOptions,
};

use crate::{Sshd, wait};

/// What the suite needs to know about an endpoint.
#[derive(Clone)]
pub struct Remote {
    /// Where to log in.
    pub target: SshEndpoint,
    /// Server-side count of SSH connections accepted so far.
    pub connections: Arc<dyn Fn() -> usize + Send + Sync>,
    /// An absolute directory on the remote host the suite may write into.
    pub scratch: String,
}

impl Remote {
    /// The suite's view of a local OpenSSH server.
    pub fn openssh(server: &Sshd) -> Remote {
        Remote {
            target: server.target(),
            connections: server.connection_counter(),
            scratch: server.scratch_dir().display().to_string(),
        }
    }
}

/// A unique name for files of one test.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// A new connection to the endpoint.
pub async fn connect(r: &Remote) -> Connection {
    Connection::connect(&r.target, &SshOptions::default()).await.expect("connecting")
}

async fn run_ok(conn: &Connection, req: ExecRequest) -> String {
    let out = conn.run(req).await.expect("exec");
    assert!(out.success(), "{}: {:?} stderr={}", out.command, out.code, out.stderr_text());
    out.stdout_text()
}

/// Polls a remote condition (a shell line that exits 0 when true) until it holds.
async fn wait_until(conn: &Connection, what: &str, line: &str) {
    wait(what, Duration::from_secs(20))
        .every(Duration::from_millis(50))
        .until(|| async { conn.run(ExecRequest::shell(line)).await.map(|out| out.success().then_some(())) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until process `pid` no longer runs: gone from /proc, or a zombie (in containers
/// whose PID 1 does not reap orphans, killed orphans stay zombies).
async fn wait_process_dead(conn: &Connection, pid: u32) {
    let line = format!("[ ! -e /proc/{pid} ] || grep -q '^State:[[:space:]]*[ZX]' /proc/{pid}/status 2>/dev/null");
    wait_until(conn, &format!("process {pid} is dead"), &line).await;
}

/// Reads events until stdout contains `needle`; returns what was read.
async fn read_until_stdout(handle: &mut ExecHandle, needle: &str) -> String {
    let mut stdout = String::new();
    while !stdout.contains(needle) {
        match handle.next_event().await {
            Some(ExecEvent::Stdout(b)) => stdout.push_str(&String::from_utf8_lossy(&b)),
            Some(ExecEvent::Stderr(_)) => {}
            other => panic!("stream ended before {needle:?}: {other:?} (stdout {stdout:?})"),
        }
    }
    stdout
}

/// Drains a handle; returns the exit event's fields.
async fn drain_to_exit(handle: &mut ExecHandle) -> (Option<u32>, Option<String>, bool, bool) {
    let mut exit = None;
    while let Some(event) = handle.next_event().await {
        if let ExecEvent::Exit { code, signal, timed_out, cancelled, .. } = event {
            exit = Some((code, signal, timed_out, cancelled));
        }
    }
    exit.expect("an Exit event")
}

/// stdout and stderr arrive separated and in order; exit codes 0, 1, 42 and 127 (with the
/// command-not-found helper); a signal exit; output written after the exit status still arrives.
pub async fn exit_codes_and_streams(r: &Remote) {
    let conn = connect(r).await;
    let out = conn.run(ExecRequest::shell("for i in 1 2 3; do echo out$i; echo err$i >&2; done")).await.unwrap();
    assert_eq!(out.stdout_text(), "out1\nout2\nout3\n");
    assert_eq!(out.stderr_text(), "err1\nerr2\nerr3\n");
    assert_eq!(out.code, Some(0));

    // Events carry the streams apart, each in order.
    let mut handle = conn.exec(ExecRequest::shell("echo a; echo b >&2; echo c")).await.unwrap();
    let (mut stdout, mut stderr, mut exits) = (Vec::new(), Vec::new(), 0);
    while let Some(event) = handle.next_event().await {
        match event {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Exit { code, signal, timed_out, cancelled, .. } => {
                exits += 1;
                assert_eq!((code, signal, timed_out, cancelled), (Some(0), None, false, false));
            }
        }
    }
    assert_eq!((stdout.as_slice(), stderr.as_slice(), exits), (&b"a\nc\n"[..], &b"b\n"[..], 1));

    for (req, code) in
        [(ExecRequest::argv(["true"]), 0), (ExecRequest::argv(["false"]), 1), (ExecRequest::shell("exit 42"), 42)]
    {
        let out = conn.run(req).await.unwrap();
        assert_eq!((out.code, out.signal.as_deref()), (Some(code), None), "{}", out.command);
    }
    let out = conn.run(ExecRequest::argv(["mpool-no-such-command", "x"])).await.unwrap();
    assert_eq!(out.code, Some(127));
    assert!(out.command_not_found());
    let err = out.check().unwrap_err();
    assert!(matches!(err, SshError::CommandNotFound { .. }), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
    let out = conn.run(ExecRequest::argv(["false"])).await.unwrap();
    assert!(matches!(out.check(), Err(SshError::CommandFailed { .. })));

    let out = conn.run(ExecRequest::shell("echo before; kill -TERM $$; echo after")).await.unwrap();
    assert_eq!((out.code, out.signal.as_deref()), (None, Some("TERM")));
    assert_eq!(out.stdout_text(), "before\n");
    assert!(!out.cancelled && !out.timed_out);

    // The shell exits at once; its background child writes later on the same stdout.
    let out = conn.run(ExecRequest::shell("(sleep 0.3; echo late) & echo early")).await.unwrap();
    assert_eq!(out.stdout_text(), "early\nlate\n");
    assert_eq!(out.code, Some(0));
}

/// Stdin round trip (binary, larger than the channel window), environment variables,
/// working directory (with spaces and `~`), and a bad env name refused before running.
pub async fn stdin_env_cwd(r: &Remote) {
    let conn = connect(r).await;
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let out = conn.run(ExecRequest::argv(["cat"]).stdin(data.clone())).await.unwrap();
    assert!(out.success());
    assert!(out.stdout == data, "stdin came back altered ({} bytes)", out.stdout.len());
    let out = conn.run(ExecRequest::argv(["wc", "-c"])).await.unwrap();
    assert_eq!(out.stdout_text().trim(), "0", "stdin is closed when none is given");

    let out = conn
        .run(
            ExecRequest::argv(["sh", "-c", "printf '%s|%s|%s' \"$A\" \"$B\" \"$EMPTY\""])
                .env("A", "x y")
                .env("B", "it's $HOME `id`; \"q\"\nz")
                .env("EMPTY", ""),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "x y|it's $HOME `id`; \"q\"\nz|");

    let dir = format!("{}/{}", r.scratch, unique("dir with 'spaces'"));
    run_ok(&conn, ExecRequest::argv(["mkdir", "-p", &dir])).await;
    assert_eq!(run_ok(&conn, ExecRequest::argv(["pwd"]).cwd(&dir)).await, format!("{dir}\n"));
    let home = run_ok(&conn, ExecRequest::shell("cd && pwd")).await;
    assert_eq!(run_ok(&conn, ExecRequest::argv(["pwd"]).cwd("~")).await, home);
    let out = conn.run(ExecRequest::argv(["pwd"]).cwd(format!("{dir}/missing"))).await.unwrap();
    assert!(!out.success() && out.stdout.is_empty(), "a failing cd stops the command");

    let err = conn.exec(ExecRequest::argv(["true"]).env("BAD-NAME", "x")).await.unwrap_err();
    assert!(matches!(err, SshError::InvalidRequest(_)), "{err}");
    let err = conn.exec(ExecRequest::argv(["true"]).env("1X", "x")).await.unwrap_err();
    assert!(matches!(err, SshError::InvalidRequest(_)), "{err}");
}

/// Hostile argv elements arrive byte for byte and nothing in them runs.
pub async fn argv_is_inert(r: &Remote) {
    let conn = connect(r).await;
    let pwned = format!("/tmp/{}", unique("pwned"));
    let args: Vec<String> = vec![
        "two words".into(),
        "single ' quote".into(),
        "double \" quote".into(),
        "$HOME".into(),
        "${PATH}".into(),
        format!("; touch {pwned}"),
        format!("&& touch {pwned}"),
        format!("`touch {pwned}`"),
        format!("$(touch {pwned})"),
        format!("| touch {pwned}"),
        "line\nbreak".into(),
        "".into(),
        "*".into(),
        "~".into(),
        "a\\b".into(),
        "-n".into(),
        "''".into(),
        "".into(),
    ];
    let mut argv = vec!["printf".to_string(), "[%s]\\n".to_string()];
    argv.extend(args.iter().cloned());
    let out = run_ok(&conn, ExecRequest::argv(argv)).await;
    let expected: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(out, expected);
    let out = conn.run(ExecRequest::argv(["test", "-e", &pwned])).await.unwrap();
    assert_eq!(out.code, Some(1), "{pwned} must not exist");
}

/// Scripts on stdin to `sh -s` and `bash -s`, with positional arguments, no quoting needed.
pub async fn scripts(r: &Remote) {
    let conn = connect(r).await;
    let script = "set -e\nname=\"$1\"\ncat <<'EOF'\nliteral $name `x` 'q'\nEOF\necho \"hello $name\"\n\
                  echo warn >&2\nexit 3\n";
    for shell in [ScriptShell::Sh, ScriptShell::Bash] {
        let out = conn.run(ExecRequest::script(shell, script).script_args(["it's me"])).await.unwrap();
        assert_eq!(out.stdout_text(), "literal $name `x` 'q'\nhello it's me\n", "{shell:?}");
        assert_eq!(out.stderr_text(), "warn\n");
        assert_eq!(out.code, Some(3));
    }
    let out = conn
        .run(
            ExecRequest::script(ScriptShell::Bash, "echo ${BASH_VERSION:+bash} \"$X\" \"$PWD\"").env("X", "y").cwd("/"),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "bash y /\n");
    let err = conn.exec(ExecRequest::script(ScriptShell::Sh, "cat").stdin("x")).await.unwrap_err();
    assert!(matches!(err, SshError::InvalidRequest(_)));
}

/// Output streams in chunks as it arrives (never one buffered blob).
pub async fn output_streams_in_chunks(r: &Remote) {
    let conn = connect(r).await;
    let mut handle = conn.exec(ExecRequest::shell("head -c 8388608 /dev/zero")).await.unwrap();
    let (mut total, mut chunks, mut largest) = (0usize, 0usize, 0usize);
    while let Some(event) = handle.next_event().await {
        if let ExecEvent::Stdout(b) = event {
            total += b.len();
            chunks += 1;
            largest = largest.max(b.len());
            tokio::task::yield_now().await; // a consumer that lags a little
        }
    }
    assert_eq!(total, 8 * 1024 * 1024);
    assert!(chunks >= 128 && largest <= 64 * 1024, "{chunks} chunks, largest {largest}");
}

fn sha256_file(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open for hashing");
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for hashing");
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    ctx.finish().as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A field of /proc/self/status in KiB.
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing"))
}

/// 100 MiB up and down with equal SHA-256 (also checked with `sha256sum` on the remote), while
/// the process's peak RSS grows by far less than the file size.
pub async fn large_file_round_trip(r: &Remote, local_dir: &Path) {
    const SIZE: usize = 100 * 1024 * 1024;
    let conn = connect(r).await;
    let src = local_dir.join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..SIZE / chunk.len() {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
    }
    let want = sha256_file(&src);
    let remote = format!("{}/{}/big.bin", r.scratch, unique("large"));
    let back = local_dir.join("back.bin");

    // Reset the high-water mark to the current RSS (Linux >= 4.0), then measure the peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = proc_status_kib("VmRSS:").max(proc_status_kib("VmHWM:"));
    let up = conn.upload(&src, &remote, &TransferOptions::default()).await.expect("upload");
    let down = conn.download(&remote, &back, &TransferOptions::default()).await.expect("download");
    let peak = proc_status_kib("VmHWM:");

    assert_eq!((up.files, up.bytes), (1, SIZE as u64));
    assert_eq!((down.files, down.bytes), (1, SIZE as u64));
    let remote_sum = run_ok(&conn, ExecRequest::argv(["sha256sum", &remote])).await;
    assert!(remote_sum.starts_with(&hex(&want)), "remote copy differs: {remote_sum}");
    assert_eq!(hex(&sha256_file(&back)), hex(&want), "downloaded copy differs");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("100 MiB up+down: RSS {before} KiB before, peak {peak} KiB ({growth_mib} MiB growth)");
    assert!(growth_mib < 40, "peak RSS grew by {growth_mib} MiB moving 100 MiB");
    run_ok(&conn, ExecRequest::argv(["rm", "-f", &remote])).await;
}

/// A tree with nested dirs, an empty file and distinct modes goes up and comes back intact.
pub async fn tree_round_trip(r: &Remote, local_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let conn = connect(r).await;
    let src = local_dir.join("tree");
    let files: [(&str, &[u8], u32); 4] = [
        ("run.sh", b"#!/bin/sh\necho hi\n", 0o755),
        ("a/b/c/deep.txt", b"deep", 0o644),
        ("a/empty", b"", 0o600),
        ("a/name with spaces 'q'", b"x", 0o640),
    ];
    for (name, body, mode) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::create_dir_all(src.join("empty-dir")).unwrap();
    std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("link")).unwrap();

    let remote = format!("{}/{}/nested/tree", r.scratch, unique("tree"));
    let up = conn.upload(&src, &remote, &TransferOptions::default()).await.expect("upload tree");
    assert_eq!((up.files, up.directories, up.bytes), (4, 5, 23), "{up:?}");
    assert_eq!(up.skipped.len(), 1, "the symlink is skipped: {up:?}");
    let listing =
        run_ok(&conn, ExecRequest::shell(format!("cd '{remote}' && find . -printf '%p %m %s\\n' | sort"))).await;
    assert!(listing.contains("./run.sh 755 18\n"), "{listing}");
    assert!(listing.contains("./a/empty 600 0\n"), "{listing}");
    assert!(listing.contains("./a/b 750 "), "{listing}");

    let back = local_dir.join("back/tree");
    let down = conn.download(&remote, &back, &TransferOptions::default()).await.expect("download");
    assert_eq!((down.files, down.directories, down.bytes), (4, 5, 23), "{down:?}");
    for (name, body, mode) in files {
        let p = back.join(name);
        assert_eq!(std::fs::read(&p).unwrap(), body, "{name}");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777, mode, "{name}");
    }
    assert_eq!(std::fs::metadata(back.join("a/b")).unwrap().permissions().mode() & 0o777, 0o750);
    assert!(back.join("empty-dir").is_dir());
    run_ok(&conn, ExecRequest::argv(["rm", "-rf", &remote])).await;
}

/// With a declared base, escaping paths are refused before anything moves; missing files and
/// bad paths give the matching errors.
pub async fn paths_are_confined(r: &Remote, local_dir: &Path) {
    let conn = connect(r).await;
    let base = format!("{}/{}", r.scratch, unique("base"));
    run_ok(&conn, ExecRequest::argv(["mkdir", "-p", &base])).await;
    let src = local_dir.join("small.txt");
    std::fs::write(&src, "data").unwrap();
    let opts = TransferOptions::within(&base);
    let outside = format!("{}/{}", r.scratch, unique("outside"));
    for bad in ["../escaped.txt".to_string(), "a/../../escaped.txt".into(), outside.clone()] {
        let err = conn.upload(&src, &bad, &opts).await.unwrap_err();
        assert!(matches!(err, SshError::PathEscapesBase { .. }), "{bad}: {err}");
        assert!(err.to_string().contains("escapes"), "{err}");
        let err = conn.download(&bad, local_dir.join("x"), &opts).await.unwrap_err();
        assert!(matches!(err, SshError::PathEscapesBase { .. }), "{bad}: {err}");
    }
    let out = conn
        .run(ExecRequest::shell(format!("ls -A '{}' | grep -c escaped; test ! -e '{outside}'", r.scratch)))
        .await
        .unwrap();
    assert_eq!(out.stdout_text().trim(), "0", "nothing was written outside");
    assert_eq!(out.code, Some(0));

    let report = conn.upload(&src, "in/side.txt", &opts).await.expect("upload inside base");
    assert_eq!(report.bytes, 4);
    assert_eq!(run_ok(&conn, ExecRequest::argv(["cat", &format!("{base}/in/side.txt")])).await, "data");

    let err = conn.download("nope.txt", local_dir.join("nope"), &opts).await.unwrap_err();
    assert!(matches!(err, SshError::NoSuchFile { .. }), "{err}");
    assert!(!local_dir.join("nope").exists());
    let err = conn.upload(local_dir.join("missing"), "m.txt", &opts).await.unwrap_err();
    assert!(matches!(err, SshError::NoSuchFile { .. }), "{err}");
}

/// A timeout kills the remote command and its children; then the same for cancel, for a
/// command that ignores TERM (KILL follows), and for dropping the handle.
pub async fn timeout_and_cancel_kill_the_process_group(r: &Remote) {
    let conn = connect(r).await;
    let dir = format!("{}/{}", r.scratch, unique("kill"));
    run_ok(&conn, ExecRequest::argv(["mkdir", "-p", &dir])).await;
    // `sleep` runs as a child of sh (once in the background, recorded; once in the foreground).
    let command = |pidfile: &str| {
        ExecRequest::argv([
            "sh",
            "-c",
            &format!("sleep 1000 & echo $! > '{pidfile}'; echo ready; sleep 1000; echo never"),
        ])
    };
    let read_pid = async |pidfile: &str| -> u32 {
        run_ok(&conn, ExecRequest::argv(["cat", pidfile])).await.trim().parse().expect("a pid")
    };

    // Timeout.
    let pidfile = format!("{dir}/timeout.pid");
    let mut handle = conn.exec(command(&pidfile).timeout(Duration::from_secs(2))).await.unwrap();
    let (code, signal, timed_out, cancelled) = drain_to_exit(&mut handle).await;
    assert!(timed_out && !cancelled, "code {code:?} signal {signal:?}");
    assert!(signal.is_some() || code.is_some_and(|c| c > 128), "killed: {code:?} {signal:?}");
    let pid = read_pid(&pidfile).await;
    wait_process_dead(&conn, pid).await;

    // Cancel.
    let pidfile = format!("{dir}/cancel.pid");
    let mut handle = conn.exec(command(&pidfile)).await.unwrap();
    read_until_stdout(&mut handle, "ready").await;
    handle.canceller().cancel();
    let (_, signal, timed_out, cancelled) = drain_to_exit(&mut handle).await;
    assert!(cancelled && !timed_out, "signal {signal:?}");
    wait_process_dead(&conn, read_pid(&pidfile).await).await;

    // A command that ignores TERM (inherited by its child, whose output goes elsewhere) is
    // KILLed after the grace period.
    let pidfile = format!("{dir}/stubborn.pid");
    let stubborn = format!("trap '' TERM; sleep 1000 >/dev/null 2>&1 & echo $! > '{pidfile}'; echo ready; wait");
    let mut handle = conn.exec(ExecRequest::shell(stubborn)).await.unwrap();
    read_until_stdout(&mut handle, "ready").await;
    handle.cancel();
    let (_, signal, _, cancelled) = drain_to_exit(&mut handle).await;
    assert!(cancelled);
    assert_eq!(signal.as_deref(), Some("KILL"));
    wait_process_dead(&conn, read_pid(&pidfile).await).await;

    // Dropping the handle.
    let pidfile = format!("{dir}/drop.pid");
    let mut handle = conn.exec(command(&pidfile)).await.unwrap();
    read_until_stdout(&mut handle, "ready").await;
    drop(handle);
    wait_process_dead(&conn, read_pid(&pidfile).await).await;
    run_ok(&conn, ExecRequest::argv(["rm", "-rf", &dir])).await;
}

/// 200 sequential execs under one cache key use exactly one SSH connection (server-side count).
pub async fn many_execs_one_connection(r: &Remote) {
    let cache = ConnectionCache::new(SshOptions::default());
    let key = unique("lease");
    let before = (r.connections)();
    for i in 0..200 {
        let out = cache.run(&key, &r.target, ExecRequest::argv(["true"])).await.unwrap();
        assert!(out.success(), "exec {i}: {out:?}");
    }
    let after = (r.connections)();
    assert_eq!(after - before, 1, "server saw {} connections for 200 execs", after - before);
    assert!(cache.close(&key).await);
}

/// A ping is a round trip on the pooled connection: it opens nothing, and only a key with an
/// open connection can be pinged.
pub async fn ping_uses_the_pooled_connection(r: &Remote) {
    let cache = ConnectionCache::new(SshOptions::default());
    let key = unique("lease");
    assert!(cache.ping(&key, Duration::from_secs(5)).await.is_none(), "no connection yet: nothing to ping");
    let out = cache.run(&key, &r.target, ExecRequest::argv(["true"])).await.unwrap();
    assert!(out.success(), "{out:?}");
    let before = (r.connections)();
    for _ in 0..50 {
        cache.ping(&key, Duration::from_secs(5)).await.expect("an open connection").expect("the server answers");
    }
    assert_eq!((r.connections)(), before, "pings open no connection");
    assert!(cache.close(&key).await);
    assert!(cache.ping(&key, Duration::from_secs(5)).await.is_none(), "closed: nothing to ping");
}

/// At most `max_channels` channels are open at once; further execs wait for a slot.
pub async fn channels_are_bounded(r: &Remote) {
    let options = SshOptions { max_channels: 2, ..SshOptions::default() };
    let conn = Connection::connect(&r.target, &options).await.unwrap();
    let mut a = conn.exec(ExecRequest::shell("echo ready; exec sleep 1000")).await.unwrap();
    let mut b = conn.exec(ExecRequest::shell("echo ready; exec sleep 1000")).await.unwrap();
    read_until_stdout(&mut a, "ready").await;
    read_until_stdout(&mut b, "ready").await;
    assert_eq!(conn.channels_in_use(), 2);
    let mut c = std::pin::pin!(conn.run(ExecRequest::argv(["echo", "third"])));
    assert!(futures::poll!(&mut c).is_pending(), "a third channel must wait for a slot");
    a.cancel();
    let out = c.await.unwrap();
    assert_eq!(out.stdout_text(), "third\n");
    b.cancel();
    drain_to_exit(&mut b).await;

    // More concurrent execs than sshd's MaxSessions (10) all succeed through the bound.
    let options = SshOptions { max_channels: 4, ..SshOptions::default() };
    let conn = Connection::connect(&r.target, &options).await.unwrap();
    let runs = (0..16).map(|i| {
        let conn = conn.clone();
        async move { conn.run(ExecRequest::shell(format!("sleep 0.1; echo {i}"))).await }
    });
    for (i, out) in futures::future::join_all(runs).await.into_iter().enumerate() {
        assert_eq!(out.unwrap().stdout_text(), format!("{i}\n"));
    }
}

/// Closing a cache entry (lease end) stops the commands still running on it: their streams end
/// as cancelled and their process groups are killed before the disconnect.
pub async fn close_stops_running_commands(r: &Remote) {
    let cache = ConnectionCache::new(SshOptions::default());
    let key = unique("lease");
    let pidfile = format!("{}/{}.pid", r.scratch, unique("close"));
    let script = format!("sleep 1000 & echo $! > '{pidfile}'; echo ready; wait");
    let mut handle = cache.exec(&key, &r.target, ExecRequest::shell(script)).await.unwrap();
    read_until_stdout(&mut handle, "ready").await;
    assert!(cache.close(&key).await);
    let (_, _, timed_out, cancelled) = drain_to_exit(&mut handle).await;
    assert!(cancelled && !timed_out);
    let conn = connect(r).await;
    let pid = run_ok(&conn, ExecRequest::argv(["cat", &pidfile])).await.trim().parse().unwrap();
    wait_process_dead(&conn, pid).await;
    run_ok(&conn, ExecRequest::argv(["rm", "-f", &pidfile])).await;
}
