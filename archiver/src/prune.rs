//! Pruning: applying a retention policy to a repository (FORMAT.md §4.6).
//!
//! Two steps, each safe to interrupt at any instant:
//!
//! 1. [`mark`] decides what the policy keeps ([`tidemark_manifest::retention::decide`]),
//!    writes index pages for what is kept of partly pruned pages, and builds the next
//!    generation, which no longer references the dropped bases and segments. The caller
//!    writes it: the service through its checkpoint manager, `tidemark-archiver prune`
//!    directly, holding the lease.
//! 2. [`sweep`] lists the repository and deletes every repository object that neither the
//!    current generation nor any generation that was current within the grace period
//!    references. It deletes only while its holder keeps the writer lease (it asks a
//!    [`LeaseFence`] before each deletion), so that a base backup, which may reuse objects
//!    the sweep's listing found unreferenced, never runs meanwhile. A restore that planned against a generation superseded less than the grace
//!    period ago therefore still finds everything it needs; objects dropped by the mark step
//!    go in a later sweep, once the grace period has passed.
//!
//! Objects whose keys are not part of the repository layout are never deleted; they are
//! reported.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::StreamExt as _;
use serde::Serialize;
use tidemark_manifest::model::{Generation, IndexPageRef, PruneRecord};
use tidemark_manifest::plan::fmt_time;
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use tidemark_manifest::retention::{self, KeyClass, ObjectKind, Protection, Repage, Rules};
use tidemark_manifest::store::StoreError;
use time::OffsetDateTime;

use crate::checkpoint::writer;
use crate::lease_keeper::{LeaseFence, LeaseKeeper};

pub use crate::config::PruneOptions;

/// Why pruning failed. Nothing is deleted that a generation within the grace period
/// references, whatever the error.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("invalid retention policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(
        "{0} (a running archiver applies retention itself when its config has a [retention] \
         table; --dry-run works beside it)"
    )]
    Lease(#[from] crate::lease::LeaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "refusing to prune {location}: {detail}. Nothing was changed; check the repository with \
         `tidemark-restore verify`"
    )]
    Unsafe { location: String, detail: String },
}

/// What the mark step decided.
#[derive(Debug, Clone, Serialize)]
pub struct MarkReport {
    pub policy: String,
    pub generation_before: Option<u64>,
    /// The generation that records the pruned history (written, or that would be).
    pub generation_after: Option<u64>,
    pub kept_bases: Vec<BaseLine>,
    pub removed_bases: Vec<BaseLine>,
    pub segments_removed: u64,
    pub segment_bytes_removed: u64,
    pub window_before: String,
    pub window_after: String,
}

/// One base in a report.
#[derive(Debug, Clone, Serialize)]
pub struct BaseLine {
    pub id: String,
    pub created_at: String,
    pub earliest_seq: u64,
    pub reasons: Vec<String>,
}

/// The mark step's result: the report, and the generation to write (none when the policy
/// drops nothing).
#[derive(Debug, Clone)]
pub struct Marked {
    pub report: MarkReport,
    pub next: Option<Generation>,
}

