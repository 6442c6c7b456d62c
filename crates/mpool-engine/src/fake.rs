//! A scripted in-memory daemon and SSH for the engine's unit tests: multipassd's state rules in
//! miniature, a call log, injectable failures, and a high-water mark of instances.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use mpool_core::types::{InstanceState, LaunchOptions, SshEndpoint};

use mpool_core::pool::resize::Sizes;
use mpool_core::ports::{BoxFut, DaemonPort, Observed, SshPort, StepError};
use mpool_core::sizes::parse_size;

/// The fake's inner state.
#[derive(Default)]
pub struct FakeState {
    /// Instances and their states.
    pub instances: BTreeMap<String, InstanceState>,
    /// Snapshots (instance, name).
    pub snapshots: HashSet<(String, String)>,
    /// Every call, as "op name".
    pub calls: Vec<String>,
    /// Ops that fail once each time they are listed here ("op name" or "op *"); with a
    /// "cut " prefix the call is cut as when the daemon aborts (unavailable, after the daemon
    /// did the work).
    pub fail_next: Vec<String>,
    /// The daemon is down.
    pub down: bool,
    /// Most instances alive at once.
    pub high_water: usize,
    /// VMs whose SSH check fails.
    pub ssh_broken: HashSet<String>,
    /// The daemon is frozen: every call hangs until its deadline, then fails as unavailable.
    pub frozen: bool,
    /// How long a list takes to come back after it read the instances: a slow daemon whose
    /// answer is already stale when it arrives.
    pub list_lag: std::time::Duration,
    /// How long every call but reads (list, ping) takes: a daemon whose VMs take time to refill.
    pub op_delay: std::time::Duration,
    /// Bytes `df` reports used in a VM (0 when not set).
    pub disk_used: std::collections::HashMap<String, u64>,
    /// Instances a tenant has written into since they were last reset (restored, launched,
    /// cloned): the model-based tests mark them when a lease is acknowledged.
    pub dirty: HashSet<String>,
    /// The VMs reach each other and the host: what an isolation probe's connections do.
    pub open_network: bool,
    /// Each instance's CPUs, memory and disk (as launched, cloned, set or restored).
    pub sizes: BTreeMap<String, Sizes>,
    /// The sizes each snapshot was taken at (a restore brings them back).
    pub snapshot_sizes: std::collections::HashMap<(String, String), Sizes>,
}

/// How long a call to a frozen fake daemon hangs before its deadline fails it.
pub const FROZEN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A fake daemon + SSH.
#[derive(Clone, Default)]
pub struct Fake {
    /// Shared state.
    pub st: Arc<Mutex<FakeState>>,
}

impl Fake {
    /// Calls made so far whose text starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.st.lock().unwrap().calls.iter().filter(|c| c.starts_with(prefix)).count()
    }

    /// A frozen daemon answers nothing until the call's deadline.
    async fn gate(&self, op: &str, name: &str) -> Result<(), StepError> {
        let (frozen, delay) = {
            let st = self.st.lock().unwrap();
            (st.frozen, st.op_delay)
        };
        if !delay.is_zero() && op != "list" && op != "ping" {
            tokio::time::sleep(delay).await;
        }
        if frozen {
            tokio::time::sleep(FROZEN_DEADLINE).await;
            self.st.lock().unwrap().calls.push(format!("{op} {name} (deadline)"));
            return Err(StepError::unavailable("multipassd did not answer within its deadline"));
        }
        Ok(())
    }

    fn step(
        &self,
        op: &str,
        name: &str,
        f: impl FnOnce(&mut FakeState) -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let mut st = self.st.lock().unwrap();
        st.calls.push(format!("{op} {name}"));
        if st.down {
            return Err(StepError::unavailable("daemon down"));
        }
        let key1 = format!("{op} {name}");
        let key2 = format!("{op} *");
        if let Some(i) = st.fail_next.iter().position(|k| *k == key1 || *k == key2) {
            st.fail_next.remove(i);
            return Err(StepError::failed(format!("injected failure of {op}")));
        }
        let cut = |k: &String| k.strip_prefix("cut ").is_some_and(|k| k == key1 || k == key2);
        if let Some(i) = st.fail_next.iter().position(cut) {
            st.fail_next.remove(i);
            f(&mut st)?;
            return Err(StepError::unavailable(format!("the connection was cut during {op}")));
        }
        f(&mut st)?;
        st.high_water = st.high_water.max(st.instances.len());
        Ok(())
    }
}

