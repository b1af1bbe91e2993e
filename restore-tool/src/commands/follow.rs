//! `follow`: a warm standby that follows the archive.
//!
//! The follower restores the latest point into the target (as `restore` does, with the same
//! checks), then keeps it current: each poll interval it finds the segments archived since
//! with the tail walk (no LIST: `Repository::walk_tail` from the next sequence number),
//! downloads and verifies each one, and appends its records to the re-created WAL files in
//! the target under the source's log numbers (a new `<log>.log` as the source rotates),
//! whole batches only, each record continuing the one before it. The target stays a
//! database RocksDB opens with every record up to the applied point: nobody may open it
//! read-write while it is followed, but a secondary instance may read it.
//!
//! The applied point is committed in two steps: the WAL is appended and fsynced, then the
//! origin file (`tidemark-origin.json`, FORMAT.md §11) is rewritten to name it. The origin
//! file is therefore always the last committed point; whatever the WAL holds past it (a
//! follower killed between the two steps, or in the middle of a record) is cut off when a
//! follower resumes, and applied again from the archive. A marker file, [`STANDBY_FILE`],
//! says that the target is a standby: it is created once the first restore is in place,
//! locked while a follower runs, and removed by promotion.
//!
//! A follower refuses a target that is not its own: one without the marker (a database
//! `restore` made, or one already promoted), one whose origin names another repository or
//! lineage, one that RocksDB opened read-write since (its `LOCK` file exists), or one
//! another follower holds. It stops with an error, never stalls silently, when the archive
//! cannot be followed: a segment that does not verify, records that do not continue the
//! chain, the repository's lineage changing, or the archive going on past a sequence
//! number no segment starts at (a gap, or segments pruned before they were applied) with
//! no base after it. With a base after the gap it re-bases (`Follower::rebase`): the
//! latest point restored beside the target, verified, swapped in, the old standby moved
//! aside.
//!
//! A batch writing a column family the standby does not have (the source created one
//! after the standby's base) cannot be applied: RocksDB's recovery would drop it silently.
//! The follower applies neither it nor anything after it: nothing of its segment stays in
//! the WAL files (they are cut back to the committed point), and the standby waits there.
//! The archiver takes a new base by itself when column families change; every
//! [`ARCHIVE_CHECK_INTERVAL`] the follower looks for a base that knows the column family
//! (or holds the batch already) and re-bases on it, deleting the old standby as for the
//! disk bound. Until then it warns at each look, prints a `waiting_for_base` status and
//! sets `tidemark_standby_waiting_for_base`; it downloads nothing meanwhile. A promotion
//! while it waits promotes the standby at its committed point; `--promote` looks for a
//! base once and, with none yet, promotes there, its report naming the batch not applied.
//!
//! Promotion happens between segments, so at a batch boundary: the
//! origin file already names the point reached, the marker is removed, and the application
//! may open the directory read-write at once (RocksDB replays the WAL on that first open).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use tidemark_manifest::chain::RecordChain;
use tidemark_manifest::model::{BaseSummary, RepositoryConfig, SegmentEntry, time_from_micros};
use tidemark_manifest::origin::Origin;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::rocks::DbFile;
use tidemark_manifest::rocks::log::{LogReader, LogWriter};
use tidemark_manifest::rocks::version_edit::ManifestState;
use tidemark_manifest::rocks::write_batch::{Batch, BatchHeader};
use tidemark_manifest::segment::{Record, SegmentReader};
use tidemark_manifest::store::CACHED_WRITE;

use super::StoreOptions;
use super::restore::{self, RestoreOptions, RestoreReport};
use crate::metrics::{self, FollowMetrics};
use crate::progress::Progress;
use crate::replay::ChainError;
use crate::staging::{self, sync_dir};
use crate::verify::VerifyMode;
use crate::{Cancel, RestoreError};

/// The marker of a standby, in its directory. RocksDB ignores it (no file name of its own
/// looks like it). Its content is for people; only its presence (and its lock) count.
pub const STANDBY_FILE: &str = "tidemark-standby";

/// The default disk bound: the WAL applied since the base may grow to this many times the
/// base's size before the standby is re-based on a newer base.
pub const WAL_LIMIT_FACTOR: u64 = 2;

/// The default disk bound is never below this many bytes (a small base would re-base often).
pub const MIN_WAL_LIMIT: u64 = 256 << 20;

/// The default `--poll-interval`.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How often an idle follower reads the repository's current generation and config, to
/// notice a gap, pruned segments or a lineage change instead of waiting forever.
pub const ARCHIVE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

fn default_poll_ms() -> u64 {
    DEFAULT_POLL_INTERVAL.as_millis() as u64
}

fn default_parallelism() -> usize {
    restore::DEFAULT_PARALLELISM
}

fn default_verify() -> VerifyMode {
    VerifyMode::Standard
}

/// Options of `follow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowOptions {
    /// The standby's directory: missing or empty (the latest point is restored there
    /// first), or a standby this repository's follower made.
    pub target_dir: PathBuf,
    /// How long an idle follower waits before looking for new segments, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Concurrent downloads of the first restore.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// How the first restore is verified.
    #[serde(default = "default_verify")]
    pub verify: VerifyMode,
    /// Apply what the archive holds now, then promote and stop.
    #[serde(default)]
    pub promote: bool,
    /// With `promote`: promote at the applied point without reading the archive.
    #[serde(default)]
    pub no_catch_up: bool,
    /// Serve Prometheus metrics and `/health` on this `HOST:PORT`.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Re-base when the WAL files in the standby exceed this many bytes (default: twice the
    /// base's size, at least 256 MiB) and a newer base exists.
    #[serde(default)]
    pub max_wal_bytes: Option<u64>,
}

impl FollowOptions {
    /// Options with the defaults for everything but the target.
    pub fn new(target_dir: impl Into<PathBuf>) -> FollowOptions {
        FollowOptions {
            target_dir: target_dir.into(),
            poll_interval_ms: default_poll_ms(),
            parallelism: default_parallelism(),
            verify: default_verify(),
            promote: false,
            no_catch_up: false,
            metrics_addr: None,
            max_wal_bytes: None,
        }
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// What stops a running follower: `stop` ends following and leaves the target a standby
/// (SIGTERM, Ctrl-C); `promote` ends it and promotes the target (SIGUSR1). Both are seen
/// between segments only, so at a batch boundary. A re-base the old standby can do without
/// (its WAL over the disk bound, or a column family it lacks: it holds a consistent older
/// point) is abandoned on either; one past a gap is finished first, as the old standby
/// cannot reach the archive's newest point.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    pub stop: Cancel,
    pub promote: Cancel,
}

impl Controls {
    fn promote_requested(&self) -> bool {
        self.promote.is_cancelled()
    }

    /// What cancels a re-base's restore: a stop, and a promotion too when the old standby
    /// can do without the re-base (it only frees disk space), so that a promotion does not
    /// wait for a whole restore.
    fn rebase_cancel(&self, keep: Keep) -> Cancel {
        match keep {
            Keep::NewOnly => self.stop.child_of_both(&self.promote),
            Keep::OldStandby => self.stop.clone(),
        }
    }

    fn should_end(&self) -> bool {
        self.stop.is_cancelled() || self.promote_requested()
    }
}

/// The point a standby holds: its last applied sequence number and that record's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppliedPoint {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

/// One status line (printed per change with `--json`): a segment was applied (`applied`),
/// or the standby waits for a base that knows a column family (`waiting_for_base`, at each
/// look for one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FollowStatus {
    pub event: &'static str,
    pub applied: AppliedPoint,
    /// Now minus the time of the last applied record: how far behind the standby is.
    pub lag_seconds: f64,
    /// Now minus the time of the segment's first record: the longest any record of the
    /// segment waited to be applied.
    pub first_record_lag_seconds: f64,
    pub segment: String,
    pub records: u64,
    /// The WAL file the last record went to.
    pub wal_file: Option<String>,
    /// With the event `waiting_for_base`: the batch the standby cannot apply (its column
    /// family is not in the standby) and waits at, for a base that knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<UnknownColumnFamily>,
}

/// How a follower ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowEnd {
    /// Stopped; the target is still a standby and a follower resumes it.
    Stopped,
    /// Promoted: the application may open the target read-write.
    Promoted,
}

