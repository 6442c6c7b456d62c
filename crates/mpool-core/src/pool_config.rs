//! A pool's settings as the engine uses them: the data of one `[[pools]]` table (parsed and
//! validated by `mpool-config`), its defaults, and the fingerprint of what shapes its VMs.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sizes::parse_size;

/// How a VM is made clean again after a lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetStrategy {
    /// Stop and restore the VM's clean snapshot (the default).
    #[default]
    Snapshot,
    /// Delete the VM and clone a fresh one from the pool's stopped template.
    Clone,
    /// Delete the VM and launch (and set up) a new one.
    Recreate,
}

impl fmt::Display for ResetStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResetStrategy::Snapshot => "snapshot",
            ResetStrategy::Clone => "clone",
            ResetStrategy::Recreate => "recreate",
        })
    }
}

/// How a pool sizes its ready VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autoscale {
    /// Keep `min_ready` ready (the default).
    #[default]
    Off,
    /// Keep what the measured demand needs, between `min_ready` and `max_size`
    /// (`pool::demand`).
    Demand,
}

impl fmt::Display for Autoscale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Autoscale::Off => "off",
            Autoscale::Demand => "demand",
        })
    }
}

/// `[[pools]]`: one pool of identical VMs.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// `name` (required): `[a-z][a-z0-9-]*`, at most 20 characters, unique.
    pub name: String,
    /// `image` (default `24.04`): the Multipass image to launch, as multipass takes it:
    /// `[remote:]image` (`daily:noble`, an alias, a blueprint), `file:///path` or an
    /// `http(s)://` URL.
    pub image: String,
    /// `cpus` (default 1, at least 1).
    pub cpus: u32,
    /// `memory` (default `1G`, at least 128M): a multipass size.
    pub memory: String,
    /// `disk` (default `5G`, at least 512M): a multipass size.
    pub disk: String,
    /// cloud-init user data: `cloud_init` (inline YAML) or the contents of `cloud_init_file`.
    pub cloud_init: Option<String>,
    /// `setup`: shell commands run once, as one script, after launch and before the clean snapshot.
    pub setup: Vec<String>,
    /// `min_ready` (default 1): idle VMs kept ready (hot + warm).
    pub min_ready: u32,
    /// `hot` (default 0): of the ready VMs, how many are kept running (acquire costs no daemon
    /// call); at most `min_ready`.
    pub hot: u32,
    /// `max_size` (default `max(min_ready, 1)`): most VMs in the pool, counting those being
    /// provisioned or reset; at least 1 and at least `min_ready`.
    pub max_size: u32,
    /// `reset` (default `snapshot`): how a VM is cleaned after a lease.
    pub reset: ResetStrategy,
    /// `max_uses` (default 0 = unlimited): after this many leases the VM is recycled.
    pub max_uses: u32,
    /// `max_disk_usage` (default off): a VM whose root filesystem uses more (bytes, `df` in the
    /// guest at release) is rebuilt instead of reset.
    pub max_disk_usage: Option<u64>,
    /// `default_ttl` (default 30m): lease TTL when the client asks for none.
    pub default_ttl: Duration,
    /// `max_ttl` (default 4h): longest lease TTL a client may ask for; at least `default_ttl`.
    pub max_ttl: Duration,
    /// `max_wait` (default 5m): longest an Acquire may wait for a VM (0 = fail at once).
    pub max_wait: Duration,
    /// `readiness_timeout` (default 300s): how long launch/start may take before the VM is broken.
    pub readiness_timeout: Duration,
    /// `idle_timeout` (default 15m): idle VMs above `min_ready` are scaled down after this.
    pub idle_timeout: Duration,
    /// `rebuild_every` (default off): the pool's generation is bumped this long after the last
    /// bump, so its VMs (and golden VM) are rebuilt from the image, picking up its updates; idle
    /// VMs rotate as on a config change. Not part of the generation key.
    pub rebuild_every: Option<Duration>,
    /// `max_leases_per_owner` (default 0 = unlimited): most leases one owner (token identity;
    /// with auth off every caller is the same owner) holds in this pool at once; an acquire
    /// beyond it waits like one in a full pool.
    pub max_leases_per_owner: u32,
    /// `autoscale` (default `off`): `demand` keeps as many ready VMs as the acquires seen within
    /// one refill time need (plus 25%), between `min_ready` and `max_size`; once bursts recur it
    /// holds that between them (see `pool::demand`).
    pub autoscale: Autoscale,
    /// `autoscale_decay` (default 10m, above zero): the time constant with which a demand
    /// target falls back after a single burst, or once recurring bursts stop (the next one is two
    /// periods overdue); bursts recur when the next starts within it.
    pub autoscale_decay: Duration,
    /// `require_isolation` (default false): refuse leases (FAILED_PRECONDITION naming the fix)
    /// unless the isolation probe measured the VMs cut off from each other and the host.
    pub require_isolation: bool,
    /// `[[pools.schedule]]` (default none): recurring periods during which the pool keeps a
    /// higher `min_ready` (`pool::schedule`).
    pub schedules: Vec<crate::pool::schedule::Schedule>,
}

