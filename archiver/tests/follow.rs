//! The WAL follower against real RocksDB databases written concurrently, and against
//! hand-made WAL files for the failure cases RocksDB does not produce on demand.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch};
use tidemark_archiver::follow::{
    FollowError, FollowEvent, StartPosition, WalFollower, WalPosition,
};
use tidemark_manifest::rocks::log::{LogWriter, mask_crc, record_crc};
use tidemark_manifest::rocks::marker;
use tidemark_manifest::rocks::write_batch::BatchBuilder;
use tidemark_manifest::segment::{Record, RecordTime};

const CFS: [&str; 2] = ["users", "orders"];

fn options(wal_ttl_seconds: u64) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_wal_ttl_seconds(wal_ttl_seconds);
    opts.set_write_buffer_size(64 * 1024);
    opts
}

fn open_db(dir: &Path, wal_ttl_seconds: u64) -> DB {
    open_db_with(dir, wal_ttl_seconds, |_| {})
}

fn open_db_with(dir: &Path, wal_ttl_seconds: u64, configure: fn(&mut Options)) -> DB {
    let mut opts = options(wal_ttl_seconds);
    configure(&mut opts);
    // Every column family gets the small write buffer, so that logs rotate often (`open_cf`
    // would give them the default 64 MiB).
    let cfs = CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, options(wal_ttl_seconds)));
    DB::open_cf_descriptors(&opts, dir, cfs).expect("open test database")
}

/// A small deterministic pseudo-random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The batches a writer wrote, by first sequence number, with their sequence number filled
/// in as RocksDB writes it to the WAL.
type Written = BTreeMap<u64, Vec<u8>>;

/// Writes `batches` batches of 1–6 operations over three column families, with values from a
/// few bytes to 40 KiB, flushing now and then; records every batch.
fn write_batches(db: &DB, batches: usize, seed: u64) -> Written {
    write_batches_with(db, batches, seed, false)
}

/// Like [`write_batches`]; with `flush_wal`, also writes out the WAL buffer every few batches
/// (for a database with `manual_wal_flush`).
fn write_batches_with(db: &DB, batches: usize, seed: u64, flush_wal: bool) -> Written {
    let mut rng = Rng(seed | 1);
    let mut written = Written::new();
    let cfs: Vec<_> = CFS.iter().map(|n| db.cf_handle(n).unwrap()).collect();
    for i in 0..batches {
        let mut wb = WriteBatch::default();
        let ops = 1 + rng.below(6);
        for op in 0..ops {
            let key = format!("key-{:06}-{op}", rng.below(5000));
            let len = if rng.below(40) == 0 {
                33 * 1024 + rng.below(8 * 1024) as usize
            } else {
                1 + rng.below(1500) as usize
            };
            let value = vec![b'a' + (i % 26) as u8; len];
            match rng.below(8) {
                0 => wb.delete(key.as_bytes()),
                1 | 2 => wb.put(key.as_bytes(), &value),
                3 | 4 => wb.put_cf(cfs[0], key.as_bytes(), &value),
                5 => wb.delete_cf(cfs[1], key.as_bytes()),
                _ => wb.put_cf(cfs[1], key.as_bytes(), &value),
            }
        }
        let seq = db.latest_sequence_number() + 1;
        let mut data = wb.data().to_vec();
        data[..8].copy_from_slice(&seq.to_le_bytes());
        written.insert(seq, data);
        db.write(wb).expect("write batch");
        if flush_wal && i % 7 == 6 {
            db.flush_wal(false).expect("flush WAL buffer");
        }
        if i % 400 == 399 {
            db.flush().expect("flush");
            db.flush_cf(cfs[(i / 400) % 2]).expect("flush cf");
        }
    }
    written
}

fn flush_all(db: &DB) {
    db.flush().unwrap();
    for n in CFS {
        db.flush_cf(db.cf_handle(n).unwrap()).unwrap();
    }
}

#[derive(Default, Debug)]
struct Seen {
    records: Vec<Record>,
    gaps: Vec<(u64, u64, String)>,
    rotations: Vec<(u64, u64)>,
}

impl Seen {
    fn take(&mut self, events: Vec<FollowEvent>) {
        for e in events {
            match e {
                FollowEvent::Record(r) => self.records.push(r),
                FollowEvent::Gap {
                    expected_seq,
                    found_seq,
                    detail,
                } => self.gaps.push((expected_seq, found_seq, detail)),
                FollowEvent::Rotated { from_log, to_log } => {
                    self.rotations.push((from_log, to_log))
                }
            }
        }
    }

