//! Object stores: where a Tidemark repository lives.
//!
//! One small async trait, [`ObjectStore`], with these implementations:
//!
//! - [`LocalStore`] (`file:///ABSOLUTE/DIR`): a directory on a local or mounted file system,
//!   the embedded default. Writes are atomic and durable; conditional writes are atomic
//!   across processes.
//! - [`S3Store`] (`s3://BUCKET[/PREFIX]`): Amazon S3 or any S3-compatible server, with the
//!   standard AWS credential chain, conditional writes (`If-None-Match` / `If-Match`),
//!   parallel multipart uploads and ranged reads.
//! - [`MemoryStore`]: in memory, for tests.
//!
//! and decorators that wrap an `Arc<dyn ObjectStore>`:
//!
//! - [`RetryStore`]: retries transient failures with exponential backoff and full jitter.
//! - [`ThrottleStore`]: limits the upload rate with a token bucket shared by all uploads,
//!   segments and documents ahead of base files ([`throttle`]).
//! - [`CryptStore`]: client-side authenticated encryption of every object but
//!   `tidemark.json` (FORMAT.md §10), transparent to the layers above.
//! - [`fault::FaultStore`]: injects failures, for tests and failure drills.
//!
//! [`StoreUrl`] parses store URLs and [`open_store`] turns one into a ready store (wrapped
//! in the retry layer, and the throttle when an upload rate is set).
//!
//! ## Keys
//!
//! Keys are relative to the store's root (directory or bucket prefix) and `/`-separated, such
//! as `segments/000001.seg`. [`validate_key`] defines what is accepted; every store checks it
//! before touching anything, so a repository can be copied between stores unchanged.
//!
//! ## ETags
//!
//! Every write returns the new object's [`ETag`], an opaque version tag: it changes whenever
//! the object is replaced. [`ObjectStore::put_if_match`] replaces an object only if its ETag
//! is still the one given, which is what leases and compare-and-swap pointers are built on.
//! ETags are only comparable within one store.

pub mod crypt;
mod direct;
mod error;
pub mod fault;
mod local;
mod memory;
pub mod probe;
mod retry;
mod s3;
#[cfg(test)]
pub(crate) mod testkit;
pub mod throttle;
mod url;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::model::ObjectLock;

pub use self::url::StoreUrl;
pub use crypt::{CryptError, CryptStore, EncryptionKey, EncryptionKeyError};
pub use error::{BoxError, StoreError, StoreOp};
pub use local::LocalStore;
pub(crate) use local::local_temp_path;
pub use memory::MemoryStore;
pub use retry::{RetryPolicy, RetryStore, retries_total};
pub use s3::{S3Options, S3Store, Sse};
pub use throttle::{Pacer, Priority, Rate, RateLimiter, ThrottleStore};

/// Result type of the store layer.
pub type StoreResult<T> = Result<T, StoreError>;

/// An object's version tag, as returned by the store.
///
/// Opaque: compare it, store it, hand it back to [`ObjectStore::put_if_match`]; never parse
/// it. For S3 it is the server's ETag verbatim (including its quotes); for the local store
/// see [`LocalStore`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(String);

impl ETag {
    /// Wraps an ETag string exactly as the store returned it.
    pub fn new(tag: impl Into<String>) -> Self {
        ETag(tag.into())
    }

    /// The ETag string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the store.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Version tag.
    pub etag: ETag,
    /// When the store says the object was written (S3's `Last-Modified`, a file's
    /// modification time), where it says so.
    pub last_modified: Option<time::OffsetDateTime>,
}

