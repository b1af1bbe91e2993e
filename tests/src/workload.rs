//! The deterministic load generator: seeded batches of puts, deletes, single deletes,
//! merges and range deletes over every column family, written to RocksDB in lockstep with
//! the oracle log.
//!
//! Key spaces, per column family (fixed-width decimal, so byte order is numeric order):
//! - `<prefix>/NNNNNNNN` (`k/`, `user/`, `counter/`, `event/`): puts, deletes, range
//!   deletes, and in the counter column family merges of 8-byte LE `u64` operands;
//! - `once/NNNNNN` (all but the counter column family): only put-when-absent and
//!   single-delete-when-present, so every single delete removes a key written exactly once
//!   since it last vanished, and nothing else (delete, range delete, merge) ever touches
//!   these keys — RocksDB's single-delete contract holds.
//!
//! Values are 0..=200 random bytes (counters: 8 bytes); every `large_value_every` batches,
//! the batch opens with a put of 32..96 KiB, which crosses 32 KiB WAL blocks. Every
//! `marker_every` batches, the batch opens with a `put_log_data` time marker
//! ([`tidemark_manifest::rocks::marker`]). The ops depend only on the seed and the configuration, never
//! on timing: the same seed gives the same batches.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rocksdb::{DB, WriteBatch};
use serde::Serialize;

use tidemark_manifest::rocks::marker::Marker;

use crate::oracle::{BatchRecord, OracleWriter, SUMMARY_FILE, TIMES_LOG, TimePoint};
use crate::rocks::{count_db_files, open_db};
use crate::state::{COLUMN_FAMILIES, COUNTERS_CF, Op, OpKind, State, encode_counter};

/// What the generator writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub seed: u64,
    /// Largest number of ops in a batch (at least 1). Most batches have at most 8.
    pub max_batch_ops: usize,
    /// Every this many batches, flush every column family explicitly (0: never; memtables
    /// still flush by themselves when full).
    pub flush_every: u64,
    /// Every this many batches, open the batch with a put of a value over 32 KiB (0: never).
    pub large_value_every: u64,
    /// Every this many batches, open the batch with a time marker (0: never).
    pub marker_every: u64,
    /// Keys per column family in the main key space.
    pub keys_per_cf: u32,
    /// Keys per column family in the single-delete key space.
    pub once_keys_per_cf: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            max_batch_ops: 32,
            flush_every: 1000,
            large_value_every: 100,
            marker_every: 10,
            keys_per_cf: 5000,
            once_keys_per_cf: 500,
        }
    }
}

/// Ops written, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    pub put: u64,
    pub delete: u64,
    pub single_delete: u64,
    pub merge: u64,
    pub delete_range: u64,
}

impl OpCounts {
    fn add(&mut self, kind: OpKind) {
        match kind {
            OpKind::Put => self.put += 1,
            OpKind::Delete => self.delete += 1,
            OpKind::SingleDelete => self.single_delete += 1,
            OpKind::Merge => self.merge += 1,
            OpKind::DeleteRange => self.delete_range += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.put + self.delete + self.single_delete + self.merge + self.delete_range
    }
}

/// What a run did (printed as JSON by `tidemark-loadgen`, written to `summary.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub batches: u64,
    /// Latest sequence number of the database at the end (= oracle's last seq).
    pub last_seq: u64,
    pub ops: OpCounts,
    pub markers: u64,
    pub large_values: u64,
    /// Explicit flushes of all column families (automatic memtable flushes not counted).
    pub flushes: u64,
    pub live_sst_files: usize,
    pub wal_files: usize,
    pub archived_wal_files: usize,
    /// [`State::digest`] of the final state.
    pub digest: String,
    pub elapsed_secs: f64,
    /// The run ended early because it was asked to stop.
    pub stopped: bool,
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

const MAIN_PREFIX: [&str; 4] = ["k/", "user/", "counter/", "event/"];

fn main_key(cf: usize, n: u32) -> Vec<u8> {
    format!("{}{n:08}", MAIN_PREFIX[cf]).into_bytes()
}

fn once_key(n: u32) -> Vec<u8> {
    format!("once/{n:06}").into_bytes()
}

/// Writes seeded batches to a database and logs them to the oracle files.
#[derive(Debug)]
pub struct Generator {
    db: DB,
    db_path: PathBuf,
    out_dir: PathBuf,
    config: WorkloadConfig,
    rng: StdRng,
    state: State,
    oracle: OracleWriter,
    times: BufWriter<File>,
    batches: u64,
    last_seq: u64,
    last_micros: i64,
    ops: OpCounts,
    markers: u64,
    large_values: u64,
    flushes: u64,
    started: Instant,
}

impl Generator {
    /// Creates a new database at `db_path` (must not hold data yet) and the oracle files
    /// in `out_dir` (created if missing; must not hold an oracle log yet).
    pub fn create(db_path: &Path, out_dir: &Path, config: WorkloadConfig) -> Result<Self> {
        ensure!(
            config.max_batch_ops >= 1,
            "max_batch_ops must be at least 1"
        );
        ensure!(
            config.keys_per_cf >= 2 && config.once_keys_per_cf >= 1,
            "key spaces too small"
        );
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let oracle = OracleWriter::create(out_dir)?;
        let times_path = out_dir.join(TIMES_LOG);
        let times = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&times_path)
            .with_context(|| format!("creating {}", times_path.display()))?;
        let db = open_db(db_path)?;
        let seq = db.latest_sequence_number();
        if seq != 0 {
            bail!(
                "{} already holds data (sequence {seq}); the generator needs a new database",
                db_path.display()
            );
        }
        Ok(Self {
            db,
            db_path: db_path.to_owned(),
            out_dir: out_dir.to_owned(),
            rng: StdRng::seed_from_u64(config.seed),
            config,
            state: State::empty_generator(),
            oracle,
            times: BufWriter::new(times),
            batches: 0,
            last_seq: 0,
            last_micros: 0,
            ops: OpCounts::default(),
            markers: 0,
            large_values: 0,
            flushes: 0,
            started: Instant::now(),
        })
    }

