//! `mpool isolation rules` against a real kernel: in network namespaces made here (a "host"
//! namespace holding a Linux bridge named and addressed like Multipass's, and two "instances",
//! each a namespace joined to the bridge by a veth pair whose host end is a `tap-*` port), the
//! generated ruleset, applied with `nft -f -` inside the host namespace, stops instance to
//! instance and instance to host connections, keeps DNS and an allowed port on the host and the
//! host's own connections to instances working, re-applies to the identical ruleset, and its
//! undo restores reachability. The isolation probe's own script (what mpool runs in an idle VM)
//! reaches the same verdicts from inside an instance: not isolated before, isolated with the
//! rules. The real host's network is never touched.
//!
//! Runs as root (as CI does) with `ip` (iproute2) and `nft` (nftables); without them it fails
//! with what to install, never skips.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use mpool_isolation::probe::{self, Verdict};
use nix::sched::{CloneFlags, setns};

const SUBNET: &str = "10.201.7.1/24";
const HOST: &str = "10.201.7.1";
const INSTANCE_A: &str = "10.201.7.10";
const INSTANCE_B: &str = "10.201.7.11";
/// Long enough for a SYN retransmission (1s) when a path is open; a dropped SYN is a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `program args`, panicking with its output (and `hint`) when it cannot run or fails.
fn run(program: &str, args: &[&str], stdin: Option<&str>, hint: &str) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}. {hint}"));
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}\n{hint}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const IP_HINT: &str = "This test needs root, network namespaces and iproute2's `ip` (apt-get install iproute2).";
const NFT_HINT: &str = "This test needs nftables' `nft` (apt-get install nftables) and root.";

fn ip(args: &[&str]) -> String {
    run("ip", args, None, IP_HINT)
}

/// The test's namespaces; deleted on drop, also when the test fails (their interfaces, the
/// bridge and the rules go with them).
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn add(&mut self, name: String) -> String {
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Sets whether bridged IPv4/IPv6 traffic in namespace `ns` also crosses the `inet` hooks
/// (`br_netfilter`, loaded by e.g. Docker). Returns false when `br_netfilter` is not loaded in
/// this kernel (then bridged traffic never crosses them).
fn bridge_nf_call(ns: &str, on: bool) -> bool {
    if !std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        return false;
    }
    let value = if on { "1" } else { "0" };
    for key in ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"] {
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", &format!("{key}={value}")], None, IP_HINT);
    }
    true
}

/// Runs `f` on a thread that has entered namespace `ns`: sockets it creates live there.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}. {IP_HINT}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("cannot enter {path}: {e}. {IP_HINT}"));
        f()
    })
    .join()
    .unwrap()
}

fn listen(ns: &str, addr: &str, port: u16) -> TcpListener {
    let addr: SocketAddr = format!("{addr}:{port}").parse().unwrap();
    in_netns(ns, move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}")))
}

/// Whether a TCP connection from namespace `ns` to `addr:port` is accepted (the listeners
/// never call accept: the kernel completes the handshake into their backlog).
fn connects(ns: &str, addr: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{addr}:{port}").parse().unwrap();
    in_netns(ns, move || TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok())
}

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut full = vec!["netns", "exec", ns, "nft"];
    full.extend_from_slice(args);
    run("ip", &full, stdin, NFT_HINT)
}

/// `mpool isolation rules ARGS` run inside namespace `ns` (so it detects the test's bridge).
fn mpool_rules(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns, env!("CARGO_BIN_EXE_mpool"), "isolation", "rules"];
    full.extend_from_slice(args);
    run("ip", &full, None, IP_HINT)
}

/// The isolation probe as mpool runs it in a VM, run in instance namespace `ns` against the
/// host (22 and 8080) and instance B: its verdict and why.
fn probe_from(ns: &str) -> (Verdict, String) {
    let targets =
        probe::targets(Some(HOST.parse().unwrap()), &[8080], Some(("instance-b", INSTANCE_B.parse().unwrap(), 22)));
    let out = run("ip", &["netns", "exec", ns, "bash", "-c", &probe::script(&targets)], None, IP_HINT);
    probe::verdict(&targets, &out)
}

