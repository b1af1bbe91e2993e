//! The object key layout of a repository (FORMAT.md §2).
//!
//! Keys are relative to the repository root. Every name that comes *from* the store and
//! ends up as a file name on disk passes through [`check_base_file_name`] first.

/// The repository config.
pub const CONFIG: &str = "tidemark.json";
/// The writer lease.
pub const LEASE: &str = "lease.json";
/// The advisory newest-generation hint.
pub const LATEST_HINT: &str = "manifest/latest.json";
/// Prefix of manifest generations.
pub const MANIFEST_PREFIX: &str = "manifest/";
/// Prefix of WAL segments.
pub const WAL_PREFIX: &str = "wal/";
/// Prefix of index pages.
pub const INDEX_PREFIX: &str = "index/";
/// Prefix of base backups.
pub const BASES_PREFIX: &str = "bases/";
/// Prefix of content-addressed table files.
pub const SST_PREFIX: &str = "sst/";

/// What an object is, by its key (FORMAT.md §2): what its storage class and its upload
/// priority are decided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `wal/<first>.seg`.
    Segment,
    /// A base's data: `sst/<sha256>` and `bases/<id>/files/<name>`.
    BaseData,
    /// The small JSON documents: `tidemark.json`, `lease.json`, `manifest/…`, `index/…`,
    /// `bases/<id>/base.json`.
    Document,
    /// Anything outside the layout.
    Other,
}

/// The kind of the object at `key`.
pub fn object_kind(key: &str) -> ObjectKind {
    if key == CONFIG
        || key == LEASE
        || key.starts_with(MANIFEST_PREFIX)
        || key.starts_with(INDEX_PREFIX)
    {
        return ObjectKind::Document;
    }
    if key.starts_with(WAL_PREFIX) {
        return ObjectKind::Segment;
    }
    if key.starts_with(SST_PREFIX) {
        return ObjectKind::BaseData;
    }
    if let Some(rest) = key.strip_prefix(BASES_PREFIX) {
        match rest.split_once('/') {
            Some((_, "base.json")) => return ObjectKind::Document,
            Some((_, file)) if file.starts_with("files/") => return ObjectKind::BaseData,
            _ => {}
        }
    }
    ObjectKind::Other
}

/// A key or file name that breaks the layout rules.
#[derive(Debug, thiserror::Error)]
#[error("invalid name {name:?} in the repository: {reason}")]
pub struct KeyError {
    pub name: String,
    pub reason: &'static str,
}

/// `manifest/<gen>.json`.
pub fn generation_key(generation: u64) -> String {
    format!("{MANIFEST_PREFIX}{generation:016x}.json")
}

/// Parses the generation number out of a generation key.
pub fn parse_generation_key(key: &str) -> Option<u64> {
    let hex = key.strip_prefix(MANIFEST_PREFIX)?.strip_suffix(".json")?;
    parse_hex16(hex)
}

/// `wal/<first>.seg`.
pub fn segment_key(first_seq: u64) -> String {
    format!("{WAL_PREFIX}{first_seq:016x}.seg")
}

/// Parses the first sequence number out of a segment key.
pub fn parse_segment_key(key: &str) -> Option<u64> {
    let hex = key.strip_prefix(WAL_PREFIX)?.strip_suffix(".seg")?;
    parse_hex16(hex)
}

/// `index/<first>-<last>.json`.
pub fn index_page_key(first_seq: u64, last_seq: u64) -> String {
    format!("{INDEX_PREFIX}{first_seq:016x}-{last_seq:016x}.json")
}

/// The `(first, last)` sequences of an index page key, if `key` is one.
pub fn parse_index_page_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(INDEX_PREFIX)?.strip_suffix(".json")?;
    let (a, b) = rest.split_once('-')?;
    Some((parse_hex16(a)?, parse_hex16(b)?))
}

/// `bases/<id>/base.json`.
pub fn base_descriptor_key(base_id: &str) -> String {
    format!("{BASES_PREFIX}{base_id}/base.json")
}

/// `bases/<id>/files/<name>`.
pub fn base_file_key(base_id: &str, name: &str) -> String {
    format!("{BASES_PREFIX}{base_id}/files/{name}")
}

/// `sst/<sha256>`.
pub fn sst_key(sha256_hex: &str) -> String {
    format!("{SST_PREFIX}{sha256_hex}")
}

/// A new base id: `b<YYYYMMDDTHHMMSSZ>-<8 hex>`.
pub fn new_base_id(created_at: time::OffsetDateTime) -> String {
    let t = created_at.to_offset(time::UtcOffset::UTC);
    format!(
        "b{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:08x}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        rand::random::<u32>()
    )
}

fn parse_hex16(hex: &str) -> Option<u64> {
    if hex.len() == 16
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        u64::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// True for a table or blob file name (`NNNNNN.sst`, `NNNNNN.blob`).
pub fn is_table_file(name: &str) -> bool {
    name.strip_suffix(".sst")
        .or_else(|| name.strip_suffix(".blob"))
        .is_some_and(all_digits)
}

/// Checks that a file name from a base descriptor is one a restore may create: `CURRENT`,
/// `MANIFEST-N`, `OPTIONS-N`, `N.sst` or `N.blob`. Nothing else, so no name from the store
/// can point outside the target directory.
pub fn check_base_file_name(name: &str) -> Result<(), KeyError> {
    let ok = name == "CURRENT"
        || name.strip_prefix("MANIFEST-").is_some_and(all_digits)
        || name.strip_prefix("OPTIONS-").is_some_and(all_digits)
        || is_table_file(name);
    if ok {
        Ok(())
    } else {
        Err(KeyError {
            name: name.to_owned(),
            reason: "a base may only hold CURRENT, MANIFEST-<n>, OPTIONS-<n>, <n>.sst and <n>.blob files",
        })
    }
}

/// Checks a base id read from the store (it becomes part of keys, never of paths).
pub fn check_base_id(id: &str) -> Result<(), KeyError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyError {
            name: id.to_owned(),
            reason: "base ids are 1 to 64 ASCII letters, digits, '-' or '_'",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_in_sequence_order() {
        let mut keys: Vec<String> = [5u64, 0x10, 0xff, 1 << 40, 3]
            .iter()
            .map(|&s| segment_key(s))
            .collect();
        keys.sort();
        let seqs: Vec<u64> = keys.iter().map(|k| parse_segment_key(k).unwrap()).collect();
        assert_eq!(seqs, vec![3, 5, 0x10, 0xff, 1 << 40]);
        assert_eq!(segment_key(0x2a), "wal/000000000000002a.seg");
        assert_eq!(parse_generation_key(&generation_key(77)), Some(77));
        assert_eq!(parse_segment_key("wal/2a.seg"), None);
        assert_eq!(parse_segment_key("wal/000000000000002A.seg"), None);
    }

    #[test]
    fn base_file_names_are_checked() {
        for ok in [
            "CURRENT",
            "MANIFEST-000012",
            "OPTIONS-7",
            "000123.sst",
            "9.blob",
        ] {
            check_base_file_name(ok).unwrap();
        }
        for bad in [
            "../CURRENT",
            "MANIFEST-",
            "x.sst",
            "000001.log",
            "IDENTITY",
            "/etc/passwd",
            "OPTIONS-1/../../x",
            "",
        ] {
            assert!(check_base_file_name(bad).is_err(), "{bad} accepted");
        }
        check_base_id(&new_base_id(time::OffsetDateTime::now_utc())).unwrap();
        assert!(check_base_id("a/b").is_err());
    }
}
