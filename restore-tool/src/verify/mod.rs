//! Verify: checking that the restored database ends exactly at the planned cutoff, at one
//! of three levels (`--verify`):
//!
//! - `standard` (the restore's default) checks the two halves RocksDB's first open puts
//!   together, each once: [`base`] opens the base's files alone, read-only, before any WAL
//!   file is beside them (the re-created WAL files are written into a directory of their
//!   own and placed only afterwards), and [`wal`] reads every re-created WAL file back with
//!   the format's own reader as it is closed. Together: the base opens and ends no later
//!   than the WAL starts to matter, and the WAL it needs is intact and ends exactly at the
//!   cutoff C. The WAL is replayed into RocksDB once, by the application's first open.
//! - `quick`: the same, with RocksDB's key estimates instead of reading every table block.
//! - `full`: the WAL check, then the whole result opened read-only ([`open_whole`]): RocksDB
//!   replays the WAL in memory and must report `latest_sequence_number() == C`; every key of
//!   every column family is counted, reading and checksumming every block. It proves that
//!   RocksDB's own recovery (with default options) reaches C, at the cost of a second replay.
//!
//! The restore tool does not have the application's options: it opens with RocksDB's
//! defaults, read-only (nothing on disk changes, and RocksDB's info log goes to a scratch
//! directory).
//!
//! What defaults cannot do, and what is done instead:
//!
//! - **Merge operators**: replaying a WAL record with a Merge into a memtable needs *a*
//!   merge operator (without one, RocksDB's point-in-time recovery silently stops at the
//!   first Merge: measured, the database opened at sequence 10 of 20, no error), and reading
//!   a merged key calls it. Every column family is opened with a stand-in merge operator
//!   (named as the application's when OPTIONS names one) that keeps the newest operand.
//!   Recovery only stores operands, so the sequence check is exact, and every key still
//!   exists exactly once, so key counts are exact; values of merged keys are not checked (and
//!   never leave this process).
//! - **Comparators and table formats** other than RocksDB's bytewise comparator and
//!   block-based tables cannot be stood in for: verification is then *skipped*, with the
//!   reason, never reported as passed. Open the database with the application's options and
//!   compare its latest sequence number with the cutoff.
//! - If opening fails with a message about a merge operator or comparator that the OPTIONS
//!   file did not announce, verification is skipped with RocksDB's message.
//! - A read-only open of the whole result (`full`) holds the replayed WAL in memory. When
//!   that would not fit in the memory available ([`memory_refusal`]), that open is skipped
//!   with the reason rather than risking the restore being killed after all its work.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use rocksdb::{ColumnFamilyDescriptor, DB, MergeOperands, Options, ReadOptions};
use serde::{Deserialize, Serialize};

use tidemark_manifest::rocks::options_file::{OptionsFile, newest_options_file};

use crate::progress::{Progress, Unit};
use crate::{Cancel, RestoreError};

pub mod base;
pub mod wal;

/// How much verification a restore does (README.md, "What each verify level proves").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Open the base alone read-only (its sequence number, every key of its table files read
    /// with block checksums on), and read every re-created WAL file back (crc32c, batches,
    /// record chain, ends at the cutoff). The WAL is replayed once, by the first open.
    Standard,
    /// As `standard`, with RocksDB's key estimates instead of reading the table files.
    Quick,
    /// As `standard`'s WAL check, then open the whole result read-only (RocksDB replays the
    /// WAL in memory), check its last sequence number and count every key.
    Full,
    /// Check nothing (not recommended).
    Off,
}

impl VerifyMode {
    /// The level's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Standard => "standard",
            VerifyMode::Quick => "quick",
            VerifyMode::Full => "full",
            VerifyMode::Off => "off",
        }
    }

    /// The base is opened alone, before the WAL files are placed beside it.
    pub fn checks_base(self) -> bool {
        matches!(self, VerifyMode::Standard | VerifyMode::Quick)
    }

    /// Every block of the base's tables is read back (`standard` reads each key, `full`
    /// counts them): the restore writes them through the page cache for that read.
    pub fn reads_tables(self) -> bool {
        matches!(self, VerifyMode::Standard | VerifyMode::Full)
    }

    /// The re-created WAL files are read back.
    pub fn checks_wal(self) -> bool {
        self != VerifyMode::Off
    }
}

/// Whether the restored database was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    Passed,
    Skipped,
}

