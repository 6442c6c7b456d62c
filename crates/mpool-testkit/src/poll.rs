//! Deadline polling: look at a condition every few milliseconds until it holds or time runs out,
//! and then say what was awaited.
//!
//! ```no_run
//! # async fn demo(sock: std::path::PathBuf) -> Result<(), mpool_testkit::Error> {
//! use std::time::Duration;
//! use mpool_testkit::{eventually, wait};
//!
//! // In a test: panics with "timed out after 5s waiting until the socket exists".
//! eventually("the socket exists", Duration::from_secs(5), || async { sock.exists() }).await;
//! // In code that reports errors: an `Err` instead, polling every 2 ms.
//! wait("the socket exists", Duration::from_secs(5)).every(Duration::from_millis(2)).until(|| async { sock.exists() }).await?;
//! # Ok(()) }
//! ```
//!
//! The check returns a [`Check`]: `bool`, `Option<T>` (`Some` is the value waited for), or
//! `Result<Option<T>, E>` (an `Err` ends the wait at once with that error).

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::Error;

/// How often [`eventually`] and [`wait`] look, unless told otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_millis(20);

/// What one look at a condition can return.
pub trait Check {
    /// What the wait returns once the condition holds.
    type Value;
    /// What ends the wait early.
    type Error: Display;
    /// `Ok(Some(value))`: done; `Ok(None)`: not yet; `Err`: give up now.
    fn into_check(self) -> Result<Option<Self::Value>, Self::Error>;
}

impl Check for bool {
    type Value = ();
    type Error = Infallible;
    fn into_check(self) -> Result<Option<()>, Infallible> {
        Ok(self.then_some(()))
    }
}

impl<T> Check for Option<T> {
    type Value = T;
    type Error = Infallible;
    fn into_check(self) -> Result<Option<T>, Infallible> {
        Ok(self)
    }
}

impl<T, E: Display> Check for Result<Option<T>, E> {
    type Value = T;
    type Error = E;
    fn into_check(self) -> Result<Option<T>, E> {
        self
    }
}

/// A wait for a condition with a deadline; see [`wait`].
#[derive(Clone, Debug)]
pub struct Wait {
    what: String,
    limit: Duration,
    every: Duration,
}

/// A wait until `what` holds, for at most `limit`, looking every [`DEFAULT_EVERY`].
pub fn wait(what: impl Into<String>, limit: Duration) -> Wait {
    Wait { what: what.into(), limit, every: DEFAULT_EVERY }
}

impl Wait {
    /// Looks this often instead.
    pub fn every(mut self, every: Duration) -> Wait {
        self.every = every;
        self
    }

    fn timed_out(&self) -> Error {
        Error::new(format!("timed out after {:?} waiting until {}", self.limit, self.what))
    }

    fn failed(&self, e: impl Display) -> Error {
        Error::new(format!("while waiting until {}: {e}", self.what))
    }

    /// Runs `check` until it returns a value (always at least once, once more at the deadline).
    /// `check` is a closure returning a future (`|| async { ... }`), not an `async` closure:
    /// waits then also work in spawned tasks (async closures cannot prove their futures `Send`
    /// there yet).
    pub async fn until<C: Check, F: Future<Output = C>>(self, mut check: impl FnMut() -> F) -> Result<C::Value, Error> {
        let start = Instant::now();
        loop {
            let late = start.elapsed() >= self.limit;
            match check().await.into_check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) if late => return Err(self.timed_out()),
                Ok(None) => {}
                Err(e) => return Err(self.failed(e)),
            }
            tokio::time::sleep(self.every.min(self.limit.saturating_sub(start.elapsed()))).await;
        }
    }

    /// [`Wait::until`] for a synchronous check, sleeping the thread in between.
    pub fn until_blocking<C: Check>(self, mut check: impl FnMut() -> C) -> Result<C::Value, Error> {
        let start = Instant::now();
        loop {
            let late = start.elapsed() >= self.limit;
            match check().into_check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) if late => return Err(self.timed_out()),
                Ok(None) => {}
                Err(e) => return Err(self.failed(e)),
            }
            std::thread::sleep(self.every.min(self.limit.saturating_sub(start.elapsed())));
        }
    }
}

/// Waits until `check` holds (looking every [`DEFAULT_EVERY`]) and returns its value; panics
/// with `what` when `limit` passes first (or the check gives up).
pub async fn eventually<C: Check, F: Future<Output = C>>(
    what: impl Into<String>,
    limit: Duration,
    check: impl FnMut() -> F,
) -> C::Value {
    wait(what, limit).until(check).await.unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait("n reaches 3", Duration::from_secs(5))
            .every(Duration::from_millis(1))
            .until(|| {
                n += 1;
                std::future::ready((n >= 3).then_some(n))
            })
            .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test]
    async fn says_what_it_waited_for() {
        let e = wait("pigs fly", Duration::from_millis(30)).until(|| async { false }).await.unwrap_err();
        assert_eq!(e.message(), "timed out after 30ms waiting until pigs fly");
        let e = wait("x", Duration::from_secs(5)).until(|| async { Err::<Option<()>, _>("broken") }).await.unwrap_err();
        assert_eq!(e.message(), "while waiting until x: broken");
    }

    #[tokio::test]
    async fn waits_run_in_spawned_tasks() {
        let task = tokio::spawn(async {
            let n = std::sync::atomic::AtomicU32::new(0);
            let n = &n;
            wait("n reaches 2", Duration::from_secs(5))
                .every(Duration::from_millis(1))
                .until(move || async move {
                    tokio::task::yield_now().await;
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1
                })
                .await
        });
        assert_eq!(task.await.expect("the task"), Ok(()));
    }

    #[test]
    fn blocking_checks_once_more_at_the_deadline() {
        let mut looks = 0;
        let r = wait("never", Duration::from_millis(10)).every(Duration::from_secs(1)).until_blocking(|| {
            looks += 1;
            false
        });
        assert!(r.is_err());
        assert_eq!(looks, 2, "one look, a sleep cut to the deadline, one more look");
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until it rains")]
    async fn eventually_panics_with_what() {
        eventually("it rains", Duration::from_millis(5), || async { None::<()> }).await;
    }
}
