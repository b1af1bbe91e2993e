//! The re-created WAL files, read back with the format's own reader as each one is closed.
//!
//! What a [`WalCheck`] proves about the files it read: every record's crc32c matches and no
//! byte follows the last complete record (`rocks::log`), every record is a WriteBatch whose
//! every entry decodes (`rocks::write_batch`), the first record of a WAL numbered
//! `min_log_number` or above is the base's first needed record and every later one continues
//! the one before it without a hole or an overlap, log numbers never going back (the replay's
//! own [`BaseChain`], built on `chain`), and the last batch ends exactly at the cutoff. One
//! record is in memory at a time.
//!
//! It does not prove that RocksDB's recovery code accepts them: `--verify full` lets RocksDB
//! replay them.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use tidemark_manifest::model::BaseSummary;
use tidemark_manifest::rocks::log::{LogEntry, LogReader};
use tidemark_manifest::rocks::write_batch::Batch;
use tidemark_manifest::segment::{Record, RecordTime};

use crate::replay::BaseChain;
use crate::{Cancel, RestoreError};

/// What reading the re-created WAL files back found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalCheckReport {
    pub files: u64,
    pub records: u64,
    pub bytes: u64,
    /// The first sequence number of the first record, if any.
    pub first_seq: Option<u64>,
    /// The last sequence number of the last batch: the cutoff.
    pub last_seq: u64,
    /// `(name, length)` of every file read, in order.
    #[serde(skip)]
    pub checked: Vec<(String, u64)>,
    pub duration_ms: u64,
}

/// Reads re-created WAL files back, in order (see the module documentation).
#[derive(Debug)]
pub struct WalCheck {
    chain: BaseChain,
    replay_from_seq: u64,
    cancel: Cancel,
    records: u64,
    first_seq: Option<u64>,
    checked: Vec<(String, u64)>,
    took: Duration,
}

fn failed(detail: String) -> RestoreError {
    RestoreError::Verification(detail)
}

impl WalCheck {
    /// A check of the WAL files replayed onto `base`.
    pub fn new(base: &BaseSummary, cancel: Cancel) -> WalCheck {
        WalCheck {
            chain: BaseChain::new(base),
            replay_from_seq: base.replay_from_seq,
            cancel,
            records: 0,
            first_seq: None,
            checked: Vec::new(),
            took: Duration::ZERO,
        }
    }

    /// Reads the WAL file at `path`, numbered `log_number`, whole: the next one in order.
    pub fn check_file(&mut self, path: &Path, log_number: u64) -> Result<(), RestoreError> {
        let started = Instant::now();
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let fail = |e: &dyn std::fmt::Display| failed(format!("re-created WAL file {name}: {e}"));
        let mut reader = LogReader::open(path).map_err(|e| fail(&e))?;
        while let Some(entry) = reader.next_entry().map_err(|e| fail(&e))? {
            let LogEntry::Record(rec) = entry else {
                return Err(fail(&format!(
                    "a metadata record the replay does not write ({entry:?})"
                )));
            };
            let offset = rec.start_offset;
            let header = Batch::parse(&rec.bytes)
                .and_then(|b| b.summary())
                .map_err(|e| fail(&format!("the record at offset {offset}: {e}")))?
                .header;
            let r = Record {
                seq: header.sequence,
                count: header.count,
                time_us: 0,
                time_source: RecordTime::Observed,
                log_number,
                log_offset: offset,
                batch: rec.bytes,
            };
            if !self
                .chain
                .check(&name, &r)
                .map_err(|e| failed(e.to_string()))?
            {
                return Err(fail(&format!(
                    "the record at offset {offset} (sequence {}) is older than the base's \
                     first needed record, sequence {}",
                    r.seq, self.replay_from_seq
                )));
            }
            self.first_seq.get_or_insert(r.seq);
            self.records += 1;
            if self.records.is_multiple_of(1024) {
                self.cancel.check()?;
            }
        }
        reader.finish().map_err(|e| fail(&e))?;
        let len = reader.file_len().map_err(|e| fail(&e))?;
        self.checked.push((name, len));
        self.took += started.elapsed();
        Ok(())
    }

