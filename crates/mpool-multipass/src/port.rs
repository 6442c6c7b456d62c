//! The engine's daemon port over a real [`Client`]: quick calls and blocking calls get their
//! own deadlines, and every call's latency and failures go to the metrics.

use std::future::Future;
use std::time::Duration;

use mpool_core::ports::{BoxFut, DaemonPort, Observed, StepError};
use mpool_core::types::{LaunchOptions, SshEndpoint};

use crate::{Client, Names};

/// A client error as the engine sees a failed step.
impl From<crate::Error> for StepError {
    fn from(e: crate::Error) -> StepError {
        StepError {
            unavailable: e.is_unavailable(),
            not_found: e.code() == tonic::Code::NotFound,
            message: e.to_string(),
        }
    }
}

/// The daemon port over a real `multipass::Client`: quick calls and blocking calls get their
/// own deadlines.
pub struct MultipassPort {
    quick: Client,
    slow: Client,
    metrics: mpool_metrics::Metrics,
}

impl MultipassPort {
    /// Wraps a connected client.
    pub fn new(client: Client, quick: Duration, slow: Duration) -> MultipassPort {
        MultipassPort {
            quick: client.with_timeout(quick),
            slow: client.with_timeout(slow),
            metrics: mpool_metrics::Metrics::default(),
        }
    }

    /// Records each call's latency and failures into `metrics`.
    pub fn with_metrics(self, metrics: mpool_metrics::Metrics) -> MultipassPort {
        MultipassPort { metrics, ..self }
    }

    /// Runs one daemon call, timing it.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        let t = std::time::Instant::now();
        let r = fut.await;
        self.metrics.daemon_call(op, t.elapsed(), r.is_err());
        r
    }
}

impl DaemonPort for MultipassPort {
    fn ping(&self) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("ping", async move { Ok(self.quick.ping().await?) }))
    }

    fn list(&self) -> BoxFut<'_, Result<Vec<Observed>, StepError>> {
        Box::pin(self.timed("list", async move {
            Ok(self.quick.list().await?.into_iter().map(|i| Observed { name: i.name, state: i.state }).collect())
        }))
    }

    fn snapshots(&self) -> BoxFut<'_, Result<Vec<(String, String)>, StepError>> {
        Box::pin(self.timed("snapshots", async move {
            Ok(self.quick.list_snapshots().await?.into_iter().map(|s| (s.instance, s.name)).collect())
        }))
    }

    fn launch(&self, opts: LaunchOptions) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("launch", async move {
            self.slow.launch(&opts).await?;
            Ok(())
        }))
    }

    fn start(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("start", async move { Ok(self.slow.start(&Names::one(name), 0).await?) }))
    }

    fn stop(&self, name: String, force: bool) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("stop", async move { Ok(self.slow.stop(&Names::one(name), force).await?) }))
    }

    fn suspend(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("suspend", async move { Ok(self.slow.suspend(&Names::one(name)).await?) }))
    }

    fn snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("snapshot", async move {
            self.slow.snapshot(&name, Some(&snapshot), "mpool clean state").await?;
            Ok(())
        }))
    }

    fn restore(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("restore", async move { Ok(self.slow.restore(&name, &snapshot, true).await?) }))
    }

    fn clone_vm(&self, source: String, destination: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("clone", async move { Ok(self.slow.clone_instance(&source, &destination).await?) }))
    }

    fn delete(&self, name: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("delete", async move {
            match self.slow.delete(&Names::one(name), true).await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        }))
    }

    fn delete_snapshot(&self, name: String, snapshot: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("delete_snapshot", async move {
            match self.slow.delete_snapshot(&name, &snapshot).await {
                Ok(()) => Ok(()),
                Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        }))
    }

    fn ssh_info(&self, name: String) -> BoxFut<'_, Result<SshEndpoint, StepError>> {
        Box::pin(self.timed("ssh_info", async move { Ok(self.quick.ssh_info(&name).await?) }))
    }

    fn set_instance(&self, key: String, value: String) -> BoxFut<'_, Result<(), StepError>> {
        Box::pin(self.timed("set", async move { Ok(self.slow.set(&key, &value).await?) }))
    }
}
