//! The origin file of a restored database (FORMAT.md §11): where a restored database came
//! from, so that it is never archived into its parent's repository again.
//!
//! A restore writes [`ORIGIN_FILE`] into the restored database directory, last. A writer that
//! finds one archives the database only into a new repository, whose `tidemark.json` then
//! names the parent ([`Origin::lineage`]), or into the repository it created for it before
//! ([`Origin::check_repository`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::{
    self, Lineage, LineageParent, ModelError, RepositoryConfig, micros_from_time, rfc3339,
    time_from_micros,
};

/// The file's name inside the database directory. RocksDB ignores it: no file name of its
/// own looks like it.
pub const ORIGIN_FILE: &str = "tidemark-origin.json";

/// The one `format_version` of the origin file this build reads and writes. It is the
/// file's own version, apart from the repository format's.
pub const ORIGIN_FORMAT_VERSION: u32 = 1;

/// The largest origin file a reader accepts, in bytes: a real one is a few hundred.
pub const MAX_ORIGIN_LEN: usize = 64 << 10;

/// `tidemark-origin.json`: the origin of a restored database (FORMAT.md §11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub format_version: u32,
    /// The restored database's own lineage: the id of the repository it is archived into.
    pub lineage: String,
    /// When the restore ran.
    #[serde(with = "rfc3339")]
    pub restored_at: OffsetDateTime,
    /// Where it was restored from, and to which point.
    pub parent: OriginParent,
}

/// The repository a database was restored from and the point it was restored to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginParent {
    /// The repository's URL, as the restore was given it.
    pub repository: String,
    /// Its `repository_id`.
    pub repository_id: String,
    /// Its lineage id.
    pub lineage: String,
    /// The last sequence number restored.
    pub sequence: u64,
    /// The time of that record.
    #[serde(with = "rfc3339")]
    pub time: OffsetDateTime,
}

/// Errors reading or writing an origin file.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: origin file format version {found} is not supported by this build of Tidemark \
         (it reads version {ORIGIN_FORMAT_VERSION}); upgrade Tidemark to archive this restored \
         database",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error(
        "{}: not a valid Tidemark origin file: {detail}. It says which repository this database \
         was restored from; restore the database again to get a good one, or, if it is not a \
         restored copy, remove the file",
        path.display()
    )]
    Invalid { path: PathBuf, detail: String },
}

/// Why a restored database may not be archived into a repository (FORMAT.md §11.2).
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error(
        "refusing to archive this database into {to}: it is a copy restored on {restored_at} \
         from that repository ({repository}, lineage {lineage}) to sequence {sequence} \
         ({time}), so its history diverges from the repository's after sequence {sequence} \
         and its records must not be added there. Archive it into a new repository URL \
         (--to), which will name {repository} as its parent; or, if this really is the \
         original database and not a restored copy, remove {} and start again",
        file.display(),
        repository = origin.parent.repository,
        lineage = origin.parent.lineage,
        sequence = origin.parent.sequence,
        time = model_time(origin.parent.time),
        restored_at = model_time(origin.restored_at),
    )]
    Parent {
        to: String,
        file: PathBuf,
        origin: Box<Origin>,
    },
    #[error(
        "refusing to archive this database into {to}: that repository holds lineage {found}, \
         but this database is lineage {lineage}, restored from {repository} to sequence \
         {sequence} on {restored_at} ({}). Archive it into a new repository URL (--to), or into \
         the one created for it (whose tidemark.json names lineage {lineage}); or, if this \
         really is the database of that repository and not a restored copy, remove {} and \
         start again",
        file.display(),
        file.display(),
        lineage = origin.lineage,
        repository = origin.parent.repository,
        sequence = origin.parent.sequence,
        restored_at = model_time(origin.restored_at),
    )]
    OtherLineage {
        to: String,
        found: String,
        file: PathBuf,
        origin: Box<Origin>,
    },
}

fn model_time(t: OffsetDateTime) -> String {
    crate::plan::fmt_time(t)
}

/// The origin file of the database in `db_dir`.
pub fn file_path(db_dir: &Path) -> PathBuf {
    db_dir.join(ORIGIN_FILE)
}

impl Origin {
    /// The origin of a database restored from `parent` now, with a new lineage id.
    pub fn new(parent: OriginParent) -> Origin {
        Origin {
            format_version: ORIGIN_FORMAT_VERSION,
            lineage: uuid::Uuid::new_v4().to_string(),
            // Times in documents have microsecond precision (FORMAT.md, preamble).
            restored_at: time_from_micros(micros_from_time(OffsetDateTime::now_utc())),
            parent,
        }
    }

    /// The file's bytes: a document with its checksum (FORMAT.md §3.1).
    pub fn to_bytes(&self) -> Vec<u8> {
        model::to_document_bytes(self)
    }

