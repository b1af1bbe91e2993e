//! An in-memory store, for tests.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;

use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreError, StoreOp, StoreResult,
    validate_key, validate_prefix,
};
use crate::model::ObjectLock;

/// An object store held in memory, with the same semantics as the real ones (key
/// validation, conditional writes, errors). Meant for tests: nothing is persisted.
///
/// It can lock objects as an S3 bucket with Object Lock does ([`ObjectStore::set_object_lock`]):
/// an object written with a retain-until date cannot be deleted before it
/// ([`StoreError::AccessDenied`], as S3 answers a DELETE of a locked object version).
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, ETag)>>,
    /// When each object was written, and until when it is locked.
    times: Mutex<BTreeMap<String, (OffsetDateTime, Option<OffsetDateTime>)>>,
    lock: Mutex<Option<ObjectLock>>,
    next_version: AtomicU64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn location(key: &str) -> String {
        format!("memory://{key}")
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, ETag)>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is
        // a single insert), so a poisoned lock is still usable.
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn times(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, (OffsetDateTime, Option<OffsetDateTime>)>> {
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a write of `key` now, with the lock's retain-until date if it applies.
    fn written(&self, key: &str) {
        let now = OffsetDateTime::now_utc();
        let lock = *self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let until = lock
            .filter(|_| crate::lock::applies_to(key))
            .map(|l| l.retain_until(now));
        self.times().insert(key.to_owned(), (now, until));
    }

    fn last_modified(&self, key: &str) -> Option<OffsetDateTime> {
        self.times().get(key).map(|(at, _)| *at)
    }

    /// The retain-until date `key` was written with, if any.
    pub fn retain_until(&self, key: &str) -> Option<OffsetDateTime> {
        self.times().get(key).and_then(|(_, until)| *until)
    }

    /// Makes every object `by` older, its write time and retain-until date alike: as if
    /// it had been written that long ago (tests of what a lock lets a sweep delete).
    pub fn age(&self, by: time::Duration) {
        for (at, until) in self.times().values_mut() {
            *at -= by;
            *until = until.map(|u| u - by);
        }
    }

    fn new_etag(&self) -> ETag {
        ETag::new(format!(
            "mem-{}",
            self.next_version.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn not_found(op: StoreOp, key: &str) -> StoreError {
        StoreError::NotFound {
            op,
            key: key.to_owned(),
            location: Self::location(key),
        }
    }

    fn lookup(&self, op: StoreOp, key: &str) -> StoreResult<(Bytes, ETag)> {
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| Self::not_found(op, key))
    }

    /// Writes an object of at most `max_len` bytes to `path` the safe way (off the async
    /// runtime), hashing what it writes when `hash` is set (an empty digest otherwise).
    async fn download(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        hash: bool,
    ) -> StoreResult<FileDigest> {
        validate_key(key)?;
        let op = StoreOp::GetToFile;
        let (data, _) = self.lookup(op, key)?;
        if data.len() as u64 > max_len {
            return Err(StoreError::TooLarge {
                op,
                key: key.to_owned(),
                location: Self::location(key),
                limit: max_len,
            });
        }
        let key = key.to_owned();
        let dest = path.to_owned();
        let shown = dest.display().to_string();
        let written = tokio::task::spawn_blocking(move || {
            let local = |e| StoreError::LocalFile {
                op,
                key: key.clone(),
                path: dest.display().to_string(),
                source: e,
            };
            let len = super::local::write_local_file(&dest, local, |out| {
                std::io::Write::write_all(out, &data).map_err(local)?;
                Ok(data.len() as u64)
            })?;
            let sha256 = if hash {
                crate::checksum::sha256_hex(&data)
            } else {
                String::new()
            };
            Ok(FileDigest { len, sha256 })
        })
        .await;
        match written {
            Ok(result) => result,
            Err(e) => Err(StoreError::config(format!(
                "writing '{shown}' was interrupted: {e}"
            ))),
        }
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        validate_key(key)?;
        let etag = self.new_etag();
        self.objects().insert(key.to_owned(), (data, etag.clone()));
        self.written(key);
        Ok(etag)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        validate_key(key)?;
        let mut objects = self.objects();
        if objects.contains_key(key) {
            return Err(StoreError::PreconditionFailed {
                op: StoreOp::PutIfAbsent,
                key: key.to_owned(),
                location: Self::location(key),
            });
        }
        let etag = self.new_etag();
        objects.insert(key.to_owned(), (data, etag.clone()));
        self.written(key);
        Ok(etag)
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        validate_key(key)?;
        let op = StoreOp::PutIfMatch;
        let mut objects = self.objects();
        match objects.get(key) {
            None => Err(Self::not_found(op, key)),
            Some((_, current)) if current != etag => Err(StoreError::PreconditionFailed {
                op,
                key: key.to_owned(),
                location: Self::location(key),
            }),
            Some(_) => {
                let etag = self.new_etag();
                objects.insert(key.to_owned(), (data, etag.clone()));
                self.written(key);
                Ok(etag)
            }
        }
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        validate_key(key)?;
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| StoreError::LocalFile {
                op: StoreOp::PutFile,
                key: key.to_owned(),
                path: path.display().to_string(),
                source: e,
            })?;
        self.put(key, Bytes::from(data)).await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        validate_key(key)?;
        let op = StoreOp::Get;
        let (data, etag) = self.lookup(op, key)?;
        if data.len() as u64 > max_len {
            return Err(StoreError::TooLarge {
                op,
                key: key.to_owned(),
                location: Self::location(key),
                limit: max_len,
            });
        }
        let meta = ObjectMeta {
            key: key.to_owned(),
            size: data.len() as u64,
            etag,
            last_modified: self.last_modified(key),
        };
        Ok((data, meta))
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        Ok(self.download(key, path, u64::MAX, false).await?.len)
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        Ok(self.download(key, path, max_len, false).await?.len)
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        _cache: PageCache,
    ) -> StoreResult<FileDigest> {
        self.download(key, path, max_len, true).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        validate_key(key)?;
        let op = StoreOp::GetRange;
        let (data, _) = self.lookup(op, key)?;
        let size = data.len() as u64;
        if range.start > range.end || range.end > size {
            return Err(StoreError::InvalidRange {
                op,
                key: key.to_owned(),
                location: Self::location(key),
                start: range.start,
                end: range.end,
                size: Some(size),
            });
        }
        // Both bounds are <= data.len(), so they fit in usize.
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        validate_key(key)?;
        let found = self.objects().get(key).cloned();
        Ok(found.map(|(data, etag)| ObjectMeta {
            key: key.to_owned(),
            size: data.len() as u64,
            etag,
            last_modified: self.last_modified(key),
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        let until = self.retain_until(key);
        if let Some(until) = until.filter(|u| *u > OffsetDateTime::now_utc()) {
            return Err(StoreError::AccessDenied {
                op: StoreOp::Delete,
                key: key.to_owned(),
                location: Self::location(key),
                detail: format!("the object is locked until {until}"),
            });
        }
        self.objects().remove(key);
        self.times().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let found: Vec<(String, u64, ETag)> = self
            .objects()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (data, etag))| (k.clone(), data.len() as u64, etag.clone()))
            .collect();
        Ok(found
            .into_iter()
            .map(|(key, size, etag)| ObjectMeta {
                last_modified: self.last_modified(&key),
                key,
                size,
                etag,
            })
            .collect())
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        Ok(())
    }

    fn set_object_lock(&self, lock: Option<ObjectLock>) {
        *self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lock;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashed_downloads_give_the_sha256_of_the_file() {
        crate::store::testkit::check_hashed_downloads(&MemoryStore::new()).await;
        crate::store::testkit::check_bounded_reads(&MemoryStore::new()).await;
    }
}
