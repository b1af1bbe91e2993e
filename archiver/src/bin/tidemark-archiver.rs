//! `tidemark-archiver`: ships a live RocksDB's WAL and base backups to a Tidemark repository.
//!
//! Exit codes: 0 success; 1 a runtime failure (store unreachable after retries, I/O error);
//! 2 bad usage or an unarchivable database (the message says what to change); 3 another
//! archiver holds the repository (or took it over); 4 (`status` only) a threshold given on
//! the command line was exceeded; 5 (`status` only) the repository is damaged (the report
//! names what, and still shows what it could read). `prune` exits 2 for an invalid policy and 3 while an
//! archiver holds the repository. With a config file that lists `[[databases]]`, `run` and
//! `backup` exit 0 when every database ended cleanly and 1 when any had failed (the JSON
//! summary on standard output names them); 2 still means bad usage, nothing started.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tidemark_archiver::fleet::{self, FleetConfig};
use tidemark_archiver::lease::LeaseError;
use tidemark_archiver::prune::{self, PruneError, PruneOptions};
use tidemark_archiver::service::{self, ArchiverOptions};
use tidemark_archiver::{request, settings, status};
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::repo::RepoError;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-archiver",
    version,
    about = "Continuous WAL archiving and base backups for RocksDB"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "TIDEMARK_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the archiver service until SIGTERM or SIGINT. SIGUSR1 takes a base backup now
    /// (of every database, when the config file lists several).
    Run(RunArgs),
    /// Take a base backup now: asks the archiver of the database running on this machine
    /// (seen by its liveness lock; a request file in its scratch directory, no signal) and
    /// waits until its base is taken, or, if none runs, archives the WAL up to now, takes
    /// the base backup and exits. (SIGUSR1 to the service also asks it for a base.)
    Backup(BackupArgs),
    /// Show what a repository can restore and how fresh it is.
    Status(StatusArgs),
    /// Apply a retention policy: drop base backups and WAL the policy does not keep, then
    /// delete objects no manifest generation within the grace period references.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The RocksDB database directory.
    #[arg(long, env = "TIDEMARK_DB")]
    db: Option<PathBuf>,
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    to: Option<String>,
    /// A TOML file with these options (flags and environment win over it).
    #[arg(long, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The WAL directory, if the database sets wal_dir.
    #[arg(long, env = "TIDEMARK_WAL_DIR")]
    wal_dir: Option<PathBuf>,
    /// Close a segment this long after its first record (e.g. 1s, 250ms).
    #[arg(long, env = "TIDEMARK_SYNC_INTERVAL", value_parser = humantime::parse_duration)]
    sync_interval: Option<Duration>,
    /// Take a base backup this often (e.g. 24h).
    #[arg(long, env = "TIDEMARK_BASE_INTERVAL", value_parser = humantime::parse_duration)]
    base_interval: Option<Duration>,
    /// Write a manifest generation at least this often while archiving (e.g. 60s).
    #[arg(long, env = "TIDEMARK_CHECKPOINT_INTERVAL", value_parser = humantime::parse_duration)]
    checkpoint_interval: Option<Duration>,
    /// Close a segment at this many bytes of records.
    #[arg(long, env = "TIDEMARK_MAX_SEGMENT_BYTES")]
    max_segment_bytes: Option<u64>,
    /// Where base backups copy the database (same file system as the database).
    #[arg(long, env = "TIDEMARK_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,
    /// Stop once caught up with the WAL and a base backup exists.
    #[arg(long)]
    exit_when_caught_up: bool,
    /// Serve Prometheus metrics (/metrics) and a health check (/health) on HOST:PORT
    /// (e.g. 127.0.0.1:9187; port 0 picks a free port, logged at start). Off by default.
    #[arg(long, env = "TIDEMARK_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Base backup files uploaded at once (1 to 64, default 4). Large files go up in
    /// parts, at most 4 parts at once for the whole process.
    #[arg(long, env = "TIDEMARK_UPLOAD_CONCURRENCY", value_name = "N")]
    upload_concurrency: Option<usize>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// Only this database of a config file that lists several ([[databases]] name).
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// With an archiver of the database running on this machine: how long to wait for the
    /// base it takes on request (it goes on after the wait; default 1h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", value_name = "DURATION")]
    wait: Duration,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    to: Option<String>,
    /// The archiver's TOML config: its `to` and `[store]` apply (flags win).
    #[arg(long, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// With a config that lists `[[databases]]`: the database whose repository to show.
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Exit with code 4 if the newest archived record is older than this (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_lag: Option<Duration>,
    /// Exit with code 4 if the newest base backup is older than this (e.g. 26h).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_base_age: Option<Duration>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct PruneArgs {
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    to: Option<String>,
    /// The archiver's TOML config: its `to`, `[store]` and `[retention]` apply (flags win).
    #[arg(long, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// With a config that lists `[[databases]]`: the database whose repository to prune.
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Keep the newest N base backups.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Keep every point of this much recent history restorable (e.g. 7d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pitr_window: Option<Duration>,
    /// Also keep the newest base of each day for this long (e.g. 7d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    keep_daily_for: Option<Duration>,
    /// Also keep the newest base of each ISO week for this long (e.g. 30d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    keep_weekly_for: Option<Duration>,
    /// Also keep the newest base of each month for this long (e.g. 90d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    keep_monthly_for: Option<Duration>,
    /// Keep unreferenced objects this long, for restores already under way (default 24h).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    grace: Option<Duration>,
    /// Print what would be dropped and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// Reports a repository that cannot be opened: exit 2 when what was given is wrong (URL,
/// key, settings), 1 when the store failed.
fn open_failed(command: &str, e: &tidemark_manifest::repo::RepoError) -> ExitCode {
    eprintln!("tidemark-archiver {command}: {e}");
    ExitCode::from(if e.is_usage() { 2 } else { 1 })
}

/// Reads a TOML config file.
fn read_config(path: &std::path::Path) -> anyhow::Result<ArchiverOptions> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str::<ArchiverOptions>(&text)
        .with_context(|| format!("invalid config file {}", path.display()))
}

/// Store flags and environment over what a config file says.
fn merge_store(o: &mut StoreArgs, flags: StoreArgs) {
    o.overlay(flags);
}

/// The repository and policy for `prune`: config file, then flags and environment.
/// One database's options from `--config` (and `--database` when the file lists several),
/// for the commands that work on its repository (`status`, `prune`).
fn database_options(
    command: &str,
    config: Option<&std::path::Path>,
    database: Option<&str>,
) -> anyhow::Result<ArchiverOptions> {
    let needs_list = |name: &str| {
        anyhow::anyhow!(
            "--database {name} needs a config file that lists [[databases]] (--config FILE)"
        )
    };
    let Some(path) = config else {
        return match database {
            Some(name) => Err(needs_list(name)),
            None => Ok(ArchiverOptions::default()),
        };
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let invalid = || format!("invalid config file {}", path.display());
    if !fleet::lists_databases(&text).with_context(invalid)? {
        return match database {
            Some(name) => Err(needs_list(name)),
            None => read_config(path),
        };
    }
    let Some(name) = database else {
        anyhow::bail!(
            "{} lists [[databases]]: say which one to {command} with --database NAME",
            path.display()
        );
    };
    let mut fleet = FleetConfig::parse(&text).with_context(invalid)?;
    fleet.select(name).with_context(invalid)?;
    Ok(fleet.databases.remove(0).options)
}

/// The repository and store settings: flags and environment over the config's.
fn repository_of(
    file: &ArchiverOptions,
    to: Option<String>,
    flags: StoreArgs,
) -> anyhow::Result<(String, StoreArgs)> {
    let mut store = file.store.clone();
    merge_store(&mut store, flags);
    let to = to.unwrap_or_else(|| file.to.clone());
    if to.is_empty() {
        anyhow::bail!(
            "no repository given: pass --to s3://BUCKET/PREFIX or --to file:///ABSOLUTE/DIR \
             (or --config FILE)"
        );
    }
    Ok((to, store))
}

/// The repository and policy for `prune`: config file, then flags and environment.
fn prune_options(args: PruneArgs) -> anyhow::Result<(String, StoreArgs, PruneOptions, Duration)> {
    let file = database_options("prune", args.config.as_deref(), args.database.as_deref())?;
    // A config file that cannot work is refused whatever the command.
    settings::check_options(&file)?;
    let (to, store) = repository_of(&file, args.to, args.store)?;
    let mut p = file.retention.unwrap_or_default();
    let from_flags = args.keep_last.is_some()
        || args.pitr_window.is_some()
        || args.keep_daily_for.is_some()
        || args.keep_weekly_for.is_some()
        || args.keep_monthly_for.is_some();
    if from_flags {
        // A policy on the command line replaces the config's, as a whole.
        p = PruneOptions {
            grace: p.grace,
            interval: p.interval,
            ..PruneOptions::default()
        };
        p.keep_last = args.keep_last;
        p.pitr_window = args.pitr_window;
        p.keep_daily_for = args.keep_daily_for;
        p.keep_weekly_for = args.keep_weekly_for;
        p.keep_monthly_for = args.keep_monthly_for;
    }
    if let Some(g) = args.grace {
        p.grace = g;
    }
    settings::check_retention(&p)?;
    p.rules()?;
    Ok((to, store, p, file.lease_ttl))
}

async fn prune_cmd(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let (dry_run, json) = (args.dry_run, args.json);
    let (to, store, policy, lease_ttl) = match prune_options(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tidemark-archiver prune: {e:#}");
            return Ok(ExitCode::from(2));
        }
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
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("tidemark-archiver prune: {e}");
            let code = match &e {
                PruneError::Policy(_) => 2,
                PruneError::Lease(LeaseError::Held { .. } | LeaseError::Lost { .. }) => 3,
                _ => 1,
            };
            Ok(ExitCode::from(code))
        }
    }
}

/// What `run` and `backup` archive: one database, or the `[[databases]]` of the config file.
enum Plan {
    One(Box<ArchiverOptions>),
    Many(FleetConfig),
}

/// Options from the config file, then flags and environment on top. `database` keeps one
/// database of a config file that lists several.
fn options(args: RunArgs, database: Option<&str>) -> anyhow::Result<Plan> {
    let text = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        ),
        None => None,
    };
    if let (Some(path), Some(text)) = (&args.config, &text)
        && fleet::lists_databases(text)
            .with_context(|| format!("invalid config file {}", path.display()))?
    {
        if args.db.is_some() || args.to.is_some() || args.wal_dir.is_some() {
            anyhow::bail!(
                "--db, --to and --wal-dir (or TIDEMARK_DB, TIDEMARK_TO, TIDEMARK_WAL_DIR) cannot \
                 be used with {}, which lists [[databases]]: each database sets its own in its table",
                path.display()
            );
        }
        let invalid = || format!("invalid config file {}", path.display());
        let mut config = FleetConfig::parse(text).with_context(invalid)?;
        if let Some(name) = database {
            config.select(name).with_context(invalid)?;
        }
        for d in &mut config.databases {
            apply_flags(&args, &mut d.options);
            if let Some(dir) = &args.scratch_dir {
                d.options.scratch_dir = Some(dir.join(&d.name));
            }
        }
        if args.metrics_addr.is_some() {
            config.metrics_addr = args.metrics_addr.clone();
        }
        config.validate().with_context(invalid)?;
        for d in &config.databases {
            validate(&d.options).with_context(|| format!("database {}", d.name))?;
        }
        return Ok(Plan::Many(config));
    }
    if let Some(name) = database {
        anyhow::bail!(
            "--database {name} needs a config file that lists [[databases]] (--config FILE)"
        );
    }
    let mut o = match (&args.config, &text) {
        (Some(path), Some(text)) => toml::from_str::<ArchiverOptions>(text)
            .with_context(|| format!("invalid config file {}", path.display()))?,
        _ => ArchiverOptions::default(),
    };
    apply_flags(&args, &mut o);
    if let Some(v) = &args.db {
        o.db = v.clone();
    }
    if let Some(v) = &args.to {
        o.to = v.clone();
    }
    if args.wal_dir.is_some() {
        o.wal_dir = args.wal_dir.clone();
    }
    if args.scratch_dir.is_some() {
        o.scratch_dir = args.scratch_dir.clone();
    }
    if args.metrics_addr.is_some() {
        o.metrics_addr = args.metrics_addr.clone();
    }
    if o.db.as_os_str().is_empty() {
        anyhow::bail!(
            "no database given: pass --db PATH (or TIDEMARK_DB, or db = \"...\" in --config)"
        );
    }
    if o.to.is_empty() {
        anyhow::bail!(
            "no repository given: pass --to s3://BUCKET/PREFIX or --to file:///ABSOLUTE/DIR"
        );
    }
    validate(&o)?;
    Ok(Plan::One(Box::new(o)))
}

