//! RocksDB MANIFEST files: a log (see [`super::log`]) of VersionEdit records, folded into the
//! state a copy of the database depends on (column families, live SST and blob files, WAL
//! numbers, sequence numbers).
//!
//! Tag numbers and the rules for unknown tags follow RocksDB 11.8 `db/version_edit.h` and
//! `VersionEdit::DecodeFrom`; folding follows `VersionEditHandler`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use super::coding::Input;
use super::log::{LogError, LogReader};

/// VersionEdit tags.
pub mod tag {
    pub const COMPARATOR: u32 = 1;
    pub const LOG_NUMBER: u32 = 2;
    pub const NEXT_FILE_NUMBER: u32 = 3;
    pub const LAST_SEQUENCE: u32 = 4;
    /// `kCompactCursor` (LevelDB's compact pointer).
    pub const COMPACT_CURSOR: u32 = 5;
    pub const DELETED_FILE: u32 = 6;
    pub const NEW_FILE: u32 = 7;
    pub const PREV_LOG_NUMBER: u32 = 9;
    pub const MIN_LOG_NUMBER_TO_KEEP: u32 = 10;
    pub const NEW_FILE2: u32 = 100;
    pub const NEW_FILE3: u32 = 102;
    pub const NEW_FILE4: u32 = 103;
    pub const COLUMN_FAMILY: u32 = 200;
    pub const COLUMN_FAMILY_ADD: u32 = 201;
    pub const COLUMN_FAMILY_DROP: u32 = 202;
    pub const MAX_COLUMN_FAMILY: u32 = 203;
    pub const IN_ATOMIC_GROUP: u32 = 300;
    pub const BLOB_FILE_ADDITION: u32 = 400;
    pub const BLOB_FILE_GARBAGE: u32 = 401;
    /// Tags with this bit are forward compatible: an unknown one is followed by a
    /// varint32-length-prefixed body that can be skipped.
    pub const SAFE_IGNORE_MASK: u32 = 1 << 13;
    pub const DB_ID: u32 = SAFE_IGNORE_MASK + 1;
    /// Decoded like [`BLOB_FILE_ADDITION`] (not length-prefixed).
    pub const BLOB_FILE_ADDITION_DEPRECATED: u32 = SAFE_IGNORE_MASK + 2;
    /// Decoded like [`BLOB_FILE_GARBAGE`] (not length-prefixed).
    pub const BLOB_FILE_GARBAGE_DEPRECATED: u32 = SAFE_IGNORE_MASK + 3;
    /// Not length-prefixed, despite its number.
    pub const WAL_ADDITION: u32 = SAFE_IGNORE_MASK + 4;
    /// Not length-prefixed, despite its number.
    pub const WAL_DELETION: u32 = SAFE_IGNORE_MASK + 5;
    pub const FULL_HISTORY_TS_LOW: u32 = SAFE_IGNORE_MASK + 6;
    pub const WAL_ADDITION2: u32 = SAFE_IGNORE_MASK + 7;
    pub const WAL_DELETION2: u32 = SAFE_IGNORE_MASK + 8;
    pub const PERSIST_USER_DEFINED_TIMESTAMPS: u32 = SAFE_IGNORE_MASK + 9;
    pub const SUBCOMPACTION_PROGRESS: u32 = SAFE_IGNORE_MASK + 10;
    pub const LAST_COMPACTED_MANIFEST_FILE_SIZE: u32 = SAFE_IGNORE_MASK + 11;
}

/// Custom field tags inside a `kNewFile4` entry.
pub mod new_file_tag {
    pub const TERMINATE: u32 = 1;
    pub const NEED_COMPACTION: u32 = 2;
    pub const MIN_LOG_NUMBER_TO_KEEP_HACK: u32 = 3;
    pub const OLDEST_BLOB_FILE_NUMBER: u32 = 4;
    pub const OLDEST_ANCESTER_TIME: u32 = 5;
    pub const FILE_CREATION_TIME: u32 = 6;
    pub const FILE_CHECKSUM: u32 = 7;
    pub const FILE_CHECKSUM_FUNC_NAME: u32 = 8;
    pub const TEMPERATURE: u32 = 9;
    pub const MIN_TIMESTAMP: u32 = 10;
    pub const MAX_TIMESTAMP: u32 = 11;
    pub const UNIQUE_ID: u32 = 12;
    pub const EPOCH_NUMBER: u32 = 13;
    pub const COMPENSATED_RANGE_DELETION_SIZE: u32 = 14;
    pub const TAIL_SIZE: u32 = 15;
    pub const USER_DEFINED_TIMESTAMPS_PERSISTED: u32 = 16;
    pub const FILE_OPEN_METADATA: u32 = 17;
    /// An unknown field with this bit set must not be ignored.
    pub const NON_SAFE_IGNORE_MASK: u32 = 1 << 6;
    pub const PATH_ID: u32 = NON_SAFE_IGNORE_MASK + 1;
}

/// An internal key as stored in file boundaries: user key + (sequence << 8 | value type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalKey {
    pub user_key: Vec<u8>,
    pub sequence: u64,
    pub value_type: u8,
}

impl InternalKey {
    fn decode(raw: &[u8]) -> Option<InternalKey> {
        if raw.len() < 8 {
            return None;
        }
        let (user_key, trailer) = raw.split_at(raw.len() - 8);
        let mut b = [0u8; 8];
        b.copy_from_slice(trailer);
        let packed = u64::from_le_bytes(b);
        Some(InternalKey {
            user_key: user_key.to_vec(),
            sequence: packed >> 8,
            value_type: packed as u8,
        })
    }
}

/// A table (SST) file added by an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    pub level: u32,
    pub number: u64,
    pub path_id: u32,
    pub file_size: u64,
    pub smallest: InternalKey,
    pub largest: InternalKey,
    pub smallest_seqno: u64,
    pub largest_seqno: u64,
    /// The oldest blob file this table references (0: none).
    pub oldest_blob_file_number: u64,
    pub epoch_number: Option<u64>,
    pub file_checksum: Vec<u8>,
    pub file_checksum_func_name: String,
}

