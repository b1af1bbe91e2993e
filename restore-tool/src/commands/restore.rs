//! `restore`: plan → fetch → replay → verify, into a staging directory that is renamed to
//! the target only once the result is verified.
//!
//! Safety rules, in the order they are applied:
//!
//! 1. the target must be missing or an empty directory, unless `--force`; a target holding a
//!    live database (its `LOCK` held) is refused even then, and so are a mount point and a
//!    target overlapping a local repository;
//! 2. the plan's chain is checked before anything is downloaded;
//! 3. every name that becomes a file comes from the store through
//!    `keys::check_base_file_name`, and every object is checked against its sha256;
//! 4. WAL files are written only after the records before them continued the chain, into a
//!    directory of their own, so that the base can be opened alone first;
//! 5. the result is verified as `--verify` asks (by default the base opened alone, and every
//!    WAL file read back, ending exactly at the achieved cutoff: `verify`);
//! 6. only then is the origin file written into the result (FORMAT.md §11: the repository,
//!    lineage and point it was restored from, so that it is never archived there again), the
//!    old target (if any) renamed aside and the result renamed into place; nothing is ever
//!    deleted except the tool's own staging and scratch directories.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};

use tidemark_manifest::model::{BaseDescriptor, TimeSource};
use tidemark_manifest::origin::{ORIGIN_FILE, Origin, OriginParent};
use tidemark_manifest::plan::RestorePlan;
use tidemark_manifest::repo::{ReadFrom, RepoState, Repository};
use tidemark_manifest::store::StoreUrl;

use super::{StoreOptions, Target, load, load_from, short_time};
use crate::fetch::{self, FetchedSegment, Permits, SegmentFetch};
use crate::progress::{PhaseBar, Progress, Unit};
use crate::replay::{self, RecordPoint, ReplayOutcome, Replayer, RoundedDown, WalFileReport};
use crate::staging::{self, Staging};
use crate::verify::base::{BaseCheck, BaseExpect};
use crate::verify::wal::WalCheck;
use crate::verify::{self, Verification, VerificationStatus, VerifyMode, VerifySteps};
use crate::{Cancel, RestoreError, human_bytes, human_duration};

/// Default number of concurrent downloads.
pub const DEFAULT_PARALLELISM: usize = 8;

fn default_parallelism() -> usize {
    DEFAULT_PARALLELISM
}

/// The default check of a restore: every object against its sha256, the base opened
/// alone, every re-created WAL file read back. Reading every block of the base's tables
/// (`standard`) costs a pass over the whole base on the path to a usable database; a drill
/// does it (and more) by default.
pub const DEFAULT_VERIFY: VerifyMode = VerifyMode::Quick;

fn default_verify() -> VerifyMode {
    DEFAULT_VERIFY
}

/// Options of `restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOptions {
    /// The directory to restore into.
    pub target_dir: PathBuf,
    /// The point to restore to.
    pub target: Target,
    /// Plan only: say what would be downloaded and restored, write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Restore over a non-empty target, moving its contents aside first.
    #[serde(default)]
    pub force: bool,
    /// Concurrent downloads (at least 1).
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// How to verify the result.
    #[serde(default = "default_verify")]
    pub verify: VerifyMode,
    /// Make the result a warm standby: its marker is written into the result before it is
    /// renamed into place, so no crash leaves a restored standby without it.
    #[serde(skip)]
    pub standby: bool,
}

impl RestoreOptions {
    /// Options with the defaults for everything but the target.
    pub fn new(target_dir: impl Into<PathBuf>, target: Target) -> RestoreOptions {
        RestoreOptions {
            target_dir: target_dir.into(),
            target,
            dry_run: false,
            force: false,
            parallelism: DEFAULT_PARALLELISM,
            verify: DEFAULT_VERIFY,
            standby: false,
        }
    }
}

/// The base a restore uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseReport {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub earliest_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub earliest_time: OffsetDateTime,
    pub min_log_number: u64,
    pub replay_from_seq: u64,
    pub files: usize,
    pub bytes: u64,
    pub column_families: Vec<String>,
}

/// The segments a restore uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentsReport {
    pub planned: usize,
    pub planned_bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Downloaded and replayed (fewer than planned when a time cutoff was found early).
    pub read: usize,
}

/// Where the restored database ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CutoffReport {
    /// The last sequence number of the restored database.
    pub seq: u64,
    /// The time of the last applied record (the base's own point if none was applied).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub last_record: Option<RecordPoint>,
    /// The first record left out.
    pub next_record: Option<RecordPoint>,
    pub rounded_down: Option<RoundedDown>,
}

/// What the replay wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub records_replayed: u64,
    pub records_skipped: u64,
    pub wal_files: Vec<WalFileReport>,
    pub wal_bytes: u64,
}

/// Wall time of each phase, in milliseconds. The base download runs at the same time as the
/// WAL download and replay, and segments are replayed while later ones download.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Durations {
    pub plan: u64,
    pub fetch_base: u64,
    /// Until the last segment needed was downloaded and checked.
    pub fetch_wal: u64,
    /// Time spent writing WAL files from the segment records (not waiting for downloads),
    /// reading each one back included.
    pub replay: u64,
    /// From the start of the WAL downloads to the end of the replay.
    pub fetch_and_replay_wal: u64,
    /// The verification's own time: opening the base alone (beside the WAL download),
    /// reading the WAL files back (during the replay) and what follows the replay.
    pub verify: u64,
    pub commit: u64,
    pub total: u64,
}

/// The phases of a restore, in order, for timings and for saying where a restore failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the repository, choosing the base and the segments, checking the target.
    Plan,
    /// Downloading the base's files and the segments, each checked against its sha256.
    Fetch,
    /// Re-creating the source's WAL files from the segment records.
    Replay,
    /// Opening the result read-only and checking it.
    Verify,
    /// Renaming the verified result into place.
    Commit,
}

impl Phase {
    /// The phase's name as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::Fetch => "fetch",
            Phase::Replay => "replay",
            Phase::Verify => "verify",
            Phase::Commit => "commit",
        }
    }
}

/// How a phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStatus {
    Passed,
    Failed,
    /// Started but neither finished nor failed (the restore is still running).
    Running,
}

