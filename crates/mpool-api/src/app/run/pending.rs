//! A Run's acquire, on its own task: the Run owns its lease, so if its caller goes away while
//! the VM is being acquired, the lease that arrives is released at once instead of idling until
//! its TTL.

use mpool_engine::{AcquireRequest, Engine, EngineError, LeaseInfo};
use tokio::task::JoinHandle;

/// A Run's acquire in flight. Dropped before [`PendingAcquire::wait`] returned (the caller went
/// away), it releases the lease when one arrives.
pub struct PendingAcquire {
    handle: Option<JoinHandle<Result<LeaseInfo, EngineError>>>,
    engine: Engine,
    owner: Option<String>,
}

impl PendingAcquire {
    /// Starts acquiring; `owner` is the one a later release is checked against.
    pub fn start(engine: &Engine, req: AcquireRequest, owner: Option<String>) -> PendingAcquire {
        let handle = tokio::spawn({
            let engine = engine.clone();
            async move { engine.acquire(req).await }
        });
        PendingAcquire { handle: Some(handle), engine: engine.clone(), owner }
    }

    /// The lease, or why there is none.
    pub async fn wait(&mut self) -> Result<LeaseInfo, EngineError> {
        let Some(handle) = self.handle.as_mut() else {
            return Err(EngineError::Unavailable("the acquire was already taken".into()));
        };
        let result = handle.await;
        self.handle = None;
        result.unwrap_or_else(|e| Err(EngineError::Unavailable(format!("the acquire failed: {e}"))))
    }
}

impl Drop for PendingAcquire {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let (engine, owner) = (self.engine.clone(), self.owner.take());
        tokio::spawn(async move {
            if let Ok(Ok(lease)) = handle.await
                && let Err(e) = engine.release(&lease.record.id, owner).await
            {
                tracing::warn!(lease = %lease.record.id, "releasing the lease of a Run whose caller went away: {e}");
            }
        });
    }
}
