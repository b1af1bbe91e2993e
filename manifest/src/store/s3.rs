//! The S3 store (`s3://BUCKET[/PREFIX]`), for Amazon S3 and S3-compatible servers.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::primitives::{ByteStream, Length, SdkBody};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled, ObjectLockMode,
    ServerSideEncryption, StorageClass,
};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::direct;
use super::throttle::{self, PacedBody, Pacer};
use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, RetryPolicy, StoreError, StoreOp,
    StoreResult, validate_key, validate_prefix,
};
use crate::checksum::Hasher;
use crate::keys::{self, ObjectKind};
use crate::model::{LockMode, ObjectLock};

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (all but the last).
const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part, and largest single PUT.
const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// S3's most parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Region used with a custom endpoint when nothing else names one.
const DEFAULT_ENDPOINT_REGION: &str = "us-east-1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`S3Options::request_timeout_secs`].
const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest accepted [`S3Options::request_timeout_secs`].
const MAX_REQUEST_TIMEOUT_SECS: u64 = 3600;
/// Uploads of at least this many bytes (and every multipart part) get time in proportion to
/// their size instead of the small-request timeout.
const LARGE_BODY: u64 = 8 * MIB;
/// The upload rate large uploads are given time for: a modest 256 KiB/s.
const SLOW_UPLOAD_BYTES_PER_SEC: u64 = 256 * 1024;
/// Fixed allowance of a large upload, on top of its time at [`SLOW_UPLOAD_BYTES_PER_SEC`].
const LARGE_UPLOAD_BASE: Duration = Duration::from_secs(60);
/// Fixed allowance for completing a multipart upload: S3 may take minutes to assemble a large
/// object (it keeps the connection alive meanwhile).
const COMPLETE_BASE: Duration = Duration::from_secs(300);
/// Assembly rate a multipart completion is given time for, on top of [`COMPLETE_BASE`].
const COMPLETE_BYTES_PER_SEC: u64 = 16 * MIB;

/// Server-side encryption for new objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Sse {
    /// SSE-S3 (`AES256`): keys managed by S3.
    #[serde(rename = "AES256")]
    Aes256,
    /// SSE-KMS (`aws:kms`), with the given key (ID, ARN or alias) or the account's default
    /// `aws/s3` key.
    #[serde(rename = "aws:kms")]
    Kms {
        /// The KMS key; `None` uses the AWS-managed key.
        #[serde(default)]
        key_id: Option<String>,
    },
}

/// How to reach and write to S3. Credentials are never part of it: they come from the
/// standard AWS chain (environment, profile, SSO, instance/container role).
///
/// Serde-friendly: every field has a default, so `{}` is a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Options {
    /// A custom endpoint such as `http://127.0.0.1:9000` (MinIO, LocalStack, moto, Ceph);
    /// `None` for AWS (or whatever `AWS_ENDPOINT_URL` says).
    pub endpoint_url: Option<String>,
    /// The bucket's region; `None` takes it from the AWS chain (`AWS_REGION`, the profile),
    /// falling back to `us-east-1` when an endpoint URL is given.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`; most
    /// self-hosted S3 servers need this.
    pub force_path_style: bool,
    /// Files of at least this many bytes are uploaded in parts (at most 5 GiB).
    pub multipart_threshold: u64,
    /// Size of each part (5 MiB to 5 GiB); raised automatically if a file would need more
    /// than 10,000 parts.
    pub part_size: u64,
    /// How many parts are uploaded at once (1 to 64), by all multipart uploads of the store
    /// together.
    pub part_concurrency: usize,
    /// Storage class of new data objects (`STANDARD`, `STANDARD_IA`, `GLACIER_IR`,
    /// `INTELLIGENT_TIERING`, …) unless a class for their kind is set; `None` uses the
    /// bucket's default. Documents (`tidemark.json`, `lease.json`, `manifest/`, `index/`,
    /// `bases/<id>/base.json`) are small, often read and in part overwritten: they always
    /// get the bucket's default (`STANDARD` on AWS). Classes whose objects must be restored
    /// before they can be read (`GLACIER`, `DEEP_ARCHIVE`) are refused.
    pub storage_class: Option<String>,
    /// Storage class of a base's files (`sst/…`, `bases/<id>/files/…`); `None` uses
    /// [`S3Options::storage_class`].
    pub base_storage_class: Option<String>,
    /// Storage class of WAL segments (`wal/…`); `None` uses [`S3Options::storage_class`].
    pub wal_storage_class: Option<String>,
    /// Server-side encryption of new objects; `None` uses the bucket's default.
    pub sse: Option<Sse>,
    /// Time limit, in seconds, of each attempt of a small request (1 to 3600; default 30):
    /// HEAD, LIST, DELETE, starting or aborting a multipart upload, uploading a body of less
    /// than 8 MiB (documents, segments), and getting a whole object or a range up to the
    /// response headers. The same limit applies to every pause while a download's body
    /// arrives, so a server that stops sending mid-body is noticed; the download as a whole
    /// has no limit, since large objects take long.
    ///
    /// Uploads of 8 MiB or more and every multipart part instead get 60 s plus the time to
    /// send the body at 256 KiB/s (but at least this limit); completing a multipart upload
    /// gets 5 minutes plus 1 s per 16 MiB.
    ///
    /// An attempt that runs out of time fails as [`StoreError::Transient`], which
    /// [`RetryStore`](super::RetryStore) retries.
    pub request_timeout_secs: u64,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint_url: None,
            region: None,
            force_path_style: false,
            multipart_threshold: 64 * MIB,
            part_size: 16 * MIB,
            part_concurrency: 4,
            storage_class: None,
            base_storage_class: None,
            wal_storage_class: None,
            sse: None,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
        }
    }
}

