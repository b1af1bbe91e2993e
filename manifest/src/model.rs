//! The JSON documents of a repository (FORMAT.md §3–§8) and their serde types.
//!
//! Every document carries `format_version`; [`parse_document`] refuses a version this build
//! does not know before looking at anything else, so an old reader never misreads a newer
//! repository.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The only repository format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Errors reading or checking a repository document.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{key}: repository format version {found} is not supported by this build of Tidemark \
         (it reads version {FORMAT_VERSION}); upgrade Tidemark to read this repository"
    )]
    UnsupportedVersion { key: String, found: u64 },
    #[error("{key}: not a Tidemark document: {detail}")]
    Malformed { key: String, detail: String },
    #[error("{key}: {detail}")]
    Inconsistent { key: String, detail: String },
    #[error("{key}: the document is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
}

/// The largest repository document a reader accepts, in bytes (FORMAT.md §3.1): far above
/// any real one (a manifest generation of thousands of bases, an index page of thousands of
/// segments are a few MiB), and a bound on the memory a corrupt or hostile one can take.
pub const MAX_DOCUMENT_LEN: usize = 64 << 20;

/// Every document starts with this, then 64 hex digits of sha256, then `",`: the sha256
/// of everything after that prefix (FORMAT.md §3.1).
const CHECKSUM_PREFIX: &[u8] = b"{\"checksum\":\"";
const CHECKSUM_PREFIX_LEN: usize = CHECKSUM_PREFIX.len() + 64 + 2;

/// A document longer than [`MAX_DOCUMENT_LEN`]: corrupt. `what` says how long it proved
/// (a reader stops reading one past the limit, so it may not know the whole length).
pub fn too_long(key: &str, what: &str) -> ModelError {
    ModelError::Corrupt {
        key: key.to_owned(),
        detail: format!(
            "{what}, more than the {MAX_DOCUMENT_LEN} bytes any repository document may have"
        ),
    }
}

/// Parses a repository document: its embedded checksum, then `format_version`, then the
/// fields. A flipped byte anywhere is reported as corruption, naming the object.
pub fn parse_document<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ModelError> {
    parse_versioned(key, bytes, FORMAT_VERSION)
}

