//! A scripted in-memory daemon and SSH for the engine's unit tests: multipassd's state rules in
//! miniature, a call log, injectable failures, and a high-water mark of instances.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::multipass::{InstanceState, LaunchOptions, SshInfo};

use super::ports::{BoxFut, DaemonPort, Observed, SshPort, StepError};

/// The fake's inner state.
#[derive(Default)]
pub struct FakeState {
    /// Instances and their states.
    pub instances: BTreeMap<String, InstanceState>,
    /// Snapshots (instance, name).
    pub snapshots: HashSet<(String, String)>,
    /// Every call, as "op name".
    pub calls: Vec<String>,
    /// Ops that fail once each time they are listed here ("op name" or "op *").
    pub fail_next: Vec<String>,
    /// The daemon is down.
    pub down: bool,
    /// Most instances alive at once.
    pub high_water: usize,
    /// VMs whose SSH check fails.
    pub ssh_broken: HashSet<String>,
}

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

    fn step(&self, op: &str, name: &str, f: impl FnOnce(&mut FakeState) -> Result<(), StepError>) -> Result<(), StepError> {
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
        Box::pin(async move { self.step("ping", "", |_| Ok(())) })
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            self.step("list", "", |st| {
                out = st.instances.iter().map(|(n, s)| Observed { name: n.clone(), state: *s }).collect();
                Ok(())
            })?;
            Ok(out)
        })
    }

    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>> {
        Box::pin(async move { Ok(self.st.lock().unwrap().snapshots.iter().cloned().collect()) })
    }

    fn launch(&self, opts: LaunchOptions) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("launch", &opts.name.clone(), |st| {
                if st.instances.contains_key(&opts.name) {
                    return Err(StepError::failed("already exists"));
                }
                st.instances.insert(opts.name.clone(), InstanceState::Running);
                Ok(())
            })
        })
    }

    fn start(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("start", &name.clone(), |st| {
                let s = st.instances.get_mut(&name).ok_or_else(|| missing(&name))?;
                *s = InstanceState::Running;
                Ok(())
            })
        })
    }

    fn stop(&self, name: String, _force: bool) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("stop", &name.clone(), |st| {
                let s = st.instances.get_mut(&name).ok_or_else(|| missing(&name))?;
                *s = InstanceState::Stopped;
                Ok(())
            })
        })
    }

    fn suspend(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
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
            self.step("snapshot", &name.clone(), |st| {
                if st.instances.get(&name) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                st.snapshots.insert((name, snapshot));
                Ok(())
            })
        })
    }

    fn restore(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("restore", &name.clone(), |st| {
                if !st.snapshots.contains(&(name.clone(), snapshot)) {
                    return Err(StepError { unavailable: false, not_found: true, message: "no such snapshot".into() });
                }
                if st.instances.get(&name) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                Ok(())
            })
        })
    }

    fn clone_vm(&self, source: String, destination: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("clone", &destination.clone(), |st| {
                if st.instances.get(&source) != Some(&InstanceState::Stopped) {
                    return Err(StepError::failed("only stopped instances"));
                }
                st.instances.insert(destination, InstanceState::Stopped);
                Ok(())
            })
        })
    }

    fn delete(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.step("delete", &name.clone(), |st| {
                st.instances.remove(&name);
                st.snapshots.retain(|(i, _)| *i != name);
                Ok(())
            })
        })
    }

    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshInfo, StepError>> {
        Box::pin(async move {
            self.step("ssh_info", &name.clone(), |st| match st.instances.get(&name) {
                Some(InstanceState::Running) => Ok(()),
                Some(_) => Err(StepError::failed("not running")),
                None => Err(missing(&name)),
            })?;
            Ok(SshInfo { host: "127.0.0.1".into(), port: 22, username: "ubuntu".into(), private_key: String::new() })
        })
    }
}

impl SshPort for Fake {
    fn ready(&self, vm: String, _info: SshInfo) -> BoxFut<'_, Result<(), StepError>> {
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

    fn run_script(&self, vm: String, _info: SshInfo, _script: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            self.st.lock().unwrap().calls.push(format!("ssh-script {vm}"));
            Ok(())
        })
    }

    fn forget(&self, _vm: String) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}
