//! Hostile and corrupt input to every parser of the format: random bytes, and valid
//! encodings mutated (bits flipped, truncated, spliced, bytes inserted, large lengths
//! written over length fields). Whatever the input, a parser returns a value or an error:
//! never a panic, never an allocation the input does not pay for.
//!
//! Memory: this test binary runs under an address-space limit ([`ADDRESS_SPACE_LIMIT`]);
//! a parser that reserved memory for a length it read (up to 4 GiB for a 32-bit field, far
//! more for a 64-bit one) instead of the bytes it has would abort the whole binary.
//!
//! Cases: `PROPTEST_CASES` (default [`DEFAULT_CASES`], a few seconds per parser in CI;
//! `scripts/torture.sh` runs many more).

use std::io::Cursor;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use time::OffsetDateTime;

use tidemark_manifest::keyring::{DataKeyEntry, Keyring, RetiredKek, Wrap};
use tidemark_manifest::model::{
    self, BaseColumnFamily, BaseDescriptor, BaseFile, BaseSummary, ColumnFamily, Compression,
    Encryption, Gap, GapKind, Generation, IndexPage, IndexPageRef, LatestHint, Lease, Lineage,
    LineageParent, ObjectRef, Pin, PruneRecord, RepositoryConfig, Retention, SegmentEntry,
    TimeSource, Writer,
};
use tidemark_manifest::origin::{self, Origin, OriginParent};
use tidemark_manifest::rocks::log::{LogReader, LogWriter, PredecessorWalInfo};
use tidemark_manifest::rocks::options_file::OptionsFile;
use tidemark_manifest::rocks::version_edit::{ManifestState, VersionEdit};
use tidemark_manifest::rocks::write_batch::{Batch, BatchBuilder, BatchHeader};
use tidemark_manifest::rocks::{log, marker};
use tidemark_manifest::segment::{self, Record, RecordTime, SegmentBuilder, SegmentReader};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;
/// The address space this binary may use: far above what any test here needs, far below
/// what trusting a hostile length would take.
const ADDRESS_SPACE_LIMIT: u64 = 3 << 30;

fn config() -> ProptestConfig {
    limit_memory();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn limit_memory() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let current = getrlimit(Resource::As);
        let limit = current
            .maximum
            .map_or(ADDRESS_SPACE_LIMIT, |m| m.min(ADDRESS_SPACE_LIMIT));
        setrlimit(
            Resource::As,
            Rlimit {
                current: Some(limit),
                maximum: current.maximum,
            },
        )
        .expect("cannot limit the address space");
    });
}

// ----------------------------------------------------------------------------------------
// Mutations

/// Values written over length fields: the largest of each width, and around the sign bits.
const LARGE: [u64; 8] = [
    u64::MAX,
    i64::MAX as u64,
    u32::MAX as u64,
    i32::MAX as u64,
    (u32::MAX as u64) + 1,
    1 << 31,
    0xFFFF,
    1 << 40,
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    /// Replaces the bytes from one position on, as many as given, by those bytes.
    Splice(Index, Vec<u8>),
    Insert(Index, Vec<u8>),
    /// Writes a large value, little-endian, in 2, 4 or 8 bytes, over the bytes at a position.
    LargeFixed(Index, usize, u8),
    /// Inserts a large value as a varint.
    LargeVarint(Index, usize),
    /// Copies a range of the input over another place (like a misplaced block).
    Duplicate(Index, Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Splice(i, v)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        2 => (any::<Index>(), 0..LARGE.len(), prop_oneof![Just(2u8), Just(4u8), Just(8u8)])
            .prop_map(|(i, v, w)| Mutation::LargeFixed(i, v, w)),
        1 => (any::<Index>(), 0..LARGE.len()).prop_map(|(i, v)| Mutation::LargeVarint(i, v)),
        1 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(a, b, c)| Mutation::Duplicate(a, b, c)),
    ]
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        bytes.push(0);
    }
    let len = bytes.len();
    match m {
        Mutation::Flip(i, bit) => bytes[i.index(len)] ^= 1 << bit,
        Mutation::Truncate(i) => bytes.truncate(i.index(len)),
        Mutation::Splice(i, v) => {
            let at = i.index(len);
            let end = (at + v.len()).min(len);
            bytes.splice(at..end, v.iter().copied());
        }
        Mutation::Insert(i, v) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Mutation::LargeFixed(i, v, width) => {
            let at = i.index(len);
            let w = usize::from(*width);
            let value = LARGE[*v].to_le_bytes();
            let end = (at + w).min(len);
            bytes[at..end].copy_from_slice(&value[..end - at]);
        }
        Mutation::LargeVarint(i, v) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, varint(LARGE[*v]));
        }
        Mutation::Duplicate(from, to, n) => {
            let a = from.index(len);
            let n = n.index(len - a) + 1;
            let chunk = bytes[a..a + n].to_vec();
            let b = to.index(len);
            let end = (b + n).min(len);
            bytes[b..end].copy_from_slice(&chunk[..end - b]);
        }
    }
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..5)
}

