//! The WAL follower: every WriteBatch a database writes to its WAL, in order, exactly once.
//!
//! RocksDB writes one WAL file (`NNNNNN.log`) at a time in its WAL directory. When a memtable
//! is switched it creates a newer one and stops writing the old one; once the old file's data
//! is flushed, RocksDB moves it to `archive/` (kept for `WAL_ttl_seconds` /
//! `WAL_size_limit_MB`) or deletes it. Log numbers share a counter with other files, so they
//! have holes: the log after `N` is the smallest number above `N` found in the WAL directory
//! or `archive/`.
//!
//! [`WalFollower::poll`] reads everything currently available and returns it as
//! [`FollowEvent`]s. It checks that every batch continues the previous one
//! (`seq = previous seq + previous count`) and reports any break as a [`FollowEvent::Gap`];
//! it never skips records silently. Each record is stamped with a time (FORMAT.md §6.4): the
//! batch's Tidemark time marker if it carries one, otherwise the time it was read; times never
//! decrease.
//!
//! Rotation is handled in the order that makes it safe against a writer still appending: the
//! follower first checks that a newer log exists and holds a record, then reads the old log
//! one final time, and moves on only when the old log has been read to its clean end. A torn
//! record at the live tail is left in place and read again later.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tidemark_manifest::chain::{RecordChain, SeqBreak};
use tidemark_manifest::rocks::DbFile;
use tidemark_manifest::rocks::log::{LogError, LogReader};
use tidemark_manifest::rocks::marker;
use tidemark_manifest::rocks::write_batch::{Batch, BatchError, BatchHeader};
use tidemark_manifest::segment::{Record, RecordTime};

/// How long a log may end in an incomplete record after a newer log appeared before the
/// follower gives up on the incomplete bytes and moves on (see
/// [`WalFollower::with_torn_tail_grace`]).
pub const DEFAULT_TORN_TAIL_GRACE: Duration = Duration::from_secs(10);

/// A directory listing is trusted only when the directory's modification time is older than
/// the listing by this much; otherwise a change in the same timestamp tick could go unseen.
const RACY_MTIME_MARGIN: Duration = Duration::from_secs(2);
/// The directories are listed again at least this often, whatever their modification time.
const MAX_LISTING_AGE: Duration = Duration::from_secs(5);

/// Where a [`WalFollower`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest WAL file in the WAL directory or `archive/`, from its first record. No
    /// sequence number is expected: the first record read sets it.
    Oldest,
    /// Resume after the last archived record: `record_offset` is that record's start offset
    /// in log `log_number`, and `next_seq` the sequence number that follows it. The follower
    /// re-reads that record, checks that it ends at `next_seq`, and continues after it. If the
    /// log no longer exists, reading continues with the next log, and a
    /// [`FollowEvent::Gap`] from `next_seq` is reported unless it continues exactly.
    After {
        log_number: u64,
        record_offset: u64,
        next_seq: u64,
    },
}

/// The last record a follower returned: enough to resume after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPosition {
    /// The WAL file the record was read from.
    pub log_number: u64,
    /// The record's start offset in that file.
    pub record_offset: u64,
    /// The sequence number that follows the record.
    pub next_seq: u64,
}

impl From<WalPosition> for StartPosition {
    fn from(p: WalPosition) -> StartPosition {
        StartPosition::After {
            log_number: p.log_number,
            record_offset: p.record_offset,
            next_seq: p.next_seq,
        }
    }
}

/// What [`WalFollower::poll`] found, in WAL order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowEvent {
    /// The next WriteBatch, stamped with its time.
    Record(Record),
    /// Continuity broke before the next record: sequence numbers `expected_seq..found_seq`
    /// are not in the WAL files the follower could read. The records that follow continue
    /// from `found_seq`.
    Gap {
        expected_seq: u64,
        found_seq: u64,
        detail: String,
    },
    /// The follower finished log `from_log` and now reads `to_log`.
    Rotated { from_log: u64, to_log: u64 },
}

