//! Retention: which base backups and segments a policy keeps (FORMAT.md §4.6), and which
//! objects a sweep may delete.
//!
//! Pruning is mark and sweep. *Mark* writes a new generation that no longer references what
//! the policy drops: [`decide`] chooses the bases and segments to keep and the gaps the new
//! history has. *Sweep* deletes objects that neither the current generation nor any
//! generation that was current within the grace period references, so that a restore that
//! planned against an earlier generation still finds its objects: [`Protection`] is that set.
//! Nothing here touches a store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use time::OffsetDateTime;

use crate::keys::{self, LayoutKey};
use crate::model::{BaseDescriptor, BaseSummary, Gap, GapKind, Generation, Pin, SegmentEntry};
use crate::plan::History;

/// What a retention policy keeps. Every field is optional, but at least one of
/// `keep_last` and `pitr_window` must be set; the tiers only add to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Keep the newest N base backups.
    pub keep_last: Option<usize>,
    /// Keep every point of the last D restorable (the base before the window's start and
    /// every base and segment after it).
    pub pitr_window: Option<time::Duration>,
    /// Keep the newest base of each day (UTC) for this long.
    pub keep_daily_for: Option<time::Duration>,
    /// Keep the newest base of each ISO week for this long.
    pub keep_weekly_for: Option<time::Duration>,
    /// Keep the newest base of each month for this long.
    pub keep_monthly_for: Option<time::Duration>,
}

/// Why a policy cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "the retention policy keeps nothing in particular: set keep_last (e.g. 7) and/or \
         pitr_window (e.g. 7d); the daily/weekly/monthly tiers only add to them"
    )]
    NoRule,
    #[error("keep_last must be at least 1 (the newest base backup is always kept)")]
    KeepLastZero,
    #[error("{name} must be longer than zero")]
    ZeroDuration { name: &'static str },
    #[error(
        "{name} = {given} is longer than 100 years, the most any duration may be (times that \
         far back cannot be represented); give the span you mean, e.g. 30d or 3650d"
    )]
    TooLong { name: &'static str, given: String },
}

/// The longest duration a policy (or any setting of the archiver) may have: 100 years.
/// Anything longer is a mistake, and would take times past what can be represented.
pub const MAX_DURATION: time::Duration = time::Duration::seconds(3_155_760_000);