/// What `follow` reports when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct FollowReport {
    pub event: FollowEnd,
    pub repository: String,
    pub target_dir: PathBuf,
    /// The first restore, when this run made it.
    pub restore: Option<RestoreReport>,
    /// The point a resumed follower started from.
    pub resumed_from: Option<u64>,
    /// The point reached.
    pub applied: AppliedPoint,
    pub segments_applied: u64,
    pub records_applied: u64,
    /// Fresh standbys restored from a newer base, each swapped in for the old one: after a
    /// gap (the old one moved aside to `<DIR>.old-<time>`), for disk space or past a new
    /// column family (the old one deleted).
    pub rebases: u64,
    /// The origin file as it is now (it names the point reached).
    pub origin: Origin,
    /// How long promotion took, from the request to the target being ready.
    pub promote_ms: Option<u64>,
    /// The batch the standby stopped before: it writes a column family the standby does not
    /// have, and no base knowing it was there yet. Neither it nor anything after it was
    /// applied.
    pub not_applied: Option<UnknownColumnFamily>,
}

/// Restores (or resumes) the standby in `opts.target_dir` from the repository `store`
/// names and follows it until `controls` ends it; `on_status` is called after each applied
/// segment.
pub async fn run(
    store: &StoreOptions,
    opts: &FollowOptions,
    progress: &Progress,
    controls: &Controls,
    on_status: &mut (dyn FnMut(&FollowStatus) + Send),
) -> Result<FollowReport, RestoreError> {
    if opts.poll_interval_ms == 0 {
        return Err(RestoreError::Usage(
            "--poll-interval must be more than 0".to_owned(),
        ));
    }
    restore::check_target_outside_store(store, &opts.target_dir)?;
    let fresh = staging::inspect(&staging::resolve_target(&opts.target_dir)?)?.is_free();
    if opts.no_catch_up && (!opts.promote || fresh) {
        return Err(RestoreError::Usage(
            "--no-catch-up only applies with --promote, to an existing standby".to_owned(),
        ));
    }
    let metrics = Arc::new(FollowMetrics::default());
    let _server = match &opts.metrics_addr {
        Some(addr) => Some(metrics::serve(addr, metrics.clone()).await.map_err(|e| {
            RestoreError::Usage(format!("--metrics-addr {addr}: cannot listen there: {e}"))
        })?),
        None => None,
    };
    let result = follow(store, opts, progress, controls, on_status, &metrics).await;
    if result.is_err() {
        metrics.error();
    }
    metrics.stopped();
    result
}

/// [`run`], its metrics kept in `metrics`.
async fn follow(
    store: &StoreOptions,
    opts: &FollowOptions,
    progress: &Progress,
    controls: &Controls,
    on_status: &mut (dyn FnMut(&FollowStatus) + Send),
    metrics: &Arc<FollowMetrics>,
) -> Result<FollowReport, RestoreError> {
    let dir = staging::resolve_target(&opts.target_dir)?;
    if opts.no_catch_up {
        return promote_at_once(&dir, opts, &store.from);
    }
    let fresh = staging::inspect(&dir)?.is_free();
    let repo = store.open().await?;
    let mut restored = None;
    if fresh {
        restored = Some(first_restore(&repo, &dir, opts, progress, &controls.stop).await?);
    }
    let standby = Standby::open(&dir)?;
    let resumed_from = restored.is_none().then(|| standby.applied().seq);
    if let Some(seq) = resumed_from {
        tracing::info!(
            "resumed the standby {} at sequence {seq}; following {}",
            dir.display(),
            repo.location()
        );
    }
    let config = repo.require_config().await?;
    standby.check_repository(&config, &repo.location())?;
    let mut follower = Follower {
        repo,
        standby,
        scratch: scratch_dir(&dir)?,
        segments_applied: 0,
        records_applied: 0,
        rebases: 0,
        last_check: None,
        last_size_check: None,
        blocked: None,
        last_base_check: None,
        metrics: metrics.clone(),
    };
    let applied = follower.standby.applied();
    metrics.set_applied(applied.seq, applied.time);
    let result = follower
        .follow_until_end(opts, progress, controls, on_status)
        .await;
    let _ = fs::remove_dir(&follower.scratch);
    result?;
    follower.finish(opts, controls, restored, resumed_from)
}

/// The latest point, restored into `dir` as `restore` does, then marked a standby.
async fn first_restore(
    repo: &Repository,
    dir: &Path,
    opts: &FollowOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<RestoreReport, RestoreError> {
    let mut ropts = RestoreOptions::new(dir, super::Target::Latest);
    ropts.parallelism = opts.parallelism;
    ropts.verify = opts.verify;
    ropts.standby = true;
    let report = restore::run(repo, &ropts, progress, cancel).await?;
    tracing::info!(
        "restored {} to {} at sequence {}; following it now",
        report.repository,
        dir.display(),
        report.cutoff.as_ref().map_or(0, |c| c.seq)
    );
    Ok(report)
}

/// Where segments are downloaded: a directory beside the target, on the same file system,
/// never inside the database directory.
fn scratch_dir(target: &Path) -> Result<PathBuf, RestoreError> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".to_owned());
    let parent = target.parent().unwrap_or(Path::new("/"));
    let dir = parent.join(format!(".{name}.tidemark-follow"));
    fs::create_dir_all(&dir).map_err(|e| RestoreError::io("cannot create", &dir, e))?;
    Ok(dir)
}

/// What a re-base does with the standby it replaces.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// Kept beside the new one (`DIR.old-TIME`): after a gap it holds points the new one
    /// cannot reach.
    OldStandby,
    /// Deleted once the new one is in place: replaced for disk space, or for a column
    /// family it lacks, it holds nothing the new one lacks (and keeping it would defeat
    /// the disk bound).
    NewOnly,
}

/// A running follower: the repository, the standby it keeps current, and its counters.
struct Follower {
    repo: Repository,
    standby: Standby,
    scratch: PathBuf,
    segments_applied: u64,
    records_applied: u64,
    /// Fresh standbys restored from a newer base.
    rebases: u64,
    /// When the repository's generation and config were last read.
    last_check: Option<Instant>,
    /// When the WAL was last found over the disk bound.
    last_size_check: Option<Instant>,
    /// The batch of a column family the standby does not have, which it waits at.
    blocked: Option<Blocked>,
    /// When the newest base was last looked at for that column family.
    last_base_check: Option<Instant>,
    metrics: Arc<FollowMetrics>,
}

/// The batch a standby waits at, and the time of its segment's first record.
#[derive(Debug, Clone)]
struct Blocked {
    batch: UnknownColumnFamily,
    first_time: OffsetDateTime,
}

/// True when a standby restored from `base` (to the latest point) gets past `batch`: the
/// base knows the column family, or it holds the batch already (it needs no record up to
/// it). A base that merely replays from after the standby's point is not enough: one taken
/// before the column family was created would meet the same batch again.
fn base_gets_past(base: &BaseSummary, batch: &UnknownColumnFamily) -> bool {
    base.replay_from_seq > batch.seq
        || base
            .column_families
            .iter()
            .any(|c| c.id == batch.column_family)
}

impl Follower {
    /// Polls and applies until `controls` ends following (or, with `--promote`, until the
    /// archive has nothing newer).
    async fn follow_until_end(
        &mut self,
        opts: &FollowOptions,
        progress: &Progress,
        controls: &Controls,
        on_status: &mut (dyn FnMut(&FollowStatus) + Send),
    ) -> Result<(), RestoreError> {
        if opts.no_catch_up {
            return Ok(());
        }
        loop {
            if controls.should_end() {
                return Ok(());
            }
            if self.blocked.is_some() {
                let looked = self
                    .rebase_past_column_family_if_due(opts, progress, controls, on_status)
                    .await;
                if opts.promote {
                    // Catching up to promote: one look for a base, no waiting for one.
                    looked?;
                    if self.blocked.is_some() {
                        return Ok(());
                    }
                    continue;
                }
                if self.or_next_poll(looked)?.is_none() || self.blocked.is_some() {
                    wait(opts.poll_interval(), controls).await;
                }
                continue;
            }
            let polled = self.poll(controls, on_status).await;
            if opts.promote {
                if polled? == 0 && self.blocked.is_none() {
                    return Ok(());
                }
                continue;
            }
            let applied = self.or_next_poll(polled)?.unwrap_or(0);
            let over = self.rebase_if_over_limit(opts, progress, controls).await;
            self.or_next_poll(over)?;
            if applied == 0 {
                let checked = self.check_archive_if_due().await;
                if let Some(gap) = self.or_next_poll(checked)?.flatten() {
                    let rebased = self.rebase(gap, opts, progress, controls).await;
                    self.or_next_poll(rebased)?;
                    continue;
                }
                wait(opts.poll_interval(), controls).await;
            }
        }
    }

