//! The WAL follower on a blocking thread, one poll ahead while a backlog lasts.
//!
//! A poll reads from disk, checks and parses records ([`crate::follow`]); the pipeline then
//! packs them into the open segment and closes full segments. While the WAL holds more than
//! one poll's budget, the next poll runs while the records of the last one are packed, so
//! that reading overlaps the rest of the pipeline. At the end of the WAL nothing is read
//! ahead: a poll that reached the end is followed only by one the next change wakes.
//!
//! Polls stay in order and none is skipped: a poll read ahead is the next one
//! [`WalReader::next`] returns. Its records are read from the follower's position, so
//! events are never lost between polls; a pipeline dropped with a poll in flight drops its
//! follower too, and the next one resumes from the repository.

use std::time::Instant;

use tokio::task::JoinHandle;

use super::ServiceError;
use crate::follow::{FollowError, FollowEvent, WalFollower};

/// What one poll returned.
pub struct Polled {
    pub events: Result<Vec<FollowEvent>, FollowError>,
    /// When the poll started.
    pub started: Instant,
    /// The poll stopped at its budget: more records may be ready.
    pub more_ready: bool,
}

struct Outcome {
    follower: WalFollower,
    polled: Polled,
}

/// Polls a [`WalFollower`] on blocking threads, at most one poll at a time.
pub struct WalReader {
    /// The follower while no poll runs.
    idle: Option<WalFollower>,
    /// A poll started ahead, holding the follower.
    ahead: Option<JoinHandle<Outcome>>,
    /// The last poll returned stopped at its budget.
    more_ready: bool,
}

impl WalReader {
    pub fn new(follower: WalFollower) -> WalReader {
        WalReader {
            idle: Some(follower),
            ahead: None,
            more_ready: false,
        }
    }

    /// The next poll's events: the one read ahead, or a new one. With `ahead`, when this
    /// poll stopped at its budget without an error, the poll after it starts at once.
    pub async fn next(&mut self, ahead: bool) -> Result<Polled, ServiceError> {
        let task = match self.ahead.take() {
            Some(task) => task,
            None => spawn_poll(
                self.idle
                    .take()
                    .expect("the follower is idle between polls"),
            ),
        };
        let Outcome { follower, polled } = task
            .await
            .map_err(|e| ServiceError::Other(format!("WAL reader task failed: {e}")))?;
        self.more_ready = polled.more_ready;
        if ahead && polled.more_ready && polled.events.is_ok() {
            self.ahead = Some(spawn_poll(follower));
        } else {
            self.idle = Some(follower);
        }
        Ok(polled)
    }

    /// True when more records may be ready now: the last poll stopped at its budget (the
    /// one after it may be running already).
    pub fn more_ready(&self) -> bool {
        self.more_ready
    }

    /// True while a poll read ahead runs or waits to be taken.
    #[cfg(test)]
    fn reading_ahead(&self) -> bool {
        self.ahead.is_some()
    }
}

fn spawn_poll(mut follower: WalFollower) -> JoinHandle<Outcome> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let events = follower.poll();
        let more_ready = follower.more_ready();
        Outcome {
            follower,
            polled: Polled {
                events,
                started,
                more_ready,
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::Path;

    use tidemark_manifest::rocks::DbFile;
    use tidemark_manifest::rocks::log::LogWriter;

    use super::*;
    use crate::follow::StartPosition;

    /// Batches of `value_len` bytes with sequences `first..first + n`, in log `number`.
    fn write_wal(dir: &Path, number: u64, first: u64, n: u64, value_len: usize) {
        let path = dir.join(DbFile::Wal(number).file_name().unwrap());
        let mut w = LogWriter::new(File::create(&path).unwrap());
        for seq in first..first + n {
            // A write batch header (sequence, count 1) and padding standing for its ops.
            let mut b = seq.to_le_bytes().to_vec();
            b.extend_from_slice(&1u32.to_le_bytes());
            b.resize(12 + value_len, 0xab);
            w.add_record(&b).unwrap();
        }
        w.flush().unwrap();
    }

    fn seqs(events: &[FollowEvent]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                FollowEvent::Record(r) => Some(r.seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_backlog_is_read_one_poll_ahead_in_order_and_nothing_ahead_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), 7, 1, 100, 1000);
        let follower = WalFollower::new(dir.path(), StartPosition::Oldest)
            .unwrap()
            .with_poll_budget(10_000);
        let mut reader = WalReader::new(follower);
        let mut read = Vec::new();
        let mut polls = 0;
        loop {
            let polled = reader.next(true).await.unwrap();
            polls += 1;
            let events = polled.events.unwrap();
            read.extend(seqs(&events));
            // The poll after one that stopped at its budget is already running.
            assert_eq!(reader.reading_ahead(), polled.more_ready);
            assert_eq!(reader.more_ready(), polled.more_ready);
            if !polled.more_ready {
                break;
            }
        }
        assert_eq!(
            read,
            (1..=100).collect::<Vec<_>>(),
            "every record once, in order"
        );
        assert!(polls >= 10, "the budget split the backlog: {polls} polls");

        // At the end nothing runs ahead; the next change is read by the next poll.
        write_wal(dir.path(), 8, 101, 3, 10);
        let polled = reader.next(true).await.unwrap();
        assert_eq!(seqs(&polled.events.unwrap()), vec![101, 102, 103]);
        assert!(!reader.reading_ahead());
    }

    #[tokio::test]
    async fn without_ahead_each_poll_waits_to_be_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), 7, 1, 20, 1000);
        let follower = WalFollower::new(dir.path(), StartPosition::Oldest)
            .unwrap()
            .with_poll_budget(5_000);
        let mut reader = WalReader::new(follower);
        let polled = reader.next(false).await.unwrap();
        assert!(polled.more_ready);
        assert!(!reader.reading_ahead());
        assert!(reader.more_ready());
        let first = seqs(&polled.events.unwrap());
        let second = seqs(&reader.next(false).await.unwrap().events.unwrap());
        assert_eq!(second.first(), Some(&(first.last().unwrap() + 1)));
    }
}