    fn next_seq(&self) -> Option<u64> {
        self.records.last().map(Record::next_seq)
    }
}

/// Polls until the follower has returned everything up to `last_seq`.
fn poll_until(follower: &mut WalFollower, seen: &mut Seen, last_seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.next_seq() != Some(last_seq + 1) {
        assert!(
            Instant::now() < deadline,
            "follower stuck at {:?} (reading {:?}), database at {last_seq}",
            seen.next_seq(),
            follower.reading()
        );
        seen.take(follower.poll().expect("poll"));
        thread::sleep(Duration::from_millis(2));
    }
}

/// Checks that the records are contiguous from `first_seq`, in WAL order, byte-equal to what
/// was written, with non-decreasing observed times.
fn check_records(records: &[Record], written: &Written, first_seq: u64) {
    let mut expected = first_seq;
    let mut prev: Option<&Record> = None;
    for r in records {
        assert_eq!(r.seq, expected, "records must be contiguous");
        let want = written
            .get(&r.seq)
            .unwrap_or_else(|| panic!("no batch was written at sequence {}", r.seq));
        assert!(
            r.batch == *want,
            "batch at sequence {} differs from what was written",
            r.seq
        );
        assert_eq!(r.time_source, RecordTime::Observed);
        if let Some(p) = prev {
            assert!(r.time_us >= p.time_us, "times must not decrease");
            assert!(
                (r.log_number, r.log_offset) > (p.log_number, p.log_offset),
                "records must come in log order"
            );
        }
        expected = r.next_seq();
        prev = Some(r);
    }
}

/// Where RocksDB keeps log `n` now: the database directory, `archive/`, or nowhere.
fn log_location(dir: &Path, n: u64) -> Option<PathBuf> {
    let name = format!("{n:06}.log");
    [dir.join(&name), dir.join("archive").join(&name)]
        .into_iter()
        .find(|p| p.exists())
}

fn log_numbers(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn follows_a_database_written_concurrently() {
    follow_concurrently(|_| {}, false);
}

#[test]
fn follows_a_database_with_zstd_compressed_wal() {
    let dir = follow_concurrently(
        |o| o.set_wal_compression_type(rocksdb::DBCompressionType::Zstd),
        false,
    );
    // The logs really are compressed: each starts with a SET_COMPRESSION_TYPE record.
    let live = log_numbers(dir.path()).pop().unwrap();
    let bytes = fs::read(dir.path().join(format!("{live:06}.log"))).unwrap();
    assert_eq!(bytes[6], 9, "record type of the first record");
}

#[test]
fn follows_a_database_with_manual_wal_flush() {
    follow_concurrently(|o| o.set_manual_wal_flush(true), true);
}

/// Follows a database written by another thread; returns its directory.
fn follow_concurrently(configure: fn(&mut Options), flush_wal: bool) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let db = open_db_with(&dir, 3600, configure);
    let mut follower = WalFollower::new(&dir, StartPosition::Oldest).unwrap();

    let writer = thread::spawn(move || {
        let written = write_batches_with(&db, 4000, 7, flush_wal);
        if flush_wal {
            db.flush_wal(false).unwrap();
        }
        (db, written)
    });
    let mut seen = Seen::default();
    while !writer.is_finished() {
        seen.take(follower.poll().expect("poll while the database is written"));
        thread::sleep(Duration::from_millis(1));
    }
    let read_while_writing = seen.records.len();
    let (db, written) = writer.join().unwrap();
    let last_seq = db.latest_sequence_number();
    poll_until(&mut follower, &mut seen, last_seq);
    assert!(
        read_while_writing > 0,
        "the follower must read while the database is written"
    );

    assert!(seen.gaps.is_empty(), "unexpected gaps: {:?}", seen.gaps);
    assert_eq!(seen.records.len(), written.len());
    assert_eq!(seen.records[0].seq, 1);
    check_records(&seen.records, &written, 1);
    let counted: u64 = seen.records.iter().map(|r| u64::from(r.count)).sum();
    assert_eq!(counted, last_seq);
    assert!(
        seen.rotations.len() > 5,
        "only {} rotations",
        seen.rotations.len()
    );
    for w in seen.rotations.windows(2) {
        assert_eq!(w[0].1, w[1].0, "rotations must chain");
    }
    // Some of the logs read were moved to archive/ meanwhile.
    assert!(dir.join("archive").is_dir());
    let last = seen.records.last().unwrap();
    assert_eq!(
        follower.position(),
        Some(WalPosition {
            log_number: last.log_number,
            record_offset: last.log_offset,
            next_seq: last_seq + 1
        })
    );
    // Nothing new: a poll returns nothing.
    assert!(follower.poll().unwrap().is_empty());
    drop(db);
    tmp
}

