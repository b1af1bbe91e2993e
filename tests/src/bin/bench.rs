//! `tidemark-bench`: the measuring tools behind `scripts/bench.sh`. Each subcommand does one
//! job and prints one JSON object on standard output; the script runs them, repeats them and
//! writes the report (`bench/report.py`).
//!
//! - `archive`: a fresh database, `tidemark-archiver run` beside it, writes at a fixed rate
//!   (or as fast as possible, or none: idle), and the store polled for what is durable.
//!   Reports the durable archive lag of every write (commit → a segment holding it is in the
//!   store), the archiver's CPU time, peak RSS, the store requests it made, and stored bytes
//!   against WAL bytes.
//! - `load`, `write`, `update`: build and change the database the restore measures use.
//! - `open`: the first open of a database by an application (RocksDB's recovery replays the
//!   WAL), timed.
//! - `replay-ceiling`: the same WAL records applied to the base with the WAL disabled, timed:
//!   how fast RocksDB can take these writes at all.
//! - `get-plan`: a plain parallel download of exactly what a restore of the latest point
//!   downloads: the transfer ceiling.
//! - `backup-engine-create` / `backup-engine-restore`: RocksDB's own BackupEngine on a local
//!   directory, for comparison.
//! - `checkpoint`, `put-file`, `get-file`: a checkpoint, and moving one file to and from the
//!   store, for the checkpoint + tarball comparison.
//!
//! Databases written here use RocksDB's default options plus what archiving needs
//! (`WAL_ttl_seconds`), one column family, 16-byte keys and values that compress about 2:1
//! (a random half, repeated).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rocksdb::{DB, Options, WriteBatch, WriteOptions};
use serde_json::{Value, json};
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::plan::Target;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::rocks::log::LogReader;
use tidemark_manifest::rocks::marker;
use tidemark_manifest::store::{ObjectStore, OpenOptions, StoreUrl, open_store_with};
use tokio::runtime::Runtime;

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-bench",
    version,
    about = "Measurements for scripts/bench.sh"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A fresh database archived by `tidemark-archiver run` while written at a fixed rate:
    /// durable lag and archiver cost.
    Archive(ArchiveArgs),
    /// Bulk-load keys 0..N in order into a new database (WAL disabled), flush, and wait for
    /// compactions to settle.
    Load(LoadArgs),
    /// Write random updates to an existing database at a fixed rate, with time markers.
    Write(WriteArgs),
    /// Update a share of the keys (0: one key), flush, and (unless told not to) wait for
    /// compactions.
    Update(UpdateArgs),
    /// Open a database read-write as an application would (RocksDB recovery replays its WAL).
    Open(OpenArgs),
    /// Apply the WAL records of a restored database to its base with the WAL disabled.
    ReplayCeiling(CeilingArgs),
    /// Download everything a restore of the latest point downloads, in parallel, unverified.
    GetPlan(GetPlanArgs),
    /// Back a database up with RocksDB's BackupEngine into a local directory.
    BackupEngineCreate(BackupCreateArgs),
    /// Restore the latest BackupEngine backup into a new directory.
    BackupEngineRestore(BackupRestoreArgs),
    /// Create a RocksDB checkpoint of a database.
    Checkpoint(CheckpointArgs),
    /// Upload one file to a store.
    PutFile(FileArgs),
    /// Download one object from a store to a file.
    GetFile(FileArgs),
}

/// The store flags of the Tidemark tools (`--endpoint-url`, `--path-style`…, or
/// `TIDEMARK_*` in the environment).
#[derive(Debug, Args)]
struct StoreFlags {
    #[command(flatten)]
    store: StoreArgs,
}

impl StoreFlags {
    async fn open(&self, url: &str, create: bool) -> Result<Arc<dyn ObjectStore>> {
        let url = StoreUrl::parse(url)?;
        Ok(open_store_with(
            &url,
            &OpenOptions {
                s3: self.store.s3_options()?,
                create_local_root: create,
                ..OpenOptions::default()
            },
        )
        .await?)
    }
}