/// The flags every database shares, over what the config file says.
fn apply_flags(args: &RunArgs, o: &mut ArchiverOptions) {
    if let Some(v) = args.sync_interval {
        o.sync_interval = v;
    }
    if let Some(v) = args.base_interval {
        o.base_interval = v;
    }
    if let Some(v) = args.checkpoint_interval {
        o.checkpoint_interval = v;
    }
    if let Some(v) = args.max_segment_bytes {
        o.max_segment_bytes = v;
    }
    o.exit_when_caught_up |= args.exit_when_caught_up;
    merge_store(&mut o.store, args.store.clone());
    if let Some(v) = args.upload_concurrency {
        o.upload_concurrency = v;
    }
}

/// Checks one database's options once flags are applied (each of a config's
/// `[[databases]]` too).
fn validate(o: &ArchiverOptions) -> anyhow::Result<()> {
    if !(1..=64).contains(&o.upload_concurrency) {
        anyhow::bail!(
            "upload concurrency {} is out of range: give --upload-concurrency (or \
             upload_concurrency in --config) a number of base files to upload at once from 1 \
             to 64",
            o.upload_concurrency
        );
    }
    // Durations that cannot work, named by their keys.
    settings::check_options(o)?;
    // Bad store options are bad usage, whatever the command does first.
    o.store.s3_options()?;
    if let Some(r) = &o.retention {
        r.rules()?;
    }
    Ok(())
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
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("tidemark-archiver: {e}");
            Ok(ExitCode::from(e.exit_code() as u8))
        }
    }
}

