//! `tidemark-restore`: list, restore and verify a Tidemark repository, and run recovery
//! drills.
//!
//! Exit codes: [`tidemark_manifest::exit`] (also in `--help`). `drill` exits with 0, 5, 2
//! (bad usage: the drill did not start) or 1 (it could not run at all, e.g. its scratch
//! directory cannot be created or its report cannot be written).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};
use time::{OffsetDateTime, UtcOffset};
use tracing_subscriber::EnvFilter;

use tidemark_manifest::exit;
use tidemark_manifest::plan::RestoreRates;
use tidemark_manifest::repo::ReadFrom;
use tidemark_manifest::store::Rate;
use tidemark_restore::commands::drill::{self, DrillOptions, DrillTarget};
use tidemark_restore::commands::follow::{self, Controls, FollowOptions};
use tidemark_restore::commands::list::{self};
use tidemark_restore::commands::restore::{self, RestoreOptions};
use tidemark_restore::commands::verify::{self, VerifyOptions, VerifyScope};
use tidemark_restore::commands::{StoreOptions, Target};
use tidemark_restore::progress::Progress;
use tidemark_restore::timespec;
use tidemark_restore::verify::VerifyMode;
use tidemark_restore::{Cancel, RestoreError};

const DRILL_HELP: &str = "The check command is run as /bin/sh -c CMD with the restored database's directory in TIDEMARK_DRILL_DB (and as $1), its last sequence number in TIDEMARK_DRILL_SEQ, the time of its last record in TIDEMARK_DRILL_TIME and the repository URL in TIDEMARK_DRILL_REPOSITORY. Of the drill's own environment it gets only PATH, HOME, USER, LOGNAME, SHELL, LANG, LANGUAGE, LC_*, TZ, TMPDIR and TERM, and the variables named with --check-env: never the encryption key or the store's credentials unless named. Exit status 0 passes; anything else, or running past --check-timeout, fails the drill.

The drill exits with 0 (passed), 5 (ran and failed), 2 (bad usage: nothing attempted, no report written) or 1 (it could not run at all).

Every option can also come from the environment (TIDEMARK_FROM, TIDEMARK_DRILL_TARGET, TIDEMARK_DRILL_SCRATCH, TIDEMARK_DRILL_CHECK_COMMAND, TIDEMARK_DRILL_CHECK_TIMEOUT, TIDEMARK_DRILL_CHECK_ENV, TIDEMARK_DRILL_REPORT, TIDEMARK_DRILL_SEED, TIDEMARK_DRILL_VERIFY, and the store's TIDEMARK_ENDPOINT_URL, TIDEMARK_REGION, TIDEMARK_PATH_STYLE), as in the systemd unit scripts/systemd/tidemark-drill@.service.";

const TIME_HELP: &str = "\
Restore every record committed at or before TIME. Accepted: RFC 3339 with an offset \
(2026-11-23T13:30:00Z, 2026-11-23T15:30:00+02:00), a date and time without an offset \
(\"2026-11-23 13:30:00\", read as UTC unless --tz is given), or a relative time (\"15m ago\", \
\"2h ago\", \"90s ago\", \"1h30m ago\")";

/// Restores a RocksDB database from a Tidemark repository to a point in time, lists what a
/// repository can restore, and verifies repositories.
#[derive(Debug, Parser)]
#[command(
    name = "tidemark-restore",
    version,
    after_help = exit::help(exit::Program::Restore)
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on standard error, no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
}

/// The point to restore to: exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    #[arg(long, value_name = "TIME", help = TIME_HELP)]
    time: Option<String>,
    /// Restore up to sequence number SEQ (rounded down to a whole batch; the tool says so).
    #[arg(long, value_name = "SEQ")]
    seq: Option<u64>,
    /// Restore the newest archived point.
    #[arg(long)]
    latest: bool,
}

