//! `list`: what a repository can restore: its bases, the restorable window, the gaps, how
//! precise record times are, and a timeline drawn in plain text.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use tidemark_manifest::model::{Gap, LineageParent, ObjectLock, TimeSource, micros_from_time};
use tidemark_manifest::plan::{History, PointCost, RestoreRates, Window};
use tidemark_manifest::repo::{LoadWarning, ReadFrom, RepoState, Repository};

use super::{load_from, short_time};
use crate::{RestoreError, human_bytes, human_duration};

/// Options of `list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListOptions {
    /// Width of the timeline in columns (the terminal's width when not given).
    pub width: Option<usize>,
    /// The rates restore times are predicted with.
    pub rates: RestoreRates,
}

/// A base backup as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseRow {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The smallest sequence number this base restores to.
    pub earliest_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub earliest_time: OffsetDateTime,
    pub replay_from_seq: u64,
    pub min_log_number: u64,
    pub size: u64,
    pub column_families: Vec<String>,
}

/// One continuous restorable range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeRow {
    pub first_seq: u64,
    pub last_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_time: OffsetDateTime,
}

/// The archived WAL, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentSummary {
    pub count: usize,
    /// Found by the tail walk, after the newest manifest generation.
    pub after_manifest: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

/// The newest restorable point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

/// The predicted restore time of the newest point and of the worst point of the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreTimeReport {
    /// The rates of the prediction.
    pub rates: RestoreRates,
    /// The newest point.
    pub latest: PointCost,
    /// The point with the longest predicted restore time: just before a newer base takes
    /// over, where the most WAL is replayed.
    pub worst: PointCost,
}

/// What `list` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ListReport {
    pub location: String,
    pub repository_id: String,
    pub database_identity: String,
    pub lineage: String,
    pub parent: Option<LineageParent>,
    /// The S3 Object Lock its objects are written with (FORMAT.md §3.2), if any.
    pub object_lock: Option<ObjectLock>,
    /// The generation read: the newest intact one, or the one asked for.
    pub generation: Option<u64>,
    /// The newest generation that exists (newer than `generation` when that one was passed
    /// over as corrupt, or an older one was asked for).
    pub newest_generation: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub generation_written_at: Option<OffsetDateTime>,
    /// What was found damaged or unusual while reading, and worked around.
    pub warnings: Vec<LoadWarning>,
    /// Where record times come from: `observed`, `marker` or `mixed`.
    pub time_precision: Option<TimeSource>,
    pub bases: Vec<BaseRow>,
    pub window: Vec<RangeRow>,
    pub gaps: Vec<Gap>,
    pub segments: SegmentSummary,
    pub latest: Option<Point>,
    /// Predicted restore times; `null` while nothing is restorable.
    pub restore_time: Option<RestoreTimeReport>,
    #[serde(skip)]
    history: History,
    #[serde(skip)]
    window_ranges: Window,
}

/// Reads the repository's state and sums it up.
pub async fn run(repo: &Repository, opts: &ListOptions) -> Result<ListReport, RestoreError> {
    run_from(repo, ReadFrom::NewestIntact, opts).await
}

/// Reads the repository's state from the generation `from` says and sums it up.
pub async fn run_from(
    repo: &Repository,
    from: ReadFrom,
    opts: &ListOptions,
) -> Result<ListReport, RestoreError> {
    let state = load_from(repo, from).await?;
    Ok(report(repo.location(), &state, &opts.rates))
}

/// The report for a loaded state, restore times predicted with `rates`.
pub fn report(location: String, state: &RepoState, rates: &RestoreRates) -> ListReport {
    let h = &state.history;
    let window = h.window();
    let g = state.generation.as_ref();
    let segs = &h.segments;
    ListReport {
        location,
        repository_id: state.config.repository_id.clone(),
        database_identity: state.config.database_identity.clone(),
        lineage: state.config.lineage.id.clone(),
        parent: state.config.lineage.parent.clone(),
        object_lock: state.config.object_lock,
        generation: g.map(|g| g.generation),
        newest_generation: state.newest_generation,
        generation_written_at: g.map(|g| g.written_at),
        warnings: state.warnings.clone(),
        time_precision: g.map(|g| g.time_precision),
        bases: h
            .bases
            .iter()
            .map(|b| BaseRow {
                id: b.id.clone(),
                created_at: b.created_at,
                earliest_seq: b.earliest_seq,
                earliest_time: b.earliest_time,
                replay_from_seq: b.replay_from_seq,
                min_log_number: b.min_log_number,
                size: b.total_size,
                column_families: b.column_families.iter().map(|c| c.name.clone()).collect(),
            })
            .collect(),
        window: window
            .ranges
            .iter()
            .map(|r| RangeRow {
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                first_time: r.first_time,
                last_time: r.last_time,
            })
            .collect(),
        gaps: h.gaps.clone(),
        segments: SegmentSummary {
            count: segs.len(),
            after_manifest: state.tail_segments,
            first_seq: segs.first().map(|s| s.first_seq),
            last_seq: segs.last().map(|s| s.last_seq),
            stored_bytes: segs.iter().map(|s| s.stored_size).sum(),
            raw_bytes: segs.iter().map(|s| s.raw_size).sum(),
        },
        latest: window.ranges.last().map(|r| Point {
            seq: r.last_seq,
            time: r.last_time,
        }),
        restore_time: h
            .latest_cost(rates)
            .zip(h.worst_cost(rates))
            .map(|(latest, worst)| RestoreTimeReport {
                rates: *rates,
                latest,
                worst,
            }),
        history: h.clone(),
        window_ranges: window,
    }
}

