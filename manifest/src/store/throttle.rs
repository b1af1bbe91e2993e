//! Bandwidth limits: a token bucket shared by all of a process's uploads, and the store
//! decorator that applies it.
//!
//! [`RateLimiter`] hands out permission to send bytes at a fixed [`Rate`]. Over any
//! interval of `T` seconds it grants at most `rate × T + burst` bytes, where the burst is a
//! quarter of a second's worth (at least 64 KiB): an idle limiter lets a small object go at
//! once, a busy one paces everything to the rate.
//!
//! Two [`Priority`] classes share it. [`Priority::Urgent`] traffic (WAL segments and the
//! small JSON documents: manifest generations, index pages, the lease, the repository
//! config, base descriptors) goes ahead of [`Priority::Bulk`] traffic (base backups' files):
//! while an urgent request waits, no bulk request is granted anything, and bulk bytes are
//! granted in chunks of at most 64 KiB, so a segment waits behind at most one chunk per bulk
//! transfer in flight. Segments bound how much data a lost database host takes with it;
//! bases only bound how long a restore replays, so they take what segments leave. Strict
//! priority means a WAL rate above the limit starves base backups (and the archive lag
//! grows): set the limit well above the database's write rate.
//!
//! [`ThrottleStore`] wraps an [`ObjectStore`]: in-memory writes wait for their whole size
//! before they are sent; [`ObjectStore::put_file`] becomes
//! [`ObjectStore::put_file_paced`], which the S3 store implements by pacing the request
//! body chunk by chunk while it streams (every multipart part too), so a large upload is
//! spread over time instead of sent in one burst. Stores without their own pacing wait for
//! a file's whole size before copying it. Reads are not limited. Wrap the store the
//! requests go to directly (below [`RetryStore`](super::RetryStore)), so a retried attempt
//! is paced again: its bytes cross the network again.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreResult};
use crate::keys::{self, ObjectKind};

/// The largest grant: bulk transfers ask for at most this much at a time.
pub const CHUNK: u64 = 64 * 1024;
/// The lowest accepted rate: enough to ship segments and renew the lease.
pub const MIN_RATE: u64 = 64 * 1024;
/// The burst is this much of a second's worth of the rate (at least [`CHUNK`]).
const BURST_FRACTION: u64 = 4;

/// A transfer rate in bytes per second.
///
/// Written as a number and a unit per second: `50MiB/s`, `1.5 GiB/s`, `500KB/s`,
/// `100Mbit/s`. Byte units are `B`, `KB`/`MB`/`GB` (powers of 1000) and `KiB`/`MiB`/`GiB`
/// (powers of 1024); bit units are `bit`, `kbit`, `Mbit`, `Gbit` (powers of 1000, as
/// network links are rated). `Mb` and `mb` are refused as ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

/// A rate that could not be parsed or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate {input:?}: {reason}")]
pub struct RateError {
    /// What was given.
    pub input: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

impl Rate {
    /// A rate of `bytes` per second; at least [`MIN_RATE`].
    pub fn bytes_per_sec(bytes: u64) -> Result<Rate, RateError> {
        Rate::checked(bytes, &format!("{bytes}B/s"))
    }

    fn checked(bytes: u64, input: &str) -> Result<Rate, RateError> {
        if bytes < MIN_RATE {
            return Err(RateError {
                input: input.to_owned(),
                reason: format!(
                    "the lowest accepted rate is 64KiB/s ({MIN_RATE} bytes per second), enough \
                     to ship WAL segments and renew the lease; leave the limit out for no limit"
                ),
            });
        }
        Ok(Rate(bytes))
    }

