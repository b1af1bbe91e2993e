//! Tests of the format code against databases written by real RocksDB (the `rocksdb` crate's
//! bundled build).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rocksdb::{ColumnFamilyDescriptor, DB, DBCompressionType, MergeOperands, Options, WriteBatch};

use super::DbFile;
use super::log::{
    BLOCK_SIZE, HEADER_SIZE, LogEntry, LogError, LogReader, LogWriter, Record, WalCompression,
    record_type,
};
use super::marker;
use super::options_file::{OptionsFile, newest_options_file};
use super::version_edit::ManifestState;
use super::write_batch::{Batch, EntryKind};

const MERGE_NAME: &str = "tidemark.test.concat";

fn concat_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut v = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in operands {
        v.extend_from_slice(op);
    }
    Some(v)
}

/// Options that keep rotated WALs (in `archive/`) and flush often.
fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_write_buffer_size(256 * 1024);
    o.set_wal_ttl_seconds(1_000_000);
    o.set_merge_operator_associative(MERGE_NAME, concat_merge);
    o
}

fn open(dir: &Path, opts: &Options, cfs: &[&str]) -> DB {
    let descriptors = cfs
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, opts.clone()))
        .collect::<Vec<_>>();
    DB::open_cf_descriptors(opts, dir, descriptors).unwrap()
}

/// WAL files in the database directory and `archive/`, by number. The directory is listed
/// before `archive/`, so a log moved meanwhile is still found.
fn wal_files(dir: &Path) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    for d in [dir.to_path_buf(), dir.join("archive")] {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            if let Some(DbFile::Wal(n)) = e.file_name().to_str().and_then(DbFile::parse) {
                out.insert(n, e.path());
            }
        }
    }
    out
}

/// Opens WAL `n`, in the database directory or, if it was moved meanwhile, in `archive/`.
fn open_wal(dir: &Path, n: u64) -> LogReader {
    let name = DbFile::Wal(n).file_name().unwrap();
    LogReader::open(dir.join(&name))
        .or_else(|_| LogReader::open(dir.join("archive").join(&name)))
        .unwrap()
}

fn files_with(dir: &Path, pick: impl Fn(DbFile) -> Option<u64>) -> BTreeSet<u64> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name();
            name.to_str().and_then(DbFile::parse).and_then(&pick)
        })
        .collect()
}

/// A mixed workload: values from empty to several blocks, three column families, merges,
/// deletes, range deletes, log data (with time markers), LogData-only batches, flushes.
fn write_workload(db: &DB, batches: usize, seed: usize) {
    let one = db.cf_handle("one").unwrap();
    let two = db.cf_handle("two").unwrap();
    for j in 0..batches {
        let i = j + seed;
        let mut wb = WriteBatch::default();
        let size = match i % 13 {
            0 => 40_000,
            5 => 100_000,
            7 => 0,
            9 => 32_768 - 7 - 30,
            _ => (i * 37) % 3000,
        };
        wb.put(format!("k{i:06}"), vec![i as u8; size]);
        if i.is_multiple_of(3) {
            wb.put_cf(&one, format!("o{i}"), b"x");
        }
        if i.is_multiple_of(4) {
            wb.merge_cf(&two, b"m", format!("{i},"));
        }
        if i.is_multiple_of(5) {
            wb.delete(format!("k{:06}", i / 2));
        }
        if i.is_multiple_of(17) {
            wb.delete_range_cf(&one, b"o1", b"o2");
        }
        if i.is_multiple_of(7) {
            wb.put_log_data(marker::encode(SystemTime::now()));
        }
        db.write(wb).unwrap();
        if i.is_multiple_of(97) {
            let mut only = WriteBatch::default();
            only.put_log_data(b"log data only");
            db.write(only).unwrap();
        }
        if i % 150 == 149 {
            db.flush_cf(&one).unwrap();
        }
        if i % 400 == 399 {
            db.flush().unwrap();
        }
    }
}