impl S3Options {
    /// Checks the options; the error says which one is wrong and what is allowed.
    pub fn validate(&self) -> StoreResult<()> {
        let bad = |m: String| Err(StoreError::config(format!("invalid S3 options: {m}")));
        if let Some(endpoint) = &self.endpoint_url {
            match ::url::Url::parse(endpoint) {
                Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                    return bad(format!(
                        "endpoint URL '{}' must start with http:// or https://",
                        super::url::redact(endpoint)
                    ));
                }
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    return bad(
                        "the endpoint URL must not contain credentials; use the AWS credential \
                         chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
                            .into(),
                    );
                }
                Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                    return bad(format!(
                        "endpoint URL '{}' has no host",
                        super::url::redact(endpoint)
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    return bad(format!(
                        "endpoint URL '{}' is not a URL ({e}); write it like \
                         http://127.0.0.1:9000",
                        super::url::redact(endpoint)
                    ));
                }
            }
        }
        if let Some(region) = &self.region
            && (region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return bad(format!(
                "region '{region}' is not a region name (like us-east-1)"
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return bad(format!(
                "part_size {} is outside S3's limits of 5 MiB ({MIN_PART_SIZE}) to 5 GiB \
                 ({MAX_PART_SIZE})",
                self.part_size
            ));
        }
        if self.multipart_threshold == 0 || self.multipart_threshold > MAX_PART_SIZE {
            return bad(format!(
                "multipart_threshold {} must be between 1 and 5 GiB ({MAX_PART_SIZE}), the \
                 largest single upload S3 accepts",
                self.multipart_threshold
            ));
        }
        if !(1..=64).contains(&self.part_concurrency) {
            return bad(format!(
                "part_concurrency {} must be between 1 and 64",
                self.part_concurrency
            ));
        }
        if !(1..=MAX_REQUEST_TIMEOUT_SECS).contains(&self.request_timeout_secs) {
            return bad(format!(
                "request_timeout_secs {} must be between 1 and {MAX_REQUEST_TIMEOUT_SECS} \
                 seconds",
                self.request_timeout_secs
            ));
        }
        for (option, class) in [
            ("storage_class", &self.storage_class),
            ("base_storage_class", &self.base_storage_class),
            ("wal_storage_class", &self.wal_storage_class),
        ] {
            if let Some(class) = class
                && let Err(why) = check_storage_class(class)
            {
                return bad(format!("{option}: {why}"));
            }
        }
        if let Some(Sse::Kms { key_id: Some(k) }) = &self.sse
            && k.is_empty()
        {
            return bad("the SSE-KMS key id is empty; give a key id/ARN/alias or none".into());
        }
        Ok(())
    }

    /// The storage class of a new object at `key`, by its kind (FORMAT.md §2).
    fn storage_class_for(&self, key: &str) -> Option<&str> {
        match keys::object_kind(key) {
            ObjectKind::Document => None,
            ObjectKind::Segment => self
                .wal_storage_class
                .as_ref()
                .or(self.storage_class.as_ref()),
            ObjectKind::BaseData => self
                .base_storage_class
                .as_ref()
                .or(self.storage_class.as_ref()),
            ObjectKind::Other => self.storage_class.as_ref(),
        }
        .map(String::as_str)
    }

    /// The part size used for a file of `len` bytes: the configured one, raised so the file
    /// fits in 10,000 parts.
    fn part_size_for(&self, len: u64) -> u64 {
        self.part_size.max(len.div_ceil(MAX_PARTS))
    }

    /// The small-request timeout ([`S3Options::request_timeout_secs`]).
    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The SDK timeouts of a request of the given kind.
    ///
    /// The connect and read timeouts select the SDK's HTTP connection pool, so they take
    /// only two combinations (small: both set; large: no read timeout); the size-dependent
    /// limit is the attempt timeout, which does not affect pooling.
    fn timeouts(&self, budget: Budget) -> TimeoutConfig {
        let small = self.request_timeout();
        let base = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(small))
            .disable_operation_timeout();
        let large = |limit: Duration| {
            base.clone()
                .disable_read_timeout()
                .operation_attempt_timeout(limit.max(small))
        };
        match budget {
            Budget::Upload(len) if len >= LARGE_BODY => large(upload_time(len)),
            Budget::Part(len) => large(upload_time(len)),
            Budget::Paced { len, rate } => large(paced_upload_time(len, rate)),
            Budget::Complete(len) => large(
                COMPLETE_BASE.saturating_add(Duration::from_secs(len / COMPLETE_BYTES_PER_SEC)),
            ),
            Budget::Small | Budget::Upload(_) => base
                .clone()
                .read_timeout(small)
                .operation_attempt_timeout(small),
        }
        .build()
    }

    /// The per-request configuration override carrying [`S3Options::timeouts`].
    ///
    /// A paced upload pauses while the rate limiter holds it back (WAL segments go first),
    /// which the SDK's stalled-stream protection would take for a dead connection and abort
    /// after a few seconds. Its attempt timeout, sized to the rate, guards it instead.
    fn timeout_override(&self, budget: Budget) -> aws_sdk_s3::config::Builder {
        let builder = aws_sdk_s3::config::Builder::default().timeout_config(self.timeouts(budget));
        match budget {
            Budget::Paced { .. } => builder.stalled_stream_protection(
                aws_sdk_s3::config::StalledStreamProtectionConfig::enabled()
                    .upload_enabled(false)
                    .build(),
            ),
            _ => builder,
        }
    }
}

/// Storage classes whose objects cannot be read until they are restored, which takes
/// minutes to hours: a repository in them cannot be restored when it is needed.
const ARCHIVE_CLASSES: [&str; 2] = ["GLACIER", "DEEP_ARCHIVE"];