fn mutated(seed: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for m in ms {
        apply(&mut bytes, m);
    }
    bytes
}

// ----------------------------------------------------------------------------------------
// Seeds: valid encodings

fn batch(seq: u64, n: usize, size: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(seq);
    for i in 0..n {
        let key = format!("key-{seq}-{i}");
        b.put((i % 2) as u32, key.as_bytes(), &vec![i as u8; size + i % 7]);
    }
    b.delete(0, b"gone");
    b.log_data(&marker::encode(std::time::UNIX_EPOCH));
    b.finish()
}

fn segment_seed(zstd: bool, big: bool) -> Vec<u8> {
    let compression = if zstd {
        Compression::Zstd
    } else {
        Compression::None
    };
    let mut b = SegmentBuilder::new(compression, 3).unwrap();
    let mut seq = 1000;
    for i in 0..4 {
        // Big: about 300 KB of records, so that a zstd body holds two frames.
        let data = batch(seq, 1 + i, if big { 30_000 } else { 10 });
        let count = BatchHeader::parse(&data).unwrap().count;
        b.push(&Record {
            seq,
            count,
            time_us: 1_700_000_000_000_000 + i as i64,
            time_source: if i == 1 {
                RecordTime::Marker
            } else {
                RecordTime::Observed
            },
            log_number: 9,
            log_offset: i as u64 * 100,
            batch: data,
        })
        .unwrap();
        seq += u64::from(count);
    }
    b.finish().unwrap().bytes.to_vec()
}

/// A log written by [`LogWriter`]: metadata records, short records and records that span
/// blocks.
fn log_seed(big: bool) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new());
    w.add_predecessor_wal_info(&PredecessorWalInfo {
        log_number: 7,
        size_bytes: 1234,
        last_batch_sequence: 99,
    })
    .unwrap();
    w.add_timestamp_size_record(&[(1, 8), (2, 0)]).unwrap();
    for i in 0..4u64 {
        w.add_record(&batch(100 + i * 10, 3, if big { 20_000 } else { 50 }))
            .unwrap();
    }
    w.flush().unwrap();
    w.into_inner()
}

/// A real database's MANIFEST, its VersionEdits, its OPTIONS file and a WAL, from the
/// bundled RocksDB.
struct RocksSeeds {
    manifest: Vec<u8>,
    edits: Vec<Vec<u8>>,
    options: String,
    wal: Vec<u8>,
}