/// What to verify: one of these, or by default what the latest point needs.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
struct ScopeArgs {
    #[arg(
        long,
        value_name = "TIME",
        help = "Verify what a restore to TIME needs (same forms as restore --time)"
    )]
    time: Option<String>,
    /// Verify what a restore to sequence SEQ needs.
    #[arg(long, value_name = "SEQ")]
    seq: Option<u64>,
    /// Verify what a restore to the latest point needs (the default).
    #[arg(long)]
    latest: bool,
    /// Verify every base and segment, and look for unreachable segments.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the bases, the restorable window, gaps and a timeline.
    List(ListArgs),
    /// Restore the database into a new directory.
    Restore(RestoreArgs),
    /// Check that the repository holds intact everything a restore needs.
    Verify(VerifyArgs),
    /// Run a recovery drill: restore into a scratch directory, verified (full by default), run
    /// a check command against the result, measure the RTO and the RPO, write a report,
    /// clean up.
    #[command(after_help = DRILL_HELP)]
    Drill(DrillArgs),
    /// Keep a warm standby: restore the latest point into a new directory, then append what
    /// the archive receives, each poll interval, until stopped (SIGTERM, Ctrl-C: it stays a
    /// standby, and following resumes) or promoted (SIGUSR1, or --promote: the application
    /// may open it read-write).
    #[command(after_help = FOLLOW_HELP)]
    Follow(FollowArgs),
}

const FOLLOW_HELP: &str = "Stop with SIGTERM or Ctrl-C: the target stays a standby and `follow` started again on it resumes where it stopped. Promote a running follower with SIGUSR1: it stops after the segment it is applying (at a batch boundary; a re-base for disk space or a new column family under way is abandoned, one past a gap is finished first), leaves a database the application opens read-write, prints the point reached and exits 0. Promote a stopped standby with `follow --promote` (catches up with the archive first) or `follow --promote --no-catch-up` (at once, without the store).

Never open the target read-write while it is a standby (a RocksDB secondary instance may read it). A batch writing a column family the standby does not have (created on the source after the standby's base) is not applied: the standby waits at the point before it, with a warning every 5 s and the metric tidemark_standby_waiting_for_base at 1, until the archiver's next base knows the column family, then re-bases on it by itself (SIGUSR1 meanwhile promotes it where it waits; --promote promotes there and names the batch not applied). The follower stops with a non-zero exit code when it cannot follow further: 3 for a gap with no base past it to re-base on, 4 for an object that does not verify, 2 for a target that is not this repository's standby.";

// `follow`'s flags.
#[derive(Debug, Args)]
struct FollowArgs {
    #[command(flatten)]
    store: StoreOptions,
    /// The standby's directory: missing or empty to start one, or a standby to resume.
    #[arg(long, value_name = "DIR")]
    target: PathBuf,
    /// How long to wait between looks for new segments when the standby is current.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    poll_interval: humantime::Duration,
    /// Concurrent downloads of the first restore.
    #[arg(long, value_name = "N", default_value_t = restore::DEFAULT_PARALLELISM)]
    parallelism: usize,
    /// How to check the first restore (as restore --verify).
    #[arg(long, value_enum, default_value_t = VerifyMode::Standard)]
    verify: VerifyMode,
    /// Apply what the archive holds now, then promote and exit.
    #[arg(long)]
    promote: bool,
    /// With --promote: promote at the point already applied, without reading the archive.
    #[arg(long, requires = "promote")]
    no_catch_up: bool,
    /// Print a JSON line per applied segment and one when following ends.
    #[arg(long)]
    json: bool,
    /// Serve Prometheus metrics (/metrics) and /health on HOST:PORT (port 0: any free
    /// port, logged as "metrics listening on ADDR").
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Re-base on a newer base (a fresh copy restored beside the standby and swapped in)
    /// when the WAL files in the standby exceed BYTES; default: twice the base's size, at
    /// least 256 MiB.
    #[arg(long, value_name = "BYTES")]
    max_wal_bytes: Option<u64>,
}

/// The rates restore times are predicted with (`list`, `drill`).
#[derive(Debug, Args)]
struct RateArgs {
    /// The rate a restore downloads at, for predicted restore times (e.g. 200MB/s; default
    /// 100MB/s, measured on a small 2-core machine; a drill's report gives yours).
    #[arg(long, value_name = "RATE", env = "TIDEMARK_RESTORE_DOWNLOAD_RATE")]
    download_rate: Option<Rate>,
    /// The WAL records per second a restore re-creates and RocksDB replays, for predicted
    /// restore times (default 250000; a drill's report gives yours).
    #[arg(long, value_name = "RECORDS_PER_SEC", env = "TIDEMARK_RESTORE_REPLAY_RATE", value_parser = clap::value_parser!(u64).range(1..))]
    replay_rate: Option<u64>,
}

impl RateArgs {
    fn rates(&self) -> RestoreRates {
        let d = RestoreRates::default();
        RestoreRates {
            download_bytes_per_sec: self
                .download_rate
                .map_or(d.download_bytes_per_sec, Rate::get),
            replay_records_per_sec: self.replay_rate.unwrap_or(d.replay_records_per_sec),
        }
    }
}

// `list`'s flags.
#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    store: StoreOptions,
    /// Print JSON for automation.
    #[arg(long)]
    json: bool,
    /// Timeline width in columns (default: the terminal's width).
    #[arg(long, value_name = "COLUMNS")]
    width: Option<usize>,
    #[command(flatten)]
    rates: RateArgs,
    /// Read the repository from manifest generation N instead of the newest intact one
    /// (segments written after it are still found by the tail walk).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
}

