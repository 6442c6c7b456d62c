//! The lease book: live leases, request ids and what they were answered with, and the leases
//! that ended. Plain data and rules, no I/O: every change returns the store writes that make it
//! durable, and the engine stores them before anyone hears of the change.
//!
//! Request ids are scoped by owner and pool ([`RequestKey`]): the same text sent by two owners
//! is two requests, so one owner can never join, see or end another's request. A request id is
//! remembered while its lease lives and for the last [`REQUEST_MEMORY`] ended ones after (with a
//! Run's outcome), across restarts.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use std::time::Instant;

use crate::store::{EndedRecord, LeaseRecord, RequestKey, RequestKind, RequestRecord, RunOutcome, Snapshot, Write};

use super::error::EngineError;
use crate::types::SshEndpoint;

/// How an acquire was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// A running VM: no daemon call.
    Hot,
    /// A suspended VM: one resume.
    Warm,
    /// No idle VM: the caller waited for one to be created or reset.
    Cold,
    /// The same request id was seen before: the same lease again.
    Repeat,
}

/// A granted lease.
#[derive(Clone, Debug)]
pub struct LeaseInfo {
    /// The stored record.
    pub record: LeaseRecord,
    /// How to reach the VM.
    pub ssh: Option<SshEndpoint>,
    /// How it was served.
    pub served: Served,
    /// How long the acquire took inside the engine.
    pub waited: Duration,
}

/// An acquire.
#[derive(Clone, Debug, Default)]
pub struct AcquireRequest {
    /// Pool name.
    pub pool: String,
    /// Who holds the lease (free text, e.g. a task run id).
    pub holder: String,
    /// Idempotency key: the same key (from the same owner, in the same pool) returns the same
    /// lease while it lives.
    pub request_id: Option<String>,
    /// Lease time to live (default: the pool's `default_ttl`).
    pub ttl: Option<Duration>,
    /// How long to wait for a VM (default: the pool's `max_wait`; zero: do not wait).
    pub wait: Option<Duration>,
    /// The principal (token name); leases are only visible to their owner when set.
    pub owner: Option<String>,
    /// An Acquire or a Run: a Run's request id is never joined by a retry while it runs.
    pub kind: RequestKind,
}

impl AcquireRequest {
    /// The key of its request id (owner, pool, id), if it has one.
    pub fn key(&self) -> Option<RequestKey> {
        self.request_id.as_ref().map(|rid| RequestKey {
            owner: self.owner.clone().unwrap_or_default(),
            pool: self.pool.clone(),
            request_id: rid.clone(),
        })
    }
}

/// The longest request id accepted, in bytes.
pub const MAX_REQUEST_ID: usize = 256;

/// How many ended leases are remembered (so a late release or exec says "ended", not "unknown").
pub const ENDED_MEMORY: usize = 10_000;

/// How many request ids of ended leases are remembered (so a retry gets the same answer).
pub const REQUEST_MEMORY: usize = 10_000;

/// A live lease.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The stored record.
    pub record: LeaseRecord,
    /// When it expires (unless in use).
    pub deadline: Instant,
    /// Execs and transfers running under it: it does not expire while any runs.
    pub in_use: u32,
}

impl Lease {
    /// The key of its request id, if it has one.
    pub fn request_key(&self) -> Option<RequestKey> {
        self.record.request_id.as_ref().map(|rid| RequestKey {
            owner: self.record.owner.clone(),
            pool: self.record.pool.clone(),
            request_id: rid.clone(),
        })
    }
}

/// The book.
#[derive(Default)]
pub struct LeaseBook {
    leases: HashMap<String, Lease>,
    requests: HashMap<RequestKey, RequestRecord>,
    /// Request ids whose lease ended, oldest first (the first to be forgotten).
    ended_requests: VecDeque<RequestKey>,
    ended: HashMap<String, EndedRecord>,
    /// Ended leases, oldest first.
    ended_order: VecDeque<String>,
}