#[derive(Debug, Args)]
struct ValueArgs {
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys in the key space (writes pick one at random).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Puts per write batch.
    #[arg(long, default_value_t = 1)]
    ops_per_batch: usize,
    /// Seed of keys and values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct ArchiveArgs {
    /// Work directory (created; the database goes into db/).
    #[arg(long)]
    dir: PathBuf,
    /// Repository URL for the archiver (file:///… or s3://…).
    #[arg(long)]
    to: String,
    /// The tidemark-archiver binary.
    #[arg(long)]
    archiver: PathBuf,
    /// The archiver's --sync-interval.
    #[arg(long, default_value = "1s")]
    sync_interval: String,
    /// Write batches per second (0: as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of writing (0 with --idle-seconds: no writes).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Before writing, leave the archiver alone with the idle database this long and report
    /// what it did meanwhile.
    #[arg(long, default_value_t = 0.0)]
    idle_seconds: f64,
    /// Poll the store during the writes to measure the durable lag of every write.
    #[arg(long)]
    lag: bool,
    /// Pause the archiver (SIGSTOP) while the writer runs and resume it (SIGCONT) when the
    /// writer stops: measures how fast it drains a backlog with the CPU to itself.
    #[arg(long, conflicts_with = "lag")]
    drain: bool,
    /// With --drain: before resuming the archiver, wait for the database's flushes and
    /// compactions of the backlog to finish, so that the drain does not share the CPU with
    /// them (the time waited is reported as drain.settle_secs).
    #[arg(long, requires = "drain")]
    settle: bool,
    /// With --drain: the S3 server's process, whose CPU share over the drain is reported
    /// (drain.server_cpu_share: 1.0 is one core; it includes serving this bench's polls of
    /// the store), to tell a bound server from a slow archiver.
    #[arg(long, requires = "drain")]
    server_pid: Option<u32>,
    /// Pause between store polls that found nothing new, in milliseconds.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// The S3 server's request log, to count requests (one request per line).
    #[arg(long)]
    request_log: Option<PathBuf>,
    #[command(flatten)]
    values: ValueArgs,
    #[command(flatten)]
    store: StoreFlags,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[arg(long)]
    db: PathBuf,
    #[command(flatten)]
    values: ValueArgs,
}

#[derive(Debug, Args)]
struct WriteArgs {
    #[arg(long)]
    db: PathBuf,
    /// Write batches per second (0: as fast as possible).
    #[arg(long)]
    rate: f64,
    #[arg(long)]
    seconds: f64,
    #[command(flatten)]
    values: ValueArgs,
}

#[derive(Debug, Args)]
struct UpdateArgs {
    #[arg(long)]
    db: PathBuf,
    /// Share of the key space to overwrite (distinct keys); 0 writes a single key.
    #[arg(long, default_value_t = 0.01)]
    fraction: f64,
    /// Flush only: no automatic compactions while this runs.
    #[arg(long)]
    no_compactions: bool,
    #[command(flatten)]
    values: ValueArgs,
}

#[derive(Debug, Args)]
struct OpenArgs {
    #[arg(long)]
    db: PathBuf,
}

#[derive(Debug, Args)]
struct CeilingArgs {
    /// A restored database that was not opened yet (it still holds the re-created WAL).
    #[arg(long)]
    restored: PathBuf,
    /// Where to put the base-only copy (created; removed at the end).
    #[arg(long)]
    scratch: PathBuf,
}

#[derive(Debug, Args)]
struct GetPlanArgs {
    #[arg(long)]
    from: String,
    /// Directory to download into (created).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    #[command(flatten)]
    store: StoreFlags,
}

#[derive(Debug, Args)]
struct BackupCreateArgs {
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    backup_dir: PathBuf,
}

#[derive(Debug, Args)]
struct BackupRestoreArgs {
    #[arg(long)]
    backup_dir: PathBuf,
    #[arg(long)]
    target: PathBuf,
    /// Files copied at once.
    #[arg(long, default_value_t = 4)]
    threads: i32,
}

#[derive(Debug, Args)]
struct CheckpointArgs {
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    target: PathBuf,
}

#[derive(Debug, Args)]
struct FileArgs {
    /// Store URL (file:///… or s3://…).
    #[arg(long)]
    store_url: String,
    #[arg(long)]
    key: String,
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    store: StoreFlags,
}

// ---------------------------------------------------------------------------------------
// The database and the writer

/// Options of every database written here: RocksDB's defaults plus what archiving needs.
fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_wal_ttl_seconds(3600);
    opts.set_recycle_log_file_num(0);
    opts
}

fn key_of(n: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(format!("k{n:015}").as_bytes());
    k
}

/// Writes batches of random puts, each opened with a time marker.
struct Writer {
    rng: StdRng,
    keys: u64,
    value_size: usize,
    ops_per_batch: usize,
    value: Vec<u8>,
    /// Bytes of keys and values written.
    payload_bytes: u64,
}

impl Writer {
    fn new(v: &ValueArgs) -> Result<Writer> {
        ensure!(v.keys >= 1, "--keys must be at least 1");
        ensure!(v.ops_per_batch >= 1, "--ops-per-batch must be at least 1");
        Ok(Writer {
            rng: StdRng::seed_from_u64(v.seed),
            keys: v.keys,
            value_size: v.value_size,
            ops_per_batch: v.ops_per_batch,
            value: vec![0; v.value_size],
            payload_bytes: 0,
        })
    }

    /// A value that compresses about 2:1: a random first half, repeated.
    fn fill_value(&mut self) {
        let half = self.value_size.div_ceil(2);
        self.rng.fill_bytes(&mut self.value[..half]);
        let (a, b) = self.value.split_at_mut(half);
        let n = b.len();
        b.copy_from_slice(&a[..n]);
    }