// `restore`'s flags.
#[derive(Debug, Args)]
struct RestoreArgs {
    #[command(flatten)]
    store: StoreOptions,
    /// The directory to restore into: missing or empty (see --force).
    #[arg(long, value_name = "DIR")]
    target: PathBuf,
    #[command(flatten)]
    point: TargetArgs,
    /// Fixed UTC offset for --time values without one: UTC, +02:00, -0530.
    /// Named zones such as Europe/Berlin are not supported.
    #[arg(long, value_name = "ZONE")]
    tz: Option<String>,
    /// Show what would be restored and downloaded; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restore over a non-empty target: its contents are moved to <DIR>.old-<time>,
    /// never deleted.
    #[arg(long)]
    force: bool,
    /// Concurrent downloads.
    #[arg(long, value_name = "N", default_value_t = restore::DEFAULT_PARALLELISM)]
    parallelism: usize,
    /// How to check the result (every object is checked against its sha256 at every
    /// level): quick (open the base alone with key estimates; read every re-created WAL file
    /// back: checksums, batches, record chain, ends at the cutoff), standard (quick, and
    /// read every key of the base's tables with block checksums on), full (the WAL check,
    /// then open the whole result read-only, replaying the WAL in memory, and count every
    /// key) or off.
    #[arg(long, value_enum, default_value_t = restore::DEFAULT_VERIFY)]
    verify: VerifyMode,
    /// Print a JSON summary on standard output.
    #[arg(long)]
    json: bool,
    /// Read the repository from manifest generation N instead of the newest intact one
    /// (segments written after it are still found by the tail walk).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
}

// `verify`'s flags.
#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreOptions,
    #[command(flatten)]
    scope: ScopeArgs,
    /// Fixed UTC offset for --time values without one.
    #[arg(long, value_name = "ZONE")]
    tz: Option<String>,
    /// Download everything: check every sha256, frame and record (the default on a
    /// local directory; on S3 the default checks existence and sizes only, and exits
    /// with 6 when nothing else is wrong).
    #[arg(long)]
    deep: bool,
    /// Concurrent downloads.
    #[arg(long, value_name = "N", default_value_t = restore::DEFAULT_PARALLELISM)]
    parallelism: usize,
    /// Print JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Read the repository from manifest generation N instead of the newest intact one
    /// (segments written after it are still found by the tail walk).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
}

