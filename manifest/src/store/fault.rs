//! Fault injection, for tests and failure drills.
//!
//! [`FaultStore`] wraps any store and makes chosen calls fail (or stall) according to
//! [`FaultRule`]s, so retry logic, error reporting and crash-consistency can be exercised
//! against a real store without a flaky network:
//!
//! ```
//! # use std::sync::Arc;
//! # use tidemark_manifest::store::{MemoryStore, StoreOp};
//! use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
//!
//! let store = FaultStore::new(Arc::new(MemoryStore::new()));
//! // The next two `get`s of anything under `segments/` fail with a temporary error.
//! store.inject(FaultRule::new(Fault::Transient).on(StoreOp::Get).key_prefix("segments/").times(2));
//! ```
//!
//! Never use it in production paths.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreError, StoreOp, StoreResult,
};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with [`StoreError::Transient`] without calling the wrapped store (the request
    /// never arrived).
    Transient,
    /// Call the wrapped store, then fail with [`StoreError::Transient`] whatever it answered
    /// (the request was carried out but the reply was lost: the ambiguous case).
    LostReply,
    /// Fail with [`StoreError::NotFound`] without calling the wrapped store.
    NotFound,
    /// Fail with [`StoreError::AccessDenied`] without calling the wrapped store.
    AccessDenied,
    /// Wait this long, then call the wrapped store (a slow network or server).
    Delay(Duration),
}

/// Which calls a [`Fault`] hits, and how many times.
///
/// A new rule hits every operation on every key, forever; narrow it with the builder
/// methods.
#[derive(Debug, Clone)]
pub struct FaultRule {
    fault: Fault,
    ops: Option<Vec<StoreOp>>,
    key_prefix: Option<String>,
    skip: u64,
    times: Option<u64>,
}

impl FaultRule {
    /// A rule injecting `fault` into every call.
    pub fn new(fault: Fault) -> Self {
        FaultRule {
            fault,
            ops: None,
            key_prefix: None,
            skip: 0,
            times: None,
        }
    }

    /// Only hits calls of `op` (call again to add more operations).
    pub fn on(mut self, op: StoreOp) -> Self {
        self.ops.get_or_insert_with(Vec::new).push(op);
        self
    }

    /// Only hits calls whose key (or, for `list`, prefix) starts with `prefix`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// Lets the first `n` matching calls through untouched.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Hits at most `n` matching calls, then retires.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: StoreOp, key: &str) -> bool {
        self.ops.as_ref().is_none_or(|ops| ops.contains(&op))
            && self
                .key_prefix
                .as_ref()
                .is_none_or(|prefix| key.starts_with(prefix.as_str()))
    }
}

/// A store decorator that injects faults into chosen calls. For tests and drills only.
///
/// Rules are checked in the order they were added; the first matching rule that is still
/// active decides. Every call is counted, faulted or not.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<FaultRule>>,
    calls: Mutex<HashMap<StoreOp, u64>>,
    injected: AtomicU64,
}

