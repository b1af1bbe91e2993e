//! The writer lease document, `lease.json` (FORMAT.md §8): its key, how it is read, and its
//! conditional writes. A lease is created with put-if-absent, replaced only by a
//! compare-and-swap on the ETag it was read or written with, released by such a replacement,
//! and never deleted, so that no writer can remove a successor's lease.
//!
//! Who may take the lease and when (a free lease, a holder proven gone, renewal and fencing)
//! is the archiver's policy; this module only reads and writes the document.

use bytes::Bytes;
use time::OffsetDateTime;

use crate::keys;
use crate::model::{self, Lease};
use crate::repo::{RepoError, Repository};
use crate::store::{ETag, StoreError};

impl Repository {
    /// Reads `lease.json` with its ETag, or `None` if there is none. The one reader of the
    /// lease, for its holder and for those who report on it.
    pub async fn read_lease(&self) -> Result<Option<(Lease, ETag)>, RepoError> {
        match self.store().get_with_meta(keys::LEASE).await {
            Ok((bytes, meta)) => Ok(Some((
                model::parse_document(keys::LEASE, &bytes)?,
                meta.etag,
            ))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The lease that keeps other writers out at `now`, if there is one (neither released
    /// nor expired).
    pub async fn live_lease(&self, now: OffsetDateTime) -> Result<Option<Lease>, RepoError> {
        Ok(self
            .read_lease()
            .await?
            .map(|(lease, _)| lease)
            .filter(|lease| lease.is_live(now)))
    }

    /// Creates `lease.json` (put-if-absent). `None` when a lease exists already: read it,
    /// and replace it with [`Repository::replace_lease`] if it is free.
    pub async fn create_lease(&self, lease: &Lease) -> Result<Option<ETag>, RepoError> {
        let bytes = Bytes::from(model::to_document_bytes(lease));
        match self.store().put_if_absent(keys::LEASE, bytes).await {
            Ok(etag) => Ok(Some(etag)),
            Err(StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the lease read or written with `etag` by `lease` (compare-and-swap: a take
    /// over or a renewal). `None` when the lease changed or was removed since: another
    /// writer's now, left alone.
    pub async fn replace_lease(
        &self,
        lease: &Lease,
        etag: &ETag,
    ) -> Result<Option<ETag>, RepoError> {
        let bytes = Bytes::from(model::to_document_bytes(lease));
        match self.store().put_if_match(keys::LEASE, bytes, etag).await {
            Ok(etag) => Ok(Some(etag)),
            Err(StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Releases `lease`, held with `etag`: replaces it by the same lease released at `now`
    /// (expired, `released_at` set), by compare-and-swap. `None` when it was no longer this
    /// holder's: a successor's lease is never touched.
    pub async fn release_lease(
        &self,
        lease: &Lease,
        etag: &ETag,
        now: OffsetDateTime,
    ) -> Result<Option<ETag>, RepoError> {
        self.replace_lease(&lease.released(now), etag).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FORMAT_VERSION;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    fn lease(holder: &str, now: OffsetDateTime) -> Lease {
        Lease {
            format_version: FORMAT_VERSION,
            holder: holder.to_owned(),
            host: "db-7".to_owned(),
            pid: 42,
            acquired_at: now,
            renewed_at: now,
            expires_at: now + time::Duration::minutes(1),
            instance: Some("i".to_owned()),
            released_at: None,
        }
    }

    #[tokio::test]
    async fn a_lease_is_created_once_then_only_swapped_on_its_etag() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let now = OffsetDateTime::now_utc();
        assert!(repo.read_lease().await.unwrap().is_none());
        assert!(repo.live_lease(now).await.unwrap().is_none());
        let a = lease("a", now);
        let etag = repo.create_lease(&a).await.unwrap().expect("created");
        assert_eq!(repo.create_lease(&lease("b", now)).await.unwrap(), None);
        let (read, read_etag) = repo.read_lease().await.unwrap().unwrap();
        assert_eq!((&read, &read_etag), (&a, &etag));
        assert_eq!(repo.live_lease(now).await.unwrap(), Some(a.clone()));

        // A renewal on the right ETag; the old ETag no longer works.
        let mut renewed = a.clone();
        renewed.expires_at = now + time::Duration::minutes(2);
        let etag2 = repo.replace_lease(&renewed, &etag).await.unwrap().unwrap();
        assert_eq!(
            repo.replace_lease(&lease("b", now), &etag).await.unwrap(),
            None
        );
        assert_eq!(
            repo.release_lease(&renewed, &etag, now).await.unwrap(),
            None
        );
        assert_eq!(repo.read_lease().await.unwrap().unwrap().0, renewed);

        // Released: still there, marked so, and no longer live.
        repo.release_lease(&renewed, &etag2, now)
            .await
            .unwrap()
            .expect("released");
        let (left, _) = repo.read_lease().await.unwrap().unwrap();
        assert_eq!(left.released_at, Some(now));
        assert!(repo.live_lease(now).await.unwrap().is_none());
    }
}