/// Keys in one column family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CfKeys {
    pub name: String,
    pub keys: u64,
    /// `--verify quick`: RocksDB's estimate, not a count.
    pub estimated: bool,
    /// The merge operator the application uses here, stood in for while counting.
    pub merge_operator: Option<String>,
}

/// The whole restored database opened read-only (`--verify full`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenCheck {
    pub status: VerificationStatus,
    pub reason: Option<String>,
    /// RocksDB's latest sequence number once it replayed the WAL.
    pub latest_sequence: Option<u64>,
    pub duration_ms: u64,
}

/// Which checks ran, each with what it found. A step that is `None` did not run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifySteps {
    /// The base's files opened alone, before any WAL file is beside them (standard, quick).
    pub base: Option<base::BaseCheck>,
    /// The re-created WAL files read back with the format's own reader (all but off).
    pub wal: Option<wal::WalCheckReport>,
    /// The whole result opened read-only, RocksDB replaying the WAL in memory (full).
    pub open: Option<OpenCheck>,
}

/// The verification of a restored database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub level: VerifyMode,
    /// `passed` only when every check of the level ran and passed.
    pub status: VerificationStatus,
    /// Why (part of) the verification was skipped.
    pub reason: Option<String>,
    pub expected_sequence: u64,
    /// The sequence number the checks that ran prove the database ends at when it is
    /// opened (RocksDB's own latest sequence number with `full`; with `standard` and
    /// `quick`, the end of the WAL on a base that ends no later). Set only when passed.
    pub ends_at_sequence: Option<u64>,
    /// RocksDB's latest sequence number after opening the whole result (`full` only).
    pub latest_sequence: Option<u64>,
    /// Keys of the whole result (`full` only; the base's own are in `steps.base`).
    pub column_families: Vec<CfKeys>,
    pub steps: VerifySteps,
    pub duration_ms: u64,
}

impl Verification {
    /// Nothing was checked: `--verify off`.
    pub fn off(expected: u64) -> Verification {
        tracing::warn!("verification skipped: it was turned off (--verify off)");
        Verification {
            level: VerifyMode::Off,
            status: VerificationStatus::Skipped,
            reason: Some("verification was turned off (--verify off)".to_owned()),
            expected_sequence: expected,
            ends_at_sequence: None,
            latest_sequence: None,
            column_families: Vec::new(),
            steps: VerifySteps::default(),
            duration_ms: 0,
        }
    }

    /// The verification of `level` from the steps that ran. It passes only if each step the
    /// level asks for passed; a base that ends without any WAL record must end exactly at
    /// `expected`, as the WAL's end proves nothing then.
    pub fn from_steps(
        level: VerifyMode,
        expected: u64,
        steps: VerifySteps,
        column_families: Vec<CfKeys>,
        duration_ms: u64,
    ) -> Result<Verification, RestoreError> {
        let mut reasons = Vec::new();
        let mut ends_at = None;
        if let Some(w) = &steps.wal {
            ends_at = Some(w.last_seq);
        }
        if level.checks_base() {
            match steps.base.as_ref() {
                Some(b) if b.status == VerificationStatus::Passed => {
                    let empty_wal = steps.wal.as_ref().is_some_and(|w| w.records == 0);
                    if empty_wal && b.sequence != Some(expected) {
                        return Err(RestoreError::Verification(format!(
                            "no WAL record is replayed and the base's files end at sequence \
                             {}, the restore planned {expected}",
                            b.sequence.unwrap_or_default()
                        )));
                    }
                }
                Some(b) => reasons.push(format!(
                    "the base was not opened: {}",
                    b.reason.as_deref().unwrap_or("no reason given")
                )),
                None => reasons.push("the base was not opened".to_owned()),
            }
        }
        if level == VerifyMode::Full {
            match steps.open.as_ref() {
                Some(o) if o.status == VerificationStatus::Passed => ends_at = o.latest_sequence,
                Some(o) => reasons.push(o.reason.clone().unwrap_or_default()),
                None => reasons.push("the database was not opened".to_owned()),
            }
        }
        let passed = reasons.is_empty() && ends_at == Some(expected);
        if !passed && reasons.is_empty() {
            reasons.push("the re-created WAL files were not read back".to_owned());
        }
        Ok(Verification {
            level,
            status: if passed {
                VerificationStatus::Passed
            } else {
                VerificationStatus::Skipped
            },
            reason: (!passed).then(|| reasons.join("; ")),
            expected_sequence: expected,
            ends_at_sequence: ends_at.filter(|_| passed),
            latest_sequence: steps.open.as_ref().and_then(|o| o.latest_sequence),
            column_families,
            steps,
            duration_ms,
        })
    }
}