    /// Every file was read: the last batch must end exactly at `cutoff` (with no record, the
    /// cutoff is where the base's WAL starts).
    pub fn finish(self, cutoff: u64) -> Result<WalCheckReport, RestoreError> {
        let end = self
            .chain
            .next_seq()
            .unwrap_or(self.replay_from_seq)
            .saturating_sub(1);
        if end != cutoff {
            return Err(failed(format!(
                "the re-created WAL files end at sequence {end}, the restore planned {cutoff}"
            )));
        }
        Ok(WalCheckReport {
            files: self.checked.len() as u64,
            records: self.records,
            bytes: self.checked.iter().map(|(_, n)| n).sum(),
            first_seq: self.first_seq,
            last_seq: end,
            checked: self.checked,
            duration_ms: self.took.as_millis() as u64,
        })
    }
}

/// The WAL files in the database directory `dir` are exactly the ones `report` read back,
/// with the lengths read: nothing was added, left out or changed in size on the way there.
pub fn check_placed(dir: &Path, report: &WalCheckReport) -> Result<(), RestoreError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| RestoreError::io("cannot list", dir, e))? {
        let entry = entry.map_err(|e| RestoreError::io("cannot list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") {
            let meta = entry
                .metadata()
                .map_err(|e| RestoreError::io("cannot inspect", entry.path(), e))?;
            found.push((name, meta.len()));
        }
    }
    found.sort();
    let mut checked = report.checked.clone();
    checked.sort();
    if found != checked {
        return Err(failed(format!(
            "the WAL files in the restored directory ({found:?}) are not the ones read back \
             ({checked:?})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tidemark_manifest::model::time_from_micros;
    use tidemark_manifest::rocks::DbFile;
    use tidemark_manifest::rocks::log::LogWriter;
    use tidemark_manifest::testing::{self, T0_US};

    fn base(min_log: u64, replay_from: u64) -> BaseSummary {
        BaseSummary {
            min_log_number: min_log,
            ..testing::base("b1", replay_from, replay_from, time_from_micros(T0_US))
        }
    }

    /// A real WAL: RocksDB writes 200 batches (no flush) into a fresh database. Returns the
    /// WAL's path, its log number and the last sequence number.
    fn rocksdb_wal(root: &Path) -> (std::path::PathBuf, u64, u64) {
        let dir = root.join("db");
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, &dir).unwrap();
        for i in 0..200u32 {
            let mut b = rocksdb::WriteBatch::default();
            b.put(format!("key{i}"), vec![b'v'; 300]);
            if i % 3 == 0 {
                b.delete(format!("key{}", i / 2));
            }
            db.write(b).unwrap();
        }
        let seq = db.latest_sequence_number();
        drop(db);
        let (log, path) = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find_map(|p| match DbFile::parse(&p.file_name()?.to_string_lossy()) {
                Some(DbFile::Wal(n)) => Some((n, p)),
                _ => None,
            })
            .unwrap();
        let copy = root.join(path.file_name().unwrap());
        fs::copy(&path, &copy).unwrap();
        (copy, log, seq)
    }

    fn check(
        path: &Path,
        log: u64,
        base: &BaseSummary,
        cutoff: u64,
    ) -> Result<WalCheckReport, RestoreError> {
        let mut c = WalCheck::new(base, Cancel::new());
        c.check_file(path, log)?;
        c.finish(cutoff)
    }

    #[test]
    fn a_wal_written_by_rocksdb_reads_back_to_its_last_sequence() {
        let root = tempfile::tempdir().unwrap();
        let (path, log, seq) = rocksdb_wal(root.path());
        let r = check(&path, log, &base(log, 1), seq).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (200, Some(1), seq));
        assert_eq!(r.bytes, fs::metadata(&path).unwrap().len());
        // Ending before the cutoff, or starting after where the base needs it, fails.
        let e = check(&path, log, &base(log, 1), seq + 1).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "end at sequence {seq}, the restore planned {}",
                seq + 1
            )),
            "{e}"
        );
        let e = check(&path, log, &base(log, 2), seq).unwrap_err();
        assert!(
            e.to_string().contains("the first record base b1 needs"),
            "{e}"
        );
    }

    #[test]
    fn a_flipped_byte_in_a_wal_written_by_rocksdb_fails_naming_the_file_and_offset() {
        let root = tempfile::tempdir().unwrap();
        let (path, log, seq) = rocksdb_wal(root.path());
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let e = check(&path, log, &base(log, 1), seq).unwrap_err();
        assert!(matches!(e, RestoreError::Verification(_)), "{e}");
        let text = e.to_string();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            text.contains(&name) && text.contains("checksum mismatch"),
            "{text}"
        );
    }

    #[test]
    fn a_truncated_wal_fails_and_one_cut_at_a_record_ends_before_the_cutoff() {
        let root = tempfile::tempdir().unwrap();
        let (path, log, seq) = rocksdb_wal(root.path());
        let bytes = fs::read(&path).unwrap();
        // Cut inside the last record: bytes that are not a complete record.
        fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = check(&path, log, &base(log, 1), seq).unwrap_err();
        assert!(e.to_string().contains("are not complete records"), "{e}");
        // Cut after a whole record: the WAL ends before the cutoff.
        let mut reader =
            LogReader::open(root.path().join("db").join(path.file_name().unwrap())).unwrap();
        let mut end = 0;
        for _ in 0..150 {
            end = reader.next_record().unwrap().unwrap().end_offset;
        }
        fs::write(&path, &bytes[..end as usize]).unwrap();
        let e = check(&path, log, &base(log, 1), seq).unwrap_err();
        assert!(
            e.to_string()
                .contains("the re-created WAL files end at sequence"),
            "{e}"
        );
    }

    /// A WriteBatch of `count` puts.
    fn batch(seq: u64, count: u32) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        for _ in 0..count {
            b.extend_from_slice(&[0x01, 1, b'k', 1, b'v']);
        }
        b
    }

    fn written(root: &Path, name: &str, records: &[Vec<u8>]) -> std::path::PathBuf {
        let path = root.join(name);
        let mut w = LogWriter::new(fs::File::create(&path).unwrap());
        for r in records {
            w.add_record(r).unwrap();
        }
        path
    }

    #[test]
    fn a_hole_an_overlap_or_a_batch_that_does_not_parse_fails() {
        let root = tempfile::tempdir().unwrap();
        let b = base(7, 1);
        let hole = written(root.path(), "000007.log", &[batch(1, 2), batch(4, 1)]);
        let e = check(&hole, 7, &b, 4).unwrap_err();
        assert!(e.to_string().contains("a record is missing"), "{e}");
        let overlap = written(root.path(), "000008.log", &[batch(1, 2), batch(2, 1)]);
        let e = check(&overlap, 8, &b, 2).unwrap_err();
        assert!(e.to_string().contains("taken twice"), "{e}");
        let mut bad = batch(1, 1);
        bad[12] = 0x7f;
        let garbage = written(root.path(), "000009.log", &[bad]);
        let e = check(&garbage, 9, &b, 1).unwrap_err();
        assert!(e.to_string().contains("malformed WriteBatch"), "{e}");
        // Two files continue each other; a file older than the base's WAL is refused.
        let a = written(root.path(), "000010.log", &[batch(1, 2)]);
        let c = written(
            root.path(),
            "000011.log",
            &[batch(3, 1), batch(4, 0), batch(4, 2)],
        );
        let mut check = WalCheck::new(&b, Cancel::new());
        check.check_file(&a, 10).unwrap();
        check.check_file(&c, 11).unwrap();
        let r = check.finish(5).unwrap();
        assert_eq!((r.files, r.records, r.last_seq), (2, 4, 5));
        let old = written(root.path(), "000003.log", &[batch(1, 2)]);
        let e = WalCheck::new(&base(7, 3), Cancel::new())
            .check_file(&old, 3)
            .unwrap_err();
        assert!(
            e.to_string().contains("older than the base's first needed"),
            "{e}"
        );
    }

    #[test]
    fn the_placed_files_are_the_ones_read_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("db");
        fs::create_dir(&dir).unwrap();
        let path = written(&dir, "000007.log", &[batch(1, 2)]);
        let r = check(&path, 7, &base(7, 1), 2).unwrap();
        check_placed(&dir, &r).unwrap();
        fs::write(dir.join("000008.log"), b"x").unwrap();
        let e = check_placed(&dir, &r).unwrap_err();
        assert!(e.to_string().contains("000008.log"), "{e}");
    }
}
