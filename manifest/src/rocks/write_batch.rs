//! RocksDB WriteBatch records: the payload of every WAL record.
//!
//! ```text
//! sequence (fixed64) | count (fixed32) | entries…
//! ```
//!
//! Each entry is a tag byte, then (for the column-family variants) the column family id as a
//! varint32, then varint32-length-prefixed slices. The tags are RocksDB's `ValueType`s
//! (`db/dbformat.h`) that `ReadRecordFromWriteBatch` (`db/write_batch.cc`) accepts.
//! `DeletionWithTimestamp` (0x14) is a `ValueType` but never appears in a WriteBatch: RocksDB
//! rejects it there as an unknown tag, and so does this parser.
//!
//! Every Put, Delete, SingleDelete, DeleteRange, Merge, BlobIndex, PutEntity and TimedPut
//! entry takes one sequence number, and the header's count is the number of those entries.
//! LogData blobs and transaction markers take none.

use std::collections::BTreeSet;

use super::coding::{Input, put_length_prefixed, put_varint32};

/// Size of the batch header (sequence + count).
pub const HEADER_SIZE: usize = 12;

/// WriteBatch entry tags (RocksDB `ValueType`).
pub mod tag {
    pub const DELETION: u8 = 0x0;
    pub const VALUE: u8 = 0x1;
    pub const MERGE: u8 = 0x2;
    pub const LOG_DATA: u8 = 0x3;
    pub const COLUMN_FAMILY_DELETION: u8 = 0x4;
    pub const COLUMN_FAMILY_VALUE: u8 = 0x5;
    pub const COLUMN_FAMILY_MERGE: u8 = 0x6;
    pub const SINGLE_DELETION: u8 = 0x7;
    pub const COLUMN_FAMILY_SINGLE_DELETION: u8 = 0x8;
    pub const BEGIN_PREPARE_XID: u8 = 0x9;
    pub const END_PREPARE_XID: u8 = 0xA;
    pub const COMMIT_XID: u8 = 0xB;
    pub const ROLLBACK_XID: u8 = 0xC;
    pub const NOOP: u8 = 0xD;
    pub const COLUMN_FAMILY_RANGE_DELETION: u8 = 0xE;
    pub const RANGE_DELETION: u8 = 0xF;
    pub const COLUMN_FAMILY_BLOB_INDEX: u8 = 0x10;
    pub const BLOB_INDEX: u8 = 0x11;
    pub const BEGIN_PERSISTED_PREPARE_XID: u8 = 0x12;
    pub const BEGIN_UNPREPARE_XID: u8 = 0x13;
    /// Not valid in a WriteBatch (internal key type only).
    pub const DELETION_WITH_TIMESTAMP: u8 = 0x14;
    pub const COMMIT_XID_AND_TIMESTAMP: u8 = 0x15;
    pub const WIDE_COLUMN_ENTITY: u8 = 0x16;
    pub const COLUMN_FAMILY_WIDE_COLUMN_ENTITY: u8 = 0x17;
    pub const VALUE_PREFERRED_SEQNO: u8 = 0x18;
    pub const COLUMN_FAMILY_VALUE_PREFERRED_SEQNO: u8 = 0x19;
}

/// What an entry does, independent of whether its tag names a column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// `key` → `value`.
    Put,
    /// Deletes `key`.
    Delete,
    /// Deletes `key` (single-delete semantics).
    SingleDelete,
    /// Merge operand `value` for `key`.
    Merge,
    /// Deletes `[key, value)`: `key` is the begin key, `value` the end key.
    DeleteRange,
    /// BlobDB index entry: `value` is the encoded blob index.
    BlobIndex,
    /// Wide-column entity: `value` is the serialized entity.
    PutEntity,
    /// Put with a write time: `value` is the value followed by the unix write time
    /// (fixed64); see [`Entry::timed_put_parts`].
    TimedPut,
    /// Opaque application blob (`put_log_data`): in `value`. Takes no sequence number and is
    /// never applied.
    LogData,
    /// Transaction batch separator.
    Noop,
    BeginPrepare,
    BeginPersistedPrepare,
    BeginUnprepare,
    /// End of a prepared transaction: `key` is the XID.
    EndPrepare,
    /// Commit of a prepared transaction: `key` is the XID.
    Commit,
    /// Commit with a commit timestamp: `key` is the XID, `value` the timestamp.
    CommitWithTimestamp,
    /// Rollback of a prepared transaction: `key` is the XID.
    Rollback,
}

