//! Base backups of a real, live RocksDB that another handle writes to while the backup runs.
//!
//! The database has three column families (`default`, `plain` with deletes, and `counters`
//! with an associative add merge operator), a 64 KiB write buffer and aggressive compaction,
//! so that table files are created and deleted all the time. Every write is a deterministic
//! function of its batch number, so the expected contents at any batch are known.
//!
//! Each base is downloaded from the store, checked against its sha256s, and opened with
//! RocksDB: read-only (the table files alone: each column family must equal the writer's
//! state at some batch no later than the base's `earliest_seq`), and read-write with the
//! source's WAL records from `replay_from_seq` to a cutoff `C >= earliest_seq` rewritten as
//! WAL files beside it, the way a restore does (the database must equal the writer's state
//! at `C` exactly).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, MergeOperands, Options, WriteBatch};
use tidemark_archiver::base::{
    BaseError, BaseOptions, BaseResult, ReusableTables, take_base_backup,
};
use tidemark_manifest::checksum;
use tidemark_manifest::model::RepositoryConfig;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::rocks::DbFile;
use tidemark_manifest::rocks::log::{LogReader, LogWriter};
use tidemark_manifest::rocks::version_edit::ManifestState;
use tidemark_manifest::rocks::write_batch::BatchHeader;
use tidemark_manifest::store::LocalStore;

const CFS: [&str; 3] = ["default", "plain", "counters"];

// ---------------------------------------------------------------------------------------
// The workload: batch `i` is a pure function of `i`.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    Add(&'static str, Vec<u8>, u64),
}

/// Sequential over a key space large enough (about 2.4 MB of live data) that most of it
/// settles in the lower levels, where compactions rewrite a few files at a time.
fn default_key(i: u64) -> Vec<u8> {
    format!("d{:05}", i % 20_011).into_bytes()
}

fn plain_key(i: u64) -> Vec<u8> {
    format!("p{:04}", (i * 7) % 503).into_bytes()
}

fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = i.to_be_bytes().to_vec();
    v.extend((0..len).map(|j| b'a' + ((i as usize + j) % 26) as u8));
    v
}

fn batch_number(v: &[u8]) -> u64 {
    u64::from_be_bytes(
        v[..8]
            .try_into()
            .expect("values start with their batch number"),
    )
}

/// The operations of batch `i`. Every batch writes every column family, so the newest batch
/// number in a column family's values tells which batch its contents stop at.
fn ops(i: u64) -> Vec<Op> {
    let mut ops = vec![
        Op::Put("default", default_key(i), value(i, 120)),
        Op::Put("plain", plain_key(i), value(i, 40)),
        Op::Add("counters", format!("c{:04}", i % 211).into_bytes(), 1),
    ];
    // Deletes a key written three batches ago (never the key just put).
    if i.is_multiple_of(5) && i >= 3 {
        ops.push(Op::Delete("plain", plain_key(i - 3)));
    }
    ops
}

/// Contents of column family `cf` after batches `0..=last` (`None`: before any batch).
fn expected(cf: &str, last: Option<u64>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let Some(last) = last else {
        return state;
    };
    for i in 0..=last {
        for op in ops(i) {
            match op {
                Op::Put(c, k, v) if c == cf => {
                    state.insert(k, v);
                }
                Op::Delete(c, k) if c == cf => {
                    state.remove(&k);
                }
                Op::Add(c, k, n) if c == cf => {
                    let old = state.get(&k).map_or(0, |v| decode_u64(v));
                    state.insert(k, (old + n).to_le_bytes().to_vec());
                }
                _ => {}
            }
        }
    }
    state
}

fn decode_u64(v: &[u8]) -> u64 {
    u64::from_le_bytes(
        v.try_into()
            .expect("counters are 8-byte little-endian integers"),
    )
}

fn add_u64(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut sum = existing.map_or(0, decode_u64);
    for op in operands {
        sum += decode_u64(op);
    }
    Some(sum.to_le_bytes().to_vec())
}

fn cf_options(name: &str, churn: bool) -> Options {
    let mut o = Options::default();
    if churn {
        o.set_write_buffer_size(64 * 1024);
        o.set_level_zero_file_num_compaction_trigger(2);
        o.set_target_file_size_base(64 * 1024);
        o.set_max_bytes_for_level_base(256 * 1024);
    } else {
        // Flushes only when the test asks for one.
        o.set_write_buffer_size(16 << 20);
        o.set_disable_auto_compactions(true);
    }
    if name == "counters" {
        o.set_merge_operator_associative("tidemark_test_add_u64", add_u64);
    }
    o
}

