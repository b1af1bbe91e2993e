//! Which base backup and which segments restore a sequence number or a time, what the
//! restorable window is, and whether a repository's history holds together.
//!
//! Everything here works on a [`History`]: the bases, segments and gaps of one manifest
//! generation plus the segments found after it. Nothing here touches a store.

use crate::model::{BaseSummary, Gap, SegmentEntry, micros_from_time, time_from_micros};
use crate::segment::Record;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use time::OffsetDateTime;

/// A restore target: the point a restore, a verification or a drill brings the database to.
/// The one type for it everywhere: the planner, the restore tool's options and reports.
///
/// In JSON: `"latest"`, `{"seq": 42}`, `{"time": "2026-11-23T13:30:00.5Z"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The state right after sequence number `n` (rounded down to a whole batch).
    Seq(u64),
    /// Every record committed at or before this time, none after.
    Time(#[serde(with = "time::serde::rfc3339")] OffsetDateTime),
    /// The newest archived point.
    Latest,
}

/// For messages: `sequence 42`, `time 2026-11-23T13:30:00Z`, `the latest point`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Seq(n) => write!(f, "sequence {n}"),
            Target::Time(t) => write!(f, "time {}", fmt_time(*t)),
            Target::Latest => write!(f, "the latest point"),
        }
    }
}

/// A target written as one word that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetSyntaxError {
    #[error("{input:?}: {seq:?} is not a sequence number (seq:N, e.g. seq:1234)")]
    Seq { input: String, seq: String },
    #[error("{input:?} is not {forms} or a time: {reason}")]
    Time {
        input: String,
        /// The other forms the caller accepts, e.g. `latest, seq:N`.
        forms: &'static str,
        reason: String,
    },
}

impl Target {
    /// Reads a target written as one word: `latest` (any case), `seq:N`, or a time, which
    /// `parse_time` reads (the restore tool passes its `--time` reader, so every form
    /// `--time` accepts works). `forms` names the forms the caller accepts besides a time,
    /// for the error message.
    pub fn parse<E: fmt::Display>(
        input: &str,
        forms: &'static str,
        parse_time: impl FnOnce(&str) -> Result<OffsetDateTime, E>,
    ) -> Result<Target, TargetSyntaxError> {
        let s = input.trim();
        if s.eq_ignore_ascii_case("latest") {
            return Ok(Target::Latest);
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n
                .trim()
                .parse()
                .map(Target::Seq)
                .map_err(|_| TargetSyntaxError::Seq {
                    input: input.to_owned(),
                    seq: n.to_owned(),
                });
        }
        parse_time(s)
            .map(Target::Time)
            .map_err(|e| TargetSyntaxError::Time {
                input: input.to_owned(),
                forms,
                reason: e.to_string(),
            })
    }

    /// For reports: `the latest archived point`, `sequence 42`,
    /// `time 2026-11-23 13:30:00.500000Z` (see [`short_time`]).
    pub fn describe(self) -> String {
        match self {
            Target::Latest => "the latest archived point".to_owned(),
            Target::Seq(n) => format!("sequence {n}"),
            Target::Time(t) => format!("time {}", short_time(t)),
        }
    }
}

/// A time as `2026-11-23 13:30:00.123456Z` (UTC, microseconds: the precision of record
/// times), for people.
pub fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Formats a time for messages: RFC 3339, UTC.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// One continuous restorable range: every sequence in `first_seq..=last_seq` can be restored
/// to (at whole-batch boundaries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRange {
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time: OffsetDateTime,
    pub last_time: OffsetDateTime,
}

/// The restorable window: continuous ranges in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub ranges: Vec<WindowRange>,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return write!(f, "nothing is restorable yet");
        }
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(
                f,
                "sequences {}..={} ({} .. {})",
                r.first_seq,
                r.last_seq,
                fmt_time(r.first_time),
                fmt_time(r.last_time)
            )?;
        }
        Ok(())
    }
}

impl Window {
    /// The range holding `seq`, if any.
    pub fn range_of(&self, seq: u64) -> Option<&WindowRange> {
        self.ranges
            .iter()
            .find(|r| r.first_seq <= seq && seq <= r.last_seq)
    }
}

/// Why a target cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the repository has no base backup yet, so nothing can be restored")]
    NoBase,
    #[error("{target} is before the restorable window; the window is: {window}")]
    BeforeWindow { target: Target, window: Window },
    #[error(
        "{target} is after the newest archived point; the window is: {window}. Use --latest for the newest point"
    )]
    AfterWindow { target: Target, window: Window },
    #[error(
        "{target} falls in a gap: sequences {}..={} cannot be restored ({:?}: {}); the window is: {window}",
        gap.first_seq, gap.last_seq, gap.kind, gap.detail
    )]
    InGap {
        target: Target,
        gap: Gap,
        window: Window,
    },
    #[error("{target} is not restorable: no base backup covers it; the window is: {window}")]
    NotCovered { target: Target, window: Window },
}

