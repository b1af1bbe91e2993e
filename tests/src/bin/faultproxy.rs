//! `tidemark-faultproxy`: a fault-injecting TCP proxy on 127.0.0.1 in front of an S3 server
//! (see `tidemark_tests::faultproxy`), for failure drills from scripts. Prints
//! `listening on http://127.0.0.1:PORT` once ready, the counters of what it injected every
//! `--report-every` seconds and at exit (SIGINT/SIGTERM).
//!
//! ```sh
//! tidemark-faultproxy --upstream "$TIDEMARK_TEST_S3_ENDPOINT" --rate 0.3 &
//! TIDEMARK_ENDPOINT_URL=http://127.0.0.1:PORT tidemark-archiver run …
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tidemark_tests::faultproxy::{FaultKind, FaultPlan, FaultProxy, StripConditional};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-faultproxy",
    version,
    about = "Fault-injecting TCP proxy on 127.0.0.1 for object store failure tests"
)]
struct Args {
    /// Address to listen on (loopback only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server to forward to, `http://127.0.0.1:PORT`.
    #[arg(long)]
    upstream: String,
    /// Share of new connections that get a fault (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    rate: f64,
    /// Fault kinds to choose from, comma-separated: reset, slowdown, internal, stall, cut,
    /// lost-reply.
    #[arg(
        long,
        default_value = "reset,slowdown,internal,stall,cut,lost-reply",
        value_delimiter = ','
    )]
    faults: Vec<String>,
    /// Seconds a stalled connection is held before it is closed.
    #[arg(long, default_value_t = 2.0)]
    stall_secs: f64,
    /// Fewest bytes (both directions) a cut connection passes before it is reset.
    #[arg(long, default_value_t = 50)]
    cut_min_bytes: u64,
    /// Most bytes (both directions) a cut connection passes before it is reset.
    #[arg(long, default_value_t = 3000)]
    cut_max_bytes: u64,
    /// Shortest lifetime of a cut connection, in milliseconds.
    #[arg(long, default_value_t = 20)]
    cut_min_ms: u64,
    /// Longest lifetime of a cut connection, in milliseconds.
    #[arg(long, default_value_t = 500)]
    cut_max_ms: u64,
    /// Most bytes of a reply passed on before a lost reply's reset.
    #[arg(long, default_value_t = 200)]
    reply_bytes: u64,
    /// Reset healthy connections after this many milliseconds (0: never).
    #[arg(long, default_value_t = 1000)]
    max_lifetime_ms: u64,
    /// Seed of the fault choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Remove If-None-Match and If-Match from every request, signing it again with
    /// AWS_SECRET_ACCESS_KEY when that is set: a store that ignores conditional writes.
    #[arg(long)]
    strip_conditional: bool,
    /// Print the counters every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 10)]
    report_every: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kinds = args
        .faults
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| FaultKind::parse(s.trim()).map(|k| (k, 1)))
        .collect::<Result<Vec<_>>>()?;
    let plan = FaultPlan {
        rate: args.rate,
        kinds,
        stall: Duration::try_from_secs_f64(args.stall_secs)
            .context("--stall-secs must be a non-negative number of seconds")?,
        cut_bytes: (args.cut_min_bytes, args.cut_max_bytes),
        reply_bytes: args.reply_bytes,
        cut_after: (
            Duration::from_millis(args.cut_min_ms),
            Duration::from_millis(args.cut_max_ms),
        ),
        max_lifetime: (args.max_lifetime_ms > 0)
            .then(|| Duration::from_millis(args.max_lifetime_ms)),
        strip_conditional: args.strip_conditional.then(StripConditional::from_env),
    };
    let proxy = FaultProxy::start_on(args.listen, &args.upstream, plan, args.seed)?;
    println!("listening on {}", proxy.url());
    eprintln!(
        "forwarding to {} with faults {:?} at rate {}",
        proxy.upstream(),
        proxy.plan().enabled(),
        args.rate
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let every = Duration::from_secs(args.report_every.max(1));
    let mut report = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = report.tick(), if args.report_every > 0 => eprintln!("{}", proxy.counts()),
        }
    }
    eprintln!("stopping: {}", proxy.counts());
    Ok(())
}