fn db_options(churn: bool) -> Options {
    let mut o = cf_options("default", churn);
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_wal_ttl_seconds(3600);
    o.set_max_background_jobs(2);
    o
}

fn descriptors(churn: bool) -> Vec<ColumnFamilyDescriptor> {
    CFS.iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n, churn)))
        .collect()
}

fn open_source(dir: &Path, wal_dir: Option<&Path>, churn: bool) -> DB {
    let mut opts = db_options(churn);
    if let Some(w) = wal_dir {
        opts.set_wal_dir(w);
    }
    DB::open_cf_descriptors(&opts, dir, descriptors(churn)).expect("open the source database")
}

fn write_batch(db: &DB, i: u64) {
    let mut b = WriteBatch::default();
    for op in ops(i) {
        match op {
            Op::Put(cf, k, v) => b.put_cf(db.cf_handle(cf).unwrap(), k, v),
            Op::Delete(cf, k) => b.delete_cf(db.cf_handle(cf).unwrap(), k),
            Op::Add(cf, k, n) => b.merge_cf(db.cf_handle(cf).unwrap(), k, n.to_le_bytes()),
        }
    }
    db.write(b).expect("write a batch");
}

/// Writes batches on a thread; `seqs[i]` is the last sequence number of batch `i`.
struct Writer {
    stop: Arc<AtomicBool>,
    seqs: Arc<Mutex<Vec<u64>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: Arc<DB>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (db, stop, seqs) = (Arc::clone(&db), Arc::clone(&stop), Arc::clone(&seqs));
            threads.push(thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    write_batch(&db, i);
                    seqs.lock().unwrap().push(db.latest_sequence_number());
                    i += 1;
                    if i.is_multiple_of(8) {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            }));
        }
        {
            // Flushes, and compactions of narrow key ranges, on top of the automatic ones.
            let (db, stop) = (Arc::clone(&db), Arc::clone(&stop));
            threads.push(thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(15));
                    let cf = db.cf_handle(CFS[n as usize % 3]).unwrap();
                    db.flush_cf(cf).expect("flush");
                    if n % 10 == 9 {
                        let from = (n * 131) % 20_000;
                        db.compact_range_cf(
                            cf,
                            Some(format!("d{from:05}").as_bytes()),
                            Some(format!("d{:05}", from + 400).as_bytes()),
                        );
                    }
                    n += 1;
                }
            }));
        }
        Writer {
            stop,
            seqs,
            threads,
        }
    }

    fn seqs(&self) -> Vec<u64> {
        self.seqs.lock().unwrap().clone()
    }

    fn batches(&self) -> usize {
        self.seqs.lock().unwrap().len()
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("writer thread");
        }
        self.seqs()
    }
}

