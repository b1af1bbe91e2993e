//! Retrying transient failures: exponential backoff with full jitter.

use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreError, StoreOp, StoreResult,
};

/// Retries of object store calls made so far by this process, under any policy.
static RETRIES: AtomicU64 = AtomicU64::new(0);

/// How many times this process has retried an object store call after a transient failure
/// (every [`RetryPolicy::run`] counts here), for metrics.
pub fn retries_total() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

/// How often and how patiently to retry.
///
/// Attempt `n` (counting from 1) that fails transiently is followed by a pause drawn
/// uniformly from `0..=min(max_delay, base_delay * 2^(n-1))` ("full jitter"), so that many
/// clients backing off at once spread out instead of retrying in lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff cap for the first retry; doubles with every further one.
    pub base_delay: Duration,
    /// Upper bound for any single pause.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 8 attempts, pauses capped at 200 ms, 400 ms, … up to 10 s: rides out about half a
    /// minute of throttling or an endpoint restart.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The backoff cap before retry number `retry` (0 for the first retry).
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(31));
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// A random pause for retry number `retry` (0 for the first), full jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let cap = self.backoff_cap(retry);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Runs `call` until it succeeds, fails with a non-transient error, or the attempts are
    /// used up; then returns [`StoreError::RetriesExhausted`] wrapping the last failure.
    pub async fn run<T, F, Fut>(&self, op: StoreOp, key: &str, mut call: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let max_attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let err = match call().await {
                Ok(value) => {
                    if attempt > 1 {
                        tracing::info!(%op, key, attempt, "object store call succeeded after retrying");
                    }
                    return Ok(value);
                }
                Err(err) if err.is_transient() => err,
                Err(err) => return Err(err),
            };
            if attempt >= max_attempts {
                if max_attempts == 1 {
                    return Err(err);
                }
                tracing::error!(%op, key, attempts = attempt, error = %err, "object store call keeps failing; giving up");
                let location = match &err {
                    StoreError::Transient { location, .. } => location.clone(),
                    _ => key.to_owned(),
                };
                return Err(StoreError::RetriesExhausted {
                    op,
                    key: key.to_owned(),
                    location,
                    attempts: attempt,
                    last: Box::new(err),
                });
            }
            let delay = self.delay(attempt - 1);
            RETRIES.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %op,
                key,
                attempt,
                max_attempts,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %err,
                "object store call failed temporarily; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A store decorator that retries [`StoreError::Transient`] failures according to a
/// [`RetryPolicy`], logging every retry; all other errors pass through at once.
///
/// Conditional writes get special care. When an attempt of `put_if_absent` or
/// `put_if_match` failed transiently, the write may have been carried out with only the
/// reply lost, so the next attempt would see its own write and report
/// [`StoreError::PreconditionFailed`]. In that case the object is read back: if it holds
/// exactly the bytes being written, the earlier attempt is taken to have succeeded and its
/// ETag is returned. (Callers that need to tell their write apart from an identical one by
/// another writer must put something unique, such as a writer id, into the object; Tidemark's
/// lease and manifest objects do.)
#[derive(Debug)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryStore { inner, policy }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// A conditional write with the ambiguous-reply resolution described on the type.
    async fn conditional_put<'a, F, Fut>(
        &'a self,
        op: StoreOp,
        key: &'a str,
        data: &'a Bytes,
        mut write: F,
    ) -> StoreResult<ETag>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<ETag>> + 'a,
    {
        let maybe_landed = AtomicBool::new(false);
        let maybe_landed = &maybe_landed;
        self.policy
            .run(op, key, || {
                let attempt = write();
                async move {
                    match attempt.await {
                        Err(e) if e.is_transient() => {
                            maybe_landed.store(true, Ordering::Relaxed);
                            Err(e)
                        }
                        Err(e) if e.is_precondition_failed() && maybe_landed.load(Ordering::Relaxed) => {
                            // An object longer than what was written is not this write's.
                                match self.inner.get_with_meta_max(key, data.len() as u64).await {
                                Ok((current, meta)) if current == *data => {
                                    tracing::info!(
                                        %op,
                                        key,
                                        "an earlier attempt had written the object (its reply was lost); treating the write as done"
                                    );
                                    Ok(meta.etag)
                                }
                                Ok(_) => Err(e),
                                Err(read) if read.is_not_found() => Err(e),
                                Err(StoreError::TooLarge { .. }) => Err(e),
                                Err(read) => Err(read),
                            }
                        }
                        other => other,
                    }
                }
            })
            .await
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.policy
            .run(StoreOp::Put, key, || self.inner.put(key, data.clone()))
            .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.conditional_put(StoreOp::PutIfAbsent, key, &data, || {
            self.inner.put_if_absent(key, data.clone())
        })
        .await
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.conditional_put(StoreOp::PutIfMatch, key, &data, || {
            self.inner.put_if_match(key, data.clone(), etag)
        })
        .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        self.policy
            .run(StoreOp::PutFile, key, || self.inner.put_file(key, path))
            .await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        self.policy
            .run(StoreOp::Get, key, || {
                self.inner.get_with_meta_max(key, max_len)
            })
            .await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.policy
            .run(StoreOp::GetToFile, key, || {
                self.inner.get_to_file(key, path)
            })
            .await
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        self.policy
            .run(StoreOp::GetToFile, key, || {
                self.inner.get_to_file_max(key, path, max_len)
            })
            .await
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        self.policy
            .run(StoreOp::GetToFile, key, || {
                self.inner.get_to_file_hashed(key, path, max_len, cache)
            })
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.policy
            .run(StoreOp::GetRange, key, || {
                self.inner.get_range(key, range.clone())
            })
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.policy
            .run(StoreOp::Head, key, || self.inner.head(key))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.policy
            .run(StoreOp::Delete, key, || self.inner.delete(key))
            .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.policy
            .run(StoreOp::List, prefix, || self.inner.list(prefix))
            .await
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        self.policy
            .run(StoreOp::Head, "", || self.inner.check_object_lock())
            .await
    }

    fn set_object_lock(&self, lock: Option<crate::model::ObjectLock>) {
        self.inner.set_object_lock(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::fault::{Fault, FaultRule, FaultStore};

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }

    fn setup(max_attempts: u32) -> (Arc<FaultStore>, RetryStore) {
        let faults = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let retry = RetryStore::new(faults.clone(), policy(max_attempts));
        (faults, retry)
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let (faults, store) = setup(5);
        store
            .put("seg/1", Bytes::from_static(b"data"))
            .await
            .unwrap();
        faults.inject(FaultRule::new(Fault::Transient).on(StoreOp::Get).times(3));
        let retries_before = retries_total();
        let got = store.get("seg/1").await.unwrap();
        // Other tests of this process may retry at the same time: at least these three.
        assert!(retries_total() >= retries_before + 3);
        assert_eq!(&got[..], b"data");
        assert_eq!(
            faults.calls(StoreOp::Get),
            4,
            "three failures, then success"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_not_retried() {
        let (faults, store) = setup(5);
        let err = store.get("missing").await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(faults.calls(StoreOp::Get), 1);

        faults.inject(FaultRule::new(Fault::AccessDenied).on(StoreOp::Head));
        assert!(store.head("x").await.unwrap_err().is_auth());
        assert_eq!(faults.calls(StoreOp::Head), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_with_a_clear_message() {
        let (faults, store) = setup(4);
        faults.inject(FaultRule::new(Fault::Transient).on(StoreOp::Put));
        let started = tokio::time::Instant::now();
        let err = store
            .put("manifest/current", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert_eq!(faults.calls(StoreOp::Put), 4);
        match &err {
            StoreError::RetriesExhausted {
                op,
                key,
                attempts,
                last,
                ..
            } => {
                assert_eq!(*op, StoreOp::Put);
                assert_eq!(key, "manifest/current");
                assert_eq!(*attempts, 4);
                assert!(last.is_transient());
            }
            other => panic!("expected RetriesExhausted, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("put 'manifest/current'") && msg.contains("failed 4 times"),
            "{msg}"
        );
        // Three pauses, each at most its cap: 100 + 200 + 400 ms.
        assert!(started.elapsed() <= Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn single_attempt_policy_returns_the_error_itself() {
        let (faults, store) = setup(1);
        faults.inject(FaultRule::new(Fault::Transient));
        let err = store.head("k").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(faults.total_calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_reply_of_put_if_absent_counts_as_success() {
        let (faults, store) = setup(5);
        faults.inject(
            FaultRule::new(Fault::LostReply)
                .on(StoreOp::PutIfAbsent)
                .times(1),
        );
        let etag = store
            .put_if_absent("lease", Bytes::from_static(b"holder-a"))
            .await
            .unwrap();
        assert_eq!(store.head("lease").await.unwrap().unwrap().etag, etag);
        assert_eq!(faults.calls(StoreOp::PutIfAbsent), 2);

        // Someone else's object is still a conflict, even after an ambiguous attempt.
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::PutIfAbsent)
                .times(1),
        );
        let err = store
            .put_if_absent("lease", Bytes::from_static(b"holder-b"))
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn lost_reply_of_put_if_match_counts_as_success() {
        let (faults, store) = setup(5);
        let v1 = store
            .put("ptr", Bytes::from_static(b"gen-1"))
            .await
            .unwrap();
        faults.inject(
            FaultRule::new(Fault::LostReply)
                .on(StoreOp::PutIfMatch)
                .times(1),
        );
        let v2 = store
            .put_if_match("ptr", Bytes::from_static(b"gen-2"), &v1)
            .await
            .unwrap();
        assert_ne!(v1, v2);
        assert_eq!(&store.get("ptr").await.unwrap()[..], b"gen-2");
        // A stale ETag without any ambiguity fails at once.
        let err = store
            .put_if_match("ptr", Bytes::from_static(b"gen-3"), &v1)
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let p = policy(10);
        assert_eq!(p.backoff_cap(0), Duration::from_millis(100));
        assert_eq!(p.backoff_cap(1), Duration::from_millis(200));
        assert_eq!(p.backoff_cap(4), Duration::from_millis(1600));
        assert_eq!(p.backoff_cap(5), Duration::from_secs(2));
        assert_eq!(p.backoff_cap(400), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..200).map(|_| p.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "delays are not jittered");
    }

    /// The hashed download is retried like any download, reaches the wrapped store's own
    /// hashed download, and a refusal for size is not retried.
    #[tokio::test(start_paused = true)]
    async fn hashed_downloads_are_forwarded_and_retried() {
        use crate::store::testkit::{Spy, check_bounded_reads, check_hashed_downloads};
        let spy = Arc::new(Spy::new(Arc::new(MemoryStore::new())));
        let faults = Arc::new(FaultStore::new(spy.clone()));
        let store = RetryStore::new(faults.clone(), policy(5));
        check_hashed_downloads(&store).await;
        check_bounded_reads(&store).await;
        let (hashed, plain) = spy.counts();
        assert!(hashed > 0 && plain == 0, "hashed {hashed}, plain {plain}");

        store.put("k", Bytes::from_static(b"data")).await.unwrap();
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::GetToFile)
                .times(2),
        );
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let calls = faults.calls(StoreOp::GetToFile);
        let got = store.get_to_file_max_hashed("k", &dest, 4).await.unwrap();
        assert_eq!(got.sha256, crate::checksum::sha256_hex(b"data"));
        assert_eq!(
            faults.calls(StoreOp::GetToFile),
            calls + 3,
            "two failures, then success"
        );

        let calls = faults.calls(StoreOp::GetToFile);
        std::fs::remove_file(&dest).unwrap();
        let e = store
            .get_to_file_max_hashed("k", &dest, 3)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        assert_eq!(faults.calls(StoreOp::GetToFile), calls + 1);
        assert!(!dest.exists());
    }
}
