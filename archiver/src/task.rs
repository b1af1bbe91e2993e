//! Owned background tasks: every task the archiver spawns is held by an [`OwnedTask`],
//! which aborts it when dropped. A task therefore never outlives its owner, whatever path
//! the owner leaves by (an error return, a panic, a shutdown).

use std::future::Future;

use tokio::task::{JoinError, JoinHandle};

/// A spawned task that is aborted when this handle is dropped.
#[derive(Debug)]
pub struct OwnedTask<T> {
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> OwnedTask<T> {
    /// Spawns `future` on the current runtime, in the current tracing span.
    pub fn spawn(future: impl Future<Output = T> + Send + 'static) -> OwnedTask<T> {
        OwnedTask {
            handle: tokio::spawn(tracing::Instrument::in_current_span(future)),
        }
    }
}

impl<T> OwnedTask<T> {
    /// Waits for the task to end. Cancel-safe: dropping this future leaves the task running
    /// and owned.
    pub async fn join(&mut self) -> Result<T, JoinError> {
        (&mut self.handle).await
    }

    /// Stops the task and waits until it is gone.
    pub async fn stop(mut self) {
        self.handle.abort();
        let _ = (&mut self.handle).await;
    }
}

impl<T> Drop for OwnedTask<T> {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Waits for the task in `slot` to end and empties the slot; never resolves while the slot
/// is empty. Cancel-safe, for `tokio::select!`.
pub async fn join_slot<T>(slot: &mut Option<OwnedTask<T>>) -> Result<T, JoinError> {
    match slot {
        Some(task) => {
            let r = task.join().await;
            *slot = None;
            r
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_task_stops() {
        let ran_on = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran_on);
        let task = OwnedTask::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            flag.store(true, Ordering::SeqCst);
        });
        drop(task);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !ran_on.load(Ordering::SeqCst),
            "the task outlived its owner"
        );
    }

    #[tokio::test]
    async fn join_slot_empties_the_slot_and_waits_forever_on_an_empty_one() {
        let mut slot = Some(OwnedTask::spawn(async { 7 }));
        assert_eq!(join_slot(&mut slot).await.unwrap(), 7);
        assert!(slot.is_none());
        let waited =
            tokio::time::timeout(Duration::from_millis(50), join_slot::<u8>(&mut None)).await;
        assert!(waited.is_err());
    }
}