#[test]
fn generated_rules_isolate_instances_on_a_multipass_like_bridge() {
    run("nft", &["--version"], None, NFT_HINT);
    run("ip", &["-V"], None, IP_HINT);
    let id = format!("mpt{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut namespaces = Namespaces { names: Vec::new() };
    let host = namespaces.add(format!("{id}-host"));
    let a = namespaces.add(format!("{id}-a"));
    let b = namespaces.add(format!("{id}-b"));

    // The bridge, as Multipass's: the host's address .1 on a /24, instances on tap-* ports.
    let bridge = id.clone();
    ip(&["-n", &host, "link", "add", &bridge, "type", "bridge"]);
    ip(&["-n", &host, "addr", "add", SUBNET, "dev", &bridge]);
    ip(&["-n", &host, "link", "set", &bridge, "up"]);
    for (ns, addr, tap) in [(&a, INSTANCE_A, format!("tap-{id}a")), (&b, INSTANCE_B, format!("tap-{id}b"))] {
        ip(&["-n", &host, "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        ip(&["-n", &host, "link", "set", &tap, "master", &bridge]);
        ip(&["-n", &host, "link", "set", &tap, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }

    // Without br_netfilter (Multipass's usual host), only the bridge-family chain sees traffic
    // between instances: it alone must stop it.
    let br_netfilter = bridge_nf_call(&host, false);

    let _service = listen(&host, HOST, 8080);
    let _dns = listen(&host, HOST, 53);
    let _cache = listen(&host, HOST, 3142);
    let _ssh_b = listen(&b, INSTANCE_B, 22);

    let reach = |from: &str, to: &str, port: u16| (port, connects(from, to, port));
    let open_everywhere = [(22, true), (8080, true), (53, true), (3142, true)];
    assert_eq!(
        [reach(&a, INSTANCE_B, 22), reach(&a, HOST, 8080), reach(&a, HOST, 53), reach(&a, HOST, 3142)],
        open_everywhere,
        "before the rules, instance A reaches instance B and every port of the host"
    );
    let (verdict, why) = probe_from(&a);
    assert_eq!(verdict, Verdict::NotIsolated, "{why}");
    assert!(why.contains("VM instance-b at 10.201.7.11:22 connected"), "{why}");
    assert!(why.contains("the host at 10.201.7.1:22 answered (connection refused)"), "{why}");

    // The rules, detected from the bridge inside the host namespace, applied there.
    let rules = mpool_rules(&host, &["--bridge", &bridge, "--allow-host-port", "3142"]);
    assert!(rules.contains(&format!("ip daddr {HOST} ")), "the bridge's address was detected:\n{rules}");
    nft(&host, &["-f", "-"], Some(&rules));
    let isolated = [(22, false), (8080, false), (53, true), (3142, true)];
    assert_eq!(
        [reach(&a, INSTANCE_B, 22), reach(&a, HOST, 8080), reach(&a, HOST, 53), reach(&a, HOST, 3142)],
        isolated,
        "with the rules, instance A reaches neither instance B nor the host's service; DNS (tcp 53) and the allowed port stay open"
    );
    assert!(
        connects(&host, INSTANCE_B, 22),
        "the host still reaches an instance (mpool's SSH): the replies must be accepted"
    );
    let (verdict, why) = probe_from(&a);
    assert_eq!(verdict, Verdict::Isolated, "the probe sees the rules hold: {why}");

    // With br_netfilter (e.g. Docker on the host), bridged traffic also crosses the inet hooks:
    // still isolated, DNS still open.
    if br_netfilter {
        bridge_nf_call(&host, true);
        assert_eq!(
            [reach(&a, INSTANCE_B, 22), reach(&a, HOST, 8080), reach(&a, HOST, 53)],
            [(22, false), (8080, false), (53, true)],
            "with br_netfilter on, the rules still isolate"
        );
        assert!(connects(&host, INSTANCE_B, 22), "with br_netfilter on, the host still reaches an instance");
        bridge_nf_call(&host, false);
    } else {
        eprintln!("note: br_netfilter is not loaded in this kernel; the rules were checked without it only");
    }

    // Re-applying leaves the same ruleset.
    let once = nft(&host, &["list", "ruleset"], None);
    nft(&host, &["-f", "-"], Some(&rules));
    let twice = nft(&host, &["list", "ruleset"], None);
    assert_eq!(once, twice, "re-applying the rules must change nothing");
    assert!(once.contains("table inet mpool_isolation") && once.contains("table bridge mpool_isolation"), "{once}");
    assert_eq!(
        [reach(&a, INSTANCE_B, 22), reach(&a, HOST, 8080)],
        [(22, false), (8080, false)],
        "still isolated after re-applying"
    );

    // Undo restores reachability and leaves no table of mpool's.
    nft(&host, &["-f", "-"], Some(&mpool_rules(&host, &["--undo"])));
    let after_undo = nft(&host, &["list", "ruleset"], None);
    assert!(!after_undo.contains("mpool_isolation"), "undo leaves no mpool table:\n{after_undo}");
    assert_eq!(
        [reach(&a, INSTANCE_B, 22), reach(&a, HOST, 8080), reach(&a, HOST, 53), reach(&a, HOST, 3142)],
        open_everywhere,
        "after undo, instance A reaches instance B and the host again"
    );
    assert_eq!(probe_from(&a).0, Verdict::NotIsolated, "the probe sees the rules gone");
}

#[test]
fn a_missing_bridge_is_an_error_naming_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_mpool"))
        .args(["isolation", "rules", "--bridge", "mptnosuchbr"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no rules printed: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no network interface named \"mptnosuchbr\"")
            && err.contains("--bridge NAME")
            && err.contains("--subnet"),
        "{err}"
    );
}
