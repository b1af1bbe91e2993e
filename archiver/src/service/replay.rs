//! The WAL a restore of the newest point would replay, and the trigger that takes a base
//! backup before it grows past the bound the operator set (`max_replay`, or
//! `target_recovery_time`).
//!
//! The pipeline feeds it every segment it ships and every base it records; the base
//! schedule ([`super::bases`]) asks it whether a base is due. What a restore costs is the
//! format's rule ([`RestoreCost`], [`replays_onto`]): the newest base's files and every
//! segment from the one holding its `replay_from_seq`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tidemark_manifest::model::{BaseSummary, SegmentEntry};
use tidemark_manifest::plan::{RestoreCost, RestoreRates, replays_onto};

use crate::config::{ArchiverOptions, ReplayBound};
use crate::metrics::Metrics;

/// What makes a base due besides the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Bound {
    /// The WAL shipped after the newest base's point exceeds this.
    Wal(ReplayBound),
    /// The predicted restore time of the newest point exceeds this.
    Time(Duration),
}

/// A shipped segment, as the trigger counts it.
#[derive(Debug, Clone, Copy)]
struct Shipped {
    first_seq: u64,
    last_seq: u64,
    stored_bytes: u64,
    records: u64,
}

/// The WAL a restore of the newest point replays onto the newest base, and whether that
/// calls for a new base.
#[derive(Debug)]
pub(crate) struct ReplayTrigger {
    bound: Option<Bound>,
    rates: RestoreRates,
    newest_base: Option<BaseSummary>,
    /// The segments shipped that a restore from the newest base replays, in order.
    segments: VecDeque<Shipped>,
    metrics: Arc<Metrics>,
}

impl ReplayTrigger {
    /// The trigger of `opts`, with the bases and segments the repository holds.
    pub fn new(
        opts: &ArchiverOptions,
        bases: &[BaseSummary],
        segments: &[SegmentEntry],
        metrics: &Arc<Metrics>,
    ) -> ReplayTrigger {
        let bound = match (opts.max_replay, opts.target_recovery_time) {
            (Some(b), _) => Some(Bound::Wal(b)),
            (None, Some(t)) => Some(Bound::Time(t)),
            (None, None) => None,
        };
        let mut trigger = ReplayTrigger {
            bound,
            rates: opts.restore_rates(),
            newest_base: None,
            segments: VecDeque::new(),
            metrics: Arc::clone(metrics),
        };
        let newest = bases.iter().max_by_key(|b| (b.earliest_seq, b.created_at));
        if let Some(base) = newest {
            trigger.newest_base = Some(base.clone());
            for s in segments.iter().filter(|s| replays_onto(base, s.last_seq)) {
                trigger.segments.push_back(shipped(s));
            }
        }
        trigger.publish();
        trigger
    }

    /// A segment was uploaded.
    pub fn segment_shipped(&mut self, s: &SegmentEntry) {
        if self
            .newest_base
            .as_ref()
            .is_none_or(|b| replays_onto(b, s.last_seq))
        {
            self.segments.push_back(shipped(s));
        }
        self.publish();
    }

    /// A base was recorded: restores of newer points start from it.
    pub fn base_recorded(&mut self, base: &BaseSummary) {
        if self
            .newest_base
            .as_ref()
            .is_some_and(|b| b.earliest_seq > base.earliest_seq)
        {
            return;
        }
        while self
            .segments
            .front()
            .is_some_and(|s| !replays_onto(base, s.last_seq))
        {
            self.segments.pop_front();
        }
        self.newest_base = Some(base.clone());
        self.publish();
    }

    /// The WAL shipped after the newest base's point (all of it before the first base).
    pub fn since_base(&self) -> RestoreCost {
        let point = self.newest_base.as_ref().map(|b| b.earliest_seq);
        let mut cost = RestoreCost::default();
        for s in &self.segments {
            if point.is_none_or(|p| s.last_seq > p) {
                cost.add_wal(s.stored_bytes, s.records);
            }
        }
        cost
    }

