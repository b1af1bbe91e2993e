//! Replay: re-creating the source database's WAL files from archived records.
//!
//! RocksDB checks almost nothing when it recovers WAL files: a missing batch, a WAL numbered
//! below what a column family needs, or a record applied twice all pass silently. So the
//! chain is checked here, twice:
//!
//! - [`check_plan`], before anything is downloaded: the planned segments are contiguous
//!   from the one holding the base's `replay_from_seq` to the cutoff, and their log numbers
//!   never decrease;
//! - [`BaseChain`], record by record: the first record of a WAL numbered
//!   `min_log_number` or above is the base's first needed record (sequence
//!   `replay_from_seq`), no record of an older WAL reaches past it, every later record
//!   continues the previous one (`seq == prev.seq + prev.count`), and log numbers never
//!   decrease (the record chain, [`RecordChain`]). (The first record need not be in WAL `min_log_number` itself: a database that
//!   never flushed has `min_log_number` 0, "every WAL", and a WAL created just before the
//!   base may have stayed empty. The sequence checks alone prove that nothing is missing.)
//!
//! [`Replayer`] then writes each admitted record (whole batches, decided by the plan's
//! [`CutoffFilter`]) into `<log_number>.log` with [`LogWriter`], byte-identical to RocksDB's
//! own writer, streaming: one record in memory at a time. Each WAL file is written under a
//! temporary name, synced, renamed and its directory synced.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;

use tidemark_manifest::chain::{RecordBreak, RecordChain};
use tidemark_manifest::model::{BaseFile, BaseSummary, SegmentEntry, time_from_micros};
use tidemark_manifest::plan::{CutoffFilter, RestorePlan, Target};
use tidemark_manifest::rocks::DbFile;
use tidemark_manifest::rocks::log::LogWriter;
use tidemark_manifest::segment::{Record, SegmentReader};
use tidemark_manifest::store::CACHED_WRITE;

use crate::progress::PhaseBar;
use crate::staging::sync_dir;
use crate::verify::wal::{WalCheck, WalCheckReport};
use crate::{Cancel, RestoreError};

/// The WAL chain a restore needs is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "no segment holds sequence {replay_from_seq}, the first record of WAL {min_log_number} \
         that base {base} needs; the repository is missing WAL data (run `tidemark-restore \
         verify` to see which objects)"
    )]
    NoStartSegment {
        base: String,
        replay_from_seq: u64,
        min_log_number: u64,
    },
    #[error(
        "segment {key} holds sequences {first_seq}..={last_seq} in WAL files {first_log}..={last_log}, \
         but base {base} needs its replay to start at sequence {replay_from_seq} in WAL \
         {min_log_number}"
    )]
    StartNotInSegment {
        base: String,
        key: String,
        first_seq: u64,
        last_seq: u64,
        first_log: u64,
        last_log: u64,
        replay_from_seq: u64,
        min_log_number: u64,
    },
    #[error(
        "the WAL chain has a hole: {before} ends at sequence {before_last}, the next segment \
         {after} starts at {after_first}"
    )]
    Hole {
        before: String,
        before_last: u64,
        after: String,
        after_first: u64,
    },
    #[error(
        "WAL log numbers go backwards: {key} starts in WAL {log} after WAL {prev_log} (in {prev_key})"
    )]
    LogBackwards {
        key: String,
        log: u64,
        prev_key: String,
        prev_log: u64,
    },
    #[error(
        "the archived WAL ends at sequence {last_seq} (in {key}), but the restore needs records \
         up to sequence {needed}"
    )]
    TooShort {
        key: String,
        last_seq: u64,
        needed: u64,
    },
    #[error(
        "{key}: the first record base {base} needs (sequence {replay_from_seq}, in WAL \
         {min_log_number} or later) is missing: the first record from WAL {min_log_number} on \
         is sequence {found_seq} in WAL {found_log}"
    )]
    MissingStart {
        base: String,
        key: String,
        min_log_number: u64,
        replay_from_seq: u64,
        found_seq: u64,
        found_log: u64,
    },
    /// The records break the record chain (FORMAT.md §6.2).
    #[error("{key}: {source}")]
    Records {
        key: String,
        #[source]
        source: RecordBreak,
    },
    #[error(
        "{key}: sequence {seq} is in WAL {log}, older than WAL {min_log_number} where base {base} \
         starts, although the base needs every record from sequence {replay_from_seq}"
    )]
    OldLogAfterStart {
        base: String,
        key: String,
        seq: u64,
        log: u64,
        min_log_number: u64,
        replay_from_seq: u64,
    },
    #[error(
        "WAL file {name} would reuse file number {number} of the base's file {base_file}; the \
         base and the WAL do not belong together"
    )]
    FileNumberCollision {
        name: String,
        number: u64,
        base_file: String,
    },
}

