//! Base backups of a live RocksDB that another process owns (FORMAT.md §2, §4.2, §7).
//!
//! The archiver never opens the database: RocksDB checkpoints taken through a read-only or
//! secondary instance are not reliably consistent. Instead it makes a careful external copy
//! of the files the owner leaves on disk, in an order that makes the copy consistent:
//!
//! 1. note the smallest WAL (`*.log`) number in the WAL directory;
//! 2. hard-link every table (`*.sst`) and blob (`*.blob`) file into a fresh scratch
//!    directory (a hard link keeps a file that the owner deletes later);
//! 3. open the WAL files from that number on (WAL directory and its `archive/`), copy
//!    `CURRENT`, then the MANIFEST it names, note how far each WAL file reaches, then copy the
//!    newest `OPTIONS-*`;
//! 4. hard-link the table and blob files again, for those created meanwhile;
//! 5. read the copied MANIFEST: live column families, live files, log numbers. Every file it
//!    references was created before it was copied and is therefore in one of the two link
//!    passes, unless the owner deleted it in between: then the whole copy is retried.
//!
//! No WAL file is copied (a base holds none): the WAL is read only to learn two sequence
//! numbers. `earliest_seq`, the smallest cutoff the base restores to, is the last sequence
//! number in the WAL just after the MANIFEST was copied (no table file of that MANIFEST can
//! hold anything newer), or the MANIFEST's own last sequence if that is larger.
//! `replay_from_seq` is the sequence number of the first record of the WAL `min_log_number`,
//! the oldest WAL RocksDB's recovery of the copy would read.
//!
//! The referenced files are then uploaded: table and blob files content-addressed under
//! `sst/<sha256>`, `CURRENT`,
//! `MANIFEST-*` and `OPTIONS-*` under `bases/<id>/files/`, and `bases/<id>/base.json` last,
//! create-only. Adding the base to a manifest generation is the caller's job.
//!
//! A table or blob file is not uploaded again when a base of the current generation already
//! lists it ([`ReusableTables`]): such an object was checked when that base was taken, and no
//! sweep deletes it. Any other object under its key is never trusted, whatever its size (an
//! abandoned base's object, which a sweep may be deleting, or a damaged one): the file is
//! uploaded again over it (FORMAT.md §4.6).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use tidemark_manifest::checksum;
use tidemark_manifest::keys;
use tidemark_manifest::model::{
    self, BaseColumnFamily, BaseDescriptor, BaseFile, BaseSummary, ColumnFamily, FORMAT_VERSION,
    ObjectLock, SegmentEntry,
};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::rocks::DbFile;
use tidemark_manifest::rocks::log::{LogError, LogReader};
use tidemark_manifest::rocks::options_file::OptionsFile;
use tidemark_manifest::rocks::version_edit::{ManifestState, RocksManifestError};
use tidemark_manifest::rocks::write_batch::{BatchError, BatchHeader};
use tidemark_manifest::segment::SegmentReader;
use tidemark_manifest::store::StoreError;
use time::OffsetDateTime;
use tracing::Instrument;

/// What the WAL follower knows of the record holding a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// It read the record, at this time.
    At(OffsetDateTime),
    /// It has not read the record yet, and may still.
    NotYet,
    /// It will not read it: it read records after it, or read to the end of the WAL in a
    /// read that started after the instant given, without meeting it (the record is only
    /// in the table files, or in an older run's reading).
    Never,
}

/// Asks the WAL follower about the record holding a sequence number; the instant is when the
/// base's copy was made (the record was written before it).
pub type ObservedTimeFn = Arc<dyn Fn(u64, Instant) -> Observed + Send + Sync>;

/// How a base backup is taken.
#[derive(Clone)]
pub struct BaseOptions {
    /// Table and blob files hashed and uploaded at the same time.
    pub upload_concurrency: usize,
    /// Copies attempted before giving up when the database keeps deleting files the copy
    /// needs between its steps.
    pub max_attempts: u32,
    /// Pause before a new attempt.
    pub retry_delay: Duration,
    /// The time of the record at `earliest_seq`, as the WAL follower observed it. Asked once
    /// the files are uploaded, then (unless an archived segment holds the record) again
    /// while the follower catches up, for up to 10 s, until it answers or says it never
    /// will; when unset, or without an answer, the base's `earliest_time` is the time
    /// `base.json` is written (the record was written before that, so it is an upper bound
    /// of its commit time like any observed time).
    pub earliest_time: Option<ObservedTimeFn>,
    /// A pause between the steps of the copy that tolerate one (after noting the smallest
    /// WAL, after the first pass over the table files, after the MANIFEST copy and the second
    /// pass). Zero in normal operation; failure drills set it to widen the windows in which
    /// the database changes under the copy.
    pub step_pause: Duration,
    /// Table and blob files already in the repository that this base may list without
    /// uploading them. Empty by default: everything is uploaded.
    pub reusable: ReusableTables,
}

/// Table and blob files a base may reuse without uploading them again: those listed by the
/// bases of the current generation, by key and size (the key is the content's sha256).
#[derive(Debug, Clone, Default)]
pub struct ReusableTables {
    sizes: Arc<BTreeMap<String, u64>>,
}

impl ReusableTables {
    /// The table and blob files the bases of `generation` list (their descriptors are read
    /// and checked against the generation).
    pub async fn referenced_by(
        repo: &Repository,
        generation: &model::Generation,
    ) -> Result<ReusableTables, RepoError> {
        let n = generation.generation;
        let reads: Vec<_> = generation
            .bases
            .iter()
            .cloned()
            .map(|b| {
                let repo = repo.clone();
                async move { repo.read_base(n, &b).await }
            })
            .collect();
        let descriptors: Vec<BaseDescriptor> =
            stream::iter(reads).buffered(8).try_collect().await?;
        Ok(ReusableTables::from_descriptors(&descriptors))
    }

    /// The table and blob files `descriptors` list.
    pub fn from_descriptors<'a>(
        descriptors: impl IntoIterator<Item = &'a BaseDescriptor>,
    ) -> ReusableTables {
        let sizes = descriptors
            .into_iter()
            .flat_map(|d| &d.files)
            .filter(|f| f.key == keys::sst_key(&f.sha256))
            .map(|f| (f.key.clone(), f.size))
            .collect();
        ReusableTables {
            sizes: Arc::new(sizes),
        }
    }

    /// True when the object `key` of `size` bytes is listed.
    fn reuses(&self, key: &str, size: u64) -> bool {
        self.sizes.get(key) == Some(&size)
    }

    /// How many objects are listed.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// True when nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }
}

impl Default for BaseOptions {
    fn default() -> Self {
        BaseOptions {
            upload_concurrency: 4,
            max_attempts: 5,
            retry_delay: Duration::from_millis(200),
            earliest_time: None,
            step_pause: Duration::ZERO,
            reusable: ReusableTables::default(),
        }
    }
}

impl fmt::Debug for BaseOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaseOptions")
            .field("upload_concurrency", &self.upload_concurrency)
            .field("max_attempts", &self.max_attempts)
            .field("retry_delay", &self.retry_delay)
            .field(
                "earliest_time",
                &self
                    .earliest_time
                    .as_ref()
                    .map(|_| "<observed-time lookup>"),
            )
            .field("step_pause", &self.step_pause)
            .field("reusable", &self.reusable.len())
            .finish()
    }
}