    /// What a restore of the newest point costs: the newest base and every segment
    /// replayed onto it. `None` before the first base.
    pub fn newest_point(&self) -> Option<RestoreCost> {
        let base = self.newest_base.as_ref()?;
        let mut cost = RestoreCost::of_base(base);
        for s in &self.segments {
            cost.add_wal(s.stored_bytes, s.records);
        }
        Some(cost)
    }

    /// What a restore of the newest base's own point costs: its files and the WAL it needs
    /// up to its point (what RocksDB had not flushed when it was taken). No base taken
    /// later can cost much less than this.
    fn base_point(&self) -> Option<RestoreCost> {
        let base = self.newest_base.as_ref()?;
        let mut cost = RestoreCost::of_base(base);
        for s in self
            .segments
            .iter()
            .filter(|s| s.first_seq <= base.earliest_seq)
        {
            cost.add_wal(s.stored_bytes, s.records);
        }
        Some(cost)
    }

    /// True when the bound is exceeded and a base should be taken now. Before the first
    /// base, one is due anyway.
    pub fn due(&self) -> bool {
        let Some(bound) = self.bound else {
            return false;
        };
        if self.newest_base.is_none() {
            return false;
        }
        let since = self.since_base();
        match bound {
            Bound::Wal(ReplayBound::Bytes(n)) => since.wal_bytes > n,
            Bound::Wal(ReplayBound::Records(n)) => since.wal_records > n,
            Bound::Time(target) => self.time_due(target, &since),
        }
    }

    /// The predicted restore time of the newest point is over `target`. When the newest
    /// base alone (its files and the WAL RocksDB had not flushed into them) already takes
    /// half the target or more, a base taken at once would not do better: then one is due
    /// only once the WAL after its point takes half the target too, so that bases are not
    /// taken back to back.
    fn time_due(&self, target: Duration, since: &RestoreCost) -> bool {
        let (Some(newest), Some(floor)) = (self.newest_point(), self.base_point()) else {
            return false;
        };
        if newest.predict(&self.rates) <= target {
            return false;
        }
        floor.predict(&self.rates) < target / 2 || since.transfer_time(&self.rates) >= target / 2
    }

    fn publish(&self) {
        let since = self.since_base();
        let predicted = self.newest_point().map(|c| c.predict(&self.rates));
        self.metrics.replay_since_base(&since, predicted);
    }
}