impl LeaseBook {
    /// A book holding what a store snapshot remembers: `live` are the leases reconciliation
    /// kept (with their deadlines); request ids of leases that are neither live nor ended are
    /// dropped (returned as writes).
    pub fn restore(live: Vec<(LeaseRecord, Instant)>, snapshot: &Snapshot) -> (LeaseBook, Vec<Write>) {
        let mut book = LeaseBook::default();
        let mut writes = Vec::new();
        for (record, deadline) in live {
            book.leases.insert(record.id.clone(), Lease { record, deadline, in_use: 0 });
        }
        let mut ended: Vec<&EndedRecord> = snapshot.ended.iter().collect();
        ended.sort_by_key(|e| (e.at_ms, e.id.clone()));
        for e in ended {
            book.ended.insert(e.id.clone(), e.clone());
            book.ended_order.push_back(e.id.clone());
        }
        let mut requests: Vec<&RequestRecord> = snapshot.requests.iter().collect();
        requests.sort_by_key(|r| (r.ended_ms, r.key()));
        for r in requests {
            let mut r = r.clone();
            if r.ended_ms.is_none() && !book.leases.contains_key(&r.lease) {
                // Its lease ended while mpool was down (or never was granted): it is over.
                r.ended_ms = Some(book.ended.get(&r.lease).map(|e| e.at_ms).unwrap_or(0));
                writes.push(Write::PutRequest(r.clone()));
            }
            if r.ended_ms.is_some() {
                book.ended_requests.push_back(r.key());
            }
            book.requests.insert(r.key(), r);
        }
        writes.extend(book.evict());
        (book, writes)
    }

    /// A live lease, checked against the caller's principal (`None`: any).
    pub fn check(&self, id: &str, owner: Option<&str>) -> Result<&Lease, EngineError> {
        let Some(l) = self.leases.get(id) else {
            return Err(match self.ended.get(id) {
                Some(e) if owner.is_none_or(|o| o == e.owner) => {
                    EngineError::LeaseEnded { id: id.into(), reason: e.reason.clone() }
                }
                _ => EngineError::UnknownLease(id.into()),
            });
        };
        if let Some(o) = owner
            && l.record.owner != o
        {
            return Err(EngineError::NotOwner(id.into()));
        }
        Ok(l)
    }

    /// A live lease by id.
    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// What a request id was answered with.
    pub fn request(&self, key: &RequestKey) -> Option<&RequestRecord> {
        self.requests.get(key)
    }

    /// Live leases.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Number of live leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// No live lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Records a granted lease (and its request id).
    pub fn grant(&mut self, record: LeaseRecord, deadline: Instant, kind: RequestKind) -> Vec<Write> {
        let mut writes = vec![Write::PutLease(record.clone())];
        let lease = Lease { record, deadline, in_use: 0 };
        if let Some(key) = lease.request_key() {
            let r = RequestRecord {
                owner: key.owner.clone(),
                pool: key.pool.clone(),
                request_id: key.request_id.clone(),
                lease: lease.record.id.clone(),
                kind,
                ended_ms: None,
                outcome: None,
            };
            writes.push(Write::PutRequest(r.clone()));
            self.requests.insert(key, r);
        }
        self.leases.insert(lease.record.id.clone(), lease);
        writes
    }

    /// Extends a lease to `ttl` from now.
    pub fn renew(&mut self, id: &str, ttl: Duration, now: Instant, now_ms: u64) -> Option<Vec<Write>> {
        let l = self.leases.get_mut(id)?;
        l.deadline = now + ttl;
        l.record.expires_ms = now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        Some(vec![Write::PutLease(l.record.clone())])
    }

    /// Records the outcome of the Run a live lease was granted for, before the lease ends (its
    /// command ended while nobody followed it): kept when the lease expires, replaced by the
    /// outcome a release brings. `None` when the lease is not live or not a Run's.
    pub fn note_outcome(&mut self, id: &str, outcome: RunOutcome) -> Option<Vec<Write>> {
        let key = self.leases.get(id)?.request_key()?;
        let r = self.requests.get_mut(&key).filter(|r| r.lease == id && r.kind == RequestKind::Run)?;
        r.outcome = Some(outcome);
        Some(vec![Write::PutRequest(r.clone())])
    }

