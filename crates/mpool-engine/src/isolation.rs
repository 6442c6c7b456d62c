//! The isolation probe's runner: from a VM the engine holds (never a leased one), over its
//! pooled SSH connection, try the host's bridge address (port 22 and mpool's TCP ports) and
//! another idle VM's SSH port, and keep the verdict (`mpool_isolation::probe` says what
//! the output means).
//!
//! When it runs: at most once per interval, in a plan that has just found its VM ready
//! (provision, reset, a hot VM's health check), so an idle host re-measures as its VMs cycle;
//! and, for a pool with `require_isolation`, in the wake that hands a VM out whenever the
//! verdict is not a current "isolated" (so such a pool never grants on an old or missing
//! measurement). The plan's task sends the new verdict to the state before the plan's outcome.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpool_core::pool::isolation::{Isolation, IsolationState};
use mpool_core::pool::state::Input;
use mpool_core::ports::SshPort;
use mpool_core::types::SshEndpoint;
use mpool_isolation::probe::{self, Verdict};

/// What the probe tries and how often.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// The host's address on the Multipass bridge (`None`: unknown; VMs on loopback, as the
    /// simulator's are, are probed against loopback).
    pub host: Option<IpAddr>,
    /// mpool's TCP ports on the host (besides 22).
    pub host_ports: Vec<u16>,
    /// How often it runs (above zero).
    pub interval: Duration,
}

/// Runs probes and keeps the last verdict.
pub struct Prober {
    settings: ProbeSettings,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// When the last periodic probe was claimed.
    claimed: Option<Instant>,
    /// The last verdict, and until when it is current.
    report: Isolation,
    current_until: Option<Instant>,
    /// A verdict the state has not heard yet.
    news: Option<Input>,
}

impl Prober {
    /// A prober that has measured nothing yet.
    pub fn new(settings: ProbeSettings) -> Prober {
        Prober { settings, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims the periodic probe if it is due at `now` (one claimant per interval).
    pub fn claim(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        let due = inner.claimed.is_none_or(|t| now.saturating_duration_since(t) >= self.settings.interval);
        if due {
            inner.claimed = Some(now);
        }
        due
    }

    /// Whether the last verdict is "isolated" and still current at `now`.
    pub fn isolated_now(&self, now: Instant) -> bool {
        let inner = self.lock();
        inner.report.state == IsolationState::Isolated && inner.current_until.is_some_and(|t| now < t)
    }

    /// Probes from `vm` (reached at `info`), with `peer` as the other VM to try.
    pub async fn run(
        &self,
        ssh: &dyn SshPort,
        vm: &str,
        info: &SshEndpoint,
        peer: Option<&(String, SshEndpoint)>,
        now: Instant,
        wall_ms: u64,
    ) {
        let own: Option<IpAddr> = info.host.parse().ok();
        let host = self.settings.host.or(own.filter(IpAddr::is_loopback));
        let peer = peer
            .filter(|(name, _)| name != vm)
            .and_then(|(name, p)| p.host.parse::<IpAddr>().ok().map(|ip| (name.as_str(), ip, p.port)));
        let targets = probe::targets(host, &self.settings.host_ports, peer);
        let (verdict, detail) = if targets.is_empty() {
            probe::verdict(&targets, "")
        } else {
            match ssh.output(vm.to_string(), info.clone(), probe::script(&targets)).await {
                Ok(out) => probe::verdict(&targets, &out),
                Err(e) => (Verdict::Unknown, format!("the probe could not run in {vm}: {}", e.message)),
            }
        };
        let state = match verdict {
            Verdict::Isolated => IsolationState::Isolated,
            Verdict::NotIsolated => IsolationState::NotIsolated,
            Verdict::Unknown => IsolationState::Unknown,
        };
        let report = Isolation { state, detail, checked_ms: wall_ms, vm: vm.to_string() };
        let current_until = now + self.settings.interval;
        let mut inner = self.lock();
        if inner.report.state != state || inner.report.checked_ms == 0 {
            match state {
                IsolationState::Isolated => tracing::info!(vm, "network isolation holds: {}", report.detail),
                _ => tracing::warn!(
                    vm,
                    "VMs are {}: {}; {}",
                    state.as_str(),
                    report.detail,
                    mpool_core::pool::isolation::FIX
                ),
            }
        }
        inner.report = report.clone();
        inner.current_until = Some(current_until);
        inner.news = Some(Input::Isolation { report, current_until });
    }

    /// The verdict the state has not heard yet, once.
    pub fn news(&self) -> Option<Input> {
        self.lock().news.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;

    fn prober(host: Option<&str>) -> Prober {
        Prober::new(ProbeSettings {
            host: host.map(|h| h.parse().unwrap()),
            host_ports: vec![7443],
            interval: Duration::from_secs(300),
        })
    }

    fn endpoint(host: &str) -> SshEndpoint {
        SshEndpoint { host: host.into(), port: 22, username: "ubuntu".into(), private_key: String::new() }
    }

    fn report(news: Option<Input>) -> Isolation {
        match news {
            Some(Input::Isolation { report, .. }) => report,
            other => panic!("no isolation news: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_open_network_is_reported_not_isolated_and_a_closed_one_isolated() {
        let fake = Fake::default();
        let p = prober(Some("10.1.2.1"));
        let now = Instant::now();
        fake.st.lock().unwrap().open_network = true;
        let peer = ("mpool-ci-b".to_string(), endpoint("10.1.2.8"));
        p.run(&fake, "mpool-ci-a", &endpoint("10.1.2.7"), Some(&peer), now, 1).await;
        let r = report(p.news());
        assert_eq!(r.state, IsolationState::NotIsolated, "{r:?}");
        assert!(r.detail.contains("10.1.2.1:7443") && r.detail.contains("VM mpool-ci-b"), "{r:?}");
        assert!(p.news().is_none(), "news is taken once");
        assert!(!p.isolated_now(now));

        fake.st.lock().unwrap().open_network = false;
        p.run(&fake, "mpool-ci-a", &endpoint("10.1.2.7"), Some(&peer), now, 2).await;
        assert_eq!(report(p.news()).state, IsolationState::Isolated);
        assert!(p.isolated_now(now));
        assert!(!p.isolated_now(now + Duration::from_secs(300)), "a verdict goes stale after the interval");
    }

    #[tokio::test]
    async fn without_a_bridge_address_only_loopback_vms_are_probed_against_the_host() {
        let fake = Fake::default();
        let p = prober(None);
        p.run(&fake, "mpool-ci-a", &endpoint("10.1.2.7"), None, Instant::now(), 1).await;
        let r = report(p.news());
        assert_eq!(r.state, IsolationState::Unknown, "{r:?}");
        assert!(fake.st.lock().unwrap().calls.is_empty(), "nothing to try, nothing run");
        fake.st.lock().unwrap().open_network = true;
        p.run(&fake, "mpool-ci-a", &endpoint("127.0.0.1"), None, Instant::now(), 2).await;
        let r = report(p.news());
        assert_eq!(r.state, IsolationState::NotIsolated, "{r:?}");
        assert!(r.detail.contains("the host at 127.0.0.1:22"), "{r:?}");
    }

    #[test]
    fn the_periodic_probe_is_claimed_once_per_interval() {
        let p = prober(None);
        let t0 = Instant::now();
        assert!(p.claim(t0));
        assert!(!p.claim(t0 + Duration::from_secs(299)));
        assert!(p.claim(t0 + Duration::from_secs(300)));
    }
}
