//! `tidemark-archiver`: ships a live RocksDB's WAL and base backups to a Tidemark repository.
//!
//! Exit codes: [`tidemark_manifest::exit`] (also in `--help`): `OK`; `FAILURE` a runtime
//! failure (store unreachable after retries, I/O error); `USAGE` bad usage or an unarchivable
//! database (the message says what to change); `LEASE_HELD` another archiver holds the
//! repository (or took it over); `THRESHOLD_EXCEEDED` (`status` only) a threshold given on
//! the command line was exceeded. `prune` exits with `USAGE` for an invalid policy and
//! `LEASE_HELD` while an archiver holds the repository. With a config file that lists
//! `[[databases]]`, `run` and `backup` exit with `OK` when every database ended cleanly and
//! `FAILURE` when any had failed (the JSON summary on standard output names them); `USAGE`
//! still means bad usage, nothing started.
//!
//! Every setting, and how the config file, the environment and the flags layer, is in
//! [`tidemark_archiver::config`]; this file only runs the commands.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tidemark_archiver::config::flags::{BackupFlags, PruneFlags, RunFlags, StatusFlags};
use tidemark_archiver::config::{
    self, ArchiverOptions, ConfigError, FleetConfig, Plan, PruneSettings,
};
use tidemark_archiver::fleet;
use tidemark_archiver::lease::LeaseError;
use tidemark_archiver::prune::{self, PruneError};
use tidemark_archiver::{service, status};
use tidemark_manifest::cli::parse_bool;
use tidemark_manifest::exit;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-archiver",
    version,
    about = "Continuous WAL archiving and base backups for RocksDB",
    after_help = exit::help(exit::Program::Archiver)
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "TIDEMARK_LOG_JSON", value_parser = parse_bool)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the archiver service until SIGTERM or SIGINT. SIGUSR1 takes a base backup now
    /// (of every database, when the config file lists several).
    Run(RunFlags),
    /// Take a base backup now: signals the archiver running on this host, or, if none runs,
    /// archives the WAL up to now, takes the base backup and exits.
    Backup(BackupFlags),
    /// Show what a repository can restore and how fresh it is.
    Status(StatusFlags),
    /// Apply a retention policy: drop base backups and WAL the policy does not keep, then
    /// delete objects no manifest generation within the grace period references.
    Prune(PruneFlags),
    /// Probe a store for what Tidemark relies on (conditional writes, range reads,
    /// multipart uploads, checksums, signatures, clock) and print a table; exit 0 unless
    /// the store cannot be reached.
    CheckStore(tidemark_archiver::check_store::CheckStoreArgs),
}

/// Reports a repository that cannot be opened: `USAGE` when what was given is wrong (URL,
/// key, settings), `FAILURE` when the store failed.
fn open_failed(command: &str, e: &tidemark_manifest::repo::RepoError) -> ExitCode {
    eprintln!("tidemark-archiver {command}: {e}");
    ExitCode::from(if e.is_usage() {
        exit::USAGE
    } else {
        exit::FAILURE
    })
}

/// Reports settings that cannot be used: `USAGE`.
fn unusable(command: &str, e: ConfigError) -> ExitCode {
    eprintln!("{command}: {:#}", anyhow::Error::new(e));
    ExitCode::from(exit::USAGE)
}

async fn prune_cmd(args: PruneFlags) -> anyhow::Result<ExitCode> {
    let (dry_run, json) = (args.dry_run, args.json);
    let PruneSettings {
        to,
        store,
        policy,
        lease_ttl,
    } = match config::prune_settings(args) {
        Ok(v) => v,
        Err(e) => return Ok(unusable("tidemark-archiver prune", e)),
    };
    let repo = match store.open(&to, false).await {
        Ok(r) => r,
        Err(e) => return Ok(open_failed("prune", &e)),
    };
    match prune::prune_repository(&repo, &policy, dry_run, lease_ttl).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::from(exit::OK))
        }
        Err(e) => {
            eprintln!("tidemark-archiver prune: {e}");
            let code = match &e {
                PruneError::Policy(_) => exit::USAGE,
                PruneError::Lease(LeaseError::Held { .. } | LeaseError::Lost { .. }) => {
                    exit::LEASE_HELD
                }
                _ => exit::FAILURE,
            };
            Ok(ExitCode::from(code))
        }
    }
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    // Colours only on a terminal: not in log files, pipes or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// SIGUSR1, as a stream of base backup requests.
fn base_requests() -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot install the SIGUSR1 handler")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