impl Drop for Writer {
    /// Stops the threads also when a check fails, before the database directory goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The last batch whose sequence numbers are all `<= seq`.
fn batch_at(seqs: &[u64], seq: u64) -> Option<u64> {
    seqs.partition_point(|&s| s <= seq)
        .checked_sub(1)
        .map(|b| b as u64)
}

// ---------------------------------------------------------------------------------------
// Repository and checks
// ---------------------------------------------------------------------------------------

async fn new_repo(root: &Path, db_dir: &Path) -> Repository {
    let repo = Repository::new(Arc::new(LocalStore::create(root).unwrap()));
    let identity = fs::read_to_string(db_dir.join("IDENTITY")).unwrap();
    repo.create_config(&RepositoryConfig {
        database_identity: identity.trim().to_owned(),
        ..tidemark_manifest::testing::config()
    })
    .await
    .unwrap();
    repo
}

/// Downloads a base's files into `dir`, checking each against the descriptor, which is
/// itself read and checked through the repository like a restore does.
async fn download(repo: &Repository, base: &BaseResult, dir: &Path) {
    let descriptor = repo
        .read_base(1, &base.summary)
        .await
        .expect("read base.json");
    assert_eq!(descriptor, base.descriptor);
    fs::create_dir_all(dir).unwrap();
    for f in &descriptor.files {
        let path = dir.join(&f.name);
        let n = repo.store().get_to_file(&f.key, &path).await.unwrap();
        assert_eq!(n, f.size, "{}", f.name);
        let (sha, size) = checksum::sha256_file(&path).unwrap();
        assert_eq!(
            (sha.as_str(), size),
            (f.sha256.as_str(), f.size),
            "{}",
            f.name
        );
        if f.name.ends_with(".sst") {
            assert_eq!(f.key, format!("sst/{sha}"));
        } else {
            assert_eq!(f.key, format!("bases/{}/files/{}", base.summary.id, f.name));
        }
    }
}

fn read_cf(db: &DB, cf: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    db.iterator_cf(db.cf_handle(cf).unwrap(), IteratorMode::Start)
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// The batch a column family's contents stop at, from the contents alone.
fn last_batch_in(cf: &str, contents: &BTreeMap<Vec<u8>, Vec<u8>>) -> Option<u64> {
    match cf {
        "counters" => {
            let merges: u64 = contents.values().map(|v| decode_u64(v)).sum();
            merges.checked_sub(1)
        }
        _ => contents.values().map(|v| batch_number(v)).max(),
    }
}

/// Opens the base's table files alone, read-only: each column family must be the writer's
/// state at one batch, no later than the batch at `earliest_seq`.
fn check_tables_alone(dir: &Path, base: &BaseResult, seqs: &[u64]) {
    let mut opts = db_options(true);
    opts.create_if_missing(false);
    let db = DB::open_cf_descriptors_read_only(&opts, dir, descriptors(true), false)
        .expect("the base opens read-only");
    assert!(
        db.latest_sequence_number() <= base.summary.earliest_seq,
        "the base's MANIFEST is at {}, after earliest_seq {}",
        db.latest_sequence_number(),
        base.summary.earliest_seq
    );
    let at_earliest = batch_at(seqs, base.summary.earliest_seq);
    for cf in CFS {
        let contents = read_cf(&db, cf);
        let last = last_batch_in(cf, &contents);
        assert!(
            last <= at_earliest,
            "{cf}: the base holds batch {last:?}, after the batch at earliest_seq ({at_earliest:?})"
        );
        assert!(
            contents == expected(cf, last),
            "{cf}: the base's table files are not the writer's state at batch {last:?}"
        );
    }
}

/// Rewrites the source's WAL records `replay_from_seq..=cutoff` (read from the live WAL
/// directory and `archive/`) as WAL files with their original numbers in `dir`, checking
/// that they start at `replay_from_seq`, are contiguous and end at `cutoff`.
fn place_wal(wal_dir: &Path, base: &BaseResult, cutoff: u64, dir: &Path) {
    let min_log = base.summary.min_log_number;
    let mut numbers = BTreeSet::new();
    for d in [wal_dir.to_path_buf(), wal_dir.join("archive")] {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries {
                if let Some(DbFile::Wal(n)) =
                    DbFile::parse(&e.unwrap().file_name().to_string_lossy())
                    && n >= min_log
                {
                    numbers.insert(n);
                }
            }
        }
    }
    let mut next: Option<u64> = None;
    'logs: for n in numbers {
        let name = DbFile::Wal(n).file_name().unwrap();
        let path = [wal_dir.join(&name), wal_dir.join("archive").join(&name)]
            .into_iter()
            .find(|p| p.exists())
            .expect("a WAL file of the source was deleted");
        let mut reader = LogReader::open(&path).unwrap();
        let mut out: Option<LogWriter<BufWriter<fs::File>>> = None;
        while let Some(record) = reader.next_record().unwrap() {
            let h = BatchHeader::parse(&record.bytes).unwrap();
            if h.sequence > cutoff {
                if let Some(mut w) = out.take() {
                    w.flush().unwrap();
                }
                break 'logs;
            }
            match next {
                None => assert_eq!(
                    h.sequence, base.summary.replay_from_seq,
                    "the first record of WAL {min_log} and up is not replay_from_seq"
                ),
                Some(expected) => assert_eq!(h.sequence, expected, "gap in the source's WAL"),
            }
            next = Some(h.next_sequence());
            out.get_or_insert_with(|| {
                LogWriter::new(BufWriter::new(fs::File::create(dir.join(&name)).unwrap()))
            })
            .add_record(&record.bytes)
            .unwrap();
        }
        if let Some(mut w) = out {
            w.flush().unwrap();
        }
    }
    assert_eq!(
        next.map(|n| n - 1),
        Some(cutoff),
        "the source's WAL does not reach the cutoff {cutoff} at a batch boundary"
    );
}

