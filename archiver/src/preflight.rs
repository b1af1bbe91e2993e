//! Preflight: is a database archivable? Checked before the archiver starts on it.
//!
//! The archiver reads the WAL files of a database another process owns. That only works if
//! RocksDB keeps every WAL file long enough for the archiver to read it, never overwrites one
//! in place, and writes them where the archiver looks. [`check_database`] reads the
//! database's `IDENTITY` and newest `OPTIONS-*` file and refuses, with what to change and
//! why, a database that breaks one of these rules. It also reads the origin file of a
//! restored database (FORMAT.md §11), which decides which repository may take it.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use tidemark_manifest::origin::{Origin, OriginError};
use tidemark_manifest::rocks::options_file::{self, OptionsError, OptionsFile};

/// What [`check_database`] found out about an archivable database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbCheck {
    /// The database directory, as given.
    pub db_dir: PathBuf,
    /// The directory the database writes its WAL files to (the database directory unless its
    /// `wal_dir` option says otherwise). Rotated WALs are moved to its `archive/`
    /// subdirectory.
    pub wal_dir: PathBuf,
    /// The content of the `IDENTITY` file, trimmed.
    pub identity: String,
    /// The OPTIONS file the settings were read from.
    pub options_file: PathBuf,
    /// The RocksDB version that wrote the OPTIONS file.
    pub rocksdb_version: Option<String>,
    /// `WAL_ttl_seconds`: how long rotated WALs stay in `archive/`.
    pub wal_ttl_seconds: u64,
    /// `WAL_size_limit_MB`: how much of `archive/` rotated WALs may fill.
    pub wal_size_limit_mb: u64,
    /// Whether WAL records are compressed (`wal_compression = kZSTD`), which the WAL reader
    /// decompresses.
    pub wal_compressed: bool,
    /// Column family names, in OPTIONS file order.
    pub column_families: Vec<String>,
    /// Where the database was restored from, when it is a restored copy (its origin file,
    /// FORMAT.md §11).
    pub origin: Option<Origin>,
}

/// A setting that makes a database impossible to archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `WAL_ttl_seconds` and `WAL_size_limit_MB` are both 0.
    WalNotRetained,
    /// `recycle_log_file_num` is not 0.
    WalRecycled { recycle_log_file_num: u64 },
    /// The WAL is written to another directory and `--wal-dir` was not given.
    WalDirElsewhere { configured: String },
    /// `--wal-dir` does not name the directory the database writes its WAL to.
    WalDirMismatch { configured: PathBuf, given: PathBuf },
    /// The WAL directory does not exist or is not a directory.
    WalDirMissing { path: PathBuf },
    /// A `wal_compression` the WAL reader cannot decompress.
    WalCompression { value: String },
    /// `manual_wal_flush` is on: the application's WAL buffer may hold records that are
    /// already in flushed SSTs, so a base backup cannot bound what its SSTs contain.
    ManualWalFlush,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::WalNotRetained => write!(
                f,
                "WAL_ttl_seconds and WAL_size_limit_MB are both 0, so RocksDB deletes a WAL file \
                 as soon as its data is flushed, possibly before the archiver has read it (the \
                 records in it would be lost to point-in-time recovery). Keep rotated WAL files \
                 in archive/ for a while: set WAL_ttl_seconds=3600 (Rust: \
                 opts.set_wal_ttl_seconds(3600); C++: options.WAL_ttl_seconds = 3600;) or a \
                 WAL_size_limit_MB large enough for an hour of writes, and reopen the database"
            ),
            Problem::WalRecycled {
                recycle_log_file_num,
            } => write!(
                f,
                "recycle_log_file_num is {recycle_log_file_num}: RocksDB overwrites old WAL files \
                 in place, so they cannot be read after the fact. Set recycle_log_file_num=0 \
                 (Rust: opts.set_recycle_log_file_num(0); C++: options.recycle_log_file_num = 0;) \
                 and reopen the database"
            ),
            Problem::WalDirElsewhere { configured } => write!(
                f,
                "the database writes its WAL files to {configured} (option wal_dir), not to the \
                 database directory; pass --wal-dir {configured} so that the archiver reads them \
                 there"
            ),
            Problem::WalDirMismatch { configured, given } => write!(
                f,
                "--wal-dir is {}, but the database writes its WAL files to {} (option wal_dir, \
                 empty meaning the database directory); pass --wal-dir {} or leave it out if \
                 that is the database directory",
                given.display(),
                configured.display(),
                configured.display()
            ),
            Problem::WalDirMissing { path } => write!(
                f,
                "the WAL directory {} does not exist or is not a directory; check --db and \
                 --wal-dir and that the archiver may read them",
                path.display()
            ),
            Problem::ManualWalFlush => write!(
                f,
                "manual_wal_flush is true: records can sit in the application's WAL buffer while \
                 the data they wrote is already flushed to SST files, so a base backup cannot \
                 know which sequence numbers its files hold and a restore could include writes \
                 after its target. Set manual_wal_flush=false (the default; Rust: \
                 opts.set_manual_wal_flush(false); C++: options.manual_wal_flush = false;) and \
                 reopen the database"
            ),
            Problem::WalCompression { value } => write!(
                f,
                "wal_compression is {value}, which the archiver cannot read (it reads \
                 uncompressed and zstd-compressed WALs); set wal_compression to kNoCompression \
                 or kZSTD and reopen the database"
            ),
        }
    }
}