/// A problem with a repository's history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryProblem {
    #[error("segments {a} and {b} overlap (sequences {a_last} and {b_first})")]
    Overlap {
        a: String,
        b: String,
        a_last: u64,
        b_first: u64,
    },
    #[error(
        "sequences {first}..={last} are missing between {before} and {after}, and no gap records \
         them: a segment is lost"
    )]
    Hole {
        first: u64,
        last: u64,
        before: String,
        after: String,
    },
    #[error("segment {key} overlaps the recorded gap {first}..={last}")]
    SegmentInGap { key: String, first: u64, last: u64 },
    #[error("base {base}: {detail}")]
    Base { base: String, detail: String },
}

/// What to restore: a base and the segments to replay onto it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    pub target: Target,
    pub base: BaseSummary,
    /// Segments from the one holding `base.replay_from_seq` to the one holding the cutoff,
    /// in order. Only records with a log number `>= base.min_log_number` are replayed.
    pub segments: Vec<SegmentEntry>,
    /// The cutoff is at most this sequence; [`CutoffFilter`] finds the exact batch boundary.
    pub max_seq: u64,
    /// The cutoff is at least this sequence.
    pub min_seq: u64,
}

impl RestorePlan {
    /// The filter that decides, record by record, what is replayed.
    pub fn filter(&self) -> CutoffFilter {
        CutoffFilter::new(self.target, self.max_seq)
    }

    /// Bytes to download for the segments.
    pub fn segment_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.stored_size).sum()
    }
}

/// Decides record by record whether a record is at or before the cutoff: a record is
/// admitted while it ends at or before the target sequence (whole batches only) and its
/// time is at or before the target time. Once a record is refused, all later ones are.
#[derive(Debug, Clone)]
pub struct CutoffFilter {
    max_seq: u64,
    max_time_us: Option<i64>,
    closed: bool,
    last_admitted: Option<u64>,
}

impl CutoffFilter {
    fn new(target: Target, max_seq: u64) -> CutoffFilter {
        let max_time_us = match target {
            Target::Time(t) => Some(micros_from_time(t)),
            _ => None,
        };
        CutoffFilter {
            max_seq,
            max_time_us,
            closed: false,
            last_admitted: None,
        }
    }

    /// True if `r` belongs to the restored state.
    pub fn admit(&mut self, r: &Record) -> bool {
        if self.closed {
            return false;
        }
        let end = r.next_seq().saturating_sub(1);
        let ok = end <= self.max_seq && self.max_time_us.is_none_or(|t| r.time_us <= t);
        if ok {
            if r.count > 0 {
                self.last_admitted = Some(end);
            }
        } else {
            self.closed = true;
        }
        ok
    }

    /// True once a record was refused: nothing later can be admitted.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The last sequence number admitted so far.
    pub fn last_admitted(&self) -> Option<u64> {
        self.last_admitted
    }
}

/// The bases, segments and gaps of a repository.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub bases: Vec<BaseSummary>,
    /// In sequence order.
    pub segments: Vec<SegmentEntry>,
    pub gaps: Vec<Gap>,
}