impl FaultStore {
    /// Wraps `inner` with no rules (every call passes through).
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultStore {
            inner,
            rules: Mutex::new(Vec::new()),
            calls: Mutex::new(HashMap::new()),
            injected: AtomicU64::new(0),
        }
    }

    /// Adds a rule.
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.rules).push(rule);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        lock(&self.rules).clear();
    }

    /// How many times `op` was called (faulted or not).
    pub fn calls(&self, op: StoreOp) -> u64 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// How many calls were made in all.
    pub fn total_calls(&self) -> u64 {
        lock(&self.calls).values().sum()
    }

    /// How many faults were injected.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Counts the call and picks the fault for it, if any.
    fn pick(&self, op: StoreOp, key: &str) -> Option<Fault> {
        *lock(&self.calls).entry(op).or_insert(0) += 1;
        let mut rules = lock(&self.rules);
        let rule = rules
            .iter_mut()
            .find(|r| r.times != Some(0) && r.matches(op, key))?;
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        if let Some(n) = rule.times.as_mut() {
            *n -= 1;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(rule.fault)
    }

    async fn around<T>(
        &self,
        op: StoreOp,
        key: &str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let Some(fault) = self.pick(op, key) else {
            return call.await;
        };
        tracing::debug!(%op, key, ?fault, "injecting a fault");
        let location = format!("{} key {key}", self.inner.describe());
        let key = key.to_owned();
        match fault {
            Fault::Transient => Err(StoreError::Transient {
                op,
                key,
                location,
                source: "injected fault: simulated temporary failure".into(),
            }),
            Fault::LostReply => {
                let outcome = call.await.map(|_| ());
                Err(StoreError::Transient {
                    op,
                    key,
                    location,
                    source: format!(
                        "injected fault: the reply was lost (the store answered {})",
                        match outcome {
                            Ok(()) => "success".to_owned(),
                            Err(e) => format!("'{e}'"),
                        }
                    )
                    .into(),
                })
            }
            Fault::NotFound => Err(StoreError::NotFound { op, key, location }),
            Fault::AccessDenied => Err(StoreError::AccessDenied {
                op,
                key,
                location,
                detail: "injected fault".into(),
            }),
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                call.await
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked (single-step updates).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl ObjectStore for FaultStore {
    fn describe(&self) -> String {
        format!("{} (with fault injection)", self.inner.describe())
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.around(StoreOp::Put, key, self.inner.put(key, data))
            .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.around(
            StoreOp::PutIfAbsent,
            key,
            self.inner.put_if_absent(key, data),
        )
        .await
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.around(
            StoreOp::PutIfMatch,
            key,
            self.inner.put_if_match(key, data, etag),
        )
        .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        self.around(StoreOp::PutFile, key, self.inner.put_file(key, path))
            .await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        self.around(
            StoreOp::Get,
            key,
            self.inner.get_with_meta_max(key, max_len),
        )
        .await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.around(StoreOp::GetToFile, key, self.inner.get_to_file(key, path))
            .await
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        let inner = self.inner.get_to_file_max(key, path, max_len);
        self.around(StoreOp::GetToFile, key, inner).await
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        let inner = self.inner.get_to_file_hashed(key, path, max_len, cache);
        self.around(StoreOp::GetToFile, key, inner).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.around(StoreOp::GetRange, key, self.inner.get_range(key, range))
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.around(StoreOp::Head, key, self.inner.head(key)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.around(StoreOp::Delete, key, self.inner.delete(key))
            .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.around(StoreOp::List, prefix, self.inner.list(prefix))
            .await
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        self.inner.check_object_lock().await
    }

    fn set_object_lock(&self, lock: Option<crate::model::ObjectLock>) {
        self.inner.set_object_lock(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn rules_filter_skip_and_retire() {
        let store = FaultStore::new(Arc::new(MemoryStore::new()));
        store.put("a/1", Bytes::from_static(b"x")).await.unwrap();
        store.put("b/1", Bytes::from_static(b"y")).await.unwrap();
        store.inject(
            FaultRule::new(Fault::NotFound)
                .on(StoreOp::Get)
                .key_prefix("a/")
                .after(1)
                .times(2),
        );
        assert!(store.get("a/1").await.is_ok(), "first call is let through");
        assert!(store.get("a/1").await.unwrap_err().is_not_found());
        assert!(store.get("b/1").await.is_ok(), "other prefix untouched");
        assert!(
            store.head("a/1").await.unwrap().is_some(),
            "other op untouched"
        );
        assert!(store.get("a/1").await.unwrap_err().is_not_found());
        assert!(
            store.get("a/1").await.is_ok(),
            "rule retired after two hits"
        );
        assert_eq!(store.injected(), 2);
        assert_eq!(store.calls(StoreOp::Get), 5);
        assert_eq!(store.total_calls(), 8);
    }

    #[tokio::test]
    async fn lost_reply_still_performs_the_call() {
        let store = FaultStore::new(Arc::new(MemoryStore::new()));
        store.inject(FaultRule::new(Fault::LostReply).on(StoreOp::Put).times(1));
        let err = store.put("k", Bytes::from_static(b"v")).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("reply was lost"), "{err}");
        assert_eq!(&store.get("k").await.unwrap()[..], b"v");
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_call() {
        let store = FaultStore::new(Arc::new(MemoryStore::new()));
        store.inject(FaultRule::new(Fault::Delay(Duration::from_secs(30))).times(1));
        let started = tokio::time::Instant::now();
        store.put("k", Bytes::from_static(b"v")).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    /// Faults are injected into the hashed download as into every download, and when none
    /// is, it reaches the wrapped store's own.
    #[tokio::test]
    async fn hashed_downloads_get_faults_and_are_forwarded() {
        use crate::store::testkit::{Spy, check_bounded_reads, check_hashed_downloads};
        let spy = Arc::new(Spy::new(Arc::new(MemoryStore::new())));
        let store = FaultStore::new(spy.clone());
        check_hashed_downloads(&store).await;
        check_bounded_reads(&store).await;
        let (hashed, plain) = spy.counts();
        assert!(hashed > 0 && plain == 0, "hashed {hashed}, plain {plain}");

        store.put("k", Bytes::from_static(b"v")).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        store.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::GetToFile)
                .times(1),
        );
        let calls = store.calls(StoreOp::GetToFile);
        let e = store
            .get_to_file_max_hashed("k", &dest, 1)
            .await
            .unwrap_err();
        assert!(
            e.is_transient() && e.to_string().contains("injected"),
            "{e}"
        );
        assert_eq!(spy.counts().0, hashed, "the wrapped store was not called");
        assert_eq!(store.calls(StoreOp::GetToFile), calls + 1);
        assert!(!dest.exists());

        store.inject(
            FaultRule::new(Fault::LostReply)
                .on(StoreOp::GetToFile)
                .times(1),
        );
        let e = store
            .get_to_file_max_hashed("k", &dest, 1)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reply was lost"), "{e}");
        assert_eq!(spy.counts().0, hashed + 1, "the download was carried out");
        assert_eq!(std::fs::read(&dest).unwrap(), b"v");
    }
}
