//! The archiver as a long-lived service: one loop that wakes on WAL changes and deadlines,
//! reads new records, ships segments, writes manifest generations, takes base backups in
//! the background, and keeps its lease.
//!
//! Start-up: check the database, open the repository, take the lease, create the repository
//! config if there is none, load the current state, and resume the WAL right after the last
//! archived record. Shutdown (SIGTERM/SIGINT, or the caller's future): ship the open segment,
//! write a final generation, release the lease.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::model::{
    Compression, FORMAT_VERSION, Gap, GapKind, Lineage, RepositoryConfig, time_from_micros,
};
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use tidemark_manifest::segment::{Record, SegmentReader};
use tidemark_manifest::store::StoreError;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::base::{BaseError, BaseOptions, BaseResult, take_base_backup};
use crate::check::{CheckError, check_database};
use crate::checkpoint::{CheckpointManager, CheckpointOptions};
use crate::follow::{FollowError, FollowEvent, StartPosition, WalFollower};
use crate::lease::{LeaseError, LeaseHandle};
use crate::metrics::{Metrics, Phase};
use crate::prune::{PruneError, PruneOptions};
use crate::ship::{ShipError, ShipOptions, Shipper};
use crate::watch::{WatchError, Watcher};

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
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Close a segment when its records reach this many bytes.
    pub max_segment_bytes: u64,
    /// Take a base backup this often.
    #[serde(with = "humantime_serde")]
    pub base_interval: Duration,
    /// Write a manifest generation at least this often while segments are pending.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Look at the WAL directory at least this often, events or not.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long the lease lasts without renewal.
    #[serde(with = "humantime_serde")]
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
        }
    }
}

