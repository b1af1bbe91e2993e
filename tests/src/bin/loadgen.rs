//! `tidemark-loadgen`: writes a deterministic, seeded workload to a new RocksDB database and
//! logs every batch to an oracle directory (`oracle.log`, `times.jsonl`, `summary.json`).
//! Stops after `--batches` or `--duration` (whichever comes first; neither: until signalled),
//! or after the current batch on SIGINT/SIGTERM (a second signal exits at once). Prints the
//! summary as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tidemark_tests::{RunOptions, WorkloadConfig, run};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-loadgen",
    version,
    about = "Deterministic RocksDB load generator with an oracle log"
)]
struct Args {
    /// RocksDB directory to create and write.
    #[arg(long)]
    db: PathBuf,
    /// Directory for the oracle files.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the workload: the same seed writes the same batches.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many batches.
    #[arg(long)]
    batches: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Batches per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Largest number of ops in a batch.
    #[arg(long, default_value_t = 32)]
    max_batch_ops: usize,
    /// Flush every column family every N batches (0: only automatic flushes).
    #[arg(long, default_value_t = 1000)]
    flush_every: u64,
    /// Put a value over 32 KiB every N batches (0: never).
    #[arg(long, default_value_t = 100)]
    large_value_every: u64,
    /// Write a time marker (put_log_data) every N batches (0: never).
    #[arg(long, default_value_t = 10)]
    marker_every: u64,
    /// Keys per column family.
    #[arg(long, default_value_t = 5000)]
    keys: u32,
}

/// Sets `stop` on the first SIGINT/SIGTERM; exits on the second. Handlers are installed
/// before this returns.
fn install_signal_handlers(stop: Arc<AtomicBool>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal runtime")?;
    let (mut term, mut int) = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if stop.swap(true, Ordering::SeqCst) {
                    eprintln!("tidemark-loadgen: second signal, exiting without finishing");
                    std::process::exit(130);
                }
                eprintln!("tidemark-loadgen: stopping after the current batch");
            }
        });
    });
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let duration = args
        .duration
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--duration must be a non-negative number of seconds")?;
    let opts = RunOptions {
        db: args.db,
        out: args.out,
        workload: WorkloadConfig {
            seed: args.seed,
            max_batch_ops: args.max_batch_ops,
            flush_every: args.flush_every,
            large_value_every: args.large_value_every,
            marker_every: args.marker_every,
            keys_per_cf: args.keys,
            ..WorkloadConfig::default()
        },
        batches: args.batches,
        duration,
        rate: args.rate,
    };
    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(stop.clone())?;
    let summary = run(&opts, &stop)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