impl Rules {
    /// Checks that the rules are usable.
    pub fn validate(&self) -> Result<(), RetentionError> {
        if self.keep_last.is_none() && self.pitr_window.is_none() {
            return Err(RetentionError::NoRule);
        }
        if self.keep_last == Some(0) {
            return Err(RetentionError::KeepLastZero);
        }
        for (name, d) in [
            ("pitr_window", self.pitr_window),
            ("keep_daily_for", self.keep_daily_for),
            ("keep_weekly_for", self.keep_weekly_for),
            ("keep_monthly_for", self.keep_monthly_for),
        ] {
            if d.is_some_and(|d| d <= time::Duration::ZERO) {
                return Err(RetentionError::ZeroDuration { name });
            }
            if let Some(d) = d.filter(|d| *d > MAX_DURATION) {
                return Err(RetentionError::TooLong {
                    name,
                    given: fmt_duration(d),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last {
            parts.push(format!("keep_last={n}"));
        }
        for (name, d) in [
            ("pitr_window", self.pitr_window),
            ("keep_daily_for", self.keep_daily_for),
            ("keep_weekly_for", self.keep_weekly_for),
            ("keep_monthly_for", self.keep_monthly_for),
        ] {
            if let Some(d) = d {
                parts.push(format!("{name}={}", fmt_duration(d)));
            }
        }
        f.write_str(&parts.join(" "))
    }
}

fn fmt_duration(d: time::Duration) -> String {
    let s = d.whole_seconds();
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// A base the policy keeps, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptBase {
    pub base: BaseSummary,
    pub reasons: Vec<String>,
}

/// What a policy keeps of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Kept bases, in the history's order.
    pub kept: Vec<KeptBase>,
    /// Dropped bases.
    pub removed: Vec<BaseSummary>,
    /// The first sequence from which every point is kept restorable (up to the newest).
    pub continuous_from: u64,
    /// Segments kept, in order.
    pub kept_segments: Vec<SegmentEntry>,
    /// Segments dropped, in order.
    pub removed_segments: Vec<SegmentEntry>,
    /// The gaps of the new history: earlier gaps that still matter, and `pruned` gaps for
    /// the holes pruning leaves between kept segments.
    pub gaps: Vec<Gap>,
}

impl Decision {
    /// True when the policy drops nothing.
    pub fn is_noop(&self) -> bool {
        self.removed.is_empty() && self.removed_segments.is_empty()
    }

    /// The history after pruning.
    pub fn history(&self) -> History {
        History {
            bases: self.kept.iter().map(|k| k.base.clone()).collect(),
            segments: self.kept_segments.clone(),
            gaps: self.gaps.clone(),
        }
    }
}

/// Applies `rules` to `history` at `now`. Pinned bases (FORMAT.md §4.2) are kept while
/// their pin lasts; the newest base is always kept.
pub fn decide(
    history: &History,
    pins: &[Pin],
    rules: &Rules,
    now: OffsetDateTime,
) -> Result<Decision, RetentionError> {
    rules.validate()?;
    let bases = &history.bases;
    let mut reasons: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut keep = |i: usize, why: String| reasons.entry(i).or_default().push(why);

    // Newest first, by creation time (ties: later in the list is newer).
    let mut by_age: Vec<usize> = (0..bases.len()).collect();
    by_age.sort_by_key(|&i| std::cmp::Reverse((bases[i].created_at, i)));

    if let Some(&newest) = by_age.first() {
        keep(newest, "the newest base".to_owned());
    }
    if let Some(n) = rules.keep_last {
        for (rank, &i) in by_age.iter().take(n).enumerate() {
            keep(i, format!("keep_last: newest #{}", rank + 1));
        }
    }
    // The window: the newest base at or before its start, and every base after it.
    let mut window_bases: Vec<usize> = Vec::new();
    if let Some(w) = rules.pitr_window {
        let start = now - w;
        let anchor = by_age
            .iter()
            .copied()
            .filter(|&i| bases[i].earliest_time <= start)
            .max_by_key(|&i| (bases[i].earliest_seq, i));
        for &i in &by_age {
            let after = anchor.is_none_or(|a| bases[i].earliest_seq >= bases[a].earliest_seq);
            if after {
                window_bases.push(i);
                keep(
                    i,
                    format!("pitr_window: restores into the last {}", fmt_duration(w)),
                );
            }
        }
    }
    for (tier, period) in [
        ("keep_daily_for", rules.keep_daily_for),
        ("keep_weekly_for", rules.keep_weekly_for),
        ("keep_monthly_for", rules.keep_monthly_for),
    ] {
        let Some(period) = period else { continue };
        let mut seen = BTreeSet::new();
        for &i in &by_age {
            let at = bases[i].created_at.to_offset(time::UtcOffset::UTC);
            if at < now - period {
                continue;
            }
            let bucket = match tier {
                "keep_daily_for" => (at.year(), at.ordinal() as u32),
                "keep_weekly_for" => {
                    let (y, w, _) = at.to_iso_week_date();
                    (y, u32::from(w))
                }
                _ => (at.year(), at.month() as u32),
            };
            if seen.insert(bucket) {
                keep(i, format!("{tier}: newest of its period"));
            }
        }
    }
    for pin in pins {
        if pin.until.is_none_or(|u| u > now)
            && let Some(i) = bases.iter().position(|b| b.id == pin.base)
        {
            keep(i, format!("pinned: {}", pin.reason));
        }
    }

    let kept: Vec<KeptBase> = reasons
        .iter()
        .map(|(&i, r)| KeptBase {
            base: bases[i].clone(),
            reasons: r.clone(),
        })
        .collect();
    let removed: Vec<BaseSummary> = (0..bases.len())
        .filter(|i| !reasons.contains_key(i))
        .map(|i| bases[i].clone())
        .collect();

    // Sequence ranges the kept bases need: from where the window starts to the end, and
    // for each base before it, its replay up to its own earliest point.
    let continuous_from = if bases.is_empty() {
        // No base yet (an archiver's first one is under way): nothing is restorable, so
        // nothing is decided, and the WAL stays for the first base.
        0
    } else if rules.pitr_window.is_some() {
        window_bases
            .iter()
            .map(|&i| bases[i].replay_from_seq)
            .min()
            .unwrap_or(u64::MAX)
    } else {
        kept.iter()
            .map(|k| k.base.replay_from_seq)
            .min()
            .unwrap_or(u64::MAX)
    };
    let mut needed: Vec<(u64, u64)> = vec![(continuous_from, u64::MAX)];
    for k in &kept {
        needed.push((k.base.replay_from_seq, k.base.earliest_seq));
    }
    let (kept_segments, removed_segments): (Vec<SegmentEntry>, Vec<SegmentEntry>) =
        history.segments.iter().cloned().partition(|s| {
            needed
                .iter()
                .any(|&(a, b)| s.first_seq <= b && a <= s.last_seq)
        });

    let gaps = new_gaps(history, &kept_segments, &removed_segments, now);
    Ok(Decision {
        kept,
        removed,
        continuous_from,
        kept_segments,
        removed_segments,
        gaps,
    })
}

/// The gaps after pruning: a `pruned` gap for each hole between kept segments that pruning
/// made, earlier gaps that still touch the kept history, and none before its start.
fn new_gaps(
    history: &History,
    kept: &[SegmentEntry],
    removed: &[SegmentEntry],
    now: OffsetDateTime,
) -> Vec<Gap> {
    let Some(first_kept) = kept.first() else {
        return Vec::new();
    };
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for w in kept.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let (lo, hi) = (a.last_seq + 1, b.first_seq.saturating_sub(1));
        if lo <= hi
            && removed
                .iter()
                .any(|s| lo <= s.first_seq && s.last_seq <= hi)
        {
            holes.push((lo, hi));
        }
    }
    let mut out: Vec<Gap> = history
        .gaps
        .iter()
        .filter(|g| g.last_seq >= first_kept.first_seq)
        .filter(|g| {
            !holes
                .iter()
                .any(|&(lo, hi)| lo <= g.first_seq && g.last_seq <= hi)
        })
        .cloned()
        .collect();
    for (lo, hi) in holes {
        out.push(Gap {
            first_seq: lo,
            last_seq: hi,
            kind: GapKind::Pruned,
            detected_at: now,
            detail: "removed by retention: outside every retained range".to_owned(),
        });
    }
    out.sort_by_key(|g| (g.first_seq, g.last_seq));
    out
}

/// Splits the kept, indexed segments into index pages: each of the old pages whose
/// segments are all kept stays as it is (`Keep`), the others are rewritten with what is
/// kept of them, split at pruned holes (`Write`).
pub fn repage(
    pages: &[crate::model::IndexPageRef],
    kept: &[SegmentEntry],
    gaps: &[Gap],
) -> Vec<Repage> {
    let mut out = Vec::new();
    for p in pages {
        let inside: Vec<&SegmentEntry> = kept
            .iter()
            .filter(|s| p.first_seq <= s.first_seq && s.first_seq <= p.last_seq)
            .collect();
        if inside.len() as u64 == p.segment_count
            && inside.first().is_some_and(|s| s.first_seq == p.first_seq)
            && inside.last().is_some_and(|s| s.last_seq == p.last_seq)
        {
            out.push(Repage::Keep(p.clone()));
            continue;
        }
        let mut run: Vec<SegmentEntry> = Vec::new();
        for s in inside {
            let split = run.last().is_some_and(|prev: &SegmentEntry| {
                gaps.iter().any(|g| {
                    g.kind == GapKind::Pruned
                        && g.first_seq > prev.last_seq
                        && g.last_seq < s.first_seq
                })
            });
            if split {
                out.push(Repage::Write(std::mem::take(&mut run)));
            }
            run.push(s.clone());
        }
        if !run.is_empty() {
            out.push(Repage::Write(run));
        }
    }
    out
}

/// One index page of the pruned generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repage {
    /// An existing page, referenced as it is.
    Keep(crate::model::IndexPageRef),
    /// A new page to write with these segments.
    Write(Vec<SegmentEntry>),
}

/// What a sweep must not delete: everything the protected generations reference (the
/// current one and each that was current within the grace period), and everything a
/// writer may be adding after the current one.
#[derive(Debug, Clone, Default)]
pub struct Protection {
    /// Generation numbers at or above this are kept (the oldest protected one).
    pub oldest_generation: u64,
    page_keys: BTreeSet<String>,
    /// Segments whose first sequence lies in one of these inclusive ranges are referenced.
    segment_ranges: Vec<(u64, u64)>,
    /// Segments starting here or later may be a writer's tail: never deleted.
    tail_from: u64,
    base_ids: BTreeSet<String>,
    sst_keys: BTreeSet<String>,
}

impl Protection {
    /// Starts with no generation protected.
    pub fn new() -> Protection {
        Protection {
            oldest_generation: u64::MAX,
            tail_from: u64::MAX,
            ..Protection::default()
        }
    }

