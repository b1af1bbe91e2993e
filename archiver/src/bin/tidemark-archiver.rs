//! `tidemark-archiver`: ships a live RocksDB's WAL and base backups to a Tidemark repository.
//!
//! Exit codes: 0 success; 1 a runtime failure (store unreachable after retries, I/O error);
//! 2 bad usage or an unarchivable database (the message says what to change); 3 another
//! archiver holds the repository (or took it over); 4 (`status` only) a threshold given on
//! the command line was exceeded.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tidemark_archiver::service::{self, ArchiverOptions};
use tidemark_archiver::status;
use tidemark_manifest::cli::StoreArgs;
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
    /// Run the archiver service until SIGTERM or SIGINT. SIGUSR1 takes a base backup now.
    Run(RunArgs),
    /// Take a base backup now: signals the archiver running on this host, or, if none runs,
    /// archives the WAL up to now, takes the base backup and exits.
    Backup(RunArgs),
    /// Show what a repository can restore and how fresh it is.
    Status(StatusArgs),
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
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, env = "TIDEMARK_TO", value_name = "URL")]
    to: String,
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

/// Options from the config file, then flags and environment on top.
fn options(args: RunArgs) -> anyhow::Result<ArchiverOptions> {
    let mut o = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            toml::from_str::<ArchiverOptions>(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => ArchiverOptions::default(),
    };
    if let Some(v) = args.db {
        o.db = v;
    }
    if let Some(v) = args.to {
        o.to = v;
    }
    if args.wal_dir.is_some() {
        o.wal_dir = args.wal_dir;
    }
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
    if args.scratch_dir.is_some() {
        o.scratch_dir = args.scratch_dir;
    }
    o.exit_when_caught_up |= args.exit_when_caught_up;
    if args.metrics_addr.is_some() {
        o.metrics_addr = args.metrics_addr;
    }
    let s = args.store;
    o.store.endpoint_url = s.endpoint_url.or(o.store.endpoint_url);
    o.store.region = s.region.or(o.store.region);
    o.store.path_style |= s.path_style;
    o.store.storage_class = s.storage_class.or(o.store.storage_class);
    o.store.sse = s.sse.or(o.store.sse);
    o.store.sse_kms_key_id = s.sse_kms_key_id.or(o.store.sse_kms_key_id);
    o.store.request_timeout = s.request_timeout.or(o.store.request_timeout);
    o.store.encryption_key_file = s.encryption_key_file.or(o.store.encryption_key_file);
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
    if o.sync_interval.is_zero() || o.base_interval.is_zero() || o.checkpoint_interval.is_zero() {
        anyhow::bail!("intervals must be greater than zero");
    }
    Ok(o)
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

async fn run_service(o: ArchiverOptions) -> Result<ExitCode, anyhow::Error> {
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

/// `backup`: signal a running archiver on this host, or do it in one shot.
async fn backup(o: ArchiverOptions) -> anyhow::Result<ExitCode> {
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
        let status = std::process::Command::new("kill")
            .args(["-USR1", &report.pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            anyhow::bail!("could not signal the archiver (pid {})", report.pid);
        }
        println!(
            "asked the running archiver (pid {}) for a base backup",
            report.pid
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = o;
    o.exit_when_caught_up = true;
    o.base_at_start = true;
    run_service(o).await
}

async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let repo = args.store.open(&args.to, false).await?;
    let report = status::status(&repo).await?;
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
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tidemark-archiver status: {}", exceeded.join("; "));
        Ok(ExitCode::from(4))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let result = match cli.command {
        Command::Run(args) => match options(args) {
            Ok(o) => run_service(o).await,
            Err(e) => {
                eprintln!("tidemark-archiver: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Backup(args) => match options(args) {
            Ok(o) => backup(o).await,
            Err(e) => {
                eprintln!("tidemark-archiver: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Status(args) => status_cmd(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-archiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}
