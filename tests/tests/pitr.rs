//! Point-in-time recovery end to end, through the programs a user runs. The load generator
//! writes to a database (flushes, compactions, large values, merges, range deletes) while
//! `tidemark-archiver run` archives it beside it, taking several base backups during the
//! writes and being killed with SIGKILL and restarted at random moments (while idle, while
//! taking a base backup, while starting up). At the end it catches up and stops cleanly. Then
//! `tidemark-restore restore --json` restores MANY targets from that one repository: random
//! sequence numbers and times inside the window, the window's first and last points, the
//! points just before, at and after every base's earliest point, the first and last sequence
//! of some segments, the latest point, and points just outside the window. Every restored
//! database is opened with the generator's options and compared, key by key, with the state
//! the generator's oracle says the database had at the cutoff the restore reports.
//!
//! What must hold for each target:
//! - sequence `N` inside the window: the cutoff is the largest batch boundary `<= N`;
//! - time `T` with a time marker on every batch: the cutoff is exactly the last batch
//!   written at or before `T`;
//! - time `T` with observed times (no markers, or only some): nothing written after `T` is
//!   restored, and every batch the archiver had read by `T - 2 s` is (a batch written while
//!   no archiver ran, or shortly before one was killed, is read when the next one resumes);
//! - a target outside the window is refused with exit code 3, and nothing is written;
//! - the restored database ends at the reported cutoff and equals the oracle's state there.
//!
//! Three variants: exact times on the S3 server, observed times on the S3 server, and a
//! smaller one with a marker on every tenth batch (mixed precision) on a local directory.
//! They run one at a time (timing matters to the archiver's observed times).
//!
//! Knobs (scripts/torture.sh sets them for the long run):
//! - `TIDEMARK_PITR_TARGETS`: random targets over all variants (default 60; the S3 variants
//!   get 50% and 30%, the local one 20%); fixed targets come on top;
//! - `TIDEMARK_PITR_KILLS`: archiver kills over all variants, shared the same way (default 10);
//! - `TIDEMARK_PITR_SECONDS`: seconds of writes of each S3 variant (default 10; local: 60%);
//! - `TIDEMARK_PITR_SEED`: seed of the workloads and the choices (default: random, printed);
//! - `TIDEMARK_PITR_SUMMARY`: a JSON file each variant appends its results to.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tidemark_manifest::model::{micros_from_time, time_from_micros};
use tidemark_manifest::repo::RepoState;
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{Proc, TestStore, bin, wait_archived, wait_for_database};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, Replay, State, read_db_state_and_seq};

/// How late after its commit the archiver may observe a batch while it runs.
const OBSERVATION_SLACK_US: i64 = 2_000_000;
/// A batch written this long before a kill may not have been shipped: the next archiver
/// reads it again, and observes it again.
const UNSHIPPED_BEFORE_KILL_US: i64 = 3_000_000;
/// Load generator batches per second.
const WRITE_RATE: &str = "400";
/// After this many failed targets, the rest are not tried.
const MAX_MISMATCHES: usize = 20;

/// The variants run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// Knobs and variants

#[derive(Debug, Clone)]
struct Knobs {
    targets: usize,
    kills: usize,
    seconds: f64,
    seed: u64,
    summary: Option<PathBuf>,
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?} is not valid: {e}")),
        _ => Ok(default),
    }
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let knobs = Knobs {
            targets: env_or("TIDEMARK_PITR_TARGETS", 60)?,
            kills: env_or("TIDEMARK_PITR_KILLS", 10)?,
            seconds: env_or("TIDEMARK_PITR_SECONDS", 10.0)?,
            seed: env_or("TIDEMARK_PITR_SEED", rand::random::<u64>() >> 1)?,
            summary: std::env::var_os("TIDEMARK_PITR_SUMMARY").map(PathBuf::from),
        };
        ensure!(
            knobs.seconds >= 2.0 && knobs.seconds.is_finite(),
            "TIDEMARK_PITR_SECONDS must be at least 2"
        );
        Ok(knobs)
    }
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    /// A time marker every this many batches (1: every batch, exact times; 0: none).
    marker_every: u64,
    /// The repository's `time_precision` this gives.
    precision: &'static str,
    /// Share of the random targets and of the kills.
    share: f64,
    /// Share of `TIDEMARK_PITR_SECONDS` this variant writes for.
    seconds_share: f64,
    /// Offset of this variant's seed.
    seed_offset: u64,
}

