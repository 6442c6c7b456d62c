//! One error scheme for what the command line cannot reach or does not trust (issue 11 item
//! 4): the server named (multipassd or mpool serve), the endpoint, the errno in words, and a
//! certificate that does not verify reported as a trust problem (exit 2), not an outage (3).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use mpool_testkit::SimProcess;

const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

/// A simulator process (time scale 0) with `extra` flags on a temporary directory.
fn start_sim(extra: &[&str]) -> SimProcess {
    SimProcess::start(MPOOL, extra).expect("mpool sim starts")
}

/// `mpool multipass ARGS` as client `who` (its own certificate).
trait Mp {
    fn mp(&self, who: &str, args: &[&str]) -> Output;
}

impl Mp for SimProcess {
    fn mp(&self, who: &str, args: &[&str]) -> Output {
        self.run_multipass(who, args).expect("mpool multipass runs")
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn a_certificate_that_does_not_verify_is_a_trust_problem() {
    let sim = start_sim(&[]);
    // A root CA that did not sign the simulator's certificate.
    let (other_ca, other_leaf) = mpool_tls::generate_ca_and_server("localhost").unwrap();
    let wrong_root = sim.dir.path().join("other-root.pem");
    std::fs::write(&wrong_root, other_ca.cert_pem).unwrap();
    let out = sim.mp("c", &["--root-cert", wrong_root.to_str().unwrap(), "list"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "a trust problem exits 2, not 3: {said}");
    assert!(said.contains("mpool does not trust multipassd at unix:"), "{said}");
    assert!(said.contains(&format!("was checked against the root certificate {}", wrong_root.display())), "{said}");
    assert!(said.contains("not signed by that certificate"), "{said}");
    assert!(said.contains("--root-cert"), "the fix is named: {said}");
    assert!(!said.contains("unreachable") && !said.contains("snap services"), "{said}");
    assert_eq!(said.matches("sha256:").count(), 2, "both certificates are identified once: {said}");

    let wrong_pin = sim.dir.path().join("other-leaf.pem");
    std::fs::write(&wrong_pin, other_leaf.cert_pem).unwrap();
    let out = sim.mp("c", &["--pin-cert", wrong_pin.to_str().unwrap(), "list"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("checked against the pinned certificate {}", wrong_pin.display())), "{said}");
    assert!(said.contains("not the pinned certificate"), "{said}");
}

#[test]
fn discovery_names_every_socket_it_tried() {
    for p in [mpool_multipass::SNAP_SOCKET, mpool_multipass::RUN_SOCKET] {
        assert!(
            !Path::new(p).exists(),
            "this test needs a host without multipassd, but {p} exists (run it where Multipass is not installed)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(MPOOL)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["multipass", "--own-cert", "--insecure-skip-verify", "list"])
        .env_remove("MPOOL_DAEMON")
        .env_remove("MULTIPASS_SERVER_ADDRESS")
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains(&format!("{} (no such file)", mpool_multipass::SNAP_SOCKET)), "{said}");
    assert!(said.contains(&format!("{} (no such file)", mpool_multipass::RUN_SOCKET)), "{said}");
    assert!(said.contains("$MULTIPASS_SERVER_ADDRESS is not set"), "{said}");
    assert!(said.contains("no such file (errno 2)"), "{said}");
}

#[test]
fn authenticate_hints_match_how_the_passphrase_was_given() {
    let sim = start_sim(&["--passphrase", "right"]);
    assert!(sim.mp("first", &["version"]).status.success(), "the first client is trusted");

    let out = sim.mp("second", &["authenticate", "wrong"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("Passphrase is not correct"), "{said}");
    assert!(said.contains("the passphrase given to `authenticate` was refused"), "{said}");
    assert!(!said.contains("passphrase_file"), "no hint about a file nobody gave: {said}");

    let file = sim.dir.path().join("pass.txt");
    std::fs::write(&file, "also-wrong\n").unwrap();
    let out = sim.mp("second", &["--passphrase-file", file.to_str().unwrap(), "list"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("the passphrase in --passphrase-file {} was refused", file.display())), "{said}");

    let out = sim.mp("second", &["authenticate", "right"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `mpool status` against `endpoint`, as `uid` when given.
fn status_at(endpoint: &str, uid: Option<u32>) -> Output {
    let mut cmd = Command::new(MPOOL);
    cmd.args(["--endpoint", endpoint, "status"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().unwrap()
}

#[test]
fn client_commands_name_mpool_the_endpoint_and_the_errno() {
    let dir = tempfile::tempdir().unwrap();
    let check = |out: &Output, endpoint: &str, errno: &str| {
        let said = text(out);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(said.contains(&format!("mpool serve at {endpoint} is unreachable: {errno}")), "{said}");
        assert!(!said.contains("multipassd") && !said.contains("snap services"), "{said}");
    };
    // No such file.
    let missing = format!("unix:{}", dir.path().join("none.sock").display());
    check(&status_at(&missing, None), &missing, "no such file (errno 2)");
    // A stale socket: the file exists, nobody listens.
    let stale_path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale_path).unwrap());
    let stale = format!("unix:{}", stale_path.display());
    check(&status_at(&stale, None), &stale, "connection refused (errno 111)");
    // A socket this user may not open.
    let locked_dir = dir.path().join("locked");
    std::fs::create_dir(&locked_dir).unwrap();
    let locked_path = locked_dir.join("mpool.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&locked_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&locked_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let locked = format!("unix:{}", locked_path.display());
    // root may open anything: the test runs the client as `nobody` then.
    let uid = if unsafe { libc::geteuid() } == 0 { Some(65534) } else { None };
    if uid.is_none() {
        std::fs::set_permissions(&locked_path, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = status_at(&locked, uid);
    check(&out, &locked, "permission denied (errno 13)");
}