fn missing(name: &str) -> StepError {
    StepError { unavailable: false, not_found: true, message: format!("instance \"{name}\" does not exist") }
}

impl DaemonPort for Fake {
    fn ping(&self) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("ping", "").await?;
            self.step("ping", "", |_| Ok(()))
        })
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>> {
        Box::pin(async move {
            self.gate("list", "").await?;
            let mut out = Vec::new();
            let mut lag = std::time::Duration::ZERO;
            self.step("list", "", |st| {
                out = st.instances.iter().map(|(n, s)| Observed { name: n.clone(), state: *s }).collect();
                lag = st.list_lag;
                Ok(())
            })?;
            if !lag.is_zero() {
                tokio::time::sleep(lag).await;
            }
            Ok(out)
        })
    }

    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>> {
        Box::pin(async move { Ok(self.st.lock().unwrap().snapshots.iter().cloned().collect()) })
    }

    fn launch(&self, opts: LaunchOptions) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("launch", &opts.name).await?;
            self.step("launch", &opts.name.clone(), |st| {
                if st.instances.contains_key(&opts.name) {
                    return Err(StepError::failed("already exists"));
                }
                let memory = parse_size(&opts.memory).unwrap_or(1 << 30);
                let disk = parse_size(&opts.disk).unwrap_or(5 << 30);
                let cpus = u32::try_from(opts.cpus.max(1)).unwrap_or(1);
                st.sizes.insert(opts.name.clone(), Sizes { cpus, memory, disk });
                st.instances.insert(opts.name.clone(), InstanceState::Running);
                st.dirty.remove(&opts.name);
                Ok(())
            })
        })
    }

    fn start(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("start", &name).await?;
            self.step("start", &name.clone(), |st| {
                let s = st.instances.get_mut(&name).ok_or_else(|| missing(&name))?;
                *s = InstanceState::Running;
                Ok(())
            })
        })
    }

    fn stop(&self, name: String, _force: bool) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("stop", &name).await?;
            self.step("stop", &name.clone(), |st| {
                let s = st.instances.get_mut(&name).ok_or_else(|| missing(&name))?;
                *s = InstanceState::Stopped;
                Ok(())
            })
        })
    }

    fn suspend(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("suspend", &name).await?;
            self.step("suspend", &name.clone(), |st| {
                let s = st.instances.get_mut(&name).ok_or_else(|| missing(&name))?;
                if *s == InstanceState::Running {
                    *s = InstanceState::Suspended;
                }
                Ok(())
            })
        })
    }

    fn snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("snapshot", &name).await?;
            self.step("snapshot", &name.clone(), |st| {
                if st.instances.get(&name) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                if let Some(s) = st.sizes.get(&name).copied() {
                    st.snapshot_sizes.insert((name.clone(), snapshot.clone()), s);
                }
                st.snapshots.insert((name, snapshot));
                Ok(())
            })
        })
    }

    fn restore(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("restore", &name).await?;
            self.step("restore", &name.clone(), |st| {
                if !st.snapshots.contains(&(name.clone(), snapshot.clone())) {
                    return Err(StepError { unavailable: false, not_found: true, message: "no such snapshot".into() });
                }
                if st.instances.get(&name) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                if let Some(s) = st.snapshot_sizes.get(&(name.clone(), snapshot)).copied() {
                    st.sizes.insert(name.clone(), s);
                }
                st.dirty.remove(&name);
                Ok(())
            })
        })
    }

    fn clone_vm(&self, source: String, destination: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("clone", &destination).await?;
            self.step("clone", &destination.clone(), |st| {
                if st.instances.get(&source) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                if st.instances.contains_key(&destination) {
                    return Err(StepError::failed("already exists"));
                }
                st.dirty.remove(&destination);
                if let Some(s) = st.sizes.get(&source).copied() {
                    st.sizes.insert(destination.clone(), s);
                }
                st.instances.insert(destination, InstanceState::Stopped);
                Ok(())
            })
        })
    }

    fn delete(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("delete", &name).await?;
            self.step("delete", &name.clone(), |st| {
                st.instances.remove(&name);
                st.dirty.remove(&name);
                st.snapshots.retain(|(i, _)| *i != name);
                st.snapshot_sizes.retain(|(i, _), _| *i != name);
                st.sizes.remove(&name);
                Ok(())
            })
        })
    }

    fn delete_snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.gate("delete_snapshot", &name).await?;
            self.step("delete_snapshot", &format!("{name}.{snapshot}"), |st| {
                st.snapshot_sizes.remove(&(name.clone(), snapshot.clone()));
                st.snapshots.remove(&(name, snapshot));
                Ok(())
            })
        })
    }

    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshEndpoint, StepError>> {
        Box::pin(async move {
            self.gate("ssh_info", &name).await?;
            self.step("ssh_info", &name.clone(), |st| match st.instances.get(&name) {
                Some(InstanceState::Running) => Ok(()),
                Some(_) => Err(StepError::failed("not running")),
                None => Err(missing(&name)),
            })?;
            Ok(SshEndpoint {
                host: "127.0.0.1".into(),
                port: 22,
                username: "ubuntu".into(),
                private_key: String::new(),
            })
        })
    }

    /// multipassd's rules for `local.<vm>.cpus|memory|disk`: a stopped instance only, valid
    /// values, and the disk only grows.
    fn set_instance(&self, key: String, value: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let parsed = key.strip_prefix("local.").and_then(|k| k.rsplit_once('.'));
            let Some((name, property)) = parsed.map(|(n, p)| (n.to_string(), p.to_string())) else {
                return Err(StepError::failed(format!("Unrecognized settings key: '{key}'")));
            };
            self.gate("set", &name).await?;
            self.step("set", &format!("{name}.{property}={value}"), |st| {
                if st.instances.get(&name) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("Instance must be stopped for modification"));
                }
                let s = st.sizes.get_mut(&name).ok_or_else(|| missing(&name))?;
                let bad = || StepError::failed(format!("Invalid setting '{key}={value}'"));
                match property.as_str() {
                    "cpus" => s.cpus = value.parse().ok().filter(|c| *c >= 1).ok_or_else(bad)?,
                    "memory" => s.memory = parse_size(&value).filter(|m| *m >= 128 << 20).ok_or_else(bad)?,
                    "disk" => {
                        let disk = parse_size(&value).ok_or_else(bad)?;
                        if disk < s.disk {
                            return Err(StepError::failed("Disk can only be expanded"));
                        }
                        s.disk = disk;
                    }
                    _ => return Err(StepError::failed(format!("Unrecognized settings key: '{key}'"))),
                }
                Ok(())
            })
        })
    }
}

