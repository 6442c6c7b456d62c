//! An in-memory [`StateStore`] for tests: the same atomic batches as redb, plus what a failing
//! disk and a crash do. Writes can be made to fail (all of them, or the next N); a crash keeps
//! only what was committed durably (a durable commit also persists the lazy ones before it, as
//! redb does).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{EndedRecord, LeaseRecord, PoolRecord, RequestRecord, Snapshot, StateStore, StoreError, VmRecord, Write};

#[derive(Clone, Default)]
struct Tables {
    vms: BTreeMap<String, VmRecord>,
    leases: BTreeMap<String, LeaseRecord>,
    requests: BTreeMap<String, RequestRecord>,
    ended: BTreeMap<String, EndedRecord>,
    pools: BTreeMap<String, PoolRecord>,
}

impl Tables {
    fn apply(&mut self, w: &Write) {
        match w {
            Write::PutVm(v) => drop(self.vms.insert(v.name.clone(), v.clone())),
            Write::DeleteVm(n) => drop(self.vms.remove(n)),
            Write::PutLease(l) => drop(self.leases.insert(l.id.clone(), l.clone())),
            Write::DeleteLease(id) => drop(self.leases.remove(id)),
            Write::PutRequest(r) => drop(self.requests.insert(r.key().store_key(), r.clone())),
            Write::DeleteRequest(k) => drop(self.requests.remove(&k.store_key())),
            Write::PutEnded(e) => drop(self.ended.insert(e.id.clone(), e.clone())),
            Write::DeleteEnded(id) => drop(self.ended.remove(id)),
            Write::PutPool(p) => drop(self.pools.insert(p.name.clone(), p.clone())),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            vms: self.vms.values().cloned().collect(),
            leases: self.leases.values().cloned().collect(),
            requests: self.requests.values().cloned().collect(),
            ended: self.ended.values().cloned().collect(),
            pools: self.pools.values().cloned().collect(),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// What a crash keeps.
    durable: Tables,
    /// What reads see (durable plus lazy commits).
    visible: Tables,
    /// Every write fails while set.
    failing: Option<String>,
    /// The next this many writes fail.
    fail_next: u32,
    /// Writes committed.
    commits: u64,
    /// Writes refused.
    refused: u64,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Makes every write fail with `why` (`None`: writes work again).
    pub fn set_failing(&self, why: Option<&str>) {
        self.inner().failing = why.map(str::to_string);
    }

    /// Makes the next `n` writes fail.
    pub fn fail_next(&self, n: u32) {
        self.inner().fail_next = n;
    }

    /// A crash: lazy commits since the last durable one are lost.
    pub fn crash(&self) {
        let mut st = self.inner();
        st.visible = st.durable.clone();
    }

    /// What survives a crash right now.
    pub fn durable(&self) -> Snapshot {
        self.inner().durable.snapshot()
    }

    /// (commits, refused writes) so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.inner();
        (st.commits, st.refused)
    }
}

impl StateStore for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.inner().visible.snapshot())
    }

    fn write(&self, batch: &[Write], durable: bool) -> Result<(), StoreError> {
        let mut st = self.inner();
        let refusal = match (&st.failing, st.fail_next) {
            (Some(why), _) => Some(why.clone()),
            (None, n) if n > 0 => {
                st.fail_next = n - 1;
                Some("injected write failure".to_string())
            }
            _ => None,
        };
        if let Some(why) = refusal {
            st.refused += 1;
            return Err(StoreError::Db { path: "memory".into(), detail: why });
        }
        for w in batch {
            st.visible.apply(w);
        }
        if durable {
            st.durable = st.visible.clone();
        }
        st.commits += 1;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    fn blocks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PhaseRecord;

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            pool: "ci".into(),
            generation: 1,
            phase: PhaseRecord::Hot,
            uses: 0,
            lease: None,
            created_ms: 0,
        }
    }

    #[test]
    fn a_crash_keeps_durable_commits_and_the_lazy_ones_before_them() {
        let s = MemStore::new();
        s.write(&[Write::PutVm(vm("a"))], false).unwrap();
        s.write(&[Write::PutVm(vm("b"))], true).unwrap();
        s.write(&[Write::PutVm(vm("c"))], false).unwrap();
        assert_eq!(s.load().unwrap().vms.len(), 3);
        s.crash();
        let names: Vec<String> = s.load().unwrap().vms.into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[test]
    fn failed_writes_change_nothing() {
        let s = MemStore::new();
        s.fail_next(1);
        assert!(s.write(&[Write::PutVm(vm("a"))], true).is_err());
        s.write(&[Write::PutVm(vm("b"))], true).unwrap();
        s.set_failing(Some("disk full"));
        let err = s.write(&[Write::PutVm(vm("c"))], true).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        s.set_failing(None);
        assert_eq!(s.load().unwrap().vms.len(), 1);
        assert_eq!(s.counts(), (1, 2));
    }
}