/// [`parse_document`] for a document with its own version numbers (the origin file of a
/// restored database, FORMAT.md §11): `version` is the one `format_version` it reads.
pub(crate) fn parse_versioned<T: DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    version: u32,
) -> Result<T, ModelError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        format_version: Option<serde_json::Value>,
    }
    let corrupt = |detail: String| ModelError::Corrupt {
        key: key.to_owned(),
        detail,
    };
    if bytes.len() > MAX_DOCUMENT_LEN {
        return Err(too_long(key, &format!("it is {} bytes long", bytes.len())));
    }
    let checksum = if bytes.starts_with(CHECKSUM_PREFIX) && bytes.len() > CHECKSUM_PREFIX_LEN {
        let hex = &bytes[CHECKSUM_PREFIX.len()..CHECKSUM_PREFIX.len() + 64];
        let rest = &bytes[CHECKSUM_PREFIX_LEN..];
        if &bytes[CHECKSUM_PREFIX.len() + 64..CHECKSUM_PREFIX_LEN] != b"\","
            || crate::checksum::sha256_hex(rest).as_bytes() != hex
        {
            return Err(corrupt(
                "its embedded sha256 does not match its content".to_owned(),
            ));
        }
        true
    } else {
        false
    };
    let probe: VersionOnly = serde_json::from_slice(bytes).map_err(|e| {
        if checksum {
            ModelError::Malformed {
                key: key.to_owned(),
                detail: format!("invalid JSON: {e}"),
            }
        } else {
            corrupt(format!("no valid checksum and invalid JSON: {e}"))
        }
    })?;
    match probe.format_version {
        None => {
            return Err(ModelError::Malformed {
                key: key.to_owned(),
                detail: "it has no format_version field".to_owned(),
            });
        }
        Some(v) => match v.as_u64() {
            Some(v) if v == u64::from(version) => {}
            Some(found) => {
                return Err(ModelError::UnsupportedVersion {
                    key: key.to_owned(),
                    found,
                });
            }
            None => {
                return Err(ModelError::Malformed {
                    key: key.to_owned(),
                    detail: format!("format_version is {v}, expected a whole number"),
                });
            }
        },
    }
    if !checksum {
        return Err(corrupt(
            "it does not start with its checksum, as every version 1 document does".to_owned(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| ModelError::Malformed {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

/// Serializes a document as pretty JSON (documents are small and read by people too),
/// prefixed with the sha256 of the rest.
pub fn to_document_bytes<T: Serialize>(doc: &T) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(doc).expect("repository documents always serialize");
    body.push(b'\n');
    assert_eq!(
        body.first(),
        Some(&b'{'),
        "repository documents are JSON objects"
    );
    let rest = &body[1..];
    let mut out = Vec::with_capacity(CHECKSUM_PREFIX_LEN + rest.len());
    out.extend_from_slice(CHECKSUM_PREFIX);
    out.extend_from_slice(crate::checksum::sha256_hex(rest).as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(rest);
    out
}

/// RFC 3339 timestamps in JSON.
pub mod rfc3339 {
    pub use time::serde::rfc3339::*;
    /// Optional RFC 3339 timestamps.
    pub mod option {
        pub use time::serde::rfc3339::option::*;
    }
}

/// `tidemark.json`: the repository config (FORMAT.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryConfig {
    pub format_version: u32,
    pub repository_id: String,
    #[serde(with = "rfc3339")]
    pub created_at: OffsetDateTime,
    pub database_identity: String,
    pub lineage: Lineage,
    pub segment_compression: Compression,
    /// Client-side encryption of the repository's objects (FORMAT.md §10); absent when
    /// they are stored in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// S3 Object Lock retention of the repository's objects (FORMAT.md §3.2); absent when
    /// they are written without one. The rules are [`crate::lock`]'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
}

/// How long, and how strictly, each locked object of a repository is kept (FORMAT.md §3.2):
/// an object written at `T` cannot be deleted or overwritten before `T + days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLock {
    /// `governance` or `compliance`.
    pub mode: LockMode,
    /// The retention of each object, in days from its write.
    pub days: u32,
}

/// S3 Object Lock's retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten it.
    Governance,
    /// Nobody, the account's root user included, can delete or shorten it.
    Compliance,
}

/// How a repository's objects are encrypted (FORMAT.md §10). Never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `xchacha20-poly1305`.
    pub algorithm: String,
    /// Plaintext bytes per sealed chunk.
    pub chunk_size: u32,
    /// The key's one-way fingerprint (16 hex digits).
    pub key_id: String,
}

/// A repository's lineage and, for a restored database, where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub id: String,
    pub parent: Option<LineageParent>,
}

/// The point a restored database was restored to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageParent {
    pub repository: String,
    pub lineage: String,
    pub sequence: u64,
}

/// Compression of segment bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
}

/// Where record times come from (FORMAT.md §4.2, §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The time the archiver read the record: an upper bound of its commit time.
    Observed,
    /// The application's own time marker: the commit time.
    Marker,
    /// Some of each.
    Mixed,
}

impl TimeSource {
    /// The source of a range made of `self` and `other`.
    pub fn combine(self, other: TimeSource) -> TimeSource {
        if self == other {
            self
        } else {
            TimeSource::Mixed
        }
    }
}

/// `manifest/<gen>.json`: one manifest generation (FORMAT.md §4.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub format_version: u32,
    pub generation: u64,
    pub repository_id: String,
    #[serde(with = "rfc3339")]
    pub written_at: OffsetDateTime,
    pub writer: Writer,
    pub time_precision: TimeSource,
    pub bases: Vec<BaseSummary>,
    pub index_pages: Vec<IndexPageRef>,
    pub tail_start_seq: u64,
    pub gaps: Vec<Gap>,
    pub retention: Retention,
}

