//! The state store in one redb file.
//!
//! - **Schema versions**: a `meta` table holds the schema version. A file written by an older
//!   mpool is migrated when opened (in one transaction); a file from a newer one is refused.
//!   Version 1 (no `meta` table) kept request ids per pool in `request_ids`; version 2 keeps them
//!   per owner and pool, with Run outcomes, in `requests`, and remembers ended leases.
//! - **I/O errors**: after a failed write redb refuses every later one ("Previous I/O error
//!   occurred"), so the database is dropped and reopened on the next call: once the disk has
//!   room again, writes work again without a restart.
//! - **Corruption**: redb panics on some inconsistent pages; every call runs under
//!   `catch_unwind`, so a damaged file is a [`StoreError::Corrupt`], never a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::{
    EndedRecord, LeaseRecord, PoolRecord, RequestKind, RequestRecord, Snapshot, StateStore, StoreError, VmRecord,
    Write, decode, encode,
};

/// The schema version this build writes (and the newest it reads).
pub const SCHEMA_VERSION: u64 = 2;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
const ENDED: TableDefinition<&str, &[u8]> = TableDefinition::new("ended");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
/// Version 1's request ids: `pool NUL request_id` -> lease id.
const V1_REQUEST_IDS: TableDefinition<&str, &str> = TableDefinition::new("request_ids");

const SCHEMA_KEY: &str = "schema_version";

/// The store: one redb file.
pub struct Store {
    path: PathBuf,
    /// The open database; `None` after a failure, reopened by the next call.
    db: Mutex<Option<Database>>,
}

