//! `drill`: the recovery drill. It proves, on a schedule, that the repository can really
//! bring the database back, and measures how long that takes (the achieved RTO) and how much
//! would be lost (the RPO at that moment).
//!
//! A drill:
//!
//! 1. **plan**: reads the repository once, picks the target (the latest point by default; a
//!    uniformly random sequence number inside the restorable window, reproducible with its
//!    seed; a time; a sequence number) and measures the RPO from the same reading;
//! 2. restores into a fresh directory under the scratch directory with the restore command's
//!    own code: **fetch** (every object checked against its sha256), **replay**, **verify**
//!    (`--verify`, by default `full`: every re-created WAL file read back, then a read-only
//!    open whose latest sequence number must be the cutoff, every key of every column family
//!    read with block checksums on: a drill proves what RocksDB itself makes of the result);
//! 3. **check_command**: optionally runs the operator's own check against the restored
//!    database (see [`run_check`]);
//! 4. **cleanup**: removes its directory, unless asked to keep it.
//!
//! Every outcome is a [`DrillReport`]; [`run`] returns an error only when the drill could not
//! start (bad options, a scratch directory that does not exist).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;

use tidemark_manifest::plan::{PointCost, RestoreRates, Window};
use tidemark_manifest::repo::{RepoState, Repository};

use super::restore::{
    self, BaseReport, CutoffReport, Phase, PhaseLog, PhaseStatus, RestoreOptions, RestoreReport,
    SegmentsReport,
};
use super::{StoreOptions, Target, load, short_time};
use crate::progress::Progress;
use crate::verify::{Verification, VerificationStatus, VerifyMode};
use crate::{Cancel, RestoreError, human_bytes, human_duration, timespec};

/// The version of the report's layout; it changes only when a field changes meaning or goes
/// away (new fields may appear at any time).
pub const REPORT_VERSION: u32 = 1;

/// Default limit on the check command's run time.
pub const DEFAULT_CHECK_TIMEOUT_SECS: u64 = 3600;

/// How many bytes of the check command's standard output and error the report keeps (the
/// end of each).
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// The point a drill restores: a [`Target`], or a sequence number drawn uniformly from the
/// restorable window when the drill reads the repository ([`DrillTarget::resolve`]).
///
/// In JSON: `"random"`, or the target's own form (`"latest"`, `{"seq": 42}`, `{"time": ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillTarget {
    /// A sequence number drawn uniformly from the restorable window.
    Random,
    /// This target.
    #[serde(untagged)]
    Point(Target),
}

impl Default for DrillTarget {
    fn default() -> DrillTarget {
        DrillTarget::Point(Target::Latest)
    }
}

impl DrillTarget {
    /// Parses `random`, or a target as [`Target::parse`] reads it (`latest`, `seq:N`, or a
    /// time in any form `restore --time` accepts; relative times are taken from `now`, times
    /// without an offset are UTC).
    pub fn parse(input: &str, now: OffsetDateTime) -> Result<DrillTarget, RestoreError> {
        if input.trim().eq_ignore_ascii_case("random") {
            return Ok(DrillTarget::Random);
        }
        Target::parse(input, "latest, random, seq:N", |s| {
            timespec::parse_time(s, time::UtcOffset::UTC, now)
        })
        .map(DrillTarget::Point)
        .map_err(|e| RestoreError::Usage(format!("--target-point {e}")))
    }

    /// The target to restore: a random point is drawn from `window` with `seed`; `None`
    /// when it is random and nothing is restorable.
    pub fn resolve(self, window: &Window, seed: u64) -> Option<Target> {
        match self {
            DrillTarget::Point(target) => Some(target),
            DrillTarget::Random => random_point(window, seed).map(Target::Seq),
        }
    }

    fn describe(self) -> String {
        match self {
            DrillTarget::Random => "a random point in the restorable window".to_owned(),
            DrillTarget::Point(target) => target.describe(),
        }
    }
}

fn default_parallelism() -> usize {
    restore::DEFAULT_PARALLELISM
}

fn default_check_timeout() -> u64 {
    DEFAULT_CHECK_TIMEOUT_SECS
}

/// Options of `drill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillOptions {
    /// The point to restore.
    #[serde(default)]
    pub target: DrillTarget,
    /// An existing directory under which the drill creates its own fresh directory (default:
    /// the system's temporary directory).
    #[serde(default)]
    pub scratch: Option<PathBuf>,
    /// A shell command to run against the restored database (see [`run_check`]).
    #[serde(default)]
    pub check_command: Option<String>,
    /// The check command is killed after this many seconds, and the drill fails.
    #[serde(default = "default_check_timeout")]
    pub check_timeout_secs: u64,
    /// Variables of the drill's environment passed to the check command besides the few it
    /// always gets (see [`run_check`]).
    #[serde(default)]
    pub check_env: Vec<String>,
    /// Keep the drill's directory (and the restored database in it).
    #[serde(default)]
    pub keep: bool,
    /// The seed of a random target (default: a fresh one, recorded in the report).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Concurrent downloads.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// How the restored database is verified (default `full`: a drill proves the most).
    #[serde(default = "default_verify")]
    pub verify: VerifyMode,
    /// The rates the restore time is predicted with, to compare with the achieved one.
    #[serde(default)]
    pub rates: RestoreRates,
}

fn default_verify() -> VerifyMode {
    VerifyMode::Full
}

impl Default for DrillOptions {
    fn default() -> DrillOptions {
        DrillOptions {
            target: DrillTarget::default(),
            scratch: None,
            check_command: None,
            check_timeout_secs: DEFAULT_CHECK_TIMEOUT_SECS,
            check_env: Vec::new(),
            keep: false,
            seed: None,
            parallelism: restore::DEFAULT_PARALLELISM,
            verify: VerifyMode::Full,
            rates: RestoreRates::default(),
        }
    }
}

/// Whether the drill passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillStatus {
    Passed,
    Failed,
}