/// Who wrote a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub host: String,
    pub pid: u32,
    pub version: String,
}

/// A reference to another object with its expected size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// A column family as a base knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnFamily {
    pub id: u32,
    pub name: String,
}

/// A base backup as listed in a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseSummary {
    pub id: String,
    #[serde(with = "rfc3339")]
    pub created_at: OffsetDateTime,
    pub descriptor: ObjectRef,
    pub min_log_number: u64,
    pub replay_from_seq: u64,
    pub earliest_seq: u64,
    #[serde(with = "rfc3339")]
    pub earliest_time: OffsetDateTime,
    pub column_families: Vec<ColumnFamily>,
    pub total_size: u64,
}

/// A reference to a segment index page (FORMAT.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPageRef {
    pub key: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub segment_count: u64,
    #[serde(with = "rfc3339")]
    pub first_time: OffsetDateTime,
    #[serde(with = "rfc3339")]
    pub last_time: OffsetDateTime,
    pub size: u64,
    pub sha256: String,
}

/// Why a sequence range cannot be restored to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapKind {
    /// Records that were never archived.
    MissingWal,
    /// Records archived, but no base knows the column families they belong to.
    ColumnFamilyChange,
    /// Records archived once and removed by retention: outside every retained range.
    Pruned,
    /// A kind written by a newer writer: unrestorable all the same.
    #[serde(other)]
    Unknown,
}

impl GapKind {
    /// True for gaps that no segment covers (missing or pruned records): the history has a
    /// hole there instead of segments.
    pub fn has_no_segments(self) -> bool {
        matches!(self, GapKind::MissingWal | GapKind::Pruned)
    }
}

/// An inclusive sequence range that cannot be restored to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
    pub kind: GapKind,
    #[serde(with = "rfc3339")]
    pub detected_at: OffsetDateTime,
    pub detail: String,
}

/// Retention state (FORMAT.md §4.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    #[serde(default)]
    pub pins: Vec<Pin>,
    /// The newest pruning run that changed this history, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prune: Option<PruneRecord>,
}

/// A base that retention must keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub base: String,
    pub reason: String,
    #[serde(with = "rfc3339::option", default)]
    pub until: Option<OffsetDateTime>,
}

/// What a pruning run removed from the history (FORMAT.md §4.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneRecord {
    #[serde(with = "rfc3339")]
    pub at: OffsetDateTime,
    /// The policy, in words, e.g. `keep_last=2 pitr_window=7days`.
    pub policy: String,
    pub bases_removed: u64,
    pub segments_removed: u64,
}

/// `manifest/latest.json`: the advisory newest-generation hint (FORMAT.md §4.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatestHint {
    pub format_version: u32,
    pub generation: u64,
}

/// `index/<first>-<last>.json`: a segment index page (FORMAT.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPage {
    pub format_version: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub segments: Vec<SegmentEntry>,
}

impl Generation {
    /// Its key, `manifest/<gen>.json`.
    pub fn key(&self) -> String {
        crate::keys::generation_key(self.generation)
    }
}

impl IndexPage {
    /// The reference a generation holds for this page once stored as `stored` (its document
    /// bytes). With `None`, a reference for a dry run: sized 0 and without a checksum, only
    /// its key and range mean anything. A page lists at least one segment.
    pub fn reference(&self, stored: Option<&[u8]>) -> Result<IndexPageRef, ModelError> {
        let key = crate::keys::index_page_key(self.first_seq, self.last_seq);
        let (Some(first), Some(last)) = (self.segments.first(), self.segments.last()) else {
            return Err(ModelError::Inconsistent {
                key,
                detail: "an index page must list at least one segment".to_owned(),
            });
        };
        Ok(IndexPageRef {
            key,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            segment_count: self.segments.len() as u64,
            first_time: first.first_time,
            last_time: last.last_time,
            size: stored.map_or(0, |b| b.len() as u64),
            sha256: stored.map(crate::checksum::sha256_hex).unwrap_or_default(),
        })
    }
}

