//! The object key layout of a repository (FORMAT.md §2).
//!
//! Keys are relative to the repository root. Every name that comes *from* the store and
//! ends up as a file name on disk passes through [`check_base_file_name`] first.

/// The repository config.
pub const CONFIG: &str = "tidemark.json";
/// The writer lease.
pub const LEASE: &str = "lease.json";
/// The keyring of an encrypted repository after its first key rotation: its data keys,
/// wrapped (FORMAT.md §10.7).
pub const KEYRING: &str = "keyring.json";
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
/// Every prefix of the layout, for finding keys in text (messages that name an object).
pub const LAYOUT_PREFIXES: [&str; 5] = [
    WAL_PREFIX,
    SST_PREFIX,
    BASES_PREFIX,
    INDEX_PREFIX,
    MANIFEST_PREFIX,
];
/// Prefix of a store probe's objects (`probe/<run>/…`), deleted before the probe ends.
pub const PROBE_PREFIX: &str = "probe/";

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
        || key == KEYRING
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
pub struct ObjectKeyError {
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

/// Where a base stores its file `name` of content `sha256_hex`: table and blob files
/// content-addressed under `sst/<sha256>` (shared between bases), every other file under
/// `bases/<id>/files/<name>` (FORMAT.md §2).
pub fn base_object_key(base_id: &str, name: &str, sha256_hex: &str) -> String {
    if is_table_file(name) {
        sst_key(sha256_hex)
    } else {
        base_file_key(base_id, name)
    }
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
pub fn check_base_file_name(name: &str) -> Result<(), ObjectKeyError> {
    let ok = name == "CURRENT"
        || name.strip_prefix("MANIFEST-").is_some_and(all_digits)
        || name.strip_prefix("OPTIONS-").is_some_and(all_digits)
        || is_table_file(name);
    if ok {
        Ok(())
    } else {
        Err(ObjectKeyError {
            name: name.to_owned(),
            reason: "a base may only hold CURRENT, MANIFEST-<n>, OPTIONS-<n>, <n>.sst and <n>.blob files",
        })
    }
}

/// Checks a base id read from the store (it becomes part of keys, never of paths).
pub fn check_base_id(id: &str) -> Result<(), ObjectKeyError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ObjectKeyError {
            name: id.to_owned(),
            reason: "base ids are 1 to 64 ASCII letters, digits, '-' or '_'",
        })
    }
}

