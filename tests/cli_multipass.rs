//! `mpool sim` and `mpool multipass` as processes: what an operator types.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

/// A `mpool sim` process on a temp dir, killed on drop.
struct SimProcess {
    child: Child,
    dir: tempfile::TempDir,
}

impl SimProcess {
    fn start(extra: &[&str]) -> SimProcess {
        SimProcess::start_in(tempfile::tempdir().unwrap(), extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> SimProcess {
        let sock = dir.path().join("sim.sock");
        let child = Command::new(MPOOL)
            .args(["sim", "--time-scale", "0", "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "simulator socket did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        SimProcess { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sim.sock")
    }

    fn mp(&self, args: &[&str]) -> Output {
        mp_at(self.dir.path(), &self.socket(), args)
    }
}

fn mp_at(dir: &Path, sock: &Path, args: &[&str]) -> Output {
    Command::new(MPOOL)
        .arg("--data-dir")
        .arg(dir.join("client"))
        .arg("multipass")
        .arg("--daemon")
        .arg(format!("unix:{}", sock.display()))
        .arg("--own-cert")
        .args(args)
        .output()
        .unwrap()
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn operator_commands_with_multipass_shapes() {
    let sim = SimProcess::start(&[]);
    // The root certificate is found beside the socket, no flag needed.
    let out = sim.mp(&["version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1.16.3"));
    assert!(
        sim.mp(&["launch", "--name", "vm1", "24.04"])
            .status
            .success()
    );
    let out = sim.mp(&["--json", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "vm1");
    assert_eq!(list[0]["state"], "RUNNING");

    let out = sim.mp(&["snapshot", "vm1", "--name", "clean"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a refused command exits 2: {}",
        text(&out)
    );
    assert!(text(&out).contains("only take snapshots of stopped instances"));
    assert!(sim.mp(&["stop", "vm1"]).status.success());
    assert!(
        sim.mp(&["snapshot", "vm1", "--name", "clean"])
            .status
            .success()
    );
    assert!(sim.mp(&["clone", "vm1", "--name", "vm2"]).status.success());
    assert!(
        sim.mp(&["restore", "vm1.clean", "--destructive"])
            .status
            .success()
    );
    let out = sim.mp(&["list", "--snapshots"]);
    assert!(text(&out).contains("clean"), "{}", text(&out));
    assert!(
        sim.mp(&["delete", "--purge", "vm1", "vm2"])
            .status
            .success()
    );
    assert!(text(&sim.mp(&["list"])).contains("No instances found"));
}

#[test]
fn unreachable_daemon_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = mp_at(
        dir.path(),
        &dir.path().join("none.sock"),
        &["--insecure-skip-verify", "list"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("unreachable"), "{}", text(&out));
}

#[test]
fn set_makes_the_simulator_exit_42() {
    let mut sim = SimProcess::start(&["--passphrase", "pw"]);
    let out = sim.mp(&["set", "local.passphrase=new"]);
    assert!(
        out.status.success(),
        "the reply arrives before the exit: {}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sim.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "simulator did not exit after set"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(42));
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(MPOOL)
        .args(["sim", "--fail-rate", "2", "--socket"])
        .arg(dir.path().join("s"))
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not a probability"), "{}", text(&out));
    let out = mp_at(
        dir.path(),
        &dir.path().join("s"),
        &["restore", "no-dot", "--insecure-skip-verify"],
    );
    assert!(!out.status.success());
}

#[test]
fn exec_runs_in_the_instance_and_exits_with_its_code() {
    let sim = SimProcess::start(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    let out = sim.mp(&[
        "exec",
        "vm1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // argv arrives intact: no shell injection.
    let out = sim.mp(&[
        "exec",
        "vm1",
        "--",
        "printf",
        "[%s]",
        "a b",
        "$HOME",
        "; touch pwned",
        "",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[a b][$HOME][; touch pwned][]"
    );
    assert!(
        !sim.dir
            .path()
            .join("state/instances/vm1/root/pwned")
            .exists()
    );
    // A suspended instance is started first, as the multipass CLI does.
    assert!(sim.mp(&["suspend", "vm1"]).status.success());
    let out = sim.mp(&["exec", "vm1", "--working-directory", "/tmp", "--", "pwd"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/tmp\n",
        "{}",
        text(&out)
    );
}

#[test]
fn exec_reaches_a_real_sshd_through_ssh_target() {
    let sshd = common::sshd::Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    // The simulator's key (the one ssh_info hands out) is authorized on the real sshd.
    let keys = mpool::sim::ssh::SshKeys::load_or_create(&dir.path().join("state")).unwrap();
    sshd.authorize_public(&keys.client_public_openssh());
    let target = format!("{}@127.0.0.1:{}", sshd.user(), sshd.port());
    let sim = SimProcess::start_in(dir, &["--ssh-target", &target]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    let marker = sshd.scratch_dir().join("marker");
    let cmd = format!(
        "echo from-real-sshd > {}; cat {}; exit 7",
        marker.display(),
        marker.display()
    );
    let out = sim.mp(&["exec", "vm1", "--", "sh", "-c", &cmd]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-real-sshd\n");
    assert!(
        sshd.log().contains("Accepted publickey"),
        "the real sshd served it"
    );
}