impl EntryKind {
    /// Whether an entry of this kind takes a sequence number (and counts in the header).
    pub fn consumes_sequence(self) -> bool {
        matches!(
            self,
            EntryKind::Put
                | EntryKind::Delete
                | EntryKind::SingleDelete
                | EntryKind::Merge
                | EntryKind::DeleteRange
                | EntryKind::BlobIndex
                | EntryKind::PutEntity
                | EntryKind::TimedPut
        )
    }

    /// Whether this kind is a two-phase-commit marker or separator.
    pub fn is_transaction_marker(self) -> bool {
        matches!(
            self,
            EntryKind::Noop
                | EntryKind::BeginPrepare
                | EntryKind::BeginPersistedPrepare
                | EntryKind::BeginUnprepare
                | EntryKind::EndPrepare
                | EntryKind::Commit
                | EntryKind::CommitWithTimestamp
                | EntryKind::Rollback
        )
    }

    /// The tag RocksDB writes for this kind in column family `cf_id` (the plain tag for the
    /// default column family, the column-family variant otherwise, where one exists).
    pub fn tag_for(self, cf_id: u32) -> u8 {
        let (plain, with_cf) = match self {
            EntryKind::Put => (tag::VALUE, Some(tag::COLUMN_FAMILY_VALUE)),
            EntryKind::Delete => (tag::DELETION, Some(tag::COLUMN_FAMILY_DELETION)),
            EntryKind::SingleDelete => (
                tag::SINGLE_DELETION,
                Some(tag::COLUMN_FAMILY_SINGLE_DELETION),
            ),
            EntryKind::Merge => (tag::MERGE, Some(tag::COLUMN_FAMILY_MERGE)),
            EntryKind::DeleteRange => {
                (tag::RANGE_DELETION, Some(tag::COLUMN_FAMILY_RANGE_DELETION))
            }
            EntryKind::BlobIndex => (tag::BLOB_INDEX, Some(tag::COLUMN_FAMILY_BLOB_INDEX)),
            EntryKind::PutEntity => (
                tag::WIDE_COLUMN_ENTITY,
                Some(tag::COLUMN_FAMILY_WIDE_COLUMN_ENTITY),
            ),
            EntryKind::TimedPut => (
                tag::VALUE_PREFERRED_SEQNO,
                Some(tag::COLUMN_FAMILY_VALUE_PREFERRED_SEQNO),
            ),
            EntryKind::LogData => (tag::LOG_DATA, None),
            EntryKind::Noop => (tag::NOOP, None),
            EntryKind::BeginPrepare => (tag::BEGIN_PREPARE_XID, None),
            EntryKind::BeginPersistedPrepare => (tag::BEGIN_PERSISTED_PREPARE_XID, None),
            EntryKind::BeginUnprepare => (tag::BEGIN_UNPREPARE_XID, None),
            EntryKind::EndPrepare => (tag::END_PREPARE_XID, None),
            EntryKind::Commit => (tag::COMMIT_XID, None),
            EntryKind::CommitWithTimestamp => (tag::COMMIT_XID_AND_TIMESTAMP, None),
            EntryKind::Rollback => (tag::ROLLBACK_XID, None),
        };
        match with_cf {
            Some(t) if cf_id != 0 => t,
            _ => plain,
        }
    }

