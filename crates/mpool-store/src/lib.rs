//! mpool's state store: the engine's [`StateStore`] port, kept in one redb file ([`Store`]:
//! schema versions, migrations, recovery from I/O errors, corrupt files as errors), in memory
//! for tests ([`memory::MemStore`]: injectable write failures and crashes), or behind a fault
//! injector for chaos runs ([`faulty::FaultyStore`]).
//!
//! The records themselves are the core's ([`mpool_core::store`]), re-exported here.

pub mod faulty;
pub mod memory;
mod redb;

pub use mpool_core::store::*;

pub use self::redb::{SCHEMA_VERSION, Store};

use serde::{Deserialize, Serialize};

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Record { key: key.into(), detail: e.to_string() })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Record { key: key.into(), detail: e.to_string() })
}
