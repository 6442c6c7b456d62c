//! The running execs, by lease and exec id, so CancelExec can reach them: an id is reserved
//! before its command starts (a second exec with the same id on the same lease is refused, never
//! allowed to overwrite the first one's canceller) and freed when the command ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mpool_ssh::ExecCanceller;

use super::error::AppError;

/// (lease id, exec id).
type Key = (String, String);

/// The registry; cheap to clone. An entry's canceller is `None` while its command is starting.
#[derive(Clone, Default)]
pub struct Execs(Arc<Mutex<HashMap<Key, Option<ExecCanceller>>>>);

impl Execs {
    /// Reserves `exec_id` on `lease`; the returned guard frees it when dropped.
    pub fn reserve(&self, lease: &str, exec_id: String) -> Result<Registered, AppError> {
        let key = (lease.to_string(), exec_id);
        let mut m = self.0.lock().map_err(|_| AppError::internal("the exec registry is poisoned"))?;
        if m.contains_key(&key) {
            return Err(AppError::already_exists(format!(
                "exec id {:?} is already running on lease {}: choose another exec_id (or omit it to get a generated one)",
                key.1, key.0
            )));
        }
        m.insert(key.clone(), None);
        Ok(Registered { execs: self.clone(), key })
    }

    /// The canceller of a running exec, if there is one.
    pub fn canceller(&self, lease: &str, exec_id: &str) -> Option<ExecCanceller> {
        let m = self.0.lock().ok()?;
        m.get(&(lease.to_string(), exec_id.to_string())).cloned().flatten()
    }
}

/// A reserved exec id; frees it when dropped.
pub struct Registered {
    execs: Execs,
    key: Key,
}

impl Registered {
    /// The command started: CancelExec can now stop it.
    pub fn started(&self, canceller: ExecCanceller) {
        if let Ok(mut m) = self.execs.0.lock() {
            m.insert(self.key.clone(), Some(canceller));
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut m) = self.execs.0.lock() {
            m.remove(&self.key);
        }
    }
}