/// A blob file added by an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFileAddition {
    pub number: u64,
    pub total_blob_count: u64,
    pub total_blob_bytes: u64,
    pub checksum_method: String,
    pub checksum_value: Vec<u8>,
}

/// Garbage recorded for a blob file by an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFileGarbage {
    pub number: u64,
    pub garbage_blob_count: u64,
    pub garbage_blob_bytes: u64,
}

/// A WAL recorded in the MANIFEST (`track_and_verify_wals_in_manifest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalAddition {
    pub number: u64,
    pub synced_size: Option<u64>,
}

/// One decoded VersionEdit. Fields a given edit does not set are `None`/empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionEdit {
    pub db_id: Option<String>,
    pub comparator: Option<String>,
    pub log_number: Option<u64>,
    pub prev_log_number: Option<u64>,
    pub next_file_number: Option<u64>,
    pub last_sequence: Option<u64>,
    pub min_log_number_to_keep: Option<u64>,
    pub max_column_family: Option<u32>,
    /// (level, internal key).
    pub compact_cursors: Vec<(u32, InternalKey)>,
    /// (level, file number).
    pub deleted_files: Vec<(u32, u64)>,
    pub new_files: Vec<NewFile>,
    /// The column family the edit applies to (0 unless set).
    pub column_family: u32,
    /// Set when the edit creates the column family `column_family` with this name.
    pub column_family_add: Option<String>,
    pub column_family_drop: bool,
    /// Set for edits in an atomic group: how many edits of the group follow this one.
    pub atomic_group_remaining: Option<u32>,
    pub blob_file_additions: Vec<BlobFileAddition>,
    pub blob_file_garbages: Vec<BlobFileGarbage>,
    pub wal_additions: Vec<WalAddition>,
    /// WALs numbered below this are obsolete.
    pub wal_deletion: Option<u64>,
    pub full_history_ts_low: Option<Vec<u8>>,
    pub persist_user_defined_timestamps: Option<bool>,
    pub last_compacted_manifest_file_size: Option<u64>,
    /// Unknown forward-compatible tags that were skipped.
    pub ignored_tags: Vec<u32>,
}

/// Errors decoding VersionEdits or folding a MANIFEST.
#[derive(Debug, thiserror::Error)]
pub enum RocksManifestError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: CURRENT does not name a MANIFEST file: {content:?}")]
    BadCurrent { path: PathBuf, content: String },
    #[error("{path}: malformed VersionEdit in the record at offset {offset}: {detail}")]
    BadEdit {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("{path}: inconsistent MANIFEST at the record at offset {offset}: {detail}")]
    Inconsistent {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("{path}: the MANIFEST does not record the {what}")]
    Incomplete { path: PathBuf, what: &'static str },
}

/// A decoding failure within one edit, before the file and offset are known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail} (at byte {byte} of the edit)")]
pub struct EditError {
    pub byte: usize,
    pub detail: String,
}

fn edit_err(input: &Input<'_>, detail: impl Into<String>) -> EditError {
    EditError {
        byte: input.pos(),
        detail: detail.into(),
    }
}

impl VersionEdit {
    /// Decodes one VersionEdit record: a sequence of tagged fields, each decoded by the
    /// group it belongs to. An unknown tag is skipped only when RocksDB marks it safe to
    /// ignore; any other is an error.
    pub fn decode(data: &[u8]) -> Result<VersionEdit, EditError> {
        let mut edit = VersionEdit::default();
        let mut input = Input::new(data);
        while !input.is_empty() {
            let start = input.pos();
            let Some(t) = input.varint32() else {
                return Err(edit_err(&input, "truncated tag"));
            };
            let f = Field { tag: t, start };
            let known = edit.decode_number(&mut input, f)?
                || edit.decode_column_family(&mut input, f)?
                || edit.decode_files(&mut input, f)?
                || edit.decode_wals(&mut input, f)?
                || edit.decode_timestamps(&mut input, f)?;
            if known {
                continue;
            }
            // Subcompaction progress (for resumable compactions) has no bearing on the
            // database's contents: skipped like any forward-compatible tag.
            if t & tag::SAFE_IGNORE_MASK == 0 {
                return Err(f.error(format!("unknown tag {t} that cannot be ignored")));
            }
            input
                .length_prefixed()
                .ok_or_else(|| f.fail("body of a forward-compatible field"))?;
            edit.ignored_tags.push(t);
        }
        Ok(edit)
    }

