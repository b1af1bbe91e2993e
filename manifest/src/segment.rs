//! WAL segments (FORMAT.md §6): `header ‖ body ‖ trailer`, the body a zstd-compressed stream
//! of crc32c-framed records.
//!
//! [`SegmentBuilder`] encodes records as they arrive, compressing every
//! [`ZSTD_FRAME_RAW`] bytes of the stream as a frame of its own (on several threads if asked);
//! the archiver closes a segment by size or time. [`SegmentReader`] decodes any [`Read`] as a
//! stream, one record at a time, so a large segment is never held in memory whole; it
//! checks every frame and, at the end, the trailer's sha256. A segment is good only once
//! [`SegmentReader::next_record`] has returned `Ok(None)`.

use crate::chain::RecordChain;
use crate::model::{Compression, SegmentEntry, TimeSource, time_from_micros};
use sha2::{Digest, Sha256};
use std::io::{self, BufReader, Read, Take};

mod body;
use body::{BodyWriter, ZstdFrames};
pub use body::{ZSTD_FRAME_RAW, check_zstd_level, zstd_levels};

/// Header length in bytes.
pub const HEADER_LEN: usize = 128;
/// Trailer length in bytes.
pub const TRAILER_LEN: usize = 40;
/// Header magic.
pub const MAGIC: &[u8; 8] = b"TDMKSEG\0";
/// Trailer magic.
pub const TRAILER_MAGIC: &[u8; 8] = b"TDMKEND\0";
/// Segment encoding version.
pub const SEGMENT_VERSION: u16 = 1;
/// Fixed part of a record payload: seq, count, time, time source, log number, log offset.
pub const PAYLOAD_FIXED_LEN: usize = 8 + 4 + 8 + 1 + 8 + 8;
/// Shortest payload: the fixed part and a WriteBatch's 12-byte header.
pub const MIN_PAYLOAD_LEN: usize = PAYLOAD_FIXED_LEN + 12;
/// Longest payload: what the 4-byte length field holds (FORMAT.md §6.2). A reader never
/// reserves memory for a frame beyond the bytes it has actually read.
pub const MAX_PAYLOAD_LEN: u64 = u32::MAX as u64;
/// Shortest frame: length, the shortest payload, crc32c.
const MIN_FRAME_LEN: u64 = 4 + MIN_PAYLOAD_LEN as u64 + 4;
/// The largest body length a header may state: any object fits in an `i64` of bytes.
const MAX_BODY_LEN: u64 = i64::MAX as u64 - (HEADER_LEN + TRAILER_LEN) as u64;

/// Errors encoding or decoding a segment. Each names the segment's key.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{key}: not a Tidemark segment (bad magic)")]
    BadMagic { key: String },
    #[error(
        "{key}: segment encoding version {found} is not supported (this build reads version \
         {SEGMENT_VERSION}); upgrade Tidemark"
    )]
    UnsupportedVersion { key: String, found: u16 },
    #[error("{key}: segment header is corrupt: {detail}")]
    CorruptHeader { key: String, detail: String },
    #[error(
        "{key}: segment is truncated or has extra bytes: expected {expected} bytes, found {found}"
    )]
    WrongLength {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("{key}: segment body is corrupt at record {index}: {detail}")]
    CorruptRecord {
        key: String,
        index: u64,
        detail: String,
    },
    #[error("{key}: segment trailer is corrupt: {detail}")]
    CorruptTrailer { key: String, detail: String },
    #[error(
        "{key}: segment checksum mismatch: the trailer records sha256 {expected}, the content \
         hashes to {found}; the object is corrupt"
    )]
    ChecksumMismatch {
        key: String,
        expected: String,
        found: String,
    },
    #[error("{key}: segment contents disagree with its header: {detail}")]
    Inconsistent { key: String, detail: String },
    #[error("{key}: cannot add record: {detail}")]
    InvalidRecord { key: String, detail: String },
    #[error("{key}: reading segment: {source}")]
    Io {
        key: String,
        #[source]
        source: io::Error,
    },
}

/// Where a record's time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordTime {
    Observed,
    Marker,
}

impl RecordTime {
    fn code(self) -> u8 {
        match self {
            RecordTime::Observed => 0,
            RecordTime::Marker => 1,
        }
    }
    fn source(self) -> TimeSource {
        match self {
            RecordTime::Observed => TimeSource::Observed,
            RecordTime::Marker => TimeSource::Marker,
        }
    }
}

/// One archived WriteBatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The batch's first sequence number.
    pub seq: u64,
    /// How many sequence numbers the batch takes.
    pub count: u32,
    /// Microseconds since the epoch.
    pub time_us: i64,
    pub time_source: RecordTime,
    /// Number of the WAL file the record was read from.
    pub log_number: u64,
    /// Byte offset of the record in that WAL file.
    pub log_offset: u64,
    /// The WriteBatch as RocksDB wrote it.
    pub batch: Vec<u8>,
}

impl Record {
    /// The sequence number that follows this record (saturating: a decoded segment never
    /// holds a record whose sequence overflows, see [`SegmentReader`]).
    pub fn next_seq(&self) -> u64 {
        self.seq.saturating_add(u64::from(self.count))
    }

    fn payload_len(&self) -> usize {
        PAYLOAD_FIXED_LEN + self.batch.len()
    }