/// The phases of a drill, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillPhase {
    /// Reading the repository, choosing the target and the base, checking the scratch
    /// directory.
    Plan,
    /// Downloading the base and the segments, each checked against its sha256.
    Fetch,
    /// Re-creating the WAL files from the segment records.
    Replay,
    /// Opening the restored database read-only, checking its latest sequence number and
    /// reading every key, then putting it in place inside the drill's directory.
    Verify,
    /// The operator's check command.
    CheckCommand,
    /// Removing the drill's directory.
    Cleanup,
}

impl DrillPhase {
    const ALL: [DrillPhase; 6] = [
        DrillPhase::Plan,
        DrillPhase::Fetch,
        DrillPhase::Replay,
        DrillPhase::Verify,
        DrillPhase::CheckCommand,
        DrillPhase::Cleanup,
    ];

    fn name(self) -> &'static str {
        match self {
            DrillPhase::Plan => "plan",
            DrillPhase::Fetch => "fetch",
            DrillPhase::Replay => "replay",
            DrillPhase::Verify => "verify",
            DrillPhase::CheckCommand => "check_command",
            DrillPhase::Cleanup => "cleanup",
        }
    }

    fn of(phase: Phase) -> DrillPhase {
        match phase {
            Phase::Plan => DrillPhase::Plan,
            Phase::Fetch => DrillPhase::Fetch,
            Phase::Replay => DrillPhase::Replay,
            Phase::Verify | Phase::Commit => DrillPhase::Verify,
        }
    }
}

/// How a phase went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseOutcome {
    Passed,
    Failed,
    /// Not run: an earlier phase failed, there is no check command, or the directory is kept.
    Skipped,
}

/// One phase of the drill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseReport {
    pub phase: DrillPhase,
    pub status: PhaseOutcome,
    pub duration_ms: u64,
}

/// The point the drill restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetReport {
    /// As requested.
    pub requested: DrillTarget,
    /// The seed a random point was drawn with (give it to `--seed` to draw the same point
    /// from the same window).
    pub seed: Option<u64>,
    /// The target the restore was asked for (a random point as its sequence number).
    pub resolved: Option<Target>,
}

/// The recovery point objective at the time of the drill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RpoReport {
    /// When the repository was read.
    #[serde(with = "time::serde::rfc3339")]
    pub measured_at: OffsetDateTime,
    /// The newest archived record (the end of the newest segment, or of the newest base's
    /// own point when there are no segments).
    pub newest_archived_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub newest_archived_time: OffsetDateTime,
    /// `measured_at - newest_archived_time`: writes newer than this would have been lost had
    /// the source been lost when the drill started (an upper bound: while the database is
    /// idle it grows without anything being at risk).
    pub newest_archived_age_ms: i64,
    /// The newest point a restore can reach.
    pub latest_restorable_seq: Option<u64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub latest_restorable_time: Option<OffsetDateTime>,
    /// Where the restored database ends (absent if the restore failed).
    pub restored_seq: Option<u64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub restored_time: Option<OffsetDateTime>,
    /// How far the restored point is behind the newest archived record.
    pub restored_behind_newest_seqs: Option<u64>,
    pub restored_behind_newest_ms: Option<i64>,
}

/// What the restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreSummary {
    pub base: BaseReport,
    pub segments: SegmentsReport,
    pub download_bytes: u64,
    pub cutoff: Option<CutoffReport>,
    pub records_replayed: u64,
    pub wal_files: usize,
    pub wal_bytes: u64,
}

/// The check command's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub command: String,
    /// The exit status, if the command exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// It ran longer than the timeout and was killed.
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The last [`OUTPUT_TAIL_BYTES`] bytes of its standard output and error.
    pub stdout_tail: String,
    pub stderr_tail: String,
}

impl CheckReport {
    /// True when the command exited with status 0 in time.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

/// The drill's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScratchReport {
    /// The drill's own directory; the restored database is `<dir>/db`.
    pub dir: PathBuf,
    pub kept: bool,
    pub removed: bool,
}

/// Why the drill failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureReport {
    pub phase: DrillPhase,
    /// `failure`, `usage`, `not_restorable`, `verification_failed`, `verification_skipped`,
    /// `check_failed` or `cleanup_failed`.
    pub class: String,
    pub message: String,
    /// The repository object at fault (its key), when there is one.
    pub object: Option<String>,
}

/// The predicted restore time beside the achieved one, and the rates this drill achieved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictionReport {
    /// The rates of the prediction (`--download-rate`, `--replay-rate` or the defaults).
    pub rates: RestoreRates,
    /// The restored point's predicted restore time and what it is made of.
    pub predicted: PointCost,
    /// The achieved restore time: `total_ms` without the check command. `None` when the
    /// restore failed.
    pub achieved_ms: Option<u64>,
    /// `achieved_ms / predicted.predicted_ms`.
    pub achieved_over_predicted: Option<f64>,
    /// The rates this drill achieved: give them to `list` and the archiver
    /// (`restore_download_rate`, `restore_replay_rate`) to predict with this machine's.
    pub measured: Option<RestoreRates>,
}

/// What `drill` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub report_version: u32,
    pub status: DrillStatus,
    pub repository: String,
    pub tool_version: String,
    pub host: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    pub target: TargetReport,
    pub scratch: ScratchReport,
    /// Every phase, in order, whether it ran or not.
    pub phases: Vec<PhaseReport>,
    /// From the start of the drill to the end of the check command (or of the verification
    /// without one): the achieved recovery time. Cleanup is not included.
    pub total_ms: u64,
    pub rpo: Option<RpoReport>,
    pub restore: Option<RestoreSummary>,
    pub verification: Option<Verification>,
    pub check: Option<CheckReport>,
    /// The predicted restore time beside the achieved one; `null` if planning failed.
    pub prediction: Option<PredictionReport>,
    pub failure: Option<FailureReport>,
    pub warnings: Vec<String>,
}

