//! The Multipass bridge the rules protect: its name (checked, so it is safe inside an nftables
//! string), its IPv4 address and prefix, and their detection from the host's interfaces
//! (`getifaddrs(3)` through `nix`, no `ip` output parsed).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The bridge Multipass's qemu driver creates on Linux.
pub const DEFAULT_BRIDGE: &str = "mpqemubr0";

/// The longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

/// The bridge's IPv4 address on the host with the subnet's prefix length, e.g. `10.1.2.1/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// The host's address on the bridge (where Multipass's dnsmasq answers DHCP and DNS).
    pub address: Ipv4Addr,
    /// The prefix length, 1 to 30.
    pub prefix: u8,
}

impl Subnet {
    /// The network address (host bits cleared), e.g. `10.1.2.0` for `10.1.2.1/24`.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & mask(self.prefix))
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network())
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "give the bridge's address with its prefix length, e.g. 10.1.2.1/24";
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(|| format!("{s:?} has no /PREFIX; {hint}"))?;
        let address: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address; {hint}"))?;
        let prefix: u8 = match prefix.parse() {
            Ok(p) if (1..=30).contains(&p) => p,
            _ => return Err(format!("prefix {prefix:?} is not a number from 1 to 30; {hint}")),
        };
        let subnet = Subnet { address, prefix };
        if subnet.address == subnet.network() {
            return Err(format!("{s} is the network address, not the host's address on the bridge; {hint}"));
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// A checked bridge: a valid interface name and its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    name: String,
    /// The host's address on the bridge and the prefix.
    pub subnet: Subnet,
}

impl Bridge {
    /// A bridge named `name` (see [`check_name`]) on `subnet`.
    pub fn new(name: &str, subnet: Subnet) -> Result<Bridge, BridgeError> {
        check_name(name)?;
        Ok(Bridge { name: name.to_string(), subnet })
    }

    /// Detects the bridge's subnet from the host's interfaces.
    pub fn detect(name: &str) -> Result<Bridge, BridgeError> {
        check_name(name)?;
        let subnet = detect_subnet(name)?;
        Ok(Bridge { name: name.to_string(), subnet })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Why the bridge cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The name is not a Linux interface name the rules can quote.
    #[error("bridge name {name:?} {reason}; pass --bridge NAME with the Multipass bridge's interface name")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No interface of that name exists on this host.
    #[error(
        "no network interface named {name:?} on this host; is multipassd running with its qemu driver (it creates {DEFAULT_BRIDGE})? For another bridge pass --bridge NAME (see `ip -br link`), or --subnet ADDRESS/PREFIX to generate the rules without detection"
    )]
    Missing {
        /// The name looked for.
        name: String,
    },
    /// The interface exists but has no IPv4 address.
    #[error(
        "network interface {name:?} has no IPv4 address; pass --subnet ADDRESS/PREFIX (the host's address on the bridge, e.g. 10.1.2.1/24)"
    )]
    NoIpv4 {
        /// The interface.
        name: String,
    },
    /// The host's interfaces could not be listed.
    #[error("cannot list the host's network interfaces ({0}); pass --subnet ADDRESS/PREFIX")]
    Interfaces(nix::Error),
}

/// Checks an interface name: 1 to 15 characters of `[A-Za-z0-9_.-]` (so it needs no escaping
/// in an nftables string and matches exactly, with no wildcard).
pub fn check_name(name: &str) -> Result<(), BridgeError> {
    let reason = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("is longer than 15 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        Some("may only hold letters, digits, '_', '.' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BridgeError::InvalidName { name: name.to_string(), reason }),
        None => Ok(()),
    }
}

/// The first IPv4 address (and prefix) of interface `name`.
fn detect_subnet(name: &str) -> Result<Subnet, BridgeError> {
    let mut found = false;
    for ifa in nix::ifaddrs::getifaddrs().map_err(BridgeError::Interfaces)? {
        if ifa.interface_name != name {
            continue;
        }
        found = true;
        let address = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip());
        let netmask = ifa.netmask.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip());
        if let (Some(address), Some(netmask)) = (address, netmask) {
            let prefix = u32::from(netmask).leading_ones() as u8;
            if (1..=30).contains(&prefix) {
                return Ok(Subnet { address, prefix });
            }
        }
    }
    if found {
        Err(BridgeError::NoIpv4 { name: name.to_string() })
    } else {
        Err(BridgeError::Missing { name: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parses_the_hosts_address_and_prefix() {
        let s: Subnet = "10.103.7.1/24".parse().unwrap();
        assert_eq!(s.address, Ipv4Addr::new(10, 103, 7, 1));
        assert_eq!(s.prefix, 24);
        assert_eq!(s.network(), Ipv4Addr::new(10, 103, 7, 0));
        assert_eq!(s.to_string(), "10.103.7.1/24");
    }

    #[test]
    fn subnet_refuses_what_is_not_a_host_address_with_prefix() {
        for bad in ["10.1.2.1", "10.1.2.1/", "10.1.2.1/0", "10.1.2.1/31", "10.1.2.1/x", "fd00::1/64", "10.1.2.0/24"] {
            let e = bad.parse::<Subnet>().unwrap_err();
            assert!(e.contains("e.g. 10.1.2.1/24"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_that_are_not_plain_interface_names_are_refused() {
        check_name("mpqemubr0").unwrap();
        check_name("br-lan.1_x").unwrap();
        for bad in ["", "a-name-longer-than-15", "tap-*", "br\"0", "br 0", "br;0"] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("--bridge NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_loopback_interface_is_detected_with_its_prefix() {
        let lo = Bridge::detect("lo").unwrap();
        assert_eq!(lo.subnet.to_string(), "127.0.0.1/8");
    }

    #[test]
    fn a_missing_interface_names_the_flags_to_pass() {
        let e = Bridge::detect("mpnosuchbr0").unwrap_err();
        assert!(matches!(e, BridgeError::Missing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("\"mpnosuchbr0\"") && msg.contains("--bridge NAME") && msg.contains("--subnet"), "{msg}");
    }
}
