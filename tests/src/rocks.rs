//! RocksDB options of generator databases, and reading a whole database into a [`State`].
//!
//! Everyone who opens a database written by the generator (the generator itself, tests,
//! restored copies) uses these options: the counter column family needs the
//! `tidemark.add` merge operator to read, flush or compact.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options};

use crate::state::{COLUMN_FAMILIES, COUNTERS_CF, MERGE_OPERATOR_NAME, State, add_merge};

/// Memtable size: small, so that flushes (and WAL rotations) happen every few hundred batches.
pub const WRITE_BUFFER_SIZE: usize = 64 * 1024;
/// Rotated WAL files stay in `archive/` this long, for the archiver.
pub const WAL_TTL_SECONDS: u64 = 3600;

fn merge_add(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    Some(add_merge(existing, operands.iter()))
}

/// Column family options: tiny memtables and files so that flushes and compactions are
/// constant.
fn cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(WRITE_BUFFER_SIZE);
    opts.set_max_write_buffer_number(3);
    opts.set_target_file_size_base(128 * 1024);
    opts.set_max_bytes_for_level_base(512 * 1024);
    opts.set_level_zero_file_num_compaction_trigger(2);
    opts
}

/// Database-wide options of generator databases (also the options of the "default" column
/// family): creates missing database and column families, keeps rotated WAL files in
/// `archive/` for [`WAL_TTL_SECONDS`], never recycles WAL files.
pub fn db_options() -> Options {
    let mut opts = cf_options();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_wal_ttl_seconds(WAL_TTL_SECONDS);
    opts.set_wal_size_limit_mb(0);
    opts.set_recycle_log_file_num(0);
    // Rotate the WAL (flushing whichever column family holds it back) every 1 MiB.
    opts.set_max_total_wal_size(1024 * 1024);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(2);
    opts
}

/// Options of one column family by name; unknown names get the common options.
pub fn cf_options_for(name: &str) -> Options {
    let mut opts = cf_options();
    if name == COLUMN_FAMILIES[COUNTERS_CF] {
        opts.set_merge_operator_associative(MERGE_OPERATOR_NAME, merge_add);
    }
    opts
}

/// Descriptors of the generator's column families.
pub fn cf_descriptors() -> Vec<ColumnFamilyDescriptor> {
    COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, cf_options_for(name)))
        .collect()
}

/// Opens (creating if needed) a generator database read-write, with every generator column
/// family.
pub fn open_db(path: &Path) -> Result<DB> {
    DB::open_cf_descriptors(&db_options(), path, cf_descriptors())
        .with_context(|| format!("opening RocksDB at {}", path.display()))
}

/// Opens an existing database read-only with exactly the column families it has (none is
/// created), with the generator's options. WAL files are replayed in memory; nothing on
/// disk changes, and a writer may keep the database open meanwhile.
pub fn open_db_read_only(path: &Path) -> Result<DB> {
    let mut opts = db_options();
    opts.create_if_missing(false);
    opts.create_missing_column_families(false);
    let names = DB::list_cf(&opts, path)
        .with_context(|| format!("listing column families of {}", path.display()))?;
    let descriptors = names
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(name, cf_options_for(name)));
    DB::open_cf_descriptors_read_only(&opts, path, descriptors, false)
        .with_context(|| format!("opening RocksDB read-only at {}", path.display()))
}

/// Reads every column family of an open database (all of them must be open).
pub fn read_state(db: &DB) -> Result<State> {
    let opts = db_options();
    let path = db.path();
    let names = DB::list_cf(&opts, path)
        .with_context(|| format!("listing column families of {}", path.display()))?;
    let mut state = State::new();
    for name in &names {
        let cf = db
            .cf_handle(name)
            .with_context(|| format!("column family `{name}` not open"))?;
        let map = state.add_cf(name);
        for item in db.full_iterator_cf(&cf, IteratorMode::Start) {
            let (key, value) = item.with_context(|| format!("reading column family `{name}`"))?;
            map.insert(key.into_vec(), value.into_vec());
        }
    }
    Ok(state)
}

/// Opens the database at `path` read-only and returns its state and its latest sequence
/// number.
pub fn read_db_state_and_seq(path: &Path) -> Result<(State, u64)> {
    let db = open_db_read_only(path)?;
    let state = read_state(&db)?;
    Ok((state, db.latest_sequence_number()))
}

/// Opens the database at `path` read-only and returns its state.
pub fn read_db_state(path: &Path) -> Result<State> {
    Ok(read_db_state_and_seq(path)?.0)
}

/// Files in a database directory: (SST files, WAL files in the directory, WAL files in
/// `archive/`).
pub fn count_db_files(path: &Path) -> Result<(usize, usize, usize)> {
    let count = |dir: &Path, ext: &str| -> Result<usize> {
        if !dir.exists() {
            return Ok(0);
        }
        let mut n = 0;
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            if entry?.path().extension().is_some_and(|e| e == ext) {
                n += 1;
            }
        }
        Ok(n)
    };
    ensure!(path.is_dir(), "{} is not a directory", path.display());
    Ok((
        count(path, "sst")?,
        count(path, "log")?,
        count(&path.join("archive"), "log")?,
    ))
}