fn rocks_seeds() -> &'static RocksSeeds {
    static SEEDS: OnceLock<RocksSeeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&opts, &path, ["default", "other"]).unwrap();
        for i in 0..200u32 {
            db.put(format!("k{i}"), vec![i as u8; 100]).unwrap();
        }
        db.flush().unwrap();
        let cf = db.cf_handle("other").unwrap();
        for i in 0..50u32 {
            db.put_cf(&cf, format!("o{i}"), b"v").unwrap();
        }
        db.delete(b"k1").unwrap();
        let mut wal = Vec::new();
        let mut manifest = Vec::new();
        let mut options = String::new();
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") {
                wal = std::fs::read(entry.path()).unwrap();
            } else if name.starts_with("MANIFEST-") {
                manifest = std::fs::read(entry.path()).unwrap();
            } else if name.starts_with("OPTIONS-") {
                options = std::fs::read_to_string(entry.path()).unwrap();
            }
        }
        drop(db);
        assert!(!wal.is_empty() && !manifest.is_empty() && !options.is_empty());
        let edits = LogReader::new(Cursor::new(manifest.clone()), "MANIFEST")
            .unwrap()
            .map(|r| r.unwrap().bytes)
            .collect();
        RocksSeeds {
            manifest,
            edits,
            options,
            wal,
        }
    })
}

fn t(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + s).unwrap()
}

fn object_ref(key: &str) -> ObjectRef {
    ObjectRef {
        key: key.into(),
        size: 1234,
        sha256: "ab".repeat(32),
    }
}

fn segment_entry(first: u64) -> SegmentEntry {
    SegmentEntry {
        key: format!("wal/{first:016x}.seg"),
        first_seq: first,
        last_seq: first + 9,
        record_count: 3,
        first_time: t(1),
        last_time: t(2),
        time_source: TimeSource::Mixed,
        first_log: 4,
        last_log: 5,
        raw_size: 4000,
        stored_size: 1000,
        sha256: Some("cd".repeat(32)),
    }
}

fn base_summary() -> BaseSummary {
    BaseSummary {
        id: "20261204T170000Z-1".into(),
        created_at: t(0),
        descriptor: object_ref("bases/20261204T170000Z-1/base.json"),
        min_log_number: 4,
        replay_from_seq: 10,
        earliest_seq: 10,
        earliest_time: t(0),
        column_families: vec![ColumnFamily {
            id: 0,
            name: "default".into(),
        }],
        total_size: 99,
    }
}