    /// Parses an origin file's bytes; `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Origin, OriginError> {
        let invalid = |detail: String| OriginError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        if bytes.len() > MAX_ORIGIN_LEN {
            return Err(invalid(format!(
                "it is more than {MAX_ORIGIN_LEN} bytes long, far more than any origin file"
            )));
        }
        let key = path.display().to_string();
        let origin: Origin =
            model::parse_versioned(&key, bytes, ORIGIN_FORMAT_VERSION).map_err(|e| match e {
                ModelError::UnsupportedVersion { found, .. } => OriginError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found,
                },
                ModelError::Malformed { detail, .. }
                | ModelError::Inconsistent { detail, .. }
                | ModelError::Corrupt { detail, .. } => invalid(detail),
            })?;
        origin.check().map_err(invalid)?;
        Ok(origin)
    }

    /// The ids are not empty.
    fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("lineage", &self.lineage),
            ("parent.repository", &self.parent.repository),
            ("parent.repository_id", &self.parent.repository_id),
            ("parent.lineage", &self.parent.lineage),
        ] {
            if value.trim().is_empty() {
                return Err(format!("its {name} is empty"));
            }
        }
        if self.lineage == self.parent.lineage {
            return Err("its lineage is its parent's".to_owned());
        }
        Ok(())
    }

    /// Reads the origin file of the database in `db_dir`: `None` when it has none.
    pub fn read(db_dir: &Path) -> Result<Option<Origin>, OriginError> {
        let path = file_path(db_dir);
        let io_err = |source| OriginError::Io {
            action: "read",
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_ORIGIN_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        Origin::parse(&path, &bytes).map(Some)
    }

    /// Writes the origin file into `db_dir`, atomically and durably: a temporary file,
    /// fsynced, renamed over the name, the directory fsynced.
    pub fn write(&self, db_dir: &Path) -> Result<PathBuf, OriginError> {
        let path = file_path(db_dir);
        let (dir, tmp) =
            crate::store::local_temp_path(&path).map_err(|source| OriginError::Io {
                action: "write",
                path: path.clone(),
                source,
            })?;
        let result = write_synced(&tmp, &self.to_bytes())
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| File::open(&dir)?.sync_all());
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp);
            return Err(OriginError::Io {
                action: "write",
                path,
                source,
            });
        }
        Ok(path)
    }

    /// The lineage of the repository this database is archived into: its own id, and the
    /// point it was restored to as the parent (FORMAT.md §3).
    pub fn lineage(&self) -> Lineage {
        Lineage {
            id: self.lineage.clone(),
            parent: Some(LineageParent {
                repository: self.parent.repository.clone(),
                lineage: self.parent.lineage.clone(),
                sequence: self.parent.sequence,
            }),
        }
    }

    /// Whether this database may be archived into the repository whose config is `config`
    /// (at `to`): only when the repository's lineage is the database's own (FORMAT.md
    /// §11.2). `file` is the origin file, named in the refusal.
    pub fn check_repository(
        &self,
        config: &RepositoryConfig,
        to: &str,
        file: &Path,
    ) -> Result<(), LineageError> {
        if config.lineage.id == self.lineage {
            return Ok(());
        }
        let (to, file, origin) = (to.to_owned(), file.to_path_buf(), Box::new(self.clone()));
        if config.repository_id == self.parent.repository_id
            || config.lineage.id == self.parent.lineage
        {
            return Err(LineageError::Parent { to, file, origin });
        }
        Err(LineageError::OtherLineage {
            to,
            found: config.lineage.id.clone(),
            file,
            origin,
        })
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Compression, FORMAT_VERSION};

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn origin() -> Origin {
        Origin {
            format_version: ORIGIN_FORMAT_VERSION,
            lineage: "new-lineage".into(),
            restored_at: at("2026-11-24T09:00:00Z"),
            parent: OriginParent {
                repository: "s3://acme/orders".into(),
                repository_id: "repo-1".into(),
                lineage: "old-lineage".into(),
                sequence: 4242,
                time: at("2026-11-23T13:35:00.123456Z"),
            },
        }
    }

    fn config(repository_id: &str, lineage: &str) -> RepositoryConfig {
        RepositoryConfig {
            format_version: FORMAT_VERSION,
            repository_id: repository_id.into(),
            created_at: at("2026-11-01T00:00:00Z"),
            database_identity: "db-1".into(),
            lineage: Lineage {
                id: lineage.into(),
                parent: None,
            },
            segment_compression: Compression::Zstd,
            encryption: None,
            object_lock: None,
        }
    }

    fn path() -> PathBuf {
        PathBuf::from("/data/db/tidemark-origin.json")
    }

    #[test]
    fn an_origin_file_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Origin::read(dir.path()).unwrap().is_none());
        let written = origin().write(dir.path()).unwrap();
        assert_eq!(written, dir.path().join(ORIGIN_FILE));
        assert_eq!(Origin::read(dir.path()).unwrap(), Some(origin()));
        let text = fs::read_to_string(&written).unwrap();
        assert!(text.starts_with("{\"checksum\":\""), "{text}");
        assert!(text.contains("\"format_version\": 1"), "{text}");
        // Nothing but the file is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_new_origin_has_its_own_lineage() {
        let o = Origin::new(origin().parent);
        assert_ne!(o.lineage, Origin::new(origin().parent).lineage);
        assert_eq!(o.format_version, ORIGIN_FORMAT_VERSION);
        assert_eq!(o.restored_at.nanosecond() % 1000, 0);
        let lineage = o.lineage();
        assert_eq!(lineage.id, o.lineage);
        assert_eq!(
            lineage.parent,
            Some(LineageParent {
                repository: "s3://acme/orders".into(),
                lineage: "old-lineage".into(),
                sequence: 4242,
            })
        );
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_naming_it() {
        let mut bytes = origin().to_bytes();
        let at_seq = bytes.windows(4).position(|w| w == b"4242").unwrap();
        bytes[at_seq] = b'5';
        let e = Origin::parse(&path(), &bytes).unwrap_err().to_string();
        assert!(e.contains("/data/db/tidemark-origin.json"), "{e}");
        assert!(e.contains("sha256 does not match"), "{e}");
        assert!(e.contains("restore the database again"), "{e}");
        for bad in [&b""[..], b"{}", b"not json", b"{\"format_version\":1}"] {
            let e = Origin::parse(&path(), bad).unwrap_err();
            assert!(matches!(e, OriginError::Invalid { .. }), "{bad:?}: {e}");
        }
        let e = Origin::parse(&path(), &vec![b' '; MAX_ORIGIN_LEN + 1]).unwrap_err();
        assert!(e.to_string().contains("more than 65536 bytes"), "{e}");
    }

    #[test]
    fn an_unknown_version_is_named() {
        let mut doc = serde_json::to_value(origin()).unwrap();
        doc["format_version"] = 2.into();
        let e = Origin::parse(&path(), &model::to_document_bytes(&doc)).unwrap_err();
        assert!(
            matches!(e, OriginError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("format version 2"), "{e}");
        assert!(e.to_string().contains("upgrade Tidemark"), "{e}");
    }

    #[test]
    fn empty_ids_and_unknown_fields() {
        let mut doc = serde_json::to_value(origin()).unwrap();
        doc["parent"]["repository_id"] = "".into();
        let e = Origin::parse(&path(), &model::to_document_bytes(&doc)).unwrap_err();
        assert!(
            e.to_string().contains("parent.repository_id is empty"),
            "{e}"
        );
        let mut doc = serde_json::to_value(origin()).unwrap();
        doc["lineage"] = "old-lineage".into();
        let e = Origin::parse(&path(), &model::to_document_bytes(&doc)).unwrap_err();
        assert!(e.to_string().contains("its parent's"), "{e}");
        let mut doc = serde_json::to_value(origin()).unwrap();
        doc["from_the_future"] = true.into();
        let parsed = Origin::parse(&path(), &model::to_document_bytes(&doc)).unwrap();
        assert_eq!(parsed, origin());
    }

    #[test]
    fn a_file_too_large_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join(ORIGIN_FILE)).unwrap();
        file.set_len(MAX_ORIGIN_LEN as u64 * 1024).unwrap();
        let e = Origin::read(dir.path()).unwrap_err();
        assert!(matches!(e, OriginError::Invalid { .. }), "{e}");
    }

    #[test]
    fn only_the_databases_own_lineage_is_accepted() {
        let o = origin();
        o.check_repository(&config("repo-2", "new-lineage"), "s3://new", &path())
            .unwrap();
        let e = o
            .check_repository(
                &config("repo-1", "old-lineage"),
                "s3://acme/orders",
                &path(),
            )
            .unwrap_err();
        assert!(matches!(e, LineageError::Parent { .. }), "{e}");
        let msg = e.to_string();
        for part in [
            "s3://acme/orders",
            "diverges from the repository's after sequence 4242",
            "2026-11-23T13:35:00.123456Z",
            "new repository URL",
            "remove /data/db/tidemark-origin.json",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        let e = o
            .check_repository(&config("repo-3", "sibling"), "s3://other", &path())
            .unwrap_err();
        assert!(matches!(e, LineageError::OtherLineage { .. }), "{e}");
        assert!(e.to_string().contains("holds lineage sibling"), "{e}");
    }
}