/// An object key of the repository layout (FORMAT.md §2), as a listing returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKey<'a> {
    /// `tidemark.json`.
    Config,
    /// `lease.json`.
    Lease,
    /// `keyring.json`.
    Keyring,
    /// `manifest/latest.json`.
    LatestHint,
    /// `manifest/<gen>.json`.
    Generation(u64),
    /// `index/<first>-<last>.json`.
    IndexPage { first_seq: u64, last_seq: u64 },
    /// `wal/<first>.seg`.
    Segment(u64),
    /// `bases/<id>/base.json`.
    BaseDescriptor { id: &'a str },
    /// `bases/<id>/files/<name>`.
    BaseFile { id: &'a str, name: &'a str },
    /// `sst/<sha256>`.
    Table { sha256: &'a str },
}

/// A listed key that is not part of the repository layout: maintenance names it, leaves it
/// alone, and goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key:?} is not an object of the repository layout: {reason}")]
pub struct ForeignKey {
    pub key: String,
    pub reason: String,
}

/// Parses a key a listing returned. Only a valid object key that matches one row of the
/// layout exactly is a repository object; anything else (another program's file, a key no
/// store accepts such as `bases/x//y`) is a [`ForeignKey`] saying why.
pub fn parse_listed_key(key: &str) -> Result<LayoutKey<'_>, ForeignKey> {
    let foreign = |reason: &str| ForeignKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    if let Err(e) = crate::store::validate_key(key) {
        let reason = match e {
            crate::store::StoreError::InvalidKey { reason, .. } => reason,
            other => other.to_string(),
        };
        return Err(foreign(&format!("not a valid object key ({reason})")));
    }
    match key {
        CONFIG => return Ok(LayoutKey::Config),
        LEASE => return Ok(LayoutKey::Lease),
        KEYRING => return Ok(LayoutKey::Keyring),
        LATEST_HINT => return Ok(LayoutKey::LatestHint),
        _ => {}
    }
    if key.starts_with(MANIFEST_PREFIX) {
        return parse_generation_key(key)
            .map(LayoutKey::Generation)
            .ok_or_else(|| foreign("manifest keys are manifest/<16 hex digits>.json"));
    }
    if key.starts_with(INDEX_PREFIX) {
        return match parse_index_page_key(key) {
            Some((first_seq, last_seq)) if first_seq <= last_seq => Ok(LayoutKey::IndexPage {
                first_seq,
                last_seq,
            }),
            _ => Err(foreign(
                "index page keys are index/<first>-<last>.json, 16 hex digits each, first <= last",
            )),
        };
    }
    if key.starts_with(WAL_PREFIX) {
        return parse_segment_key(key)
            .map(LayoutKey::Segment)
            .ok_or_else(|| foreign("segment keys are wal/<16 hex digits>.seg"));
    }
    if let Some(hash) = key.strip_prefix(SST_PREFIX) {
        let ok = hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        return if ok {
            Ok(LayoutKey::Table { sha256: hash })
        } else {
            Err(foreign("table keys are sst/<64 lower-case hex digits>"))
        };
    }
    if let Some(rest) = key.strip_prefix(BASES_PREFIX) {
        let bad = || {
            foreign(
                "base keys are bases/<id>/base.json or bases/<id>/files/<CURRENT, MANIFEST-<n> \
                 or OPTIONS-<n>>",
            )
        };
        let (id, tail) = rest.split_once('/').ok_or_else(bad)?;
        check_base_id(id).map_err(|_| bad())?;
        if tail == "base.json" {
            return Ok(LayoutKey::BaseDescriptor { id });
        }
        let name = tail.strip_prefix("files/").ok_or_else(bad)?;
        return match check_base_file_name(name) {
            Ok(()) if !is_table_file(name) => Ok(LayoutKey::BaseFile { id, name }),
            _ => Err(bad()),
        };
    }
    Err(foreign(
        "not under manifest/, index/, wal/, bases/ or sst/, and not tidemark.json or lease.json",
    ))
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
        let sha = "ab".repeat(32);
        assert_eq!(base_object_key("b1", "000012.sst", &sha), sst_key(&sha));
        assert_eq!(base_object_key("b1", "7.blob", &sha), sst_key(&sha));
        assert_eq!(
            base_object_key("b1", "MANIFEST-000031", &sha),
            "bases/b1/files/MANIFEST-000031"
        );
        assert!(check_base_id("a/b").is_err());
    }
    #[test]
    fn listed_keys_outside_the_layout_are_foreign_and_say_why() {
        let id = "b20261123T133000Z-1a2b3c4d";
        let sha = "ab".repeat(32);
        let ok = [
            (CONFIG.to_owned(), LayoutKey::Config),
            (LEASE.to_owned(), LayoutKey::Lease),
            (KEYRING.to_owned(), LayoutKey::Keyring),
            (LATEST_HINT.to_owned(), LayoutKey::LatestHint),
            (generation_key(7), LayoutKey::Generation(7)),
            (segment_key(42), LayoutKey::Segment(42)),
            (
                index_page_key(1, 9),
                LayoutKey::IndexPage {
                    first_seq: 1,
                    last_seq: 9,
                },
            ),
            (base_descriptor_key(id), LayoutKey::BaseDescriptor { id }),
            (
                base_file_key(id, "MANIFEST-000031"),
                LayoutKey::BaseFile {
                    id,
                    name: "MANIFEST-000031",
                },
            ),
            (sst_key(&sha), LayoutKey::Table { sha256: &sha }),
        ];
        for (key, expected) in &ok {
            assert_eq!(parse_listed_key(key).as_ref(), Ok(expected), "{key}");
        }
        let bad: Vec<(String, &str)> = vec![
            ("bases/x//y".into(), "empty path segment"),
            ("bases/x/y".into(), "base keys are"),
            (format!("bases/{id}/notes.txt"), "base keys are"),
            (format!("bases/{id}/files/000001.sst"), "base keys are"),
            (format!("bases/{id}/files/../x"), "not a valid object key"),
            ("bases/a b/base.json".into(), "base keys are"),
            ("bases".into(), "not under"),
            ("wal/README".into(), "segment keys are"),
            ("wal/000000000000002A.seg".into(), "segment keys are"),
            ("wal/a\\b".into(), "backslash"),
            (
                "index/0000000000000009-0000000000000001.json".into(),
                "first <= last",
            ),
            ("manifest/latest.json.bak".into(), "manifest keys are"),
            ("sst/not-a-hash".into(), "table keys are"),
            (format!("sst/{}", "AB".repeat(32)), "table keys are"),
            ("notes/readme.txt".into(), "not under"),
        ];
        for (bad, why) in &bad {
            let bad = bad.as_str();
            let e = parse_listed_key(bad).unwrap_err();
            assert_eq!(e.key, bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}
