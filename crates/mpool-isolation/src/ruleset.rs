//! The nftables ruleset that isolates the instances on a Multipass bridge, as text for
//! `nft -f -`. Pure: a function of the bridge and the allowed host ports.
//!
//! Two tables of mpool's own ([`TABLE`] in the `bridge` and `inet` families), so they never
//! touch Multipass's rules; nftables evaluates every base chain at a hook, so a drop here holds
//! whatever Multipass accepts. Each table is declared, deleted and defined again in the same
//! transaction: applying the text twice leaves the same state as applying it once.
//!
//! - `bridge` forward: frames from one tap (`tap-*`, Multipass's instance ports) to another are
//!   dropped: instances cannot reach each other on the bridge.
//! - `inet` input, for what arrives on the bridge interface: replies to connections the host
//!   opened (mpool's and multipassd's SSH to the instances), DHCP (udp 67), DNS (udp and tcp 53
//!   to the bridge address) and the allowed TCP ports pass; everything else is dropped.
//! - `inet` forward: packets routed from the bridge back onto the bridge (an instance sending
//!   another's traffic through the host) are dropped. Forwarding to other interfaces (the
//!   instances' way out, NATed by Multipass) is not touched.

use std::fmt::Write as _;

use crate::bridge::Bridge;

/// The name of mpool's tables (`table bridge mpool_isolation`, `table inet mpool_isolation`).
pub const TABLE: &str = "mpool_isolation";

/// The interface-name pattern of Multipass's instance ports on the bridge.
pub const TAP_PATTERN: &str = "tap-*";

/// The ruleset isolating the instances on `bridge`, allowing them TCP `allowed_ports` on the
/// host besides DHCP and DNS. Ports are listed sorted, without duplicates; port 0 is ignored.
pub fn rules(bridge: &Bridge, allowed_ports: &[u16]) -> String {
    let name = bridge.name();
    let address = bridge.subnet.address;
    let mut ports: Vec<u16> = allowed_ports.iter().copied().filter(|p| *p != 0).collect();
    ports.sort_unstable();
    ports.dedup();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# mpool tenant isolation for the Multipass bridge {name} ({subnet}), from `mpool isolation rules`.\n\
         # Apply: mpool isolation rules | nft -f -    Check: nft list table inet {TABLE}\n\
         # Undo:  mpool isolation rules --undo | nft -f -\n",
        subnet = bridge.subnet,
    );
    let _ = writeln!(out, "add table bridge {TABLE}\ndelete table bridge {TABLE}");
    let _ = writeln!(
        out,
        "table bridge {TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{TAP_PATTERN}\" oifname \"{TAP_PATTERN}\" drop comment \"no traffic between instances\"\n\
         \t}}\n\
         }}\n"
    );
    let _ = writeln!(out, "add table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(
        out,
        "\tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname != \"{name}\" accept\n\
         \t\tct state established,related accept comment \"replies to connections the host opened\"\n\
         \t\tudp dport 67 accept comment \"DHCP\"\n\
         \t\tip daddr {address} meta l4proto {{ tcp, udp }} th dport 53 accept comment \"DNS\""
    );
    if !ports.is_empty() {
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let _ = writeln!(out, "\t\ttcp dport {{ {list} }} accept comment \"allowed host ports\"");
    }
    let _ = writeln!(
        out,
        "\t\tdrop comment \"nothing else from the instances to the host\"\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{name}\" oifname \"{name}\" drop comment \"no traffic between instances routed through the host\"\n\
         \t}}\n\
         }}"
    );
    out
}

