//! RocksDB OPTIONS files (`OPTIONS-NNNNNN`): the options a database was last opened with,
//! written by RocksDB on every open and option change.
//!
//! The format is INI-like, one statement per line:
//!
//! ```text
//! [Version]
//!   rocksdb_version=11.8.1
//! [DBOptions]
//!   WAL_ttl_seconds=0
//! [CFOptions "default"]
//!   merge_operator=nullptr
//! [TableOptions/BlockBasedTable "default"]
//!   block_size=4096
//! ```
//!
//! `#` starts a comment unless escaped as `\#`; values are escaped by RocksDB
//! (`\\`, `\#`, `\:`, `\n`, `\r`) and are stored here unescaped.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Errors reading an OPTIONS file.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("cannot read RocksDB options {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RocksDB options {path}, line {line}: {detail}")]
    Syntax {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("RocksDB options {path}: option {name} of [{section}] has the invalid value {value:?}")]
    BadValue {
        path: PathBuf,
        section: String,
        name: String,
        value: String,
    },
}

/// One `[Title "argument"]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `Version`, `DBOptions`, `CFOptions`, `TableOptions/BlockBasedTable`, …
    pub title: String,
    /// The quoted argument (the column family name), if any.
    pub argument: Option<String>,
    /// Options by name, values unescaped.
    pub options: BTreeMap<String, String>,
}

impl Section {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }
}

/// A parsed OPTIONS file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionsFile {
    /// Used in error messages.
    pub path: PathBuf,
    pub sections: Vec<Section>,
}