    /// The kind of a tag, and whether the tag carries a column family id.
    pub fn from_tag(t: u8) -> Option<(EntryKind, bool)> {
        Some(match t {
            tag::VALUE => (EntryKind::Put, false),
            tag::COLUMN_FAMILY_VALUE => (EntryKind::Put, true),
            tag::DELETION => (EntryKind::Delete, false),
            tag::COLUMN_FAMILY_DELETION => (EntryKind::Delete, true),
            tag::SINGLE_DELETION => (EntryKind::SingleDelete, false),
            tag::COLUMN_FAMILY_SINGLE_DELETION => (EntryKind::SingleDelete, true),
            tag::MERGE => (EntryKind::Merge, false),
            tag::COLUMN_FAMILY_MERGE => (EntryKind::Merge, true),
            tag::RANGE_DELETION => (EntryKind::DeleteRange, false),
            tag::COLUMN_FAMILY_RANGE_DELETION => (EntryKind::DeleteRange, true),
            tag::BLOB_INDEX => (EntryKind::BlobIndex, false),
            tag::COLUMN_FAMILY_BLOB_INDEX => (EntryKind::BlobIndex, true),
            tag::WIDE_COLUMN_ENTITY => (EntryKind::PutEntity, false),
            tag::COLUMN_FAMILY_WIDE_COLUMN_ENTITY => (EntryKind::PutEntity, true),
            tag::VALUE_PREFERRED_SEQNO => (EntryKind::TimedPut, false),
            tag::COLUMN_FAMILY_VALUE_PREFERRED_SEQNO => (EntryKind::TimedPut, true),
            tag::LOG_DATA => (EntryKind::LogData, false),
            tag::NOOP => (EntryKind::Noop, false),
            tag::BEGIN_PREPARE_XID => (EntryKind::BeginPrepare, false),
            tag::BEGIN_PERSISTED_PREPARE_XID => (EntryKind::BeginPersistedPrepare, false),
            tag::BEGIN_UNPREPARE_XID => (EntryKind::BeginUnprepare, false),
            tag::END_PREPARE_XID => (EntryKind::EndPrepare, false),
            tag::COMMIT_XID => (EntryKind::Commit, false),
            tag::COMMIT_XID_AND_TIMESTAMP => (EntryKind::CommitWithTimestamp, false),
            tag::ROLLBACK_XID => (EntryKind::Rollback, false),
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            EntryKind::Put => "Put",
            EntryKind::Delete => "Delete",
            EntryKind::SingleDelete => "SingleDelete",
            EntryKind::Merge => "Merge",
            EntryKind::DeleteRange => "DeleteRange",
            EntryKind::BlobIndex => "BlobIndex",
            EntryKind::PutEntity => "PutEntity",
            EntryKind::TimedPut => "TimedPut",
            EntryKind::LogData => "LogData",
            EntryKind::Noop => "Noop",
            EntryKind::BeginPrepare => "BeginPrepare",
            EntryKind::BeginPersistedPrepare => "BeginPersistedPrepare",
            EntryKind::BeginUnprepare => "BeginUnprepare",
            EntryKind::EndPrepare => "EndPrepare",
            EntryKind::Commit => "Commit",
            EntryKind::CommitWithTimestamp => "CommitWithTimestamp",
            EntryKind::Rollback => "Rollback",
        }
    }
}

/// One entry of a batch. See [`EntryKind`] for what `key` and `value` hold for each kind;
/// unused fields are empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Column family id (0, the default column family, for tags without one).
    pub cf_id: u32,
    pub kind: EntryKind,
    /// The raw tag byte.
    pub tag: u8,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// Offset of the entry's tag within the batch.
    pub offset: usize,
}

impl<'a> Entry<'a> {
    /// For a [`EntryKind::TimedPut`]: the value and the unix write time packed after it.
    pub fn timed_put_parts(&self) -> Option<(&'a [u8], u64)> {
        if self.kind != EntryKind::TimedPut || self.value.len() < 8 {
            return None;
        }
        let (value, time) = self.value.split_at(self.value.len() - 8);
        let mut b = [0u8; 8];
        b.copy_from_slice(time);
        Some((value, u64::from_le_bytes(b)))
    }
}