/// Decides what `rules` keep of `state` at `now` and builds the next generation. Unless
/// `dry_run`, writes the index pages it references (never the generation itself).
pub async fn mark(
    repo: &Repository,
    state: &RepoState,
    rules: &Rules,
    now: OffsetDateTime,
    dry_run: bool,
) -> Result<Marked, PruneError> {
    let window_before = state.history.window().to_string();
    let Some(current) = &state.generation else {
        return Ok(Marked {
            report: MarkReport {
                policy: rules.to_string(),
                generation_before: None,
                generation_after: None,
                kept_bases: Vec::new(),
                removed_bases: Vec::new(),
                segments_removed: 0,
                segment_bytes_removed: 0,
                window_after: window_before.clone(),
                window_before,
            },
            next: None,
        });
    };
    let decision = retention::decide(&state.history, &current.retention.pins, rules, now)
        .map_err(|e| PruneError::Policy(e.to_string()))?;
    let after = decision.history();
    check_safe(repo, state, &decision, &after)?;

    let mut report = MarkReport {
        policy: rules.to_string(),
        generation_before: Some(current.generation),
        generation_after: None,
        kept_bases: decision
            .kept
            .iter()
            .map(|k| BaseLine {
                id: k.base.id.clone(),
                created_at: fmt_time(k.base.created_at),
                earliest_seq: k.base.earliest_seq,
                reasons: k.reasons.clone(),
            })
            .collect(),
        removed_bases: decision
            .removed
            .iter()
            .map(|b| BaseLine {
                id: b.id.clone(),
                created_at: fmt_time(b.created_at),
                earliest_seq: b.earliest_seq,
                reasons: Vec::new(),
            })
            .collect(),
        segments_removed: decision.removed_segments.len() as u64,
        segment_bytes_removed: decision
            .removed_segments
            .iter()
            .map(|s| s.stored_size)
            .sum(),
        window_before,
        window_after: after.window().to_string(),
    };
    if decision.is_noop() {
        return Ok(Marked { report, next: None });
    }

    let indexed: Vec<_> = decision
        .kept_segments
        .iter()
        .filter(|s| s.first_seq < current.tail_start_seq)
        .cloned()
        .collect();
    let mut pages: Vec<IndexPageRef> = Vec::new();
    for p in retention::repage(&current.index_pages, &indexed, &decision.gaps) {
        match p {
            Repage::Keep(r) => pages.push(r),
            Repage::Write(segments) => {
                let page = tidemark_manifest::model::IndexPage {
                    format_version: tidemark_manifest::model::FORMAT_VERSION,
                    first_seq: segments[0].first_seq,
                    last_seq: segments[segments.len() - 1].last_seq,
                    segments,
                };
                if dry_run {
                    pages.push(page.reference(None).map_err(RepoError::from)?);
                } else {
                    pages.push(repo.write_index_page(&page).await?);
                }
            }
        }
    }
    let mut next = current.clone();
    next.generation += 1;
    next.written_at = now;
    next.writer = writer();
    next.bases = decision.kept.iter().map(|k| k.base.clone()).collect();
    next.index_pages = pages;
    next.gaps = decision.gaps.clone();
    next.retention.last_prune = Some(PruneRecord {
        at: now,
        policy: rules.to_string(),
        bases_removed: decision.removed.len() as u64,
        segments_removed: decision.removed_segments.len() as u64,
    });
    report.generation_after = Some(next.generation);
    Ok(Marked {
        report,
        next: Some(next),
    })
}