impl History {
    /// Checks the history: segments in order without overlaps, every hole recorded as a
    /// gap, no segment inside a missing or pruned range, bases with sane ranges.
    pub fn problems(&self) -> Vec<HistoryProblem> {
        let mut out = Vec::new();
        for w in self.segments.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.first_seq <= a.last_seq {
                out.push(HistoryProblem::Overlap {
                    a: a.key.clone(),
                    b: b.key.clone(),
                    a_last: a.last_seq,
                    b_first: b.first_seq,
                });
            } else if b.first_seq != a.last_seq + 1 {
                let (first, last) = (a.last_seq + 1, b.first_seq - 1);
                let covered = self.gaps.iter().any(|g| {
                    g.kind.has_no_segments() && g.first_seq <= first && last <= g.last_seq
                });
                if !covered {
                    out.push(HistoryProblem::Hole {
                        first,
                        last,
                        before: a.key.clone(),
                        after: b.key.clone(),
                    });
                }
            }
        }
        for g in self.gaps.iter().filter(|g| g.kind.has_no_segments()) {
            for s in &self.segments {
                if s.first_seq <= g.last_seq && g.first_seq <= s.last_seq {
                    out.push(HistoryProblem::SegmentInGap {
                        key: s.key.clone(),
                        first: g.first_seq,
                        last: g.last_seq,
                    });
                }
            }
        }
        for b in &self.bases {
            if b.replay_from_seq > b.earliest_seq.saturating_add(1) {
                out.push(HistoryProblem::Base {
                    base: b.id.clone(),
                    detail: format!(
                        "replay starts at sequence {} but the base claims to restore to {}",
                        b.replay_from_seq, b.earliest_seq
                    ),
                });
            }
        }
        out
    }

    /// Index of the segment holding `seq`.
    fn segment_holding(&self, seq: u64) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.last_seq < seq);
        (i < self.segments.len() && self.segments[i].first_seq <= seq).then_some(i)
    }

    /// The highest sequence reachable from `from` through contiguous segments
    /// (`from - 1` if no segment holds `from`), and the index of the last segment used.
    fn reach(&self, from: u64) -> (u64, Option<usize>) {
        let Some(mut i) = self.segment_holding(from) else {
            return (from.saturating_sub(1), None);
        };
        while i + 1 < self.segments.len()
            && self.segments[i].last_seq.checked_add(1) == Some(self.segments[i + 1].first_seq)
        {
            i += 1;
        }
        (self.segments[i].last_seq, Some(i))
    }

    /// The first gap of a kind that cuts a base's range (anything but a missing or pruned range,
    /// whose effect already shows as missing segments) starting in `from..=to`.
    fn cutting_gap(&self, from: u64, to: u64) -> Option<&Gap> {
        self.gaps
            .iter()
            .filter(|g| !g.kind.has_no_segments())
            .filter(|g| from <= g.first_seq && g.first_seq <= to)
            .min_by_key(|g| g.first_seq)
    }

    /// The range one base can restore to, if any.
    fn base_range(&self, b: &BaseSummary) -> Option<WindowRange> {
        let (mut last, last_idx) = self.reach(b.replay_from_seq);
        let mut last_time = match last_idx {
            Some(i) => self.segments[i].last_time,
            None => b.earliest_time,
        };
        if let Some(g) = self.cutting_gap(b.earliest_seq.saturating_add(1), last) {
            last = g.first_seq.saturating_sub(1);
            // The time of `last` is at most the time of the segment that holds it.
            last_time = self
                .segment_holding(last)
                .map_or(b.earliest_time, |i| self.segments[i].last_time);
        }
        (last >= b.earliest_seq).then(|| WindowRange {
            first_seq: b.earliest_seq,
            last_seq: last,
            first_time: b.earliest_time,
            last_time: last_time.max(b.earliest_time),
        })
    }

    /// The restorable window: the union of every base's range.
    pub fn window(&self) -> Window {
        let mut ranges: Vec<WindowRange> = self
            .bases
            .iter()
            .filter_map(|b| self.base_range(b))
            .collect();
        ranges.sort_by_key(|r| (r.first_seq, r.last_seq));
        let mut merged: Vec<WindowRange> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(m) if r.first_seq <= m.last_seq.saturating_add(1) => {
                    if r.last_seq > m.last_seq {
                        m.last_seq = r.last_seq;
                        m.last_time = r.last_time;
                    }
                }
                _ => merged.push(r),
            }
        }
        Window { ranges: merged }
    }

    /// The newest point in the window.
    pub fn latest_seq(&self) -> Option<u64> {
        self.window().ranges.last().map(|r| r.last_seq)
    }

    /// Plans a restore to `target`.
    pub fn plan(&self, target: Target) -> Result<RestorePlan, PlanError> {
        if self.bases.is_empty() {
            return Err(PlanError::NoBase);
        }
        let window = self.window();
        let (min_seq, max_seq) = match target {
            Target::Latest => {
                let Some(last) = window.ranges.last() else {
                    return Err(PlanError::NotCovered { target, window });
                };
                (last.last_seq, last.last_seq)
            }
            Target::Seq(n) => (n, n),
            Target::Time(t) => self.seq_bounds_for_time(t, target, &window)?,
        };
        if let Some(g) = self
            .gaps
            .iter()
            .find(|g| g.first_seq <= min_seq && min_seq <= g.last_seq)
        {
            return Err(PlanError::InGap {
                target,
                gap: g.clone(),
                window,
            });
        }
        let Some(first) = window.ranges.first() else {
            return Err(PlanError::NotCovered { target, window });
        };
        if min_seq < first.first_seq {
            return Err(PlanError::BeforeWindow { target, window });
        }
        let last = window.ranges.last().expect("non-empty");
        if min_seq > last.last_seq {
            return Err(PlanError::AfterWindow { target, window });
        }
        // The newest base whose own range holds the cutoff.
        let base = self
            .bases
            .iter()
            .filter_map(|b| self.base_range(b).map(|r| (b, r)))
            .filter(|(_, r)| r.first_seq <= min_seq && min_seq <= r.last_seq)
            .max_by_key(|(b, _)| (b.earliest_seq, b.created_at))
            .map(|(b, r)| (b.clone(), r));
        let Some((base, range)) = base else {
            return Err(PlanError::NotCovered { target, window });
        };
        let max_seq = max_seq.min(range.last_seq);
        let segments = match self.segment_holding(base.replay_from_seq) {
            Some(start) if base.replay_from_seq <= max_seq => self.segments[start..]
                .iter()
                .take_while(|s| s.first_seq <= max_seq)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        Ok(RestorePlan {
            target,
            base,
            segments,
            max_seq,
            min_seq,
        })
    }

    /// Bounds of the cutoff for a time target, from segment times alone: the exact cutoff
    /// is found by [`CutoffFilter`] while replaying the last segment.
    fn seq_bounds_for_time(
        &self,
        t: OffsetDateTime,
        target: Target,
        window: &Window,
    ) -> Result<(u64, u64), PlanError> {
        let first_time = window.ranges.first().map(|r| r.first_time);
        if first_time.is_none_or(|ft| t < ft) {
            return Err(PlanError::BeforeWindow {
                target,
                window: window.clone(),
            });
        }
        let last_time = window.ranges.last().map(|r| r.last_time);
        let newest_record_time = self.segments.last().map(|s| s.last_time).or(last_time);
        if newest_record_time.is_some_and(|nt| t > nt) {
            return Err(PlanError::AfterWindow {
                target,
                window: window.clone(),
            });
        }
        // The last segment that starts at or before t.
        let i = self.segments.partition_point(|s| s.first_time <= t);
        let (mut lo, hi) = if i == 0 {
            (0, 0)
        } else {
            let s = &self.segments[i - 1];
            if s.last_time <= t {
                // Records lost in a gap right after this segment may have been committed
                // before t: the state at t is unknown.
                if let Some(g) = self.gaps.iter().find(|g| {
                    g.kind.has_no_segments()
                        && g.first_seq <= s.last_seq.saturating_add(1)
                        && s.last_seq < g.last_seq
                }) {
                    return Err(PlanError::InGap {
                        target,
                        gap: g.clone(),
                        window: window.clone(),
                    });
                }
                (s.last_seq, s.last_seq)
            } else {
                (s.first_seq, s.last_seq)
            }
        };
        // A base whose own point is at or before t is a valid cutoff on its own.
        if let Some(b) = self
            .bases
            .iter()
            .filter(|b| b.earliest_time <= t && b.earliest_seq > lo)
            .max_by_key(|b| b.earliest_seq)
        {
            lo = b.earliest_seq;
        }
        Ok((lo, hi.max(lo)))
    }
}