impl Variant {
    fn exact(&self) -> bool {
        self.marker_every == 1
    }
}

const S3_EXACT: Variant = Variant {
    name: "s3-exact-times",
    marker_every: 1,
    precision: "marker",
    share: 0.5,
    seconds_share: 1.0,
    seed_offset: 1,
};

const S3_OBSERVED: Variant = Variant {
    name: "s3-observed-times",
    marker_every: 0,
    precision: "observed",
    share: 0.3,
    seconds_share: 1.0,
    seed_offset: 2,
};

const LOCAL_MIXED: Variant = Variant {
    name: "local-mixed-times",
    marker_every: 10,
    precision: "mixed",
    share: 0.2,
    seconds_share: 0.6,
    seed_offset: 3,
};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn rfc3339(micros: i64) -> String {
    tidemark_manifest::plan::fmt_time(time_from_micros(micros))
}

// ---------------------------------------------------------------------------------------
// Writing and archiving

/// When archivers resumed reading the WAL and when they were killed (unix micros), to know
/// by when each batch was read at the latest.
#[derive(Debug, Default)]
struct Observation {
    resumed: Vec<i64>,
    killed: Vec<i64>,
}

impl Observation {
    /// For each kill, the moment from which a batch may not have been shipped, and when the
    /// next archiver resumed (when it read such a batch again).
    fn unsafe_periods(&self) -> Vec<(i64, i64)> {
        self.killed
            .iter()
            .map(|&k| {
                let next = self.resumed.iter().copied().filter(|&r| r > k).min();
                (k - UNSHIPPED_BEFORE_KILL_US, next.unwrap_or(i64::MAX))
            })
            .collect()
    }

    /// The latest moment the archiver read a batch written at `t` (before the slack), given
    /// [`Observation::unsafe_periods`].
    fn read_by(&self, t: i64, unsafe_periods: &[(i64, i64)]) -> i64 {
        // Nothing is read before the first archiver resumes.
        let mut read = t.max(self.resumed.iter().copied().min().unwrap_or(i64::MAX));
        for &(from, resumed) in unsafe_periods {
            if from <= t && t <= resumed {
                read = read.max(resumed);
            }
        }
        read
    }
}

