//! The RocksDB log format, used for WAL files (`NNNNNN.log`) and MANIFEST files.
//!
//! A log is a sequence of 32 KiB blocks. Each block holds physical records:
//!
//! ```text
//! masked crc32c (4, LE) | payload length (2, LE) | type (1) | payload
//! ```
//!
//! The crc covers the type byte and the payload, and is stored masked
//! (`((crc >> 15) | (crc << 17)) + 0xa282ead8`). A logical record that does not fit in the
//! rest of a block is split into FIRST, MIDDLE… and LAST fragments; one that fits is a single
//! FULL record. When fewer than 7 bytes remain in a block, the writer fills them with zeros
//! and continues in the next block; when exactly 7 remain, it writes a zero-length fragment
//! there.
//!
//! [`LogReader`] is built to tail a file that another process (the RocksDB instance that owns
//! the database) is still appending to: it never consumes a torn record at the end of the
//! file, and treats zero-filled space as not yet written. [`LogWriter`] produces the same
//! bytes as RocksDB's own `log::Writer` with the legacy (non-recyclable) record types, so
//! that WAL files written by the restore tool are recovered by RocksDB like its own.
//!
//! Not supported, with a clear error: logs written with `recycle_log_file_num > 0`
//! (recyclable record types 5–8, 11 and 131). Supported when reading: zstd WAL compression
//! (`wal_compression`, record type 9), user-defined timestamp size records (type 10),
//! predecessor WAL info records (type 130, written with `track_and_verify_wals`), and any
//! other record type RocksDB marks as safe to ignore (bit 7 set).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Size of a log block.
pub const BLOCK_SIZE: u64 = 32 * 1024;
/// Size of a legacy physical record header.
pub const HEADER_SIZE: usize = 7;
/// Size of a recyclable physical record header (adds a 4-byte log number).
pub const RECYCLABLE_HEADER_SIZE: usize = 11;

/// Physical record types (RocksDB `db/log_format.h`).
pub mod record_type {
    /// Reserved for preallocated (zero-filled) space.
    pub const ZERO: u8 = 0;
    pub const FULL: u8 = 1;
    pub const FIRST: u8 = 2;
    pub const MIDDLE: u8 = 3;
    pub const LAST: u8 = 4;
    pub const RECYCLABLE_FULL: u8 = 5;
    pub const RECYCLABLE_FIRST: u8 = 6;
    pub const RECYCLABLE_MIDDLE: u8 = 7;
    pub const RECYCLABLE_LAST: u8 = 8;
    /// First record of a WAL written with `wal_compression`: the compression type (fixed32).
    pub const SET_COMPRESSION_TYPE: u8 = 9;
    /// Timestamp sizes of column families with user-defined timestamps.
    pub const USER_DEFINED_TIMESTAMP_SIZE: u8 = 10;
    pub const RECYCLABLE_USER_DEFINED_TIMESTAMP_SIZE: u8 = 11;
    /// Log number, size and last batch's sequence of the previous WAL (`track_and_verify_wals`).
    pub const PREDECESSOR_WAL_INFO: u8 = 130;
    pub const RECYCLABLE_PREDECESSOR_WAL_INFO: u8 = 131;
    /// Unknown record types with this bit set can be skipped safely.
    pub const SAFE_IGNORE_MASK: u8 = 0x80;

    /// Whether a record of this type uses the 11-byte recyclable header.
    pub fn is_recyclable(t: u8) -> bool {
        matches!(
            t,
            RECYCLABLE_FULL
                ..=RECYCLABLE_LAST
                    | RECYCLABLE_USER_DEFINED_TIMESTAMP_SIZE
                    | RECYCLABLE_PREDECESSOR_WAL_INFO
        )
    }

    /// A human name for a record type, used in error messages.
    pub fn name(t: u8) -> &'static str {
        match t {
            ZERO => "ZERO",
            FULL => "FULL",
            FIRST => "FIRST",
            MIDDLE => "MIDDLE",
            LAST => "LAST",
            RECYCLABLE_FULL..=RECYCLABLE_LAST => "recyclable",
            SET_COMPRESSION_TYPE => "SET_COMPRESSION_TYPE",
            USER_DEFINED_TIMESTAMP_SIZE => "USER_DEFINED_TIMESTAMP_SIZE",
            RECYCLABLE_USER_DEFINED_TIMESTAMP_SIZE => "recyclable USER_DEFINED_TIMESTAMP_SIZE",
            PREDECESSOR_WAL_INFO => "PREDECESSOR_WAL_INFO",
            RECYCLABLE_PREDECESSOR_WAL_INFO => "recyclable PREDECESSOR_WAL_INFO",
            _ => "unknown",
        }
    }
}

/// RocksDB's `CompressionType` code for zstd, the only WAL compression RocksDB supports.
pub const ZSTD_COMPRESSION_CODE: u32 = 7;

const MASK_DELTA: u32 = 0xa282_ead8;
const READ_CHUNK: u64 = 64 * 1024;

/// Masks a crc32c as RocksDB stores it in a record header.
pub fn mask_crc(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Inverse of [`mask_crc`].
pub fn unmask_crc(masked: u32) -> u32 {
    masked.wrapping_sub(MASK_DELTA).rotate_left(15)
}

/// The crc32c of a record: over its type byte, then its payload.
pub fn record_crc(record_type: u8, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&[record_type]), payload)
}

/// One logical record read from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's contents (decompressed, for a compressed WAL).
    pub bytes: Vec<u8>,
    /// File offset of the record's first physical fragment.
    pub start_offset: u64,
    /// File offset just past the record's last fragment: where the next record is read from.
    pub end_offset: u64,
}

/// One item of a log in file order: a logical record, or a metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    Record(Record),
    /// The WAL's compression (always the first record, at offset 0).
    Compression {
        offset: u64,
        compression: WalCompression,
    },
    /// User-defined timestamp sizes (column family id, timestamp size in bytes) that apply
    /// to the records following it.
    TimestampSizes {
        offset: u64,
        sizes: Vec<(u32, u16)>,
    },
    /// The previous WAL's number, size and last sequence (`track_and_verify_wals`).
    PredecessorWal {
        offset: u64,
        info: PredecessorWalInfo,
    },
    /// A record of an unknown type that RocksDB marks as safe to ignore.
    Ignored {
        offset: u64,
        record_type: u8,
    },
}

/// Compression of the records of a WAL, announced by its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalCompression {
    Zstd,
}