pub(crate) mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (examples: 500ms, 1s, 15m, 24h, 7d)"
            ))
        })
    }
}

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Ship(#[from] ShipError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(
        "the database's sequence number went back: the repository has archived up to {archived}, \
         the database's WAL continues at {found}. Was it restored or replaced? Archive it to a \
         new repository URL"
    )]
    Diverged { archived: u64, found: u64 },
    #[error("cannot serve metrics on {addr}: {source}; pass a free HOST:PORT as --metrics-addr")]
    MetricsAddr {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl ServiceError {
    /// Exit code for the binary: 2 configuration or usage, 3 another writer or a lost race,
    /// 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServiceError::Check(_) | ServiceError::Diverged { .. } => 2,
            ServiceError::MetricsAddr { .. } => 2,
            ServiceError::Store(StoreError::Config { .. }) => 2,
            ServiceError::Repo(e) if e.is_usage() => 2,
            ServiceError::Lease(LeaseError::Held { .. } | LeaseError::Lost { .. }) => 3,
            ServiceError::Repo(RepoError::LostRace { .. } | RepoError::Conflict { .. }) => 3,
            _ => 1,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub records: u64,
    pub segments: u64,
    pub bases: u64,
    pub gaps: u64,
    pub last_seq: Option<u64>,
}

/// Recent (last sequence, time) pairs, so that a base backup can learn the observed time of
/// its earliest restorable sequence.
#[derive(Debug, Default)]
struct RecentTimes {
    entries: VecDeque<(u64, i64)>,
}

impl RecentTimes {
    const KEEP: usize = 200_000;

    fn push(&mut self, last_seq: u64, time_us: i64) {
        if self.entries.len() == Self::KEEP {
            self.entries.pop_front();
        }
        self.entries.push_back((last_seq, time_us));
    }

    /// The time of the record holding `seq`.
    fn lookup(&self, seq: u64) -> Option<i64> {
        let i = self.entries.partition_point(|(last, _)| *last < seq);
        self.entries.get(i).map(|(_, t)| *t)
    }
}

/// Notices column families created or dropped in the live database: the newest base no
/// longer matches, so a new base is needed, and the records between the change and that
/// base cannot be restored correctly (RocksDB's recovery drops records of a column family
/// its MANIFEST does not know, and keeps a dropped one).
#[derive(Debug)]
struct CfWatch {
    db: PathBuf,
    last_check: Instant,
    manifest_sig: Option<(PathBuf, u64, std::time::SystemTime)>,
    /// The last sequence read while the live set still matched the newest base.
    last_matching_seq: u64,
    /// The first sequence that may belong to the changed set, until a base covers it.
    changed_from: Option<u64>,
    /// The live set as last read from the MANIFEST.
    live: Vec<(u32, String)>,
}

impl CfWatch {
    const EVERY: Duration = Duration::from_secs(2);

    fn new(db: &Path, last_seq: u64) -> CfWatch {
        CfWatch {
            db: db.to_path_buf(),
            last_check: Instant::now() - Self::EVERY,
            manifest_sig: None,
            last_matching_seq: last_seq,
            changed_from: None,
            live: Vec::new(),
        }
    }

    /// True when `base` knows exactly the live column families last seen.
    fn base_matches_live(&self, base: &tidemark_manifest::model::BaseSummary) -> bool {
        base_set(base) == self.live
    }

    /// Looks at the MANIFEST (at most every [`Self::EVERY`]).
    fn look(&mut self) -> Look {
        use tidemark_manifest::rocks::version_edit::{ManifestState, current_manifest};
        if self.last_check.elapsed() < Self::EVERY {
            return Look::NotYet;
        }
        self.last_check = Instant::now();
        let Ok(path) = current_manifest(&self.db) else {
            return Look::NotYet;
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            return Look::NotYet;
        };
        let Ok(modified) = meta.modified() else {
            return Look::NotYet;
        };
        let sig = (path.clone(), meta.len(), modified);
        if self.manifest_sig.as_ref() == Some(&sig) {
            return Look::Unchanged;
        }
        let Ok(state) = ManifestState::from_file(&path) else {
            return Look::NotYet;
        };
        self.manifest_sig = Some(sig);
        let mut live: Vec<(u32, String)> = state
            .column_families
            .iter()
            .map(|(id, cf)| (*id, cf.name.clone()))
            .collect();
        live.sort();
        Look::Changed(live)
    }

    /// Called after each poll with the last sequence read so far; returns true when a
    /// column family change is newly detected.
    fn observe(
        &mut self,
        base: Option<&tidemark_manifest::model::BaseSummary>,
        read_up_to: u64,
    ) -> bool {
        let Some(base) = base else {
            return false;
        };
        let matches = match self.look() {
            Look::NotYet => return false,
            // Unchanged since a look that matched: still matching.
            Look::Unchanged => self.live == base_set(base),
            Look::Changed(live) => {
                self.live = live;
                self.live == base_set(base)
            }
        };
        if matches {
            if self.changed_from.is_none() {
                // Every record read before this look was written before any change.
                self.last_matching_seq = self.last_matching_seq.max(read_up_to);
            }
            false
        } else if self.changed_from.is_none() {
            self.changed_from = Some(self.last_matching_seq + 1);
            tracing::warn!(
                live = ?self.live,
                in_newest_base = ?base_set(base),
                from_seq = self.last_matching_seq + 1,
                "column families changed: taking a new base backup; points between the change \
                 and that base cannot be restored"
            );
            true
        } else {
            false
        }
    }
}

/// What a look at the MANIFEST found.
#[derive(Debug)]
enum Look {
    NotYet,
    Unchanged,
    Changed(Vec<(u32, String)>),
}

fn base_set(base: &tidemark_manifest::model::BaseSummary) -> Vec<(u32, String)> {
    let mut set: Vec<(u32, String)> = base
        .column_families
        .iter()
        .map(|c| (c.id, c.name.clone()))
        .collect();
    set.sort();
    set
}

/// The resume point: right after the last archived record.
async fn resume_position(
    repo: &Repository,
    state: &RepoState,
    scratch: &Path,
) -> Result<(StartPosition, Option<i64>), ServiceError> {
    let Some(last) = state.history.segments.last() else {
        return Ok((StartPosition::Oldest, None));
    };
    std::fs::create_dir_all(scratch).map_err(|e| {
        ServiceError::Other(format!(
            "cannot create scratch directory {}: {e}",
            scratch.display()
        ))
    })?;
    let path = repo.fetch_segment(last, scratch).await?;
    let key = last.key.clone();
    let record = tokio::task::spawn_blocking(move || -> Result<Option<Record>, RepoError> {
        let file = std::io::BufReader::new(std::fs::File::open(&path).map_err(|source| {
            tidemark_manifest::segment::SegmentError::Io {
                key: key.clone(),
                source,
            }
        })?);
        let mut reader = SegmentReader::new(&key, file, None)?;
        let mut last = None;
        while let Some(r) = reader.next_record()? {
            last = Some(r);
        }
        let _ = std::fs::remove_file(&path);
        Ok(last)
    })
    .await
    .map_err(|e| ServiceError::Other(e.to_string()))??;
    let r = record.ok_or_else(|| ServiceError::Other(format!("segment {} is empty", last.key)))?;
    Ok((
        StartPosition::After {
            log_number: r.log_number,
            record_offset: r.log_offset,
            next_seq: r.next_seq(),
        },
        Some(r.time_us),
    ))
}

pub(crate) fn default_scratch(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".to_owned());
    db.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!(".{name}.tidemark-scratch"))
}