    /// The database (e.g. to take a checkpoint between batches).
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// The expected state after the last batch.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Sequence number after the last batch.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Batches written so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    fn every(&self, n: u64) -> bool {
        n > 0 && self.batches.is_multiple_of(n)
    }

    fn random_value(&mut self, len: usize) -> Vec<u8> {
        let mut value = vec![0u8; len];
        self.rng.fill_bytes(&mut value);
        value
    }

    /// Picks the next op; applies it to the in-memory state.
    fn next_op(&mut self) -> Op {
        let cf = self.rng.random_range(0..COLUMN_FAMILIES.len());
        let roll = self.rng.random_range(0..100u32);
        let keys = self.config.keys_per_cf;
        let op = if cf == COUNTERS_CF {
            let key = main_key(cf, self.rng.random_range(0..keys));
            match roll {
                0..70 => Op::Merge {
                    cf,
                    key,
                    operand: encode_counter(self.rng.random_range(1..1000)),
                },
                70..82 => Op::Put {
                    cf,
                    key,
                    value: encode_counter(self.rng.random_range(0..1_000_000)),
                },
                82..97 => Op::Delete { cf, key },
                _ => self.range_op(cf),
            }
        } else {
            match roll {
                0..50 => {
                    let key = main_key(cf, self.rng.random_range(0..keys));
                    let len = self.rng.random_range(0..=200);
                    Op::Put {
                        cf,
                        key,
                        value: self.random_value(len),
                    }
                }
                50..65 => Op::Delete {
                    cf,
                    key: main_key(cf, self.rng.random_range(0..keys)),
                },
                65..97 => {
                    let key = once_key(self.rng.random_range(0..self.config.once_keys_per_cf));
                    let present = self
                        .state
                        .cf(COLUMN_FAMILIES[cf])
                        .is_some_and(|m| m.contains_key(&key));
                    if present {
                        Op::SingleDelete { cf, key }
                    } else {
                        let len = self.rng.random_range(0..=200);
                        Op::Put {
                            cf,
                            key,
                            value: self.random_value(len),
                        }
                    }
                }
                _ => self.range_op(cf),
            }
        };
        self.state.apply(&op);
        op
    }

    fn range_op(&mut self, cf: usize) -> Op {
        let keys = self.config.keys_per_cf;
        let start = self.rng.random_range(0..keys - 1);
        let end = (start + self.rng.random_range(1..=40)).min(keys);
        Op::DeleteRange {
            cf,
            start: main_key(cf, start),
            end: main_key(cf, end),
        }
    }

    /// Generates one batch, writes it to the database and the oracle log, and flushes
    /// every column family if one is due. Returns the batch.
    pub fn step(&mut self) -> Result<BatchRecord> {
        let max = self.config.max_batch_ops;
        let n_ops = if self.rng.random_bool(0.8) {
            self.rng.random_range(1..=max.min(8))
        } else {
            self.rng.random_range(1..=max)
        };
        let mut ops = Vec::with_capacity(n_ops + 1);
        if self.every(self.config.large_value_every) {
            let cf = [0, 1, 3][self.rng.random_range(0..3)];
            let key = main_key(cf, self.rng.random_range(0..self.config.keys_per_cf));
            let len = self.rng.random_range(32 * 1024 + 1..=96 * 1024);
            let op = Op::Put {
                cf,
                key,
                value: self.random_value(len),
            };
            self.state.apply(&op);
            ops.push(op);
            self.large_values += 1;
        }
        while ops.len() < n_ops {
            ops.push(self.next_op());
        }

        let unix_micros = now_micros().max(self.last_micros);
        self.last_micros = unix_micros;
        let marker = self.every(self.config.marker_every);
        let mut batch = WriteBatch::default();
        if marker {
            batch.put_log_data(Marker { unix_micros }.encode());
        }
        let handles: Vec<_> = COLUMN_FAMILIES
            .iter()
            .map(|name| {
                self.db
                    .cf_handle(name)
                    .with_context(|| format!("column family `{name}` missing"))
            })
            .collect::<Result<_>>()?;
        for op in &ops {
            let cf = &handles[op.cf()];
            match op {
                Op::Put { key, value, .. } => batch.put_cf(cf, key, value),
                Op::Delete { key, .. } => batch.delete_cf(cf, key),
                Op::SingleDelete { key, .. } => batch.single_delete_cf(cf, key),
                Op::Merge { key, operand, .. } => batch.merge_cf(cf, key, operand),
                Op::DeleteRange { start, end, .. } => batch.delete_range_cf(cf, start, end),
            }
        }
        self.db.write(batch).context("writing a batch")?;
        let first_seq = self.last_seq + 1;
        let seq = self.db.latest_sequence_number();
        ensure!(
            seq == self.last_seq + ops.len() as u64,
            "database at seq {seq} after a batch of {} ops from seq {first_seq}",
            ops.len()
        );
        self.last_seq = seq;

        let record = BatchRecord {
            index: self.batches,
            first_seq,
            unix_micros,
            marker,
            ops,
        };
        self.oracle.append(&record)?;
        self.oracle.flush()?;
        if marker {
            let point = TimePoint {
                batch: record.index,
                unix_micros,
                first_seq,
                last_seq: seq,
            };
            serde_json::to_writer(&mut self.times, &point)?;
            self.times.write_all(b"\n")?;
            self.times.flush()?;
            self.markers += 1;
        }
        for op in &record.ops {
            self.ops.add(op.kind());
        }
        self.batches += 1;

        if self.every(self.config.flush_every) {
            self.flush_all()?;
        }
        Ok(record)
    }

    /// Flushes the memtables of every column family to SST files.
    pub fn flush_all(&mut self) -> Result<()> {
        for name in COLUMN_FAMILIES {
            let cf = self
                .db
                .cf_handle(name)
                .with_context(|| format!("column family `{name}` missing"))?;
            self.db
                .flush_cf(&cf)
                .with_context(|| format!("flushing `{name}`"))?;
        }
        self.flushes += 1;
        Ok(())
    }

    /// Syncs the oracle files, writes `summary.json`, closes the database.
    pub fn finish(mut self, stopped: bool) -> Result<Summary> {
        self.oracle.sync()?;
        self.times.flush()?;
        self.times.get_ref().sync_all()?;
        self.db.flush_wal(true).context("syncing the WAL")?;
        let live_sst_files = self.db.live_files().context("listing live files")?.len();
        let (_, wal_files, archived_wal_files) = count_db_files(&self.db_path)?;
        let summary = Summary {
            seed: self.config.seed,
            batches: self.batches,
            last_seq: self.last_seq,
            ops: self.ops,
            markers: self.markers,
            large_values: self.large_values,
            flushes: self.flushes,
            live_sst_files,
            wal_files,
            archived_wal_files,
            digest: self.state.digest(),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            stopped,
        };
        let path = self.out_dir.join(SUMMARY_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        drop(self.db);
        Ok(summary)
    }
}

/// A generator run: where, what, how long, how fast.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub db: PathBuf,
    pub out: PathBuf,
    pub workload: WorkloadConfig,
    /// Stop after this many batches.
    pub batches: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Batches per second; 0 for as fast as possible.
    pub rate: f64,
}

/// Runs the generator until the batch count or duration is reached or `stop` is set
/// (checked between batches, and while pacing), then finishes (see [`Generator::finish`]).
pub fn run(opts: &RunOptions, stop: &AtomicBool) -> Result<Summary> {
    ensure!(
        opts.rate >= 0.0 && opts.rate.is_finite(),
        "rate must be a non-negative number"
    );
    let mut generator = Generator::create(&opts.db, &opts.out, opts.workload.clone())?;
    let started = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    let mut stopped = false;
    loop {
        if opts.batches.is_some_and(|n| generator.batches() >= n)
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if opts.rate > 0.0 {
            let due = started + Duration::from_secs_f64(generator.batches() as f64 / opts.rate);
            let until = deadline.map_or(due, |d| due.min(d));
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                std::thread::sleep((until - now).min(Duration::from_millis(50)));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        if stop.load(Ordering::Relaxed) {
            stopped = true;
            break;
        }
        generator.step()?;
    }
    generator.finish(stopped)
}