/// Reads every WAL of a database in number order and checks that the batches' sequence
/// numbers are contiguous from 1. Returns the records by log number.
fn read_all_wals(dir: &Path) -> (BTreeMap<u64, (PathBuf, Vec<Record>)>, u64) {
    let mut out = BTreeMap::new();
    let mut next_seq = 1;
    for (n, path) in wal_files(dir) {
        let mut reader = open_wal(dir, n);
        let mut records = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            let batch = Batch::parse(&r.bytes).unwrap();
            let summary = batch.validate().unwrap();
            assert!(summary.column_families.iter().all(|cf| *cf <= 2));
            assert_eq!(
                batch.header().sequence,
                next_seq,
                "log {n}, record at offset {}",
                r.start_offset
            );
            next_seq = batch.header().next_sequence();
            records.push(r);
        }
        assert!(reader.at_clean_end().unwrap(), "log {n} has trailing data");
        out.insert(n, (path, records));
    }
    (out, next_seq - 1)
}

#[test]
fn wal_files_of_a_real_database_decode_and_reencode_byte_identically() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path(), &db_options(), &["default", "one", "two"]);
    write_workload(&db, 1200, 0);

    let (logs, last_seq) = read_all_wals(dir.path());
    assert_eq!(last_seq, db.latest_sequence_number());
    assert!(
        logs.len() >= 5,
        "expected several WAL rotations, got {}",
        logs.len()
    );
    assert!(
        fs::read_dir(dir.path().join("archive")).unwrap().count() >= 3,
        "rotated logs are kept in archive/"
    );
    let multi_block = logs
        .values()
        .flat_map(|(_, rs)| rs)
        .filter(|r| r.bytes.len() > 65_536)
        .count();
    assert!(multi_block > 50);

    // Re-encoding every record gives the file's bytes; anything RocksDB left after the last
    // record (preallocated space) is zeros.
    for (n, (_, records)) in &logs {
        let original = fs::read(dir.path().join(DbFile::Wal(*n).file_name().unwrap()))
            .or_else(|_| {
                fs::read(
                    dir.path()
                        .join("archive")
                        .join(DbFile::Wal(*n).file_name().unwrap()),
                )
            })
            .unwrap();
        let mut w = LogWriter::new(Vec::new());
        for r in records {
            assert!(r.start_offset >= w.offset() && r.start_offset - w.offset() < 7);
            let end = w.add_record(&r.bytes).unwrap();
            assert_eq!(end, r.end_offset, "log {n}");
        }
        let written = w.into_inner();
        assert!(written.len() <= original.len(), "log {n}");
        assert_eq!(written[..], original[..written.len()], "log {n} differs");
        assert!(original[written.len()..].iter().all(|&b| b == 0), "log {n}");
    }

    // Log data blobs: the markers decode, and LogData-only batches take no sequence number.
    let mut markers = 0;
    let mut log_data_only = 0;
    for (_, records) in logs.values() {
        for r in records {
            let batch = Batch::parse(&r.bytes).unwrap();
            for blob in batch.log_data_blobs().unwrap() {
                if let Some(m) = marker::decode(blob) {
                    m.unwrap();
                    markers += 1;
                }
            }
            if batch
                .entries()
                .all(|e| e.unwrap().kind == EntryKind::LogData)
            {
                assert_eq!(batch.header().count, 0);
                log_data_only += 1;
            }
        }
    }
    assert_eq!(markers, (0..1200).filter(|i| i % 7 == 0).count());
    assert_eq!(log_data_only, (0..1200).filter(|i| i % 97 == 0).count());
}

fn varint_len(v: usize) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// A key length and value length whose single-Put batch is exactly `record` bytes.
fn put_shape(record: usize) -> (usize, usize) {
    for key_len in 1..10 {
        for value_varint in 1..=3 {
            let Some(value_len) = record.checked_sub(12 + 1 + 1 + key_len + value_varint) else {
                continue;
            };
            if varint_len(value_len) == value_varint {
                return (key_len, value_len);
            }
        }
    }
    panic!("no Put batch of {record} bytes")
}

