//! The archiving pipeline: watch → follow → ship → checkpoint.
//!
//! One [`Pipeline::step`] reads what the WAL holds now ([`crate::follow`], woken by
//! [`crate::watch`]), packs the records into segments and uploads them ([`crate::ship`]),
//! and records uploaded segments, gaps and bases in manifest generations
//! ([`crate::checkpoint`]). Beside it the pipeline keeps the recent (sequence, time) pairs a
//! base backup asks for, and the column-family watch.
//!
//! A store that fails for now is ridden out: a segment upload or a generation write that
//! fails is kept and retried later with a backoff, the WAL staying on the database's disk
//! meanwhile. Two changes come before any segment after them (FORMAT.md §4.5 rule 4): the
//! first generation of a new repository, and a missing-WAL gap. Until the generation holding
//! one is written, no later segment is uploaded and nothing more is read.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_manifest::model::{Gap, GapKind, Generation, time_from_micros};
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use tidemark_manifest::segment::{Record, SegmentReader};
use tidemark_manifest::store::StoreError;
use time::OffsetDateTime;

use super::cf_watch::{AfterBase, CfWatch};
use super::replay::ReplayTrigger;
use super::{RunSummary, ServiceError};
use crate::base::{BaseResult, Observed, ObservedTimeFn};
use crate::checkpoint::{CheckpointManager, CheckpointOptions};
use crate::config::ArchiverOptions;
use crate::follow::{FollowEvent, StartPosition, WalFollower};
use crate::metrics::Metrics;
use crate::ship::{ShipError, ShipOptions, Shipper};
use crate::watch::Watcher;

use super::catch_up::{CATCH_UP_BACKLOG, CatchUp};
use super::reader::WalReader;

/// What one step found that the owners beside the pipeline act on.
#[derive(Debug, Default)]
pub struct Step {
    /// The WAL was read to its end.
    pub caught_up: bool,
    /// A gap was found: a base backup is needed at once.
    pub gap: bool,
    /// Column families were created or dropped since the newest base: a base is needed.
    pub cf_changed: bool,
}

/// Follow → ship → checkpoint, for one database and repository. The service drives it;
/// tests that need a repository written step by step drive it the same way.
pub struct Pipeline {
    /// The follower, polled on blocking threads (one poll ahead while catching up).
    reader: WalReader,
    watcher: Watcher,
    shipper: Shipper,
    checkpoint: CheckpointManager,
    times: Arc<Mutex<RecentTimes>>,
    cf_watch: CfWatch,
    /// The sequence the next record must have (`None` before the first record ever).
    expected: Option<u64>,
    upload_retry: Backoff,
    manifest_retry: Backoff,
    summary: RunSummary,
    metrics: Arc<Metrics>,
    /// While a segment is open, changes to the WAL are read at most this often: the
    /// records only have to be in the segment by its close, which reads them anyway.
    coalesce: Duration,
    /// When the WAL was last read.
    read_at: Option<Instant>,
    /// Read every change at once (no gathering): while a base backup runs, whose
    /// `earliest_time` is the time the follower gives its earliest record.
    prompt: bool,
    /// The WAL a restore of the newest point replays, fed with what is shipped.
    replay: ReplayTrigger,
    /// Whether the reads meet a backlog.
    catch_up: CatchUp,
}

/// The longest changes to the WAL wait to be read while a segment is open.
pub const MAX_COALESCE: Duration = Duration::from_millis(100);

