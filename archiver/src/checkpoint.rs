//! The checkpoint manager: turns uploaded segments, new bases and detected gaps into manifest
//! generations (FORMAT.md §4).
//!
//! Segments are durable as soon as they are uploaded (a reader finds them by the tail walk),
//! so generations are written only now and then: when enough segments are pending, when the
//! checkpoint interval has passed, and at once for a base backup or a gap. Each write puts
//! the pending segments into a new index page, then creates the next generation. Index pages
//! are merged in tiers (sixteen pages of one tier become one page of the next) so that a
//! generation stays small however long the history grows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_manifest::model::{
    BaseSummary, FORMAT_VERSION, Gap, GapKind, Generation, IndexPage, IndexPageRef, Retention,
    SegmentEntry, TimeSource, Writer,
};
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use time::OffsetDateTime;

use crate::metrics::Metrics;

/// When to write a generation for pending segments.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Write at the latest this long after the first pending segment was uploaded.
    pub interval: Duration,
    /// Write when this many segments are pending.
    pub max_pending: usize,
    /// How many pages of one tier are merged into one page of the next.
    pub merge_fanout: usize,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            interval: Duration::from_secs(60),
            max_pending: 600,
            merge_fanout: 16,
        }
    }
}

/// A change a generation records besides new segments.
#[derive(Debug, Clone)]
enum Change {
    /// The first generation of a new repository: where the tail walk starts.
    Start(u64),
    Base(BaseSummary),
    Gap(Gap),
}

/// A generation built but not created yet (its create failed): sent again, byte for byte,
/// before anything else, so that a create that landed but whose reply was lost is
/// recognised as ours.
#[derive(Debug)]
struct Unsent {
    generation: Generation,
    /// How many of the pending segments it indexes.
    pending_used: usize,
    /// It records a change that segments after it depend on (see
    /// [`CheckpointManager::segments_must_wait`]).
    barrier: bool,
}

/// Writes manifest generations for one repository. The only writer of generations.
///
/// A write that fails keeps everything it was to record (segments, bases, gaps): the next
/// call retries it first.
#[derive(Debug)]
pub struct CheckpointManager {
    repo: Repository,
    opts: CheckpointOptions,
    current: Generation,
    pending: Vec<SegmentEntry>,
    pending_since: Option<Instant>,
    queued: Vec<Change>,
    unsent: Option<Unsent>,
    metrics: Arc<Metrics>,
}