    /// The database's numbers: log numbers, the next file number, the last sequence, the
    /// highest column family id. `false` if `f` is not one of them (nothing consumed).
    fn decode_number(&mut self, input: &mut Input<'_>, f: Field) -> Result<bool, EditError> {
        match f.tag {
            tag::LOG_NUMBER => {
                self.log_number = Some(input.varint64().ok_or_else(|| f.fail("log number"))?);
            }
            tag::PREV_LOG_NUMBER => {
                self.prev_log_number = Some(
                    input
                        .varint64()
                        .ok_or_else(|| f.fail("previous log number"))?,
                );
            }
            tag::NEXT_FILE_NUMBER => {
                self.next_file_number =
                    Some(input.varint64().ok_or_else(|| f.fail("next file number"))?);
            }
            tag::MAX_COLUMN_FAMILY => {
                self.max_column_family = Some(
                    input
                        .varint32()
                        .ok_or_else(|| f.fail("max column family"))?,
                );
            }
            tag::MIN_LOG_NUMBER_TO_KEEP => {
                self.min_log_number_to_keep = Some(
                    input
                        .varint64()
                        .ok_or_else(|| f.fail("min log number to keep"))?,
                );
            }
            tag::LAST_SEQUENCE => {
                self.last_sequence = Some(input.varint64().ok_or_else(|| f.fail("last sequence"))?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The database id, the comparator, and which column family the edit applies to (and
    /// whether it creates or drops it, or belongs to an atomic group). `false` if `f` is
    /// not one of them.
    fn decode_column_family(&mut self, input: &mut Input<'_>, f: Field) -> Result<bool, EditError> {
        match f.tag {
            tag::DB_ID => {
                let s = input.length_prefixed().ok_or_else(|| f.fail("db id"))?;
                self.db_id = Some(String::from_utf8_lossy(s).into_owned());
            }
            tag::COMPARATOR => {
                let s = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("comparator name"))?;
                self.comparator = Some(String::from_utf8_lossy(s).into_owned());
            }
            tag::COLUMN_FAMILY => {
                self.column_family = input.varint32().ok_or_else(|| f.fail("column family id"))?;
            }
            tag::COLUMN_FAMILY_ADD => {
                let s = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("column family name"))?;
                self.column_family_add = Some(String::from_utf8_lossy(s).into_owned());
            }
            tag::COLUMN_FAMILY_DROP => self.column_family_drop = true,
            tag::IN_ATOMIC_GROUP => {
                self.atomic_group_remaining = Some(
                    input
                        .varint32()
                        .ok_or_else(|| f.fail("atomic group size"))?,
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Table and blob files added, deleted or given garbage, and compaction cursors.
    /// `false` if `f` is not one of them.
    fn decode_files(&mut self, input: &mut Input<'_>, f: Field) -> Result<bool, EditError> {
        match f.tag {
            tag::COMPACT_CURSOR => {
                let level = input.varint32().ok_or_else(|| f.fail("compact cursor"))?;
                let key = input
                    .length_prefixed()
                    .and_then(InternalKey::decode)
                    .ok_or_else(|| f.fail("compact cursor"))?;
                self.compact_cursors.push((level, key));
            }
            tag::DELETED_FILE => {
                let level = input.varint32().ok_or_else(|| f.fail("deleted file"))?;
                let number = input.varint64().ok_or_else(|| f.fail("deleted file"))?;
                self.deleted_files.push((level, number));
            }
            tag::NEW_FILE | tag::NEW_FILE2 | tag::NEW_FILE3 | tag::NEW_FILE4 => {
                let file = decode_new_file(input, f.tag, self).map_err(|d| f.error(d))?;
                self.new_files.push(file);
            }
            tag::BLOB_FILE_ADDITION | tag::BLOB_FILE_ADDITION_DEPRECATED => {
                let addition = decode_blob_addition(input).map_err(|d| f.error(d))?;
                self.blob_file_additions.push(addition);
            }
            tag::BLOB_FILE_GARBAGE | tag::BLOB_FILE_GARBAGE_DEPRECATED => {
                let garbage = decode_blob_garbage(input).map_err(|d| f.error(d))?;
                self.blob_file_garbages.push(garbage);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// WALs recorded in the MANIFEST, and the number below which they are obsolete.
    /// `false` if `f` is not one of them.
    fn decode_wals(&mut self, input: &mut Input<'_>, f: Field) -> Result<bool, EditError> {
        match f.tag {
            tag::WAL_ADDITION => {
                let wal = decode_wal_addition(input).map_err(|d| f.error(d))?;
                self.wal_additions.push(wal);
            }
            tag::WAL_ADDITION2 => {
                let body = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("WAL addition"))?;
                let wal = decode_wal_addition(&mut Input::new(body)).map_err(|d| f.error(d))?;
                self.wal_additions.push(wal);
            }
            tag::WAL_DELETION => {
                self.wal_deletion = Some(input.varint64().ok_or_else(|| f.fail("WAL deletion"))?);
            }
            tag::WAL_DELETION2 => {
                let body = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("WAL deletion"))?;
                self.wal_deletion = Some(
                    Input::new(body)
                        .varint64()
                        .ok_or_else(|| f.fail("WAL deletion"))?,
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// User-defined timestamp settings and the size of the last compacted MANIFEST: newer,
    /// length-prefixed fields. `false` if `f` is not one of them.
    fn decode_timestamps(&mut self, input: &mut Input<'_>, f: Field) -> Result<bool, EditError> {
        match f.tag {
            tag::FULL_HISTORY_TS_LOW => {
                let s = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("full_history_ts_low"))?;
                if s.is_empty() {
                    return Err(f.fail("full_history_ts_low (empty)"));
                }
                self.full_history_ts_low = Some(s.to_vec());
            }
            tag::PERSIST_USER_DEFINED_TIMESTAMPS => {
                let s = input
                    .length_prefixed()
                    .filter(|s| s.len() == 1)
                    .ok_or_else(|| f.fail("persist_user_defined_timestamps flag"))?;
                self.persist_user_defined_timestamps = Some(s[0] == 1);
            }
            tag::LAST_COMPACTED_MANIFEST_FILE_SIZE => {
                let s = input
                    .length_prefixed()
                    .ok_or_else(|| f.fail("last compacted MANIFEST size"))?;
                self.last_compacted_manifest_file_size = Some(
                    Input::new(s)
                        .varint64()
                        .ok_or_else(|| f.fail("last compacted MANIFEST size"))?,
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// The field being decoded: its tag and the byte where it starts, which errors report.
#[derive(Debug, Clone, Copy)]
struct Field {
    tag: u32,
    start: usize,
}

impl Field {
    /// `what` could not be decoded.
    fn fail(self, what: &str) -> EditError {
        self.error(format!("cannot decode the {what} (tag {})", self.tag))
    }

    fn error(self, detail: String) -> EditError {
        EditError {
            byte: self.start,
            detail,
        }
    }
}

fn decode_new_file(
    input: &mut Input<'_>,
    t: u32,
    edit: &mut VersionEdit,
) -> Result<NewFile, String> {
    let what = match t {
        tag::NEW_FILE => "new-file entry",
        tag::NEW_FILE2 => "new-file2 entry",
        tag::NEW_FILE3 => "new-file3 entry",
        _ => "new-file4 entry",
    };
    let bad = || format!("cannot decode the {what} (tag {t})");
    let level = input.varint32().ok_or_else(bad)?;
    let number = input.varint64().ok_or_else(bad)?;
    let path_id = if t == tag::NEW_FILE3 {
        input.varint32().ok_or_else(bad)?
    } else {
        0
    };
    let file_size = input.varint64().ok_or_else(bad)?;
    let smallest = input
        .length_prefixed()
        .and_then(InternalKey::decode)
        .ok_or_else(bad)?;
    let largest = input
        .length_prefixed()
        .and_then(InternalKey::decode)
        .ok_or_else(bad)?;
    let (smallest_seqno, largest_seqno) = if t == tag::NEW_FILE {
        (0, u64::MAX >> 8)
    } else {
        (
            input.varint64().ok_or_else(bad)?,
            input.varint64().ok_or_else(bad)?,
        )
    };
    let mut file = NewFile {
        level,
        number,
        path_id,
        file_size,
        smallest,
        largest,
        smallest_seqno,
        largest_seqno,
        oldest_blob_file_number: 0,
        epoch_number: None,
        file_checksum: Vec::new(),
        file_checksum_func_name: String::new(),
    };
    if t == tag::NEW_FILE4 {
        decode_new_file4_fields(input, &mut file, edit)?;
    }
    Ok(file)
}

/// The custom fields of a `kNewFile4` entry, up to its terminator. A field that the file's
/// use here depends on is decoded (path id, oldest blob file, epoch, checksum, and the
/// min-log-number hack, which sets `edit`'s); a malformed one, or an unknown one RocksDB
/// marks as not safe to ignore, is an error.
fn decode_new_file4_fields(
    input: &mut Input<'_>,
    file: &mut NewFile,
    edit: &mut VersionEdit,
) -> Result<(), String> {
    loop {
        let custom = input
            .varint32()
            .ok_or_else(|| "cannot decode a new-file4 custom field tag".to_string())?;
        if custom == new_file_tag::TERMINATE {
            break;
        }
        let field = input
            .length_prefixed()
            .ok_or_else(|| format!("cannot decode new-file4 custom field {custom}"))?;
        let varint = |name: &str| {
            Input::new(field)
                .varint64()
                .ok_or_else(|| format!("invalid {name} in new-file4 entry"))
        };
        match custom {
            new_file_tag::PATH_ID => {
                if field.len() != 1 || field[0] > 3 {
                    return Err("invalid path id in new-file4 entry".into());
                }
                file.path_id = u32::from(field[0]);
            }
            new_file_tag::OLDEST_BLOB_FILE_NUMBER => {
                file.oldest_blob_file_number = varint("oldest blob file number")?;
            }
            new_file_tag::EPOCH_NUMBER => file.epoch_number = Some(varint("epoch number")?),
            new_file_tag::FILE_CHECKSUM => file.file_checksum = field.to_vec(),
            new_file_tag::FILE_CHECKSUM_FUNC_NAME => {
                file.file_checksum_func_name = String::from_utf8_lossy(field).into_owned();
            }
            new_file_tag::MIN_LOG_NUMBER_TO_KEEP_HACK => {
                let v = Input::new(field).fixed64().ok_or_else(|| {
                    "invalid min log number to keep in new-file4 entry".to_string()
                })?;
                edit.min_log_number_to_keep = Some(v);
            }
            new_file_tag::NEED_COMPACTION
            | new_file_tag::TEMPERATURE
            | new_file_tag::USER_DEFINED_TIMESTAMPS_PERSISTED
                if field.len() != 1 =>
            {
                return Err(format!(
                    "new-file4 custom field {custom} has the wrong size"
                ));
            }
            new_file_tag::OLDEST_ANCESTER_TIME
            | new_file_tag::FILE_CREATION_TIME
            | new_file_tag::COMPENSATED_RANGE_DELETION_SIZE
            | new_file_tag::TAIL_SIZE => {
                varint("numeric custom field")?;
            }
            new_file_tag::MIN_TIMESTAMP
            | new_file_tag::MAX_TIMESTAMP
            | new_file_tag::UNIQUE_ID
            | new_file_tag::FILE_OPEN_METADATA => {}
            other if other & new_file_tag::NON_SAFE_IGNORE_MASK != 0 => {
                return Err(format!(
                    "new-file4 custom field {other} is not supported and must not be ignored"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn decode_blob_custom_fields(input: &mut Input<'_>, what: &str) -> Result<(), String> {
    loop {
        let custom = input
            .varint32()
            .ok_or_else(|| format!("cannot decode a {what} custom field tag"))?;
        if custom == 0 {
            return Ok(());
        }
        if custom & (1 << 6) != 0 {
            return Err(format!(
                "{what} has the forward-incompatible custom field {custom}"
            ));
        }
        input
            .length_prefixed()
            .ok_or_else(|| format!("cannot decode {what} custom field {custom}"))?;
    }
}

fn decode_blob_addition(input: &mut Input<'_>) -> Result<BlobFileAddition, String> {
    let bad = || "cannot decode a blob file addition".to_string();
    let number = input.varint64().ok_or_else(bad)?;
    let total_blob_count = input.varint64().ok_or_else(bad)?;
    let total_blob_bytes = input.varint64().ok_or_else(bad)?;
    let method = input.length_prefixed().ok_or_else(bad)?;
    let value = input.length_prefixed().ok_or_else(bad)?;
    decode_blob_custom_fields(input, "blob file addition")?;
    Ok(BlobFileAddition {
        number,
        total_blob_count,
        total_blob_bytes,
        checksum_method: String::from_utf8_lossy(method).into_owned(),
        checksum_value: value.to_vec(),
    })
}

fn decode_blob_garbage(input: &mut Input<'_>) -> Result<BlobFileGarbage, String> {
    let bad = || "cannot decode a blob file garbage entry".to_string();
    let number = input.varint64().ok_or_else(bad)?;
    let garbage_blob_count = input.varint64().ok_or_else(bad)?;
    let garbage_blob_bytes = input.varint64().ok_or_else(bad)?;
    decode_blob_custom_fields(input, "blob file garbage entry")?;
    Ok(BlobFileGarbage {
        number,
        garbage_blob_count,
        garbage_blob_bytes,
    })
}

fn decode_wal_addition(input: &mut Input<'_>) -> Result<WalAddition, String> {
    let number = input
        .varint64()
        .ok_or_else(|| "cannot decode the WAL number of a WAL addition".to_string())?;
    let mut synced_size = None;
    loop {
        match input.varint32() {
            Some(1) => {
                return Ok(WalAddition {
                    number,
                    synced_size,
                });
            }
            Some(2) => {
                synced_size = Some(input.varint64().ok_or_else(|| {
                    "cannot decode the synced size of a WAL addition".to_string()
                })?);
            }
            Some(other) => return Err(format!("unknown WAL addition field {other}")),
            None => return Err("truncated WAL addition".into()),
        }
    }
}

/// A live table file of a column family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SstFile {
    pub level: u32,
    pub file_size: u64,
    pub smallest_seqno: u64,
    pub largest_seqno: u64,
    pub oldest_blob_file_number: u64,
}

/// The state of one column family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfState {
    pub name: String,
    /// WALs numbered below this hold no unflushed data of this column family.
    pub log_number: u64,
    pub comparator: Option<String>,
    /// Numbers of the live table files.
    pub live_files: BTreeSet<u64>,
    /// Live table files with their metadata, by number.
    pub files: BTreeMap<u64, SstFile>,
    pub full_history_ts_low: Option<Vec<u8>>,
    pub persist_user_defined_timestamps: Option<bool>,
}

impl CfState {
    fn new(name: String) -> Self {
        CfState {
            name,
            log_number: 0,
            comparator: None,
            live_files: BTreeSet::new(),
            files: BTreeMap::new(),
            full_history_ts_low: None,
            persist_user_defined_timestamps: None,
        }
    }
}

/// A blob file and its garbage so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFileState {
    pub cf_id: u32,
    pub total_blob_count: u64,
    pub total_blob_bytes: u64,
    pub garbage_blob_count: u64,
    pub garbage_blob_bytes: u64,
}

/// The database state recorded by a MANIFEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestState {
    /// Live column families by id. The default column family (id 0) always exists.
    pub column_families: BTreeMap<u32, CfState>,
    /// The next number RocksDB gives a file (WAL, table, blob, MANIFEST, OPTIONS).
    pub next_file_number: u64,
    /// The last sequence number recorded. RocksDB writes it with flushes and other edits, so
    /// it lags behind the WAL: it is a lower bound of the sequence numbers in the database.
    pub last_sequence: u64,
    pub prev_log_number: u64,
    pub min_log_number_to_keep: u64,
    pub max_column_family: u32,
    pub db_id: Option<String>,
    /// Live blob files by number.
    pub blob_files: BTreeMap<u64, BlobFileState>,
    /// WALs tracked in the MANIFEST (`track_and_verify_wals_in_manifest`), with their synced
    /// size when known.
    pub wals: BTreeMap<u64, Option<u64>>,
    /// WALs numbered below this were recorded as obsolete.
    pub min_wal_number_to_keep: u64,
    /// Edits applied (an atomic group counts as its edits).
    pub edits_applied: u64,
}

impl Default for ManifestState {
    fn default() -> Self {
        Self::new()
    }
}

impl ManifestState {
    /// The state before the first edit: only the default column family.
    pub fn new() -> Self {
        ManifestState {
            column_families: BTreeMap::from([(0, CfState::new("default".into()))]),
            next_file_number: 0,
            last_sequence: 0,
            prev_log_number: 0,
            min_log_number_to_keep: 0,
            max_column_family: 0,
            db_id: None,
            blob_files: BTreeMap::new(),
            wals: BTreeMap::new(),
            min_wal_number_to_keep: 0,
            edits_applied: 0,
        }
    }

    /// Reads the MANIFEST that `CURRENT` in `db_dir` names.
    pub fn from_db_dir(db_dir: impl AsRef<Path>) -> Result<ManifestState, RocksManifestError> {
        Self::from_file(current_manifest(db_dir)?)
    }

    /// Reads a MANIFEST file. A torn record at its end (the owner was writing it) is ignored,
    /// as RocksDB does; so is an atomic group the file does not hold completely.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ManifestState, RocksManifestError> {
        let reader = LogReader::open(path.as_ref())?;
        Self::fold(reader)
    }

    /// Reads a MANIFEST held in memory; `name` is used in error messages.
    pub fn from_bytes(
        bytes: &[u8],
        name: impl Into<PathBuf>,
    ) -> Result<ManifestState, RocksManifestError> {
        let reader = LogReader::new(Cursor::new(bytes), name)?;
        Self::fold(reader)
    }

    fn fold<R: std::io::Read + std::io::Seek>(
        mut reader: LogReader<R>,
    ) -> Result<ManifestState, RocksManifestError> {
        let path = reader.path().to_path_buf();
        let mut state = ManifestState::new();
        let mut group: Vec<(u64, VersionEdit)> = Vec::new();
        let mut group_size = 0usize;
        let mut has_next_file_number = false;
        let mut has_last_sequence = false;
        while let Some(record) = reader.next_record()? {
            let offset = record.start_offset;
            let edit =
                VersionEdit::decode(&record.bytes).map_err(|e| RocksManifestError::BadEdit {
                    path: path.clone(),
                    offset,
                    detail: e.to_string(),
                })?;
            has_next_file_number |= edit.next_file_number.is_some();
            has_last_sequence |= edit.last_sequence.is_some();
            let inconsistent = |detail: String| RocksManifestError::Inconsistent {
                path: path.clone(),
                offset,
                detail,
            };
            match edit.atomic_group_remaining {
                Some(remaining) => {
                    if group.is_empty() {
                        group_size = remaining as usize + 1;
                    }
                    if group.len() + 1 + remaining as usize != group_size {
                        return Err(inconsistent(format!(
                            "atomic group of {group_size} edits has an edit with {remaining} remaining after edit {}",
                            group.len() + 1
                        )));
                    }
                    group.push((offset, edit));
                    if group.len() == group_size {
                        for (offset, edit) in group.drain(..) {
                            state.apply(&edit).map_err(|detail| {
                                RocksManifestError::Inconsistent {
                                    path: path.clone(),
                                    offset,
                                    detail,
                                }
                            })?;
                        }
                    }
                }
                None => {
                    if !group.is_empty() {
                        return Err(inconsistent(format!(
                            "an edit outside the atomic group of {group_size} edits begun at offset {} ({} read)",
                            group[0].0,
                            group.len()
                        )));
                    }
                    state.apply(&edit).map_err(inconsistent)?;
                }
            }
        }
        let incomplete = |what| RocksManifestError::Incomplete {
            path: path.clone(),
            what,
        };
        if !has_next_file_number {
            return Err(incomplete("next file number"));
        }
        if !has_last_sequence {
            return Err(incomplete("last sequence number"));
        }
        Ok(state)
    }

    /// Applies one edit (atomic groups are applied edit by edit once complete): a column
    /// family added or dropped, or its files changed; then the WALs, the column family's
    /// settings and the database's numbers the edit records.
    pub fn apply(&mut self, edit: &VersionEdit) -> Result<(), String> {
        let cf_id = edit.column_family;
        if let Some(name) = &edit.column_family_add {
            if let Some(existing) = self.column_families.get(&cf_id) {
                return Err(format!(
                    "column family {cf_id} ({name:?}) added while {:?} exists with that id",
                    existing.name
                ));
            }
            self.column_families
                .insert(cf_id, CfState::new(name.clone()));
        } else if edit.column_family_drop {
            if self.column_families.remove(&cf_id).is_none() {
                return Err(format!(
                    "dropping column family {cf_id}, which does not exist"
                ));
            }
            self.blob_files.retain(|_, b| b.cf_id != cf_id);
        } else if edit.wal_additions.is_empty() && edit.wal_deletion.is_none() {
            self.apply_files(cf_id, edit)?;
        }
        self.apply_wals(edit);
        self.apply_cf_settings(cf_id, edit);
        self.apply_db_numbers(edit);
        self.edits_applied += 1;
        Ok(())
    }

    /// The table and blob files the edit adds, deletes or records garbage for, in column
    /// family `cf_id`, which must exist; blob files left obsolete are dropped.
    fn apply_files(&mut self, cf_id: u32, edit: &VersionEdit) -> Result<(), String> {
        let Some(cf) = self.column_families.get_mut(&cf_id) else {
            return Err(format!(
                "edit for column family {cf_id}, which does not exist"
            ));
        };
        for (_, number) in &edit.deleted_files {
            cf.live_files.remove(number);
            cf.files.remove(number);
        }
        for f in &edit.new_files {
            cf.live_files.insert(f.number);
            cf.files.insert(
                f.number,
                SstFile {
                    level: f.level,
                    file_size: f.file_size,
                    smallest_seqno: f.smallest_seqno,
                    largest_seqno: f.largest_seqno,
                    oldest_blob_file_number: f.oldest_blob_file_number,
                },
            );
        }
        for b in &edit.blob_file_additions {
            self.blob_files.insert(
                b.number,
                BlobFileState {
                    cf_id,
                    total_blob_count: b.total_blob_count,
                    total_blob_bytes: b.total_blob_bytes,
                    garbage_blob_count: 0,
                    garbage_blob_bytes: 0,
                },
            );
        }
        for g in &edit.blob_file_garbages {
            let Some(b) = self.blob_files.get_mut(&g.number) else {
                return Err(format!(
                    "garbage for blob file {}, which is not live",
                    g.number
                ));
            };
            b.garbage_blob_count += g.garbage_blob_count;
            b.garbage_blob_bytes += g.garbage_blob_bytes;
        }
        if !edit.blob_file_additions.is_empty()
            || !edit.blob_file_garbages.is_empty()
            || !edit.new_files.is_empty()
            || !edit.deleted_files.is_empty()
        {
            self.drop_obsolete_blob_files(cf_id);
        }
        Ok(())
    }

    /// WALs recorded as added (with their synced size) or obsolete.
    fn apply_wals(&mut self, edit: &VersionEdit) {
        for wal in &edit.wal_additions {
            if wal.number < self.min_wal_number_to_keep {
                continue;
            }
            let entry = self.wals.entry(wal.number).or_insert(None);
            if let Some(size) = wal.synced_size
                && entry.is_none_or(|old| old < size)
            {
                *entry = Some(size);
            }
        }
        if let Some(n) = edit.wal_deletion
            && n > self.min_wal_number_to_keep
        {
            self.min_wal_number_to_keep = n;
            self.wals = self.wals.split_off(&n);
        }
    }

    /// The column family's log number (which only moves forward), comparator and
    /// timestamp settings, unless the edit drops it.
    fn apply_cf_settings(&mut self, cf_id: u32, edit: &VersionEdit) {
        if let Some(cf) = self.column_families.get_mut(&cf_id)
            && !edit.column_family_drop
        {
            // Log numbers only move forward (RocksDB ignores a smaller one with a warning).
            if let Some(n) = edit.log_number
                && n >= cf.log_number
            {
                cf.log_number = n;
            }
            if let Some(c) = &edit.comparator {
                cf.comparator = Some(c.clone());
            }
            if let Some(ts) = &edit.full_history_ts_low {
                cf.full_history_ts_low = Some(ts.clone());
            }
            if let Some(p) = edit.persist_user_defined_timestamps {
                cf.persist_user_defined_timestamps = Some(p);
            }
        }
    }

    /// The database's id and numbers: the next file number, the last sequence, and the like.
    fn apply_db_numbers(&mut self, edit: &VersionEdit) {
        if let Some(id) = &edit.db_id {
            self.db_id = Some(id.clone());
        }
        if let Some(n) = edit.prev_log_number {
            self.prev_log_number = n;
        }
        if let Some(n) = edit.next_file_number {
            self.next_file_number = n;
        }
        if let Some(n) = edit.max_column_family {
            self.max_column_family = n;
        }
        if let Some(n) = edit.min_log_number_to_keep {
            self.min_log_number_to_keep = self.min_log_number_to_keep.max(n);
        }
        if let Some(n) = edit.last_sequence {
            self.last_sequence = n;
        }
    }

    /// Drops the blob files of a column family that RocksDB no longer keeps in its version:
    /// those older than the oldest blob file a live table references, and those no table
    /// references whose blobs are all garbage.
    fn drop_obsolete_blob_files(&mut self, cf_id: u32) {
        let Some(cf) = self.column_families.get(&cf_id) else {
            return;
        };
        let referenced: BTreeSet<u64> = cf
            .files
            .values()
            .map(|f| f.oldest_blob_file_number)
            .filter(|&n| n != 0)
            .collect();
        let oldest_referenced = referenced.first().copied();
        self.blob_files.retain(|&number, b| {
            if b.cf_id != cf_id {
                return true;
            }
            let Some(oldest) = oldest_referenced else {
                return false;
            };
            if number < oldest {
                return false;
            }
            referenced.contains(&number) || b.garbage_blob_count < b.total_blob_count
        });
    }

    /// The smallest WAL number a copy of the database needs: the minimum, over live column
    /// families, of the log number below which a family has nothing unflushed.
    pub fn min_log_number_needed(&self) -> u64 {
        self.column_families
            .values()
            .map(|cf| cf.log_number)
            .min()
            .unwrap_or(0)
    }

    /// The smallest WAL number RocksDB's recovery reads: `min_log_number_to_keep`, and with
    /// `allow_2pc` off, at least [`min_log_number_needed`](Self::min_log_number_needed).
    pub fn min_wal_number_for_recovery(&self, allow_2pc: bool) -> u64 {
        if allow_2pc {
            self.min_log_number_to_keep
        } else {
            self.min_log_number_to_keep
                .max(self.min_log_number_needed())
        }
    }

    /// The id of the column family named `name`.
    pub fn cf_id(&self, name: &str) -> Option<u32> {
        self.column_families
            .iter()
            .find(|(_, cf)| cf.name == name)
            .map(|(id, _)| *id)
    }

    /// Every live table file number, over all column families.
    pub fn all_live_files(&self) -> BTreeSet<u64> {
        self.column_families
            .values()
            .flat_map(|cf| cf.live_files.iter().copied())
            .collect()
    }
}

/// The MANIFEST file `CURRENT` names in a database directory.
pub fn current_manifest(db_dir: impl AsRef<Path>) -> Result<PathBuf, RocksManifestError> {
    let current = db_dir.as_ref().join("CURRENT");
    let content = fs::read_to_string(&current).map_err(|source| RocksManifestError::Io {
        path: current.clone(),
        source,
    })?;
    let name = content.strip_suffix('\n').unwrap_or(&content);
    let valid = name
        .strip_prefix("MANIFEST-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !valid {
        return Err(RocksManifestError::BadCurrent {
            path: current,
            content,
        });
    }
    Ok(db_dir.as_ref().join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rocks::coding::{put_length_prefixed, put_varint32, put_varint64};
    use crate::rocks::log::LogWriter;

    fn ikey(user: &[u8], seq: u64) -> Vec<u8> {
        let mut k = user.to_vec();
        k.extend_from_slice(&((seq << 8) | 1).to_le_bytes());
        k
    }

    /// Encodes a NewFile4 entry like RocksDB does, with an oldest blob file reference.
    fn new_file4(out: &mut Vec<u8>, level: u32, number: u64, blob: u64, extra: &[(u32, &[u8])]) {
        put_varint32(out, tag::NEW_FILE4);
        put_varint32(out, level);
        put_varint64(out, number);
        put_varint64(out, 1000);
        put_length_prefixed(out, &ikey(b"a", 1));
        put_length_prefixed(out, &ikey(b"z", 9));
        put_varint64(out, 1);
        put_varint64(out, 9);
        if blob != 0 {
            put_varint32(out, new_file_tag::OLDEST_BLOB_FILE_NUMBER);
            let mut v = Vec::new();
            put_varint64(&mut v, blob);
            put_length_prefixed(out, &v);
        }
        for (t, body) in extra {
            put_varint32(out, *t);
            put_length_prefixed(out, body);
        }
        put_varint32(out, new_file_tag::TERMINATE);
    }

    fn base_edit() -> Vec<u8> {
        let mut e = Vec::new();
        put_varint32(&mut e, tag::COMPARATOR);
        put_length_prefixed(&mut e, b"leveldb.BytewiseComparator");
        put_varint32(&mut e, tag::LOG_NUMBER);
        put_varint64(&mut e, 4);
        put_varint32(&mut e, tag::NEXT_FILE_NUMBER);
        put_varint64(&mut e, 10);
        put_varint32(&mut e, tag::LAST_SEQUENCE);
        put_varint64(&mut e, 0);
        put_varint32(&mut e, tag::DB_ID);
        put_length_prefixed(&mut e, b"db-id-1");
        e
    }

    fn manifest(edits: &[Vec<u8>]) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new());
        for e in edits {
            w.add_record(e).unwrap();
        }
        w.into_inner()
    }

    #[test]
    fn fold_hand_built_edits() {
        let mut add_cf = Vec::new();
        put_varint32(&mut add_cf, tag::COLUMN_FAMILY);
        put_varint32(&mut add_cf, 1);
        put_varint32(&mut add_cf, tag::COLUMN_FAMILY_ADD);
        put_length_prefixed(&mut add_cf, b"users");
        put_varint32(&mut add_cf, tag::LOG_NUMBER);
        put_varint64(&mut add_cf, 6);

        let mut flush = Vec::new();
        put_varint32(&mut flush, tag::COLUMN_FAMILY);
        put_varint32(&mut flush, 1);
        new_file4(&mut flush, 0, 12, 11, &[(new_file_tag::EPOCH_NUMBER, &[1])]);
        put_varint32(&mut flush, tag::BLOB_FILE_ADDITION);
        put_varint64(&mut flush, 11);
        put_varint64(&mut flush, 5);
        put_varint64(&mut flush, 500);
        put_length_prefixed(&mut flush, b"");
        put_length_prefixed(&mut flush, b"");
        put_varint32(&mut flush, 0);
        put_varint32(&mut flush, tag::LOG_NUMBER);
        put_varint64(&mut flush, 13);
        // An unknown forward-compatible tag and an unknown ignorable NewFile4 field are skipped.
        put_varint32(&mut flush, tag::SAFE_IGNORE_MASK + 99);
        put_length_prefixed(&mut flush, b"future");

        let mut compaction = Vec::new();
        put_varint32(&mut compaction, tag::COLUMN_FAMILY);
        put_varint32(&mut compaction, 1);
        put_varint32(&mut compaction, tag::DELETED_FILE);
        put_varint32(&mut compaction, 0);
        put_varint64(&mut compaction, 12);
        new_file4(&mut compaction, 1, 14, 11, &[(40, b"ignorable")]);
        put_varint32(&mut compaction, tag::NEXT_FILE_NUMBER);
        put_varint64(&mut compaction, 15);
        put_varint32(&mut compaction, tag::LAST_SEQUENCE);
        put_varint64(&mut compaction, 77);

        let mut wal = Vec::new();
        put_varint32(&mut wal, tag::WAL_ADDITION2);
        let mut body = Vec::new();
        put_varint64(&mut body, 13);
        put_varint32(&mut body, 2);
        put_varint64(&mut body, 4096);
        put_varint32(&mut body, 1);
        put_length_prefixed(&mut wal, &body);

        let bytes = manifest(&[base_edit(), add_cf, flush, compaction, wal]);
        let state = ManifestState::from_bytes(&bytes, "MANIFEST-000005").unwrap();
        assert_eq!(state.db_id.as_deref(), Some("db-id-1"));
        assert_eq!(state.next_file_number, 15);
        assert_eq!(state.last_sequence, 77);
        assert_eq!(state.column_families.len(), 2);
        let users = &state.column_families[&1];
        assert_eq!(users.name, "users");
        assert_eq!(users.log_number, 13);
        assert_eq!(users.live_files, BTreeSet::from([14]));
        assert_eq!(users.files[&14].level, 1);
        assert_eq!(state.column_families[&0].log_number, 4);
        assert_eq!(
            state.column_families[&0].comparator.as_deref(),
            Some("leveldb.BytewiseComparator")
        );
        assert_eq!(state.min_log_number_needed(), 4);
        assert_eq!(state.cf_id("users"), Some(1));
        assert_eq!(
            state.blob_files.keys().copied().collect::<Vec<_>>(),
            vec![11]
        );
        assert_eq!(state.wals.get(&13), Some(&Some(4096)));
        assert_eq!(state.edits_applied, 5);
    }

    #[test]
    fn non_ignorable_unknowns_are_errors() {
        let mut e = base_edit();
        put_varint32(&mut e, 150);
        let err = VersionEdit::decode(&e).unwrap_err();
        assert!(err.detail.contains("unknown tag 150"), "{err}");

        let mut e = Vec::new();
        new_file4(
            &mut e,
            0,
            7,
            0,
            &[(new_file_tag::NON_SAFE_IGNORE_MASK + 9, b"x")],
        );
        let err = VersionEdit::decode(&e).unwrap_err();
        assert!(err.detail.contains("must not be ignored"), "{err}");

        // Truncation anywhere in an edit is an error, never a panic.
        let mut full = base_edit();
        new_file4(&mut full, 2, 8, 0, &[]);
        for cut in 1..full.len() {
            let _ = VersionEdit::decode(&full[..cut]);
        }
        assert!(VersionEdit::decode(&full[..full.len() - 1]).is_err());

        // Errors name the file and the record offset.
        let bytes = manifest(&[base_edit(), vec![0xff, 0xff]]);
        let err = ManifestState::from_bytes(&bytes, "MANIFEST-000009").unwrap_err();
        let msg = err.to_string();
        let second = 7 + base_edit().len();
        assert!(
            msg.contains("MANIFEST-000009") && msg.contains(&format!("offset {second}")),
            "{msg}"
        );
    }

    #[test]
    fn atomic_groups_apply_only_when_complete() {
        let member = |cf: u32, name: &[u8], remaining: u32| {
            let mut e = Vec::new();
            put_varint32(&mut e, tag::COLUMN_FAMILY);
            put_varint32(&mut e, cf);
            put_varint32(&mut e, tag::COLUMN_FAMILY_ADD);
            put_length_prefixed(&mut e, name);
            put_varint32(&mut e, tag::IN_ATOMIC_GROUP);
            put_varint32(&mut e, remaining);
            e
        };
        let complete = manifest(&[base_edit(), member(1, b"a", 1), member(2, b"b", 0)]);
        let state = ManifestState::from_bytes(&complete, "M").unwrap();
        assert_eq!(state.column_families.len(), 3);

        // The file ends inside the group: the group is ignored.
        let partial = manifest(&[base_edit(), member(1, b"a", 1)]);
        let state = ManifestState::from_bytes(&partial, "M").unwrap();
        assert_eq!(state.column_families.len(), 1);

        // A normal edit inside a group is corrupt.
        let mixed = manifest(&[base_edit(), member(1, b"a", 1), base_edit()]);
        assert!(matches!(
            ManifestState::from_bytes(&mixed, "M"),
            Err(RocksManifestError::Inconsistent { .. })
        ));
    }

    #[test]
    fn missing_metadata_and_bad_current() {
        let mut e = Vec::new();
        put_varint32(&mut e, tag::LOG_NUMBER);
        put_varint64(&mut e, 3);
        let err = ManifestState::from_bytes(&manifest(&[e]), "M").unwrap_err();
        assert!(
            matches!(err, RocksManifestError::Incomplete { .. }),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("CURRENT"), "garbage\n").unwrap();
        assert!(matches!(
            current_manifest(dir.path()),
            Err(RocksManifestError::BadCurrent { .. })
        ));
        std::fs::write(dir.path().join("CURRENT"), "MANIFEST-000012\n").unwrap();
        assert_eq!(
            current_manifest(dir.path()).unwrap(),
            dir.path().join("MANIFEST-000012")
        );
    }
}
