//! End-to-end tests of the simulator's SSH endpoints: a russh client, the OpenSSH `ssh` and
//! `sftp` binaries, and russh-sftp against an endpoint started in-process on a temp dir.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mpool_sim::ssh::{SshKeys, SshServer};
use mpool_testkit::eventually;
use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate, decode_secret_key};
use russh::{ChannelMsg, Sig};
use russh_sftp::client::SftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single test, so a bug shows up as a failure instead of a hang.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut).await.expect("test exceeded its deadline")
}

struct Sim {
    dir: tempfile::TempDir,
    keys: Arc<SshKeys>,
    endpoint: SshServer,
}

impl Sim {
    async fn start() -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(SshKeys::load_or_create(dir.path()).unwrap());
        let endpoint = SshServer::start(dir.path().join("root"), keys.clone(), 0).await.unwrap();
        Sim { dir, keys, endpoint }
    }

    /// The instance root as the server sees it (canonical).
    fn root(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path().join("root")).unwrap()
    }

    fn key_path(&self) -> PathBuf {
        self.dir.path().join("ssh-keys/id_rsa")
    }

    async fn connect(&self) -> client::Handle<Client> {
        connect_as(self.endpoint.port(), self.keys.client_key_text(), "ubuntu").await.unwrap()
    }
}

struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

async fn connect_as(port: u16, key_text: &str, user: &str) -> Result<client::Handle<Client>, String> {
    let config = Arc::new(client::Config::default());
    let mut handle = client::connect(config, ("127.0.0.1", port), Client).await.map_err(|e| format!("connect: {e}"))?;
    let key = decode_secret_key(key_text, None).map_err(|e| format!("key: {e}"))?;
    let hash = handle.best_supported_rsa_hash().await.map_err(|e| format!("rsa hash: {e}"))?.flatten();
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("authentication refused".into());
    }
    Ok(handle)
}

#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<u32>,
    signal: Option<String>,
}

impl Output {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Collects a channel's output until the server closes it.
async fn collect(channel: &mut russh::ChannelReadHalf) -> Output {
    let mut out = Output::default();
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => out.signal = Some(format!("{signal_name:?}")),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    out
}

async fn exec(handle: &client::Handle<Client>, command: &str) -> Output {
    let channel = handle.channel_open_session().await.unwrap();
    channel.exec(true, command).await.unwrap();
    let (mut rx, _tx) = channel.split();
    collect(&mut rx).await
}

#[tokio::test]
async fn exec_separates_streams_and_reports_exit() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;

        let out = exec(&ssh, "echo out; echo err >&2; exit 42").await;
        assert_eq!(out.stdout(), "out\n");
        assert_eq!(out.stderr(), "err\n");
        assert_eq!(out.status, Some(42));
        assert_eq!(out.signal, None);

        let out = exec(&ssh, "true").await;
        assert_eq!(out.status, Some(0));

        let out = exec(&ssh, "kill -TERM $$").await;
        assert_eq!(out.signal.as_deref(), Some("TERM"));
        assert_eq!(out.status, None);

        let root = sim.root();
        let out = exec(&ssh, "pwd").await;
        assert_eq!(out.stdout().trim_end(), root.to_str().unwrap());
        let out = exec(&ssh, "echo $HOME; echo $USER").await;
        assert_eq!(out.stdout(), format!("{}\nubuntu\n", root.display()));

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn exec_env_request_applies() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let channel = ssh.channel_open_session().await.unwrap();
        channel.set_env(true, "GREETING", "hello there").await.unwrap();
        channel.exec(true, "echo \"$GREETING\"").await.unwrap();
        let (mut rx, _tx) = channel.split();
        let out = collect(&mut rx).await;
        assert_eq!(out.stdout(), "hello there\n");
        assert_eq!(out.status, Some(0));
        sim.endpoint.shutdown().await;
    })
    .await
}

/// Pseudo-random but reproducible bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