impl SshPort for Fake {
    fn ready(&self, vm: String, _info: SshEndpoint) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let mut st = self.st.lock().unwrap();
            st.calls.push(format!("ssh-ready {vm}"));
            if st.ssh_broken.contains(&vm) {
                return Err(StepError::failed("ssh refused"));
            }
            match st.instances.get(&vm) {
                Some(InstanceState::Running) => Ok(()),
                _ => Err(StepError::failed("not running")),
            }
        })
    }

    fn run_script(&self, vm: String, _info: SshEndpoint, _script: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.st.lock().unwrap().calls.push(format!("ssh-script {vm}"));
            Ok(())
        })
    }

    fn output(&self, vm: String, _info: SshEndpoint, script: String) -> BoxFut<'_, Result<String, StepError>> {
        Box::pin(async move {
            let mut st = self.st.lock().unwrap();
            st.calls.push(format!("ssh-output {vm}"));
            // Answers an isolation probe: one line per `probe ADDRESS PORT &`.
            let outcome = if st.open_network { "open" } else { "blocked" };
            let lines = script.lines().filter_map(|l| l.strip_prefix("probe ")?.strip_suffix(" &"));
            Ok(lines.map(|target| format!("{outcome} {target}\n")).collect())
        })
    }

    fn disk_used(&self, vm: String, _info: SshEndpoint) -> BoxFut<'_, Result<u64, StepError>> {
        Box::pin(async move {
            let mut st = self.st.lock().unwrap();
            st.calls.push(format!("ssh-df {vm}"));
            Ok(st.disk_used.get(&vm).copied().unwrap_or(0))
        })
    }

    fn forget(&self, vm: String) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.st.lock().unwrap().calls.push(format!("forget {vm}"));
        })
    }
}
