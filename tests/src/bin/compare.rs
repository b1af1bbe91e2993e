//! `tidemark-compare`: checks a restored database against the load generator's oracle.
//!
//! `tidemark-compare --db DIR --oracle DIR [--seq N | --time RFC3339]` opens DIR read-only
//! with the generator's options (merge operator included), reads every column family, and
//! compares it with the state the oracle says the database had at N (or at the last batch
//! written at or before the time; default: at the restored database's own last sequence).
//! Prints one line; exits 0 when they are equal, 1 with the first differing key otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tidemark_tests::{Oracle, read_db_state_and_seq};

#[derive(Debug, Parser)]
#[command(
    name = "tidemark-compare",
    about = "Compare a database with the load generator's oracle"
)]
struct Args {
    /// The database to check.
    #[arg(long)]
    db: PathBuf,
    /// The load generator's output directory.
    #[arg(long)]
    oracle: PathBuf,
    /// The sequence number the database should be at.
    #[arg(long, conflicts_with = "time")]
    seq: Option<u64>,
    /// The time the database should be at (RFC 3339): the last batch written at or before it.
    #[arg(long)]
    time: Option<String>,
}

fn run(args: Args) -> Result<bool> {
    let oracle = Oracle::open(&args.oracle)?;
    let (actual, db_seq) = read_db_state_and_seq(&args.db)?;
    let expected_seq = match (args.seq, &args.time) {
        (Some(s), _) => s,
        (None, Some(t)) => {
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("invalid --time {t:?}: use RFC 3339"))?;
            oracle.seq_at_time((t.unix_timestamp_nanos() / 1000) as i64)
        }
        (None, None) => db_seq,
    };
    if db_seq != expected_seq {
        println!("MISMATCH: the database is at sequence {db_seq}, expected {expected_seq}");
        return Ok(false);
    }
    let expected = oracle.state_at(expected_seq)?;
    match expected.diff(&actual) {
        None => {
            let keys: usize = actual
                .cf_names()
                .map(|n| actual.cf(n).map_or(0, |c| c.len()))
                .sum();
            println!(
                "OK: {} equals the written state at sequence {expected_seq} ({keys} keys in {} column families)",
                args.db.display(),
                actual.cf_names().count()
            );
            Ok(true)
        }
        Some(d) => {
            println!("MISMATCH at sequence {expected_seq}: {d}");
            Ok(false)
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tidemark-compare: {e:#}");
            ExitCode::from(2)
        }
    }
}