/// The commands removing mpool's tables (and nothing else); harmless when they are absent.
pub fn undo() -> String {
    format!(
        "# Remove mpool's tenant isolation (its own tables only).\n\
         add table bridge {TABLE}\ndelete table bridge {TABLE}\n\
         add table inet {TABLE}\ndelete table inet {TABLE}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Subnet;

    fn bridge() -> Bridge {
        Bridge::new("mpqemubr0", "10.103.7.1/24".parse::<Subnet>().unwrap()).unwrap()
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
    }

    #[test]
    fn tables_are_reset_before_they_are_defined() {
        let text = rules(&bridge(), &[]);
        let l = lines(&text);
        for family in ["bridge", "inet"] {
            let add = l.iter().position(|x| *x == format!("add table {family} mpool_isolation")).unwrap();
            assert_eq!(l[add + 1], format!("delete table {family} mpool_isolation"), "{text}");
            assert_eq!(l[add + 2], format!("table {family} mpool_isolation {{"), "{text}");
        }
        assert!(!text.contains("flush ruleset"), "must never touch other tables: {text}");
        assert_eq!(l.iter().filter(|x| x.contains("table ")).count(), 6, "only mpool's two tables: {text}");
    }

    #[test]
    fn instances_cannot_reach_each_other_on_the_bridge() {
        let text = rules(&bridge(), &[]);
        let bridge_table = text.split("add table inet").next().unwrap();
        assert!(bridge_table.contains("type filter hook forward priority filter; policy accept;"), "{text}");
        assert!(
            bridge_table.contains(r#"iifname "tap-*" oifname "tap-*" drop"#),
            "tap-to-tap drop in the bridge table: {text}"
        );
    }

    #[test]
    fn the_host_accepts_only_replies_dhcp_and_dns_from_the_bridge_then_drops() {
        let text = rules(&bridge(), &[]);
        let l = lines(&text);
        let start = l.iter().position(|x| *x == "chain input {").unwrap();
        let input: Vec<&str> = l[start + 1..].iter().take_while(|x| **x != "}").copied().collect();
        assert_eq!(
            input,
            [
                "type filter hook input priority filter; policy accept;",
                r#"iifname != "mpqemubr0" accept"#,
                r#"ct state established,related accept comment "replies to connections the host opened""#,
                r#"udp dport 67 accept comment "DHCP""#,
                r#"ip daddr 10.103.7.1 meta l4proto { tcp, udp } th dport 53 accept comment "DNS""#,
                r#"drop comment "nothing else from the instances to the host""#,
            ]
        );
    }

    #[test]
    fn allowed_ports_are_accepted_sorted_once_before_the_drop() {
        let text = rules(&bridge(), &[8080, 3142, 8080, 0]);
        let allow = text.find(r#"tcp dport { 3142, 8080 } accept comment "allowed host ports""#).expect(&text);
        let drop = text.find("drop comment \"nothing else").unwrap();
        assert!(allow < drop, "{text}");
    }

    #[test]
    fn routing_between_instances_is_dropped_and_other_forwarding_left_alone() {
        let text = rules(&bridge(), &[]);
        let inet = text.split("table inet mpool_isolation {").nth(1).unwrap();
        let forward = inet.split("chain forward {").nth(1).unwrap();
        assert!(forward.contains(r#"iifname "mpqemubr0" oifname "mpqemubr0" drop"#), "{text}");
        let rules_in_forward =
            lines(forward).into_iter().filter(|l| l.contains(" drop") || l.contains(" accept")).count();
        assert_eq!(rules_in_forward, 2, "policy plus the one bridge-to-bridge drop only: {text}");
    }

    #[test]
    fn a_different_bridge_is_named_everywhere() {
        let b = Bridge::new("mpt1234", "192.168.77.1/26".parse::<Subnet>().unwrap()).unwrap();
        let text = rules(&b, &[]);
        assert!(text.contains(r#"iifname != "mpt1234" accept"#), "{text}");
        assert!(text.contains("ip daddr 192.168.77.1 "), "{text}");
        assert!(text.contains("(192.168.77.1/26)"), "{text}");
        assert!(!text.contains("mpqemubr0"), "{text}");
    }

    #[test]
    fn undo_removes_exactly_mpools_tables() {
        assert_eq!(
            lines(&undo()),
            [
                "add table bridge mpool_isolation",
                "delete table bridge mpool_isolation",
                "add table inet mpool_isolation",
                "delete table inet mpool_isolation",
            ]
        );
    }
}