    /// A failure of the store or the disk whose own retries are spent is counted and tried
    /// again at the next poll (`None`); any other error ends following.
    fn or_next_poll<T>(&self, r: Result<T, RestoreError>) -> Result<Option<T>, RestoreError> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.class() == crate::ErrorClass::Failure => {
                tracing::warn!(error = %e, "cannot go on now; trying again at the next poll");
                self.metrics.error();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One poll: the segments archived since the applied point, applied in order. Returns
    /// how many were applied.
    async fn poll(
        &mut self,
        controls: &Controls,
        on_status: &mut (dyn FnMut(&FollowStatus) + Send),
    ) -> Result<usize, RestoreError> {
        let next = self.standby.next_seq();
        let Some(entries) = until_ended(self.repo.walk_tail(next), controls).await else {
            return Ok(0);
        };
        let entries = entries?;
        self.metrics
            .set_pending(entries.first().map(|e| e.first_time));
        let mut applied = 0;
        for (i, entry) in entries.iter().cloned().enumerate() {
            if controls.should_end() {
                break;
            }
            let Some(path) =
                until_ended(self.repo.fetch_segment(&entry, &self.scratch), controls).await
            else {
                break;
            };
            let path = path?;
            let first_time = entry.first_time;
            let status = self.apply(entry, &path).await;
            let _ = fs::remove_file(&path);
            let status = match status? {
                Ok(status) => status,
                Err(blocked) => {
                    self.block(blocked, first_time);
                    break;
                }
            };
            self.metrics
                .set_applied(status.applied.seq, status.applied.time);
            self.metrics.segment_applied(status.records);
            self.metrics
                .set_pending(entries.get(i + 1).map(|e| e.first_time));
            on_status(&status);
            applied += 1;
        }
        Ok(applied)
    }

    /// Applies one verified segment file and commits the point reached; or, when a batch of
    /// it writes a column family the standby does not have, applies none of it and returns
    /// that batch.
    async fn apply(
        &mut self,
        entry: SegmentEntry,
        path: &Path,
    ) -> Result<Result<FollowStatus, UnknownColumnFamily>, RestoreError> {
        let mut standby = self.standby.take();
        let path = path.to_path_buf();
        let (standby, result) = tokio::task::spawn_blocking(move || {
            let r = standby.apply_segment(&entry.key, &path);
            (standby, r.map(|n| (n, entry.key, entry.first_time)))
        })
        .await
        .expect("applying a segment does not panic");
        self.standby = standby;
        let (records, key, first_time) = match result? {
            (Applied::All(records), key, first_time) => (records, key, first_time),
            (Applied::Blocked(blocked), ..) => return Ok(Err(blocked)),
        };
        self.segments_applied += 1;
        self.records_applied += records;
        let applied = self.standby.applied();
        tracing::debug!(segment = %key, records, seq = applied.seq, "applied");
        Ok(Ok(FollowStatus {
            event: "applied",
            applied,
            lag_seconds: lag(applied.time),
            first_record_lag_seconds: lag(first_time),
            segment: key,
            records,
            wal_file: self.standby.wal_name(),
            waiting_for: None,
        }))
    }

    /// The standby met `blocked` (in a segment whose first record is at `first_time`): it
    /// stays at its committed point and waits for a base that gets it past the batch.
    fn block(&mut self, blocked: UnknownColumnFamily, first_time: OffsetDateTime) {
        tracing::warn!(
            column_family = blocked.column_family,
            seq = blocked.seq,
            "{blocked}: the standby stays at sequence {} and re-bases once a base knows the \
             column family (the archiver takes one when column families change)",
            self.standby.applied().seq
        );
        self.metrics
            .set_waiting(Some((blocked.seq, blocked.column_family)));
        self.metrics.set_pending(Some(first_time));
        self.blocked = Some(Blocked {
            batch: blocked,
            first_time,
        });
        self.last_base_check = None;
    }

    /// While the standby waits at a batch of a column family it does not have: every
    /// [`ARCHIVE_CHECK_INTERVAL`], the newest base is looked at, and when it gets the
    /// standby past the batch ([`base_gets_past`]) the standby is re-based on it. Otherwise
    /// a warning and a `waiting_for_base` status say what the standby waits for.
    async fn rebase_past_column_family_if_due(
        &mut self,
        opts: &FollowOptions,
        progress: &Progress,
        controls: &Controls,
        on_status: &mut (dyn FnMut(&FollowStatus) + Send),
    ) -> Result<(), RestoreError> {
        let Some(blocked) = self.blocked.clone() else {
            return Ok(());
        };
        if self
            .last_base_check
            .is_some_and(|t| t.elapsed() < ARCHIVE_CHECK_INTERVAL)
        {
            return Ok(());
        }
        self.last_base_check = Some(Instant::now());
        let config = self.repo.require_config().await?;
        self.standby
            .check_repository(&config, &self.repo.location())?;
        let batch = &blocked.batch;
        let base = self.newest_base().await?;
        if !base.as_ref().is_some_and(|b| base_gets_past(b, batch)) {
            let applied = self.standby.applied();
            tracing::warn!(
                column_family = batch.column_family,
                seq = batch.seq,
                applied = applied.seq,
                "the standby waits at sequence {} for a base that knows column family {} (the \
                 batch at sequence {} writes it); the newest base, {}, does not. The archiver \
                 takes one when column families change; `tidemark-archiver backup` takes one \
                 now",
                applied.seq,
                batch.column_family,
                batch.seq,
                base.as_ref().map_or("none", |b| b.id.as_str()),
            );
            on_status(&FollowStatus {
                event: "waiting_for_base",
                applied,
                lag_seconds: lag(applied.time),
                first_record_lag_seconds: lag(blocked.first_time),
                segment: batch.segment.clone(),
                records: 0,
                wal_file: self.standby.wal_name(),
                waiting_for: Some(batch.clone()),
            });
            return Ok(());
        }
        tracing::warn!(
            column_family = batch.column_family,
            seq = batch.seq,
            "{batch}; base {} knows it: re-basing the standby on it",
            base.as_ref().map_or("", |b| b.id.as_str())
        );
        // The standby lost nothing: it holds a consistent point, only an older one. So, as
        // for the disk bound, a promotion abandons this re-base and promotes it as it is,
        // and the replaced standby is deleted once the new one is in place (it holds no
        // point the new one cannot reach).
        self.swap_in_fresh_standby(opts, progress, controls, Keep::NewOnly)
            .await
    }

    /// Every [`ARCHIVE_CHECK_INTERVAL`] while idle: the repository's lineage is still the
    /// standby's, and the archive does not go on past the next sequence number without a
    /// segment starting there.
    async fn check_archive_if_due(&mut self) -> Result<Option<String>, RestoreError> {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < ARCHIVE_CHECK_INTERVAL)
        {
            return Ok(None);
        }
        self.last_check = Some(Instant::now());
        let config = self.repo.require_config().await?;
        self.standby
            .check_repository(&config, &self.repo.location())?;
        let Some(generation) = self.repo.current_generation().await? else {
            return Ok(None);
        };
        let next = self.standby.next_seq();
        if generation.tail_start_seq <= next {
            return Ok(None);
        }
        // The archive holds records past `next`: a segment must start there. Probe again
        // (it may have been written since the walk).
        if self.repo.read_segment_header(next).await?.is_some() {
            return Ok(None);
        }
        let why = match generation
            .gaps
            .iter()
            .find(|g| g.first_seq <= next && next <= g.last_seq)
        {
            Some(g) => format!(
                "generation {} records a gap over sequences {}..={}: {}",
                generation.generation, g.first_seq, g.last_seq, g.detail
            ),
            None => format!(
                "generation {} goes on from sequence {}, so the segment was pruned or lost",
                generation.generation, generation.tail_start_seq
            ),
        };
        Ok(Some(format!(
            "no segment of {} starts at sequence {next}, the next one the standby needs; {why}",
            self.repo.location()
        )))
    }

