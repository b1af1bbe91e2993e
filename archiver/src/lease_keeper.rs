//! Keeping the writer lease for as long as its holder works (FORMAT.md §8).
//!
//! A [`LeaseKeeper`] owns a held lease and renews it in a background task, whatever its
//! holder is busy with (a long upload, a sweep deleting thousands of objects). The holder
//! learns that the lease is gone from [`LeaseKeeper::gone`], and work that must never run
//! without the lease (deleting objects) asks a [`LeaseFence`] before each step: the fence
//! holds only while the lease is known to be valid for a third of its time still, so a
//! holder that was paused past its expiry (and may have been taken over) stops at once.

use std::sync::Arc;
use std::time::Duration;

use tidemark_manifest::repo::Repository;
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

use crate::lease::{LeaseError, LeaseHandle};
use crate::metrics::Metrics;
use crate::task::OwnedTask;

/// Why the lease was given up.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Someone else holds it now.
    #[error(transparent)]
    Lost(LeaseError),
    /// It expired while the store could not be reached.
    #[error(
        "the lease expired while the store could not be reached ({0}); stopping so that a \
         restarted archiver takes it again"
    )]
    Expired(LeaseError),
    #[error("the lease renewal task failed: {0}")]
    Task(String),
}

/// What the keeper last knew of the lease: safe to work until this instant, or gone.
type Validity = Option<OffsetDateTime>;

/// Renews a lease in the background until stopped (or until it is lost).
#[derive(Debug)]
pub struct LeaseKeeper {
    task: Option<OwnedTask<Result<LeaseHandle, KeeperError>>>,
    stop: Option<oneshot::Sender<()>>,
    validity: watch::Receiver<Validity>,
    location: String,
}

/// Answers "may I still act as the lease holder?"; cheap to clone and ask.
#[derive(Debug, Clone)]
pub struct LeaseFence {
    validity: watch::Receiver<Validity>,
    location: String,
}

/// How long before a renewal failure is retried.
const RETRY: Duration = Duration::from_secs(2);

fn safe_until(handle: &LeaseHandle, ttl: Duration) -> OffsetDateTime {
    handle.lease().expires_at - ttl / 3
}

impl LeaseKeeper {
    /// Starts renewing `handle`, the lease on `repo` taken with `ttl`; reports its expiry
    /// to `metrics`.
    pub fn start(
        repo: &Repository,
        handle: LeaseHandle,
        ttl: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let location = repo.location();
        let (tx, validity) = watch::channel(Some(safe_until(&handle, ttl)));
        let (stop, stopped) = oneshot::channel();
        let task = OwnedTask::spawn(renew_until_stopped(handle, ttl, tx, stopped, metrics));
        LeaseKeeper {
            task: Some(task),
            stop: Some(stop),
            validity,
            location,
        }
    }

    /// A fence for work that must stop when the lease is lost.
    pub fn fence(&self) -> LeaseFence {
        LeaseFence {
            validity: self.validity.clone(),
            location: self.location.clone(),
        }
    }

    /// Resolves when the lease is gone (lost, or expired while unreachable); never while it
    /// is held. Cancel-safe.
    pub async fn gone(&mut self) -> KeeperError {
        match crate::task::join_slot(&mut self.task).await {
            Ok(Ok(_)) => KeeperError::Task("stopped without being asked".to_owned()),
            Ok(Err(e)) => e,
            Err(e) => KeeperError::Task(e.to_string()),
        }
    }

    /// Stops renewing (after a renewal in flight) and gives the lease back to the caller.
    pub async fn stop(mut self) -> Result<LeaseHandle, KeeperError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Err(KeeperError::Task("the lease is already gone".to_owned()));
        };
        match task.join().await {
            Ok(r) => r,
            Err(e) => Err(KeeperError::Task(e.to_string())),
        }
    }
}

async fn renew_until_stopped(
    mut handle: LeaseHandle,
    ttl: Duration,
    validity: watch::Sender<Validity>,
    mut stopped: oneshot::Receiver<()>,
    metrics: Option<Arc<Metrics>>,
) -> Result<LeaseHandle, KeeperError> {
    let mut retry_at: Option<OffsetDateTime> = None;
    loop {
        let at = retry_at.map_or(handle.renew_due(), |t| t.max(handle.renew_due()));
        let wait: Duration = (at - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = &mut stopped => return Ok(handle),
            _ = tokio::time::sleep(wait) => {}
        }
        let now = OffsetDateTime::now_utc();
        match handle.renew().await {
            Ok(()) => {
                retry_at = None;
                validity.send_replace(Some(safe_until(&handle, ttl)));
                if let Some(m) = &metrics {
                    m.lease_held_until(Some(handle.lease().expires_at));
                }
            }
            Err(e @ LeaseError::Lost { .. }) => {
                validity.send_replace(None);
                return Err(KeeperError::Lost(e));
            }
            Err(e) if now >= handle.lease().expires_at => {
                validity.send_replace(None);
                return Err(KeeperError::Expired(e));
            }
            Err(e) => {
                tracing::error!(error = %e, "lease renewal failed; will retry before it expires");
                retry_at = Some(now + RETRY);
            }
        }
    }
}

impl LeaseFence {
    /// `Ok` while the lease is held with a third of its time left; otherwise an error that
    /// says the work must stop.
    pub fn check(&self) -> Result<(), LeaseError> {
        match *self.validity.borrow() {
            Some(until) if OffsetDateTime::now_utc() < until => Ok(()),
            _ => Err(LeaseError::Lost {
                location: self.location.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::store::MemoryStore;

    #[tokio::test]
    async fn the_lease_is_renewed_while_the_holder_is_busy_and_returned_on_stop() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let ttl = Duration::from_millis(600);
        let handle = LeaseHandle::acquire(&repo, ttl).await.unwrap();
        let keeper = LeaseKeeper::start(&repo, handle, ttl, None);
        let fence = keeper.fence();
        // Busy for several times the lease's time to live.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        fence.check().expect("still held");
        assert!(matches!(
            LeaseHandle::acquire(&repo, ttl).await.unwrap_err(),
            LeaseError::Held { .. }
        ));
        let handle = keeper.stop().await.unwrap();
        handle.release().await.unwrap();
    }

    #[tokio::test]
    async fn a_lost_lease_closes_the_fence_and_wakes_the_holder() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let ttl = Duration::from_millis(600);
        let handle = LeaseHandle::acquire(&repo, ttl).await.unwrap();
        let mut keeper = LeaseKeeper::start(&repo, handle, ttl, None);
        let fence = keeper.fence();
        // Someone takes the lease away (as a takeover after expiry would).
        repo.store()
            .delete(tidemark_manifest::keys::LEASE)
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), keeper.gone())
            .await
            .expect("the keeper notices at its next renewal");
        assert!(matches!(e, KeeperError::Lost(_)), "{e}");
        assert!(fence.check().is_err());
    }
}