    /// Marks a lease in use (true) or no longer (false).
    pub fn set_in_use(&mut self, id: &str, more: bool) {
        if let Some(l) = self.leases.get_mut(id) {
            l.in_use = if more { l.in_use.saturating_add(1) } else { l.in_use.saturating_sub(1) };
        }
    }

    /// Ends a lease: remembers it as ended (with a Run's outcome on its request id). Returns the
    /// lease and the writes, or `None` when it is not live.
    pub fn end(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: u64,
        outcome: Option<RunOutcome>,
    ) -> Option<(Lease, Vec<Write>)> {
        let lease = self.leases.remove(id)?;
        let writes = self.finish(&lease, reason, now_ms, outcome);
        Some((lease, writes))
    }

    /// Ends a stored lease that was not restored as live (it expired, or its VM went, while
    /// mpool was down).
    pub fn end_stored(&mut self, record: &LeaseRecord, reason: &str, now_ms: u64) -> Vec<Write> {
        self.leases.remove(&record.id);
        let lease = Lease { record: record.clone(), deadline: Instant::now(), in_use: 0 };
        self.finish(&lease, reason, now_ms, None)
    }

    fn finish(&mut self, lease: &Lease, reason: &str, now_ms: u64, outcome: Option<RunOutcome>) -> Vec<Write> {
        let id = lease.record.id.clone();
        let mut writes = vec![Write::DeleteLease(id.clone())];
        let tomb = EndedRecord {
            id: id.clone(),
            reason: reason.to_string(),
            at_ms: now_ms,
            owner: lease.record.owner.clone(),
        };
        writes.push(Write::PutEnded(tomb.clone()));
        self.ended.insert(id.clone(), tomb);
        self.ended_order.push_back(id.clone());
        if let Some(key) = lease.request_key()
            && let Some(r) = self.requests.get_mut(&key)
            && r.lease == id
        {
            if r.ended_ms.is_none() {
                self.ended_requests.push_back(key);
            }
            r.ended_ms = Some(now_ms);
            if outcome.is_some() {
                r.outcome = outcome;
            }
            writes.push(Write::PutRequest(r.clone()));
        }
        writes.extend(self.evict());
        writes
    }