/// Refuses a decision that would lose the newest point or leave a kept base unrestorable,
/// or that drops segments a writer may still be adding to.
fn check_safe(
    repo: &Repository,
    state: &RepoState,
    decision: &retention::Decision,
    after: &tidemark_manifest::plan::History,
) -> Result<(), PruneError> {
    let unsafe_ = |detail: String| PruneError::Unsafe {
        location: repo.location(),
        detail,
    };
    let problems = after.problems();
    if !problems.is_empty() {
        return Err(unsafe_(format!(
            "the pruned history would not hold together: {}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    if after.latest_seq() != state.history.latest_seq() {
        return Err(unsafe_(format!(
            "the newest restorable point would move from {:?} to {:?}",
            state.history.latest_seq(),
            after.latest_seq()
        )));
    }
    let tail_start = state
        .generation
        .as_ref()
        .map_or(u64::MAX, |g| g.tail_start_seq);
    if let Some(s) = decision
        .removed_segments
        .iter()
        .find(|s| s.first_seq >= tail_start)
    {
        return Err(unsafe_(format!(
            "segment {} is after the newest generation's index and would be dropped",
            s.key
        )));
    }
    for k in &decision.kept {
        if after
            .plan(tidemark_manifest::plan::Target::Seq(k.base.earliest_seq))
            .is_err()
            && state
                .history
                .plan(tidemark_manifest::plan::Target::Seq(k.base.earliest_seq))
                .is_ok()
        {
            return Err(unsafe_(format!(
                "kept base {} would no longer restore to its own point (sequence {})",
                k.base.id, k.base.earliest_seq
            )));
        }
    }
    Ok(())
}

/// Generations read at once while finding those within the grace period.
const READ_BATCH: u64 = 16;

/// What a sweep deleted (or would delete).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Generations whose references were kept: the current one and those superseded
    /// within the grace period.
    pub protected_generations: Vec<u64>,
    /// Objects deleted (or that a dry run would delete), by kind: count and bytes.
    pub deleted: BTreeMap<String, KindCount>,
    /// Objects no longer referenced by the newest generation but kept for the grace period.
    pub deferred: KindCount,
    /// When the deferred objects become deletable, at the latest.
    pub deferred_until: Option<String>,
    /// Keys that are not part of the repository layout: left alone.
    pub foreign_keys: Vec<String>,
    /// Unreferenced objects left because their object lock has not ended (FORMAT.md
    /// §3.2): the store would refuse to delete them, or on a versioned bucket only hide
    /// them behind a delete marker.
    pub locked: KindCount,
    /// When the first of the locked objects becomes deletable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_first_deletable: Option<String>,
    /// When the last of them does: a sweep after it deletes them all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_all_deletable: Option<String>,
}

/// A count of objects and their bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KindCount {
    pub objects: u64,
    pub bytes: u64,
}

/// Whether a sweep deletes.
#[derive(Debug, Clone, Copy)]
pub enum SweepMode<'a> {
    /// Report what would be deleted; delete nothing.
    DryRun,
    /// Delete, each object only while the fence holds (the writer lease is held).
    Delete(&'a LeaseFence),
}

/// Deletes (or, in a dry run, reports) every repository object that neither `newest` nor a
/// generation current within `grace` before `now` references.
pub async fn sweep(
    repo: &Repository,
    newest: &Generation,
    grace: Duration,
    now: OffsetDateTime,
    mode: SweepMode<'_>,
) -> Result<SweepReport, PruneError> {
    let grace_start = now - time::Duration::try_from(grace).unwrap_or(time::Duration::MAX);
    // Generation g is protected while the one after it was written within the grace
    // period. Read downwards in concurrent batches: a day of grace is ~1,500 generations.
    let mut protected = vec![newest.clone()];
    let mut next = newest.generation.saturating_sub(1);
    'walk: while next >= 1 {
        let low = next.saturating_sub(READ_BATCH - 1).max(1);
        let batch: Vec<Option<Generation>> =
            futures::stream::iter((low..=next).rev().map(|g| repo.read_generation(g)))
                .buffered(READ_BATCH as usize)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
        for g in batch {
            let newer = protected.last().expect("not empty");
            let Some(g) = g else { break 'walk };
            if newer.written_at <= grace_start {
                break 'walk;
            }
            protected.push(g);
        }
        next = low - 1;
    }
    let full = protection(repo, &protected).await?;
    let only_newest = protection(repo, &protected[..1]).await?;

    let mut report = SweepReport {
        protected_generations: protected.iter().map(|g| g.generation).collect(),
        ..SweepReport::default()
    };
    let lock = repo.read_config().await?.and_then(|c| c.object_lock);
    let mut lock_ends: Vec<OffsetDateTime> = Vec::new();
    let mut doomed: Vec<(ObjectKind, String, u64)> = Vec::new();
    for meta in repo.store().list("").await? {
        match full.classify(&meta.key) {
            KeyClass::Protected => {
                if matches!(only_newest.classify(&meta.key), KeyClass::Unreferenced(_))
                    && meta.key != newest.key()
                {
                    report.deferred.objects += 1;
                    report.deferred.bytes += meta.size;
                }
            }
            KeyClass::Unreferenced(_)
                if lock.is_some_and(|l| l.is_locked(meta.last_modified, now)) =>
            {
                let lock = lock.expect("checked");
                report.locked.objects += 1;
                report.locked.bytes += meta.size;
                // An object whose write time is unknown is kept until a lock from now ends.
                lock_ends.push(lock.locked_until(meta.last_modified.unwrap_or(now)));
            }
            KeyClass::Unreferenced(kind) => doomed.push((kind, meta.key, meta.size)),
            KeyClass::Foreign => report.foreign_keys.push(meta.key),
        }
    }
    if report.deferred.objects > 0 {
        report.deferred_until = Some(fmt_time(
            newest.written_at + time::Duration::try_from(grace).unwrap_or(time::Duration::MAX),
        ));
    }
    report.locked_first_deletable = lock_ends.iter().min().map(|t| fmt_time(*t));
    report.locked_all_deletable = lock_ends.iter().max().map(|t| fmt_time(*t));
    if report.locked.objects > 0 {
        tracing::info!(
            objects = report.locked.objects,
            bytes = report.locked.bytes,
            first_deletable = report.locked_first_deletable.as_deref().unwrap_or(""),
            all_deletable = report.locked_all_deletable.as_deref().unwrap_or(""),
            "unreferenced objects still under their object lock are left for a later sweep"
        );
    }
    // Generations last, oldest first: a crash part-way leaves the newest ones.
    doomed.sort_by_key(|(kind, key, _)| (*kind == ObjectKind::Generation, key.clone()));
    for (kind, _, size) in &doomed {
        let c = report.deleted.entry(kind.to_string()).or_default();
        c.objects += 1;
        c.bytes += size;
    }
    let SweepMode::Delete(fence) = mode else {
        return Ok(report);
    };
    drill_hold().await;
    let (generations, others): (Vec<_>, Vec<_>) = doomed
        .into_iter()
        .partition(|(kind, _, _)| *kind == ObjectKind::Generation);
    delete_all(repo, others, fence).await?;
    delete_all(repo, generations, fence).await?;
    if !report.deleted.is_empty() {
        tracing::info!(
            deleted = report.deleted.values().map(|c| c.objects).sum::<u64>(),
            bytes = report.deleted.values().map(|c| c.bytes).sum::<u64>(),
            deferred = report.deferred.objects,
            "pruned unreferenced objects"
        );
    }
    Ok(report)
}

/// For failure drills and tests: with `TIDEMARK_DRILL_SWEEP_HOLD` set to a path, a sweep
/// that deletes creates that file once it has listed the repository, and waits until the
/// file is removed before deleting anything.
async fn drill_hold() {
    let Some(path) = std::env::var_os("TIDEMARK_DRILL_SWEEP_HOLD") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    if let Err(e) = std::fs::write(&path, b"listed\n") {
        tracing::warn!(path = %path.display(), error = %e, "drill: cannot create the hold file");
        return;
    }
    tracing::warn!(path = %path.display(), "drill: the sweep waits until this file is removed");
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes `objects`, asking `fence` before each: nothing more is deleted once the lease is
/// lost or about to expire.
async fn delete_all(
    repo: &Repository,
    objects: Vec<(ObjectKind, String, u64)>,
    fence: &LeaseFence,
) -> Result<(), PruneError> {
    let mut results = futures::stream::iter(objects.into_iter().map(|(_, key, _)| async move {
        fence.check()?;
        repo.delete_unreferenced(&key).await?;
        Ok::<_, PruneError>(key)
    }))
    .buffer_unordered(8);
    while let Some(r) = results.next().await {
        let key = r?;
        tracing::debug!(key, "deleted");
    }
    Ok(())
}

/// What `generations` reference, table files included.
async fn protection(
    repo: &Repository,
    generations: &[Generation],
) -> Result<Protection, PruneError> {
    let mut p = Protection::new();
    let mut summaries = BTreeMap::new();
    for g in generations {
        p.add_generation(g);
        for b in &g.bases {
            summaries
                .entry(b.id.clone())
                .or_insert_with(|| (g.generation, b.clone()));
        }
    }
    for (generation, summary) in summaries.values() {
        let d = repo
            .read_base(*generation, summary)
            .await
            .map_err(|e| PruneError::Unsafe {
                location: repo.location(),
                detail: format!(
                    "cannot tell which table files base {} needs ({e})",
                    summary.id
                ),
            })?;
        p.add_base(&d);
    }
    Ok(p)
}

/// One pruning run outside the service (`tidemark-archiver prune`): takes the lease (unless
/// `dry_run`) and renews it throughout, marks, writes the generation, sweeps, releases the
/// lease.
pub async fn prune_repository(
    repo: &Repository,
    opts: &PruneOptions,
    dry_run: bool,
    lease_ttl: Duration,
) -> Result<PruneReport, PruneError> {
    let rules = opts.rules()?;
    let keeper = if dry_run {
        None
    } else {
        // What it writes (index pages, the generation) takes the repository's lock.
        repo.writer_object_lock(None).await?;
        let lease = crate::lease::LeaseHandle::acquire(repo, lease_ttl).await?;
        Some(LeaseKeeper::start(repo, lease, lease_ttl, None))
    };
    let fence = keeper.as_ref().map(|k| k.fence());
    let mode = match &fence {
        Some(fence) => SweepMode::Delete(fence),
        None => SweepMode::DryRun,
    };
    let mut result = prune_holding_lease(repo, opts, &rules, mode).await;
    if dry_run
        && let Ok(report) = &mut result
        && let Some(holder) = live_lease(repo).await
    {
        report.note = Some(format!(
            "an archiver ({holder}) is writing to this repository: objects it uploaded since \
             its newest manifest generation (a base backup in progress) are listed as deleted \
             here; a real run never deletes them (the archiver prunes between its own steps)"
        ));
    }
    if let Some(keeper) = keeper {
        match keeper.stop().await {
            Ok(lease) => {
                if let Err(e) = lease.release().await {
                    tracing::warn!(error = %e, "could not release the lease; it expires by itself");
                }
            }
            Err(e) => tracing::warn!(error = %e, "the lease was gone when pruning ended"),
        }
    }
    result
}

async fn prune_holding_lease(
    repo: &Repository,
    opts: &PruneOptions,
    rules: &Rules,
    mode: SweepMode<'_>,
) -> Result<PruneReport, PruneError> {
    let dry_run = matches!(mode, SweepMode::DryRun);
    let state = repo.load().await?;
    if state.tail_segments > 0 {
        tracing::info!(
            segments = state.tail_segments,
            "segments after the newest generation stay as they are (the archiver indexes them)"
        );
    }
    let now = OffsetDateTime::now_utc();
    let marked = mark(repo, &state, rules, now, dry_run).await?;
    let newest = match (&marked.next, &state.generation) {
        (Some(next), _) => {
            if !dry_run {
                repo.write_generation(next).await?;
                tracing::info!(generation = next.generation, "wrote the pruned generation");
            }
            next.clone()
        }
        (None, Some(current)) => current.clone(),
        (None, None) => {
            return Ok(PruneReport {
                dry_run,
                note: None,
                location: repo.location(),
                grace: humantime::format_duration(opts.grace).to_string(),
                mark: marked.report,
                sweep: SweepReport::default(),
            });
        }
    };
    let sweep = sweep(repo, &newest, opts.grace, now, mode).await?;
    Ok(PruneReport {
        dry_run,
        note: None,
        location: repo.location(),
        grace: humantime::format_duration(opts.grace).to_string(),
        mark: marked.report,
        sweep,
    })
}

/// The mark step inside the service: whatever waits is written first, then the pruned
/// generation is written through the service's checkpoint manager, its only writer. Returns
/// the report and the generation a sweep starts from (none before the first generation).
/// The service runs [`sweep`] in the background afterwards: it never deletes what a writer
/// may be adding (segments and index pages at or after the tail, generations after the
/// newest), the service takes no base backup while it runs, and it stops deleting when the
/// service's lease is lost.
pub async fn mark_with_checkpoint(
    repo: &Repository,
    checkpoint: &mut crate::checkpoint::CheckpointManager,
    opts: &PruneOptions,
) -> Result<(MarkReport, Option<Generation>, OffsetDateTime), PruneError> {
    let rules = opts.rules()?;
    checkpoint.flush().await?;
    let state = repo.load().await?;
    let loaded = state.generation.as_ref().map(|g| g.generation);
    let current = checkpoint.current().generation;
    if loaded != Some(current) && !(loaded.is_none() && current == 0) {
        return Err(PruneError::Unsafe {
            location: repo.location(),
            detail: format!(
                "the store's newest generation is {loaded:?}, this archiver wrote {current}"
            ),
        });
    }
    let now = OffsetDateTime::now_utc();
    let marked = mark(repo, &state, &rules, now, false).await?;
    if let Some(next) = marked.next.clone() {
        checkpoint.write_built(next).await?;
    }
    let newest = (checkpoint.current().generation > 0).then(|| checkpoint.current().clone());
    Ok((marked.report, newest, now))
}

/// Who holds a live writer lease on the repository, if anyone.
async fn live_lease(repo: &Repository) -> Option<String> {
    let lease = repo
        .live_lease(OffsetDateTime::now_utc())
        .await
        .ok()
        .flatten()?;
    Some(format!("host {}, pid {}", lease.host, lease.pid))
}

/// The report of one pruning run.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Something the reader of a dry run should know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub location: String,
    pub grace: String,
    pub mark: MarkReport,
    pub sweep: SweepReport,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.mark;
        let would = if self.dry_run { "would be " } else { "" };
        writeln!(f, "repository: {}", self.location)?;
        writeln!(f, "policy:     {} (grace {})", m.policy, self.grace)?;
        if self.dry_run {
            writeln!(f, "dry run:    nothing was changed")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "note:       {note}")?;
        }
        writeln!(f, "window before: {}", m.window_before)?;
        writeln!(f, "window after:  {}", m.window_after)?;
        writeln!(f, "kept base backups ({}):", m.kept_bases.len())?;
        for b in &m.kept_bases {
            writeln!(
                f,
                "  {}  {}  [{}]",
                b.id,
                b.created_at,
                b.reasons.join("; ")
            )?;
        }
        writeln!(
            f,
            "base backups {}dropped ({}):",
            would,
            m.removed_bases.len()
        )?;
        for b in &m.removed_bases {
            writeln!(f, "  {}  {}", b.id, b.created_at)?;
        }
        writeln!(
            f,
            "WAL segments {}dropped: {} ({} bytes)",
            would, m.segments_removed, m.segment_bytes_removed
        )?;
        match m.generation_after {
            Some(g) => writeln!(f, "manifest generation {}written: {g}", would)?,
            None => writeln!(f, "manifest: unchanged (the policy drops nothing)")?,
        }
        let s = &self.sweep;
        if s.deleted.is_empty() {
            writeln!(f, "objects {}deleted now: none", would)?;
        } else {
            writeln!(f, "objects {}deleted now:", would)?;
            for (kind, c) in &s.deleted {
                writeln!(f, "  {kind}: {} ({} bytes)", c.objects, c.bytes)?;
            }
        }
        if let Some(until) = &s.deferred_until {
            writeln!(
                f,
                "kept for the grace period: {} objects ({} bytes), deletable by a run after {until}",
                s.deferred.objects, s.deferred.bytes
            )?;
        }
        if let (Some(first), Some(all)) = (&s.locked_first_deletable, &s.locked_all_deletable) {
            writeln!(
                f,
                "left under their object lock: {} objects ({} bytes), deletable from {first}, \
                 all by a run after {all}",
                s.locked.objects, s.locked.bytes
            )?;
        }
        if !s.foreign_keys.is_empty() {
            writeln!(
                f,
                "not Tidemark objects, left alone ({}): {}",
                s.foreign_keys.len(),
                s.foreign_keys
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tidemark_manifest::store::MemoryStore;

    fn generation(n: u64, written_at: OffsetDateTime) -> Generation {
        Generation {
            repository_id: "r".into(),
            writer: writer(),
            ..tidemark_manifest::testing::generation(n, written_at)
        }
    }

    #[tokio::test]
    async fn the_grace_period_protects_each_generation_that_was_current_within_it() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let now = OffsetDateTime::now_utc();
        // Generation g was written 40 - g minutes ago: more than two read batches.
        for g in 1..=40u64 {
            let at = now - time::Duration::minutes(40 - g as i64);
            repo.write_generation(&generation(g, at)).await.unwrap();
        }
        let newest = repo.read_generation(40).await.unwrap().unwrap();
        // 10 minutes: g is protected while g + 1 was written less than 10 minutes ago.
        let report = sweep(
            &repo,
            &newest,
            Duration::from_secs(600),
            now,
            SweepMode::DryRun,
        )
        .await
        .unwrap();
        assert_eq!(
            report.protected_generations,
            (30..=40).rev().collect::<Vec<_>>()
        );
        assert_eq!(report.deleted["manifest generations"].objects, 29);
        // Deleting for real leaves exactly the protected ones (and the hint).
        let ttl = Duration::from_secs(60);
        let lease = crate::lease::LeaseHandle::acquire(&repo, ttl)
            .await
            .unwrap();
        let keeper = LeaseKeeper::start(&repo, lease, ttl, None);
        let fence = keeper.fence();
        sweep(
            &repo,
            &newest,
            Duration::from_secs(600),
            now,
            SweepMode::Delete(&fence),
        )
        .await
        .unwrap();
        keeper.stop().await.unwrap().release().await.unwrap();
        let left: Vec<String> = repo
            .store()
            .list("manifest/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(left.len(), 12, "{left:?}");
        assert!(repo.read_generation(29).await.unwrap().is_none());
        assert!(repo.read_generation(30).await.unwrap().is_some());
        // No grace: only the newest.
        let report = sweep(&repo, &newest, Duration::ZERO, now, SweepMode::DryRun)
            .await
            .unwrap();
        assert_eq!(report.protected_generations, vec![40]);
    }

    #[tokio::test]
    async fn a_sweep_leaves_locked_objects_and_says_until_when() {
        use tidemark_manifest::model::{LockMode, ObjectLock};
        let store = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        let lock = ObjectLock::new(LockMode::Compliance, 2).unwrap();
        repo.create_config(&tidemark_manifest::model::RepositoryConfig {
            object_lock: Some(lock),
            ..tidemark_manifest::testing::config()
        })
        .await
        .unwrap();
        let now = OffsetDateTime::now_utc();
        for g in 1..=5u64 {
            let at = now - time::Duration::minutes(10 - g as i64);
            repo.write_generation(&generation(g, at)).await.unwrap();
        }
        assert!(
            store
                .retain_until("manifest/0000000000000001.json")
                .is_some(),
            "generations are written locked"
        );
        assert!(
            store
                .retain_until(tidemark_manifest::keys::LATEST_HINT)
                .is_none()
        );
        let newest = repo.read_generation(5).await.unwrap().unwrap();
        let ttl = Duration::from_secs(60);
        let lease = crate::lease::LeaseHandle::acquire(&repo, ttl)
            .await
            .unwrap();
        assert!(store.retain_until(tidemark_manifest::keys::LEASE).is_none());
        let keeper = LeaseKeeper::start(&repo, lease, ttl, None);
        let fence = keeper.fence();
        // Within the lock: nothing is deleted (the store would refuse), all four are told.
        let now = OffsetDateTime::now_utc();
        let report = sweep(
            &repo,
            &newest,
            Duration::ZERO,
            now,
            SweepMode::Delete(&fence),
        )
        .await
        .unwrap();
        assert!(report.deleted.is_empty(), "{report:?}");
        assert_eq!(report.locked.objects, 4);
        let all = report.locked_all_deletable.clone().unwrap();
        let expected = fmt_time(lock.locked_until(now));
        assert!(all <= expected, "{all} > {expected}");
        assert!(report.locked_first_deletable.unwrap() <= all);
        for g in 1..=4 {
            assert!(repo.read_generation(g).await.unwrap().is_some(), "{g}");
        }
        // Once the locks have ended, the same sweep deletes them.
        store.age(time::Duration::days(3));
        let report = sweep(
            &repo,
            &newest,
            Duration::ZERO,
            OffsetDateTime::now_utc(),
            SweepMode::Delete(&fence),
        )
        .await
        .unwrap();
        assert_eq!(report.locked.objects, 0);
        assert_eq!(report.deleted["manifest generations"].objects, 4);
        assert!(repo.read_generation(1).await.unwrap().is_none());
        keeper.stop().await.unwrap().release().await.unwrap();
    }

    #[tokio::test]
    async fn a_sweep_deletes_nothing_once_its_lease_is_lost() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let now = OffsetDateTime::now_utc();
        for g in 1..=5u64 {
            let at = now - time::Duration::hours(10 - g as i64);
            repo.write_generation(&generation(g, at)).await.unwrap();
        }
        let newest = repo.read_generation(5).await.unwrap().unwrap();
        let ttl = Duration::from_millis(600);
        let lease = crate::lease::LeaseHandle::acquire(&repo, ttl)
            .await
            .unwrap();
        let mut keeper = LeaseKeeper::start(&repo, lease, ttl, None);
        let fence = keeper.fence();
        // Another writer took the lease over.
        repo.store()
            .delete(tidemark_manifest::keys::LEASE)
            .await
            .unwrap();
        keeper.gone().await;
        let err = sweep(
            &repo,
            &newest,
            Duration::ZERO,
            now,
            SweepMode::Delete(&fence),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                PruneError::Lease(crate::lease::LeaseError::Lost { .. })
            ),
            "{err}"
        );
        for g in 1..=5 {
            assert!(
                repo.read_generation(g).await.unwrap().is_some(),
                "{g} deleted"
            );
        }
    }
}