#[test]
fn real_wal_block_edges_reencode_byte_identically() {
    // Batches sized so that RocksDB's writer meets every block-end case: a record ending
    // exactly at the block end, 1..6 bytes left (zero trailer) and exactly 7 left (an empty
    // FIRST fragment).
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    let db = DB::open(&opts, dir.path()).unwrap();
    let (_, path) = wal_files(dir.path()).into_iter().next().unwrap();
    let len = || fs::metadata(&path).unwrap().len();
    let mut edges = Vec::new();
    for (round, leave) in [7u64, 3, 0, 6, 1, 7, 5, 2, 4, 7].into_iter().enumerate() {
        while BLOCK_SIZE - len() % BLOCK_SIZE < leave + 100 {
            db.put(b"filler", vec![1u8; 20_000]).unwrap();
        }
        let room = BLOCK_SIZE - len() % BLOCK_SIZE;
        let (key_len, value_len) = put_shape((room - leave) as usize - HEADER_SIZE);
        db.put(vec![b'k'; key_len], vec![round as u8; value_len])
            .unwrap();
        let end = len();
        assert_eq!((BLOCK_SIZE - end % BLOCK_SIZE) % BLOCK_SIZE, leave);
        edges.push((end as usize, leave as usize));
        db.put(format!("after{round}"), vec![2u8; round * 5_000])
            .unwrap();
    }

    let mut reader = LogReader::open(&path).unwrap();
    let mut w = LogWriter::new(Vec::new());
    while let Some(r) = reader.next_record().unwrap() {
        assert_eq!(w.add_record(&r.bytes).unwrap(), r.end_offset);
    }
    assert!(reader.at_clean_end().unwrap());
    let written = w.into_inner();
    let original = fs::read(&path).unwrap();
    assert_eq!(written[..], original[..written.len()]);
    assert!(original[written.len()..].iter().all(|&b| b == 0));
    for (end, leave) in edges {
        match leave {
            7 => assert_eq!(original[end + 4..end + 7], [0, 0, record_type::FIRST]),
            0 => assert_ne!(original[end + 6], 0),
            n => assert!(original[end..end + n].iter().all(|&b| b == 0)),
        }
    }
}

#[test]
fn tailing_a_live_database_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path(), &db_options(), &["default", "one", "two"]);
    let mut current = *wal_files(dir.path()).keys().next().unwrap();
    let mut reader = open_wal(dir.path(), current);
    let mut next_seq = 1;
    let mut rotations = 0;
    for round in 0..40 {
        write_workload(&db, 7 + round % 5, round * 11);
        if round % 6 == 5 {
            db.flush().unwrap();
        }
        rotations += follow(dir.path(), &mut current, &mut reader, &mut next_seq);
        assert_eq!(next_seq - 1, db.latest_sequence_number(), "round {round}");
    }
    assert!(rotations >= 6, "only {rotations} rotations");
}

/// Follows the WALs of `dir` from the current log and reader as far as they are written now,
/// checking sequence continuity; returns the number of rotations followed.
fn follow(dir: &Path, current: &mut u64, reader: &mut LogReader, next_seq: &mut u64) -> usize {
    let mut rotations = 0;
    loop {
        // Look for a newer log before the final read of the current one.
        let newer = wal_files(dir).range(*current + 1..).next().map(|(n, _)| *n);
        while let Some(r) = reader.next_record().unwrap() {
            let h = Batch::parse(&r.bytes).unwrap().header();
            assert_eq!(
                h.sequence, *next_seq,
                "log {current} offset {}",
                r.start_offset
            );
            *next_seq = h.next_sequence();
        }
        let Some(n) = newer else {
            return rotations;
        };
        assert_eq!(reader.finish().unwrap(), reader.offset());
        *current = n;
        *reader = open_wal(dir, n);
        rotations += 1;
    }
}

#[test]
fn tailing_while_rocksdb_writes_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path(), &db_options(), &["default", "one", "two"]);
    let mut current = *wal_files(dir.path()).keys().next().unwrap();
    let mut reader = open_wal(dir.path(), current);
    let mut next_seq = 1;
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut rotations = 0;
    let mut polls = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            write_workload(&db, 2500, 1);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            rotations += follow(dir.path(), &mut current, &mut reader, &mut next_seq);
            polls += 1;
        }
    });
    rotations += follow(dir.path(), &mut current, &mut reader, &mut next_seq);
    assert_eq!(next_seq - 1, db.latest_sequence_number());
    assert!(rotations >= 5, "only {rotations} rotations");
    assert!(polls > 10, "only {polls} polls");
}