    /// Bytes per second.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Rate, RateError> {
        let err = |reason: String| RateError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        let Some(body) = s.strip_suffix("/s") else {
            return Err(err(
                "write a unit per second, such as 50MiB/s, 500KB/s or 100Mbit/s".into(),
            ));
        };
        let split = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (number, unit) = (&body[..split], body[split..].trim());
        let value: f64 = number
            .parse()
            .map_err(|_| err("it must start with a number, such as 50MiB/s or 1.5GiB/s".into()))?;
        let bytes_per_unit: f64 = match unit {
            "B" => 1.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            u => match u.to_ascii_lowercase().as_str() {
                "bit" => 1.0 / 8.0,
                "kbit" => 1e3 / 8.0,
                "mbit" => 1e6 / 8.0,
                "gbit" => 1e9 / 8.0,
                "kb" | "mb" | "gb" | "b" => {
                    return Err(err(format!(
                        "'{u}' could mean bits or bytes: write {u}it/s for bits or {}/s for \
                         bytes",
                        u.to_ascii_uppercase()
                    )));
                }
                "" => {
                    return Err(err(
                        "it needs a unit, such as 50MiB/s, 500KB/s or 100Mbit/s".into(),
                    ));
                }
                _ => {
                    return Err(err(format!(
                        "unknown unit '{u}'; use B, KB, MB, GB, KiB, MiB, GiB (bytes) or bit, \
                         kbit, Mbit, Gbit (bits)"
                    )));
                }
            },
        };
        let bytes = value * bytes_per_unit;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("the rate is too large".into()));
        }
        Rate::checked(bytes.round() as u64, input)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}/s", self.0 / size);
            }
        }
        write!(f, "{}B/s", self.0)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which traffic goes first when both wait (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Small and time-critical: WAL segments and documents.
    Urgent,
    /// Large and patient: base backups' files.
    Bulk,
}

impl Priority {
    /// The class of an upload to `key`, by the repository layout (FORMAT.md §2).
    pub fn of_key(key: &str) -> Priority {
        match keys::object_kind(key) {
            ObjectKind::Segment | ObjectKind::Document => Priority::Urgent,
            ObjectKind::BaseData | ObjectKind::Other => Priority::Bulk,
        }
    }

    fn index(self) -> usize {
        match self {
            Priority::Urgent => 0,
            Priority::Bulk => 1,
        }
    }
}

/// A token bucket shared by every clone (see the module documentation).
#[derive(Clone)]
pub struct RateLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    rate: Rate,
    /// Bucket size, bytes.
    capacity: f64,
    bucket: Mutex<Bucket>,
    /// Signalled when the last waiting urgent request is done.
    urgent_done: Notify,
    /// One request of each class takes tokens at a time, in arrival order.
    turns: [tokio::sync::Mutex<()>; 2],
}

