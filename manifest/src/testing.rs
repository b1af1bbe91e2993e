//! Fixtures for tests of the crates that read and write repositories: manifest entries with
//! plain values (a test sets the fields it cares about with struct update syntax, e.g.
//! `SegmentEntry { raw_size: 100, ..testing::segment(1, 10, t, t) }`), and the S3 test
//! server's bucket. Built for this crate's own tests and, with the `testing` feature, for
//! the other crates' tests; the programs never use it.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;

use crate::keys;
use crate::model::{
    self, BaseColumnFamily, BaseDescriptor, BaseFile, BaseSummary, ColumnFamily, Compression,
    FORMAT_VERSION, Gap, GapKind, Generation, Lineage, ObjectRef, RepositoryConfig, Retention,
    SegmentEntry, TimeSource, Writer, time_from_micros,
};
use crate::repo::Repository;
use crate::segment::{EncodedSegment, Record, RecordTime, SegmentBuilder};
use crate::store::{ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreResult};

/// The instant fixtures' times count from (2027-01-15T08:00:00Z), in unix microseconds.
pub const T0_US: i64 = 1_800_000_000_000_000;

/// [`T0_US`] plus `sec` seconds.
pub fn at_secs(sec: i64) -> OffsetDateTime {
    time_from_micros(T0_US + sec * 1_000_000)
}

/// A segment of sequences `first..=last` whose records span `first_time..=last_time`, under
/// its key: one record from log 1, 1 byte raw and 10 stored, no sha256 (as found by the tail
/// walk).
pub fn segment(
    first: u64,
    last: u64,
    first_time: OffsetDateTime,
    last_time: OffsetDateTime,
) -> SegmentEntry {
    SegmentEntry {
        key: keys::segment_key(first),
        first_seq: first,
        last_seq: last,
        record_count: 1,
        first_time,
        last_time,
        time_source: TimeSource::Observed,
        first_log: 1,
        last_log: 1,
        raw_size: 1,
        stored_size: 10,
        sha256: None,
    }
}

/// A base backup `id` that replays the WAL from `replay_from` and restores to `earliest` at
/// the earliest, taken (and restoring) at `at`: log 1, no column family, nothing stored,
/// its descriptor (1 byte, sha256 all zeros) under its key.
pub fn base(id: &str, replay_from: u64, earliest: u64, at: OffsetDateTime) -> BaseSummary {
    BaseSummary {
        id: id.into(),
        created_at: at,
        descriptor: ObjectRef {
            key: keys::base_descriptor_key(id),
            size: 1,
            sha256: "0".repeat(64),
        },
        min_log_number: 1,
        replay_from_seq: replay_from,
        earliest_seq: earliest,
        earliest_time: at,
        column_families: Vec::new(),
        total_size: 0,
    }
}

/// The default column family, as a base lists it.
pub fn default_cf() -> Vec<ColumnFamily> {
    vec![ColumnFamily {
        id: 0,
        name: "default".into(),
    }]
}

/// A gap of `kind` over `first..=last`, detected at [`T0_US`].
pub fn gap(first: u64, last: u64, kind: GapKind) -> Gap {
    Gap {
        first_seq: first,
        last_seq: last,
        kind,
        detected_at: at_secs(0),
        detail: "test".into(),
    }
}

/// A writer that is no running process.
pub fn writer() -> Writer {
    Writer {
        host: "test".into(),
        pid: 1,
        version: "0".into(),
    }
}

/// Generation `n` of repository `repo-1`, written at `written_at`: no base, index page or
/// gap, the tail from sequence 1.
pub fn generation(n: u64, written_at: OffsetDateTime) -> Generation {
    Generation {
        format_version: FORMAT_VERSION,
        generation: n,
        repository_id: "repo-1".into(),
        written_at,
        writer: writer(),
        time_precision: TimeSource::Observed,
        bases: Vec::new(),
        index_pages: Vec::new(),
        tail_start_seq: 1,
        gaps: Vec::new(),
        retention: Retention::default(),
    }
}

/// The config of repository `repo-1` for database `db-1`, created at [`T0_US`], zstd
/// segments, not encrypted.
pub fn config() -> RepositoryConfig {
    RepositoryConfig {
        format_version: FORMAT_VERSION,
        repository_id: "repo-1".into(),
        created_at: at_secs(0),
        database_identity: "db-1".into(),
        lineage: Lineage {
            id: "lin-1".into(),
            parent: None,
        },
        segment_compression: Compression::Zstd,
        encryption: None,
        object_lock: None,
    }
}

