//! Every setting of the archiver, with its default: [`ArchiverOptions`] (one database: the
//! keys of the config file, top level or a `[[databases]]` table) and [`PruneOptions`] (the
//! retention policy: `[retention]`, or `prune`'s flags). The config file's keys are these
//! fields' names; the flags and variables that set them are in [`super::flags`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::model::{LockMode, ObjectLock};
use tidemark_manifest::plan::RestoreRates;
use tidemark_manifest::store::Rate;

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
    /// Close a segment when its records reach this many bytes. The archiver holds at most
    /// two closed segments and the open one's compressed bytes: about twice this at most.
    pub max_segment_bytes: u64,
    /// Take a base backup this often.
    #[serde(with = "super::duration")]
    pub base_interval: Duration,
    /// Also take a base backup as soon as the WAL shipped after the newest base's point
    /// exceeds this (`256MiB`, or `1000000 records`): a bound on the WAL a restore replays.
    /// At most one of this and `target_recovery_time`.
    pub max_replay: Option<ReplayBound>,
    /// Also take a base backup as soon as the predicted restore time of the newest point
    /// exceeds this (`5m`), predicted with `restore_download_rate` and
    /// `restore_replay_rate`.
    #[serde(with = "super::duration::optional")]
    pub target_recovery_time: Option<Duration>,
    /// The rate a restore downloads at, for the prediction (`200MB/s`; default: the
    /// format crate's measured default, [`RestoreRates`]).
    pub restore_download_rate: Option<Rate>,
    /// The WAL records per second a restore replays, for the prediction.
    pub restore_replay_rate: Option<u64>,
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
    /// zstd level of the records read while catching up with a backlog of the WAL (faster;
    /// the same as `zstd_level` to keep one level).
    pub catch_up_zstd_level: i32,
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
            // Two closed segments are held at most: this bounds the archiver's memory.
            max_segment_bytes: 32 << 20,
            base_interval: Duration::from_secs(24 * 3600),
            max_replay: None,
            target_recovery_time: None,
            restore_download_rate: None,
            restore_replay_rate: None,
            checkpoint_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(60),
            zstd_level: 3,
            catch_up_zstd_level: 1,
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

impl ArchiverOptions {
    /// The rates restore times are predicted with: those given, the measured defaults for
    /// the others.
    pub fn restore_rates(&self) -> RestoreRates {
        let d = RestoreRates::default();
        RestoreRates {
            download_bytes_per_sec: self
                .restore_download_rate
                .map_or(d.download_bytes_per_sec, Rate::get),
            replay_records_per_sec: self.restore_replay_rate.unwrap_or(d.replay_records_per_sec),
        }
    }
}

/// How much WAL a restore may replay on top of the newest base before a new base is
/// taken: bytes of segments as stored (`256MiB`, `1GB`, `4096B`; `KB`/`MB`/`GB` are powers
/// of 1000, `KiB`/`MiB`/`GiB` of 1024) or WAL records (`1000000 records`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayBound {
    Bytes(u64),
    Records(u64),
}

impl std::str::FromStr for ReplayBound {
    type Err = String;

    fn from_str(input: &str) -> Result<ReplayBound, String> {
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim());
        let bad = |why: &str| {
            format!(
                "invalid replay bound {input:?}: {why} (examples: 256MiB, 1GB, 1000000 records)"
            )
        };
        let value: f64 = number
            .parse()
            .map_err(|_| bad("it must start with a number"))?;
        let scale: f64 = match unit {
            "records" | "record" => {
                if number.contains('.') {
                    return Err(bad("a number of records is a whole number"));
                }
                return number
                    .parse()
                    .map(ReplayBound::Records)
                    .map_err(|_| bad("the number of records is too large"));
            }
            "B" => 1.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            "" => return Err(bad("it needs a unit: bytes (B, MB, MiB...) or records")),
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        let bytes = value * scale;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(bad("it is too large"));
        }
        Ok(ReplayBound::Bytes(bytes.round() as u64))
    }
}

impl std::fmt::Display for ReplayBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayBound::Bytes(n) => write!(f, "{n}B"),
            ReplayBound::Records(n) => write!(f, "{n} records"),
        }
    }
}

impl Serialize for ReplayBound {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReplayBound {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReplayBound, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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
