//! Daemon versions and what each supports: mpool speaks the 1.13-1.16 wire layout.

use std::fmt;

/// A daemon version, `major.minor.patch` (suffixes such as `-dev` or `+mac` are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

/// The oldest daemon whose wire layout mpool speaks (snapshots, restore, new list/info/delete).
pub const OLDEST: Version = Version { major: 1, minor: 13, patch: 0 };
/// The first version mpool has not been tested with.
pub const FIRST_UNTESTED: Version = Version { major: 1, minor: 17, patch: 0 };

impl Version {
    /// Parses `1.16.3`, `1.17.0-dev.12+gabc`, `1.16.3+mac`.
    pub fn parse(s: &str) -> Option<Version> {
        let core = s.trim().split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Version { major, minor, patch })
    }

    /// Inside the tested range 1.13.0 - 1.16.x.
    pub fn is_tested(&self) -> bool {
        *self >= OLDEST && *self < FIRST_UNTESTED
    }

    /// `clone` exists (1.15+).
    pub fn has_clone(&self) -> bool {
        *self >= Version { major: 1, minor: 15, patch: 0 }
    }

    /// `daemon_info` exists (1.15+; CPUs and memory from 1.15.1).
    pub fn has_daemon_info(&self) -> bool {
        *self >= Version { major: 1, minor: 15, patch: 0 }
    }

    /// `stop` takes `force_stop` (1.14+).
    pub fn has_force_stop(&self) -> bool {
        *self >= Version { major: 1, minor: 14, patch: 0 }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_gates() {
        let v = |s| Version::parse(s).unwrap();
        assert_eq!(v("1.16.3"), Version { major: 1, minor: 16, patch: 3 });
        assert_eq!(v("1.17.0-dev.12+gabc"), Version { major: 1, minor: 17, patch: 0 });
        assert!(v("1.16.3+mac").is_tested());
        assert!(v("1.13.0").is_tested());
        assert!(!v("1.12.2").is_tested());
        assert!(!v("1.17.0-dev").is_tested());
        assert!(!v("1.14.1").has_clone() && v("1.15.0").has_clone());
        assert!(!v("1.13.1").has_force_stop() && v("1.14.0").has_force_stop());
        assert!(Version::parse("garbage").is_none());
    }
}