/// An encoded segment of one-put records, one a sequence, `first..=last`: from log 10, the
/// record of sequence `s` written at [`T0_US`] + `s` ms.
pub fn encoded_segment(first: u64, last: u64) -> EncodedSegment {
    let mut b = SegmentBuilder::new(Compression::Zstd, 3).expect("zstd level 3");
    for seq in first..=last {
        let mut batch = seq.to_le_bytes().to_vec();
        batch.extend_from_slice(&1u32.to_le_bytes());
        batch.extend_from_slice(&[0x01, 1, b'k', 1, b'v']);
        b.push(&Record {
            seq,
            count: 1,
            time_us: T0_US + seq as i64 * 1000,
            time_source: RecordTime::Observed,
            log_number: 10,
            log_offset: seq * 100,
            batch,
        })
        .expect("records in order");
    }
    b.finish().expect("a segment of at least one record")
}

/// Writes a base backup of database `db-1` into `repo` (its descriptor and one file,
/// `CURRENT`) that restores to `earliest` at the earliest and replays from sequence 1 and
/// log 10; returns its summary for a generation. Panics when the store fails.
pub async fn write_base(repo: &Repository, earliest: u64) -> BaseSummary {
    let store = repo.store();
    let current = b"MANIFEST-000005\n";
    let id = keys::new_base_id(at_secs(0));
    let file_key = keys::base_file_key(&id, "CURRENT");
    store
        .put(&file_key, Bytes::from_static(current))
        .await
        .expect("writing a base file");
    let d = BaseDescriptor {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        created_at: at_secs(0),
        database_identity: "db-1".into(),
        min_log_number: 10,
        replay_from_seq: 1,
        earliest_seq: earliest,
        earliest_time: time_from_micros(T0_US + earliest as i64 * 1000),
        next_file_number: 12,
        column_families: vec![BaseColumnFamily {
            id: 0,
            name: "default".into(),
            log_number: 10,
        }],
        files: vec![BaseFile {
            name: "CURRENT".into(),
            size: current.len() as u64,
            sha256: crate::checksum::sha256_hex(current),
            key: file_key,
        }],
    };
    let bytes = model::to_document_bytes(&d);
    let key = keys::base_descriptor_key(&id);
    store
        .put(&key, Bytes::from(bytes.clone()))
        .await
        .expect("writing a base descriptor");
    BaseSummary {
        id,
        created_at: d.created_at,
        descriptor: ObjectRef {
            key,
            size: bytes.len() as u64,
            sha256: crate::checksum::sha256_hex(&bytes),
        },
        min_log_number: 10,
        replay_from_seq: 1,
        earliest_seq: earliest,
        earliest_time: d.earliest_time,
        column_families: default_cf(),
        total_size: current.len() as u64,
    }
}

/// A store that passes everything to `inner` and counts the downloads to a bounded file,
/// hashed ([`ObjectStore::get_to_file_max_hashed`]) or not: shows that a decorator above
/// it forwards the hashed download, or that a caller uses it. It also records the bound
/// of every download to a file ([`SpyStore::bounds`]).
#[derive(Debug)]
pub struct SpyStore {
    inner: Arc<dyn ObjectStore>,
    hashed: AtomicU64,
    plain: AtomicU64,
    bounds: std::sync::Mutex<Vec<Option<u64>>>,
}

impl SpyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> SpyStore {
        SpyStore {
            inner,
            hashed: AtomicU64::new(0),
            plain: AtomicU64::new(0),
            bounds: std::sync::Mutex::default(),
        }
    }

    /// The bound of each download to a file so far, in order (`None`: unbounded).
    pub fn bounds(&self) -> Vec<Option<u64>> {
        self.bounds.lock().expect("bounds lock").clone()
    }

    fn bound(&self, max: Option<u64>) {
        self.bounds.lock().expect("bounds lock").push(max);
    }

    /// (hashed, plain) bounded downloads so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hashed.load(Ordering::Relaxed),
            self.plain.load(Ordering::Relaxed),
        )
    }
}

#[async_trait]
impl ObjectStore for SpyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.inner.put_if_absent(key, data).await
    }
    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.inner.put_if_match(key, data, etag).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        self.inner.put_file(key, path).await
    }
    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        self.inner.get_with_meta_max(key, max_len).await
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.bound(None);
        self.inner.get_to_file(key, path).await
    }
    async fn get_to_file_max(&self, key: &str, path: &Path, max: u64) -> StoreResult<u64> {
        self.plain.fetch_add(1, Ordering::Relaxed);
        self.bound(Some(max));
        self.inner.get_to_file_max(key, path, max).await
    }
    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        self.hashed.fetch_add(1, Ordering::Relaxed);
        self.bound(Some(max));
        self.inner.get_to_file_hashed(key, path, max, cache).await
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
}

/// The S3 server tests run against (`scripts/s3-server.sh` starts one; its `env` command
/// exports `TIDEMARK_TEST_S3_ENDPOINT` and the credentials), and the bucket they share.
pub mod s3 {
    use crate::store::{S3Options, S3Store};