/// Contents of a predecessor WAL info record (`track_and_verify_wals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredecessorWalInfo {
    pub log_number: u64,
    pub size_bytes: u64,
    /// RocksDB calls it the last sequence recorded, but it is the header sequence (the
    /// first sequence number) of the last batch written to that WAL.
    pub last_batch_sequence: u64,
}

/// Errors reading a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open RocksDB log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error reading RocksDB log {path} at offset {offset}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "RocksDB log {path}: cannot resume at offset {offset}, the file is only {len} bytes long"
    )]
    ResumeBeyondEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    #[error(
        "RocksDB log {path}: checksum mismatch in the record at offset {offset} (stored {stored:#010x}, \
         computed {computed:#010x}) and more data follows it: the file is corrupt"
    )]
    Checksum {
        path: PathBuf,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error(
        "RocksDB log {path}: the record at offset {offset} has the recyclable type {record_type}: \
         this log was written with recycle_log_file_num > 0, which Tidemark cannot follow \
         (recycled logs are overwritten in place); set recycle_log_file_num = 0"
    )]
    Recycled {
        path: PathBuf,
        offset: u64,
        record_type: u8,
    },
    #[error("RocksDB log {path}: unknown record type {record_type} at offset {offset}")]
    UnknownType {
        path: PathBuf,
        offset: u64,
        record_type: u8,
    },
    #[error(
        "RocksDB log {path}: the record at offset {offset} claims {length} payload bytes, which \
         runs past the end of its 32 KiB block"
    )]
    BadLength {
        path: PathBuf,
        offset: u64,
        length: u16,
    },
    #[error("RocksDB log {path}: {detail} (record fragment at offset {offset})")]
    Fragmentation {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error(
        "RocksDB log {path}: zero-filled space at offset {offset} is followed by data at offset \
         {data_offset}"
    )]
    ZeroGap {
        path: PathBuf,
        offset: u64,
        data_offset: u64,
    },
    #[error("RocksDB log {path}: malformed {what} record at offset {offset}: {detail}")]
    BadMetadata {
        path: PathBuf,
        offset: u64,
        what: &'static str,
        detail: String,
    },
    #[error(
        "RocksDB log {path}: the WAL uses compression type {code} (record at offset {offset}); \
         only zstd ({ZSTD_COMPRESSION_CODE}) is supported"
    )]
    UnsupportedCompression {
        path: PathBuf,
        offset: u64,
        code: u32,
    },
    #[error("RocksDB log {path}: cannot decompress the zstd record at offset {offset}: {source}")]
    Decompress {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "RocksDB log {path}: {len} bytes from offset {offset} to the end of the file are not \
         complete records (a torn or corrupt record at the end of a log that is no longer written)"
    )]
    TrailingData {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

enum Physical {
    /// A complete, checksummed physical record.
    Record {
        record_type: u8,
        payload_start: u64,
        len: usize,
        next: u64,
    },
    /// Nothing complete at this position yet: end of file, a torn record, zero-filled
    /// (preallocated) space, or a damaged record with nothing but zeros after it.
    NotYet,
}

/// Reads logical records from a log, remembering its position so that it can follow a file
/// another process is appending to.
///
/// [`next_record`](Self::next_record) returns `Ok(None)` at the current end of the file, and
/// also when the file ends in a torn record or zero-filled space: the partial bytes are not
/// consumed, and the next call (after the file grew) reads the record from its start.
#[derive(Debug)]
pub struct LogReader<R = File> {
    src: R,
    path: PathBuf,
    offset: u64,
    buf: Vec<u8>,
    buf_start: u64,
    compression: Option<WalCompression>,
    timestamp_sizes: BTreeMap<u32, u16>,
    predecessor: Option<PredecessorWalInfo>,
}

impl LogReader<File> {
    /// Opens a log file to read it from the beginning.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        Self::open_at(path, 0)
    }

    /// Opens a log file to resume reading at `offset`, which must be a record boundary
    /// previously returned as a [`Record::end_offset`] (or 0).
    pub fn open_at(path: impl AsRef<Path>, offset: u64) -> Result<Self, LogError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        LogReader::new_at(file, path, offset)
    }
}

impl<R: Read + Seek> LogReader<R> {
    /// Reads a log from any seekable source; `name` is used in error messages.
    pub fn new(src: R, name: impl Into<PathBuf>) -> Result<Self, LogError> {
        Self::new_at(src, name, 0)
    }

    /// Like [`new`](Self::new), resuming at the record boundary `offset`.
    pub fn new_at(src: R, name: impl Into<PathBuf>, offset: u64) -> Result<Self, LogError> {
        let mut reader = LogReader {
            src,
            path: name.into(),
            offset: 0,
            buf: Vec::new(),
            buf_start: 0,
            compression: None,
            timestamp_sizes: BTreeMap::new(),
            predecessor: None,
        };
        if offset > 0 {
            let len = reader.file_len()?;
            if offset > len {
                return Err(LogError::ResumeBeyondEnd {
                    path: reader.path,
                    offset,
                    len,
                });
            }
            // The compression type is announced once, by the first record of the file.
            if let Physical::Record {
                record_type: record_type::SET_COMPRESSION_TYPE,
                payload_start,
                len,
                ..
            } = reader.read_physical(0)?
            {
                let payload = reader.slice(payload_start, len).to_vec();
                reader.set_compression(0, &payload)?;
            }
            reader.offset = offset;
        }
        Ok(reader)
    }

    /// The name (path) used in error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset of the next unread record: a record boundary to resume from with
    /// [`LogReader::open_at`].
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The WAL compression announced by the file's first record, if any.
    pub fn compression(&self) -> Option<WalCompression> {
        self.compression
    }

    /// User-defined timestamp sizes (column family id → timestamp size in bytes) from the
    /// timestamp size records this reader has read so far.
    pub fn timestamp_sizes(&self) -> &BTreeMap<u32, u16> {
        &self.timestamp_sizes
    }

    /// The predecessor WAL info record this reader has read, if any.
    pub fn predecessor(&self) -> Option<PredecessorWalInfo> {
        self.predecessor
    }