/// Several databases: a summary line of JSON on standard output; exit code 0 when every
/// database ended cleanly, 1 when any had failed.
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
            Ok(ExitCode::from(e.exit_code() as u8))
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
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
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
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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

async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let resolved = database_options("show", args.config.as_deref(), args.database.as_deref())
        .and_then(|file| repository_of(&file, args.to.clone(), args.store.clone()));
    let (to, store) = match resolved {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tidemark-archiver status: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let repo = match store.open(&to, false).await {
        Ok(r) => r,
        Err(e) => return Ok(open_failed("status", &e)),
    };
    let report = match status::status(&repo).await {
        Ok(report) => report,
        Err(e) if e.is_damage() || matches!(e, RepoError::FallbackFailed { .. }) => {
            eprintln!("tidemark-archiver status: DAMAGED: {e}");
            return Ok(ExitCode::from(5));
        }
        Err(e) => return Err(e.into()),
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
        return Ok(ExitCode::from(5));
    }
    Ok(if exceeded.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let result = match cli.command {
        Command::Run(args) => match options(args, None) {
            Ok(Plan::One(o)) => run_service(*o).await,
            Ok(Plan::Many(config)) => run_fleet(config).await,
            Err(e) => {
                eprintln!("tidemark-archiver: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Backup(args) => match options(args.run, args.database.as_deref()) {
            Ok(Plan::One(o)) => backup(*o, args.wait).await,
            Ok(Plan::Many(config)) => backup_many(config, args.wait).await,
            Err(e) => {
                eprintln!("tidemark-archiver: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Status(args) => status_cmd(args).await,
        Command::Prune(args) => prune_cmd(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-archiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}