/// Errors decoding a WriteBatch. Offsets are within the batch; callers add the file and
/// record offset it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("malformed WriteBatch: {len} bytes, shorter than its 12-byte header")]
    TooShort { len: usize },
    #[error(
        "malformed WriteBatch (sequence {sequence}): {kind} entry at byte {offset} is truncated \
         (cannot read its {field})"
    )]
    Truncated {
        sequence: u64,
        kind: &'static str,
        field: &'static str,
        offset: usize,
    },
    #[error("malformed WriteBatch (sequence {sequence}): unknown tag {tag:#04x} at byte {offset}")]
    UnknownTag {
        sequence: u64,
        tag: u8,
        offset: usize,
    },
    #[error(
        "malformed WriteBatch (sequence {sequence}): the header counts {header} entries taking \
         sequence numbers, the batch holds {found}"
    )]
    CountMismatch {
        sequence: u64,
        header: u32,
        found: u64,
    },
}

/// The fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Sequence number of the batch's first entry.
    pub sequence: u64,
    /// Number of entries taking a sequence number.
    pub count: u32,
}

impl BatchHeader {
    /// Reads the header only.
    pub fn parse(data: &[u8]) -> Result<BatchHeader, BatchError> {
        let mut input = Input::new(data);
        match (input.fixed64(), input.fixed32()) {
            (Some(sequence), Some(count)) => Ok(BatchHeader { sequence, count }),
            _ => Err(BatchError::TooShort { len: data.len() }),
        }
    }

    /// The sequence number following the batch (`sequence + count`; saturating, for a
    /// header a corrupt batch makes up).
    pub fn next_sequence(&self) -> u64 {
        self.sequence.saturating_add(u64::from(self.count))
    }

    /// The last sequence number in use once the batch is applied: that of its last entry, or
    /// for a batch taking no sequence number (LogData only), the one before it. RocksDB
    /// records the same in predecessor WAL info.
    pub fn last_sequence(&self) -> u64 {
        self.next_sequence().saturating_sub(1)
    }
}

/// A WriteBatch over borrowed bytes.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    header: BatchHeader,
    data: &'a [u8],
}

impl<'a> Batch<'a> {
    /// Checks the header; entries are decoded lazily by [`entries`](Self::entries).
    pub fn parse(data: &'a [u8]) -> Result<Batch<'a>, BatchError> {
        Ok(Batch {
            header: BatchHeader::parse(data)?,
            data,
        })
    }

    pub fn header(&self) -> BatchHeader {
        self.header
    }

    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The entries in order.
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            input: Input::at(self.data, HEADER_SIZE),
            sequence: self.header.sequence,
            failed: false,
        }
    }

    /// The LogData blobs (`put_log_data`) of the batch, in order.
    pub fn log_data_blobs(&self) -> Result<Vec<&'a [u8]>, BatchError> {
        let mut blobs = Vec::new();
        for entry in self.entries() {
            let entry = entry?;
            if entry.kind == EntryKind::LogData {
                blobs.push(entry.value);
            }
        }
        Ok(blobs)
    }

    /// Decodes every entry and summarizes the batch.
    pub fn summary(&self) -> Result<BatchSummary, BatchError> {
        let mut summary = BatchSummary {
            header: self.header,
            column_families: BTreeSet::new(),
            sequence_entries: 0,
            entries: 0,
            log_data: 0,
            merges: 0,
            transaction_markers: 0,
        };
        for entry in self.entries() {
            let entry = entry?;
            summary.entries += 1;
            if entry.kind.consumes_sequence() {
                summary.sequence_entries += 1;
                summary.column_families.insert(entry.cf_id);
            }
            match entry.kind {
                EntryKind::LogData => summary.log_data += 1,
                EntryKind::Merge => summary.merges += 1,
                k if k.is_transaction_marker() => summary.transaction_markers += 1,
                _ => {}
            }
        }
        Ok(summary)
    }

    /// Like [`summary`](Self::summary), and checks that the header's count equals the number
    /// of entries taking sequence numbers (true of every batch outside two-phase-commit
    /// write policies; RocksDB checks the same when it iterates a whole batch).
    pub fn validate(&self) -> Result<BatchSummary, BatchError> {
        let summary = self.summary()?;
        if summary.sequence_entries != u64::from(self.header.count) {
            return Err(BatchError::CountMismatch {
                sequence: self.header.sequence,
                header: self.header.count,
                found: summary.sequence_entries,
            });
        }
        Ok(summary)
    }
}

