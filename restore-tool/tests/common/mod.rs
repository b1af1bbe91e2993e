//! Test fixtures: a live RocksDB written by the load generator, archived into a repository
//! by the archiver's own pipeline ([`Pipeline`]: WAL follower, segment shipper, checkpoint
//! manager) and base backups, driven step by step, and the generator's oracle to compare
//! restored databases with.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use tidemark_archiver::base::{BaseOptions, take_base_backup};
use tidemark_archiver::config::ArchiverOptions;
use tidemark_archiver::metrics::Metrics;
use tidemark_archiver::preflight::check_database;
use tidemark_archiver::service::open_config;
use tidemark_archiver::service::pipeline::Pipeline;
use tidemark_manifest::model::{BaseSummary, Gap};
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::{self, OpenOptions, RetryPolicy, StoreUrl};
use tidemark_manifest::testing::s3 as test_s3;
use tidemark_restore::commands::restore::{self, RestoreOptions, RestoreReport};
use tidemark_restore::commands::{StoreOptions, Target};
use tidemark_restore::progress::Progress;
use tidemark_restore::{Cancel, RestoreError};
use tidemark_tests::{Generator, Oracle, State, WorkloadConfig};

/// Segments close at this many bytes of records: small, so that restores cross many
/// segments and segment boundaries fall inside WAL files and WAL files inside segments.
pub const SEGMENT_BYTES: u64 = 24 << 10;

/// The open segment closes this long after its first record.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);

/// A generator workload: every batch carries a time marker, so record times are exact and a
/// time target's expected cutoff comes from the oracle's wall times.
pub fn workload(seed: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        max_batch_ops: 24,
        flush_every: 150,
        large_value_every: 45,
        marker_every: 1,
        keys_per_cf: 600,
        once_keys_per_cf: 80,
    }
}

/// The live source database and its oracle.
pub struct Source {
    pub root: TempDir,
    pub db: PathBuf,
    pub oracle_dir: PathBuf,
    pub generator: Option<Generator>,
}

impl Source {
    pub fn new(seed: u64) -> Result<Source> {
        let root = tempfile::tempdir()?;
        let db = root.path().join("db");
        let oracle_dir = root.path().join("oracle");
        let generator = Generator::create(&db, &oracle_dir, workload(seed))?;
        Ok(Source {
            root,
            db,
            oracle_dir,
            generator: Some(generator),
        })
    }

    /// Writes `n` more batches.
    pub fn write(&mut self, n: u64) -> Result<()> {
        let g = self
            .generator
            .as_mut()
            .context("the generator was finished")?;
        for _ in 0..n {
            g.step()?;
        }
        Ok(())
    }

    /// Flushes every column family (new WAL files follow).
    pub fn flush(&mut self) -> Result<()> {
        self.generator
            .as_mut()
            .context("the generator was finished")?
            .flush_all()
    }

    /// Writes `n` batches into WAL files of their own (the generator flushes now and then),
    /// then deletes those files as if they had been deleted before the archiver read them
    /// (their data is in table files by then). Returns the sequence numbers lost.
    pub fn write_lost(&mut self, n: u64) -> Result<(u64, u64)> {
        self.flush()?;
        let first = self.last_seq() + 1;
        let from = *wal_files(&self.db)?
            .iter()
            .max()
            .context("no WAL file after a flush")?;
        self.write(n)?;
        self.flush()?;
        // The newest file is the one written to next: empty yet.
        let mut written: Vec<u64> = wal_files(&self.db)?
            .into_iter()
            .filter(|&l| l >= from)
            .collect();
        written.sort_unstable();
        written.pop();
        ensure!(
            !written.is_empty(),
            "the flush did not start a new WAL file"
        );
        for log in written {
            let name = format!("{log:06}.log");
            // One RocksDB removed itself since the listing is lost all the same.
            if let Some(path) = [self.db.join(&name), self.db.join("archive").join(&name)]
                .into_iter()
                .find(|p| p.exists())
            {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok((first, self.last_seq()))
    }

    pub fn last_seq(&self) -> u64 {
        self.generator.as_ref().map_or(0, Generator::last_seq)
    }

    /// Closes the database and the oracle files.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(g) = self.generator.take() {
            g.finish(false)?;
        }
        Ok(())
    }

    pub fn oracle(&self) -> Result<Oracle> {
        Oracle::open(&self.oracle_dir)
    }

    pub fn identity(&self) -> Result<String> {
        Ok(tidemark_archiver::preflight::check_database(&self.db, None)?.identity)
    }
}

/// The archiver's pipeline and base backups, driven step by step as the service drives
/// them. Manifest generations are written when the pipeline must (the first one, gaps,
/// bases) and when [`Archive::checkpoint`] asks; segments shipped after the last one are
/// found by the tail walk.
pub struct Archive {
    pub repo: Repository,
    pipeline: Pipeline,
    db: PathBuf,
    wal_dir: PathBuf,
    scratch: PathBuf,
    pub bases: Vec<BaseSummary>,
}

impl Archive {
    /// Starts archiving `source` into `repo` as the service does at its first start: the
    /// repository's config, then the WAL from its oldest record.
    pub async fn create(repo: Repository, source: &Source) -> Result<Archive> {
        let check = check_database(&source.db, None)?;
        open_config(&repo, &check, None).await?;
        let state = repo.load().await?;
        let opts = ArchiverOptions {
            db: source.db.clone(),
            sync_interval: SYNC_INTERVAL,
            max_segment_bytes: SEGMENT_BYTES,
            checkpoint_interval: Duration::from_secs(3600),
            ..ArchiverOptions::default()
        };
        let scratch = source.root.path().join("archiver-scratch");
        let metrics = Arc::new(Metrics::new());
        let pipeline =
            Pipeline::resume(&repo, &check.wal_dir, &scratch, &opts, &state, &metrics).await?;
        Ok(Archive {
            repo,
            pipeline,
            db: source.db.clone(),
            wal_dir: check.wal_dir,
            scratch,
            bases: Vec::new(),
        })
    }

