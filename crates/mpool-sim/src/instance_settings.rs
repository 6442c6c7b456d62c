//! multipassd's per-instance settings, `local.<instance>.cpus|memory|disk`, as plain functions:
//! which keys name them, what a value must be, and the exact refusal when it is not (reference
//! §0.4, §2.8). A change needs a stopped instance ("Instance must be stopped for
//! modification", FAILED_PRECONDITION), the disk only grows, and setting the current value
//! changes nothing. These keys do not restart the daemon. No I/O: the daemon core asks these.

use tonic::Code;

use crate::rules::{MIN_MEMORY, Refusal, VmState, parse_size};

/// The size settings of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    /// `cpus`: a whole number of at least 1.
    Cpus,
    /// `memory`: a size of at least 128M.
    Memory,
    /// `disk`: a size no smaller than the current one.
    Disk,
}

/// A per-instance key split into its instance and property; `None` when the key is not one
/// (`local.<instance>.cpus|memory|disk`, the instance name being anything non-empty).
pub fn parse_key(key: &str) -> Option<(&str, Property)> {
    let rest = key.strip_prefix("local.")?;
    let (instance, property) = rest.rsplit_once('.')?;
    let property = match property {
        "cpus" => Property::Cpus,
        "memory" => Property::Memory,
        "disk" => Property::Disk,
        _ => return None,
    };
    (!instance.is_empty()).then_some((instance, property))
}

/// An instance's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// CPUs.
    pub cpus: i32,
    /// Memory, bytes.
    pub memory: u64,
    /// Disk, bytes.
    pub disk: u64,
}

/// Where an instance stands for a change of its settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Operative, in this state.
    Operative(VmState),
    /// Deleted, not purged.
    Deleted,
    /// No such instance.
    Missing,
}

/// `Cannot update instance settings; instance: NAME; reason: WHY`.
fn cannot_update(code: Code, instance: &str, why: &str) -> Refusal {
    Refusal { code, message: format!("Cannot update instance settings; instance: {instance}; reason: {why}") }
}

/// `Invalid setting 'KEY=VALUE': WHY` (INVALID_ARGUMENT).
fn invalid(key: &str, value: &str, why: &str) -> Refusal {
    Refusal { code: Code::InvalidArgument, message: format!("Invalid setting '{key}={value}': {why}") }
}

/// The refusal of a `get` of a missing instance's setting.
pub fn cannot_obtain(instance: &str) -> Refusal {
    Refusal {
        code: Code::InvalidArgument,
        message: format!("Cannot obtain instance settings; instance: {instance}; reason: No such instance"),
    }
}

/// The sizes once `key=value` is applied to an instance standing as `standing` with `current`
/// sizes, or multipassd's refusal, checked in its order: the instance exists and is not
/// deleted, it is stopped, then the value.
pub fn update(key: &str, value: &str, standing: Standing, current: Sizes) -> Result<Sizes, Refusal> {
    let Some((instance, property)) = parse_key(key) else {
        return Err(Refusal { code: Code::InvalidArgument, message: format!("Unrecognized settings key: '{key}'") });
    };
    match standing {
        Standing::Missing => return Err(cannot_update(Code::InvalidArgument, instance, "No such instance")),
        Standing::Deleted => return Err(cannot_update(Code::InvalidArgument, instance, "Instance is deleted")),
        Standing::Operative(VmState::Stopped) => {}
        Standing::Operative(_) => {
            return Err(cannot_update(Code::FailedPrecondition, instance, "Instance must be stopped for modification"));
        }
    }
    let mut next = current;
    match property {
        Property::Cpus => {
            // Decimal digits only, as Qt's toInt (a sign is allowed, so "-1" is a number below 1).
            match value.trim().parse::<i32>() {
                Ok(n) if n >= 1 => next.cpus = n,
                _ => return Err(invalid(key, value, "Need a positive integer (in decimal format) of minimum 1")),
            }
        }
        Property::Memory | Property::Disk => {
            let Some(bytes) = parse_size(value) else {
                return Err(invalid(key, value, &format!("{value} is not a valid memory size")));
            };
            if bytes == 0 {
                return Err(invalid(key, value, "Need a positive size."));
            }
            if property == Property::Memory {
                if bytes < MIN_MEMORY {
                    return Err(invalid(key, value, "Memory less than 128M minimum not allowed"));
                }
                next.memory = bytes;
            } else {
                if bytes < current.disk {
                    return Err(invalid(key, value, "Disk can only be expanded"));
                }
                next.disk = bytes;
            }
        }
    }
    Ok(next)
}