/// One valid document of every kind, as stored.
fn documents() -> Vec<(&'static str, Vec<u8>)> {
    let config = RepositoryConfig {
        format_version: model::FORMAT_VERSION,
        repository_id: "r-1".into(),
        created_at: t(0),
        database_identity: "ident".into(),
        lineage: Lineage {
            id: "l-1".into(),
            parent: Some(LineageParent {
                repository: "s3://b/p".into(),
                lineage: "l-0".into(),
                sequence: 77,
            }),
        },
        segment_compression: Compression::Zstd,
        encryption: Some(Encryption {
            algorithm: "xchacha20-poly1305".into(),
            chunk_size: 65536,
            key_id: "0123456789abcdef".into(),
        }),
        object_lock: Some(tidemark_manifest::model::ObjectLock {
            mode: tidemark_manifest::model::LockMode::Compliance,
            days: 30,
        }),
    };
    let generation = Generation {
        format_version: model::FORMAT_VERSION,
        generation: 12,
        repository_id: "r-1".into(),
        written_at: t(5),
        writer: Writer {
            host: "h".into(),
            pid: 4,
            version: "0.1.0".into(),
        },
        time_precision: TimeSource::Observed,
        bases: vec![base_summary()],
        index_pages: vec![IndexPageRef {
            key: "index/1-20.json".into(),
            first_seq: 1,
            last_seq: 20,
            segment_count: 2,
            first_time: t(1),
            last_time: t(3),
            size: 500,
            sha256: "ef".repeat(32),
        }],
        tail_start_seq: 21,
        gaps: vec![Gap {
            first_seq: 3,
            last_seq: 4,
            kind: GapKind::MissingWal,
            detected_at: t(2),
            detail: "lost".into(),
        }],
        retention: Retention {
            pins: vec![Pin {
                base: "b".into(),
                reason: "audit".into(),
                until: Some(t(100)),
            }],
            last_prune: Some(PruneRecord {
                at: t(4),
                policy: "keep_last=2".into(),
                bases_removed: 1,
                segments_removed: 3,
            }),
        },
    };
    let page = IndexPage {
        format_version: model::FORMAT_VERSION,
        first_seq: 1,
        last_seq: 20,
        segments: vec![segment_entry(1), segment_entry(11)],
    };
    let base = BaseDescriptor {
        format_version: model::FORMAT_VERSION,
        id: "20261204T170000Z-1".into(),
        created_at: t(0),
        database_identity: "ident".into(),
        min_log_number: 4,
        replay_from_seq: 10,
        earliest_seq: 10,
        earliest_time: t(0),
        next_file_number: 30,
        column_families: vec![BaseColumnFamily {
            id: 0,
            name: "default".into(),
            log_number: 4,
        }],
        files: vec![BaseFile {
            name: "CURRENT".into(),
            size: 16,
            sha256: "01".repeat(32),
            key: "bases/20261204T170000Z-1/files/CURRENT".into(),
        }],
    };
    let lease = Lease {
        format_version: model::FORMAT_VERSION,
        holder: "h-1".into(),
        host: "h".into(),
        pid: 3,
        acquired_at: t(0),
        renewed_at: t(1),
        expires_at: t(60),
        instance: Some("0123456789abcdef".into()),
        released_at: Some(t(2)),
    };
    let hint = LatestHint {
        format_version: model::FORMAT_VERSION,
        generation: 12,
    };
    let wrap = |kek: &str| Wrap {
        scheme: "file-xchacha20-poly1305".into(),
        kek: kek.into(),
        wrapped: "5a".repeat(72),
    };
    let keyring = Keyring {
        format_version: model::FORMAT_VERSION,
        repository_id: "r-1".into(),
        active: "00112233445566ff".into(),
        keys: ["0011223344556677", "00112233445566ff"]
            .iter()
            .enumerate()
            .map(|(i, id)| DataKeyEntry {
                id: (*id).into(),
                legacy: i == 0,
                wraps: vec![wrap("aaaaaaaaaaaaaaaa"), wrap("bbbbbbbbbbbbbbbb")],
            })
            .collect(),
        retired: vec![RetiredKek {
            kek: "cccccccccccccccc".into(),
            retired_at: t(5),
        }],
        updated_at: t(6),
    };
    vec![
        ("config", model::to_document_bytes(&config)),
        ("keyring", model::to_document_bytes(&keyring)),
        ("generation", model::to_document_bytes(&generation)),
        ("index", model::to_document_bytes(&page)),
        ("base", model::to_document_bytes(&base)),
        ("lease", model::to_document_bytes(&lease)),
        ("hint", model::to_document_bytes(&hint)),
    ]
}

/// Parses `bytes` as every kind of document; none may panic. A document whose bytes
/// changed must not parse as the original kind with a valid checksum unless the change
/// kept the checksummed bytes (only when the mutations cancelled out).
fn parse_every_kind(bytes: &[u8]) {
    let _ = model::parse_document::<RepositoryConfig>("tidemark.json", bytes);
    let _ = model::parse_document::<Generation>("manifest/1.json", bytes);
    let _ = model::parse_document::<IndexPage>("index/1-2.json", bytes);
    let _ = model::parse_document::<BaseDescriptor>("bases/x/base.json", bytes);
    let _ = model::parse_document::<Lease>("lease.json", bytes);
    let _ = model::parse_document::<LatestHint>("manifest/latest.json", bytes);
    if let Ok(ring) = Keyring::parse(bytes) {
        let _ = ring.kek_ids();
    }
    if let Ok(d) = model::parse_document::<BaseDescriptor>("bases/x/base.json", bytes) {
        let _ = d.check("bases/x/base.json", &base_summary());
    }
}

