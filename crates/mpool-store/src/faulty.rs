//! A [`StateStore`] that fails a share of its writes on purpose, for chaos runs of a real
//! `mpool serve` (`mpool serve --inject-store-faults RATE`, hidden; `mpool bench chaos`).
//! Reads always work; a refused write changes nothing, like a disk that is full for a moment.

use std::sync::Arc;

use super::{Snapshot, StateStore, StoreError, Write};

/// The wrapper.
pub struct FaultyStore {
    inner: Arc<dyn StateStore>,
    rate: f64,
}

impl FaultyStore {
    /// Fails each write with probability `rate` (0-1).
    pub fn new(inner: Arc<dyn StateStore>, rate: f64) -> FaultyStore {
        FaultyStore { inner, rate: rate.clamp(0.0, 1.0) }
    }
}

impl StateStore for FaultyStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn write(&self, batch: &[Write], durable: bool) -> Result<(), StoreError> {
        if rand::random::<f64>() < self.rate {
            return Err(StoreError::Db {
                path: self.inner.describe(),
                detail: "injected write failure (chaos)".into(),
            });
        }
        self.inner.write(batch, durable)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn blocks(&self) -> bool {
        self.inner.blocks()
    }
}