async fn run_service(o: ArchiverOptions) -> Result<ExitCode, anyhow::Error> {
    let rx = base_requests()?;
    match service::run(o, shutdown_signal(), rx).await {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(ExitCode::from(exit::OK))
        }
        Err(e) => {
            eprintln!("tidemark-archiver: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// Several databases: a summary line of JSON on standard output; exit code `OK` when every
/// database ended cleanly, `FAILURE` when any had failed.
async fn run_fleet(config: FleetConfig) -> Result<ExitCode, anyhow::Error> {
    let rx = base_requests()?;
    match fleet::run(config, shutdown_signal(), rx).await {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary)?);
            let failed = summary.failed();
            if !failed.is_empty() {
                eprintln!(
                    "tidemark-archiver: {} of {} databases had failed: {}",
                    failed.len(),
                    summary.databases.len(),
                    failed.join(", ")
                );
            }
            Ok(ExitCode::from(summary.exit_code()))
        }
        Err(e) => {
            eprintln!("tidemark-archiver: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// The pid of the archiver holding this repository's lease on this host, if one runs.
async fn running_archiver(o: &ArchiverOptions) -> anyhow::Result<Option<u32>> {
    let repo = o.store.open(&o.to, true).await?;
    if let Some(report) = status::status(&repo).await.ok().and_then(|s| s.lease)
        && !report.expired
    {
        let here = tidemark_archiver::checkpoint::hostname();
        if report.host != here {
            anyhow::bail!(
                "the archiver for this repository runs on host {} (pid {}); run `tidemark-archiver backup` there",
                report.host,
                report.pid
            );
        }
        return Ok(Some(report.pid));
    }
    Ok(None)
}

fn signal_base_backup(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .env_clear()
        .envs(tidemark_manifest::cli::child_env(&[]))
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        anyhow::bail!("could not signal the archiver (pid {pid})");
    }
    Ok(())
}

/// `backup`: signal a running archiver on this host, or do it in one shot.
async fn backup(o: ArchiverOptions) -> anyhow::Result<ExitCode> {
    if let Some(pid) = running_archiver(&o).await? {
        signal_base_backup(pid)?;
        println!("asked the running archiver (pid {pid}) for a base backup");
        return Ok(ExitCode::from(exit::OK));
    }
    let mut o = o;
    o.exit_when_caught_up = true;
    o.base_at_start = true;
    run_service(o).await
}

/// `backup` with several databases: those archived by a process on this host are asked
/// through it (only the one named by `--database`, if given); the others are archived up to
/// now, given a base backup, and left.
async fn backup_many(config: FleetConfig, named: bool) -> anyhow::Result<ExitCode> {
    let mut idle = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    for d in config.databases {
        match running_archiver(&d.options).await? {
            Some(pid) => {
                if named {
                    let file = fleet::request_base(&d.options).with_context(|| {
                        format!("cannot write the base backup request for {}", d.name)
                    })?;
                    tracing::debug!(file = %file.display(), "request written");
                }
                println!(
                    "{}: asked the running archiver (pid {pid}) for a base backup",
                    d.name
                );
                pids.insert(pid);
            }
            None => idle.push(d),
        }
    }
    for pid in pids {
        signal_base_backup(pid)?;
    }
    if idle.is_empty() {
        return Ok(ExitCode::from(exit::OK));
    }
    for d in &mut idle {
        d.options.exit_when_caught_up = true;
        d.options.base_at_start = true;
    }
    run_fleet(FleetConfig {
        databases: idle,
        metrics_addr: None,
    })
    .await
}

async fn status_cmd(args: StatusFlags) -> anyhow::Result<ExitCode> {
    let (to, store) = match config::status_settings(&args) {
        Ok(v) => v,
        Err(e) => return Ok(unusable("tidemark-archiver status", e)),
    };
    let repo = match store.open(&to).await {
        Ok(r) => r,
        Err(e) => return Ok(open_failed("status", &e)),
    };
    // No repository at the URL is bad usage, as in the restore tool.
    let report = match status::status(&repo).await {
        Ok(r) => r,
        Err(e) => return Ok(open_failed("status", &e)),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    let mut exceeded = Vec::new();
    if let Some(max) = args.max_lag {
        match report.newest_age_seconds {
            Some(age) if age <= max.as_secs_f64() => {}
            Some(age) => exceeded.push(format!(
                "newest record is {age:.0} s old (limit {} s)",
                max.as_secs()
            )),
            None => exceeded.push("nothing is archived yet".to_owned()),
        }
    }
    if let Some(max) = args.max_base_age {
        match report.newest_base_age_seconds {
            Some(age) if age <= max.as_secs_f64() => {}
            Some(age) => exceeded.push(format!(
                "newest base backup is {age:.0} s old (limit {} s)",
                max.as_secs()
            )),
            None => exceeded.push("there is no base backup".to_owned()),
        }
    }
    if exceeded.is_empty() {
        Ok(ExitCode::from(exit::OK))
    } else {
        eprintln!("tidemark-archiver status: {}", exceeded.join("; "));
        Ok(ExitCode::from(exit::THRESHOLD_EXCEEDED))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let result = match cli.command {
        Command::Run(args) => match config::run_plan(&args, None) {
            Ok(Plan::One(o)) => run_service(*o).await,
            Ok(Plan::Many(config)) => run_fleet(config).await,
            Err(e) => return unusable("tidemark-archiver", e),
        },
        Command::Backup(args) => match config::run_plan(&args.run, args.database.as_deref()) {
            Ok(Plan::One(o)) => backup(*o).await,
            Ok(Plan::Many(config)) => backup_many(config, args.database.is_some()).await,
            Err(e) => return unusable("tidemark-archiver", e),
        },
        Command::Status(args) => status_cmd(args).await,
        Command::Prune(args) => prune_cmd(args).await,
        Command::CheckStore(args) => tidemark_archiver::check_store::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-archiver: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}