#[derive(Debug, Default)]
struct KillStats {
    total: usize,
    during_start: usize,
    during_base: usize,
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the archiver says it resumed reading the WAL; returns when that was seen.
fn wait_resumed(arch: &mut Proc) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if read_log(&arch.log).contains("resuming") {
            return Ok(now_us());
        }
        ensure!(
            arch.running(),
            "the archiver exited before it resumed; its log:\n{}",
            arch.log_tail()
        );
        ensure!(
            Instant::now() < deadline,
            "the archiver did not resume within 60 s; its log:\n{}",
            arch.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes for `seconds` while archivers run beside the writer and `kills` of them are
/// killed at random moments; then the last archiver catches up and stops cleanly.
async fn write_and_archive(
    s: &Setup,
    v: &Variant,
    kills: usize,
    seconds: f64,
    rng: &mut StdRng,
) -> Result<(Observation, KillStats)> {
    let seed = rng.random_range(1..1_000_000u64);
    let mut writer = s.loadgen(&[
        "--duration".into(),
        format!("{seconds}"),
        "--rate".into(),
        WRITE_RATE.into(),
        "--seed".into(),
        seed.to_string(),
        "--marker-every".into(),
        v.marker_every.to_string(),
        "--flush-every".into(),
        "700".into(),
    ])?;
    let db = s.db();
    wait_for_database(&db)?;
    let mut obs = Observation::default();
    let mut stats = KillStats::default();
    // Spread the kills over the writes; each archiver lives at least 300 ms.
    let spacing_ms = ((seconds * 1000.0 / kills.max(1) as f64) as u64).max(1200);
    for i in 0..kills {
        let mut arch = s.archiver(&format!("archiver-{i}.log"), &[])?;
        let roll = rng.random_range(0..100u32);
        let during_start = roll < 15;
        if during_start {
            // Taking the lease, loading the repository, finding where to resume.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        } else {
            obs.resumed.push(wait_resumed(&mut arch)?);
            if roll < 40 {
                // While a base backup is being taken (the first one starts at once, the
                // next ones every 2 s).
                let before = read_log(&arch.log).matches("taking a base backup").count();
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline
                    && read_log(&arch.log).matches("taking a base backup").count() <= before
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
            } else {
                std::thread::sleep(Duration::from_millis(
                    rng.random_range(300..2 * spacing_ms - 300),
                ));
            }
        }
        let at = now_us();
        arch.kill_running()?;
        obs.killed.push(at);
        let log = read_log(&arch.log);
        if during_start {
            stats.during_start += 1;
            if log.contains("resuming") {
                // It resumed before the kill: at `at` at the latest.
                obs.resumed.push(at);
            }
        }
        if log.matches("taking a base backup").count() > log.matches("base backup taken").count() {
            stats.during_base += 1;
        }
        stats.total += 1;
    }
    let mut arch = s.archiver("archiver-final.log", &[])?;
    obs.resumed.push(wait_resumed(&mut arch)?);
    let status = writer.wait_timeout(Duration::from_secs_f64(seconds + 120.0))?;
    ensure!(
        status.success(),
        "the load generator failed:\n{}",
        writer.log_tail()
    );
    let oracle = s.oracle()?;
    wait_archived(
        &s.store,
        oracle.last_seq(),
        &mut arch,
        Duration::from_secs(180),
    )
    .await?;
    arch.stop(Duration::from_secs(60))?;
    let repo = s.store.open().await?;
    ensure!(
        repo.read_lease()
            .await?
            .is_some_and(|(l, _)| l.released_at.is_some()),
        "a clean shutdown must release the lease"
    );
    Ok((obs, stats))
}

// ---------------------------------------------------------------------------------------
// What the oracle says

/// Per batch (in oracle order): last sequence and write time; and, for observed times, by
/// when each batch was read at the latest.
struct Book<'a> {
    oracle: &'a Oracle,
    ends: Vec<u64>,
    times: Vec<i64>,
    /// (read by + slack, the largest last sequence of batches due by then), sorted.
    due: Vec<(i64, u64)>,
}

impl<'a> Book<'a> {
    fn new(oracle: &'a Oracle, obs: &Observation) -> Book<'a> {
        let ends: Vec<u64> = oracle.batches().iter().map(|b| b.last_seq()).collect();
        let times: Vec<i64> = oracle.batches().iter().map(|b| b.unix_micros).collect();
        let periods = obs.unsafe_periods();
        let mut due: Vec<(i64, u64)> = times
            .iter()
            .zip(&ends)
            .map(|(&t, &e)| {
                (
                    obs.read_by(t, &periods)
                        .saturating_add(OBSERVATION_SLACK_US),
                    e,
                )
            })
            .collect();
        due.sort_unstable();
        let mut max = 0;
        for d in &mut due {
            max = max.max(d.1);
            d.1 = max;
        }
        Book {
            oracle,
            ends,
            times,
            due,
        }
    }

    /// The largest batch boundary `<= n` (0 if none).
    fn boundary_at_or_below(&self, n: u64) -> u64 {
        match self.ends.partition_point(|&e| e <= n) {
            0 => 0,
            i => self.ends[i - 1],
        }
    }

    /// Write time of the batch ending at `seq`.
    fn time_of(&self, seq: u64) -> Option<i64> {
        self.ends.binary_search(&seq).ok().map(|i| self.times[i])
    }

    /// Write time of the batch starting at `seq`.
    fn time_of_batch_from(&self, seq: u64) -> Option<i64> {
        let i = self.ends.partition_point(|&e| e < seq);
        (self.oracle.batches().get(i)?.first_seq == seq).then(|| self.times[i])
    }

    /// The largest last sequence of a batch the archiver must have read by `t`.
    fn must_include(&self, t: i64) -> u64 {
        match self.due.partition_point(|d| d.0 <= t) {
            0 => 0,
            i => self.due[i - 1].1,
        }
    }
}

/// The oracle's states, replayed forward (from the start again when asked to go back). Two
/// replays: one for exact cutoffs, one for the cutoffs of observed times, which are
/// restored in time order and so move forward too, but not in step with the exact ones.
struct States<'a> {
    oracle: &'a Oracle,
    replays: [Replay<'a>; 2],
    rewinds: usize,
}

impl<'a> States<'a> {
    fn new(oracle: &'a Oracle) -> Result<States<'a>> {
        Ok(States {
            oracle,
            replays: [oracle.replay()?, oracle.replay()?],
            rewinds: 0,
        })
    }

    fn at(&mut self, replay: usize, seq: u64) -> Result<&State> {
        if seq < self.replays[replay].seq() {
            self.replays[replay] = self.oracle.replay()?;
            self.rewinds += 1;
        }
        self.replays[replay].advance_to(seq)
    }
}

// ---------------------------------------------------------------------------------------
// Targets

#[derive(Debug, Clone, Copy)]
enum Goal {
    Seq(u64),
    /// Unix micros.
    Time(i64),
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Exactly this cutoff.
    Exact(u64),
    /// A cutoff in this range (observed times).
    Between(u64, u64),
    /// Exit code 3, nothing written.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RandomSeq,
    RandomTime,
    Fixed,
}

#[derive(Debug, Clone)]
struct Target {
    goal: Goal,
    kind: Kind,
    label: String,
    expect: Expect,
}

impl Target {
    fn describe(&self) -> String {
        let goal = match self.goal {
            Goal::Seq(n) => format!("--seq {n}"),
            Goal::Time(t) => format!("--time {}", rfc3339(t)),
            Goal::Latest => "--latest".to_owned(),
        };
        format!("{goal} ({})", self.label)
    }

