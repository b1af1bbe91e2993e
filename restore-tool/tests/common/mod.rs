//! Test fixtures: a live RocksDB written by the load generator, archived into a repository
//! with the archiver's own pieces (WAL follower, base backups, segment encoder, checkpoint
//! manager), and the generator's oracle to compare restored databases with.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use tidemark_archiver::base::{BaseOptions, take_base_backup};
use tidemark_archiver::checkpoint::{CheckpointManager, CheckpointOptions};
use tidemark_archiver::follow::{FollowEvent, StartPosition, WalFollower};
use tidemark_manifest::model::{
    BaseSummary, Compression, FORMAT_VERSION, Gap, GapKind, Lineage, RepositoryConfig,
    time_from_micros,
};
use tidemark_manifest::repo::Repository;
use tidemark_manifest::segment::{Record, SegmentBuilder};
use tidemark_manifest::store::{
    self, ObjectStore, OpenOptions, RetryPolicy, RetryStore, S3Options, S3Store, StoreUrl,
};
use tidemark_restore::commands::restore::{self, RestoreOptions, RestoreReport};
use tidemark_restore::commands::{StoreOptions, TargetSpec};
use tidemark_restore::progress::Progress;
use tidemark_restore::{Cancel, RestoreError};
use tidemark_tests::{Generator, Oracle, State, WorkloadConfig};

/// Records per segment: small, so that restores cross many segments and segment boundaries
/// fall inside WAL files and WAL files inside segments.
pub const RECORDS_PER_SEGMENT: u32 = 37;

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
        Ok(tidemark_archiver::check::check_database(&self.db, None)?.identity)
    }
}

/// The archiver's pieces, driven step by step.
pub struct Archive {
    pub repo: Repository,
    follower: WalFollower,
    checkpoint: CheckpointManager,
    builder: Option<SegmentBuilder>,
    /// (last sequence of a record, its time) for base backups' earliest times.
    times: Arc<Mutex<Vec<(u64, i64)>>>,
    scratch: PathBuf,
    db: PathBuf,
    pub bases: Vec<BaseSummary>,
}

impl Archive {
    /// Creates a repository for `source` in `repo` and starts following its WAL.
    pub async fn create(repo: Repository, source: &Source) -> Result<Archive> {
        repo.create_config(&RepositoryConfig {
            format_version: FORMAT_VERSION,
            repository_id: format!("test-{:08x}", rand::random::<u32>()),
            created_at: time::OffsetDateTime::now_utc(),
            database_identity: source.identity()?,
            lineage: Lineage {
                id: "lineage-1".into(),
                parent: None,
            },
            segment_compression: Compression::Zstd,
            encryption: None,
        })
        .await?;
        let state = repo.load().await?;
        let checkpoint = CheckpointManager::new(repo.clone(), &state, CheckpointOptions::default());
        let follower = WalFollower::new(&source.db, StartPosition::Oldest)?;
        let scratch = source.root.path().join("archiver-scratch");
        std::fs::create_dir_all(&scratch)?;
        Ok(Archive {
            repo,
            follower,
            checkpoint,
            builder: None,
            times: Arc::new(Mutex::new(Vec::new())),
            scratch,
            db: source.db.clone(),
            bases: Vec::new(),
        })
    }

    fn poll(&mut self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for ev in self.follower.poll()? {
            match ev {
                FollowEvent::Record(r) => out.push(r),
                FollowEvent::Rotated { .. } => {}
                FollowEvent::Gap {
                    expected_seq,
                    found_seq,
                    detail,
                } => {
                    bail!("unexpected WAL gap {expected_seq}..{found_seq}: {detail}")
                }
            }
        }
        Ok(out)
    }

    async fn push(&mut self, r: &Record) -> Result<()> {
        self.checkpoint.ensure_started(r.seq).await?;
        self.times
            .lock()
            .unwrap()
            .push((r.next_seq().saturating_sub(1), r.time_us));
        let b = match &mut self.builder {
            Some(b) => b,
            None => self
                .builder
                .insert(SegmentBuilder::new(Compression::Zstd, 3)?),
        };
        b.push(r)?;
        if b.record_count() >= RECORDS_PER_SEGMENT && b.can_finish() {
            self.ship().await?;
        }
        Ok(())
    }

    /// Uploads the open segment, if it can be closed.
    pub async fn ship(&mut self) -> Result<()> {
        if self
            .builder
            .as_ref()
            .is_some_and(SegmentBuilder::can_finish)
        {
            let seg = self.builder.take().expect("checked").finish()?;
            self.repo.write_segment(&seg).await?;
            self.checkpoint.segment_uploaded(seg.entry());
        }
        Ok(())
    }

    /// Reads and ships everything the WAL holds now.
    pub async fn catch_up(&mut self) -> Result<()> {
        loop {
            let records = self.poll()?;
            if records.is_empty() {
                break;
            }
            for r in &records {
                self.push(r).await?;
            }
        }
        self.ship().await
    }