    /// Answers a gap at the standby's next sequence number: when the repository has a base
    /// past the gap, a fresh standby is restored from it beside the target (the latest
    /// point, verified) and swapped in, the old one moved aside to `<DIR>.old-<time>`
    /// (never deleted); otherwise the follower stops.
    async fn rebase(
        &mut self,
        gap: String,
        opts: &FollowOptions,
        progress: &Progress,
        controls: &Controls,
    ) -> Result<(), RestoreError> {
        let next = self.standby.next_seq();
        if !self.newest_base_replays_after(next).await? {
            return Err(RestoreError::NotRestorable(format!(
                "the standby cannot follow further: {gap}. No base of the repository starts \
                 after it yet to re-base on: take one (`tidemark-archiver backup`) and start \
                 the follower again, or restore a new standby later"
            )));
        }
        tracing::warn!("{gap}: re-basing the standby on the newest base");
        self.swap_in_fresh_standby(opts, progress, controls, Keep::OldStandby)
            .await
    }

    /// True when the base a restore to the latest point uses needs no record before `seq`.
    async fn newest_base_replays_after(&self, seq: u64) -> Result<bool, RestoreError> {
        let base = self.newest_base().await?;
        Ok(base.is_some_and(|b| b.replay_from_seq > seq))
    }

    /// The base a restore to the latest point uses (the one a re-base would restore), if
    /// the repository can be restored to its latest point.
    async fn newest_base(&self) -> Result<Option<BaseSummary>, RestoreError> {
        let state = super::load(&self.repo).await?;
        let plan = state.history.plan(super::Target::Latest);
        tracing::debug!(
            base = ?plan.as_ref().map(|p| (&p.base.id, p.base.replay_from_seq)),
            "the base a re-base would use"
        );
        Ok(plan.ok().map(|p| p.base))
    }

    /// The disk bound: when the WAL files in the standby hold more than the limit
    /// (`--max-wal-bytes`, by default [`WAL_LIMIT_FACTOR`] times the size of the
    /// standby's other files, its base) and a newer base needs none of the oldest WAL file's
    /// records, the standby is re-based on it. Checked at most every
    /// [`ARCHIVE_CHECK_INTERVAL`] once over the limit (the sizes after every poll).
    async fn rebase_if_over_limit(
        &mut self,
        opts: &FollowOptions,
        progress: &Progress,
        controls: &Controls,
    ) -> Result<(), RestoreError> {
        if self
            .last_size_check
            .is_some_and(|t| t.elapsed() < ARCHIVE_CHECK_INTERVAL)
        {
            return Ok(());
        }
        let sizes = self.standby.sizes()?;
        let limit = opts.max_wal_bytes.unwrap_or_else(|| {
            sizes
                .base
                .saturating_mul(WAL_LIMIT_FACTOR)
                .max(MIN_WAL_LIMIT)
        });
        if sizes.wal <= limit {
            return Ok(());
        }
        self.last_size_check = Some(Instant::now());
        let Some(oldest) = self.standby.oldest_wal_seq()? else {
            return Ok(());
        };
        if !self.newest_base_replays_after(oldest).await? {
            tracing::info!(
                wal_bytes = sizes.wal,
                limit,
                "the WAL applied since the standby's base is over the limit; no newer base to \
                 re-base on yet"
            );
            return Ok(());
        }
        tracing::warn!(
            wal_bytes = sizes.wal,
            limit,
            "the WAL applied since the standby's base is over the limit: re-basing on the \
             newest base"
        );
        self.swap_in_fresh_standby(opts, progress, controls, Keep::NewOnly)
            .await
    }

    /// Restores the latest point beside the standby, verified, and swaps it in; the old
    /// standby is moved aside (`restore --force`), and deleted once the new one is in place
    /// when `keep` says so. The old standby's marker stays locked until then: a `--promote`
    /// from another process meanwhile is refused ("another follower runs") instead of
    /// promoting a directory the swap is about to move aside.
    async fn swap_in_fresh_standby(
        &mut self,
        opts: &FollowOptions,
        progress: &Progress,
        controls: &Controls,
        keep: Keep,
    ) -> Result<(), RestoreError> {
        let dir = self.standby.dir.clone();
        let mut old = self.standby.take();
        old.wal = None;
        let mut ropts = RestoreOptions::new(&dir, super::Target::Latest);
        ropts.force = true;
        ropts.parallelism = opts.parallelism;
        ropts.verify = opts.verify;
        ropts.standby = true;
        let cancel = controls.rebase_cancel(keep);
        let report = match restore::run(&self.repo, &ropts, progress, &cancel).await {
            Ok(r) => r,
            Err(e) => {
                drop(old);
                self.standby = Standby::open(&dir)?;
                if matches!(e, RestoreError::Interrupted) && controls.promote_requested() {
                    tracing::warn!("re-base abandoned: promoting the standby as it is");
                    return Ok(());
                }
                return Err(e);
            }
        };
        self.standby = Standby::open(&dir)?;
        drop(old);
        self.rebases += 1;
        self.metrics.rebased();
        // Whatever the re-base was for, the batch the old standby waited at is the new
        // one's to meet (or not) again.
        self.blocked = None;
        self.metrics.set_waiting(None);
        let applied = self.standby.applied();
        self.metrics.set_applied(applied.seq, applied.time);
        let aside = match (&report.moved_aside, keep) {
            (Some(path), Keep::NewOnly) => {
                fs::remove_dir_all(path)
                    .map_err(|e| RestoreError::io("cannot delete the old standby", path, e))?;
                "deleted".to_owned()
            }
            (Some(path), Keep::OldStandby) => format!("kept in {}", path.display()),
            (None, _) => "(none)".to_owned(),
        };
        tracing::warn!(
            "re-based the standby {} on base {} at sequence {}; the old one: {aside}",
            dir.display(),
            report.base.id,
            applied.seq,
        );
        Ok(())
    }

    /// Promotes when asked (or with `--promote`) and builds the report.
    fn finish(
        self,
        opts: &FollowOptions,
        controls: &Controls,
        restored: Option<RestoreReport>,
        resumed_from: Option<u64>,
    ) -> Result<FollowReport, RestoreError> {
        let promoted = opts.promote || controls.promote_requested();
        let Follower {
            repo,
            standby,
            segments_applied,
            records_applied,
            rebases,
            blocked,
            ..
        } = self;
        if let Some(b) = &blocked {
            tracing::warn!(
                column_family = b.batch.column_family,
                seq = b.batch.seq,
                "{}: neither it nor anything after it was applied; the standby ends at \
                 sequence {}",
                b.batch,
                standby.applied().seq
            );
        }
        let mut report = end(standby, opts, promoted, repo.location())?;
        report.not_applied = blocked.map(|b| b.batch);
        report.restore = restored;
        report.resumed_from = resumed_from;
        report.segments_applied = segments_applied;
        report.records_applied = records_applied;
        report.rebases = rebases;
        Ok(report)
    }
}

/// `--promote --no-catch-up`: the standby in `dir` promoted at the point it holds, without
/// reaching the store (it may be gone with the primary's region).
fn promote_at_once(
    dir: &Path,
    opts: &FollowOptions,
    repository: &str,
) -> Result<FollowReport, RestoreError> {
    let standby = Standby::open(dir)?;
    let mut report = end(standby, opts, true, repository.to_owned())?;
    report.resumed_from = Some(report.applied.seq);
    Ok(report)
}

/// Ends following on `standby`, promoting it when `promoted`: the report, counts at 0.
fn end(
    standby: Standby,
    opts: &FollowOptions,
    promoted: bool,
    repository: String,
) -> Result<FollowReport, RestoreError> {
    let asked = Instant::now();
    let applied = standby.applied();
    let origin = standby.origin.clone();
    if promoted {
        standby.promote()?;
        tracing::info!(
            "promoted {} at sequence {} ({}): the application may open it read-write",
            opts.target_dir.display(),
            applied.seq,
            tidemark_manifest::plan::fmt_time(applied.time)
        );
    }
    Ok(FollowReport {
        event: if promoted {
            FollowEnd::Promoted
        } else {
            FollowEnd::Stopped
        },
        repository,
        target_dir: opts.target_dir.clone(),
        restore: None,
        resumed_from: None,
        applied,
        segments_applied: 0,
        records_applied: 0,
        rebases: 0,
        origin,
        promote_ms: promoted.then(|| asked.elapsed().as_millis() as u64),
        not_applied: None,
    })
}

