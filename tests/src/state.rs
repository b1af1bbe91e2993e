//! The logical contents of a generator database: column families of sorted key/value maps,
//! the operations that change them, and the counter merge semantics shared with RocksDB.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use sha2::{Digest, Sha256};

/// Column families of every database written by the generator, in creation order.
/// Write batches and the oracle log refer to a column family by its index in this list.
pub const COLUMN_FAMILIES: [&str; 4] = ["default", "users", "counters", "events"];

/// Index of the column family that carries the `tidemark.add` merge operator.
pub const COUNTERS_CF: usize = 2;

/// Name under which the counter merge operator is registered.
pub const MERGE_OPERATOR_NAME: &str = "tidemark.add";

/// Reads a counter value: an 8-byte little-endian `u64`. Any other length counts as 0,
/// so the merge is total (RocksDB treats a failed merge as corruption).
pub fn decode_counter(value: &[u8]) -> u64 {
    match <[u8; 8]>::try_from(value) {
        Ok(bytes) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

/// Encodes a counter value or merge operand.
pub fn encode_counter(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// The `tidemark.add` merge: the existing value (0 if absent) plus every operand, wrapping.
/// Used both as RocksDB's merge operator and by the oracle, so the two cannot disagree.
pub fn add_merge<'a>(
    existing: Option<&[u8]>,
    operands: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut sum = existing.map_or(0, decode_counter);
    for operand in operands {
        sum = sum.wrapping_add(decode_counter(operand));
    }
    encode_counter(sum)
}

/// Kind of a write operation, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Put,
    Delete,
    SingleDelete,
    Merge,
    DeleteRange,
}

/// One operation of a write batch. `cf` indexes [`COLUMN_FAMILIES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        cf: usize,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: usize,
        key: Vec<u8>,
    },
    SingleDelete {
        cf: usize,
        key: Vec<u8>,
    },
    Merge {
        cf: usize,
        key: Vec<u8>,
        operand: Vec<u8>,
    },
    /// Removes every key in `[start, end)`.
    DeleteRange {
        cf: usize,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Put { .. } => OpKind::Put,
            Op::Delete { .. } => OpKind::Delete,
            Op::SingleDelete { .. } => OpKind::SingleDelete,
            Op::Merge { .. } => OpKind::Merge,
            Op::DeleteRange { .. } => OpKind::DeleteRange,
        }
    }

    pub fn cf(&self) -> usize {
        match self {
            Op::Put { cf, .. }
            | Op::Delete { cf, .. }
            | Op::SingleDelete { cf, .. }
            | Op::Merge { cf, .. }
            | Op::DeleteRange { cf, .. } => *cf,
        }
    }

    /// Name of the column family the operation writes to.
    pub fn cf_name(&self) -> &'static str {
        COLUMN_FAMILIES[self.cf()]
    }
}

/// Contents of one column family.
pub type CfState = BTreeMap<Vec<u8>, Vec<u8>>;

/// The logical state of a database: every column family by name, each a sorted map.
/// Empty column families are present (a column family's existence is part of the state).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct State {
    cfs: BTreeMap<String, CfState>,
}

impl State {
    /// A state with no column family at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of a fresh generator database: every generator column family, empty.
    pub fn empty_generator() -> Self {
        let mut state = Self::new();
        for name in COLUMN_FAMILIES {
            state.add_cf(name);
        }
        state
    }

    /// Adds an empty column family (no-op if present) and returns it.
    pub fn add_cf(&mut self, name: &str) -> &mut CfState {
        self.cfs.entry(name.to_owned()).or_default()
    }

    pub fn cf(&self, name: &str) -> Option<&CfState> {
        self.cfs.get(name)
    }

    pub fn cf_mut(&mut self, name: &str) -> Option<&mut CfState> {
        self.cfs.get_mut(name)
    }

    /// Column family names, sorted.
    pub fn cf_names(&self) -> impl Iterator<Item = &str> {
        self.cfs.keys().map(String::as_str)
    }