impl DrillReport {
    /// True when the drill passed.
    pub fn passed(&self) -> bool {
        self.status == DrillStatus::Passed
    }

    /// Writes the report as JSON to `path`, atomically (a temporary file beside it, then a
    /// rename), so that a monitor never reads half a report.
    pub fn write(&self, path: &Path) -> Result<(), RestoreError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| {
            RestoreError::io(
                "cannot serialize the drill report for",
                path,
                std::io::Error::other(e),
            )
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "report".to_owned());
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let written = std::fs::write(&tmp, &json)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(RestoreError::io("cannot write the drill report", path, e));
        }
        Ok(())
    }

    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_outcome(&mut out);
        self.render_restore(&mut out);
        self.render_check(&mut out);
        self.render_timings(&mut out);
        self.render_scratch(&mut out);
        out
    }

    /// Passed or failed (where, why), and the target.
    fn render_outcome(&self, w: &mut String) {
        match (&self.status, &self.failure) {
            (DrillStatus::Passed, _) => {
                let _ = writeln!(w, "Recovery drill PASSED for {}", self.repository);
            }
            (DrillStatus::Failed, Some(f)) => {
                let _ = writeln!(
                    w,
                    "Recovery drill FAILED for {} in phase {}: {}",
                    self.repository,
                    f.phase.name(),
                    f.message
                );
                if let Some(o) = &f.object {
                    let _ = writeln!(w, "  object        {o}");
                }
            }
            (DrillStatus::Failed, None) => {
                let _ = writeln!(w, "Recovery drill FAILED for {}", self.repository);
            }
        }
        let mut target = self.target.requested.describe();
        if let (DrillTarget::Random, Some(Target::Seq(n))) =
            (self.target.requested, self.target.resolved)
        {
            target = format!(
                "{target}: sequence {n} (seed {})",
                self.target.seed.unwrap_or_default()
            );
        }
        let _ = writeln!(w, "  target        {target}");
    }

    /// What was restored and how it was verified.
    fn render_restore(&self, w: &mut String) {
        if let Some(r) = &self.restore {
            if let Some(c) = &r.cutoff {
                let _ = writeln!(
                    w,
                    "  restored      sequence {}, last record at {}, from base {} and {} \
                     segments ({} downloaded)",
                    c.seq,
                    short_time(c.time),
                    r.base.id,
                    r.segments.read,
                    human_bytes(r.download_bytes)
                );
            } else {
                let _ = writeln!(w, "  base          {}", r.base.id);
            }
        }
        if let Some(v) = &self.verification {
            v.render(w);
        }
    }

    /// How the check command ended (and, when it failed, the end of its output).
    fn render_check(&self, w: &mut String) {
        if let Some(c) = &self.check {
            let how = match (c.exit_code, c.signal, c.timed_out) {
                (_, _, true) => "timed out and was killed".to_owned(),
                (Some(code), _, _) => format!("exited with {code}"),
                (None, Some(sig), _) => format!("was killed by signal {sig}"),
                (None, None, _) => "ended without a status".to_owned(),
            };
            let _ = writeln!(
                w,
                "  check         `{}` {how} after {}",
                c.command,
                human_duration(Duration::from_millis(c.duration_ms))
            );
            if !c.passed() {
                for (name, tail) in [("stdout", &c.stdout_tail), ("stderr", &c.stderr_tail)] {
                    let lines: Vec<&str> = tail.lines().collect();
                    for line in &lines[lines.len().saturating_sub(5)..] {
                        let _ = writeln!(w, "                {name}: {line}");
                    }
                }
            }
        }
    }

    /// The phases, the achieved RTO and the RPO.
    fn render_timings(&self, w: &mut String) {
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|p| match p.status {
                PhaseOutcome::Passed => format!(
                    "{} {}",
                    p.phase.name(),
                    human_duration(Duration::from_millis(p.duration_ms))
                ),
                PhaseOutcome::Failed => format!(
                    "{} FAILED after {}",
                    p.phase.name(),
                    human_duration(Duration::from_millis(p.duration_ms))
                ),
                PhaseOutcome::Skipped => format!("{} skipped", p.phase.name()),
            })
            .collect();
        let _ = writeln!(w, "  phases        {}", phases.join(", "));
        let _ = writeln!(
            w,
            "  RTO           {} (plan to the end of the checks)",
            human_duration(Duration::from_millis(self.total_ms))
        );
        if let Some(p) = &self.prediction {
            let c = &p.predicted.cost;
            let achieved = match (p.achieved_ms, p.achieved_over_predicted) {
                (Some(a), Some(r)) => format!(
                    ", achieved {} ({r:.2}x)",
                    human_duration(Duration::from_millis(a))
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                w,
                "  predicted     {}{achieved}: base {}, {} of WAL, {} records to replay",
                human_duration(Duration::from_millis(p.predicted.predicted_ms)),
                human_bytes(c.base_bytes),
                human_bytes(c.wal_bytes),
                c.wal_records
            );
            if let Some(m) = &p.measured {
                let _ = writeln!(
                    w,
                    "  measured      {}/s download, {} WAL records/s replay (predicted with {}/s, {})",
                    human_bytes(m.download_bytes_per_sec),
                    m.replay_records_per_sec,
                    human_bytes(p.rates.download_bytes_per_sec),
                    p.rates.replay_records_per_sec
                );
            }
        }
        if let Some(r) = &self.rpo {
            let _ = writeln!(
                w,
                "  RPO           the newest archived record (sequence {}) was {} old at {}",
                r.newest_archived_seq,
                signed_duration(r.newest_archived_age_ms),
                short_time(r.measured_at)
            );
            if let (Some(seqs), Some(ms)) =
                (r.restored_behind_newest_seqs, r.restored_behind_newest_ms)
            {
                let _ = writeln!(
                    w,
                    "                the restored point is {seqs} sequences and {} behind it",
                    signed_duration(ms)
                );
            }
        }
    }

    /// Where the drill's directory is, and the warnings.
    fn render_scratch(&self, w: &mut String) {
        let s = &self.scratch;
        let _ = writeln!(
            w,
            "  scratch       {} {}",
            s.dir.display(),
            if s.kept {
                "(kept: remove it when done)"
            } else if s.removed {
                "(removed)"
            } else {
                "(NOT removed)"
            }
        );
        for warning in &self.warnings {
            let _ = writeln!(w, "WARNING: {warning}");
        }
    }
}