    /// Protects what `g` references, except its bases' table files (see
    /// [`Protection::add_base`]).
    pub fn add_generation(&mut self, g: &Generation) {
        self.oldest_generation = self.oldest_generation.min(g.generation);
        self.tail_from = self.tail_from.min(g.tail_start_seq);
        for p in &g.index_pages {
            self.page_keys.insert(p.key.clone());
            // A page's range minus the holes its generation records.
            let mut lo = p.first_seq;
            let mut holes: Vec<&Gap> = g
                .gaps
                .iter()
                .filter(|x| x.kind.has_no_segments())
                .filter(|x| x.first_seq <= p.last_seq && p.first_seq <= x.last_seq)
                .collect();
            holes.sort_by_key(|x| x.first_seq);
            for h in holes {
                if h.first_seq > lo {
                    self.segment_ranges.push((lo, h.first_seq - 1));
                }
                lo = lo.max(h.last_seq.saturating_add(1));
            }
            if lo <= p.last_seq {
                self.segment_ranges.push((lo, p.last_seq));
            }
        }
        for b in &g.bases {
            self.base_ids.insert(b.id.clone());
        }
    }

    /// Protects a protected base's table files.
    pub fn add_base(&mut self, d: &BaseDescriptor) {
        for f in &d.files {
            if f.key.starts_with(keys::SST_PREFIX) {
                self.sst_keys.insert(f.key.clone());
            }
        }
    }

