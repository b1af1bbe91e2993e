//! The record chain (FORMAT.md §6.2): in WAL order, each WriteBatch starts at the sequence
//! number where the batch before it ends, `seq = prev.seq + prev.count`, so that batches
//! follow each other without a hole or an overlap, and log numbers never decrease.
//!
//! The archiver's WAL follower, the segment encoder and decoder, the restore tool's replay
//! and its `verify` all check the chain with [`RecordChain`]; what a break means is theirs
//! to decide (a gap to record, a refusal, a problem to report).

use std::ops::RangeInclusive;

use crate::segment::Record;

/// Where a chain of batches breaks, by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SeqBreak {
    /// Sequence numbers `expected..found` are in no batch.
    #[error(
        "a record is missing: sequence {found} follows a batch that ends before {expected} \
         ({})",
        describe_range(*expected..=found - 1, "in no batch")
    )]
    Gap { expected: u64, found: u64 },
    /// The batch starts below where the previous one ends: sequences `found..expected`
    /// would be taken twice (or the sequence went backwards).
    #[error(
        "sequence {found} does not follow the batch before it, which ends before {expected} \
         ({})",
        describe_range(*found..=expected - 1, "taken twice")
    )]
    Overlap { expected: u64, found: u64 },
}

impl SeqBreak {
    /// The sequence number the chain expected.
    pub fn expected(&self) -> u64 {
        match *self {
            SeqBreak::Gap { expected, .. } | SeqBreak::Overlap { expected, .. } => expected,
        }
    }

    /// The sequence number the batch had instead.
    pub fn found(&self) -> u64 {
        match *self {
            SeqBreak::Gap { found, .. } | SeqBreak::Overlap { found, .. } => found,
        }
    }
}

/// Where a chain of archived records breaks: by sequence number, or by log number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordBreak {
    #[error(transparent)]
    Seq(#[from] SeqBreak),
    /// The record was read from a WAL file older than the record before it.
    #[error(
        "sequence {seq} is in WAL {log}, older than the WAL {prev_log} of the record before it"
    )]
    LogBackwards { seq: u64, log: u64, prev_log: u64 },
}

fn describe_range(range: RangeInclusive<u64>, what: &str) -> String {
    if range.start() == range.end() {
        format!("sequence number {} is {what}", range.start())
    } else {
        format!(
            "sequence numbers {}..={} are {what}",
            range.start(),
            range.end()
        )
    }
}

/// The record chain, batch by batch. A break is returned, and the chain goes on from the
/// batch that broke it all the same: a caller that reports the break and carries on checks
/// what follows against that batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordChain {
    /// The sequence number the next batch must start at, once known.
    next_seq: Option<u64>,
    /// The log number of the last record, when records carry one.
    log: Option<u64>,
}

impl RecordChain {
    /// A chain that expects nothing yet: its first batch says where it goes on.
    pub fn new() -> RecordChain {
        RecordChain::default()
    }

    /// A chain whose next batch must start at `next_seq` (where an earlier one ended).
    pub fn continuing_at(next_seq: u64) -> RecordChain {
        RecordChain {
            next_seq: Some(next_seq),
            log: None,
        }
    }

    /// The sequence number the next batch must start at, once known.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// Forgets the chain: the next batch starts a new one (after a hole that is accounted
    /// for, such as a recorded gap or a segment that could not be read).
    pub fn reset(&mut self) {
        *self = RecordChain::new();
    }

    /// Adds the batch of `count` sequence numbers starting at `seq`. A batch of count 0
    /// (log data only) takes no sequence number: the next one starts at the same `seq`.
    pub fn push(&mut self, seq: u64, count: u32) -> Result<(), SeqBreak> {
        let expected = self.next_seq;
        self.next_seq = Some(seq.saturating_add(u64::from(count)));
        match expected {
            Some(expected) if seq > expected => Err(SeqBreak::Gap {
                expected,
                found: seq,
            }),
            Some(expected) if seq < expected => Err(SeqBreak::Overlap {
                expected,
                found: seq,
            }),
            _ => Ok(()),
        }
    }