fn shipped(s: &SegmentEntry) -> Shipped {
    Shipped {
        first_seq: s.first_seq,
        last_seq: s.last_seq,
        stored_bytes: s.stored_size,
        records: u64::from(s.record_count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::testing;

    fn seg(first: u64, last: u64, bytes: u64, records: u32) -> SegmentEntry {
        let t = testing::at_secs(0);
        SegmentEntry {
            stored_size: bytes,
            record_count: records,
            ..testing::segment(first, last, t, t)
        }
    }

    fn base(replay_from: u64, earliest: u64, size: u64) -> BaseSummary {
        BaseSummary {
            total_size: size,
            ..testing::base(
                &format!("b{earliest}"),
                replay_from,
                earliest,
                testing::at_secs(earliest as i64),
            )
        }
    }

    fn trigger(
        opts: ArchiverOptions,
        bases: &[BaseSummary],
        segs: &[SegmentEntry],
    ) -> ReplayTrigger {
        ReplayTrigger::new(&opts, bases, segs, &Arc::new(Metrics::new()))
    }

    #[test]
    fn the_wal_after_the_newest_base_point_is_counted_and_a_new_base_resets_it() {
        let opts = ArchiverOptions {
            max_replay: Some(ReplayBound::Bytes(250)),
            ..ArchiverOptions::default()
        };
        // Base at 20, replaying from 11: segments 1..=10 are not replayed, 11..=20 are
        // (before its point), 21.. are after it.
        let mut t = trigger(
            opts,
            &[base(11, 20, 1000)],
            &[
                seg(1, 10, 100, 10),
                seg(11, 20, 100, 10),
                seg(21, 30, 100, 10),
            ],
        );
        assert_eq!(t.since_base().wal_bytes, 100);
        assert_eq!(
            t.newest_point(),
            Some(RestoreCost {
                base_bytes: 1000,
                wal_bytes: 200,
                wal_records: 20
            })
        );
        assert!(!t.due());
        t.segment_shipped(&seg(31, 40, 100, 10));
        t.segment_shipped(&seg(41, 50, 50, 10));
        assert_eq!(t.since_base().wal_bytes, 250);
        assert!(!t.due(), "at the bound, not over it");
        t.segment_shipped(&seg(51, 60, 1, 1));
        assert!(t.due());
        t.base_recorded(&base(41, 55, 1000));
        assert_eq!(t.since_base().wal_bytes, 1);
        assert_eq!(t.newest_point().unwrap().wal_bytes, 51);
        assert!(!t.due());
        // An older base recorded late changes nothing.
        t.base_recorded(&base(1, 5, 10));
        assert_eq!(t.newest_point().unwrap().wal_bytes, 51);
    }

    #[test]
    fn a_records_bound_counts_records() {
        let opts = ArchiverOptions {
            max_replay: Some(ReplayBound::Records(15)),
            ..ArchiverOptions::default()
        };
        let mut t = trigger(opts, &[base(1, 1, 0)], &[]);
        t.segment_shipped(&seg(2, 11, 1 << 30, 10));
        assert!(!t.due());
        t.segment_shipped(&seg(12, 21, 1, 10));
        assert!(t.due());
    }

    #[test]
    fn no_bound_is_never_due_and_the_first_base_comes_from_the_schedule() {
        let mut t = trigger(ArchiverOptions::default(), &[base(1, 1, 0)], &[]);
        t.segment_shipped(&seg(2, 1000, u64::MAX / 4, 1000));
        assert!(!t.due());
        let opts = ArchiverOptions {
            max_replay: Some(ReplayBound::Bytes(1)),
            ..ArchiverOptions::default()
        };
        let mut t = trigger(opts, &[], &[]);
        t.segment_shipped(&seg(1, 1000, 1000, 1000));
        assert!(!t.due());
        assert_eq!(t.since_base().wal_bytes, 1000);
        assert_eq!(t.newest_point(), None);
    }

    #[test]
    fn a_time_target_takes_a_base_once_the_prediction_passes_it_but_not_back_to_back() {
        let rates = RestoreRates {
            download_bytes_per_sec: 1000,
            replay_records_per_sec: 100,
        };
        let opts = ArchiverOptions {
            target_recovery_time: Some(Duration::from_secs(10)),
            ..ArchiverOptions::default()
        };
        let mut t = trigger(opts.clone(), &[base(1, 1, 0)], &[]);
        t.rates = rates;
        // 0.1 s fixed + 1 s of bytes + 8 s of records: under 10 s.
        t.segment_shipped(&seg(2, 801, 1000, 800));
        assert!(!t.due());
        // + 2 s of records: over.
        t.segment_shipped(&seg(802, 1001, 0, 200));
        assert!(t.due());

        // A base whose own point costs 6.1 s (over half the target): a new one is due only
        // once the WAL after its point is predicted at 5 s or more.
        let mut t = trigger(opts, &[base(1, 600, 0)], &[seg(1, 600, 0, 600)]);
        t.rates = rates;
        t.segment_shipped(&seg(601, 1000, 0, 400));
        assert!(t.newest_point().unwrap().predict(&rates) > Duration::from_secs(10));
        assert!(!t.due(), "a base now would cost as much");
        t.segment_shipped(&seg(1001, 1100, 0, 100));
        assert!(t.due());
    }
}