/// Seconds from `t` to now (0 if `t` is in the future).
fn lag(t: OffsetDateTime) -> f64 {
    (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)
}

/// Sleeps `d`, waking early when `controls` ends following.
async fn wait(d: Duration, controls: &Controls) {
    let end = Instant::now() + d;
    while !controls.should_end() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_millis(50))).await;
    }
}

/// Runs `fut` unless `controls` ends following first (then `None`: a store call that
/// retries through an outage does not hold a stop or a promotion back).
async fn until_ended<T>(fut: impl Future<Output = T>, controls: &Controls) -> Option<T> {
    tokio::select! {
        r = fut => Some(r),
        () = async { while !controls.should_end() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        } } => None,
    }
}

/// A batch the standby cannot apply: it writes a column family the standby's MANIFEST does
/// not have (the source created it after the standby's base).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownColumnFamily {
    /// The batch's sequence number.
    pub seq: u64,
    /// The column family's id in the source database.
    pub column_family: u32,
    /// The segment holding the batch.
    pub segment: String,
}

impl std::fmt::Display for UnknownColumnFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the batch at sequence {} (segment {}) writes column family {}, which the standby \
             does not have (the source created it after the standby's base)",
            self.seq, self.segment, self.column_family
        )
    }
}

/// What applying a segment did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    /// Every record was applied and the point reached committed: how many records.
    All(u64),
    /// A batch writes a column family the standby does not have: nothing of the segment
    /// was kept, the standby is at its previous committed point.
    Blocked(UnknownColumnFamily),
}

/// The WAL file the follower appends to.
struct OpenWal {
    log_number: u64,
    path: PathBuf,
    writer: LogWriter<BufWriter<File>>,
}

/// The standby directory: its origin (the committed point), the marker it holds locked,
/// and the newest WAL file, open for appending.
struct Standby {
    dir: PathBuf,
    /// Held (locked) while this follower runs.
    _marker: Option<File>,
    origin: Origin,
    /// The column families the standby's MANIFEST has, by id.
    column_families: BTreeSet<u32>,
    wal: Option<OpenWal>,
}

/// Creates the standby marker in `dir`, a restored database not yet in place, durably. The
/// restore writes it before its result is renamed into place ([`RestoreOptions::standby`]):
/// a follower killed at any point leaves either no new database or a marked one.
pub(crate) fn write_standby_marker(dir: &Path, repository: &str) -> Result<(), RestoreError> {
    let path = dir.join(STANDBY_FILE);
    let text = format!(
        "This database is a Tidemark warm standby following {repository}.\n\
         Do not open it read-write: promote it first (SIGUSR1 to the follower, or \
         `tidemark-restore follow --promote`).\n"
    );
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| RestoreError::io("cannot create the standby marker", &path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| RestoreError::io("cannot write the standby marker", &path, e))?;
    sync_dir(dir)
}

impl Standby {
    /// Opens the standby in `dir`: refuses a target that is not one, or not this
    /// follower's to take; cuts the WAL back to the committed point.
    fn open(dir: &Path) -> Result<Standby, RestoreError> {
        let marker = lock_marker(dir)?;
        let origin = Origin::read(dir)?.ok_or_else(|| {
            RestoreError::Usage(format!(
                "{} has a standby marker but no origin file: it is not a database Tidemark \
                 restored; follow into a new or empty directory",
                dir.display()
            ))
        })?;
        if dir.join("LOCK").exists() {
            return Err(RestoreError::Usage(format!(
                "{} was opened read-write by RocksDB since it was restored (it has a LOCK \
                 file): it is no longer a standby, and following it would lose data. Follow \
                 into a new or empty directory",
                dir.display()
            )));
        }
        let manifest = ManifestState::from_db_dir(dir).map_err(|e| {
            RestoreError::Integrity(format!("{}: cannot read its MANIFEST: {e}", dir.display()))
        })?;
        let mut standby = Standby {
            dir: dir.to_path_buf(),
            _marker: Some(marker),
            column_families: manifest.column_families.keys().copied().collect(),
            origin,
            wal: None,
        };
        standby.wal = standby.resume_wal()?;
        Ok(standby)
    }

    /// Moves the standby out (for a blocking task), leaving an empty one that is never
    /// used until it is put back.
    fn take(&mut self) -> Standby {
        let placeholder = Standby {
            dir: self.dir.clone(),
            _marker: None,
            origin: self.origin.clone(),
            column_families: BTreeSet::new(),
            wal: None,
        };
        std::mem::replace(self, placeholder)
    }

    fn applied(&self) -> AppliedPoint {
        AppliedPoint {
            seq: self.origin.parent.sequence,
            time: self.origin.parent.time,
        }
    }