/// Checks a storage class name: known to S3 and readable at once.
fn check_storage_class(class: &str) -> Result<(), String> {
    if ARCHIVE_CLASSES.contains(&class) {
        return Err(format!(
            "storage class {class} is refused: its objects must be restored (minutes to hours) \
             before they can be read, so a restore could not download them when it is needed; \
             for cheaper storage that reads at once use GLACIER_IR or STANDARD_IA"
        ));
    }
    if !StorageClass::values().contains(&class) {
        return Err(format!(
            "unknown storage class '{class}'; use one of {}",
            StorageClass::values()
                .iter()
                .filter(|c| !ARCHIVE_CLASSES.contains(c))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// Time allowed to upload `len` bytes: [`LARGE_UPLOAD_BASE`] plus the time at
/// [`SLOW_UPLOAD_BYTES_PER_SEC`].
fn upload_time(len: u64) -> Duration {
    LARGE_UPLOAD_BASE.saturating_add(Duration::from_secs(len / SLOW_UPLOAD_BYTES_PER_SEC))
}

/// Paced uploads share the limiter's rate with up to this many other streams (base files
/// and multipart parts in flight), so one is given time for this fraction of the rate.
const PACED_STREAMS: u64 = 16;

/// Time allowed to upload `len` bytes through a limiter of `rate` bytes per second: as
/// [`upload_time`], at `rate / 16` when that is slower than 256 KiB/s. Segments and
/// documents go first, so a paced base file can still wait longer when the WAL alone needs
/// most of the rate; its attempt then times out and is retried.
fn paced_upload_time(len: u64, rate: u64) -> Duration {
    let bps = (rate / PACED_STREAMS).clamp(1, SLOW_UPLOAD_BYTES_PER_SEC);
    LARGE_UPLOAD_BASE.saturating_add(Duration::from_secs(len / bps))
}

/// What a request carries, for its time limits ([`S3Options::timeouts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// No body worth mentioning, or a response whose body is read separately (GET): the
    /// small-request timeout per attempt.
    Small,
    /// A single PUT of a body of this many bytes: small below [`LARGE_BODY`], otherwise
    /// scaled to the size.
    Upload(u64),
    /// A multipart part of this many bytes: always scaled to the size.
    Part(u64),
    /// A file body (whole or a part) of `len` bytes paced by a limiter of `rate` bytes per
    /// second: scaled to the size at the rate a paced stream may get.
    Paced { len: u64, rate: u64 },
    /// Completing a multipart upload of an object of this many bytes.
    Complete(u64),
}

/// The conditional header of a PUT.
enum Condition<'a> {
    None,
    IfNoneMatch,
    IfMatch(&'a ETag),
}

/// An object store in an S3 bucket, under an optional key prefix.
///
/// - Conditional writes use `If-None-Match: *` (`put_if_absent`) and `If-Match: ETAG`
///   (`put_if_match`), which AWS S3 and current S3-compatible servers evaluate atomically.
///   `412 Precondition Failed` and `409 ConditionalRequestConflict` become
///   [`StoreError::PreconditionFailed`].
/// - `put_file` streams from disk; files of at least
///   [`multipart_threshold`](S3Options::multipart_threshold) bytes go up as a multipart
///   upload with [`part_concurrency`](S3Options::part_concurrency) parts in flight, each with
///   a CRC32 checksum (the upload is created with the same algorithm, which servers such as
///   LocalStack insist on). Each part is retried on its own; a failed upload is aborted.
///   Configure an `AbortIncompleteMultipartUpload` lifecycle rule on the bucket so that
///   uploads orphaned by a crash are cleaned up.
/// - The SDK's own retries are off: [`RetryStore`](super::RetryStore) is the one place that
///   retries, and logs each retry.
/// - Every attempt has a time limit
///   ([`request_timeout_secs`](S3Options::request_timeout_secs), 30 s by default, for small
///   requests; more, in proportion to the size, for large uploads), and downloads fail when
///   their data stops arriving for as long; either is a [`StoreError::Transient`] naming the
///   operation and key, so an unresponsive server is noticed, and retried, quickly.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Key prefix including its trailing `/`, or empty.
    prefix: String,
    options: S3Options,
    endpoint: String,
    part_retry: RetryPolicy,
    /// Permits for multipart parts in flight, shared by all uploads of this store (and its
    /// clones): [`S3Options::part_concurrency`].
    parts_in_flight: Arc<Semaphore>,
    /// The repository's object lock, once known ([`ObjectStore::set_object_lock`]); shared
    /// with the store's clones.
    lock: Arc<std::sync::RwLock<Option<ObjectLock>>>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A listing whose pages list nothing this many times in a row does not advance.
const MAX_EMPTY_LIST_PAGES: u32 = 1000;

impl S3Store {
    /// Connects with the standard AWS configuration chain (environment, `~/.aws/config`,
    /// SSO, instance/container roles), overridden by `options`. `prefix` is the key prefix
    /// without leading or trailing `/` (empty for the whole bucket).
    ///
    /// No request is sent; problems with credentials or the bucket surface on first use, as
    /// [`StoreError::InvalidCredentials`], [`StoreError::AccessDenied`] or
    /// [`StoreError::BucketNotFound`].
    pub async fn connect(bucket: &str, prefix: &str, options: &S3Options) -> StoreResult<Self> {
        options.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        Self::from_sdk_config(&sdk, bucket, prefix, options)
    }

    /// Like [`S3Store::connect`] with an explicit AWS configuration (for example one with
    /// static test credentials).
    pub fn from_sdk_config(
        sdk: &SdkConfig,
        bucket: &str,
        prefix: &str,
        options: &S3Options,
    ) -> StoreResult<Self> {
        options.validate()?;
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| {
                StoreError::config(format!("invalid key prefix for s3://{bucket}: {e}"))
            })?;
        }
        // The SDK's own endpoint settings must not carry credentials either: they would be
        // printed in messages, and sent.
        let service_endpoint = std::env::var("AWS_ENDPOINT_URL_S3").ok();
        for url in sdk
            .endpoint_url()
            .into_iter()
            .chain(service_endpoint.as_deref())
        {
            super::url::refuse_endpoint_credentials(
                url,
                "the AWS configuration: AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or a profile's \
                 endpoint_url",
            )?;
        }
        let endpoint_url = options
            .endpoint_url
            .clone()
            .or_else(|| sdk.endpoint_url().map(str::to_owned));
        let mut config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(options.force_path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(options.timeouts(Budget::Small));
        let region = match (&options.region, sdk.region(), &endpoint_url) {
            (Some(r), _, _) => r.clone(),
            (None, Some(r), _) => r.to_string(),
            (None, None, Some(_)) => DEFAULT_ENDPOINT_REGION.to_owned(),
            (None, None, None) => {
                return Err(StoreError::config(format!(
                    "no AWS region is configured for s3://{bucket}: set AWS_REGION (or a region \
                     in the AWS profile, or the store's region option)"
                )));
            }
        };
        config = config.region(Region::new(region.clone()));
        if let Some(url) = &options.endpoint_url {
            config = config.endpoint_url(url);
        }
        let endpoint = match &endpoint_url {
            Some(url) => format!("endpoint {url}, region {region}"),
            None => format!("region {region}"),
        };
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_owned(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            options: options.clone(),
            endpoint,
            part_retry: RetryPolicy::default(),
            parts_in_flight: Arc::new(Semaphore::new(options.part_concurrency)),
            lock: Arc::default(),
        })
    }

    /// Sets how each multipart part is retried (default: [`RetryPolicy::default`]).
    pub fn with_part_retry(mut self, policy: RetryPolicy) -> Self {
        self.part_retry = policy;
        self
    }

    /// The underlying SDK client (for test setup such as creating buckets).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The object's key in the bucket.
    pub(crate) fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The same store, uploading files of `threshold` bytes or more in parts of `part_size`
    /// (the store probe uses small parts).
    pub(crate) fn with_multipart(&self, threshold: u64, part_size: u64) -> StoreResult<S3Store> {
        let mut store = self.clone();
        store.options.multipart_threshold = threshold;
        store.options.part_size = part_size;
        store.options.validate()?;
        Ok(store)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.bucket, self.prefix)
    }

    fn local_error(op: StoreOp, key: &str, path: &Path, e: std::io::Error) -> StoreError {
        StoreError::LocalFile {
            op,
            key: key.to_owned(),
            path: path.display().to_string(),
            source: e,
        }
    }

    fn other(&self, op: StoreOp, key: &str, message: impl Into<String>) -> StoreError {
        StoreError::Other {
            op,
            key: key.to_owned(),
            location: self.location(key),
            source: message.into().into(),
        }
    }

    /// Classifies an SDK error.
    fn map_err<E>(&self, op: StoreOp, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let location = self.location(key);
        let key = key.to_owned();
        let transient = |key, location, detail: String| StoreError::Transient {
            op,
            key,
            location,
            source: detail.into(),
        };
        match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or("");
                let detail = service_detail(code, ctx.err().message(), status);
                classify_service_error(op, key, location, status, code, detail, self)
            }
            SdkError::TimeoutError(_) => transient(
                key,
                location,
                format!("timed out talking to {} ({})", self.endpoint, chain(&err)),
            ),
            // Connect and read timeouts.
            SdkError::DispatchFailure(d) if d.is_timeout() => transient(
                key,
                location,
                format!("timed out talking to {} ({})", self.endpoint, chain(&err)),
            ),
            SdkError::ResponseError(_) => transient(
                key,
                location,
                format!(
                    "unreadable response from {} ({})",
                    self.endpoint,
                    chain(&err)
                ),
            ),
            _ if is_credentials_error(&err) => StoreError::InvalidCredentials {
                op,
                key,
                location,
                detail: format!("no usable credentials: {}", chain(&err)),
            },
            SdkError::DispatchFailure(d) if d.is_user() => StoreError::Other {
                op,
                key,
                location,
                source: chain(&err).into(),
            },
            SdkError::DispatchFailure(_) => transient(
                key,
                location,
                format!(
                    "cannot reach {} ({}); check the endpoint URL and the network",
                    self.endpoint,
                    chain(&err)
                ),
            ),
            _ => StoreError::Other {
                op,
                key,
                location,
                source: chain(&err).into(),
            },
        }
    }

    async fn put_object(
        &self,
        op: StoreOp,
        key: &str,
        data: Bytes,
        condition: Condition<'_>,
    ) -> StoreResult<ETag> {
        validate_key(key)?;
        let budget = Budget::Upload(data.len() as u64);
        let len = data.len() as i64;
        let (lock_mode, retain_until) = self.lock_for(key);
        // S3 requires a checksum on a PUT with a retention: CRC32, as on every part.
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(len)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .set_object_lock_mode(lock_mode)
            .set_object_lock_retain_until_date(retain_until)
            .body(ByteStream::from(data))
            .set_storage_class(self.storage_class(key))
            .set_server_side_encryption(self.sse())
            .set_ssekms_key_id(self.kms_key());
        req = match condition {
            Condition::None => req,
            Condition::IfNoneMatch => req.if_none_match("*"),
            Condition::IfMatch(etag) => req.if_match(etag.as_str()),
        };
        let out = req
            .customize()
            .config_override(self.options.timeout_override(budget))
            .send()
            .await
            .map_err(|e| self.map_err(op, key, e))?;
        self.etag(op, key, out.e_tag())
    }

    fn etag(&self, op: StoreOp, key: &str, etag: Option<&str>) -> StoreResult<ETag> {
        etag.map(ETag::new).ok_or_else(|| {
            self.other(
                op,
                key,
                "the server returned no ETag; Tidemark needs an S3-compatible server that \
                 returns ETags",
            )
        })
    }

    /// The Object Lock headers of a new object at `key`: the mode and the retain-until
    /// date, from this moment, when the repository locks it (FORMAT.md §3.2).
    fn lock_for(&self, key: &str) -> (Option<ObjectLockMode>, Option<DateTime>) {
        let lock = *self
            .lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match lock.filter(|_| crate::lock::applies_to(key)) {
            None => (None, None),
            Some(lock) => {
                let until = lock.retain_until(time::OffsetDateTime::now_utc());
                let mode = match lock.mode {
                    LockMode::Governance => ObjectLockMode::Governance,
                    LockMode::Compliance => ObjectLockMode::Compliance,
                };
                (
                    Some(mode),
                    Some(DateTime::from_secs(until.unix_timestamp())),
                )
            }
        }
    }

    fn storage_class(&self, key: &str) -> Option<StorageClass> {
        self.options.storage_class_for(key).map(StorageClass::from)
    }

    fn sse(&self) -> Option<ServerSideEncryption> {
        self.options.sse.as_ref().map(|sse| match sse {
            Sse::Aes256 => ServerSideEncryption::Aes256,
            Sse::Kms { .. } => ServerSideEncryption::AwsKms,
        })
    }

    fn kms_key(&self) -> Option<String> {
        match &self.options.sse {
            Some(Sse::Kms { key_id }) => key_id.clone(),
            _ => None,
        }
    }

    /// Sends a GET. The small-request timeout covers it up to the response headers; the
    /// body is the caller's to read, chunk by chunk through [`S3Store::next_chunk`].
    async fn get_object(
        &self,
        op: StoreOp,
        key: &str,
        range: Option<String>,
    ) -> StoreResult<aws_sdk_s3::operation::get_object::GetObjectOutput> {
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_range(range)
            .send()
            .await
            .map_err(|e| self.map_err(op, key, e))
    }

    /// Turns a body-stream failure (connection dropped mid-download) into a transient error.
    fn body_error(&self, op: StoreOp, key: &str, e: impl std::error::Error) -> StoreError {
        StoreError::Transient {
            op,
            key: key.to_owned(),
            location: self.location(key),
            source: format!("download interrupted: {}", chain(&e)).into(),
        }
    }

    /// The next chunk of a response body. Waiting longer than the small-request timeout for
    /// it is a transient failure; the body as a whole may take as long as it needs.
    async fn next_chunk(
        &self,
        op: StoreOp,
        key: &str,
        body: &mut ByteStream,
    ) -> StoreResult<Option<Bytes>> {
        let idle = self.options.request_timeout();
        match tokio::time::timeout(idle, body.try_next()).await {
            Ok(chunk) => chunk.map_err(|e| self.body_error(op, key, e)),
            Err(_) => Err(StoreError::Transient {
                op,
                key: key.to_owned(),
                location: self.location(key),
                source: format!(
                    "download stalled: no data from {} for {} s",
                    self.endpoint,
                    idle.as_secs()
                )
                .into(),
            }),
        }
    }

    /// A listing that does not advance (S3 lists keys in order, each once, and every page
    /// moves on): a loop of the server's, refused instead of listing forever.
    fn stuck_listing(&self, prefix: &str, listed: usize, why: &str) -> StoreError {
        self.other(
            StoreOp::List,
            prefix,
            format!(
                "the server's listing does not advance after {listed} keys: {why}. The \
                 server at {} is not S3-compatible in its listings; list with another server \
                 or report it to its maintainers",
                self.describe()
            ),
        )
    }

    async fn read_body(
        &self,
        op: StoreOp,
        key: &str,
        mut body: ByteStream,
        expected: Option<i64>,
        max_len: u64,
    ) -> StoreResult<Bytes> {
        // Content-Length is the server's word: a hint for a first buffer, never a size to
        // reserve in full, and a limit the body may not go past. `max_len` is the caller's.
        let too_large = || StoreError::TooLarge {
            op,
            key: key.to_owned(),
            location: self.location(key),
            limit: max_len,
        };
        let announced = expected.and_then(|n| u64::try_from(n).ok());
        if announced.is_some_and(|n| n > max_len) {
            return Err(too_large());
        }
        let capacity = announced.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let mut buf = BytesMut::with_capacity(capacity.min(super::PREALLOC_MAX));
        let limit = announced.unwrap_or(max_len);
        while let Some(chunk) = self.next_chunk(op, key, &mut body).await? {
            buf.extend_from_slice(&chunk);
            if buf.len() as u64 > limit {
                break; // reported below or by `check_length`
            }
        }
        if buf.len() as u64 > max_len {
            return Err(too_large());
        }
        self.check_length(op, key, buf.len() as u64, expected)?;
        Ok(buf.freeze())
    }

    fn check_length(
        &self,
        op: StoreOp,
        key: &str,
        got: u64,
        expected: Option<i64>,
    ) -> StoreResult<()> {
        match expected {
            Some(n) if u64::try_from(n).is_ok_and(|n| got > n) => Err(self.other(
                op,
                key,
                format!("the server sent more than the {n} bytes its Content-Length announced"),
            )),
            Some(n) if u64::try_from(n).ok() != Some(got) => Err(StoreError::Transient {
                op,
                key: key.to_owned(),
                location: self.location(key),
                source: format!("the download ended after {got} of {n} bytes").into(),
            }),
            _ => Ok(()),
        }
    }

    async fn put_file_multipart(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        pacer: Option<&Pacer>,
    ) -> StoreResult<ETag> {
        let op = StoreOp::PutFile;
        let part_size = self.options.part_size_for(len);
        let parts = len.div_ceil(part_size);
        let full_key = self.full_key(key);
        let (lock_mode, retain_until) = self.lock_for(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .set_object_lock_mode(lock_mode)
            .set_object_lock_retain_until_date(retain_until)
            .set_storage_class(self.storage_class(key))
            .set_server_side_encryption(self.sse())
            .set_ssekms_key_id(self.kms_key())
            .send()
            .await
            .map_err(|e| self.map_err(op, key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| self.other(op, key, "the server returned no multipart upload id"))?
            .to_owned();
        tracing::debug!(
            key,
            file = %path.display(),
            len,
            parts,
            part_size,
            concurrency = self.options.part_concurrency,
            "starting multipart upload"
        );

        let uploaded: StoreResult<Vec<CompletedPart>> = futures::stream::iter(1..=parts)
            .map(|number| {
                let upload_id = &upload_id;
                let full_key = &full_key;
                async move {
                    let offset = (number - 1) * part_size;
                    let size = part_size.min(len - offset);
                    let _permit = self
                        .parts_in_flight
                        .acquire()
                        .await
                        .map_err(|_| self.other(op, key, "the part semaphore was closed"))?;
                    self.part_retry
                        .run(op, key, || {
                            let part = FilePart {
                                path,
                                number,
                                offset,
                                size,
                            };
                            self.upload_part(key, full_key, upload_id, part, pacer)
                        })
                        .await
                }
            })
            .buffer_unordered(self.options.part_concurrency)
            .try_collect()
            .await;

        let completed = match uploaded {
            Ok(mut parts) => {
                parts.sort_by_key(|p| p.part_number());
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full_key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .customize()
                    .config_override(self.options.timeout_override(Budget::Complete(len)))
                    .send()
                    .await
                    .map_err(|e| self.map_err(op, key, e))
                    .and_then(|out| self.etag(op, key, out.e_tag()))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &completed {
            tracing::warn!(key, error = %e, "multipart upload failed; aborting it");
            if let Err(abort) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full_key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(
                    key,
                    upload_id,
                    error = %self.map_err(op, key, abort),
                    "could not abort the failed multipart upload; its parts stay billed until \
                     a lifecycle rule (AbortIncompleteMultipartUpload) removes them"
                );
            }
        }
        completed
    }

    async fn upload_part(
        &self,
        key: &str,
        full_key: &str,
        upload_id: &str,
        part: FilePart<'_>,
        pacer: Option<&Pacer>,
    ) -> StoreResult<CompletedPart> {
        let op = StoreOp::PutFile;
        let FilePart {
            path,
            number,
            offset,
            size,
        } = part;
        let part_number = i32::try_from(number)
            .map_err(|_| self.other(op, key, format!("part number {number} is too large")))?;
        let body = file_body(path, offset, size, pacer)
            .await
            .map_err(|e| Self::local_error(op, key, path, std::io::Error::other(chain(&e))))?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(full_key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(size as i64)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(body)
            .customize()
            .config_override(self.options.timeout_override(match pacer {
                Some(_) => body_budget(size, pacer),
                None => Budget::Part(size),
            }))
            .send()
            .await
            .map_err(|e| self.map_err(op, key, e))?;
        Ok(CompletedPart::builder()
            .part_number(part_number)
            .e_tag(self.etag(op, key, out.e_tag())?.as_str())
            .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
            .build())
    }

    /// [`ObjectStore::put_file`], the body paced by `pacer` if there is one.
    async fn put_file_with(
        &self,
        key: &str,
        path: &Path,
        pacer: Option<&Pacer>,
    ) -> StoreResult<ETag> {
        validate_key(key)?;
        let op = StoreOp::PutFile;
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| Self::local_error(op, key, path, e))?;
        if !meta.is_file() {
            return Err(Self::local_error(
                op,
                key,
                path,
                std::io::Error::other("not a regular file"),
            ));
        }
        let len = meta.len();
        if len >= self.options.multipart_threshold {
            return self.put_file_multipart(key, path, len, pacer).await;
        }
        let body = file_body(path, 0, len, pacer)
            .await
            .map_err(|e| Self::local_error(op, key, path, std::io::Error::other(chain(&e))))?;
        let (lock_mode, retain_until) = self.lock_for(key);
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(len as i64)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .set_object_lock_mode(lock_mode)
            .set_object_lock_retain_until_date(retain_until)
            .body(body)
            .set_storage_class(self.storage_class(key))
            .set_server_side_encryption(self.sse())
            .set_ssekms_key_id(self.kms_key())
            .customize()
            .config_override(self.options.timeout_override(body_budget(len, pacer)))
            .send()
            .await
            .map_err(|e| self.map_err(op, key, e))?;
        self.etag(op, key, out.e_tag())
    }

    /// `get_to_file_max`, feeding every byte written to `hasher` (if any).
    async fn download(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        hasher: Option<&mut Hasher>,
        uncached: bool,
    ) -> StoreResult<u64> {
        validate_key(key)?;
        let op = StoreOp::GetToFile;
        let (_, tmp) =
            super::local::local_temp_path(path).map_err(|e| Self::local_error(op, key, path, e))?;
        let tmp = super::local::TempFile(tmp);
        let out = self.get_object(op, key, None).await?;
        let landing = Landing {
            max_len,
            hasher,
            uncached,
        };
        self.download_to(key, path, &tmp.0, out, landing).await
    }

    async fn download_to(
        &self,
        key: &str,
        dest: &Path,
        tmp: &Path,
        out: aws_sdk_s3::operation::get_object::GetObjectOutput,
        landing: Landing<'_>,
    ) -> StoreResult<u64> {
        let Landing {
            max_len,
            mut hasher,
            uncached,
        } = landing;
        let op = StoreOp::GetToFile;
        let local = |e| Self::local_error(op, key, dest, e);
        let too_large = || StoreError::TooLarge {
            op,
            key: key.to_owned(),
            location: self.location(key),
            limit: max_len,
        };
        let expected = out.content_length();
        if expected
            .and_then(|n| u64::try_from(n).ok())
            .is_some_and(|n| n > max_len)
        {
            return Err(too_large());
        }
        let mut body = out.body;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .await
            .map_err(local)?;
        // Around the page cache when asked, for a large object only (see
        // `get_to_file_hashed` with `PageCache::Around`).
        let uncached = uncached
            && expected
                .and_then(|n| u64::try_from(n).ok())
                .is_some_and(|n| n >= direct::MIN_LEN);
        let mut out = direct::AsyncWriter::new(
            file.into_std().await,
            uncached,
            hasher.as_deref_mut().map(std::mem::take),
        );
        let mut written = 0u64;
        while let Some(chunk) = self.next_chunk(op, key, &mut body).await? {
            written = written.saturating_add(chunk.len() as u64);
            if written > max_len {
                return Err(too_large());
            }
            out.write_all(&chunk).await.map_err(local)?;
        }
        self.check_length(op, key, written, expected)?;
        if let (Some(h), Some(seen)) = (hasher, out.finish_synced().await.map_err(local)?) {
            *h = seen;
        }
        tokio::fs::rename(tmp, dest).await.map_err(local)?;
        let dir = tmp.parent().unwrap_or(Path::new("."));
        tokio::fs::File::open(dir)
            .await
            .map_err(local)?
            .sync_all()
            .await
            .map_err(local)?;
        Ok(written)
    }
}

/// How a download is written: at most `max_len` bytes, every byte fed to `hasher` (if any),
/// around the page cache if `uncached` (and the object is large).
struct Landing<'a> {
    max_len: u64,
    hasher: Option<&'a mut Hasher>,
    uncached: bool,
}

/// One part of a multipart upload: `size` bytes of `path` from `offset`.
#[derive(Debug, Clone, Copy)]
struct FilePart<'a> {
    path: &'a Path,
    number: u64,
    offset: u64,
    size: u64,
}