/// A restored database's origin file (FORMAT.md §11).
fn origin_seed() -> Vec<u8> {
    let t = |s: i64| OffsetDateTime::from_unix_timestamp(1_790_000_000 + s).unwrap();
    Origin {
        format_version: origin::ORIGIN_FORMAT_VERSION,
        lineage: "5b1e8c0a-0000-4000-8000-000000000001".into(),
        restored_at: t(60),
        parent: OriginParent {
            repository: "s3://acme-backups/tidemark/orders".into(),
            repository_id: "6f0c2f3e-5a7e-4a49-9d7c-0a3f4a0e8d11".into(),
            lineage: "0d7e0000-0000-4000-8000-000000000002".into(),
            sequence: 123_456,
            time: t(0),
        },
    }
    .to_bytes()
}

/// Parses `bytes` as an origin file: a value or an error, never a panic.
fn parse_origin(bytes: &[u8]) -> Result<Origin, origin::OriginError> {
    Origin::parse(std::path::Path::new("db/tidemark-origin.json"), bytes)
}

// ----------------------------------------------------------------------------------------
// Drivers: run a parser to its end

/// Decodes a segment fully (streaming, with and without its length known). The memory a
/// record takes is bounded by the bytes the segment holds (or decompresses to).
fn drive_segment(bytes: &[u8]) -> Result<(), TestCaseError> {
    let _ = segment::decode_all("wal/x.seg", bytes);
    for known in [true, false] {
        let len = known.then_some(bytes.len() as u64);
        let Ok(mut r) = SegmentReader::new("wal/x.seg", bytes, len) else {
            continue;
        };
        let raw_size = r.header().raw_size;
        while let Ok(Some(rec)) = r.next_record() {
            prop_assert!(rec.batch.len() as u64 <= raw_size);
        }
    }
    Ok(())
}