/// One phase in a [`PhaseLog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseEntry {
    pub phase: Phase,
    pub status: PhaseStatus,
    pub duration_ms: u64,
}

#[derive(Debug)]
struct PhaseSlot {
    phase: Phase,
    started: Instant,
    took: Option<Duration>,
    failed: bool,
}

/// Which phases a restore started, finished or failed in, kept up to date while it runs, so
/// that a failed restore still says where it failed and how long each phase took.
#[derive(Debug, Default)]
pub struct PhaseLog {
    inner: Mutex<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    slots: Vec<PhaseSlot>,
    /// The phase the restore's error came from.
    root: Option<Phase>,
}

impl PhaseLog {
    /// An empty log.
    pub fn new() -> PhaseLog {
        PhaseLog::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut LogInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `phase` starts now.
    pub fn start(&self, phase: Phase) {
        self.with(|log| {
            log.slots.push(PhaseSlot {
                phase,
                started: Instant::now(),
                took: None,
                failed: false,
            })
        });
    }

    /// `phase` ended now, or after `took` when given (for phases that overlap others).
    pub fn end(&self, phase: Phase, took: Option<Duration>) {
        self.with(|log| {
            if let Some(s) = log.slots.iter_mut().rev().find(|s| s.phase == phase) {
                s.took = Some(took.unwrap_or_else(|| s.started.elapsed()));
            }
        });
    }

    /// `phase` failed (and ended, if it had not). The first phase to fail is the root cause
    /// ([`PhaseLog::failed`]); phases failed after it were stopped by it.
    pub fn fail(&self, phase: Phase) {
        self.with(|log| {
            if let Some(s) = log.slots.iter_mut().rev().find(|s| s.phase == phase) {
                s.took.get_or_insert_with(|| s.started.elapsed());
                s.failed = true;
                log.root.get_or_insert(phase);
            }
        });
    }

    /// Every phase still running failed (the restore returned an error from it).
    pub fn fail_running(&self) {
        self.with(|log| {
            for s in log.slots.iter_mut().filter(|s| s.took.is_none()) {
                s.took = Some(s.started.elapsed());
                s.failed = true;
                log.root.get_or_insert(s.phase);
            }
        });
    }

    /// The phase the restore failed in: the first one to fail.
    pub fn failed(&self) -> Option<Phase> {
        self.with(|log| log.root)
    }

    /// The phases so far, in the order they started.
    pub fn entries(&self) -> Vec<PhaseEntry> {
        self.with(|log| {
            log.slots
                .iter()
                .map(|s| PhaseEntry {
                    phase: s.phase,
                    status: match (s.failed, s.took) {
                        (true, _) => PhaseStatus::Failed,
                        (false, Some(_)) => PhaseStatus::Passed,
                        (false, None) => PhaseStatus::Running,
                    },
                    duration_ms: ms(s.took.unwrap_or_else(|| s.started.elapsed())),
                })
                .collect()
        })
    }
}

/// What `restore` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub dry_run: bool,
    pub repository: String,
    pub target_dir: PathBuf,
    /// The target as requested.
    pub target: Target,
    /// What was at the target path before the restore.
    pub target_before: String,
    pub time_precision: Option<TimeSource>,
    pub base: BaseReport,
    /// The planner's bounds of the cutoff (equal unless the target is a time inside a
    /// segment, decided while replaying).
    pub planned_min_seq: u64,
    pub planned_max_seq: u64,
    pub segments: SegmentsReport,
    pub download_bytes: u64,
    pub cutoff: Option<CutoffReport>,
    pub replay: Option<ReplayReport>,
    pub verification: Option<Verification>,
    /// Where the previous contents of the target went (`--force`).
    pub moved_aside: Option<PathBuf>,
    /// The origin file written into the restored database: where it came from, and its own
    /// lineage.
    pub origin: Option<Origin>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    pub durations_ms: Durations,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Opens the repository `store` names and restores from it. Refuses a target that overlaps a
/// local repository.
pub async fn run_from(
    store: &StoreOptions,
    opts: &RestoreOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<RestoreReport, RestoreError> {
    check_target_outside_store(store, &opts.target_dir)?;
    let repo = store.open().await?;
    run(&repo, opts, progress, cancel).await
}

/// Like [`run_from`], planning from the generation `from` says (`--generation N`).
pub async fn run_from_generation(
    store: &StoreOptions,
    opts: &RestoreOptions,
    from: ReadFrom,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<RestoreReport, RestoreError> {
    check_target_outside_store(store, &opts.target_dir)?;
    let repo = store.open().await?;
    let state = load_from(&repo, from).await?;
    run_logged(
        &repo,
        Some(&state),
        opts,
        progress,
        cancel,
        &PhaseLog::new(),
    )
    .await
}

/// Refuses a target directory inside (or containing) the local repository `store` names.
pub fn check_target_outside_store(
    store: &StoreOptions,
    target_dir: &std::path::Path,
) -> Result<(), RestoreError> {
    if let StoreUrl::Local { root } = store.url()? {
        let target = staging::resolve_target(target_dir)?;
        staging::check_not_overlapping(&target, &root)?;
    }
    Ok(())
}

/// Restores from `repo` as `opts` says.
pub async fn run(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<RestoreReport, RestoreError> {
    run_logged(repo, None, opts, progress, cancel, &PhaseLog::new()).await
}

/// Restores from `repo` as `opts` says, planning from `state` when the caller has already
/// loaded it (so that what it measured and what is restored come from one reading of the
/// repository), and recording each phase in `log` as it starts, ends or fails.
pub async fn run_logged(
    repo: &Repository,
    state: Option<&RepoState>,
    opts: &RestoreOptions,
    progress: &Progress,
    cancel: &Cancel,
    log: &PhaseLog,
) -> Result<RestoreReport, RestoreError> {
    let result = restore(repo, state, opts, progress, cancel, log).await;
    if result.is_err() {
        log.fail_running();
    }
    result
}

/// plan → fetch → replay → verify → commit. Each step records its phase in `log` and its
/// duration in the report; the first step to fail ends the restore, leaving the target as
/// it was (the staging directory removes itself).
async fn restore(
    repo: &Repository,
    state: Option<&RepoState>,
    opts: &RestoreOptions,
    progress: &Progress,
    cancel: &Cancel,
    log: &PhaseLog,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    log.start(Phase::Plan);
    let run = Run {
        repo,
        opts,
        progress,
        cancel,
        log,
    };
    let target = run.check_target()?;
    let loaded;
    let state = match state {
        Some(state) => state,
        None => {
            loaded = load(repo).await?;
            &loaded
        }
    };
    let (planned, mut report) = run.plan(state, &target).await?;
    report.durations_ms.plan = ms(started.elapsed());
    log.end(Phase::Plan, None);
    planned.trace();
    if opts.dry_run {
        if !target.state.is_free() && !opts.force {
            report.warnings.push(format!(
                "the target {} {}: the restore would be refused without --force",
                target.dir.display(),
                target.state.describe()
            ));
        }
        report.durations_ms.total = ms(started.elapsed());
        return Ok(report);
    }

    // Fetch and replay, into a staging directory beside the target.
    cancel.check()?;
    log.start(Phase::Fetch);
    log.start(Phase::Replay);
    let staging = Staging::create(&target.dir)?;
    tracing::info!("building the database in {}", staging.dir().display());
    let (outcome, base_check) = run
        .fetch_and_replay(&planned, &staging, &mut report.durations_ms)
        .await?;
    let cutoff = report.record_replay(&outcome, &planned.plan);
    run.verify(&staging, &outcome, base_check, &mut report)
        .await?;
    let origin = Origin::new(OriginParent {
        repository: repo.url(),
        repository_id: state.config.repository_id.clone(),
        lineage: state.config.lineage.id.clone(),
        sequence: cutoff.seq,
        time: cutoff.time,
    });
    run.commit(staging, origin, &mut report).await?;
    report.durations_ms.total = ms(started.elapsed());
    tracing::info!(
        "restored {} to {} at sequence {}",
        report.repository,
        target.dir.display(),
        outcome.cutoff_seq
    );
    Ok(report)
}

/// One restore's inputs, shared by its steps.
struct Run<'a> {
    repo: &'a Repository,
    opts: &'a RestoreOptions,
    progress: &'a Progress,
    cancel: &'a Cancel,
    log: &'a PhaseLog,
}

/// The target directory as the restore found it before downloading anything.
struct CheckedTarget {
    /// The resolved path.
    dir: PathBuf,
    /// What was there.
    state: staging::TargetState,
}

/// What the plan step settled: the base and segments to restore, the base's descriptor, and
/// the manifest generation they were read from.
struct Planned {
    plan: RestorePlan,
    descriptor: BaseDescriptor,
    generation: u64,
    /// How exact the generation's record times are.
    time_precision: TimeSource,
}

impl Planned {
    fn base_bytes(&self) -> u64 {
        self.descriptor.files.iter().map(|f| f.size).sum()
    }

    /// Logs what the restore is about to download and where its cutoff can fall.
    fn trace(&self) {
        let plan = &self.plan;
        tracing::info!(
            "plan: {} from base {} ({} files, {}) and {} segments ({}), cutoff between \
             sequences {} and {}",
            plan.target,
            plan.base.id,
            self.descriptor.files.len(),
            human_bytes(self.base_bytes()),
            plan.segments.len(),
            human_bytes(plan.segment_bytes()),
            plan.min_seq,
            plan.max_seq
        );
    }
}

impl Run<'_> {
    /// The options make sense and the result can be put in place: the target is missing or
    /// an empty directory, or `--force` (or `--dry-run`) allows anything else that is not a
    /// mount point or a live database. A restore that cannot be put in place is not worth
    /// downloading.
    fn check_target(&self) -> Result<CheckedTarget, RestoreError> {
        let opts = self.opts;
        if opts.parallelism == 0 {
            return Err(RestoreError::Usage(
                "--parallelism must be at least 1".to_owned(),
            ));
        }
        let dir = staging::resolve_target(&opts.target_dir)?;
        let state = staging::inspect(&dir)?;
        staging::check_not_mount_point(&dir)?;
        if !state.is_free() {
            if let staging::TargetState::NotEmpty { entries } = state
                && !opts.force
                && !opts.dry_run
            {
                return Err(RestoreError::TargetNotEmpty { path: dir, entries });
            }
            if !opts.force && !opts.dry_run {
                return Err(RestoreError::Usage(format!(
                    "the target {} is not a directory; pass --force to move it aside",
                    dir.display()
                )));
            }
            staging::check_not_locked(&dir)?;
        }
        Ok(CheckedTarget { dir, state })
    }

    /// Plans from `state`: the target is inside the restorable window, the plan's chain holds
    /// together, and the base's descriptor belongs to this repository's database and lists
    /// only well-formed file names. Returns the plan and the report so far.
    async fn plan(
        &self,
        state: &RepoState,
        target: &CheckedTarget,
    ) -> Result<(Planned, RestoreReport), RestoreError> {
        let plan = state.history.plan(self.opts.target)?;
        replay::check_plan(&plan)?;
        let generation = state.generation.as_ref().ok_or_else(|| {
            RestoreError::Integrity(
                "the repository lists bases but has no manifest generation".into(),
            )
        })?;
        let descriptor = match self.repo.read_base(generation.generation, &plan.base).await {
            Ok(d) => d,
            Err(e) => return Err(explain_missing(self.repo, generation.generation, e.into()).await),
        };
        check_descriptor(&plan, &descriptor, &state.config.database_identity)?;
        fetch::check_base_files(&descriptor.files)?;
        let planned = Planned {
            plan,
            descriptor,
            generation: generation.generation,
            time_precision: generation.time_precision,
        };
        let mut report = RestoreReport::planned(self.opts, self.repo, target, &planned);
        // What loading passed over (a corrupt generation, a stale hint) stays in the report.
        report
            .warnings
            .extend(state.warnings.iter().map(|w| match &w.object {
                Some(o) => format!("{o}: {}", w.message),
                None => w.message.clone(),
            }));
        if matches!(self.opts.target, Target::Time(_))
            && generation.time_precision != TimeSource::Marker
        {
            report
                .notes
                .push(super::list::precision_note(Some(generation.time_precision)).to_owned());
        }
        Ok((planned, report))
    }

    /// Fetch and replay, run together into `staging`: the base's files download while the
    /// segments download and are replayed in order, each object checked against its sha256
    /// before it is used. Every task has ended when this returns. On failure the error is the
    /// root cause (not the "interrupted" it caused in the other tasks), with both phases
    /// marked failed and the one it came from first.
    async fn fetch_and_replay(
        &self,
        planned: &Planned,
        staging: &Staging,
        durations: &mut Durations,
    ) -> Result<(ReplayOutcome, Option<BaseCheck>), RestoreError> {
        let plan = &planned.plan;
        let phase_cancel = self.cancel.child();
        let permits = Permits::split(self.opts.parallelism);
        let progress = self.progress;
        let base_bar = progress.phase("base files", planned.base_bytes(), Unit::Bytes);
        let wal_bar = progress.phase("WAL download", plan.segment_bytes(), Unit::Bytes);
        let records_planned: u64 = plan
            .segments
            .iter()
            .map(|s| u64::from(s.record_count))
            .sum();
        let replay_bar = progress.phase("replay", records_planned, Unit::Records);

        let base_fut = self.fetch_and_check_base(
            planned,
            staging,
            permits.base.clone(),
            phase_cancel.clone(),
            base_bar.clone(),
        );
        let (tx, rx) = mpsc::channel::<FetchedSegment>(2);
        let job = SegmentFetch {
            repo: self.repo.clone(),
            entries: plan.segments.clone(),
            scratch: staging.scratch().to_path_buf(),
            limit: permits.wal.clone(),
            window: self.opts.parallelism,
            cancel: phase_cancel.clone(),
            bar: wal_bar.clone(),
        };
        let seg_fut = timed_fetch(fetch::fetch_segments(job, tx), phase_cancel.clone());
        let mut replayer = Replayer::new(plan, &wal_dir(staging)?, &planned.descriptor.files);
        if self.opts.verify.checks_wal() {
            replayer = replayer.with_check(WalCheck::new(&plan.base, phase_cancel.clone()));
        }
        let consumer = spawn_replay(
            replayer,
            (rx, plan.segments.len()),
            phase_cancel.clone(),
            replay_bar.clone(),
        );
        let wal_started = Instant::now();
        let (((base_result, base_time), base_check), (seg_result, seg_time), consumed) =
            tokio::join!(base_fut, seg_fut, consumer);
        let (consumed, replay_time) = consumed.expect("the replay task does not panic");
        durations.fetch_base = ms(base_time);
        durations.fetch_wal = ms(seg_time);
        durations.replay = ms(replay_time);
        durations.fetch_and_replay_wal = ms(wal_started.elapsed());
        self.log.end(Phase::Fetch, Some(base_time.max(seg_time)));
        self.log.end(Phase::Replay, Some(replay_time));
        let (base_check, check_error) = match base_check {
            Some(Ok(c)) => (Some(c), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let errors = [base_result.err(), seg_result.err(), check_error];
        let outcome = match pick_error(errors, consumed) {
            Ok(outcome) => outcome,
            Err((phase, e)) => {
                let e = explain_missing(self.repo, planned.generation, e).await;
                for bar in [&base_bar, &wal_bar, &replay_bar] {
                    bar.abandon();
                }
                self.log_failure(phase);
                return Err(e);
            }
        };
        base_bar.finish("verified");
        wal_bar.set_total(wal_bar.done());
        wal_bar.finish("verified");
        replay_bar.set_total(replay_bar.done());
        replay_bar.finish(format!("up to sequence {}", outcome.cutoff_seq));
        trace_outcome(&outcome);
        Ok((outcome, base_check))
    }

    /// Downloads the base's files into the staging directory, then, for `--verify standard`
    /// or `quick`, opens them alone ([`Run::check_base`]) while the WAL is still being
    /// downloaded and written beside them. Returns the download's result and time, and the
    /// check's result if it ran.
    async fn fetch_and_check_base(
        &self,
        planned: &Planned,
        staging: &Staging,
        limit: Arc<Semaphore>,
        cancel: Cancel,
        bar: PhaseBar,
    ) -> (
        (Result<u64, RestoreError>, Duration),
        Option<Result<BaseCheck, RestoreError>>,
    ) {
        let files = planned.descriptor.files.clone();
        let store = self.repo.store().clone();
        let dir = staging.dir().to_path_buf();
        // Written around the page cache unless the verification reads every table back.
        let uncached = !self.opts.verify.reads_tables();
        let fetch =
            fetch::fetch_base_files(store, files, dir, uncached, limit, cancel.clone(), bar);
        let (fetched, took) = timed_fetch(fetch, cancel.clone()).await;
        let check = match fetched {
            Ok(_) if self.opts.verify.checks_base() => {
                Some(self.check_base(planned, staging, cancel).await)
            }
            _ => None,
        };
        ((fetched, took), check)
    }

    /// Fetch, replay and the checks beside them run together: when one fails, the others are
    /// stopped by it. `root` is the phase the failure came from.
    fn log_failure(&self, root: Phase) {
        if root == Phase::Verify {
            self.log.start(Phase::Verify);
        }
        self.log.fail(root);
        self.log.fail(Phase::Fetch);
        self.log.fail(Phase::Replay);
    }

    /// The base's files, once downloaded, opened alone (`--verify standard` or `quick`), on a
    /// blocking thread while the WAL is still being downloaded and written beside them. A
    /// failure cancels `cancel`.
    async fn check_base(
        &self,
        planned: &Planned,
        staging: &Staging,
        cancel: Cancel,
    ) -> Result<BaseCheck, RestoreError> {
        let dir = staging.dir().to_path_buf();
        let log_dir = verify::log_dir_in(staging.scratch())?;
        let d = &planned.descriptor;
        let expect = BaseExpect {
            earliest_seq: planned.plan.base.earliest_seq,
            min_log_number: d.min_log_number,
            column_families: d.column_families.iter().map(|c| c.name.clone()).collect(),
        };
        let exact = self.opts.verify == VerifyMode::Standard;
        let (progress, c) = (self.progress.clone(), cancel.clone());
        let result = tokio::task::spawn_blocking(move || {
            verify::base::check_base(&dir, &expect, exact, &log_dir, &progress, &c)
        })
        .await
        .expect("verification does not panic");
        if result.is_err() {
            cancel.cancel();
        }
        result
    }

    /// Verify, before anything is put in place: the re-created WAL files join the base's in
    /// the staging directory, then the checks of `--verify` that did not already run beside
    /// the download are done and the result of every step is reported (a check that could
    /// not be done is a warning in the report, never a pass).
    async fn verify(
        &self,
        staging: &Staging,
        outcome: &ReplayOutcome,
        base: Option<BaseCheck>,
        report: &mut RestoreReport,
    ) -> Result<(), RestoreError> {
        self.cancel.check()?;
        self.log.start(Phase::Verify);
        let verify_started = Instant::now();
        let options = verify::read_options(staging.dir());
        if let Some(o) = &options {
            report.warnings.extend(verify::options_warnings(o));
            report
                .warnings
                .extend(verify::path_option_warnings(o, &self.opts.target_dir));
        }
        replay::place_wal_files(&wal_dir(staging)?, staging.dir(), &outcome.wal_files)?;
        if let Some(w) = &outcome.wal_check {
            verify::wal::check_placed(staging.dir(), w)?;
        }
        let earlier = base.as_ref().map_or(0, |b| b.duration_ms)
            + outcome.wal_check.as_ref().map_or(0, |w| w.duration_ms);
        let steps = VerifySteps {
            base,
            wal: outcome.wal_check.clone(),
            open: None,
        };
        let verification = self.finish_verification(staging, outcome.cutoff_seq, steps, report);
        let mut verification = verification.await?;
        verification.duration_ms += earlier;
        if verification.status == VerificationStatus::Skipped {
            report.warnings.push(format!(
                "the restored database was not verified: {}",
                verification.reason.as_deref().unwrap_or("no reason given")
            ));
        }
        report.verification = Some(verification);
        let took = verify_started.elapsed() + Duration::from_millis(earlier);
        report.durations_ms.verify = ms(took);
        self.log.end(Phase::Verify, Some(took));
        Ok(())
    }

    /// The last step of `--verify` (with `full`, the whole result opened read-only) and the
    /// verification from all its steps.
    async fn finish_verification(
        &self,
        staging: &Staging,
        cutoff: u64,
        mut steps: VerifySteps,
        report: &RestoreReport,
    ) -> Result<Verification, RestoreError> {
        let started = Instant::now();
        let level = self.opts.verify;
        if level == VerifyMode::Off {
            return Ok(Verification::off(cutoff));
        }
        let mut column_families = Vec::new();
        if level == VerifyMode::Full {
            let dir = staging.dir().to_path_buf();
            let log_dir = verify::log_dir_in(staging.scratch())?;
            let cf_names = report.base.column_families.clone();
            let (progress, cancel) = (self.progress.clone(), self.cancel.clone());
            let (open, cfs) = tokio::task::spawn_blocking(move || {
                verify::open_whole(&dir, cutoff, &cf_names, &log_dir, &progress, &cancel)
            })
            .await
            .expect("verification does not panic")?;
            steps.open = Some(open);
            column_families = cfs;
        }
        let took = ms(started.elapsed());
        Verification::from_steps(level, cutoff, steps, column_families, took)
    }

    /// Puts the verified result in place: the standby marker (when asked) and `origin` are
    /// written into it (durably, the origin last), the old target (with `--force`) is renamed aside, then the
    /// staging directory is renamed to the target. Nothing is deleted.
    async fn commit(
        &self,
        staging: Staging,
        origin: Origin,
        report: &mut RestoreReport,
    ) -> Result<(), RestoreError> {
        self.cancel.check()?;
        self.log.start(Phase::Commit);
        let commit_started = Instant::now();
        let force = self.opts.force;
        let standby = self.opts.standby.then(|| report.repository.clone());
        let (moved, origin) = tokio::task::spawn_blocking(move || {
            if let Some(repository) = standby {
                super::follow::write_standby_marker(staging.dir(), &repository)?;
            }
            origin.write(staging.dir())?;
            Ok::<_, RestoreError>((staging.commit(force)?, origin))
        })
        .await
        .expect("the commit does not panic")?;
        report.moved_aside = moved;
        report.origin = Some(origin);
        report.durations_ms.commit = ms(commit_started.elapsed());
        self.log.end(Phase::Commit, None);
        Ok(())
    }
}

impl RestoreReport {
    /// The report of a planned restore: what will be downloaded, nothing done yet.
    fn planned(
        opts: &RestoreOptions,
        repo: &Repository,
        target: &CheckedTarget,
        planned: &Planned,
    ) -> RestoreReport {
        let (plan, descriptor) = (&planned.plan, &planned.descriptor);
        let base_bytes = planned.base_bytes();
        let seg_bytes = plan.segment_bytes();
        RestoreReport {
            dry_run: opts.dry_run,
            repository: repo.location(),
            target_dir: target.dir.clone(),
            target: opts.target,
            target_before: target.state.describe(),
            time_precision: Some(planned.time_precision),
            base: BaseReport {
                id: plan.base.id.clone(),
                created_at: plan.base.created_at,
                earliest_seq: plan.base.earliest_seq,
                earliest_time: plan.base.earliest_time,
                min_log_number: plan.base.min_log_number,
                replay_from_seq: plan.base.replay_from_seq,
                files: descriptor.files.len(),
                bytes: base_bytes,
                column_families: descriptor
                    .column_families
                    .iter()
                    .map(|c| c.name.clone())
                    .collect(),
            },
            planned_min_seq: plan.min_seq,
            planned_max_seq: plan.max_seq,
            segments: SegmentsReport {
                planned: plan.segments.len(),
                planned_bytes: seg_bytes,
                first_seq: plan.segments.first().map(|s| s.first_seq),
                last_seq: plan.segments.last().map(|s| s.last_seq),
                read: 0,
            },
            download_bytes: base_bytes + seg_bytes,
            cutoff: None,
            replay: None,
            verification: None,
            moved_aside: None,
            origin: None,
            warnings: Vec::new(),
            notes: Vec::new(),
            durations_ms: Durations::default(),
        }
    }

    /// Where the replay ended and what it wrote; returns the cutoff.
    fn record_replay(&mut self, outcome: &ReplayOutcome, plan: &RestorePlan) -> CutoffReport {
        self.segments.read = outcome.segments_read;
        let cutoff = CutoffReport {
            seq: outcome.cutoff_seq,
            time: outcome
                .last_record
                .map_or(plan.base.earliest_time, |r| r.time),
            last_record: outcome.last_record,
            next_record: outcome.first_refused,
            rounded_down: outcome.rounded_down,
        };
        self.cutoff = Some(cutoff.clone());
        self.replay = Some(ReplayReport {
            records_replayed: outcome.records_replayed,
            records_skipped: outcome.records_skipped,
            wal_bytes: outcome.wal_files.iter().map(|w| w.bytes).sum(),
            wal_files: outcome.wal_files.clone(),
        });
        cutoff
    }
}

/// Where the re-created WAL files are written until they join the base's files: beside the
/// staging directory, on the same file system.
fn wal_dir(staging: &Staging) -> Result<PathBuf, RestoreError> {
    let dir = staging.scratch().join("wal");
    std::fs::create_dir_all(&dir).map_err(|e| RestoreError::io("cannot create", &dir, e))?;
    Ok(dir)
}

/// Runs a download, timing it; a failed download cancels `cancel` so that the tasks running
/// beside it stop.
async fn timed_fetch<T>(
    fetch: impl Future<Output = Result<T, RestoreError>>,
    cancel: Cancel,
) -> (Result<T, RestoreError>, Duration) {
    let t = Instant::now();
    let r = fetch.await;
    if r.is_err() {
        cancel.cancel();
    }
    (r, t.elapsed())
}

/// Replays the segments `rx` delivers, in order, on a blocking thread, until the cutoff is
/// reached or every segment was read; then stops the downloads and finishes the WAL files.
/// Each segment file is removed once replayed. A failure cancels `cancel`. Returns the
/// outcome and the time spent replaying (not waiting for downloads).
/// Replays the segments `rx` delivers, `planned` of them unless the cutoff comes first.
fn spawn_replay(
    mut replayer: Replayer,
    (mut rx, planned): (mpsc::Receiver<FetchedSegment>, usize),
    cancel: Cancel,
    bar: PhaseBar,
) -> tokio::task::JoinHandle<(Result<ReplayOutcome, RestoreError>, Duration)> {
    tokio::task::spawn_blocking(move || {
        let mut busy = Duration::ZERO;
        let result = (|| {
            let mut received = 0usize;
            while let Some(seg) = rx.blocking_recv() {
                received += 1;
                let t = Instant::now();
                let more = replayer.replay_segment(&seg.entry, &seg.path, &cancel, &bar);
                let _ = std::fs::remove_file(&seg.path);
                busy += t.elapsed();
                if !more? {
                    break;
                }
            }
            // The cutoff is reached (or every segment was read): stop the downloads.
            rx.close();
            if received < planned && !replayer.is_done() {
                // The downloads stopped early; their error says why, not a short chain.
                return Err(RestoreError::Interrupted);
            }
            let t = Instant::now();
            let outcome = replayer.finish();
            busy += t.elapsed();
            outcome
        })();
        if result.is_err() {
            cancel.cancel();
        }
        (result, busy)
    })
}

/// Logs where the replay ended (and that a `--seq` target inside a batch was rounded down).
fn trace_outcome(outcome: &ReplayOutcome) {
    if let Some(r) = &outcome.rounded_down {
        tracing::warn!(
            "sequence {} is inside the batch {}..={}; restored to {}, the end of the batch \
             before it (a batch is applied whole or not at all)",
            r.requested,
            r.batch_first_seq,
            r.batch_last_seq,
            r.restored_to
        );
    }
    tracing::info!(
        "replayed {} records into {} WAL files; the restored database ends at sequence {}",
        outcome.records_replayed,
        outcome.wal_files.len(),
        outcome.cutoff_seq
    );
}

/// An object the plan needs is missing: when the repository was pruned since the restore
/// planned from generation `planned` (a grace period shorter than the restore), says so
/// instead of reporting a missing object. Any other error is returned as it is.
async fn explain_missing(repo: &Repository, planned: u64, e: RestoreError) -> RestoreError {
    if !e.is_missing_object() {
        return e;
    }
    let Some(key) = e.object() else {
        return e;
    };
    match repo.pruned_since(planned, &key).await {
        Ok(Some(why)) => RestoreError::PrunedDuringRestore { key, why },
        Ok(None) => e,
        Err(check) => {
            tracing::debug!(error = %check, "cannot tell whether the repository was pruned");
            e
        }
    }
}

/// The error to report when several phases failed: the root cause, not an "interrupted"
/// that another phase's failure caused, with the phase it came from. `errors` are the base
/// download's, the segment downloads' and the base check's; a verification error from the
/// replay (reading a WAL file back) is the verify phase's.
fn pick_error<T>(
    errors: [Option<RestoreError>; 3],
    replay: Result<T, RestoreError>,
) -> Result<T, (Phase, RestoreError)> {
    let [base, segments, check] = errors;
    let replay_err = match replay {
        Ok(v) if base.is_none() && segments.is_none() && check.is_none() => return Ok(v),
        Ok(_) => None,
        Err(e) => Some(e),
    };
    let replay_phase = match replay_err {
        Some(RestoreError::Verification(_)) => Phase::Verify,
        _ => Phase::Replay,
    };
    let mut errors: Vec<(Phase, RestoreError)> = [
        (Phase::Fetch, base),
        (Phase::Fetch, segments),
        (replay_phase, replay_err),
        (Phase::Verify, check),
    ]
    .into_iter()
    .filter_map(|(phase, e)| e.map(|e| (phase, e)))
    .collect();
    let root = errors
        .iter()
        .position(|(_, e)| !matches!(e, RestoreError::Interrupted))
        .unwrap_or(0);
    Err(errors.swap_remove(root))
}

/// The descriptor must belong to this repository's database and agree with the summary.
fn check_descriptor(
    plan: &RestorePlan,
    d: &BaseDescriptor,
    database_identity: &str,
) -> Result<(), RestoreError> {
    if d.database_identity != database_identity {
        return Err(RestoreError::Integrity(format!(
            "{}: base {} belongs to database {}, the repository to {}",
            plan.base.descriptor.key, d.id, d.database_identity, database_identity
        )));
    }
    let mut summary: Vec<(u32, &str)> = plan
        .base
        .column_families
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    let mut described: Vec<(u32, &str)> = d
        .column_families
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    summary.sort_unstable();
    described.sort_unstable();
    if summary != described {
        return Err(RestoreError::Integrity(format!(
            "{}: the column families of base {} ({described:?}) differ from the manifest's \
             ({summary:?})",
            plan.base.descriptor.key, d.id
        )));
    }
    Ok(())
}

impl RestoreReport {
    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_plan(&mut out);
        if self.dry_run {
            self.render_dry_run(&mut out);
        }
        self.render_cutoff(&mut out);
        self.render_replay(&mut out);
        self.render_verification(&mut out);
        self.render_outcome(&mut out);
        out
    }

    /// What was (or would be) restored: the target, the base and the WAL segments.
    fn render_plan(&self, w: &mut String) {
        let target = self.target.describe();
        if self.dry_run {
            let _ = writeln!(
                w,
                "Dry run: nothing was written. A restore of {} to {}",
                self.repository,
                self.target_dir.display()
            );
        } else {
            let _ = writeln!(
                w,
                "Restored {} to {}",
                self.repository,
                self.target_dir.display()
            );
        }
        let _ = writeln!(w, "  target        {target}");
        let b = &self.base;
        let _ = writeln!(
            w,
            "  base          {} (created {}, restores from sequence {} at {}), {} files, {}",
            b.id,
            short_time(b.created_at),
            b.earliest_seq,
            short_time(b.earliest_time),
            b.files,
            human_bytes(b.bytes)
        );
        let s = &self.segments;
        match (s.first_seq, s.last_seq) {
            (Some(first), Some(last)) => {
                let _ = writeln!(
                    w,
                    "  WAL           {} segments, sequences {first}..={last}, {}",
                    s.planned,
                    human_bytes(s.planned_bytes)
                );
            }
            _ => {
                let _ = writeln!(
                    w,
                    "  WAL           none needed: the base alone is the target"
                );
            }
        }
    }

    /// A dry run's planned cutoff, download and target directory.
    fn render_dry_run(&self, w: &mut String) {
        let cutoff = if self.planned_min_seq == self.planned_max_seq {
            format!("sequence {}", self.planned_max_seq)
        } else {
            format!(
                "between sequences {} and {} (the exact batch is found while replaying)",
                self.planned_min_seq, self.planned_max_seq
            )
        };
        let _ = writeln!(w, "  cutoff        {cutoff}");
        let _ = writeln!(
            w,
            "  download      {} in total",
            human_bytes(self.download_bytes)
        );
        let _ = writeln!(w, "  target dir    {}", self.target_dir.display());
        let _ = writeln!(w, "                {}", self.target_before);
    }

    /// Where the restored database ends.
    fn render_cutoff(&self, w: &mut String) {
        if let Some(c) = &self.cutoff {
            let _ = writeln!(
                w,
                "  cutoff        sequence {}, last record at {}",
                c.seq,
                short_time(c.time)
            );
            if let Some(r) = &c.rounded_down {
                let _ = writeln!(
                    w,
                    "                sequence {} is inside the batch {}..={}: rounded down to {}, \
                     the end of the batch before it",
                    r.requested, r.batch_first_seq, r.batch_last_seq, r.restored_to
                );
            }
            if let Some(n) = &c.next_record {
                let _ = writeln!(
                    w,
                    "                the next record (sequence {}, {}) is not restored",
                    n.seq,
                    short_time(n.time)
                );
            }
        }
    }

    /// What the replay wrote.
    fn render_replay(&self, w: &mut String) {
        if let Some(r) = &self.replay {
            let files = match (r.wal_files.first(), r.wal_files.last()) {
                (Some(a), Some(b)) if r.wal_files.len() > 2 => format!(": {} … {}", a.name, b.name),
                (Some(a), Some(b)) if a != b => format!(": {} {}", a.name, b.name),
                (Some(a), _) => format!(": {}", a.name),
                _ => String::new(),
            };
            let _ = writeln!(
                w,
                "  replay        {} records from {} segments into {} WAL files ({}){files}",
                r.records_replayed,
                self.segments.read,
                r.wal_files.len(),
                human_bytes(r.wal_bytes),
            );
        }
    }

    /// How the result was verified.
    fn render_verification(&self, w: &mut String) {
        if let Some(v) = &self.verification {
            v.render(w);
        }
    }

    /// What was moved aside, how long it took, notes, warnings and what to do next.
    fn render_outcome(&self, w: &mut String) {
        if let Some(p) = &self.moved_aside {
            let _ = writeln!(
                w,
                "  moved aside   the previous contents are in {}",
                p.display()
            );
        }
        let d = &self.durations_ms;
        if !self.dry_run {
            let _ = writeln!(
                w,
                "  took          plan {}, base {}, WAL {}, verify {}, total {}",
                human_duration(Duration::from_millis(d.plan)),
                human_duration(Duration::from_millis(d.fetch_base)),
                human_duration(Duration::from_millis(d.fetch_and_replay_wal)),
                human_duration(Duration::from_millis(d.verify)),
                human_duration(Duration::from_millis(d.total))
            );
        }
        for n in &self.notes {
            let _ = writeln!(w, "Note: {n}");
        }
        for warning in &self.warnings {
            let _ = writeln!(w, "WARNING: {warning}");
        }
        if let Some(o) = &self.origin {
            let _ = writeln!(
                w,
                "  origin        {ORIGIN_FILE}: lineage {}, restored from {} (lineage {}) at \
                 sequence {}",
                o.lineage, o.parent.repository, o.parent.lineage, o.parent.sequence
            );
        }
        if !self.dry_run {
            let _ = writeln!(
                w,
                "Open the database with the application's own options: RocksDB replays the \
                 WAL files on the first open. It is a new history: archive it to a new \
                 repository URL (the archiver refuses this one, and the new repository names \
                 it as its parent)."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::model::{
        BaseColumnFamily, BaseFile, BaseSummary, ColumnFamily, FORMAT_VERSION, Generation,
        ObjectRef, Retention, SegmentEntry, Writer, time_from_micros,
    };

    fn fixtures() -> (RestorePlan, BaseDescriptor, Generation) {
        let t = time_from_micros(1_800_000_000_000_000);
        let base = BaseSummary {
            id: "b1".into(),
            created_at: t,
            descriptor: ObjectRef {
                key: "bases/b1/base.json".into(),
                size: 1,
                sha256: "00".into(),
            },
            min_log_number: 4,
            replay_from_seq: 1,
            earliest_seq: 10,
            earliest_time: t,
            column_families: vec![ColumnFamily {
                id: 0,
                name: "default".into(),
            }],
            total_size: 1,
        };
        let segment = SegmentEntry {
            key: "wal/0000000000000001.seg".into(),
            first_seq: 1,
            last_seq: 20,
            record_count: 3,
            first_time: t,
            last_time: t,
            time_source: TimeSource::Observed,
            first_log: 4,
            last_log: 4,
            raw_size: 1,
            stored_size: 1,
            sha256: None,
        };
        let plan = RestorePlan {
            target: Target::Latest,
            base: base.clone(),
            segments: vec![segment],
            max_seq: 20,
            min_seq: 20,
        };
        let descriptor = BaseDescriptor {
            format_version: FORMAT_VERSION,
            id: "b1".into(),
            created_at: t,
            database_identity: "db-1".into(),
            min_log_number: 4,
            replay_from_seq: 1,
            earliest_seq: 10,
            earliest_time: t,
            next_file_number: 9,
            column_families: vec![BaseColumnFamily {
                id: 0,
                name: "default".into(),
                log_number: 4,
            }],
            files: vec![BaseFile {
                name: "000007.sst".into(),
                size: 1,
                sha256: "ab".into(),
                key: "sst/ab".into(),
            }],
        };
        let generation = Generation {
            format_version: FORMAT_VERSION,
            generation: 3,
            repository_id: "r".into(),
            written_at: t,
            writer: Writer {
                host: "h".into(),
                pid: 1,
                version: "0".into(),
            },
            time_precision: TimeSource::Observed,
            bases: vec![base],
            index_pages: vec![],
            tail_start_seq: 1,
            gaps: vec![],
            retention: Retention::default(),
        };
        (plan, descriptor, generation)
    }

    #[test]
    fn a_descriptor_of_another_database_or_other_column_families_is_refused() {
        let (plan, mut d, _) = fixtures();
        check_descriptor(&plan, &d, "db-1").unwrap();
        let e = check_descriptor(&plan, &d, "db-2").unwrap_err();
        assert!(e.to_string().contains("belongs to database db-1"), "{e}");
        d.column_families[0].name = "users".into();
        let e = check_descriptor(&plan, &d, "db-1").unwrap_err();
        assert!(e.to_string().contains("column families"), "{e}");
    }

    #[test]
    fn the_root_cause_wins_over_interruptions() {
        let (phase, e) = pick_error::<()>(
            [
                Some(RestoreError::Interrupted),
                Some(RestoreError::Integrity("wal/x.seg is corrupt".into())),
                None,
            ],
            Err(RestoreError::Interrupted),
        )
        .unwrap_err();
        assert!(e.to_string().contains("wal/x.seg"), "{e}");
        assert_eq!(phase, Phase::Fetch);
        // A download failure is never hidden by a replay that finished with what it got.
        let (phase, e) = pick_error(
            [None, Some(RestoreError::Integrity("missing".into())), None],
            Ok(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing"));
        assert_eq!(phase, Phase::Fetch);
        assert_eq!(pick_error::<u8>([None, None, None], Ok(5)).unwrap(), 5);
        let (phase, e) =
            pick_error::<()>([None, None, None], Err(RestoreError::Interrupted)).unwrap_err();
        assert!(matches!(e, RestoreError::Interrupted));
        assert_eq!(phase, Phase::Replay);
        let (phase, _) = pick_error::<()>(
            [Some(RestoreError::Interrupted), None, None],
            Err(RestoreError::Integrity("record hole".into())),
        )
        .unwrap_err();
        assert_eq!(phase, Phase::Replay);
    }

    #[test]
    fn the_phase_log_says_where_a_restore_failed() {
        let log = PhaseLog::new();
        log.start(Phase::Plan);
        log.end(Phase::Plan, None);
        log.start(Phase::Fetch);
        log.start(Phase::Replay);
        log.end(Phase::Fetch, Some(Duration::from_millis(1500)));
        log.end(Phase::Replay, Some(Duration::from_millis(300)));
        log.fail(Phase::Fetch);
        assert_eq!(log.failed(), Some(Phase::Fetch));
        assert_eq!(log.entries()[2].status, PhaseStatus::Passed);
        log.fail(Phase::Replay);
        assert_eq!(
            log.failed(),
            Some(Phase::Fetch),
            "the first failure is the root"
        );
        let entries = log.entries();
        let status: Vec<(Phase, PhaseStatus)> =
            entries.iter().map(|e| (e.phase, e.status)).collect();
        assert_eq!(
            status,
            [
                (Phase::Plan, PhaseStatus::Passed),
                (Phase::Fetch, PhaseStatus::Failed),
                (Phase::Replay, PhaseStatus::Failed),
            ]
        );
        assert_eq!(entries[1].duration_ms, 1500);
        assert_eq!(entries[2].duration_ms, 300);

        // An error returned from inside a phase fails the phases still running.
        let log = PhaseLog::new();
        log.start(Phase::Plan);
        log.end(Phase::Plan, None);
        log.start(Phase::Verify);
        assert_eq!(log.entries()[1].status, PhaseStatus::Running);
        assert_eq!(log.failed(), None);
        log.fail_running();
        assert_eq!(log.failed(), Some(Phase::Verify));
        assert_eq!(log.entries()[0].status, PhaseStatus::Passed);
    }
}