    /// The base ids whose descriptors [`Protection::add_base`] must see.
    pub fn base_ids(&self) -> impl Iterator<Item = &str> {
        self.base_ids.iter().map(String::as_str)
    }

    /// Classifies a listed key. A key outside the layout (FORMAT.md §2) is
    /// [`KeyClass::Foreign`]: it is logged with the reason and never deleted, and the sweep
    /// goes on with the other keys.
    pub fn classify(&self, key: &str) -> KeyClass {
        let layout = match keys::parse_listed_key(key) {
            Ok(layout) => layout,
            Err(e) => {
                tracing::warn!(key = %key, reason = %e.reason, "not a Tidemark object; left alone");
                return KeyClass::Foreign;
            }
        };
        let referenced = match layout {
            LayoutKey::Config | LayoutKey::Lease | LayoutKey::Keyring | LayoutKey::LatestHint => {
                true
            }
            LayoutKey::Generation(g) => g >= self.oldest_generation,
            LayoutKey::Segment(first) => {
                first >= self.tail_from
                    || self
                        .segment_ranges
                        .iter()
                        .any(|&(a, b)| a <= first && first <= b)
            }
            // A page reaching the tail may be one a writer is about to reference.
            LayoutKey::IndexPage { last_seq, .. } => {
                self.page_keys.contains(key) || last_seq >= self.tail_from
            }
            LayoutKey::BaseDescriptor { id } | LayoutKey::BaseFile { id, .. } => {
                self.base_ids.contains(id)
            }
            LayoutKey::Table { .. } => self.sst_keys.contains(key),
        };
        if referenced {
            return KeyClass::Protected;
        }
        KeyClass::Unreferenced(match layout {
            LayoutKey::Generation(_) => ObjectKind::Generation,
            LayoutKey::Segment(_) => ObjectKind::Segment,
            LayoutKey::IndexPage { .. } => ObjectKind::IndexPage,
            LayoutKey::Table { .. } => ObjectKind::Table,
            _ => ObjectKind::Base,
        })
    }
}

/// What a listed object is to a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyClass {
    /// Referenced (or possibly about to be): kept.
    Protected,
    /// A repository object nothing protected references: deleted by the sweep.
    Unreferenced(ObjectKind),
    /// Not a key of the repository layout: left alone and reported.
    Foreign,
}