struct Bucket {
    tokens: f64,
    updated: Instant,
    urgent_waiting: usize,
    granted: [u64; 2],
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate", &self.shared.rate)
            .field("burst", &self.burst())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter granting `rate`, starting with a full bucket.
    pub fn new(rate: Rate) -> Self {
        let capacity = (rate.get() / BURST_FRACTION).max(CHUNK);
        RateLimiter {
            shared: Arc::new(Shared {
                rate,
                capacity: capacity as f64,
                bucket: Mutex::new(Bucket {
                    tokens: capacity as f64,
                    updated: Instant::now(),
                    urgent_waiting: 0,
                    granted: [0; 2],
                }),
                urgent_done: Notify::new(),
                turns: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            }),
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.shared.rate
    }

    /// The most bytes granted at once after a pause: `rate / 4`, at least [`CHUNK`].
    pub fn burst(&self) -> u64 {
        self.shared.capacity as u64
    }

    /// Bytes granted so far to the given class.
    pub fn granted(&self, priority: Priority) -> u64 {
        self.lock().granted[priority.index()]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // The bucket holds plain numbers; a panic elsewhere cannot leave it inconsistent.
        self.shared
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `bytes` may be sent. Cancel-safe: dropping the future gives up the wait
    /// (bytes already granted stay spent).
    pub async fn acquire(&self, bytes: u64, priority: Priority) {
        if bytes == 0 {
            return;
        }
        let _urgent = (priority == Priority::Urgent).then(|| UrgentWaiting::new(self));
        let _turn = self.shared.turns[priority.index()].lock().await;
        let mut left = bytes;
        while left > 0 {
            let chunk = left.min(CHUNK);
            self.take(chunk, priority).await;
            left -= chunk;
        }
    }

    async fn take(&self, chunk: u64, priority: Priority) {
        let rate = self.shared.rate.get() as f64;
        loop {
            let urgent_done = self.shared.urgent_done.notified();
            tokio::pin!(urgent_done);
            urgent_done.as_mut().enable();
            let wait = {
                let mut b = self.lock();
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
                b.tokens = (b.tokens + elapsed * rate).min(self.shared.capacity);
                b.updated = now;
                if priority == Priority::Bulk && b.urgent_waiting > 0 {
                    None
                } else if b.tokens >= chunk as f64 {
                    b.tokens -= chunk as f64;
                    b.granted[priority.index()] += chunk;
                    return;
                } else {
                    // Round up to the microsecond so the wake-up finds enough tokens.
                    let missing = chunk as f64 - b.tokens;
                    Some(Duration::from_micros(
                        (missing / rate * 1e6).ceil() as u64 + 1,
                    ))
                }
            };
            match wait {
                None => urgent_done.await,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// Counts an urgent request as waiting while it lives, so bulk requests hold back.
struct UrgentWaiting<'a>(&'a RateLimiter);

impl<'a> UrgentWaiting<'a> {
    fn new(limiter: &'a RateLimiter) -> Self {
        limiter.lock().urgent_waiting += 1;
        UrgentWaiting(limiter)
    }
}

impl Drop for UrgentWaiting<'_> {
    fn drop(&mut self) {
        let mut b = self.0.lock();
        b.urgent_waiting -= 1;
        if b.urgent_waiting == 0 {
            drop(b);
            self.0.shared.urgent_done.notify_waiters();
        }
    }
}

/// A limiter together with the class of one upload: what
/// [`ObjectStore::put_file_paced`] hands every chunk of a body to.
#[derive(Debug, Clone)]
pub struct Pacer {
    limiter: RateLimiter,
    priority: Priority,
}

impl Pacer {
    /// Paces with `limiter` in class `priority`.
    pub fn new(limiter: RateLimiter, priority: Priority) -> Self {
        Pacer { limiter, priority }
    }

    /// The limiter's rate.
    pub fn rate(&self) -> Rate {
        self.limiter.rate()
    }

    /// Waits until `bytes` more may be sent.
    pub async fn wait(&self, bytes: u64) {
        self.limiter.acquire(bytes, self.priority).await;
    }

    /// A future that waits for `bytes`, owning what it needs.
    pub(crate) fn wait_owned(&self, bytes: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let pacer = self.clone();
        Box::pin(async move { pacer.wait(bytes).await })
    }
}

/// A store decorator limiting the bytes uploaded to a [`RateLimiter`] (see the module
/// documentation). Every other call passes through untouched.
#[derive(Debug)]
pub struct ThrottleStore {
    inner: Arc<dyn ObjectStore>,
    uploads: RateLimiter,
}

impl ThrottleStore {
    /// Wraps `inner`; uploads draw on `uploads`.
    pub fn new(inner: Arc<dyn ObjectStore>, uploads: RateLimiter) -> Self {
        ThrottleStore { inner, uploads }
    }

    /// The limiter in force.
    pub fn limiter(&self) -> &RateLimiter {
        &self.uploads
    }

    async fn before_put(&self, key: &str, data: &Bytes) {
        self.uploads
            .acquire(data.len() as u64, Priority::of_key(key))
            .await;
    }
}

#[async_trait]
impl ObjectStore for ThrottleStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.before_put(key, &data).await;
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.before_put(key, &data).await;
        self.inner.put_if_absent(key, data).await
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.before_put(key, &data).await;
        self.inner.put_if_match(key, data, etag).await
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        let pacer = Pacer::new(self.uploads.clone(), Priority::of_key(key));
        self.inner.put_file_paced(key, path, &pacer).await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        self.inner.get_with_meta_max(key, max_len).await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.inner.get_to_file(key, path).await
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        self.inner.get_to_file_max(key, path, max_len).await
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        self.inner
            .get_to_file_hashed(key, path, max_len, cache)
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        self.inner.check_object_lock().await
    }

    fn set_object_lock(&self, lock: Option<crate::model::ObjectLock>) {
        self.inner.set_object_lock(lock);
    }
}

/// An HTTP body that hands every data frame of `inner` to a [`Pacer`] before passing it on:
/// how the S3 store paces an upload while it streams.
pub(crate) struct PacedBody<B> {
    inner: B,
    pacer: Pacer,
    /// The frame being paced and the wait for it. In a mutex only so the body is `Sync`
    /// (the SDK needs that); it is only ever reached through `&mut self`.
    pending: Mutex<Option<PendingFrame>>,
}

type PendingFrame = (
    http_body::Frame<Bytes>,
    Pin<Box<dyn Future<Output = ()> + Send>>,
);

impl<B> PacedBody<B> {
    pub(crate) fn new(inner: B, pacer: Pacer) -> Self {
        PacedBody {
            inner,
            pacer,
            pending: Mutex::new(None),
        }
    }
}

impl<B> http_body::Body for PacedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let pending = this
            .pending
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some((_, wait)) = pending.as_mut() {
                std::task::ready!(wait.as_mut().poll(cx));
                let (frame, _) = pending.take().expect("a pending frame");
                return Poll::Ready(Some(Ok(frame)));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len == 0 {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    *pending = Some((frame, this.pacer.wait_owned(len)));
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.pending.lock().map_or(true, |p| p.is_none())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const MIB: u64 = 1024 * 1024;

    fn rate(s: &str) -> u64 {
        s.parse::<Rate>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .get()
    }

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(rate("50MiB/s"), 50 * MIB);
        assert_eq!(rate(" 1.5 GiB/s "), 3 * 512 * MIB);
        assert_eq!(rate("500KB/s"), 500_000);
        assert_eq!(rate("500kB/s"), 500_000);
        assert_eq!(rate("100Mbit/s"), 12_500_000);
        assert_eq!(rate("1gbit/s"), 125_000_000);
        assert_eq!(rate("65536B/s"), 65536);
        assert_eq!(rate("64KiB/s"), MIN_RATE);
        for (bad, needle) in [
            ("50MiB", "per second"),
            ("fast/s", "number"),
            ("50/s", "needs a unit"),
            ("50Mb/s", "bits or bytes"),
            ("50mb/s", "bits or bytes"),
            ("50parsecs/s", "unknown unit"),
            ("1KiB/s", "lowest accepted rate"),
            ("0MiB/s", "lowest accepted rate"),
            ("99999999999999999999999GiB/s", "too large"),
        ] {
            let e = bad.parse::<Rate>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(e.contains(bad.trim()), "{bad}: {e}");
        }
    }

    #[test]
    fn rates_print_and_round_trip() {
        for s in ["50MiB/s", "64KiB/s", "2GiB/s", "500000B/s"] {
            let r: Rate = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Rate>(&json).unwrap(), r);
        }
        let e = serde_json::from_str::<Rate>("\"3Mb/s\"").unwrap_err();
        assert!(e.to_string().contains("bits or bytes"), "{e}");
    }

    #[test]
    fn priority_follows_the_layout() {
        for key in [
            "wal/0000000000000001.seg",
            "manifest/0000000000000002.json",
            "manifest/latest.json",
            "index/0000000000000001-0000000000000009.json",
            "lease.json",
            "tidemark.json",
            "bases/b20261123T133000Z-0a1b2c3d/base.json",
        ] {
            assert_eq!(Priority::of_key(key), Priority::Urgent, "{key}");
        }
        for key in [
            "sst/0f3a",
            "bases/b20261123T133000Z-0a1b2c3d/files/MANIFEST-000005",
            "something/else",
        ] {
            assert_eq!(Priority::of_key(key), Priority::Bulk, "{key}");
        }
    }

    /// Seconds since `start` on tokio's (paused) clock.
    fn secs(start: Instant) -> f64 {
        start.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_transfer_takes_its_size_over_the_rate() {
        let limiter = RateLimiter::new(Rate::bytes_per_sec(MIB).unwrap());
        assert_eq!(limiter.burst(), MIB / 4);
        let start = Instant::now();
        limiter.acquire(10 * MIB, Priority::Bulk).await;
        // The first quarter MiB is the burst; the rest comes at 1 MiB/s.
        let took = secs(start);
        assert!((9.75..9.76).contains(&took), "{took}");
        assert_eq!(limiter.granted(Priority::Bulk), 10 * MIB);

        // After an idle second the bucket is full again, but never fuller.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let start = Instant::now();
        limiter.acquire(MIB / 4, Priority::Bulk).await;
        assert_eq!(secs(start), 0.0);
        limiter.acquire(MIB / 2, Priority::Urgent).await;
        assert!((0.5..0.51).contains(&secs(start)), "{}", secs(start));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_transfers_share_the_rate() {
        let limiter = RateLimiter::new(Rate::bytes_per_sec(2 * MIB).unwrap());
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move { l.acquire(3 * MIB, Priority::Bulk).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 12 MiB at 2 MiB/s, minus the half-MiB burst.
        let took = secs(start);
        assert!((5.75..5.76).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_requests_go_ahead_of_bulk_ones() {
        let limiter = RateLimiter::new(Rate::bytes_per_sec(MIB).unwrap());
        let start = Instant::now();
        let bulk: Vec<_> = (0..3)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move {
                    l.acquire(4 * MIB, Priority::Bulk).await;
                    secs(start)
                })
            })
            .collect();
        // Two seconds into a 12 MiB bulk backlog (12 s of it), a 256 KiB segment arrives.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let arrived = secs(start);
        limiter.acquire(256 * 1024, Priority::Urgent).await;
        let waited = secs(start) - arrived;
        // It waits for its own bytes only (a quarter second), not for the backlog.
        assert!(waited <= 0.26, "the segment waited {waited} s");
        let mut bulk_done = Vec::new();
        for t in bulk {
            bulk_done.push(t.await.unwrap());
        }
        // The bulk transfers finish later by exactly the time the segment took.
        let last = bulk_done.iter().cloned().fold(0.0, f64::max);
        assert!((12.0..12.01).contains(&last), "{bulk_done:?}");
        assert_eq!(limiter.granted(Priority::Urgent), 256 * 1024);
        assert_eq!(limiter.granted(Priority::Bulk), 12 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_urgent_wait_releases_bulk_traffic() {
        let limiter = RateLimiter::new(Rate::bytes_per_sec(MIN_RATE).unwrap());
        limiter.acquire(CHUNK, Priority::Bulk).await; // empty the bucket
        let urgent = {
            let l = limiter.clone();
            tokio::spawn(async move { l.acquire(10 * MIB, Priority::Urgent).await })
        };
        tokio::task::yield_now().await;
        urgent.abort();
        assert!(urgent.await.unwrap_err().is_cancelled());
        let start = Instant::now();
        limiter.acquire(CHUNK, Priority::Bulk).await;
        assert!(secs(start) <= 1.01, "{}", secs(start));
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_paces_writes_and_leaves_reads_alone() {
        let inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let limiter = RateLimiter::new(Rate::bytes_per_sec(MIB).unwrap());
        let store = ThrottleStore::new(inner, limiter.clone());
        let start = Instant::now();
        let data = Bytes::from(vec![7u8; (2 * MIB) as usize]);
        store.put("sst/a", data.clone()).await.unwrap();
        store
            .put_if_absent("wal/0000000000000001.seg", data.clone())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, &data).unwrap();
        store.put_file("sst/b", &file).await.unwrap();
        let took = secs(start);
        assert!((5.75..5.76).contains(&took), "{took}");
        assert_eq!(limiter.granted(Priority::Bulk), 4 * MIB);
        assert_eq!(limiter.granted(Priority::Urgent), 2 * MIB);
        let start = Instant::now();
        assert_eq!(store.get("sst/b").await.unwrap(), data);
        assert_eq!(secs(start), 0.0);
    }

    /// The hashed download reaches the wrapped store's own, and like every read it is
    /// not limited: nothing is drawn from the limiter.
    #[tokio::test]
    async fn hashed_downloads_are_forwarded_unpaced() {
        use crate::store::testkit::{Spy, check_bounded_reads, check_hashed_downloads};
        let spy = Arc::new(Spy::new(Arc::new(MemoryStore::new())));
        let limiter = RateLimiter::new(Rate::bytes_per_sec(1 << 30).unwrap());
        let store = ThrottleStore::new(spy.clone(), limiter.clone());
        let granted = limiter.granted(Priority::Bulk) + limiter.granted(Priority::Urgent);
        check_hashed_downloads(&store).await;
        let (hashed, plain) = spy.counts();
        assert!(hashed > 0 && plain == 0, "hashed {hashed}, plain {plain}");
        // The puts of the check drew on it; the downloads did not.
        let puts = 3 + (3 * MIB + 17);
        assert_eq!(
            limiter.granted(Priority::Bulk) + limiter.granted(Priority::Urgent),
            granted + puts
        );
        check_bounded_reads(&store).await;
    }
}