/// Errors following the WAL. None of them is a gap: they stop archiving until fixed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(
        "the WAL directory {path} does not exist or is not a directory; check --db / --wal-dir"
    )]
    NoWalDir { path: PathBuf },
    #[error("cannot list the WAL directory {path}: {source}; check that the archiver may read it")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot follow WAL {log_number:06}.log: {source}")]
    Log {
        log_number: u64,
        #[source]
        source: LogError,
    },
    #[error(
        "WAL {path}: the record at offset {offset} is not a WriteBatch ({source}); the file is \
         corrupt or was not written by RocksDB"
    )]
    Batch {
        path: PathBuf,
        offset: u64,
        #[source]
        source: BatchError,
    },
    #[error(
        "cannot resume in WAL {path} at offset {offset}: there is no complete record there, \
         although the last archived record was read from that position; the file was replaced \
         since. Archive this database into a new repository"
    )]
    ResumeNoRecord { path: PathBuf, offset: u64 },
    #[error(
        "cannot resume in WAL {path} at offset {offset}: the record there is sequence {seq} \
         (count {count}), which ends before {found_next}, but the last archived record ends \
         before {next_seq}; this WAL is not the one that was archived (was the database \
         replaced or restored?). Archive this database into a new repository"
    )]
    ResumeMismatch {
        path: PathBuf,
        offset: u64,
        seq: u64,
        count: u32,
        found_next: u64,
        next_seq: u64,
    },
    #[error(
        "WAL {path}: the record at offset {offset} has sequence {found}, below the expected \
         {expected}: sequence numbers went backwards, so this WAL does not continue the archived \
         history (was the database replaced or restored?). Archive it into a new repository"
    )]
    SequenceWentBack {
        path: PathBuf,
        offset: u64,
        expected: u64,
        found: u64,
    },
}

/// The log being read.
#[derive(Debug)]
struct OpenLog {
    number: u64,
    reader: LogReader,
    /// Whether a record has been read from it (by this follower).
    read_any: bool,
}

/// Log numbers present in the WAL directory and `archive/`, listed only when the directories
/// changed.
#[derive(Debug)]
struct LogListing {
    wal_dir: PathBuf,
    archive_dir: PathBuf,
    numbers: BTreeSet<u64>,
    /// Modification times of the two directories when they were last listed.
    stamp: Option<(SystemTime, Option<SystemTime>)>,
    listed_at: Option<(SystemTime, Instant)>,
}

impl LogListing {
    fn new(wal_dir: &Path) -> LogListing {
        LogListing {
            wal_dir: wal_dir.to_path_buf(),
            archive_dir: wal_dir.join("archive"),
            numbers: BTreeSet::new(),
            stamp: None,
            listed_at: None,
        }
    }

