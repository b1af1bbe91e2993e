//! RocksDB's own on-disk formats, as Tidemark reads and writes them.
//!
//! The archiver runs outside the process that owns a RocksDB database. It cannot use that
//! process's handle, so it reads the files RocksDB leaves on disk: it tails the WAL files
//! ([`log`] records holding [`write_batch`]es) to ship every batch with its sequence numbers,
//! reads the MANIFEST ([`version_edit`]) to know which WALs and SST files a base backup needs,
//! and reads the OPTIONS file ([`options_file`]) to check that the database keeps rotated
//! WALs long enough and does not recycle them.
//!
//! The restore tool goes the other way: it writes the archived batches back as WAL files
//! ([`log::LogWriter`], byte-identical to RocksDB's own writer) next to a base backup, so that
//! the application's own `DB::open` replays them in crash recovery, with the application's
//! merge operators, comparators and options.
//!
//! [`marker`] is Tidemark's time marker: a LogData blob applications add to their batches so
//! that a restore can target a point in time.
//!
//! The formats follow RocksDB 11.8 (`db/log_format.h`, `db/log_reader.cc`,
//! `db/log_writer.cc`, `db/write_batch.cc`, `db/dbformat.h`, `db/version_edit.h`,
//! `options/options_parser.cc`) and are tested against the `rocksdb` crate's bundled build.

mod coding;
pub mod log;
pub mod marker;
pub mod options_file;
pub mod version_edit;
pub mod write_batch;

#[cfg(test)]
mod rocksdb_tests;

/// The kind of a file in a RocksDB database directory (or its WAL directory / `archive/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DbFile {
    /// `NNNNNN.log`: a WAL.
    Wal(u64),
    /// `NNNNNN.sst`: a table file.
    Table(u64),
    /// `NNNNNN.blob`: a blob file.
    Blob(u64),
    /// `MANIFEST-NNNNNN`.
    Manifest(u64),
    /// `OPTIONS-NNNNNN`.
    Options(u64),
    /// `CURRENT`: names the current MANIFEST.
    Current,
    /// `IDENTITY`: the database id.
    Identity,
    /// `LOCK`.
    Lock,
    /// `LOG`, `LOG.old.*`: the info log.
    InfoLog,
    /// `*.dbtmp`: a file being written.
    Temp,
}

impl DbFile {
    /// Classifies a file name (not a path). `None` for names RocksDB does not use.
    pub fn parse(name: &str) -> Option<DbFile> {
        fn number(digits: &str) -> Option<u64> {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        }
        if name.ends_with(".dbtmp") {
            return Some(DbFile::Temp);
        }
        match name {
            "CURRENT" => return Some(DbFile::Current),
            "IDENTITY" => return Some(DbFile::Identity),
            "LOCK" => return Some(DbFile::Lock),
            "LOG" => return Some(DbFile::InfoLog),
            _ => {}
        }
        if name.starts_with("LOG.old.") {
            return Some(DbFile::InfoLog);
        }
        if let Some(n) = name.strip_prefix("MANIFEST-") {
            return number(n).map(DbFile::Manifest);
        }
        if let Some(n) = name.strip_prefix("OPTIONS-") {
            return number(n).map(DbFile::Options);
        }
        let (stem, ext) = name.rsplit_once('.')?;
        let n = number(stem)?;
        match ext {
            "log" => Some(DbFile::Wal(n)),
            "sst" | "ldb" => Some(DbFile::Table(n)),
            "blob" => Some(DbFile::Blob(n)),
            _ => None,
        }
    }

    /// The file name RocksDB gives this file (`Temp` and `InfoLog` have no single name).
    pub fn file_name(&self) -> Option<String> {
        Some(match self {
            DbFile::Wal(n) => format!("{n:06}.log"),
            DbFile::Table(n) => format!("{n:06}.sst"),
            DbFile::Blob(n) => format!("{n:06}.blob"),
            DbFile::Manifest(n) => format!("MANIFEST-{n:06}"),
            DbFile::Options(n) => format!("OPTIONS-{n:06}"),
            DbFile::Current => "CURRENT".into(),
            DbFile::Identity => "IDENTITY".into(),
            DbFile::Lock => "LOCK".into(),
            DbFile::InfoLog | DbFile::Temp => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DbFile;

    #[test]
    fn db_file_names() {
        let cases = [
            ("000012.log", Some(DbFile::Wal(12))),
            ("12345678.log", Some(DbFile::Wal(12_345_678))),
            ("000007.sst", Some(DbFile::Table(7))),
            ("000009.blob", Some(DbFile::Blob(9))),
            ("MANIFEST-000005", Some(DbFile::Manifest(5))),
            ("OPTIONS-000015", Some(DbFile::Options(15))),
            ("OPTIONS-000015.dbtmp", Some(DbFile::Temp)),
            ("CURRENT", Some(DbFile::Current)),
            ("IDENTITY", Some(DbFile::Identity)),
            ("LOCK", Some(DbFile::Lock)),
            ("LOG", Some(DbFile::InfoLog)),
            ("LOG.old.1700000000", Some(DbFile::InfoLog)),
            ("x.log", None),
            (".log", None),
            ("000012.txt", None),
            ("MANIFEST-", None),
            ("archive", None),
        ];
        for (name, want) in cases {
            assert_eq!(DbFile::parse(name), want, "{name}");
            if let Some(f) = want
                && let Some(n) = f.file_name()
            {
                assert_eq!(DbFile::parse(&n), Some(f), "{n}");
            }
        }
        assert_eq!(DbFile::Wal(12).file_name().unwrap(), "000012.log");
        assert_eq!(DbFile::Wal(12_345_678).file_name().unwrap(), "12345678.log");
        assert_eq!(DbFile::Manifest(5).file_name().unwrap(), "MANIFEST-000005");
    }
}