#[test]
fn resumes_after_the_last_record_without_duplicates_or_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let db = open_db(&dir, 3600);
    let mut first = WalFollower::new(&dir, StartPosition::Oldest).unwrap();

    let writer = thread::spawn(move || {
        let written = write_batches(&db, 3000, 11);
        flush_all(&db);
        (db, written)
    });
    let mut seen = Seen::default();
    while seen.records.len() < 1500 {
        seen.take(first.poll().unwrap());
        thread::sleep(Duration::from_millis(1));
    }
    let position = first.position().unwrap();
    let last = seen.records.last().unwrap();
    assert_eq!(
        (
            position.log_number,
            position.record_offset,
            position.next_seq
        ),
        (last.log_number, last.log_offset, last.next_seq())
    );
    drop(first);

    let (db, written) = writer.join().unwrap();
    let last_seq = db.latest_sequence_number();
    // The log archiving stopped in has been moved to archive/ by now.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let at = log_location(&dir, position.log_number).expect("log still kept");
        if at.parent().unwrap().ends_with("archive") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "log {} not archived",
            position.log_number
        );
        thread::sleep(Duration::from_millis(20));
    }

    let mut second = WalFollower::new(&dir, position.into()).unwrap();
    assert_eq!(second.position(), Some(position));
    assert_eq!(second.next_seq(), Some(position.next_seq));
    let mut rest = Seen::default();
    poll_until(&mut second, &mut rest, last_seq);
    assert!(rest.gaps.is_empty(), "{:?}", rest.gaps);
    assert_eq!(
        rest.records[0].seq, position.next_seq,
        "no duplicate, no skip"
    );
    seen.records.extend(rest.records);
    check_records(&seen.records, &written, 1);
    assert_eq!(seen.records.len(), written.len());

    // A resume position that does not match the WAL is refused.
    let wrong = StartPosition::After {
        log_number: position.log_number,
        record_offset: position.record_offset,
        next_seq: position.next_seq + 1,
    };
    let err = WalFollower::new(&dir, wrong).unwrap_err();
    assert!(matches!(err, FollowError::ResumeMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{:06}.log", position.log_number)),
        "{err}"
    );
}

#[test]
fn deleted_wal_files_are_reported_as_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // No WAL retention: RocksDB deletes a log as soon as its data is flushed.
    let mut opts = Options::default();
    opts.create_if_missing(true);
    let db = DB::open(&opts, &dir).unwrap();
    let mut follower = WalFollower::new(&dir, StartPosition::Oldest).unwrap();
    let first_log = follower.reading().unwrap().0;

    let write = |tag: &str, n: usize| -> (u64, u64) {
        let from = db.latest_sequence_number() + 1;
        for i in 0..n {
            let mut wb = WriteBatch::default();
            wb.put(format!("{tag}-{i}"), vec![7u8; 100]);
            wb.put(format!("{tag}-{i}-b"), vec![8u8; 10]);
            db.write(wb).unwrap();
        }
        (from, db.latest_sequence_number())
    };

    let (a_first, a_last) = write("a", 20);
    db.flush().unwrap();
    let mut seen = Seen::default();
    seen.take(follower.poll().unwrap());
    assert_eq!(seen.records.len(), 20);
    assert_eq!(seen.records[0].seq, a_first);
    assert_eq!(seen.next_seq(), Some(a_last + 1));

    // While the follower does not poll, two logs are written, flushed and deleted.
    let (b_first, _) = write("b", 30);
    db.flush().unwrap();
    write("c", 30);
    db.flush().unwrap();
    let (d_first, d_last) = write("d", 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_numbers(&dir).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "logs not deleted: {:?}",
            log_numbers(&dir)
        );
        thread::sleep(Duration::from_millis(20));
    }
    let live = log_numbers(&dir)[0];

    seen.take(follower.poll().unwrap());
    assert_eq!(seen.gaps.len(), 1, "{:?}", seen.gaps);
    let (expected, found, detail) = &seen.gaps[0];
    assert_eq!((*expected, *found), (b_first, d_first));
    assert!(detail.contains(&format!("{live:06}.log")), "{detail}");
    assert!(detail.contains("WAL_ttl_seconds"), "{detail}");
    let d: Vec<u64> = seen.records[20..].iter().map(|r| r.seq).collect();
    assert_eq!(d.len(), 10);
    assert_eq!(d[0], d_first);
    assert_eq!(seen.next_seq(), Some(d_last + 1));
    assert!(
        seen.rotations
            .iter()
            .any(|&(from, to)| from == first_log && to == live)
    );
}

