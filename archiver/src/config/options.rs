//! Every setting of the archiver, with its default: [`ArchiverOptions`] (one database: the
//! keys of the config file, top level or a `[[databases]]` table) and [`PruneOptions`] (the
//! retention policy: `[retention]`, or `prune`'s flags). The config file's keys are these
//! fields' names; the flags and variables that set them are in [`super::flags`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::model::{LockMode, ObjectLock};

/// Everything `tidemark-archiver run` can be told, from flags, environment or a TOML file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiverOptions {
    /// The database directory.
    pub db: PathBuf,
    /// The repository URL (`s3://bucket/prefix` or `file:///dir`).
    pub to: String,
    /// The WAL directory, when the database sets `wal_dir`.
    pub wal_dir: Option<PathBuf>,
    /// Close a segment this long after its first record.
    #[serde(with = "super::duration")]
    pub sync_interval: Duration,
    /// Close a segment when its records reach this many bytes.
    pub max_segment_bytes: u64,
    /// Take a base backup this often.
    #[serde(with = "super::duration")]
    pub base_interval: Duration,
    /// Write a manifest generation at least this often while segments are pending.
    #[serde(with = "super::duration")]
    pub checkpoint_interval: Duration,
    /// Look at the WAL directory at least this often, events or not.
    #[serde(with = "super::duration")]
    pub poll_interval: Duration,
    /// How long the lease lasts without renewal.
    #[serde(with = "super::duration")]
    pub lease_ttl: Duration,
    /// zstd level of segments.
    pub zstd_level: i32,
    /// Where base backups copy the database (must be on its file system for hard links).
    /// Default: a hidden directory beside the database directory.
    pub scratch_dir: Option<PathBuf>,
    /// Base backup files uploaded at once (1 to 64; `--upload-concurrency`).
    pub upload_concurrency: usize,
    /// Stop once the WAL has been read to its end and a base backup exists (one-shot use:
    /// `tidemark-archiver backup` without a running service, tests, the demo).
    pub exit_when_caught_up: bool,
    /// Take a base backup at start even if the last one is recent.
    pub base_at_start: bool,
    /// Serve Prometheus metrics (`/metrics`) and a health check (`/health`) over HTTP on
    /// this `HOST:PORT`. Off when unset.
    pub metrics_addr: Option<String>,
    /// The retention policy, applied every `retention.interval` and after each base
    /// backup. Nothing is ever deleted without one.
    pub retention: Option<PruneOptions>,
    /// How to reach the store.
    pub store: StoreArgs,
    /// Start even on a store that fails the start-up check of conditional writes
    /// (`--allow-unsafe-store`; docs/operations.md, "Checking a store").
    pub allow_unsafe_store: bool,
    /// Create the repository with S3 Object Lock in this mode (`governance` or
    /// `compliance`), with `object_lock_days`; an existing repository keeps the lock it
    /// was created with (FORMAT.md §3.2).
    pub object_lock_mode: Option<LockMode>,
    /// How long each object of a new locked repository is kept, in days from its write.
    pub object_lock_days: Option<u32>,
}

impl ArchiverOptions {
    /// The object lock these options ask for, once [`super::check_settings`] has passed:
    /// `None` when they ask for none.
    pub fn object_lock(&self) -> Option<ObjectLock> {
        Some(ObjectLock {
            mode: self.object_lock_mode?,
            days: self.object_lock_days?,
        })
    }

    /// The longest span the retention policy keeps (its window or its longest tier), to
    /// compare a lock with; `None` without a policy or with one that only counts bases.
    pub fn retention_horizon(&self) -> Option<time::Duration> {
        let r = self.retention.as_ref()?;
        [
            r.pitr_window,
            r.keep_daily_for,
            r.keep_weekly_for,
            r.keep_monthly_for,
        ]
        .into_iter()
        .flatten()
        .max()
        .and_then(|d| time::Duration::try_from(d).ok())
    }
}

impl Default for ArchiverOptions {
    fn default() -> Self {
        ArchiverOptions {
            db: PathBuf::new(),
            to: String::new(),
            wal_dir: None,
            sync_interval: Duration::from_secs(1),
            max_segment_bytes: 64 << 20,
            base_interval: Duration::from_secs(24 * 3600),
            checkpoint_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(60),
            zstd_level: 3,
            scratch_dir: None,
            upload_concurrency: 4,
            exit_when_caught_up: false,
            base_at_start: false,
            metrics_addr: None,
            retention: None,
            store: StoreArgs::default(),
            allow_unsafe_store: false,
            object_lock_mode: None,
            object_lock_days: None,
        }
    }
}

/// A retention policy: `[retention]` in the service's config, or `tidemark-archiver prune`'s
/// flags. Durations are written like `36h`, `7d`, `90days`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneOptions {
    /// Keep the newest N base backups (and, without `pitr_window`, every point from the
    /// oldest of them on).
    pub keep_last: Option<usize>,
    /// Keep every point of this much recent history restorable.
    #[serde(with = "super::duration::optional")]
    pub pitr_window: Option<Duration>,
    /// Also keep the newest base of each day for this long (restorable to its own point).
    #[serde(with = "super::duration::optional")]
    pub keep_daily_for: Option<Duration>,
    /// Also keep the newest base of each ISO week for this long.
    #[serde(with = "super::duration::optional")]
    pub keep_weekly_for: Option<Duration>,
    /// Also keep the newest base of each month for this long.
    #[serde(with = "super::duration::optional")]
    pub keep_monthly_for: Option<Duration>,
    /// How long objects stay after no manifest generation references them any more, so
    /// that restores planned against an earlier generation finish. Longer than your
    /// longest restore.
    #[serde(with = "super::duration")]
    pub grace: Duration,
    /// How often the service applies the policy (also after every base backup).
    #[serde(with = "super::duration")]
    pub interval: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            keep_last: None,
            pitr_window: None,
            keep_daily_for: None,
            keep_weekly_for: None,
            keep_monthly_for: None,
            grace: Duration::from_secs(24 * 3600),
            interval: Duration::from_secs(3600),
        }
    }
}