    fn write_frame(&self, out: &mut impl io::Write) -> io::Result<()> {
        let len = u32::try_from(self.payload_len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        let mut fixed = [0u8; PAYLOAD_FIXED_LEN];
        fixed[0..8].copy_from_slice(&self.seq.to_le_bytes());
        fixed[8..12].copy_from_slice(&self.count.to_le_bytes());
        fixed[12..20].copy_from_slice(&self.time_us.to_le_bytes());
        fixed[20] = self.time_source.code();
        fixed[21..29].copy_from_slice(&self.log_number.to_le_bytes());
        fixed[29..37].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed), &self.batch);
        out.write_all(&len.to_le_bytes())?;
        out.write_all(&fixed)?;
        out.write_all(&self.batch)?;
        out.write_all(&crc.to_le_bytes())
    }
}

/// The fixed header of a segment (FORMAT.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub compression: Compression,
    pub time_source: TimeSource,
    pub record_count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time_us: i64,
    pub last_time_us: i64,
    pub first_log: u64,
    pub last_log: u64,
    pub raw_size: u64,
    pub body_len: u64,
}

impl SegmentHeader {
    /// Total object length this header implies.
    pub fn object_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len + TRAILER_LEN as u64
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[10] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        };
        h[11] = match self.time_source {
            TimeSource::Observed => 0,
            TimeSource::Marker => 1,
            TimeSource::Mixed => 2,
        };
        h[12..16].copy_from_slice(&self.record_count.to_le_bytes());
        h[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.last_seq.to_le_bytes());
        h[32..40].copy_from_slice(&self.first_time_us.to_le_bytes());
        h[40..48].copy_from_slice(&self.last_time_us.to_le_bytes());
        h[48..56].copy_from_slice(&self.first_log.to_le_bytes());
        h[56..64].copy_from_slice(&self.last_log.to_le_bytes());
        h[64..72].copy_from_slice(&self.raw_size.to_le_bytes());
        h[72..80].copy_from_slice(&self.body_len.to_le_bytes());
        let crc = crc32c::crc32c(&h[..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header (the first [`HEADER_LEN`] bytes of a segment).
    pub fn decode(key: &str, h: &[u8]) -> Result<SegmentHeader, SegmentError> {
        let corrupt = |detail: &str| SegmentError::CorruptHeader {
            key: key.to_owned(),
            detail: detail.to_owned(),
        };
        if h.len() < HEADER_LEN {
            return Err(SegmentError::WrongLength {
                key: key.to_owned(),
                expected: HEADER_LEN as u64,
                found: h.len() as u64,
            });
        }
        if &h[0..8] != MAGIC {
            return Err(SegmentError::BadMagic {
                key: key.to_owned(),
            });
        }
        let crc = u32_at(h, 124);
        if crc != crc32c::crc32c(&h[..124]) {
            return Err(corrupt("header crc32c mismatch"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != SEGMENT_VERSION {
            return Err(SegmentError::UnsupportedVersion {
                key: key.to_owned(),
                found: version,
            });
        }
        let compression = match h[10] {
            0 => Compression::None,
            1 => Compression::Zstd,
            _ => return Err(corrupt("unknown compression code")),
        };
        let time_source = match h[11] {
            0 => TimeSource::Observed,
            1 => TimeSource::Marker,
            2 => TimeSource::Mixed,
            _ => return Err(corrupt("unknown time source code")),
        };
        if h[80..124].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let header = SegmentHeader {
            compression,
            time_source,
            record_count: u32_at(h, 12),
            first_seq: u64_at(h, 16),
            last_seq: u64_at(h, 24),
            first_time_us: u64_at(h, 32) as i64,
            last_time_us: u64_at(h, 40) as i64,
            first_log: u64_at(h, 48),
            last_log: u64_at(h, 56),
            raw_size: u64_at(h, 64),
            body_len: u64_at(h, 72),
        };
        if header.body_len > MAX_BODY_LEN {
            return Err(corrupt("its body length is impossibly large"));
        }
        if header.record_count == 0
            || header.first_seq > header.last_seq
            || header.first_time_us > header.last_time_us
            || header.first_log > header.last_log
        {
            return Err(corrupt("its ranges are empty or reversed"));
        }
        Ok(header)
    }

    /// The index entry describing this segment (`sha256` of the whole object if known).
    pub fn entry(&self, key: &str, sha256: Option<String>) -> SegmentEntry {
        SegmentEntry {
            key: key.to_owned(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            record_count: self.record_count,
            first_time: time_from_micros(self.first_time_us),
            last_time: time_from_micros(self.last_time_us),
            time_source: self.time_source,
            first_log: self.first_log,
            last_log: self.last_log,
            raw_size: self.raw_size,
            stored_size: self.object_len(),
            sha256,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Running summary of the records of a segment, shared by the builder and the reader so
/// that both enforce the same rules (FORMAT.md §6.2).
#[derive(Debug, Clone, Default)]
struct Summary {
    count: u32,
    first_seq: u64,
    next_seq: u64,
    first_time_us: i64,
    last_time_us: i64,
    first_log: u64,
    last_log: u64,
    last_offset: u64,
    time_source: Option<TimeSource>,
    chain: RecordChain,
}

impl Summary {
    /// Checks that `r` may follow the records seen so far, then adds it.
    fn add(&mut self, r: &Record) -> Result<(), String> {
        if r.batch.len() < 12 {
            return Err(format!(
                "WriteBatch at sequence {} is {} bytes, shorter than its 12-byte header",
                r.seq,
                r.batch.len()
            ));
        }
        let batch_seq = u64::from_le_bytes(r.batch[0..8].try_into().expect("8 bytes"));
        let batch_count = u32::from_le_bytes(r.batch[8..12].try_into().expect("4 bytes"));
        if batch_seq != r.seq || batch_count != r.count {
            return Err(format!(
                "record says sequence {} count {}, its WriteBatch says sequence {batch_seq} count {batch_count}",
                r.seq, r.count
            ));
        }
        let mut chain = self.chain;
        chain.push(r.seq, r.count).map_err(|e| e.to_string())?;
        if self.count > 0 {
            if r.time_us < self.last_time_us {
                return Err(format!(
                    "time of sequence {} goes backwards ({} µs after {} µs)",
                    r.seq, r.time_us, self.last_time_us
                ));
            }
            if r.log_number < self.last_log
                || (r.log_number == self.last_log && r.log_offset <= self.last_offset)
            {
                return Err(format!(
                    "WAL position of sequence {} ({}:{}) is not after the previous record's ({}:{})",
                    r.seq, r.log_number, r.log_offset, self.last_log, self.last_offset
                ));
            }
        } else {
            self.first_seq = r.seq;
            self.first_time_us = r.time_us;
            self.first_log = r.log_number;
        }
        self.count = self
            .count
            .checked_add(1)
            .ok_or_else(|| "too many records in one segment".to_owned())?;
        self.next_seq = r
            .seq
            .checked_add(u64::from(r.count))
            .ok_or_else(|| format!("sequence {} + count {} overflows", r.seq, r.count))?;
        self.last_time_us = r.time_us;
        self.last_log = r.log_number;
        self.last_offset = r.log_offset;
        self.chain = chain;
        let src = r.time_source.source();
        self.time_source = Some(self.time_source.map_or(src, |s| s.combine(src)));
        Ok(())
    }

    fn covers_a_sequence(&self) -> bool {
        self.count > 0 && self.next_seq > self.first_seq
    }
}

/// Encodes records into a segment, compressing as they arrive.
pub struct SegmentBuilder {
    compression: Compression,
    body: BodyWriter,
    summary: Summary,
    raw_size: u64,
    /// Compressing part of the stream failed: frames are missing, nothing more is taken.
    broken: bool,
}

impl std::fmt::Debug for SegmentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentBuilder")
            .field("compression", &self.compression)
            .field("records", &self.summary.count)
            .field("raw_size", &self.raw_size)
            .finish()
    }
}

/// A finished segment, ready to upload.
#[derive(Debug, Clone)]
pub struct EncodedSegment {
    pub header: SegmentHeader,
    /// The whole object. Shared, not copied, by the upload and its retries.
    pub bytes: bytes::Bytes,
    /// sha256 of `bytes`.
    pub sha256: String,
}

impl EncodedSegment {
    /// The object key: `wal/<first_seq>.seg`.
    pub fn key(&self) -> String {
        crate::keys::segment_key(self.header.first_seq)
    }

    /// The object's buffer, for [`SegmentBuilder::reusing`], when nothing else holds the
    /// bytes any more.
    pub fn into_buffer(self) -> Option<Vec<u8>> {
        self.bytes.try_into_mut().ok().map(Vec::from)
    }

    /// The index entry for this segment.
    pub fn entry(&self) -> SegmentEntry {
        self.header.entry(&self.key(), Some(self.sha256.clone()))
    }
}

impl SegmentBuilder {
    /// A builder; `zstd_level` is used when `compression` is zstd (one of [`zstd_levels`]; 3
    /// is a good default).
    pub fn new(compression: Compression, zstd_level: i32) -> io::Result<SegmentBuilder> {
        // The body is written after room for the header, which is filled in by `finish`:
        // the object is built in one buffer, never copied.
        let out = vec![0u8; HEADER_LEN];
        let body = match compression {
            Compression::None => BodyWriter::Plain(out),
            Compression::Zstd => BodyWriter::Zstd(ZstdFrames::new(out, zstd_level)?),
        };
        Ok(SegmentBuilder {
            compression,
            body,
            summary: Summary::default(),
            raw_size: 0,
            broken: false,
        })
    }

    /// Compresses the body's frames on the process's compression threads (one per core),
    /// several at once, while records keep arriving; without it, on the thread that adds
    /// the records. The bytes are the same either way.
    pub fn in_parallel(mut self) -> SegmentBuilder {
        if let BodyWriter::Zstd(z) = &mut self.body {
            z.in_parallel();
        }
        self
    }

    /// Compresses what is added from now on at zstd `level` (a segment's frames may differ
    /// in level: each is read on its own). Without effect on an uncompressed segment. An
    /// error for a level zstd does not have; the builder is unchanged then.
    pub fn set_zstd_level(&mut self, level: i32) -> io::Result<()> {
        match &mut self.body {
            BodyWriter::Zstd(z) => z.set_level(level),
            BodyWriter::Plain(_) => Ok(()),
        }
    }

    /// Builds the object in `buffer` (emptied first): the bytes of a segment uploaded
    /// before ([`EncodedSegment::into_buffer`]), whose memory is then used again instead of
    /// fresh pages for every segment. Only before the first record.
    pub fn reusing(mut self, mut buffer: Vec<u8>) -> SegmentBuilder {
        assert_eq!(
            self.raw_size, 0,
            "a buffer is given before the first record"
        );
        buffer.clear();
        buffer.resize(HEADER_LEN, 0);
        *self.body.object() = buffer;
        self
    }

    /// Sets aside room for a segment of `raw_len` bytes of records (and its trailer) at
    /// once. Room not written to costs no memory (a large allocation is mapped, not touched),
    /// and the segment never copies itself to grow up to that size. At most 1 GiB is set
    /// aside ahead; beyond, the buffer grows as it must.
    pub fn with_room_for(mut self, raw_len: u64) -> SegmentBuilder {
        const MOST: u64 = 1 << 30;
        let raw_len = usize::try_from(raw_len.min(MOST)).expect("1 GiB fits a usize");
        self.body.reserve(raw_len + TRAILER_LEN);
        self
    }

    /// Adds a record. It must continue the previous one exactly (FORMAT.md §6.2).
    pub fn push(&mut self, r: &Record) -> Result<(), SegmentError> {
        let key = "segment being built";
        let mut next = self.summary.clone();
        next.add(r).map_err(|detail| SegmentError::InvalidRecord {
            key: key.to_owned(),
            detail,
        })?;
        let io = |source| SegmentError::Io {
            key: key.to_owned(),
            source,
        };
        self.usable()?;
        // Nothing is written when this fails (a record too large for its length field).
        r.write_frame(self.body.raw()).map_err(io)?;
        self.summary = next;
        self.raw_size += 8 + r.payload_len() as u64;
        if let Err(e) = self.body.record_written() {
            self.broken = true;
            return Err(io(e));
        }
        Ok(())
    }

    /// An error once compressing part of the stream failed: the segment lacks those bytes.
    fn usable(&self) -> Result<(), SegmentError> {
        if !self.broken {
            return Ok(());
        }
        Err(SegmentError::Io {
            key: "segment being built".to_owned(),
            source: io::Error::other(
                "compressing an earlier part of this segment failed; it cannot be continued \
                 or finished",
            ),
        })
    }

    /// Records added so far.
    pub fn record_count(&self) -> u32 {
        self.summary.count
    }

    /// Uncompressed bytes added so far.
    pub fn raw_size(&self) -> u64 {
        self.raw_size
    }

    /// The sequence number the next record must have, if any record was added.
    pub fn next_seq(&self) -> Option<u64> {
        (self.summary.count > 0).then_some(self.summary.next_seq)
    }

    /// True when the segment holds at least one sequence number and may be finished.
    pub fn can_finish(&self) -> bool {
        self.summary.covers_a_sequence()
    }

    /// Finishes the segment. Fails if it holds no sequence number (FORMAT.md §6.2).
    pub fn finish(self) -> Result<EncodedSegment, SegmentError> {
        self.usable()?;
        let key = "segment being built";
        if !self.summary.covers_a_sequence() {
            return Err(SegmentError::InvalidRecord {
                key: key.to_owned(),
                detail: "a segment must hold at least one record that takes a sequence number"
                    .to_owned(),
            });
        }
        let mut bytes = self.body.finish().map_err(|source| SegmentError::Io {
            key: key.to_owned(),
            source,
        })?;
        let s = &self.summary;
        let header = SegmentHeader {
            compression: self.compression,
            time_source: s.time_source.unwrap_or(TimeSource::Observed),
            record_count: s.count,
            first_seq: s.first_seq,
            last_seq: s.next_seq - 1,
            first_time_us: s.first_time_us,
            last_time_us: s.last_time_us,
            first_log: s.first_log,
            last_log: s.last_log,
            raw_size: self.raw_size,
            body_len: (bytes.len() - HEADER_LEN) as u64,
        };
        bytes[..HEADER_LEN].copy_from_slice(&header.encode());
        // The trailer's hash and the object's hash share their first bytes (header and
        // body): those are hashed once.
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        let inner = hasher.clone().finalize();
        bytes.reserve_exact(TRAILER_LEN);
        bytes.extend_from_slice(TRAILER_MAGIC);
        bytes.extend_from_slice(&inner);
        hasher.update(TRAILER_MAGIC);
        hasher.update(inner);
        let sha256 = hex::encode(hasher.finalize());
        Ok(EncodedSegment {
            header,
            bytes: bytes.into(),
            sha256,
        })
    }
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

enum BodyReader<R: Read> {
    Plain(Take<HashingReader<R>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, BufReader<Take<HashingReader<R>>>>>),
    Finished,
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BodyReader::Plain(r) => r.read(buf),
            BodyReader::Zstd(r) => r.read(buf),
            BodyReader::Finished => Ok(0),
        }
    }
}

/// Decodes a segment from any reader, one record at a time.
pub struct SegmentReader<R: Read> {
    key: String,
    header: SegmentHeader,
    body: BodyReader<R>,
    summary: Summary,
    raw_read: u64,
    index: u64,
    done: bool,
}

impl<R: Read> std::fmt::Debug for SegmentReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentReader")
            .field("key", &self.key)
            .field("header", &self.header)
            .field("records_read", &self.index)
            .finish()
    }
}

impl<R: Read> SegmentReader<R> {
    /// Starts decoding. `object_len`, when known (from the store or the file system), is
    /// checked against the header so a truncated object fails before any record is read.
    pub fn new(
        key: &str,
        reader: R,
        object_len: Option<u64>,
    ) -> Result<SegmentReader<R>, SegmentError> {
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
            read: 0,
        };
        let mut h = [0u8; HEADER_LEN];
        read_exact_or_truncated(key, &mut hashing, &mut h, object_len)?;
        let header = SegmentHeader::decode(key, &h)?;
        if let Some(len) = object_len
            && len != header.object_len()
        {
            return Err(SegmentError::WrongLength {
                key: key.to_owned(),
                expected: header.object_len(),
                found: len,
            });
        }
        let take = hashing.take(header.body_len);
        let body = match header.compression {
            Compression::None => BodyReader::Plain(take),
            Compression::Zstd => BodyReader::Zstd(Box::new(
                zstd::stream::read::Decoder::with_buffer(BufReader::new(take)).map_err(
                    |source| SegmentError::Io {
                        key: key.to_owned(),
                        source,
                    },
                )?,
            )),
        };
        Ok(SegmentReader {
            key: key.to_owned(),
            header,
            body,
            summary: Summary::default(),
            raw_read: 0,
            index: 0,
            done: false,
        })
    }

    /// The segment's header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    fn record_err(&self, detail: impl Into<String>) -> SegmentError {
        SegmentError::CorruptRecord {
            key: self.key.clone(),
            index: self.index,
            detail: detail.into(),
        }
    }

    /// The next record, or `Ok(None)` once the whole segment was read and verified.
    pub fn next_record(&mut self) -> Result<Option<Record>, SegmentError> {
        if self.done {
            return Ok(None);
        }
        if self.raw_read == self.header.raw_size {
            self.finish()?;
            return Ok(None);
        }
        // `raw_read` only grows by frames that fit, so it never passes `raw_size`.
        let left = self.header.raw_size.saturating_sub(self.raw_read);
        if left < MIN_FRAME_LEN {
            return Err(self.record_err(format!(
                "the stream has {left} bytes left, too few for a record"
            )));
        }
        let mut len = [0u8; 4];
        self.read_body(&mut len)?;
        let len = u64::from(u32::from_le_bytes(len));
        let room = left - 8; // the frame's length and crc32c
        if len < MIN_PAYLOAD_LEN as u64 || len > room {
            return Err(self.record_err(format!(
                "frame length {len} is impossible here ({room} bytes left for a payload)"
            )));
        }
        let mut payload = self.read_payload(len)?;
        let mut crc = [0u8; 4];
        self.read_body(&mut crc)?;
        self.raw_read += 8 + len;
        if u32::from_le_bytes(crc) != crc32c::crc32c(&payload) {
            return Err(self.record_err("crc32c mismatch"));
        }
        let time_source = match payload[20] {
            0 => RecordTime::Observed,
            1 => RecordTime::Marker,
            other => return Err(self.record_err(format!("unknown time source {other}"))),
        };
        let record = Record {
            seq: u64_at(&payload, 0),
            count: u32_at(&payload, 8),
            time_us: u64_at(&payload, 12) as i64,
            time_source,
            log_number: u64_at(&payload, 21),
            log_offset: u64_at(&payload, 29),
            batch: payload.split_off(PAYLOAD_FIXED_LEN),
        };
        self.summary
            .add(&record)
            .map_err(|detail| self.record_err(detail))?;
        self.index += 1;
        Ok(Some(record))
    }

    /// Reads `len` payload bytes, growing the buffer only as they arrive: a lying length
    /// costs no more memory than the bytes actually there.
    fn read_payload(&mut self, len: u64) -> Result<Vec<u8>, SegmentError> {
        let mut payload = Vec::with_capacity(usize::try_from(len.min(1 << 20)).unwrap_or(0));
        let read = (&mut self.body)
            .take(len)
            .read_to_end(&mut payload)
            .map_err(|e| self.record_err(format!("cannot decompress: {e}")))?;
        if read as u64 != len {
            return Err(self.record_err("the body ends early (truncated object)"));
        }
        Ok(payload)
    }

    fn read_body(&mut self, buf: &mut [u8]) -> Result<(), SegmentError> {
        self.body.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.record_err("the body ends early (truncated object)")
            } else {
                self.record_err(format!("cannot decompress: {e}"))
            }
        })
    }

    /// Checks the end of the stream, the summary against the header, then the trailer.
    fn finish(&mut self) -> Result<(), SegmentError> {
        let key = self.key.clone();
        let inconsistent = |detail: String| SegmentError::Inconsistent {
            key: key.clone(),
            detail,
        };
        let s = &self.summary;
        let h = &self.header;
        if s.count != h.record_count
            || !s.covers_a_sequence()
            || s.first_seq != h.first_seq
            || s.next_seq - 1 != h.last_seq
            || s.first_time_us != h.first_time_us
            || s.last_time_us != h.last_time_us
            || s.first_log != h.first_log
            || s.last_log != h.last_log
            || s.time_source != Some(h.time_source)
        {
            return Err(inconsistent(format!(
                "header says {} records, sequences {}..={}, the body holds {} records, sequences {}..{}",
                h.record_count, h.first_seq, h.last_seq, s.count, s.first_seq, s.next_seq
            )));
        }
        // The body must end exactly where the raw stream does.
        let mut extra = [0u8; 1];
        match self.body.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(inconsistent(
                    "the body holds more data than its header's raw size".to_owned(),
                ));
            }
            Err(e) => return Err(self.record_err(format!("cannot decompress: {e}"))),
        }
        let take = match std::mem::replace(&mut self.body, BodyReader::Finished) {
            BodyReader::Plain(t) => t,
            BodyReader::Zstd(d) => d.finish().into_inner(),
            BodyReader::Finished => unreachable!("finish runs once"),
        };
        let mut take = take;
        io::copy(&mut take, &mut io::sink()).map_err(|source| SegmentError::Io {
            key: key.clone(),
            source,
        })?;
        let hashing = take.into_inner();
        let expected_len = HEADER_LEN as u64 + h.body_len;
        if hashing.read != expected_len {
            return Err(SegmentError::WrongLength {
                key,
                expected: h.object_len(),
                found: hashing.read,
            });
        }
        let found = hex::encode(hashing.hasher.finalize());
        let mut inner = hashing.inner;
        let mut trailer = [0u8; TRAILER_LEN];
        read_exact_or_truncated(&key, &mut inner, &mut trailer, None)?;
        if &trailer[0..8] != TRAILER_MAGIC {
            return Err(SegmentError::CorruptTrailer {
                key,
                detail: "bad trailer magic".to_owned(),
            });
        }
        let expected = hex::encode(&trailer[8..]);
        if expected != found {
            return Err(SegmentError::ChecksumMismatch {
                key,
                expected,
                found,
            });
        }
        let mut more = [0u8; 1];
        match inner.read(&mut more) {
            Ok(0) => {}
            Ok(_) => {
                return Err(SegmentError::WrongLength {
                    key,
                    expected: self.header.object_len(),
                    found: self.header.object_len().saturating_add(1),
                });
            }
            Err(source) => return Err(SegmentError::Io { key, source }),
        }
        self.done = true;
        Ok(())
    }
}