fn signed_duration(ms: i64) -> String {
    let d = human_duration(Duration::from_millis(ms.unsigned_abs()));
    if ms < 0 { format!("-{d}") } else { d }
}

/// A deterministic generator (SplitMix64): the same seed draws the same points on every
/// platform and in every version.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    fn below(&mut self, n: u128) -> u128 {
        let min = n.wrapping_neg() % n;
        loop {
            let x = (u128::from(self.next()) << 64) | u128::from(self.next());
            if x >= min {
                return x % n;
            }
        }
    }
}

/// A sequence number drawn uniformly from every sequence number the window holds, or `None`
/// when nothing is restorable.
pub fn random_point(window: &Window, seed: u64) -> Option<u64> {
    let total: u128 = window
        .ranges
        .iter()
        .map(|r| u128::from(r.last_seq - r.first_seq) + 1)
        .sum();
    if total == 0 {
        return None;
    }
    let mut pick = SplitMix64(seed).below(total);
    for r in &window.ranges {
        let len = u128::from(r.last_seq - r.first_seq) + 1;
        if pick < len {
            return Some(r.first_seq + pick as u64);
        }
        pick -= len;
    }
    None
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// `amount` per second over `took_ms` (a phase under a millisecond counts as one).
fn per_sec(amount: u64, took_ms: u64) -> u64 {
    (u128::from(amount) * 1000 / u128::from(took_ms.max(1))).min(u128::from(u64::MAX)) as u64
}

fn ms_between(later: OffsetDateTime, earlier: OffsetDateTime) -> i64 {
    (later - earlier).whole_milliseconds() as i64
}

/// The RPO the repository's state shows at `now`.
fn rpo(state: &RepoState, now: OffsetDateTime) -> Option<RpoReport> {
    let window = state.history.window();
    let latest = window.ranges.last();
    let newest = state
        .history
        .segments
        .last()
        .map(|s| (s.last_seq, s.last_time))
        .into_iter()
        .chain(latest.map(|r| (r.last_seq, r.last_time)))
        .max_by_key(|(seq, _)| *seq)?;
    Some(RpoReport {
        measured_at: now,
        newest_archived_seq: newest.0,
        newest_archived_time: newest.1,
        newest_archived_age_ms: ms_between(now, newest.1),
        latest_restorable_seq: latest.map(|r| r.last_seq),
        latest_restorable_time: latest.map(|r| r.last_time),
        restored_seq: None,
        restored_time: None,
        restored_behind_newest_seqs: None,
        restored_behind_newest_ms: None,
    })
}

/// Checks the options and creates the drill's fresh directory.
fn prepare(store: &StoreOptions, opts: &DrillOptions) -> Result<PathBuf, RestoreError> {
    if opts.parallelism == 0 {
        return Err(RestoreError::Usage(
            "--parallelism must be at least 1".to_owned(),
        ));
    }
    if opts.check_timeout_secs == 0 {
        return Err(RestoreError::Usage(
            "--check-timeout must be at least 1 second".to_owned(),
        ));
    }
    if opts
        .check_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(RestoreError::Usage(
            "--check-command is empty; give a command or leave it out".to_owned(),
        ));
    }
    tidemark_manifest::cli::check_env_names(&opts.check_env)
        .map_err(|e| RestoreError::Usage(format!("--check-env {e}")))?;
    store.url()?;
    store.s3()?;
    let parent = match &opts.scratch {
        Some(dir) => std::path::absolute(dir)
            .map_err(|e| RestoreError::io("cannot resolve --scratch", dir, e))?,
        None => std::env::temp_dir(),
    };
    if !parent.is_dir() {
        return Err(RestoreError::Usage(format!(
            "the scratch directory {} does not exist; create it or give another with --scratch",
            parent.display()
        )));
    }
    let now = OffsetDateTime::now_utc();
    let dir = parent.join(format!(
        "tidemark-drill-{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:08x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir)
        .map_err(|e| RestoreError::io("cannot create the drill directory", &dir, e))?;
    if let Err(e) = restore::check_target_outside_store(store, &dir.join("db")) {
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Runs a drill of the repository `store` names. Returns `Err` only when the drill could not
/// start (bad options, no scratch directory); every failure after that is in the report.
pub async fn run(
    store: &StoreOptions,
    opts: &DrillOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<DrillReport, RestoreError> {
    let dir = prepare(store, opts)?;
    let started = Instant::now();
    let started_at = OffsetDateTime::now_utc();
    let mut d = Drill {
        report: DrillReport {
            report_version: REPORT_VERSION,
            status: DrillStatus::Passed,
            repository: store.from.clone(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            host: host(),
            started_at,
            finished_at: started_at,
            target: TargetReport {
                requested: opts.target,
                seed: None,
                resolved: None,
            },
            scratch: ScratchReport {
                dir: dir.clone(),
                kept: opts.keep,
                removed: false,
            },
            phases: Vec::new(),
            total_ms: 0,
            rpo: None,
            restore: None,
            verification: None,
            check: None,
            prediction: None,
            failure: None,
            warnings: Vec::new(),
        },
        times: Vec::new(),
    };
    tracing::info!(
        "recovery drill of {}: restoring {} into {}",
        store.from,
        opts.target.describe(),
        dir.display()
    );
    d.restore_and_check(store, opts, &dir, progress, cancel)
        .await;
    d.report.total_ms = ms(started.elapsed());
    d.achieved();

    // Cleanup.
    if opts.keep {
        tracing::info!("keeping {}", dir.display());
    } else {
        let t = Instant::now();
        let removed = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || std::fs::remove_dir_all(&dir)
        })
        .await
        .expect("removing a directory does not panic");
        d.times
            .push((DrillPhase::Cleanup, t.elapsed(), removed.is_ok()));
        match removed {
            Ok(()) => d.report.scratch.removed = true,
            Err(e) => d.fail(
                DrillPhase::Cleanup,
                "cleanup_failed",
                format!("cannot remove {}: {e}; remove it by hand", dir.display()),
                None,
            ),
        }
    }
    d.report.phases = d.phases();
    d.report.finished_at = OffsetDateTime::now_utc();
    Ok(d.report)
}

/// What the drill's plan step read and chose.
struct Planned {
    repo: Repository,
    state: RepoState,
    /// The target to restore (a random one already drawn).
    target: Target,
    /// How long the drill's own planning took.
    took: Duration,
}

/// A drill in progress.
struct Drill {
    report: DrillReport,
    /// Phases the drill itself timed: (phase, duration, passed).
    times: Vec<(DrillPhase, Duration, bool)>,
}

impl Drill {
    /// Records the first failure; later ones become warnings.
    fn fail(&mut self, phase: DrillPhase, class: &str, message: String, object: Option<String>) {
        tracing::error!("drill failed in phase {}: {message}", phase.name());
        if self.report.failure.is_some() {
            self.report.warnings.push(message);
            return;
        }
        self.report.status = DrillStatus::Failed;
        self.report.failure = Some(FailureReport {
            phase,
            class: class.to_owned(),
            message,
            object,
        });
    }

    fn fail_with(&mut self, phase: DrillPhase, e: &RestoreError) {
        self.fail(phase, e.class().name(), e.to_string(), e.object());
    }

    /// plan → fetch → replay → verify → check_command. Each step records its phases, and
    /// its failure, in the report; the first failure ends the drill (cleanup still runs).
    async fn restore_and_check(
        &mut self,
        store: &StoreOptions,
        opts: &DrillOptions,
        dir: &Path,
        progress: &Progress,
        cancel: &Cancel,
    ) {
        let Some(planned) = self.plan(store, opts).await else {
            return;
        };
        let Some(report) = self.restore(&planned, opts, dir, progress, cancel).await else {
            return;
        };
        let Some(verified) = self.require_verification(&report, opts) else {
            return;
        };
        if let Some(command) = &opts.check_command {
            self.check(command, &report, opts, verified, cancel).await;
        }
    }

    /// Plan: one reading of the repository for the target, the RPO and the restore. A random
    /// target is drawn here, from that reading's window, with its seed in the report.
    async fn plan(&mut self, store: &StoreOptions, opts: &DrillOptions) -> Option<Planned> {
        let plan_started = Instant::now();
        let state = match async {
            let repo = store.open().await?;
            let state = load(&repo).await?;
            Ok::<_, RestoreError>((repo, state))
        }
        .await
        {
            Ok(s) => s,
            Err(e) => {
                self.times
                    .push((DrillPhase::Plan, plan_started.elapsed(), false));
                self.fail_with(DrillPhase::Plan, &e);
                return None;
            }
        };
        let (repo, state) = state;
        self.report.repository = repo.location();
        self.report.rpo = rpo(&state, OffsetDateTime::now_utc());
        let seed = match opts.target {
            DrillTarget::Random => {
                let seed = opts.seed.unwrap_or_else(rand::random);
                self.report.target.seed = Some(seed);
                seed
            }
            DrillTarget::Point(_) => 0,
        };
        let window = state.history.window();
        let Some(target) = opts.target.resolve(&window, seed) else {
            self.times
                .push((DrillPhase::Plan, plan_started.elapsed(), false));
            self.fail(
                DrillPhase::Plan,
                crate::ErrorClass::NotRestorable.name(),
                format!("nothing is restorable: {window}"),
                None,
            );
            return None;
        };
        self.report.target.resolved = Some(target);
        if let Ok(predicted) = state.history.cost_of(target, &opts.rates) {
            self.report.prediction = Some(PredictionReport {
                rates: opts.rates,
                predicted,
                achieved_ms: None,
                achieved_over_predicted: None,
                measured: None,
            });
        }
        Some(Planned {
            repo,
            state,
            target,
            took: plan_started.elapsed(),
        })
    }

    /// Fetch, replay, verify: the restore command's own path, verified as `opts.verify` says, into
    /// `dir/db`. Its phases join the drill's (its plan phase adds to the drill's own).
    async fn restore(
        &mut self,
        planned: &Planned,
        opts: &DrillOptions,
        dir: &Path,
        progress: &Progress,
        cancel: &Cancel,
    ) -> Option<RestoreReport> {
        let log = PhaseLog::new();
        let ropts = RestoreOptions {
            target_dir: dir.join("db"),
            target: planned.target,
            dry_run: false,
            force: false,
            parallelism: opts.parallelism,
            verify: opts.verify,
            standby: false,
        };
        let (repo, state) = (&planned.repo, Some(&planned.state));
        let result = restore::run_logged(repo, state, &ropts, progress, cancel, &log).await;
        for entry in log.entries() {
            let phase = DrillPhase::of(entry.phase);
            let mut took = Duration::from_millis(entry.duration_ms);
            if phase == DrillPhase::Plan {
                took += planned.took;
            }
            let passed = entry.status == PhaseStatus::Passed;
            match self.times.iter_mut().find(|(p, _, _)| *p == phase) {
                Some(t) => {
                    t.1 += took;
                    t.2 &= passed;
                }
                None => self.times.push((phase, took, passed)),
            }
        }
        match result {
            Ok(report) => {
                self.record_restore(&report);
                Some(report)
            }
            Err(e) => {
                let phase = log.failed().map_or(DrillPhase::Plan, DrillPhase::of);
                if !self.times.iter().any(|(p, _, _)| *p == phase) {
                    self.times.push((phase, Duration::ZERO, false));
                }
                self.fail_with(phase, &e);
                None
            }
        }
    }

    /// A drill must verify: the restore tool's own verification passed (`Some(true)`), or
    /// it could not be done and the check command is there to do it (`Some(false)`); without
    /// either the drill fails (`None`).
    fn require_verification(
        &mut self,
        report: &RestoreReport,
        opts: &DrillOptions,
    ) -> Option<bool> {
        let skipped = report
            .verification
            .as_ref()
            .is_none_or(|v| v.status != VerificationStatus::Passed);
        if skipped && opts.check_command.is_none() {
            let reason = report
                .verification
                .as_ref()
                .and_then(|v| v.reason.clone())
                .unwrap_or_else(|| "no verification was done".to_owned());
            self.mark(DrillPhase::Verify, false);
            self.fail(
                DrillPhase::Verify,
                "verification_skipped",
                format!(
                    "the restored database could not be verified: {reason}; a drill must \
                     verify: give a --check-command that opens it with the application's \
                     options"
                ),
                None,
            );
            return None;
        }
        Some(!skipped)
    }

    /// The operator's check: `command` runs against the restored database (see
    /// [`run_check`]); anything but a zero exit within the timeout fails the drill.
    async fn check(
        &mut self,
        command: &str,
        report: &RestoreReport,
        opts: &DrillOptions,
        verified: bool,
        cancel: &Cancel,
    ) {
        let cutoff = report.cutoff.as_ref();
        let env = CheckEnv {
            db: report.target_dir.clone(),
            seq: cutoff.map(|c| c.seq),
            time: cutoff.map(|c| c.time),
            repository: self.report.repository.clone(),
            pass: opts.check_env.clone(),
        };
        let t = Instant::now();
        let timeout = Duration::from_secs(opts.check_timeout_secs);
        let check = match run_check(command, &env, timeout, cancel).await {
            Ok(check) => check,
            Err(e) => {
                self.times
                    .push((DrillPhase::CheckCommand, t.elapsed(), false));
                self.fail_with(DrillPhase::CheckCommand, &e);
                return;
            }
        };
        let passed = check.passed();
        self.times
            .push((DrillPhase::CheckCommand, t.elapsed(), passed));
        if !passed {
            let why = if check.timed_out {
                format!("timed out after {}", human_duration(timeout))
            } else if let Some(code) = check.exit_code {
                format!("exited with status {code}")
            } else {
                format!("was killed by signal {}", check.signal.unwrap_or_default())
            };
            let last = check
                .stderr_tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!(" (last line of its standard error: {l})"))
                .unwrap_or_default();
            self.fail(
                DrillPhase::CheckCommand,
                "check_failed",
                format!("the check command {why}{last}"),
                None,
            );
        } else if !verified {
            self.report.warnings.push(
                "the restore tool could not verify the restored database itself; only the \
                 check command did"
                    .to_owned(),
            );
        }
        self.report.check = Some(check);
    }

    fn record_restore(&mut self, r: &RestoreReport) {
        let replay = r.replay.as_ref();
        self.report.restore = Some(RestoreSummary {
            base: r.base.clone(),
            segments: r.segments.clone(),
            download_bytes: r.download_bytes,
            cutoff: r.cutoff.clone(),
            records_replayed: replay.map_or(0, |p| p.records_replayed),
            wal_files: replay.map_or(0, |p| p.wal_files.len()),
            wal_bytes: replay.map_or(0, |p| p.wal_bytes),
        });
        self.report.verification = r.verification.clone();
        self.report.warnings.extend(r.warnings.iter().cloned());
        if let (Some(rpo), Some(c)) = (self.report.rpo.as_mut(), r.cutoff.as_ref()) {
            rpo.restored_seq = Some(c.seq);
            rpo.restored_time = Some(c.time);
            rpo.restored_behind_newest_seqs = Some(rpo.newest_archived_seq.saturating_sub(c.seq));
            rpo.restored_behind_newest_ms = Some(ms_between(rpo.newest_archived_time, c.time));
        }
    }

    /// Fills in the achieved restore time and the rates measured, once the restore and the
    /// check command are done.
    fn achieved(&mut self) {
        let phase_ms = |phase: DrillPhase| {
            self.times
                .iter()
                .find(|(p, _, _)| *p == phase)
                .map_or(0, |t| ms(t.1))
        };
        let achieved = self
            .report
            .total_ms
            .saturating_sub(phase_ms(DrillPhase::CheckCommand));
        // The prediction adds its terms, so the rates are measured the same way: the
        // downloads (the WAL is re-created while it downloads, so their time holds that
        // too), then everything after them, the replay by RocksDB (`full`) above all.
        let fetch_ms = phase_ms(DrillPhase::Fetch);
        let after_ms = achieved.saturating_sub(fetch_ms + phase_ms(DrillPhase::Plan));
        let measured = self.report.restore.as_ref().map(|r| RestoreRates {
            download_bytes_per_sec: per_sec(r.download_bytes, fetch_ms),
            replay_records_per_sec: per_sec(r.records_replayed, after_ms),
        });
        let restored = self
            .report
            .restore
            .as_ref()
            .is_some_and(|r| r.cutoff.is_some());
        if let Some(p) = self.report.prediction.as_mut()
            && restored
        {
            p.achieved_ms = Some(achieved);
            p.achieved_over_predicted =
                Some(achieved as f64 / p.predicted.predicted_ms.max(1) as f64);
            p.measured = measured;
        }
    }

    fn mark(&mut self, phase: DrillPhase, passed: bool) {
        if let Some(t) = self.times.iter_mut().find(|(p, _, _)| *p == phase) {
            t.2 = passed;
        }
    }

    /// Every phase, in order; those that did not run are skipped.
    fn phases(&self) -> Vec<PhaseReport> {
        DrillPhase::ALL
            .iter()
            .map(
                |&phase| match self.times.iter().find(|(p, _, _)| *p == phase) {
                    Some(&(_, took, passed)) => PhaseReport {
                        phase,
                        status: if passed {
                            PhaseOutcome::Passed
                        } else {
                            PhaseOutcome::Failed
                        },
                        duration_ms: ms(took),
                    },
                    None => PhaseReport {
                        phase,
                        status: PhaseOutcome::Skipped,
                        duration_ms: 0,
                    },
                },
            )
            .collect()
    }
}

/// What the check command is told about the restored database.
#[derive(Debug, Clone)]
pub struct CheckEnv {
    pub db: PathBuf,
    pub seq: Option<u64>,
    pub time: Option<OffsetDateTime>,
    pub repository: String,
    /// Variables of the drill's own environment passed on by name (`--check-env`).
    pub pass: Vec<String>,
}

/// The end of a stream: the last `limit` bytes read.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8], limit: usize) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * limit {
            let cut = self.bytes.len() - limit;
            self.bytes.drain(..cut);
        }
    }

    fn text(&self, limit: usize) -> String {
        let start = self.bytes.len().saturating_sub(limit);
        let text = String::from_utf8_lossy(&self.bytes[start..]).into_owned();
        // A cut inside a multi-byte character shows as one replacement character at the
        // start; drop it.
        match text.strip_prefix('\u{FFFD}') {
            Some(rest) if start > 0 => rest.to_owned(),
            _ => text,
        }
    }
}