    /// The S3 endpoint to test against, or `None` (after saying so loudly) when no server
    /// was started, for the caller to skip `case`. Panics (fails the test) instead when
    /// `TIDEMARK_REQUIRE_S3=1`.
    pub fn endpoint(case: &str) -> Option<String> {
        match std::env::var("TIDEMARK_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
            _ => {
                if std::env::var("TIDEMARK_REQUIRE_S3").as_deref() == Ok("1") {
                    panic!(
                        "TIDEMARK_REQUIRE_S3=1 but TIDEMARK_TEST_S3_ENDPOINT is not set: start \
                         a server with `scripts/s3-server.sh start` and run \
                         `eval \"$(scripts/s3-server.sh env)\"` first"
                    );
                }
                eprintln!(
                    "!!! SKIPPED {case}: no S3 server (set TIDEMARK_TEST_S3_ENDPOINT, see \
                     scripts/s3-server.sh; TIDEMARK_REQUIRE_S3=1 makes this a failure)"
                );
                None
            }
        }
    }

    /// Path-style options for the test server at `endpoint`.
    pub fn options(endpoint: &str) -> S3Options {
        S3Options {
            endpoint_url: Some(endpoint.to_owned()),
            force_path_style: true,
            ..S3Options::default()
        }
    }

    /// The test server's bucket could not be created.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot create the test bucket {bucket} at {endpoint}: {detail}")]
    pub struct BucketError {
        pub bucket: String,
        pub endpoint: String,
        pub detail: String,
    }

    /// The bucket the tests of this process share on the server at `endpoint`: the one
    /// named by `TIDEMARK_TEST_S3_BUCKET`, used as it is and never created, or else one
    /// created on first use. Each test takes its own prefix in it ([`prefix`]).
    pub async fn bucket(endpoint: &str) -> Result<String, BucketError> {
        static BUCKET: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
        BUCKET
            .get_or_try_init(|| async {
                if let Ok(given) = std::env::var("TIDEMARK_TEST_S3_BUCKET")
                    && !given.is_empty()
                {
                    return Ok(given);
                }
                let bucket = format!(
                    "tidemark-test-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                create(endpoint, &bucket).await?;
                Ok(bucket)
            })
            .await
            .cloned()
    }

    /// A bucket with S3 Object Lock enabled that the tests of this process share on the
    /// server at `endpoint`: the one named by `TIDEMARK_TEST_S3_LOCK_BUCKET`, used as it is,
    /// or else one created on first use (with Object Lock, hence versioning, enabled).
    pub async fn lock_bucket(endpoint: &str) -> Result<String, BucketError> {
        static BUCKET: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
        BUCKET
            .get_or_try_init(|| async {
                if let Ok(given) = std::env::var("TIDEMARK_TEST_S3_LOCK_BUCKET")
                    && !given.is_empty()
                {
                    return Ok(given);
                }
                let bucket = format!(
                    "tidemark-lock-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                create_with(endpoint, &bucket, true).await?;
                Ok(bucket)
            })
            .await
            .cloned()
    }

    /// A fresh prefix for `case`, under `TIDEMARK_TEST_S3_PREFIX` when that is set (so that
    /// a shared bucket's tests stay in one folder of it).
    pub fn prefix(case: &str) -> String {
        let base = std::env::var("TIDEMARK_TEST_S3_PREFIX").unwrap_or_default();
        let base = base.trim_matches('/');
        let under = if base.is_empty() { "" } else { "/" };
        format!("{base}{under}{case}-{:08x}", rand::random::<u32>())
    }

    /// Creates `bucket` on the server at `endpoint`; one that is there already is fine.
    pub async fn create(endpoint: &str, bucket: &str) -> Result<(), BucketError> {
        create_with(endpoint, bucket, false).await
    }

    /// Creates `bucket`, with S3 Object Lock enabled when `object_lock`.
    async fn create_with(
        endpoint: &str,
        bucket: &str,
        object_lock: bool,
    ) -> Result<(), BucketError> {
        let error = |detail: String| BucketError {
            bucket: bucket.to_owned(),
            endpoint: endpoint.to_owned(),
            detail,
        };
        let store = S3Store::connect(bucket, "", &options(endpoint))
            .await
            .map_err(|e| error(e.to_string()))?;
        let request = store.client().create_bucket().bucket(bucket);
        let request = if object_lock {
            request.object_lock_enabled_for_bucket(true)
        } else {
            request
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(error(format!("{e:?}"))),
        }
    }
}

/// The bytes of `path` in the page cache, as util-linux's `fincore` counts them (for tests
/// of what is written around the cache).
pub fn bytes_cached(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(out.status.success(), "fincore {}: {out:?}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("fincore printed {text:?}: {e}"))
}

/// The share of `path`'s bytes in the page cache ([`bytes_cached`]).
pub fn share_cached(path: &Path) -> f64 {
    let len = std::fs::metadata(path).expect("the file exists").len();
    bytes_cached(path) as f64 / len.max(1) as f64
}