    /// Forgets the oldest ended leases and request ids beyond the memory limits.
    fn evict(&mut self) -> Vec<Write> {
        let mut writes = Vec::new();
        while self.ended_order.len() > ENDED_MEMORY {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
                writes.push(Write::DeleteEnded(old));
            }
        }
        while self.ended_requests.len() > REQUEST_MEMORY {
            if let Some(old) = self.ended_requests.pop_front() {
                self.requests.remove(&old);
                writes.push(Write::DeleteRequest(old));
            }
        }
        writes
    }

    /// Leases past their deadline and not in use.
    pub fn expired(&self, now: Instant) -> Vec<String> {
        let mut ids: Vec<String> =
            self.leases.values().filter(|l| l.in_use == 0 && l.deadline <= now).map(|l| l.record.id.clone()).collect();
        ids.sort();
        ids
    }

    /// The earliest deadline of a lease not in use.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().filter(|l| l.in_use == 0).map(|l| l.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, owner: &str, rid: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            pool: "ci".into(),
            vm: format!("vm-{id}"),
            holder: "h".into(),
            request_id: rid.map(Into::into),
            granted_ms: 0,
            expires_ms: 10,
            owner: owner.into(),
        }
    }

    fn key(owner: &str, rid: &str) -> RequestKey {
        RequestKey { owner: owner.into(), pool: "ci".into(), request_id: rid.into() }
    }

    #[test]
    fn request_ids_are_scoped_by_owner() {
        let mut b = LeaseBook::default();
        let now = Instant::now();
        b.grant(rec("l1", "alice", Some("r")), now, RequestKind::Acquire);
        assert_eq!(b.request(&key("alice", "r")).map(|r| r.lease.as_str()), Some("l1"));
        assert!(b.request(&key("bob", "r")).is_none(), "bob's r is another request");
    }

    #[test]
    fn an_ended_lease_keeps_its_request_and_outcome_and_is_remembered_for_its_owner() {
        let mut b = LeaseBook::default();
        let now = Instant::now();
        b.grant(rec("l1", "alice", Some("r")), now, RequestKind::Run);
        let outcome = RunOutcome { code: Some(7), ..Default::default() };
        let (_, writes) = b.end("l1", "released", 5, Some(outcome.clone())).unwrap();
        assert!(writes.contains(&Write::DeleteLease("l1".into())));
        let r = b.request(&key("alice", "r")).unwrap();
        assert_eq!((r.ended_ms, r.outcome.as_ref()), (Some(5), Some(&outcome)));
        assert!(matches!(b.check("l1", Some("alice")), Err(EngineError::LeaseEnded { .. })));
        assert!(matches!(b.check("l1", Some("bob")), Err(EngineError::UnknownLease(_))), "no hint to other owners");
        assert!(b.end("l1", "again", 6, None).is_none());
    }

    #[test]
    fn a_noted_outcome_outlives_the_expiry_and_a_release_replaces_it() {
        let mut b = LeaseBook::default();
        let now = Instant::now();
        let noted = RunOutcome { code: Some(4), ..Default::default() };
        b.grant(rec("l1", "alice", Some("r")), now, RequestKind::Run);
        let writes = b.note_outcome("l1", noted.clone()).expect("a Run's live lease");
        assert!(matches!(&writes[..], [Write::PutRequest(r)] if r.outcome.as_ref() == Some(&noted)), "written at once");
        b.end("l1", "expired", 9, None).unwrap();
        assert_eq!(b.request(&key("alice", "r")).and_then(|r| r.outcome.clone()), Some(noted.clone()));
        assert!(b.note_outcome("l1", noted.clone()).is_none(), "not on an ended lease");

        b.grant(rec("l2", "alice", Some("r2")), now, RequestKind::Run);
        b.note_outcome("l2", noted.clone()).unwrap();
        let released = RunOutcome { code: Some(0), ..Default::default() };
        b.end("l2", "released", 9, Some(released.clone())).unwrap();
        assert_eq!(b.request(&key("alice", "r2")).and_then(|r| r.outcome.clone()), Some(released));

        b.grant(rec("l3", "alice", Some("r3")), now, RequestKind::Acquire);
        assert!(b.note_outcome("l3", noted).is_none(), "an Acquire's lease has no Run outcome");
    }

    #[test]
    fn memory_is_bounded_and_forgetting_is_written() {
        let mut b = LeaseBook::default();
        let now = Instant::now();
        let mut deletes = 0;
        for i in 0..(REQUEST_MEMORY + 5) {
            let id = format!("l{i}");
            b.grant(rec(&id, "", Some(&format!("r{i}"))), now, RequestKind::Acquire);
            let (_, w) = b.end(&id, "released", i as u64, None).unwrap();
            deletes += w.iter().filter(|w| matches!(w, Write::DeleteRequest(_))).count();
        }
        assert_eq!(deletes, 5);
        assert!(b.request(&key("", "r0")).is_none() && b.request(&key("", "r5")).is_some());
        assert_eq!(b.ended.len(), ENDED_MEMORY.min(REQUEST_MEMORY + 5));
    }

    #[test]
    fn restore_ends_requests_whose_lease_is_gone() {
        let snap = Snapshot {
            requests: vec![RequestRecord {
                owner: "a".into(),
                pool: "ci".into(),
                request_id: "r".into(),
                lease: "gone".into(),
                kind: RequestKind::Acquire,
                ended_ms: None,
                outcome: None,
            }],
            ..Default::default()
        };
        let (b, writes) = LeaseBook::restore(vec![], &snap);
        assert_eq!(b.request(&key("a", "r")).and_then(|r| r.ended_ms), Some(0));
        assert_eq!(writes.len(), 1);
    }
}