impl Store {
    /// Opens (or creates) the store file, creating its directory, and migrates an older schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let store = Store { path: path.to_path_buf(), db: Mutex::new(None) };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| store.err(e))?;
        }
        store.with_db(|_| Ok(()))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db { path: self.path.display().to_string(), detail: e.to_string() }
    }

    /// Runs `f` on the open database (opening and migrating it first if needed). Any error or
    /// panic drops the database, so the next call starts from a fresh open.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut guard = match self.db.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            if guard.is_none() {
                *guard = Some(self.open_db()?);
            }
            match guard.as_ref() {
                Some(db) => f(db),
                None => Err(self.err("not open")),
            }
        }));
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                Err(StoreError::Corrupt { path: self.path.display().to_string(), detail: panic_text(&panic) })
            }
        };
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn open_db(&self) -> Result<Database, StoreError> {
        let db = Database::create(&self.path).map_err(|e| self.err(e))?;
        self.prepare(&db)?;
        Ok(db)
    }

    /// Checks the schema version, migrates an older file and creates missing tables.
    fn prepare(&self, db: &Database) -> Result<(), StoreError> {
        let version = self.schema_version(db)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.display().to_string(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        {
            if version == 1 {
                self.migrate_v1(&tx)?;
            }
            for t in [VMS, LEASES, REQUESTS, ENDED, POOLS] {
                tx.open_table(t).map_err(|e| self.err(e))?;
            }
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            meta.insert(SCHEMA_KEY, SCHEMA_VERSION).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        if version == 1 {
            tracing::info!(path = %self.path.display(), "state store migrated from schema version 1 to {SCHEMA_VERSION}");
        }
        Ok(())
    }

    /// The file's schema version: from `meta`, 1 for a file with tables but no `meta` (mpool
    /// before schema versions), or the current one for an empty file.
    fn schema_version(&self, db: &Database) -> Result<u64, StoreError> {
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let tables: Vec<String> = tx.list_tables().map_err(|e| self.err(e))?.map(|t| t.name().to_string()).collect();
        if tables.iter().any(|t| t == META.name()) {
            let meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let v = meta.get(SCHEMA_KEY).map_err(|e| self.err(e))?.map(|g| g.value());
            return v.ok_or_else(|| self.err("the meta table has no schema_version"));
        }
        Ok(if tables.is_empty() { SCHEMA_VERSION } else { 1 })
    }

    /// Version 1 -> 2: request ids move from `request_ids` (per pool, live leases only) to
    /// `requests` (per owner and pool, with what they were answered with).
    fn migrate_v1(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut records = Vec::new();
        {
            let leases = tx.open_table(LEASES).map_err(|e| self.err(e))?;
            for row in leases.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let l: LeaseRecord = decode(k.value(), v.value())?;
                if let Some(rid) = &l.request_id {
                    records.push(RequestRecord {
                        owner: l.owner.clone(),
                        pool: l.pool.clone(),
                        request_id: rid.clone(),
                        lease: l.id.clone(),
                        kind: RequestKind::Acquire,
                        ended_ms: None,
                        outcome: None,
                    });
                }
            }
        }
        let mut requests = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
        for r in &records {
            let key = r.key().store_key();
            requests.insert(key.as_str(), encode(&key, r)?.as_slice()).map_err(|e| self.err(e))?;
        }
        drop(requests);
        tx.delete_table(V1_REQUEST_IDS).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StateStore for Store {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let mut snap = Snapshot::default();
            let read = |def: TableDefinition<&str, &[u8]>| -> Result<Vec<(String, Vec<u8>)>, StoreError> {
                let t = tx.open_table(def).map_err(|e| self.err(e))?;
                let mut rows = Vec::new();
                for row in t.iter().map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    rows.push((k.value().to_string(), v.value().to_vec()));
                }
                Ok(rows)
            };
            for (k, v) in read(VMS)? {
                snap.vms.push(decode::<VmRecord>(&k, &v)?);
            }
            for (k, v) in read(LEASES)? {
                snap.leases.push(decode::<LeaseRecord>(&k, &v)?);
            }
            for (k, v) in read(REQUESTS)? {
                snap.requests.push(decode::<RequestRecord>(&k, &v)?);
            }
            for (k, v) in read(ENDED)? {
                snap.ended.push(decode::<EndedRecord>(&k, &v)?);
            }
            for (k, v) in read(POOLS)? {
                snap.pools.push(decode::<PoolRecord>(&k, &v)?);
            }
            Ok(snap)
        })
    }

    fn write(&self, batch: &[Write], durable: bool) -> Result<(), StoreError> {
        self.with_db(|db| {
            let mut tx = db.begin_write().map_err(|e| self.err(e))?;
            if !durable {
                tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
            }
            {
                let mut vms = tx.open_table(VMS).map_err(|e| self.err(e))?;
                let mut leases = tx.open_table(LEASES).map_err(|e| self.err(e))?;
                let mut requests = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
                let mut ended = tx.open_table(ENDED).map_err(|e| self.err(e))?;
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
                        }
                        Write::DeleteLease(id) => {
                            leases.remove(id.as_str()).map_err(|e| self.err(e))?;
                        }
                        Write::PutRequest(r) => {
                            let key = r.key().store_key();
                            requests.insert(key.as_str(), encode(&key, r)?.as_slice()).map_err(|e| self.err(e))?;
                        }
                        Write::DeleteRequest(k) => {
                            requests.remove(k.store_key().as_str()).map_err(|e| self.err(e))?;
                        }
                        Write::PutEnded(e) => {
                            ended.insert(e.id.as_str(), encode(&e.id, e)?.as_slice()).map_err(|err| self.err(err))?;
                        }
                        Write::DeleteEnded(id) => {
                            ended.remove(id.as_str()).map_err(|e| self.err(e))?;
                        }
                        Write::PutPool(p) => {
                            pools.insert(p.name.as_str(), encode(&p.name, p)?.as_slice()).map_err(|e| self.err(e))?;
                        }
                    }
                }
            }
            tx.commit().map_err(|e| self.err(e))
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "redb panicked on an inconsistent page".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PhaseRecord, RequestKey, RunOutcome};

    fn vm(name: &str, phase: PhaseRecord) -> VmRecord {
        VmRecord { name: name.into(), pool: "ci".into(), generation: 1, phase, uses: 0, lease: None, created_ms: 1 }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
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
            owner: "alice".into(),
        };
        let request = RequestRecord {
            owner: "alice".into(),
            pool: "ci".into(),
            request_id: "r1".into(),
            lease: "l1".into(),
            kind: RequestKind::Run,
            ended_ms: Some(5),
            outcome: Some(RunOutcome { code: Some(3), vm: "mpool-ci-a".into(), ..Default::default() }),
        };
        {
            let s = Store::open(&path).unwrap();
            s.write(
                &[
                    Write::PutVm(vm("mpool-ci-a", PhaseRecord::Leased)),
                    Write::PutLease(lease.clone()),
                    Write::PutRequest(request.clone()),
                    Write::PutEnded(EndedRecord {
                        id: "l0".into(),
                        reason: "released".into(),
                        at_ms: 4,
                        owner: String::new(),
                    }),
                ],
                true,
            )
            .unwrap();
            s.write(&[Write::PutVm(vm("mpool-ci-b", PhaseRecord::Warm))], false).unwrap();
            s.write(
                &[Write::PutPool(PoolRecord { name: "ci".into(), generation: 3, key: "k".into(), since_ms: 0 })],
                true,
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.vms.len(), 2);
        assert_eq!(snap.leases, vec![lease]);
        assert_eq!(snap.requests, vec![request.clone()]);
        assert_eq!(snap.ended.len(), 1);
        assert_eq!(snap.pools[0].generation, 3);
        let key = RequestKey { owner: "alice".into(), pool: "ci".into(), request_id: "r1".into() };
        s.write(
            &[
                Write::DeleteLease("l1".into()),
                Write::DeleteVm("mpool-ci-a".into()),
                Write::DeleteRequest(key),
                Write::DeleteEnded("l0".into()),
            ],
            true,
        )
        .unwrap();
        let snap = s.load().unwrap();
        assert!(snap.leases.is_empty() && snap.requests.is_empty() && snap.ended.is_empty());
        assert_eq!(snap.vms.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_redb_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.redb");
        std::fs::write(&path, b"this is not a redb file at all, not even close............").unwrap();
        let err = Store::open(&path).err().expect("refused");
        assert!(err.to_string().contains("bad.redb"), "{err}");
    }

    /// Finding 9 of the reliability issue: a damaged B-tree page made redb panic inside
    /// `mpool serve` (exit 101). Every offset here made redb 4.6 panic before `catch_unwind`.
    #[test]
    fn a_corrupt_btree_is_a_clear_error_not_a_panic() {
        let good = std::fs::read(fixture("store-v1.redb")).unwrap();
        for offset in [4096usize, 8192, 16384, 20480] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("damaged.redb");
            let mut bytes = good.clone();
            for b in &mut bytes[offset..offset + 64] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, &bytes).unwrap();
            let result = Store::open(&path).and_then(|s| s.load());
            let err = result.expect_err("a damaged file must not load");
            assert!(matches!(err, StoreError::Corrupt { .. }), "offset {offset}: {err}");
            assert!(err.to_string().contains("damaged.redb") && err.to_string().contains("move it aside"), "{err}");
        }
    }

    /// Finding 7: a store written by the previous release (schema 1, no `meta` table, request
    /// ids per pool) opens and migrates; its leases and request ids are all there, now keyed
    /// by owner.
    #[test]
    fn a_schema_1_store_from_the_previous_release_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        std::fs::copy(fixture("store-v1.redb"), &path).unwrap();
        let s = Store::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.vms.len(), 4);
        assert_eq!(snap.leases.len(), 2);
        assert_eq!(
            snap.pools,
            vec![PoolRecord { name: "ci".into(), generation: 2, key: "fixture-key".into(), since_ms: 0 }]
        );
        assert_eq!(
            snap.requests,
            vec![RequestRecord {
                owner: "alice".into(),
                pool: "ci".into(),
                request_id: "task-1-attempt-1".into(),
                lease: "lease-alice1".into(),
                kind: RequestKind::Acquire,
                ended_ms: None,
                outcome: None,
            }]
        );
        drop(s);
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        assert_eq!(tx.open_table(META).unwrap().get(SCHEMA_KEY).unwrap().map(|g| g.value()), Some(SCHEMA_VERSION));
        assert!(tx.open_table(V1_REQUEST_IDS).is_err(), "the old table is gone");
    }

    #[test]
    fn a_store_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert(SCHEMA_KEY, SCHEMA_VERSION + 1).unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path).err().expect("refused");
        assert!(
            matches!(err, StoreError::TooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