/// Reads a log to its end; every record's bytes come from the input (or, for a compressed
/// WAL, from a record of the input).
fn drive_log(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(mut r) = LogReader::new(Cursor::new(bytes), "000009.log") else {
        return Ok(());
    };
    for _ in 0..10_000 {
        match r.next_entry() {
            Ok(Some(log::LogEntry::Record(rec))) => {
                prop_assert!(rec.end_offset <= bytes.len() as u64);
                prop_assert!(rec.start_offset < rec.end_offset);
                drive_batch(&rec.bytes);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = r.finish();
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
    }
    prop_assert!(
        false,
        "the reader did not reach the end of {} bytes",
        bytes.len()
    );
    Ok(())
}

fn drive_batch(bytes: &[u8]) {
    if let Ok(h) = BatchHeader::parse(bytes) {
        let _ = (h.next_sequence(), h.last_sequence());
    }
    let Ok(b) = Batch::parse(bytes) else { return };
    let _ = b.summary();
    let _ = b.validate();
    if let Ok(blobs) = b.log_data_blobs() {
        for blob in blobs {
            if let Some(Ok(m)) = marker::decode(blob) {
                let _ = m.system_time();
            }
        }
    }
    for e in b.entries() {
        match e {
            Ok(e) => {
                let _ = e.timed_put_parts();
            }
            Err(_) => break,
        }
    }
}

fn drive_edit(bytes: &[u8]) {
    if let Ok(edit) = VersionEdit::decode(bytes) {
        let mut state = ManifestState::new();
        let _ = state.apply(&edit);
        let _ = (state.min_log_number_needed(), state.all_live_files());
    }
}

fn drive_manifest(bytes: &[u8]) {
    if let Ok(state) = ManifestState::from_bytes(bytes, "MANIFEST-000005") {
        let _ = state.min_log_number_needed();
        let _ = state.min_wal_number_for_recovery(false);
        let _ = state.min_wal_number_for_recovery(true);
        let _ = state.all_live_files();
    }
}

fn drive_options(text: &str) {
    if let Ok(o) = OptionsFile::parse(text, "OPTIONS-000007") {
        let _ = (o.wal_ttl_seconds(), o.wal_size_limit_mb());
        let _ = (o.recycle_log_file_num(), o.wal_dir(), o.wal_compression());
        let _ = o.rocksdb_version();
        for cf in o.cf_names() {
            let _ = (o.merge_operator(cf), o.comparator(cf), o.table_options(cf));
        }
    }
}

// ----------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn segment_decoder_survives_mutations(
        zstd in any::<bool>(), big in any::<bool>(), ms in mutations(),
    ) {
        let bytes = mutated(&segment_seed(zstd, big), &ms);
        drive_segment(&bytes)?;
    }

    /// Mutated, then given a right header crc and trailer again, so that the mutations
    /// reach the header fields and the frames behind those checks.
    #[test]
    fn segment_decoder_survives_resealed_mutations(
        zstd in any::<bool>(), big in any::<bool>(), ms in mutations(),
    ) {
        let mut bytes = mutated(&segment_seed(zstd, big), &ms);
        reseal(&mut bytes);
        drive_segment(&bytes)?;
    }

    /// Header fields and (uncompressed) frame lengths set to large values or moved by a
    /// few units, then resealed: the edges of the length arithmetic.
    #[test]
    fn segment_decoder_survives_field_edits(
        zstd in any::<bool>(), big in any::<bool>(),
        edits in prop::collection::vec((any::<Index>(), field_value()), 1..6),
        extra in prop::collection::vec(any::<u8>(), 0..12),
    ) {
        let mut bytes = segment_seed(zstd, big);
        // Bytes after the last frame, counted in the body length (not in the raw size).
        let end = bytes.len() - segment::TRAILER_LEN;
        bytes.splice(end..end, extra.iter().copied());
        let body_len = u64::from_le_bytes(bytes[72..80].try_into().unwrap());
        bytes[72..80].copy_from_slice(&(body_len + extra.len() as u64).to_le_bytes());
        let fields = segment_fields(&bytes);
        for (field, value) in &edits {
            let (at, width) = fields[field.index(fields.len())];
            set_field(&mut bytes[at..at + width], *value);
        }
        reseal(&mut bytes);
        drive_segment(&bytes)?;
    }

    #[test]
    fn segment_decoder_survives_random_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600), header_ok in any::<bool>(),
    ) {
        // Half the time behind a valid-looking magic, so the header checks are reached.
        let mut bytes = bytes;
        if header_ok && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(segment::MAGIC);
        }
        drive_segment(&bytes)?;
    }

    #[test]
    fn documents_survive_mutations(kind in any::<Index>(), ms in mutations()) {
        let docs = documents();
        let (_, seed) = &docs[kind.index(docs.len())];
        let bytes = mutated(seed, &ms);
        parse_every_kind(&bytes);
    }

    #[test]
    fn documents_survive_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        parse_every_kind(&bytes);
        // Behind a well-formed prefix and checksum, so the field parsers are reached.
        let mut body = b"\"format_version\":1,".to_vec();
        body.extend_from_slice(&bytes);
        let mut doc = b"{\"checksum\":\"".to_vec();
        doc.extend_from_slice(tidemark_manifest::checksum::sha256_hex(&body).as_bytes());
        doc.extend_from_slice(b"\",");
        doc.extend_from_slice(&body);
        parse_every_kind(&doc);
    }

    /// A changed origin file is refused (its checksum covers every byte), never accepted as
    /// another origin, and never panics.
    #[test]
    fn origin_file_survives_mutations(ms in mutations()) {
        let seed = origin_seed();
        let bytes = mutated(&seed, &ms);
        let parsed = parse_origin(&bytes);
        prop_assert!(parsed.is_err() || bytes == seed, "a changed origin file was accepted");
    }

    #[test]
    fn origin_file_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_origin(&bytes);
        // Behind a well-formed prefix and checksum, so the field parsers are reached.
        let mut body = b"\"format_version\":1,".to_vec();
        body.extend_from_slice(&bytes);
        let mut doc = b"{\"checksum\":\"".to_vec();
        doc.extend_from_slice(tidemark_manifest::checksum::sha256_hex(&body).as_bytes());
        doc.extend_from_slice(b"\",");
        doc.extend_from_slice(&body);
        let _ = parse_origin(&doc);
    }

    #[test]
    fn log_reader_survives_mutations(big in any::<bool>(), ms in mutations()) {
        drive_log(&mutated(&log_seed(big), &ms))?;
    }

    #[test]
    fn log_reader_survives_mutated_real_logs(wal in any::<bool>(), ms in mutations()) {
        let seeds = rocks_seeds();
        let seed = if wal { &seeds.wal } else { &seeds.manifest };
        drive_log(&mutated(seed, &ms))?;
    }

    #[test]
    fn log_reader_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        drive_log(&bytes)?;
    }

    #[test]
    fn write_batch_survives_mutations(n in 0usize..6, ms in mutations()) {
        drive_batch(&mutated(&batch(77, n, 20), &ms));
    }

    #[test]
    fn write_batch_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        drive_batch(&bytes);
    }

    #[test]
    fn version_edit_survives_mutations(which in any::<Index>(), ms in mutations()) {
        let edits = &rocks_seeds().edits;
        drive_edit(&mutated(&edits[which.index(edits.len())], &ms));
    }

    #[test]
    fn version_edit_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        drive_edit(&bytes);
    }

    #[test]
    fn manifest_survives_mutations(ms in mutations()) {
        drive_manifest(&mutated(&rocks_seeds().manifest, &ms));
    }

    #[test]
    fn options_file_survives_mutations(ms in mutations()) {
        let bytes = mutated(rocks_seeds().options.as_bytes(), &ms);
        drive_options(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn options_file_survives_random_text(text in "[\\[\\]\"=#\\\\a-z0-9 \n\t]{0,300}") {
        drive_options(&text);
    }

    #[test]
    fn marker_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..20)) {
        let mut blob = marker::MAGIC.to_vec();
        blob.extend_from_slice(&bytes);
        if let Some(Ok(m)) = marker::decode(&blob) {
            let _ = m.system_time();
        }
    }
}

