//! Right-sizing in place: when a reload changes only a pool's cpus, memory or disk (the disk not
//! shrinking), its VMs keep their instances and are resized on a stopped VM with
//! `set local.<vm>.cpus|memory|disk` (about 40 ms, no daemon restart), then their clean
//! snapshot is retaken, because a restore brings back the snapshot's size (reference §0.4).
//! Anything else that shapes a VM (image, cloud-init, setup, reset strategy), a disk shrink,
//! or a clone pool (whose golden VM is rebuilt anyway) still rotates by generation. Pure.

use crate::pool_config::{PoolConfig, ResetStrategy};
use crate::sizes::parse_size;

/// A pool's VM sizes, comparable (memory and disk in bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// CPUs.
    pub cpus: u32,
    /// Memory, bytes.
    pub memory: u64,
    /// Disk, bytes.
    pub disk: u64,
}

impl Sizes {
    /// The sizes a pool's config gives its VMs (`None` when a size does not parse, which a
    /// validated config never has).
    pub fn of(cfg: &PoolConfig) -> Option<Sizes> {
        Some(Sizes { cpus: cfg.cpus, memory: parse_size(&cfg.memory)?, disk: parse_size(&cfg.disk)? })
    }
}

/// What a reload's change of a pool means for its VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing that shapes a VM changed.
    Same,
    /// Only sizes changed, and they can be applied in place (from these sizes).
    InPlace(Sizes),
    /// A new generation: VMs are rebuilt.
    Rotate,
}

/// How the VMs of a pool configured as `old` meet its new config `new`.
pub fn change(old: &PoolConfig, new: &PoolConfig) -> Change {
    if old.generation_key() == new.generation_key() {
        return Change::Same;
    }
    // Everything but the sizes must be the same.
    let mut resized = old.clone();
    resized.cpus = new.cpus;
    resized.memory.clone_from(&new.memory);
    resized.disk.clone_from(&new.disk);
    if resized.generation_key() != new.generation_key() || new.reset == ResetStrategy::Clone {
        return Change::Rotate;
    }
    match (Sizes::of(old), Sizes::of(new)) {
        (Some(from), Some(to)) if to.disk >= from.disk => Change::InPlace(from),
        _ => Change::Rotate,
    }
}

/// The settings to write on `vm`, stopped, to take it from `from` to the pool's sizes `cfg`:
/// only the keys whose value changes, as `(key, value)`.
pub fn settings(vm: &str, from: Sizes, cfg: &PoolConfig) -> Vec<(String, String)> {
    let Some(to) = Sizes::of(cfg) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if to.cpus != from.cpus {
        out.push((format!("local.{vm}.cpus"), to.cpus.to_string()));
    }
    if to.memory != from.memory {
        out.push((format!("local.{vm}.memory"), cfg.memory.trim().to_string()));
    }
    if to.disk != from.disk {
        out.push((format!("local.{vm}.disk"), cfg.disk.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PoolConfig {
        PoolConfig::with_defaults("ci")
    }

    const G: u64 = 1 << 30;

    #[test]
    fn only_sizes_changed_and_the_disk_not_shrinking_resizes_in_place() {
        let old = base();
        let from = Sizes { cpus: 1, memory: G, disk: 5 * G };
        let mut new = base();
        new.cpus = 2;
        new.memory = "2G".into();
        assert_eq!(change(&old, &new), Change::InPlace(from));
        new.disk = "10G".into();
        assert_eq!(change(&old, &new), Change::InPlace(from), "a growing disk");
        new.min_ready = 4;
        assert_eq!(change(&old, &new), Change::InPlace(from), "with a change that shapes no VM");
    }

    #[test]
    fn a_shrinking_disk_or_any_other_shape_change_rotates() {
        let old = base();
        let mut shrink = base();
        shrink.disk = "4G".into();
        assert_eq!(change(&old, &shrink), Change::Rotate);
        let mut image = base();
        (image.cpus, image.image) = (2, "22.04".into());
        assert_eq!(change(&old, &image), Change::Rotate, "a size and the image");
        let mut setup = base();
        setup.setup = vec!["true".into()];
        assert_eq!(change(&old, &setup), Change::Rotate);
        let mut clone = base();
        clone.reset = ResetStrategy::Clone;
        let mut bigger = clone.clone();
        bigger.cpus = 2;
        assert_eq!(change(&clone, &bigger), Change::Rotate, "a clone pool's golden VM is rebuilt");
    }

    #[test]
    fn nothing_that_shapes_a_vm_is_the_same() {
        let mut new = base();
        (new.memory, new.max_size) = ("1024M".into(), 3);
        assert_eq!(change(&base(), &new), Change::Same);
    }

    #[test]
    fn only_changed_keys_are_set() {
        let from = Sizes { cpus: 1, memory: G, disk: 5 * G };
        let mut cfg = base();
        (cfg.cpus, cfg.disk) = (2, "8G".into());
        assert_eq!(
            settings("vm", from, &cfg),
            vec![("local.vm.cpus".to_string(), "2".to_string()), ("local.vm.disk".to_string(), "8G".to_string())]
        );
        assert!(settings("vm", from, &base()).is_empty());
    }
}