    /// Bytes of the standby's WAL files, and of its other files (its base).
    fn sizes(&self) -> Result<DirSizes, RestoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| RestoreError::io("cannot read", &self.dir, e))?;
        let mut sizes = DirSizes::default();
        for entry in entries {
            let entry = entry.map_err(|e| RestoreError::io("cannot read", &self.dir, e))?;
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            match DbFile::parse(&entry.file_name().to_string_lossy()) {
                Some(DbFile::Wal(_)) => sizes.wal += meta.len(),
                _ => sizes.base += meta.len(),
            }
        }
        Ok(sizes)
    }

    /// The first sequence number in the oldest WAL file, if any.
    fn oldest_wal_seq(&self) -> Result<Option<u64>, RestoreError> {
        let Some(&n) = wal_numbers(&self.dir)?.first() else {
            return Ok(None);
        };
        let path = self
            .dir
            .join(DbFile::Wal(n).file_name().expect("WAL files have a name"));
        let bad =
            |e: &dyn std::fmt::Display| RestoreError::Integrity(format!("{}: {e}", path.display()));
        let mut reader = LogReader::open(&path).map_err(|e| bad(&e))?;
        match reader.next_record().map_err(|e| bad(&e))? {
            Some(rec) => Ok(Some(
                BatchHeader::parse(&rec.bytes)
                    .map_err(|e| bad(&e))?
                    .sequence,
            )),
            None => Ok(None),
        }
    }

    fn next_seq(&self) -> u64 {
        self.origin.parent.sequence.saturating_add(1)
    }

    fn wal_name(&self) -> Option<String> {
        self.wal
            .as_ref()
            .and_then(|w| DbFile::Wal(w.log_number).file_name())
    }

    /// The repository must be the one the standby was restored from, in the same lineage.
    fn check_repository(
        &self,
        config: &RepositoryConfig,
        location: &str,
    ) -> Result<(), RestoreError> {
        let p = &self.origin.parent;
        if config.repository_id != p.repository_id || config.lineage.id != p.lineage {
            return Err(RestoreError::Usage(format!(
                "{} is a standby of repository {} ({}, lineage {}), but {location} is \
                 repository {} (lineage {}): a follower only follows the repository and \
                 lineage its standby was restored from. Follow {location} into a new or \
                 empty directory",
                self.dir.display(),
                p.repository,
                p.repository_id,
                p.lineage,
                config.repository_id,
                config.lineage.id
            )));
        }
        Ok(())
    }

    /// Finds the newest WAL file and cuts it back to the committed point (the origin's
    /// sequence number): records past it, or a torn record at its end, are what a follower
    /// stopped in the middle of, and are applied again from the archive. A WAL file holding
    /// only such records is removed. Returns the file to append to (none when the base
    /// alone is the point).
    fn resume_wal(&self) -> Result<Option<OpenWal>, RestoreError> {
        let committed = self.origin.parent.sequence;
        let mut numbers = wal_numbers(&self.dir)?;
        while let Some(&n) = numbers.last() {
            let path = self
                .dir
                .join(DbFile::Wal(n).file_name().expect("WAL files have a name"));
            match cut_point(&path, committed)? {
                Cut::Before => {
                    tracing::warn!(file = %path.display(), "removing a WAL file past the committed point");
                    fs::remove_file(&path)
                        .map_err(|e| RestoreError::io("cannot remove", &path, e))?;
                    sync_dir(&self.dir)?;
                    numbers.pop();
                }
                Cut::At(offset) => return Ok(Some(open_for_append(n, &path, offset)?)),
            }
        }
        Ok(None)
    }

    /// Appends the records of the verified segment file at `path` to the WAL files, whole
    /// batches, fsynced; then commits the point reached in the origin file. Returns the
    /// number of records applied.
    ///
    /// A batch writing a column family the standby does not have ends the segment there:
    /// nothing of the segment stays applied (the WAL files are cut back to the committed
    /// point, [`Standby::roll_back`]) and the batch is returned. So does any error: the
    /// standby in memory and on disk is then at its committed point again.
    fn apply_segment(&mut self, key: &str, path: &Path) -> Result<Applied, RestoreError> {
        let applied = self.append_segment(key, path);
        match &applied {
            Ok(Applied::All(_)) => {}
            Ok(Applied::Blocked(_)) => self.roll_back()?,
            Err(e) => {
                if let Err(cut) = self.roll_back() {
                    tracing::warn!(error = %cut, "cannot cut the WAL back after: {e}");
                }
            }
        }
        applied
    }

    /// [`Standby::apply_segment`] without the roll back.
    fn append_segment(&mut self, key: &str, path: &Path) -> Result<Applied, RestoreError> {
        let file =
            File::open(path).map_err(|e| RestoreError::io("cannot open the segment", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| RestoreError::io("cannot read the segment", path, e))?
            .len();
        let mut reader =
            SegmentReader::new(key, BufReader::with_capacity(1 << 20, file), Some(len))?;
        let mut chain = RecordChain::continuing_at(self.next_seq());
        let mut last: Option<Record> = None;
        let mut records = 0;
        while let Some(r) = reader.next_record()? {
            chain
                .push_record(&r)
                .map_err(|source| ChainError::Records {
                    key: key.to_owned(),
                    source,
                })?;
            if let Some(cf) = self.unknown_column_family(key, &r)? {
                return Ok(Applied::Blocked(UnknownColumnFamily {
                    seq: r.seq,
                    column_family: cf,
                    segment: key.to_owned(),
                }));
            }
            self.append(&r)?;
            records += 1;
            last = Some(r);
        }
        self.sync_wal()?;
        if let Some(r) = last {
            self.commit(r.next_seq().saturating_sub(1), time_from_micros(r.time_us))?;
        }
        Ok(Applied::All(records))
    }

    /// The first column family the batch of `r` writes that the standby does not have: such
    /// a batch cannot be applied, as RocksDB's recovery would skip it silently.
    fn unknown_column_family(&self, key: &str, r: &Record) -> Result<Option<u32>, RestoreError> {
        let summary = Batch::parse(&r.batch)
            .and_then(|b| b.summary())
            .map_err(|e| RestoreError::Integrity(format!("{key}: sequence {}: {e}", r.seq)))?;
        Ok(summary
            .column_families
            .iter()
            .copied()
            .find(|cf| !self.column_families.contains(cf)))
    }

    /// Drops what was appended past the committed point: the WAL files are cut back to it
    /// (or removed) as when a follower resumes, and appending goes on from there.
    fn roll_back(&mut self) -> Result<(), RestoreError> {
        // Written out first, so that nothing reaches the file after the cut.
        let flushed = self.sync_wal();
        self.wal = None;
        flushed?;
        self.wal = self.resume_wal()?;
        Ok(())
    }

    /// Appends a record to the WAL file of its log number, starting a new file when the
    /// source moved on to a newer log.
    fn append(&mut self, r: &Record) -> Result<(), RestoreError> {
        match &self.wal {
            Some(w) if w.log_number == r.log_number => {}
            Some(w) if w.log_number > r.log_number => {
                return Err(RestoreError::Integrity(format!(
                    "sequence {} is in WAL {}, older than WAL {} the standby already appends to",
                    r.seq, r.log_number, w.log_number
                )));
            }
            _ => {
                self.sync_wal()?;
                self.wal = Some(create_wal(&self.dir, r.log_number)?);
            }
        }
        let w = self.wal.as_mut().expect("opened above");
        w.writer
            .add_record(&r.batch)
            .map_err(|e| RestoreError::io("cannot write the WAL file", &w.path, e))?;
        Ok(())
    }

    /// Flushes and fsyncs the WAL file being appended to.
    fn sync_wal(&mut self) -> Result<(), RestoreError> {
        if let Some(w) = &mut self.wal {
            w.writer
                .flush()
                .and_then(|()| w.writer.get_ref().get_ref().sync_data())
                .map_err(|e| RestoreError::io("cannot sync the WAL file", &w.path, e))?;
        }
        Ok(())
    }

    /// The point reached, in the origin file (atomically, durably): the commit.
    fn commit(&mut self, seq: u64, time: OffsetDateTime) -> Result<(), RestoreError> {
        let mut origin = self.origin.clone();
        origin.parent.sequence = seq;
        origin.parent.time = time;
        origin.write(&self.dir)?;
        self.origin = origin;
        Ok(())
    }

    /// Ends the standby: the WAL is synced, the origin names the point reached (it was
    /// committed with the last segment), and the marker is removed, durably.
    fn promote(mut self) -> Result<(), RestoreError> {
        self.sync_wal()?;
        self.wal = None;
        let marker = self.dir.join(STANDBY_FILE);
        fs::remove_file(&marker).map_err(|e| RestoreError::io("cannot remove", &marker, e))?;
        sync_dir(&self.dir)
    }
}

/// Bytes in a standby's directory.
#[derive(Debug, Default, Clone, Copy)]
struct DirSizes {
    wal: u64,
    base: u64,
}

/// Opens and locks the marker of the standby in `dir`.
fn lock_marker(dir: &Path) -> Result<File, RestoreError> {
    let path = dir.join(STANDBY_FILE);
    let marker = match File::options().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RestoreError::Usage(format!(
                "{} is not a warm standby (it has no {STANDBY_FILE} file): it is a database \
                 `restore` made, or a standby already promoted. Follow into a new or empty \
                 directory",
                dir.display()
            )));
        }
        Err(e) => return Err(RestoreError::io("cannot open", &path, e)),
    };
    match marker.try_lock() {
        Ok(()) => Ok(marker),
        Err(std::fs::TryLockError::WouldBlock) => Err(RestoreError::Usage(format!(
            "another follower runs on {} (it holds {}); stop it first, or send it SIGUSR1 to \
             promote",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(RestoreError::io("cannot lock", &path, e)),
    }
}

/// The log numbers of the WAL files in `dir`, in order.
fn wal_numbers(dir: &Path) -> Result<Vec<u64>, RestoreError> {
    let entries = fs::read_dir(dir).map_err(|e| RestoreError::io("cannot read", dir, e))?;
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RestoreError::io("cannot read", dir, e))?;
        if let Some(DbFile::Wal(n)) = DbFile::parse(&entry.file_name().to_string_lossy()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Where a WAL file is cut back to the committed sequence number.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// Every record in it comes after the committed point (or it holds none).
    Before,
    /// At this offset: just past the batch ending at the committed point.
    At(u64),
}

/// Reads the WAL file at `path` to find the end of the batch ending at `committed`. A
/// file whose records end before it was changed by someone else: refused.
fn cut_point(path: &Path, committed: u64) -> Result<Cut, RestoreError> {
    let bad = |e: &dyn std::fmt::Display| {
        RestoreError::Integrity(format!(
            "{}: {e}; the standby cannot resume",
            path.display()
        ))
    };
    let mut reader = LogReader::open(path).map_err(|e| bad(&e))?;
    let mut cut = None;
    let mut first = None;
    let mut reached = None;
    while let Some(rec) = reader.next_record().map_err(|e| bad(&e))? {
        let h = BatchHeader::parse(&rec.bytes).map_err(|e| bad(&e))?;
        first.get_or_insert(h.sequence);
        if h.next_sequence() <= committed.saturating_add(1) {
            cut = Some(reader.offset());
            reached = Some(h.next_sequence());
        }
    }
    match (first, reached) {
        (None, _) => Ok(Cut::Before),
        (Some(f), _) if f > committed => Ok(Cut::Before),
        (_, Some(r)) if r == committed.saturating_add(1) => {
            Ok(Cut::At(cut.expect("set with reached")))
        }
        _ => Err(bad(&format!(
            "its records end at sequence {}, but the origin file says sequence {committed} \
             was applied: the directory was changed outside the follower",
            reached.unwrap_or(0).saturating_sub(1)
        ))),
    }
}

/// Opens the WAL file at `path` to append at `offset`, cutting off what lies past it.
fn open_for_append(log_number: u64, path: &Path, offset: u64) -> Result<OpenWal, RestoreError> {
    let file = File::options()
        .write(true)
        .open(path)
        .map_err(|e| RestoreError::io("cannot open the WAL file", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| RestoreError::io("cannot read the WAL file", path, e))?
        .len();
    if len > offset {
        tracing::warn!(
            file = %path.display(),
            bytes = len - offset,
            "cutting the WAL back to the committed point"
        );
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .map_err(|e| RestoreError::io("cannot cut the WAL file", path, e))?;
    }
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))
        .map_err(|e| RestoreError::io("cannot seek in the WAL file", path, e))?;
    Ok(OpenWal {
        log_number,
        path: path.to_path_buf(),
        writer: LogWriter::with_offset(BufWriter::with_capacity(CACHED_WRITE, file), offset),
    })
}

/// Creates the WAL file of `log_number` in `dir` (never over an existing file), durably.
fn create_wal(dir: &Path, log_number: u64) -> Result<OpenWal, RestoreError> {
    let name = DbFile::Wal(log_number)
        .file_name()
        .expect("WAL files have a name");
    let path = dir.join(name);
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| RestoreError::io("cannot create the WAL file", &path, e))?;
    sync_dir(dir)?;
    Ok(OpenWal {
        log_number,
        path,
        writer: LogWriter::new(BufWriter::with_capacity(CACHED_WRITE, file)),
    })
}