impl Verification {
    /// The verification as text for people: the outcome, then one line per step that ran.
    pub fn render(&self, w: &mut String) {
        use std::fmt::Write as _;
        let level = self.level.name();
        let _ = match (self.status, self.ends_at_sequence) {
            (VerificationStatus::Passed, Some(seq)) => writeln!(
                w,
                "  verification  passed ({level}): the database ends at sequence {seq}"
            ),
            _ => writeln!(
                w,
                "  verification  SKIPPED ({level}): {}",
                self.reason.as_deref().unwrap_or("")
            ),
        };
        for line in self.step_lines() {
            let _ = writeln!(w, "                {line}");
        }
    }

    fn step_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let s = &self.steps;
        if let Some(b) = &s.base {
            lines.push(match (b.status, b.sequence) {
                (VerificationStatus::Passed, Some(seq)) => format!(
                    "base: opened alone, read-only: sequence {seq} (at most {}), WAL from log \
                     number {} on; keys in its tables: {}",
                    b.earliest_seq,
                    b.recovery_min_log_number.unwrap_or_default(),
                    render_counts(&b.column_families)
                ),
                _ => format!(
                    "base: not opened: {}",
                    b.reason.as_deref().unwrap_or("no reason given")
                ),
            });
        }
        if let Some(wal) = &s.wal {
            lines.push(format!(
                "WAL: {} files, {} records ({}) read back: checksums, batches, record chain{}, \
                 ends at sequence {}",
                wal.files,
                wal.records,
                crate::human_bytes(wal.bytes),
                wal.first_seq
                    .map(|f| format!(" from sequence {f}"))
                    .unwrap_or_default(),
                wal.last_seq
            ));
        }
        if let Some(o) = &s.open {
            lines.push(match (o.status, o.latest_sequence) {
                (VerificationStatus::Passed, Some(seq)) => format!(
                    "open: RocksDB replayed the WAL read-only: latest sequence {seq}; keys: {}",
                    render_counts(&self.column_families)
                ),
                _ => format!(
                    "open: skipped: {}",
                    o.reason.as_deref().unwrap_or("no reason given")
                ),
            });
        }
        lines
    }
}

fn render_counts(counts: &[CfKeys]) -> String {
    let counts: Vec<String> = counts
        .iter()
        .map(|c| {
            format!(
                "{} {}{}{}",
                c.name,
                if c.estimated { "~" } else { "" },
                c.keys,
                c.merge_operator
                    .as_ref()
                    .map(|m| format!(" (merge operator {m} stood in)"))
                    .unwrap_or_default()
            )
        })
        .collect();
    counts.join(", ")
}

/// Things in a base's OPTIONS file that the person opening the restored database must know.
pub fn options_warnings(options: &OptionsFile) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(dir) = options.wal_dir() {
        out.push(format!(
            "the application keeps its WAL in a separate directory (wal_dir = {dir}): move the \
             restored *.log files there before opening the database, or RocksDB will not \
             replay them and the database will be missing every write after the base backup"
        ));
    }
    for name in ["track_and_verify_wals_in_manifest", "track_and_verify_wals"] {
        if options.db_option(name) == Some("true") {
            out.push(format!(
                "the application sets {name}=true: RocksDB may refuse the re-created WAL files \
                 because their sizes differ from those recorded in the MANIFEST; open the \
                 restored database once with {name}=false"
            ));
        }
    }
    out
}

/// The path options of a restored OPTIONS file that point outside the restored database
/// at `target` (every non-empty one whose value is not inside `target`): an application
/// that opens the restored database with that file's options would use those directories,
/// which may hold another database's files (docs/operations.md).
pub fn path_option_warnings(options: &OptionsFile, target: &Path) -> Vec<String> {
    let target = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    let file = options.path.file_name().map_or_else(
        || options.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    options
        .path_options()
        .into_iter()
        .filter(|o| !Path::new(&o.value).starts_with(&target))
        .map(|o| {
            format!(
                "{file} sets {name} = {value} ([{section}]), outside the restored database: an \
                 application that opens it with these options uses that directory, which may \
                 hold another database's files; point {name} into the restored database (or \
                 leave it empty) before opening it",
                name = o.name,
                value = o.value,
                section = o.section,
            )
        })
        .collect()
}

/// The newest OPTIONS file in `dir`, if one is there and readable.
pub fn read_options(dir: &Path) -> Option<OptionsFile> {
    let path = newest_options_file(dir).ok().flatten()?;
    match OptionsFile::read(&path) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", path.display());
            None
        }
    }
}