#[test]
fn time_markers_give_records_their_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_wal_ttl_seconds(3600);
    let db = DB::open(&opts, &dir).unwrap();
    let mut follower = WalFollower::new(&dir, StartPosition::Oldest).unwrap();

    let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
    // A marker an hour ahead, so that observed times are below it and must be raised to it.
    let t0 = SystemTime::now() + Duration::from_secs(3600);
    let batch = |blobs: &[&[u8]], put: bool| {
        let mut wb = WriteBatch::default();
        for b in blobs {
            wb.put_log_data(b);
        }
        if put {
            wb.put(b"k", b"v");
        }
        db.write(wb).unwrap();
    };
    let mut malformed = marker::encode(t0).to_vec();
    malformed[4] = 9; // an unknown marker version
    batch(&[&marker::encode(t0)], true);
    batch(&[&marker::encode(t0 - Duration::from_secs(10))], true);
    batch(&[], true);
    batch(&[&malformed], true);
    batch(
        &[b"app data", &marker::encode(t0 + Duration::from_secs(5))],
        true,
    );
    batch(&[&marker::encode(t0 + Duration::from_secs(6))], false);
    batch(&[], true);

    let mut seen = Seen::default();
    poll_until(&mut follower, &mut seen, db.latest_sequence_number());
    let got: Vec<(i64, RecordTime, u32)> = seen
        .records
        .iter()
        .map(|r| (r.time_us, r.time_source, r.count))
        .collect();
    let t = micros(t0);
    let s = 1_000_000;
    assert_eq!(
        got,
        vec![
            (t, RecordTime::Marker, 1),
            (t, RecordTime::Marker, 1), // an earlier marker is raised to its predecessor's time
            (t, RecordTime::Observed, 1),
            (t, RecordTime::Observed, 1), // the malformed marker is ignored
            (t + 5 * s, RecordTime::Marker, 1),
            (t + 6 * s, RecordTime::Marker, 0), // log data only: no sequence number
            (t + 6 * s, RecordTime::Observed, 1),
        ]
    );
    // The batch of log data only takes no sequence number: the next batch has the same one.
    assert_eq!(seen.records[5].seq, seen.records[6].seq);

    // On resume, the last archived record's time is the floor.
    let position = follower.position().unwrap();
    drop(follower);
    let mut resumed = WalFollower::new(&dir, position.into())
        .unwrap()
        .with_min_time(t + 7 * s);
    batch(&[], true);
    let mut more = Seen::default();
    poll_until(&mut resumed, &mut more, db.latest_sequence_number());
    assert_eq!(more.records.len(), 1);
    assert_eq!(more.records[0].time_us, t + 7 * s);
}

#[test]
fn a_follower_waits_for_the_database_to_appear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut follower = WalFollower::new(&dir, StartPosition::Oldest).unwrap();
    assert!(follower.poll().unwrap().is_empty());
    assert_eq!(follower.position(), None);

    let db = open_db(&dir, 3600);
    db.put(b"x", b"1").unwrap();
    db.put(b"y", b"2").unwrap();
    let mut seen = Seen::default();
    poll_until(&mut follower, &mut seen, db.latest_sequence_number());
    assert_eq!(seen.records.len(), 2);

    // A missing WAL directory is an error that names it.
    let err = WalFollower::new(&dir.join("nope"), StartPosition::Oldest).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

// Hand-made WAL files.

fn batch(seq: u64, puts: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(seq);
    for i in 0..puts {
        b.put(
            0,
            format!("k{seq}-{i}").as_bytes(),
            &vec![b'v'; 300 + i * 5000],
        );
    }
    b.finish()
}

