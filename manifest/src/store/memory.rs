//! An in-memory store, for tests.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ETag, ObjectMeta, ObjectStore, StoreError, StoreOp, StoreResult, validate_key, validate_prefix,
};

/// An object store held in memory, with the same semantics as the real ones (key
/// validation, conditional writes, errors). Meant for tests: nothing is persisted.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, ETag)>>,
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

    async fn get_with_meta(&self, key: &str) -> StoreResult<(Bytes, ObjectMeta)> {
        validate_key(key)?;
        let (data, etag) = self.lookup(StoreOp::Get, key)?;
        let meta = ObjectMeta {
            key: key.to_owned(),
            size: data.len() as u64,
            etag,
        };
        Ok((data, meta))
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        validate_key(key)?;
        let op = StoreOp::GetToFile;
        let (data, _) = self.lookup(op, key)?;
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
            super::local::write_local_file(&dest, local, |out| {
                std::io::Write::write_all(out, &data).map_err(local)?;
                Ok(data.len() as u64)
            })
        })
        .await;
        match written {
            Ok(result) => result,
            Err(e) => Err(StoreError::config(format!(
                "writing '{shown}' was interrupted: {e}"
            ))),
        }
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        validate_key(key)?;
        let (data, _) = self.lookup(StoreOp::GetToFile, key)?;
        if data.len() as u64 > max_len {
            return Err(StoreError::TooLarge {
                op: StoreOp::GetToFile,
                key: key.to_owned(),
                location: Self::location(key),
                limit: max_len,
            });
        }
        self.get_to_file(key, path).await
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
        Ok(self.objects().get(key).map(|(data, etag)| ObjectMeta {
            key: key.to_owned(),
            size: data.len() as u64,
            etag: etag.clone(),
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        Ok(self
            .objects()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (data, etag))| ObjectMeta {
                key: k.clone(),
                size: data.len() as u64,
                etag: etag.clone(),
            })
            .collect())
    }
}