impl FollowReport {
    /// The report as text for people.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut w = String::new();
        let point = format!(
            "sequence {} (last record at {})",
            self.applied.seq,
            super::short_time(self.applied.time)
        );
        let _ = match self.event {
            FollowEnd::Promoted => writeln!(
                w,
                "Promoted the standby {} at {point}: the application may open it read-write \
                 now (RocksDB replays its WAL files on the first open).",
                self.target_dir.display()
            ),
            FollowEnd::Stopped => writeln!(
                w,
                "Stopped following into {} at {point}; it is still a standby: `follow` \
                 resumes it, `follow --promote` promotes it.",
                self.target_dir.display()
            ),
        };
        let _ = writeln!(w, "  repository    {}", self.repository);
        if let Some(r) = &self.restore {
            let _ = writeln!(
                w,
                "  restored      base {}, up to sequence {}",
                r.base.id,
                r.cutoff.as_ref().map_or(0, |c| c.seq)
            );
        }
        if let Some(seq) = self.resumed_from {
            let _ = writeln!(w, "  resumed       from sequence {seq}");
        }
        let _ = writeln!(
            w,
            "  applied       {} segments, {} records in this run",
            self.segments_applied, self.records_applied
        );
        if self.rebases > 0 {
            let _ = writeln!(
                w,
                "  re-based      {} times on a newer base (after a gap, for disk space or for \
                 a new column family)",
                self.rebases
            );
        }
        if let Some(b) = &self.not_applied {
            let _ = writeln!(
                w,
                "  not applied   {b}: no base knowing it was there yet, so neither it nor \
                 anything after it was applied"
            );
        }
        let _ = writeln!(
            w,
            "  origin        {}: lineage {}, at sequence {} of {}",
            tidemark_manifest::origin::ORIGIN_FILE,
            self.origin.lineage,
            self.origin.parent.sequence,
            self.origin.parent.repository
        );
        if let Some(ms) = self.promote_ms {
            let _ = writeln!(w, "  promotion     {ms} ms");
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::model::Compression;
    use tidemark_manifest::origin::OriginParent;
    use tidemark_manifest::rocks::write_batch::BatchBuilder;
    use tidemark_manifest::segment::{RecordTime, SegmentBuilder};
    use tidemark_manifest::testing::T0_US;

    /// A batch at `seq` putting `count` keys into column family `cf`.
    fn batch(seq: u64, count: u32, cf: u32) -> Vec<u8> {
        let mut b = BatchBuilder::new(seq);
        for i in 0..count {
            b.put(cf, format!("k{seq}-{i}").as_bytes(), b"v");
        }
        b.finish()
    }

    fn rec(seq: u64, count: u32, log: u64, cf: u32) -> Record {
        Record {
            seq,
            count,
            time_us: T0_US + seq as i64,
            time_source: RecordTime::Observed,
            log_number: log,
            log_offset: seq * 100,
            batch: batch(seq, count, cf),
        }
    }

    /// A segment file of `records` in `dir`; its key.
    fn segment(dir: &Path, records: &[Record]) -> (String, PathBuf) {
        let mut b = SegmentBuilder::new(Compression::Zstd, 1).unwrap();
        for r in records {
            b.push(r).unwrap();
        }
        let seg = b.finish().unwrap();
        let path = dir.join(format!("{}.seg", records[0].seq));
        fs::write(&path, &seg.bytes).unwrap();
        (seg.key(), path)
    }

    /// A standby in `dir` committed at `seq`, holding no WAL file yet.
    fn standby(dir: &Path, seq: u64) -> Standby {
        let origin = Origin::new(OriginParent {
            repository: "file:///r".into(),
            repository_id: "r".into(),
            lineage: "l".into(),
            sequence: seq,
            time: time_from_micros(T0_US),
        });
        origin.write(dir).unwrap();
        Standby {
            dir: dir.to_path_buf(),
            _marker: None,
            origin,
            column_families: BTreeSet::from([0, 1]),
            wal: None,
        }
    }

    fn wal_seqs(path: &Path) -> Vec<u64> {
        tidemark_manifest::rocks::log::read_all(path)
            .unwrap()
            .iter()
            .map(|r| BatchHeader::parse(&r.bytes).unwrap().sequence)
            .collect()
    }

    #[test]
    fn segments_append_whole_batches_by_log_number_and_commit_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let segs = tempfile::tempdir().unwrap();
        let mut s = standby(dir.path(), 0);
        let (k1, p1) = segment(segs.path(), &[rec(1, 2, 4, 0), rec(3, 4, 4, 1)]);
        assert_eq!(s.apply_segment(&k1, &p1).unwrap(), Applied::All(2));
        let (k2, p2) = segment(segs.path(), &[rec(7, 1, 4, 0), rec(8, 3, 9, 1)]);
        assert_eq!(s.apply_segment(&k2, &p2).unwrap(), Applied::All(2));
        assert_eq!(s.applied().seq, 10);
        assert_eq!(
            Origin::read(dir.path()).unwrap().unwrap().parent.sequence,
            10
        );
        assert_eq!(wal_seqs(&dir.path().join("000004.log")), vec![1, 3, 7]);
        assert_eq!(wal_seqs(&dir.path().join("000009.log")), vec![8]);
        assert_eq!(s.wal_name().as_deref(), Some("000009.log"));
    }