/// The kinds of deletable objects, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Generation,
    Segment,
    IndexPage,
    Base,
    Table,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Generation => "manifest generations",
            ObjectKind::Segment => "WAL segments",
            ObjectKind::IndexPage => "index pages",
            ObjectKind::Base => "base backup files",
            ObjectKind::Table => "table files",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectRef, TimeSource, time_from_micros};
    use crate::plan::Target;
    use crate::testing::{self, T0_US as T0};

    const DAY: i64 = 86_400_000_000;

    fn t(us: i64) -> OffsetDateTime {
        time_from_micros(us)
    }

    /// Segment `i` holds sequences 10i+1..=10i+10, written at T0 + i hours.
    fn seg(i: u64) -> SegmentEntry {
        let at = t(T0 + i as i64 * 3_600_000_000);
        SegmentEntry {
            record_count: 10,
            raw_size: 100,
            stored_size: 50,
            ..testing::segment(10 * i + 1, 10 * i + 10, at, at)
        }
    }

    /// A base taken after segment `i`: replays from that segment, restores to its end.
    fn base(name: &str, i: u64) -> BaseSummary {
        let s = seg(i);
        let id = format!("b20270115T0000{:02}Z-{name:0>8}", i % 60);
        BaseSummary {
            descriptor: ObjectRef {
                key: format!("bases/{name}/base.json"),
                size: 1,
                sha256: "0".repeat(64),
            },
            column_families: testing::default_cf(),
            total_size: 10,
            ..testing::base(&id, s.first_seq, s.last_seq, s.last_time)
        }
    }

    /// 100 segments (100 hours), bases after segments 0, 24, 48, 72, 96.
    fn history() -> History {
        History {
            bases: [0, 24, 48, 72, 96]
                .iter()
                .map(|&i| base(&format!("{i}"), i))
                .collect(),
            segments: (0..100).map(seg).collect(),
            gaps: Vec::new(),
        }
    }

    fn now() -> OffsetDateTime {
        t(T0 + 100 * 3_600_000_000)
    }

    fn ids(d: &Decision) -> Vec<String> {
        d.kept.iter().map(|k| k.base.id.clone()).collect()
    }

    #[test]
    fn without_a_base_every_segment_stays() {
        let mut h = history();
        h.bases.clear();
        let rules = Rules {
            keep_last: Some(1),
            pitr_window: Some(time::Duration::hours(1)),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        assert!(
            d.removed_segments.is_empty(),
            "{:?}",
            d.removed_segments.len()
        );
        assert_eq!(d.kept_segments.len(), 100);
        assert!(d.gaps.is_empty());
    }

    #[test]
    fn a_policy_must_keep_something() {
        let e = decide(&history(), &[], &Rules::default(), now()).unwrap_err();
        assert_eq!(e, RetentionError::NoRule);
        let rules = Rules {
            keep_last: Some(0),
            ..Rules::default()
        };
        assert_eq!(
            decide(&history(), &[], &rules, now()).unwrap_err(),
            RetentionError::KeepLastZero
        );
    }

    #[test]
    fn durations_past_a_century_are_refused_before_any_arithmetic() {
        // 1000000000 years would overflow the time arithmetic of the first prune.
        let absurd = time::Duration::days(365 * 1_000_000_000);
        for (name, rules) in [
            (
                "pitr_window",
                Rules {
                    pitr_window: Some(absurd),
                    ..Rules::default()
                },
            ),
            (
                "keep_monthly_for",
                Rules {
                    keep_last: Some(1),
                    keep_monthly_for: Some(MAX_DURATION + time::Duration::SECOND),
                    ..Rules::default()
                },
            ),
        ] {
            let e = rules.validate().unwrap_err();
            assert!(
                matches!(e, RetentionError::TooLong { name: n, .. } if n == name),
                "{e}"
            );
            assert!(e.to_string().contains("100 years"), "{e}");
            assert!(decide(&history(), &[], &rules, now()).is_err());
        }
        Rules {
            pitr_window: Some(MAX_DURATION),
            ..Rules::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn keep_last_keeps_the_whole_range_from_the_oldest_kept_base() {
        let h = history();
        let rules = Rules {
            keep_last: Some(2),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        assert_eq!(ids(&d), vec![h.bases[3].id.clone(), h.bases[4].id.clone()]);
        assert_eq!(d.removed.len(), 3);
        assert_eq!(d.continuous_from, h.bases[3].replay_from_seq);
        assert_eq!(d.kept_segments.first().unwrap().first_seq, 721);
        assert_eq!(d.kept_segments.len(), 28);
        assert!(d.gaps.is_empty(), "{:?}", d.gaps);
        let after = d.history();
        assert!(after.problems().is_empty(), "{:?}", after.problems());
        let w = after.window();
        assert_eq!(w.ranges.len(), 1);
        assert_eq!(w.ranges[0].first_seq, h.bases[3].earliest_seq);
        assert_eq!(w.ranges[0].last_seq, 1000);
    }

    #[test]
    fn a_window_keeps_the_base_before_its_start_and_everything_after() {
        let h = history();
        // 30 hours back from hour 100: hour 70, after base 48 (hour 48) and before 72.
        let rules = Rules {
            pitr_window: Some(time::Duration::hours(30)),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        assert_eq!(
            ids(&d),
            vec![
                h.bases[2].id.clone(),
                h.bases[3].id.clone(),
                h.bases[4].id.clone()
            ]
        );
        let after = d.history();
        let w = after.window();
        assert_eq!(w.ranges.len(), 1);
        assert!(w.ranges[0].first_time <= now() - time::Duration::hours(30));
        // Every point of the window plans.
        for seq in [490, 700, 701, 1000] {
            after.plan(Target::Seq(seq)).unwrap();
        }
        assert!(after.plan(Target::Seq(400)).is_err());
    }

    #[test]
    fn older_kept_bases_keep_only_their_own_point_and_the_holes_are_recorded() {
        let h = history();
        let rules = Rules {
            pitr_window: Some(time::Duration::hours(10)),
            keep_daily_for: Some(time::Duration::days(10)),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        // Every base is the newest of its day here (one a day).
        assert_eq!(d.kept.len(), 5);
        assert!(d.removed.is_empty());
        // The window (hour 90 on) starts after base 72: everything from its replay on is
        // kept; bases 0, 24 and 48 keep only the segment that restores their own point.
        let kept: Vec<u64> = d.kept_segments.iter().map(|s| s.first_seq).collect();
        let mut expected = vec![1, 241, 481];
        expected.extend((72..100).map(|i| 10 * i + 1));
        assert_eq!(kept, expected);
        let pruned: Vec<(u64, u64)> = d
            .gaps
            .iter()
            .map(|g| {
                assert_eq!(g.kind, GapKind::Pruned);
                (g.first_seq, g.last_seq)
            })
            .collect();
        assert_eq!(pruned, vec![(11, 240), (251, 480), (491, 720)]);
        let after = d.history();
        assert!(after.problems().is_empty(), "{:?}", after.problems());
        for b in &after.bases {
            after.plan(Target::Seq(b.earliest_seq)).unwrap();
        }
        let e = after.plan(Target::Seq(300)).unwrap_err().to_string();
        assert!(e.contains("Pruned"), "{e}");
        // Pages split at the holes.
        let page = crate::model::IndexPageRef {
            key: keys::index_page_key(1, 1000),
            first_seq: 1,
            last_seq: 1000,
            segment_count: 100,
            first_time: seg(0).first_time,
            last_time: seg(99).last_time,
            size: 1,
            sha256: "0".repeat(64),
        };
        let pages = repage(&[page], &d.kept_segments, &d.gaps);
        let sizes: Vec<usize> = pages
            .iter()
            .map(|p| match p {
                Repage::Write(s) => s.len(),
                Repage::Keep(_) => panic!("the page changed"),
            })
            .collect();
        assert_eq!(sizes, vec![1, 1, 1, 28]);
    }

    #[test]
    fn weekly_and_monthly_tiers_keep_one_base_per_period() {
        // One base a day for 120 days.
        let mut h = History::default();
        for i in 0..120u64 {
            let mut b = base(&format!("{i}"), i);
            b.created_at = t(T0 + i as i64 * DAY);
            b.earliest_time = b.created_at;
            h.bases.push(b);
        }
        h.segments = (0..120).map(seg).collect();
        let now = t(T0 + 119 * DAY + 1);
        let rules = Rules {
            keep_last: Some(1),
            keep_daily_for: Some(time::Duration::days(7)),
            keep_weekly_for: Some(time::Duration::days(30)),
            keep_monthly_for: Some(time::Duration::days(90)),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now).unwrap();
        let kept: BTreeSet<usize> = d
            .kept
            .iter()
            .map(|k| h.bases.iter().position(|b| b.id == k.base.id).unwrap())
            .collect();
        // The last 7 days, one per week in the last 30 days (≤ 5 more), one per month in
        // the last 90 days (≤ 4 more).
        assert!(
            (112..120).all(|i| i == 112 || kept.contains(&i)),
            "{kept:?}"
        );
        assert!(kept.len() <= 7 + 1 + 5 + 4, "{kept:?}");
        assert!(
            kept.iter().all(|&i| i >= 29),
            "nothing older than 90 days: {kept:?}"
        );
        assert!(kept.iter().filter(|&&i| i < 89).count() >= 2, "{kept:?}");
    }

    #[test]
    fn pins_keep_a_base_until_they_expire() {
        let h = history();
        let rules = Rules {
            keep_last: Some(1),
            ..Rules::default()
        };
        let pin = |until: Option<OffsetDateTime>| Pin {
            base: h.bases[1].id.clone(),
            reason: "before the migration".into(),
            until,
        };
        let d = decide(&h, &[pin(None)], &rules, now()).unwrap();
        assert_eq!(d.kept.len(), 2);
        assert!(d.kept[0].reasons[0].contains("before the migration"));
        let d = decide(
            &h,
            &[pin(Some(now() - time::Duration::HOUR))],
            &rules,
            now(),
        )
        .unwrap();
        assert_eq!(d.kept.len(), 1);
    }

    #[test]
    fn gaps_before_the_kept_history_go_and_later_ones_stay() {
        let mut h = history();
        // Segment 10 lost, a column family change at 900.
        h.segments.retain(|s| s.first_seq != 101);
        h.gaps.push(Gap {
            first_seq: 101,
            last_seq: 110,
            kind: GapKind::MissingWal,
            detected_at: now(),
            detail: String::new(),
        });
        h.gaps.push(Gap {
            first_seq: 900,
            last_seq: 959,
            kind: GapKind::ColumnFamilyChange,
            detected_at: now(),
            detail: String::new(),
        });
        assert!(h.problems().is_empty());
        let rules = Rules {
            keep_last: Some(2),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        let kinds: Vec<GapKind> = d.gaps.iter().map(|g| g.kind).collect();
        assert_eq!(kinds, vec![GapKind::ColumnFamilyChange]);
    }

    #[test]
    fn protection_follows_pages_minus_holes_tails_bases_and_tables() {
        let h = history();
        let rules = Rules {
            pitr_window: Some(time::Duration::hours(10)),
            keep_daily_for: Some(time::Duration::days(10)),
            ..Rules::default()
        };
        let d = decide(&h, &[], &rules, now()).unwrap();
        let g = Generation {
            format_version: 1,
            generation: 7,
            repository_id: "r".into(),
            written_at: now(),
            writer: crate::model::Writer {
                host: "h".into(),
                pid: 1,
                version: "0".into(),
            },
            time_precision: TimeSource::Observed,
            bases: d.kept.iter().map(|k| k.base.clone()).collect(),
            index_pages: vec![crate::model::IndexPageRef {
                key: keys::index_page_key(1, 1000),
                first_seq: 1,
                last_seq: 1000,
                segment_count: 8,
                first_time: now(),
                last_time: now(),
                size: 1,
                sha256: "0".repeat(64),
            }],
            tail_start_seq: 1001,
            gaps: d.gaps.clone(),
            retention: Default::default(),
        };
        let mut p = Protection::new();
        p.add_generation(&g);
        let unref = |k: ObjectKind| KeyClass::Unreferenced(k);
        assert_eq!(p.classify(&keys::segment_key(1)), KeyClass::Protected);
        for key in [keys::CONFIG, keys::LEASE, keys::KEYRING, keys::LATEST_HINT] {
            assert_eq!(p.classify(key), KeyClass::Protected, "{key}");
        }
        assert_eq!(
            p.classify(&keys::segment_key(11)),
            unref(ObjectKind::Segment)
        );
        assert_eq!(p.classify(&keys::segment_key(961)), KeyClass::Protected);
        assert_eq!(p.classify(&keys::segment_key(5001)), KeyClass::Protected);
        assert_eq!(p.classify(&keys::generation_key(7)), KeyClass::Protected);
        assert_eq!(
            p.classify(&keys::generation_key(6)),
            unref(ObjectKind::Generation)
        );
        assert_eq!(
            p.classify(&keys::index_page_key(1, 10)),
            unref(ObjectKind::IndexPage)
        );
        assert_eq!(p.classify("index/x.json"), KeyClass::Foreign);
        assert_eq!(
            p.classify(&keys::index_page_key(1, 1000)),
            KeyClass::Protected
        );
        assert_eq!(
            p.classify(&keys::index_page_key(900, 1001)),
            KeyClass::Protected,
            "a page reaching the tail may be about to be referenced"
        );
        assert_eq!(
            p.classify(&keys::sst_key(&"a".repeat(64))),
            unref(ObjectKind::Table)
        );
        assert_eq!(p.classify("notes/readme.txt"), KeyClass::Foreign);
        // Keys no store accepts, or that only look like the layout, are never deleted.
        for foreign in [
            "bases/x//y".to_owned(),
            "bases/x/y".to_owned(),
            format!("bases/{}/notes.txt", g.bases[0].id),
            "bases/b20200101T000000Z-0000abcd/files/x\\y".to_owned(),
            "wal/0000000000000001.seg.tmp".to_owned(),
            "manifest/0000000000000001.json.old".to_owned(),
        ] {
            assert_eq!(p.classify(&foreign), KeyClass::Foreign, "{foreign}");
        }
        assert_eq!(p.classify("sst/not-a-hash"), KeyClass::Foreign);
        assert_eq!(p.classify(keys::LATEST_HINT), KeyClass::Protected);
        let id = &g.bases[0].id;
        assert_eq!(
            p.classify(&keys::base_descriptor_key(id)),
            KeyClass::Protected
        );
        assert_eq!(
            p.classify(&keys::base_descriptor_key("b20200101T000000Z-0000abcd")),
            unref(ObjectKind::Base)
        );
        p.add_base(&BaseDescriptor {
            format_version: 1,
            id: id.clone(),
            created_at: now(),
            database_identity: "d".into(),
            min_log_number: 1,
            replay_from_seq: 1,
            earliest_seq: 10,
            earliest_time: now(),
            next_file_number: 1,
            column_families: vec![],
            files: vec![crate::model::BaseFile {
                name: "000001.sst".into(),
                size: 1,
                sha256: "a".repeat(64),
                key: keys::sst_key(&"a".repeat(64)),
            }],
        });
        assert_eq!(
            p.classify(&keys::sst_key(&"a".repeat(64))),
            KeyClass::Protected
        );
    }
}