// `drill`'s flags.
#[derive(Debug, Args)]
struct DrillArgs {
    #[command(flatten)]
    store: StoreOptions,
    /// The point to restore: latest, random (uniform over the restorable window, see
    /// --seed), seq:N, or a time (same forms as restore --time; UTC unless it has an
    /// offset).
    #[arg(
        long,
        value_name = "POINT",
        default_value = "latest",
        env = "TIDEMARK_DRILL_TARGET"
    )]
    target_point: String,
    /// An existing directory under which the drill creates a fresh directory for the
    /// restored database (default: the system's temporary directory).
    #[arg(long, value_name = "DIR", env = "TIDEMARK_DRILL_SCRATCH")]
    scratch: Option<PathBuf>,
    /// A shell command that checks the restored database (see below); a non-zero exit
    /// fails the drill.
    #[arg(long, value_name = "CMD", env = "TIDEMARK_DRILL_CHECK_COMMAND")]
    check_command: Option<String>,
    /// Kill the check command, and fail the drill, after this long (e.g. 30m, 2h).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        env = "TIDEMARK_DRILL_CHECK_TIMEOUT"
    )]
    check_timeout: humantime::Duration,
    /// Pass this variable of the drill's environment to the check command (repeat for
    /// several; TIDEMARK_DRILL_CHECK_ENV takes a comma-separated list). Without it the
    /// command gets only PATH, HOME, the locale and the TIDEMARK_DRILL_* variables: never
    /// the encryption key or the store's credentials.
    #[arg(
        long,
        value_name = "NAME",
        env = "TIDEMARK_DRILL_CHECK_ENV",
        value_delimiter = ','
    )]
    check_env: Vec<String>,
    /// Write the JSON report to FILE (atomically), passed or failed.
    #[arg(long, value_name = "FILE", env = "TIDEMARK_DRILL_REPORT")]
    report: Option<PathBuf>,
    /// Keep the drill's directory and the restored database in it.
    #[arg(long)]
    keep: bool,
    /// The seed of --target-point random: the same seed draws the same point from the
    /// same window (default: a fresh seed, printed in the report).
    #[arg(long, value_name = "N", env = "TIDEMARK_DRILL_SEED")]
    seed: Option<u64>,
    /// Concurrent downloads.
    #[arg(long, value_name = "N", default_value_t = restore::DEFAULT_PARALLELISM)]
    parallelism: usize,
    /// How to verify the restored database, as restore --verify (standard, quick, full,
    /// off); a drill proves the most by default.
    #[arg(
        long,
        value_enum,
        default_value_t = VerifyMode::Full,
        env = "TIDEMARK_DRILL_VERIFY"
    )]
    verify: VerifyMode,
    #[command(flatten)]
    rates: RateArgs,
    /// Print the JSON report on standard output instead of the summary.
    #[arg(long)]
    json: bool,
}

impl Command {
    fn json(&self) -> bool {
        match self {
            Command::List(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Drill(a) => a.json,
            Command::Follow(a) => a.json,
        }
    }
}

fn time_spec(
    time: Option<&str>,
    seq: Option<u64>,
    tz: Option<&str>,
) -> Result<Option<Target>, RestoreError> {
    let offset = match tz {
        Some(tz) => timespec::parse_tz(tz)?,
        None => UtcOffset::UTC,
    };
    if let Some(t) = time {
        return Ok(Some(Target::Time(timespec::parse_time(
            t,
            offset,
            OffsetDateTime::now_utc(),
        )?)));
    }
    if tz.is_some() {
        return Err(RestoreError::Usage(
            "--tz only applies to --time; remove it or give --time".to_owned(),
        ));
    }
    Ok(seq.map(Target::Seq))
}

/// Where to read the repository from: `--generation N`, or the newest intact generation.
fn read_from(generation: Option<u64>) -> ReadFrom {
    generation.map_or(ReadFrom::NewestIntact, ReadFrom::Generation)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot serialize the report")?;
    emit(&format!("{text}\n"));
    Ok(())
}

/// Writes to standard output. A reader that went away (`tidemark-restore list | head`) ends
/// the program quietly with the conventional status 141 instead of a panic.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::BROKEN_PIPE.into());
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(exit::FAILURE.into());
    }
}

