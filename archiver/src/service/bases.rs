//! Base backup scheduling: when the next base is due, and the one in progress.
//!
//! A base is taken every `base_interval` (skipped when nothing was written since the newest
//! one), at once after a gap, a column family change or a request, as soon as the WAL a
//! restore would replay exceeds the bound set (`max_replay`, `target_recovery_time`: the
//! pipeline's [`super::replay`] trigger says when), and never while a retention sweep runs. It runs in a task this owner holds; the pipeline records it when
//! it finishes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_manifest::repo::{RepoState, Repository};
use time::OffsetDateTime;
use tokio::task::JoinError;

use super::ServiceError;
use super::pipeline::Pipeline;
use crate::base::{BaseError, BaseOptions, BaseResult, ReusableTables, take_base_backup};
use crate::config::ArchiverOptions;
use crate::metrics::Metrics;
use crate::task::{OwnedTask, join_slot};

/// How long a shutdown waits for a base backup in progress.
const SHUTDOWN_BASE_GRACE: Duration = Duration::from_secs(20);

/// A base backup's outcome, as its task ends.
pub(crate) type Finished = Result<Result<BaseResult, BaseError>, JoinError>;

/// How a finished base ended: its id, or why it failed.
pub(crate) fn outcome(finished: &Finished) -> Result<String, String> {
    match finished {
        Ok(Ok(result)) => Ok(result.summary.id.clone()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the base backup task failed: {e}")),
    }
}

/// Owns the base schedule and the base backup in progress.
pub(crate) struct Bases {
    due: Option<Instant>,
    /// True while the pending base is only the periodic one (not asked for, not a gap).
    on_schedule: bool,
    task: Option<OwnedTask<Result<BaseResult, BaseError>>>,
    /// After a failed base, none is started before this, whatever triggers it.
    retry_at: Option<Instant>,
    /// Bases in the repository at start plus those taken since.
    count: u64,
    interval: Duration,
    upload_concurrency: usize,
    db: PathBuf,
    wal_dir: PathBuf,
    scratch: PathBuf,
    repo: Repository,
    metrics: Arc<Metrics>,
}

impl Bases {
    pub fn new(
        opts: &ArchiverOptions,
        wal_dir: PathBuf,
        scratch: PathBuf,
        repo: &Repository,
        state: &RepoState,
        metrics: &Arc<Metrics>,
    ) -> Bases {
        let last_base_at = state.history.bases.iter().map(|b| b.created_at).max();
        let due = match last_base_at {
            None => Instant::now(),
            Some(_) if opts.base_at_start => Instant::now(),
            Some(at) => {
                let age = (OffsetDateTime::now_utc() - at)
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                Instant::now() + opts.base_interval.saturating_sub(age)
            }
        };
        Bases {
            due: Some(due),
            on_schedule: last_base_at.is_some() && !opts.base_at_start,
            task: None,
            retry_at: None,
            count: state.history.bases.len() as u64,
            interval: opts.base_interval,
            upload_concurrency: opts.upload_concurrency,
            db: opts.db.clone(),
            wal_dir,
            scratch,
            repo: repo.clone(),
            metrics: Arc::clone(metrics),
        }
    }

    /// A base is needed now (a gap, a column family change, a request).
    pub fn needed_now(&mut self) {
        self.due = Some(Instant::now());
        self.on_schedule = false;
    }

    /// True while a base backup runs.
    pub fn running(&self) -> bool {
        self.task.is_some()
    }

    /// True when no base runs or is due, and the repository has one: a one-shot run may
    /// stop once caught up.
    pub fn settled(&self) -> bool {
        self.task.is_none() && self.due.is_none_or(|d| d > Instant::now()) && self.count > 0
    }

    /// When the next base is due.
    pub fn wake_at(&self) -> Option<Instant> {
        self.due
    }

    /// Starts the base that is due, unless one runs or a sweep does (a sweep may be
    /// deleting objects a base would reuse).
    pub fn start_if_due(&mut self, pipeline: &Pipeline, sweeping: bool) {
        let now = Instant::now();
        let due = self.due.is_some_and(|d| d <= now);
        let replay_due = !due && self.retry_at.is_none_or(|at| at <= now) && pipeline.replay_due();
        if self.task.is_some() || !(due || replay_due) {
            return;
        }
        if replay_due {
            self.on_schedule = false;
        } else if self.on_schedule && pipeline.nothing_new_since_newest_base() {
            tracing::debug!("nothing written since the newest base; the scheduled base is skipped");
            self.due = Some(Instant::now() + self.interval);
            return;
        }
        if sweeping {
            return;
        }
        if replay_due {
            tracing::info!(
                "the WAL a restore would replay exceeds the bound set: taking a base backup early"
            );
        }
        self.due = None;
        self.on_schedule = false;
        let (db, wal, scratch, repo) = (
            self.db.clone(),
            self.wal_dir.clone(),
            self.scratch.clone(),
            self.repo.clone(),
        );
        let current = pipeline.current().clone();
        let mut opts = BaseOptions {
            upload_concurrency: self.upload_concurrency,
            earliest_time: Some(pipeline.observed_times()),
            ..BaseOptions::default()
        };
        tracing::info!("taking a base backup");
        self.task = Some(OwnedTask::spawn(async move {
            drill_hold().await;
            opts.reusable = ReusableTables::referenced_by(&repo, &current).await?;
            take_base_backup(&db, &wal, &scratch, &repo, &opts).await
        }));
    }

    /// Resolves when the base in progress ends; never while none runs. Cancel-safe.
    pub async fn finished(&mut self) -> Finished {
        join_slot(&mut self.task).await
    }

    /// Records a finished base through the pipeline and schedules the next one. True when
    /// a base was recorded (retention runs after each).
    pub async fn on_finished(
        &mut self,
        finished: Finished,
        pipeline: &mut Pipeline,
    ) -> Result<bool, ServiceError> {
        match finished {
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
                self.metrics
                    .base_finished(&result.summary, result.stats.duration);
                self.due = Some(Instant::now() + self.interval);
                self.on_schedule = true;
                self.retry_at = None;
                if pipeline.record_base(result).await? {
                    // Started before a column family change: another base is needed.
                    self.needed_now();
                }
                self.count += 1;
                Ok(true)
            }
            Ok(Err(e)) => {
                self.metrics.base_failed();
                tracing::error!(error = %e, "base backup failed; retrying in a minute");
                let retry = Instant::now() + Duration::from_secs(60);
                self.due = Some(retry);
                self.retry_at = Some(retry);
                Ok(false)
            }
            Err(e) => Err(ServiceError::Other(format!("base backup task failed: {e}"))),
        }
    }

    /// At shutdown: lets the base in progress finish for a while; abandons it after that.
    pub async fn stop(mut self) -> Option<BaseResult> {
        let mut task = self.task.take()?;
        tracing::info!(
            "waiting up to {:?} for the base backup in progress",
            SHUTDOWN_BASE_GRACE
        );
        match tokio::time::timeout(SHUTDOWN_BASE_GRACE, task.join()).await {
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
                task.stop().await;
                tracing::warn!(
                    "the base backup in progress did not finish in time and was abandoned; \
                     its objects are unreferenced"
                );
                None
            }
        }
    }
}

/// For failure drills and tests: with `TIDEMARK_DRILL_BASE_HOLD` set to a path, a base
/// backup that is due waits, before it starts, until no file is at that path (the WAL is
/// archived meanwhile).
async fn drill_hold() {
    let Some(path) = std::env::var_os("TIDEMARK_DRILL_BASE_HOLD") else {
        return;
    };
    let path = PathBuf::from(path);
    if path.exists() {
        tracing::warn!(path = %path.display(), "drill: the base backup waits until this file is removed");
    }
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