    /// The order targets are restored in: by expected cutoff (for observed times: by its
    /// upper bound, then by time), so that the oracle replays forward.
    fn order(&self) -> (u64, i64) {
        let time = match self.goal {
            Goal::Time(t) => t,
            _ => 0,
        };
        match self.expect {
            Expect::Exact(c) | Expect::Between(_, c) => (c, time),
            Expect::Refused => (0, time),
        }
    }
}

/// The restorable window, from the final repository.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    first_seq: u64,
    last_seq: u64,
    first_time: i64,
    last_time: i64,
    /// Time of the newest archived record: later times are refused.
    newest_time: i64,
}

fn expectation(goal: Goal, w: &Bounds, book: &Book, exact: bool) -> Expect {
    match goal {
        Goal::Latest => Expect::Exact(w.last_seq),
        Goal::Seq(n) if n < w.first_seq || n > w.last_seq => Expect::Refused,
        Goal::Seq(n) => Expect::Exact(book.boundary_at_or_below(n)),
        Goal::Time(t) if t < w.first_time || t > w.newest_time => Expect::Refused,
        Goal::Time(t) if exact => Expect::Exact(book.oracle.seq_at_time(t)),
        Goal::Time(t) => Expect::Between(
            book.must_include(t).max(w.first_seq),
            book.oracle.seq_at_time(t),
        ),
    }
}

fn plan_targets(
    state: &RepoState,
    w: &Bounds,
    book: &Book,
    exact: bool,
    random: usize,
    rng: &mut StdRng,
) -> Vec<Target> {
    let mut goals: Vec<(Goal, Kind, String)> = Vec::new();
    let mut fixed = |goal: Goal, label: String| goals.push((goal, Kind::Fixed, label));
    fixed(Goal::Latest, "the latest point".into());
    fixed(Goal::Seq(w.first_seq), "the window's first sequence".into());
    fixed(Goal::Seq(w.first_seq - 1), "just before the window".into());
    fixed(Goal::Seq(w.last_seq), "the window's last sequence".into());
    fixed(Goal::Seq(w.last_seq + 1), "just after the window".into());
    fixed(Goal::Time(w.first_time), "the window's first time".into());
    fixed(
        Goal::Time(w.first_time - 1),
        "1 µs before the window".into(),
    );
    fixed(Goal::Time(w.last_time), "the window's last time".into());
    fixed(Goal::Time(w.newest_time), "the newest record's time".into());
    fixed(
        Goal::Time(w.newest_time + 1),
        "1 µs after the newest record".into(),
    );
    for (i, b) in state.history.bases.iter().enumerate() {
        let e = b.earliest_seq;
        let et = micros_from_time(b.earliest_time);
        fixed(Goal::Seq(e - 1), format!("base {i} earliest_seq - 1"));
        fixed(Goal::Seq(e), format!("base {i} earliest_seq"));
        fixed(Goal::Seq(e + 1), format!("base {i} earliest_seq + 1"));
        fixed(Goal::Time(et - 1), format!("base {i} earliest_time - 1 µs"));
        fixed(Goal::Time(et), format!("base {i} earliest_time"));
        fixed(Goal::Time(et + 1), format!("base {i} earliest_time + 1 µs"));
    }
    let segments = &state.history.segments;
    let mut picked: Vec<usize> = vec![0, segments.len() - 1];
    for _ in 0..4 {
        picked.push(rng.random_range(0..segments.len()));
    }
    picked.sort_unstable();
    picked.dedup();
    for i in picked {
        let seg = &segments[i];
        fixed(Goal::Seq(seg.first_seq), format!("segment {i} first_seq"));
        fixed(Goal::Seq(seg.last_seq), format!("segment {i} last_seq"));
        fixed(
            Goal::Time(micros_from_time(seg.last_time)),
            format!("segment {i} last_time"),
        );
    }

    let random_seq = random / 2;
    for _ in 0..random_seq {
        let n = rng.random_range(w.first_seq..=w.last_seq);
        goals.push((Goal::Seq(n), Kind::RandomSeq, "random sequence".into()));
    }
    // Batches inside the window, for times right at or just before a batch's write time.
    let first_in_window = book.ends.partition_point(|&e| e < w.first_seq);
    for _ in random_seq..random {
        let roll = rng.random_range(0..4u32);
        let (t, label) = if roll < 2 || first_in_window >= book.times.len() {
            (rng.random_range(w.first_time..=w.last_time), "random time")
        } else {
            let b = rng.random_range(first_in_window..book.times.len());
            if roll == 2 {
                (book.times[b], "random batch's write time")
            } else {
                (book.times[b] - 1, "1 µs before a random batch's write time")
            }
        };
        goals.push((Goal::Time(t), Kind::RandomTime, label.into()));
    }
    let mut targets: Vec<Target> = goals
        .into_iter()
        .map(|(goal, kind, label)| Target {
            goal,
            kind,
            label,
            expect: expectation(goal, w, book, exact),
        })
        .collect();
    targets.sort_by_key(Target::order);
    targets
}

// ---------------------------------------------------------------------------------------
// Restoring and checking

struct Checker<'a> {
    store: &'a TestStore,
    restores: PathBuf,
    book: &'a Book<'a>,
    states: States<'a>,
    precision: &'static str,
    restore_ms: Vec<u64>,
    /// Observed times: the longest a batch left out of a time restore had been written
    /// before the target time (how late the archiver observed it).
    max_lag_us: i64,
    counter: usize,
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Checker<'_> {
    /// Restores `t` with `tidemark-restore` and checks the result; `Ok(true)` if the
    /// target was refused as expected.
    fn check(&mut self, t: &Target) -> Result<bool> {
        self.counter += 1;
        let dir = self.restores.join(format!("r{}", self.counter));
        let mut cmd = Command::new(bin("tidemark-restore")?);
        cmd.args(["--quiet", "restore", "--json", "--from", &self.store.url])
            .arg("--target")
            .arg(&dir)
            .envs(self.store.env.iter().map(|(k, v)| (k, v)));
        match t.goal {
            Goal::Seq(n) => cmd.args(["--seq", &n.to_string()]),
            Goal::Time(us) => cmd.args(["--time", &rfc3339(us)]),
            Goal::Latest => cmd.arg("--latest"),
        };
        let started = Instant::now();
        let out = cmd.output().context("running tidemark-restore")?;
        self.restore_ms.push(started.elapsed().as_millis() as u64);
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);