fn terminal_width() -> usize {
    if let Some((_, w)) = console::Term::stdout().size_checked() {
        return usize::from(w);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

async fn run(cli: Cli, progress: Progress, cancel: Cancel) -> anyhow::Result<u8> {
    match cli.command {
        Command::List(a) => list_cmd(a).await,
        Command::Restore(a) => restore_cmd(a, &progress, &cancel).await,
        Command::Verify(a) => verify_cmd(a, &progress, &cancel).await,
        Command::Drill(a) => drill_cmd(a, &progress, &cancel).await,
        Command::Follow(a) => follow_cmd(a, &progress, &cancel).await,
    }
}

/// Prints a report: JSON with `--json`, else its text.
fn report(
    json: bool,
    value: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        print_json(value)
    } else {
        emit(&text());
        Ok(())
    }
}

async fn list_cmd(a: ListArgs) -> anyhow::Result<u8> {
    let repo = a.store.open().await?;
    let opts = list::ListOptions {
        width: a.width,
        rates: a.rates.rates(),
    };
    let r = list::run_from(&repo, read_from(a.generation), &opts).await?;
    report(a.json, &r, || {
        r.render(a.width.unwrap_or_else(terminal_width))
    })?;
    Ok(exit::OK)
}

async fn restore_cmd(a: RestoreArgs, progress: &Progress, cancel: &Cancel) -> anyhow::Result<u8> {
    let spec =
        time_spec(a.point.time.as_deref(), a.point.seq, a.tz.as_deref())?.unwrap_or(Target::Latest);
    let opts = RestoreOptions {
        target_dir: a.target,
        target: spec,
        dry_run: a.dry_run,
        force: a.force,
        parallelism: a.parallelism,
        verify: a.verify,
        standby: false,
    };
    let r = match a.generation {
        None => restore::run_from(&a.store, &opts, progress, cancel).await?,
        Some(_) => {
            let from = read_from(a.generation);
            restore::run_from_generation(&a.store, &opts, from, progress, cancel).await?
        }
    };
    report(a.json, &r, || r.render())?;
    Ok(exit::OK)
}

/// What `verify` checks: `--all`, or what a restore to the given point needs.
fn verify_scope(scope: &ScopeArgs, tz: Option<&str>) -> Result<VerifyScope, RestoreError> {
    if !scope.all {
        let spec = time_spec(scope.time.as_deref(), scope.seq, tz)?;
        return Ok(VerifyScope::Target(spec.unwrap_or(Target::Latest)));
    }
    if tz.is_some() {
        return Err(RestoreError::Usage(
            "--tz only applies to --time; remove it or give --time".to_owned(),
        ));
    }
    Ok(VerifyScope::All)
}

async fn verify_cmd(a: VerifyArgs, progress: &Progress, cancel: &Cancel) -> anyhow::Result<u8> {
    let scope = verify_scope(&a.scope, a.tz.as_deref())?;
    let repo = a.store.open().await?;
    let opts = VerifyOptions {
        scope,
        deep: a.deep,
        parallelism: a.parallelism,
        generation: a.generation,
    };
    let r = verify::run(&repo, &opts, progress, cancel).await?;
    report(a.json, &r, || r.render())?;
    Ok(r.exit_code())
}

/// The drill's options, checked before anything starts: a bad one is bad usage.
fn drill_options(a: &DrillArgs) -> Result<DrillOptions, RestoreError> {
    let target = DrillTarget::parse(&a.target_point, OffsetDateTime::now_utc())?;
    if a.seed.is_some() && target != DrillTarget::Random {
        return Err(RestoreError::Usage(
            "--seed only applies to --target-point random".to_owned(),
        ));
    }
    if let Some(path) = &a.report {
        let parent = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from));
        if !parent.as_deref().is_some_and(std::path::Path::is_dir) {
            return Err(RestoreError::Usage(format!(
                "--report {}: its directory does not exist",
                path.display()
            )));
        }
    }
    Ok(DrillOptions {
        target,
        scratch: a.scratch.clone(),
        check_command: a.check_command.clone(),
        check_timeout_secs: a.check_timeout.as_secs(),
        check_env: a.check_env.clone(),
        keep: a.keep,
        seed: a.seed,
        parallelism: a.parallelism,
        verify: a.verify,
        rates: a.rates.rates(),
    })
}