/// What restoring one point costs: the base's files, and the WAL segments downloaded and
/// replayed onto them. The WAL of a restore from base `b` is every segment from the one
/// holding `b.replay_from_seq` (RocksDB's recovery of the base's files starts there, with
/// what it had not flushed into table files when the base was taken) to the one holding the
/// cutoff ([`RestorePlan::segments`], [`replays_onto`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RestoreCost {
    /// Bytes of the base's files (`total_size`).
    pub base_bytes: u64,
    /// Bytes of the segments, as stored (what is downloaded).
    pub wal_bytes: u64,
    /// WAL records (write batches) in those segments: what RocksDB's recovery replays.
    pub wal_records: u64,
}

/// How fast a restore goes on the machine that restores: the rates [`RestoreCost::predict`]
/// turns a cost into a time with. The defaults were measured on the project's 2-core test
/// machine (README, "Performance"; docs/operations.md says how to measure your own with a
/// drill, whose report gives the rates it achieved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRates {
    /// Bytes per second fetched from the store and written to disk (base files and
    /// segments, each checked against its sha256).
    pub download_bytes_per_sec: u64,
    /// WAL records per second re-created as WAL files and replayed by RocksDB's recovery.
    pub replay_records_per_sec: u64,
}

impl RestoreRates {
    /// Download rate by default: 100 MB/s, what a release build re-creates the WAL at
    /// from segments on the test machine (base files go faster).
    pub const DEFAULT_DOWNLOAD_BYTES_PER_SEC: u64 = 100_000_000;
    /// Replay rate by default: 250,000 records/s, RocksDB's recovery of re-created WAL on
    /// the test machine.
    pub const DEFAULT_REPLAY_RECORDS_PER_SEC: u64 = 250_000;
    /// What every restore costs besides its bytes and records: reading the repository,
    /// planning, opening the database.
    pub const FIXED: Duration = Duration::from_millis(100);
}

impl Default for RestoreRates {
    fn default() -> RestoreRates {
        RestoreRates {
            download_bytes_per_sec: Self::DEFAULT_DOWNLOAD_BYTES_PER_SEC,
            replay_records_per_sec: Self::DEFAULT_REPLAY_RECORDS_PER_SEC,
        }
    }
}

/// True when a restore from `base` downloads and replays the segment that ends at
/// `segment_last_seq`: it holds the base's `replay_from_seq` or a later record.
pub fn replays_onto(base: &BaseSummary, segment_last_seq: u64) -> bool {
    segment_last_seq >= base.replay_from_seq
}

impl RestoreCost {
    /// The cost of restoring `base`'s own files, before any WAL.
    pub fn of_base(base: &BaseSummary) -> RestoreCost {
        RestoreCost {
            base_bytes: base.total_size,
            ..RestoreCost::default()
        }
    }

    /// Adds a segment of `stored_bytes` holding `records` WAL records.
    pub fn add_wal(&mut self, stored_bytes: u64, records: u64) {
        self.wal_bytes = self.wal_bytes.saturating_add(stored_bytes);
        self.wal_records = self.wal_records.saturating_add(records);
    }

    /// The predicted restore time: `FIXED + (base_bytes + wal_bytes) / download rate +
    /// wal_records / replay rate`. Rates of zero count as one per second.
    pub fn predict(&self, rates: &RestoreRates) -> Duration {
        RestoreRates::FIXED.saturating_add(self.transfer_time(rates))
    }

