//! The in-process floor for `memory://`: a `tokio::sync::Mutex` per key, the lock a
//! program would take without dlock. Its hand-off is one task waking another on the same
//! runtime, which is what the memory backend's hand-off costs at least.

use super::Token;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

#[derive(Clone, Default)]
pub struct Memory {
    keys: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Memory {
    fn mutex(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(keys.entry(key.to_owned()).or_default())
    }

    /// Waits for the key's mutex until `until`.
    pub async fn acquire(&self, key: &str, until: Instant) -> Result<Option<Token>, String> {
        let mutex = self.mutex(key);
        match tokio::time::timeout_at(until.into(), mutex.lock_owned()).await {
            Ok(guard) => Ok(Some(Token::Memory(guard))),
            Err(_) => Ok(None),
        }
    }

    /// Unlocks; forgets the key when nobody else holds or waits for it, as dlock's
    /// memory backend forgets a released key.
    pub fn release(&self, key: &str, guard: tokio::sync::OwnedMutexGuard<()>) -> bool {
        drop(guard);
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.get(key).is_some_and(|m| Arc::strong_count(m) == 1) {
            keys.remove(key);
        }
        true
    }
}