    /// Total number of keys over all column families.
    pub fn key_count(&self) -> usize {
        self.cfs.values().map(BTreeMap::len).sum()
    }

    /// Applies one operation with RocksDB's semantics (merges use [`add_merge`]).
    /// The column family is created if missing.
    pub fn apply(&mut self, op: &Op) {
        let cf = self.add_cf(op.cf_name());
        match op {
            Op::Put { key, value, .. } => {
                cf.insert(key.clone(), value.clone());
            }
            Op::Delete { key, .. } | Op::SingleDelete { key, .. } => {
                cf.remove(key);
            }
            Op::Merge { key, operand, .. } => {
                let merged = add_merge(cf.get(key).map(Vec::as_slice), [operand.as_slice()]);
                cf.insert(key.clone(), merged);
            }
            Op::DeleteRange { start, end, .. } => {
                if start < end {
                    let doomed: Vec<Vec<u8>> = cf
                        .range::<[u8], _>((
                            Bound::Included(start.as_slice()),
                            Bound::Excluded(end.as_slice()),
                        ))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in doomed {
                        cf.remove(&key);
                    }
                }
            }
        }
    }

    /// SHA-256 (lower-case hex) over the whole state. Column families in name order, each
    /// as `u32 LE name length, name, u64 LE key count`, then its entries in key order, each
    /// as `u32 LE key length, key, u32 LE value length, value`.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, cf) in &self.cfs {
            hasher.update((name.len() as u32).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((cf.len() as u64).to_le_bytes());
            for (key, value) in cf {
                hasher.update((key.len() as u32).to_le_bytes());
                hasher.update(key);
                hasher.update((value.len() as u32).to_le_bytes());
                hasher.update(value);
            }
        }
        hex::encode(hasher.finalize())
    }

    /// Compares `self` (the expected state) with `actual`. `None` if equal; otherwise a
    /// description of the first difference: a column family present on one side only, or
    /// the smallest key (in the first differing column family) that is missing, unexpected
    /// or has another value.
    pub fn diff(&self, actual: &State) -> Option<String> {
        for name in self.cfs.keys() {
            if !actual.cfs.contains_key(name) {
                return Some(format!("column family `{name}` is missing"));
            }
        }
        for name in actual.cfs.keys() {
            if !self.cfs.contains_key(name) {
                return Some(format!("unexpected column family `{name}`"));
            }
        }
        for (name, expected) in &self.cfs {
            if let Some(message) = diff_cf(expected, &actual.cfs[name]) {
                return Some(format!("column family `{name}`: {message}"));
            }
        }
        None
    }
}

fn diff_cf(expected: &CfState, actual: &CfState) -> Option<String> {
    let mut left = expected.iter().peekable();
    let mut right = actual.iter().peekable();
    loop {
        match (left.peek(), right.peek()) {
            (None, None) => return None,
            (Some((key, value)), None) => {
                return Some(format!(
                    "key {} is missing (expected {})",
                    show_key(key),
                    show_value(value)
                ));
            }
            (None, Some((key, value))) => {
                return Some(format!(
                    "unexpected key {} (found {})",
                    show_key(key),
                    show_value(value)
                ));
            }
            (Some((lk, lv)), Some((rk, rv))) => {
                if lk < rk {
                    return Some(format!(
                        "key {} is missing (expected {})",
                        show_key(lk),
                        show_value(lv)
                    ));
                }
                if rk < lk {
                    return Some(format!(
                        "unexpected key {} (found {})",
                        show_key(rk),
                        show_value(rv)
                    ));
                }
                if lv != rv {
                    return Some(format!(
                        "key {}: expected {}, found {}",
                        show_key(lk),
                        show_value(lv),
                        show_value(rv)
                    ));
                }
                left.next();
                right.next();
            }
        }
    }
}

/// A key for messages: `"k/00000012"` with non-printable bytes escaped.
pub fn show_key(key: &[u8]) -> String {
    format!("\"{}\"", key.escape_ascii())
}