    /// The current length of the underlying file.
    pub fn file_len(&mut self) -> Result<u64, LogError> {
        let offset = self.offset;
        self.src
            .seek(SeekFrom::End(0))
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    /// Reads the next logical record, skipping metadata records (whose contents update
    /// [`compression`](Self::compression), [`timestamp_sizes`](Self::timestamp_sizes) and
    /// [`predecessor`](Self::predecessor)). `Ok(None)` means nothing complete is available
    /// yet; call again after the file grew.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        loop {
            match self.next_entry()? {
                None => return Ok(None),
                Some(LogEntry::Record(record)) => return Ok(Some(record)),
                Some(_) => {}
            }
        }
    }

    /// Reads the next logical record or metadata record, in file order. A tool rewriting a
    /// WAL uses this to reproduce its timestamp size records, which RocksDB's recovery needs
    /// to interpret the keys of column families with user-defined timestamps.
    pub fn next_entry(&mut self) -> Result<Option<LogEntry>, LogError> {
        self.compact();
        let mut p = self.offset;
        // A fragmented record in progress: its start offset and the payload gathered so far.
        let mut fragments: Option<(u64, Vec<u8>)> = None;
        loop {
            let left = BLOCK_SIZE - p % BLOCK_SIZE;
            if left < HEADER_SIZE as u64 {
                // Block trailer: zero padding written by the writer.
                p += left;
                continue;
            }
            let (record_type, payload_start, len, next) = match self.read_physical(p)? {
                Physical::NotYet => return Ok(None),
                Physical::Record {
                    record_type,
                    payload_start,
                    len,
                    next,
                } => (record_type, payload_start, len, next),
            };
            match record_type {
                record_type::FULL => {
                    if let Some((start, data)) = &fragments {
                        // An empty FIRST followed by a FULL was written by old RocksDB
                        // versions at the end of a block; RocksDB accepts it, so do we.
                        if !data.is_empty() {
                            return Err(self.fragmentation(
                                p,
                                format!(
                                    "FULL record inside the record that began at offset {start}"
                                ),
                            ));
                        }
                    }
                    let payload = self.slice(payload_start, len).to_vec();
                    return self.complete(p, payload, next).map(Some);
                }
                record_type::FIRST => {
                    if let Some((start, data)) = &fragments
                        && !data.is_empty()
                    {
                        return Err(self.fragmentation(
                            p,
                            format!(
                                "FIRST fragment inside the record that began at offset {start}"
                            ),
                        ));
                    }
                    fragments = Some((p, self.slice(payload_start, len).to_vec()));
                }
                record_type::MIDDLE | record_type::LAST => {
                    let Some((start, mut data)) = fragments.take() else {
                        return Err(self.fragmentation(
                            p,
                            format!(
                                "{} fragment without a preceding FIRST fragment",
                                record_type::name(record_type)
                            ),
                        ));
                    };
                    data.extend_from_slice(self.slice(payload_start, len));
                    if record_type == record_type::MIDDLE {
                        fragments = Some((start, data));
                    } else {
                        return self.complete(start, data, next).map(Some);
                    }
                }
                other => {
                    if let Some((start, _)) = &fragments {
                        return Err(self.fragmentation(
                            p,
                            format!(
                                "{} record (type {other}) inside the record that began at offset {start}",
                                record_type::name(other)
                            ),
                        ));
                    }
                    let payload = self.slice(payload_start, len).to_vec();
                    let entry = self.metadata_entry(p, other, &payload)?;
                    self.offset = next;
                    return Ok(Some(entry));
                }
            }
            p = next;
        }
    }

    /// The logical record that began at `start` and ends before `next`, whose payload is
    /// `data` (decompressed if the log is compressed); the reader moves past it.
    fn complete(&mut self, start: u64, data: Vec<u8>, next: u64) -> Result<LogEntry, LogError> {
        let bytes = self.decode(start, data)?;
        self.offset = next;
        Ok(LogEntry::Record(Record {
            bytes,
            start_offset: start,
            end_offset: next,
        }))
    }

    /// The metadata record of type `kind` at offset `p`, whose contents update what
    /// this reader knows (compression, timestamp sizes, the predecessor WAL). A compression
    /// record anywhere but first, or an unknown type RocksDB does not mark safe to ignore,
    /// is an error.
    fn metadata_entry(&mut self, p: u64, kind: u8, payload: &[u8]) -> Result<LogEntry, LogError> {
        Ok(match kind {
            record_type::SET_COMPRESSION_TYPE => {
                if p != 0 {
                    return Err(self.bad_metadata(
                        p,
                        "SET_COMPRESSION_TYPE",
                        "it must be the first record of the file".into(),
                    ));
                }
                LogEntry::Compression {
                    offset: p,
                    compression: self.set_compression(p, payload)?,
                }
            }
            record_type::USER_DEFINED_TIMESTAMP_SIZE => LogEntry::TimestampSizes {
                offset: p,
                sizes: self.add_timestamp_sizes(p, payload)?,
            },
            record_type::PREDECESSOR_WAL_INFO => {
                let info = self.parse_predecessor(p, payload)?;
                self.predecessor = Some(info);
                LogEntry::PredecessorWal { offset: p, info }
            }
            t if t & record_type::SAFE_IGNORE_MASK != 0 => LogEntry::Ignored {
                offset: p,
                record_type: t,
            },
            t => {
                return Err(LogError::UnknownType {
                    path: self.path.clone(),
                    offset: p,
                    record_type: t,
                });
            }
        })
    }

    /// Whether nothing but zeros (block padding or preallocated space) follows the last record
    /// read. Call it after [`next_record`](Self::next_record) returned `Ok(None)`, when the
    /// writer has moved on to a newer log, to know that this one was read completely.
    pub fn at_clean_end(&mut self) -> Result<bool, LogError> {
        Ok(self.first_nonzero_from(self.offset)?.is_none())
    }

    /// Checks that the log was read completely (see [`at_clean_end`](Self::at_clean_end)) and
    /// returns the final offset; otherwise reports the bytes left over.
    pub fn finish(&mut self) -> Result<u64, LogError> {
        if self.at_clean_end()? {
            return Ok(self.offset);
        }
        let len = self.file_len()?;
        Err(LogError::TrailingData {
            path: self.path.clone(),
            offset: self.offset,
            len: len.saturating_sub(self.offset),
        })
    }

    fn fragmentation(&self, offset: u64, detail: String) -> LogError {
        LogError::Fragmentation {
            path: self.path.clone(),
            offset,
            detail,
        }
    }

    fn bad_metadata(&self, offset: u64, what: &'static str, detail: String) -> LogError {
        LogError::BadMetadata {
            path: self.path.clone(),
            offset,
            what,
            detail,
        }
    }

    fn io_error(&self, offset: u64, source: io::Error) -> LogError {
        LogError::Io {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    fn set_compression(&mut self, offset: u64, payload: &[u8]) -> Result<WalCompression, LogError> {
        let code: [u8; 4] = payload.try_into().map_err(|_| {
            self.bad_metadata(
                offset,
                "SET_COMPRESSION_TYPE",
                format!("{} payload bytes instead of 4", payload.len()),
            )
        })?;
        let code = u32::from_le_bytes(code);
        if code != ZSTD_COMPRESSION_CODE {
            return Err(LogError::UnsupportedCompression {
                path: self.path.clone(),
                offset,
                code,
            });
        }
        self.compression = Some(WalCompression::Zstd);
        Ok(WalCompression::Zstd)
    }

    fn add_timestamp_sizes(
        &mut self,
        offset: u64,
        payload: &[u8],
    ) -> Result<Vec<(u32, u16)>, LogError> {
        if !payload.len().is_multiple_of(6) {
            return Err(self.bad_metadata(
                offset,
                "USER_DEFINED_TIMESTAMP_SIZE",
                format!("{} payload bytes, not a multiple of 6", payload.len()),
            ));
        }
        let mut sizes = Vec::with_capacity(payload.len() / 6);
        for entry in payload.chunks_exact(6) {
            let cf = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let size = u16::from_le_bytes([entry[4], entry[5]]);
            self.timestamp_sizes.insert(cf, size);
            sizes.push((cf, size));
        }
        Ok(sizes)
    }

    fn parse_predecessor(
        &self,
        offset: u64,
        payload: &[u8],
    ) -> Result<PredecessorWalInfo, LogError> {
        if payload.len() < 24 {
            return Err(self.bad_metadata(
                offset,
                "PREDECESSOR_WAL_INFO",
                format!("{} payload bytes instead of 24", payload.len()),
            ));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Ok(PredecessorWalInfo {
            log_number: word(0),
            size_bytes: word(1),
            last_batch_sequence: word(2),
        })
    }

    /// Turns the payload of a complete logical record into the record's contents.
    fn decode(&self, start: u64, payload: Vec<u8>) -> Result<Vec<u8>, LogError> {
        match self.compression {
            None => Ok(payload),
            Some(WalCompression::Zstd) => {
                if payload.is_empty() {
                    // RocksDB writes nothing compressed for an empty record.
                    return Ok(payload);
                }
                let fail = |source| LogError::Decompress {
                    path: self.path.clone(),
                    offset: start,
                    source,
                };
                // Bounded: a record no segment frame could hold is refused before it
                // takes more memory (a few compressed bytes can claim gigabytes).
                let limit = crate::segment::MAX_PAYLOAD_LEN;
                let mut out = Vec::new();
                zstd::stream::read::Decoder::new(payload.as_slice())
                    .map_err(fail)?
                    .take(limit + 1)
                    .read_to_end(&mut out)
                    .map_err(fail)?;
                if out.len() as u64 > limit {
                    return Err(fail(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the record decompresses to more than {limit} bytes"),
                    )));
                }
                Ok(out)
            }
        }
    }

    /// Reads and verifies the physical record at `p`, which is not within a block trailer.
    fn read_physical(&mut self, p: u64) -> Result<Physical, LogError> {
        if !self.fill_to(p + HEADER_SIZE as u64)? {
            self.forget_from(p);
            return Ok(Physical::NotYet);
        }
        let header = self.slice(p, HEADER_SIZE);
        let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let length = u16::from_le_bytes([header[4], header[5]]);
        let record_type = header[6];
        if header.iter().all(|&b| b == 0) {
            // Preallocated space: not written yet, unless data follows it.
            return match self.first_nonzero_from(p)? {
                None => {
                    self.forget_from(p);
                    Ok(Physical::NotYet)
                }
                Some(data_offset) => Err(LogError::ZeroGap {
                    path: self.path.clone(),
                    offset: p,
                    data_offset,
                }),
            };
        }
        if record_type::is_recyclable(record_type) {
            return Err(LogError::Recycled {
                path: self.path.clone(),
                offset: p,
                record_type,
            });
        }
        let len = usize::from(length);
        if p % BLOCK_SIZE + (HEADER_SIZE + len) as u64 > BLOCK_SIZE {
            return Err(LogError::BadLength {
                path: self.path.clone(),
                offset: p,
                length,
            });
        }
        let next = p + (HEADER_SIZE + len) as u64;
        if !self.fill_to(next)? {
            // A torn record at the end of the file: re-read it once it is complete.
            self.forget_from(p);
            return Ok(Physical::NotYet);
        }
        let payload_start = p + HEADER_SIZE as u64;
        let computed = record_crc(record_type, self.slice(payload_start, len));
        if unmask_crc(stored) != computed {
            if self.first_nonzero_from(next)?.is_none() {
                // Nothing but zeros after it: space still being written (or a damaged tail,
                // which `finish` reports once the log is no longer written).
                self.forget_from(p);
                return Ok(Physical::NotYet);
            }
            return Err(LogError::Checksum {
                path: self.path.clone(),
                offset: p,
                stored: unmask_crc(stored),
                computed,
            });
        }
        Ok(Physical::Record {
            record_type,
            payload_start,
            len,
            next,
        })
    }

    /// Drops buffered bytes before the current offset.
    fn compact(&mut self) {
        let consumed = self.offset.saturating_sub(self.buf_start);
        if consumed >= self.buf.len() as u64 {
            self.buf.clear();
            self.buf_start = self.offset;
        } else if consumed >= 4 * READ_CHUNK {
            self.buf.drain(..consumed as usize);
            self.buf_start = self.offset;
        }
    }

    fn buf_end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Bytes `[pos, pos + len)`, which must be buffered.
    fn slice(&self, pos: u64, len: usize) -> &[u8] {
        let from = (pos - self.buf_start) as usize;
        &self.buf[from..from + len]
    }

    /// Forgets buffered bytes from `pos` on, so that they are read again from the file.
    fn forget_from(&mut self, pos: u64) {
        if pos < self.buf_end() {
            self.buf
                .truncate(pos.saturating_sub(self.buf_start) as usize);
        }
    }

    /// Buffers the file up to `end`; false if the file is shorter.
    fn fill_to(&mut self, end: u64) -> Result<bool, LogError> {
        if end <= self.buf_end() {
            return Ok(true);
        }
        let from = self.buf_end();
        self.src
            .seek(SeekFrom::Start(from))
            .map_err(|e| self.io_error(from, e))?;
        let want = (end - from).max(READ_CHUNK) as usize;
        let mut filled = self.buf.len();
        self.buf.resize(filled + want, 0);
        while filled < self.buf.len() {
            match self.src.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(filled);
                    let at = self.buf_end();
                    return Err(self.io_error(at, e));
                }
            }
        }
        self.buf.truncate(filled);
        Ok(self.buf_end() >= end)
    }

    /// The offset of the first non-zero byte at or after `pos`, up to the end of the file.
    fn first_nonzero_from(&mut self, pos: u64) -> Result<Option<u64>, LogError> {
        let end = self.buf_end();
        if pos < end {
            let from = pos.saturating_sub(self.buf_start) as usize;
            if let Some(i) = self.buf[from..].iter().position(|&b| b != 0) {
                return Ok(Some(pos + i as u64));
            }
        }
        let mut at = pos.max(end);
        self.src
            .seek(SeekFrom::Start(at))
            .map_err(|e| self.io_error(at, e))?;
        let mut chunk = vec![0u8; READ_CHUNK as usize];
        loop {
            let n = match self.src.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(at, e)),
            };
            if let Some(i) = chunk[..n].iter().position(|&b| b != 0) {
                return Ok(Some(at + i as u64));
            }
            at += n as u64;
        }
    }
}