/// Why a database cannot be archived, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("database directory {path} does not exist; pass the directory the application opens")]
    NoDirectory { path: PathBuf },
    #[error("cannot read database directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a RocksDB database: it has no {file} file; pass the directory the \
         application opens (the one holding CURRENT, IDENTITY, MANIFEST-* and OPTIONS-*)"
    )]
    NotADatabase { path: PathBuf, file: &'static str },
    #[error(
        "the IDENTITY file of {path} is empty; Tidemark identifies a database by it. Open the \
         database once with write_identity_file=true (the default) so that RocksDB writes it"
    )]
    EmptyIdentity { path: PathBuf },
    #[error(
        "database {path} has no OPTIONS-* file, so its WAL settings cannot be checked; open it \
         once with a RocksDB that writes OPTIONS files (any version since 4.x does)"
    )]
    NoOptionsFile { path: PathBuf },
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("cannot check the options of database {db_dir}: {source}")]
    Options {
        db_dir: PathBuf,
        #[source]
        source: OptionsError,
    },
    #[error(
        "database {} cannot be archived (settings read from {}):\n{}",
        db_dir.display(),
        options_file.display(),
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
    )]
    NotArchivable {
        db_dir: PathBuf,
        options_file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Checks that the RocksDB in `db_dir` can be archived. `wal_dir` is the `--wal-dir` given by
/// the user, for a database whose `wal_dir` option points elsewhere than `db_dir`.
///
/// Reads `IDENTITY`, the origin file (a restored copy's; an invalid one is refused) and the
/// newest `OPTIONS-*` file; refuses a database whose rotated WAL files
/// are deleted at once (`WAL_ttl_seconds` and `WAL_size_limit_MB` both 0), that recycles WAL
/// files, whose WAL directory is not the one given, or whose WAL compression cannot be read.
/// All problems found are reported together.
pub fn check_database(db_dir: &Path, wal_dir: Option<&Path>) -> Result<DbCheck, CheckError> {
    match fs::metadata(db_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CheckError::NoDirectory {
                path: db_dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckError::NoDirectory {
                path: db_dir.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(CheckError::Io {
                path: db_dir.to_path_buf(),
                source,
            });
        }
    }
    let current = db_dir.join("CURRENT");
    if !current.is_file() {
        return Err(CheckError::NotADatabase {
            path: db_dir.to_path_buf(),
            file: "CURRENT",
        });
    }
    let identity_path = db_dir.join("IDENTITY");
    let identity = match fs::read_to_string(&identity_path) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckError::NotADatabase {
                path: db_dir.to_path_buf(),
                file: "IDENTITY",
            });
        }
        Err(source) => {
            return Err(CheckError::Io {
                path: identity_path,
                source,
            });
        }
    };
    if identity.is_empty() {
        return Err(CheckError::EmptyIdentity {
            path: db_dir.to_path_buf(),
        });
    }

    let origin = Origin::read(db_dir)?;

    let options_err = |source| CheckError::Options {
        db_dir: db_dir.to_path_buf(),
        source,
    };
    let options_path = options_file::newest_options_file(db_dir)
        .map_err(options_err)?
        .ok_or_else(|| CheckError::NoOptionsFile {
            path: db_dir.to_path_buf(),
        })?;
    let options = OptionsFile::read(&options_path).map_err(options_err)?;

    let wal_ttl_seconds = options.wal_ttl_seconds().map_err(options_err)?.unwrap_or(0);
    let wal_size_limit_mb = options
        .wal_size_limit_mb()
        .map_err(options_err)?
        .unwrap_or(0);
    let recycle = options
        .recycle_log_file_num()
        .map_err(options_err)?
        .unwrap_or(0);

    let mut problems = Vec::new();
    if wal_ttl_seconds == 0 && wal_size_limit_mb == 0 {
        problems.push(Problem::WalNotRetained);
    }
    if options.db_option("manual_wal_flush") == Some("true") {
        problems.push(Problem::ManualWalFlush);
    }
    if recycle > 0 {
        problems.push(Problem::WalRecycled {
            recycle_log_file_num: recycle,
        });
    }

    let wal_compressed = match options.wal_compression() {
        None | Some("") | Some("kNoCompression") => false,
        Some("kZSTD") => true,
        Some(other) => {
            problems.push(Problem::WalCompression {
                value: other.to_string(),
            });
            false
        }
    };

    let effective_wal_dir = match resolve_wal_dir(db_dir, options.wal_dir(), wal_dir) {
        Ok(dir) => {
            if !dir.is_dir() {
                problems.push(Problem::WalDirMissing { path: dir.clone() });
            }
            dir
        }
        Err(problem) => {
            problems.push(problem);
            wal_dir.unwrap_or(db_dir).to_path_buf()
        }
    };

    if !problems.is_empty() {
        return Err(CheckError::NotArchivable {
            db_dir: db_dir.to_path_buf(),
            options_file: options_path,
            problems,
        });
    }
    Ok(DbCheck {
        db_dir: db_dir.to_path_buf(),
        wal_dir: effective_wal_dir,
        identity,
        rocksdb_version: options.rocksdb_version().map(str::to_string),
        wal_ttl_seconds,
        wal_size_limit_mb,
        wal_compressed,
        column_families: options.cf_names().into_iter().map(str::to_string).collect(),
        options_file: options_path,
        origin,
    })
}

