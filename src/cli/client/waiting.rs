//! "waiting for a VM from pool P... 3s" on a terminal while `acquire` or `run` waits for a VM.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::cli::output;

/// Shows "waiting for a VM" on a terminal until dropped (nothing when stderr is not one).
pub struct Waiting(Option<tokio::task::JoinHandle<()>>);

impl Waiting {
    /// Starts showing the wait for a VM from `pool`.
    pub fn start(pool: &str) -> Waiting {
        if !std::io::stderr().is_terminal() {
            return Waiting(None);
        }
        let pool = pool.to_string();
        Waiting(Some(tokio::spawn(async move {
            let t = Instant::now();
            let frames = ['|', '/', '-', '\\'];
            for i in 0.. {
                output::err_text(&format!(
                    "\r{} waiting for a VM from pool {pool}... {:.0}s ",
                    frames[i % 4],
                    t.elapsed().as_secs_f64()
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            output::err_text("\r\x1b[K");
        }
    }
}
