//! Crash-safe state in one redb file: VMs, leases, request ids and pool generations.
//!
//! The engine writes a VM's phase *before* the daemon calls that phase describes (intent first),
//! so after a crash reconciliation knows what each instance was doing. Writes that must survive a
//! crash (a lease granted or ended, a VM created or deleted) commit durably; a VM settling into an
//! idle state may commit lazily, since losing it only costs one extra reset after a crash.
//!
//! Records are JSON inside redb tables, so the file stays readable across versions that add
//! fields (unknown fields are ignored, missing ones take defaults).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const REQUESTS: TableDefinition<&str, &str> = TableDefinition::new("request_ids");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened, read or written.
    #[error("state store {path}: {detail}")]
    Db {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// A record could not be encoded or decoded.
    #[error("state store record {key}: {detail}")]
    Record {
        /// The record's key.
        key: String,
        /// What failed.
        detail: String,
    },
}

/// Where a VM is in its life, as persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseRecord {
    /// Being created (launch, setup, clean snapshot).
    Provisioning,
    /// Idle and running: acquire costs no daemon call.
    Hot,
    /// Idle and suspended.
    Warm,
    /// Being started for a waiting acquirer.
    Starting,
    /// Leased to a holder.
    Leased,
    /// Being reset to its clean state after a lease.
    Resetting,
    /// Failed; to be deleted and replaced.
    Broken,
    /// Being deleted.
    Deleting,
    /// The stopped source VM of a clone pool (never leased).
    Golden,
}

/// One VM as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Instance name (carries the engine's prefix).
    pub name: String,
    /// Pool it belongs to.
    pub pool: String,
    /// The pool's config generation it was built from.
    pub generation: u64,
    /// Its phase.
    pub phase: PhaseRecord,
    /// Leases it has served since its last full rebuild.
    #[serde(default)]
    pub uses: u32,
    /// The lease holding it, if any.
    #[serde(default)]
    pub lease: Option<String>,
    /// Creation time, unix milliseconds.
    #[serde(default)]
    pub created_ms: u64,
}

/// One lease as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Lease id.
    pub id: String,
    /// Pool.
    pub pool: String,
    /// VM name.
    pub vm: String,
    /// Who holds it (free text from the caller, e.g. a Kestra task run id).
    pub holder: String,
    /// The caller's idempotency key, if any.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Granted at, unix milliseconds.
    pub granted_ms: u64,
    /// Expires at, unix milliseconds.
    pub expires_ms: u64,
    /// The principal (token name) that acquired it; empty when auth is off.
    #[serde(default)]
    pub owner: String,
}

/// A pool's persisted config generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Pool name.
    pub name: String,
    /// Generation number, bumped when the VM-shaping config changes.
    pub generation: u64,
    /// The config fingerprint of that generation.
    pub key: String,
}

/// One change inside a write batch.
#[derive(Clone, Debug)]
pub enum Write {
    /// Insert or replace a VM.
    PutVm(VmRecord),
    /// Remove a VM.
    DeleteVm(String),
    /// Insert or replace a lease (and its request id).
    PutLease(LeaseRecord),
    /// Remove a lease (and its request id).
    DeleteLease(LeaseRecord),
    /// Insert or replace a pool generation.
    PutPool(PoolRecord),
}

/// Everything in the store, read in one transaction.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// VMs.
    pub vms: Vec<VmRecord>,
    /// Leases.
    pub leases: Vec<LeaseRecord>,
    /// Pools.
    pub pools: Vec<PoolRecord>,
}

/// The store: one redb file.
pub struct Store {
    db: Database,
    path: String,
}