/// Checks the planned segments before anything is downloaded: they start with the segment
/// holding the base's first needed record, are contiguous, reach the cutoff's lower bound,
/// and their log numbers never decrease.
pub fn check_plan(plan: &RestorePlan) -> Result<(), ChainError> {
    let base = &plan.base;
    let needs_records = base.replay_from_seq <= plan.max_seq;
    let Some(first) = plan.segments.first() else {
        if needs_records {
            return Err(ChainError::NoStartSegment {
                base: base.id.clone(),
                replay_from_seq: base.replay_from_seq,
                min_log_number: base.min_log_number,
            });
        }
        return Ok(());
    };
    let holds_start = (first.first_seq..=first.last_seq).contains(&base.replay_from_seq)
        && first.last_log >= base.min_log_number;
    if !holds_start {
        return Err(ChainError::StartNotInSegment {
            base: base.id.clone(),
            key: first.key.clone(),
            first_seq: first.first_seq,
            last_seq: first.last_seq,
            first_log: first.first_log,
            last_log: first.last_log,
            replay_from_seq: base.replay_from_seq,
            min_log_number: base.min_log_number,
        });
    }
    for pair in plan.segments.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.last_seq.checked_add(1) != Some(b.first_seq) {
            return Err(ChainError::Hole {
                before: a.key.clone(),
                before_last: a.last_seq,
                after: b.key.clone(),
                after_first: b.first_seq,
            });
        }
        if b.first_log < a.last_log || b.last_log < b.first_log {
            return Err(ChainError::LogBackwards {
                key: b.key.clone(),
                log: b.first_log,
                prev_key: a.key.clone(),
                prev_log: a.last_log,
            });
        }
    }
    let last = plan.segments.last().expect("not empty");
    let needed = plan.min_seq.max(base.earliest_seq);
    if last.last_seq < needed {
        return Err(ChainError::TooShort {
            key: last.key.clone(),
            last_seq: last.last_seq,
            needed,
        });
    }
    Ok(())
}

/// Record-by-record chain check for one base (see the module documentation): where the
/// base's records start, then the record chain itself ([`RecordChain`]).
#[derive(Debug, Clone)]
pub struct BaseChain {
    base: String,
    min_log_number: u64,
    replay_from_seq: u64,
    /// Started at the base's first needed record.
    chain: Option<RecordChain>,
}

impl BaseChain {
    /// A check for replaying onto `base`.
    pub fn new(base: &BaseSummary) -> BaseChain {
        BaseChain {
            base: base.id.clone(),
            min_log_number: base.min_log_number,
            replay_from_seq: base.replay_from_seq,
            chain: None,
        }
    }

    /// Checks the next record of `key` in WAL order. `Ok(true)`: the record belongs to the
    /// base's WAL and is replayed (if the cutoff admits it); `Ok(false)`: it is older than
    /// the base's first WAL and skipped.
    pub fn check(&mut self, key: &str, r: &Record) -> Result<bool, ChainError> {
        if let Some(chain) = &mut self.chain {
            chain.push_record(r).map_err(|source| ChainError::Records {
                key: key.to_owned(),
                source,
            })?;
            return Ok(true);
        }
        if r.log_number < self.min_log_number {
            if r.next_seq() > self.replay_from_seq {
                return Err(ChainError::OldLogAfterStart {
                    base: self.base.clone(),
                    key: key.to_owned(),
                    seq: r.seq,
                    log: r.log_number,
                    min_log_number: self.min_log_number,
                    replay_from_seq: self.replay_from_seq,
                });
            }
            return Ok(false);
        }
        if r.seq != self.replay_from_seq {
            return Err(ChainError::MissingStart {
                base: self.base.clone(),
                key: key.to_owned(),
                min_log_number: self.min_log_number,
                replay_from_seq: self.replay_from_seq,
                found_seq: r.seq,
                found_log: r.log_number,
            });
        }
        let mut chain = RecordChain::new();
        chain
            .push_record(r)
            .expect("the first record starts a chain");
        self.chain = Some(chain);
        Ok(true)
    }

    /// The sequence number the next replayed record must have, once one was replayed.
    pub fn next_seq(&self) -> Option<u64> {
        self.chain.and_then(|c| c.next_seq())
    }
}

/// One re-created WAL file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalFileReport {
    pub name: String,
    pub log_number: u64,
    pub records: u64,
    pub bytes: u64,
    pub first_seq: u64,
    /// The last sequence number in the file (`first_seq - 1` if it holds only log data).
    pub last_seq: u64,
}

struct OpenWal {
    report: WalFileReport,
    tmp: PathBuf,
    path: PathBuf,
    writer: LogWriter<BufWriter<File>>,
}

/// Writes records into `<log_number>.log` files in a directory, one file at a time.
pub struct WalFiles {
    dir: PathBuf,
    /// File numbers the base's files use, by number: a WAL must not reuse one.
    base_numbers: BTreeMap<u64, String>,
    current: Option<OpenWal>,
    done: Vec<WalFileReport>,
    /// Reads each file back once it is closed (moves into the closer when it starts).
    check: Option<WalCheck>,
    /// Syncs, renames and checks the closed files.
    closer: Option<Closer>,
}

impl std::fmt::Debug for WalFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalFiles")
            .field("dir", &self.dir)
            .field("current", &self.current.as_ref().map(|w| &w.report))
            .field("done", &self.done)
            .finish()
    }
}