#[tokio::test]
async fn exec_stdin_round_trip() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;

        // Small input, then EOF.
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "cat").await.unwrap();
        let (mut rx, tx) = channel.split();
        tx.data(&b"hello stdin\n"[..]).await.unwrap();
        tx.eof().await.unwrap();
        let out = collect(&mut rx).await;
        assert_eq!(out.stdout(), "hello stdin\n");
        assert_eq!(out.status, Some(0));

        // Many MiB both ways at once: more than the windows, pipes and the server's stdin
        // buffer hold, so flow control has to work in both directions.
        let input = pattern(32 << 20, 7);
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "cat").await.unwrap();
        let (mut rx, tx) = channel.split();
        let to_send = input.clone();
        let writer = tokio::spawn(async move {
            tx.data(&to_send[..]).await.unwrap();
            tx.eof().await.unwrap();
            tx
        });
        let out = collect(&mut rx).await;
        let _tx = writer.await.unwrap();
        assert_eq!(out.stdout.len(), input.len());
        assert!(out.stdout == input, "cat output differs from its input");
        assert_eq!(out.status, Some(0));

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn exec_streams_output_before_exit() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        // The command only exits after it got input, and the input is only sent once
        // "ready" has arrived: this completes only if output is streamed as it comes.
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "echo ready; echo warming >&2; read x; echo got $x").await.unwrap();
        let (mut rx, tx) = channel.split();
        let mut seen = Vec::new();
        let mut seen_err = Vec::new();
        while !(seen.ends_with(b"ready\n") && seen_err.ends_with(b"warming\n")) {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => seen.extend_from_slice(&data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => seen_err.extend_from_slice(&data),
                Some(ChannelMsg::Success) => {}
                Some(other) => panic!("unexpected {other:?} before the input was sent"),
                None => panic!("channel ended early"),
            }
        }
        tx.data(&b"go\n"[..]).await.unwrap();
        let out = collect(&mut rx).await;
        assert_eq!(out.stdout(), "got go\n");
        assert_eq!(out.status, Some(0));

        // A large output goes through the channel's flow control intact.
        let out = exec(&ssh, "head -c 8388608 /dev/zero | tr '\\0' x").await;
        assert_eq!(out.stdout.len(), 8 << 20);
        assert!(out.stdout.iter().all(|b| *b == b'x'));
        assert_eq!(out.status, Some(0));

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn exec_signal_request_reaches_the_command() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        for (signal, name) in [(Sig::INT, "INT"), (Sig::HUP, "HUP"), (Sig::KILL, "KILL")] {
            let channel = ssh.channel_open_session().await.unwrap();
            channel.exec(true, "echo $$ > sig.pid; exec sleep 1000").await.unwrap();
            // Signal only once the shell has become `sleep`: a shell that is still running
            // may catch SIGINT and lose it when it execs.
            let pid_file = sim.root().join("sig.pid");
            eventually("sleep runs", Duration::from_secs(20), || async {
                read_pid(&pid_file).is_some_and(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm == "sleep\n")
                })
            })
            .await;
            std::fs::remove_file(&pid_file).unwrap();
            let (mut rx, tx) = channel.split();
            tx.signal(signal).await.unwrap();
            let out = collect(&mut rx).await;
            assert_eq!(out.signal.as_deref(), Some(name));
            assert_eq!(out.status, None);
        }
        sim.endpoint.shutdown().await;
    })
    .await
}