#[test]
fn zstd_compressed_wal_is_decompressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = db_options();
    opts.set_wal_compression_type(DBCompressionType::Zstd);
    let db = open(dir.path(), &opts, &["default", "one", "two"]);
    write_workload(&db, 400, 3);
    let (logs, last_seq) = read_all_wals(dir.path());
    assert_eq!(last_seq, db.latest_sequence_number());
    assert!(logs.len() >= 2);
    for (n, (path, records)) in &logs {
        let bytes = fs::read(path).unwrap();
        assert_eq!(bytes[6], record_type::SET_COMPRESSION_TYPE, "log {n}");
        let mut reader = LogReader::open(path).unwrap();
        assert_eq!(
            reader.next_entry().unwrap(),
            Some(LogEntry::Compression {
                offset: 0,
                compression: WalCompression::Zstd
            })
        );
        // Records are smaller on disk than decoded, and a reader resuming in the middle of
        // the file knows the compression.
        let decoded: usize = records.iter().map(|r| r.bytes.len()).sum();
        assert!(
            (bytes.len()) < decoded,
            "log {n}: {} >= {decoded}",
            bytes.len()
        );
        if let Some(mid) = records.get(records.len() / 2) {
            let mut resumed = LogReader::open_at(path, mid.start_offset).unwrap();
            assert_eq!(resumed.compression(), Some(WalCompression::Zstd));
            assert_eq!(&resumed.next_record().unwrap().unwrap(), mid);
        }
    }
}

#[test]
fn recycled_wal_is_rejected_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_recycle_log_file_num(4);
    let db = DB::open(&opts, dir.path()).unwrap();
    db.put(b"a", b"1").unwrap();
    let (n, _) = wal_files(dir.path()).into_iter().next().unwrap();
    let err = open_wal(dir.path(), n).next_record().unwrap_err();
    assert!(matches!(err, LogError::Recycled { offset: 0, .. }), "{err}");
    assert!(
        err.to_string().contains("recycle_log_file_num = 0"),
        "{err}"
    );
}

/// Keys end with an 8-byte little-endian timestamp; newer timestamps sort first.
fn ts_compare(a: &[u8], b: &[u8]) -> Ordering {
    let (ka, ta) = a.split_at(a.len() - 8);
    let (kb, tb) = b.split_at(b.len() - 8);
    ka.cmp(kb).then_with(|| ts_order(tb, ta))
}

fn ts_order(a: &[u8], b: &[u8]) -> Ordering {
    let v = |t: &[u8]| u64::from_le_bytes(t.try_into().unwrap());
    v(a).cmp(&v(b))
}

fn ts_compare_without(a: &[u8], a_ts: bool, b: &[u8], b_ts: bool) -> Ordering {
    let a = if a_ts { &a[..a.len() - 8] } else { a };
    let b = if b_ts { &b[..b.len() - 8] } else { b };
    a.cmp(b)
}

