//! Isolation measured, not assumed: what an idle pooled VM tries to reach, the script it runs
//! to try (bash's `/dev/tcp` under coreutils' `timeout`, in every Ubuntu image), and the
//! verdict from that script's output. Pure: running the script is the engine's job.
//!
//! A target counts as reachable when the connection opens *or is refused*: a refusal is the
//! host or the other VM answering, so nothing blocks it and a service started there later
//! would be reachable. Only silence (the timeout) or an ICMP error (no route, unreachable)
//! counts as blocked, which is what mpool's rules (`mpool isolation rules`: drop) produce.

use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;

/// Seconds each connection attempt waits before it counts as blocked (the attempts run in
/// parallel, so a probe takes about this long when everything is blocked).
pub const CONNECT_TIMEOUT_SECS: u32 = 1;

/// What a target is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The Multipass host, at its address on the bridge.
    Host,
    /// Another VM of the pool (by instance name), at its SSH port.
    Peer(String),
}

/// One address and port the probing VM must not reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host or another VM.
    pub role: Role,
    /// Its address (an IP literal: the script embeds it, so names are never accepted).
    pub address: IpAddr,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self.address {
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
            IpAddr::V4(a) => format!("{a}:{}", self.port),
        };
        match &self.role {
            Role::Host => write!(f, "the host at {at}"),
            Role::Peer(vm) => write!(f, "VM {vm} at {at}"),
        }
    }
}

/// The targets of one probe: the host's bridge address on port 22 and on each of mpool's TCP
/// ports, and another VM's SSH endpoint when one is running idle. Ports are deduplicated.
pub fn targets(host: Option<IpAddr>, host_ports: &[u16], peer: Option<(&str, IpAddr, u16)>) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(address) = host {
        let mut ports: Vec<u16> = std::iter::once(22).chain(host_ports.iter().copied()).filter(|p| *p != 0).collect();
        ports.sort_unstable();
        ports.dedup();
        out.extend(ports.into_iter().map(|port| Target { role: Role::Host, address, port }));
    }
    if let Some((vm, address, port)) = peer {
        out.push(Target { role: Role::Peer(vm.to_string()), address, port });
    }
    out
}

/// The bash script that tries every target at once and prints one line per target:
/// `open|refused|blocked ADDRESS PORT`.
pub fn script(targets: &[Target]) -> String {
    let mut s = format!(
        "probe() {{\n\
         \terr=$(timeout {CONNECT_TIMEOUT_SECS} bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' probe \"$1\" \"$2\" 2>&1)\n\
         \tcase $? in\n\
         \t0) echo \"open $1 $2\" ;;\n\
         \t124) echo \"blocked $1 $2\" ;;\n\
         \t*) case $err in *[Rr]efused*) echo \"refused $1 $2\" ;; *) echo \"blocked $1 $2\" ;; esac ;;\n\
         \tesac\n\
         }}\n"
    );
    for t in targets {
        // IP literals and numbers only: nothing here needs quoting.
        let _ = writeln!(s, "probe {} {} &", t.address, t.port);
    }
    s.push_str("wait\n");
    s
}

/// What the probe concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every target was blocked.
    Isolated,
    /// At least one target answered.
    NotIsolated,
    /// The probe could not tell (no targets, or the script did not report on one).
    Unknown,
}