        if t.expect == Expect::Refused {
            ensure!(
                code == 3,
                "expected a refusal (exit 3), got exit {code}; stdout:\n{}\nstderr:\n{}",
                tail(&String::from_utf8_lossy(&out.stdout)),
                tail(&stderr)
            );
            ensure!(!dir.exists(), "a refused restore created {}", dir.display());
            let leftovers = std::fs::read_dir(&self.restores)?.count();
            ensure!(
                leftovers == 0,
                "a refused restore left {leftovers} entries in {}",
                self.restores.display()
            );
            return Ok(true);
        }
        ensure!(
            code == 0,
            "tidemark-restore failed with exit {code}:\n{}",
            tail(&stderr)
        );
        let report: Value =
            serde_json::from_slice(&out.stdout).context("parsing the restore's JSON report")?;
        let c = report["cutoff"]["seq"]
            .as_u64()
            .context("the report has no cutoff.seq")?;
        match t.expect {
            Expect::Exact(e) => ensure!(
                c == e,
                "restored to sequence {c}, expected {e} (written at {:?} and {:?})",
                self.book.time_of(c).map(rfc3339),
                self.book.time_of(e).map(rfc3339)
            ),
            Expect::Between(lo, hi) => {
                ensure!(
                    lo <= c && c <= hi,
                    "restored to sequence {c} (written at {:?}), expected {lo}..={hi}: at \
                     least every batch read by the target time minus the observation slack, \
                     nothing written after it",
                    self.book.time_of(c).map(rfc3339)
                );
                if let (Goal::Time(target), Some(next)) =
                    (t.goal, self.book.time_of_batch_from(c + 1))
                {
                    self.max_lag_us = self.max_lag_us.max(target - next);
                }
            }
            Expect::Refused => unreachable!("handled above"),
        }
        ensure!(
            self.book.oracle.is_boundary(c),
            "cutoff {c} is not a batch boundary"
        );
        ensure!(
            report["time_precision"] == self.precision,
            "the report says time precision {}, expected {}",
            report["time_precision"],
            self.precision
        );
        let verification = &report["verification"];
        ensure!(
            verification["status"] == "passed"
                && verification["ends_at_sequence"] == c
                && verification["steps"]["wal"]["last_seq"] == c
                && verification["steps"]["base"]["status"] == "passed",
            "the restore's own verification: {verification}"
        );
        let rounded = &report["cutoff"]["rounded_down"];
        if let Goal::Seq(n) = t.goal {
            if n == c {
                ensure!(rounded.is_null(), "nothing to round down, got {rounded}");
            } else {
                ensure!(
                    rounded["requested"] == n && rounded["restored_to"] == c,
                    "sequence {n} restored to {c}, but the report's rounded_down is {rounded}"
                );
            }
        }