impl WalFiles {
    /// WAL files in `dir`, next to the base files `base_files`.
    pub fn new(dir: &Path, base_files: &[BaseFile]) -> WalFiles {
        let base_numbers = base_files
            .iter()
            .filter_map(|f| {
                let n = match DbFile::parse(&f.name)? {
                    DbFile::Table(n)
                    | DbFile::Blob(n)
                    | DbFile::Manifest(n)
                    | DbFile::Options(n)
                    | DbFile::Wal(n) => n,
                    _ => return None,
                };
                Some((n, f.name.clone()))
            })
            .collect();
        WalFiles {
            dir: dir.to_path_buf(),
            base_numbers,
            current: None,
            done: Vec::new(),
            check: None,
            closer: None,
        }
    }

    /// Appends a record to the WAL file of its log number, closing the previous file when
    /// the log number changes.
    pub fn append(&mut self, r: &Record) -> Result<(), RestoreError> {
        if self
            .current
            .as_ref()
            .is_some_and(|w| w.report.log_number != r.log_number)
        {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.current = Some(self.open(r.log_number, r.seq)?);
        }
        let w = self.current.as_mut().expect("opened above");
        let end = w
            .writer
            .add_record(&r.batch)
            .map_err(|e| RestoreError::io("cannot write the WAL file", &w.tmp, e))?;
        w.report.records += 1;
        w.report.bytes = end;
        w.report.last_seq = r.next_seq().saturating_sub(1);
        Ok(())
    }

    fn open(&self, log_number: u64, first_seq: u64) -> Result<OpenWal, RestoreError> {
        let name = DbFile::Wal(log_number)
            .file_name()
            .expect("WAL files have a name");
        if let Some(base_file) = self.base_numbers.get(&log_number) {
            return Err(ChainError::FileNumberCollision {
                name,
                number: log_number,
                base_file: base_file.clone(),
            }
            .into());
        }
        if self.done.iter().any(|d| d.log_number == log_number) {
            return Err(RestoreError::Integrity(format!(
                "records of WAL {log_number} are not contiguous: the WAL returns after a later one"
            )));
        }
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tidemark-tmp"));
        if path.exists() {
            return Err(RestoreError::Integrity(format!(
                "{} already exists in the restored directory; refusing to overwrite it",
                path.display()
            )));
        }
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| RestoreError::io("cannot create the WAL file", &tmp, e))?;
        Ok(OpenWal {
            report: WalFileReport {
                name,
                log_number,
                records: 0,
                bytes: 0,
                first_seq,
                last_seq: first_seq.saturating_sub(1),
            },
            tmp,
            path,
            writer: LogWriter::new(BufWriter::with_capacity(CACHED_WRITE, file)),
        })
    }

    fn close_current(&mut self) -> Result<(), RestoreError> {
        let Some(w) = self.current.take() else {
            return Ok(());
        };
        let mut buffered = w.writer.into_inner();
        buffered
            .flush()
            .map_err(|e| RestoreError::io("cannot write the WAL file", &w.tmp, e))?;
        let file = buffered
            .into_inner()
            .map_err(|e| RestoreError::io("cannot write the WAL file", &w.tmp, e.into_error()))?;
        if self.closer.is_none() {
            self.closer = Some(Closer::spawn(self.dir.clone(), self.check.take())?);
        }
        let closer = self.closer.as_mut().expect("started above");
        closer.submit(Closed {
            file,
            tmp: w.tmp,
            path: w.path,
            log_number: w.report.log_number,
        })?;
        tracing::debug!(
            file = %w.report.name,
            records = w.report.records,
            bytes = w.report.bytes,
            "wrote WAL file"
        );
        self.done.push(w.report);
        Ok(())
    }

    /// Closes the last file and returns every file written, in order, with the check that
    /// read them back, if any.
    pub fn finish(mut self) -> Result<(Vec<WalFileReport>, Option<WalCheck>), RestoreError> {
        self.close_current()?;
        let check = match self.closer.take() {
            Some(closer) => closer.finish()?,
            None => self.check.take(),
        };
        Ok((std::mem::take(&mut self.done), check))
    }
}

/// A WAL file written and flushed, to be synced and renamed into place.
struct Closed {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    log_number: u64,
}

/// Syncs each closed WAL file, renames it into place, syncs the directory and, with a
/// [`WalCheck`], reads it back: on a thread of its own, in the order the files were closed,
/// while the replay writes the next one.
struct Closer {
    files: Option<std::sync::mpsc::Sender<Closed>>,
    worker: Option<std::thread::JoinHandle<Result<Option<WalCheck>, RestoreError>>>,
}

impl Closer {
    fn spawn(dir: PathBuf, mut check: Option<WalCheck>) -> Result<Closer, RestoreError> {
        let (files, queue) = std::sync::mpsc::channel::<Closed>();
        let place = dir.clone();
        let worker = std::thread::Builder::new()
            .name("wal-closer".to_owned())
            .spawn(move || {
                // Ends at the first failure: the replay's next `submit` then sees it.
                for closed in queue {
                    close_wal_file(&dir, &closed)?;
                    if let Some(check) = &mut check {
                        check.check_file(&closed.path, closed.log_number)?;
                    }
                }
                Ok(check)
            })
            .map_err(|e| {
                RestoreError::io("cannot start the thread closing WAL files in", place, e)
            })?;
        Ok(Closer {
            files: Some(files),
            worker: Some(worker),
        })
    }