/// What a batch touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSummary {
    pub header: BatchHeader,
    /// Column families written by entries taking sequence numbers.
    pub column_families: BTreeSet<u32>,
    /// Entries taking a sequence number; equals `header.count` for ordinary batches.
    pub sequence_entries: u64,
    /// All entries.
    pub entries: u64,
    pub log_data: u64,
    pub merges: u64,
    /// Two-phase-commit markers and Noop separators.
    pub transaction_markers: u64,
}

impl BatchSummary {
    pub fn count_matches_header(&self) -> bool {
        self.sequence_entries == u64::from(self.header.count)
    }
}

/// Iterator over the entries of a [`Batch`]; stops after the first error.
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    input: Input<'a>,
    sequence: u64,
    failed: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.input.is_empty() {
            return None;
        }
        let result = self.read_entry();
        self.failed = result.is_err();
        Some(result)
    }
}

impl<'a> Entries<'a> {
    fn read_entry(&mut self) -> Result<Entry<'a>, BatchError> {
        let offset = self.input.pos();
        let sequence = self.sequence;
        let t = self.input.u8().expect("input is not empty");
        let Some((kind, has_cf)) = EntryKind::from_tag(t) else {
            return Err(BatchError::UnknownTag {
                sequence,
                tag: t,
                offset,
            });
        };
        let truncated = |field: &'static str| BatchError::Truncated {
            sequence,
            kind: kind.name(),
            field,
            offset,
        };
        let cf_id = if has_cf {
            self.input
                .varint32()
                .ok_or_else(|| truncated("column family id"))?
        } else {
            0
        };
        let mut key: &[u8] = &[];
        let mut value: &[u8] = &[];
        match kind {
            EntryKind::Put
            | EntryKind::Merge
            | EntryKind::BlobIndex
            | EntryKind::PutEntity
            | EntryKind::TimedPut => {
                key = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("key"))?;
                value = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("value"))?;
                if kind == EntryKind::TimedPut && value.len() < 8 {
                    return Err(truncated("write time"));
                }
            }
            EntryKind::DeleteRange => {
                key = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("begin key"))?;
                value = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("end key"))?;
            }
            EntryKind::Delete | EntryKind::SingleDelete => {
                key = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("key"))?;
            }
            EntryKind::LogData => {
                value = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("blob"))?;
            }
            EntryKind::Noop
            | EntryKind::BeginPrepare
            | EntryKind::BeginPersistedPrepare
            | EntryKind::BeginUnprepare => {}
            EntryKind::EndPrepare | EntryKind::Commit | EntryKind::Rollback => {
                key = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("XID"))?;
            }
            EntryKind::CommitWithTimestamp => {
                // The commit timestamp comes first, then the XID.
                value = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("commit timestamp"))?;
                key = self
                    .input
                    .length_prefixed()
                    .ok_or_else(|| truncated("XID"))?;
            }
        }
        Ok(Entry {
            cf_id,
            kind,
            tag: t,
            key,
            value,
            offset,
        })
    }
}