/// Log bytes for batches of the given sizes starting at `first_seq`, and each record's start.
fn log_bytes(first_seq: u64, puts: &[usize]) -> (Vec<u8>, Vec<u64>) {
    let mut w = LogWriter::new(Vec::new());
    let mut starts = Vec::new();
    let mut seq = first_seq;
    for &n in puts {
        starts.push(w.offset());
        w.add_record(&batch(seq, n)).unwrap();
        seq += n as u64;
    }
    (w.into_inner(), starts)
}

fn records(events: &[FollowEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            FollowEvent::Record(r) => Some(r.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn a_torn_tail_is_waited_for_and_a_newer_log_is_taken_only_once_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (bytes, _) = log_bytes(1, &[1, 2, 9, 1]);
    let log5 = dir.join("000005.log");
    // The last record is torn.
    let cut = bytes.len() - 10;
    fs::write(&log5, &bytes[..cut]).unwrap();
    let mut f = WalFollower::new(dir, StartPosition::Oldest).unwrap();
    assert_eq!(records(&f.poll().unwrap()), vec![1, 2, 4]);
    assert!(f.poll().unwrap().is_empty());

    // A newer log that is still empty, or holds only metadata (here the WAL compression
    // record RocksDB writes when it creates a log), does not make the follower give up the
    // torn record.
    fs::write(dir.join("000009.log"), b"").unwrap();
    assert!(f.poll().unwrap().is_empty());
    let mut compression = Vec::new();
    compression.extend_from_slice(&mask_crc(record_crc(9, &7u32.to_le_bytes())).to_le_bytes());
    compression.extend_from_slice(&4u16.to_le_bytes());
    compression.push(9);
    compression.extend_from_slice(&7u32.to_le_bytes());
    fs::write(dir.join("000009.log"), &compression).unwrap();
    assert!(f.poll().unwrap().is_empty());
    assert_eq!(f.reading().unwrap().0, 5);

    // The record completes; then the newer log is written and the follower moves on.
    fs::write(&log5, &bytes).unwrap();
    assert_eq!(records(&f.poll().unwrap()), vec![13]);
    let (next, _) = log_bytes(14, &[1, 1]);
    fs::write(dir.join("000009.log"), &next).unwrap();
    let events = f.poll().unwrap();
    assert_eq!(
        events[0],
        FollowEvent::Rotated {
            from_log: 5,
            to_log: 9
        }
    );
    assert_eq!(records(&events), vec![14, 15]);
    assert!(f.poll().unwrap().is_empty());
}

#[test]
fn a_torn_tail_left_behind_a_written_newer_log_is_given_up_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (bytes, _) = log_bytes(1, &[1, 3]);
    fs::write(dir.join("000005.log"), &bytes[..bytes.len() - 5]).unwrap();
    let (next, _) = log_bytes(2, &[1]);
    fs::write(dir.join("000007.log"), &next).unwrap();
    let mut f = WalFollower::new(dir, StartPosition::Oldest)
        .unwrap()
        .with_torn_tail_grace(Duration::from_millis(300));
    assert_eq!(records(&f.poll().unwrap()), vec![1]);
    assert!(
        f.poll().unwrap().is_empty(),
        "waits during the grace period"
    );
    thread::sleep(Duration::from_millis(350));
    let events = f.poll().unwrap();
    // The torn record held sequences 2..=4 but was never completed; the next log continues
    // at 2 (as after a crash of the database process), so there is no gap.
    assert_eq!(records(&events), vec![2]);
    assert!(!events.iter().any(|e| matches!(e, FollowEvent::Gap { .. })));
}

#[test]
fn a_corrupt_record_inside_a_log_is_an_error_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut bytes, starts) = log_bytes(1, &[1, 1, 1]);
    bytes[starts[1] as usize + 20] ^= 0x40;
    fs::write(dir.join("000012.log"), &bytes).unwrap();
    let mut f = WalFollower::new(dir, StartPosition::Oldest).unwrap();
    // The record before it is returned first; the error comes with the next poll, and stays.
    assert_eq!(records(&f.poll().unwrap()), vec![1]);
    let err = f.poll().unwrap_err();
    assert!(
        matches!(err, FollowError::Log { log_number: 12, .. }),
        "{err}"
    );
    assert!(matches!(
        f.poll(),
        Err(FollowError::Log { log_number: 12, .. })
    ));
    let msg = err.to_string();
    assert!(msg.contains("000012.log"), "{msg}");
    assert!(msg.contains(&format!("offset {}", starts[1])), "{msg}");
}

