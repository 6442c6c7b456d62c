//! The engine's SSH port over the pooled connections of a [`ConnectionCache`].

use std::sync::Arc;
use std::time::Duration;

use mpool_core::ports::{BoxFut, SshPort, StepError};
use mpool_core::types::SshEndpoint;

use crate::ConnectionCache;

/// The SSH port over the pooled connections of [`ConnectionCache`], keyed by VM
/// name: the connection a readiness check opens is the one the lease's commands then use.
pub struct SshAdapter {
    cache: Arc<ConnectionCache>,
}

impl SshAdapter {
    /// Wraps the cache.
    pub fn new(cache: Arc<ConnectionCache>) -> SshAdapter {
        SshAdapter { cache }
    }
}

impl SshPort for SshAdapter {
    fn ready(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let out = self
                .cache
                .run(&vm, &info, crate::ExecRequest::argv(["true"]))
                .await
                .map_err(|e| StepError::failed(format!("{vm} does not answer over SSH: {e}")))?;
            out.check().map_err(|e| StepError::failed(format!("{vm} readiness check: {e}")))
        })
    }

    fn alive(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            match self.cache.ping(&vm, Duration::from_secs(5)).await {
                Some(Ok(())) => Ok(()),
                // No open connection, or it failed: reconnect and run `true`.
                Some(Err(_)) | None => self.ready(vm, info).await,
            }
        })
    }

    fn run_script(&self, vm: String, info: SshEndpoint, script: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(async move {
            let req = crate::ExecRequest::script(crate::ScriptShell::Bash, script);
            let out =
                self.cache.run(&vm, &info, req).await.map_err(|e| StepError::failed(format!("setup of {vm}: {e}")))?;
            if out.success() {
                return Ok(());
            }
            let tail: String =
                out.stderr_text().chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            Err(StepError::failed(format!(
                "setup of {vm} failed ({}): {tail}",
                out.check().err().map(|e| e.to_string()).unwrap_or_default()
            )))
        })
    }

    fn output(&self, vm: String, info: SshEndpoint, script: String) -> BoxFut<'_, Result<String, StepError>> {
        Box::pin(async move {
            let req = crate::ExecRequest::script(crate::ScriptShell::Bash, script);
            let out = self.cache.run(&vm, &info, req).await.map_err(|e| StepError::failed(format!("{vm}: {e}")))?;
            out.check().map_err(|e| StepError::failed(format!("{vm}: {e}")))?;
            Ok(out.stdout_text())
        })
    }

    fn disk_used(&self, vm: String, info: SshEndpoint) -> BoxFut<'_, Result<u64, StepError>> {
        Box::pin(async move {
            let script = "df -B1 --output=used / | tail -n 1\n".to_string();
            let text = self
                .output(vm.clone(), info, script)
                .await
                .map_err(|e| StepError::failed(format!("df in {}", e.message)))?;
            text.trim()
                .parse::<u64>()
                .map_err(|_| StepError::failed(format!("df in {vm} did not report its usage: {}", text.trim())))
        })
    }

    fn forget(&self, vm: String) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.cache.close(&vm).await;
        })
    }
}