/// The time budget of a file body of `len` bytes sent whole.
fn body_budget(len: u64, pacer: Option<&Pacer>) -> Budget {
    match pacer {
        Some(p) => Budget::Paced {
            len,
            rate: p.rate().get(),
        },
        None => Budget::Upload(len),
    }
}

/// Chunk size of a file body read from disk (and of each paced grant).
const FILE_BUFFER: usize = throttle::CHUNK as usize;

/// A request body streaming `len` bytes of `path` from `offset`, each chunk waiting for
/// `pacer` (if any) before it is sent. Rebuilt for each attempt, so a retried request is
/// paced again.
async fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    pacer: Option<&Pacer>,
) -> Result<ByteStream, aws_smithy_types::byte_stream::error::Error> {
    let body = ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(FILE_BUFFER)
        .build()
        .await?;
    Ok(match pacer {
        None => body,
        Some(pacer) => {
            let pacer = pacer.clone();
            body.map(move |inner| SdkBody::from_body_1_x(PacedBody::new(inner, pacer.clone())))
        }
    })
}

/// `CODE: message (HTTP status)`.
fn service_detail(code: &str, message: Option<&str>, status: u16) -> String {
    match (code, message) {
        ("", Some(m)) if !m.is_empty() => format!("{m} (HTTP {status})"),
        // HEAD replies have no body, so the status is all there is.
        ("", _) => format!("HTTP {status}"),
        (code, Some(m)) if !m.is_empty() => format!("{code}: {m} (HTTP {status})"),
        (code, _) => format!("{code} (HTTP {status})"),
    }
}