// ----------------------------------------------------------------------------------------
// Regressions: inputs that once cost unbounded memory or panicked.

/// A segment made of a (changed) header and a body, with the header crc and the trailer
/// made right again: only what the test changed is wrong.
fn resealed(header: &segment::SegmentHeader, body: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(body);
    let inner = Sha256::digest(&bytes);
    bytes.extend_from_slice(segment::TRAILER_MAGIC);
    bytes.extend_from_slice(&inner);
    bytes
}

/// A new value for a numeric field: one of [`LARGE`], or the old value moved by a few units.
#[derive(Debug, Clone, Copy)]
enum FieldValue {
    Large(usize),
    Delta(i8),
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        (0..LARGE.len()).prop_map(FieldValue::Large),
        (-4i8..=4).prop_map(FieldValue::Delta),
    ]
}

/// Writes `value` over the little-endian integer `field`.
fn set_field(field: &mut [u8], value: FieldValue) {
    let mut old = [0u8; 8];
    old[..field.len()].copy_from_slice(field);
    let old = u64::from_le_bytes(old);
    let new = match value {
        FieldValue::Large(i) => LARGE[i],
        FieldValue::Delta(d) => old.wrapping_add_signed(i64::from(d)),
    };
    let n = field.len();
    field.copy_from_slice(&new.to_le_bytes()[..n]);
}

