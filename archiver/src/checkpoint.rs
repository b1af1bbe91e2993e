//! The checkpoint manager: turns uploaded segments, new bases and detected gaps into manifest
//! generations (FORMAT.md §4).
//!
//! Segments are durable as soon as they are uploaded (a reader finds them by the tail walk),
//! so generations are written only now and then: when enough segments are pending, when the
//! checkpoint interval has passed, and at once for a base backup or a gap. Each write puts
//! the pending segments into a new index page, then creates the next generation. Index pages
//! are merged in tiers (sixteen pages of one tier become one page of the next) so that a
//! generation stays small however long the history grows.

use std::time::{Duration, Instant};

use tidemark_manifest::model::{
    BaseSummary, FORMAT_VERSION, Gap, GapKind, Generation, IndexPage, IndexPageRef, Retention,
    SegmentEntry, TimeSource, Writer,
};
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use time::OffsetDateTime;

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

/// Writes manifest generations for one repository. The only writer of generations.
#[derive(Debug)]
pub struct CheckpointManager {
    repo: Repository,
    opts: CheckpointOptions,
    current: Generation,
    pending: Vec<SegmentEntry>,
    pending_since: Option<Instant>,
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
        }
    }

    /// The newest generation written (or read at start).
    pub fn current(&self) -> &Generation {
        &self.current
    }

    /// Segments uploaded but not yet in an index page.
    pub fn pending(&self) -> &[SegmentEntry] {
        &self.pending
    }

    /// Before the first segment of a new repository is uploaded: writes generation 1 with
    /// `tail_start_seq` at that segment's first sequence, so that readers can find it.
    pub async fn ensure_started(&mut self, first_seq: u64) -> Result<(), RepoError> {
        if self.current.generation > 0 {
            return Ok(());
        }
        self.write(move |g| g.tail_start_seq = first_seq).await
    }

    /// Records an uploaded segment.
    pub fn segment_uploaded(&mut self, entry: SegmentEntry) {
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.push(entry);
    }

    /// True when pending segments should be written into a generation now.
    pub fn due(&self) -> bool {
        self.pending.len() >= self.opts.max_pending
            || self
                .pending_since
                .is_some_and(|t| t.elapsed() >= self.opts.interval)
    }

    /// When the pending segments will be due by time, if any are pending.
    pub fn due_at(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.opts.interval)
    }

    /// Writes pending segments (if any) into a new generation.
    pub async fn flush(&mut self) -> Result<(), RepoError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write(|_| {}).await
    }

    /// Adds a base backup, in a new generation written at once.
    pub async fn add_base(&mut self, base: BaseSummary) -> Result<(), RepoError> {
        self.write(move |g| g.bases.push(base)).await
    }

    /// Records a gap, in a new generation written at once. After a missing-WAL gap,
    /// segments are found by the tail walk from `gap.last_seq + 1`, so this must be written
    /// before them; other gaps cover records that are archived, and move nothing.
    pub async fn add_gap(&mut self, gap: Gap) -> Result<(), RepoError> {
        let resume = (gap.kind == GapKind::MissingWal).then_some(gap.last_seq + 1);
        self.write(move |g| {
            g.gaps.push(gap);
            if let Some(resume) = resume {
                g.tail_start_seq = g.tail_start_seq.max(resume);
            }
        })
        .await
    }

    /// Pending segments become an index page; `change` edits the next generation; pages are
    /// merged if a tier is full; the generation is created (create-only).
    async fn write(&mut self, change: impl FnOnce(&mut Generation)) -> Result<(), RepoError> {
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
        change(&mut next);
        self.repo.write_generation(&next).await?;
        tracing::info!(
            generation = next.generation,
            segments_indexed = self.pending.len(),
            pages = next.index_pages.len(),
            tail_start_seq = next.tail_start_seq,
            "wrote manifest generation"
        );
        self.current = next;
        self.pending.clear();
        self.pending_since = None;
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

    #[test]
    fn tiers() {
        assert_eq!(tier_of(1, 16), 0);
        assert_eq!(tier_of(15, 16), 0);
        assert_eq!(tier_of(16, 16), 1);
        assert_eq!(tier_of(255, 16), 1);
        assert_eq!(tier_of(256, 16), 2);
    }
}