    fn mtime(path: &Path) -> Result<Option<SystemTime>, FollowError> {
        match fs::metadata(path) {
            Ok(m) => Ok(m.modified().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FollowError::List {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Lists the directories again if they may have changed since the last listing (or if
    /// `force`).
    fn refresh(&mut self, force: bool) -> Result<(), FollowError> {
        let wal_mtime = Self::mtime(&self.wal_dir)?.ok_or_else(|| FollowError::NoWalDir {
            path: self.wal_dir.clone(),
        })?;
        let stamp = (wal_mtime, Self::mtime(&self.archive_dir)?);
        if !force
            && self.stamp == Some(stamp)
            && let Some((listed_wall, listed_mono)) = self.listed_at
            && listed_mono.elapsed() < MAX_LISTING_AGE
        {
            let newest = stamp.1.map_or(stamp.0, |a| a.max(stamp.0));
            if newest + RACY_MTIME_MARGIN < listed_wall {
                return Ok(());
            }
        }
        let listed_at = (SystemTime::now(), Instant::now());
        let mut numbers = BTreeSet::new();
        // The WAL directory first: a file moved to archive/ meanwhile is then seen in one of
        // the two listings (or both), never in neither.
        list_logs(&self.wal_dir, &mut numbers, true)?;
        list_logs(&self.archive_dir, &mut numbers, false)?;
        self.numbers = numbers;
        self.stamp = Some(stamp);
        self.listed_at = Some(listed_at);
        Ok(())
    }

    fn first_after(&self, after: Option<u64>) -> Option<u64> {
        match after {
            None => self.numbers.first().copied(),
            Some(n) => self.numbers.range(n + 1..).next().copied(),
        }
    }
}

fn list_logs(dir: &Path, out: &mut BTreeSet<u64>, required: bool) -> Result<(), FollowError> {
    let list_err = |source| FollowError::List {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if !required && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if required && e.kind() == io::ErrorKind::NotFound => {
            return Err(FollowError::NoWalDir {
                path: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(list_err(e)),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            // A file removed while listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(list_err(e)),
        };
        if let Some(DbFile::Wal(n)) = entry.file_name().to_str().and_then(DbFile::parse) {
            out.insert(n);
        }
    }
    Ok(())
}

/// Follows the WAL files of a database, in order. See the [module documentation](self).
#[derive(Debug)]
pub struct WalFollower {
    wal_dir: PathBuf,
    listing: LogListing,
    current: Option<OpenLog>,
    /// The log finished (or, on resume, missing) last: the next log is the first above it.
    after_log: Option<u64>,
    /// The record chain (FORMAT.md §6.2): where the next record must start.
    chain: RecordChain,
    last_time_us: i64,
    last: Option<WalPosition>,
    /// Context for the next gap: WAL files that vanished before they could be read.
    missing: Vec<String>,
    /// When the current log was first seen to end in incomplete bytes while a newer log
    /// existed.
    torn_since: Option<Instant>,
    torn_tail_grace: Duration,
    /// An error met after some events were read, returned by the next poll.
    pending_error: Option<FollowError>,
    /// A poll stops after returning this many bytes of batches (the rest waits for the
    /// next poll), so that catching up on a long backlog needs bounded memory.
    poll_budget: usize,
    /// Bytes of batches returned by the current poll.
    polled_bytes: usize,
}

/// Default for [`WalFollower::with_poll_budget`]: 4 MiB of batches per poll. Enough to
/// make a poll's fixed costs small against its records (about 1,000 batches of 4 KiB), and
/// small beside the segments the shipper holds.
pub const DEFAULT_POLL_BUDGET: usize = 4 << 20;

impl WalFollower {
    /// A follower of the WAL files in `wal_dir` (and `wal_dir/archive`), starting at `start`.
    ///
    /// The starting log is opened at once, so that it cannot be deleted before it is read. For
    /// [`StartPosition::After`], the last archived record is read again and checked here.
    pub fn new(wal_dir: &Path, start: StartPosition) -> Result<WalFollower, FollowError> {
        if !wal_dir.is_dir() {
            return Err(FollowError::NoWalDir {
                path: wal_dir.to_path_buf(),
            });
        }
        let mut follower = WalFollower {
            wal_dir: wal_dir.to_path_buf(),
            listing: LogListing::new(wal_dir),
            current: None,
            after_log: None,
            chain: RecordChain::new(),
            last_time_us: i64::MIN,
            last: None,
            missing: Vec::new(),
            torn_since: None,
            torn_tail_grace: DEFAULT_TORN_TAIL_GRACE,
            pending_error: None,
            poll_budget: DEFAULT_POLL_BUDGET,
            polled_bytes: 0,
        };
        match start {
            StartPosition::Oldest => {
                follower.listing.refresh(true)?;
                follower.open_next(&mut Vec::new())?;
            }
            StartPosition::After {
                log_number,
                record_offset,
                next_seq,
            } => follower.resume(log_number, record_offset, next_seq)?,
        }
        Ok(follower)
    }

    /// Record times never go below `time_us` (microseconds since the epoch). On resume, pass
    /// the last archived record's time, so that times stay non-decreasing across restarts.
    pub fn with_min_time(mut self, time_us: i64) -> WalFollower {
        self.last_time_us = self.last_time_us.max(time_us);
        self
    }

    /// How long a log that a newer log has replaced may end in incomplete bytes before the
    /// follower moves on without them (default [`DEFAULT_TORN_TAIL_GRACE`]). RocksDB finishes
    /// writing a log before it writes a batch to the next one, so incomplete bytes that stay
    /// are a record torn by a crash of the database process; whatever they held is reported
    /// as a gap if the next log does not continue the sequence.
    pub fn with_torn_tail_grace(mut self, grace: Duration) -> WalFollower {
        self.torn_tail_grace = grace;
        self
    }

    /// How many bytes of batches one poll returns at most (at least one record is always
    /// returned when one is available).
    pub fn with_poll_budget(mut self, bytes: usize) -> WalFollower {
        self.poll_budget = bytes.max(1);
        self
    }

    /// True when the last poll stopped at its budget: more records may be ready now.
    pub fn more_ready(&self) -> bool {
        self.budget_spent()
    }

    /// True when the current poll has returned its budget of bytes.
    fn budget_spent(&self) -> bool {
        self.polled_bytes >= self.poll_budget
    }

    /// The WAL directory.
    pub fn wal_dir(&self) -> &Path {
        &self.wal_dir
    }

    /// The last record returned (on resume, before any new record: the resume position).
    pub fn position(&self) -> Option<WalPosition> {
        self.last
    }

    /// The sequence number the next record must have, once known.
    pub fn next_seq(&self) -> Option<u64> {
        self.chain.next_seq()
    }

    /// The log being read and the offset of its next unread record.
    pub fn reading(&self) -> Option<(u64, u64)> {
        self.current
            .as_ref()
            .map(|log| (log.number, log.reader.offset()))
    }

    /// Reads every record currently available, through any number of log rotations, and
    /// returns what it found in WAL order. Returns an empty list, cheaply, when nothing is new.
    ///
    /// An error met after some events were read is returned by the next call, so that the
    /// events read before it are not lost. Errors are not transient: the follower stays
    /// before the record that caused it, and polling again meets it again.
    pub fn poll(&mut self) -> Result<Vec<FollowEvent>, FollowError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let mut events = Vec::new();
        self.polled_bytes = 0;
        match self.poll_into(&mut events) {
            Ok(()) => Ok(events),
            Err(e) if events.is_empty() => Err(e),
            Err(e) => {
                self.pending_error = Some(e);
                Ok(events)
            }
        }
    }

    fn poll_into(&mut self, events: &mut Vec<FollowEvent>) -> Result<(), FollowError> {
        loop {
            if self.current.is_none() {
                self.listing.refresh(false)?;
                if !self.open_next(events)? {
                    break;
                }
            }
            self.drain(events)?;
            if self.budget_spent() {
                break;
            }
            let Some(number) = self.current.as_ref().map(|log| log.number) else {
                break;
            };
            // Nothing more in this log for now. Has the writer moved on to a newer log? That
            // is checked before the final read of this one, so that nothing appended to it
            // before the switch is missed.
            self.listing.refresh(false)?;
            if !self.newer_log_written(number)? {
                break;
            }
            self.drain(events)?;
            if self.budget_spent() {
                break;
            }
            let log = self.current.as_mut().expect("the current log is open");
            let clean = log
                .reader
                .at_clean_end()
                .map_err(|source| FollowError::Log {
                    log_number: number,
                    source,
                })?;
            if !clean {
                let since = *self.torn_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.torn_tail_grace {
                    break;
                }
                let detail = match log.reader.finish() {
                    Err(e) => e.to_string(),
                    Ok(_) => "incomplete bytes at its end".to_string(),
                };
                tracing::warn!(
                    log = number,
                    offset = log.reader.offset(),
                    grace = ?self.torn_tail_grace,
                    "WAL {number:06}.log ends in bytes that are not a complete record although \
                     a newer log is being written ({detail}); moving on without them. If they \
                     held a record, the next log does not continue the sequence and a gap is \
                     reported"
                );
            }
            self.torn_since = None;
            self.after_log = Some(number);
            self.current = None;
        }
        Ok(())
    }

    /// Whether a log newer than `number` holds a record. RocksDB creates the next log (and
    /// may write metadata records into it: the WAL compression, the predecessor WAL info)
    /// before it writes out the last buffered bytes of the old one when `manual_wal_flush`
    /// is set, but always writes those before any batch to the new one: once a newer log
    /// holds a record, the old one is complete. An empty newer log costs a `stat` per poll.
    fn newer_log_written(&self, number: u64) -> Result<bool, FollowError> {
        for n in self.listing.numbers.range(number + 1..) {
            let name = DbFile::Wal(*n).file_name().expect("a WAL file has a name");
            for dir in [&self.listing.wal_dir, &self.listing.archive_dir] {
                let path = dir.join(&name);
                match fs::metadata(&path) {
                    Ok(m) if m.len() == 0 => break,
                    Ok(_) => {
                        if holds_a_record(&path) {
                            return Ok(true);
                        }
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(FollowError::List { path, source }),
                }
            }
        }
        Ok(false)
    }

    /// Opens the first log after `after_log` (the oldest if none) in the current listing,
    /// skipping logs that vanish before they can be opened. Returns false if there is none.
    fn open_next(&mut self, events: &mut Vec<FollowEvent>) -> Result<bool, FollowError> {
        let from_log = self.after_log;
        while let Some(number) = self.listing.first_after(self.after_log) {
            let Some(reader) = self.open_log(number, 0)? else {
                tracing::warn!(
                    log = number,
                    "WAL {number:06}.log was deleted before the archiver could open it"
                );
                self.missing.push(format!("{number:06}.log"));
                self.after_log = Some(number);
                self.listing.refresh(true)?;
                continue;
            };
            if let Some(from_log) = from_log {
                events.push(FollowEvent::Rotated {
                    from_log,
                    to_log: number,
                });
            }
            tracing::debug!(log = number, path = %reader.path().display(), "reading WAL");
            self.current = Some(OpenLog {
                number,
                reader,
                read_any: false,
            });
            return Ok(true);
        }
        Ok(false)
    }

    /// Opens log `number` at `offset`, in the WAL directory or `archive/`. `None` if it exists
    /// in neither.
    fn open_log(&self, number: u64, offset: u64) -> Result<Option<LogReader>, FollowError> {
        let name = DbFile::Wal(number)
            .file_name()
            .expect("a WAL file has a name");
        // The WAL directory first: RocksDB only ever moves a log from there to archive/.
        for dir in [&self.listing.wal_dir, &self.listing.archive_dir] {
            match LogReader::open_at(dir.join(&name), offset) {
                Ok(reader) => return Ok(Some(reader)),
                Err(LogError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(FollowError::Log {
                        log_number: number,
                        source,
                    });
                }
            }
        }
        Ok(None)
    }

    fn resume(
        &mut self,
        log_number: u64,
        record_offset: u64,
        next_seq: u64,
    ) -> Result<(), FollowError> {
        self.chain = RecordChain::continuing_at(next_seq);
        self.last = Some(WalPosition {
            log_number,
            record_offset,
            next_seq,
        });
        let Some(mut reader) = self.open_log(log_number, record_offset)? else {
            tracing::warn!(
                log = log_number,
                next_seq,
                "WAL {log_number:06}.log, where archiving stopped, no longer exists; continuing \
                 with the next WAL"
            );
            self.missing.push(format!(
                "{log_number:06}.log (where archiving had stopped, at offset {record_offset})"
            ));
            self.after_log = Some(log_number);
            self.listing.refresh(true)?;
            return Ok(());
        };
        let record = reader
            .next_record()
            .map_err(|source| FollowError::Log { log_number, source })?
            .ok_or_else(|| FollowError::ResumeNoRecord {
                path: reader.path().to_path_buf(),
                offset: record_offset,
            })?;
        let header = BatchHeader::parse(&record.bytes).map_err(|source| FollowError::Batch {
            path: reader.path().to_path_buf(),
            offset: record_offset,
            source,
        })?;
        if record.start_offset != record_offset || header.next_sequence() != next_seq {
            return Err(FollowError::ResumeMismatch {
                path: reader.path().to_path_buf(),
                offset: record_offset,
                seq: header.sequence,
                count: header.count,
                found_next: header.next_sequence(),
                next_seq,
            });
        }
        self.current = Some(OpenLog {
            number: log_number,
            reader,
            read_any: true,
        });
        Ok(())
    }

    /// Reads the current log's complete records.
    fn drain(&mut self, events: &mut Vec<FollowEvent>) -> Result<(), FollowError> {
        let Some(log) = self.current.as_mut() else {
            return Ok(());
        };
        let number = log.number;
        while self.polled_bytes < self.poll_budget
            && let Some(rec) = log
                .reader
                .next_record()
                .map_err(|source| FollowError::Log {
                    log_number: number,
                    source,
                })?
        {
            self.torn_since = None;
            let header = BatchHeader::parse(&rec.bytes).map_err(|source| FollowError::Batch {
                path: log.reader.path().to_path_buf(),
                offset: rec.start_offset,
                source,
            })?;
            // Taken on only once the record is: a follower that stops here resumes before it.
            let mut chain = self.chain;
            match chain.push(header.sequence, header.count) {
                Ok(()) => {}
                Err(SeqBreak::Overlap { expected, found }) => {
                    return Err(FollowError::SequenceWentBack {
                        path: log.reader.path().to_path_buf(),
                        offset: rec.start_offset,
                        expected,
                        found,
                    });
                }
                Err(SeqBreak::Gap { expected, found }) => {
                    let detail = gap_detail(
                        expected,
                        found,
                        number,
                        rec.start_offset,
                        log.read_any,
                        self.after_log,
                        &self.missing,
                    );
                    tracing::warn!(expected, found, "{detail}");
                    events.push(FollowEvent::Gap {
                        expected_seq: expected,
                        found_seq: found,
                        detail,
                    });
                }
            }
            self.missing.clear();
            log.read_any = true;

            let (time_us, time_source) = match marker_time(&rec.bytes, number, rec.start_offset) {
                Some(t) => (t, RecordTime::Marker),
                None => (now_us(), RecordTime::Observed),
            };
            let time_us = time_us.max(self.last_time_us);
            self.last_time_us = time_us;
            self.chain = chain;
            self.last = Some(WalPosition {
                log_number: number,
                record_offset: rec.start_offset,
                next_seq: header.next_sequence(),
            });
            self.polled_bytes += rec.bytes.len();
            events.push(FollowEvent::Record(Record {
                seq: header.sequence,
                count: header.count,
                time_us,
                time_source,
                log_number: number,
                log_offset: rec.start_offset,
                batch: rec.bytes,
            }));
        }
        Ok(())
    }
}

/// Whether the log at `path` starts with a complete record (metadata records aside). A log
/// that cannot be read counts as written: reading it after the current one reports why.
fn holds_a_record(path: &Path) -> bool {
    match LogReader::open(path) {
        Ok(mut reader) => !matches!(reader.next_record(), Ok(None)),
        Err(LogError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

fn gap_detail(
    expected: u64,
    found: u64,
    log_number: u64,
    offset: u64,
    mid_log: bool,
    previous_log: Option<u64>,
    missing: &[String],
) -> String {
    let range = if found == expected + 1 {
        format!("sequence number {expected} is")
    } else {
        format!("sequence numbers {expected}..={} are", found - 1)
    };
    if mid_log {
        return format!(
            "{range} not in the WAL: WAL {log_number:06}.log continues at offset {offset} with \
             sequence {found} (writes with the WAL disabled and ingested files take sequence \
             numbers that are not in the WAL)"
        );
    }
    let mut detail = match previous_log {
        Some(prev) => format!(
            "{range} missing between WAL {prev:06}.log and WAL {log_number:06}.log, which \
             starts at sequence {found}"
        ),
        None => format!(
            "{range} missing before WAL {log_number:06}.log, which starts at sequence {found}"
        ),
    };
    if missing.is_empty() {
        detail.push_str(
            ": a WAL file was deleted before it was archived (keep rotated WAL files longer with \
             WAL_ttl_seconds or WAL_size_limit_MB)",
        );
    } else {
        detail.push_str(&format!(
            ": WAL file(s) {} were deleted before they were archived (keep rotated WAL files \
             longer with WAL_ttl_seconds or WAL_size_limit_MB)",
            missing.join(", ")
        ));
    }
    detail
}

/// The time of the batch's first valid Tidemark time marker, if any. Malformed markers and
/// undecodable batches are reported and otherwise ignored: the batch is still archived.
fn marker_time(batch: &[u8], log_number: u64, offset: u64) -> Option<i64> {
    let batch = Batch::parse(batch).ok()?;
    let blobs = match batch.log_data_blobs() {
        Ok(blobs) => blobs,
        Err(e) => {
            tracing::warn!(
                log = log_number,
                offset,
                error = %e,
                "cannot decode the entries of the WriteBatch at WAL {log_number:06}.log offset \
                 {offset} to look for a time marker; archiving it with its observed time"
            );
            return None;
        }
    };
    for blob in blobs {
        match marker::decode(blob) {
            None => {}
            Some(Ok(m)) => return Some(m.unix_micros),
            Some(Err(e)) => tracing::warn!(
                log = log_number,
                offset,
                seq = batch.header().sequence,
                error = %e,
                "ignoring a malformed Tidemark time marker in the WriteBatch at WAL \
                 {log_number:06}.log offset {offset}"
            ),
        }
    }
    None
}

fn now_us() -> i64 {
    marker::Marker::from_system_time(SystemTime::now()).unix_micros
}