const BYTEWISE: &str = "leveldb.BytewiseComparator";

fn stand_in_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    Some(
        operands
            .iter()
            .last()
            .or(existing)
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
    )
}

type Snapshot = BTreeMap<String, (u64, Option<SystemTime>)>;

fn snapshot(dir: &Path) -> Result<Snapshot, RestoreError> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(|e| RestoreError::io("cannot list", dir, e))? {
        let entry = entry.map_err(|e| RestoreError::io("cannot list", dir, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| RestoreError::io("cannot inspect", entry.path(), e))?;
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (meta.len(), meta.modified().ok()),
        );
    }
    Ok(out)
}

fn mentions_missing_options(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("merge_operator") || m.contains("merge operator") || m.contains("comparator")
}

/// Opens the whole database in `dir` read-only, RocksDB replaying its WAL in memory, and
/// checks that its latest sequence number is `expected` (`--verify full`). `cf_names` are
/// the column families the base says it has. RocksDB's info log goes to `log_dir`. Fails
/// with [`RestoreError::Verification`] on any mismatch.
///
/// The steps: the WAL fits in memory → the column families are the base's → each can be
/// opened with defaults and a stand-in merge operator → the read-only open ends at
/// `expected` → every key reads back → no file changed. A step that cannot be done without
/// the application's options skips the open, with the reason; it never passes.
pub fn open_whole(
    dir: &Path,
    expected: u64,
    cf_names: &[String],
    log_dir: &Path,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<(OpenCheck, Vec<CfKeys>), RestoreError> {
    let started = Instant::now();
    let skipped = |Skip(reason)| {
        tracing::warn!("the restored database was not opened: {reason}");
        let check = OpenCheck {
            status: VerificationStatus::Skipped,
            reason: Some(reason),
            latest_sequence: None,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        Ok((check, Vec::new()))
    };
    if let Some(reason) = memory_refusal(wal_bytes(dir)?, available_memory(), expected) {
        return skipped(Skip(reason));
    }
    let options = read_options(dir);
    let listed = check_column_families(dir, cf_names, log_dir)?;
    let hint = format!("check that its latest sequence number is {expected}");
    let setup = match CfSetup::new(&listed, options.as_ref(), &hint) {
        Ok(setup) => setup,
        Err(skip) => return skipped(skip),
    };
    let merge_operators = setup.merge_operators.clone();

    let before = snapshot(dir)?;
    let db = match open_read_only(dir, log_dir, setup, &hint)? {
        Ok(db) => db,
        Err(skip) => return skipped(skip),
    };
    let latest = db.latest_sequence_number();
    if latest != expected {
        return Err(RestoreError::Verification(format!(
            "the restored database ends at sequence {latest}, the restore planned {expected}"
        )));
    }
    tracing::info!("verified: the restored database ends at sequence {latest}");
    let column_families = count_keys(&db, &listed, &merge_operators, true, progress, cancel)?;
    drop(db);
    let after = snapshot(dir)?;
    if before != after {
        return Err(RestoreError::Verification(
            "opening the database read-only changed files in it; it cannot be trusted".to_owned(),
        ));
    }
    let check = OpenCheck {
        status: VerificationStatus::Passed,
        reason: None,
        latest_sequence: Some(latest),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    Ok((check, column_families))
}

/// Verification cannot be done without the application's options: the reason, for the
/// report (a skipped verification, never a passed one).
struct Skip(String);

/// The bytes of the WAL files (`*.log`) in `dir`: what a read-only open holds in memory.
fn wal_bytes(dir: &Path) -> Result<u64, RestoreError> {
    Ok(fs::read_dir(dir)
        .map_err(|e| RestoreError::io("cannot list", dir, e))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum())
}

/// The column families the restored MANIFEST lists, in its order, after checking that they
/// are the ones the base descriptor names.
fn check_column_families(
    dir: &Path,
    cf_names: &[String],
    log_dir: &Path,
) -> Result<Vec<String>, RestoreError> {
    let mut probe = Options::default();
    probe.set_db_log_dir(log_dir);
    let listed = DB::list_cf(&probe, dir).map_err(|e| {
        RestoreError::Verification(format!("RocksDB cannot read the column families: {e}"))
    })?;
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    let mut expected_cfs = cf_names.to_vec();
    expected_cfs.sort();
    if listed_sorted != expected_cfs {
        return Err(RestoreError::Verification(format!(
            "the restored MANIFEST has column families {listed_sorted:?}, the base descriptor \
             says {expected_cfs:?}"
        )));
    }
    Ok(listed)
}

/// How each column family is opened: RocksDB's defaults with the stand-in merge operator.
struct CfSetup {
    descriptors: Vec<ColumnFamilyDescriptor>,
    /// The application's merge operator of each column family the OPTIONS file names one for.
    merge_operators: BTreeMap<String, String>,
}

impl CfSetup {
    /// Every column family gets the stand-in, named as the application's operator when the
    /// OPTIONS file names one. A column family whose comparator or table format defaults
    /// cannot stand in for makes verification impossible ([`Skip`]).
    fn new(listed: &[String], options: Option<&OptionsFile>, hint: &str) -> Result<CfSetup, Skip> {
        let mut descriptors = Vec::new();
        let mut merge_operators: BTreeMap<String, String> = BTreeMap::new();
        for name in listed {
            let mut cf_opts = Options::default();
            if let Some(o) = options {
                if let Some(cmp) = o.comparator(name).filter(|c| *c != BYTEWISE) {
                    return Err(Skip(format!(
                        "column family {name:?} uses the comparator {cmp:?}: verification \
                         requires the application's options; open the database with them and \
                         {hint}"
                    )));
                }
                if let Some(factory) = o
                    .cf_option(name, "table_factory")
                    .filter(|f| !f.is_empty() && *f != "BlockBasedTable")
                {
                    return Err(Skip(format!(
                        "column family {name:?} uses the table format {factory:?}: verification \
                         requires the application's options; open the database with them and \
                         {hint}"
                    )));
                }
                if let Some(op) = o.merge_operator(name) {
                    merge_operators.insert(name.clone(), op.to_owned());
                }
            }
            // Without any merge operator, RocksDB's recovery stops at the first Merge in the
            // WAL without an error (point-in-time recovery), which would show as a wrong
            // sequence number here. A column family without merges never calls it.
            let stand_in = merge_operators
                .get(name)
                .map_or("tidemark.verify-stand-in", String::as_str);
            cf_opts.set_merge_operator_associative(stand_in, stand_in_merge);
            descriptors.push(ColumnFamilyDescriptor::new(name, cf_opts));
        }
        Ok(CfSetup {
            descriptors,
            merge_operators,
        })
    }
}

/// Opens the database read-only (nothing on disk changes). RocksDB asking for a merge
/// operator or comparator the OPTIONS file did not announce skips the verification; any
/// other failure fails it.
fn open_read_only(
    dir: &Path,
    log_dir: &Path,
    setup: CfSetup,
    hint: &str,
) -> Result<Result<DB, Skip>, RestoreError> {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(false);
    db_opts.create_missing_column_families(false);
    db_opts.set_db_log_dir(log_dir);
    db_opts.set_skip_stats_update_on_db_open(true);
    match DB::open_cf_descriptors_read_only(&db_opts, dir, setup.descriptors, false) {
        Ok(db) => Ok(Ok(db)),
        Err(e) if mentions_missing_options(e.as_ref()) => Ok(Err(Skip(format!(
            "RocksDB cannot open the database without the application's options ({e}): \
             verification requires them; open the database with them and {hint}"
        )))),
        Err(e) => Err(RestoreError::Verification(format!(
            "RocksDB cannot open the restored database: {e}"
        ))),
    }
}

/// The keys of each column family: counted by reading every key with block checksums on
/// (`--verify full`: every block of every table file is read and checked), or RocksDB's
/// estimate (`--verify quick`).
fn count_keys(
    db: &DB,
    listed: &[String],
    merge_operators: &BTreeMap<String, String>,
    exact: bool,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<Vec<CfKeys>, RestoreError> {
    let fail = |detail: String| RestoreError::Verification(detail);
    let mut column_families = Vec::new();
    let unit = if exact { Unit::Keys } else { Unit::Objects };
    let bar = progress.phase("count keys", 0, unit);
    for name in listed {
        let cf = db
            .cf_handle(name)
            .ok_or_else(|| fail(format!("column family {name:?} did not open")))?;
        let (keys, estimated) = if exact {
            (count_cf(db, &cf, name, &bar, cancel)?, false)
        } else {
            let n = db
                .property_int_value_cf(&cf, "rocksdb.estimate-num-keys")
                .map_err(|e| fail(format!("column family {name:?}: {e}")))?
                .unwrap_or(0);
            (n, true)
        };
        column_families.push(CfKeys {
            name: name.clone(),
            keys,
            estimated,
            merge_operator: merge_operators.get(name).cloned(),
        });
    }
    bar.finish("");
    Ok(column_families)
}

/// Reads every key of column family `name` with block checksums on.
fn count_cf(
    db: &DB,
    cf: &impl rocksdb::AsColumnFamilyRef,
    name: &str,
    bar: &crate::progress::PhaseBar,
    cancel: &Cancel,
) -> Result<u64, RestoreError> {
    let mut ro = ReadOptions::default();
    ro.fill_cache(false);
    ro.set_verify_checksums(true);
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek_to_first();
    let mut n = 0u64;
    while it.valid() {
        n += 1;
        if n.is_multiple_of(65_536) {
            cancel.check()?;
            bar.inc(65_536);
        }
        it.next();
    }
    it.status().map_err(|e| {
        RestoreError::Verification(format!(
            "reading column family {name:?} failed after {n} keys: {e}"
        ))
    })?;
    bar.inc(n % 65_536);
    Ok(n)
}

/// A read-only open keeps every replayed WAL record in memtables: about this many bytes of
/// memory per byte of WAL.
pub const MEMORY_PER_WAL_BYTE: u64 = 2;

/// The memory the system can give without swapping (`MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Why a read-only open of a database whose WAL files hold `wal_bytes` would not fit in
/// `available` bytes of memory, or `None` if it fits. Verification is then skipped rather
/// than risking the restore being killed for lack of memory after all the work is done.
pub fn memory_refusal(wal_bytes: u64, available: Option<u64>, expected: u64) -> Option<String> {
    let available = available?;
    let needed = wal_bytes.saturating_mul(MEMORY_PER_WAL_BYTE);
    (needed > available).then(|| {
        format!(
            "opening the database read-only would hold its {} of WAL in memory (about {}), \
             and only {} is available; RocksDB replays the WAL when the application opens the \
             database: check then that its latest sequence number is {expected}",
            crate::human_bytes(wal_bytes),
            crate::human_bytes(needed),
            crate::human_bytes(available)
        )
    })
}

/// A scratch directory for RocksDB's info log during verification.
pub fn log_dir_in(scratch: &Path) -> Result<PathBuf, RestoreError> {
    let dir = scratch.join("rocksdb-log");
    fs::create_dir_all(&dir).map_err(|e| RestoreError::io("cannot create", &dir, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn write_db(dir: &Path, merge: bool) -> u64 {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut counters = Options::default();
        if merge {
            counters.set_merge_operator_associative("test.concat", |_, existing, ops| {
                let mut v = existing.map(<[u8]>::to_vec).unwrap_or_default();
                for op in ops {
                    v.extend_from_slice(op);
                }
                Some(v)
            });
        }
        let db = DB::open_cf_descriptors(
            &opts,
            dir,
            vec![
                ColumnFamilyDescriptor::new("default", Options::default()),
                ColumnFamilyDescriptor::new("counters", counters),
            ],
        )
        .unwrap();
        let cf = db.cf_handle("counters").unwrap();
        for i in 0..100u32 {
            db.put(format!("k{i}"), b"v").unwrap();
            if merge {
                db.merge_cf(&cf, format!("c{}", i % 7), b"+").unwrap();
            } else {
                db.put_cf(&cf, format!("c{}", i % 7), b"+").unwrap();
            }
        }
        db.flush().unwrap();
        for i in 0..10u32 {
            db.delete(format!("k{i}")).unwrap();
            if merge {
                db.merge_cf(&cf, format!("c{}", 10 + i), b"+").unwrap();
            }
        }
        // Unflushed writes stay in the WAL, as in a restored directory.
        let seq = db.latest_sequence_number();
        drop(db);
        seq
    }

    pub(super) fn names() -> Vec<String> {
        vec!["default".into(), "counters".into()]
    }

    fn open(db: &Path, seq: u64, cfs: &[String], logs: &Path) -> (OpenCheck, Vec<CfKeys>) {
        open_whole(db, seq, cfs, logs, &Progress::hidden(), &Cancel::new()).unwrap()
    }

    #[test]
    fn a_database_with_merges_in_its_wal_verifies_exactly() {
        let root = tempfile::tempdir().unwrap();
        let db = root.path().join("db");
        let seq = write_db(&db, true);
        let logs = root.path().join("logs");
        fs::create_dir(&logs).unwrap();
        let before = snapshot(&db).unwrap();
        let (o, cfs) = open(&db, seq, &names(), &logs);
        assert_eq!(o.status, VerificationStatus::Passed, "{o:?}");
        assert_eq!(o.latest_sequence, Some(seq));
        let counts: BTreeMap<&str, u64> = cfs.iter().map(|c| (c.name.as_str(), c.keys)).collect();
        assert_eq!(counts["default"], 90);
        assert_eq!(counts["counters"], 17);
        let counters = cfs.iter().find(|c| c.name == "counters").unwrap();
        assert_eq!(counters.merge_operator.as_deref(), Some("test.concat"));
        assert_eq!(
            snapshot(&db).unwrap(),
            before,
            "verification changed nothing"
        );

        // A wrong expectation fails, naming both numbers.
        let e = open_whole(
            &db,
            seq - 1,
            &names(),
            &logs,
            &Progress::hidden(),
            &Cancel::new(),
        )
        .unwrap_err();
        assert!(matches!(e, RestoreError::Verification(_)), "{e}");
        assert!(
            e.to_string().contains(&format!("ends at sequence {seq}")),
            "{e}"
        );

        // Without an OPTIONS file the merge operator is unknown: the stand-in still lets the
        // WAL replay to the end.
        remove_options(&db);
        let (o, cfs) = open(&db, seq, &names(), &logs);
        assert_eq!(o.latest_sequence, Some(seq));
        assert!(cfs.iter().all(|c| c.merge_operator.is_none()));

        // Column families that do not match the base fail.
        let e = open_whole(
            &db,
            seq,
            &["default".to_owned()],
            &logs,
            &Progress::hidden(),
            &Cancel::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("column families"), "{e}");
    }

    pub(super) fn remove_options(db: &Path) {
        for entry in fs::read_dir(db).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("OPTIONS-")
            {
                fs::remove_file(path).unwrap();
            }
        }
    }

    /// Pretends the application used its own comparator.
    pub(super) fn use_custom_comparator(db: &Path) {
        let options = newest_options_file(db).unwrap().unwrap();
        let text = fs::read_to_string(&options).unwrap();
        let changed = text.replace(
            "comparator=leveldb.BytewiseComparator",
            "comparator=app.ReverseComparator",
        );
        assert_ne!(text, changed);
        fs::write(&options, changed).unwrap();
    }

    #[test]
    fn a_custom_comparator_skips_verification_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let db = root.path().join("db");
        let seq = write_db(&db, false);
        use_custom_comparator(&db);
        let logs = root.path().join("logs");
        fs::create_dir(&logs).unwrap();
        let (o, _) = open(&db, seq, &names(), &logs);
        assert_eq!(o.status, VerificationStatus::Skipped);
        let reason = o.reason.clone().unwrap();
        assert!(
            reason.contains("app.ReverseComparator")
                && reason.contains("requires the application's options"),
            "{reason}"
        );
        let steps = VerifySteps {
            open: Some(o),
            ..VerifySteps::default()
        };
        let v = Verification::from_steps(VerifyMode::Full, seq, steps, vec![], 0).unwrap();
        assert_eq!(v.status, VerificationStatus::Skipped);
        assert_eq!(v.ends_at_sequence, None);
        assert!(v.reason.unwrap().contains("app.ReverseComparator"));
        assert_eq!(Verification::off(seq).status, VerificationStatus::Skipped);
    }

    fn wal_report(records: u64, last_seq: u64) -> wal::WalCheckReport {
        wal::WalCheckReport {
            files: 1,
            records,
            bytes: 1,
            first_seq: (records > 0).then_some(1),
            last_seq,
            checked: vec![],
            duration_ms: 0,
        }
    }

    fn base_check(sequence: u64) -> base::BaseCheck {
        base::BaseCheck {
            status: VerificationStatus::Passed,
            reason: None,
            sequence: Some(sequence),
            earliest_seq: sequence,
            recovery_min_log_number: Some(4),
            column_families: vec![],
            duration_ms: 0,
        }
    }

    #[test]
    fn standard_passes_only_when_every_step_it_asks_for_passed() {
        let steps = |base: Option<base::BaseCheck>, wal| VerifySteps {
            base,
            wal,
            open: None,
        };
        let std = VerifyMode::Standard;
        let v = Verification::from_steps(
            std,
            20,
            steps(Some(base_check(9)), Some(wal_report(3, 20))),
            vec![],
            0,
        )
        .unwrap();
        assert_eq!(v.status, VerificationStatus::Passed);
        assert_eq!((v.ends_at_sequence, v.latest_sequence), (Some(20), None));
        let mut text = String::new();
        v.render(&mut text);
        assert!(text.contains("passed (standard)"), "{text}");
        assert!(text.contains("base: opened alone") && text.contains("WAL: 1 files"));

        // No WAL record: the base alone must end exactly at the cutoff.
        let e = Verification::from_steps(
            std,
            9,
            steps(Some(base_check(8)), Some(wal_report(0, 9))),
            vec![],
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("end at sequence 8"), "{e}");
        let v = Verification::from_steps(
            std,
            9,
            steps(Some(base_check(9)), Some(wal_report(0, 9))),
            vec![],
            0,
        )
        .unwrap();
        assert_eq!(v.status, VerificationStatus::Passed);

        // A base that could not be opened is never a pass, whatever the WAL says.
        let mut skipped = base_check(9);
        skipped.status = VerificationStatus::Skipped;
        skipped.reason = Some("custom comparator".into());
        let v = Verification::from_steps(
            std,
            20,
            steps(Some(skipped), Some(wal_report(3, 20))),
            vec![],
            0,
        )
        .unwrap();
        assert_eq!(v.status, VerificationStatus::Skipped);
        assert!(v.reason.unwrap().contains("custom comparator"));
        // Nor is a WAL that was not read back.
        let v =
            Verification::from_steps(std, 20, steps(Some(base_check(9)), None), vec![], 0).unwrap();
        assert_eq!(v.status, VerificationStatus::Skipped);
    }

    #[test]
    fn a_wal_too_large_for_memory_skips_verification_with_the_reason() {
        assert_eq!(memory_refusal(1 << 30, Some(4 << 30), 7), None);
        assert_eq!(memory_refusal(1 << 30, None, 7), None);
        let reason = memory_refusal(3 << 30, Some(4 << 30), 7).unwrap();
        assert!(
            reason.contains("3.0 GiB of WAL") && reason.contains("sequence number is 7"),
            "{reason}"
        );
        assert!(available_memory().is_some_and(|m| m > 0));
    }

    #[test]
    fn warnings_about_options_that_change_how_the_wal_is_found() {
        let o = OptionsFile::parse(
            "[DBOptions]\n  wal_dir=/fast/wal\n  track_and_verify_wals_in_manifest=true\n",
            "OPTIONS-000007",
        )
        .unwrap();
        let w = options_warnings(&o);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("/fast/wal"));
        let plain = OptionsFile::parse("[DBOptions]\n  wal_dir=\n", "OPTIONS-1").unwrap();
        assert!(options_warnings(&plain).is_empty());
    }

    #[test]
    fn path_options_outside_the_database_are_named_with_their_value() {
        let o = OptionsFile::parse(
            "[DBOptions]\n  wal_dir=/srv/prod/wal\n  db_log_dir=/restored/db/logs\n  \
             db_paths=\n[CFOptions \"default\"]\n  cf_paths=/elsewhere\n",
            "/tmp/x/OPTIONS-000009",
        )
        .unwrap();
        let w = path_option_warnings(&o, Path::new("/restored/db"));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("OPTIONS-000009 sets wal_dir = /srv/prod/wal ([DBOptions])"),
            "{w:?}"
        );
        assert!(
            w[1].contains("cf_paths = /elsewhere ([CFOptions \"default\"])"),
            "{w:?}"
        );
        let plain = OptionsFile::parse("[DBOptions]\n  wal_dir=\n", "OPTIONS-1").unwrap();
        assert!(path_option_warnings(&plain, Path::new("/r")).is_empty());
    }
}