    fn put(&mut self, batch: &mut WriteBatch, n: u64) {
        self.fill_value();
        batch.put(key_of(n), &self.value);
        self.payload_bytes += 16 + self.value_size as u64;
    }

    /// Writes one batch of random keys; returns the database's sequence number after it.
    fn write_random(&mut self, db: &DB) -> Result<u64> {
        let mut batch = WriteBatch::default();
        batch.put_log_data(marker::encode(SystemTime::now()));
        for _ in 0..self.ops_per_batch {
            let n = self.rng.random_range(0..self.keys);
            self.put(&mut batch, n);
        }
        db.write(batch).context("writing a batch")?;
        Ok(db.latest_sequence_number())
    }
}

/// Calls `step` `rate` times a second (as fast as possible for 0) until `seconds` have
/// passed. Behind schedule, it catches up at full speed.
fn paced(rate: f64, seconds: f64, mut step: impl FnMut() -> Result<()>) -> Result<(u64, f64)> {
    ensure!(rate >= 0.0 && rate.is_finite(), "rate must be >= 0");
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut n = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if rate > 0.0 {
            let due = (now - start).as_secs_f64() * rate;
            if n as f64 >= due {
                let next = start + Duration::from_secs_f64((n as f64 + 1.0) / rate);
                std::thread::sleep(next.saturating_duration_since(now).min(end - now));
                continue;
            }
        }
        step()?;
        n += 1;
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Waits until the database has no flush or compaction running or pending.
fn settle(db: &DB) -> Result<f64> {
    let start = Instant::now();
    let mut quiet = 0;
    while quiet < 3 {
        let busy = [
            "rocksdb.num-running-compactions",
            "rocksdb.num-running-flushes",
            "rocksdb.compaction-pending",
            "rocksdb.mem-table-flush-pending",
        ]
        .iter()
        .map(|p| db.property_int_value(*p).map(|v| v.unwrap_or(0)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .any(|v| v > 0);
        quiet = if busy { 0 } else { quiet + 1 };
        std::thread::sleep(Duration::from_millis(100));
        ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "compactions did not settle in 30 minutes"
        );
    }
    Ok(start.elapsed().as_secs_f64())
}

fn dir_bytes(dir: &Path, pred: &dyn Fn(&Path) -> bool) -> Result<u64> {
    let mut total = 0;
    if !dir.exists() {
        return Ok(0);
    }
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_dir() {
            total += dir_bytes(&e.path(), pred)?;
        } else if pred(&e.path()) {
            total += meta.len();
        }
    }
    Ok(total)
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e == ext)
}

/// Bytes of WAL files in a database directory and its `archive/`.
fn wal_bytes(db: &Path) -> Result<u64> {
    dir_bytes(db, &|p| has_ext(p, "log"))
}

fn sst_bytes(db: &Path) -> Result<u64> {
    dir_bytes(db, &|p| has_ext(p, "sst"))
}

// ---------------------------------------------------------------------------------------
// The archiver process

/// CPU time (user + system) and peak RSS of a process.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_secs: f64,
    hwm_kib: u64,
    rss_kib: u64,
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn sample_proc(pid: u32, ticks: f64) -> Result<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("malformed /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_secs: (utime + stime) / ticks,
        hwm_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}

struct Archiver {
    child: Child,
}