/// One segment as listed in an index page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub key: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    #[serde(with = "rfc3339")]
    pub first_time: OffsetDateTime,
    #[serde(with = "rfc3339")]
    pub last_time: OffsetDateTime,
    pub time_source: TimeSource,
    pub first_log: u64,
    pub last_log: u64,
    pub raw_size: u64,
    pub stored_size: u64,
    /// The sha256 of the whole object. `None` for a segment found by the tail walk, which is
    /// verified by its own trailer instead.
    pub sha256: Option<String>,
}

/// `bases/<id>/base.json`: a base backup descriptor (FORMAT.md §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseDescriptor {
    pub format_version: u32,
    pub id: String,
    #[serde(with = "rfc3339")]
    pub created_at: OffsetDateTime,
    pub database_identity: String,
    pub min_log_number: u64,
    pub replay_from_seq: u64,
    pub earliest_seq: u64,
    #[serde(with = "rfc3339")]
    pub earliest_time: OffsetDateTime,
    pub next_file_number: u64,
    pub column_families: Vec<BaseColumnFamily>,
    pub files: Vec<BaseFile>,
}

/// A column family in a base descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseColumnFamily {
    pub id: u32,
    pub name: String,
    pub log_number: u64,
}

/// One file a restore places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub key: String,
}

/// `lease.json`: the writer lease (FORMAT.md §8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub format_version: u32,
    /// Random, one per acquisition.
    pub holder: String,
    /// For people only: host names and pids repeat across containers and reboots.
    pub host: String,
    pub pid: u32,
    #[serde(with = "rfc3339")]
    pub acquired_at: OffsetDateTime,
    #[serde(with = "rfc3339")]
    pub renewed_at: OffsetDateTime,
    #[serde(with = "rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The holding process's instance id: random, one per process, shared by its tasks.
    /// Absent in leases written before it existed: such a lease is only ever free once it
    /// has expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// When the holder gave the lease up (a clean shutdown); a released lease is free.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rfc3339::option"
    )]
    pub released_at: Option<OffsetDateTime>,
}

impl Lease {
    /// Whether the lease keeps other writers out at `now`: neither released nor expired.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.released_at.is_none() && self.expires_at > now
    }

    /// The lease as its holder leaves it on release: expired at `now` and marked released,
    /// so that anyone may take it at once.
    pub fn released(&self, now: OffsetDateTime) -> Lease {
        Lease {
            expires_at: now.min(self.expires_at),
            released_at: Some(now),
            ..self.clone()
        }
    }
}

/// Converts microseconds since the epoch (the binary time unit) to a timestamp.
pub fn time_from_micros(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Converts a timestamp to microseconds since the epoch.
pub fn micros_from_time(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// A base's file list that breaks the rules of FORMAT.md §2 and §7.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseFilesError {
    /// A name a base may not hold (the reason names it).
    #[error("{0}")]
    Name(String),
    #[error("the base lists the file {name} twice")]
    Twice { name: String },
    #[error("table file {name} is stored at {key} but its content key is {expected}")]
    TableKey {
        name: String,
        key: String,
        expected: String,
    },
    #[error("the base has no CURRENT file")]
    NoCurrent,
}

/// Checks a base's file list before anything is written from it: only names a base may
/// hold, each once, `CURRENT` among them, and every table file stored under its content key
/// (FORMAT.md §2, §7).
pub fn check_base_files(files: &[BaseFile]) -> Result<(), BaseFilesError> {
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        crate::keys::check_base_file_name(&f.name)
            .map_err(|e| BaseFilesError::Name(e.to_string()))?;
        if !seen.insert(f.name.as_str()) {
            return Err(BaseFilesError::Twice {
                name: f.name.clone(),
            });
        }
        if crate::keys::is_table_file(&f.name) {
            let expected = crate::keys::sst_key(&f.sha256);
            if f.key != expected {
                return Err(BaseFilesError::TableKey {
                    name: f.name.clone(),
                    key: f.key.clone(),
                    expected,
                });
            }
        }
    }
    if !seen.contains("CURRENT") {
        return Err(BaseFilesError::NoCurrent);
    }
    Ok(())
}

