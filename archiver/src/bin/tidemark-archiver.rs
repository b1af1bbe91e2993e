//! `tidemark-archiver`: ships a live RocksDB's WAL and base backups to a Tidemark repository.
//!
//! Exit codes: [`tidemark_manifest::exit`] (also in `--help`): `OK`; `FAILURE` a runtime
//! failure (store unreachable after retries, I/O error); `USAGE` bad usage or an unarchivable
//! database (the message says what to change); `LEASE_HELD` another archiver holds the
//! repository (or took it over); `THRESHOLD_EXCEEDED` (`status` only) a threshold given on
//! the command line was exceeded; `VERIFICATION_FAILED` (`status`, `copy`) the repository is
//! damaged (the report names what, and still shows what it could read). `prune` exits with `USAGE` for an invalid policy and
//! `LEASE_HELD` while an archiver holds the repository. `copy` exits with `USAGE` when the
//! destination holds another repository (or would store an encrypted source in the clear),
//! `VERIFICATION_FAILED` when it has diverged or an object does not verify, `LEASE_HELD`
//! while an archiver holds the destination, `FAILURE` when a store failed. `rekey` exits
//! with `USAGE` for a wrong old key or unreadable key files (nothing was changed) and
//! `FAILURE` when the store failed (run it again: it finishes an interrupted rotation).
//! With a config file that lists
//! `[[databases]]`, `run` and `backup` exit with `OK` when every database ended cleanly and
//! `FAILURE` when any had failed (the JSON summary on standard output names them); `USAGE`
//! still means bad usage, nothing started.
//!
//! Every setting, and how the config file, the environment and the flags layer, is in
//! [`tidemark_archiver::config`]; this file only runs the commands.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tidemark_archiver::config::flags::{BackupFlags, PruneFlags, RunFlags, StatusFlags};
use tidemark_archiver::config::{
    self, ArchiverOptions, ConfigError, FleetConfig, Plan, PruneSettings,
};
use tidemark_archiver::fleet;
use tidemark_archiver::lease::LeaseError;
use tidemark_archiver::prune::{self, PruneError};
use tidemark_archiver::{request, service, status};
use tidemark_manifest::cli::parse_bool;
use tidemark_manifest::exit;
use tidemark_manifest::repo::RepoError;
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
    /// Take a base backup now: asks the archiver of the database running on this machine
    /// (seen by its liveness lock; a request file in its scratch directory, no signal) and
    /// waits until its base is taken, or, if none runs, archives the WAL up to now, takes
    /// the base backup and exits. (SIGUSR1 to the service also asks it for a base.)
    Backup(BackupFlags),
    /// Show what a repository can restore and how fresh it is.
    Status(StatusFlags),
    /// Apply a retention policy: drop base backups and WAL the policy does not keep, then
    /// delete objects no manifest generation within the grace period references.
    Prune(PruneFlags),
    /// Probe a store for what Tidemark relies on (conditional writes, range reads,
    /// multipart uploads, checksums, signatures, clock) and print a table; exit 0 unless
    /// the store cannot be reached.
    CheckStore(tidemark_archiver::config::flags::CheckStoreFlags),
    /// Bring a second repository of the same database up to date with a first: copies what
    /// it lacks, verified, in the order the format requires, holding its lease. Run it
    /// again to catch up (e.g. from a timer); an interrupted copy resumes.
    Copy(tidemark_archiver::config::copy::CopyFlags),
    /// Rotate the key of an encrypted repository: rewrap its data keys under the key in
    /// --new-key-file (no object is rewritten; an archiver may keep running). Safe to run
    /// again after an interruption; the old key no longer opens the repository afterwards.
    Rekey(tidemark_archiver::rekey::RekeyOptions),
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

