//! The command line and environment of `run`, `backup`, `status` and `prune`: each flag, its
//! `TIDEMARK_*` variable, and what it sets. Each command takes only the store flags it uses
//! (`status` reads: [`StoreAccess`]; the others write: [`StoreArgs`]). How these go over
//! the config file is [`super::layering`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tidemark_manifest::cli::{StoreAccess, StoreArgs, parse_bool};
use tidemark_manifest::model::LockMode;
use tidemark_manifest::store::Rate;

use super::ReplayBound;

fn parse_lock_mode(s: &str) -> Result<LockMode, String> {
    s.parse()
}

/// `run`: one database (or a config file's `[[databases]]`).
#[derive(Debug, Clone, Args)]
pub struct RunFlags {
    /// The RocksDB database directory.
    #[arg(long, env = "TIDEMARK_DB")]
    pub db: Option<PathBuf>,
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    pub to: Option<String>,
    /// A TOML file with these options (flags and environment win over it).
    #[arg(long, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The WAL directory, if the database sets wal_dir.
    #[arg(long, env = "TIDEMARK_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Close a segment this long after its first record (e.g. 1s, 250ms).
    #[arg(long, env = "TIDEMARK_SYNC_INTERVAL", value_parser = humantime::parse_duration)]
    pub sync_interval: Option<Duration>,
    /// Take a base backup this often (e.g. 24h).
    #[arg(long, env = "TIDEMARK_BASE_INTERVAL", value_parser = humantime::parse_duration)]
    pub base_interval: Option<Duration>,
    /// Also take a base backup as soon as the WAL shipped after the newest base exceeds
    /// this: bytes of segments (e.g. 256MiB, 1GB) or WAL records (e.g. "1000000 records").
    /// At most one of this and --target-recovery-time.
    #[arg(long, env = "TIDEMARK_MAX_REPLAY", value_name = "SIZE|N records")]
    pub max_replay: Option<ReplayBound>,
    /// Also take a base backup as soon as the predicted restore time of the newest point
    /// exceeds this (e.g. 5m), predicted with --restore-download-rate and
    /// --restore-replay-rate.
    #[arg(long, env = "TIDEMARK_TARGET_RECOVERY_TIME", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub target_recovery_time: Option<Duration>,
    /// The rate a restore downloads at, for predicted restore times (e.g. 200MB/s).
    #[arg(long, env = "TIDEMARK_RESTORE_DOWNLOAD_RATE", value_name = "RATE")]
    pub restore_download_rate: Option<Rate>,
    /// The WAL records per second a restore replays, for predicted restore times.
    #[arg(
        long,
        env = "TIDEMARK_RESTORE_REPLAY_RATE",
        value_name = "RECORDS_PER_SEC"
    )]
    pub restore_replay_rate: Option<u64>,
    /// Write a manifest generation at least this often while archiving (e.g. 60s).
    #[arg(long, env = "TIDEMARK_CHECKPOINT_INTERVAL", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: Option<Duration>,
    /// Close a segment at this many bytes of records.
    #[arg(long, env = "TIDEMARK_MAX_SEGMENT_BYTES")]
    pub max_segment_bytes: Option<u64>,
    /// Where base backups copy the database (same file system as the database).
    #[arg(long, env = "TIDEMARK_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Stop once caught up with the WAL and a base backup exists.
    #[arg(long)]
    pub exit_when_caught_up: bool,
    /// Serve Prometheus metrics (/metrics) and a health check (/health) on HOST:PORT
    /// (e.g. 127.0.0.1:9187; port 0 picks a free port, logged at start). Off by default.
    #[arg(long, env = "TIDEMARK_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Base backup files uploaded at once (1 to 64, default 4). Large files go up in
    /// parts, at most 4 parts at once for the whole process.
    #[arg(long, env = "TIDEMARK_UPLOAD_CONCURRENCY", value_name = "N")]
    pub upload_concurrency: Option<usize>,
    /// Start even on a store whose conditional writes fail the start-up check (unsafe
    /// with more than one writer; docs/operations.md).
    #[arg(long, env = "TIDEMARK_ALLOW_UNSAFE_STORE", value_parser = parse_bool)]
    pub allow_unsafe_store: bool,
    /// Create the repository with S3 Object Lock: governance or compliance (with
    /// --object-lock-days). An existing repository keeps the lock it was created with.
    #[arg(long, env = "TIDEMARK_OBJECT_LOCK_MODE", value_name = "MODE", value_parser = parse_lock_mode)]
    pub object_lock_mode: Option<LockMode>,
    /// With --object-lock-mode: how long each object is kept, in days from its write
    /// (1 to 36500).
    #[arg(long, env = "TIDEMARK_OBJECT_LOCK_DAYS", value_name = "DAYS")]
    pub object_lock_days: Option<u32>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `backup`: `run`'s flags, and the database of a file that lists several.
#[derive(Debug, Clone, Args)]
pub struct BackupFlags {
    /// Only this database of a config file that lists several ([[databases]] name).
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// With an archiver of the database running on this machine: how long to wait for the
    /// base it takes on request (it goes on after the wait; default 1h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", value_name = "DURATION")]
    pub wait: Duration,
    #[command(flatten)]
    pub run: RunFlags,
}

/// Which repository a command works on: the URL, or the archiver's config file (and one
/// of its `[[databases]]`); a URL given wins over the file's `to`.
#[derive(Debug, Clone, Args)]
pub struct RepositoryFlags {
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    pub to: Option<String>,
    /// The archiver's TOML config: its `to` and `[store]` apply (flags win); `prune` also
    /// takes its `[retention]`.
    #[arg(long, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With a config that lists `[[databases]]`: the database whose repository to use.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
}

/// `status`: the repository, read only.
#[derive(Debug, Clone, Args)]
pub struct StatusFlags {
    #[command(flatten)]
    pub repository: RepositoryFlags,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit with the threshold code (see below) if the newest archived record is older than this (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_lag: Option<Duration>,
    /// Exit with the threshold code (see below) if the newest base backup is older than this (e.g. 26h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_base_age: Option<Duration>,
    #[command(flatten)]
    pub store: StoreAccess,
}

/// `prune`: the repository and a retention policy.
#[derive(Debug, Clone, Args)]
pub struct PruneFlags {
    #[command(flatten)]
    pub repository: RepositoryFlags,
    /// Keep the newest N base backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep every point of this much recent history restorable (e.g. 7d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub pitr_window: Option<Duration>,
    /// Also keep the newest base of each day for this long (e.g. 7d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keep_daily_for: Option<Duration>,
    /// Also keep the newest base of each ISO week for this long (e.g. 30d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keep_weekly_for: Option<Duration>,
    /// Also keep the newest base of each month for this long (e.g. 90d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keep_monthly_for: Option<Duration>,
    /// Keep unreferenced objects this long, for restores already under way (default 24h).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub grace: Option<Duration>,
    /// Print what would be dropped and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `check-store`: where to probe (a repository, or where one will be), and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct CheckStoreFlags {
    #[command(flatten)]
    pub repository: RepositoryFlags,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}