    /// Queues a closed file. Fails with the closer's error once a file failed.
    fn submit(&mut self, closed: Closed) -> Result<(), RestoreError> {
        let queued = match &self.files {
            Some(files) => files.send(closed).is_ok(),
            None => false,
        };
        if queued {
            return Ok(());
        }
        // Only a failure ends the worker before `finish`.
        self.join()?;
        Err(RestoreError::Integrity(
            "the WAL files' closer ended before every file was closed".to_owned(),
        ))
    }

    /// Waits until every queued file is in place (and read back).
    fn finish(mut self) -> Result<Option<WalCheck>, RestoreError> {
        self.join()
    }

    fn join(&mut self) -> Result<Option<WalCheck>, RestoreError> {
        self.files = None;
        match self.worker.take() {
            Some(worker) => worker.join().unwrap_or_else(|_| {
                Err(RestoreError::Integrity(
                    "the WAL files' closer panicked".to_owned(),
                ))
            }),
            None => Ok(None),
        }
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        // Never leave the thread writing into a directory that is about to be removed.
        let _ = self.join();
    }
}

fn close_wal_file(dir: &Path, c: &Closed) -> Result<(), RestoreError> {
    c.file
        .sync_all()
        .map_err(|e| RestoreError::io("cannot sync the WAL file", &c.tmp, e))?;
    fs::rename(&c.tmp, &c.path)
        .map_err(|e| RestoreError::io("cannot rename the WAL file", &c.path, e))?;
    sync_dir(dir)
}

/// Moves the WAL files `files`, written in `from`, into the database directory `to`, never
/// over an existing file, and syncs both directories.
pub fn place_wal_files(
    from: &Path,
    to: &Path,
    files: &[WalFileReport],
) -> Result<(), RestoreError> {
    for f in files {
        let dest = to.join(&f.name);
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(RestoreError::Integrity(format!(
                "{} already exists in the restored directory; refusing to overwrite it",
                dest.display()
            )));
        }
        fs::rename(from.join(&f.name), &dest)
            .map_err(|e| RestoreError::io("cannot move the WAL file", &dest, e))?;
    }
    sync_dir(to)?;
    sync_dir(from)
}

/// A record as reported: where the restore ended, or what it stopped before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordPoint {
    pub seq: u64,
    pub count: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub log_number: u64,
}

impl RecordPoint {
    fn of(r: &Record) -> RecordPoint {
        RecordPoint {
            seq: r.seq,
            count: r.count,
            time: time_from_micros(r.time_us),
            log_number: r.log_number,
        }
    }

    /// The last sequence number of the batch.
    pub fn last_seq(&self) -> u64 {
        self.seq
            .saturating_add(u64::from(self.count))
            .saturating_sub(1)
    }
}

/// A `--seq` target inside a batch, rounded down to the batch before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundedDown {
    pub requested: u64,
    pub batch_first_seq: u64,
    pub batch_last_seq: u64,
    pub restored_to: u64,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayOutcome {
    /// The achieved cutoff: the restored database's last sequence number.
    pub cutoff_seq: u64,
    /// The last record replayed, if any.
    pub last_record: Option<RecordPoint>,
    /// The first record left out (the one past the cutoff), if the replay saw one.
    pub first_refused: Option<RecordPoint>,
    /// Set when a `--seq` target fell inside a batch.
    pub rounded_down: Option<RoundedDown>,
    pub records_replayed: u64,
    /// Records of older WAL files in the first segment, which the base does not need.
    pub records_skipped: u64,
    pub segments_read: usize,
    pub wal_files: Vec<WalFileReport>,
    /// What reading the WAL files back found, when they were read back.
    pub wal_check: Option<WalCheckReport>,
}

/// Replays verified segment files, in order, into WAL files.
#[derive(Debug)]
pub struct Replayer {
    plan_target: Target,
    base: BaseSummary,
    max_seq: u64,
    min_seq: u64,
    chain: BaseChain,
    filter: CutoffFilter,
    wal: WalFiles,
    last_record: Option<RecordPoint>,
    first_refused: Option<RecordPoint>,
    records_replayed: u64,
    records_skipped: u64,
    segments_read: usize,
    last_key: Option<String>,
    /// The sequence number after the last admitted record.
    next_after_admitted: Option<u64>,
    /// No later record can be admitted.
    done: bool,
}

impl Replayer {
    /// A replay of `plan` into `dir`, which holds (or will hold) `base_files`.
    pub fn new(plan: &RestorePlan, dir: &Path, base_files: &[BaseFile]) -> Replayer {
        Replayer {
            plan_target: plan.target,
            base: plan.base.clone(),
            max_seq: plan.max_seq,
            min_seq: plan.min_seq,
            chain: BaseChain::new(&plan.base),
            filter: plan.filter(),
            wal: WalFiles::new(dir, base_files),
            last_record: None,
            first_refused: None,
            records_replayed: 0,
            records_skipped: 0,
            segments_read: 0,
            last_key: None,
            next_after_admitted: None,
            done: false,
        }
    }