#[test]
fn holes_and_backward_sequences_inside_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Sequences 1, then 5 (2..=4 were written with the WAL disabled), then 3.
    let mut w = LogWriter::new(Vec::new());
    w.add_record(&batch(1, 1)).unwrap();
    w.add_record(&batch(5, 2)).unwrap();
    let back = w.offset();
    w.add_record(&batch(3, 1)).unwrap();
    fs::write(dir.join("000004.log"), w.into_inner()).unwrap();
    let mut f = WalFollower::new(dir, StartPosition::Oldest).unwrap();
    assert_eq!(records(&f.poll().unwrap()), vec![1, 5]);
    let err = f.poll().unwrap_err();
    assert!(
        matches!(err, FollowError::SequenceWentBack { offset, expected: 7, found: 3, .. } if offset == back),
        "{err}"
    );

    // Without the backward record: a gap inside the log, then the records continue.
    let mut w = LogWriter::new(Vec::new());
    w.add_record(&batch(1, 1)).unwrap();
    w.add_record(&batch(5, 2)).unwrap();
    w.add_record(&batch(7, 1)).unwrap();
    fs::write(dir.join("000004.log"), w.into_inner()).unwrap();
    let mut f = WalFollower::new(dir, StartPosition::Oldest).unwrap();
    let events = f.poll().unwrap();
    assert_eq!(records(&events), vec![1, 5, 7]);
    match &events[1] {
        FollowEvent::Gap {
            expected_seq: 2,
            found_seq: 5,
            detail,
        } => assert!(detail.contains("WAL disabled"), "{detail}"),
        other => panic!("expected a gap, got {other:?}"),
    }
}

#[test]
fn resuming_in_a_log_that_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir(dir.join("archive")).unwrap();
    let (bytes, _) = log_bytes(50, &[1, 1]);
    fs::write(dir.join("archive").join("000020.log"), &bytes).unwrap();

    // Log 12 is gone, and log 20 continues exactly where archiving stopped: no gap.
    let start = StartPosition::After {
        log_number: 12,
        record_offset: 300,
        next_seq: 50,
    };
    let mut f = WalFollower::new(dir, start).unwrap();
    let events = f.poll().unwrap();
    assert_eq!(
        events[0],
        FollowEvent::Rotated {
            from_log: 12,
            to_log: 20
        }
    );
    assert_eq!(records(&events), vec![50, 51]);

    // It does not: a gap from the expected sequence, naming the missing log.
    let start = StartPosition::After {
        log_number: 12,
        record_offset: 300,
        next_seq: 40,
    };
    let mut f = WalFollower::new(dir, start).unwrap();
    let events = f.poll().unwrap();
    match &events[1] {
        FollowEvent::Gap {
            expected_seq: 40,
            found_seq: 50,
            detail,
        } => assert!(detail.contains("000012.log"), "{detail}"),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(records(&events), vec![50, 51]);
}

#[test]
fn a_poll_returns_at_most_its_budget_and_the_rest_comes_next() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path(), 3600);
    let written = write_batches(&db, 1500, 99);
    let last_seq = db.latest_sequence_number();
    let mut follower = WalFollower::new(dir.path(), StartPosition::Oldest)
        .unwrap()
        .with_poll_budget(64 * 1024);
    let mut seen = Seen::default();
    let mut polls = 0;
    while seen.next_seq() != Some(last_seq + 1) {
        let events = follower.poll().expect("poll");
        let bytes: usize = events
            .iter()
            .map(|e| match e {
                FollowEvent::Record(r) => r.batch.len(),
                _ => 0,
            })
            .sum();
        let largest = events
            .iter()
            .map(|e| match e {
                FollowEvent::Record(r) => r.batch.len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        assert!(
            bytes < 64 * 1024 + largest,
            "a poll returned {bytes} bytes, over its budget by more than one record"
        );
        assert!(
            !events.is_empty(),
            "a poll with data available returned nothing"
        );
        seen.take(events);
        polls += 1;
        assert!(polls < 100_000, "the follower does not make progress");
    }
    assert!(
        polls > 10,
        "a 64 KiB budget must split this WAL over many polls ({polls})"
    );
    check_records(&seen.records, &written, 1);
}