impl<R: Read + Seek> Iterator for LogReader<R> {
    type Item = Result<Record, LogError>;

    /// The next complete record; `None` at the current end of the file.
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Reads every complete record of a log file, and checks that nothing but zeros follows the
/// last one (for a file that is no longer being written, such as a copied MANIFEST).
pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<Record>, LogError> {
    let mut reader = LogReader::open(path)?;
    let mut records = Vec::new();
    while let Some(record) = reader.next_record()? {
        records.push(record);
    }
    reader.finish()?;
    Ok(records)
}

const ZEROS: [u8; HEADER_SIZE] = [0; HEADER_SIZE];

/// Writes logical records in the RocksDB log format with legacy record types, byte for byte
/// as RocksDB's `log::Writer` does (without compression or log recycling).
///
/// Each physical record is handed to `dest` with two `write_all` calls (header, payload);
/// wrap a file in a [`std::io::BufWriter`] for throughput.
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    dest: W,
    offset: u64,
}

impl<W: Write> LogWriter<W> {
    /// A writer for a new, empty log.
    pub fn new(dest: W) -> Self {
        Self::with_offset(dest, 0)
    }

    /// A writer appending to a log that already holds `offset` bytes (a record boundary).
    pub fn with_offset(dest: W, offset: u64) -> Self {
        LogWriter { dest, offset }
    }