        let (actual, db_seq) = read_db_state_and_seq(&dir)?;
        ensure!(
            db_seq == c,
            "the restored database is at sequence {db_seq}, the report says {c}"
        );
        let replay = usize::from(matches!(t.expect, Expect::Between(..)));
        let expected = self.states.at(replay, c)?;
        if let Some(d) = expected.diff(&actual) {
            bail!("the restored database differs from the written state at sequence {c}: {d}");
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------
// The repository's shape

/// Checks the archived history against the oracle and returns the window.
fn check_history(state: &RepoState, book: &Book, v: &Variant) -> Result<Bounds> {
    let h = &state.history;
    let oracle = book.oracle;
    ensure!(h.gaps.is_empty(), "unexpected gaps: {:?}", h.gaps);
    ensure!(
        h.bases.len() >= 2,
        "expected several bases, found {}",
        h.bases.len()
    );
    let g = state
        .generation
        .as_ref()
        .context("no manifest generation")?;
    ensure!(
        serde_json::to_value(g.time_precision)? == v.precision,
        "time precision {:?}, expected {}",
        g.time_precision,
        v.precision
    );
    let window = h.window();
    ensure!(
        window.ranges.len() == 1,
        "the window must be one range: {window}"
    );
    let r = &window.ranges[0];
    ensure!(
        r.last_seq == oracle.last_seq(),
        "the window ends at {}, the writer at {}",
        r.last_seq,
        oracle.last_seq()
    );
    for s in &h.segments {
        ensure!(
            oracle.is_boundary(s.first_seq - 1) && oracle.is_boundary(s.last_seq),
            "segment {} ({}..={}) does not hold whole batches",
            s.key,
            s.first_seq,
            s.last_seq
        );
        let (first, last) = (
            micros_from_time(s.first_time),
            micros_from_time(s.last_time),
        );
        let written_first = book
            .time_of_batch_from(s.first_seq)
            .context("segment start")?;
        let written_last = book.time_of(s.last_seq).context("segment end")?;
        // Record times are never earlier than the write; with a marker on every batch they
        // are the write time.
        for (what, recorded, written) in [
            ("first", first, written_first),
            ("last", last, written_last),
        ] {
            ensure!(
                recorded >= written && (!v.exact() || recorded == written),
                "segment {}: {what} record time {} for a batch written at {}",
                s.key,
                rfc3339(recorded),
                rfc3339(written)
            );
        }
    }
    for b in &h.bases {
        ensure!(
            oracle.is_boundary(b.earliest_seq) && oracle.is_boundary(b.replay_from_seq - 1),
            "base {}: earliest_seq {} and replay_from_seq {} must sit at batch boundaries",
            b.id,
            b.earliest_seq,
            b.replay_from_seq
        );
        let et = micros_from_time(b.earliest_time);
        let written = book.time_of(b.earliest_seq).context("base earliest_seq")?;
        ensure!(
            et >= written && (!v.exact() || et == written),
            "base {}: earliest_time {} for sequence {} written at {}",
            b.id,
            rfc3339(et),
            b.earliest_seq,
            rfc3339(written)
        );
    }
    let newest_time = micros_from_time(h.segments.last().context("no segments")?.last_time);
    Ok(Bounds {
        first_seq: r.first_seq,
        last_seq: r.last_seq,
        first_time: micros_from_time(r.first_time),
        last_time: micros_from_time(r.last_time),
        newest_time,
    })
}

// ---------------------------------------------------------------------------------------
// A whole run

fn share(total: usize, part: f64) -> usize {
    ((total as f64 * part).round() as usize).max(1)
}

fn append_summary(path: &Path, run: Value) -> Result<()> {
    let mut doc: Value = match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?
        }
        Err(_) => json!({ "runs": [] }),
    };
    doc["runs"]
        .as_array_mut()
        .context("the summary has no runs array")?
        .push(run);
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

async fn pitr(v: Variant, store: TestStore) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let knobs = Knobs::from_env()?;
    let started = Instant::now();
    let seed = knobs.seed.wrapping_add(v.seed_offset);
    let mut rng = StdRng::seed_from_u64(seed);
    let kills = share(knobs.kills, v.share);
    let random = share(knobs.targets, v.share).max(2);
    let seconds = knobs.seconds * v.seconds_share;
    eprintln!(
        "pitr[{}]: {} — {seconds:.1} s of writes, {kills} kills, {random} random targets \
         (TIDEMARK_PITR_SEED={} repeats the choices)",
        v.name, store.describe, knobs.seed
    );
    let s = Setup::new(store)?.base_interval("2s");

