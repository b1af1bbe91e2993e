//! The base, opened alone: RocksDB reads its MANIFEST and table files read-only before any
//! WAL file is placed beside them (the re-created WAL files wait in a directory of their
//! own), so the open replays nothing and costs no memory per byte of WAL.
//!
//! What it proves: the MANIFEST and `CURRENT` open, the column families are the base
//! descriptor's, every key of every table file reads back with block checksums on
//! (`--verify standard`; `quick` takes RocksDB's estimates and reads no block), RocksDB's
//! latest sequence number of the base alone is at most the descriptor's `earliest_seq`
//! (which the archiver takes as the larger of the WAL's end and the MANIFEST's last sequence
//! once the MANIFEST was copied), and the oldest WAL RocksDB's recovery of these files reads
//! (from the placed MANIFEST and OPTIONS) is not older than the descriptor's
//! `min_log_number`, where the replay starts. The same stand-ins and skip reasons apply as
//! for the whole database ([`super`]).

use std::fs;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use tidemark_manifest::rocks::version_edit::ManifestState;

use super::{
    CfKeys, CfSetup, Skip, VerificationStatus, check_column_families, count_keys, open_read_only,
    read_options, snapshot,
};
use crate::progress::Progress;
use crate::{Cancel, RestoreError};

/// What the base's descriptor says about it.
#[derive(Debug, Clone)]
pub struct BaseExpect {
    pub earliest_seq: u64,
    pub min_log_number: u64,
    pub column_families: Vec<String>,
}

/// The base opened alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseCheck {
    pub status: VerificationStatus,
    /// Why the base could not be opened without the application's options.
    pub reason: Option<String>,
    /// RocksDB's latest sequence number with the base's files alone.
    pub sequence: Option<u64>,
    /// The descriptor's bound on it.
    pub earliest_seq: u64,
    /// The oldest WAL RocksDB's recovery of the placed files reads.
    pub recovery_min_log_number: Option<u64>,
    /// Keys in the base's table files (counted, or estimated with `--verify quick`).
    pub column_families: Vec<CfKeys>,
    pub duration_ms: u64,
}

impl BaseCheck {
    fn skipped(mut self, Skip(reason): Skip, started: Instant) -> BaseCheck {
        tracing::warn!("the base was not verified: {reason}");
        self.reason = Some(reason);
        self.duration_ms = started.elapsed().as_millis() as u64;
        self
    }
}

fn failed(detail: String) -> RestoreError {
    RestoreError::Verification(format!("the base: {detail}"))
}