/// What a base backup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseStats {
    /// Files in the base (`CURRENT`, `MANIFEST-*`, `OPTIONS-*`, table and blob files).
    pub files: usize,
    /// Table and blob files in the base.
    pub table_files: usize,
    /// Table and blob files uploaded.
    pub tables_uploaded: usize,
    /// Table and blob files the repository already held (not uploaded again).
    pub tables_deduplicated: usize,
    /// Sum of the sizes of all files in the base.
    pub bytes_total: u64,
    /// Bytes uploaded (all files except the deduplicated ones; `base.json` not counted).
    pub bytes_uploaded: u64,
    /// Bytes of the table and blob files that were not uploaded because the repository
    /// already held them.
    pub bytes_deduplicated: u64,
    /// Copies made (1 unless the database deleted a needed file during a copy).
    pub attempts: u32,
    /// The table files were copied, not hard-linked (the scratch directory is not on the
    /// database's file system, or hard links are not permitted there).
    pub copied_instead_of_linked: bool,
    /// Time spent copying and reading the database's files.
    pub copy_duration: Duration,
    /// Time from start to the descriptor being written.
    pub duration: Duration,
}

/// A base backup that was written to the repository.
#[derive(Debug, Clone)]
pub struct BaseResult {
    /// What a manifest generation lists for the base.
    pub summary: BaseSummary,
    /// The descriptor written to `bases/<id>/base.json`.
    pub descriptor: BaseDescriptor,
    pub stats: BaseStats,
}

/// Errors taking a base backup.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not a RocksDB database directory: {detail}; pass the directory the database \
         was opened with",
        db_dir.display()
    )]
    NotADatabase { db_dir: PathBuf, detail: String },
    #[error(
        "there is no WAL file (*.log) in {}; pass the database's WAL directory (RocksDB's \
         wal_dir option, by default the database directory itself)",
        wal_dir.display()
    )]
    NoWal { wal_dir: PathBuf },
    #[error(
        "the database has no IDENTITY file in {} and its MANIFEST records no database id, so \
         the base cannot be tied to the database; open the database once with \
         write_identity_file or write_dbid_to_manifest enabled",
        db_dir.display()
    )]
    NoIdentity { db_dir: PathBuf },
    #[error(
        "base backups cannot go to {location}: its repository belongs to database {found}, \
         this is database {expected}; archive each database to its own repository"
    )]
    WrongDatabase {
        location: String,
        expected: String,
        found: String,
    },
    #[error("cannot read the copied MANIFEST: {0}")]
    Manifest(#[from] RocksManifestError),
    #[error("cannot read the WAL: {0}")]
    Wal(#[from] LogError),
    #[error("{}: the WAL record at offset {offset} is not a WriteBatch: {source}", path.display())]
    Batch {
        path: PathBuf,
        offset: u64,
        #[source]
        source: BatchError,
    },
    #[error(
        "WAL {log_number:06}.log, the oldest WAL the base needs (its column families' \
         unflushed data starts there), is in neither {} nor {}: it was deleted before the \
         backup could read it; keep rotated WAL files longer (RocksDB options WAL_ttl_seconds \
         or WAL_size_limit_MB) so that the archiver can read them",
        wal_dir.display(),
        wal_dir.join("archive").display()
    )]
    WalDeleted {
        log_number: u64,
        wal_dir: PathBuf,
        /// Deleted while the copy was being made (another copy may find a newer MANIFEST
        /// that no longer needs it), rather than before it began.
        during_copy: bool,
    },
    #[error(
        "the MANIFEST references {name}, which the copy does not hold: the database deleted \
         it before it could be linked, or it lives outside the database directory (db_paths \
         and cf_paths are not supported)"
    )]
    MissingFile { name: String },
    #[error(
        "{name} in the copy is {found} bytes, the MANIFEST records {expected} bytes; the \
         file changed while it was copied"
    )]
    SizeMismatch {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("CURRENT in {} changed under the copy {tries} times in a row", db_dir.display())]
    CurrentMoving { db_dir: PathBuf, tries: u32 },
    #[error(
        "the database kept changing under the copy: {attempts} attempts failed, the last \
         one because {last}; retry later, or reduce the compaction churn during backups"
    )]
    Unstable { attempts: u32, last: Box<BaseError> },
    #[error(
        "inconsistent WAL: the first record the base needs has sequence {replay_from_seq}, \
         after the base's earliest restorable sequence {earliest_seq} + 1"
    )]
    Inconsistent {
        replay_from_seq: u64,
        earliest_seq: u64,
    },
    #[error(
        "base id {id} already exists in {location}; two base backups were started in the \
         same second with the same random suffix; take the backup again"
    )]
    IdTaken { id: String, location: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a base backup task failed: {0}")]
    Task(String),
}