/// Whether an error is worth retrying later rather than stopping for.
fn is_retryable(e: &ShipError) -> bool {
    match e {
        ShipError::Repo(RepoError::Store(s)) => {
            !matches!(s, StoreError::Config { .. } | StoreError::InvalidKey { .. })
        }
        _ => false,
    }
}

/// Runs the archiver until `shutdown` resolves (or, with `exit_when_caught_up`, until it is
/// caught up and a base backup exists). `base_requests` wakes it to take a base backup now.
pub async fn run(
    opts: ArchiverOptions,
    shutdown: impl Future<Output = ()>,
    base_requests: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<RunSummary, ServiceError> {
    let metrics = Arc::new(Metrics::new());
    let _metrics_server = serve_metrics(opts.metrics_addr.as_deref(), Arc::clone(&metrics)).await?;
    run_with_metrics(opts, metrics, shutdown, base_requests).await
}

/// Serves `exporter` on `addr` when one is configured; the server stops when dropped.
pub(crate) async fn serve_metrics<E: crate::metrics::Exporter>(
    addr: Option<&str>,
    exporter: Arc<E>,
) -> Result<Option<crate::metrics::MetricsServer>, ServiceError> {
    match addr {
        Some(addr) => crate::metrics::serve(addr, exporter)
            .await
            .map(Some)
            .map_err(|source| ServiceError::MetricsAddr {
                addr: addr.to_owned(),
                source,
            }),
        None => Ok(None),
    }
}

/// What [`run`] does, reporting to `metrics` without serving them (`opts.metrics_addr` is
/// not used): the caller serves them, as [`crate::fleet`] does for several databases.
pub async fn run_with_metrics(
    opts: ArchiverOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    mut base_requests: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<RunSummary, ServiceError> {
    let check = check_database(&opts.db, opts.wal_dir.as_deref())?;
    let repo = opts.store.open(&opts.to, true).await?;
    tracing::info!(
        db = %opts.db.display(),
        to = %repo.location(),
        encryption = repo
            .encryption()
            .map_or_else(|| "none".to_owned(), |e| format!("client-side, key id {}", e.key_id)),
        "starting"
    );
    let lease = LeaseHandle::acquire_beside(&repo, opts.lease_ttl, &opts.db).await?;
    metrics.lease_held_until(Some(lease.lease().expires_at));
    let result = run_with_lease(
        &opts,
        &check,
        &repo,
        lease,
        shutdown,
        &mut base_requests,
        &metrics,
    )
    .await;
    metrics.lease_held_until(None);
    metrics.set_phase(Phase::Stopped);
    if let Err(e) = &result {
        tracing::error!(error = %e, "archiver stopped");
    }
    result
}

async fn run_with_lease(
    opts: &ArchiverOptions,
    check: &crate::check::DbCheck,
    repo: &Repository,
    mut lease: LeaseHandle,
    shutdown: impl Future<Output = ()>,
    base_requests: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    metrics: &Arc<Metrics>,
) -> Result<RunSummary, ServiceError> {
    let config = match repo.read_config().await? {
        Some(c) => c,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            repo.create_config(&RepositoryConfig {
                format_version: FORMAT_VERSION,
                repository_id: id.clone(),
                created_at: OffsetDateTime::now_utc(),
                database_identity: check.identity.clone(),
                lineage: Lineage {
                    id: uuid::Uuid::new_v4().to_string(),
                    parent: None,
                },
                segment_compression: Compression::Zstd,
                encryption: repo.encryption().cloned(),
            })
            .await?
        }
    };
    if config.database_identity != check.identity {
        return Err(RepoError::WrongDatabase {
            location: repo.location(),
            expected: check.identity.clone(),
            found: config.database_identity,
        }
        .into());
    }
    let state = repo.load().await?;
    let scratch = opts
        .scratch_dir
        .clone()
        .unwrap_or_else(|| default_scratch(&opts.db));
    let (start, min_time) = resume_position(repo, &state, &scratch).await?;
    // With no segment yet but a generation, nothing before its tail start belongs to the
    // history (the first record ever read set it).
    let history_start = state.next_seq();
    tracing::info!(
        generation = state.generation.as_ref().map_or(0, |g| g.generation),
        segments = state.history.segments.len(),
        bases = state.history.bases.len(),
        next_seq = ?history_start,
        start = ?start,
        "resuming"
    );
    let mut follower = WalFollower::new(&check.wal_dir, start)?;
    if let Some(t) = min_time {
        follower = follower.with_min_time(t);
    }
    let mut watcher = Watcher::new(&check.wal_dir, opts.poll_interval)?;
    let mut shipper = Shipper::new(
        repo.clone(),
        ShipOptions {
            sync_interval: opts.sync_interval,
            max_segment_bytes: opts.max_segment_bytes,
            zstd_level: opts.zstd_level,
        },
    )
    .with_metrics(Arc::clone(metrics));
    let mut checkpoint = CheckpointManager::new(
        repo.clone(),
        &state,
        CheckpointOptions {
            interval: opts.checkpoint_interval,
            ..CheckpointOptions::default()
        },
    )
    .with_metrics(Arc::clone(metrics));
    let times = Arc::new(Mutex::new(RecentTimes::default()));
    if let (Some(t), Some(next)) = (min_time, history_start) {
        // A base taken before anything new is read restores to the last archived record:
        // its time is known from the repository, not from this process's reading.
        times
            .lock()
            .expect("times lock")
            .push(next.saturating_sub(1), t);
    }
    let mut cf_watch = CfWatch::new(
        &opts.db,
        state
            .history
            .bases
            .iter()
            .map(|b| b.earliest_seq)
            .max()
            .unwrap_or(0),
    );
    let last_base_at = state.history.bases.iter().map(|b| b.created_at).max();
    let mut base_due: Option<Instant> = match last_base_at {
        None => Some(Instant::now()),
        Some(_) if opts.base_at_start => Some(Instant::now()),
        Some(at) => {
            let age = (OffsetDateTime::now_utc() - at)
                .try_into()
                .unwrap_or(Duration::ZERO);
            Some(Instant::now() + opts.base_interval.saturating_sub(age))
        }
    };
    // True while the pending base is only the periodic one (not asked for, not a gap).
    let mut base_on_schedule = last_base_at.is_some() && !opts.base_at_start;
    let mut base_task: Option<JoinHandle<Result<BaseResult, BaseError>>> = None;
    let mut summary = RunSummary {
        last_seq: history_start.map(|s| s.saturating_sub(1)),
        ..RunSummary::default()
    };
    let mut expected = history_start;
    let mut retry_at: Option<Instant> = None;
    let mut manifest_retry = Backoff::new();
    let mut renew_retry_at: Option<OffsetDateTime> = None;
    let mut retry_delay = Duration::from_secs(1);
    let mut bases_done_this_run = 0u64;
    // Retention runs a little after start, every interval, and after each base backup.
    let mut sweep_task: Option<JoinHandle<Result<crate::prune::SweepReport, PruneError>>> = None;
    let mut prune_due: Option<Instant> = opts
        .retention
        .as_ref()
        .map(|_| Instant::now() + Duration::from_secs(30));
    metrics.resumed(
        summary.last_seq,
        min_time,
        checkpoint.current().generation,
        &state.history.bases,
    );
    metrics.set_phase(Phase::Running);
    tokio::pin!(shutdown);

    loop {
        // 1. Read what is new, unless closed segments still wait for the store.
        if !shipper.has_unsent() {
            let (f, polled) = tokio::task::spawn_blocking(move || {
                let r = follower.poll();
                (follower, r)
            })
            .await
            .map_err(|e| ServiceError::Other(format!("WAL reader task failed: {e}")))?;
            follower = f;
            let events = polled?;
            let caught_up_now = events.is_empty();
            for ev in events {
                match ev {
                    FollowEvent::Record(r) => {
                        match expected {
                            Some(exp) if r.seq < exp => {
                                if r.next_seq() > exp {
                                    return Err(ServiceError::Diverged {
                                        archived: exp - 1,
                                        found: r.seq,
                                    });
                                }
                                // Before the history's start: not part of it.
                                continue;
                            }
                            Some(exp) if r.seq > exp => {
                                let gap = missing_gap(exp, r.seq, "the WAL continues after a hole");
                                record_gap(
                                    &mut shipper,
                                    &mut checkpoint,
                                    gap,
                                    &mut summary,
                                    &mut manifest_retry,
                                )
                                .await?;
                                base_due = Some(Instant::now());
                                base_on_schedule = false;
                            }
                            Some(_) => {}
                            None => tolerate(
                                checkpoint.ensure_started(r.seq).await,
                                &mut manifest_retry,
                                "writing the first manifest generation",
                            )?,
                        }
                        expected = Some(r.next_seq());
                        times
                            .lock()
                            .expect("times lock")
                            .push(r.next_seq().saturating_sub(1), r.time_us);
                        shipper.push(&r)?;
                        summary.records += 1;
                        if r.count > 0 {
                            summary.last_seq = Some(r.next_seq() - 1);
                        }
                        if shipper.should_close() && !shipper.has_unsent() {
                            // Keep memory bounded while catching up: ship full segments now.
                            match shipper.close_and_upload().await {
                                Ok(entries) => {
                                    for e in entries {
                                        summary.segments += 1;
                                        checkpoint.segment_uploaded(e);
                                    }
                                }
                                Err(e) if is_retryable(&e) => {
                                    tracing::error!(error = %e, "segment upload failed; will retry");
                                    retry_at = Some(Instant::now() + retry_delay);
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                    FollowEvent::Gap {
                        expected_seq,
                        found_seq,
                        detail,
                    } => {
                        let gap = missing_gap(expected_seq, found_seq, &detail);
                        record_gap(
                            &mut shipper,
                            &mut checkpoint,
                            gap,
                            &mut summary,
                            &mut manifest_retry,
                        )
                        .await?;
                        expected = Some(found_seq);
                        base_due = Some(Instant::now());
                        base_on_schedule = false;
                    }
                    FollowEvent::Rotated { from_log, to_log } => {
                        tracing::debug!(from_log, to_log, "WAL rotated");
                    }
                }
            }
            if caught_up_now
                && opts.exit_when_caught_up
                && base_task.is_none()
                && base_due.is_none_or(|d| d > Instant::now())
                && bases_done_this_run + state.history.bases.len() as u64 > 0
            {
                break;
            }
        }

        // Column families created or dropped since the newest base.
        if cf_watch.observe(
            checkpoint.current().bases.last(),
            summary.last_seq.unwrap_or(0),
        ) && base_task.is_none()
        {
            base_due = Some(Instant::now());
            base_on_schedule = false;
        }

        // 2. Ship a due segment (or retry an upload).
        if (shipper.should_close() || shipper.has_unsent())
            && retry_at.is_none_or(|t| t <= Instant::now())
        {
            match shipper.close_and_upload().await {
                Ok(entries) => {
                    retry_at = None;
                    retry_delay = Duration::from_secs(1);
                    for e in entries {
                        summary.segments += 1;
                        checkpoint.segment_uploaded(e);
                    }
                }
                Err(e) if is_retryable(&e) => {
                    tracing::error!(error = %e, retry_in = ?retry_delay, "segment upload failed; will retry");
                    retry_at = Some(Instant::now() + retry_delay);
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e.into()),
            }
        }

        // 3. Manifest generation.
        if checkpoint.due() && !shipper.has_unsent() && manifest_retry.ready() {
            tolerate(
                checkpoint.flush().await,
                &mut manifest_retry,
                "writing a manifest generation",
            )?;
        }

        // 4. Base backups.
        if let Some(task) = &base_task
            && task.is_finished()
        {
            let task = base_task.take().expect("checked");
            match task.await {
                Ok(Ok(result)) => {
                    tracing::info!(
                        base = %result.summary.id,
                        earliest_seq = result.summary.earliest_seq,
                        files = result.stats.files,
                        bytes_uploaded = result.stats.bytes_uploaded,
                        bytes_deduplicated = result.stats.bytes_deduplicated,
                        duration_ms = result.stats.duration.as_millis() as u64,
                        "base backup taken"
                    );
                    metrics.base_finished(&result.summary, result.stats.duration);
                    // The base is only useful once the WAL up to its earliest point is
                    // shipped; ship the open segment first so its generation is complete.
                    if let Ok(entries) = shipper.close_and_upload().await {
                        for e in entries {
                            summary.segments += 1;
                            checkpoint.segment_uploaded(e);
                        }
                    }
                    base_due = Some(Instant::now() + opts.base_interval);
                    base_on_schedule = true;
                    if cf_watch.changed_from.is_some()
                        && !cf_watch.base_matches_live(&result.summary)
                    {
                        // Started before the change: another base is needed.
                        base_due = Some(Instant::now());
                        base_on_schedule = false;
                    } else if let Some(from) = cf_watch.changed_from.take() {
                        let last = result.summary.earliest_seq.saturating_sub(1);
                        if from <= last {
                            tolerate(
                                checkpoint.add_gap(column_family_gap(from, last)).await,
                                &mut manifest_retry,
                                "recording a column family change",
                            )?;
                            summary.gaps += 1;
                        }
                    }
                    if cf_watch.changed_from.is_none() {
                        // The base's own MANIFEST copy holds its column families at its
                        // earliest point.
                        cf_watch.last_matching_seq =
                            cf_watch.last_matching_seq.max(result.summary.earliest_seq);
                    }
                    tolerate(
                        checkpoint.add_base(result.summary).await,
                        &mut manifest_retry,
                        "recording the base backup",
                    )?;
                    summary.bases += 1;
                    bases_done_this_run += 1;
                    if prune_due.is_some() {
                        prune_due = Some(Instant::now());
                    }
                }
                Ok(Err(e)) => {
                    metrics.base_failed();
                    tracing::error!(error = %e, "base backup failed; retrying in a minute");
                    base_due = Some(Instant::now() + Duration::from_secs(60));
                }
                Err(e) => return Err(ServiceError::Other(format!("base backup task failed: {e}"))),
            }
        }
        // A base on schedule is skipped when nothing was written since the newest base:
        // it would restore to the same point.
        let newest_base_seq = checkpoint
            .current()
            .bases
            .iter()
            .map(|b| b.earliest_seq)
            .max();
        if base_task.is_none()
            && base_on_schedule
            && base_due.is_some_and(|d| d <= Instant::now())
            && newest_base_seq.is_some_and(|b| summary.last_seq.unwrap_or(0) <= b)
            && !checkpoint.has_unwritten()
        {
            tracing::debug!("nothing written since the newest base; the scheduled base is skipped");
            base_due = Some(Instant::now() + opts.base_interval);
        }
        if base_task.is_none()
            && sweep_task.is_none()
            && base_due.is_some_and(|d| d <= Instant::now())
        {
            base_due = None;
            base_on_schedule = false;
            let (db, wal, scratch, repo2) = (
                opts.db.clone(),
                check.wal_dir.clone(),
                scratch.clone(),
                repo.clone(),
            );
            let times2 = Arc::clone(&times);
            let base_opts = BaseOptions {
                upload_concurrency: opts.upload_concurrency,
                earliest_time: Some(Arc::new(move |seq| {
                    times2
                        .lock()
                        .expect("times lock")
                        .lookup(seq)
                        .map(time_from_micros)
                })),
                ..BaseOptions::default()
            };
            tracing::info!("taking a base backup");
            base_task = Some(tokio::spawn(tracing::Instrument::in_current_span(
                async move { take_base_backup(&db, &wal, &scratch, &repo2, &base_opts).await },
            )));
        }

        // 5. Retention: mark between base backups with every closed segment shipped, then
        //    sweep in the background (no base backup starts meanwhile).
        if let Some(task) = &sweep_task
            && task.is_finished()
        {
            match sweep_task.take().expect("checked").await {
                Ok(Ok(report)) => {
                    let (objects, bytes) = report
                        .deleted
                        .values()
                        .fold((0, 0), |(o, b), c| (o + c.objects, b + c.bytes));
                    metrics.prune_finished(objects, bytes);
                    tracing::info!(
                        objects_deleted = objects,
                        bytes_deleted = bytes,
                        objects_in_grace = report.deferred.objects,
                        "retention applied"
                    );
                }
                Ok(Err(e)) => {
                    metrics.prune_failed();
                    tracing::error!(
                        error = %e,
                        "deleting unreferenced objects failed; the next run tries again"
                    );
                }
                Err(e) => {
                    metrics.prune_failed();
                    tracing::error!(error = %e, "the retention sweep task failed");
                }
            }
        }
        if let Some(policy) = &opts.retention
            && base_task.is_none()
            && sweep_task.is_none()
            && prune_due.is_some_and(|d| d <= Instant::now())
            && !shipper.has_unsent()
            && manifest_retry.ready()
        {
            prune_due = Some(Instant::now() + policy.interval);
            match crate::prune::mark_with_checkpoint(repo, &mut checkpoint, policy).await {
                Ok((report, newest, now)) => {
                    tracing::info!(
                        generation = ?report.generation_after,
                        bases_removed = report.removed_bases.len(),
                        segments_removed = report.segments_removed,
                        window = %report.window_after,
                        "retention: history marked; sweeping unreferenced objects"
                    );
                    if let Some(newest) = newest {
                        let (repo2, grace) = (repo.clone(), policy.grace);
                        sweep_task = Some(tokio::spawn(async move {
                            crate::prune::sweep(&repo2, &newest, grace, now, false).await
                        }));
                    }
                }
                Err(PruneError::Repo(e @ RepoError::LostRace { .. })) => return Err(e.into()),
                Err(e) => {
                    metrics.prune_failed();
                    tracing::error!(
                        error = %e,
                        retry_in = ?policy.interval,
                        "applying the retention policy failed; archiving goes on"
                    )
                }
            }
        }

        // 6. Lease.
        let now = OffsetDateTime::now_utc();
        if now >= lease.renew_due() && renew_retry_at.is_none_or(|t| now >= t) {
            match lease.renew().await {
                Ok(()) => {
                    renew_retry_at = None;
                    metrics.lease_held_until(Some(lease.lease().expires_at));
                }
                Err(e @ LeaseError::Lost { .. }) => return Err(e.into()),
                Err(e) if now >= lease.lease().expires_at => {
                    return Err(ServiceError::Other(format!(
                        "the lease expired while the store could not be reached ({e}); \
                         stopping so that a restarted archiver takes it again"
                    )));
                }
                Err(e) => {
                    tracing::error!(error = %e, "lease renewal failed; will retry before it expires");
                    renew_retry_at = Some(now + time::Duration::seconds(2));
                }
            }
        }

        // 7. Sleep until something happens.
        let mut wake = Instant::now() + Duration::from_secs(5);
        for t in [
            shipper.due_at(),
            checkpoint.due_at(),
            retry_at,
            manifest_retry.at,
            base_due,
            prune_due,
            base_task
                .as_ref()
                .map(|_| Instant::now() + Duration::from_millis(200)),
            sweep_task
                .as_ref()
                .map(|_| Instant::now() + Duration::from_millis(200)),
        ]
        .into_iter()
        .flatten()
        {
            wake = wake.min(t);
        }
        let renew_at = match renew_retry_at {
            Some(t) => t.max(lease.renew_due()),
            None => lease.renew_due(),
        };
        let renew_in: Duration = (renew_at - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        wake = wake.min(Instant::now() + renew_in);
        if follower.more_ready() && !shipper.has_unsent() {
            // Catching up: read on at once, unless asked to stop.
            let stop = tokio::select! {
                biased;
                _ = &mut shutdown => true,
                _ = tokio::task::yield_now() => false,
            };
            if stop {
                tracing::info!("shutting down");
                break;
            }
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = watcher.wait(), if !shipper.has_unsent() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(()) = base_requests.recv() => {
                tracing::info!("base backup requested");
                base_due = Some(Instant::now());
                base_on_schedule = false;
            }
        }
    }

    // Shutdown: let a base backup in progress finish for a while, ship what is open,
    // write the last generation, release the lease. A sweep in progress is stopped: it only
    // deletes unreferenced objects, and the next one finishes its work.
    metrics.set_phase(Phase::Stopping);
    if let Some(task) = sweep_task.take() {
        task.abort();
    }
    let finished_base = match base_task.take() {
        Some(mut task) => {
            tracing::info!(
                "waiting up to {:?} for the base backup in progress",
                SHUTDOWN_BASE_GRACE
            );
            match tokio::time::timeout(SHUTDOWN_BASE_GRACE, &mut task).await {
                Ok(Ok(Ok(result))) => Some(result),
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %e, "the base backup in progress failed");
                    None
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the base backup task failed");
                    None
                }
                Err(_) => {
                    task.abort();
                    tracing::warn!(
                        "the base backup in progress did not finish in time and was abandoned; \
                         its objects are unreferenced"
                    );
                    None
                }
            }
        }
        None => None,
    };
    match shipper.close_and_upload().await {
        Ok(entries) => {
            for e in entries {
                summary.segments += 1;
                checkpoint.segment_uploaded(e);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "could not ship the last segment; its records stay in the WAL and are shipped at the next start")
        }
    }
    if let Some(result) = finished_base
        && (cf_watch.changed_from.is_none() || cf_watch.base_matches_live(&result.summary))
    {
        if let Some(from) = cf_watch.changed_from.take() {
            let last = result.summary.earliest_seq.saturating_sub(1);
            if from <= last {
                tolerate(
                    checkpoint.add_gap(column_family_gap(from, last)).await,
                    &mut manifest_retry,
                    "recording a column family change",
                )?;
                summary.gaps += 1;
            }
        }
        metrics.base_finished(&result.summary, result.stats.duration);
        tolerate(
            checkpoint.add_base(result.summary).await,
            &mut manifest_retry,
            "recording the base backup",
        )?;
        summary.bases += 1;
    }
    if let Err(e) = checkpoint.flush().await {
        if !repo_error_is_retryable(&e) {
            return Err(e.into());
        }
        tracing::error!(
            error = %e,
            "could not write the last manifest generation; the uploaded segments are found by \
             readers all the same, and the next start records them"
        );
    }
    if let Err(e) = lease.release().await {
        tracing::error!(error = %e, "could not release the lease; it expires by itself");
    }
    tracing::info!(
        records = summary.records,
        segments = summary.segments,
        bases = summary.bases,
        last_seq = ?summary.last_seq,
        "stopped"
    );
    Ok(summary)
}

/// Whether a repository error is the store failing for now (retry later) rather than a
/// reason to stop.
fn repo_error_is_retryable(e: &RepoError) -> bool {
    matches!(
        e,
        RepoError::Store(s) if !matches!(s, StoreError::Config { .. } | StoreError::InvalidKey { .. })
    )
}

/// Backoff for retrying the store: doubles up to 30 s.
#[derive(Debug)]
struct Backoff {
    at: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            at: None,
            delay: Duration::from_secs(1),
        }
    }

    fn ready(&self) -> bool {
        self.at.is_none_or(|t| t <= Instant::now())
    }

    fn failed(&mut self) -> Duration {
        let d = self.delay;
        self.at = Some(Instant::now() + d);
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
        d
    }

    fn succeeded(&mut self) {
        self.at = None;
        self.delay = Duration::from_secs(1);
    }
}

/// A manifest write that failed for now is kept by the checkpoint manager and retried
/// later; anything else stops the service.
fn tolerate(
    r: Result<(), RepoError>,
    backoff: &mut Backoff,
    what: &str,
) -> Result<(), ServiceError> {
    match r {
        Ok(()) => {
            backoff.succeeded();
            Ok(())
        }
        Err(e) if repo_error_is_retryable(&e) => {
            let d = backoff.failed();
            tracing::error!(error = %e, retry_in = ?d, "{what} failed; kept, will retry");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// How long a shutdown waits for a base backup in progress.
const SHUTDOWN_BASE_GRACE: Duration = Duration::from_secs(20);

fn column_family_gap(first_seq: u64, last_seq: u64) -> Gap {
    Gap {
        first_seq,
        last_seq,
        kind: GapKind::ColumnFamilyChange,
        detected_at: OffsetDateTime::now_utc(),
        detail: "column families were created or dropped; no base knows the new set before \
                 this point"
            .to_owned(),
    }
}

fn missing_gap(expected: u64, found: u64, detail: &str) -> Gap {
    Gap {
        first_seq: expected,
        last_seq: found - 1,
        kind: GapKind::MissingWal,
        detected_at: OffsetDateTime::now_utc(),
        detail: detail.to_owned(),
    }
}

/// Ships everything before the gap, then records it (before any segment after it).
async fn record_gap(
    shipper: &mut Shipper,
    checkpoint: &mut CheckpointManager,
    gap: Gap,
    summary: &mut RunSummary,
    manifest_retry: &mut Backoff,
) -> Result<(), ServiceError> {
    tracing::error!(
        first_seq = gap.first_seq,
        last_seq = gap.last_seq,
        detail = %gap.detail,
        "GAP: sequence numbers {}..={} were lost before they could be archived; a new base backup \
         will be taken so that archiving resumes after them",
        gap.first_seq,
        gap.last_seq
    );
    // Everything before the gap must be uploaded before the gap is recorded: keep trying.
    let mut upload_retry = Backoff::new();
    loop {
        match shipper.close_and_upload().await {
            Ok(entries) => {
                for e in entries {
                    summary.segments += 1;
                    checkpoint.segment_uploaded(e);
                }
                break;
            }
            Err(e) if is_retryable(&e) => {
                let d = upload_retry.failed();
                tracing::error!(error = %e, retry_in = ?d, "segment upload before a gap failed; will retry");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tolerate(
        checkpoint.add_gap(gap).await,
        manifest_retry,
        "recording a gap",
    )?;
    summary.gaps += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../scripts/archiver.example.toml");
        let o: ArchiverOptions = toml::from_str(text).unwrap();
        assert_eq!(o.to, "s3://acme-backups/tidemark/orders");
        assert_eq!(o.base_interval, Duration::from_secs(86_400));
        assert_eq!(o.sync_interval, Duration::from_secs(1));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = toml::from_str::<ArchiverOptions>("sync_interval = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = toml::from_str::<ArchiverOptions>("colour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn only_another_archiver_is_exit_code_3() {
        let held = ServiceError::Lease(LeaseError::Held {
            location: "s3://b/p".into(),
            holder: "h".into(),
            host: "host".into(),
            pid: 1,
            expires_at: "later".into(),
        });
        assert_eq!(held.exit_code(), 3);
        let lost = ServiceError::Lease(LeaseError::Lost {
            location: "s3://b/p".into(),
        });
        assert_eq!(lost.exit_code(), 3);
        // The store failing while the lease is renewed is a runtime failure, not a second
        // archiver: a supervisor must restart it.
        let unreachable = ServiceError::Lease(LeaseError::Store(StoreError::Transient {
            op: tidemark_manifest::store::StoreOp::PutIfMatch,
            key: "lease.json".into(),
            location: "s3://b/p/lease.json".into(),
            source: "connection refused".into(),
        }));
        assert_eq!(unreachable.exit_code(), 1);
    }

    #[test]
    fn recent_times_find_the_record_holding_a_sequence() {
        let mut t = RecentTimes::default();
        t.push(10, 100);
        t.push(15, 200);
        t.push(30, 300);
        assert_eq!(t.lookup(5), Some(100));
        assert_eq!(t.lookup(11), Some(200));
        assert_eq!(t.lookup(30), Some(300));
        assert_eq!(t.lookup(31), None);
    }
}
