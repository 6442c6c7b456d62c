//! A lease in use: an exec or a transfer marks its lease in use for as long as it runs (the
//! lease cannot expire under it), and reaches the VM at the lease's SSH endpoint, asking the
//! daemon again when the endpoint moved (a daemon restart).

use mpool_engine::{Engine, LeaseInfo};
use mpool_ssh::SshEndpoint;

use super::error::AppError;
use super::{App, scope, validate};
use crate::auth::Principal;

/// Ends a lease use when dropped (the use case ended, or its caller went away).
pub struct InUse {
    engine: Engine,
    lease: String,
}

impl InUse {
    /// The guard of a use already begun with [`Engine::begin_use`].
    pub fn new(engine: Engine, lease: String) -> InUse {
        InUse { engine, lease }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let (engine, lease) = (self.engine.clone(), std::mem::take(&mut self.lease));
        tokio::spawn(async move { engine.end_use(&lease).await });
    }
}

impl App {
    /// A lease in use (it will not expire until the returned guard drops) and its SSH target.
    pub(crate) async fn use_lease(
        &self,
        lease_id: &str,
        p: Option<&Principal>,
    ) -> Result<(LeaseInfo, SshEndpoint, InUse), AppError> {
        validate::required("lease_id", lease_id)?;
        let info = self.engine.begin_use(lease_id, scope::owner(p)).await?;
        let guard = InUse { engine: self.engine.clone(), lease: lease_id.to_string() };
        let Some(ssh) = info.ssh.as_ref() else {
            return Err(AppError::unavailable(format!(
                "the SSH endpoint of {} is not known yet (mpool restarted moments ago); retry shortly",
                info.record.vm
            )));
        };
        let target = ssh.clone();
        Ok((info, target, guard))
    }

    /// The lease's SSH endpoint read from the daemon again, when it differs from `old` (the
    /// pooled connection to the old one is dropped); `None` when it did not move or cannot be
    /// read.
    pub(crate) async fn refreshed_target(&self, info: &LeaseInfo, old: &SshEndpoint) -> Option<SshEndpoint> {
        let owner = (!info.record.owner.is_empty()).then(|| info.record.owner.clone());
        let fresh = self.engine.refresh(&info.record.id, owner).await.ok()?;
        let target = fresh.ssh?;
        if target.host == old.host && target.port == old.port {
            return None;
        }
        tracing::info!(vm = %info.record.vm, "the VM's SSH endpoint moved to {}:{}", target.host, target.port);
        self.ssh.close(&info.record.vm).await;
        Some(target)
    }
}