fn classify_service_error(
    op: StoreOp,
    key: String,
    location: String,
    status: u16,
    code: &str,
    detail: String,
    store: &S3Store,
) -> StoreError {
    const CREDENTIAL_CODES: [&str; 8] = [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    ];
    const TRANSIENT_CODES: [&str; 8] = [
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
    ];
    match (status, code) {
        (412, _) | (_, "PreconditionFailed") | (409, "ConditionalRequestConflict") => {
            StoreError::PreconditionFailed { op, key, location }
        }
        (_, "NoSuchBucket") => StoreError::BucketNotFound {
            op,
            key,
            bucket: store.bucket.clone(),
            endpoint: store.endpoint.clone(),
        },
        (_, c) if CREDENTIAL_CODES.contains(&c) => StoreError::InvalidCredentials {
            op,
            key,
            location,
            detail,
        },
        (403, _) | (_, "AccessDenied") | (_, "AllAccessDisabled") => StoreError::AccessDenied {
            op,
            key,
            location,
            detail,
        },
        (301, _) | (_, "PermanentRedirect") => StoreError::Other {
            op,
            key,
            location,
            source: format!(
                "{detail}; the bucket is in another region than {}: set the region",
                store.endpoint
            )
            .into(),
        },
        (416, _) | (_, "InvalidRange") => StoreError::InvalidRange {
            op,
            key,
            location,
            start: 0,
            end: 0,
            size: None,
        },
        (404, _) | (_, "NoSuchKey") | (_, "NotFound") => StoreError::NotFound { op, key, location },
        (s, c) if s >= 500 || s == 429 || TRANSIENT_CODES.contains(&c) => StoreError::Transient {
            op,
            key,
            location,
            source: detail.into(),
        },
        _ => StoreError::Other {
            op,
            key,
            location,
            source: detail.into(),
        },
    }
}