/// Restores the base to `cutoff` the way the restore tool does, and compares every column
/// family with the writer's state there.
fn check_restore(
    base_dir: &Path,
    work: &Path,
    wal_dir: &Path,
    base: &BaseResult,
    seqs: &[u64],
    cutoff: u64,
) {
    let dir = work.join(format!("restore-{}-{cutoff}", base.summary.id));
    fs::create_dir_all(&dir).unwrap();
    for e in fs::read_dir(base_dir).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    place_wal(wal_dir, base, cutoff, &dir);
    let mut opts = db_options(true);
    opts.create_if_missing(false);
    opts.set_disable_auto_compactions(true);
    let db = DB::open_cf_descriptors(&opts, &dir, descriptors(true)).expect("restored copy opens");
    assert_eq!(
        db.latest_sequence_number(),
        cutoff,
        "restored to the wrong sequence"
    );
    let batch = batch_at(seqs, cutoff);
    assert_eq!(batch.map(|b| seqs[b as usize]), Some(cutoff));
    for cf in CFS {
        assert!(
            read_cf(&db, cf) == expected(cf, batch),
            "{cf}: base {} + WAL up to {cutoff} is not the writer's state at batch {batch:?}",
            base.summary.id
        );
    }
    drop(db);
    fs::remove_dir_all(&dir).unwrap();
}