    /// The number of bytes in the log so far: the end offset of the last record written.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends one logical record, fragmenting it across blocks as needed, and returns the
    /// offset just past it.
    pub fn add_record(&mut self, data: &[u8]) -> io::Result<u64> {
        let mut left = data;
        let mut begin = true;
        loop {
            self.switch_block_if_below(HEADER_SIZE)?;
            let avail = (BLOCK_SIZE - self.offset % BLOCK_SIZE) as usize - HEADER_SIZE;
            let n = left.len().min(avail);
            let end = n == left.len();
            let t = match (begin, end) {
                (true, true) => record_type::FULL,
                (true, false) => record_type::FIRST,
                (false, true) => record_type::LAST,
                (false, false) => record_type::MIDDLE,
            };
            self.emit(t, &left[..n])?;
            left = &left[n..];
            begin = false;
            if end {
                return Ok(self.offset);
            }
        }
    }

    /// Appends a user-defined timestamp size record (column family id, timestamp size), as
    /// RocksDB does before the first record that writes to such a column family. Does nothing
    /// for an empty list.
    pub fn add_timestamp_size_record(&mut self, sizes: &[(u32, u16)]) -> io::Result<u64> {
        if sizes.is_empty() {
            return Ok(self.offset);
        }
        let mut payload = Vec::with_capacity(sizes.len() * 6);
        for (cf, size) in sizes {
            payload.extend_from_slice(&cf.to_le_bytes());
            payload.extend_from_slice(&size.to_le_bytes());
        }
        if payload.len() > BLOCK_SIZE as usize - HEADER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a timestamp size record of {} column families does not fit in one log block",
                    sizes.len()
                ),
            ));
        }
        self.switch_block_if_below(HEADER_SIZE + payload.len())?;
        self.emit(record_type::USER_DEFINED_TIMESTAMP_SIZE, &payload)?;
        Ok(self.offset)
    }

    /// Appends a predecessor WAL info record, as RocksDB does at the start of each new WAL
    /// with `track_and_verify_wals`.
    pub fn add_predecessor_wal_info(&mut self, info: &PredecessorWalInfo) -> io::Result<u64> {
        let mut payload = [0u8; 24];
        payload[..8].copy_from_slice(&info.log_number.to_le_bytes());
        payload[8..16].copy_from_slice(&info.size_bytes.to_le_bytes());
        payload[16..].copy_from_slice(&info.last_batch_sequence.to_le_bytes());
        self.switch_block_if_below(HEADER_SIZE + payload.len())?;
        self.emit(record_type::PREDECESSOR_WAL_INFO, &payload)?;
        Ok(self.offset)
    }

    /// Flushes `dest`.
    pub fn flush(&mut self) -> io::Result<()> {
        self.dest.flush()
    }

    pub fn get_ref(&self) -> &W {
        &self.dest
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.dest
    }

    pub fn into_inner(self) -> W {
        self.dest
    }

    /// Pads the rest of the block with zeros if fewer than `needed` bytes remain in it.
    fn switch_block_if_below(&mut self, needed: usize) -> io::Result<()> {
        let leftover = BLOCK_SIZE - self.offset % BLOCK_SIZE;
        if leftover < needed as u64 {
            let mut pad = leftover as usize;
            while pad > 0 {
                let n = pad.min(ZEROS.len());
                self.dest.write_all(&ZEROS[..n])?;
                pad -= n;
            }
            self.offset += leftover;
        }
        Ok(())
    }

    fn emit(&mut self, t: u8, payload: &[u8]) -> io::Result<()> {
        let len = u16::try_from(payload.len()).expect("fragment fits in a block");
        debug_assert!(
            self.offset % BLOCK_SIZE + (HEADER_SIZE + payload.len()) as u64 <= BLOCK_SIZE
        );
        let mut header = [0u8; HEADER_SIZE];
        header[..4].copy_from_slice(&mask_crc(record_crc(t, payload)).to_le_bytes());
        header[4..6].copy_from_slice(&len.to_le_bytes());
        header[6] = t;
        self.dest.write_all(&header)?;
        self.dest.write_all(payload)?;
        self.offset += (HEADER_SIZE + payload.len()) as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn encode(records: &[Vec<u8>]) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new());
        for r in records {
            w.add_record(r).unwrap();
        }
        let out = w.into_inner();
        assert_eq!(out.len() as u64, {
            let mut w = LogWriter::new(io::sink());
            for r in records {
                w.add_record(r).unwrap();
            }
            w.offset()
        });
        out
    }

    fn decode(bytes: &[u8]) -> Vec<Record> {
        let mut reader = LogReader::new(Cursor::new(bytes.to_vec()), "test.log").unwrap();
        let mut out = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            out.push(r);
        }
        assert!(reader.at_clean_end().unwrap());
        assert_eq!(reader.finish().unwrap(), bytes.len() as u64);
        out
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A `Read + Seek` over a shared growing buffer, standing in for a file being appended to.
    #[derive(Clone, Default)]
    struct Growing(std::rc::Rc<std::cell::RefCell<Vec<u8>>>, u64);

    impl Read for Growing {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let data = self.0.borrow();
            let start = (self.1 as usize).min(data.len());
            let n = out.len().min(data.len() - start);
            out[..n].copy_from_slice(&data[start..start + n]);
            self.1 += n as u64;
            Ok(n)
        }
    }

    impl Seek for Growing {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.1 = match pos {
                SeekFrom::Start(p) => p,
                SeekFrom::End(d) => (self.0.borrow().len() as i64 + d) as u64,
                SeekFrom::Current(d) => (self.1 as i64 + d) as u64,
            };
            Ok(self.1)
        }
    }

    #[test]
    fn mask_matches_rocksdb_definition() {
        for crc in [0u32, 1, 0xdead_beef, u32::MAX, 0x8000_0000] {
            let wide = u64::from(crc);
            let expected = (((wide >> 15) | (wide << 17)) as u32).wrapping_add(0xa282_ead8);
            assert_eq!(mask_crc(crc), expected);
            assert_eq!(unmask_crc(mask_crc(crc)), crc);
        }
        // crc32c of "123456789" is the standard check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn round_trip_sizes_around_block_boundaries() {
        let block = BLOCK_SIZE as usize;
        let sizes = [
            0,
            1,
            100,
            block - HEADER_SIZE,
            block - HEADER_SIZE - 1,
            block - HEADER_SIZE - 6,
            block - HEADER_SIZE - 7,
            block - HEADER_SIZE + 1,
            block,
            2 * block,
            3 * block + 17,
            200_000,
        ];
        let records: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(n, i as u8))
            .collect();
        let bytes = encode(&records);
        let decoded = decode(&bytes);
        assert_eq!(decoded.len(), records.len());
        let mut prev_end = 0;
        for (r, want) in decoded.iter().zip(&records) {
            assert_eq!(&r.bytes, want);
            assert!(r.start_offset >= prev_end);
            assert!(r.start_offset - prev_end < HEADER_SIZE as u64);
            prev_end = r.end_offset;
        }
        assert_eq!(prev_end, bytes.len() as u64);
    }

    #[test]
    fn exact_block_fill_and_trailers() {
        // A record filling a block exactly leaves the next record at the block start.
        let block = BLOCK_SIZE as usize;
        let bytes = encode(&[payload(block - HEADER_SIZE, 1), vec![7]]);
        assert_eq!(bytes[block + 6], record_type::FULL);
        assert_eq!(bytes.len(), block + HEADER_SIZE + 1);

        // Leaving 6 bytes in the block: they are zero padding, the next record starts in the
        // next block.
        let bytes = encode(&[payload(block - HEADER_SIZE - 6, 2), vec![8, 9]]);
        let first_end = block - 6;
        assert!(bytes[first_end..block].iter().all(|&b| b == 0));
        assert_eq!(bytes[block + 6], record_type::FULL);
        assert_eq!(decode(&bytes)[1].start_offset, block as u64);

        // Leaving exactly 7 bytes: a zero-length FIRST fills them, the data follows as LAST.
        let bytes = encode(&[payload(block - HEADER_SIZE - 7, 3), vec![1, 2, 3]]);
        let first_end = block - HEADER_SIZE;
        assert_eq!(
            bytes[first_end + 4..first_end + 7],
            [0, 0, record_type::FIRST]
        );
        assert_eq!(bytes[block + 6], record_type::LAST);
        let decoded = decode(&bytes);
        assert_eq!(decoded[1].bytes, vec![1, 2, 3]);
        assert_eq!(decoded[1].start_offset, first_end as u64);
    }

    #[test]
    fn torn_tail_returns_none_then_reads_record_after_append() {
        let records = [payload(10, 1), payload(70_000, 2), payload(5, 3)];
        let full = encode(&records);
        let file = Growing::default();
        let mut reader = LogReader::new(file.clone(), "growing.log").unwrap();
        assert!(reader.next_record().unwrap().is_none());

        // Feed the file a few bytes at a time; every record must come out exactly once and
        // whole, never before its last byte is there.
        let mut got = Vec::new();
        let ends: Vec<usize> = decode(&full)
            .iter()
            .map(|r| r.end_offset as usize)
            .collect();
        let mut written = 0;
        while written < full.len() {
            let step = 4099.min(full.len() - written);
            file.0
                .borrow_mut()
                .extend_from_slice(&full[written..written + step]);
            written += step;
            while let Some(r) = reader.next_record().unwrap() {
                assert!(r.end_offset as usize <= written);
                got.push(r);
            }
            let complete = ends.iter().filter(|&&e| e <= written).count();
            assert_eq!(got.len(), complete, "after {written} bytes");
            if complete < ends.len() {
                assert!(!reader.at_clean_end().unwrap());
                assert!(matches!(
                    reader.finish(),
                    Err(LogError::TrailingData { .. })
                ));
            }
        }
        let bytes: Vec<Vec<u8>> = got.into_iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, records);
        assert!(reader.at_clean_end().unwrap());
    }

    #[test]
    fn zero_filled_tail_is_not_written_yet() {
        let records = [payload(100, 1), payload(40_000, 2)];
        let full = encode(&records);
        let first_end = decode(&full)[0].end_offset as usize;

        // The file holds the first record and then preallocated zeros.
        let file = Growing::default();
        {
            let mut data = file.0.borrow_mut();
            data.extend_from_slice(&full[..first_end]);
            data.resize(first_end + 50_000, 0);
        }
        let mut reader = LogReader::new(file.clone(), "prealloc.log").unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, records[0]);
        assert!(reader.next_record().unwrap().is_none());
        assert!(reader.at_clean_end().unwrap());
        assert_eq!(reader.offset(), first_end as u64);

        // The writer then fills the preallocated space in place.
        {
            let mut data = file.0.borrow_mut();
            data[first_end..full.len()].copy_from_slice(&full[first_end..]);
        }
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, records[1]);
        assert!(reader.next_record().unwrap().is_none());
        assert!(reader.at_clean_end().unwrap());
    }

    #[test]
    fn zero_gap_followed_by_data_is_an_error() {
        let mut bytes = encode(&[payload(10, 1)]);
        let gap = bytes.len();
        bytes.extend_from_slice(&[0u8; 20]);
        bytes.extend_from_slice(&[1, 2, 3]);
        let mut reader = LogReader::new(Cursor::new(bytes), "gap.log").unwrap();
        reader.next_record().unwrap().unwrap();
        match reader.next_record() {
            Err(LogError::ZeroGap {
                offset,
                data_offset,
                ..
            }) => {
                assert_eq!(offset, gap as u64);
                assert_eq!(data_offset, gap as u64 + 20);
            }
            other => panic!("expected a zero-gap error, got {other:?}"),
        }
    }

    #[test]
    fn crc_flip_followed_by_data_is_an_error_naming_the_offset() {
        let records = [payload(50, 1), payload(60, 2), payload(70, 3)];
        let mut bytes = encode(&records);
        let second = decode(&bytes)[1].start_offset as usize;
        bytes[second + HEADER_SIZE + 10] ^= 0x01;
        let mut reader = LogReader::new(Cursor::new(bytes.clone()), "flip.log").unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, records[0]);
        let err = reader.next_record().unwrap_err();
        assert!(matches!(err, LogError::Checksum { offset, .. } if offset == second as u64));
        let msg = err.to_string();
        assert!(
            msg.contains("flip.log") && msg.contains(&second.to_string()),
            "{msg}"
        );

        // The same damage in the last record, with nothing after it, reads as a tail still
        // being written; `finish` reports it.
        let mut bytes = encode(&records);
        let third = decode(&bytes)[2].start_offset as usize;
        bytes[third + HEADER_SIZE] ^= 0x80;
        let mut reader = LogReader::new(Cursor::new(bytes.clone()), "tail.log").unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, records[0]);
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, records[1]);
        assert!(reader.next_record().unwrap().is_none());
        assert!(!reader.at_clean_end().unwrap());
        match reader.finish() {
            Err(LogError::TrailingData { offset, len, .. }) => {
                assert_eq!(offset, third as u64);
                assert_eq!(len, (bytes.len() - third) as u64);
            }
            other => panic!("expected trailing data, got {other:?}"),
        }
    }

    #[test]
    fn recyclable_records_are_rejected() {
        let mut bytes = encode(&[payload(10, 1)]);
        // Turn the FULL record into a recyclable FULL with a log number, fixing its crc.
        let mut rec = Vec::new();
        let payload = bytes[HEADER_SIZE..].to_vec();
        let mut crc_input = vec![record_type::RECYCLABLE_FULL];
        crc_input.extend_from_slice(&5u32.to_le_bytes());
        crc_input.extend_from_slice(&payload);
        rec.extend_from_slice(&mask_crc(crc32c::crc32c(&crc_input)).to_le_bytes());
        rec.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        rec.push(record_type::RECYCLABLE_FULL);
        rec.extend_from_slice(&5u32.to_le_bytes());
        rec.extend_from_slice(&payload);
        bytes = rec;
        let err = LogReader::new(Cursor::new(bytes), "recycled.log")
            .unwrap()
            .next_record()
            .unwrap_err();
        assert!(matches!(
            err,
            LogError::Recycled {
                offset: 0,
                record_type: 5,
                ..
            }
        ));
        assert!(err.to_string().contains("recycle_log_file_num"), "{err}");
    }

    fn physical(t: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&mask_crc(record_crc(t, payload)).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.push(t);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn metadata_records_are_consumed_and_unknown_types_checked() {
        let mut bytes = Vec::new();
        bytes.extend(physical(
            record_type::USER_DEFINED_TIMESTAMP_SIZE,
            &[2, 0, 0, 0, 8, 0, 3, 0, 0, 0, 4, 0],
        ));
        let mut pred = Vec::new();
        for v in [41u64, 4096, 777] {
            pred.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend(physical(record_type::PREDECESSOR_WAL_INFO, &pred));
        bytes.extend(physical(0x80 | 0x33, b"ignore me"));
        bytes.extend(physical(record_type::FULL, b"data"));
        let mut reader = LogReader::new(Cursor::new(bytes.clone()), "meta.log").unwrap();
        let r = reader.next_record().unwrap().unwrap();
        assert_eq!(r.bytes, b"data");
        assert_eq!(r.end_offset, bytes.len() as u64);
        assert_eq!(
            reader
                .timestamp_sizes()
                .iter()
                .map(|(a, b)| (*a, *b))
                .collect::<Vec<_>>(),
            vec![(2, 8), (3, 4)]
        );
        assert_eq!(
            reader.predecessor(),
            Some(PredecessorWalInfo {
                log_number: 41,
                size_bytes: 4096,
                last_batch_sequence: 777
            })
        );

        // The same file entry by entry.
        let mut reader = LogReader::new(Cursor::new(bytes.clone()), "meta.log").unwrap();
        let mut entries = Vec::new();
        while let Some(e) = reader.next_entry().unwrap() {
            entries.push(e);
        }
        assert_eq!(entries.len(), 4);
        assert_eq!(
            entries[0],
            LogEntry::TimestampSizes {
                offset: 0,
                sizes: vec![(2, 8), (3, 4)]
            }
        );
        assert!(matches!(
            entries[1],
            LogEntry::PredecessorWal { offset: 19, .. }
        ));
        assert_eq!(
            entries[2],
            LogEntry::Ignored {
                offset: 50,
                record_type: 0xb3
            }
        );
        assert!(matches!(&entries[3], LogEntry::Record(r) if r.start_offset == 66));

        // The writer's timestamp size record is the same bytes.
        let mut w = LogWriter::new(Vec::new());
        w.add_timestamp_size_record(&[(2, 8), (3, 4)]).unwrap();
        assert_eq!(w.into_inner(), bytes[..HEADER_SIZE + 12]);

        let unknown = physical(42, b"x");
        let err = LogReader::new(Cursor::new(unknown), "unknown.log")
            .unwrap()
            .next_record()
            .unwrap_err();
        assert!(
            matches!(
                err,
                LogError::UnknownType {
                    record_type: 42,
                    ..
                }
            ),
            "{err}"
        );

        // A compression record anywhere but at offset 0 is corrupt.
        let mut late = physical(record_type::FULL, b"a");
        late.extend(physical(
            record_type::SET_COMPRESSION_TYPE,
            &7u32.to_le_bytes(),
        ));
        let mut reader = LogReader::new(Cursor::new(late), "late.log").unwrap();
        reader.next_record().unwrap().unwrap();
        assert!(matches!(
            reader.next_record(),
            Err(LogError::BadMetadata { offset: 8, .. })
        ));

        // Only zstd is supported.
        let lz4 = physical(record_type::SET_COMPRESSION_TYPE, &4u32.to_le_bytes());
        assert!(matches!(
            LogReader::new(Cursor::new(lz4), "lz4.log")
                .unwrap()
                .next_record(),
            Err(LogError::UnsupportedCompression { code: 4, .. })
        ));
    }

    #[test]
    fn compressed_records_are_decompressed_and_resumable() {
        let a = payload(50_000, 1);
        let b = b"second".to_vec();
        // Hand-built compressed log: the compression record, then zstd frames as payloads.
        let mut bytes = physical(record_type::SET_COMPRESSION_TYPE, &7u32.to_le_bytes());
        let mut w = LogWriter::with_offset(Vec::new(), bytes.len() as u64);
        w.add_record(&zstd::bulk::compress(&a, 3).unwrap()).unwrap();
        let mid = w.offset();
        w.add_record(&zstd::bulk::compress(&b, 3).unwrap()).unwrap();
        w.add_record(&[]).unwrap();
        bytes.extend(w.into_inner());

        let mut reader = LogReader::new(Cursor::new(bytes.clone()), "zstd.log").unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().bytes, a);
        assert_eq!(reader.compression(), Some(WalCompression::Zstd));
        assert_eq!(reader.offset(), mid);
        let mut resumed = LogReader::new_at(Cursor::new(bytes.clone()), "zstd.log", mid).unwrap();
        assert_eq!(resumed.compression(), Some(WalCompression::Zstd));
        assert_eq!(resumed.next_record().unwrap().unwrap().bytes, b);
        assert_eq!(
            resumed.next_record().unwrap().unwrap().bytes,
            Vec::<u8>::new()
        );
        assert!(resumed.next_record().unwrap().is_none());
    }

    #[test]
    fn fragment_sequence_errors() {
        let mut bytes = physical(record_type::MIDDLE, b"orphan");
        let err = LogReader::new(Cursor::new(bytes.clone()), "frag.log")
            .unwrap()
            .next_record()
            .unwrap_err();
        assert!(
            matches!(err, LogError::Fragmentation { offset: 0, .. }),
            "{err}"
        );

        bytes = physical(record_type::FIRST, b"start");
        bytes.extend(physical(record_type::FULL, b"full"));
        let err = LogReader::new(Cursor::new(bytes), "frag.log")
            .unwrap()
            .next_record()
            .unwrap_err();
        assert!(
            matches!(err, LogError::Fragmentation { offset: 12, .. }),
            "{err}"
        );

        // An empty FIRST followed by a FULL (old writers) is accepted.
        bytes = physical(record_type::FIRST, b"");
        bytes.extend(physical(record_type::FULL, b"full"));
        let r = LogReader::new(Cursor::new(bytes), "frag.log")
            .unwrap()
            .next_record()
            .unwrap()
            .unwrap();
        assert_eq!((r.bytes.as_slice(), r.start_offset), (&b"full"[..], 7));
    }

    #[test]
    fn resume_at_record_boundaries() {
        let records: Vec<Vec<u8>> = (0..40).map(|i| payload(i * 997, i as u8)).collect();
        let bytes = encode(&records);
        let all = decode(&bytes);
        for (i, r) in all.iter().enumerate() {
            let mut reader =
                LogReader::new_at(Cursor::new(bytes.clone()), "r.log", r.end_offset).unwrap();
            let rest: Vec<Vec<u8>> = reader.by_ref().map(|r| r.unwrap().bytes).collect();
            assert_eq!(rest, records[i + 1..]);
        }
        assert!(matches!(
            LogReader::new_at(Cursor::new(bytes.clone()), "r.log", bytes.len() as u64 + 1),
            Err(LogError::ResumeBeyondEnd { .. })
        ));
    }

    #[test]
    fn files_on_disk_with_open_at() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000007.log");
        let records = [payload(1000, 1), payload(33_000, 2)];
        std::fs::write(&path, encode(&records)).unwrap();
        let all = read_all(&path).unwrap();
        assert_eq!(all.len(), 2);
        let mut reader = LogReader::open_at(&path, all[0].end_offset).unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap(), all[1]);
        let err = LogReader::open(dir.path().join("missing.log")).unwrap_err();
        assert!(err.to_string().contains("missing.log"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn proptest_round_trip(sizes in proptest::collection::vec(0usize..80_000, 0..12), seed in any::<u8>()) {
            let records: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| payload(n, seed.wrapping_add(i as u8))).collect();
            let bytes = encode(&records);
            let decoded: Vec<Vec<u8>> = decode(&bytes).into_iter().map(|r| r.bytes).collect();
            prop_assert_eq!(decoded, records);
        }

        #[test]
        fn proptest_prefix_never_yields_partial_records(sizes in proptest::collection::vec(0usize..40_000, 1..6), cut in any::<proptest::sample::Index>()) {
            let records: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| payload(n, i as u8)).collect();
            let bytes = encode(&records);
            let cut = cut.index(bytes.len() + 1);
            let mut reader = LogReader::new(Cursor::new(bytes[..cut].to_vec()), "cut.log").unwrap();
            let mut n = 0;
            while let Some(r) = reader.next_record().unwrap() {
                prop_assert_eq!(&r.bytes, &records[n]);
                prop_assert!(r.end_offset as usize <= cut);
                n += 1;
            }
            // Every record that ends within the prefix was returned.
            let complete = decode(&bytes).iter().filter(|r| r.end_offset as usize <= cut).count();
            prop_assert_eq!(n, complete);
        }
    }
}