/// A value for messages: its length and its first bytes in hex.
pub fn show_value(value: &[u8]) -> String {
    const SHOWN: usize = 16;
    if value.len() <= SHOWN {
        format!("{} bytes {}", value.len(), hex::encode(value))
    } else {
        format!("{} bytes {}…", value.len(), hex::encode(&value[..SHOWN]))
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, cf) in &self.cfs {
            map.entry(name, &format_args!("{} keys", cf.len()));
        }
        map.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cf: usize, key: &str, value: &[u8]) -> Op {
        Op::Put {
            cf,
            key: key.into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn merge_adds_to_existing_or_zero() {
        let a = encode_counter(5);
        let b = encode_counter(7);
        assert_eq!(
            decode_counter(&add_merge(None, [a.as_slice(), b.as_slice()])),
            12
        );
        let base = encode_counter(u64::MAX);
        assert_eq!(decode_counter(&add_merge(Some(&base), [a.as_slice()])), 4);
        assert_eq!(
            decode_counter(&add_merge(Some(b"short"), [a.as_slice()])),
            5
        );
    }

    #[test]
    fn apply_follows_rocksdb_semantics() {
        let mut s = State::empty_generator();
        s.apply(&put(1, "a", b"1"));
        s.apply(&put(1, "b", b"2"));
        s.apply(&put(1, "c", b"3"));
        s.apply(&put(1, "d", b"4"));
        s.apply(&Op::DeleteRange {
            cf: 1,
            start: b"b".to_vec(),
            end: b"d".to_vec(),
        });
        s.apply(&Op::SingleDelete {
            cf: 1,
            key: b"a".to_vec(),
        });
        let users: Vec<_> = s.cf("users").unwrap().keys().cloned().collect();
        assert_eq!(users, vec![b"d".to_vec()]);

        s.apply(&Op::Merge {
            cf: COUNTERS_CF,
            key: b"n".to_vec(),
            operand: encode_counter(3),
        });
        s.apply(&Op::Merge {
            cf: COUNTERS_CF,
            key: b"n".to_vec(),
            operand: encode_counter(4),
        });
        assert_eq!(
            decode_counter(&s.cf("counters").unwrap()[b"n".as_slice()]),
            7
        );
        s.apply(&Op::Delete {
            cf: COUNTERS_CF,
            key: b"n".to_vec(),
        });
        s.apply(&Op::Merge {
            cf: COUNTERS_CF,
            key: b"n".to_vec(),
            operand: encode_counter(2),
        });
        assert_eq!(
            decode_counter(&s.cf("counters").unwrap()[b"n".as_slice()]),
            2
        );
    }

    #[test]
    fn digest_and_diff_see_every_difference() {
        let mut a = State::empty_generator();
        a.apply(&put(0, "k1", b"v1"));
        a.apply(&put(3, "k2", b"v2"));
        let b = a.clone();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.diff(&b), None);

        let mut changed = a.clone();
        changed.apply(&put(3, "k2", b"other"));
        assert_ne!(a.digest(), changed.digest());
        let message = a.diff(&changed).unwrap();
        assert!(
            message.contains("`events`") && message.contains("\"k2\""),
            "{message}"
        );

        let mut extra = a.clone();
        extra.apply(&put(0, "k0", b"x"));
        let message = a.diff(&extra).unwrap();
        assert!(message.contains("unexpected key \"k0\""), "{message}");
        let message = extra.diff(&a).unwrap();
        assert!(message.contains("key \"k0\" is missing"), "{message}");

        let mut fewer_cfs = State::new();
        fewer_cfs.add_cf("default");
        assert!(
            a.diff(&fewer_cfs)
                .unwrap()
                .contains("column family `counters` is missing")
        );
        // An empty column family still counts.
        assert_ne!(State::empty_generator().digest(), State::new().digest());
        // Length prefixes keep key/value boundaries apart.
        let mut x = State::new();
        x.apply(&put(0, "ab", b"c"));
        let mut y = State::new();
        y.apply(&put(0, "a", b"bc"));
        assert_ne!(x.digest(), y.digest());
    }
}