impl Store {
    /// Opens (or creates) the store file, creating its directory.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let p = path.display().to_string();
        let db_err = |e: &dyn std::fmt::Display| StoreError::Db { path: p.clone(), detail: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| db_err(&e))?;
        }
        let db = Database::create(path).map_err(|e| db_err(&e))?;
        let store = Store { db, path: p };
        // Create the tables so reads never see a missing table.
        store.write(&[], true)?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db { path: self.path.clone(), detail: e.to_string() }
    }

    /// Applies a batch atomically. `durable` commits with an fsync; otherwise the commit may be
    /// lost in a crash (but never half-applied).
    pub fn write(&self, batch: &[Write], durable: bool) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
        }
        {
            let mut vms = tx.open_table(VMS).map_err(|e| self.err(e))?;
            let mut leases = tx.open_table(LEASES).map_err(|e| self.err(e))?;
            let mut requests = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
            let mut pools = tx.open_table(POOLS).map_err(|e| self.err(e))?;
            for w in batch {
                match w {
                    Write::PutVm(v) => {
                        vms.insert(v.name.as_str(), encode(&v.name, v)?.as_slice()).map_err(|e| self.err(e))?;
                    }
                    Write::DeleteVm(name) => {
                        vms.remove(name.as_str()).map_err(|e| self.err(e))?;
                    }
                    Write::PutLease(l) => {
                        leases.insert(l.id.as_str(), encode(&l.id, l)?.as_slice()).map_err(|e| self.err(e))?;
                        if let Some(r) = &l.request_id {
                            requests.insert(request_key(&l.pool, r).as_str(), l.id.as_str()).map_err(|e| self.err(e))?;
                        }
                    }
                    Write::DeleteLease(l) => {
                        leases.remove(l.id.as_str()).map_err(|e| self.err(e))?;
                        if let Some(r) = &l.request_id {
                            requests.remove(request_key(&l.pool, r).as_str()).map_err(|e| self.err(e))?;
                        }
                    }
                    Write::PutPool(p) => {
                        pools.insert(p.name.as_str(), encode(&p.name, p)?.as_slice()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Reads everything in one consistent view.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut snap = Snapshot::default();
        let vms = tx.open_table(VMS).map_err(|e| self.err(e))?;
        for row in vms.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snap.vms.push(decode(k.value(), v.value())?);
        }
        let leases = tx.open_table(LEASES).map_err(|e| self.err(e))?;
        for row in leases.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snap.leases.push(decode(k.value(), v.value())?);
        }
        let pools = tx.open_table(POOLS).map_err(|e| self.err(e))?;
        for row in pools.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snap.pools.push(decode(k.value(), v.value())?);
        }
        Ok(snap)
    }

    /// The lease id a request id was answered with, in a pool.
    pub fn lease_for_request(&self, pool: &str, request_id: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
        Ok(t.get(request_key(pool, request_id).as_str()).map_err(|e| self.err(e))?.map(|g| g.value().to_string()))
    }
}

/// Request ids are scoped by pool (the same id in two pools is two requests).
fn request_key(pool: &str, request_id: &str) -> String {
    format!("{pool}\u{0}{request_id}")
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Record { key: key.into(), detail: e.to_string() })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Record { key: key.into(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, phase: PhaseRecord) -> VmRecord {
        VmRecord { name: name.into(), pool: "ci".into(), generation: 1, phase, uses: 0, lease: None, created_ms: 1 }
    }

    #[test]
    fn batches_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.redb");
        let lease = LeaseRecord {
            id: "l1".into(),
            pool: "ci".into(),
            vm: "mpool-ci-a".into(),
            holder: "task".into(),
            request_id: Some("r1".into()),
            granted_ms: 1,
            expires_ms: 2,
            owner: String::new(),
        };
        {
            let s = Store::open(&path).unwrap();
            s.write(&[Write::PutVm(vm("mpool-ci-a", PhaseRecord::Leased)), Write::PutLease(lease.clone())], true).unwrap();
            s.write(&[Write::PutVm(vm("mpool-ci-b", PhaseRecord::Warm))], false).unwrap();
            s.write(&[Write::PutPool(PoolRecord { name: "ci".into(), generation: 3, key: "k".into() })], true).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.vms.len(), 2);
        assert_eq!(snap.leases, vec![lease.clone()]);
        assert_eq!(snap.pools[0].generation, 3);
        assert_eq!(s.lease_for_request("ci", "r1").unwrap().as_deref(), Some("l1"));
        assert_eq!(s.lease_for_request("other", "r1").unwrap(), None, "request ids are per pool");
        s.write(&[Write::DeleteLease(lease), Write::DeleteVm("mpool-ci-a".into())], true).unwrap();
        let snap = s.load().unwrap();
        assert!(snap.leases.is_empty());
        assert_eq!(snap.vms.len(), 1);
        assert_eq!(s.lease_for_request("ci", "r1").unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.redb");
        std::fs::write(&path, b"this is not a redb file at all, not even close............").unwrap();
        let err = Store::open(&path).err().expect("refused");
        assert!(err.to_string().contains("bad.redb"), "{err}");
    }
}
