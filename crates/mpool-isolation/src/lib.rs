//! Tenant isolation enforced on the Multipass host: the bridge's name and subnet
//! ([`bridge`]: checked values and their detection from the host's interfaces) and the
//! nftables ruleset that stops instances from reaching each other and the host
//! ([`ruleset`]: pure text generation), and which of mpool's listeners the instances could
//! reach ([`exposure`]), and the probe that measures from a VM whether the rules hold
//! ([`probe`]: the script and its verdict).

pub mod bridge;
pub mod exposure;
pub mod probe;
pub mod ruleset;

pub use bridge::{Bridge, BridgeError, DEFAULT_BRIDGE, Subnet};
pub use ruleset::{TABLE, rules, undo};