    /// Reads each WAL file back with `check` once it is written (see [`WalCheck`]), on the
    /// thread that closes the files while the next one is written.
    pub fn with_check(mut self, check: WalCheck) -> Replayer {
        self.wal.check = Some(check);
        self
    }

    /// True once the cutoff is reached: no later segment is needed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Replays one downloaded segment file (checked against its sha256 or decoded whole
    /// already, [`tidemark_manifest::repo::Repository::fetch_segment_for_replay`]); every
    /// frame is checked again as it is read, and the trailer when the replay reads to the
    /// end; a failure fails the restore before anything leaves the staging directory.
    /// Returns `false` once the cutoff is reached and no later segment is needed.
    pub fn replay_segment(
        &mut self,
        entry: &SegmentEntry,
        path: &Path,
        cancel: &Cancel,
        bar: &PhaseBar,
    ) -> Result<bool, RestoreError> {
        if self.done {
            return Ok(false);
        }
        cancel.check()?;
        let key = entry.key.as_str();
        let file =
            File::open(path).map_err(|e| RestoreError::io("cannot open the segment", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| RestoreError::io("cannot read the segment", path, e))?
            .len();
        let mut reader =
            SegmentReader::new(key, BufReader::with_capacity(1 << 20, file), Some(len))?;
        self.segments_read += 1;
        self.last_key = Some(key.to_owned());
        let mut since_check = 0u32;
        while let Some(r) = reader.next_record()? {
            since_check += 1;
            if since_check == 1024 {
                cancel.check()?;
                since_check = 0;
            }
            if !self.chain.check(key, &r)? {
                self.records_skipped += 1;
                continue;
            }
            if !self.filter.admit(&r) {
                self.first_refused = Some(RecordPoint::of(&r));
                self.done = true;
                break;
            }
            self.wal.append(&r)?;
            self.records_replayed += 1;
            self.next_after_admitted = Some(r.next_seq());
            self.last_record = Some(RecordPoint::of(&r));
            bar.inc(1);
            if r.next_seq() > self.max_seq {
                // The next record would end past the cutoff's upper bound.
                self.done = true;
                break;
            }
        }
        Ok(!self.done)
    }

    /// Closes the WAL files and checks where the replay ended.
    pub fn finish(self) -> Result<ReplayOutcome, RestoreError> {
        let base = &self.base;
        // With nothing replayed, the database ends where the base's WAL starts.
        let cutoff_seq = self
            .next_after_admitted
            .unwrap_or(base.replay_from_seq)
            .saturating_sub(1);
        let key = self
            .last_key
            .clone()
            .unwrap_or_else(|| "(no segment)".to_owned());
        if cutoff_seq < base.earliest_seq {
            if self.first_refused.is_none() {
                return Err(ChainError::TooShort {
                    key,
                    last_seq: cutoff_seq,
                    needed: base.earliest_seq,
                }
                .into());
            }
            return Err(RestoreError::NotRestorable(format!(
                "{} ends at sequence {cutoff_seq}, before base {}'s own point (sequence {}, {}), \
                 and no older base covers it",
                self.plan_target,
                base.id,
                base.earliest_seq,
                tidemark_manifest::plan::fmt_time(base.earliest_time)
            )));
        }
        let mut rounded_down = None;
        match self.plan_target {
            Target::Latest => {
                if cutoff_seq != self.max_seq {
                    return Err(ChainError::TooShort {
                        key,
                        last_seq: cutoff_seq,
                        needed: self.max_seq,
                    }
                    .into());
                }
            }
            Target::Seq(n) => {
                if cutoff_seq < n {
                    match self.first_refused {
                        Some(r) if r.seq <= n && n <= r.last_seq() => {
                            rounded_down = Some(RoundedDown {
                                requested: n,
                                batch_first_seq: r.seq,
                                batch_last_seq: r.last_seq(),
                                restored_to: cutoff_seq,
                            });
                        }
                        _ => {
                            return Err(ChainError::TooShort {
                                key,
                                last_seq: cutoff_seq,
                                needed: n,
                            }
                            .into());
                        }
                    }
                }
            }
            Target::Time(_) => {
                if self.first_refused.is_none() && cutoff_seq < self.min_seq {
                    return Err(ChainError::TooShort {
                        key,
                        last_seq: cutoff_seq,
                        needed: self.min_seq,
                    }
                    .into());
                }
            }
        }
        let (wal_files, check) = self.wal.finish()?;
        let wal_check = check.map(|c| c.finish(cutoff_seq)).transpose()?;
        Ok(ReplayOutcome {
            cutoff_seq,
            last_record: self.last_record,
            first_refused: self.first_refused,
            rounded_down,
            records_replayed: self.records_replayed,
            records_skipped: self.records_skipped,
            segments_read: self.segments_read,
            wal_files,
            wal_check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::chain::SeqBreak;
    use tidemark_manifest::model::Compression;
    use tidemark_manifest::plan::History;
    use tidemark_manifest::rocks::log::LogReader;
    use tidemark_manifest::segment::{RecordTime, SegmentBuilder};
    use tidemark_manifest::testing::{self, T0_US as T0};

    /// A WriteBatch of `count` puts in the default column family.
    fn batch(seq: u64, count: u32) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        for i in 0..count {
            b.extend_from_slice(&[0x01, 2, b'k', b'0' + (i % 10) as u8, 1, b'v']);
        }
        b
    }

    fn rec(seq: u64, count: u32, log: u64, sec: i64) -> Record {
        Record {
            seq,
            count,
            time_us: T0 + sec * 1_000_000,
            time_source: RecordTime::Observed,
            log_number: log,
            log_offset: seq * 100 + u64::from(count),
            batch: batch(seq, count),
        }
    }

    /// Writes a segment of `records` into `dir` and returns its index entry and path.
    fn segment(dir: &Path, records: &[Record]) -> (SegmentEntry, PathBuf) {
        let mut b = SegmentBuilder::new(Compression::Zstd, 1).unwrap();
        for r in records {
            b.push(r).unwrap();
        }
        let seg = b.finish().unwrap();
        let entry = seg.entry();
        let path = dir.join(format!("{:016x}.seg", entry.first_seq));
        fs::write(&path, &seg.bytes).unwrap();
        (entry, path)
    }

    fn base(min_log: u64, replay_from: u64, earliest: u64) -> BaseSummary {
        BaseSummary {
            min_log_number: min_log,
            earliest_time: time_from_micros(T0 + 2_000_000),
            column_families: testing::default_cf(),
            ..testing::base("b1", replay_from, earliest, time_from_micros(T0))
        }
    }

    /// Records 1..: log 4 holds seqs 1..=6 (batches 1,3 + 3), log 7 holds 7..=15.
    fn records() -> Vec<Record> {
        vec![
            rec(1, 2, 4, 0),
            rec(3, 4, 4, 1),
            rec(7, 3, 7, 2),
            rec(10, 0, 7, 2),
            rec(10, 2, 7, 3),
            rec(12, 4, 7, 4),
        ]
    }

    struct Fixture {
        dir: tempfile::TempDir,
        entries: Vec<(SegmentEntry, PathBuf)>,
        history: History,
    }

    fn fixture(base: BaseSummary) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let r = records();
        let entries = vec![segment(dir.path(), &r[..3]), segment(dir.path(), &r[3..])];
        let history = History {
            bases: vec![base],
            segments: entries.iter().map(|(e, _)| e.clone()).collect(),
            gaps: vec![],
        };
        Fixture {
            dir,
            entries,
            history,
        }
    }

    fn replay(f: &Fixture, target: Target) -> Result<(ReplayOutcome, PathBuf), RestoreError> {
        let plan = f.history.plan(target)?;
        check_plan(&plan)?;
        let out = f.dir.path().join(format!("out-{}", rand::random::<u32>()));
        fs::create_dir(&out).unwrap();
        let mut r = Replayer::new(&plan, &out, &[]);
        for s in &plan.segments {
            let (_, path) = f.entries.iter().find(|(e, _)| e.key == s.key).unwrap();
            if !r.replay_segment(s, path, &Cancel::new(), &PhaseBar::hidden())? {
                break;
            }
        }
        Ok((r.finish()?, out))
    }

    fn wal_seqs(path: &Path) -> Vec<u64> {
        let mut reader = LogReader::open(path).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = reader.next_record().unwrap() {
            out.push(u64::from_le_bytes(rec.bytes[..8].try_into().unwrap()));
        }
        out
    }

    #[test]
    fn a_segment_damaged_after_its_download_fails_the_replay_naming_it() {
        // The download for a replay checks only the object's sha256: the replay's reader
        // must catch a frame that is damaged anyway (a body the archiver damaged before it
        // hashed the object).
        let f = fixture(base(4, 1, 1));
        let (entry, path) = &f.entries[1];
        let mut bytes = fs::read(path).unwrap();
        let i = tidemark_manifest::segment::HEADER_LEN + 8;
        bytes[i] ^= 0x40;
        fs::write(path, &bytes).unwrap();
        let e = replay(&f, Target::Latest).unwrap_err();
        assert!(e.to_string().contains(&entry.key), "{e}");
    }

    #[test]
    fn a_wal_file_that_fails_its_read_back_fails_the_replay() {
        let f = fixture(base(4, 1, 1));
        let plan = f.history.plan(Target::Latest).unwrap();
        let out = f.dir.path().join("checked");
        fs::create_dir(&out).unwrap();
        // The check expects the chain to start at sequence 3; the replay writes from 1.
        let check = WalCheck::new(&base(4, 3, 3), Cancel::new());
        let mut r = Replayer::new(&plan, &out, &[]).with_check(check);
        for (entry, path) in &f.entries {
            if !r
                .replay_segment(entry, path, &Cancel::new(), &PhaseBar::hidden())
                .unwrap()
            {
                break;
            }
        }
        let e = r.finish().unwrap_err();
        assert!(matches!(e, RestoreError::Verification(_)), "{e}");
        assert!(e.to_string().contains("000004.log"), "{e}");

        // The same replay with the right check passes and reports both files.
        let out = f.dir.path().join("checked-ok");
        fs::create_dir(&out).unwrap();
        let check = WalCheck::new(&base(4, 1, 1), Cancel::new());
        let mut r = Replayer::new(&plan, &out, &[]).with_check(check);
        for (entry, path) in &f.entries {
            r.replay_segment(entry, path, &Cancel::new(), &PhaseBar::hidden())
                .unwrap();
        }
        let o = r.finish().unwrap();
        assert_eq!(o.wal_check.unwrap().files, 2);
    }

    #[test]
    fn replays_whole_batches_into_wal_files_by_log_number() {
        // The base needs WAL 7 onwards: log 4's records are skipped.
        let f = fixture(base(7, 7, 9));
        let (o, out) = replay(&f, Target::Latest).unwrap();
        assert_eq!(o.cutoff_seq, 15);
        assert_eq!(o.records_skipped, 2);
        assert_eq!(o.records_replayed, 4);
        assert_eq!(o.wal_files.len(), 1);
        assert_eq!(o.wal_files[0].name, "000007.log");
        assert_eq!(wal_seqs(&out.join("000007.log")), vec![7, 10, 10, 12]);
        let names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["000007.log"], "no temporary files remain");

        // A sequence inside a batch rounds down to the batch before it, and says so.
        let (o, out) = replay(&f, Target::Seq(13)).unwrap();
        assert_eq!(o.cutoff_seq, 11);
        assert_eq!(
            o.rounded_down,
            Some(RoundedDown {
                requested: 13,
                batch_first_seq: 12,
                batch_last_seq: 15,
                restored_to: 11
            })
        );
        assert_eq!(wal_seqs(&out.join("000007.log")), vec![7, 10, 10]);

        // A batch boundary is exact.
        let (o, _) = replay(&f, Target::Seq(9)).unwrap();
        assert_eq!((o.cutoff_seq, o.rounded_down), (9, None));
    }

    #[test]
    fn a_base_from_the_first_log_writes_every_log() {
        let f = fixture(base(4, 1, 2));
        let (o, out) = replay(&f, Target::Latest).unwrap();
        let names: Vec<&str> = o.wal_files.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["000004.log", "000007.log"]);
        assert_eq!(wal_seqs(&out.join("000004.log")), vec![1, 3]);
        assert_eq!(o.wal_files[0].last_seq, 6);
        // Time target: records at or before second 3.
        let t = time_from_micros(T0 + 3_000_000);
        let (o, _) = replay(&f, Target::Time(t)).unwrap();
        assert_eq!(o.cutoff_seq, 11);
        assert_eq!(o.first_refused.map(|r| r.seq), Some(12));
        assert_eq!(o.last_record.map(|r| r.time), Some(t));
    }

