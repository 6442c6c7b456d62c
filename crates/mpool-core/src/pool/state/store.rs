//! The store failed: forget memory as a crash would, answer with its error, probe until it works.

use super::{Batch, Degraded, Effect, EngineState, Env};
use crate::pool::error::EngineError;
use crate::pool::leases::LeaseBook;
use crate::pool::vm::VmState;
use crate::store::{PoolRecord, Snapshot, Write};

impl EngineState {
    /// The batch's write failed: nothing of it happened as far as anyone outside knows. The
    /// actor fails the batch's replies and drops its other effects; here the engine forgets its
    /// memory (as a crash would), marks what the batch and the work in flight touched as in
    /// doubt, and answers everyone else waiting with the store's error. The returned effects
    /// happen at once (no write precedes them); the actor also aborts all work in flight.
    pub fn store_failed(&mut self, env: &Env<'_>, cause: String, writes: &[Write]) -> Vec<Effect> {
        tracing::error!(
            "state store write failed: {cause}; failing this batch's requests, starting none of its daemon calls, \
             and retrying the store"
        );
        let err = EngineError::StoreUnavailable(cause.clone());
        self.doubt.extend(writes.iter().filter_map(|w| w.vm()).map(str::to_string));
        self.doubt.extend(self.vms.values().filter(|v| v.busy || v.state == VmState::Waking).map(|v| v.name.clone()));
        let mut out = Vec::new();
        for p in self.pools.values_mut() {
            for w in p.waiters.drain(..) {
                out.extend(w.callers.into_iter().map(|caller| Effect::Reply { caller, answer: Err(err.clone()) }));
            }
            p.golden = None;
        }
        for (_, w) in self.waking.drain() {
            out.extend(w.callers.into_iter().map(|caller| Effect::Reply { caller, answer: Err(err.clone()) }));
        }
        for (_, waiting) in self.refreshing.drain() {
            out.extend(waiting.into_iter().map(|(caller, _)| Effect::Reply { caller, answer: Err(err.clone()) }));
        }
        self.vms.clear();
        self.book = LeaseBook::default();
        self.reconciled = false;
        self.store_snapshot = None;
        self.batch = Batch::default();
        let backoff = self.settings.store_retry;
        self.degraded = Some(Degraded { cause, retry_at: env.now + backoff, backoff, probing: false });
        out
    }

    /// Probes a failed store (a real durable write, then a read) when its retry is due.
    pub(super) fn retry_store(&mut self, env: &Env<'_>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        if d.probing || env.now < d.retry_at {
            return;
        }
        d.probing = true;
        let probe: Vec<Write> = self
            .pools
            .values()
            .map(|p| {
                Write::PutPool(PoolRecord {
                    name: p.cfg.name.clone(),
                    generation: p.generation,
                    key: p.cfg.generation_key(),
                    since_ms: self.generation_since.get(&p.cfg.name).copied().unwrap_or(0),
                })
            })
            .collect();
        self.batch.effects.push(Effect::ProbeStore(probe));
    }

    pub(super) fn store_probed(&mut self, env: &Env<'_>, result: Result<Snapshot, String>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        d.probing = false;
        match result {
            Ok(snapshot) => {
                tracing::info!("state store takes writes again; reconciling with multipassd");
                self.degraded = None;
                self.store_snapshot = Some(snapshot);
                self.reconcile_after = Some(env.now);
                self.reconciled = false;
                self.batch.effects.push(Effect::Observe);
            }
            Err(e) => {
                d.backoff = (d.backoff * 2).min(self.settings.store_retry_max);
                d.retry_at = env.now + d.backoff;
                d.cause = e;
                tracing::warn!(retry_in = ?d.backoff, "state store still fails: {}", d.cause);
            }
        }
    }
}
