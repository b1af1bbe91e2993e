//! Catching up: when the follower keeps finding more of the WAL ready than one read takes,
//! read after read, the archiver is behind its database (it was stopped, or the database
//! writes faster than the archiver compresses). Until a read reaches the end of the WAL, the
//! records are compressed at `catch_up_zstd_level` (faster, a little larger): the WAL
//! RocksDB may delete is what the archiver has not read yet, so reading it sooner is worth
//! a few percent of storage.
//!
//! A backlog counts once [`CATCH_UP_BACKLOG`] bytes were read without reaching the end: a
//! database writing steadily leaves at most a coalescing window's worth of WAL between two
//! reads (at 100 ms, 64 MiB is 640 MB/s), so an archiver that keeps up never switches.

/// Bytes of records read in a row, each read stopping at its budget with more ready, that
/// make a backlog.
pub const CATCH_UP_BACKLOG: u64 = 64 << 20;

/// Whether the archiver is catching up, from the reads of the WAL.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Bytes of records read since a read last reached the end of the WAL.
    read_in_a_row: u64,
}

impl CatchUp {
    /// Counts a read of `bytes` of records; `more_ready` when it stopped at its budget with
    /// more of the WAL ready. True while the archiver catches up: from the read that makes
    /// the backlog to the one that reaches the end of the WAL (excluded).
    pub fn read(&mut self, bytes: u64, more_ready: bool) -> bool {
        if more_ready {
            self.read_in_a_row = self.read_in_a_row.saturating_add(bytes);
        } else {
            self.read_in_a_row = 0;
        }
        self.read_in_a_row >= CATCH_UP_BACKLOG
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_starts_after_enough_reads_in_a_row_and_ends_at_the_end_of_the_wal() {
        let mut c = CatchUp::default();
        let read = 4 << 20;
        let reads_to_backlog = CATCH_UP_BACKLOG / read;
        for _ in 1..reads_to_backlog {
            assert!(!c.read(read, true));
        }
        assert!(c.read(read, true), "the read that makes the backlog");
        assert!(c.read(read, true));
        assert!(!c.read(read, false), "the end of the WAL");
        // Reads in a row start again from nothing.
        for _ in 1..reads_to_backlog {
            assert!(!c.read(read, true));
        }
        assert!(!c.read(1, false));
        // A database that writes a little more than a read takes at each wake-up, but is
        // read to its end at the next: never a backlog.
        for _ in 0..1000 {
            assert!(!c.read(read, true));
            assert!(!c.read(read / 10, false));
        }
    }
}