/// The directory to read WAL files from, given the database's `wal_dir` option and the
/// user's `--wal-dir`.
fn resolve_wal_dir(
    db_dir: &Path,
    configured: Option<&str>,
    given: Option<&Path>,
) -> Result<PathBuf, Problem> {
    let configured_path = configured.map(Path::new);
    let configured_is_db_dir = match configured_path {
        None => true,
        Some(c) if c.is_absolute() => same_dir(c, db_dir),
        // A relative wal_dir is relative to the application's working directory, which the
        // archiver does not know; it is the database directory only if it says so.
        Some(c) => normalize(c).as_os_str().is_empty() || same_dir(c, db_dir),
    };
    if configured_is_db_dir {
        return match given {
            Some(g) if !same_dir(g, db_dir) => Err(Problem::WalDirMismatch {
                configured: db_dir.to_path_buf(),
                given: g.to_path_buf(),
            }),
            _ => Ok(db_dir.to_path_buf()),
        };
    }
    let (Some(c), Some(c_str)) = (configured_path, configured) else {
        return Ok(db_dir.to_path_buf());
    };
    let Some(g) = given else {
        return Err(Problem::WalDirElsewhere {
            configured: c_str.to_string(),
        });
    };
    let matches = if c.is_absolute() {
        same_dir(c, g)
    } else {
        // Relative to an unknown directory: the given directory must end with it.
        let g_full = fs::canonicalize(g).unwrap_or_else(|_| normalize(g));
        g_full.ends_with(normalize(c))
    };
    if matches {
        Ok(g.to_path_buf())
    } else {
        Err(Problem::WalDirMismatch {
            configured: c.to_path_buf(),
            given: g.to_path_buf(),
        })
    }
}