async fn drill_cmd(a: DrillArgs, progress: &Progress, cancel: &Cancel) -> anyhow::Result<u8> {
    let opts = drill_options(&a)?;
    let outcome = drill::run(&a.store, &opts, progress, cancel).await?;
    report(a.json, &outcome, || outcome.render())?;
    if let Some(path) = &a.report {
        outcome.write(path)?;
        if !a.json {
            emit(&format!("  report        {}\n", path.display()));
        }
    }
    Ok(if outcome.passed() {
        exit::OK
    } else {
        exit::DRILL_FAILED
    })
}

async fn follow_cmd(a: FollowArgs, progress: &Progress, cancel: &Cancel) -> anyhow::Result<u8> {
    let opts = FollowOptions {
        target_dir: a.target,
        poll_interval_ms: a.poll_interval.as_millis().try_into().unwrap_or(u64::MAX),
        parallelism: a.parallelism,
        verify: a.verify,
        promote: a.promote,
        no_catch_up: a.no_catch_up,
        metrics_addr: a.metrics_addr,
        max_wal_bytes: a.max_wal_bytes,
    };
    let controls = Controls {
        stop: cancel.clone(),
        ..Controls::default()
    };
    let promote = controls.promote.clone();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot listen for SIGUSR1")?;
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            tracing::warn!("SIGUSR1: promoting after the segment being applied");
            promote.cancel();
        }
    });
    let json = a.json;
    let mut on_status = |s: &follow::FollowStatus| {
        if json && let Ok(line) = serde_json::to_string(s) {
            emit(&format!("{line}\n"));
        }
    };
    let r = follow::run(&a.store, &opts, progress, &controls, &mut on_status).await?;
    if json {
        emit(&format!("{}\n", serde_json::to_string(&r)?));
    } else {
        emit(&r.render());
    }
    Ok(exit::OK)
}

fn init_logging(verbose: u8, quiet: bool, progress: &Progress) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn,tidemark_restore=info,tidemark_manifest=info",
        (false, 1) => "info,tidemark_restore=debug,tidemark_manifest=debug",
        _ => "debug,tidemark_restore=trace,tidemark_manifest=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(progress.log_writer())
        .init();
}

fn main() -> ExitCode {
    if let Err(e) = tidemark_manifest::cli::check_cpu() {
        eprintln!("tidemark-restore: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let cli = Cli::parse();
    let json = cli.command.json();
    let progress = if cli.quiet {
        Progress::hidden()
    } else {
        Progress::auto()
    };
    init_logging(cli.verbose, cli.quiet, &progress);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let cancel = Cancel::new();
    let on_signal = cancel.clone();
    let on_term = cancel.clone();
    runtime.spawn(async move {
        // systemd and cron stop a run with SIGTERM: clean up as for Ctrl-C.
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            && term.recv().await.is_some()
        {
            tracing::warn!("terminated: stopping and cleaning up");
            on_term.cancel();
        }
    });
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!(
                "interrupted: stopping and cleaning up (press Ctrl-C again to quit at once, \
                 which may leave a .tidemark-restore staging directory beside the target)"
            );
            on_signal.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(exit::INTERRUPTED_AT_ONCE.into());
            }
        }
    });
    let result = runtime.block_on(run(cli, progress.clone(), cancel));
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let (message, code) = match e.downcast_ref::<RestoreError>() {
                Some(r) => (r.to_string(), r.class().exit_code()),
                None => (format!("{e:#}"), exit::FAILURE),
            };
            if json {
                let doc = serde_json::json!({ "error": message, "exit_code": code });
                emit(&format!("{doc:#}\n"));
            }
            progress.println(&format!("error: {message}"));
            ExitCode::from(code)
        }
    }
}