fn read_pid(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` runs (exists and is not a zombie waiting for a parent that is not us).
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
    })
}

#[tokio::test]
async fn closing_the_channel_kills_the_command() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "sleep 1000 & echo $! > child.pid; echo $$ > pid; exec sleep 1000").await.unwrap();
        let pid_file = sim.root().join("pid");
        let child_file = sim.root().join("child.pid");
        eventually("the pid files exist", Duration::from_secs(20), || async {
            read_pid(&pid_file).is_some() && read_pid(&child_file).is_some()
        })
        .await;
        let pid = read_pid(&pid_file).unwrap();
        let child = read_pid(&child_file).unwrap();
        assert!(process_exists(pid) && process_exists(child));

        channel.close().await.unwrap();
        eventually("the command is killed", Duration::from_secs(20), || async { !process_exists(pid) }).await;
        // The background job of the same process group went too.
        eventually("the background job is killed", Duration::from_secs(20), || async { !process_running(child) }).await;

        // The connection is still usable.
        let out = exec(&ssh, "echo still here").await;
        assert_eq!(out.stdout(), "still here\n");
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn disconnecting_kills_the_command() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "echo $$ > pid; exec sleep 1000").await.unwrap();
        let pid_file = sim.root().join("pid");
        eventually("the pid file exists", Duration::from_secs(20), || async { read_pid(&pid_file).is_some() }).await;
        let pid = read_pid(&pid_file).unwrap();

        ssh.disconnect(russh::Disconnect::ByApplication, "bye", "en").await.unwrap();
        drop(channel);
        drop(ssh);
        eventually("the command is killed", Duration::from_secs(20), || async { !process_exists(pid) }).await;
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_closes_port_sessions_and_commands() {
    within(async {
        let sim = Sim::start().await;
        let port = sim.endpoint.port();
        let ssh = sim.connect().await;
        let channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "echo $$ > pid; exec sleep 1000").await.unwrap();
        let pid_file = sim.root().join("pid");
        eventually("the pid file exists", Duration::from_secs(20), || async { read_pid(&pid_file).is_some() }).await;
        let pid = read_pid(&pid_file).unwrap();

        sim.endpoint.shutdown().await;
        // shutdown returns after the commands were killed and reaped.
        assert!(!process_exists(pid), "command survived shutdown");
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
        assert!(connect_as(port, sim.keys.client_key_text(), "ubuntu").await.is_err());

        // The live session was ended: the channel ends and the connection closes.
        let (mut rx, _tx) = channel.split();
        while rx.wait().await.is_some() {}
        eventually("the client sees the disconnect", Duration::from_secs(20), || async { ssh.is_closed() }).await;

        // Idempotent.
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn connections_are_counted() {
    within(async {
        let sim = Sim::start().await;
        assert_eq!(sim.endpoint.connections_accepted(), 0);
        let first = sim.connect().await;
        for i in 0..3 {
            let out = exec(&first, &format!("echo {i}")).await;
            assert_eq!(out.stdout(), format!("{i}\n"));
        }
        assert_eq!(sim.endpoint.connections_accepted(), 1);
        let second = sim.connect().await;
        assert_eq!(exec(&second, "true").await.status, Some(0));
        assert_eq!(exec(&first, "true").await.status, Some(0));
        assert_eq!(sim.endpoint.connections_accepted(), 2);
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn wrong_key_and_wrong_user_are_refused() {
    within(async {
        let sim = Sim::start().await;
        let other_dir = tempfile::tempdir().unwrap();
        let other = SshKeys::load_or_create(other_dir.path()).unwrap();
        let port = sim.endpoint.port();

        let err = connect_as(port, other.client_key_text(), "ubuntu").await.err();
        assert_eq!(err.as_deref(), Some("authentication refused"));
        let err = connect_as(port, sim.keys.client_key_text(), "root").await.err();
        assert_eq!(err.as_deref(), Some("authentication refused"));

        // Password authentication is not offered at all.
        let config = Arc::new(client::Config::default());
        let mut handle = client::connect(config, ("127.0.0.1", port), Client).await.unwrap();
        let auth = handle.authenticate_password("ubuntu", "ubuntu").await.unwrap();
        assert!(!auth.success());

        // The right key still works.
        let ssh = sim.connect().await;
        assert_eq!(exec(&ssh, "true").await.status, Some(0));
        sim.endpoint.shutdown().await;
    })
    .await
}

fn openssh_args(sim: &Sim) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-i",
        sim.key_path().to_str().unwrap(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn openssh_client_can_log_in() {
    within(async {
        let sim = Sim::start().await;
        let port = sim.endpoint.port().to_string();
        for algorithms in ["rsa-sha2-512", "rsa-sha2-256"] {
            let mut ssh = tokio::process::Command::new("/usr/bin/ssh");
            ssh.args(openssh_args(&sim))
                .args(["-o", &format!("PubkeyAcceptedAlgorithms={algorithms}")])
                .args(["-p", &port, "ubuntu@127.0.0.1"])
                .arg("read line; echo \"in: $line\"; echo to-stderr >&2; pwd; exit 3")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = ssh.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"hello from openssh\n").await.unwrap();
            drop(stdin);
            let out = child.wait_with_output().await.unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "{algorithms}: stderr: {stderr}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("in: hello from openssh\n{}\n", sim.root().display()),
                "{algorithms}"
            );
            assert_eq!(stderr, "to-stderr\n", "{algorithms}");
        }

        // A user other than ubuntu is refused, even with the right key.
        let out = tokio::process::Command::new("/usr/bin/ssh")
            .args(openssh_args(&sim))
            .args(["-p", &port, "root@127.0.0.1", "true"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(255));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn openssh_sftp_batch_works() {
    within(async {
        let sim = Sim::start().await;
        let port = sim.endpoint.port().to_string();
        let local = tempfile::tempdir().unwrap();
        let upload = local.path().join("up.bin");
        let data = pattern(300_000, 3);
        std::fs::write(&upload, &data).unwrap();
        let download = local.path().join("down.bin");
        let batch = local.path().join("batch");
        std::fs::write(
            &batch,
            format!(
                "mkdir dir\nput {} dir/file.bin\nchmod 600 dir/file.bin\nls -l dir\nget dir/file.bin {}\nrename dir/file.bin dir/moved.bin\nrm dir/moved.bin\nrmdir dir\n",
                upload.display(),
                download.display()
            ),
        )
        .unwrap();
        let out = tokio::process::Command::new("/usr/bin/sftp")
            .args(openssh_args(&sim))
            .args(["-P", &port, "-b"])
            .arg(&batch)
            .arg("ubuntu@127.0.0.1")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("-rw-------"), "{stdout}");
        assert_eq!(std::fs::read(&download).unwrap(), data);
        assert!(!sim.root().join("dir").exists());

        // scp (SFTP mode) also wants the subsystem's exit status.
        let scp = |args: Vec<String>| {
            let mut cmd = tokio::process::Command::new("/usr/bin/scp");
            cmd.args(openssh_args(&sim)).args(["-P", &port]).args(args);
            cmd
        };
        let out = scp(vec![
            upload.display().to_string(),
            "ubuntu@127.0.0.1:copied.bin".into(),
        ])
        .output()
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(sim.root().join("copied.bin")).unwrap(), data);
        let back = local.path().join("back.bin");
        let out = scp(vec![
            "ubuntu@127.0.0.1:copied.bin".into(),
            back.display().to_string(),
        ])
        .output()
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&back).unwrap(), data);
        let out = scp(vec![
            "ubuntu@127.0.0.1:/etc/hostname".into(),
            local.path().join("nope").display().to_string(),
        ])
        .output()
        .await
        .unwrap();
        assert!(!out.status.success());
        sim.endpoint.shutdown().await;
    })
    .await
}

async fn sftp(ssh: &client::Handle<Client>) -> SftpSession {
    let channel = ssh.channel_open_session().await.unwrap();
    channel.request_subsystem(true, "sftp").await.unwrap();
    SftpSession::new(channel.into_stream()).await.unwrap()
}

fn status_of(err: SftpError) -> StatusCode {
    match err {
        SftpError::Status(status) => status.status_code,
        other => panic!("expected an SFTP status, got {other}"),
    }
}

#[tokio::test]
async fn sftp_files_and_confinement() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let sftp = sftp(&ssh).await;
        let root = sim.root();

        assert_eq!(sftp.canonicalize(".").await.unwrap(), root.to_str().unwrap());

        let mut file = sftp.create("hello.txt").await.unwrap();
        file.write_all(b"hello sftp").await.unwrap();
        file.shutdown().await.unwrap();
        assert_eq!(sftp.read("hello.txt").await.unwrap(), b"hello sftp");
        assert_eq!(std::fs::read(root.join("hello.txt")).unwrap(), b"hello sftp");
        // Absolute paths inside the root are fine.
        let abs = root.join("hello.txt");
        assert_eq!(sftp.read(abs.to_str().unwrap()).await.unwrap(), b"hello sftp");
        assert_eq!(sftp.metadata("hello.txt").await.unwrap().size, Some(10));

        // Escapes are refused.
        for path in ["../escape.txt", "sub/../../escape.txt", "/tmp/mpool-sim-escape.txt"] {
            let err = sftp.create(path).await.err().unwrap();
            assert_eq!(status_of(err), StatusCode::PermissionDenied, "{path}");
        }
        assert!(!sim.dir.path().join("escape.txt").exists());
        assert!(!Path::new("/tmp/mpool-sim-escape.txt").exists());
        let err = sftp.read("/etc/hostname").await.err().unwrap();
        assert_eq!(status_of(err), StatusCode::PermissionDenied);
        let err = sftp.read_dir("..").await.err().unwrap();
        assert_eq!(status_of(err), StatusCode::PermissionDenied);

        // Missing files map to NoSuchFile.
        let err = sftp.open("missing.txt").await.err().unwrap();
        assert_eq!(status_of(err), StatusCode::NoSuchFile);

        // Directories.
        sftp.create_dir("dir").await.unwrap();
        sftp.create_dir("dir/inner").await.unwrap();
        let mut file = sftp.create("dir/a.txt").await.unwrap();
        file.write_all(b"a").await.unwrap();
        file.shutdown().await.unwrap();
        let mut names: Vec<String> = sftp.read_dir("dir").await.unwrap().map(|entry| entry.file_name()).collect();
        names.sort();
        assert_eq!(names, ["a.txt", "inner"]);
        assert!(sftp.metadata("dir/inner").await.unwrap().is_dir());

        // Rename, remove, rmdir.
        sftp.rename("dir/a.txt", "dir/b.txt").await.unwrap();
        assert!(root.join("dir/b.txt").exists() && !root.join("dir/a.txt").exists());
        sftp.remove_file("dir/b.txt").await.unwrap();
        sftp.remove_dir("dir/inner").await.unwrap();
        sftp.remove_dir("dir").await.unwrap();
        assert!(!root.join("dir").exists());

        // Permissions via setstat.
        let mut meta = sftp.metadata("hello.txt").await.unwrap();
        meta.permissions = Some(0o640);
        sftp.set_metadata("hello.txt", meta).await.unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root.join("hello.txt")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o640);

        // A symlink out of the root is not followed.
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        let err = sftp.read("etc-link/hostname").await.err().unwrap();
        assert_eq!(status_of(err), StatusCode::PermissionDenied);

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn sftp_large_file_round_trip() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let sftp = sftp(&ssh).await;
        let data = pattern(20 << 20, 11);

        let mut file = sftp.create("big.bin").await.unwrap();
        file.write_all(&data).await.unwrap();
        file.shutdown().await.unwrap();
        let on_disk = std::fs::read(sim.root().join("big.bin")).unwrap();
        assert!(on_disk == data, "uploaded bytes differ");

        let mut file = sftp.open("big.bin").await.unwrap();
        let mut back = Vec::new();
        file.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "downloaded bytes differ");

        // Append mode appends.
        let mut file = sftp
            .open_with_flags(
                "big.bin",
                russh_sftp::protocol::OpenFlags::WRITE | russh_sftp::protocol::OpenFlags::APPEND,
            )
            .await
            .unwrap();
        file.write_all(b"tail").await.unwrap();
        file.shutdown().await.unwrap();
        assert_eq!(std::fs::metadata(sim.root().join("big.bin")).unwrap().len(), data.len() as u64 + 4);

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn concurrent_execs_share_one_connection() {
    within(async {
        let sim = Sim::start().await;
        let ssh = Arc::new(sim.connect().await);
        let runs = (0..8).map(|i| {
            let ssh = ssh.clone();
            tokio::spawn(async move {
                let out = exec(&ssh, &format!("echo out{i}; echo err{i} >&2; exit {i}")).await;
                assert_eq!(out.stdout(), format!("out{i}\n"));
                assert_eq!(out.stderr(), format!("err{i}\n"));
                assert_eq!(out.status, Some(i));
            })
        });
        for run in futures::future::join_all(runs).await {
            run.unwrap();
        }
        assert_eq!(sim.endpoint.connections_accepted(), 1);
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shell_and_pty_are_refused_but_exec_works() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;

        let mut channel = ssh.channel_open_session().await.unwrap();
        channel.request_shell(true).await.unwrap();
        assert!(matches!(channel.wait().await, Some(ChannelMsg::Failure)));

        let mut channel = ssh.channel_open_session().await.unwrap();
        channel.request_pty(true, "xterm", 80, 24, 0, 0, &[]).await.unwrap();
        assert!(matches!(channel.wait().await, Some(ChannelMsg::Failure)));
        channel.exec(true, "echo fine").await.unwrap();
        let (mut rx, _tx) = channel.split();
        let out = collect(&mut rx).await;
        assert_eq!(out.stdout(), "fine\n");

        // A second exec on a channel that already runs one is refused.
        let mut channel = ssh.channel_open_session().await.unwrap();
        channel.exec(true, "cat").await.unwrap();
        assert!(matches!(channel.wait().await, Some(ChannelMsg::Success)));
        channel.exec(true, "echo again").await.unwrap();
        assert!(matches!(channel.wait().await, Some(ChannelMsg::Failure)));
        channel.eof().await.unwrap();
        let (mut rx, _tx) = channel.split();
        let out = collect(&mut rx).await;
        assert_eq!(out.stdout(), "");
        assert_eq!(out.status, Some(0));

        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_kills_processes_left_by_finished_commands() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        let out = exec(&ssh, "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > bg.pid").await;
        assert_eq!(out.status, Some(0));
        let pid = read_pid(&sim.root().join("bg.pid")).unwrap();
        // Like under sshd, the background process outlives its command and channel.
        assert!(process_running(pid));
        assert_eq!(exec(&ssh, "true").await.status, Some(0));
        assert!(process_running(pid));

        sim.endpoint.shutdown().await;
        eventually("the left-over process is killed", Duration::from_secs(20), || async { !process_running(pid) })
            .await;
    })
    .await
}

/// Swaps two directory entries atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) =
        (std::ffi::CString::new(a.as_os_str().as_bytes()), std::ffi::CString::new(b.as_os_str().as_bytes()))
    else {
        return false;
    };
    // SAFETY: valid NUL-terminated paths; renameat2 has no other preconditions.
    unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        ) == 0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_never_follows_a_swapped_in_symlink_out_of_the_root() {
    within(async {
        let sim = Sim::start().await;
        let root = sim.root();
        let outside = sim.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), b"OUTSIDE").unwrap();
        std::fs::create_dir(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/secret.txt"), b"inside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("decoy")).unwrap();
        assert!(exchange(&root.join("dir"), &root.join("decoy")), "renameat2(RENAME_EXCHANGE) is needed for this test");
        assert!(exchange(&root.join("dir"), &root.join("decoy")));

        // A task in the VM flips `dir` between the real directory and a link out of the VM,
        // as fast as it can, while the client reads `dir/secret.txt`.
        /// Stops the swapper however the test ends (a failed assertion must not leave it
        /// spinning on a core other tests need).
        struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _stop_swapper = StopOnDrop(stop.clone());
        let flips = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let swapper = {
            let (stop, flips, root) = (stop.clone(), flips.clone(), root.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if exchange(&root.join("dir"), &root.join("decoy")) {
                        flips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        };
        let ssh = sim.connect().await;
        let sftp = sftp(&ssh).await;
        let (mut inside, mut refused) = (0u32, 0u32);
        for _ in 0..3000 {
            match sftp.read("dir/secret.txt").await {
                Ok(data) => {
                    assert_ne!(data, b"OUTSIDE", "read a file outside the instance through a swapped-in symlink");
                    inside += 1;
                }
                Err(_) => refused += 1,
            }
            // Writes too must never land outside.
            if let Ok(mut f) = sftp.create("dir/written.txt").await {
                let _ = f.write_all(b"x").await;
                let _ = f.shutdown().await;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(!outside.join("written.txt").exists(), "a write landed outside the instance");
        assert!(
            flips.load(std::sync::atomic::Ordering::Relaxed) > 0 && inside > 0,
            "the race ran ({inside} reads inside, {refused} refused)"
        );
        sim.endpoint.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_kills_processes_however_they_detached() {
    within(async {
        let sim = Sim::start().await;
        let ssh = sim.connect().await;
        // A setsid'd loop, a double-forked daemon and a nohup'd sleep: none is in the
        // command's process group, and two are not even below its process.
        let out = exec(
            &ssh,
            "setsid sh -c 'echo $$ > setsid.pid; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
             (sh -c 'echo $$ > daemon.pid; exec sleep 1000' </dev/null >/dev/null 2>&1 &) ;
             nohup sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > nohup.pid",
        )
        .await;
        assert_eq!(out.status, Some(0), "{}", out.stderr());
        let root = sim.root();
        eventually("the pid files exist", Duration::from_secs(20), || async {
            ["setsid.pid", "daemon.pid", "nohup.pid"].iter().all(|f| read_pid(&root.join(f)).is_some())
        })
        .await;
        let pids: Vec<u32> =
            ["setsid.pid", "daemon.pid", "nohup.pid"].iter().map(|f| read_pid(&root.join(f)).unwrap()).collect();
        // Should the endpoint fail to, the test does not leave them behind.
        // (Only pids that still run one of these commands: a pid may have been reused.)
        struct KillOnDrop(Vec<u32>);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                for pid in &self.0 {
                    let ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.contains("sleep") || c.contains("setsid.pid"));
                    if ours {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
        let _cleanup = KillOnDrop(pids.clone());
        for pid in &pids {
            assert!(process_running(*pid), "{pid} runs after its command ended, as under sshd");
        }
        sim.endpoint.shutdown().await;
        // shutdown returns once every process of the instance is gone.
        for pid in &pids {
            assert!(!process_running(*pid), "process {pid} survived the instance's stop");
        }
    })
    .await
}