/// The error and its sources, `: `-separated (never a Debug dump, which could be huge).
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// True when the credential chain itself failed (nothing was sent).
fn is_credentials_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        let prefix = self.prefix.trim_end_matches('/');
        if prefix.is_empty() {
            format!("s3://{} ({})", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{prefix} ({})", self.bucket, self.endpoint)
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.put_object(StoreOp::Put, key, data, Condition::None)
            .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        self.put_object(StoreOp::PutIfAbsent, key, data, Condition::IfNoneMatch)
            .await
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        self.put_object(StoreOp::PutIfMatch, key, data, Condition::IfMatch(etag))
            .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        self.put_file_with(key, path, None).await
    }

    async fn put_file_paced(&self, key: &str, path: &Path, pacer: &Pacer) -> StoreResult<ETag> {
        self.put_file_with(key, path, Some(pacer)).await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        validate_key(key)?;
        let op = StoreOp::Get;
        let out = self.get_object(op, key, None).await?;
        let etag = self.etag(op, key, out.e_tag())?;
        let expected = out.content_length();
        let data = self.read_body(op, key, out.body, expected, max_len).await?;
        let meta = ObjectMeta {
            key: key.to_owned(),
            size: data.len() as u64,
            etag,
            last_modified: None,
        };
        Ok((data, meta))
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        self.get_to_file_max(key, path, u64::MAX).await
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        self.download(key, path, max_len, None, false).await
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        let mut hasher = Hasher::new();
        let around = cache == PageCache::Around;
        self.download(key, path, max_len, Some(&mut hasher), around)
            .await?;
        Ok(hasher.into())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        validate_key(key)?;
        let op = StoreOp::GetRange;
        let invalid = |size| StoreError::InvalidRange {
            op,
            key: key.to_owned(),
            location: self.location(key),
            start: range.start,
            end: range.end,
            size,
        };
        if range.start > range.end {
            return Err(invalid(None));
        }
        if range.start == range.end {
            // HTTP cannot express an empty range; check existence and bounds instead.
            return match self.head(key).await? {
                None => Err(StoreError::NotFound {
                    op,
                    key: key.to_owned(),
                    location: self.location(key),
                }),
                Some(meta) if range.end > meta.size => Err(invalid(Some(meta.size))),
                Some(_) => Ok(Bytes::new()),
            };
        }
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let out = match self.get_object(op, key, Some(header)).await {
            Ok(out) => out,
            Err(StoreError::InvalidRange { .. }) => {
                let size = self.head(key).await.ok().flatten().map(|m| m.size);
                return Err(invalid(size));
            }
            Err(e) => return Err(e),
        };
        let size = out
            .content_range()
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok());
        let expected = out.content_length();
        let len = range.end - range.start;
        let data = self.read_body(op, key, out.body, expected, len).await?;
        if data.len() as u64 != len {
            return Err(invalid(size));
        }
        Ok(data)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        validate_key(key)?;
        let op = StoreOp::Head;
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return match self.map_err(op, key, e) {
                    StoreError::NotFound { .. } => Ok(None),
                    other => Err(other),
                };
            }
        };
        let size = out
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| self.other(op, key, "the server returned no Content-Length"))?;
        Ok(Some(ObjectMeta {
            key: key.to_owned(),
            size,
            etag: self.etag(op, key, out.e_tag())?,
            last_modified: out.last_modified().and_then(offset_time),
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        let op = StoreOp::Delete;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err(op, key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let op = StoreOp::List;
        let full_prefix = self.full_key(prefix);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        // S3 lists each key once and every page moves on: a server that loops is refused
        // instead of listing forever.
        let mut seen_tokens = std::collections::HashSet::new();
        let mut seen_keys = std::collections::HashSet::new();
        let mut empty_pages = 0;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err(op, prefix, e))?;
            for object in out.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if !seen_keys.insert(key.to_owned()) {
                    let why = format!("it listed the key {key:?} twice");
                    return Err(self.stuck_listing(prefix, objects.len(), &why));
                }
                objects.push(ObjectMeta {
                    key: key.to_owned(),
                    size: object
                        .size()
                        .and_then(|n| u64::try_from(n).ok())
                        .unwrap_or(0),
                    etag: ETag::new(object.e_tag().unwrap_or_default()),
                    last_modified: object.last_modified().and_then(offset_time),
                });
            }
            empty_pages = if out.contents().is_empty() {
                empty_pages + 1
            } else {
                0
            };
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(next)) if !seen_tokens.insert(next.to_owned()) => {
                    let why = format!("it returned the continuation token {next:?} again");
                    return Err(self.stuck_listing(prefix, objects.len(), &why));
                }
                (Some(true), Some(_)) if empty_pages >= MAX_EMPTY_LIST_PAGES => {
                    let why = format!("{empty_pages} pages in a row listed nothing");
                    return Err(self.stuck_listing(prefix, objects.len(), &why));
                }
                (Some(true), Some(next)) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        let op = StoreOp::Head;
        let not_enabled = || {
            StoreError::config(format!(
                "bucket {} does not have S3 Object Lock enabled, so its objects cannot be \
                 locked. Object Lock can only be enabled on a versioned bucket (on AWS when it \
                 is created, or later with PutObjectLockConfiguration); use such a bucket, or \
                 leave out --object-lock-mode and --object-lock-days",
                self.bucket
            ))
        };
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => match out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
            {
                Some(ObjectLockEnabled::Enabled) => Ok(()),
                _ => Err(not_enabled()),
            },
            Err(SdkError::ServiceError(ctx))
                if ctx.err().code() == Some("ObjectLockConfigurationNotFoundError") =>
            {
                Err(not_enabled())
            }
            Err(e) => Err(self.map_err(op, "", e)),
        }
    }

    fn set_object_lock(&self, lock: Option<ObjectLock>) {
        *self
            .lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lock;
    }
}