#[test]
fn user_defined_timestamp_size_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let mut ts_opts = Options::default();
    ts_opts.set_comparator_with_ts(
        "tidemark.test.u64ts",
        8,
        Box::new(ts_compare),
        Box::new(ts_order),
        Box::new(ts_compare_without),
    );
    let db = DB::open_cf_descriptors(
        &opts,
        dir.path(),
        vec![
            ColumnFamilyDescriptor::new("default", Options::default()),
            ColumnFamilyDescriptor::new("ts", ts_opts),
        ],
    )
    .unwrap();
    let ts = db.cf_handle("ts").unwrap();
    for i in 0..20u64 {
        db.put_cf_with_ts(&ts, format!("key{i}"), i.to_le_bytes(), b"v")
            .unwrap();
        db.put(format!("plain{i}"), b"p").unwrap();
    }
    let (n, path) = wal_files(dir.path()).into_iter().next().unwrap();
    let mut reader = LogReader::open(&path).unwrap();
    let mut entries = Vec::new();
    while let Some(e) = reader.next_entry().unwrap() {
        entries.push(e);
    }
    assert!(
        matches!(&entries[0], LogEntry::TimestampSizes { offset: 0, sizes } if sizes == &vec![(1, 8)]),
        "{:?}",
        entries[0]
    );
    assert_eq!(reader.timestamp_sizes().get(&1), Some(&8));
    // Keys of the timestamped column family carry the timestamp.
    let LogEntry::Record(first) = &entries[1] else {
        panic!("expected a record after the timestamp sizes")
    };
    let entry = Batch::parse(&first.bytes)
        .unwrap()
        .entries()
        .next()
        .unwrap()
        .unwrap();
    let mut want_key = b"key0".to_vec();
    want_key.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!((entry.cf_id, entry.key), (1, want_key.as_slice()));

    // Rewriting the log entry by entry reproduces it.
    let mut w = LogWriter::new(Vec::new());
    for e in &entries {
        match e {
            LogEntry::Record(r) => {
                w.add_record(&r.bytes).unwrap();
            }
            LogEntry::TimestampSizes { sizes, .. } => {
                w.add_timestamp_size_record(sizes).unwrap();
            }
            other => panic!("log {n}: unexpected {other:?}"),
        }
    }
    let original = fs::read(&path).unwrap();
    let written = w.into_inner();
    assert_eq!(written[..], original[..written.len()]);
    assert!(original[written.len()..].iter().all(|&b| b == 0));
}

#[test]
fn predecessor_wal_info_and_wals_tracked_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = Options::default();
    let mut opts = base
        .get_options_from_string(
            "track_and_verify_wals=true;track_and_verify_wals_in_manifest=true",
        )
        .unwrap();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_wal_ttl_seconds(1_000_000);
    opts.set_write_buffer_size(256 * 1024);
    opts.set_merge_operator_associative(MERGE_NAME, concat_merge);
    let db = open(dir.path(), &opts, &["default", "one", "two"]);
    write_workload(&db, 600, 5);

    let (logs, last_seq) = read_all_wals(dir.path());
    assert_eq!(last_seq, db.latest_sequence_number());
    // The previous log's number, size and its last batch's sequence.
    let mut previous: Option<(u64, u64, u64)> = None;
    let mut checked = 0;
    for (n, (path, records)) in &logs {
        let mut reader = LogReader::open(path).unwrap();
        let mut w = LogWriter::new(Vec::new());
        let mut predecessor = None;
        while let Some(e) = reader.next_entry().unwrap() {
            match e {
                LogEntry::PredecessorWal { offset, info } => {
                    assert_eq!(offset, 0, "log {n}");
                    predecessor = Some(info);
                    w.add_predecessor_wal_info(&info).unwrap();
                }
                LogEntry::Record(r) => {
                    w.add_record(&r.bytes).unwrap();
                }
                other => panic!("log {n}: unexpected {other:?}"),
            }
        }
        if let (Some(info), Some((pn, psize, pseq))) = (predecessor, previous) {
            assert_eq!(
                (info.log_number, info.size_bytes, info.last_batch_sequence),
                (pn, psize, pseq),
                "log {n}"
            );
            checked += 1;
        }
        let original = fs::read(path).unwrap();
        let written = w.into_inner();
        assert_eq!(written[..], original[..written.len()], "log {n}");
        let last = records
            .last()
            .map(|r| Batch::parse(&r.bytes).unwrap().header().sequence)
            .unwrap_or(0);
        previous = Some((*n, original.len() as u64, last));
    }
    assert!(checked >= 3, "only {checked} predecessor records checked");

    let state = ManifestState::from_db_dir(dir.path()).unwrap();
    let on_disk = wal_files(dir.path());
    assert!(!state.wals.is_empty());
    for n in state.wals.keys() {
        assert!(*n >= state.min_wal_number_to_keep);
        assert!(on_disk.contains_key(n), "tracked WAL {n} is not on disk");
    }
    assert!(
        state.min_wal_number_to_keep > 0,
        "obsolete WALs were recorded"
    );
}

