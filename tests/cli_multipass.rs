//! `mpool sim` and `mpool multipass` as processes: what an operator types.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use mpool_testkit::{SimProcess, multipass_command, wait};

const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

/// A simulator process (time scale 0) with `extra` flags on a temporary directory.
fn start_sim(extra: &[&str]) -> SimProcess {
    SimProcess::start(MPOOL, extra).expect("mpool sim starts")
}

/// `mpool multipass ARGS` as client `client`, the one the tests use.
trait Mp {
    fn mp(&self, args: &[&str]) -> Output;
}

impl Mp for SimProcess {
    fn mp(&self, args: &[&str]) -> Output {
        self.run_multipass("client", args).expect("mpool multipass runs")
    }
}

/// `mpool multipass ARGS` as client `client` of `dir` against `sock` (nothing need listen).
fn mp_at(dir: &Path, sock: &Path, args: &[&str]) -> Output {
    multipass_command(Path::new(MPOOL), &dir.join("client"), sock).args(args).output().expect("mpool multipass runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn operator_commands_with_multipass_shapes() {
    let sim = start_sim(&[]);
    // The root certificate is found beside the socket, no flag needed.
    let out = sim.mp(&["version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1.16.3"));
    assert!(sim.mp(&["launch", "--name", "vm1", "24.04"]).status.success());
    let out = sim.mp(&["--json", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "vm1");
    assert_eq!(list[0]["state"], "RUNNING");

    let out = sim.mp(&["snapshot", "vm1", "--name", "clean"]);
    assert_eq!(out.status.code(), Some(2), "a refused command exits 2: {}", text(&out));
    assert!(text(&out).contains("only take snapshots of stopped instances"));
    assert!(sim.mp(&["stop", "vm1"]).status.success());
    assert!(sim.mp(&["snapshot", "vm1", "--name", "clean"]).status.success());
    assert!(sim.mp(&["clone", "vm1", "--name", "vm2"]).status.success());
    assert!(sim.mp(&["restore", "vm1.clean", "--destructive"]).status.success());
    let out = sim.mp(&["list", "--snapshots"]);
    assert!(text(&out).contains("clean"), "{}", text(&out));
    assert!(sim.mp(&["delete", "--purge", "vm1", "vm2"]).status.success());
    assert!(text(&sim.mp(&["list"])).contains("No instances found"));
}

#[test]
fn unreachable_daemon_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = mp_at(dir.path(), &dir.path().join("none.sock"), &["--insecure-skip-verify", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("unreachable"), "{}", text(&out));
}

#[test]
fn set_makes_the_simulator_exit_42() {
    let mut sim = start_sim(&["--passphrase", "pw"]);
    let out = sim.mp(&["set", "local.passphrase=new"]);
    assert!(out.status.success(), "the reply arrives before the exit: {}", text(&out));
    let child = &mut sim.child;
    let status = wait("the simulator exits after the set", Duration::from_secs(30))
        .until_blocking(|| child.try_wait())
        .expect("the simulator exits");
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
    let out = mp_at(dir.path(), &dir.path().join("s"), &["restore", "no-dot", "--insecure-skip-verify"]);
    assert!(!out.status.success());
}

#[test]
fn exec_runs_in_the_instance_and_exits_with_its_code() {
    let sim = start_sim(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    let out = sim.mp(&["exec", "vm1", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // argv arrives intact: no shell injection.
    let out = sim.mp(&["exec", "vm1", "--", "printf", "[%s]", "a b", "$HOME", "; touch pwned", ""]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[a b][$HOME][; touch pwned][]");
    let root = sim.dir.path().join("state/vault/instances/vm1/root");
    assert!(root.is_dir() && !root.join("pwned").exists(), "{}", root.display());
    // A suspended instance is started first, as the multipass CLI does.
    assert!(sim.mp(&["suspend", "vm1"]).status.success());
    let out = sim.mp(&["exec", "vm1", "--working-directory", "/tmp", "--", "pwd"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp\n", "{}", text(&out));
}

#[test]
fn exec_reaches_a_real_sshd_through_ssh_target() {
    let sshd = mpool_testkit::Sshd::start().expect("sshd starts");
    let dir = tempfile::tempdir().unwrap();
    // The simulator's key (the one ssh_info hands out) is authorized on the real sshd.
    sshd.authorize_sim_key(&dir.path().join("state")).expect("the simulator's key is authorized");
    let target = format!("{}@127.0.0.1:{}", sshd.user(), sshd.port());
    let sim = SimProcess::start_in(MPOOL, dir, &["--ssh-target", &target]).expect("mpool sim starts");
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    let marker = sshd.scratch_dir().join("marker");
    let cmd = format!("echo from-real-sshd > {}; cat {}; exit 7", marker.display(), marker.display());
    let out = sim.mp(&["exec", "vm1", "--", "sh", "-c", &cmd]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-real-sshd\n");
    assert!(sshd.log().contains("Accepted publickey"), "the real sshd served it");
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `mpool multipass ARGS` with `input` on stdin.
fn mp_with_stdin(sim: &SimProcess, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = sim
        .multipass("client")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin); // EOF
    child.wait_with_output().unwrap()
}

#[test]
fn info_shows_runtime_information_like_the_multipass_cli() {
    let sim = start_sim(&["--log-lines"]);
    let out = sim.mp(&["launch", "--name", "vm1", "--cpus", "2", "--memory", "2G"]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(sim.dir.path().join("state/vault/instances/vm1/root/blob"), vec![0u8; 3 << 20]).unwrap();
    let out = sim.mp(&["info", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    let info = stdout(&out);
    for line in [
        "Name:           vm1\n",
        "State:          Running\n",
        "IPv4:           127.0.0.1\n",
        "Release:        24.04 LTS\n",
        "CPU(s):         2\n",
        "Load:           0.00 0.00 0.00\n",
        "Memory usage:   256.0MiB out of 2.0GiB\n",
    ] {
        assert!(info.contains(line), "{line:?} in:\n{info}");
    }
    let disk = info.lines().find(|l| l.starts_with("Disk usage:")).unwrap_or_default();
    assert!(disk.contains("MiB out of 5.0GiB"), "disk usage counts the instance's files: {disk}");
    // Without runtime information those fields are unknown, as with the real daemon.
    let out = sim.mp(&["info", "--no-runtime-information", "vm1"]);
    let info = stdout(&out);
    for line in ["IPv4:           --\n", "CPU(s):         --\n", "Load:           --\n", "Disk usage:     --\n"] {
        assert!(info.contains(line), "{line:?} in:\n{info}");
    }
    let out = sim.mp(&["--json", "info", "vm1"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["cpus"], "2");
    assert_eq!(v[0]["memory"], (2u64 << 30).to_string());
}

#[test]
fn list_shows_ipv4_like_the_multipass_cli() {
    let sim = start_sim(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    assert!(sim.mp(&["launch", "--name", "vm2"]).status.success());
    assert!(sim.mp(&["stop", "vm2"]).status.success());
    let list = stdout(&sim.mp(&["list"]));
    let row = |name: &str| list.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(list.starts_with("Name                    State             IPv4             Image\n"), "{list}");
    assert!(row("vm1").contains("Running           127.0.0.1        Ubuntu 24.04 LTS"), "{list}");
    assert!(row("vm2").contains("Stopped           --               Ubuntu 24.04 LTS"), "{list}");
    let v: serde_json::Value = serde_json::from_slice(&sim.mp(&["--json", "list"]).stdout).unwrap();
    assert_eq!(v[0]["ipv4"][0], "127.0.0.1");
}

#[test]
fn get_prints_passphrase_as_true_or_false_and_empty_values_as_empty() {
    let sim = start_sim(&[]);
    let get = |args: &[&str]| {
        let out = sim.mp(args);
        assert!(out.status.success(), "{}", text(&out));
        stdout(&out)
    };
    assert_eq!(get(&["get", "local.passphrase"]), "false\n");
    assert_eq!(get(&["get", "local.bridged-network"]), "<empty>\n");
    assert_eq!(get(&["get", "--raw", "local.bridged-network"]), "\n");
    assert_eq!(get(&["get", "local.driver"]), "qemu\n");
    let sim = start_sim(&["--passphrase", "pw"]);
    let out = sim.mp(&["get", "local.passphrase"]);
    assert_eq!(stdout(&out), "true\n", "the daemon's hash is shown as `true`: {}", text(&out));
}

#[test]
fn exec_forwards_stdin_and_closes_it_at_eof() {
    let sim = start_sim(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    // `cat` ends only when its stdin is closed: it sees our EOF.
    let out = mp_with_stdin(&sim, &["exec", "vm1", "--", "cat"], b"x\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(stdout(&out), "x\n");
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let out = mp_with_stdin(&sim, &["exec", "vm1", "--", "sh", "-c", "wc -c"], &big);
    assert_eq!(stdout(&out).trim(), (1 << 20).to_string(), "{}", text(&out));
}

#[test]
fn start_takes_a_timeout() {
    let sim = start_sim(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    assert!(sim.mp(&["stop", "vm1"]).status.success());
    let out = sim.mp(&["start", "--timeout", "120", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = sim.mp(&["start", "--timeout", "-1", "vm1"]);
    assert_eq!(out.status.code(), Some(2), "a negative timeout is refused: {}", text(&out));
}

#[test]
fn find_lists_the_catalogue_like_the_multipass_cli() {
    let sim = start_sim(&[]);
    let out = sim.mp(&["find"]);
    assert!(out.status.success(), "{}", text(&out));
    let found = stdout(&out);
    assert!(
        found.starts_with("Image                       Aliases           Version          Description\n"),
        "{found}"
    );
    assert!(found.contains("\n24.04                       noble,lts         "), "{found}");
    assert!(found.contains("\ndaily:25.10                 questing,devel    "), "{found}");
    assert!(found.contains("\nBlueprint (deprecated)"), "{found}");
    assert!(found.contains("\ndocker  "), "{found}");
    let v: serde_json::Value = serde_json::from_slice(&sim.mp(&["--json", "find", "daily:devel"]).stdout).unwrap();
    assert_eq!(v["images"][0]["aliases"][0]["remote"], "daily");
    assert_eq!(v["images"][0]["codename"], "questing");
    assert_eq!(v["blueprints"], serde_json::json!([]));
    let out = sim.mp(&["find", "nosuch:noble"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("Remote 'nosuch' is not found"), "{}", text(&out));
}

#[test]
fn serve_check_tells_whether_pool_images_are_known() {
    let sim = start_sim(&[]);
    let config = sim.dir.path().join("mpool.toml");
    let write = |images: &[(&str, &str)]| {
        let mut text = format!(
            "[daemon]\naddress = \"unix:{}\"\nroot_cert = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            sim.socket().display(),
            sim.dir.path().join("multipass_root_cert.pem").display(),
            sim.dir.path().join("client/client-cert.pem").display(),
            sim.dir.path().join("client/client-key.pem").display(),
        );
        for (name, image) in images {
            text.push_str(&format!("\n[[pools]]\nname = \"{name}\"\nimage = \"{image}\"\n"));
        }
        std::fs::write(&config, text).unwrap();
    };
    // A client certificate the simulator trusts (the first client's).
    assert!(sim.mp(&["version"]).status.success());
    let check = || {
        Command::new(MPOOL)
            .args(["--data-dir"])
            .arg(sim.dir.path().join("client"))
            .args(["serve", "--check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    write(&[("ci", "24.04"), ("nightly", "daily:devel"), ("dock", "docker")]);
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("pool ci: image 24.04: known (Ubuntu 24.04 LTS)"), "{said}");
    assert!(said.contains("pool nightly: image daily:devel: known (Ubuntu 25.10)"), "{said}");
    assert!(said.contains("pool dock: image docker: known (blueprint"), "{said}");

    write(&[("ci", "24.04"), ("typo", "nobel"), ("far", "nosuch:noble")]);
    let out = check();
    assert_eq!(out.status.code(), Some(2), "an unknown image fails the check: {}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("pool typo: image nobel: UNKNOWN to multipassd"), "{said}");
    assert!(said.contains("pool far: image nosuch:noble: UNKNOWN to multipassd"), "{said}");
    assert!(said.contains("Remote 'nosuch' is not found"), "{said}");
}

#[test]
fn fail_mode_abort_cuts_the_call_and_exits_like_an_abort() {
    let mut sim = start_sim(&["--fail-mode", "abort", "--fail", "list"]);
    assert!(sim.mp(&["version"]).status.success(), "other calls work");
    let out = sim.mp(&["list"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("was cut off"), "{}", text(&out));
    let status = sim.child.wait().unwrap();
    assert_eq!(status.code(), Some(134), "exits as an abort");
    assert!(sim.socket().exists(), "the dead daemon's socket file stays behind");
    let out = sim.mp(&["version"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).contains("connection refused"), "{}", text(&out));
}

#[test]
fn a_set_with_a_call_in_flight_wedges_the_simulator() {
    let sim = start_sim(&["--set-wedges-if-busy", "--hang", "boot"]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    assert!(sim.mp(&["stop", "vm1"]).status.success());
    // A start whose guest never comes up stays in flight.
    let mut start = sim
        .multipass("client")
        .args(["--timeout", "600", "start", "vm1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut list = String::new();
    wait("the start begins", Duration::from_secs(30))
        .until_blocking(|| {
            list = stdout(&sim.mp(&["list"]));
            list.contains("Starting")
        })
        .unwrap_or_else(|e| panic!("{e}: {list}"));
    let out = sim.mp(&["set", "local.passphrase=new"]);
    assert!(out.status.success(), "the set is answered: {}", text(&out));
    wait("the socket goes away", Duration::from_secs(30)).until_blocking(|| !sim.socket().exists()).expect("no socket");
    let mut sim = sim;
    assert!(sim.child.try_wait().unwrap().is_none(), "the process stays alive");
    // SIGTERM does not end it either; only SIGKILL (the Drop) does.
    unsafe { libc::kill(sim.child.id() as i32, libc::SIGTERM) };
    let out = sim.mp(&["version"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(sim.child.try_wait().unwrap().is_none(), "still alive after SIGTERM");
    let _ = start.kill();
    let _ = start.wait();
}

#[test]
fn mpool_multipass_ends_quietly_on_a_closed_pipe() {
    let sim = start_sim(&[]);
    assert!(sim.mp(&["launch", "--name", "vm1"]).status.success());
    assert!(sim.mp(&["stop", "vm1"]).status.success());
    assert!(sim.mp(&["snapshot", "vm1", "--name", "clean"]).status.success());
    assert!(sim.mp(&["start", "vm1"]).status.success());
    for args in [
        &["version"][..],
        &["--json", "version"],
        &["list"],
        &["--json", "list"],
        &["list", "--snapshots"],
        &["info", "vm1"],
        &["find"],
        &["get", "local.driver"],
        &["ssh-info", "vm1"],
        &["daemon-info"],
        &["authenticate"],
        &["exec", "vm1", "--", "echo", "out"],
    ] {
        // A pipe whose reader is gone before mpool writes (`mpool multipass list | head -0`):
        // every write is EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = sim
            .multipass("client")
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(0) && stderr.is_empty(),
            "mpool multipass {args:?} into a closed pipe: {:?} {stderr}",
            out.status
        );
    }
}