/// Encodes WriteBatches as RocksDB does.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    data: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    /// An empty batch whose first entry gets `sequence`.
    pub fn new(sequence: u64) -> Self {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&sequence.to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        BatchBuilder { data, count: 0 }
    }

    /// Appends an entry of any kind (see [`EntryKind`] for the meaning of `key` and `value`).
    /// The tag is chosen from `kind` and `cf_id` like RocksDB does; `entry.tag` is ignored.
    pub fn push(&mut self, entry: &Entry<'_>) -> &mut Self {
        let t = entry.kind.tag_for(entry.cf_id);
        self.data.push(t);
        if EntryKind::from_tag(t).is_some_and(|(_, has_cf)| has_cf) {
            put_varint32(&mut self.data, entry.cf_id);
        }
        match entry.kind {
            EntryKind::Put
            | EntryKind::Merge
            | EntryKind::BlobIndex
            | EntryKind::PutEntity
            | EntryKind::TimedPut
            | EntryKind::DeleteRange => {
                put_length_prefixed(&mut self.data, entry.key);
                put_length_prefixed(&mut self.data, entry.value);
            }
            EntryKind::Delete | EntryKind::SingleDelete => {
                put_length_prefixed(&mut self.data, entry.key);
            }
            EntryKind::LogData => put_length_prefixed(&mut self.data, entry.value),
            EntryKind::Noop
            | EntryKind::BeginPrepare
            | EntryKind::BeginPersistedPrepare
            | EntryKind::BeginUnprepare => {}
            EntryKind::EndPrepare | EntryKind::Commit | EntryKind::Rollback => {
                put_length_prefixed(&mut self.data, entry.key);
            }
            EntryKind::CommitWithTimestamp => {
                put_length_prefixed(&mut self.data, entry.value);
                put_length_prefixed(&mut self.data, entry.key);
            }
        }
        if entry.kind.consumes_sequence() {
            self.count += 1;
        }
        self
    }

    /// Appends a Put.
    pub fn put(&mut self, cf_id: u32, key: &[u8], value: &[u8]) -> &mut Self {
        self.push(&Entry {
            cf_id,
            kind: EntryKind::Put,
            tag: 0,
            key,
            value,
            offset: 0,
        })
    }

    /// Appends a Delete.
    pub fn delete(&mut self, cf_id: u32, key: &[u8]) -> &mut Self {
        self.push(&Entry {
            cf_id,
            kind: EntryKind::Delete,
            tag: 0,
            key,
            value: &[],
            offset: 0,
        })
    }

    /// Appends a LogData blob.
    pub fn log_data(&mut self, blob: &[u8]) -> &mut Self {
        self.push(&Entry {
            cf_id: 0,
            kind: EntryKind::LogData,
            tag: 0,
            key: &[],
            value: blob,
            offset: 0,
        })
    }

    /// The number of entries taking sequence numbers so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The encoded batch.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.data);
        data[8..12].copy_from_slice(&self.count.to_le_bytes());
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch};

    #[test]
    fn tag_numbering_matches_rocksdb() {
        // Values from RocksDB 11.8 db/dbformat.h (ValueType).
        let expected: [(u8, &str); 26] = [
            (0x0, "Deletion"),
            (0x1, "Value"),
            (0x2, "Merge"),
            (0x3, "LogData"),
            (0x4, "ColumnFamilyDeletion"),
            (0x5, "ColumnFamilyValue"),
            (0x6, "ColumnFamilyMerge"),
            (0x7, "SingleDeletion"),
            (0x8, "ColumnFamilySingleDeletion"),
            (0x9, "BeginPrepareXID"),
            (0xA, "EndPrepareXID"),
            (0xB, "CommitXID"),
            (0xC, "RollbackXID"),
            (0xD, "Noop"),
            (0xE, "ColumnFamilyRangeDeletion"),
            (0xF, "RangeDeletion"),
            (0x10, "ColumnFamilyBlobIndex"),
            (0x11, "BlobIndex"),
            (0x12, "BeginPersistedPrepareXID"),
            (0x13, "BeginUnprepareXID"),
            (0x14, "DeletionWithTimestamp"),
            (0x15, "CommitXIDAndTimestamp"),
            (0x16, "WideColumnEntity"),
            (0x17, "ColumnFamilyWideColumnEntity"),
            (0x18, "ValuePreferredSeqno"),
            (0x19, "ColumnFamilyValuePreferredSeqno"),
        ];
        for (t, name) in expected {
            let decoded = EntryKind::from_tag(t);
            if t == tag::DELETION_WITH_TIMESTAMP {
                assert_eq!(decoded, None, "{name} is not a WriteBatch tag");
                continue;
            }
            let (kind, has_cf) = decoded.unwrap_or_else(|| panic!("{name} must decode"));
            assert_eq!(has_cf, name.starts_with("ColumnFamily"), "{name}");
            assert_eq!(kind.tag_for(if has_cf { 3 } else { 0 }), t, "{name}");
        }
        for t in 0x1A..=0xFF {
            assert_eq!(EntryKind::from_tag(t), None);
        }
    }

    fn kinds(batch: &Batch<'_>) -> Vec<(EntryKind, u32, Vec<u8>, Vec<u8>)> {
        batch
            .entries()
            .map(|e| {
                let e = e.unwrap();
                (e.kind, e.cf_id, e.key.to_vec(), e.value.to_vec())
            })
            .collect()
    }

    fn reencode(batch: &Batch<'_>) -> Vec<u8> {
        let mut b = BatchBuilder::new(batch.header().sequence);
        for e in batch.entries() {
            b.push(&e.unwrap());
        }
        b.finish()
    }

    #[test]
    fn batch_from_rocksdb_crate() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = ["default", "one", "two"]
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()))
            .collect::<Vec<_>>();
        let db = DB::open_cf_descriptors(&opts, dir.path(), cfs).unwrap();
        let one = db.cf_handle("one").unwrap();
        let two = db.cf_handle("two").unwrap();

        let mut wb = WriteBatch::default();
        wb.put(b"k1", b"v1");
        wb.delete(b"k2");
        wb.merge(b"k3", b"m3");
        wb.single_delete(b"k4");
        wb.delete_range(b"a", b"m");
        wb.put_log_data(b"blob-1");
        wb.put_cf(&one, b"ck", vec![7u8; 300]);
        wb.delete_cf(&two, b"dk");
        wb.merge_cf(&one, b"mk", b"mv");
        wb.single_delete_cf(&two, b"sk");
        wb.delete_range_cf(&one, b"b", b"c");
        wb.put_log_data(b"");

        let data = wb.data().to_vec();
        let batch = Batch::parse(&data).unwrap();
        assert_eq!(batch.header().count as usize, wb.len());
        assert_eq!(batch.header().count, 10);
        assert_eq!(
            kinds(&batch),
            vec![
                (EntryKind::Put, 0, b"k1".to_vec(), b"v1".to_vec()),
                (EntryKind::Delete, 0, b"k2".to_vec(), vec![]),
                (EntryKind::Merge, 0, b"k3".to_vec(), b"m3".to_vec()),
                (EntryKind::SingleDelete, 0, b"k4".to_vec(), vec![]),
                (EntryKind::DeleteRange, 0, b"a".to_vec(), b"m".to_vec()),
                (EntryKind::LogData, 0, vec![], b"blob-1".to_vec()),
                (EntryKind::Put, 1, b"ck".to_vec(), vec![7u8; 300]),
                (EntryKind::Delete, 2, b"dk".to_vec(), vec![]),
                (EntryKind::Merge, 1, b"mk".to_vec(), b"mv".to_vec()),
                (EntryKind::SingleDelete, 2, b"sk".to_vec(), vec![]),
                (EntryKind::DeleteRange, 1, b"b".to_vec(), b"c".to_vec()),
                (EntryKind::LogData, 0, vec![], vec![]),
            ]
        );
        assert_eq!(
            batch.log_data_blobs().unwrap(),
            vec![&b"blob-1"[..], &b""[..]]
        );
        let summary = batch.validate().unwrap();
        assert!(summary.count_matches_header());
        assert_eq!(summary.sequence_entries, 10);
        assert_eq!(summary.entries, 12);
        assert_eq!(summary.log_data, 2);
        assert_eq!(summary.merges, 2);
        assert_eq!(summary.column_families, BTreeSet::from([0, 1, 2]));
        assert_eq!(reencode(&batch), data, "re-encoding must be byte-identical");

        // An empty batch and a LogData-only batch count nothing.
        let empty = WriteBatch::default();
        let s = Batch::parse(empty.data()).unwrap().validate().unwrap();
        assert_eq!((s.entries, s.sequence_entries), (0, 0));
        let mut only_blob = WriteBatch::default();
        only_blob.put_log_data(b"x");
        let s = Batch::parse(only_blob.data()).unwrap().validate().unwrap();
        assert_eq!((s.entries, s.sequence_entries, s.log_data), (1, 0, 1));
        assert!(s.column_families.is_empty());

        // The builder's output is accepted by RocksDB and applied.
        let mut b = BatchBuilder::new(0);
        b.put(1, b"built", b"yes")
            .delete(0, b"k1")
            .log_data(b"note");
        db.write(WriteBatch::from_data(&b.finish())).unwrap();
        assert_eq!(
            db.get_cf(&one, b"built").unwrap().as_deref(),
            Some(&b"yes"[..])
        );
    }

    #[test]
    fn a_header_at_the_top_of_the_sequence_range_does_not_overflow() {
        let mut data = u64::MAX.to_le_bytes().to_vec();
        data.extend_from_slice(&7u32.to_le_bytes());
        let h = BatchHeader::parse(&data).unwrap();
        assert_eq!(h.next_sequence(), u64::MAX);
        assert_eq!(h.last_sequence(), u64::MAX - 1);
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert_eq!(
            Batch::parse(&[0u8; 11]).unwrap_err(),
            BatchError::TooShort { len: 11 }
        );
        let mut b = BatchBuilder::new(42);
        b.put(5, b"key", b"value");
        let good = b.finish();
        // Every truncation of the entry is an error naming the entry's offset.
        for cut in HEADER_SIZE + 1..good.len() {
            let batch = Batch::parse(&good[..cut]).unwrap();
            let err = batch.entries().next().unwrap().unwrap_err();
            assert!(
                matches!(
                    err,
                    BatchError::Truncated {
                        sequence: 42,
                        offset: 12,
                        kind: "Put",
                        ..
                    }
                ),
                "cut {cut}: {err:?}"
            );
            assert!(err.to_string().contains("byte 12"), "{err}");
        }
        let mut bad = good.clone();
        bad[HEADER_SIZE] = tag::DELETION_WITH_TIMESTAMP;
        let err = Batch::parse(&bad).unwrap().summary().unwrap_err();
        assert_eq!(
            err,
            BatchError::UnknownTag {
                sequence: 42,
                tag: 0x14,
                offset: 12
            }
        );
        // The iterator stops after an error.
        let mut it = Batch::parse(&bad).unwrap().entries();
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());

        let mut wrong_count = good.clone();
        wrong_count[8] = 2;
        assert_eq!(
            Batch::parse(&wrong_count).unwrap().validate().unwrap_err(),
            BatchError::CountMismatch {
                sequence: 42,
                header: 2,
                found: 1
            }
        );
    }

    #[test]
    fn transaction_markers_and_timed_puts() {
        let mut b = BatchBuilder::new(9);
        let e = |kind, key: &'static [u8], value: &'static [u8]| Entry {
            cf_id: 0,
            kind,
            tag: 0,
            key,
            value,
            offset: 0,
        };
        b.push(&e(EntryKind::Noop, b"", b""));
        b.push(&e(EntryKind::BeginPrepare, b"", b""));
        b.put(0, b"k", b"v");
        b.push(&e(EntryKind::EndPrepare, b"xid-1", b""));
        b.push(&e(EntryKind::Commit, b"xid-1", b""));
        b.push(&e(EntryKind::CommitWithTimestamp, b"xid-2", b"ts-8byte"));
        b.push(&e(EntryKind::Rollback, b"xid-3", b""));
        let mut timed = b"val".to_vec();
        timed.extend_from_slice(&1_700_000_000u64.to_le_bytes());
        b.push(&Entry {
            cf_id: 4,
            kind: EntryKind::TimedPut,
            tag: 0,
            key: b"tk",
            value: &timed,
            offset: 0,
        });
        let data = b.finish();
        let batch = Batch::parse(&data).unwrap();
        let s = batch.validate().unwrap();
        assert_eq!(s.sequence_entries, 2);
        assert_eq!(s.transaction_markers, 6);
        assert_eq!(s.column_families, BTreeSet::from([0, 4]));
        let entries: Vec<_> = batch.entries().map(|e| e.unwrap()).collect();
        assert_eq!(entries[5].key, b"xid-2");
        assert_eq!(entries[5].value, b"ts-8byte");
        assert_eq!(entries[7].tag, tag::COLUMN_FAMILY_VALUE_PREFERRED_SEQNO);
        assert_eq!(
            entries[7].timed_put_parts(),
            Some((&b"val"[..], 1_700_000_000))
        );
        assert_eq!(reencode(&batch), data);
    }
}