/// An S3 time as an [`time::OffsetDateTime`].
fn offset_time(t: &DateTime) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn options_defaults_and_serde() {
        let o: S3Options = serde_json::from_str("{}").unwrap();
        assert_eq!(o, S3Options::default());
        o.validate().unwrap();
        let o: S3Options = serde_json::from_str(
            r#"{"endpoint_url":"http://127.0.0.1:9000","force_path_style":true,
                "sse":{"type":"aws:kms","key_id":"alias/tidemark"},"storage_class":"STANDARD_IA"}"#,
        )
        .unwrap();
        o.validate().unwrap();
        assert_eq!(
            o.sse,
            Some(Sse::Kms {
                key_id: Some("alias/tidemark".into())
            })
        );
        let aes: Sse = serde_json::from_str(r#"{"type":"AES256"}"#).unwrap();
        assert_eq!(aes, Sse::Aes256);
        assert!(serde_json::from_str::<S3Options>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn options_validation_explains() {
        let check = |o: S3Options, needle: &str| {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        check(
            S3Options {
                part_size: MIB,
                ..S3Options::default()
            },
            "5 MiB",
        );
        check(
            S3Options {
                part_concurrency: 0,
                ..S3Options::default()
            },
            "part_concurrency",
        );
        check(
            S3Options {
                storage_class: Some("COLD".into()),
                ..S3Options::default()
            },
            "unknown storage class 'COLD'",
        );
        check(
            S3Options {
                endpoint_url: Some("ftp://x".into()),
                ..S3Options::default()
            },
            "http://",
        );
        check(
            S3Options {
                endpoint_url: Some("http://AKIA:secret@host".into()),
                ..S3Options::default()
            },
            "must not contain credentials",
        );
        let e = S3Options {
            endpoint_url: Some("http://AKIA:secret@host".into()),
            ..S3Options::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn storage_classes_follow_the_kind_of_object() {
        let o = S3Options {
            storage_class: Some("ONEZONE_IA".into()),
            base_storage_class: Some("STANDARD_IA".into()),
            wal_storage_class: Some("GLACIER_IR".into()),
            ..S3Options::default()
        };
        o.validate().unwrap();
        for (key, class) in [
            ("sst/0f3a", Some("STANDARD_IA")),
            (
                "bases/b20261123T133000Z-0a1b2c3d/files/CURRENT",
                Some("STANDARD_IA"),
            ),
            ("wal/0000000000000001.seg", Some("GLACIER_IR")),
            ("bases/b20261123T133000Z-0a1b2c3d/base.json", None),
            ("manifest/0000000000000001.json", None),
            ("manifest/latest.json", None),
            ("index/0000000000000001-0000000000000002.json", None),
            ("lease.json", None),
            ("tidemark.json", None),
            ("other/key", Some("ONEZONE_IA")),
        ] {
            assert_eq!(o.storage_class_for(key), class, "{key}");
        }
        // Without per-kind classes, the general one covers the data objects.
        let o = S3Options {
            storage_class: Some("STANDARD_IA".into()),
            ..S3Options::default()
        };
        assert_eq!(
            o.storage_class_for("wal/0000000000000001.seg"),
            Some("STANDARD_IA")
        );
        assert_eq!(o.storage_class_for("sst/0f3a"), Some("STANDARD_IA"));
        assert_eq!(o.storage_class_for("lease.json"), None);
        assert_eq!(S3Options::default().storage_class_for("sst/0f3a"), None);
    }

    #[test]
    fn classes_a_restore_cannot_read_at_once_are_refused() {
        for class in ["GLACIER", "DEEP_ARCHIVE"] {
            for o in [
                S3Options {
                    storage_class: Some(class.into()),
                    ..S3Options::default()
                },
                S3Options {
                    base_storage_class: Some(class.into()),
                    ..S3Options::default()
                },
                S3Options {
                    wal_storage_class: Some(class.into()),
                    ..S3Options::default()
                },
            ] {
                let e = o.validate().unwrap_err().to_string();
                assert!(
                    e.contains(&format!("storage class {class} is refused")),
                    "{e}"
                );
                assert!(
                    e.contains("must be restored") && e.contains("GLACIER_IR"),
                    "{e}"
                );
            }
        }
        let e = S3Options {
            wal_storage_class: Some("standard".into()),
            ..S3Options::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("wal_storage_class: unknown storage class 'standard'"),
            "{e}"
        );
        assert!(!e.contains("DEEP_ARCHIVE"), "{e}");
    }

    #[test]
    fn paced_uploads_get_time_for_their_share_of_the_rate() {
        let secs = Duration::from_secs;
        let o = S3Options::default();
        // A fast limit changes nothing: 256 KiB/s is still the slowest rate allowed for.
        let fast = o.timeouts(Budget::Paced {
            len: 16 * MIB,
            rate: 64 * MIB,
        });
        assert_eq!(fast, o.timeouts(Budget::Part(16 * MIB)));
        // At 1 MiB/s a stream may get a sixteenth: 64 KiB/s.
        let slow = o.timeouts(Budget::Paced {
            len: 16 * MIB,
            rate: MIB,
        });
        assert_eq!(slow.operation_attempt_timeout(), Some(secs(60 + 256)));
        assert_eq!(slow.read_timeout(), None);
        // Small paced files get it too, not the small-request limit.
        let small = o.timeouts(Budget::Paced {
            len: 4 * MIB,
            rate: MIB,
        });
        assert_eq!(small.operation_attempt_timeout(), Some(secs(60 + 64)));
    }

    #[test]
    fn paced_uploads_are_not_taken_for_stalled_streams() {
        let o = S3Options::default();
        let paced = o
            .timeout_override(Budget::Paced {
                len: 16 * MIB,
                rate: MIB,
            })
            .build();
        let protection = paced
            .stalled_stream_protection()
            .expect("set for paced uploads");
        assert!(!protection.upload_enabled());
        assert!(protection.download_enabled());
        let plain = o.timeout_override(Budget::Part(16 * MIB)).build();
        assert!(plain.stalled_stream_protection().is_none());
    }

    #[test]
    fn part_size_grows_to_fit_the_part_limit() {
        let o = S3Options::default();
        assert_eq!(o.part_size_for(100 * MIB), 16 * MIB);
        let huge = 1024 * 1024 * MIB; // 1 TiB
        let size = o.part_size_for(huge);
        assert!(huge.div_ceil(size) <= MAX_PARTS);
    }

    #[test]
    fn request_timeout_is_configurable_and_checked() {
        let o: S3Options = serde_json::from_str(r#"{"request_timeout_secs":5}"#).unwrap();
        o.validate().unwrap();
        assert_eq!(o.request_timeout(), Duration::from_secs(5));
        assert_eq!(S3Options::default().request_timeout_secs, 30);
        for bad in [0, MAX_REQUEST_TIMEOUT_SECS + 1] {
            let e = S3Options {
                request_timeout_secs: bad,
                ..S3Options::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("request_timeout_secs"), "{e}");
        }
    }

    #[test]
    fn timeouts_fit_the_request() {
        let secs = Duration::from_secs;
        let o = S3Options::default();
        let small = o.timeouts(Budget::Small);
        assert_eq!(small.operation_attempt_timeout(), Some(secs(30)));
        assert_eq!(small.read_timeout(), Some(secs(30)));
        assert_eq!(small.connect_timeout(), Some(CONNECT_TIMEOUT));
        assert_eq!(small.operation_timeout(), None);
        // Documents and segments are small uploads.
        assert_eq!(o.timeouts(Budget::Upload(300)), small);
        assert_eq!(o.timeouts(Budget::Upload(LARGE_BODY - 1)), small);

        // Large bodies: 60 s plus the time at 256 KiB/s, and no separate read timeout.
        let large = o.timeouts(Budget::Upload(64 * MIB));
        assert_eq!(large.operation_attempt_timeout(), Some(secs(60 + 256)));
        assert_eq!(large.read_timeout(), None);
        assert_eq!(large.operation_timeout(), None);
        let part = o.timeouts(Budget::Part(16 * MIB));
        assert_eq!(part.operation_attempt_timeout(), Some(secs(60 + 64)));
        let tail = o.timeouts(Budget::Part(1000));
        assert_eq!(tail.operation_attempt_timeout(), Some(secs(60)));
        let complete = o.timeouts(Budget::Complete(1024 * MIB));
        assert_eq!(complete.operation_attempt_timeout(), Some(secs(300 + 64)));

        // The SDK keeps one connection pool per (connect, read) timeout pair: large requests
        // of any size share one.
        for t in [&part, &tail, &complete] {
            assert_eq!(
                (t.connect_timeout(), t.read_timeout()),
                (large.connect_timeout(), large.read_timeout())
            );
        }

        // Scaled limits never undercut a longer small-request limit.
        let patient = S3Options {
            request_timeout_secs: 600,
            ..S3Options::default()
        };
        assert_eq!(
            patient
                .timeouts(Budget::Part(5 * MIB))
                .operation_attempt_timeout(),
            Some(secs(600))
        );
        // A short one also bounds connecting.
        let quick = S3Options {
            request_timeout_secs: 2,
            ..S3Options::default()
        };
        assert_eq!(
            quick.timeouts(Budget::Small).connect_timeout(),
            Some(secs(2))
        );
    }

    fn store(endpoint: Option<&str>, region: Option<&str>) -> StoreResult<S3Store> {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        S3Store::from_sdk_config(
            &sdk,
            "bucket",
            "pre/fix/",
            &S3Options {
                endpoint_url: endpoint.map(str::to_owned),
                region: region.map(str::to_owned),
                ..S3Options::default()
            },
        )
    }

    #[test]
    fn region_defaults_with_an_endpoint_only() {
        let s = store(Some("http://127.0.0.1:1"), None).unwrap();
        assert_eq!(
            s.describe(),
            "s3://bucket/pre/fix (endpoint http://127.0.0.1:1, region us-east-1)"
        );
        assert_eq!(s.location("k"), "s3://bucket/pre/fix/k");
        let e = store(None, None).unwrap_err().to_string();
        assert!(e.contains("AWS_REGION"), "{e}");
        let s = store(None, Some("eu-west-1")).unwrap();
        assert_eq!(s.describe(), "s3://bucket/pre/fix (region eu-west-1)");
    }

    #[derive(Debug)]
    struct NoCredentials;

    impl aws_credential_types::provider::ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                aws_credential_types::provider::error::CredentialsError::not_loaded(
                    "nothing configured",
                ),
            ))
        }
    }

    #[tokio::test]
    async fn missing_credentials_are_reported_as_such() {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(NoCredentials),
            )
            .build();
        // Nothing listens on port 1; the request must fail before it is sent.
        let s = S3Store::from_sdk_config(
            &sdk,
            "bucket",
            "",
            &S3Options {
                endpoint_url: Some("http://127.0.0.1:1".into()),
                ..S3Options::default()
            },
        )
        .unwrap();
        let err = s.get("k").await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidCredentials { .. }),
            "expected InvalidCredentials, got {err}"
        );
        assert!(err.to_string().contains("no usable credentials"), "{err}");
    }

    /// An S3 endpoint on 127.0.0.1 answering request `n` (counted from 0) with
    /// `reply(n)`: for replies no real server gives.
    async fn fake_server(reply: impl Fn(usize) -> String + Send + Sync + 'static) -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let reply = Arc::new(reply);
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (reply, count) = (Arc::clone(&reply), Arc::clone(&count));
                tokio::spawn(async move {
                    let (mut have, mut buf) = (Vec::new(), [0u8; 8192]);
                    loop {
                        // Requests without a body: each ends with its head.
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let body = reply(count.fetch_add(1, Ordering::Relaxed));
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\n\
                                 content-length: {}\r\n\r\n",
                                body.len()
                            );
                            let sent = sock.write_all(format!("{head}{body}").as_bytes()).await;
                            if sent.is_err() {
                                return;
                            }
                        }
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        endpoint
    }

    /// A ListObjectsV2 page listing `keys`, truncated with token `next` when there is one.
    fn listing(keys: &[&str], next: Option<&str>) -> String {
        let contents: String = keys
            .iter()
            .map(|k| format!("<Contents><Key>{k}</Key><Size>1</Size></Contents>"))
            .collect();
        let more = match next {
            Some(t) => format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{t}</NextContinuationToken>"
            ),
            None => "<IsTruncated>false</IsTruncated>".to_owned(),
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult \
             xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix></Prefix>\
             <MaxKeys>1000</MaxKeys>{more}{contents}</ListBucketResult>"
        )
    }

    fn store_at(endpoint: &str) -> S3Store {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(
                    aws_credential_types::Credentials::new("AKIDTEST", "secret", None, None, "t"),
                ),
            )
            .build();
        let options = S3Options {
            endpoint_url: Some(endpoint.to_owned()),
            force_path_style: true,
            ..S3Options::default()
        };
        S3Store::from_sdk_config(&sdk, "b", "", &options).unwrap()
    }

    /// A server whose listing loops (the same continuation token again, the same key on
    /// every page, or empty pages without end) is refused, saying why; it used to be listed
    /// forever. A listing that moves on is read whole, in key order.
    #[tokio::test]
    async fn a_listing_that_does_not_advance_is_refused() {
        type Reply = Box<dyn Fn(usize) -> String + Send + Sync>;
        let cases: [(&str, Reply); 3] = [
            (
                "continuation token \"again\" again",
                Box::new(|n| listing(&[&format!("wal/{n}.seg")], Some("again"))),
            ),
            (
                "listed the key \"wal/1.seg\" twice",
                Box::new(|n| listing(&["wal/1.seg"], Some(&format!("t{n}")))),
            ),
            (
                "1000 pages in a row listed nothing",
                Box::new(|n| listing(&[], Some(&format!("t{n}")))),
            ),
        ];
        for (why, reply) in cases {
            let s = store_at(&fake_server(reply).await);
            let listed = tokio::time::timeout(Duration::from_secs(120), s.list("")).await;
            let e = listed.expect("the listing ends").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("does not advance") && msg.contains(why),
                "{msg}"
            );
        }
        let s = store_at(
            &fake_server(|n| match n {
                0 => listing(&["a/2"], Some("t")),
                _ => listing(&["a/1"], None),
            })
            .await,
        );
        let keys: Vec<String> = s
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/1", "a/2"]);
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_transient_and_named() {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(
                    aws_credential_types::Credentials::new("AKIDTEST", "secret", None, None, "t"),
                ),
            )
            .build();
        let s = S3Store::from_sdk_config(
            &sdk,
            "bucket",
            "",
            &S3Options {
                endpoint_url: Some("http://127.0.0.1:1".into()),
                ..S3Options::default()
            },
        )
        .unwrap();
        let err = s.head("k").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("cannot reach endpoint http://127.0.0.1:1"),
            "{msg}"
        );
        assert!(!msg.contains("secret"), "{msg}");
    }

    #[test]
    fn service_errors_are_classified() {
        let s = store(Some("http://127.0.0.1:1"), None).unwrap();
        let classify = |status, code: &str| {
            classify_service_error(
                StoreOp::Get,
                "k".into(),
                "loc".into(),
                status,
                code,
                "detail".into(),
                &s,
            )
        };
        assert!(classify(412, "PreconditionFailed").is_precondition_failed());
        assert!(classify(409, "ConditionalRequestConflict").is_precondition_failed());
        assert!(matches!(
            classify(404, "NoSuchBucket"),
            StoreError::BucketNotFound { .. }
        ));
        assert!(classify(404, "NoSuchKey").is_not_found());
        assert!(classify(404, "").is_not_found());
        assert!(matches!(
            classify(403, "InvalidAccessKeyId"),
            StoreError::InvalidCredentials { .. }
        ));
        assert!(matches!(
            classify(403, "SignatureDoesNotMatch"),
            StoreError::InvalidCredentials { .. }
        ));
        assert!(matches!(
            classify(403, "AccessDenied"),
            StoreError::AccessDenied { .. }
        ));
        assert!(classify(503, "SlowDown").is_transient());
        assert!(classify(500, "InternalError").is_transient());
        assert!(classify(400, "RequestTimeout").is_transient());
        assert!(classify(429, "").is_transient());
        assert!(matches!(
            classify(400, "InvalidArgument"),
            StoreError::Other { .. }
        ));
        let msg = classify(404, "NoSuchBucket").to_string();
        assert!(msg.contains("bucket 'bucket' does not exist"), "{msg}");
    }
}