    #[test]
    fn a_base_whose_wal_is_empty_needs_no_record() {
        // replay_from_seq = earliest + 1: everything up to 9 is in the base's SST files.
        let f = fixture(base(7, 10, 9));
        let plan = f.history.plan(Target::Seq(9)).unwrap();
        assert!(plan.segments.is_empty());
        check_plan(&plan).unwrap();
        let out = f.dir.path().join("empty");
        fs::create_dir(&out).unwrap();
        let o = Replayer::new(&plan, &out, &[]).finish().unwrap();
        assert_eq!(o.cutoff_seq, 9);
        assert!(o.wal_files.is_empty());
    }

    #[test]
    fn the_first_needed_record_must_be_there() {
        // The base claims its WAL starts at sequence 8: WAL 7 starts at 7.
        let f = fixture(base(7, 8, 9));
        let e = replay(&f, Target::Latest).unwrap_err();
        assert!(
            matches!(&e, RestoreError::Chain(c) if matches!(**c, ChainError::MissingStart { .. })),
            "{e}"
        );
        assert!(
            e.to_string().contains("sequence 8, in WAL 7 or later"),
            "{e}"
        );
        assert!(e.to_string().contains("0000000000000001.seg"), "{e}");
        // The base claims its WAL 4 starts at 3: WAL 4 holds sequence 1 before it.
        let f = fixture(base(4, 3, 9));
        let e = replay(&f, Target::Latest).unwrap_err();
        assert!(e.to_string().contains("is sequence 1 in WAL 4"), "{e}");
        // A record of an older WAL that reaches past the start.
        let f = fixture(base(7, 5, 9));
        let e = replay(&f, Target::Latest).unwrap_err();
        assert!(
            matches!(&e, RestoreError::Chain(c) if matches!(**c, ChainError::OldLogAfterStart { .. })),
            "{e}"
        );
    }

