//! Whether a TCP listener of mpool's is one the instances on the bridge can reach: bound to
//! every address (`0.0.0.0`, `::`), or to an address inside the bridge's subnet. Without host
//! rules (`mpool isolation rules`) a task in a VM could then call mpool's API or scrape its
//! metrics. Pure: the bridge's subnet (when known) is given.

use std::net::{IpAddr, SocketAddr};

use crate::bridge::Subnet;

/// Why instances on the bridge could reach `addr`, or `None` when they cannot (loopback, or
/// another interface's address outside the bridge's subnet).
pub fn reachable_from_bridge(addr: &SocketAddr, bridge: Option<&Subnet>) -> Option<String> {
    let ip = addr.ip();
    if ip.is_unspecified() {
        return Some(format!("{addr} listens on every address, the bridge's included"));
    }
    match (ip, bridge) {
        (IpAddr::V4(v4), Some(subnet)) if subnet.contains(v4) => {
            Some(format!("{addr} is inside the VMs' bridge subnet {subnet}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        "10.1.2.1/24".parse().unwrap()
    }

    #[test]
    fn every_address_and_the_bridge_subnet_are_reachable() {
        for a in ["0.0.0.0:7443", "[::]:7443"] {
            let why = reachable_from_bridge(&a.parse().unwrap(), None).expect(a);
            assert!(why.contains("every address"), "{why}");
        }
        let why = reachable_from_bridge(&"10.1.2.1:9464".parse().unwrap(), Some(&subnet())).expect("bridge address");
        assert!(why.contains("10.1.2.1/24"), "{why}");
    }

    #[test]
    fn loopback_and_other_interfaces_are_not() {
        for a in ["127.0.0.1:7443", "[::1]:7443", "192.168.5.10:7443", "10.1.3.1:7443"] {
            assert_eq!(reachable_from_bridge(&a.parse().unwrap(), Some(&subnet())), None, "{a}");
        }
        assert_eq!(reachable_from_bridge(&"10.1.2.1:9464".parse().unwrap(), None), None, "bridge unknown");
    }
}