impl BaseDescriptor {
    /// Checks the descriptor against the summary a generation holds for it, and the file
    /// rules of FORMAT.md §2 and §7.
    pub fn check(&self, key: &str, summary: &BaseSummary) -> Result<(), ModelError> {
        let bad = |detail: String| ModelError::Inconsistent {
            key: key.to_owned(),
            detail,
        };
        if self.id != summary.id
            || self.min_log_number != summary.min_log_number
            || self.replay_from_seq != summary.replay_from_seq
            || self.earliest_seq != summary.earliest_seq
        {
            return Err(bad(format!(
                "base descriptor does not match the manifest's summary of base {}",
                summary.id
            )));
        }
        check_base_files(&self.files).map_err(|e| bad(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_file_list_is_checked_before_anything_is_written_from_it() {
        let sha = "cd".repeat(32);
        let file = |name: &str, key: String| BaseFile {
            name: name.to_owned(),
            size: 1,
            sha256: sha.clone(),
            key,
        };
        let good = vec![
            file("CURRENT", crate::keys::base_file_key("b1", "CURRENT")),
            file("000009.sst", crate::keys::sst_key(&sha)),
        ];
        check_base_files(&good).unwrap();
        let mut twice = good.clone();
        twice.push(good[0].clone());
        assert_eq!(
            check_base_files(&twice),
            Err(BaseFilesError::Twice {
                name: "CURRENT".into()
            })
        );
        let misplaced = vec![good[0].clone(), file("000009.sst", "sst/other".into())];
        let e = check_base_files(&misplaced).unwrap_err();
        assert!(matches!(e, BaseFilesError::TableKey { .. }), "{e}");
        assert!(e.to_string().contains("content key is sst/cdcd"), "{e}");
        assert_eq!(check_base_files(&good[1..]), Err(BaseFilesError::NoCurrent));
        let e = check_base_files(&[file("../CURRENT", "x".into())]).unwrap_err();
        assert!(matches!(e, BaseFilesError::Name(_)), "{e}");
    }

    #[test]
    fn unknown_format_version_is_refused_with_the_version_named() {
        let doc = to_document_bytes(&serde_json::json!({"format_version": 7, "generation": 1}));
        let err = parse_document::<LatestHint>("manifest/latest.json", &doc).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            ModelError::UnsupportedVersion { found: 7, .. }
        ));
        assert!(msg.contains("version 7"), "{msg}");
        assert!(msg.contains("manifest/latest.json"), "{msg}");
        // Also without a checksum (a newer format may checksum differently).
        let err = parse_document::<LatestHint>("k", br#"{"format_version": 7}"#).unwrap_err();
        assert!(matches!(
            err,
            ModelError::UnsupportedVersion { found: 7, .. }
        ));
    }

    #[test]
    fn missing_version_missing_checksum_and_bad_json_are_refused() {
        let doc = to_document_bytes(&serde_json::json!({"generation": 1}));
        let err = parse_document::<LatestHint>("k", &doc).unwrap_err();
        assert!(err.to_string().contains("no format_version"), "{err}");
        let err = parse_document::<LatestHint>("k", b"{not json").unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        let err = parse_document::<LatestHint>("k", br#"{"format_version":1,"generation":1}"#)
            .unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_document_over_the_size_cap_is_refused() {
        let hint = LatestHint {
            format_version: FORMAT_VERSION,
            generation: 42,
        };
        // A valid document padded with trailing whitespace (valid JSON) to `len` bytes.
        let padded = |len: usize| {
            let doc = to_document_bytes(&hint);
            let mut rest = doc[CHECKSUM_PREFIX_LEN..].to_vec();
            rest.resize(len - CHECKSUM_PREFIX_LEN, b' ');
            let mut out = CHECKSUM_PREFIX.to_vec();
            out.extend_from_slice(crate::checksum::sha256_hex(&rest).as_bytes());
            out.extend_from_slice(b"\",");
            out.extend_from_slice(&rest);
            out
        };
        let at_cap = padded(MAX_DOCUMENT_LEN);
        assert_eq!(parse_document::<LatestHint>("k", &at_cap).unwrap(), hint);
        let over = padded(MAX_DOCUMENT_LEN + 1);
        let err = parse_document::<LatestHint>("manifest/latest.json", &over).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{msg}");
        assert!(msg.contains("manifest/latest.json"), "{msg}");
        assert!(
            msg.contains("67108865 bytes long, more than the 67108864"),
            "{msg}"
        );
    }

    #[test]
    fn documents_round_trip() {
        let hint = LatestHint {
            format_version: FORMAT_VERSION,
            generation: 42,
        };
        let bytes = to_document_bytes(&hint);
        assert!(bytes.starts_with(b"{\"checksum\":\""));
        assert_eq!(parse_document::<LatestHint>("k", &bytes).unwrap(), hint);
    }

    proptest::proptest! {
        #[test]
        fn prop_any_flipped_byte_in_a_document_is_refused(
            generation in 0u64..u64::MAX, pos in proptest::sample::select((0usize..200).collect::<Vec<_>>()),
            bit in 0u8..8,
        ) {
            let hint = LatestHint { format_version: FORMAT_VERSION, generation };
            let mut bytes = to_document_bytes(&hint);
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            proptest::prop_assert!(parse_document::<LatestHint>("k", &bytes).is_err(), "flip at {}", i);
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_gap_kinds_kept_unrestorable() {
        let doc = br#"{"first_seq":1,"last_seq":2,"kind":"from_the_future",
                      "detected_at":"2026-11-23T13:30:00Z","detail":"x","extra":true}"#;
        let gap: Gap = serde_json::from_slice(doc).unwrap();
        assert_eq!(gap.kind, GapKind::Unknown);
    }

    #[test]
    fn a_lease_without_the_new_fields_reads_as_one_without_proof() {
        // As written before `instance` and `released_at` existed.
        let old = to_document_bytes(&serde_json::json!({
            "format_version": 1, "holder": "h", "host": "db-7", "pid": 1,
            "acquired_at": "2026-11-23T13:30:00Z", "renewed_at": "2026-11-23T13:30:00Z",
            "expires_at": "2026-11-23T13:31:00Z",
        }));
        let lease: Lease = parse_document("lease.json", &old).unwrap();
        assert_eq!((lease.instance.as_deref(), lease.released_at), (None, None));
        let at = |s: &str| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        assert!(lease.is_live(at("2026-11-23T13:30:59Z")));
        assert!(!lease.is_live(at("2026-11-23T13:31:00Z")));
        // Released: free at once, and it reads back as such.
        let released = lease.released(at("2026-11-23T13:30:10Z"));
        assert!(!released.is_live(at("2026-11-23T13:30:11Z")));
        let back: Lease = parse_document("lease.json", &to_document_bytes(&released)).unwrap();
        assert_eq!(back, released);
        // A live lease leaves the new optional fields out when they are unset.
        let text = String::from_utf8(to_document_bytes(&lease)).unwrap();
        assert!(
            !text.contains("released_at") && !text.contains("instance"),
            "{text}"
        );
    }

    #[test]
    fn micros_round_trip() {
        for m in [0i64, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(micros_from_time(time_from_micros(m)), m);
        }
    }
}