fn live_files_by_cf(db: &DB) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for f in db.live_files().unwrap() {
        let name = f.name.trim_start_matches('/');
        let Some(DbFile::Table(n)) = DbFile::parse(name) else {
            panic!("unexpected live file name {}", f.name)
        };
        out.entry(f.column_family_name).or_default().insert(n);
    }
    out
}

fn check_manifest_against_db(dir: &Path, db: &DB, opts: &Options) {
    let state = ManifestState::from_db_dir(dir).unwrap();
    let names: BTreeSet<String> = state
        .column_families
        .values()
        .map(|cf| cf.name.clone())
        .collect();
    let listed: BTreeSet<String> = DB::list_cf(opts, dir).unwrap().into_iter().collect();
    assert_eq!(names, listed);

    let live = live_files_by_cf(db);
    for cf in state.column_families.values() {
        let expected = live.get(&cf.name).cloned().unwrap_or_default();
        assert_eq!(cf.live_files, expected, "column family {}", cf.name);
        assert_eq!(cf.comparator.as_deref(), Some("leveldb.BytewiseComparator"));
        assert_eq!(cf.live_files.len(), cf.files.len());
    }
    let on_disk = files_with(dir, |f| match f {
        DbFile::Table(n) => Some(n),
        _ => None,
    });
    assert!(state.all_live_files().is_subset(&on_disk));

    let smallest_log = files_with(dir, |f| match f {
        DbFile::Wal(n) => Some(n),
        _ => None,
    })
    .into_iter()
    .next()
    .unwrap();
    assert!(
        state.min_log_number_needed() <= smallest_log,
        "min log number {} > smallest log {smallest_log}",
        state.min_log_number_needed()
    );
    assert!(state.min_wal_number_for_recovery(false) >= state.min_log_number_needed());
    let next = state.next_file_number;
    assert!(on_disk.iter().all(|&n| n < next));
    assert!(smallest_log < next);
    assert!(state.last_sequence <= db.latest_sequence_number());
    let identity = fs::read_to_string(dir.join("IDENTITY")).unwrap();
    assert_eq!(state.db_id.as_deref(), Some(identity.trim()));
}

#[test]
fn manifest_of_a_real_database() {
    let dir = tempfile::tempdir().unwrap();
    let opts = db_options();
    let cf_names = ["default", "a", "b", "c"];
    let mut db = open(dir.path(), &opts, &cf_names);
    for round in 0..3 {
        for (i, name) in cf_names.iter().enumerate() {
            let cf = db.cf_handle(name).unwrap();
            for k in 0..300 {
                db.put_cf(&cf, format!("{round}-{k:05}"), vec![i as u8; 500])
                    .unwrap();
            }
            if i.is_multiple_of(2) {
                db.flush_cf(&cf).unwrap();
            }
        }
    }
    {
        let a = db.cf_handle("a").unwrap();
        db.flush_cf(&a).unwrap();
        db.compact_range_cf(&a, None::<&[u8]>, None::<&[u8]>);
        let default = db.cf_handle("default").unwrap();
        db.compact_range_cf(&default, None::<&[u8]>, None::<&[u8]>);
    }
    db.drop_cf("b").unwrap();
    {
        let c = db.cf_handle("c").unwrap();
        db.put_cf(&c, b"after-drop", b"x").unwrap();
    }

    let state = ManifestState::from_db_dir(dir.path()).unwrap();
    assert_eq!(state.cf_id("default"), Some(0));
    assert_eq!(state.cf_id("a"), Some(1));
    assert_eq!(state.cf_id("b"), None);
    assert_eq!(state.cf_id("c"), Some(3));
    assert_eq!(state.max_column_family, 3);
    // Unflushed data in "c" and "default" keeps an older WAL needed than "a"'s.
    let a_log = state.column_families[&1].log_number;
    assert!(state.min_log_number_needed() <= a_log);
    check_manifest_against_db(dir.path(), &db, &opts);

    // Reopening writes a new MANIFEST holding the current state as a snapshot.
    drop(db);
    let db = open(dir.path(), &opts, &["default", "a", "c"]);
    let reopened = ManifestState::from_db_dir(dir.path()).unwrap();
    assert_eq!(reopened.column_families.len(), 3);
    assert_eq!(reopened.cf_id("c"), Some(3));
    check_manifest_against_db(dir.path(), &db, &opts);
}