fn collect(
    stream: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> (Arc<Mutex<Tail>>, Option<tokio::task::JoinHandle<()>>) {
    let tail = Arc::new(Mutex::new(Tail::default()));
    let handle = stream.map(|mut s| {
        let tail = Arc::clone(&tail);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(&buf[..n], OUTPUT_TAIL_BYTES);
            }
        })
    });
    (tail, handle)
}

/// Runs the check command against the restored database: `/bin/sh -c COMMAND`, so that it
/// may be a pipeline or use variables, with
///
/// - `TIDEMARK_DRILL_DB`: the restored database's directory (also `$1`);
/// - `TIDEMARK_DRILL_SEQ`: its last sequence number;
/// - `TIDEMARK_DRILL_TIME`: the time of its last record (RFC 3339);
/// - `TIDEMARK_DRILL_REPOSITORY`: the repository it came from;
///
/// and of the drill's own environment only `PATH`, `HOME`, the locale and the few others of
/// [`child_env`](tidemark_manifest::cli::child_env), plus the variables `env.pass` names:
/// never the encryption key or the store's credentials unless named there. Standard input
/// from `/dev/null`, in its own process group. After `timeout`, or when the drill is
/// cancelled, the whole group is killed. Exit status 0 passes.
pub async fn run_check(
    command: &str,
    env: &CheckEnv,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<CheckReport, RestoreError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .arg("tidemark-drill-check")
        .arg(&env.db)
        .env_clear()
        .envs(tidemark_manifest::cli::child_env(&env.pass))
        .env("TIDEMARK_DRILL_DB", &env.db)
        .env("TIDEMARK_DRILL_REPOSITORY", &env.repository)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(seq) = env.seq {
        cmd.env("TIDEMARK_DRILL_SEQ", seq.to_string());
    }
    if let Some(t) = env.time
        && let Ok(s) = t.format(&time::format_description::well_known::Rfc3339)
    {
        cmd.env("TIDEMARK_DRILL_TIME", s);
    }
    tracing::info!("running the check command: {command}");
    let mut child = cmd
        .spawn()
        .map_err(|e| RestoreError::io("cannot start the check command with", "/bin/sh", e))?;
    let pid = child.id();
    let (out, out_task) = collect(child.stdout.take());
    let (err, err_task) = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                let expired = Instant::now() >= deadline;
                if expired || cancel.is_cancelled() {
                    timed_out = expired;
                    kill_group(pid);
                    let _ = child.start_kill();
                    break child.wait().await;
                }
            }
        }
    };
    let status =
        status.map_err(|e| RestoreError::io("cannot wait for the check command", "/bin/sh", e))?;
    // Processes the command left behind may hold its output open: wait a little, then stop
    // reading.
    for task in [out_task, err_task].into_iter().flatten() {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let text = |t: &Arc<Mutex<Tail>>| {
        t.lock()
            .unwrap_or_else(|p| p.into_inner())
            .text(OUTPUT_TAIL_BYTES)
    };
    use std::os::unix::process::ExitStatusExt;
    let report = CheckReport {
        command: command.to_owned(),
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        duration_ms: ms(started.elapsed()),
        stdout_tail: text(&out),
        stderr_tail: text(&err),
    };
    cancel.check()?;
    Ok(report)
}