/// An object store holding one Tidemark repository.
///
/// Implementations are cheap to share: use them as `Arc<dyn ObjectStore>`. All methods take
/// keys relative to the store's root and check them with [`validate_key`] first.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// A human-readable description for messages, e.g.
    /// `s3://bucket/prefix (endpoint http://127.0.0.1:9000)` or `file:///srv/repo`.
    fn describe(&self) -> String;

    /// Writes an object, replacing any existing one. The object appears whole or not at all.
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag>;

    /// Creates an object only if the key does not exist yet. If it does, fails with
    /// [`StoreError::PreconditionFailed`] and leaves the existing object untouched. Of several
    /// concurrent callers (in any process) exactly one succeeds.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag>;

    /// Replaces an object only if its current ETag is `etag`. Fails with
    /// [`StoreError::PreconditionFailed`] when the ETag differs and with
    /// [`StoreError::NotFound`] when the object does not exist.
    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag>;

    /// Uploads a local file, streaming it from disk (large files go up in parallel parts on
    /// S3). Replaces any existing object.
    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag>;

    /// Like [`ObjectStore::put_file`], sending no byte before `pacer` allows it. Stores
    /// that stream from disk pace the body chunk by chunk as it is sent (S3); the default
    /// waits for the whole file's size, then uploads it.
    async fn put_file_paced(&self, key: &str, path: &Path, pacer: &Pacer) -> StoreResult<ETag> {
        // A missing file is reported by `put_file` itself.
        let len = tokio::fs::metadata(path).await.map_or(0, |m| m.len());
        pacer.wait(len).await;
        self.put_file(key, path).await
    }

    /// Reads a whole object of at most `max_len` bytes into memory, together with its
    /// metadata (the ETag belongs to exactly the bytes returned). [`StoreError::NotFound`] if
    /// it does not exist; [`StoreError::TooLarge`] as soon as it proves longer than
    /// `max_len` (a size the store announces, or the bytes that arrived), so a corrupt or
    /// hostile object never takes more memory than the caller allows.
    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)>;

    /// [`ObjectStore::get_with_meta_max`] bounded by [`MAX_WHOLE_READ`]: every object read
    /// whole is a repository document.
    async fn get_with_meta(&self, key: &str) -> StoreResult<(Bytes, ObjectMeta)> {
        self.get_with_meta_max(key, MAX_WHOLE_READ).await
    }

    /// Reads a whole object into memory, at most [`MAX_WHOLE_READ`] bytes.
    /// [`StoreError::NotFound`] if it does not exist. Use [`ObjectStore::get_to_file`] for
    /// large objects.
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        Ok(self.get_with_meta(key).await?.0)
    }

    /// Reads a whole object of at most `max_len` bytes into memory (see
    /// [`ObjectStore::get_with_meta_max`]).
    async fn get_max(&self, key: &str, max_len: u64) -> StoreResult<Bytes> {
        Ok(self.get_with_meta_max(key, max_len).await?.0)
    }

    /// Downloads an object to a local file, streaming (never holding the object in memory).
    /// The data is written to a temporary file next to `path`, synced, then renamed to `path`,
    /// so `path` never holds a partial object. Returns the number of bytes written.
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64>;

    /// Like [`ObjectStore::get_to_file`], for an object whose size the repository records:
    /// fails with [`StoreError::TooLarge`] once the object proves longer than `max_len`
    /// bytes, leaving nothing at `path`, so a corrupt or hostile object cannot fill the
    /// disk. (Shorter is not an error here: the caller checks the size and checksum.)
    ///
    /// The default downloads the whole object, then checks; the stores override it to
    /// stop at `max_len` (the local and memory stores, S3) or pass it on (decorators).
    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        let n = self.get_to_file(key, path).await?;
        if n > max_len {
            let _ = tokio::fs::remove_file(path).await;
            return Err(StoreError::TooLarge {
                op: StoreOp::GetToFile,
                key: key.to_owned(),
                location: format!("{} (key {key})", self.describe()),
                limit: max_len,
            });
        }
        Ok(n)
    }

    /// Like [`ObjectStore::get_to_file_max`], and also returns the sha256 of the bytes
    /// written to `path` (under encryption, the plaintext), so the caller can check the file
    /// against its recorded checksum without reading it back. With [`PageCache::Around`],
    /// for a file nobody reads back soon (a restored base's tables when the restore does not
    /// read them, a download that is only hashed), the local and S3 stores write a large one
    /// around the page cache, which saves copying it into the cache and leaves the cache to
    /// what is read; the memory and encrypting stores write through it either way.
    ///
    /// The default downloads with `get_to_file_max`, then reads the file back and hashes it
    /// off the async runtime. The stores override it to hash each piece as it is written
    /// (the local and memory stores, S3, encryption) or pass it on (decorators).
    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        let _ = cache;
        self.get_to_file_max(key, path, max_len).await?;
        hash_downloaded(key, path).await
    }

    /// [`ObjectStore::get_to_file_hashed`] through the page cache (stores override that
    /// one, not this).
    async fn get_to_file_max_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
    ) -> StoreResult<FileDigest> {
        self.get_to_file_hashed(key, path, max_len, PageCache::Through)
            .await
    }

    /// Reads the bytes `range.start..range.end` of an object. The range must lie inside the
    /// object, otherwise [`StoreError::InvalidRange`].
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;

    /// An object's size and ETag, or `None` if it does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>>;

    /// Deletes an object. Deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Every object whose key starts with `prefix` (plain string prefix; `""` lists
    /// everything), sorted by key.
    ///
    /// For maintenance only (verification, garbage collection, repair): listing is slow and
    /// costly on object stores and never on the archiving or restore hot path, which find
    /// objects through the manifest.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>>;

    /// Checks that the store can keep objects locked (S3 Object Lock, FORMAT.md §3.2):
    /// `Ok` when it can, [`StoreError::Config`] saying why not otherwise. Decorators ask the
    /// store they wrap.
    async fn check_object_lock(&self) -> StoreResult<()> {
        Err(StoreError::config(format!(
            "{} cannot lock objects: S3 Object Lock needs an S3 bucket created with Object \
             Lock enabled",
            self.describe()
        )))
    }

    /// From now on, writes every object that [`crate::lock::applies_to`] with `lock`'s
    /// retention (`None`: without one). A store that cannot lock ignores it: callers check
    /// [`ObjectStore::check_object_lock`] first. Decorators pass it on, so the lock applies
    /// to what reaches the store (an encrypted object's stored bytes).
    fn set_object_lock(&self, lock: Option<ObjectLock>) {
        let _ = lock;
    }
}

