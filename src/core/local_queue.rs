//! In-process queues: tasks of one [`Locks`](crate::Locks) handle that want the same key
//! line up here (first come, first served) and only the first of them contends at the
//! backend. Hand-offs inside a process are then fair and immediate, and a process sends
//! the store one contender per key instead of a stampede.

use crate::key::Key;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Default)]
pub(crate) struct LocalQueues {
    queues: Mutex<HashMap<Key, Arc<Semaphore>>>,
}

/// A place at the head of a key's local queue, held by a waiting acquire and then by its
/// lease; dropping it lets the next local task in.
#[derive(Debug)]
pub(crate) struct LocalTurn {
    permit: Option<OwnedSemaphorePermit>,
    key: Key,
    queues: Arc<LocalQueues>,
}

impl LocalQueues {
    fn queue(&self, key: &Key) -> Arc<Semaphore> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            queues
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(1))),
        )
    }

    /// Waits for this task's turn on `key` (FIFO).
    pub(crate) async fn enter(self: &Arc<Self>, key: &Key) -> LocalTurn {
        let queue = self.queue(key);
        let permit = queue.acquire_owned().await.ok();
        self.turn(key, permit)
    }

    /// This task's turn on `key` if nobody in this process holds or waits for it.
    pub(crate) fn try_enter(self: &Arc<Self>, key: &Key) -> Option<LocalTurn> {
        match self.queue(key).try_acquire_owned() {
            Ok(permit) => Some(self.turn(key, Some(permit))),
            Err(_) => {
                self.forget_if_idle(key);
                None
            }
        }
    }

    fn turn(self: &Arc<Self>, key: &Key, permit: Option<OwnedSemaphorePermit>) -> LocalTurn {
        LocalTurn {
            permit,
            key: key.clone(),
            queues: Arc::clone(self),
        }
    }

    /// Drops the queue of `key` when no task holds or waits for it, so the map does not
    /// grow with every key ever locked.
    fn forget_if_idle(&self, key: &Key) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(key) {
            // Only the map's reference left, and no permit out.
            if Arc::strong_count(queue) == 1 && queue.available_permits() == 1 {
                queues.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for LocalTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.queues.forget_if_idle(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_and_cleaned_up() {
        let queues = Arc::new(LocalQueues::default());
        let key = Key::new("k").unwrap();
        let first = queues.enter(&key).await;
        assert!(queues.try_enter(&key).is_none());
        let waiter = tokio::spawn({
            let (queues, key) = (Arc::clone(&queues), key.clone());
            async move { queues.enter(&key).await }
        });
        tokio::task::yield_now().await;
        drop(first);
        let second = waiter.await.unwrap();
        assert_eq!(queues.len(), 1);
        drop(second);
        assert_eq!(queues.len(), 0);
    }
}