impl OptionsFile {
    /// Reads and parses an OPTIONS file.
    pub fn read(path: impl AsRef<Path>) -> Result<OptionsFile, OptionsError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| OptionsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses OPTIONS file text; `name` is used in error messages.
    pub fn parse(text: &str, name: impl Into<PathBuf>) -> Result<OptionsFile, OptionsError> {
        let path = name.into();
        let mut sections: Vec<Section> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let syntax = |detail: &str| OptionsError::Syntax {
                path: path.clone(),
                line: line_no,
                detail: detail.to_string(),
            };
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if line.len() >= 2 && line.starts_with('[') && line.ends_with(']') {
                let inner = &line[1..line.len() - 1];
                let (title, argument) = match (inner.find('"'), inner.rfind('"')) {
                    (Some(a), Some(b)) if a != b => (
                        inner[..a].trim().to_string(),
                        Some(unescape(&inner[a + 1..b])),
                    ),
                    _ => (inner.trim().to_string(), None),
                };
                if title.is_empty() {
                    return Err(syntax("a section without a title"));
                }
                sections.push(Section {
                    title,
                    argument,
                    options: BTreeMap::new(),
                });
                continue;
            }
            let Some(eq) = line.find('=') else {
                return Err(syntax("a statement without '='"));
            };
            let key = line[..eq].trim();
            if key.is_empty() {
                return Err(syntax("a statement without an option name"));
            }
            let value = unescape(line[eq + 1..].trim());
            let Some(section) = sections.last_mut() else {
                return Err(syntax("an option before the first section"));
            };
            section.options.insert(key.to_string(), value);
        }
        Ok(OptionsFile { path, sections })
    }

    /// The first section with this title and argument.
    pub fn section(&self, title: &str, argument: Option<&str>) -> Option<&Section> {
        self.sections
            .iter()
            .find(|s| s.title == title && s.argument.as_deref() == argument)
    }

    /// The RocksDB version that wrote the file.
    pub fn rocksdb_version(&self) -> Option<&str> {
        self.section("Version", None)?.get("rocksdb_version")
    }

    /// The `[DBOptions]` section.
    pub fn db_options(&self) -> Option<&Section> {
        self.section("DBOptions", None)
    }

    /// A database option's value.
    pub fn db_option(&self, name: &str) -> Option<&str> {
        self.db_options()?.get(name)
    }

    /// Column family names, in file order.
    pub fn cf_names(&self) -> Vec<&str> {
        self.sections
            .iter()
            .filter(|s| s.title == "CFOptions")
            .filter_map(|s| s.argument.as_deref())
            .collect()
    }

    /// The `[CFOptions "cf"]` section.
    pub fn cf_options(&self, cf: &str) -> Option<&Section> {
        self.section("CFOptions", Some(cf))
    }

    /// A column family option's value.
    pub fn cf_option(&self, cf: &str, name: &str) -> Option<&str> {
        self.cf_options(cf)?.get(name)
    }

    /// The table options of a column family, with the table factory name
    /// (`BlockBasedTable`, …).
    pub fn table_options(&self, cf: &str) -> Option<(&str, &Section)> {
        self.sections.iter().find_map(|s| {
            let factory = s.title.strip_prefix("TableOptions/")?;
            (s.argument.as_deref() == Some(cf)).then_some((factory, s))
        })
    }

    fn db_u64(&self, name: &str) -> Result<Option<u64>, OptionsError> {
        let Some(value) = self.db_option(name) else {
            return Ok(None);
        };
        value
            .parse::<u64>()
            .map(Some)
            .map_err(|_| OptionsError::BadValue {
                path: self.path.clone(),
                section: "DBOptions".into(),
                name: name.into(),
                value: value.into(),
            })
    }

    /// `WAL_ttl_seconds`: rotated WALs are kept in `archive/` this long (0: not by age).
    pub fn wal_ttl_seconds(&self) -> Result<Option<u64>, OptionsError> {
        self.db_u64("WAL_ttl_seconds")
    }

    /// `WAL_size_limit_MB`: rotated WALs are kept in `archive/` up to this size (0: not by
    /// size).
    pub fn wal_size_limit_mb(&self) -> Result<Option<u64>, OptionsError> {
        self.db_u64("WAL_size_limit_MB")
    }

    /// `recycle_log_file_num`: must be 0 for WALs to be followed.
    pub fn recycle_log_file_num(&self) -> Result<Option<u64>, OptionsError> {
        self.db_u64("recycle_log_file_num")
    }

    /// `wal_dir`, if set to a directory other than the database's (empty means the database
    /// directory).
    pub fn wal_dir(&self) -> Option<&str> {
        self.db_option("wal_dir").filter(|d| !d.is_empty())
    }

    /// `wal_compression` (`kNoCompression`, `kZSTD`, …).
    pub fn wal_compression(&self) -> Option<&str> {
        self.db_option("wal_compression")
    }

    /// The merge operator of a column family, `None` if it has none (`nullptr`).
    pub fn merge_operator(&self, cf: &str) -> Option<&str> {
        self.cf_option(cf, "merge_operator")
            .filter(|v| !v.is_empty() && *v != "nullptr")
    }

    /// The comparator of a column family.
    pub fn comparator(&self, cf: &str) -> Option<&str> {
        self.cf_option(cf, "comparator")
            .filter(|v| !v.is_empty() && *v != "nullptr")
    }
}

/// Cuts a `#` comment that is not escaped as `\#`.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1] != b'\\') {
            return &line[..i];
        }
    }
    line
}