/// Checks of a base that need neither the download nor RocksDB.
fn check_summary(base: &BaseResult, db_dir: &Path, wal_dir: &Path) {
    let s = &base.summary;
    let d = &base.descriptor;
    assert_eq!(
        s.column_families
            .iter()
            .map(|c| c.name.as_str())
            .collect::<BTreeSet<_>>(),
        CFS.into_iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(d.column_families.len(), 3);
    assert!(s.replay_from_seq <= s.earliest_seq + 1, "{s:?}");
    assert_eq!(s.total_size, d.files.iter().map(|f| f.size).sum::<u64>());
    assert_eq!(s.total_size, base.stats.bytes_total);
    assert_eq!(
        base.stats.bytes_uploaded + base.stats.bytes_deduplicated,
        base.stats.bytes_total
    );
    let names: Vec<&str> = d.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names[0], "CURRENT");
    assert!(
        names[1].starts_with("MANIFEST-") && names[2].starts_with("OPTIONS-"),
        "{names:?}"
    );
    assert!(names[3..].iter().all(|n| n.ends_with(".sst")), "{names:?}");
    // The live database never needs an older WAL than the base did.
    let live = ManifestState::from_db_dir(db_dir).unwrap();
    assert!(live.min_wal_number_for_recovery(false) >= s.min_log_number);
    // The WAL the base needs is still there (in the WAL directory or archive/). Log number 0
    // means a column family was never flushed: every WAL since the database was created is
    // needed, and the first batch is replayed.
    if s.min_log_number == 0 {
        assert_eq!(s.replay_from_seq, 1);
    } else {
        let name = DbFile::Wal(s.min_log_number).file_name().unwrap();
        assert!(
            wal_dir.join(&name).exists() || wal_dir.join("archive").join(&name).exists(),
            "WAL {name} the base needs is gone"
        );
    }
    // Nothing referenced is missing: every table of the base's MANIFEST is in the base.
    let tables: BTreeSet<&str> = names[3..].iter().copied().collect();
    assert_eq!(tables.len(), names.len() - 3);
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tidemark_archiver=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn scratch_is_empty(scratch: &Path) -> bool {
    fs::read_dir(scratch).map_or(true, |mut d| d.next().is_none())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Takes `rounds` pairs of bases of a database under heavy writes, flushes and compactions,
/// then checks every base: table files alone, and restored exactly at `earliest_seq` and
/// 700 batches later.
async fn bases_under_heavy_writes(scratch: &Path, rounds: usize) -> Vec<BaseResult> {
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let work = tmp.path().join("work");
    let db = Arc::new(open_source(&db_dir, None, true));
    let repo = new_repo(&tmp.path().join("repo"), &db_dir).await;
    let writer = Writer::start(Arc::clone(&db));

    let mut bases: Vec<BaseResult> = Vec::new();
    for round in 0..rounds {
        while writer.batches() < 6_000 * (round + 1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let opts = BaseOptions {
            // Every other round pauses between the copy steps, so that flushes and
            // compactions happen in the middle of the copy.
            step_pause: if round % 2 == 1 {
                Duration::from_millis(150)
            } else {
                Duration::ZERO
            },
            ..BaseOptions::default()
        };
        let first = take_base_backup(&db_dir, &db_dir, scratch, &repo, &opts)
            .await
            .expect("base backup");
        // A second base right after the first shares most of its table files (reused
        // once the first is in the current generation).
        let reuse = BaseOptions {
            reusable: ReusableTables::from_descriptors([&first.descriptor]),
            ..opts.clone()
        };
        let second = take_base_backup(&db_dir, &db_dir, scratch, &repo, &reuse)
            .await
            .expect("second base backup");
        assert!(
            second.stats.bytes_deduplicated > 0
                && second.stats.bytes_uploaded < second.stats.bytes_total,
            "no deduplication: {:?}",
            second.stats
        );
        assert!(second.summary.earliest_seq >= first.summary.earliest_seq);
        assert!(scratch_is_empty(scratch), "scratch directory left behind");
        bases.push(first);
        bases.push(second);
    }

    // Let the writer run past every base's earliest_seq, then check each base.
    let newest = bases.iter().map(|b| b.summary.earliest_seq).max().unwrap();
    loop {
        let seqs = writer.seqs();
        if batch_at(&seqs, newest).is_some_and(|b| (b as usize) + 1_000 < seqs.len()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seqs = writer.seqs();
    for base in &bases {
        check_summary(base, &db_dir, &db_dir);
        let base_dir = work.join(&base.summary.id);
        download(&repo, base, &base_dir).await;
        check_tables_alone(&base_dir, base, &seqs);
        let at = base.summary.earliest_seq;
        check_restore(&base_dir, &work, &db_dir, base, &seqs, at);
        let later_batch = batch_at(&seqs, at).unwrap() + 700;
        check_restore(
            &base_dir,
            &work,
            &db_dir,
            base,
            &seqs,
            seqs[later_batch as usize],
        );
    }
    let seqs = writer.stop();
    eprintln!(
        "{} bases over {} batches ({} sequence numbers), {} copy attempts; first base {:?}",
        bases.len(),
        seqs.len(),
        seqs.last().unwrap(),
        bases.iter().map(|b| b.stats.attempts).sum::<u32>(),
        bases[0].stats
    );
    bases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bases_of_a_database_under_heavy_writes_are_consistent() {
    init_tracing();
    let scratch = tempfile::tempdir().unwrap();
    let bases = bases_under_heavy_writes(scratch.path(), 4).await;
    assert!(bases.iter().all(|b| !b.stats.copied_instead_of_linked));
}

/// With the scratch directory on another file system the table files cannot be hard-linked:
/// they are copied, including files RocksDB is still writing, which must be copied again
/// once the MANIFEST shows them complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bases_copied_across_file_systems_are_consistent() {
    init_tracing();
    let shm = Path::new("/dev/shm");
    let probe = tempfile::tempdir().unwrap();
    let other_fs = fs::metadata(shm).map(|m| m.dev()).ok();
    assert!(
        other_fs.is_some_and(|dev| dev != fs::metadata(probe.path()).unwrap().dev()),
        "this test needs /dev/shm on a different file system than {}",
        probe.path().display()
    );
    let scratch = tempfile::tempdir_in(shm).unwrap();
    let bases = bases_under_heavy_writes(scratch.path(), 2).await;
    assert!(bases.iter().all(|b| b.stats.copied_instead_of_linked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_database_is_backed_up_exactly_and_deduplicated_completely() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let scratch = tmp.path().join("scratch");
    let db = open_source(&db_dir, None, false);
    let repo = new_repo(&tmp.path().join("repo"), &db_dir).await;

    // Before any flush: no table file, every WAL needed.
    let mut seqs = Vec::new();
    for i in 0..50 {
        write_batch(&db, i);
        seqs.push(db.latest_sequence_number());
    }
    let opts = BaseOptions::default();
    let base = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &opts)
        .await
        .unwrap();
    assert_eq!(base.summary.earliest_seq, db.latest_sequence_number());
    assert_eq!(base.summary.replay_from_seq, 1);
    assert_eq!(base.stats.table_files, 0);
    let dir = tmp.path().join("work").join(&base.summary.id);
    download(&repo, &base, &dir).await;
    check_tables_alone(&dir, &base, &seqs);
    check_restore(
        &dir,
        &tmp.path().join("work"),
        &db_dir,
        &base,
        &seqs,
        base.summary.earliest_seq,
    );

    // After flushes and more writes.
    for i in 50..3_000 {
        write_batch(&db, i);
        seqs.push(db.latest_sequence_number());
    }
    for cf in ["default", "plain"] {
        db.flush_cf(db.cf_handle(cf).unwrap()).unwrap();
    }
    for i in 3_000..3_100 {
        write_batch(&db, i);
        seqs.push(db.latest_sequence_number());
    }
    let first = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &opts)
        .await
        .unwrap();
    assert_eq!(first.summary.earliest_seq, db.latest_sequence_number());
    assert!(first.stats.table_files > 0);
    assert_eq!(first.stats.tables_deduplicated, 0);
    let reuse = BaseOptions {
        reusable: ReusableTables::from_descriptors([&first.descriptor]),
        ..opts.clone()
    };
    let second = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &reuse)
        .await
        .unwrap();
    assert_eq!(second.stats.tables_uploaded, 0, "{:?}", second.stats);
    assert_eq!(second.stats.tables_deduplicated, first.stats.table_files);
    let table_bytes: u64 = first
        .descriptor
        .files
        .iter()
        .filter(|f| f.name.ends_with(".sst"))
        .map(|f| f.size)
        .sum();
    assert_eq!(second.stats.bytes_deduplicated, table_bytes);
    assert_ne!(first.summary.id, second.summary.id);
    for base in [&first, &second] {
        check_summary(base, &db_dir, &db_dir);
        let dir = tmp.path().join("work").join(&base.summary.id);
        download(&repo, base, &dir).await;
        check_tables_alone(&dir, base, &seqs);
        check_restore(
            &dir,
            &tmp.path().join("work"),
            &db_dir,
            base,
            &seqs,
            base.summary.earliest_seq,
        );
    }
    // The counters column family was never flushed: the base needs the WAL from before the
    // flushes, and replays from the very first batch.
    assert_eq!(first.summary.replay_from_seq, 1);
    assert!(scratch_is_empty(&scratch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_wal_directory_is_read_and_a_wrong_one_is_refused() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let wal_dir = tmp.path().join("wal");
    let scratch = tmp.path().join("scratch");
    let db = open_source(&db_dir, Some(&wal_dir), false);
    let repo = new_repo(&tmp.path().join("repo"), &db_dir).await;
    let mut seqs = Vec::new();
    for i in 0..2_000 {
        write_batch(&db, i);
        seqs.push(db.latest_sequence_number());
        if i == 1_000 {
            db.flush_cf(db.cf_handle("counters").unwrap()).unwrap();
        }
    }
    let opts = BaseOptions::default();

    let err = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, BaseError::NoWal { .. }), "{err}");
    assert!(err.to_string().contains("wal_dir"), "{err}");
    assert!(
        scratch_is_empty(&scratch),
        "scratch directory left behind after a failure"
    );

    let base = take_base_backup(&db_dir, &wal_dir, &scratch, &repo, &opts)
        .await
        .unwrap();
    assert_eq!(base.summary.earliest_seq, db.latest_sequence_number());
    check_summary(&base, &db_dir, &wal_dir);
    let dir = tmp.path().join("work").join(&base.summary.id);
    download(&repo, &base, &dir).await;
    check_tables_alone(&dir, &base, &seqs);
    check_restore(
        &dir,
        &tmp.path().join("work"),
        &wal_dir,
        &base,
        &seqs,
        base.summary.earliest_seq,
    );
    assert!(scratch_is_empty(&scratch));

    // Not a database at all.
    let err = take_base_backup(&tmp.path().join("repo"), &wal_dir, &scratch, &repo, &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, BaseError::NotADatabase { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_of_another_database_is_refused() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let other_dir = tmp.path().join("other");
    let scratch = tmp.path().join("scratch");
    let db = open_source(&db_dir, None, false);
    let other = open_source(&other_dir, None, false);
    write_batch(&db, 0);
    write_batch(&other, 0);
    let repo = new_repo(&tmp.path().join("repo"), &other_dir).await;
    let err = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &BaseOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BaseError::WrongDatabase { .. }), "{err}");
    assert!(
        repo.store().list("bases/").await.unwrap().is_empty(),
        "a base descriptor was written to another database's repository"
    );
    assert!(scratch_is_empty(&scratch));

    // No repository at all.
    let empty = Repository::new(Arc::new(
        LocalStore::create(tmp.path().join("empty")).unwrap(),
    ));
    let err = take_base_backup(&db_dir, &db_dir, &scratch, &empty, &BaseOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no Tidemark repository"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tables_a_current_base_lists_are_reused_never_a_stray_object_of_the_same_size() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let scratch = tmp.path().join("scratch");
    let db = open_source(&db_dir, None, false);
    let repo = new_repo(&tmp.path().join("repo"), &db_dir).await;
    for i in 0..500 {
        write_batch(&db, i);
    }
    for cf in ["default", "plain"] {
        db.flush_cf(db.cf_handle(cf).unwrap()).unwrap();
    }
    // Objects under the keys of the database's table files, of the right size but damaged
    // (as a base abandoned mid-upload, or a bad disk, may leave them), that no base lists.
    let mut strays = Vec::new();
    for entry in std::fs::read_dir(&db_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sst") {
            let (sha, size) = tidemark_manifest::checksum::sha256_file(&path).unwrap();
            let key = tidemark_manifest::keys::sst_key(&sha);
            repo.store()
                .put(&key, bytes::Bytes::from(vec![0u8; size as usize]))
                .await
                .unwrap();
            strays.push(key);
        }
    }
    assert!(!strays.is_empty(), "the flushes made table files");
    let base = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &BaseOptions::default())
        .await
        .unwrap();
    assert_eq!(base.stats.tables_deduplicated, 0, "{:?}", base.stats);
    for key in &strays {
        let stored = repo.store().get(key).await.unwrap();
        assert_eq!(
            tidemark_manifest::keys::sst_key(&tidemark_manifest::checksum::sha256_hex(&stored)),
            *key,
            "the damaged object under {key} was reused"
        );
    }
    // Listed by a base of the current generation: reused without uploading.
    let again = BaseOptions {
        reusable: ReusableTables::from_descriptors([&base.descriptor]),
        ..BaseOptions::default()
    };
    let second = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &again)
        .await
        .unwrap();
    assert_eq!(second.stats.tables_uploaded, 0, "{:?}", second.stats);
}

/// In a repository with an object lock a table is reused only while half of its lock is
/// left; an older one is uploaded again, freshly locked (FORMAT.md §3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_an_object_lock_only_tables_with_half_their_lock_left_are_reused() {
    use tidemark_manifest::model::{LockMode, ObjectLock};
    use tidemark_manifest::store::MemoryStore;
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let db_dir = tmp.path().join("db");
    let scratch = tmp.path().join("scratch");
    let db = open_source(&db_dir, None, false);
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::new(store.clone());
    let identity = fs::read_to_string(db_dir.join("IDENTITY")).unwrap();
    repo.create_config(&RepositoryConfig {
        database_identity: identity.trim().to_owned(),
        object_lock: Some(ObjectLock::new(LockMode::Governance, 4).unwrap()),
        ..tidemark_manifest::testing::config()
    })
    .await
    .unwrap();
    for i in 0..2_000 {
        write_batch(&db, i);
    }
    for cf in ["default", "plain"] {
        db.flush_cf(db.cf_handle(cf).unwrap()).unwrap();
    }
    let opts = BaseOptions::default();
    let first = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &opts)
        .await
        .unwrap();
    assert!(first.stats.table_files > 0);
    let reuse = BaseOptions {
        reusable: ReusableTables::from_descriptors([&first.descriptor]),
        ..opts.clone()
    };
    // Fresh locks: every table is reused.
    let second = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &reuse)
        .await
        .unwrap();
    assert_eq!(second.stats.tables_uploaded, 0, "{:?}", second.stats);
    // Three of four days gone: less than half is left, every table goes up again.
    store.age(time::Duration::days(3));
    let third = take_base_backup(&db_dir, &db_dir, &scratch, &repo, &reuse)
        .await
        .unwrap();
    assert_eq!(third.stats.tables_deduplicated, 0, "{:?}", third.stats);
    assert_eq!(third.stats.tables_uploaded, first.stats.table_files);
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(3);
    for f in third
        .descriptor
        .files
        .iter()
        .filter(|f| f.key.starts_with("sst/"))
    {
        let until = store.retain_until(&f.key).expect("locked");
        assert!(until > soon, "{} is locked only until {until}", f.key);
    }
}
