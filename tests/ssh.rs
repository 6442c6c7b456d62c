//! `mpool_ssh` against a real OpenSSH sshd on loopback (started per test by
//! `mpool_testkit::Sshd`): the shared exec/transfer suite, plus OpenSSH-specific checks (key
//! formats, errors, host key pinning, reconnecting).

mod common;

use std::time::Duration;

use common::suite::{self, Remote};
use mpool_ssh::{Connection, ConnectionCache, ExecRequest, SshEndpoint, SshError, SshOptions};
use mpool_testkit::Sshd;

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mpool-ssh-test-").tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_streams() {
    let server = Sshd::start().expect("sshd starts");
    suite::exit_codes_and_streams(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_env_cwd() {
    let server = Sshd::start().expect("sshd starts");
    suite::stdin_env_cwd(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argv_is_inert() {
    let server = Sshd::start().expect("sshd starts");
    suite::argv_is_inert(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts() {
    let server = Sshd::start().expect("sshd starts");
    suite::scripts(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_in_chunks() {
    let server = Sshd::start().expect("sshd starts");
    suite::output_streams_in_chunks(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_round_trip() {
    let server = Sshd::start().expect("sshd starts");
    let dir = temp();
    suite::large_file_round_trip(&Remote::openssh(&server), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_round_trip() {
    let server = Sshd::start().expect("sshd starts");
    let dir = temp();
    suite::tree_round_trip(&Remote::openssh(&server), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_confined() {
    let server = Sshd::start().expect("sshd starts");
    let dir = temp();
    suite::paths_are_confined(&Remote::openssh(&server), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_kill_the_process_group() {
    let server = Sshd::start().expect("sshd starts");
    suite::timeout_and_cancel_kill_the_process_group(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_running_commands() {
    let server = Sshd::start().expect("sshd starts");
    suite::close_stops_running_commands(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_execs_one_connection() {
    let server = Sshd::start().expect("sshd starts");
    suite::many_execs_one_connection(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_uses_the_pooled_connection() {
    let server = Sshd::start().expect("sshd starts");
    suite::ping_uses_the_pooled_connection(&Remote::openssh(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_bounded() {
    let server = Sshd::start().expect("sshd starts");
    suite::channels_are_bounded(&Remote::openssh(&server)).await;
}

/// RSA keys in PEM (PKCS#1), PKCS#8 and OpenSSH format, and ed25519, all log in, also with CRLF
/// line ends. (OpenSSH 8.8+ refuses SHA-1 `ssh-rsa` signatures, so RSA logins prove SHA-2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_formats() {
    let server = Sshd::start().expect("sshd starts");
    let keys = [
        ("rsa pem", server.client_key().to_string()),
        ("rsa pkcs8", server.authorize_new_key("rsa", Some("PKCS8")).expect("a new key")),
        ("rsa openssh", server.authorize_new_key("rsa", None).expect("a new key")),
        ("ed25519", server.authorize_new_key("ed25519", None).expect("a new key")),
    ];
    for (name, key) in keys {
        // Keys copied through JSON or Windows tools may carry CRLF line ends.
        for text in [key.clone(), key.replace('\n', "\r\n")] {
            let target = SshEndpoint { private_key: text, ..server.target() };
            let conn =
                Connection::connect(&target, &SshOptions::default()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            let out = conn.run(ExecRequest::argv(["echo", name])).await.unwrap();
            assert_eq!(out.stdout_text(), format!("{name}\n"));
            conn.close().await;
        }
    }
    assert_eq!(server.accepted_logins(), 8);
}

/// Connection refused → Unreachable; unauthorized key → AuthRefused; garbage key → InvalidKey;
/// a silent server → Timeout. Each message says what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_connect_errors() {
    let server = Sshd::start().expect("sshd starts");
    let options = SshOptions { connect_timeout: Duration::from_secs(2), ..SshOptions::default() };

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = SshEndpoint { port: closed_port, ..server.target() };
    let err = Connection::connect(&target, &options).await.unwrap_err();
    assert!(matches!(err, SshError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("check that the VM is running"), "{err}");

    let target = SshEndpoint { private_key: server.unauthorized_key().expect("a key"), ..server.target() };
    let err = Connection::connect(&target, &options).await.unwrap_err();
    assert!(matches!(err, SshError::AuthRefused { .. }), "{err}");
    assert!(err.to_string().contains("authorized_keys"), "{err}");

    let target = SshEndpoint { private_key: "not a key".into(), ..server.target() };
    let err = Connection::connect(&target, &options).await.unwrap_err();
    assert!(matches!(err, SshError::InvalidKey { .. }), "{err}");

    // Accepts TCP but never speaks SSH.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = SshEndpoint { port: silent.local_addr().unwrap().port(), ..server.target() };
    let err = Connection::connect(&target, &options).await.unwrap_err();
    assert!(matches!(err, SshError::Timeout { .. }), "{err}");
    assert!(format!("{:?}", target).contains("<redacted>"), "Debug must not print the key");
}

/// The first host key seen under a cache key is pinned: after the server comes back with
/// another host key on the same port, reconnecting is refused with HostKeyMismatch; closing the
/// entry (lease end) forgets the pin. A pinned `connect_pinned` with a wrong fingerprint fails too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_change_is_refused() {
    let mut server = Sshd::start().expect("sshd starts");
    let target = server.target();
    let cache = ConnectionCache::new(SshOptions::default());
    cache.run("lease", &target, ExecRequest::argv(["true"])).await.unwrap().check().unwrap();
    let pinned = cache.pinned_host_key("lease").await.expect("pinned after first use");
    assert!(pinned.starts_with("SHA256:"), "{pinned}");

    server.restart_with_new_host_key().expect("sshd restarts");
    // The established connection survives the listener restart; end it from the server side so
    // the cache has to reconnect.
    let _ = cache.run("lease", &target, ExecRequest::shell("kill -KILL $PPID")).await;
    let err = cache.run("lease", &target, ExecRequest::argv(["true"])).await.unwrap_err();
    match &err {
        SshError::HostKeyMismatch { expected, actual, .. } => {
            assert_eq!(expected, &pinned);
            assert_ne!(actual, &pinned);
        }
        other => panic!("expected HostKeyMismatch, got {other}"),
    }
    assert!(err.to_string().contains("different machine"), "{err}");

    let err = Connection::connect_pinned(&target, &SshOptions::default(), Some(&pinned)).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err}");

    assert!(cache.close("lease").await);
    cache.run("lease", &target, ExecRequest::argv(["true"])).await.unwrap().check().unwrap();
    assert_ne!(cache.pinned_host_key("lease").await, Some(pinned));
}

/// A connection that dies (its sshd process killed) is detected and reopened once; the command
/// that was running reports no status; `close` ends the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_connection_loss() {
    let server = Sshd::start().expect("sshd starts");
    let target = server.target();
    let cache = ConnectionCache::new(SshOptions::default());
    let first = cache.connection("vm", &target).await.unwrap();
    let before = server.connections();

    // $PPID of the session's shell is the connection's sshd process.
    let out = cache.run("vm", &target, ExecRequest::shell("kill -KILL $PPID")).await.unwrap();
    assert_eq!((out.code, out.signal.as_deref()), (None, None), "{out:?}");
    assert!(out.check().unwrap_err().to_string().contains("connection was lost"));

    let out = cache.run("vm", &target, ExecRequest::argv(["echo", "back"])).await.unwrap();
    assert_eq!(out.stdout_text(), "back\n");
    assert!(first.is_closed());
    assert!(!cache.connection("vm", &target).await.unwrap().same_as(&first));
    assert_eq!(server.connections() - before, 1, "exactly one reconnect");

    assert!(cache.close("vm").await);
    assert!(!cache.close("vm").await);
    assert!(cache.keys().is_empty());
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// Mounts a 1 MiB tmpfs at `dir`, or `None` without the privileges to mount.
    fn mount(dir: std::path::PathBuf) -> Option<SmallFs> {
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        status.is_ok_and(|s| s.success()).then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Permission denied and disk full, on both sides, with what-to-check messages; a failed upload
/// leaves no truncated file and a failed download no partial local file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_errors() {
    let server = Sshd::start().expect("sshd starts");
    let conn = Connection::connect(&server.target(), &SshOptions::default()).await.unwrap();
    let local = temp();
    let small = local.path().join("small.txt");
    std::fs::write(&small, "x").unwrap();
    let opts = mpool_ssh::TransferOptions::default();

    // Refused even for root: sysfs attributes without write permission.
    let err = conn.upload(&small, "/sys/kernel/notes", &opts).await.unwrap_err();
    assert!(matches!(err, SshError::PermissionDenied { side: mpool_ssh::Side::Remote, .. }), "{err}");
    assert!(err.to_string().contains("check the owner and mode"), "{err}");

    let big = local.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 4 * 1024 * 1024]).unwrap();
    let Some(full) = SmallFs::mount(server.scratch_dir().join("tiny")) else {
        eprintln!("skipping the disk-full checks: cannot mount a tmpfs here");
        return;
    };
    let remote = format!("{}/big.bin", full.0.display());
    let err = conn.upload(&big, &remote, &opts).await.unwrap_err();
    assert!(matches!(err, SshError::DiskFull { side: mpool_ssh::Side::Remote, .. }), "{err}");
    assert!(err.to_string().contains("df -h"), "{err}");
    assert!(!full.0.join("big.bin").exists(), "the truncated upload was removed");

    let source = format!("{}/big-remote.bin", server.scratch_dir().display());
    std::fs::copy(&big, &source).unwrap();
    let target = full.0.join("download.bin");
    let err = conn.download(&source, &target, &opts).await.unwrap_err();
    assert!(matches!(err, SshError::DiskFull { side: mpool_ssh::Side::Local, .. }), "{err}");
    assert!(!target.exists(), "the partial download was removed");
}