    /// Adds an archived record: [`RecordChain::push`], and its log number is not below the
    /// previous record's. A sequence break is reported before a log break.
    pub fn push_record(&mut self, r: &Record) -> Result<(), RecordBreak> {
        let prev_log = self.log.replace(r.log_number);
        self.push(r.seq, r.count)?;
        match prev_log {
            Some(prev_log) if r.log_number < prev_log => Err(RecordBreak::LogBackwards {
                seq: r.seq,
                log: r.log_number,
                prev_log,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::RecordTime;

    fn record(seq: u64, count: u32, log_number: u64) -> Record {
        Record {
            seq,
            count,
            time_us: 0,
            time_source: RecordTime::Observed,
            log_number,
            log_offset: 0,
            batch: Vec::new(),
        }
    }

    #[test]
    fn batches_that_follow_each_other_make_a_chain() {
        let mut c = RecordChain::new();
        assert_eq!(c.next_seq(), None);
        c.push(10, 3).unwrap();
        assert_eq!(c.next_seq(), Some(13));
        // Log data only: takes no sequence number.
        c.push(13, 0).unwrap();
        c.push(13, 1).unwrap();
        assert_eq!(c.next_seq(), Some(14));
        let mut c = RecordChain::continuing_at(7);
        c.push(7, 2).unwrap();
        assert_eq!(c.next_seq(), Some(9));
    }

    #[test]
    fn a_hole_is_a_gap_naming_the_missing_sequences() {
        let mut c = RecordChain::continuing_at(5);
        let e = c.push(9, 1).unwrap_err();
        assert_eq!(
            e,
            SeqBreak::Gap {
                expected: 5,
                found: 9
            }
        );
        assert_eq!((e.expected(), e.found()), (5, 9));
        let msg = e.to_string();
        assert!(
            msg.contains("sequence numbers 5..=8 are in no batch"),
            "{msg}"
        );
        // The chain goes on from the batch that broke it.
        assert_eq!(c.next_seq(), Some(10));
        c.push(10, 1).unwrap();
        let msg = c.push(12, 1).unwrap_err().to_string();
        assert!(msg.contains("sequence number 11 is in no batch"), "{msg}");
    }

    #[test]
    fn a_batch_below_the_expected_sequence_is_an_overlap() {
        let mut c = RecordChain::new();
        c.push(10, 5).unwrap();
        let e = c.push(12, 1).unwrap_err();
        assert_eq!(
            e,
            SeqBreak::Overlap {
                expected: 15,
                found: 12
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("sequence numbers 12..=14 are taken twice"),
            "{msg}"
        );
        assert!(msg.contains("ends before 15"), "{msg}");
        // Twice the same batch.
        let mut c = RecordChain::new();
        c.push(3, 1).unwrap();
        let msg = c.push(3, 1).unwrap_err().to_string();
        assert!(msg.contains("sequence number 3 is taken twice"), "{msg}");
    }

    #[test]
    fn a_reset_chain_expects_nothing() {
        let mut c = RecordChain::continuing_at(5);
        c.reset();
        c.push(100, 1).unwrap();
        assert_eq!(c.next_seq(), Some(101));
    }

    #[test]
    fn records_check_log_numbers_after_sequences() {
        let mut c = RecordChain::new();
        c.push_record(&record(1, 2, 7)).unwrap();
        c.push_record(&record(3, 1, 7)).unwrap();
        c.push_record(&record(4, 1, 9)).unwrap();
        let e = c.push_record(&record(5, 1, 8)).unwrap_err();
        assert_eq!(
            e,
            RecordBreak::LogBackwards {
                seq: 5,
                log: 8,
                prev_log: 9
            }
        );
        assert!(e.to_string().contains("older than the WAL 9"), "{e}");
        // Both broken: the sequence is named first.
        let e = c.push_record(&record(9, 1, 2)).unwrap_err();
        assert_eq!(
            e,
            RecordBreak::Seq(SeqBreak::Gap {
                expected: 6,
                found: 9
            })
        );
        // A sequence that would overflow saturates: nothing can follow it.
        let mut c = RecordChain::new();
        c.push(u64::MAX - 1, 5).unwrap();
        assert!(matches!(c.push(0, 1), Err(SeqBreak::Overlap { .. })));
    }
}