impl BaseError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> BaseError {
        BaseError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether another copy may succeed (the database deleted or replaced a file the copy
    /// needed between two of its steps).
    fn is_race(&self) -> bool {
        matches!(
            self,
            BaseError::MissingFile { .. }
                | BaseError::SizeMismatch { .. }
                | BaseError::CurrentMoving { .. }
                | BaseError::WalDeleted {
                    during_copy: true,
                    ..
                }
        )
    }
}

/// Takes a base backup of the database in `db_dir` (WAL files in `wal_dir`, which is
/// `db_dir` unless the database sets `wal_dir`) into `repo`, using a fresh directory under
/// `scratch_dir` for the copy. `scratch_dir` should be on the database's file system so that
/// table files can be hard-linked; elsewhere they are copied, which is slower and needs the
/// space. The scratch directory is removed afterwards, also on failure.
///
/// Returns the summary to add to the next manifest generation, which the caller writes.
pub async fn take_base_backup(
    db_dir: &Path,
    wal_dir: &Path,
    scratch_dir: &Path,
    repo: &Repository,
    opts: &BaseOptions,
) -> Result<BaseResult, BaseError> {
    let started = Instant::now();
    let created_at = micros_precision(OffsetDateTime::now_utc());
    let id = keys::new_base_id(created_at);
    let span = tracing::info_span!("base_backup", base = %id, db = %db_dir.display());
    take(
        db_dir,
        wal_dir,
        scratch_dir,
        repo,
        opts,
        id,
        created_at,
        started,
    )
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn take(
    db_dir: &Path,
    wal_dir: &Path,
    scratch_dir: &Path,
    repo: &Repository,
    opts: &BaseOptions,
    id: String,
    created_at: OffsetDateTime,
    started: Instant,
) -> Result<BaseResult, BaseError> {
    tracing::info!(scratch = %scratch_dir.display(), "base backup started");

    let config = repo.require_config().await?;

    let scratch = {
        let scratch_dir = scratch_dir.to_path_buf();
        let id = id.clone();
        blocking(move || Scratch::create(&scratch_dir, &id)).await?
    };
    let result = run(
        db_dir,
        wal_dir,
        &scratch,
        repo,
        opts,
        &config.database_identity,
        &id,
        created_at,
        started,
    )
    .await;
    let path = scratch.path.clone();
    match tokio::task::spawn_blocking(move || scratch.remove()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            scratch = %path.display(),
            error = %e,
            "cannot remove the base backup's scratch directory; delete it by hand"
        ),
        Err(e) => tracing::warn!(scratch = %path.display(), error = %e, "scratch cleanup failed"),
    }
    match &result {
        Ok(r) => tracing::info!(
            earliest_seq = r.summary.earliest_seq,
            replay_from_seq = r.summary.replay_from_seq,
            min_log_number = r.summary.min_log_number,
            files = r.stats.files,
            bytes_total = r.stats.bytes_total,
            bytes_uploaded = r.stats.bytes_uploaded,
            bytes_deduplicated = r.stats.bytes_deduplicated,
            attempts = r.stats.attempts,
            duration_ms = r.stats.duration.as_millis() as u64,
            "base backup written"
        ),
        Err(e) => tracing::error!(error = %e, "base backup failed"),
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    db_dir: &Path,
    wal_dir: &Path,
    scratch: &Scratch,
    repo: &Repository,
    opts: &BaseOptions,
    repo_identity: &str,
    id: &str,
    created_at: OffsetDateTime,
    started: Instant,
) -> Result<BaseResult, BaseError> {
    let copy = {
        let db_dir = db_dir.to_path_buf();
        let wal_dir = wal_dir.to_path_buf();
        let abandoned = Arc::clone(&scratch.abandoned);
        let scratch = scratch.path.clone();
        let opts = opts.clone();
        blocking(move || copy_with_retries(&db_dir, &wal_dir, &scratch, &opts, &abandoned)).await?
    };
    let copied_at = Instant::now();
    let copy_duration = started.elapsed();
    if copy.identity != repo_identity {
        return Err(BaseError::WrongDatabase {
            location: repo.location(),
            expected: copy.identity.clone(),
            found: repo_identity.to_owned(),
        });
    }
    tracing::info!(
        earliest_seq = copy.earliest_seq,
        replay_from_seq = copy.replay_from_seq,
        min_log_number = copy.min_log_number,
        tables = copy.tables.len(),
        attempts = copy.attempts,
        copy_ms = copy_duration.as_millis() as u64,
        "consistent copy made; uploading"
    );

    let uploaded = upload(
        repo,
        id,
        &copy,
        &opts.reusable,
        opts.upload_concurrency.max(1),
    )
    .await?;

    let scratch_dir = scratch.path.join("earliest");
    let earliest_time = earliest_time(opts, repo, copy.earliest_seq, copied_at, &scratch_dir).await;
    let earliest_time = micros_precision(earliest_time);
    let descriptor = BaseDescriptor {
        format_version: FORMAT_VERSION,
        id: id.to_owned(),
        created_at,
        database_identity: copy.identity.clone(),
        min_log_number: copy.min_log_number,
        replay_from_seq: copy.replay_from_seq,
        earliest_seq: copy.earliest_seq,
        earliest_time,
        next_file_number: copy.next_file_number,
        column_families: copy.column_families.clone(),
        files: uploaded.files,
    };
    let descriptor_ref = match repo.put_base_descriptor(&descriptor).await {
        Ok(r) => r,
        Err(RepoError::Conflict { .. }) => {
            return Err(BaseError::IdTaken {
                id: id.to_owned(),
                location: repo.location(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let total_size: u64 = descriptor.files.iter().map(|f| f.size).sum();
    let summary = BaseSummary {
        id: id.to_owned(),
        created_at,
        descriptor: descriptor_ref,
        min_log_number: descriptor.min_log_number,
        replay_from_seq: descriptor.replay_from_seq,
        earliest_seq: descriptor.earliest_seq,
        earliest_time,
        column_families: descriptor
            .column_families
            .iter()
            .map(|cf| ColumnFamily {
                id: cf.id,
                name: cf.name.clone(),
            })
            .collect(),
        total_size,
    };
    let stats = BaseStats {
        files: descriptor.files.len(),
        table_files: copy.tables.len(),
        tables_uploaded: uploaded.tables_uploaded,
        tables_deduplicated: uploaded.tables_deduplicated,
        bytes_total: total_size,
        bytes_uploaded: uploaded.bytes_uploaded,
        bytes_deduplicated: uploaded.bytes_deduplicated,
        attempts: copy.attempts,
        copied_instead_of_linked: copy.copied_instead_of_linked,
        copy_duration,
        duration: started.elapsed(),
    };
    Ok(BaseResult {
        summary,
        descriptor,
        stats,
    })
}

/// How long a base waits for the WAL follower to read its earliest record (already in the
/// WAL when the copy was made; the follower reads promptly while a base runs).
const EARLIEST_TIME_WAIT: Duration = Duration::from_secs(10);

/// The time of the base's earliest record: as the follower observed it; or as archived, for
/// a record an earlier run read; or as the follower observes it within
/// [`EARLIEST_TIME_WAIT`], unless it says it never will (the record is only in the table
/// files); failing all, the time now (an upper bound of its commit, like any observed time:
/// the record was written before the copy, made at `copied_at`). A database that holds no
/// record (`seq` 0) has nothing to wait for.
async fn earliest_time(
    opts: &BaseOptions,
    repo: &Repository,
    seq: u64,
    copied_at: Instant,
    dir: &Path,
) -> OffsetDateTime {
    let Some(observed) = opts.earliest_time.as_ref().filter(|_| seq > 0) else {
        return OffsetDateTime::now_utc();
    };
    let first = observed(seq, copied_at);
    if let Observed::At(t) = first {
        return t;
    }
    match archived_time(repo, seq, dir).await {
        Ok(Some(t)) => return t,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, seq, "cannot read the base's earliest record from the archive")
        }
    }
    let deadline = Instant::now() + EARLIEST_TIME_WAIT;
    let mut answer = first;
    while answer == Observed::NotYet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = observed(seq, copied_at);
    }
    match answer {
        Observed::At(t) => return t,
        Observed::Never => tracing::info!(
            seq,
            "the base's earliest record is neither in the WAL the follower reads nor in the \
             archive (it is in the table files only); its time is the time now"
        ),
        Observed::NotYet => tracing::warn!(
            seq,
            waited = ?EARLIEST_TIME_WAIT,
            "the WAL follower did not read the base's earliest record in time; its time is \
             the time now, later than the record's own"
        ),
    }
    OffsetDateTime::now_utc()
}

/// The time of the archived record holding `seq`, if a segment holds it: the base's
/// earliest record when this run's follower never read it, because an earlier run archived
/// it before a restart (the database had not flushed it yet). Downloads that one segment.
async fn archived_time(
    repo: &Repository,
    seq: u64,
    dir: &Path,
) -> Result<Option<OffsetDateTime>, BaseError> {
    let state = repo.load().await?;
    let holding = |s: &&SegmentEntry| s.first_seq <= seq && seq <= s.last_seq;
    let Some(entry) = state.history.segments.iter().find(holding) else {
        return Ok(None);
    };
    fs::create_dir_all(dir).map_err(|e| BaseError::io("creating", dir, e))?;
    let path = repo.fetch_segment(entry, dir).await?;
    let key = entry.key.clone();
    blocking(move || {
        let file = File::open(&path).map_err(|e| BaseError::io("opening", &path, e))?;
        let file = io::BufReader::new(file);
        let mut reader = SegmentReader::new(&key, file, None).map_err(RepoError::from)?;
        let mut time = None;
        while let Some(r) = reader.next_record().map_err(RepoError::from)? {
            if r.seq <= seq && seq < r.next_seq() {
                time = Some(model::time_from_micros(r.time_us));
                break;
            }
        }
        let _ = fs::remove_file(&path);
        Ok(time)
    })
    .await
}

/// Timestamps in repository documents have microsecond precision (FORMAT.md).
fn micros_precision(t: OffsetDateTime) -> OffsetDateTime {
    model::time_from_micros(model::micros_from_time(t))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BaseError> + Send + 'static,
) -> Result<T, BaseError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BaseError::Task(e.to_string()))?
}

// ---------------------------------------------------------------------------------------
// The scratch directory
// ---------------------------------------------------------------------------------------

/// The fresh directory a copy is made in; removed when dropped.
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
    removed: bool,
    /// Set when the backup is dropped before it finished: the copy, which runs on a blocking
    /// thread of its own, stops instead of re-creating the directory for another attempt.
    abandoned: Arc<AtomicBool>,
}

impl Scratch {
    fn create(scratch_dir: &Path, id: &str) -> Result<Scratch, BaseError> {
        fs::create_dir_all(scratch_dir)
            .map_err(|e| BaseError::io("create the scratch directory", scratch_dir, e))?;
        let path = scratch_dir.join(format!("tidemark-base-{id}"));
        fs::create_dir(&path)
            .map_err(|e| BaseError::io("create the scratch directory", &path, e))?;
        Ok(Scratch {
            path,
            removed: false,
            abandoned: Arc::new(AtomicBool::new(false)),
        })
    }

    fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        remove_dir_if_exists(&self.path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::SeqCst);
        if !self.removed
            && let Err(e) = remove_dir_if_exists(&self.path)
        {
            tracing::warn!(
                scratch = %self.path.display(),
                error = %e,
                "cannot remove the base backup's scratch directory; delete it by hand"
            );
        }
    }
}

fn remove_dir_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// The copy
// ---------------------------------------------------------------------------------------

/// A consistent copy of the database's files in the scratch directory.
#[derive(Debug)]
struct DbCopy {
    identity: String,
    /// `(name in the base, path in the scratch directory)` of CURRENT, the MANIFEST and the
    /// OPTIONS file, in that order.
    meta_files: Vec<(String, PathBuf)>,
    /// `(name in the base, path in the scratch directory)` of every table and blob file the
    /// MANIFEST references, by file number.
    tables: Vec<(String, PathBuf)>,
    column_families: Vec<BaseColumnFamily>,
    next_file_number: u64,
    min_log_number: u64,
    replay_from_seq: u64,
    earliest_seq: u64,
    attempts: u32,
    copied_instead_of_linked: bool,
}

fn copy_with_retries(
    db_dir: &Path,
    wal_dir: &Path,
    scratch: &Path,
    opts: &BaseOptions,
    abandoned: &AtomicBool,
) -> Result<DbCopy, BaseError> {
    if !db_dir.join("CURRENT").is_file() {
        return Err(BaseError::NotADatabase {
            db_dir: db_dir.to_path_buf(),
            detail: "it has no CURRENT file".to_owned(),
        });
    }
    let max_attempts = opts.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        if abandoned.load(Ordering::SeqCst) {
            return Err(BaseError::Task(
                "the base backup was cancelled while the database was being copied".into(),
            ));
        }
        match copy_once(db_dir, wal_dir, scratch, opts) {
            Ok(mut copy) => {
                copy.attempts = attempt;
                return Ok(copy);
            }
            Err(e) if e.is_race() => {
                if attempt >= max_attempts {
                    return Err(BaseError::Unstable {
                        attempts: attempt,
                        last: Box::new(e),
                    });
                }
                tracing::warn!(
                    attempt,
                    max_attempts,
                    reason = %e,
                    "the database changed under the copy; copying again"
                );
                std::thread::sleep(opts.retry_delay);
                if abandoned.load(Ordering::SeqCst) {
                    continue;
                }
                clear_dir(scratch)?;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn clear_dir(dir: &Path) -> Result<(), BaseError> {
    remove_dir_if_exists(dir).map_err(|e| BaseError::io("empty the scratch directory", dir, e))?;
    fs::create_dir(dir).map_err(|e| BaseError::io("create the scratch directory", dir, e))
}

/// Files of a directory that RocksDB names, with their kind.
fn list_db_files(dir: &Path) -> Result<Vec<(String, DbFile)>, BaseError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Err(BaseError::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| BaseError::io("list", dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(kind) = DbFile::parse(&name) {
            out.push((name, kind));
        }
    }
    Ok(out)
}

/// WAL file numbers in `wal_dir` and in `wal_dir/archive`, each with where it was found.
fn list_wals(wal_dir: &Path) -> Result<BTreeMap<u64, PathBuf>, BaseError> {
    let mut out = BTreeMap::new();
    let archive = wal_dir.join("archive");
    if archive.is_dir() {
        for (name, kind) in list_db_files(&archive)? {
            if let DbFile::Wal(n) = kind {
                out.insert(n, archive.join(name));
            }
        }
    }
    for (name, kind) in list_db_files(wal_dir)? {
        if let DbFile::Wal(n) = kind {
            out.insert(n, wal_dir.join(name));
        }
    }
    Ok(out)
}

/// Opens WAL `number`, looking in the WAL directory first and then in `archive/` (RocksDB
/// renames a WAL into `archive/`; an open handle keeps reading it). `None` if it is in
/// neither.
fn open_wal(wal_dir: &Path, number: u64) -> Result<Option<(PathBuf, File)>, BaseError> {
    let name = DbFile::Wal(number)
        .file_name()
        .expect("WAL files have a name");
    for path in [wal_dir.join(&name), wal_dir.join("archive").join(&name)] {
        match File::open(&path) {
            Ok(f) => return Ok(Some((path, f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BaseError::io("open the WAL file", &path, e)),
        }
    }
    Ok(None)
}

/// An open WAL file and how far it reached when the MANIFEST had been copied.
#[derive(Debug)]
struct HeldWal {
    path: PathBuf,
    file: File,
    /// Bytes of the file that were written when the MANIFEST had been copied; `None` until
    /// measured.
    limit: Option<u64>,
}

impl HeldWal {
    fn measure(&mut self) -> Result<(), BaseError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| BaseError::io("stat the WAL file", &self.path, e))?
            .len();
        self.limit = Some(len);
        Ok(())
    }

    /// The batches of the records complete within the limit, in order, with the offset of
    /// their record. Stops early when `keep_going` returns false.
    fn for_each_batch(
        &self,
        mut keep_going: impl FnMut(BatchHeader) -> bool,
    ) -> Result<(), BaseError> {
        let limit = self.limit.unwrap_or(u64::MAX);
        let mut reader = LogReader::new(&self.file, &self.path)?;
        while let Some(record) = reader.next_record()? {
            if record.end_offset > limit {
                break;
            }
            let header = BatchHeader::parse(&record.bytes).map_err(|source| BaseError::Batch {
                path: self.path.clone(),
                offset: record.start_offset,
                source,
            })?;
            if !keep_going(header) {
                break;
            }
        }
        Ok(())
    }

    /// The sequence number of the first batch within the limit.
    fn first_sequence(&self) -> Result<Option<u64>, BaseError> {
        let mut first = None;
        self.for_each_batch(|h| {
            first = Some(h.sequence);
            false
        })?;
        Ok(first)
    }

    /// The last sequence number used by the batches within the limit (for a batch that takes
    /// no sequence number, the one before it).
    fn last_sequence(&self) -> Result<Option<u64>, BaseError> {
        let mut last = None;
        self.for_each_batch(|h| {
            last = Some(h.next_sequence().saturating_sub(1));
            true
        })?;
        Ok(last)
    }
}

/// Table and blob files linked (or copied) into the scratch directory.
#[derive(Debug, Default)]
struct Tables {
    /// By kind and number: the name in the database directory.
    held: BTreeMap<DbFile, String>,
    /// Copies are made instead of hard links.
    copying: bool,
}

impl Tables {
    /// Links (or copies) every table and blob file of `db_dir` not held yet. A file deleted
    /// between the listing and the link is skipped: it is obsolete.
    fn collect(&mut self, db_dir: &Path, scratch: &Path) -> Result<usize, BaseError> {
        let mut added = 0;
        for (name, kind) in list_db_files(db_dir)? {
            if !matches!(kind, DbFile::Table(_) | DbFile::Blob(_)) || self.held.contains_key(&kind)
            {
                continue;
            }
            let src = db_dir.join(&name);
            let dst = scratch.join(&name);
            if !self.copying {
                match fs::hard_link(&src, &dst) {
                    Ok(()) => {
                        self.held.insert(kind, name);
                        added += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        tracing::warn!(
                            file = %src.display(),
                            scratch = %scratch.display(),
                            error = %e,
                            cross_device = e.kind() == io::ErrorKind::CrossesDevices,
                            "cannot hard-link the database's table files into the scratch \
                             directory; copying them instead, which is slower and needs the \
                             space; put the scratch directory on the database's file system"
                        );
                        self.copying = true;
                    }
                }
            }
            match fs::copy(&src, &dst) {
                Ok(_) => {
                    self.held.insert(kind, name);
                    added += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let _ = fs::remove_file(&dst);
                }
                Err(e) => return Err(BaseError::io("copy the table file", &src, e)),
            }
        }
        Ok(added)
    }
}

fn pause(opts: &BaseOptions) {
    if !opts.step_pause.is_zero() {
        std::thread::sleep(opts.step_pause);
    }
}

/// Reads `CURRENT` and copies it and the MANIFEST it names. Returns the MANIFEST's name.
fn copy_current_and_manifest(db_dir: &Path, scratch: &Path) -> Result<String, BaseError> {
    const TRIES: u32 = 5;
    let current = db_dir.join("CURRENT");
    for _ in 0..TRIES {
        let content = fs::read(&current).map_err(|e| BaseError::io("read", &current, e))?;
        let text = String::from_utf8_lossy(&content);
        let name = text.strip_suffix('\n').unwrap_or(&text).to_owned();
        if !matches!(DbFile::parse(&name), Some(DbFile::Manifest(_))) {
            return Err(BaseError::NotADatabase {
                db_dir: db_dir.to_path_buf(),
                detail: format!("CURRENT does not name a MANIFEST file: {text:?}"),
            });
        }
        match fs::copy(db_dir.join(&name), scratch.join(&name)) {
            Ok(_) => {}
            // The owner started a new MANIFEST and deleted this one after we read CURRENT.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BaseError::io("copy", &db_dir.join(&name), e)),
        }
        let dst = scratch.join("CURRENT");
        fs::write(&dst, &content).map_err(|e| BaseError::io("write", &dst, e))?;
        return Ok(name);
    }
    Err(BaseError::CurrentMoving {
        db_dir: db_dir.to_path_buf(),
        tries: TRIES,
    })
}

/// Copies the newest `OPTIONS-*` file, if there is one. Returns its name.
fn copy_newest_options(db_dir: &Path, scratch: &Path) -> Result<Option<String>, BaseError> {
    for _ in 0..5 {
        let newest = list_db_files(db_dir)?
            .into_iter()
            .filter_map(|(name, kind)| match kind {
                DbFile::Options(n) => Some((n, name)),
                _ => None,
            })
            .max();
        let Some((_, name)) = newest else {
            tracing::warn!(
                db = %db_dir.display(),
                "the database directory has no OPTIONS file; the base holds none"
            );
            return Ok(None);
        };
        match fs::copy(db_dir.join(&name), scratch.join(&name)) {
            Ok(_) => return Ok(Some(name)),
            // Replaced by a newer one meanwhile (RocksDB keeps the two newest).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BaseError::io("copy", &db_dir.join(&name), e)),
        }
    }
    tracing::warn!(
        db = %db_dir.display(),
        "the OPTIONS files kept changing while they were copied; the base holds none"
    );
    Ok(None)
}

/// Cuts a copied MANIFEST after its last complete record: a record the owner was writing
/// while it was copied is dropped (RocksDB ignores it too), so the uploaded file is exactly
/// what was parsed.
fn truncate_torn_tail(path: &Path) -> Result<(), BaseError> {
    let mut reader = LogReader::open(path)?;
    while reader.next_record()?.is_some() {}
    let end = reader.offset();
    let len = reader.file_len()?;
    if len > end {
        tracing::debug!(
            manifest = %path.display(),
            dropped = len - end,
            "dropping a partly written record at the end of the copied MANIFEST"
        );
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| BaseError::io("open", path, e))?;
        f.set_len(end)
            .map_err(|e| BaseError::io("truncate", path, e))?;
    }
    Ok(())
}

fn allow_2pc(options_path: Option<&Path>) -> bool {
    let Some(path) = options_path else {
        return false;
    };
    match OptionsFile::read(path) {
        Ok(o) => o.db_option("allow_2pc") == Some("true"),
        Err(e) => {
            tracing::warn!(
                options = %path.display(),
                error = %e,
                "cannot read the OPTIONS file; assuming allow_2pc = false"
            );
            false
        }
    }
}

fn read_identity(db_dir: &Path, state: &ManifestState) -> Result<String, BaseError> {
    let path = db_dir.join("IDENTITY");
    let from_file = match fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(BaseError::io("read", &path, e)),
    };
    let from_manifest = state
        .db_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    match (from_file, from_manifest) {
        (Some(f), Some(m)) if f != m => {
            tracing::warn!(
                identity_file = %f,
                manifest_db_id = %m,
                "the IDENTITY file and the MANIFEST name different database ids; using IDENTITY"
            );
            Ok(f)
        }
        (Some(f), _) => Ok(f),
        (None, Some(m)) => Ok(m.to_owned()),
        (None, None) => Err(BaseError::NoIdentity {
            db_dir: db_dir.to_path_buf(),
        }),
    }
}

/// The smallest WAL RocksDB's recovery of the copy reads (`DBImpl::SetupLogFilesRecovery`):
/// `min_log_number_to_keep`, and without two-phase commit at least the smallest log number
/// of a column family. The MANIFEST can hold a stale, smaller log number for a column family
/// that was empty when its WAL was switched (RocksDB advances it in memory only), so the
/// column families' minimum alone can name a WAL that is long gone; `min_log_number_to_keep`
/// (written with every flush of a database with several column families) covers that case.
/// `prev_log_number` is no longer used by RocksDB's recovery.
fn min_log_number(state: &ManifestState, allow_2pc: bool) -> u64 {
    if state.prev_log_number != 0 {
        tracing::debug!(
            prev_log_number = state.prev_log_number,
            "the MANIFEST records a previous log number, which RocksDB's recovery ignores"
        );
    }
    state.min_wal_number_for_recovery(allow_2pc)
}

/// The sequence number replay must start from: the first record in the WAL files numbered
/// `min_log` and up (the first one exists unless RocksDB has not written to it yet), or
/// `earliest_seq + 1` when none of them holds a record yet. `first_held` is the smallest WAL
/// number held since before the MANIFEST was copied.
fn replay_from_seq(
    wals: &mut BTreeMap<u64, HeldWal>,
    wal_dir: &Path,
    min_log: u64,
    first_held: u64,
    earliest_seq: u64,
    manifest_last: u64,
) -> Result<u64, BaseError> {
    let newest_known = wals.keys().next_back().copied().unwrap_or(0);
    // Log number 0: no WAL is recorded yet (a database that never flushed); every WAL is
    // needed, and none was ever obsolete.
    if min_log != 0 && !wals.contains_key(&min_log) {
        if min_log > newest_known {
            // RocksDB has not created it yet: every record it will hold is newer than the copy.
            return Ok(earliest_seq + 1);
        }
        match open_wal(wal_dir, min_log)? {
            // Older than the WAL files held (moved to archive/ before the copy began): it is
            // complete, read it whole.
            Some((path, file)) => {
                wals.insert(
                    min_log,
                    HeldWal {
                        path,
                        file,
                        limit: None,
                    },
                );
            }
            None => {
                // Log numbers share a counter with other files: RocksDB may record a log
                // number no WAL ever had (reopening after an empty WAL does). Nothing is
                // missing if the next WAL's first record follows what the MANIFEST says is
                // in the table files; otherwise a needed WAL was deleted.
                let mut next_first = None;
                for wal in wals.range(min_log..).map(|(_, w)| w) {
                    if let Some(seq) = wal.first_sequence()? {
                        next_first = Some(seq);
                        break;
                    }
                }
                match next_first {
                    Some(seq) if seq <= manifest_last.saturating_add(1) => {
                        tracing::debug!(
                            min_log,
                            first_seq = seq,
                            "no WAL has the MANIFEST's log number; replay starts at the next WAL"
                        );
                        return Ok(seq);
                    }
                    None if min_log >= first_held => return Ok(earliest_seq + 1),
                    _ => {
                        return Err(BaseError::WalDeleted {
                            log_number: min_log,
                            wal_dir: wal_dir.to_path_buf(),
                            during_copy: min_log >= first_held,
                        });
                    }
                }
            }
        }
    }
    for wal in wals.range(min_log..).map(|(_, w)| w) {
        if let Some(seq) = wal.first_sequence()? {
            return Ok(seq);
        }
    }
    Ok(earliest_seq + 1)
}

fn copy_once(
    db_dir: &Path,
    wal_dir: &Path,
    scratch: &Path,
    opts: &BaseOptions,
) -> Result<DbCopy, BaseError> {
    // (1) The smallest WAL number: older WAL files were obsolete before the copy began.
    let first_wal = list_db_files(wal_dir)?
        .into_iter()
        .filter_map(|(_, kind)| match kind {
            DbFile::Wal(n) => Some(n),
            _ => None,
        })
        .min()
        .ok_or_else(|| BaseError::NoWal {
            wal_dir: wal_dir.to_path_buf(),
        })?;
    tracing::debug!(first_wal, "step 1: smallest WAL noted");
    pause(opts);

    // (2) First pass over the table and blob files.
    let mut tables = Tables::default();
    let linked = tables.collect(db_dir, scratch)?;
    tracing::debug!(linked, "step 2: table and blob files linked");
    pause(opts);

    // Hold the WAL files open from here on: one RocksDB deletes after the MANIFEST copy
    // stays readable.
    let mut wals: BTreeMap<u64, HeldWal> = BTreeMap::new();
    hold_wals(wal_dir, first_wal, &mut wals)?;

    // (3) CURRENT, then the MANIFEST it names; then at once how far the WAL reached (the
    // MANIFEST's table files hold nothing newer) and (4) the second pass over the table and
    // blob files: a file the MANIFEST references but that is not linked yet was created
    // after the first pass, and the owner may delete it again at any moment.
    let manifest_name = copy_current_and_manifest(db_dir, scratch)?;
    hold_wals(wal_dir, first_wal, &mut wals)?;
    for wal in wals.values_mut() {
        wal.measure()?;
    }
    let linked = tables.collect(db_dir, scratch)?;
    tracing::debug!(
        manifest = %manifest_name,
        wals = wals.len(),
        linked,
        "steps 3 and 4: MANIFEST copied, WAL measured, new table and blob files linked"
    );
    pause(opts);
    let options_name = copy_newest_options(db_dir, scratch)?;

    // (5) What the copied MANIFEST says.
    let manifest_path = scratch.join(&manifest_name);
    truncate_torn_tail(&manifest_path)?;
    let state = ManifestState::from_file(&manifest_path)?;
    let options_path = options_name.as_ref().map(|n| scratch.join(n));
    let min_log = min_log_number(&state, allow_2pc(options_path.as_deref()));
    let manifest_last = state.last_sequence;
    let mut wal_last = None;
    for wal in wals.values().rev() {
        if let Some(last) = wal.last_sequence()? {
            wal_last = Some(last);
            break;
        }
    }
    let earliest_seq = wal_last.map_or(manifest_last, |w| w.max(manifest_last));
    let replay_from = replay_from_seq(
        &mut wals,
        wal_dir,
        min_log,
        first_wal,
        earliest_seq,
        manifest_last,
    )?;
    if replay_from > earliest_seq + 1 {
        return Err(BaseError::Inconsistent {
            replay_from_seq: replay_from,
            earliest_seq,
        });
    }
    tracing::debug!(
        min_log,
        manifest_last,
        ?wal_last,
        earliest_seq,
        replay_from,
        "step 5: sequence numbers read"
    );

    // Every file the MANIFEST references must be in the copy.
    let mut referenced: Vec<(String, PathBuf)> = Vec::new();
    for cf in state.column_families.values() {
        for (&number, meta) in &cf.files {
            let kind = DbFile::Table(number);
            let path = check_held(&mut tables, db_dir, scratch, kind, Some(meta.file_size))?;
            referenced.push((kind.file_name().expect("tables have names"), path));
        }
    }
    for &number in state.blob_files.keys() {
        let kind = DbFile::Blob(number);
        let path = check_held(&mut tables, db_dir, scratch, kind, None)?;
        referenced.push((kind.file_name().expect("blob files have names"), path));
    }
    referenced.sort();

    let identity = read_identity(db_dir, &state)?;
    let column_families = state
        .column_families
        .iter()
        .map(|(&id, cf)| BaseColumnFamily {
            id,
            name: cf.name.clone(),
            log_number: cf.log_number,
        })
        .collect();
    let mut meta_files = vec![
        ("CURRENT".to_owned(), scratch.join("CURRENT")),
        (manifest_name, manifest_path),
    ];
    if let (Some(name), Some(path)) = (options_name, options_path) {
        meta_files.push((name, path));
    }
    Ok(DbCopy {
        identity,
        meta_files,
        tables: referenced,
        column_families,
        next_file_number: state.next_file_number,
        min_log_number: min_log,
        replay_from_seq: replay_from,
        earliest_seq,
        attempts: 1,
        copied_instead_of_linked: tables.copying,
    })
}

/// Opens the WAL files from `first_wal` on that are not held yet.
fn hold_wals(
    wal_dir: &Path,
    first_wal: u64,
    wals: &mut BTreeMap<u64, HeldWal>,
) -> Result<(), BaseError> {
    for (n, _) in list_wals(wal_dir)?.range(first_wal..) {
        if !wals.contains_key(n)
            && let Some((path, file)) = open_wal(wal_dir, *n)?
        {
            wals.insert(
                *n,
                HeldWal {
                    path,
                    file,
                    limit: None,
                },
            );
        }
    }
    Ok(())
}

/// Checks that a file the MANIFEST references is in the copy, complete, and returns its path
/// in the scratch directory.
fn check_held(
    tables: &mut Tables,
    db_dir: &Path,
    scratch: &Path,
    kind: DbFile,
    manifest_size: Option<u64>,
) -> Result<PathBuf, BaseError> {
    let canonical = kind.file_name().expect("tables have names");
    let Some(name) = tables.held.get(&kind).cloned() else {
        return Err(BaseError::MissingFile { name: canonical });
    };
    let path = scratch.join(&name);
    let size = |p: &Path| fs::metadata(p).map(|m| m.len());
    let mut found = size(&path).map_err(|e| BaseError::io("stat", &path, e))?;
    if tables.copying {
        // A copy made while RocksDB was still writing the file is short. The file is
        // complete now (the MANIFEST references it); copy it again if it grew.
        let src = db_dir.join(&name);
        match size(&src) {
            Ok(src_size) if src_size != found => {
                fs::copy(&src, &path).map_err(|e| BaseError::io("copy the table file", &src, e))?;
                found = size(&path).map_err(|e| BaseError::io("stat", &path, e))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && manifest_size.is_none() => {
                // A blob file deleted since: its copy cannot be checked against anything.
                return Err(BaseError::MissingFile { name: canonical });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BaseError::io("stat", &src, e)),
        }
    }
    if let Some(expected) = manifest_size
        && expected != found
    {
        return Err(BaseError::SizeMismatch {
            name: canonical,
            expected,
            found,
        });
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------
// The upload
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Uploaded {
    files: Vec<BaseFile>,
    tables_uploaded: usize,
    tables_deduplicated: usize,
    bytes_uploaded: u64,
    bytes_deduplicated: u64,
}

#[derive(Debug)]
struct UploadedFile {
    index: usize,
    file: BaseFile,
    deduplicated: bool,
}

/// Whether a listed table may be reused in a repository with `lock`: always without one;
/// with one, only while at least half of the object's lock is left (else it is written
/// again, with a fresh lock).
async fn still_locked_enough(
    repo: &Repository,
    lock: Option<ObjectLock>,
    key: &str,
) -> Result<bool, BaseError> {
    let Some(lock) = lock else {
        return Ok(true);
    };
    let meta = repo.store().head(key).await.map_err(RepoError::from)?;
    let reuse = lock.reusable(
        meta.and_then(|m| m.last_modified),
        time::OffsetDateTime::now_utc(),
    );
    if !reuse {
        tracing::debug!(
            key,
            "table written again: less than half its object lock is left"
        );
    }
    Ok(reuse)
}

async fn upload(
    repo: &Repository,
    id: &str,
    copy: &DbCopy,
    reusable: &ReusableTables,
    concurrency: usize,
) -> Result<Uploaded, BaseError> {
    let lock = repo
        .read_config()
        .await
        .map_err(BaseError::from)?
        .and_then(|c| c.object_lock);
    let jobs: Vec<(usize, String, PathBuf, bool)> = copy
        .meta_files
        .iter()
        .map(|(n, p)| (n.clone(), p.clone(), false))
        .chain(
            copy.tables
                .iter()
                .map(|(n, p)| (n.clone(), p.clone(), true)),
        )
        .enumerate()
        .map(|(i, (n, p, t))| (i, n, p, t))
        .collect();
    let mut done: Vec<UploadedFile> = stream::iter(jobs)
        .map(|(index, name, path, is_table)| {
            let repo = repo.clone();
            let id = id.to_owned();
            async move {
                let hashed = path.clone();
                let (sha256, size) = blocking(move || {
                    checksum::sha256_file(&hashed).map_err(|e| BaseError::io("read", &hashed, e))
                })
                .await?;
                let key = keys::base_object_key(&id, &name, &sha256);
                // Only what a base of the current generation lists is trusted; anything else
                // under this key (an abandoned base's object, a damaged one) is replaced.
                // Under an object lock, only while half its lock is left (FORMAT.md §3.2).
                let deduplicated = is_table
                    && reusable.reuses(&key, size)
                    && still_locked_enough(&repo, lock, &key).await?;
                if !deduplicated {
                    repo.put_base_file(&key, &path).await?;
                }
                tracing::debug!(file = %name, key = %key, size, deduplicated, "base file stored");
                Ok::<_, BaseError>(UploadedFile {
                    index,
                    file: BaseFile {
                        name,
                        size,
                        sha256,
                        key,
                    },
                    deduplicated,
                })
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    done.sort_by_key(|u| u.index);
    let mut out = Uploaded {
        files: Vec::with_capacity(done.len()),
        tables_uploaded: 0,
        tables_deduplicated: 0,
        bytes_uploaded: 0,
        bytes_deduplicated: 0,
    };
    for u in done {
        let is_table = keys::is_table_file(&u.file.name);
        if u.deduplicated {
            out.tables_deduplicated += 1;
            out.bytes_deduplicated += u.file.size;
        } else {
            out.bytes_uploaded += u.file.size;
            if is_table {
                out.tables_uploaded += 1;
            }
        }
        out.files.push(u.file);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tidemark_manifest::rocks::log::LogWriter;

    fn batch(seq: u64, count: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b
    }

    fn write_wal(dir: &Path, number: u64, batches: &[(u64, u32)]) -> PathBuf {
        let path = dir.join(DbFile::Wal(number).file_name().unwrap());
        let mut w = LogWriter::new(File::create(&path).unwrap());
        for &(seq, count) in batches {
            w.add_record(&batch(seq, count)).unwrap();
        }
        w.flush().unwrap();
        path
    }

    fn held(dir: &Path, numbers: &[u64]) -> BTreeMap<u64, HeldWal> {
        numbers
            .iter()
            .filter_map(|&n| {
                let (path, file) = open_wal(dir, n).unwrap()?;
                let mut h = HeldWal {
                    path,
                    file,
                    limit: None,
                };
                h.measure().unwrap();
                Some((n, h))
            })
            .collect()
    }

    #[test]
    fn sequences_are_read_within_the_measured_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_wal(dir.path(), 7, &[(10, 3), (13, 0), (13, 2)]);
        let mut wals = held(dir.path(), &[7]);
        let wal = wals.get_mut(&7).unwrap();
        assert_eq!(wal.first_sequence().unwrap(), Some(10));
        assert_eq!(wal.last_sequence().unwrap(), Some(14));
        // Records appended after the measurement are not seen.
        let mut w = LogWriter::with_offset(
            fs::OpenOptions::new().append(true).open(&path).unwrap(),
            wal.limit.unwrap(),
        );
        w.add_record(&batch(15, 4)).unwrap();
        w.flush().unwrap();
        assert_eq!(wal.last_sequence().unwrap(), Some(14));
        wal.measure().unwrap();
        assert_eq!(wal.last_sequence().unwrap(), Some(18));
        // A torn record at the end is not a record.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3, 4, 200, 0, 1, 9]).unwrap();
        wal.measure().unwrap();
        assert_eq!(wal.last_sequence().unwrap(), Some(18));
        // A batch taking no sequence number ends at the sequence before it.
        write_wal(dir.path(), 9, &[(40, 0)]);
        let wals = held(dir.path(), &[9]);
        assert_eq!(wals[&9].last_sequence().unwrap(), Some(39));
    }

    #[test]
    fn replay_starts_at_the_first_record_of_the_oldest_needed_wal() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), 4, &[(1, 5)]);
        write_wal(dir.path(), 8, &[(6, 2), (8, 1)]);
        write_wal(dir.path(), 11, &[]);
        let mut wals = held(dir.path(), &[4, 8, 11]);
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 8, 4, 8, 0).unwrap(),
            6
        );
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 4, 4, 8, 0).unwrap(),
            1
        );
        // The needed WAL holds no record yet: replay starts after the copy's last sequence.
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 11, 4, 8, 0).unwrap(),
            9
        );
        // Not created yet.
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 12, 4, 8, 0).unwrap(),
            9
        );
    }

    #[test]
    fn a_needed_wal_in_archive_is_read_and_a_deleted_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        fs::create_dir(&archive).unwrap();
        write_wal(&archive, 3, &[(20, 2)]);
        write_wal(dir.path(), 9, &[(22, 1)]);
        let mut wals = held(dir.path(), &[9]);
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 3, 9, 22, 0).unwrap(),
            20
        );
        // Deleted before the copy began: no retry helps.
        let mut wals = held(dir.path(), &[9]);
        let err = replay_from_seq(&mut wals, dir.path(), 5, 9, 22, 0).unwrap_err();
        assert!(
            matches!(err, BaseError::WalDeleted { log_number: 5, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("000005.log") && msg.contains("WAL_ttl_seconds"),
            "{msg}"
        );
        assert!(!err.is_race());
        // Deleted while the copy was made: another copy may not need it.
        let mut wals = held(dir.path(), &[9]);
        let err = replay_from_seq(&mut wals, dir.path(), 5, 4, 22, 0).unwrap_err();
        assert!(err.is_race(), "{err}");
        // A log number no WAL ever had (RocksDB reopened after an empty WAL): the next
        // WAL's first record follows what the MANIFEST says the tables hold.
        let mut wals = held(dir.path(), &[9]);
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 5, 9, 22, 21).unwrap(),
            22
        );
        // Log number 0: nothing flushed yet, replay from the first WAL held.
        let mut wals = held(dir.path(), &[9]);
        assert_eq!(
            replay_from_seq(&mut wals, dir.path(), 0, 9, 22, 0).unwrap(),
            22
        );
    }

    #[test]
    fn a_torn_manifest_tail_is_cut_at_the_last_complete_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("MANIFEST-000001");
        let mut w = LogWriter::new(File::create(&path).unwrap());
        let end = w.add_record(b"first edit").unwrap();
        let end = w.add_record(&vec![7u8; 40_000]).unwrap().max(end);
        w.flush().unwrap();
        drop(w);
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 9, 9, 9, 100, 0, 1, 1, 2]).unwrap();
        drop(f);
        truncate_torn_tail(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
        let records = tidemark_manifest::rocks::log::read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        truncate_torn_tail(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
    }

    #[test]
    fn table_collection_skips_vanished_files_and_never_links_twice() {
        let db = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        fs::write(db.path().join("000010.sst"), b"ten").unwrap();
        fs::write(db.path().join("000011.blob"), b"eleven").unwrap();
        fs::write(db.path().join("000012.log"), b"log").unwrap();
        fs::write(db.path().join("OPTIONS-000005"), b"opts").unwrap();
        let mut tables = Tables::default();
        assert_eq!(tables.collect(db.path(), scratch.path()).unwrap(), 2);
        fs::write(db.path().join("000013.sst"), b"thirteen").unwrap();
        fs::remove_file(db.path().join("000010.sst")).unwrap();
        assert_eq!(tables.collect(db.path(), scratch.path()).unwrap(), 1);
        // The link keeps the deleted file.
        assert_eq!(fs::read(scratch.path().join("000010.sst")).unwrap(), b"ten");
        assert!(!scratch.path().join("000012.log").exists());
        let err = check_held(
            &mut tables,
            db.path(),
            scratch.path(),
            DbFile::Table(14),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BaseError::MissingFile { .. }), "{err}");
        let err = check_held(
            &mut tables,
            db.path(),
            scratch.path(),
            DbFile::Table(13),
            Some(3),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                BaseError::SizeMismatch {
                    expected: 3,
                    found: 8,
                    ..
                }
            ),
            "{err}"
        );
        check_held(
            &mut tables,
            db.path(),
            scratch.path(),
            DbFile::Table(13),
            Some(8),
        )
        .unwrap();
    }

    #[test]
    fn an_abandoned_backup_stops_copying_and_leaves_no_scratch_directory() {
        let db = tempfile::tempdir().unwrap();
        fs::write(db.path().join("CURRENT"), "MANIFEST-000001\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(root.path(), "b1").unwrap();
        let path = scratch.path.clone();
        let abandoned = Arc::clone(&scratch.abandoned);
        drop(scratch);
        assert!(!path.exists());
        let err = copy_with_retries(
            db.path(),
            db.path(),
            &path,
            &BaseOptions::default(),
            &abandoned,
        )
        .unwrap_err();
        assert!(matches!(err, BaseError::Task(_)), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn identity_comes_from_the_file_then_from_the_manifest() {
        let db = tempfile::tempdir().unwrap();
        let mut state = ManifestState::new();
        assert!(matches!(
            read_identity(db.path(), &state),
            Err(BaseError::NoIdentity { .. })
        ));
        state.db_id = Some("from-manifest".into());
        assert_eq!(read_identity(db.path(), &state).unwrap(), "from-manifest");
        fs::write(db.path().join("IDENTITY"), "from-file\n").unwrap();
        assert_eq!(read_identity(db.path(), &state).unwrap(), "from-file");
    }

    #[test]
    fn min_log_number_respects_min_log_number_to_keep() {
        let mut state = ManifestState::new();
        state.column_families.get_mut(&0).unwrap().log_number = 20;
        let mut stale = state.column_families[&0].clone();
        stale.name = "empty".into();
        stale.log_number = 5;
        state.column_families.insert(1, stale);
        assert_eq!(min_log_number(&state, false), 5);
        state.min_log_number_to_keep = 20;
        assert_eq!(min_log_number(&state, false), 20);
        state.min_log_number_to_keep = 3;
        assert_eq!(min_log_number(&state, true), 3);
    }

    /// A repository, and base options whose follower answers `answers` in turn (the last one
    /// from then on), counting the questions.
    async fn asking(
        answers: Vec<Observed>,
    ) -> (Repository, BaseOptions, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::AtomicUsize;
        let repo = Repository::new(Arc::new(tidemark_manifest::store::MemoryStore::new()));
        repo.create_config(&tidemark_manifest::testing::config())
            .await
            .unwrap();
        let looks = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&looks);
        let observed: ObservedTimeFn = Arc::new(move |seq, _| {
            assert_eq!(seq, 77);
            let n = counted.fetch_add(1, Ordering::SeqCst);
            answers[n.min(answers.len() - 1)]
        });
        let opts = BaseOptions {
            earliest_time: Some(observed),
            ..BaseOptions::default()
        };
        (repo, opts, looks)
    }

    #[tokio::test]
    async fn a_base_waits_for_the_follower_to_read_its_earliest_record() {
        let written = model::time_from_micros(1_700_000_000_123_456);
        // The follower reads the record on the fourth look.
        let not_yet = Observed::NotYet;
        let (repo, opts, looks) =
            asking(vec![not_yet, not_yet, not_yet, Observed::At(written)]).await;
        let dir = tempfile::tempdir().unwrap();
        let t = earliest_time(&opts, &repo, 77, Instant::now(), dir.path()).await;
        assert_eq!(t, written, "the record's time, not the time now");
        assert_eq!(looks.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_base_waits_for_no_record_the_follower_will_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let before = OffsetDateTime::now_utc();
        // A database that holds no record yet.
        let (repo, opts, looks) = asking(vec![Observed::NotYet]).await;
        let t = earliest_time(&opts, &repo, 0, Instant::now(), dir.path()).await;
        assert!(t >= before);
        assert_eq!(looks.load(Ordering::SeqCst), 0, "sequence 0 is no record");
        // A record only in the table files: the follower says so at once, or after a look.
        for answers in [
            vec![Observed::Never],
            vec![Observed::NotYet, Observed::Never],
        ] {
            let n = answers.len();
            let (repo, opts, looks) = asking(answers).await;
            let t = earliest_time(&opts, &repo, 77, Instant::now(), dir.path()).await;
            assert!(t >= before);
            assert_eq!(looks.load(Ordering::SeqCst), n, "not waited for");
        }
    }
}