    #[test]
    fn a_break_in_the_chain_or_an_older_log_is_refused_an_unknown_column_family_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let segs = tempfile::tempdir().unwrap();
        let mut s = standby(dir.path(), 10);
        let (k, p) = segment(segs.path(), &[rec(12, 1, 4, 0)]);
        let e = s.apply_segment(&k, &p).unwrap_err();
        assert!(e.to_string().contains("a record is missing"), "{e}");
        assert_eq!(e.class(), crate::ErrorClass::VerificationFailed);
        let (k, p) = segment(segs.path(), &[rec(11, 1, 4, 7)]);
        let blocked = UnknownColumnFamily {
            seq: 11,
            column_family: 7,
            segment: k.clone(),
        };
        assert_eq!(s.apply_segment(&k, &p).unwrap(), Applied::Blocked(blocked));
        assert_eq!(s.applied().seq, 10);
        let (k, p) = segment(segs.path(), &[rec(11, 1, 5, 0)]);
        s.apply_segment(&k, &p).unwrap();
        let (k, p) = segment(segs.path(), &[rec(12, 1, 4, 0)]);
        let e = s.apply_segment(&k, &p).unwrap_err();
        assert!(e.to_string().contains("older than WAL 5"), "{e}");
        assert_eq!(
            s.applied().seq,
            11,
            "nothing past the refused records is committed"
        );
    }

    #[test]
    fn a_batch_of_an_unknown_column_family_leaves_the_standby_at_its_committed_point() {
        let dir = tempfile::tempdir().unwrap();
        let segs = tempfile::tempdir().unwrap();
        let mut s = standby(dir.path(), 0);
        let (k, p) = segment(segs.path(), &[rec(1, 2, 4, 0), rec(3, 4, 4, 1)]);
        s.apply_segment(&k, &p).unwrap();
        let wal4 = dir.path().join("000004.log");
        let committed_bytes = fs::read(&wal4).unwrap();
        // Records of the committed log, then of a newer one, then the batch of column
        // family 2: nothing of the segment stays.
        let (k, p) = segment(
            segs.path(),
            &[
                rec(7, 2, 4, 1),
                rec(9, 1, 4, 0),
                rec(10, 3, 9, 0),
                rec(13, 1, 9, 2),
                rec(14, 1, 9, 0),
            ],
        );
        let Applied::Blocked(b) = s.apply_segment(&k, &p).unwrap() else {
            panic!("the batch of column family 2 was applied");
        };
        assert_eq!((b.seq, b.column_family), (13, 2));
        assert!(b.to_string().contains("column family 2"), "{b}");
        assert_eq!(s.applied().seq, 6);
        assert_eq!(
            Origin::read(dir.path()).unwrap().unwrap().parent.sequence,
            6
        );
        assert_eq!(fs::read(&wal4).unwrap(), committed_bytes, "cut back");
        assert!(
            !dir.path().join("000009.log").exists(),
            "the newer WAL file holds nothing committed"
        );
        // In memory as on disk: the standby appends after its committed point again, and a
        // follower resuming it finds the same.
        assert_eq!(s.wal_name().as_deref(), Some("000004.log"));
        let (k, p) = segment(segs.path(), &[rec(7, 2, 4, 1), rec(9, 1, 9, 0)]);
        assert_eq!(s.apply_segment(&k, &p).unwrap(), Applied::All(2));
        assert_eq!(wal_seqs(&wal4), vec![1, 3, 7]);
        assert_eq!(wal_seqs(&dir.path().join("000009.log")), vec![9]);
        drop(s);
        let resumed = standby(dir.path(), 9);
        assert!(resumed.resume_wal().unwrap().is_some());
        assert_eq!(wal_seqs(&wal4), vec![1, 3, 7]);
        assert_eq!(wal_seqs(&dir.path().join("000009.log")), vec![9]);
    }

    #[test]
    fn a_base_gets_the_standby_past_a_batch_when_it_knows_the_column_family_or_holds_it() {
        use tidemark_manifest::model::ColumnFamily;
        let batch = UnknownColumnFamily {
            seq: 100,
            column_family: 3,
            segment: "s".into(),
        };
        let t = time_from_micros(T0_US);
        let mut base = tidemark_manifest::testing::base("b", 50, 60, t);
        base.column_families = tidemark_manifest::testing::default_cf();
        // Newer than the standby's point, but taken before the column family was created.
        assert!(!base_gets_past(&base, &batch));
        base.column_families.push(ColumnFamily {
            id: 3,
            name: "added".into(),
        });
        // Taken before the standby's point, but it knows the column family.
        assert!(base_gets_past(&base, &batch));
        base.column_families.pop();
        // Taken after the batch (the column family dropped since): it holds the batch.
        base.replay_from_seq = 101;
        assert!(base_gets_past(&base, &batch));
    }

    /// Writes `records` into the WAL file `path` and returns the offset after each.
    fn write_wal(path: &Path, records: &[(u64, u32)]) -> Vec<u64> {
        let mut w = LogWriter::new(File::create(path).unwrap());
        records
            .iter()
            .map(|&(seq, count)| w.add_record(&batch(seq, count, 0)).unwrap())
            .collect()
    }

    #[test]
    fn the_wal_is_cut_back_to_the_committed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000004.log");
        let ends = write_wal(&path, &[(1, 2), (3, 4), (7, 3)]);
        assert_eq!(cut_point(&path, 6).unwrap(), Cut::At(ends[1]));
        assert_eq!(cut_point(&path, 9).unwrap(), Cut::At(ends[2]));
        assert_eq!(cut_point(&path, 0).unwrap(), Cut::Before);
        // A point inside a batch, or past the file's records, was not written by a follower.
        assert!(cut_point(&path, 4).is_err());
        let e = cut_point(&path, 20).unwrap_err();
        assert!(
            e.to_string().contains("changed outside the follower"),
            "{e}"
        );
        // A torn record at the end is cut off.
        let mut bytes = fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 40, 0, 1, 9, 9]);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cut_point(&path, 9).unwrap(), Cut::At(whole as u64));
        let w = open_for_append(4, &path, whole as u64).unwrap();
        drop(w);
        assert_eq!(fs::metadata(&path).unwrap().len(), whole as u64);
    }

    #[test]
    fn a_resumed_standby_drops_what_was_not_committed_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let segs = tempfile::tempdir().unwrap();
        write_wal(&dir.path().join("000004.log"), &[(1, 2), (3, 4), (7, 3)]);
        // A file of a newer log, started but never committed.
        write_wal(&dir.path().join("000009.log"), &[(10, 1)]);
        let mut s = standby(dir.path(), 6);
        s.wal = s.resume_wal().unwrap();
        assert!(!dir.path().join("000009.log").exists());
        assert_eq!(wal_seqs(&dir.path().join("000004.log")), vec![1, 3]);
        let (k, p) = segment(segs.path(), &[rec(7, 3, 4, 0), rec(10, 1, 9, 0)]);
        s.apply_segment(&k, &p).unwrap();
        assert_eq!(wal_seqs(&dir.path().join("000004.log")), vec![1, 3, 7]);
        assert_eq!(wal_seqs(&dir.path().join("000009.log")), vec![10]);
    }

    #[tokio::test]
    async fn promote_without_catching_up_needs_no_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("standby");
        {
            let mut o = rocksdb::Options::default();
            o.create_if_missing(true);
            rocksdb::DB::open(&o, &db).unwrap();
        }
        fs::remove_file(db.join("LOCK")).unwrap();
        write_standby_marker(&db, "file:///gone").unwrap();
        standby(&db, 0);
        let gone = StoreOptions::new(format!("file://{}/gone", dir.path().display()));
        let mut opts = FollowOptions::new(&db);
        opts.promote = true;
        opts.no_catch_up = true;
        let mut nothing = |_: &FollowStatus| {};
        let report = run(
            &gone,
            &opts,
            &Progress::hidden(),
            &Controls::default(),
            &mut nothing,
        )
        .await
        .unwrap();
        assert_eq!(report.event, FollowEnd::Promoted);
        assert!(!db.join(STANDBY_FILE).exists());
        // Promoted, it is no standby any more.
        let e = run(
            &gone,
            &opts,
            &Progress::hidden(),
            &Controls::default(),
            &mut nothing,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not a warm standby"), "{e}");
    }

    #[test]
    fn a_promotion_abandons_a_rebase_for_disk_space_not_one_past_a_gap() {
        let c = Controls::default();
        let space = c.rebase_cancel(Keep::NewOnly);
        let gap = c.rebase_cancel(Keep::OldStandby);
        assert!(!space.is_cancelled() && !gap.is_cancelled());
        c.promote.cancel();
        assert!(c.promote_requested());
        assert!(
            space.is_cancelled(),
            "the promotion cancels the re-base for space"
        );
        assert!(
            !gap.is_cancelled(),
            "a re-base past a gap is finished first"
        );
        c.stop.cancel();
        assert!(gap.is_cancelled());
    }

    #[test]
    fn only_a_standby_of_this_repository_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let e = lock_marker(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a warm standby"), "{e}");
        write_standby_marker(dir.path(), "file:///r").unwrap();
        let held = lock_marker(dir.path()).unwrap();
        let e = lock_marker(dir.path()).unwrap_err();
        assert!(e.to_string().contains("another follower"), "{e}");
        drop(held);
        lock_marker(dir.path()).unwrap();
        let s = standby(dir.path(), 1);
        let mut config = tidemark_manifest::testing::config();
        config.repository_id = "r".into();
        config.lineage.id = "l".into();
        s.check_repository(&config, "file:///r").unwrap();
        config.lineage.id = "other".into();
        let e = s.check_repository(&config, "file:///r").unwrap_err();
        assert!(e.to_string().contains("lineage other"), "{e}");
    }
}