/// The value `get` answers: CPUs as a number, sizes as multipassd's human-readable text
/// (`1.00GiB`, `512.00MiB`).
pub fn value(property: Property, sizes: Sizes) -> String {
    match property {
        Property::Cpus => sizes.cpus.to_string(),
        Property::Memory => human_readable(sizes.memory),
        Property::Disk => human_readable(sizes.disk),
    }
}

/// A size as multipassd prints one: two decimals in the largest binary unit it reaches.
pub fn human_readable(bytes: u64) -> String {
    for (unit, suffix) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= unit {
            return format!("{:.2}{suffix}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn sizes() -> Sizes {
        Sizes { cpus: 1, memory: G, disk: 5 * G }
    }

    fn stopped() -> Standing {
        Standing::Operative(VmState::Stopped)
    }

    #[test]
    fn keys_name_an_instance_and_a_size() {
        assert_eq!(parse_key("local.vm1.cpus"), Some(("vm1", Property::Cpus)));
        assert_eq!(parse_key("local.a.b.disk"), Some(("a.b", Property::Disk)), "the instance is what precedes");
        for other in ["local.vm1.bridged", "local..cpus", "local.cpus", "client.vm.cpus", "local.passphrase"] {
            assert_eq!(parse_key(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_stopped_instance_is_modified() {
        for s in [VmState::Running, VmState::Suspended, VmState::Starting, VmState::Suspending] {
            let r = update("local.vm.cpus", "2", Standing::Operative(s), sizes()).unwrap_err();
            assert_eq!(r.code, Code::FailedPrecondition, "{s:?}");
            assert_eq!(
                r.message,
                "Cannot update instance settings; instance: vm; reason: Instance must be stopped for modification"
            );
        }
        assert_eq!(update("local.vm.cpus", "2", stopped(), sizes()).unwrap().cpus, 2);
        let gone = update("local.vm.cpus", "2", Standing::Deleted, sizes()).unwrap_err();
        assert_eq!(gone.message, "Cannot update instance settings; instance: vm; reason: Instance is deleted");
        let missing = update("local.vm.cpus", "2", Standing::Missing, sizes()).unwrap_err();
        assert_eq!((missing.code, missing.message.ends_with("No such instance")), (Code::InvalidArgument, true));
    }

    #[test]
    fn the_disk_only_grows_and_the_same_size_changes_nothing() {
        let r = update("local.vm.disk", "4G", stopped(), sizes()).unwrap_err();
        assert_eq!(r.code, Code::InvalidArgument);
        assert_eq!(r.message, "Invalid setting 'local.vm.disk=4G': Disk can only be expanded");
        assert_eq!(update("local.vm.disk", "5G", stopped(), sizes()), Ok(sizes()));
        assert_eq!(update("local.vm.disk", "10G", stopped(), sizes()).unwrap().disk, 10 * G);
    }

    #[test]
    fn values_are_checked_as_multipassd_checks_them() {
        for (key, value, why) in [
            ("local.vm.cpus", "0", "Need a positive integer (in decimal format) of minimum 1"),
            ("local.vm.cpus", "two", "Need a positive integer (in decimal format) of minimum 1"),
            ("local.vm.cpus", "1.5", "Need a positive integer (in decimal format) of minimum 1"),
            ("local.vm.memory", "64M", "Memory less than 128M minimum not allowed"),
            ("local.vm.memory", "0", "Need a positive size."),
            ("local.vm.memory", "lots", "lots is not a valid memory size"),
            ("local.vm.disk", "1X", "1X is not a valid memory size"),
        ] {
            let r = update(key, value, stopped(), sizes()).unwrap_err();
            assert_eq!((r.code, r.message), (Code::InvalidArgument, format!("Invalid setting '{key}={value}': {why}")));
        }
        assert_eq!(update("local.vm.memory", "2G", stopped(), sizes()).unwrap().memory, 2 * G);
        let r = update("local.vm.bridged", "true", stopped(), sizes()).unwrap_err();
        assert_eq!(r.message, "Unrecognized settings key: 'local.vm.bridged'");
    }

    #[test]
    fn get_answers_in_multipassds_words() {
        let s = Sizes { cpus: 3, memory: 1536 << 20, disk: 10 * G };
        assert_eq!(value(Property::Cpus, s), "3");
        assert_eq!(value(Property::Memory, s), "1.50GiB");
        assert_eq!(value(Property::Disk, s), "10.00GiB");
        assert_eq!(human_readable(512 << 20), "512.00MiB");
    }
}