    /// [`RestoreCost::predict`] without the fixed part: what the bytes and records cost.
    pub fn transfer_time(&self, rates: &RestoreRates) -> Duration {
        let bytes = self.base_bytes.saturating_add(self.wal_bytes) as f64;
        let secs = bytes / rates.download_bytes_per_sec.max(1) as f64
            + self.wal_records as f64 / rates.replay_records_per_sec.max(1) as f64;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// The predicted restore time of one point of the window, and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PointCost {
    /// The point: the restore's cutoff.
    pub seq: u64,
    /// The base a restore of it starts from.
    pub base: String,
    #[serde(flatten)]
    pub cost: RestoreCost,
    /// [`RestoreCost::predict`] of `cost`, in milliseconds.
    pub predicted_ms: u64,
}

impl PointCost {
    fn new(seq: u64, base: &str, cost: RestoreCost, rates: &RestoreRates) -> PointCost {
        PointCost {
            seq,
            base: base.to_owned(),
            cost,
            predicted_ms: u64::try_from(cost.predict(rates).as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn of(plan: &RestorePlan, rates: &RestoreRates) -> PointCost {
        PointCost::new(plan.max_seq, &plan.base.id, plan.cost(), rates)
    }
}

impl RestorePlan {
    /// What this restore downloads and replays.
    pub fn cost(&self) -> RestoreCost {
        let mut cost = RestoreCost::of_base(&self.base);
        for s in &self.segments {
            cost.add_wal(s.stored_size, u64::from(s.record_count));
        }
        cost
    }
}

impl History {
    /// The predicted restore time of `target`, and what it is made of.
    pub fn cost_of(&self, target: Target, rates: &RestoreRates) -> Result<PointCost, PlanError> {
        Ok(PointCost::of(&self.plan(target)?, rates))
    }

    /// The predicted restore time of the newest point of the window.
    pub fn latest_cost(&self, rates: &RestoreRates) -> Option<PointCost> {
        self.cost_of(Target::Latest, rates).ok()
    }

    /// The point of the window with the longest predicted restore time: of the points just
    /// before a newer base takes over and the ends of the window's ranges, the one whose
    /// restore replays the most onto its base.
    pub fn worst_cost(&self, rates: &RestoreRates) -> Option<PointCost> {
        // Each base's range once, and running sums over the segments: every candidate's
        // plan as `plan` makes it (the newest base whose range holds it; the segments from
        // the one holding its `replay_from_seq` to the point), without planning each one
        // (a repository may hold thousands of bases and millions of segments).
        let ranges: Vec<(&BaseSummary, WindowRange)> = self
            .bases
            .iter()
            .filter_map(|b| self.base_range(b).map(|r| (b, r)))
            .collect();
        let mut sums = Vec::with_capacity(self.segments.len() + 1);
        let mut total = RestoreCost::default();
        sums.push(total);
        for s in &self.segments {
            total.add_wal(s.stored_size, u64::from(s.record_count));
            sums.push(total);
        }
        let window = self.window();
        let mut points: Vec<u64> = window.ranges.iter().map(|r| r.last_seq).collect();
        points.extend(
            self.bases
                .iter()
                .map(|b| b.earliest_seq.saturating_sub(1))
                .filter(|p| window.range_of(*p).is_some()),
        );
        points.sort_unstable();
        points.dedup();
        points
            .into_iter()
            .filter(|p| {
                !self
                    .gaps
                    .iter()
                    .any(|g| g.first_seq <= *p && *p <= g.last_seq)
            })
            .filter_map(|p| {
                let (base, _) = ranges
                    .iter()
                    .filter(|(_, r)| r.first_seq <= p && p <= r.last_seq)
                    .max_by_key(|(b, _)| (b.earliest_seq, b.created_at))?;
                let (start, end) = match self.segment_holding(base.replay_from_seq) {
                    Some(start) if base.replay_from_seq <= p => (
                        start,
                        start + self.segments[start..].partition_point(|s| s.first_seq <= p),
                    ),
                    _ => (0, 0),
                };
                let mut cost = RestoreCost::of_base(base);
                cost.add_wal(
                    sums[end].wal_bytes.saturating_sub(sums[start].wal_bytes),
                    sums[end]
                        .wal_records
                        .saturating_sub(sums[start].wal_records),
                );
                Some(PointCost::new(p, &base.id, cost, rates))
            })
            .max_by_key(|c| (c.predicted_ms, c.cost.wal_bytes, c.seq))
    }
}

/// The time a restore reports for its last record.
pub fn record_time(r: &Record) -> OffsetDateTime {
    time_from_micros(r.time_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GapKind;

    use crate::testing::{self, T0_US as T0};

    fn t(sec: i64) -> OffsetDateTime {
        testing::at_secs(sec)
    }

    /// Segment `first..=last` whose records span seconds `t1..=t2`.
    fn seg(first: u64, last: u64, t1: i64, t2: i64) -> SegmentEntry {
        testing::segment(first, last, t(t1), t(t2))
    }

    fn base(id: &str, replay_from: u64, earliest: u64, at: i64) -> BaseSummary {
        testing::base(id, replay_from, earliest, t(at))
    }

    use testing::gap;

    /// Segments 1..=100 (t 0..10), 101..=200 (t 10..20), gap 201..=300,
    /// 301..=400 (t 40..50), 401..=500 (t 50..60); base A at 50, base B at 350.
    fn history() -> History {
        History {
            bases: vec![base("a", 1, 50, 5), base("b", 301, 350, 45)],
            segments: vec![
                seg(1, 100, 0, 10),
                seg(101, 200, 11, 20),
                seg(301, 400, 40, 50),
                seg(401, 500, 51, 60),
            ],
            gaps: vec![gap(201, 300, GapKind::MissingWal)],
        }
    }

    /// Sequence numbers at the top of the range (from a corrupt or hostile index page):
    /// every computation answers, none overflows.
    #[test]
    fn extreme_sequence_numbers_never_overflow() {
        const M: u64 = u64::MAX;
        let h = History {
            bases: vec![base("top", M, M, 5), base("low", 1, 5, 1)],
            segments: vec![
                seg(1, 10, 0, 1),
                seg(M - 5, M, 2, 3),
                seg(M, M, 3, 4), // overlaps: a problem, not a panic
            ],
            gaps: vec![
                gap(20, M - 6, GapKind::MissingWal),
                gap(M, M, GapKind::ColumnFamilyChange),
            ],
        };
        assert!(!h.problems().is_empty());
        let w = h.window();
        assert!(!w.ranges.is_empty());
        let _ = h.plan(Target::Latest);
        let _ = h.plan(Target::Seq(M));
        let _ = h.plan(Target::Time(t(3)));
        let _ = h.plan(Target::Time(t(1)));
        let rates = RestoreRates::default();
        let _ = h.latest_cost(&rates);
        let _ = h.worst_cost(&rates);
    }

    #[test]
    fn a_restore_costs_its_base_and_the_segments_from_its_replay_start_to_the_point() {
        let sized = |s: SegmentEntry, bytes: u64, records: u32| SegmentEntry {
            stored_size: bytes,
            record_count: records,
            ..s
        };
        let mut h = history();
        h.bases[0].total_size = 1_000_000;
        h.bases[1].total_size = 2_000_000;
        h.segments = vec![
            sized(seg(1, 100, 0, 10), 100_000, 100),
            sized(seg(101, 200, 11, 20), 200_000, 50),
            sized(seg(301, 400, 40, 50), 300_000, 100),
            sized(seg(401, 500, 51, 60), 400_000, 100),
        ];
        let rates = RestoreRates {
            download_bytes_per_sec: 1_000_000,
            replay_records_per_sec: 100,
        };
        // The newest point: base b (replaying from 301) and both segments after it.
        let latest = h.latest_cost(&rates).unwrap();
        assert_eq!((latest.seq, latest.base.as_str()), (500, "b"));
        assert_eq!(
            latest.cost,
            RestoreCost {
                base_bytes: 2_000_000,
                wal_bytes: 700_000,
                wal_records: 200
            }
        );
        // 0.1 s fixed + 2.7 s of bytes + 2 s of records.
        assert_eq!(latest.predicted_ms, 4800);
        assert_eq!(
            latest.cost.predict(&rates),
            RestoreRates::FIXED + latest.cost.transfer_time(&rates)
        );
        // The worst point: 1 MB of base a, 300 kB and 150 records (2.9 s with the fixed
        // part) against b's 4.8 s at its range's end.
        let worst = h.worst_cost(&rates).unwrap();
        assert_eq!((worst.seq, worst.base.as_str()), (500, "b"));
        assert_eq!(h.cost_of(Target::Seq(500), &rates).unwrap(), worst);
        let a_end = h.cost_of(Target::Seq(200), &rates).unwrap();
        assert_eq!((a_end.base.as_str(), a_end.predicted_ms), ("a", 2900));
        // A base at 450: the worst point is the one just before it (from b, both segments),
        // the newest point replays only the last segment onto c.
        h.bases.push(BaseSummary {
            total_size: 2_000_000,
            ..base("c", 401, 450, 55)
        });
        let worst = h.worst_cost(&rates).unwrap();
        assert_eq!((worst.seq, worst.base.as_str()), (449, "b"));
        assert_eq!(worst.cost.wal_records, 200);
        // Computed without planning each point, it is what planning that point says.
        assert_eq!(h.cost_of(Target::Seq(449), &rates).unwrap(), worst);
        let latest = h.latest_cost(&rates).unwrap();
        assert_eq!((latest.seq, latest.base.as_str()), (500, "c"));
        assert_eq!(latest.cost.wal_bytes, 400_000);
        assert!(worst.predicted_ms > latest.predicted_ms);
        // The planner's own segments, whatever the point.
        let plan = h.plan(Target::Seq(150)).unwrap();
        assert_eq!(plan.cost().wal_bytes, plan.segment_bytes());
        assert_eq!(h.cost_of(Target::Seq(150), &rates).unwrap().seq, 150);
        assert!(History::default().latest_cost(&rates).is_none());
        assert!(History::default().worst_cost(&rates).is_none());
        // Zero rates and huge costs answer, never panic.
        let zero = RestoreRates {
            download_bytes_per_sec: 0,
            replay_records_per_sec: 0,
        };
        let huge = RestoreCost {
            base_bytes: u64::MAX,
            wal_bytes: u64::MAX,
            wal_records: u64::MAX,
        };
        assert!(huge.predict(&zero) > Duration::from_secs(1 << 60));
    }

    proptest::proptest! {
        /// On any history (overlaps, holes, gaps and bases anywhere), the worst point found
        /// without planning is what planning every candidate point says, and nothing panics.
        #[test]
        fn prop_the_worst_point_is_the_planner_s(
            segs in proptest::collection::vec((1u64..6, 0u64..2, 1u64..10_000, 0u32..500), 0..24),
            bases in proptest::collection::vec((0u64..100, 0u64..20, 0u64..1 << 20), 0..5),
            gap in proptest::option::of((0u64..100, 0u64..10)),
        ) {
            let mut h = History::default();
            let mut next = 1u64;
            for (i, (len, skip, bytes, records)) in segs.into_iter().enumerate() {
                next += skip;
                let mut s = seg(next, next + len - 1, i as i64, i as i64 + 1);
                s.stored_size = bytes;
                s.record_count = records;
                h.segments.push(s);
                next += len;
            }
            for (i, (earliest, back, size)) in bases.into_iter().enumerate() {
                let mut b = base(&format!("b{i}"), earliest.saturating_sub(back).max(1), earliest, i as i64);
                b.total_size = size;
                h.bases.push(b);
            }
            if let Some((first, len)) = gap {
                h.gaps.push(testing::gap(first, first + len, GapKind::MissingWal));
            }
            let rates = RestoreRates { download_bytes_per_sec: 1_000_000, replay_records_per_sec: 1000 };
            let window = h.window();
            let mut candidates: Vec<u64> = window.ranges.iter().map(|r| r.last_seq).collect();
            candidates.extend(h.bases.iter().map(|b| b.earliest_seq.saturating_sub(1)).filter(|p| window.range_of(*p).is_some()));
            let planned = candidates
                .into_iter()
                .filter_map(|p| h.cost_of(Target::Seq(p), &rates).ok())
                .max_by_key(|c| (c.predicted_ms, c.cost.wal_bytes, c.seq));
            proptest::prop_assert_eq!(h.worst_cost(&rates), planned);
            let _ = h.latest_cost(&rates);
        }
    }

    #[test]
    fn window_has_two_ranges_split_by_the_gap() {
        let h = history();
        assert!(h.problems().is_empty(), "{:?}", h.problems());
        let w = h.window();
        let r: Vec<(u64, u64)> = w.ranges.iter().map(|r| (r.first_seq, r.last_seq)).collect();
        assert_eq!(r, vec![(50, 200), (350, 500)]);
        assert_eq!(h.latest_seq(), Some(500));
    }

    #[test]
    fn plans_pick_the_newest_base_and_the_needed_segments() {
        let h = history();
        let p = h.plan(Target::Seq(150)).unwrap();
        assert_eq!(p.base.id, "a");
        assert_eq!(p.segments.len(), 2);
        assert_eq!(p.max_seq, 150);
        let p = h.plan(Target::Seq(420)).unwrap();
        assert_eq!(p.base.id, "b");
        let keys: Vec<u64> = p.segments.iter().map(|s| s.first_seq).collect();
        assert_eq!(keys, vec![301, 401]);
        let p = h.plan(Target::Latest).unwrap();
        assert_eq!((p.base.id.as_str(), p.max_seq), ("b", 500));
        let p = h.plan(Target::Seq(350)).unwrap();
        assert_eq!(p.segments.len(), 1);
    }

    #[test]
    fn targets_outside_the_window_are_refused_with_the_window() {
        let h = history();
        let e = h.plan(Target::Seq(10)).unwrap_err();
        assert!(matches!(e, PlanError::BeforeWindow { .. }), "{e}");
        assert!(e.to_string().contains("50..=200"), "{e}");
        let e = h.plan(Target::Seq(250)).unwrap_err();
        assert!(matches!(e, PlanError::InGap { .. }), "{e}");
        let e = h.plan(Target::Seq(320)).unwrap_err();
        assert!(matches!(e, PlanError::NotCovered { .. }), "{e}");
        let e = h.plan(Target::Seq(501)).unwrap_err();
        assert!(matches!(e, PlanError::AfterWindow { .. }), "{e}");
        let e = History::default().plan(Target::Latest).unwrap_err();
        assert!(matches!(e, PlanError::NoBase));
    }

    #[test]
    fn time_targets_map_to_sequence_bounds() {
        let h = history();
        // Between segments: exact.
        let p = h
            .plan(Target::Time(t(10) + time::Duration::milliseconds(500)))
            .unwrap();
        assert_eq!((p.min_seq, p.max_seq), (100, 100));
        // Inside a segment: bounded, resolved while replaying.
        let p = h.plan(Target::Time(t(15))).unwrap();
        assert_eq!((p.min_seq, p.max_seq), (101, 200));
        // At a base's own point with nothing newer before t.
        let p = h.plan(Target::Time(t(46))).unwrap();
        assert_eq!(p.base.id, "b");
        assert!(p.min_seq >= 350);
        assert!(matches!(
            h.plan(Target::Time(t(1))).unwrap_err(),
            PlanError::BeforeWindow { .. }
        ));
        assert!(matches!(
            h.plan(Target::Time(t(61))).unwrap_err(),
            PlanError::AfterWindow { .. }
        ));
        let e = h.plan(Target::Time(t(30))).unwrap_err();
        assert!(matches!(e, PlanError::InGap { .. }), "{e}");
    }

    #[test]
    fn column_family_change_cuts_the_older_base() {
        let mut h = history();
        h.gaps.push(gap(420, 449, GapKind::ColumnFamilyChange));
        h.bases.push(base("c", 401, 450, 55));
        let w = h.window();
        let r: Vec<(u64, u64)> = w.ranges.iter().map(|r| (r.first_seq, r.last_seq)).collect();
        assert_eq!(r, vec![(50, 200), (350, 419), (450, 500)]);
        assert!(matches!(
            h.plan(Target::Seq(430)).unwrap_err(),
            PlanError::InGap { .. }
        ));
        assert_eq!(h.plan(Target::Seq(460)).unwrap().base.id, "c");
    }

    #[test]
    fn validation_finds_overlaps_and_unrecorded_holes() {
        let mut h = history();
        h.gaps.clear();
        let p = h.problems();
        assert!(
            matches!(
                p[0],
                HistoryProblem::Hole {
                    first: 201,
                    last: 300,
                    ..
                }
            ),
            "{p:?}"
        );
        let mut h = history();
        h.segments[1] = seg(90, 200, 11, 20);
        assert!(matches!(h.problems()[0], HistoryProblem::Overlap { .. }));
        let mut h = history();
        h.segments.insert(2, seg(250, 260, 30, 31));
        assert!(
            h.problems()
                .iter()
                .any(|p| matches!(p, HistoryProblem::SegmentInGap { .. }))
        );
    }

    fn rec(seq: u64, count: u32, sec: i64) -> Record {
        Record {
            seq,
            count,
            time_us: T0 + sec * 1_000_000,
            time_source: crate::segment::RecordTime::Observed,
            log_number: 1,
            log_offset: seq,
            batch: vec![],
        }
    }

    #[test]
    fn cutoff_filter_keeps_whole_batches_and_stops_for_good() {
        let h = history();
        let mut f = h.plan(Target::Seq(150)).unwrap().filter();
        assert!(f.admit(&rec(140, 10, 12)));
        assert!(!f.admit(&rec(150, 5, 12)), "batch 150..=154 crosses 150");
        assert!(!f.admit(&rec(155, 1, 12)));
        assert_eq!(f.last_admitted(), Some(149));
        let mut f = h.plan(Target::Time(t(15))).unwrap().filter();
        assert!(f.admit(&rec(101, 3, 14)));
        assert!(f.admit(&rec(104, 3, 15)));
        assert!(!f.admit(&rec(107, 3, 16)));
        assert_eq!(f.last_admitted(), Some(106));
    }

    #[test]
    fn targets_read_one_word_forms_round_trip_through_json_and_describe_themselves() {
        let at = time::macros::datetime!(2026-11-23 13:30:00.5 UTC);
        let time_ok = |s: &str| -> Result<OffsetDateTime, String> {
            if s == "noon" {
                Ok(at)
            } else {
                Err(format!("cannot read {s:?}"))
            }
        };
        assert_eq!(
            Target::parse(" LATEST ", "latest", time_ok).unwrap(),
            Target::Latest
        );
        assert_eq!(
            Target::parse("seq: 1234", "latest", time_ok).unwrap(),
            Target::Seq(1234)
        );
        assert_eq!(
            Target::parse("noon", "latest", time_ok).unwrap(),
            Target::Time(at)
        );
        assert_eq!(
            Target::parse("seq:x", "latest", time_ok)
                .unwrap_err()
                .to_string(),
            r#""seq:x": "x" is not a sequence number (seq:N, e.g. seq:1234)"#
        );
        assert_eq!(
            Target::parse("soon", "latest, seq:N", time_ok)
                .unwrap_err()
                .to_string(),
            r#""soon" is not latest, seq:N or a time: cannot read "soon""#
        );

        for target in [Target::Latest, Target::Seq(42), Target::Time(at)] {
            let json = serde_json::to_string(&target).unwrap();
            assert_eq!(
                serde_json::from_str::<Target>(&json).unwrap(),
                target,
                "{json}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Target::Latest).unwrap(),
            r#""latest""#
        );
        assert_eq!(
            serde_json::to_string(&Target::Seq(42)).unwrap(),
            r#"{"seq":42}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Time(at)).unwrap(),
            r#"{"time":"2026-11-23T13:30:00.5Z"}"#
        );

        assert_eq!(Target::Latest.describe(), "the latest archived point");
        assert_eq!(Target::Seq(42).describe(), "sequence 42");
        assert_eq!(
            Target::Time(at).describe(),
            "time 2026-11-23 13:30:00.500000Z"
        );
        assert_eq!(Target::Time(at).to_string(), "time 2026-11-23T13:30:00.5Z");
        assert_eq!(short_time(at), "2026-11-23 13:30:00.500000Z");
    }
}