/// RocksDB's `UnescapeOptionString`: `\n` and `\r` become newline and carriage return, any
/// other escaped character stands for itself.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(match c {
                'n' => '\n',
                'r' => '\r',
                other => other,
            });
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// The number of an `OPTIONS-NNNNNN` file name.
pub fn options_file_number(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("OPTIONS-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The newest `OPTIONS-NNNNNN` file in a database directory (temporary `.dbtmp` files are
/// not considered).
pub fn newest_options_file(db_dir: impl AsRef<Path>) -> Result<Option<PathBuf>, OptionsError> {
    let dir = db_dir.as_ref();
    let io = |source| OptionsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(options_file_number) else {
            continue;
        };
        if best.as_ref().is_none_or(|(n, _)| number > *n) {
            best = Some((number, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// An option naming a directory RocksDB uses instead of, or besides, the database's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathOption {
    /// `DBOptions` or `CFOptions "name"`.
    pub section: String,
    /// `wal_dir`, `db_log_dir`, `db_paths` or `cf_paths`.
    pub name: String,
    /// The value as written (unescaped).
    pub value: String,
}

/// The options that name directories, by section (RocksDB writes `wal_dir` and `db_log_dir`;
/// `db_paths` and `cf_paths` are read too, should a version write them).
const DB_PATH_OPTIONS: [&str; 3] = ["wal_dir", "db_log_dir", "db_paths"];
const CF_PATH_OPTIONS: [&str; 1] = ["cf_paths"];

impl OptionsFile {
    /// Every path option set to a non-empty value (an empty one means the database's own
    /// directory), in file order.
    pub fn path_options(&self) -> Vec<PathOption> {
        let mut out = Vec::new();
        for section in &self.sections {
            let names: &[&str] = match section.title.as_str() {
                "DBOptions" => &DB_PATH_OPTIONS,
                "CFOptions" => &CF_PATH_OPTIONS,
                _ => continue,
            };
            for name in names {
                if let Some(value) = section.get(name).filter(|v| !v.trim().is_empty()) {
                    out.push(PathOption {
                        section: match &section.argument {
                            Some(a) => format!("{} \"{a}\"", section.title),
                            None => section.title.clone(),
                        },
                        name: (*name).to_owned(),
                        value: value.to_owned(),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# This is a RocksDB option file.
#
[Version]
  rocksdb_version=11.8.1
  options_file_version=1.1

[DBOptions]
  WAL_ttl_seconds=3600
  WAL_size_limit_MB=0
  recycle_log_file_num=0
  wal_dir=/var/lib/app\:1/wal
  db_host_id=__hostname__  # trailing comment
  bad_number=12x

[CFOptions "default"]
  merge_operator=nullptr
  comparator=leveldb.BytewiseComparator

[TableOptions/BlockBasedTable "default"]
  block_size=4096

[CFOptions "with \#hash"]
  merge_operator=my.merge
"#;

    #[test]
    fn parse_sample() {
        let f = OptionsFile::parse(SAMPLE, "OPTIONS-000007").unwrap();
        assert_eq!(f.rocksdb_version(), Some("11.8.1"));
        assert_eq!(f.wal_ttl_seconds().unwrap(), Some(3600));
        assert_eq!(f.wal_size_limit_mb().unwrap(), Some(0));
        assert_eq!(f.recycle_log_file_num().unwrap(), Some(0));
        assert_eq!(f.wal_dir(), Some("/var/lib/app:1/wal"));
        assert_eq!(f.db_option("db_host_id"), Some("__hostname__"));
        assert_eq!(f.cf_names(), vec!["default", "with #hash"]);
        assert_eq!(f.merge_operator("default"), None);
        assert_eq!(f.merge_operator("with #hash"), Some("my.merge"));
        assert_eq!(f.comparator("default"), Some("leveldb.BytewiseComparator"));
        let (factory, table) = f.table_options("default").unwrap();
        assert_eq!(
            (factory, table.get("block_size")),
            ("BlockBasedTable", Some("4096"))
        );
        assert!(f.table_options("with #hash").is_none());
        let err = f.db_u64("bad_number").unwrap_err();
        assert!(err.to_string().contains("OPTIONS-000007"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = OptionsFile::parse("[DBOptions]\n  no_equals\n", "OPTIONS-1").unwrap_err();
        assert!(matches!(err, OptionsError::Syntax { line: 2, .. }), "{err}");
        let err = OptionsFile::parse("a=b\n", "OPTIONS-1").unwrap_err();
        assert!(matches!(err, OptionsError::Syntax { line: 1, .. }), "{err}");
    }

    #[test]
    fn newest_options_file_by_number() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_options_file(dir.path()).unwrap(), None);
        for name in [
            "OPTIONS-000005",
            "OPTIONS-000012",
            "OPTIONS-000009",
            "OPTIONS-000020.dbtmp",
            "OPTIONS-",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(
            newest_options_file(dir.path()).unwrap(),
            Some(dir.path().join("OPTIONS-000012"))
        );
    }
}