async fn copy_cmd(args: tidemark_archiver::config::copy::CopyFlags) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let o = match tidemark_archiver::config::copy::copy_options(args) {
        Ok(o) => o,
        Err(e) => return Ok(unusable("tidemark-archiver copy", e)),
    };
    if let Some(every) = o.every {
        let print = |r: &tidemark_archiver::copy::CopyReport| {
            if json {
                match serde_json::to_string(r) {
                    Ok(line) => println!("{line}"),
                    Err(e) => tracing::warn!(error = %e, "cannot print the report"),
                }
            } else {
                print!("{r}");
            }
        };
        return Ok(
            match tidemark_archiver::copy::copy_every(&o, every, shutdown_signal(), print).await {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("tidemark-archiver copy: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
        );
    }
    match tidemark_archiver::copy::copy_once(&o).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::from(exit::OK))
        }
        Err(e) => {
            eprintln!("tidemark-archiver copy: {e}");
            Ok(ExitCode::from(e.exit_code()))
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

/// Whether an archiver of this database runs on this machine: it holds the liveness lock
/// beside the database (the lease's host name and pid prove nothing). With none here, a
/// live lease held on another host is named, since the base must be asked for there.
async fn running_archiver(o: &ArchiverOptions) -> anyhow::Result<bool> {
    if request::archiver_alive(&o.db)? {
        return Ok(true);
    }
    let repo = o.store.open(&o.to, true).await?;
    let now = time::OffsetDateTime::now_utc();
    let Some(lease) = repo.live_lease(now).await.ok().flatten() else {
        return Ok(false);
    };
    if lease.host != tidemark_archiver::checkpoint::hostname() {
        anyhow::bail!(
            "the archiver for this repository runs on host {} (pid {}); run `tidemark-archiver \
             backup` there",
            lease.host,
            lease.pid
        );
    }
    eprintln!(
        "tidemark-archiver: the lease names pid {} on this host, but no archiver of {} runs \
         on this machine (its liveness lock is free), so nothing is asked of that pid; \
         archiving and taking the base here instead",
        lease.pid,
        o.db.display()
    );
    Ok(false)
}

/// How long `backup` waits for a running archiver to take its request.
const TAKE_TIMEOUT: Duration = Duration::from_secs(120);

/// Asks the archiver running beside `o.db` for a base: the request's token. What it says
/// names `name` (a database of a config file) if given.
fn ask_running(o: &ArchiverOptions, name: &str) -> anyhow::Result<String> {
    let scratch = fleet::scratch_dir(o);
    let token = request::send(&scratch)
        .with_context(|| format!("cannot write the base request into {}", scratch.display()))?;
    println!("{name}asked the running archiver for a base backup");
    Ok(token)
}

/// Waits (at most `wait`) until the base asked for with `token` ends; says how it ended.
async fn await_base(
    o: &ArchiverOptions,
    name: &str,
    token: &str,
    wait: Duration,
) -> anyhow::Result<bool> {
    let scratch = fleet::scratch_dir(o);
    let start = std::time::Instant::now();
    let mut taken = false;
    loop {
        match request::answer(&scratch, token)? {
            request::Answer::Done(id) => {
                println!("{name}the running archiver took base backup {id}");
                return Ok(true);
            }
            request::Answer::Failed(why) => {
                eprintln!(
                    "tidemark-archiver: {name}the running archiver's base backup failed: {why}"
                );
                return Ok(false);
            }
            request::Answer::Taken if !taken => {
                taken = true;
                println!("{name}the running archiver took the request; waiting for the base");
            }
            _ => {}
        }
        let elapsed = start.elapsed();
        if !taken && elapsed >= TAKE_TIMEOUT.min(wait) {
            let withdrawn = request::withdraw(&scratch, token).unwrap_or(false);
            eprintln!(
                "tidemark-archiver: {name}the archiver running beside {} did not take the request \
                 within {:?}{}; see its log, or send it SIGUSR1",
                o.db.display(),
                TAKE_TIMEOUT.min(wait),
                if withdrawn { " (withdrawn)" } else { "" }
            );
            return Ok(false);
        }
        if elapsed >= wait {
            eprintln!(
                "tidemark-archiver: {name}the running archiver took the request, but its base \
                 backup did not end within {wait:?} (--wait); it goes on: watch its log or \
                 `tidemark-archiver status`"
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `backup`: ask a running archiver of this database on this machine, or do it in one shot.
async fn backup(o: ArchiverOptions, wait: Duration) -> anyhow::Result<ExitCode> {
    if running_archiver(&o).await? {
        let token = ask_running(&o, "")?;
        return Ok(if await_base(&o, "", &token, wait).await? {
            ExitCode::from(exit::OK)
        } else {
            ExitCode::from(exit::FAILURE)
        });
    }
    let mut o = o;
    o.exit_when_caught_up = true;
    o.base_at_start = true;
    run_service(o).await
}

/// `backup` with several databases: those archived by a process on this machine are asked
/// through it (only the one named by `--database`, if given); the others are archived up to
/// now, given a base backup, and left. Every request is sent before the first wait, so
/// that the bases run at once.
async fn backup_many(config: FleetConfig, wait: Duration) -> anyhow::Result<ExitCode> {
    let mut idle = Vec::new();
    let mut asked = Vec::new();
    for d in config.databases {
        if running_archiver(&d.options).await? {
            let name = format!("{}: ", d.name);
            let token = ask_running(&d.options, &name)?;
            asked.push((d, name, token));
        } else {
            idle.push(d);
        }
    }
    let mut all_ok = true;
    for (d, name, token) in &asked {
        all_ok &= await_base(&d.options, name, token, wait).await?;
    }
    let failed = if all_ok {
        ExitCode::from(exit::OK)
    } else {
        ExitCode::from(exit::FAILURE)
    };
    if idle.is_empty() {
        return Ok(failed);
    }
    for d in &mut idle {
        d.options.exit_when_caught_up = true;
        d.options.base_at_start = true;
    }
    let code = run_fleet(FleetConfig {
        databases: idle,
        metrics_addr: None,
    })
    .await?;
    Ok(if all_ok { code } else { failed })
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
    let report = match status::status(&repo).await {
        Ok(r) => r,
        Err(e) if e.is_damage() || matches!(e, RepoError::FallbackFailed { .. }) => {
            eprintln!("tidemark-archiver status: DAMAGED: {e}");
            return Ok(ExitCode::from(exit::VERIFICATION_FAILED));
        }
        // No repository at the URL is bad usage, as in the restore tool.
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
    if !exceeded.is_empty() {
        eprintln!("tidemark-archiver status: {}", exceeded.join("; "));
    }
    if !report.damage.is_empty() {
        let objects: Vec<_> = report
            .damage
            .iter()
            .filter_map(|d| d.object.clone())
            .collect();
        eprintln!(
            "tidemark-archiver status: the repository is DAMAGED ({}); what it shows was read \
             past the damage",
            objects.join(", ")
        );
        return Ok(ExitCode::from(exit::VERIFICATION_FAILED));
    }
    Ok(ExitCode::from(if exceeded.is_empty() {
        exit::OK
    } else {
        exit::THRESHOLD_EXCEEDED
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(e) = tidemark_manifest::cli::check_cpu() {
        eprintln!("tidemark-archiver: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let result = match cli.command {
        Command::Run(args) => match config::run_plan(&args, None) {
            Ok(Plan::One(o)) => run_service(*o).await,
            Ok(Plan::Many(config)) => run_fleet(config).await,
            Err(e) => return unusable("tidemark-archiver", e),
        },
        Command::Backup(args) => match config::run_plan(&args.run, args.database.as_deref()) {
            Ok(Plan::One(o)) => backup(*o, args.wait).await,
            Ok(Plan::Many(config)) => backup_many(config, args.wait).await,
            Err(e) => return unusable("tidemark-archiver", e),
        },
        Command::Status(args) => status_cmd(args).await,
        Command::Prune(args) => prune_cmd(args).await,
        Command::CheckStore(args) => tidemark_archiver::check_store::run(args).await,
        Command::Copy(args) => copy_cmd(args).await,
        Command::Rekey(args) => tidemark_archiver::rekey::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-archiver: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}