impl Archiver {
    fn start(bin: &Path, db: &Path, to: &str, sync_interval: &str, log: &Path) -> Result<Self> {
        let log_file = fs::File::create(log)?;
        let out_file = fs::File::create(log.with_extension("out"))?;
        let child = Command::new(bin)
            .args(["run", "--db"])
            .arg(db)
            .args(["--to", to, "--sync-interval", sync_interval])
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Archiver { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// Sends `signal` (a name `kill` knows, e.g. STOP or CONT).
    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -{signal} of the archiver failed");
        Ok(())
    }

    /// SIGTERM, then waits (SIGKILL after a minute).
    fn stop(mut self) -> Result<Option<i32>> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("the archiver did not stop within a minute of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Requests in the S3 server's log from a byte offset on, by method.
fn count_requests(log: &Path, from: u64) -> Result<(BTreeMap<String, u64>, u64)> {
    let mut f = fs::File::open(log)?;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(from.min(end)))?;
    let mut counts = BTreeMap::new();
    for line in BufReader::new(f.take(end - from.min(end))).lines() {
        // `"PUT /key HTTP/1.1" 200`; error responses are wrapped in terminal colour codes.
        let line = strip_ansi(&line?);
        for method in ["GET", "PUT", "POST", "HEAD", "DELETE"] {
            if line.contains(&format!("\"{method} /")) {
                *counts.entry(method.to_owned()).or_insert(0) += 1;
            }
        }
    }
    Ok((counts, end))
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_offset(log: &Option<PathBuf>) -> Result<u64> {
    Ok(match log {
        Some(p) => fs::metadata(p)?.len(),
        None => 0,
    })
}

// ---------------------------------------------------------------------------------------
// Polling the store for durable segments

#[derive(Debug, Default)]
struct Durable {
    /// (last durable sequence, microseconds since the run's start when seen).
    seen: Vec<(u64, u64)>,
    segments: u64,
    stored_bytes: u64,
    raw_bytes: u64,
    records: u64,
    polls: u64,
    poll_micros: u64,
}

/// Follows the tail of the repository from `next` on, recording when each segment appears,
/// until `stop` is set and the durable sequence reaches `target` (or the deadline passes).
async fn follow_tail(
    repo: Repository,
    mut next: u64,
    t0: Instant,
    pause: Duration,
    state: Arc<Mutex<Durable>>,
    stop: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
) -> Result<()> {
    loop {
        let started = Instant::now();
        let header = repo.read_segment_header(next).await?;
        let seen_at = t0.elapsed().as_micros() as u64;
        {
            let mut s = state.lock().expect("durable state");
            s.polls += 1;
            s.poll_micros += started.elapsed().as_micros() as u64;
            if let Some(h) = &header {
                s.seen.push((h.last_seq, seen_at));
                s.segments += 1;
                s.stored_bytes += h.object_len();
                s.raw_bytes += h.raw_size;
                s.records += u64::from(h.record_count);
            }
        }
        match header {
            Some(h) => next = h.last_seq + 1,
            None => {
                if stop.load(Ordering::SeqCst) && next > target.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn wait_for_base(repo: &Repository, archiver: &mut Archiver) -> Result<f64> {
    let start = Instant::now();
    loop {
        if !archiver.running()? {
            bail!("the archiver exited before its first base backup (see its log)");
        }
        if let Ok(state) = repo.load().await
            && !state.history.bases.is_empty()
        {
            return Ok(start.elapsed().as_secs_f64());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(300),
            "no base backup after 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0)
}

async fn object_etags(store: &Arc<dyn ObjectStore>) -> Result<BTreeMap<String, String>> {
    Ok(store
        .list("")
        .await?
        .into_iter()
        .map(|m| (m.key, m.etag.to_string()))
        .collect())
}

fn archive(a: ArchiveArgs) -> Result<Value> {
    let rt = Runtime::new()?;
    if a.dir.exists() {
        fs::remove_dir_all(&a.dir)?;
    }
    fs::create_dir_all(&a.dir)?;
    let db_path = a.dir.join("db");
    let db = DB::open(&db_options(), &db_path).context("creating the database")?;
    let store = rt.block_on(a.store.open(&a.to, true))?;
    let repo = Repository::new(Arc::clone(&store));
    let ticks = clock_ticks();

    let mut archiver = Archiver::start(
        &a.archiver,
        &db_path,
        &a.to,
        &a.sync_interval,
        &a.dir.join("archiver.log"),
    )?;
    let pid = archiver.pid();
    let base_secs = rt.block_on(wait_for_base(&repo, &mut archiver))?;
    let mut out = json!({
        "rate": a.rate,
        "seconds": a.seconds,
        "value_size": a.values.value_size,
        "ops_per_batch": a.values.ops_per_batch,
        "sync_interval": a.sync_interval,
        "store": if a.to.starts_with("s3://") { "s3" } else { "local" },
        "first_base_secs": base_secs,
    });

    // Idle: no writes; nothing new may appear in the store.
    if a.idle_seconds > 0.0 {
        let before = rt.block_on(object_etags(&store))?;
        let log_from = log_offset(&a.request_log)?;
        let cpu0 = sample_proc(pid, ticks)?;
        std::thread::sleep(Duration::from_secs_f64(a.idle_seconds));
        let cpu1 = sample_proc(pid, ticks)?;
        let requests = match &a.request_log {
            Some(p) => Some(count_requests(p, log_from)?.0),
            None => None,
        };
        let after = rt.block_on(object_etags(&store))?;
        let new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, e)| before.get(*k).is_some_and(|b| b != *e))
            .map(|(k, _)| k)
            .collect();
        out["idle"] = json!({
            "seconds": a.idle_seconds,
            "new_objects": new.len(),
            "new_object_keys": new,
            "replaced_objects": changed,
            "cpu_secs": cpu1.cpu_secs - cpu0.cpu_secs,
            "requests": requests,
            "rss_kib": cpu1.rss_kib,
        });
    }

    // Writes.
    let t0 = Instant::now();
    let start_seq = db.latest_sequence_number() + 1;
    let durable = Arc::new(Mutex::new(Durable::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicU64::new(0));
    let pause = Duration::from_millis(a.poll_ms);
    let poller = a.lag.then(|| {
        rt.spawn(follow_tail(
            repo.clone(),
            start_seq,
            t0,
            pause,
            Arc::clone(&durable),
            Arc::clone(&stop),
            Arc::clone(&target),
        ))
    });
    let objects0 = rt.block_on(object_etags(&store))?;
    let wal0 = wal_bytes(&db_path)?;
    let log_from = log_offset(&a.request_log)?;
    let cpu0 = sample_proc(pid, ticks)?;
    let mut writer = Writer::new(&a.values)?;
    if a.drain {
        archiver.signal("STOP")?;
    }
    let mut commits: Vec<(u64, u64)> = Vec::new();
    let mut last_seq = start_seq - 1;
    let (writes, write_secs) = if a.seconds > 0.0 {
        paced(a.rate, a.seconds, || {
            last_seq = writer.write_random(&db)?;
            if a.lag {
                commits.push((last_seq, t0.elapsed().as_micros() as u64));
            }
            Ok(())
        })?
    } else {
        (0, 0.0)
    };
    let cpu_writer_end = sample_proc(pid, ticks)?;
    let wal_written = wal_bytes(&db_path)? - wal0;
    target.store(last_seq, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let settle_secs = if a.settle { Some(settle(&db)?) } else { None };
    let cpu_settled = sample_proc(pid, ticks)?;
    let server0 = a
        .server_pid
        .map(|p| sample_proc(p, ticks).map(|s| (s, Instant::now())))
        .transpose()?;
    // Catch-up: until a segment holding the last write is in the store.
    if a.drain {
        archiver.signal("CONT")?;
    }
    let catch_up_from = t0.elapsed();
    let poller = match poller {
        Some(p) => p,
        None => rt.spawn(follow_tail(
            repo.clone(),
            start_seq,
            t0,
            Duration::from_millis(20),
            Arc::clone(&durable),
            Arc::clone(&stop),
            Arc::clone(&target),
        )),
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !poller.is_finished() {
        ensure!(
            Instant::now() < deadline,
            "the archiver did not catch up within 10 minutes"
        );
        ensure!(
            archiver.running()?,
            "the archiver exited while the bench was running (see its log)"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    rt.block_on(poller)??;
    let d = durable.lock().expect("durable state");
    let caught_up_micros = d
        .seen
        .iter()
        .find(|(seq, _)| *seq >= last_seq)
        .map(|(_, t)| *t)
        .unwrap_or(0);
    let cpu1 = sample_proc(pid, ticks)?;
    let server1 = a
        .server_pid
        .map(|p| sample_proc(p, ticks).map(|s| (s, Instant::now())))
        .transpose()?;
    let requests = match &a.request_log {
        Some(p) => Some(count_requests(p, log_from)?.0),
        None => None,
    };
    let objects1 = rt.block_on(object_etags(&store))?;
    let exit = archiver.stop()?;
    drop(db);
    let created = objects1
        .keys()
        .filter(|k| !objects0.contains_key(*k))
        .count();
    let replaced = objects1
        .iter()
        .filter(|(k, e)| objects0.get(*k).is_some_and(|b| b != *e))
        .count();

    let mut lags = Vec::with_capacity(commits.len());
    let mut missing = 0u64;
    let mut i = 0;
    for (seq, at) in &commits {
        while i < d.seen.len() && d.seen[i].0 < *seq {
            i += 1;
        }
        match d.seen.get(i) {
            Some((_, seen)) => lags.push(seen.saturating_sub(*at)),
            None => missing += 1,
        }
    }
    lags.sort_unstable();
    let window_secs = caught_up_micros as f64 / 1e6;
    let catch_up_secs = (window_secs - catch_up_from.as_secs_f64()).max(0.0);
    let mb = |b: u64| b as f64 / 1e6;
    let cpu_secs = cpu1.cpu_secs - cpu0.cpu_secs;
    out["writes"] = json!(writes);
    out["write_secs"] = json!(write_secs);
    out["writes_per_sec"] = json!(writes as f64 / write_secs.max(1e-9));
    out["payload_bytes"] = json!(writer.payload_bytes);
    out["wal_bytes"] = json!(wal_written);
    out["wal_mb_per_sec"] = json!(mb(wal_written) / write_secs.max(1e-9));
    out["lag_ms"] = if a.lag {
        json!({
            "count": lags.len(),
            "missing": missing,
            "p50": percentile(&lags, 50.0),
            "p90": percentile(&lags, 90.0),
            "p99": percentile(&lags, 99.0),
            "max": lags.last().map(|v| *v as f64 / 1000.0),
            "mean": (!lags.is_empty()).then(|| lags.iter().sum::<u64>() as f64 / lags.len() as f64 / 1000.0),
            "poll_pause_ms": a.poll_ms,
            "mean_poll_ms": (d.polls > 0).then(|| d.poll_micros as f64 / d.polls as f64 / 1000.0),
        })
    } else {
        Value::Null
    };
    out["archiver"] = json!({
        "cpu_secs": cpu_secs,
        "cpu_secs_while_writing": cpu_writer_end.cpu_secs - cpu0.cpu_secs,
        "cpu_secs_per_gb_wal": (wal_written > 0).then(|| cpu_secs / (wal_written as f64 / 1e9)),
        "cpu_share_of_one_core": cpu_secs / window_secs.max(1e-9),
        "peak_rss_mib": cpu1.hwm_kib as f64 / 1024.0,
        "rss_mib": cpu1.rss_kib as f64 / 1024.0,
        "catch_up_after_writes_secs": catch_up_secs,
        "throughput_mb_per_sec": mb(wal_written) / window_secs.max(1e-9),
        "throughput_over_write_rate": (write_secs > 0.0).then(|| write_secs / window_secs.max(1e-9)),
        "exit_code": exit,
    });
    out["drain"] = if a.drain {
        // The archiver had all of the backlog to do after the writer stopped.
        let secs = catch_up_secs.max(1e-9);
        json!({
            "secs": catch_up_secs,
            "mb_per_sec": mb(wal_written) / secs,
            "over_write_rate": (write_secs > 0.0).then(|| write_secs / secs),
            "cpu_secs": cpu1.cpu_secs - cpu_settled.cpu_secs,
            "settle_secs": settle_secs,
            // Over its own sampling window, which also holds this bench's polls of the
            // store (a listing every 20 ms).
            "server_cpu_share": server0.zip(server1).map(|((s0, t0), (s1, t1))| {
                (s1.cpu_secs - s0.cpu_secs) / t1.duration_since(t0).as_secs_f64().max(1e-9)
            }),
        })
    } else {
        Value::Null
    };
    out["segments"] = json!({
        "count": d.segments,
        "records": d.records,
        "raw_bytes": d.raw_bytes,
        "stored_bytes": d.stored_bytes,
        "stored_over_wal": (wal_written > 0).then(|| d.stored_bytes as f64 / wal_written as f64),
        "per_hour": d.segments as f64 / window_secs.max(1e-9) * 3600.0,
    });
    out["objects"] = json!({
        "created": created,
        "replaced": replaced,
        "created_per_hour": created as f64 / window_secs.max(1e-9) * 3600.0,
    });
    out["requests"] = match requests {
        Some(r) => {
            let total: u64 = r.values().sum();
            let writes: u64 = ["PUT", "POST", "DELETE"]
                .iter()
                .map(|m| r.get(*m).copied().unwrap_or(0))
                .sum();
            json!({
                "window_secs": window_secs,
                "by_method": r,
                "write_requests": writes,
                "write_requests_per_hour": writes as f64 / window_secs.max(1e-9) * 3600.0,
                "all_requests_including_lag_polls": total,
            })
        }
        None => Value::Null,
    };
    let _ = fs::remove_dir_all(&db_path);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Databases for the restore measures

fn load(a: LoadArgs) -> Result<Value> {
    ensure!(
        !a.db.exists(),
        "{} exists; load needs a new database",
        a.db.display()
    );
    let db = DB::open(&db_options(), &a.db)?;
    let mut writer = Writer::new(&a.values)?;
    let start = Instant::now();
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let mut n = 0;
    while n < a.values.keys {
        let mut batch = WriteBatch::default();
        for _ in 0..1000 {
            if n == a.values.keys {
                break;
            }
            writer.put(&mut batch, n);
            n += 1;
        }
        db.write_opt(batch, &wo)?;
    }
    db.flush()?;
    let write_secs = start.elapsed().as_secs_f64();
    let settle_secs = settle(&db)?;
    let seq = db.latest_sequence_number();
    drop(db);
    Ok(json!({
        "keys": a.values.keys,
        "value_size": a.values.value_size,
        "payload_bytes": writer.payload_bytes,
        "write_secs": write_secs,
        "settle_secs": settle_secs,
        "sst_bytes": sst_bytes(&a.db)?,
        "last_seq": seq,
    }))
}

fn write(a: WriteArgs) -> Result<Value> {
    let db = DB::open(&db_options(), &a.db)?;
    let wal0 = wal_bytes(&a.db)?;
    let mut writer = Writer::new(&a.values)?;
    let (writes, secs) = paced(a.rate, a.seconds, || {
        writer.write_random(&db)?;
        Ok(())
    })?;
    let seq = db.latest_sequence_number();
    let wal = wal_bytes(&a.db)? - wal0;
    drop(db);
    Ok(json!({
        "writes": writes,
        "secs": secs,
        "writes_per_sec": writes as f64 / secs.max(1e-9),
        "payload_bytes": writer.payload_bytes,
        "wal_bytes": wal,
        "last_seq": seq,
        "sst_bytes": sst_bytes(&a.db)?,
    }))
}

fn update(a: UpdateArgs) -> Result<Value> {
    let mut opts = db_options();
    opts.create_if_missing(false);
    if a.no_compactions {
        opts.set_disable_auto_compactions(true);
    }
    let db = DB::open(&opts, &a.db)?;
    let count = ((a.values.keys as f64) * a.fraction).round() as usize;
    let mut writer = Writer::new(&a.values)?;
    let mut picker = StdRng::seed_from_u64(a.values.seed ^ 0x5eed);
    let picked = rand::seq::index::sample(&mut picker, a.values.keys as usize, count);
    let mut batch = WriteBatch::default();
    if count == 0 {
        // One write, so that the flush below records the current WAL as the database's
        // oldest live one (a database reopened without writes records a log number that no
        // WAL file has).
        writer.put(&mut batch, 0);
    }
    for (i, n) in picked.iter().enumerate() {
        writer.put(&mut batch, n as u64);
        if i % 1000 == 999 {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    db.write(batch)?;
    db.flush()?;
    let settle_secs = if a.no_compactions {
        None
    } else {
        Some(settle(&db)?)
    };
    let files_per_level = (0..7)
        .map(|l| {
            db.property_int_value(format!("rocksdb.num-files-at-level{l}").as_str())
                .map(|v| v.unwrap_or(0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(db);
    Ok(json!({
        "updated_keys": count,
        "files_per_level": files_per_level,
        "payload_bytes": writer.payload_bytes,
        "settle_secs": settle_secs,
        "sst_bytes": sst_bytes(&a.db)?,
    }))
}

fn open(a: OpenArgs) -> Result<Value> {
    let wal = wal_bytes(&a.db)?;
    let mut opts = db_options();
    opts.create_if_missing(false);
    let start = Instant::now();
    let db = DB::open(&opts, &a.db).context("opening the database")?;
    let open_secs = start.elapsed().as_secs_f64();
    let seq = db.latest_sequence_number();
    drop(db);
    Ok(json!({
        "open_secs": open_secs,
        "wal_bytes_before_open": wal,
        "latest_seq": seq,
    }))
}

/// WAL files of a database directory (not `archive/`), by log number.
fn wal_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if has_ext(&p, "log")
            && let Some(n) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
        {
            files.push((n, p));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

fn replay_ceiling(a: CeilingArgs) -> Result<Value> {
    // The records, as RocksDB's recovery will read them.
    let read_start = Instant::now();
    let mut batches = Vec::new();
    let mut bytes = 0u64;
    for path in wal_files(&a.restored)? {
        let mut reader = LogReader::open(&path)?;
        while let Some(r) = reader.next_record()? {
            bytes += r.bytes.len() as u64;
            batches.push(r.bytes);
        }
    }
    let read_secs = read_start.elapsed().as_secs_f64();
    // The base alone: everything but the WAL files.
    if a.scratch.exists() {
        fs::remove_dir_all(&a.scratch)?;
    }
    fs::create_dir_all(&a.scratch)?;
    for e in fs::read_dir(&a.restored)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() || has_ext(&p, "log") {
            continue;
        }
        let to = a.scratch.join(e.file_name());
        if has_ext(&p, "sst") {
            fs::hard_link(&p, &to)?;
        } else {
            fs::copy(&p, &to)?;
        }
    }
    let mut opts = db_options();
    opts.create_if_missing(false);
    let db = DB::open(&opts, &a.scratch)?;
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let mut ops = 0u64;
    let start = Instant::now();
    for b in &batches {
        let batch = WriteBatch::from_data(b);
        ops += batch.len() as u64;
        db.write_opt(batch, &wo)?;
    }
    let apply_secs = start.elapsed().as_secs_f64();
    db.flush()?;
    let total_secs = start.elapsed().as_secs_f64();
    drop(db);
    fs::remove_dir_all(&a.scratch)?;
    Ok(json!({
        "records": batches.len(),
        "ops": ops,
        "record_bytes": bytes,
        "read_secs": read_secs,
        "apply_secs": apply_secs,
        "apply_and_flush_secs": total_secs,
        "records_per_sec": batches.len() as f64 / total_secs.max(1e-9),
        "mb_per_sec": bytes as f64 / 1e6 / total_secs.max(1e-9),
    }))
}

fn get_plan(a: GetPlanArgs) -> Result<Value> {
    let rt = Runtime::new()?;
    rt.block_on(async {
        let store = a.store.open(&a.from, false).await?;
        let repo = Repository::new(Arc::clone(&store));
        let plan_start = Instant::now();
        let state = repo.load().await?;
        let plan = state.history.plan(Target::Latest)?;
        let generation = state
            .generation
            .as_ref()
            .context("no generation")?
            .generation;
        let base = repo.read_base(generation, &plan.base).await?;
        let plan_secs = plan_start.elapsed().as_secs_f64();
        let mut objects: Vec<String> = base.files.iter().map(|f| f.key.clone()).collect();
        objects.extend(plan.segments.iter().map(|s| s.key.clone()));
        if a.dir.exists() {
            fs::remove_dir_all(&a.dir)?;
        }
        fs::create_dir_all(&a.dir)?;
        let sem = Arc::new(tokio::sync::Semaphore::new(a.parallelism.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for (i, key) in objects.iter().enumerate() {
            let store = Arc::clone(&store);
            let sem = Arc::clone(&sem);
            let key = key.clone();
            let path = a.dir.join(format!("{i:06}"));
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await?;
                let n = store.get_to_file(&key, &path).await?;
                anyhow::Ok(n)
            });
        }
        let mut bytes = 0u64;
        while let Some(r) = tasks.join_next().await {
            bytes += r??;
        }
        let secs = start.elapsed().as_secs_f64();
        fs::remove_dir_all(&a.dir)?;
        Ok(json!({
            "objects": objects.len(),
            "bytes": bytes,
            "plan_secs": plan_secs,
            "download_secs": secs,
            "mb_per_sec": bytes as f64 / 1e6 / secs.max(1e-9),
            "parallelism": a.parallelism,
        }))
    })
}

fn backup_create(a: BackupCreateArgs) -> Result<Value> {
    use rocksdb::backup::{BackupEngine, BackupEngineOptions};
    let mut opts = db_options();
    opts.create_if_missing(false);
    let db = DB::open(&opts, &a.db)?;
    let env = rocksdb::Env::new()?;
    let mut bopts = BackupEngineOptions::new(&a.backup_dir)?;
    bopts.set_max_background_operations(4);
    let mut engine = BackupEngine::open(&bopts, &env)?;
    let start = Instant::now();
    engine.create_new_backup_flush(&db, true)?;
    let secs = start.elapsed().as_secs_f64();
    drop(db);
    Ok(json!({
        "secs": secs,
        "bytes": dir_bytes(&a.backup_dir, &|_| true)?,
    }))
}

fn backup_restore(a: BackupRestoreArgs) -> Result<Value> {
    use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};
    if a.target.exists() {
        fs::remove_dir_all(&a.target)?;
    }
    let env = rocksdb::Env::new()?;
    let mut bopts = BackupEngineOptions::new(&a.backup_dir)?;
    bopts.set_max_background_operations(a.threads);
    let mut engine = BackupEngine::open(&bopts, &env)?;
    let start = Instant::now();
    engine.restore_from_latest_backup(&a.target, &a.target, &RestoreOptions::default())?;
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "secs": secs,
        "bytes": dir_bytes(&a.target, &|_| true)?,
        "threads": a.threads,
    }))
}

fn checkpoint(a: CheckpointArgs) -> Result<Value> {
    let mut opts = db_options();
    opts.create_if_missing(false);
    let db = DB::open(&opts, &a.db)?;
    let start = Instant::now();
    rocksdb::checkpoint::Checkpoint::new(&db)?.create_checkpoint(&a.target)?;
    let secs = start.elapsed().as_secs_f64();
    drop(db);
    Ok(json!({
        "secs": secs,
        "bytes": dir_bytes(&a.target, &|_| true)?,
    }))
}

fn put_file(a: FileArgs) -> Result<Value> {
    let rt = Runtime::new()?;
    rt.block_on(async {
        let store = a.store.open(&a.store_url, true).await?;
        let bytes = fs::metadata(&a.file)?.len();
        let start = Instant::now();
        store.put_file(&a.key, &a.file).await?;
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({"bytes": bytes, "secs": secs, "mb_per_sec": bytes as f64 / 1e6 / secs.max(1e-9)}))
    })
}

fn get_file(a: FileArgs) -> Result<Value> {
    let rt = Runtime::new()?;
    rt.block_on(async {
        let store = a.store.open(&a.store_url, false).await?;
        let start = Instant::now();
        let bytes = store.get_to_file(&a.key, &a.file).await?;
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({"bytes": bytes, "secs": secs, "mb_per_sec": bytes as f64 / 1e6 / secs.max(1e-9)}))
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match cli.command {
        Cmd::Archive(a) => archive(a)?,
        Cmd::Load(a) => load(a)?,
        Cmd::Write(a) => write(a)?,
        Cmd::Update(a) => update(a)?,
        Cmd::Open(a) => open(a)?,
        Cmd::ReplayCeiling(a) => replay_ceiling(a)?,
        Cmd::GetPlan(a) => get_plan(a)?,
        Cmd::BackupEngineCreate(a) => backup_create(a)?,
        Cmd::BackupEngineRestore(a) => backup_restore(a)?,
        Cmd::Checkpoint(a) => checkpoint(a)?,
        Cmd::PutFile(a) => put_file(a)?,
        Cmd::GetFile(a) => get_file(a)?,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