    /// Writes a manifest generation for the shipped segments.
    pub async fn checkpoint(&mut self) -> Result<()> {
        self.catch_up().await?;
        self.checkpoint.flush().await?;
        Ok(())
    }

    /// Takes a base backup and records it.
    pub async fn base(&mut self) -> Result<BaseSummary> {
        self.catch_up().await?;
        let times = Arc::clone(&self.times);
        let opts = BaseOptions {
            earliest_time: Some(Arc::new(move |seq| {
                let t = times.lock().unwrap();
                let i = t.partition_point(|(last, _)| *last < seq);
                t.get(i).map(|(_, us)| time_from_micros(*us))
            })),
            ..BaseOptions::default()
        };
        let result = take_base_backup(&self.db, &self.db, &self.scratch, &self.repo, &opts).await?;
        self.catch_up().await?;
        self.checkpoint.add_base(result.summary.clone()).await?;
        self.bases.push(result.summary.clone());
        Ok(result.summary)
    }

    /// Drops the next `n` records the WAL holds (as if their WAL file had been deleted
    /// before it was read) and records them as a gap. Returns the gap.
    pub async fn lose(&mut self, n: usize) -> Result<Gap> {
        self.ship().await?;
        let mut records = self.poll()?;
        ensure!(
            records.len() > n,
            "only {} records to lose from",
            records.len()
        );
        let rest = records.split_off(n);
        let gap = Gap {
            first_seq: records[0].seq,
            last_seq: records[n - 1].next_seq() - 1,
            kind: GapKind::MissingWal,
            detected_at: time::OffsetDateTime::now_utc(),
            detail: "test: records dropped before they were archived".into(),
        };
        self.checkpoint.add_gap(gap.clone()).await?;
        for r in &rest {
            self.push(r).await?;
        }
        self.catch_up().await?;
        Ok(gap)
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

/// The S3 endpoint to test against, or `None` (after saying so loudly) to skip.
pub fn s3_endpoint(case: &str) -> Option<String> {
    match std::env::var("TIDEMARK_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ => {
            if std::env::var("TIDEMARK_REQUIRE_S3").as_deref() == Ok("1") {
                panic!(
                    "TIDEMARK_REQUIRE_S3=1 but TIDEMARK_TEST_S3_ENDPOINT is not set: start a \
                     server with `scripts/s3-server.sh start` and run \
                     `eval \"$(scripts/s3-server.sh env)\"` first"
                );
            }
            eprintln!(
                "!!! skipped: no S3 server for {case} (set TIDEMARK_TEST_S3_ENDPOINT, see \
                 scripts/s3-server.sh; TIDEMARK_REQUIRE_S3=1 makes this a failure)"
            );
            None
        }
    }
}

/// The bucket given in `TIDEMARK_TEST_S3_BUCKET` (used as it is, never created), or one
/// per test run.
fn bucket_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        if let Ok(bucket) = std::env::var("TIDEMARK_TEST_S3_BUCKET")
            && !bucket.is_empty()
        {
            return bucket;
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        format!("tidemark-restore-{}-{secs}", std::process::id())
    })
}

/// A repository under a fresh prefix of the test run's bucket; returns it, its URL and the
/// store options to reach it.
pub async fn s3_repo(endpoint: &str, case: &str) -> Result<(Repository, StoreOptions)> {
    // Under TIDEMARK_TEST_S3_PREFIX, if given.
    let base = std::env::var("TIDEMARK_TEST_S3_PREFIX").unwrap_or_default();
    let base = base.trim_matches('/');
    let under = if base.is_empty() { "" } else { "/" };
    let prefix = format!("{base}{under}{case}-{:08x}", rand::random::<u32>());
    let s3 = S3Options {
        endpoint_url: Some(endpoint.to_owned()),
        force_path_style: true,
        ..S3Options::default()
    };
    let raw = S3Store::connect(bucket_name(), &prefix, &s3).await?;
    let given = std::env::var("TIDEMARK_TEST_S3_BUCKET").is_ok_and(|b| !b.is_empty());
    if !given
        && let Err(e) = raw
            .client()
            .create_bucket()
            .bucket(raw.bucket())
            .send()
            .await
    {
        let ok = e
            .as_service_error()
            .is_some_and(|s| s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists());
        ensure!(ok, "cannot create bucket {}: {e:?}", raw.bucket());
    }
    let store: Arc<dyn ObjectStore> =
        Arc::new(RetryStore::new(Arc::new(raw), RetryPolicy::default()));
    let mut opts = StoreOptions::new(format!("s3://{}/{prefix}", bucket_name()));
    opts.store.endpoint_url = Some(endpoint.to_owned());
    opts.store.path_style = true;
    Ok((Repository::new(store), opts))
}

/// Restores `target` from `repo` into `dir`.
pub async fn restore_to(
    repo: &Repository,
    dir: &Path,
    target: TargetSpec,
) -> Result<RestoreReport, RestoreError> {
    let opts = RestoreOptions::new(dir, target);
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