fn read_exact_or_truncated(
    key: &str,
    r: &mut impl Read,
    buf: &mut [u8],
    object_len: Option<u64>,
) -> Result<(), SegmentError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SegmentError::WrongLength {
                key: key.to_owned(),
                expected: buf.len() as u64,
                found: object_len.unwrap_or(0),
            }
        } else {
            SegmentError::Io {
                key: key.to_owned(),
                source: e,
            }
        }
    })
}

/// Decodes and verifies a whole in-memory segment.
pub fn decode_all(key: &str, bytes: &[u8]) -> Result<(SegmentHeader, Vec<Record>), SegmentError> {
    let mut reader = SegmentReader::new(key, bytes, Some(bytes.len() as u64))?;
    // The header's count is a claim: reserve no more than the bytes could hold.
    let fits = bytes.len() as u64 / MIN_FRAME_LEN;
    let claimed = u64::from(reader.header().record_count);
    let mut records = Vec::with_capacity(usize::try_from(claimed.min(fits)).unwrap_or(0));
    while let Some(r) = reader.next_record()? {
        records.push(r);
    }
    Ok((*reader.header(), records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(seq: u64, count: u32, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    /// Contiguous records from `first_seq` with the given counts and body sizes.
    fn records(first_seq: u64, shape: &[(u32, usize)]) -> Vec<Record> {
        let mut seq = first_seq;
        let mut out = Vec::new();
        for (i, &(count, size)) in shape.iter().enumerate() {
            let body: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
            out.push(Record {
                seq,
                count,
                time_us: 1_700_000_000_000_000 + i as i64 * 10,
                time_source: if i % 3 == 0 {
                    RecordTime::Marker
                } else {
                    RecordTime::Observed
                },
                log_number: 7 + (i / 4) as u64,
                log_offset: (i % 4) as u64 * 1000,
                batch: batch(seq, count, &body),
            });
            seq += u64::from(count);
        }
        out
    }

    fn encode(recs: &[Record], compression: Compression) -> EncodedSegment {
        let mut b = SegmentBuilder::new(compression, 3).unwrap();
        for r in recs {
            b.push(r).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn round_trip_and_header() {
        let recs = records(100, &[(3, 10), (0, 0), (1, 70_000), (5, 1)]);
        for c in [Compression::Zstd, Compression::None] {
            let seg = encode(&recs, c);
            let (h, back) = decode_all("wal/x.seg", &seg.bytes).unwrap();
            assert_eq!(back, recs);
            assert_eq!((h.first_seq, h.last_seq, h.record_count), (100, 108, 4));
            assert_eq!(h.time_source, TimeSource::Mixed);
            assert_eq!(seg.key(), "wal/0000000000000064.seg");
            assert_eq!(seg.entry().stored_size, seg.bytes.len() as u64);
            assert_eq!(seg.sha256, crate::checksum::sha256_hex(&seg.bytes));
        }
    }

    /// The raw length of each zstd frame of a segment's body.
    fn frame_sizes(seg: &EncodedSegment) -> Vec<u64> {
        let mut rest = &seg.bytes[HEADER_LEN..seg.bytes.len() - TRAILER_LEN];
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            let n = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            sizes.push(
                zstd::zstd_safe::get_frame_content_size(&rest[..n])
                    .unwrap()
                    .unwrap(),
            );
            rest = &rest[n..];
        }
        sizes
    }

    #[test]
    fn a_long_stream_is_cut_into_frames_compressed_alike_on_any_thread() {
        // About 6 MiB of records, one of them larger than a job of frames.
        let mut shape = vec![(1, 40_000); 60];
        shape.push((2, 5 * ZSTD_FRAME_RAW + 10));
        shape.extend(vec![(1, 3000); 700]);
        let recs = records(1, &shape);
        let here = encode(&recs, Compression::Zstd);
        let mut b = SegmentBuilder::new(Compression::Zstd, 3)
            .unwrap()
            .in_parallel();
        for r in &recs {
            b.push(r).unwrap();
        }
        let elsewhere = b.finish().unwrap();
        assert!(elsewhere.bytes == here.bytes, "same bytes on any thread");
        let sizes = frame_sizes(&here);
        assert!(sizes.len() >= 20, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<u64>(), here.header.raw_size);
        let (last, whole) = sizes.split_last().unwrap();
        assert!(
            whole.iter().all(|&n| n == ZSTD_FRAME_RAW as u64),
            "{sizes:?}"
        );
        assert!(*last <= ZSTD_FRAME_RAW as u64, "{sizes:?}");
        let (_, back) = decode_all("wal/x.seg", &here.bytes).unwrap();
        assert_eq!(back, recs);
        // A byte changed anywhere in any frame is refused.
        for at in (HEADER_LEN..here.bytes.len() - TRAILER_LEN).step_by(99_991) {
            let mut bad = here.bytes.to_vec();
            bad[at] ^= 0x10;
            assert!(decode_all("wal/x.seg", &bad).is_err(), "byte {at} changed");
        }
    }

    #[test]
    fn the_level_can_change_within_a_segment_and_a_reused_context_compresses_as_a_new_one() {
        let recs = records(1, &vec![(1, 40_000); 100]);
        let build = |recs: &[Record], level: i32, switch: Option<(usize, i32)>| {
            let mut b = SegmentBuilder::new(Compression::Zstd, level)
                .unwrap()
                .in_parallel();
            for (i, r) in recs.iter().enumerate() {
                if let Some((at, to)) = switch.filter(|&(at, _)| at == i) {
                    b.set_zstd_level(to).unwrap();
                    assert_eq!(at, i);
                }
                b.push(r).unwrap();
            }
            b.finish().unwrap()
        };
        let fresh = {
            let recs = recs.clone();
            std::thread::spawn(move || encode_at(&recs, 1))
                .join()
                .unwrap()
        };
        let at_3 = encode(&recs, Compression::Zstd);
        assert!(
            encode_at(&recs, 1).bytes == fresh.bytes,
            "context reused at level 1"
        );
        assert!(
            fresh.bytes != at_3.bytes,
            "the levels compress differently here"
        );
        let mixed = build(&recs, 3, Some((50, 1)));
        let (_, back) = decode_all("wal/x.seg", &mixed.bytes).unwrap();
        assert_eq!(back, recs);
        assert!(mixed.bytes != at_3.bytes && mixed.bytes != fresh.bytes);
        assert!(build(&recs, 3, Some((0, 1))).bytes == fresh.bytes);
        let mut b = SegmentBuilder::new(Compression::Zstd, 3).unwrap();
        let e = b.set_zstd_level(23).unwrap_err();
        assert!(e.to_string().contains("is not a zstd level: give"), "{e}");
        assert!(SegmentBuilder::new(Compression::Zstd, 1_000).is_err());
        let e = SegmentBuilder::new(Compression::Zstd, 0).err().unwrap();
        assert!(e.to_string().contains("default level, 3"), "{e}");
    }

    fn encode_at(recs: &[Record], level: i32) -> EncodedSegment {
        let mut b = SegmentBuilder::new(Compression::Zstd, level).unwrap();
        for r in recs {
            b.push(r).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn a_segment_is_built_in_the_buffer_of_one_no_longer_held() {
        let mut b = SegmentBuilder::new(Compression::Zstd, 3)
            .unwrap()
            .with_room_for(1 << 20);
        for r in &records(100, &[(3, 10), (1, 70_000), (5, 1)]) {
            b.push(r).unwrap();
        }
        let first = b.finish().unwrap();
        let buffer = first.clone().into_buffer();
        assert!(buffer.is_none(), "a clone still holds the bytes");
        let buffer = first.into_buffer().expect("nothing else holds them");
        let at = buffer.as_ptr();
        let next = records(200, &[(2, 5), (1, 30_000)]);
        let mut b = SegmentBuilder::new(Compression::Zstd, 3)
            .unwrap()
            .reusing(buffer)
            .with_room_for(1 << 20);
        for r in &next {
            b.push(r).unwrap();
        }
        let seg = b.finish().unwrap();
        assert_eq!(seg.bytes.as_ptr(), at, "built in the buffer given");
        assert!(seg.bytes == encode(&next, Compression::Zstd).bytes);
    }

    #[test]
    fn builder_refuses_discontinuity_and_empty_segments() {
        let recs = records(1, &[(2, 1), (2, 1)]);
        let mut b = SegmentBuilder::new(Compression::Zstd, 3).unwrap();
        b.push(&recs[0]).unwrap();
        let mut skipped = records(4, &[(2, 1)]).remove(0);
        skipped.time_us = recs[1].time_us;
        skipped.log_offset = 5000;
        let err = b.push(&skipped).unwrap_err().to_string();
        assert!(err.contains("sequence number 3 is in no batch"), "{err}");
        let only_empty = records(9, &[(0, 4)]);
        let mut b = SegmentBuilder::new(Compression::Zstd, 3).unwrap();
        b.push(&only_empty[0]).unwrap();
        assert!(!b.can_finish());
        assert!(b.finish().is_err());
        let mut wrong_header = records(1, &[(2, 1)]).remove(0);
        wrong_header.count = 3;
        let mut b = SegmentBuilder::new(Compression::Zstd, 3).unwrap();
        assert!(
            b.push(&wrong_header)
                .unwrap_err()
                .to_string()
                .contains("WriteBatch says")
        );
    }

    #[test]
    fn truncation_and_unknown_version_are_named() {
        let seg = encode(&records(1, &[(1, 100), (2, 200)]), Compression::Zstd);
        let cut = &seg.bytes[..seg.bytes.len() - 1];
        let err = decode_all("wal/0000000000000001.seg", cut).unwrap_err();
        assert!(matches!(err, SegmentError::WrongLength { .. }), "{err}");
        assert!(err.to_string().contains("wal/0000000000000001.seg"));
        // Without a known length, truncation still fails at the trailer.
        let mut r = SegmentReader::new("k", cut, None).unwrap();
        let err = loop {
            match r.next_record() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("truncated segment accepted"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("k:"), "{err}");
        let mut v2 = seg.bytes.to_vec();
        v2[8] = 2;
        let crc = crc32c::crc32c(&v2[..124]);
        v2[124..128].copy_from_slice(&crc.to_le_bytes());
        let err = decode_all("k", &v2).unwrap_err();
        assert!(
            matches!(err, SegmentError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
    }

    /// A segment of `header` and `body`, with a correct header crc and trailer: only the
    /// fields the test changed are wrong.
    fn sealed(header: &SegmentHeader, body: &[u8]) -> Vec<u8> {
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(body);
        let inner = Sha256::digest(&bytes);
        bytes.extend_from_slice(TRAILER_MAGIC);
        bytes.extend_from_slice(&inner);
        bytes
    }

    fn plain_segment() -> (SegmentHeader, Vec<u8>) {
        let seg = encode(&records(1, &[(1, 10), (2, 20)]), Compression::None);
        let body = seg.bytes[HEADER_LEN..seg.bytes.len() - TRAILER_LEN].to_vec();
        (seg.header, body)
    }

    #[test]
    fn a_stream_ending_inside_a_frame_length_is_corrupt_not_an_underflow() {
        for extra in 1..4u64 {
            let (mut h, mut body) = plain_segment();
            // The raw size says `extra` bytes follow the last frame; the body holds more.
            h.raw_size += extra;
            body.extend_from_slice(&[0xff; 8]);
            h.body_len = body.len() as u64;
            let err = decode_all("wal/k.seg", &sealed(&h, &body)).unwrap_err();
            assert!(
                matches!(err, SegmentError::CorruptRecord { index: 2, .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains(&format!("{extra} bytes left")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_claimed_record_count_reserves_nothing() {
        let (mut h, body) = plain_segment();
        h.record_count = u32::MAX;
        let err = decode_all("wal/k.seg", &sealed(&h, &body)).unwrap_err();
        assert!(matches!(err, SegmentError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn an_impossible_body_length_is_a_corrupt_header() {
        let (mut h, body) = plain_segment();
        for len in [u64::MAX, u64::MAX - 100, i64::MAX as u64] {
            h.body_len = len;
            let bytes = sealed(&h, &body);
            let err = decode_all("wal/k.seg", &bytes).unwrap_err();
            assert!(err.to_string().contains("impossibly large"), "{err}");
            assert!(SegmentReader::new("k", &bytes[..], None).is_err());
        }
    }

    fn fully_decodes(bytes: &[u8], known_len: bool) -> bool {
        let len = known_len.then_some(bytes.len() as u64);
        let Ok(mut r) = SegmentReader::new("k", bytes, len) else {
            return false;
        };
        loop {
            match r.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    fn shape() -> impl Strategy<Value = Vec<(u32, usize)>> {
        prop::collection::vec((0u32..6, 0usize..300), 1..12).prop_map(|mut v| {
            v[0].0 = v[0].0.max(1);
            v
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn prop_round_trip(shape in shape(), first in 1u64..u64::MAX / 4, zstd in any::<bool>()) {
            let recs = records(first, &shape);
            let c = if zstd { Compression::Zstd } else { Compression::None };
            let seg = encode(&recs, c);
            let (_, back) = decode_all("k", &seg.bytes).unwrap();
            prop_assert_eq!(back, recs);
        }

        #[test]
        fn prop_any_flipped_byte_is_rejected(
            shape in shape(), zstd in any::<bool>(), pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let c = if zstd { Compression::Zstd } else { Compression::None };
            let mut bytes = encode(&records(1, &shape), c).bytes.to_vec();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(!fully_decodes(&bytes, true), "flip at {} accepted", i);
            prop_assert!(!fully_decodes(&bytes, false), "flip at {} accepted", i);
        }

        #[test]
        fn prop_any_truncation_is_rejected(
            shape in shape(), zstd in any::<bool>(), pos in any::<prop::sample::Index>(),
        ) {
            let c = if zstd { Compression::Zstd } else { Compression::None };
            let bytes = encode(&records(1, &shape), c).bytes;
            let cut = pos.index(bytes.len());
            prop_assert!(!fully_decodes(&bytes[..cut], true));
            prop_assert!(!fully_decodes(&bytes[..cut], false));
        }
    }
}