/// How a download is written to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageCache {
    /// Through the page cache: the file is read soon.
    #[default]
    Through,
    /// Around it, when the store can (a large file nobody reads back soon).
    Around,
}

/// What [`ObjectStore::get_to_file_max_hashed`] wrote: the file's length and the hex sha256
/// of its bytes (as [`crate::checksum`] spells digests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Bytes written.
    pub len: u64,
    /// Hex sha256 of those bytes.
    pub sha256: String,
}

impl From<crate::checksum::Hasher> for FileDigest {
    fn from(h: crate::checksum::Hasher) -> FileDigest {
        let (sha256, len) = h.finish();
        FileDigest { len, sha256 }
    }
}

/// Reads back a file just downloaded from `key` and hashes it, off the async runtime: the
/// default of [`ObjectStore::get_to_file_hashed`].
async fn hash_downloaded(key: &str, path: &Path) -> StoreResult<FileDigest> {
    let p = path.to_owned();
    let local = |source| StoreError::LocalFile {
        op: StoreOp::GetToFile,
        key: key.to_owned(),
        path: path.display().to_string(),
        source,
    };
    match tokio::task::spawn_blocking(move || crate::checksum::sha256_file(&p)).await {
        Ok(hashed) => {
            let (sha256, len) = hashed.map_err(local)?;
            Ok(FileDigest { len, sha256 })
        }
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(local(std::io::Error::other(format!(
            "reading the downloaded file back was interrupted: {e}"
        )))),
    }
}

/// Prefix reserved for the stores' own files (temporary files, lock files). No key segment
/// may start with it, so those files can never be mistaken for objects.
pub const RESERVED_SEGMENT_PREFIX: &str = ".tidemark-";

/// The largest single write into the page cache (a buffered file's buffer, a piece of a
/// cached download). Larger writes make the kernel set aside large page-cache folios, and
/// on a VM that hands free memory back to its host every page of those faults in again:
/// writing 512 MB in 1 MiB writes took 1.1-2.4 s of system CPU on such a machine against
/// 0.16 s in writes of 256 KiB or less (`dd`, alternating sizes).
pub const CACHED_WRITE: usize = 128 << 10;

/// The most bytes [`ObjectStore::get`] reads into memory: the largest repository document
/// (FORMAT.md §3.1). Larger objects are downloaded to files.
pub const MAX_WHOLE_READ: u64 = crate::model::MAX_DOCUMENT_LEN as u64;

/// The most memory a store reserves ahead of a whole-object read from a length it was told
/// (a `Content-Length`, a file's size): beyond it, the buffer grows only as bytes arrive.
pub(crate) const PREALLOC_MAX: usize = 8 << 20;

/// Longest accepted key, in bytes (S3's limit).
pub const MAX_KEY_LEN: usize = 1024;

/// Checks that `key` is a valid object key.
///
/// A key is a non-empty, `/`-separated relative path of at most [`MAX_KEY_LEN`] bytes: no
/// leading or trailing `/`, no empty segment (`a//b`), no `.` or `..` segment, no backslash,
/// no control characters, and no segment starting with [`RESERVED_SEGMENT_PREFIX`].
pub fn validate_key(key: &str) -> StoreResult<()> {
    check_key(key, false)
}

/// Checks a [`ObjectStore::list`] prefix: like [`validate_key`], but it may be empty, may end
/// with `/`, and its last segment may be partial.
pub fn validate_prefix(prefix: &str) -> StoreResult<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_key(prefix.strip_suffix('/').unwrap_or(prefix), true)
}

