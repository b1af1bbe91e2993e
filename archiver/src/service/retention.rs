//! Retention in the service: the mark step between two steps of the pipeline, then the
//! sweep in a background task this owner holds (FORMAT.md §4.6).
//!
//! The policy runs a little after start, every `retention.interval`, and after each base
//! backup. Marking waits until no base backup runs, and for the segments read so far to be
//! durable (it ships them and waits, so that an archiver behind a busy database still
//! applies its policy); no base backup starts while the sweep runs, and the sweep stops deleting the moment the lease is
//! lost (it asks the lease's fence before each deletion).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_manifest::repo::{RepoError, Repository};
use tokio::task::JoinError;

use super::ServiceError;
use super::pipeline::Pipeline;
use crate::lease_keeper::LeaseFence;
use crate::metrics::Metrics;
use crate::prune::{self, PruneError, PruneOptions, SweepMode, SweepReport};
use crate::task::{OwnedTask, join_slot};

/// How long a due run waits for the segments in flight to become durable. The service's
/// loop waits with it, so this bounds how late a shutdown or a base request is seen.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// How long a run that could not wait is put off (at most the policy's interval).
const PUT_OFF: Duration = Duration::from_secs(60);

/// A sweep's outcome, as its task ends.
pub(crate) type Swept = Result<Result<SweepReport, PruneError>, JoinError>;

/// Owns the retention schedule and the sweep in progress.
pub(crate) struct Retention {
    policy: Option<PruneOptions>,
    due: Option<Instant>,
    sweep: Option<OwnedTask<Result<SweepReport, PruneError>>>,
    repo: Repository,
    fence: LeaseFence,
    metrics: Arc<Metrics>,
    /// [`SETTLE_LIMIT`], shorter in tests.
    settle_limit: Duration,
}

impl Retention {
    /// Nothing is ever deleted without a `policy`.
    pub fn new(
        policy: Option<PruneOptions>,
        repo: &Repository,
        fence: LeaseFence,
        metrics: &Arc<Metrics>,
    ) -> Retention {
        Retention {
            due: policy
                .as_ref()
                .map(|_| Instant::now() + Duration::from_secs(30)),
            policy,
            sweep: None,
            repo: repo.clone(),
            fence,
            metrics: Arc::clone(metrics),
            settle_limit: SETTLE_LIMIT,
        }
    }

    /// Waits at most `limit` for the segments in flight (tests).
    #[cfg(test)]
    pub fn with_settle_limit(mut self, limit: Duration) -> Retention {
        self.settle_limit = limit;
        self
    }

    /// True while a sweep runs.
    pub fn sweeping(&self) -> bool {
        self.sweep.is_some()
    }

    /// A base backup was recorded: apply the policy now.
    pub fn after_base(&mut self) {
        if self.due.is_some() {
            self.due = Some(Instant::now());
        }
    }

    /// When the policy is due next.
    pub fn wake_at(&self) -> Option<Instant> {
        self.due
    }

    /// Marks when the policy is due and the pipeline is settled, then starts the sweep.
    pub async fn mark_if_due(
        &mut self,
        pipeline: &mut Pipeline,
        base_running: bool,
    ) -> Result<(), ServiceError> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        if base_running || self.sweep.is_some() || self.due.is_none_or(|d| d > Instant::now()) {
            return Ok(());
        }
        // Under sustained load an upload is always in flight: ship what was read and wait,
        // for a while. A store too slow for that (or failing) puts the run off.
        if !pipeline.settled() {
            let settled = tokio::time::timeout(self.settle_limit, pipeline.settle()).await;
            if !matches!(settled, Ok(Ok(true))) {
                self.due = Some(Instant::now() + policy.interval.min(PUT_OFF));
                tracing::info!(
                    retry_in = ?policy.interval.min(PUT_OFF),
                    "retention put off: segments are still on their way to the store"
                );
                return settled.unwrap_or(Ok(false)).map(|_| ());
            }
        }
        self.due = Some(Instant::now() + policy.interval);
        match prune::mark_with_checkpoint(&self.repo, pipeline.checkpoint(), policy).await {
            Ok((report, newest, now)) => {
                tracing::info!(
                    generation = ?report.generation_after,
                    bases_removed = report.removed_bases.len(),
                    segments_removed = report.segments_removed,
                    window = %report.window_after,
                    "retention: history marked; sweeping unreferenced objects"
                );
                if let Some(newest) = newest {
                    let (repo, grace, fence) =
                        (self.repo.clone(), policy.grace, self.fence.clone());
                    self.sweep = Some(OwnedTask::spawn(async move {
                        prune::sweep(&repo, &newest, grace, now, SweepMode::Delete(&fence)).await
                    }));
                }
                Ok(())
            }
            Err(PruneError::Repo(e @ RepoError::LostRace { .. })) => Err(e.into()),
            Err(e) => {
                self.metrics.prune_failed();
                tracing::error!(
                    error = %e,
                    retry_in = ?policy.interval,
                    "applying the retention policy failed; archiving goes on"
                );
                Ok(())
            }
        }
    }

    /// Resolves when the sweep in progress ends; never while none runs. Cancel-safe.
    pub async fn finished(&mut self) -> Swept {
        join_slot(&mut self.sweep).await
    }

    /// Reports a finished sweep.
    pub fn on_finished(&self, swept: Swept) {
        match swept {
            Ok(Ok(report)) => {
                let (objects, bytes) = report
                    .deleted
                    .values()
                    .fold((0, 0), |(o, b), c| (o + c.objects, b + c.bytes));
                self.metrics.prune_finished(objects, bytes);
                tracing::info!(
                    objects_deleted = objects,
                    bytes_deleted = bytes,
                    objects_in_grace = report.deferred.objects,
                    objects_locked = report.locked.objects,
                    locked_all_deletable = report.locked_all_deletable.as_deref().unwrap_or(""),
                    "retention applied"
                );
            }
            Ok(Err(e)) => {
                self.metrics.prune_failed();
                tracing::error!(
                    error = %e,
                    "deleting unreferenced objects failed; the next run tries again"
                );
            }
            Err(e) => {
                self.metrics.prune_failed();
                tracing::error!(error = %e, "the retention sweep task failed");
            }
        }
    }
}
