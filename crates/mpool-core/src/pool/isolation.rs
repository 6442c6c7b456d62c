//! Whether the VMs are isolated from each other and from the host, as the isolation probe
//! last measured it (the probe itself lives in the engine; its verdict logic in
//! `mpool-isolation`), and what that means for a pool with `require_isolation`.

use super::error::EngineError;

/// The probe's last verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationState {
    /// Not measured yet, or the probe could not tell.
    Unknown,
    /// Every target was blocked.
    Isolated,
    /// A VM reached another VM or the host.
    NotIsolated,
}

impl IsolationState {
    /// How status and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationState::Unknown => "unknown",
            IsolationState::Isolated => "isolated",
            IsolationState::NotIsolated => "not isolated",
        }
    }
}

/// What the probe last measured.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Isolation {
    /// The verdict.
    pub state: IsolationState,
    /// Why: what was blocked, what was reached, or why it could not tell.
    pub detail: String,
    /// When it was measured (unix milliseconds; 0 = never).
    pub checked_ms: u64,
    /// The VM it was measured from.
    pub vm: String,
}

/// The fix a refusal names.
pub const FIX: &str = "apply mpool's host rules as root (`mpool isolation rules | nft -f -`, or enable deploy/mpool-isolation.service), see README \"Isolation\"";

impl Default for Isolation {
    fn default() -> Isolation {
        Isolation {
            state: IsolationState::Unknown,
            detail: "not measured yet: the probe runs from the first VM mpool starts".into(),
            checked_ms: 0,
            vm: String::new(),
        }
    }
}

impl Isolation {
    /// The error a pool that requires isolation answers with while it is not measured as
    /// isolated.
    pub fn refusal(&self, pool: &str) -> Option<EngineError> {
        (self.state != IsolationState::Isolated).then(|| EngineError::NotIsolated {
            pool: pool.to_string(),
            state: self.state.as_str().to_string(),
            detail: self.detail.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::error::ErrorKind;

    #[test]
    fn only_a_measured_isolation_lets_a_requiring_pool_serve() {
        assert_eq!(Isolation { state: IsolationState::Isolated, ..Isolation::default() }.refusal("ci"), None);
        for state in [IsolationState::Unknown, IsolationState::NotIsolated] {
            let i = Isolation { state, detail: "a VM reached the host at 10.1.2.1:22".into(), ..Default::default() };
            let err = i.refusal("ci").expect("refused");
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
            let msg = err.to_string();
            assert!(msg.contains("pool ci requires isolation"), "{msg}");
            assert!(msg.contains("10.1.2.1:22") && msg.contains("mpool isolation rules"), "{msg}");
        }
    }
}
