//! The writer lease (FORMAT.md §8): one archiver per repository.
//!
//! A writer creates `lease.json` with put-if-absent, or takes over an *expired* lease with a
//! compare-and-swap on its ETag. It renews with compare-and-swap well before expiry and
//! deletes the lease on a clean shutdown. A live lease held by someone else is a refusal
//! that names the holder. Manifest generations being create-only keeps even a writer that
//! lost its lease (paused, partitioned) from forking the history.

use std::time::Duration;

use bytes::Bytes;
use tidemark_manifest::keys;
use tidemark_manifest::model::{self, FORMAT_VERSION, Lease};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::store::{ETag, StoreError};
use time::OffsetDateTime;

/// Lease errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "{location} is being archived by another archiver (holder {holder} on host {host}, pid \
         {pid}, lease valid until {expires_at}); stop it first, or wait for its lease to expire \
         if it died"
    )]
    Held {
        location: String,
        holder: String,
        host: String,
        pid: u32,
        expires_at: String,
    },
    #[error(
        "lost the lease on {location}: another archiver took it over (it expired before it \
         could be renewed); this archiver stops"
    )]
    Lost { location: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held lease.
#[derive(Debug)]
pub struct LeaseHandle {
    repo: Repository,
    lease: Lease,
    etag: ETag,
    ttl: Duration,
}

/// Holders of the leases this process holds now (live [`LeaseHandle`]s). A lease that names
/// this process but no live handle was left by a task that ended without releasing it (a
/// database's service that panicked, with several databases per process).
static LIVE_HOLDERS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn live_holders() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE_HOLDERS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        live_holders().retain(|h| *h != self.lease.holder);
    }
}

fn fmt(t: OffsetDateTime) -> String {
    tidemark_manifest::plan::fmt_time(t)
}

impl LeaseHandle {
    /// Takes the lease for `ttl`, or says who holds it.
    pub async fn acquire(repo: &Repository, ttl: Duration) -> Result<LeaseHandle, LeaseError> {
        // Registered before the attempt: another task of this process that finds the lease
        // must see its holder as alive, even before this call returns.
        let holder = uuid::Uuid::new_v4().to_string();
        live_holders().push(holder.clone());
        let result = Self::attempt(repo, ttl, &holder).await;
        if !matches!(&result, Ok(h) if h.lease.holder == holder) {
            live_holders().retain(|h| *h != holder);
        }
        result
    }

    async fn attempt(
        repo: &Repository,
        ttl: Duration,
        holder: &str,
    ) -> Result<LeaseHandle, LeaseError> {
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            format_version: FORMAT_VERSION,
            holder: holder.to_owned(),
            host: crate::checkpoint::hostname(),
            pid: std::process::id(),
            acquired_at: now,
            renewed_at: now,
            expires_at: now + ttl,
        };
        let bytes = Bytes::from(model::to_document_bytes(&lease));
        let store = repo.store();
        let etag = match store.put_if_absent(keys::LEASE, bytes.clone()).await {
            Ok(etag) => etag,
            Err(StoreError::PreconditionFailed { .. }) => {
                let (existing, meta) = store.get_with_meta(keys::LEASE).await?;
                let current: Lease =
                    model::parse_document(keys::LEASE, &existing).map_err(RepoError::from)?;
                let dead_here = holder_is_dead_here(&current);
                if current.expires_at > now && !dead_here {
                    return Err(LeaseError::Held {
                        location: repo.location(),
                        holder: current.holder,
                        host: current.host,
                        pid: current.pid,
                        expires_at: fmt(current.expires_at),
                    });
                }
                tracing::warn!(
                    previous_host = %current.host,
                    previous_pid = current.pid,
                    expires_at = %fmt(current.expires_at),
                    "taking over the lease of an archiver that {}",
                    if dead_here { "died on this host" } else { "let its lease expire" }
                );
                match store.put_if_match(keys::LEASE, bytes, &meta.etag).await {
                    Ok(etag) => etag,
                    Err(StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. }) => {
                        // Someone else took it over (or released it) in the meantime.
                        return Box::pin(Self::acquire(repo, ttl)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(holder = %lease.holder, expires_at = %fmt(lease.expires_at), "lease acquired");
        Ok(LeaseHandle {
            repo: repo.clone(),
            lease,
            etag,
            ttl,
        })
    }

    /// When the lease should be renewed: a third of its time before expiry.
    pub fn renew_due(&self) -> OffsetDateTime {
        self.lease.expires_at - self.ttl * 2 / 3
    }

    /// The lease as held.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Extends the lease. Fails with [`LeaseError::Lost`] if someone else holds it now.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let now = OffsetDateTime::now_utc();
        let mut next = self.lease.clone();
        next.renewed_at = now;
        next.expires_at = now + self.ttl;
        let bytes = Bytes::from(model::to_document_bytes(&next));
        match self
            .repo
            .store()
            .put_if_match(keys::LEASE, bytes, &self.etag)
            .await
        {
            Ok(etag) => {
                self.etag = etag;
                self.lease = next;
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. }) => {
                Err(LeaseError::Lost {
                    location: self.repo.location(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up (deletes it if it is still ours).
    pub async fn release(self) -> Result<(), LeaseError> {
        let store = self.repo.store();
        match store.head(keys::LEASE).await? {
            Some(meta) if meta.etag == self.etag => {
                store.delete(keys::LEASE).await?;
                tracing::info!(holder = %self.lease.holder, "lease released");
            }
            _ => tracing::warn!("the lease was no longer ours at shutdown; left it alone"),
        }
        Ok(())
    }
}

/// True when the lease was taken on this host by a process that no longer runs (or is no
/// longer an archiver), or by this process through a handle that is gone: a crashed archiver
/// restarted by its supervisor (or a database's task restarted in this process) need not
/// wait for the lease to expire.
fn holder_is_dead_here(lease: &Lease) -> bool {
    if lease.host != crate::checkpoint::hostname() {
        return false;
    }
    if lease.pid == std::process::id() {
        return !live_holders().contains(&lease.holder);
    }
    match std::fs::read(format!("/proc/{}/cmdline", lease.pid)) {
        Ok(cmdline) => !String::from_utf8_lossy(&cmdline).contains("tidemark"),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tidemark_manifest::store::LocalStore;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::open(dir).unwrap()))
    }

    #[tokio::test]
    async fn a_second_holder_is_refused_until_release_or_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
        let err = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LeaseError::Held { .. }), "{msg}");
        assert!(
            msg.contains("another archiver") && msg.contains("pid"),
            "{msg}"
        );
        a.renew().await.unwrap();
        a.release().await.unwrap();
        let short = LeaseHandle::acquire(&r, Duration::from_millis(200))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Expired: taken over, and the old holder finds out when it renews.
        let _b = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
        let mut short = short;
        assert!(matches!(
            short.renew().await.unwrap_err(),
            LeaseError::Lost { .. }
        ));
    }

    #[tokio::test]
    async fn a_lease_whose_handle_this_process_dropped_is_taken_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        // A task that ends without releasing (a panic) drops its handle.
        let gone = LeaseHandle::acquire(&r, Duration::from_secs(600))
            .await
            .unwrap();
        let gone_holder = gone.lease().holder.clone();
        drop(gone);
        let again = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .expect("taken over without waiting for expiry");
        assert_ne!(again.lease().holder, gone_holder);
        // A live handle in this process still keeps others out.
        assert!(matches!(
            LeaseHandle::acquire(&r, Duration::from_secs(60))
                .await
                .unwrap_err(),
            LeaseError::Held { .. }
        ));
    }
}