    let (obs, kill_stats) = write_and_archive(&s, &v, kills, seconds, &mut rng).await?;
    let archived_at = Instant::now();
    let oracle = s.oracle()?;
    let book = Book::new(&oracle, &obs);
    let state = s
        .store
        .open()
        .await?
        .load()
        .await
        .context("the repository must load without problems")?;
    let bounds = check_history(&state, &book, &v)?;
    let targets = plan_targets(&state, &bounds, &book, v.exact(), random, &mut rng);
    eprintln!(
        "pitr[{}]: {} batches, sequences 1..={}, window {}..={} ({} .. {}), {} bases, {} \
         segments; restoring {} targets",
        v.name,
        oracle.batches().len(),
        oracle.last_seq(),
        bounds.first_seq,
        bounds.last_seq,
        rfc3339(bounds.first_time),
        rfc3339(bounds.last_time),
        state.history.bases.len(),
        state.history.segments.len(),
        targets.len()
    );

    let restores = s.path("restores");
    std::fs::create_dir_all(&restores)?;
    let mut checker = Checker {
        store: &s.store,
        restores,
        book: &book,
        states: States::new(&oracle)?,
        precision: v.precision,
        restore_ms: Vec::new(),
        max_lag_us: 0,
        counter: 0,
    };
    let mut mismatches: Vec<String> = Vec::new();
    let (mut checked, mut refused, mut random_seq, mut random_time, mut fixed) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for (i, t) in targets.iter().enumerate() {
        if mismatches.len() >= MAX_MISMATCHES {
            break;
        }
        if i > 0 && i % 200 == 0 {
            eprintln!(
                "pitr[{}]: {i}/{} targets restored, {} mismatches",
                v.name,
                targets.len(),
                mismatches.len()
            );
        }
        match checker.check(t) {
            Ok(was_refused) => {
                checked += 1;
                refused += usize::from(was_refused);
                match t.kind {
                    Kind::RandomSeq => random_seq += 1,
                    Kind::RandomTime => random_time += 1,
                    Kind::Fixed => fixed += 1,
                }
            }
            Err(e) => {
                let m = format!("{}: {e:#}", t.describe());
                eprintln!("pitr[{}]: MISMATCH {m}", v.name);
                mismatches.push(m);
            }
        }
    }
    let ms = &checker.restore_ms;
    let mean_ms = ms.iter().sum::<u64>() / ms.len().max(1) as u64;
    let max_ms = ms.iter().copied().max().unwrap_or(0);
    let duration = started.elapsed().as_secs_f64();
    eprintln!(
        "pitr[{}]: {checked}/{} targets as expected ({random_seq} random sequences, \
         {random_time} random times, {fixed} fixed points, {refused} of them refused as \
         outside the window), {} mismatches; {} kills ({} while starting, {} during a base \
         backup); restores {mean_ms} ms on average, {max_ms} ms at most; oracle rewinds {}; \
         restoring took {:.1} s, the whole run {duration:.1} s{}",
        v.name,
        targets.len(),
        mismatches.len(),
        kill_stats.total,
        kill_stats.during_start,
        kill_stats.during_base,
        checker.states.rewinds,
        archived_at.elapsed().as_secs_f64(),
        if v.exact() {
            String::new()
        } else {
            format!(
                "; the latest batch a time restore left out was written {} ms before the \
                 target time",
                checker.max_lag_us / 1000
            )
        }
    );
    if let Some(path) = &knobs.summary {
        append_summary(
            path,
            json!({
                "variant": v.name,
                "store": if s.store.local_root().is_some() { "local" } else { "s3" },
                "time_precision": v.precision,
                "seed": knobs.seed,
                "write_seconds": seconds,
                "batches": oracle.batches().len(),
                "last_seq": oracle.last_seq(),
                "bases": state.history.bases.len(),
                "segments": state.history.segments.len(),
                "kills": {
                    "total": kill_stats.total,
                    "during_start": kill_stats.during_start,
                    "during_base_backup": kill_stats.during_base,
                },
                "targets": {
                    "planned": targets.len(),
                    "checked": checked,
                    "random_seq": random_seq,
                    "random_time": random_time,
                    "fixed": fixed,
                    "refused_as_expected": refused,
                },
                "mismatches": mismatches.len(),
                "mismatch_examples": mismatches.iter().take(5).collect::<Vec<_>>(),
                "restore_ms": { "mean": mean_ms, "max": max_ms },
                "observed_lag_ms_max": (!v.exact()).then_some(checker.max_lag_us / 1000),
                "duration_s": duration,
            }),
        )?;
    }
    ensure!(
        mismatches.is_empty(),
        "pitr[{}]: {} of {} targets failed (seed {}); the first:\n{}",
        v.name,
        mismatches.len(),
        targets.len(),
        knobs.seed,
        mismatches
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_every_point_with_exact_times_from_s3() -> Result<()> {
    with_s3("pitr-exact", |store| pitr(S3_EXACT, store)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_every_point_with_observed_times_from_s3() -> Result<()> {
    with_s3("pitr-observed", |store| pitr(S3_OBSERVED, store)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_every_point_with_mixed_times_from_a_local_directory() -> Result<()> {
    pitr(LOCAL_MIXED, TestStore::local()?).await
}