#[test]
fn blob_files_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = db_options();
    opts.set_enable_blob_files(true);
    opts.set_min_blob_size(256);
    opts.set_enable_blob_gc(true);
    opts.set_blob_gc_age_cutoff(1.0);
    // Only the explicit compaction below may touch the blob files (an automatic one after
    // the fourth flush would make the count before it depend on timing).
    opts.set_disable_auto_compactions(true);
    let db = open(dir.path(), &opts, &["default"]);
    for round in 0..4 {
        for k in 0..200 {
            db.put(format!("key{k:04}"), vec![round as u8; 1000])
                .unwrap();
        }
        db.flush().unwrap();
    }
    let before = ManifestState::from_db_dir(dir.path()).unwrap();
    assert_eq!(before.blob_files.len(), 4);
    db.compact_range(None::<&[u8]>, None::<&[u8]>);
    let state = ManifestState::from_db_dir(dir.path()).unwrap();
    let live_blobs: BTreeSet<u64> = state.blob_files.keys().copied().collect();
    let count = db
        .property_int_value("rocksdb.num-blob-files")
        .unwrap()
        .unwrap();
    assert_eq!(live_blobs.len() as u64, count);
    let on_disk = files_with(dir.path(), |f| match f {
        DbFile::Blob(n) => Some(n),
        _ => None,
    });
    assert!(
        live_blobs.is_subset(&on_disk),
        "{live_blobs:?} vs {on_disk:?}"
    );
    assert!(
        live_blobs.len() < before.blob_files.len(),
        "garbage collection dropped blob files"
    );
    for f in state.column_families[&0].files.values() {
        assert!(f.oldest_blob_file_number == 0 || live_blobs.contains(&f.oldest_blob_file_number));
    }
    assert_eq!(
        state.column_families[&0].live_files,
        live_files_by_cf(&db)["default"]
    );
}

#[test]
fn options_file_of_a_real_database() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = tempfile::tempdir().unwrap();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_wal_ttl_seconds(3600);
    opts.set_wal_size_limit_mb(7);
    opts.set_wal_dir(wal_dir.path());
    let mut merge_opts = Options::default();
    merge_opts.set_merge_operator_associative(MERGE_NAME, concat_merge);
    let db = DB::open_cf_descriptors(
        &opts,
        dir.path(),
        vec![
            ColumnFamilyDescriptor::new("default", Options::default()),
            ColumnFamilyDescriptor::new("with merge", merge_opts),
        ],
    )
    .unwrap();
    db.put(b"k", b"v").unwrap();

    let path = newest_options_file(dir.path()).unwrap().unwrap();
    let f = OptionsFile::read(&path).unwrap();
    assert_eq!(f.rocksdb_version(), Some("11.8.1"));
    assert_eq!(f.wal_ttl_seconds().unwrap(), Some(3600));
    assert_eq!(f.wal_size_limit_mb().unwrap(), Some(7));
    assert_eq!(f.recycle_log_file_num().unwrap(), Some(0));
    assert_eq!(f.wal_dir(), Some(wal_dir.path().to_str().unwrap()));
    assert_eq!(f.wal_compression(), Some("kNoCompression"));
    assert_eq!(f.cf_names(), vec!["default", "with merge"]);
    assert_eq!(f.merge_operator("default"), None);
    let merge = f.merge_operator("with merge").unwrap();
    assert!(merge.contains(MERGE_NAME), "{merge}");
    assert_eq!(f.comparator("default"), Some("leveldb.BytewiseComparator"));
    assert_eq!(f.table_options("default").unwrap().0, "BlockBasedTable");
    // The WALs are in wal_dir.
    assert!(!wal_files(wal_dir.path()).is_empty());
    assert!(wal_files(dir.path()).is_empty());
}