    #[test]
    fn the_first_needed_record_may_be_in_a_later_wal() {
        // A database that never flushed: min_log_number 0 means every WAL.
        let f = fixture(base(0, 1, 2));
        let (o, _) = replay(&f, Target::Latest).unwrap();
        assert_eq!((o.cutoff_seq, o.records_skipped), (15, 0));
        // WAL 5 stayed empty: log 4 ends at 6, log 7 starts at 7.
        for earliest in [6, 8] {
            let f = fixture(base(5, 7, earliest));
            let (o, _) = replay(&f, Target::Latest).unwrap();
            assert_eq!((o.cutoff_seq, o.records_skipped), (15, 2));
        }
    }

    #[test]
    fn plan_holes_and_backward_logs_are_found_before_downloading() {
        let f = fixture(base(7, 7, 9));
        let mut plan = f.history.plan(Target::Latest).unwrap();
        let good = plan.clone();
        plan.segments[1].first_seq += 1;
        let e = check_plan(&plan).unwrap_err();
        assert!(matches!(e, ChainError::Hole { .. }), "{e}");
        let mut plan = good.clone();
        plan.segments[1].first_log = 3;
        assert!(matches!(
            check_plan(&plan).unwrap_err(),
            ChainError::LogBackwards { .. }
        ));
        let mut plan = good.clone();
        plan.segments.remove(1);
        assert!(matches!(
            check_plan(&plan).unwrap_err(),
            ChainError::TooShort { .. }
        ));
        let mut plan = good;
        plan.segments.clear();
        assert!(matches!(
            check_plan(&plan).unwrap_err(),
            ChainError::NoStartSegment { .. }
        ));
    }