/// What [`ListReport::render`] says about time precision.
pub fn precision_note(p: Option<TimeSource>) -> &'static str {
    match p {
        Some(TimeSource::Marker) => {
            "exact: every record carries the application's commit time (time marker)"
        }
        Some(TimeSource::Mixed) => {
            "mixed: some records carry the application's commit time, the others the time the \
             archiver read them (at most its poll interval after the commit)"
        }
        Some(TimeSource::Observed) => {
            "observed: record times are when the archiver read them, an upper bound of the \
             commit time (normally within its poll interval)"
        }
        None => "unknown (no manifest generation yet)",
    }
}

impl ListReport {
    /// The report as text, with a timeline `width` columns wide.
    pub fn render(&self, width: usize) -> String {
        let mut out = String::new();
        self.render_warnings(&mut out);
        self.render_repository(&mut out);
        self.render_bases(&mut out);
        self.render_window(&mut out);
        self.render_restore_time(&mut out);
        self.render_gaps_and_wal(&mut out);
        for line in timeline(&self.history, &self.window_ranges, width) {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// What loading passed over: damage, and notes.
    fn render_warnings(&self, w: &mut String) {
        for warning in &self.warnings {
            let label = if warning.damage { "DAMAGED" } else { "Note" };
            let _ = match &warning.object {
                Some(o) => writeln!(w, "{label}: {o}: {}", warning.message),
                None => writeln!(w, "{label}: {}", warning.message),
            };
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(w);
        }
    }

    /// Which repository, which generation, and how exact its times are.
    fn render_repository(&self, w: &mut String) {
        let _ = writeln!(w, "Repository  {}", self.location);
        let _ = writeln!(
            w,
            "            id {}, database {}\n            lineage {}",
            self.repository_id, self.database_identity, self.lineage
        );
        if let Some(p) = &self.parent {
            let _ = writeln!(
                w,
                "            restored from {} (lineage {}) at sequence {}",
                p.repository, p.lineage, p.sequence
            );
        }
        if let Some(lock) = &self.object_lock {
            let _ = writeln!(
                w,
                "            object lock {lock}: objects cannot be deleted or overwritten \
                 for {} days after they are written",
                lock.days
            );
        }
        match (self.generation, self.generation_written_at) {
            (Some(g), Some(at)) => {
                let newest = if self.newest_generation > g {
                    format!(" (the newest is {})", self.newest_generation)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    w,
                    "Manifest    generation {g}{newest}, written {}",
                    short_time(at)
                );
            }
            _ => {
                let _ = writeln!(w, "Manifest    none yet: nothing has been archived");
            }
        }
        let _ = writeln!(w, "Times       {}", precision_note(self.time_precision));
        let _ = writeln!(w);
    }

    /// The base backups, one a line.
    fn render_bases(&self, w: &mut String) {
        let _ = writeln!(w, "Base backups ({}):", self.bases.len());
        if self.bases.is_empty() {
            let _ = writeln!(
                w,
                "  none: nothing can be restored until the archiver takes one"
            );
        } else {
            let _ = writeln!(
                w,
                "  {:<28}  {:<27}  {:>12}  {:<27}  {:>10}",
                "ID", "CREATED", "EARLIEST SEQ", "EARLIEST TIME", "SIZE"
            );
            for b in &self.bases {
                let _ = writeln!(
                    w,
                    "  {:<28}  {:<27}  {:>12}  {:<27}  {:>10}",
                    b.id,
                    short_time(b.created_at),
                    b.earliest_seq,
                    short_time(b.earliest_time),
                    human_bytes(b.size)
                );
            }
        }
        let _ = writeln!(w);
    }

    /// The restorable window and its latest point.
    fn render_window(&self, w: &mut String) {
        let _ = writeln!(w, "Restorable window:");
        if self.window.is_empty() {
            let _ = writeln!(w, "  nothing is restorable yet");
        }
        for r in &self.window {
            let _ = writeln!(
                w,
                "  sequences {}..={}  {} .. {}",
                r.first_seq,
                r.last_seq,
                short_time(r.first_time),
                short_time(r.last_time)
            );
        }
        if let Some(p) = &self.latest {
            let _ = writeln!(w, "  latest: sequence {} at {}", p.seq, short_time(p.time));
        }
        let _ = writeln!(w);
    }

    /// The predicted restore times, and what they are made of.
    fn render_restore_time(&self, w: &mut String) {
        let Some(t) = &self.restore_time else {
            return;
        };
        let _ = writeln!(
            w,
            "Predicted restore time (at {}/s download, {} WAL records/s replay):",
            human_bytes(t.rates.download_bytes_per_sec),
            t.rates.replay_records_per_sec
        );
        for (label, p) in [("latest", &t.latest), ("worst", &t.worst)] {
            let _ = writeln!(
                w,
                "  {label:<6}  sequence {}: {}  (base {} of {}, then {} of WAL, {} records to \
                 replay)",
                p.seq,
                human_duration(std::time::Duration::from_millis(p.predicted_ms)),
                p.base,
                human_bytes(p.cost.base_bytes),
                human_bytes(p.cost.wal_bytes),
                p.cost.wal_records
            );
        }
        let _ = writeln!(w);
    }

    /// The gaps in the history, and the WAL segments.
    fn render_gaps_and_wal(&self, w: &mut String) {
        let _ = writeln!(w, "Gaps ({}):", self.gaps.len());
        for g in &self.gaps {
            let kind = serde_json::to_value(g.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", g.kind));
            let _ = writeln!(
                w,
                "  sequences {}..={}  {kind}, detected {}: {}",
                g.first_seq,
                g.last_seq,
                short_time(g.detected_at),
                g.detail
            );
        }
        let s = &self.segments;
        let _ = writeln!(w);
        match (s.first_seq, s.last_seq) {
            (Some(first), Some(last)) => {
                let _ = writeln!(
                    w,
                    "WAL: {} segments ({} after the newest manifest), sequences {first}..={last}, \
                     {} stored ({} uncompressed)",
                    s.count,
                    s.after_manifest,
                    human_bytes(s.stored_bytes),
                    human_bytes(s.raw_bytes)
                );
            }
            _ => {
                let _ = writeln!(w, "WAL: no segments");
            }
        }
        let _ = writeln!(w);
    }
}

/// What one timeline column shows; higher values win when several meet in one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cell {
    Empty,
    Archived,
    Restorable,
    Gap,
    Base,
}

impl Cell {
    fn glyph(self) -> char {
        match self {
            Cell::Empty => ' ',
            Cell::Archived => '-',
            Cell::Restorable => '=',
            Cell::Gap => 'x',
            Cell::Base => 'B',
        }
    }
}

/// A plain-text timeline of the repository, `width` columns wide (including a two-space
/// indent): base backups as `B`, restorable time as `=`, archived but not restorable time as
/// `-`, lost WAL as `x`. Every gap and every base gets at least one column.
pub fn timeline(h: &History, window: &Window, width: usize) -> Vec<String> {
    let mut spans: Vec<(i64, i64, Cell)> = Vec::new();
    for s in &h.segments {
        spans.push((
            micros_from_time(s.first_time),
            micros_from_time(s.last_time),
            Cell::Archived,
        ));
    }
    for r in &window.ranges {
        spans.push((
            micros_from_time(r.first_time),
            micros_from_time(r.last_time),
            Cell::Restorable,
        ));
    }
    for g in &h.gaps {
        let before = h
            .segments
            .iter()
            .rev()
            .find(|s| s.last_seq < g.first_seq)
            .map(|s| micros_from_time(s.last_time));
        let after = h
            .segments
            .iter()
            .find(|s| s.first_seq > g.last_seq)
            .map(|s| micros_from_time(s.first_time));
        if let Some((a, b)) = match (before, after) {
            (Some(a), Some(b)) => Some((a, b)),
            (Some(a), None) => Some((a, a)),
            (None, Some(b)) => Some((b, b)),
            (None, None) => None,
        } {
            spans.push((a.min(b), a.max(b), Cell::Gap));
        }
    }
    let markers: Vec<i64> = h
        .bases
        .iter()
        .map(|b| micros_from_time(b.earliest_time))
        .collect();
    let all = spans
        .iter()
        .flat_map(|&(a, b, _)| [a, b])
        .chain(markers.iter().copied());
    let (Some(t_min), Some(t_max)) = (all.clone().min(), all.max()) else {
        return vec!["Timeline: nothing archived yet".to_owned()];
    };
    let cols = width.saturating_sub(2).clamp(10, 400);
    let span = (t_max - t_min).max(0) as i128;
    let col = |t: i64| -> usize {
        if span == 0 {
            0
        } else {
            (((t - t_min) as i128 * (cols as i128 - 1)) / span) as usize
        }
    };
    let mut cells = vec![Cell::Empty; cols];
    for &(a, b, kind) in &spans {
        for c in &mut cells[col(a)..=col(b)] {
            *c = (*c).max(kind);
        }
    }
    for &m in &markers {
        cells[col(m)] = Cell::Base;
    }
    let bar: String = cells.iter().map(|c| c.glyph()).collect();
    let first = tidemark_manifest::model::time_from_micros(t_min);
    let last = tidemark_manifest::model::time_from_micros(t_max);
    let per_col = std::time::Duration::from_micros((span as u64) / (cols as u64).max(1));
    let left = short_time(first);
    let right = short_time(last);
    let labels = if left.len() + right.len() < cols {
        format!(
            "{left}{}{right}",
            " ".repeat(cols - left.len() - right.len())
        )
    } else {
        format!("{left} .. {right}")
    };
    vec![
        format!(
            "Timeline (one column ≈ {}):",
            if span == 0 {
                "an instant".to_owned()
            } else {
                human_duration(per_col)
            }
        ),
        format!("  {bar}"),
        format!("  {labels}"),
        "  B base backup   = restorable   - archived, not restorable   x lost WAL (gap)".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::model::{BaseSummary, GapKind, SegmentEntry};
    use tidemark_manifest::testing;

    fn t(sec: i64) -> OffsetDateTime {
        testing::at_secs(sec)
    }

    fn seg(first: u64, last: u64, t1: i64, t2: i64) -> SegmentEntry {
        SegmentEntry {
            raw_size: 100,
            ..testing::segment(first, last, t(t1), t(t2))
        }
    }

    fn base(id: &str, replay_from: u64, earliest: u64, at: i64) -> BaseSummary {
        BaseSummary {
            column_families: testing::default_cf(),
            total_size: 1 << 20,
            ..testing::base(id, replay_from, earliest, t(at))
        }
    }

    /// 0..100 s archived; base at 10 s; gap of WAL between 40 s and 60 s; base at 70 s.
    fn history() -> History {
        History {
            bases: vec![base("b1", 1, 50, 10), base("b2", 301, 350, 70)],
            segments: vec![
                seg(1, 100, 0, 20),
                seg(101, 200, 20, 40),
                seg(301, 400, 60, 80),
                seg(401, 500, 80, 100),
            ],
            gaps: vec![Gap {
                first_seq: 201,
                last_seq: 300,
                kind: GapKind::MissingWal,
                detected_at: t(60),
                detail: "WAL 000012.log was deleted before it was archived".into(),
            }],
        }
    }

    #[test]
    fn the_timeline_shows_bases_ranges_and_gaps_in_time_order() {
        let h = history();
        let lines = timeline(&h, &h.window(), 52);
        let bar = lines[1].trim_start_matches("  ");
        assert_eq!(bar.chars().count(), 50, "{lines:#?}");
        // 0..10 s archived only, the base at 10 s, restorable to 40 s, the gap, archived
        // 60..70 s, the second base, restorable to the end.
        let expected_shape = ["-", "B", "=", "x", "-", "B", "="];
        let mut shape: Vec<String> = Vec::new();
        for c in bar.chars() {
            if shape.last().is_none_or(|l| !l.starts_with(c)) {
                shape.push(c.to_string());
            }
        }
        assert_eq!(shape, expected_shape, "{bar}");
        assert!(lines[2].contains(&short_time(t(0))) && lines[2].contains(&short_time(t(100))));
        assert!(lines[0].contains("one column ≈ 2.0s"), "{}", lines[0]);
    }

    #[test]
    fn a_tiny_gap_still_gets_a_column() {
        let mut h = history();
        h.segments[2] = seg(301, 400, 40, 80);
        let bar = timeline(&h, &h.window(), 22)[1].clone();
        assert!(bar.contains('x'), "{bar}");
        let empty = timeline(&History::default(), &Window::default(), 80);
        assert_eq!(empty, vec!["Timeline: nothing archived yet"]);
    }
}