    /// Steps the pipeline until everything `source` wrote is read and uploaded: the reader's
    /// view of the repository ends at its last sequence.
    pub async fn catch_up(&mut self, source: &Source) -> Result<()> {
        let target = source.last_seq();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let step = self.pipeline.step().await?;
            let more = self.pipeline.more_ready();
            if step.caught_up && !more && self.archived_to().await? >= target {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the pipeline did not archive up to sequence {target} in time (the store holds \
                 up to {})",
                self.archived_to().await?
            );
            if !more {
                tokio::time::sleep(SYNC_INTERVAL).await;
            }
        }
    }

    /// The last sequence a reader finds in the repository.
    async fn archived_to(&self) -> Result<u64> {
        let state = self.repo.load().await?;
        Ok(state.history.segments.last().map_or(0, |s| s.last_seq))
    }

    /// Archives everything `source` wrote and writes a manifest generation for it.
    pub async fn checkpoint(&mut self, source: &Source) -> Result<()> {
        self.catch_up(source).await?;
        self.pipeline.checkpoint().flush().await?;
        Ok(())
    }

    /// Takes a base backup and records it, as the service does (the base's earliest time
    /// from the pipeline's observed record times); then archives what was written meanwhile.
    pub async fn base(&mut self, source: &Source) -> Result<BaseSummary> {
        self.catch_up(source).await?;
        let opts = BaseOptions {
            earliest_time: Some(self.pipeline.observed_times()),
            ..BaseOptions::default()
        };
        let result =
            take_base_backup(&self.db, &self.wal_dir, &self.scratch, &self.repo, &opts).await?;
        let summary = result.summary.clone();
        let stale = self.pipeline.record_base(result).await?;
        ensure!(!stale, "column families changed under the base backup");
        self.catch_up(source).await?;
        self.bases.push(summary.clone());
        Ok(summary)
    }

    /// The gaps the pipeline recorded, in its newest generation.
    pub fn gaps(&self) -> &[Gap] {
        &self.pipeline.current().gaps
    }
}

/// A local repository in a fresh directory.
pub async fn local_repo(root: &Path) -> Result<(Repository, String)> {
    let dir = root.join("repo");
    std::fs::create_dir_all(&dir)?;
    let url = StoreUrl::local(&dir)?;
    let store = store::open_store_with(
        &url,
        &OpenOptions {
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: std::time::Duration::from_millis(20),
                max_delay: std::time::Duration::from_millis(200),
            },
            ..OpenOptions::default()
        },
    )
    .await?;
    Ok((Repository::new(store), url.to_string()))
}

/// A repository under a fresh prefix of the test run's bucket; returns it, its URL and the
/// store options to reach it.
pub async fn s3_repo(endpoint: &str, case: &str) -> Result<(Repository, StoreOptions)> {
    let prefix = test_s3::prefix(case);
    let bucket = test_s3::bucket(endpoint).await?;
    let from = format!("s3://{bucket}/{prefix}");
    let store = store::open_store(&StoreUrl::parse(&from)?, &test_s3::options(endpoint)).await?;
    let mut opts = StoreOptions::new(from);
    opts.store.endpoint_url = Some(endpoint.to_owned());
    opts.store.path_style = true;
    Ok((Repository::new(store), opts))
}

/// Restores `target` from `repo` into `dir`.
pub async fn restore_to(
    repo: &Repository,
    dir: &Path,
    target: Target,
) -> Result<RestoreReport, RestoreError> {
    let opts = RestoreOptions::new(dir, target);
    restore::run(repo, &opts, &Progress::hidden(), &Cancel::new()).await
}

/// Like [`restore_to`], verified at `level`.
pub async fn restore_verified(
    repo: &Repository,
    dir: &Path,
    target: Target,
    level: tidemark_restore::verify::VerifyMode,
) -> Result<RestoreReport, RestoreError> {
    let opts = RestoreOptions {
        verify: level,
        ..RestoreOptions::new(dir, target)
    };
    restore::run(repo, &opts, &Progress::hidden(), &Cancel::new()).await
}

/// Opens the restored database with the application's options (the generator's, merge
/// operator included) and checks it against the oracle at the restore's cutoff, in every
/// column family. Returns the cutoff.
pub fn check_against_oracle(report: &RestoreReport, oracle: &Oracle) -> Result<u64> {
    let cutoff = report
        .cutoff
        .as_ref()
        .context("the restore has no cutoff")?
        .seq;
    let (state, seq): (State, u64) = tidemark_tests::read_db_state_and_seq(&report.target_dir)?;
    ensure!(
        seq == cutoff,
        "the restored database opens at sequence {seq}, the restore reported {cutoff}"
    );
    let expected = oracle.state_at(cutoff)?;
    if let Some(diff) = expected.diff(&state) {
        bail!("restored to {cutoff}: the state differs from the oracle: {diff}");
    }
    Ok(cutoff)
}

/// The numbers of the WAL files in a database directory and its `archive/`.
fn wal_files(db: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for dir in [db.to_path_buf(), db.join("archive")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Names in a directory (sorted), for "nothing was left behind" checks.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
