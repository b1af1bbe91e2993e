//! Shared checks of the stores and decorators (tests only).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ETag, FileDigest, ObjectMeta, ObjectStore, StoreError, StoreResult};
use crate::checksum::sha256_hex;
pub(crate) use crate::testing::SpyStore as Spy;

/// Bytes that differ from chunk to chunk, so a piece hashed twice or skipped shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Checks [`ObjectStore::get_to_file_max_hashed`] on `store`: for an empty, a small and a
/// large object, with bounds at, above and far above the size, the digest is the sha256 of
/// the file's bytes and the length theirs; a bound one byte short is refused with
/// [`StoreError::TooLarge`] leaving nothing behind; a missing object is not found.
pub(crate) async fn check_hashed_downloads(store: &dyn ObjectStore) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    for (key, data) in [
        ("hashed/empty", Vec::new()),
        ("hashed/small", b"abc".to_vec()),
        ("hashed/large", pattern((3 << 20) + 17)),
    ] {
        store.put(key, Bytes::from(data.clone())).await.unwrap();
        let len = data.len() as u64;
        for max in [len, len + 1000, u64::MAX] {
            let got = store
                .get_to_file_max_hashed(key, &dest, max)
                .await
                .unwrap_or_else(|e| panic!("{key}, bound {max}: {e}"));
            let written = std::fs::read(&dest).unwrap();
            assert!(written == data, "{key}: the file holds other bytes");
            let want = FileDigest {
                len,
                sha256: sha256_hex(&written),
            };
            assert_eq!(got, want, "{key}, bound {max}");
        }
        std::fs::remove_file(&dest).unwrap();
        if len > 0 {
            let e = store
                .get_to_file_max_hashed(key, &dest, len - 1)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, StoreError::TooLarge { limit, key: k, .. } if *limit == len - 1 && k == key),
                "{key}: {e:?}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{key}: left behind: {left:?}");
    }
    let e = store
        .get_to_file_max_hashed("hashed/missing", &dest, 10)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(!dest.exists());
}

/// Checks [`ObjectStore::get_with_meta_max`] on `store`: an object is read whole with a
/// bound at or above its size; one byte short is refused with [`StoreError::TooLarge`]; the
/// default whole read is bounded by [`super::MAX_WHOLE_READ`].
pub(crate) async fn check_bounded_reads(store: &dyn ObjectStore) {
    for (key, data) in [
        ("whole/small", b"abc".to_vec()),
        ("whole/large", pattern(70_001)),
    ] {
        store.put(key, Bytes::from(data.clone())).await.unwrap();
        let len = data.len() as u64;
        for max in [len, len + 1, u64::MAX] {
            let (got, meta) = store
                .get_with_meta_max(key, max)
                .await
                .unwrap_or_else(|e| panic!("{key}, bound {max}: {e}"));
            assert!(got == data && meta.size == len, "{key}, bound {max}");
        }
        let e = store.get_max(key, len - 1).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::TooLarge { limit, key: k, .. } if *limit == len - 1 && k == key),
            "{key}: {e:?}"
        );
        assert!(store.get(key).await.unwrap() == data, "{key}");
    }
    let e = store.get_max("whole/missing", 10).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

/// A store implementing only what it must, over `inner`: every provided method runs its
/// default.
#[derive(Debug)]
pub(crate) struct Minimal(pub(crate) Arc<dyn ObjectStore>);

#[async_trait]
impl ObjectStore for Minimal {
    fn describe(&self) -> String {
        self.0.describe()
    }
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.0.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.0.put_if_absent(key, data).await
    }
    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.0.put_if_match(key, data, etag).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        self.0.put_file(key, path).await
    }
    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        self.0.get_with_meta_max(key, max_len).await
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.0.get_to_file(key, path).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.0.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.0.head(key).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.0.list(prefix).await
    }
}