/// Whether two paths name the same directory (after resolving symbolic links when both
/// exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => normalize(a) == normalize(b),
    }
}

/// A lexically normalized path: `.` components dropped, trailing separators ignored.
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_db(dir: &Path, configure: impl FnOnce(&mut rocksdb::Options)) {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        configure(&mut opts);
        let db = rocksdb::DB::open(&opts, dir).expect("open test database");
        db.put(b"k", b"v").expect("write to test database");
    }

    fn problems(err: CheckError) -> Vec<Problem> {
        match err {
            CheckError::NotArchivable { problems, .. } => problems,
            other => panic!("expected NotArchivable, got {other}"),
        }
    }

    #[test]
    fn a_well_configured_database_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db");
        open_db(&db, |o| o.set_wal_ttl_seconds(3600));
        let check = check_database(&db, None).unwrap();
        let identity = fs::read_to_string(db.join("IDENTITY")).unwrap();
        assert_eq!(check.identity, identity.trim());
        assert!(!check.identity.is_empty());
        assert_eq!(check.wal_dir, db);
        assert_eq!(check.wal_ttl_seconds, 3600);
        assert_eq!(check.wal_size_limit_mb, 0);
        assert!(!check.wal_compressed);
        assert_eq!(check.column_families, vec!["default".to_string()]);
        assert!(check.rocksdb_version.is_some());
        assert!(
            check
                .options_file
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("OPTIONS-")
        );
        // Naming the database directory as the WAL directory is fine.
        assert_eq!(check_database(&db, Some(&db)).unwrap().wal_dir, db);
    }

    #[test]
    fn a_size_limit_alone_keeps_wals() {
        let tmp = tempfile::tempdir().unwrap();
        open_db(tmp.path(), |o| o.set_wal_size_limit_mb(1024));
        let check = check_database(tmp.path(), None).unwrap();
        assert_eq!((check.wal_ttl_seconds, check.wal_size_limit_mb), (0, 1024));
    }

    #[test]
    fn wals_deleted_at_once_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        open_db(tmp.path(), |_| {});
        let err = check_database(tmp.path(), None).unwrap_err();
        let msg = err.to_string();
        assert_eq!(problems(err), vec![Problem::WalNotRetained]);
        for needle in [
            "WAL_ttl_seconds",
            "WAL_size_limit_MB",
            "set_wal_ttl_seconds(3600)",
            "options.WAL_ttl_seconds = 3600;",
            "OPTIONS-",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
    }

    #[test]
    fn manual_wal_flush_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        open_db(tmp.path(), |o| {
            o.set_wal_ttl_seconds(3600);
            o.set_manual_wal_flush(true);
        });
        let err = check_database(tmp.path(), None).unwrap_err();
        let msg = err.to_string();
        assert_eq!(problems(err), vec![Problem::ManualWalFlush]);
        assert!(msg.contains("manual_wal_flush=false"), "{msg}");
    }

    #[test]
    fn recycled_wals_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        // RocksDB turns recycling off by itself when WAL archiving is on, so the database is
        // opened without WAL retention; both problems are reported.
        open_db(tmp.path(), |o| o.set_recycle_log_file_num(4));
        let err = check_database(tmp.path(), None).unwrap_err();
        let msg = err.to_string();
        let found = problems(err);
        assert!(
            found.contains(&Problem::WalRecycled {
                recycle_log_file_num: 4
            }),
            "{found:?}"
        );
        assert!(found.contains(&Problem::WalNotRetained), "{found:?}");
        assert!(msg.contains("recycle_log_file_num=0"), "{msg}");
    }

    #[test]
    fn a_wal_dir_elsewhere_needs_wal_dir_given() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db");
        let wal = tmp.path().join("wal");
        open_db(&db, |o| {
            o.set_wal_ttl_seconds(3600);
            o.set_wal_dir(&wal);
        });
        let err = check_database(&db, None).unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            problems(err),
            vec![Problem::WalDirElsewhere {
                configured: wal.to_str().unwrap().to_string()
            }]
        );
        assert!(msg.contains("--wal-dir"), "{msg}");

        // Given and matching (spelled differently).
        let spelled = tmp.path().join(".").join("wal");
        let check = check_database(&db, Some(&spelled)).unwrap();
        assert_eq!(check.wal_dir, spelled);

        // Given and not matching.
        let err = check_database(&db, Some(&db)).unwrap_err();
        assert_eq!(
            problems(err),
            vec![Problem::WalDirMismatch {
                configured: wal.clone(),
                given: db.clone()
            }]
        );
    }

    #[test]
    fn wal_dir_given_for_a_database_that_keeps_its_wal_at_home() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db");
        let other = tmp.path().join("other");
        fs::create_dir(&other).unwrap();
        open_db(&db, |o| o.set_wal_ttl_seconds(60));
        let err = check_database(&db, Some(&other)).unwrap_err();
        assert_eq!(
            problems(err),
            vec![Problem::WalDirMismatch {
                configured: db.clone(),
                given: other
            }]
        );
    }

    #[test]
    fn zstd_wal_compression_is_readable() {
        let tmp = tempfile::tempdir().unwrap();
        open_db(tmp.path(), |o| {
            o.set_wal_ttl_seconds(3600);
            o.set_wal_compression_type(rocksdb::DBCompressionType::Zstd);
        });
        let check = check_database(tmp.path(), None).unwrap();
        assert!(check.wal_compressed);
    }

    #[test]
    fn other_wal_compressions_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        open_db(tmp.path(), |o| o.set_wal_ttl_seconds(3600));
        // RocksDB itself only writes kNoCompression or kZSTD; a value from another version
        // or a hand-edited file is refused rather than misread.
        let options = options_file::newest_options_file(tmp.path())
            .unwrap()
            .unwrap();
        let text = fs::read_to_string(&options).unwrap();
        assert!(text.contains("wal_compression=kNoCompression"), "{text}");
        fs::write(
            &options,
            text.replace(
                "wal_compression=kNoCompression",
                "wal_compression=kLZ4Compression",
            ),
        )
        .unwrap();
        let err = check_database(tmp.path(), None).unwrap_err();
        assert_eq!(
            problems(err),
            vec![Problem::WalCompression {
                value: "kLZ4Compression".into()
            }]
        );
    }

    #[test]
    fn not_a_database() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let err = check_database(&missing, None).unwrap_err();
        assert!(matches!(err, CheckError::NoDirectory { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");

        let err = check_database(tmp.path(), None).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::NotADatabase {
                    file: "CURRENT",
                    ..
                }
            ),
            "{err}"
        );

        fs::write(tmp.path().join("CURRENT"), "MANIFEST-000001\n").unwrap();
        let err = check_database(tmp.path(), None).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::NotADatabase {
                    file: "IDENTITY",
                    ..
                }
            ),
            "{err}"
        );

        fs::write(tmp.path().join("IDENTITY"), "  \n").unwrap();
        let err = check_database(tmp.path(), None).unwrap_err();
        assert!(matches!(err, CheckError::EmptyIdentity { .. }), "{err}");

        fs::write(tmp.path().join("IDENTITY"), "abc-123\n").unwrap();
        let err = check_database(tmp.path(), None).unwrap_err();
        assert!(matches!(err, CheckError::NoOptionsFile { .. }), "{err}");
    }
}