fn check_key(key: &str, is_prefix: bool) -> StoreResult<()> {
    let shown = if is_prefix { "prefix" } else { "key" };
    let invalid = |reason: String| StoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid(format!("the {shown} is empty")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(format!(
            "the {shown} is {} bytes long, the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    if key.starts_with('/') {
        return Err(invalid(format!(
            "the {shown} starts with '/'; keys are relative to the store root"
        )));
    }
    if key.contains('\\') {
        return Err(invalid(
            "backslashes are not allowed; separate with '/'".into(),
        ));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "control character {:?} is not allowed",
            c.escape_default().to_string()
        )));
    }
    for segment in key.split('/') {
        match segment {
            "" => {
                return Err(invalid(
                    "empty path segment ('//' or a trailing '/') is not allowed".into(),
                ));
            }
            "." | ".." => {
                return Err(invalid(format!(
                    "'{segment}' segments are not allowed; keys are plain paths"
                )));
            }
            s if s.starts_with(RESERVED_SEGMENT_PREFIX) => {
                return Err(invalid(format!(
                    "segments starting with '{RESERVED_SEGMENT_PREFIX}' are reserved for the \
                     store's own temporary and lock files"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// How [`open_store_with`] builds a store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Settings for `s3://` URLs.
    pub s3: S3Options,
    /// The retry layer's policy.
    pub retry: RetryPolicy,
    /// For `file://` URLs: create the directory (and its parents) if it does not exist.
    /// Off by default, so a mistyped path is reported instead of silently creating a new,
    /// empty repository.
    pub create_local_root: bool,
    /// Limit uploads (of this store, from every task of the process using it) to this
    /// rate; `None` for no limit.
    pub max_upload_rate: Option<Rate>,
}

/// Opens the store a URL names, wrapped in a [`RetryStore`] with the default policy.
///
/// A `file://` root must already exist; see [`open_store_with`] to create it.
pub async fn open_store(url: &StoreUrl, s3: &S3Options) -> StoreResult<Arc<dyn ObjectStore>> {
    open_store_with(
        url,
        &OpenOptions {
            s3: s3.clone(),
            ..OpenOptions::default()
        },
    )
    .await
}

/// Opens the store a URL names with explicit options, wrapped in a [`RetryStore`] (and a
/// [`ThrottleStore`] below it when [`OpenOptions::max_upload_rate`] is set).
pub async fn open_store_with(
    url: &StoreUrl,
    options: &OpenOptions,
) -> StoreResult<Arc<dyn ObjectStore>> {
    let inner: Arc<dyn ObjectStore> = match url {
        StoreUrl::Local { root } => {
            if options.create_local_root {
                Arc::new(LocalStore::create(root)?)
            } else {
                Arc::new(LocalStore::open(root)?)
            }
        }
        StoreUrl::S3 { bucket, prefix } => Arc::new(
            S3Store::connect(bucket, prefix, &options.s3)
                .await?
                .with_part_retry(options.retry.clone()),
        ),
    };
    tracing::debug!(store = %inner.describe(), "opened object store");
    let inner: Arc<dyn ObjectStore> = match options.max_upload_rate {
        Some(rate) => {
            tracing::info!(%rate, "limiting uploads");
            Arc::new(ThrottleStore::new(inner, RateLimiter::new(rate)))
        }
        None => inner,
    };
    Ok(Arc::new(RetryStore::new(inner, options.retry.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_keys() {
        for key in [
            "a",
            "segments/000001.seg",
            "base/2024-01-01T00:00:00Z/CURRENT",
            ".hidden",
            "a/.b/c",
            "dir/..x",
            "with space/ok",
        ] {
            validate_key(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn invalid_keys_say_why() {
        for (key, needle) in [
            ("", "empty"),
            ("/abs", "starts with '/'"),
            ("a//b", "empty path segment"),
            ("a/", "empty path segment"),
            ("a/../b", "'..'"),
            ("./a", "'.'"),
            ("a\\b", "backslash"),
            ("a\nb", "control character"),
            ("x/.tidemark-tmp-1", "reserved"),
        ] {
            let err = validate_key(key).expect_err(key);
            let msg = err.to_string();
            assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}: {msg}");
            assert!(msg.contains(needle), "{key:?}: {msg}");
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(validate_key(&long).is_err());
    }

    #[test]
    fn prefixes() {
        validate_prefix("").unwrap();
        validate_prefix("segments/").unwrap();
        validate_prefix("segments/0000").unwrap();
        assert!(validate_prefix("/x").is_err());
        assert!(validate_prefix("a//").is_err());
        assert!(validate_prefix("../").is_err());
    }

    /// A store that does not override the hashed download gets the default: the file read
    /// back and hashed, the bound checked after the whole download, nothing left behind.
    #[tokio::test]
    async fn the_default_hashed_download_reads_the_file_back() {
        let minimal = testkit::Minimal(Arc::new(MemoryStore::new()));
        testkit::check_hashed_downloads(&minimal).await;
        testkit::check_bounded_reads(&minimal).await;
    }

    #[test]
    fn object_store_is_dyn_compatible() {
        fn takes(_: &Arc<dyn ObjectStore>) {}
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        takes(&store);
    }
}