impl PoolConfig {
    /// A pool with this name and every other key at its default (not validated).
    pub fn with_defaults(name: &str) -> PoolConfig {
        PoolConfig {
            name: name.to_string(),
            image: "24.04".to_string(),
            cpus: 1,
            memory: "1G".to_string(),
            disk: "5G".to_string(),
            cloud_init: None,
            setup: Vec::new(),
            min_ready: 1,
            hot: 0,
            max_size: 1,
            reset: ResetStrategy::Snapshot,
            max_uses: 0,
            max_disk_usage: None,
            default_ttl: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(4 * 3600),
            max_wait: Duration::from_secs(5 * 60),
            readiness_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(15 * 60),
            rebuild_every: None,
            max_leases_per_owner: 0,
            autoscale: Autoscale::Off,
            autoscale_decay: Duration::from_secs(10 * 60),
            require_isolation: false,
            schedules: Vec::new(),
        }
    }

    /// A stable fingerprint (16 hex digits, FNV-1a 64) of what shapes a VM: image, cpus,
    /// memory and disk (as bytes, so `1G` and `1024M` agree), cloud-init, setup commands and
    /// reset strategy. VMs whose key differs from their pool's are out of date; changing
    /// sizing or TTL keys (min_ready, hot, max_size, max_uses, timeouts) keeps the key.
    pub fn generation_key(&self) -> String {
        let mut text = String::from("mpool-pool-generation/v1\n");
        let mut field = |name: &str, value: &str| {
            text.push_str(&format!("{name}={}:{value}\n", value.len()));
        };
        let size = |s: &str| parse_size(s).map(|b| b.to_string()).unwrap_or_else(|| s.trim().to_string());
        field("image", self.image.trim());
        field("cpus", &self.cpus.to_string());
        field("memory", &size(&self.memory));
        field("disk", &size(&self.disk));
        match &self.cloud_init {
            None => field("cloud_init", "-"),
            Some(c) => field("cloud_init", &format!("+{c}")),
        }
        field("setup", &self.setup.len().to_string());
        for cmd in &self.setup {
            field("cmd", cmd);
        }
        field("reset", &self.reset.to_string());
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn Fn(&mut PoolConfig)>;

    #[test]
    fn generation_key_is_stable_and_sensitive_to_vm_shape_only() {
        let base = PoolConfig::with_defaults("ci");
        let key = base.generation_key();
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, PoolConfig::with_defaults("ci").generation_key());
        // A fixed value: the key must not change between builds or releases.
        assert_eq!(key, fnv_hex_of_defaults());

        let shaping: Vec<Change> = vec![
            Box::new(|p| p.image = "22.04".into()),
            Box::new(|p| p.cpus = 2),
            Box::new(|p| p.memory = "2G".into()),
            Box::new(|p| p.disk = "10G".into()),
            Box::new(|p| p.cloud_init = Some("#cloud-config\n".into())),
            Box::new(|p| p.cloud_init = Some(String::new())),
            Box::new(|p| p.setup = vec!["true".into()]),
            Box::new(|p| p.setup = vec![String::new()]),
            Box::new(|p| p.reset = ResetStrategy::Clone),
            Box::new(|p| p.reset = ResetStrategy::Recreate),
        ];
        let mut seen = std::collections::HashSet::from([key.clone()]);
        for change in &shaping {
            let mut p = base.clone();
            change(&mut p);
            assert!(seen.insert(p.generation_key()), "{p:?} should have its own key");
        }
        // Setup commands are not concatenated ambiguously.
        let mut a = base.clone();
        a.setup = vec!["ab".into(), "c".into()];
        let mut b = base.clone();
        b.setup = vec!["a".into(), "bc".into()];
        assert_ne!(a.generation_key(), b.generation_key());

        let neutral: Vec<Change> = vec![
            Box::new(|p| p.name = "other".into()),
            Box::new(|p| p.min_ready = 5),
            Box::new(|p| p.hot = 1),
            Box::new(|p| p.max_size = 9),
            Box::new(|p| p.max_uses = 3),
            Box::new(|p| p.default_ttl = Duration::from_secs(1)),
            Box::new(|p| p.max_ttl = Duration::from_secs(1)),
            Box::new(|p| p.max_wait = Duration::from_secs(1)),
            Box::new(|p| p.readiness_timeout = Duration::from_secs(1)),
            Box::new(|p| p.idle_timeout = Duration::from_secs(1)),
            Box::new(|p| p.max_leases_per_owner = 2),
            Box::new(|p| p.autoscale = Autoscale::Demand),
            Box::new(|p| p.autoscale_decay = Duration::from_secs(1)),
            Box::new(|p| p.require_isolation = true),
            Box::new(|p| p.memory = "1024M".into()),
            Box::new(|p| p.disk = "5GiB".into()),
        ];
        for change in &neutral {
            let mut p = base.clone();
            change(&mut p);
            assert_eq!(p.generation_key(), key, "{p:?} should keep the key");
        }
    }

    fn fnv_hex_of_defaults() -> String {
        let text = "mpool-pool-generation/v1\nimage=5:24.04\ncpus=1:1\nmemory=10:1073741824\ndisk=10:5368709120\n\
                    cloud_init=1:-\nsetup=1:0\nreset=8:snapshot\n";
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }

    #[test]
    fn fnv1a64_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