/// Opens the base files in `dir` (which must hold no WAL file) read-only and checks them
/// against `expect`. `exact`: count every key; otherwise estimate.
pub fn check_base(
    dir: &Path,
    expect: &BaseExpect,
    exact: bool,
    log_dir: &Path,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<BaseCheck, RestoreError> {
    let started = Instant::now();
    let mut check = BaseCheck {
        status: VerificationStatus::Skipped,
        reason: None,
        sequence: None,
        earliest_seq: expect.earliest_seq,
        recovery_min_log_number: None,
        column_families: Vec::new(),
        duration_ms: 0,
    };
    refuse_wal_files(dir)?;
    let options = read_options(dir);
    check.recovery_min_log_number = Some(check_min_log(dir, options.as_ref(), expect)?);
    let listed = check_column_families(dir, &expect.column_families, log_dir)?;
    let hint = "check that its latest sequence number is the restore's cutoff";
    let before = snapshot(dir)?;
    let setup = match CfSetup::new(&listed, options.as_ref(), hint) {
        Ok(setup) => setup,
        Err(skip) => return Ok(check.skipped(skip, started)),
    };
    let merge_operators = setup.merge_operators.clone();
    let db = match open_read_only(dir, log_dir, setup, hint)? {
        Ok(db) => db,
        Err(skip) => return Ok(check.skipped(skip, started)),
    };
    let seq = db.latest_sequence_number();
    if seq > expect.earliest_seq {
        return Err(failed(format!(
            "its files alone end at sequence {seq}, past the descriptor's earliest_seq {}",
            expect.earliest_seq
        )));
    }
    check.column_families = count_keys(&db, &listed, &merge_operators, exact, progress, cancel)?;
    drop(db);
    if snapshot(dir)? != before {
        return Err(failed(
            "opening it read-only changed files in it; it cannot be trusted".to_owned(),
        ));
    }
    tracing::info!("verified the base: its files end at sequence {seq}");
    check.sequence = Some(seq);
    check.status = VerificationStatus::Passed;
    check.duration_ms = started.elapsed().as_millis() as u64;
    Ok(check)
}

/// The base is opened alone: a WAL file beside it would be replayed.
fn refuse_wal_files(dir: &Path) -> Result<(), RestoreError> {
    for entry in fs::read_dir(dir).map_err(|e| RestoreError::io("cannot list", dir, e))? {
        let name = entry
            .map_err(|e| RestoreError::io("cannot list", dir, e))?
            .file_name();
        if name.to_string_lossy().ends_with(".log") {
            return Err(failed(format!(
                "{} holds the WAL file {}; the base must be opened without one",
                dir.display(),
                name.to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// The oldest WAL RocksDB's recovery of the placed MANIFEST reads must not be older than the
/// descriptor's `min_log_number`: the replay leaves out every record of an older WAL, which
/// that recovery would then miss.
fn check_min_log(
    dir: &Path,
    options: Option<&tidemark_manifest::rocks::options_file::OptionsFile>,
    expect: &BaseExpect,
) -> Result<u64, RestoreError> {
    let state = ManifestState::from_db_dir(dir)
        .map_err(|e| failed(format!("cannot read its MANIFEST: {e}")))?;
    let allow_2pc = options.is_some_and(|o| o.db_option("allow_2pc") == Some("true"));
    let needed = state.min_wal_number_for_recovery(allow_2pc);
    if needed < expect.min_log_number {
        return Err(failed(format!(
            "its MANIFEST needs the WAL from log number {needed} on, the descriptor says {} \
             (the records of WAL files {needed}..{} would be missing)",
            expect.min_log_number, expect.min_log_number
        )));
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tests::{names, remove_options, use_custom_comparator, write_db};

    /// A base as a restore places it: a real database, flushed, without its WAL files.
    fn base_dir(root: &Path, merge: bool) -> std::path::PathBuf {
        let db = root.join("db");
        write_db(&db, merge);
        let mut opts = rocksdb::Options::default();
        opts.set_merge_operator_associative("test.concat", |_, _, ops| {
            Some(ops.iter().last().map(<[u8]>::to_vec).unwrap_or_default())
        });
        let cfs = names()
            .into_iter()
            .map(|n| rocksdb::ColumnFamilyDescriptor::new(n, opts.clone()));
        let handle = rocksdb::DB::open_cf_descriptors(&opts, &db, cfs).unwrap();
        for name in names() {
            handle.flush_cf(&handle.cf_handle(&name).unwrap()).unwrap();
        }
        drop(handle);
        for entry in fs::read_dir(&db).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                fs::remove_file(path).unwrap();
            }
        }
        db
    }

    fn expect(db: &Path) -> BaseExpect {
        let state = ManifestState::from_db_dir(db).unwrap();
        BaseExpect {
            earliest_seq: state.last_sequence,
            min_log_number: state.min_wal_number_for_recovery(false),
            column_families: names(),
        }
    }

    fn check(db: &Path, expect: &BaseExpect, exact: bool) -> Result<BaseCheck, RestoreError> {
        let logs = db.parent().unwrap().join("logs");
        fs::create_dir_all(&logs).unwrap();
        check_base(
            db,
            expect,
            exact,
            &logs,
            &Progress::hidden(),
            &Cancel::new(),
        )
    }

    #[test]
    fn a_base_with_merges_opens_alone_and_counts_every_key_of_its_tables() {
        let root = tempfile::tempdir().unwrap();
        let db = base_dir(root.path(), true);
        let e = expect(&db);
        let c = check(&db, &e, true).unwrap();
        assert_eq!(c.status, VerificationStatus::Passed, "{c:?}");
        assert_eq!(c.sequence, Some(e.earliest_seq));
        assert_eq!(c.recovery_min_log_number, Some(e.min_log_number));
        let counts: Vec<(&str, u64, bool)> = c
            .column_families
            .iter()
            .map(|k| (k.name.as_str(), k.keys, k.estimated))
            .collect();
        assert_eq!(counts, [("default", 90, false), ("counters", 17, false)]);
        let counters = &c.column_families[1];
        assert_eq!(counters.merge_operator.as_deref(), Some("test.concat"));
        // quick: estimates.
        let q = check(&db, &e, false).unwrap();
        assert!(q.column_families.iter().all(|k| k.estimated), "{q:?}");

        // The descriptor's earliest_seq bounds the base's own sequence.
        let low = BaseExpect {
            earliest_seq: e.earliest_seq - 1,
            ..e.clone()
        };
        let err = check(&db, &low, true).unwrap_err().to_string();
        assert!(err.contains("past the descriptor's earliest_seq"), "{err}");
        // The replay must not start after the oldest WAL the MANIFEST needs.
        let late = BaseExpect {
            min_log_number: e.min_log_number + 1,
            ..e.clone()
        };
        let err = check(&db, &late, true).unwrap_err().to_string();
        assert!(
            err.contains("its MANIFEST needs the WAL from log number"),
            "{err}"
        );
        // A WAL file beside the base is refused: it would be replayed.
        fs::write(db.join("000999.log"), b"").unwrap();
        let err = check(&db, &e, true).unwrap_err().to_string();
        assert!(err.contains("000999.log"), "{err}");
        fs::remove_file(db.join("000999.log")).unwrap();
        // Without OPTIONS, the stand-in merge operator is not named.
        remove_options(&db);
        let c = check(&db, &e, true).unwrap();
        assert!(c.column_families.iter().all(|k| k.merge_operator.is_none()));
    }

    #[test]
    fn a_corrupt_table_file_fails_the_base_naming_its_column_family() {
        let root = tempfile::tempdir().unwrap();
        let db = base_dir(root.path(), false);
        let e = expect(&db);
        let sst = fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .max_by_key(|p| fs::metadata(p).unwrap().len())
            .unwrap();
        let mut bytes = fs::read(&sst).unwrap();
        // The first data block starts at offset 0: flip a byte inside it.
        bytes[20] ^= 0x40;
        fs::write(&sst, &bytes).unwrap();
        let err = check(&db, &e, true).unwrap_err();
        assert!(matches!(err, RestoreError::Verification(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("reading column family") && text.to_lowercase().contains("corrupt"),
            "{text}"
        );
    }

    #[test]
    fn a_custom_comparator_skips_the_base_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let db = base_dir(root.path(), false);
        let e = expect(&db);
        use_custom_comparator(&db);
        let c = check(&db, &e, true).unwrap();
        assert_eq!(c.status, VerificationStatus::Skipped);
        assert_eq!(c.sequence, None);
        let reason = c.reason.unwrap();
        assert!(reason.contains("app.ReverseComparator"), "{reason}");
        assert!(reason.contains("the restore's cutoff"), "{reason}");
    }
}