/// The verdict from the script's output, with a sentence saying why.
pub fn verdict(targets: &[Target], output: &str) -> (Verdict, String) {
    if !targets.iter().any(|t| t.role == Role::Host) {
        return (
            Verdict::Unknown,
            "the host's address on the Multipass bridge is unknown (no bridge found: set [isolation] bridge)".into(),
        );
    }
    let mut reachable = Vec::new();
    for t in targets {
        let found = output.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let (Some(outcome), Some(address), Some(port)) = (words.next(), words.next(), words.next()) else {
                return None;
            };
            let same = address.parse::<IpAddr>().ok() == Some(t.address) && port.parse::<u16>().ok() == Some(t.port);
            same.then_some(outcome)
        });
        match found {
            Some("blocked") => {}
            Some(how @ ("open" | "refused")) => {
                let how = if how == "open" { "connected" } else { "answered (connection refused)" };
                reachable.push(format!("{t} {how}"));
            }
            _ => {
                let tail: String = output.chars().take(300).collect();
                return (Verdict::Unknown, format!("the probe did not report on {t}; it printed: {tail:?}"));
            }
        }
    }
    let peer = targets.iter().any(|t| matches!(t.role, Role::Peer(_)));
    if reachable.is_empty() {
        let checked = targets.iter().map(Target::to_string).collect::<Vec<_>>().join(", ");
        let mut why = format!("blocked: {checked}");
        if !peer {
            why.push_str(" (no other VM was running idle, so VM-to-VM was not tried this time)");
        }
        (Verdict::Isolated, why)
    } else {
        (Verdict::NotIsolated, format!("a VM reached {}", reachable.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Option<IpAddr> {
        Some("10.1.2.1".parse().unwrap())
    }

    fn peer() -> Option<(&'static str, IpAddr, u16)> {
        Some(("mpool-ci-b", "10.1.2.7".parse().unwrap(), 22))
    }

    #[test]
    fn targets_are_the_host_on_ssh_and_our_ports_and_one_peer() {
        let t = targets(host(), &[7443, 22, 0, 9464], peer());
        let shown: Vec<String> = t.iter().map(Target::to_string).collect();
        assert_eq!(
            shown,
            [
                "the host at 10.1.2.1:22",
                "the host at 10.1.2.1:7443",
                "the host at 10.1.2.1:9464",
                "VM mpool-ci-b at 10.1.2.7:22"
            ]
        );
        assert!(targets(None, &[7443], None).is_empty());
    }

    #[test]
    fn the_script_tries_every_target_in_parallel() {
        let s = script(&targets(host(), &[7443], peer()));
        assert!(s.contains("probe 10.1.2.1 22 &\nprobe 10.1.2.1 7443 &\nprobe 10.1.2.7 22 &\nwait\n"), "{s}");
        assert!(s.contains(&format!("timeout {CONNECT_TIMEOUT_SECS} bash")), "{s}");
    }

    #[test]
    fn everything_blocked_is_isolated() {
        let t = targets(host(), &[7443], peer());
        let out = "blocked 10.1.2.7 22\nblocked 10.1.2.1 7443\nblocked 10.1.2.1 22\n";
        let (v, why) = verdict(&t, out);
        assert_eq!(v, Verdict::Isolated, "{why}");
        assert!(why.contains("VM mpool-ci-b"), "{why}");
        let (v, why) = verdict(&targets(host(), &[], None), "blocked 10.1.2.1 22\n");
        assert_eq!(v, Verdict::Isolated);
        assert!(why.contains("VM-to-VM was not tried"), "{why}");
    }

    #[test]
    fn an_open_or_refused_target_is_not_isolated_and_named() {
        let t = targets(host(), &[7443], peer());
        let out = "blocked 10.1.2.1 7443\nrefused 10.1.2.1 22\nopen 10.1.2.7 22\n";
        let (v, why) = verdict(&t, out);
        assert_eq!(v, Verdict::NotIsolated);
        assert!(why.contains("the host at 10.1.2.1:22 answered (connection refused)"), "{why}");
        assert!(why.contains("VM mpool-ci-b at 10.1.2.7:22 connected"), "{why}");
        assert!(!why.contains("7443"), "{why}");
    }

    #[test]
    fn a_missing_line_or_no_host_is_unknown_never_isolated() {
        let t = targets(host(), &[7443], None);
        let (v, why) = verdict(&t, "blocked 10.1.2.1 22\nbash: timeout: command not found\n");
        assert_eq!(v, Verdict::Unknown);
        assert!(why.contains("did not report on the host at 10.1.2.1:7443"), "{why}");
        assert_eq!(verdict(&t, "").0, Verdict::Unknown);
        let (v, why) = verdict(&targets(None, &[], peer()), "blocked 10.1.2.7 22\n");
        assert_eq!(v, Verdict::Unknown);
        assert!(why.contains("[isolation] bridge"), "{why}");
    }

    #[test]
    fn a_line_for_another_address_does_not_count() {
        let t = targets(host(), &[], None);
        assert_eq!(verdict(&t, "blocked 10.1.2.2 22\n").0, Verdict::Unknown);
        assert_eq!(verdict(&t, "blocked 10.1.2.1 2222\n").0, Verdict::Unknown);
    }
}
