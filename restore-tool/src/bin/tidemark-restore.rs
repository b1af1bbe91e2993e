//! `tidemark-restore`: list, restore and verify a Tidemark repository.
//!
//! Exit codes (also in `--help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | failure: I/O, network, RocksDB, interrupted |
//! | 2 | bad usage or input: unknown option, malformed time, non-empty target without `--force`, no repository at the URL |
//! | 3 | the target is not restorable from this repository (before or after the window, in a gap) |
//! | 4 | verification failed: a missing or corrupt object, a broken WAL chain, a restored database that does not end where planned, or problems found by `verify` |

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};
use time::{OffsetDateTime, UtcOffset};
use tracing_subscriber::EnvFilter;

use tidemark_restore::commands::list::{self};
use tidemark_restore::commands::restore::{self, RestoreOptions};
use tidemark_restore::commands::verify::{self, VerifyOptions, VerifyScope};
use tidemark_restore::commands::{StoreOptions, TargetSpec};
use tidemark_restore::error::exit_code;
use tidemark_restore::progress::Progress;
use tidemark_restore::timespec;
use tidemark_restore::verify::VerifyMode;
use tidemark_restore::{Cancel, RestoreError};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure: I/O, network, RocksDB, interrupted
  2  bad usage or input: unknown option, malformed time, non-empty target without --force,
     no repository at the URL
  3  the target is not restorable from this repository (before or after the window, in a gap)
  4  verification failed: a missing or corrupt object, a broken WAL chain, a restored database
     that does not end where planned, or problems found by `verify`";

const TIME_HELP: &str = "\
Restore every record committed at or before TIME. Accepted: RFC 3339 with an offset \
(2026-11-23T13:30:00Z, 2026-11-23T15:30:00+02:00), a date and time without an offset \
(\"2026-11-23 13:30:00\", read as UTC unless --tz is given), or a relative time (\"15m ago\", \
\"2h ago\", \"90s ago\", \"1h30m ago\")";

/// Restores a RocksDB database from a Tidemark repository to a point in time, lists what a
/// repository can restore, and verifies repositories.
#[derive(Debug, Parser)]
#[command(name = "tidemark-restore", version, after_help = EXIT_CODES)]
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

/// Where the repository is.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The repository: s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR.
    #[arg(long, value_name = "URL", env = "TIDEMARK_FROM")]
    from: String,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS).
    #[arg(long, value_name = "URL", env = "TIDEMARK_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// The bucket's region (default: from the AWS configuration; us-east-1 with --endpoint-url).
    #[arg(long, value_name = "REGION", env = "TIDEMARK_REGION")]
    region: Option<String>,
    /// Path-style bucket addressing (most S3-compatible servers need it).
    #[arg(long, env = "TIDEMARK_PATH_STYLE")]
    path_style: bool,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions {
            from: self.from.clone(),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
        }
    }
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
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON for automation.
        #[arg(long)]
        json: bool,
        /// Timeline width in columns (default: the terminal's width).
        #[arg(long, value_name = "COLUMNS")]
        width: Option<usize>,
    },
    /// Restore the database into a new directory.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
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
        /// How to check the result: full (open read-only, check the last sequence number,
        /// count every key), quick (no key scan) or off.
        #[arg(long, value_enum, default_value_t = VerifyMode::Full)]
        verify: VerifyMode,
        /// Print a JSON summary on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Check that the repository holds intact everything a restore needs.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Fixed UTC offset for --time values without one.
        #[arg(long, value_name = "ZONE")]
        tz: Option<String>,
        /// Download everything: check every sha256, frame and record.
        #[arg(long)]
        deep: bool,
        /// Concurrent downloads.
        #[arg(long, value_name = "N", default_value_t = restore::DEFAULT_PARALLELISM)]
        parallelism: usize,
        /// Print JSON on standard output.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    fn json(&self) -> bool {
        match self {
            Command::List { json, .. }
            | Command::Restore { json, .. }
            | Command::Verify { json, .. } => *json,
        }
    }
}

fn time_spec(
    time: Option<&str>,
    seq: Option<u64>,
    tz: Option<&str>,
) -> Result<Option<TargetSpec>, RestoreError> {
    let offset = match tz {
        Some(tz) => timespec::parse_tz(tz)?,
        None => UtcOffset::UTC,
    };
    if let Some(t) = time {
        return Ok(Some(TargetSpec::Time(timespec::parse_time(
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
    Ok(seq.map(TargetSpec::Seq))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("cannot serialize the report")?
    );
    Ok(())
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
        Command::List { store, json, width } => {
            let repo = store.options().open().await?;
            let report = list::run(&repo).await?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.render(width.unwrap_or_else(terminal_width)));
            }
            Ok(exit_code::OK)
        }
        Command::Restore {
            store,
            target,
            point,
            tz,
            dry_run,
            force,
            parallelism,
            verify,
            json,
        } => {
            let spec = match time_spec(point.time.as_deref(), point.seq, tz.as_deref())? {
                Some(spec) => spec,
                None => TargetSpec::Latest,
            };
            let opts = RestoreOptions {
                target_dir: target,
                target: spec,
                dry_run,
                force,
                parallelism,
                verify,
            };
            let report = restore::run_from(&store.options(), &opts, &progress, &cancel).await?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.render());
            }
            Ok(exit_code::OK)
        }
        Command::Verify {
            store,
            scope,
            tz,
            deep,
            parallelism,
            json,
        } => {
            let scope = if scope.all {
                if tz.is_some() {
                    return Err(RestoreError::Usage(
                        "--tz only applies to --time; remove it or give --time".to_owned(),
                    )
                    .into());
                }
                VerifyScope::All
            } else {
                VerifyScope::Target(
                    time_spec(scope.time.as_deref(), scope.seq, tz.as_deref())?
                        .unwrap_or(TargetSpec::Latest),
                )
            };
            let repo = store.options().open().await?;
            let opts = VerifyOptions {
                scope,
                deep,
                parallelism,
            };
            let report = verify::run(&repo, &opts, &progress, &cancel).await?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok() {
                exit_code::OK
            } else {
                exit_code::VERIFICATION_FAILED
            })
        }
    }
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
            return ExitCode::from(exit_code::FAILURE);
        }
    };
    let cancel = Cancel::new();
    let on_signal = cancel.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!(
                "interrupted: stopping and cleaning up (press Ctrl-C again to quit at once, \
                 which may leave a .tidemark-restore staging directory beside the target)"
            );
            on_signal.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
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
                None => (format!("{e:#}"), exit_code::FAILURE),
            };
            if json {
                let doc = serde_json::json!({ "error": message, "exit_code": code });
                println!("{doc:#}");
            }
            progress.println(&format!("error: {message}"));
            ExitCode::from(code)
        }
    }
}