/// The numeric fields of a segment: (offset, width) of the header's counts, sequences, times,
/// logs and sizes, and of every frame length of an uncompressed body.
fn segment_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![(12, 4)];
    out.extend((16..80).step_by(8).map(|at| (at, 8)));
    // The sizes the length arithmetic works from, picked more often.
    out.extend([(64, 8), (72, 8)].repeat(4));
    if bytes[10] == 0 {
        // An uncompressed body is the raw stream: frames up to the raw size.
        let raw = u64::from_le_bytes(bytes[64..72].try_into().unwrap()) as usize;
        let end = segment::HEADER_LEN + raw;
        let mut at = segment::HEADER_LEN;
        while at + 16 <= end {
            out.extend([(at, 4)].repeat(3));
            out.push((at + 4, 8)); // the record's sequence number
            out.push((at + 12, 4)); // its count
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            at += 8 + len;
        }
    }
    out
}

/// Makes the header crc and the trailer of a segment right for whatever its header and body
/// now hold (the header is the first 128 bytes, the trailer the last 40).
fn reseal(bytes: &mut Vec<u8>) {
    use sha2::{Digest, Sha256};
    let (h, t) = (segment::HEADER_LEN, segment::TRAILER_LEN);
    if bytes.len() < h + t {
        return;
    }
    bytes[..8].copy_from_slice(segment::MAGIC);
    bytes[8..10].copy_from_slice(&segment::SEGMENT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..124]);
    bytes[124..128].copy_from_slice(&crc.to_le_bytes());
    let end = bytes.len() - t;
    let inner = Sha256::digest(&bytes[..end]);
    bytes.truncate(end);
    bytes.extend_from_slice(segment::TRAILER_MAGIC);
    bytes.extend_from_slice(&inner);
}

#[test]
fn a_lying_frame_length_costs_no_memory() {
    limit_memory();
    let seed = segment_seed(false, false);
    let mut h = segment::SegmentHeader::decode("k", &seed[..segment::HEADER_LEN]).unwrap();
    // A first frame claiming 4 GiB, in a stream the header says is 1 TiB long.
    let mut body = u32::MAX.to_le_bytes().to_vec();
    body.extend_from_slice(&[7u8; 100]);
    h.raw_size = 1 << 40;
    h.body_len = body.len() as u64;
    let err = segment::decode_all("wal/k.seg", &resealed(&h, &body)).unwrap_err();
    assert!(err.to_string().contains("ends early"), "{err}");
}

// ----------------------------------------------------------------------------------------
// The seeds are valid: mutations start from inputs the parsers accept.

#[test]
fn the_seeds_are_valid() {
    for zstd in [false, true] {
        for big in [false, true] {
            segment::decode_all("k", &segment_seed(zstd, big)).unwrap();
            let log = log_seed(big);
            let mut r = LogReader::new(Cursor::new(&log), "l").unwrap();
            let mut n = 0;
            while let Some(rec) = r.next_record().unwrap() {
                Batch::parse(&rec.bytes).unwrap().validate().unwrap();
                n += 1;
            }
            assert_eq!(n, 4);
            r.finish().unwrap();
        }
    }
    for (kind, doc) in documents() {
        let ok = match kind {
            "config" => model::parse_document::<RepositoryConfig>(kind, &doc).is_ok(),
            "generation" => model::parse_document::<Generation>(kind, &doc).is_ok(),
            "index" => model::parse_document::<IndexPage>(kind, &doc).is_ok(),
            "base" => model::parse_document::<BaseDescriptor>(kind, &doc).is_ok(),
            "lease" => model::parse_document::<Lease>(kind, &doc).is_ok(),
            "keyring" => Keyring::parse(&doc).is_ok(),
            _ => model::parse_document::<LatestHint>(kind, &doc).is_ok(),
        };
        assert!(ok, "{kind}");
    }
    let seeds = rocks_seeds();
    ManifestState::from_bytes(&seeds.manifest, "m").unwrap();
    assert!(seeds.edits.len() >= 2);
    for e in &seeds.edits {
        VersionEdit::decode(e).unwrap();
    }
    let o = OptionsFile::parse(&seeds.options, "o").unwrap();
    assert!(o.cf_names().contains(&"other"));
    let mut r = LogReader::new(Cursor::new(&seeds.wal), "w").unwrap();
    assert!(r.next_record().unwrap().is_some());
}