impl CheckpointManager {
    /// Continues from what a reader sees in the repository: the current generation (if any)
    /// and the segments found after it, which become pending.
    pub fn new(repo: Repository, state: &RepoState, opts: CheckpointOptions) -> CheckpointManager {
        let current = state.generation.clone().unwrap_or_else(|| Generation {
            format_version: FORMAT_VERSION,
            generation: 0,
            repository_id: state.config.repository_id.clone(),
            written_at: OffsetDateTime::now_utc(),
            writer: writer(),
            time_precision: TimeSource::Observed,
            bases: Vec::new(),
            index_pages: Vec::new(),
            tail_start_seq: state.history.segments.first().map_or(1, |s| s.first_seq),
            gaps: Vec::new(),
            retention: Retention::default(),
        });
        let tail_start = current.tail_start_seq;
        let pending: Vec<SegmentEntry> = state
            .history
            .segments
            .iter()
            .filter(|s| s.first_seq >= tail_start)
            .cloned()
            .collect();
        let pending_since = (!pending.is_empty()).then(Instant::now);
        CheckpointManager {
            repo,
            opts,
            current,
            pending,
            pending_since,
            queued: Vec::new(),
            unsent: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Reports generations written and gaps detected to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> CheckpointManager {
        self.metrics = metrics;
        self
    }

    /// The newest generation written (or read at start).
    pub fn current(&self) -> &Generation {
        &self.current
    }

    /// Segments uploaded but not yet in an index page.
    pub fn pending(&self) -> &[SegmentEntry] {
        &self.pending
    }

    /// True while something (a base, a gap, a built generation) waits to be written.
    pub fn has_unwritten(&self) -> bool {
        self.unsent.is_some() || !self.queued.is_empty()
    }

    /// True while a change that later segments depend on waits to be written: the start of
    /// a new repository (readers find its first segments from it) or a missing-WAL gap
    /// (segments after it are found from its end). No segment may be uploaded until it is
    /// (FORMAT.md §4.5 rule 4).
    pub fn segments_must_wait(&self) -> bool {
        self.unsent.as_ref().is_some_and(|u| u.barrier) || self.queued.iter().any(is_barrier)
    }

    /// Before the first segment of a new repository is uploaded: writes generation 1 with
    /// `tail_start_seq` at that segment's first sequence, so that readers can find it.
    pub async fn ensure_started(&mut self, first_seq: u64) -> Result<(), RepoError> {
        let started = self.current.generation > 0
            || self.unsent.is_some()
            || self.queued.iter().any(|c| matches!(c, Change::Start(_)));
        if !started {
            self.queued.push(Change::Start(first_seq));
        }
        self.write().await
    }

    /// Records an uploaded segment.
    pub fn segment_uploaded(&mut self, entry: SegmentEntry) {
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.push(entry);
    }

    /// True when a generation should be written now.
    pub fn due(&self) -> bool {
        self.has_unwritten()
            || self.pending.len() >= self.opts.max_pending
            || self
                .pending_since
                .is_some_and(|t| t.elapsed() >= self.opts.interval)
    }

    /// When the pending segments will be due by time, if any are pending.
    pub fn due_at(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.opts.interval)
    }

    /// Writes whatever waits (pending segments, queued changes) into a new generation.
    pub async fn flush(&mut self) -> Result<(), RepoError> {
        self.write().await
    }

    /// Adds a base backup, in a new generation written at once.
    pub async fn add_base(&mut self, base: BaseSummary) -> Result<(), RepoError> {
        self.queued.push(Change::Base(base));
        self.write().await
    }

    /// Records a gap, in a new generation written at once. After a missing-WAL gap,
    /// segments are found by the tail walk from `gap.last_seq + 1`, so this must be written
    /// before them; other gaps cover records that are archived, and move nothing.
    pub async fn add_gap(&mut self, gap: Gap) -> Result<(), RepoError> {
        self.metrics.gap_detected();
        self.queued.push(Change::Gap(gap));
        self.write().await
    }

    /// Writes `next`, built from the current generation elsewhere (pruning), as the next
    /// generation. Whatever waits is written first; if that moves the current generation
    /// on, `next` is stale and refused.
    pub async fn write_built(&mut self, next: Generation) -> Result<(), RepoError> {
        self.write().await?;
        if next.generation != self.current.generation + 1 {
            return Err(tidemark_manifest::model::ModelError::Inconsistent {
                key: tidemark_manifest::keys::generation_key(next.generation),
                detail: format!(
                    "built on generation {}, but the current one is {} now",
                    next.generation - 1,
                    self.current.generation
                ),
            }
            .into());
        }
        self.unsent = Some(Unsent {
            generation: next,
            pending_used: 0,
            barrier: false,
        });
        self.send_unsent().await
    }

    /// Sends a generation built earlier, then builds and sends one for what waits now.
    async fn write(&mut self) -> Result<(), RepoError> {
        self.send_unsent().await?;
        if self.pending.is_empty() && self.queued.is_empty() {
            return Ok(());
        }
        let mut next = self.current.clone();
        next.generation += 1;
        next.written_at = OffsetDateTime::now_utc();
        next.writer = writer();
        if let Some(last) = self.pending.last() {
            next.tail_start_seq = next.tail_start_seq.max(last.last_seq + 1);
            let page = IndexPage {
                format_version: FORMAT_VERSION,
                first_seq: self.pending[0].first_seq,
                last_seq: last.last_seq,
                segments: self.pending.clone(),
            };
            next.time_precision = combine_precision(&self.current, &self.pending);
            let r = self.repo.write_index_page(&page).await?;
            next.index_pages.push(r);
            self.merge_pages(&mut next).await?;
        }
        let barrier = self.queued.iter().any(is_barrier);
        for change in self.queued.drain(..) {
            match change {
                Change::Start(first_seq) => next.tail_start_seq = first_seq,
                Change::Base(base) => next.bases.push(base),
                Change::Gap(gap) => {
                    if gap.kind == GapKind::MissingWal {
                        next.tail_start_seq = next.tail_start_seq.max(gap.last_seq + 1);
                    }
                    next.gaps.push(gap);
                }
            }
        }
        self.unsent = Some(Unsent {
            generation: next,
            pending_used: self.pending.len(),
            barrier,
        });
        self.send_unsent().await
    }

    async fn send_unsent(&mut self) -> Result<(), RepoError> {
        let Some(unsent) = &self.unsent else {
            return Ok(());
        };
        self.repo.write_generation(&unsent.generation).await?;
        let Unsent {
            generation,
            pending_used,
            ..
        } = self.unsent.take().expect("checked above");
        tracing::info!(
            generation = generation.generation,
            segments_indexed = pending_used,
            pages = generation.index_pages.len(),
            tail_start_seq = generation.tail_start_seq,
            "wrote manifest generation"
        );
        self.metrics.generation_written(generation.generation);
        self.current = generation;
        self.pending.drain(..pending_used);
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        Ok(())
    }

    /// While the newest `merge_fanout` pages are all of one tier, replaces them with one
    /// page of the next tier.
    async fn merge_pages(&self, g: &mut Generation) -> Result<(), RepoError> {
        let fanout = self.opts.merge_fanout.max(2);
        loop {
            let n = g.index_pages.len();
            if n < fanout {
                return Ok(());
            }
            let tail = &g.index_pages[n - fanout..];
            let tier = tier_of(tail[0].segment_count, fanout);
            if tail
                .iter()
                .any(|p| tier_of(p.segment_count, fanout) != tier)
            {
                return Ok(());
            }
            let mut segments = Vec::new();
            for r in tail {
                segments.extend(
                    self.repo
                        .read_index_page(self.current.generation, r)
                        .await?
                        .segments,
                );
            }
            let page = IndexPage {
                format_version: FORMAT_VERSION,
                first_seq: tail[0].first_seq,
                last_seq: tail[fanout - 1].last_seq,
                segments,
            };
            let merged: IndexPageRef = self.repo.write_index_page(&page).await?;
            g.index_pages.truncate(n - fanout);
            g.index_pages.push(merged);
        }
    }
}

/// A change that segments after it depend on.
fn is_barrier(change: &Change) -> bool {
    match change {
        Change::Start(_) => true,
        Change::Gap(gap) => gap.kind == GapKind::MissingWal,
        Change::Base(_) => false,
    }
}

/// The tier of a page: pages of tier k hold fewer than `fanout^(k+1)` times as many segments
/// as the smallest.
fn tier_of(segments: u64, fanout: usize) -> u32 {
    let mut tier = 0;
    let mut bound = fanout as u64;
    while segments >= bound {
        tier += 1;
        bound = bound.saturating_mul(fanout as u64);
    }
    tier
}

fn combine_precision(current: &Generation, pending: &[SegmentEntry]) -> TimeSource {
    let had_history = current.generation > 0 && !current.index_pages.is_empty();
    let mut p = if had_history {
        Some(current.time_precision)
    } else {
        None
    };
    for s in pending {
        p = Some(p.map_or(s.time_source, |p| p.combine(s.time_source)));
    }
    p.unwrap_or(TimeSource::Observed)
}

/// This process, for the `writer` field.
pub fn writer() -> Writer {
    Writer {
        host: hostname(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// The host name, for generations and leases.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tidemark_manifest::model::time_from_micros;
    use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
    use tidemark_manifest::store::{MemoryStore, ObjectStore, StoreOp};

    fn base(id: &str) -> BaseSummary {
        tidemark_manifest::testing::base(id, 1, 1, time_from_micros(1))
    }

    #[tokio::test]
    async fn a_failed_write_keeps_what_it_was_to_record_and_retries_it() {
        let faults = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = faults.clone();
        let repo = Repository::new(store);
        let config = tidemark_manifest::testing::config();
        repo.create_config(&config).await.unwrap();
        let state = repo.load().await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut cp = CheckpointManager::new(repo.clone(), &state, CheckpointOptions::default())
            .with_metrics(Arc::clone(&metrics));
        cp.ensure_started(1).await.unwrap();
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::PutIfAbsent)
                .key_prefix("manifest/")
                .times(2),
        );
        assert!(cp.add_base(base("b1")).await.is_err());
        assert!(cp.has_unwritten() && cp.due());
        assert!(cp.add_base(base("b2")).await.is_err());
        // The store is back: both bases land, in order, in consecutive generations.
        cp.flush().await.unwrap();
        assert!(!cp.has_unwritten());
        let g = repo.current_generation().await.unwrap().unwrap();
        let ids: Vec<&str> = g.bases.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, vec!["b1", "b2"]);
        assert_eq!(g.generation, 3);
        // A create that landed but whose reply was lost is ours when sent again.
        faults.inject(
            FaultRule::new(Fault::LostReply)
                .on(StoreOp::PutIfAbsent)
                .key_prefix("manifest/")
                .times(1),
        );
        assert!(cp.add_base(base("b3")).await.is_err());
        cp.flush().await.unwrap();
        let g = repo.current_generation().await.unwrap().unwrap();
        assert_eq!((g.generation, g.bases.len()), (4, 3));
        // The metrics saw each generation once it was written, and the gap once.
        let sample = |name: &str| -> f64 {
            let text = metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap()
        };
        assert_eq!(sample("tidemark_manifest_generation"), 4.0);
        cp.add_gap(Gap {
            first_seq: 2,
            last_seq: 9,
            kind: GapKind::MissingWal,
            detected_at: time_from_micros(2),
            detail: "test".into(),
        })
        .await
        .unwrap();
        assert_eq!(sample("tidemark_manifest_generation"), 5.0);
        assert_eq!(sample("tidemark_gaps_detected_total"), 1.0);
    }

    #[test]
    fn tiers() {
        assert_eq!(tier_of(1, 16), 0);
        assert_eq!(tier_of(15, 16), 0);
        assert_eq!(tier_of(16, 16), 1);
        assert_eq!(tier_of(255, 16), 1);
        assert_eq!(tier_of(256, 16), 2);
    }
}