/// How long changes to the WAL may wait to be read while a segment is open: 100 ms, or the
/// sync interval when it is shorter (the segment's close reads them anyway). A record's
/// observed time (its upper bound) is later than its commit by at most this much more than
/// without waiting, whatever the interval. A shorter window buys no lag: a record is in
/// the segment open when it is read, and that segment closes at its due time either way.
pub fn coalesce_window(sync_interval: Duration) -> Duration {
    sync_interval.min(MAX_COALESCE)
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("expected", &self.expected)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Continues the repository's history right after its last archived record.
    pub async fn resume(
        repo: &Repository,
        wal_dir: &Path,
        scratch: &Path,
        opts: &ArchiverOptions,
        state: &RepoState,
        metrics: &Arc<Metrics>,
    ) -> Result<Pipeline, ServiceError> {
        let (start, min_time) = resume_position(repo, state, scratch).await?;
        // With no segment yet but a generation, nothing before its tail start belongs to
        // the history (the first record ever read set it).
        let history_start = state.next_seq();
        tracing::info!(
            generation = state.generation.as_ref().map_or(0, |g| g.generation),
            segments = state.history.segments.len(),
            bases = state.history.bases.len(),
            next_seq = ?history_start,
            start = ?start,
            "resuming"
        );
        let mut follower = WalFollower::new(wal_dir, start)?;
        if let Some(t) = min_time {
            follower = follower.with_min_time(t);
        }
        let ship = ShipOptions {
            sync_interval: opts.sync_interval,
            max_segment_bytes: opts.max_segment_bytes,
            zstd_level: opts.zstd_level,
            catch_up_zstd_level: opts.catch_up_zstd_level,
        };
        let checkpoint = CheckpointOptions {
            interval: opts.checkpoint_interval,
            ..CheckpointOptions::default()
        };
        let mut times = RecentTimes::default();
        if let (Some(t), Some(next)) = (min_time, history_start) {
            // A base taken before anything new is read restores to the last archived
            // record: its time is known from the repository, not from this process's reading.
            times.push(next.saturating_sub(1), next, t);
        }
        let newest_base_seq = state.history.bases.iter().map(|b| b.earliest_seq).max();
        let pipeline = Pipeline {
            reader: WalReader::new(follower),
            watcher: Watcher::new(wal_dir, opts.poll_interval)?,
            shipper: Shipper::new(repo.clone(), ship).with_metrics(Arc::clone(metrics)),
            checkpoint: CheckpointManager::new(repo.clone(), state, checkpoint)
                .with_metrics(Arc::clone(metrics)),
            times: Arc::new(Mutex::new(times)),
            cf_watch: CfWatch::new(&opts.db, newest_base_seq.unwrap_or(0)),
            expected: history_start,
            upload_retry: Backoff::new(),
            manifest_retry: Backoff::new(),
            summary: RunSummary {
                last_seq: history_start.map(|s| s.saturating_sub(1)),
                ..RunSummary::default()
            },
            metrics: Arc::clone(metrics),
            coalesce: coalesce_window(opts.sync_interval),
            read_at: None,
            prompt: false,
            replay: ReplayTrigger::new(
                opts,
                &state.history.bases,
                &state.history.segments,
                metrics,
            ),
            catch_up: CatchUp::default(),
        };
        metrics.resumed(
            pipeline.summary.last_seq,
            min_time,
            pipeline.checkpoint.current().generation,
            &state.history.bases,
        );
        Ok(pipeline)
    }

    /// One round: read what is new, ship a due segment (or retry one), write a generation
    /// when one is due.
    pub async fn step(&mut self) -> Result<Step, ServiceError> {
        let mut step = Step::default();
        let collected = self.shipper.collect().await;
        self.shipped(collected)?;
        if self.reading() {
            step = self.read().await?;
        }
        step.cf_changed = self.cf_watch.observe(
            self.checkpoint.current().bases.last(),
            self.summary.last_seq.unwrap_or(0),
        );
        if (self.shipper.should_close() || self.shipper.upload_failed())
            && self.upload_retry.ready()
        {
            self.ship(false).await?;
        }
        // A generation names only durable segments: one may be written while the next
        // segment uploads, not while an upload fails.
        if self.checkpoint.due() && !self.shipper.upload_failed() && self.manifest_retry.ready() {
            tolerate(
                self.checkpoint.flush().await,
                &mut self.manifest_retry,
                "writing a manifest generation",
            )?;
        }
        Ok(step)
    }

    /// True while the WAL is read: not while a closed segment whose upload failed, or a
    /// generation segments depend on, still waits for the store. (While an upload runs, the
    /// next segment is read.)
    fn reading(&self) -> bool {
        !self.shipper.upload_failed() && !self.checkpoint.segments_must_wait()
    }

    /// True when more of the WAL can be read at once (catching up).
    pub fn more_ready(&self) -> bool {
        self.reading() && self.reader.more_ready()
    }

    /// Resolves when the WAL directory changes (or at the polling interval), never while
    /// nothing would be read; or when a closed segment is finished or its upload ends.
    /// While a segment is open, changes are gathered for the coalescing window after the
    /// last read: a database writing a thousand small batches a second wakes the archiver a
    /// few times per window, not once per batch.
    pub async fn wal_changed(&mut self) {
        let reading = self.reading();
        let quiet = self.quiet_until();
        let watcher = &mut self.watcher;
        let changed = async move {
            if !reading {
                return std::future::pending().await;
            }
            if let Some(at) = quiet {
                tokio::time::sleep_until(at.into()).await;
            }
            watcher.wait().await
        };
        tokio::select! {
            _ = changed => {}
            _ = self.shipper.progressed() => {}
        }
    }

    /// Whether to read every change at once. While a base backup runs this must be on: the
    /// base asks the time of its earliest record from what the follower has read, and a
    /// record read later than the base's `base.json` would be stamped after the time the
    /// base gives it (a time target at the base's own point would then end before it).
    pub fn read_promptly(&mut self, prompt: bool) {
        self.prompt = prompt;
    }

    /// Until when changes to the WAL may wait: only while a segment is open (the first
    /// record of a segment is read at once, as it starts the segment's clock), and never
    /// while reads must be prompt.
    fn quiet_until(&self) -> Option<Instant> {
        if self.prompt {
            return None;
        }
        let read_at = self.read_at?;
        self.shipper.due_at()?;
        Some(read_at + self.coalesce).filter(|at| *at > Instant::now())
    }

    /// The next instant the pipeline has something to do by time.
    pub fn wake_at(&self) -> Option<Instant> {
        [
            self.shipper.due_at(),
            self.checkpoint.due_at(),
            self.upload_retry.at,
            self.manifest_retry.at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Reads one poll of the WAL into the open segment (the next poll starts meanwhile
    /// when this one stopped at its budget).
    async fn read(&mut self) -> Result<Step, ServiceError> {
        let polled = self.reader.next(true).await?;
        self.read_at = Some(Instant::now());
        self.metrics.wal_read();
        let events = polled.events?;
        self.catch_up(&events, polled.more_ready)?;
        let mut step = Step {
            caught_up: events.is_empty(),
            ..Step::default()
        };
        for ev in events {
            match ev {
                FollowEvent::Record(r) => step.gap |= self.record(&r).await?,
                FollowEvent::Gap {
                    expected_seq,
                    found_seq,
                    detail,
                } => {
                    self.record_gap(missing_gap(expected_seq, found_seq, &detail))
                        .await?;
                    self.expected = Some(found_seq);
                    step.gap = true;
                }
                FollowEvent::Rotated { from_log, to_log } => {
                    tracing::debug!(from_log, to_log, "WAL rotated");
                }
            }
        }
        if !polled.more_ready {
            // Only now that its records are in: a base told that a record will never be
            // read while it is still being added would stamp itself with a later time.
            self.times
                .lock()
                .expect("times lock")
                .read_to_end(polled.started);
        }
        Ok(step)
    }

    /// Switches the shipper to the catch-up level, or back, before the records of a read
    /// are added.
    fn catch_up(&mut self, events: &[FollowEvent], more_ready: bool) -> Result<(), ServiceError> {
        let bytes: u64 = events
            .iter()
            .map(|ev| match ev {
                FollowEvent::Record(r) => r.batch.len() as u64,
                _ => 0,
            })
            .sum();
        let on = self.catch_up.read(bytes, more_ready);
        if on != self.shipper.catching_up() {
            self.shipper.set_catching_up(on)?;
            let zstd_level = self.shipper.level();
            if on {
                tracing::info!(
                    zstd_level,
                    backlog_mib = CATCH_UP_BACKLOG >> 20,
                    "catching up: the WAL holds more than was read in a row; compressing \
                     faster until a read reaches its end"
                );
            } else {
                tracing::info!(zstd_level, "caught up with the WAL");
            }
        }
        if on {
            self.metrics.read_catching_up(bytes);
        }
        Ok(())
    }

    /// Adds a record to the open segment; true when a gap before it was found.
    async fn record(&mut self, r: &Record) -> Result<bool, ServiceError> {
        let mut gap = false;
        match self.expected {
            Some(exp) if r.seq < exp => {
                if r.next_seq() > exp {
                    return Err(ServiceError::Diverged {
                        archived: exp - 1,
                        found: r.seq,
                    });
                }
                // Before the history's start: not part of it.
                return Ok(false);
            }
            Some(exp) if r.seq > exp => {
                let gap_found = missing_gap(exp, r.seq, "the WAL continues after a hole");
                self.record_gap(gap_found).await?;
                gap = true;
            }
            Some(_) => {}
            None => tolerate(
                self.checkpoint.ensure_started(r.seq).await,
                &mut self.manifest_retry,
                "writing the first manifest generation",
            )?,
        }
        self.expected = Some(r.next_seq());
        self.times
            .lock()
            .expect("times lock")
            .push(r.seq, r.next_seq(), r.time_us);
        self.shipper.push(r)?;
        self.summary.records += 1;
        if r.count > 0 {
            self.summary.last_seq = Some(r.next_seq() - 1);
        }
        if self.shipper.is_full() && !self.shipper.upload_failed() {
            // Keep memory bounded while catching up: ship full segments now (this waits
            // for the oldest upload when two closed segments are held). A segment due by
            // time is closed by the step, after the whole read is in it: closing it at the
            // first record read after its due time would push the rest of that read, all
            // written before the close, into the next segment, a sync interval later.
            self.ship(false).await?;
        }
        Ok(gap)
    }

    /// Closes the open segment and starts its upload (with `all`, waits until everything
    /// closed is durable), after writing the generation of a change that must come first.
    /// True when that went through; false when the store failed for now (kept, retried
    /// later).
    async fn ship(&mut self, all: bool) -> Result<bool, ServiceError> {
        if self.checkpoint.segments_must_wait() {
            if !self.manifest_retry.ready() {
                return Ok(false);
            }
            tolerate(
                self.checkpoint.flush().await,
                &mut self.manifest_retry,
                "writing the generation that later segments depend on",
            )?;
            if self.checkpoint.segments_must_wait() {
                return Ok(false);
            }
        }
        let shipped = if all {
            self.shipper.ship_all().await
        } else {
            self.shipper.ship().await
        };
        self.shipped(shipped)
    }

    /// Records the segments now durable, and what became of the shipping step.
    fn shipped(&mut self, r: Result<(), ShipError>) -> Result<bool, ServiceError> {
        let durable = self.shipper.take_durable();
        if !durable.is_empty() {
            self.upload_retry.succeeded();
        }
        for e in durable {
            self.summary.segments += 1;
            self.replay.segment_shipped(&e);
            self.checkpoint.segment_uploaded(e);
        }
        match r {
            Ok(()) => Ok(true),
            Err(e) if is_retryable(&e) => {
                let d = self.upload_retry.failed();
                tracing::error!(error = %e, retry_in = ?d, "segment upload failed; will retry");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Ships everything: closes the open segment and waits until every closed segment is
    /// durable. True when they are.
    async fn try_ship(&mut self) -> Result<bool, ServiceError> {
        self.ship(true).await
    }

    /// Ships everything read so far and waits until it is durable, unless an upload or a
    /// generation already waits for a retry. True when the pipeline is then
    /// [`Pipeline::settled`]. An archiver that is behind always has an upload in flight:
    /// retention, which needs a settled pipeline to mark, asks for this instead of waiting
    /// for a quiet moment that never comes.
    pub async fn settle(&mut self) -> Result<bool, ServiceError> {
        if self.shipper.upload_failed() || !self.manifest_retry.ready() {
            return Ok(false);
        }
        Ok(self.try_ship().await? && self.settled())
    }

    /// Ships everything before the gap, then records it. Segments after it wait until the
    /// generation recording it is written.
    async fn record_gap(&mut self, gap: Gap) -> Result<(), ServiceError> {
        tracing::error!(
            first_seq = gap.first_seq,
            last_seq = gap.last_seq,
            detail = %gap.detail,
            "GAP: sequence numbers {}..={} were lost before they could be archived; a new base \
             backup will be taken so that archiving resumes after them",
            gap.first_seq,
            gap.last_seq
        );
        // Everything before the gap must be uploaded before the gap is recorded: keep trying.
        while !self.try_ship().await? {
            let at = [self.upload_retry.at, self.manifest_retry.at]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or_else(Instant::now);
            tokio::time::sleep_until(at.into()).await;
        }
        tolerate(
            self.checkpoint.add_gap(gap).await,
            &mut self.manifest_retry,
            "recording a gap",
        )?;
        self.summary.gaps += 1;
        Ok(())
    }

    /// Records a finished base backup (after shipping the open segment, so that its
    /// generation holds the WAL up to the base's earliest point when it can). True when the
    /// base started before a column family change and another base is needed.
    pub async fn record_base(&mut self, result: BaseResult) -> Result<bool, ServiceError> {
        // A failure here is retried by the next step; the base is recorded regardless.
        let _ = self.try_ship().await;
        let stale = match self.cf_watch.base_taken(&result.summary) {
            AfterBase::Stale => true,
            AfterBase::Current { gap } => {
                self.record_cf_gap(gap).await?;
                false
            }
        };
        self.replay.base_recorded(&result.summary);
        tolerate(
            self.checkpoint.add_base(result.summary).await,
            &mut self.manifest_retry,
            "recording the base backup",
        )?;
        self.summary.bases += 1;
        Ok(stale)
    }

    async fn record_cf_gap(&mut self, gap: Option<Gap>) -> Result<(), ServiceError> {
        if let Some(gap) = gap {
            tolerate(
                self.checkpoint.add_gap(gap).await,
                &mut self.manifest_retry,
                "recording a column family change",
            )?;
            self.summary.gaps += 1;
        }
        Ok(())
    }

    /// At shutdown: ships what is open, records `base` (a base backup that finished in
    /// time) unless column families changed under it, and writes the last generation.
    pub async fn finish(mut self, base: Option<BaseResult>) -> Result<RunSummary, ServiceError> {
        let unshipped = "could not ship the last segment; its records stay in the WAL and are \
                         shipped at the next start";
        match self.try_ship().await {
            Ok(true) => {}
            Ok(false) => tracing::error!("{unshipped}"),
            Err(e) => tracing::error!(error = %e, "{unshipped}"),
        }
        if let Some(result) = base
            && let AfterBase::Current { gap } = self.cf_watch.base_taken(&result.summary)
        {
            self.record_cf_gap(gap).await?;
            self.metrics
                .base_finished(&result.summary, result.stats.duration);
            tolerate(
                self.checkpoint.add_base(result.summary).await,
                &mut self.manifest_retry,
                "recording the base backup",
            )?;
            self.summary.bases += 1;
        }
        if let Err(e) = self.checkpoint.flush().await {
            if !repo_error_is_retryable(&e) {
                return Err(e.into());
            }
            tracing::error!(
                error = %e,
                "could not write the last manifest generation; the uploaded segments are found \
                 by readers all the same, and the next start records them"
            );
        }
        Ok(self.summary)
    }

    /// The newest generation written (or read at start).
    pub fn current(&self) -> &Generation {
        self.checkpoint.current()
    }

    /// The checkpoint manager, for the retention's mark step (its only other writer).
    pub fn checkpoint(&mut self) -> &mut CheckpointManager {
        &mut self.checkpoint
    }

    /// True when nothing waits for the store: the moment for the retention's mark step.
    pub fn settled(&self) -> bool {
        !self.shipper.has_unsent() && self.manifest_retry.ready()
    }

    /// True when a base would restore to the same point as the newest one: nothing was
    /// read past it and nothing waits to be written.
    pub fn nothing_new_since_newest_base(&self) -> bool {
        let newest = self.current().bases.iter().map(|b| b.earliest_seq).max();
        newest.is_some_and(|b| self.summary.last_seq.unwrap_or(0) <= b)
            && !self.checkpoint.has_unwritten()
    }

    /// True when the WAL a restore of the newest point replays is over the bound set
    /// (`max_replay`, `target_recovery_time`): a base is due.
    pub fn replay_due(&self) -> bool {
        self.replay.due()
    }

    /// What the follower knows of the record holding a sequence, for a base's
    /// `earliest_time`.
    pub fn observed_times(&self) -> ObservedTimeFn {
        let times = Arc::clone(&self.times);
        Arc::new(move |seq, since| times.lock().expect("times lock").observed(seq, since))
    }
}

/// The sequences and times of the records read recently, so that a base backup can learn
/// the observed time of its earliest restorable sequence, and how far the follower has read.
#[derive(Debug, Default)]
struct RecentTimes {
    /// (first sequence, next sequence, time) of each record, in order.
    entries: VecDeque<(u64, u64, i64)>,
    /// The largest next sequence of a record read (or archived before this run).
    read_to: u64,
    /// When the last read that reached the end of the WAL started.
    read_to_end_at: Option<Instant>,
}

impl RecentTimes {
    const KEEP: usize = 200_000;

    fn push(&mut self, seq: u64, next_seq: u64, time_us: i64) {
        if self.entries.len() == Self::KEEP {
            self.entries.pop_front();
        }
        self.entries.push_back((seq, next_seq, time_us));
        self.read_to = self.read_to.max(next_seq);
    }

    /// A read that started at `at` reached the end of the WAL.
    fn read_to_end(&mut self, at: Instant) {
        self.read_to_end_at = Some(at);
    }

    /// The record holding `seq`, written before `since`: read (at its time), not read yet,
    /// or never to be read by this run (records after it were read, or a read that started
    /// after `since` reached the end of the WAL without it).
    fn observed(&self, seq: u64, since: Instant) -> Observed {
        if let Some(t) = self.lookup(seq) {
            return Observed::At(time_from_micros(t));
        }
        if seq < self.read_to || self.read_to_end_at.is_some_and(|at| at > since) {
            return Observed::Never;
        }
        Observed::NotYet
    }

    /// The time of the record holding `seq`, if it was read (by this run, and recently).
    fn lookup(&self, seq: u64) -> Option<i64> {
        let i = self.entries.partition_point(|&(_, next, _)| next <= seq);
        let &(first, _, time) = self.entries.get(i)?;
        (first <= seq).then_some(time)
    }
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

/// Whether an error is worth retrying later rather than stopping for.
fn is_retryable(e: &ShipError) -> bool {
    match e {
        ShipError::Repo(RepoError::Store(s)) => {
            !matches!(s, StoreError::Config { .. } | StoreError::InvalidKey { .. })
        }
        _ => false,
    }
}

/// Whether a repository error is the store failing for now (retry later) rather than a
/// reason to stop.
pub(crate) fn repo_error_is_retryable(e: &RepoError) -> bool {
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

fn missing_gap(expected: u64, found: u64, detail: &str) -> Gap {
    Gap {
        first_seq: expected,
        last_seq: found - 1,
        kind: GapKind::MissingWal,
        detected_at: OffsetDateTime::now_utc(),
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;

    use tidemark_manifest::rocks::DbFile;
    use tidemark_manifest::rocks::log::LogWriter;
    use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
    use tidemark_manifest::store::{MemoryStore, StoreOp};

    fn write_wal(dir: &Path, number: u64, batches: &[(u64, u32)]) {
        let path = dir.join(DbFile::Wal(number).file_name().unwrap());
        let mut w = LogWriter::new(File::create(&path).unwrap());
        for &(seq, count) in batches {
            // A write batch header: sequence, count (no operations are needed here).
            let mut b = seq.to_le_bytes().to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            w.add_record(&b).unwrap();
        }
        w.flush().unwrap();
    }

    /// A pipeline with `opts` on a new repository in a memory store that injects faults,
    /// following the WAL directory `dir/wal`: the store, the repository, the pipeline and
    /// that directory.
    async fn pipeline_in(
        dir: &Path,
        opts: ArchiverOptions,
    ) -> (Arc<FaultStore>, Repository, Pipeline, std::path::PathBuf) {
        let wal = dir.join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        let faults = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let repo = Repository::new(faults.clone());
        repo.create_config(&tidemark_manifest::testing::config())
            .await
            .unwrap();
        let state = repo.load().await.unwrap();
        let opts = ArchiverOptions {
            db: wal.clone(),
            ..opts
        };
        let metrics = Arc::new(Metrics::new());
        let p = Pipeline::resume(&repo, &wal, &dir.join("scratch"), &opts, &state, &metrics)
            .await
            .unwrap();
        (faults, repo, p, wal)
    }

    /// Options that close a segment at every record, at once.
    fn one_record_segments() -> ArchiverOptions {
        ArchiverOptions {
            sync_interval: Duration::ZERO,
            max_segment_bytes: 1,
            checkpoint_interval: Duration::from_secs(3600),
            ..ArchiverOptions::default()
        }
    }

    async fn segment_firsts(repo: &Repository) -> Vec<u64> {
        let mut out: Vec<u64> = repo
            .store()
            .list(tidemark_manifest::keys::WAL_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| {
                let name = m.key.strip_prefix("wal/")?.strip_suffix(".seg")?.to_owned();
                u64::from_str_radix(&name, 16)
                    .ok()
                    .or_else(|| name.parse().ok())
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn no_segment_after_a_gap_ships_until_the_generation_recording_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        // One record fills a segment: each is shipped on its own.
        let (faults, repo, mut p, wal) = pipeline_in(dir.path(), one_record_segments()).await;
        write_wal(&wal, 5, &[(1, 1), (2, 1), (3, 1)]);
        p.step().await.unwrap();
        // Uploads end in the background: step until the last one is recorded.
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.shipper.has_unsent() {
            assert!(Instant::now() < deadline, "the uploads never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
            p.step().await.unwrap();
        }
        assert_eq!(segment_firsts(&repo).await, vec![1, 2, 3]);

        // Records 4..=9 are lost; the generation recording that cannot be written for now.
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::PutIfAbsent)
                .key_prefix("manifest/"),
        );
        write_wal(&wal, 6, &[(10, 1), (11, 1)]);
        for _ in 0..15 {
            p.step().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            segment_firsts(&repo).await,
            vec![1, 2, 3],
            "a segment after the gap was uploaded before the gap was recorded"
        );
        assert!(p.current().gaps.is_empty());

        // The store recovers: the gap is recorded, then the segment after it ships.
        faults.clear();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !segment_firsts(&repo).await.contains(&10) {
            assert!(
                Instant::now() < deadline,
                "the segment after the gap never shipped"
            );
            p.step().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(segment_firsts(&repo).await, vec![1, 2, 3, 10]);
        let loaded = repo.load().await.unwrap();
        let g = loaded.generation.unwrap();
        assert_eq!(
            g.gaps
                .iter()
                .map(|g| (g.first_seq, g.last_seq))
                .collect::<Vec<_>>(),
            vec![(4, 9)]
        );
        assert_eq!(
            loaded.history.segments.last().map(|s| s.last_seq),
            Some(11),
            "readers find the segment after the gap"
        );
    }

    /// A segment due by time takes everything the step read, also what was written after
    /// its due time: closing it at the first record read late would send the rest of that
    /// read to the next segment, and hold it a whole sync interval more.
    #[tokio::test]
    async fn a_segment_due_by_time_takes_the_whole_read_that_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ArchiverOptions {
            sync_interval: Duration::from_millis(200),
            checkpoint_interval: Duration::from_secs(3600),
            ..ArchiverOptions::default()
        };
        let (_, repo, mut p, wal) = pipeline_in(dir.path(), opts).await;
        write_wal(&wal, 5, &[(1, 1), (2, 1)]);
        p.step().await.unwrap();
        assert!(!p.shipper.has_unsent(), "the segment is not due yet");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Written after the due time, read by the step that closes the segment.
        write_wal(&wal, 5, &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        p.step().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.shipper.has_unsent() {
            assert!(Instant::now() < deadline, "the upload never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
            p.step().await.unwrap();
        }
        assert_eq!(
            segment_firsts(&repo).await,
            vec![1],
            "records 3 and 4 were read before the close and belong in its segment"
        );
        assert_eq!(p.summary.last_seq, Some(4));
        assert_eq!(p.shipper.due_at(), None, "nothing is left open");
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_upload_in_flight_and_records_it() {
        let dir = tempfile::tempdir().unwrap();
        // One record fills a segment: each is shipped on its own.
        let (faults, repo, mut p, wal) = pipeline_in(dir.path(), one_record_segments()).await;
        // Every segment upload is slow: at shutdown the last ones are still on their way.
        faults.inject(
            FaultRule::new(Fault::Delay(Duration::from_millis(300)))
                .on(StoreOp::PutIfAbsent)
                .key_prefix("wal/"),
        );
        write_wal(&wal, 5, &[(1, 1), (2, 1), (3, 1)]);
        p.step().await.unwrap();
        assert!(p.shipper.has_unsent(), "an upload is in flight");
        assert!(!p.settled());
        let summary = p.finish(None).await.unwrap();
        assert_eq!(summary.segments, 3, "every segment was recorded as durable");
        assert_eq!(segment_firsts(&repo).await, vec![1, 2, 3]);
        let loaded = repo.load().await.unwrap();
        assert_eq!(
            loaded.history.segments.last().map(|s| s.last_seq),
            Some(3),
            "the last generation and the segments hold everything read"
        );
    }

    /// An archiver with a retention run due now (keep the last base, `interval` apart) and
    /// a segment upload in flight that the store delays by `delay`; `settle_limit` bounds
    /// how long a run waits for uploads.
    struct RetentionBehindAnUpload {
        repo: Repository,
        p: Pipeline,
        keeper: crate::lease_keeper::LeaseKeeper,
        retention: super::super::retention::Retention,
    }

    async fn retention_behind_an_upload(
        dir: &Path,
        interval: Duration,
        delay: Duration,
        settle_limit: Option<Duration>,
    ) -> RetentionBehindAnUpload {
        use super::super::retention::Retention;
        use crate::config::PruneOptions;
        use crate::lease::LeaseHandle;
        use crate::lease_keeper::LeaseKeeper;

        let (faults, repo, mut p, wal) = pipeline_in(dir, one_record_segments()).await;
        let metrics = Arc::new(Metrics::new());
        let ttl = Duration::from_secs(30);
        let handle = LeaseHandle::acquire(&repo, ttl).await.unwrap();
        let keeper = LeaseKeeper::start(&repo, handle, ttl, None);
        let policy = PruneOptions {
            keep_last: Some(1),
            grace: Duration::from_secs(1),
            interval,
            ..PruneOptions::default()
        };
        let mut retention = Retention::new(Some(policy), &repo, keeper.fence(), &metrics);
        if let Some(limit) = settle_limit {
            retention = retention.with_settle_limit(limit);
        }
        retention.after_base(); // due now

        write_wal(&wal, 5, &[(1, 1), (2, 1)]);
        p.step().await.unwrap();
        faults.inject(
            FaultRule::new(Fault::Delay(delay))
                .on(StoreOp::PutIfAbsent)
                .key_prefix("wal/"),
        );
        write_wal(&wal, 5, &[(1, 1), (2, 1), (3, 1)]);
        p.step().await.unwrap();
        RetentionBehindAnUpload {
            repo,
            p,
            keeper,
            retention,
        }
    }

    /// A retention run that falls due while a segment upload is in flight (as one always
    /// is for an archiver behind its database) ships what was read, waits for it, and
    /// marks; it used to skip the run until a moment with nothing in flight.
    #[tokio::test]
    async fn retention_marks_while_an_upload_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let second = Duration::from_secs(1);
        let RetentionBehindAnUpload {
            repo,
            mut p,
            keeper,
            mut retention,
        } = retention_behind_an_upload(dir.path(), second, second / 2, None).await;
        assert!(!p.settled(), "an upload is in flight");
        retention.mark_if_due(&mut p, false).await.unwrap();
        assert!(p.settled(), "what was read is durable");
        assert!(
            retention.sweeping(),
            "the policy was applied: history marked, the sweep started"
        );
        let swept = retention.finished().await;
        retention.on_finished(swept);
        assert_eq!(segment_firsts(&repo).await, vec![1, 2, 3]);
        keeper.stop().await.unwrap();
    }

    /// A store slower than the wait: the run is put off (nothing marked, no sweep), the
    /// upload it waited for goes on and lands once, and the next run marks.
    #[tokio::test]
    async fn retention_is_put_off_while_the_store_is_slower_than_its_wait() {
        let dir = tempfile::tempdir().unwrap();
        let interval = Duration::from_secs(5);
        let RetentionBehindAnUpload {
            repo,
            mut p,
            keeper,
            mut retention,
        } = retention_behind_an_upload(
            dir.path(),
            interval,
            Duration::from_secs(2),
            Some(Duration::from_millis(200)),
        )
        .await;
        let generation = |r: &Repository| {
            let r = r.clone();
            async move { r.load().await.unwrap().generation.map(|g| g.generation) }
        };
        let before = generation(&repo).await;
        let asked = Instant::now();
        retention.mark_if_due(&mut p, false).await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "it waited for the upload"
        );
        assert!(
            !retention.sweeping(),
            "nothing is applied while segments are on their way"
        );
        assert_eq!(generation(&repo).await, before, "nothing was marked");
        let due = retention.wake_at().expect("still scheduled");
        assert!(
            due >= asked + interval,
            "put off by the interval (at most a minute)"
        );

        // The upload was not given up: it lands once, and the next run marks.
        assert!(p.settle().await.unwrap());
        assert_eq!(segment_firsts(&repo).await, vec![1, 2, 3]);
        retention.after_base();
        retention.mark_if_due(&mut p, false).await.unwrap();
        assert!(retention.sweeping(), "the next run applies the policy");
        let swept = retention.finished().await;
        retention.on_finished(swept);
        keeper.stop().await.unwrap();
    }

    #[test]
    fn recent_times_find_the_record_holding_a_sequence() {
        let mut t = RecentTimes::default();
        t.push(5, 11, 100);
        t.push(11, 16, 200);
        t.push(16, 16, 250); // no sequence number of its own
        t.push(16, 31, 300);
        assert_eq!(t.lookup(5), Some(100));
        assert_eq!(t.lookup(10), Some(100));
        assert_eq!(t.lookup(11), Some(200));
        assert_eq!(t.lookup(16), Some(300));
        assert_eq!(t.lookup(30), Some(300));
        assert_eq!(t.lookup(31), None);
        // Before the first record this run read (archived by an earlier run): unknown here,
        // not the time of a later record.
        assert_eq!(t.lookup(4), None);
        assert_eq!(t.lookup(1), None);
    }

    #[tokio::test]
    async fn a_record_of_a_read_still_being_added_is_not_yet_read_for_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let (faults, _repo, mut p, wal) = pipeline_in(dir.path(), one_record_segments()).await;
        let observed = p.observed_times();
        let copied = Instant::now();
        write_wal(&wal, 5, &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        // Uploads are slow: adding the records waits for the upload of record 1's segment
        // (two segments held at most), with record 4 still to add.
        faults.inject(FaultRule::new(Fault::Delay(Duration::from_secs(2))).key_prefix("wal/"));
        let probe = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            (observed(1, copied), observed(4, copied))
        };
        let (stepped, (first, fourth)) = tokio::join!(p.step(), probe);
        stepped.unwrap();
        assert!(
            matches!(first, Observed::At(_)),
            "record 1 was added: {first:?}"
        );
        assert_eq!(
            fourth,
            Observed::NotYet,
            "record 4 was read by a read that reached the end after the copy, but is not \
             added yet: a base asking now must wait for its time"
        );
        assert!(matches!(observed(4, copied), Observed::At(_)));
    }

    #[test]
    fn recent_times_say_when_the_follower_will_never_read_a_record() {
        let copied = Instant::now();
        let mut t = RecentTimes::default();
        assert_eq!(t.observed(5, copied), Observed::NotYet, "nothing read yet");
        t.read_to_end(copied - Duration::from_millis(1));
        assert_eq!(
            t.observed(5, copied),
            Observed::NotYet,
            "the end reached before the copy: the record may have been written since"
        );
        t.push(11, 16, 200);
        assert_eq!(t.observed(12, copied), Observed::At(time_from_micros(200)));
        assert_eq!(t.observed(5, copied), Observed::Never, "read past it");
        assert_eq!(t.observed(16, copied), Observed::NotYet, "the next one");
        t.read_to_end(copied + Duration::from_millis(1));
        assert_eq!(
            t.observed(16, copied),
            Observed::Never,
            "a read started after the copy reached the end without it"
        );
    }
}