/// Kills the process group `pid` leads (the check command and everything it started).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .env_clear()
            .envs(tidemark_manifest::cli::child_env(&[]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::model::time_from_micros;
    use tidemark_manifest::plan::WindowRange;

    fn window(ranges: &[(u64, u64)]) -> Window {
        let t = time_from_micros(1_800_000_000_000_000);
        Window {
            ranges: ranges
                .iter()
                .map(|&(first_seq, last_seq)| WindowRange {
                    first_seq,
                    last_seq,
                    first_time: t,
                    last_time: t,
                })
                .collect(),
        }
    }

    #[test]
    fn target_points_parse() {
        let now = time::macros::datetime!(2026-11-23 13:30:00 UTC);
        assert_eq!(
            DrillTarget::parse("latest", now).unwrap(),
            DrillTarget::Point(Target::Latest)
        );
        assert_eq!(
            DrillTarget::parse("RANDOM", now).unwrap(),
            DrillTarget::Random
        );
        assert_eq!(
            DrillTarget::parse("seq:1234", now).unwrap(),
            DrillTarget::Point(Target::Seq(1234))
        );
        assert_eq!(
            DrillTarget::parse("2026-11-23T12:00:00Z", now).unwrap(),
            DrillTarget::Point(Target::Time(
                time::macros::datetime!(2026-11-23 12:00:00 UTC)
            ))
        );
        assert_eq!(
            DrillTarget::parse("15m ago", now).unwrap(),
            DrillTarget::Point(Target::Time(
                time::macros::datetime!(2026-11-23 13:15:00 UTC)
            ))
        );
        for bad in ["seq:", "seq:x", "yesterday", ""] {
            let e = DrillTarget::parse(bad, now).unwrap_err();
            assert_eq!(e.class(), crate::ErrorClass::Usage, "{bad}: {e}");
        }
        let json = serde_json::to_string(&DrillTarget::Point(Target::Seq(5))).unwrap();
        assert_eq!(json, r#"{"seq":5}"#);
        assert_eq!(
            serde_json::to_string(&DrillTarget::Random).unwrap(),
            r#""random""#
        );
        assert_eq!(
            serde_json::to_string(&DrillTarget::default()).unwrap(),
            r#""latest""#
        );
        let at = time::macros::datetime!(2026-11-23 12:00:00.25 UTC);
        for t in [
            DrillTarget::Random,
            DrillTarget::Point(Target::Latest),
            DrillTarget::Point(Target::Seq(5)),
            DrillTarget::Point(Target::Time(at)),
        ] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(
                serde_json::from_str::<DrillTarget>(&json).unwrap(),
                t,
                "{json}"
            );
        }
        assert!(serde_json::from_str::<DrillTarget>(r#""sometime""#).is_err());
        assert_eq!(
            DrillTarget::parse("seq:x", now).unwrap_err().to_string(),
            r#"--target-point "seq:x": "x" is not a sequence number (seq:N, e.g. seq:1234)"#
        );
        let e = DrillTarget::parse("yesterday", now)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(r#"--target-point "yesterday" is not latest, random, seq:N or a time: "#),
            "{e}"
        );
    }

    #[test]
    fn random_points_are_uniform_reproducible_and_inside_the_window() {
        let w = window(&[(100, 199), (500, 599)]);
        assert_eq!(random_point(&w, 7), random_point(&w, 7));
        let mut low = 0;
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..4000 {
            let p = random_point(&w, seed).unwrap();
            assert!(
                (100..=199).contains(&p) || (500..=599).contains(&p),
                "{p} is outside the window"
            );
            if p < 200 {
                low += 1;
            }
            seen.insert(p);
        }
        // Two ranges of equal size: about half the draws in each; most points drawn.
        assert!(
            (1700..2300).contains(&low),
            "{low} of 4000 in the first range"
        );
        assert!(seen.len() > 190, "only {} distinct points", seen.len());
        assert_eq!(random_point(&window(&[]), 1), None);
        assert_eq!(random_point(&window(&[(42, 42)]), 99), Some(42));
        // Different seeds draw different points (not always the same one).
        let distinct: std::collections::BTreeSet<u64> =
            (0..10).map(|s| random_point(&w, s).unwrap()).collect();
        assert!(distinct.len() > 5, "{distinct:?}");
    }

    #[test]
    fn options_have_defaults_in_json() {
        let o: DrillOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, DrillOptions::default());
        let o: DrillOptions =
            serde_json::from_str(r#"{"target":"random","seed":3,"keep":true}"#).unwrap();
        assert_eq!(o.target, DrillTarget::Random);
        assert_eq!(o.seed, Some(3));
        assert!(o.keep);
        assert_eq!(o.check_timeout_secs, DEFAULT_CHECK_TIMEOUT_SECS);
    }

    #[test]
    fn output_tails_keep_the_end() {
        let mut t = Tail::default();
        for i in 0..10_000u32 {
            t.push(format!("line {i}\n").as_bytes(), 64);
        }
        let text = t.text(64);
        assert!(text.len() <= 64, "{text:?}");
        assert!(text.ends_with("line 9999\n"), "{text:?}");
        let mut t = Tail::default();
        t.push("ééééé".as_bytes(), 64);
        assert_eq!(t.text(5), "éé");
    }

    #[tokio::test]
    async fn the_check_command_sees_the_database_and_its_status_counts() {
        let dir = tempfile::tempdir().unwrap();
        let env = CheckEnv {
            db: dir.path().to_path_buf(),
            seq: Some(42),
            time: Some(time::macros::datetime!(2026-11-23 13:30:00 UTC)),
            repository: "file:///r".into(),
            pass: Vec::new(),
        };
        let ok = run_check(
            r#"test "$TIDEMARK_DRILL_DB" = "$1" && echo "seq=$TIDEMARK_DRILL_SEQ at $TIDEMARK_DRILL_TIME in $TIDEMARK_DRILL_DB""#,
            &env,
            Duration::from_secs(30),
            &Cancel::new(),
        )
        .await
        .unwrap();
        assert!(ok.passed(), "{ok:?}");
        assert_eq!(
            ok.stdout_tail,
            format!(
                "seq=42 at 2026-11-23T13:30:00Z in {}\n",
                dir.path().display()
            )
        );
        let bad = run_check(
            "echo broken >&2; exit 3",
            &env,
            Duration::from_secs(30),
            &Cancel::new(),
        )
        .await
        .unwrap();
        assert!(!bad.passed());
        assert_eq!(bad.exit_code, Some(3));
        assert_eq!(bad.stderr_tail, "broken\n");

        // A command that outlives the timeout is killed, with whatever it started.
        let t = Instant::now();
        let slow = run_check(
            "sleep 30 & sleep 30",
            &env,
            Duration::from_millis(300),
            &Cancel::new(),
        )
        .await
        .unwrap();
        assert!(slow.timed_out && !slow.passed(), "{slow:?}");
        assert_eq!(slow.signal, Some(9));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