    #[test]
    fn a_plan_at_the_top_of_the_sequence_range_is_a_hole_not_an_overflow() {
        let f = fixture(base(7, 7, 9));
        let mut plan = f.history.plan(Target::Latest).unwrap();
        plan.segments[0].last_seq = u64::MAX;
        let e = check_plan(&plan).unwrap_err();
        assert!(matches!(e, ChainError::Hole { .. }), "{e}");
        let top = RecordPoint::of(&Record {
            seq: u64::MAX,
            count: 3,
            ..rec(1, 1, 1, 0)
        });
        assert_eq!(top.last_seq(), u64::MAX - 1);
    }

    #[test]
    fn record_chain_finds_holes_and_backward_logs() {
        let b = base(4, 1, 2);
        let mut c = BaseChain::new(&b);
        assert!(c.check("k", &rec(1, 2, 4, 0)).unwrap());
        assert_eq!(c.next_seq(), Some(3));
        let e = c.check("k", &rec(4, 1, 4, 0)).unwrap_err();
        assert_eq!(
            e,
            ChainError::Records {
                key: "k".into(),
                source: RecordBreak::Seq(SeqBreak::Gap {
                    expected: 3,
                    found: 4
                })
            }
        );
        assert!(e.to_string().starts_with("k: a record is missing"), "{e}");
        let mut c = BaseChain::new(&b);
        let e = c.check("k", &rec(2, 1, 4, 0)).unwrap_err();
        assert!(
            matches!(e, ChainError::MissingStart { found_seq: 2, .. }),
            "{e}"
        );
        let mut c = BaseChain::new(&base(5, 1, 2));
        assert!(c.check("k", &rec(1, 2, 5, 0)).unwrap());
        let e = c.check("k", &rec(3, 1, 4, 0)).unwrap_err();
        assert!(
            matches!(
                e,
                ChainError::Records {
                    source: RecordBreak::LogBackwards { .. },
                    ..
                }
            ),
            "{e}"
        );
        // A record applied twice is an overlap, not replayed.
        let mut c = BaseChain::new(&base(5, 1, 2));
        assert!(c.check("k", &rec(1, 2, 5, 0)).unwrap());
        let e = c.check("k", &rec(1, 2, 5, 0)).unwrap_err();
        assert!(
            matches!(
                e,
                ChainError::Records {
                    source: RecordBreak::Seq(SeqBreak::Overlap { .. }),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn wal_numbers_never_reuse_a_base_file_number() {
        let f = fixture(base(7, 7, 9));
        let plan = f.history.plan(Target::Latest).unwrap();
        let out = f.dir.path().join("collide");
        fs::create_dir(&out).unwrap();
        let files = vec![BaseFile {
            name: "000007.sst".into(),
            size: 1,
            sha256: "00".into(),
            key: "sst/00".into(),
        }];
        let mut r = Replayer::new(&plan, &out, &files);
        let (e0, p0) = &f.entries[0];
        let e = r
            .replay_segment(e0, p0, &Cancel::new(), &PhaseBar::hidden())
            .unwrap_err();
        assert!(e.to_string().contains("000007.sst"), "{e}");
    }

    #[test]
    fn wal_bytes_match_rocksdbs_log_format_record_for_record() {
        let f = fixture(base(4, 1, 2));
        let (_, out) = replay(&f, Target::Latest).unwrap();
        let mut reader = LogReader::open(out.join("000007.log")).unwrap();
        let mut expected = records().into_iter().filter(|r| r.log_number == 7);
        while let Some(got) = reader.next_record().unwrap() {
            assert_eq!(got.bytes, expected.next().unwrap().batch);
        }
        assert!(expected.next().is_none());
    }
}
