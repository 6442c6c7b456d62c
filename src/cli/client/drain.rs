//! `mpool drain [--undo] [--wait]`: drains the host (it refuses new leases, so clients with
//! several endpoints go elsewhere, and lets its leases finish) or takes it back into service;
//! prints the host's state, e.g. `host mp-1: draining, 2 leases left` or `host mp-1: draining,
//! empty`. `--wait` then waits until the host is empty (for `mpool drain --wait && systemctl
//! stop mpool`). Admins only.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool drain` flags.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Take the host back into service.
    #[arg(long)]
    undo: bool,
    /// Then wait until no lease is left (asking every second; the host stays draining).
    #[arg(long, conflicts_with = "undo")]
    wait: bool,
}

/// How often `--wait` checks.
const EVERY: Duration = Duration::from_secs(1);

/// The state as one line.
fn line(s: &v1::DrainResponse) -> String {
    match (s.draining, s.leases) {
        (false, n) => format!("host {}: in service, {n} lease{}", s.host, plural(n)),
        (true, 0) => format!("host {}: draining, empty", s.host),
        (true, n) => format!("host {}: draining, {n} lease{} left", s.host, plural(n)),
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Runs `mpool drain`.
pub async fn run(client: &mut Client, a: DrainArgs) -> Result<ExitCode, String> {
    let mut state = client.drain(v1::DrainRequest { drain: !a.undo }).await.map_err(status_err)?.into_inner();
    output::line(&line(&state));
    while a.wait && !state.empty {
        tokio::time::sleep(EVERY).await;
        // Draining a draining host changes nothing and answers its state.
        let next = client.drain(v1::DrainRequest { drain: true }).await.map_err(status_err)?.into_inner();
        if next.leases != state.leases || next.empty {
            output::line(&line(&next));
        }
        state = next;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_as_a_sentence() {
        let s = |draining, leases| v1::DrainResponse {
            host: "mp-1".into(),
            draining,
            leases,
            empty: draining && leases == 0,
        };
        assert_eq!(line(&s(true, 2)), "host mp-1: draining, 2 leases left");
        assert_eq!(line(&s(true, 1)), "host mp-1: draining, 1 lease left");
        assert_eq!(line(&s(true, 0)), "host mp-1: draining, empty");
        assert_eq!(line(&s(false, 3)), "host mp-1: in service, 3 leases");
    }
}
