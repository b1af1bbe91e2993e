//! `tidemark-archiver copy`: brings a second repository of the same database up to date
//! with a first, incrementally (FORMAT.md §4.7). The destination is the same repository
//! (its id, database and lineage), with its own store settings, encryption and lease: the
//! copy holds the destination's writer lease while it writes, so no archiver writes there
//! meanwhile. What it lacks, in write order, and the checks of a destination that diverged
//! are [`tidemark_manifest::copy`]'s; this module holds the lease, runs the plan, and
//! reports.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tidemark_manifest::cli::{StoreAccess, StoreArgs};
use tidemark_manifest::copy::{self, Copied, CopyError, CopyItem, CopyPlan};
use tidemark_manifest::exit;
use tidemark_manifest::model::BaseDescriptor;
use tidemark_manifest::repo::{RepoError, RepoState, Repository};
use tidemark_manifest::store::EncryptionKey;
use time::OffsetDateTime;

use crate::lease::{LeaseError, LeaseHandle};
use crate::lease_keeper::{LeaseFence, LeaseKeeper};

/// What `copy` copies, from where to where, and how.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The source repository's URL.
    pub from: String,
    /// The destination repository's URL.
    pub to: String,
    /// How to reach the source (read only), with its key.
    pub source: StoreAccess,
    /// How to reach and write the destination.
    pub destination: StoreArgs,
    /// The destination's encryption key (never taken from the source's settings).
    pub destination_key: Option<EncryptionKey>,
    /// The destination's lease lasts this long without renewal.
    pub lease_ttl: Duration,
    /// Plan and report only.
    pub dry_run: bool,
    /// Run again this long after each run ends, until stopped ([`copy_every`]).
    pub every: Option<Duration>,
    /// A copy of a source written with S3 Object Lock may go where objects cannot be locked.
    pub unlocked_copy: bool,
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyFailure {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(
        "cannot create a temporary directory in {}: {source}; set TMPDIR to a writable directory",
        dir.display()
    )]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CopyFailure {
    /// The exit code (`tidemark_manifest::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CopyFailure::Lease(LeaseError::Held { .. } | LeaseError::Lost { .. }) => {
                exit::LEASE_HELD
            }
            CopyFailure::Lease(_) | CopyFailure::Scratch { .. } => exit::FAILURE,
            CopyFailure::Copy(e) if e.is_usage() => exit::USAGE,
            CopyFailure::Copy(e) if e.is_damage() => exit::VERIFICATION_FAILED,
            CopyFailure::Copy(_) => exit::FAILURE,
        }
    }
}

/// One object of a dry run's plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedObject {
    pub key: String,
    pub size: u64,
}

/// What a copy did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    pub dry_run: bool,
    /// The source's current generation, whose content the destination now holds.
    pub source_generation: u64,
    /// The destination's current generation before the copy.
    pub destination_generation_before: u64,
    /// The generation written at the destination, if one was.
    pub generation_written: Option<u64>,
    /// Objects read from the source and written to the destination, and their bytes.
    pub objects_copied: u64,
    pub bytes_copied: u64,
    /// Objects found already at the destination (left by an interrupted copy), verified
    /// there and not written again.
    pub objects_verified: u64,
    /// Objects the destination's current state already held: not read at all.
    pub objects_skipped: u64,
    /// The last sequence number the destination holds.
    pub reached_seq: Option<u64>,
    /// With `--dry-run`: the objects that would be copied, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<PlannedObject>,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would copy" } else { "copied" };
        writeln!(f, "{} -> {}", self.from, self.to)?;
        writeln!(
            f,
            "{verb} {} objects ({} bytes); {} already there and verified; {} already in the \
             destination's manifest",
            self.objects_copied, self.bytes_copied, self.objects_verified, self.objects_skipped
        )?;
        match self.generation_written {
            Some(g) => writeln!(
                f,
                "destination generation {g} {} source generation {}",
                if self.dry_run { "would hold" } else { "holds" },
                self.source_generation
            )?,
            None => writeln!(
                f,
                "the destination's generation {} already holds source generation {}",
                self.destination_generation_before, self.source_generation
            )?,
        }
        match self.reached_seq {
            Some(s) => writeln!(f, "the destination holds every sequence up to {s}")?,
            None => writeln!(f, "nothing is archived yet")?,
        }
        for p in &self.planned {
            writeln!(f, "  {} ({} bytes)", p.key, p.size)?;
        }
        Ok(())
    }
}

fn source_err(repo: &str, e: RepoError) -> CopyError {
    CopyError::Source {
        location: repo.to_owned(),
        source: e,
    }
}

fn dest_err(repo: &Repository, e: RepoError) -> CopyError {
    CopyError::Destination {
        location: repo.location(),
        source: e,
    }
}

/// Runs a copy, then another `every` after each one ends, until `shutdown` resolves (a run
/// under way is then abandoned as a crash would leave it: the next run resumes it, once the
/// destination's lease has expired). Each run's report goes to `on_report`. A run that
/// fails because a store failed or the destination's lease is held (a `prune` there) is
/// logged and tried again at the next run; any other failure ends the loop.
pub async fn copy_every(
    o: &CopyOptions,
    every: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    mut on_report: impl FnMut(&CopyReport),
) -> Result<(), CopyFailure> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = copy_once(o) => match r {
                Ok(report) => on_report(&report),
                Err(e) if matches!(e.exit_code(), exit::FAILURE | exit::LEASE_HELD) => {
                    tracing::warn!(error = %e, next_in = ?every, "the copy failed; trying again");
                }
                Err(e) => return Err(e),
            },
            _ = &mut shutdown => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// The source's current state and the descriptors of its current generation's bases.
struct Source {
    state: RepoState,
    bases: Vec<BaseDescriptor>,
}

/// Reads the source's current state (FORMAT.md §4.4), as a writer would: its newest
/// generation must be intact.
async fn read_source(o: &CopyOptions, source: &Repository) -> Result<Source, CopyError> {
    let state = source.load().await.map_err(|e| source_err(&o.from, e))?;
    let mut bases = Vec::new();
    if let Some(g) = &state.generation {
        for b in &g.bases {
            let d = source
                .read_base(g.generation, b)
                .await
                .map_err(|e| source_err(&o.from, e))?;
            bases.push(d);
        }
    }
    Ok(Source { state, bases })
}

/// Runs one copy: reads the source, takes the destination's lease (unless a dry run),
/// plans, copies, writes the destination's generation, copies the tail, releases the lease.
pub async fn copy_once(o: &CopyOptions) -> Result<CopyReport, CopyFailure> {
    let source = o
        .source
        .open(&o.from)
        .await
        .map_err(|e| source_err(&o.from, e))?;
    let src = read_source(o, &source).await?;
    let destination = o
        .destination
        .open_with_key(&o.to, !o.dry_run, o.destination_key.as_ref())
        .await
        .map_err(|e| CopyError::Destination {
            location: o.to.clone(),
            source: e,
        })?;
    if o.dry_run {
        return run(o, &source, &src, &destination, None).await;
    }
    let lease = LeaseHandle::acquire(&destination, o.lease_ttl).await?;
    let keeper = LeaseKeeper::start(&destination, lease, o.lease_ttl, None);
    let fence = keeper.fence();
    let result = run(o, &source, &src, &destination, Some(&fence)).await;
    match keeper.stop().await {
        Ok(lease) => {
            if let Err(e) = lease.release().await {
                tracing::warn!(error = %e, "could not release the destination's lease; it expires by itself");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the destination's lease was gone when the copy ended")
        }
    }
    result
}

/// Plans against both sides' current state and, holding `fence`, carries the plan out.
async fn run(
    o: &CopyOptions,
    source: &Repository,
    src: &Source,
    destination: &Repository,
    fence: Option<&LeaseFence>,
) -> Result<CopyReport, CopyFailure> {
    let src_state = &src.state;
    let dst_state = copy::destination_state(destination)
        .await
        .map_err(|e| dest_err(destination, e))?;
    let create_config = match &dst_state {
        Some(d) => {
            copy::check_same_repository(&o.from, &o.to, &src_state.config, &d.state.config)?;
            copy::check_not_diverged(&o.from, &o.to, src_state, d)?;
            None
        }
        None => {
            let lockable = match src_state.config.object_lock {
                Some(_) => destination
                    .store()
                    .check_object_lock()
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            };
            Some(copy::destination_config(
                &o.from,
                &o.to,
                &src_state.config,
                destination,
                lockable,
                o.unlocked_copy,
            )?)
        }
    };
    let plan = copy::plan_copy(
        src_state,
        &src.bases,
        dst_state.as_ref(),
        create_config,
        crate::checkpoint::writer(),
        OffsetDateTime::now_utc(),
    );
    let mut report = report_of(o, &plan);
    if let Some(fence) = fence {
        carry_out(o, source, destination, &plan, fence, &mut report).await?;
    } else {
        report.objects_copied = plan.objects().count() as u64;
        report.bytes_copied = plan.objects().map(CopyItem::size).sum();
        report.planned = plan
            .objects()
            .map(|i| PlannedObject {
                key: i.key().to_owned(),
                size: i.size(),
            })
            .collect();
    }
    Ok(report)
}

fn report_of(o: &CopyOptions, plan: &CopyPlan) -> CopyReport {
    CopyReport {
        from: o.from.clone(),
        to: o.to.clone(),
        dry_run: o.dry_run,
        source_generation: plan.source_generation,
        destination_generation_before: plan.destination_generation,
        generation_written: plan.generation.as_ref().map(|g| g.generation),
        objects_skipped: plan.already_there,
        reached_seq: plan.reaches_seq,
        ..CopyReport::default()
    }
}

/// Writes the plan at the destination in its order, asking the fence before each write.
async fn carry_out(
    o: &CopyOptions,
    source: &Repository,
    destination: &Repository,
    plan: &CopyPlan,
    fence: &LeaseFence,
    report: &mut CopyReport,
) -> Result<(), CopyFailure> {
    let scratch = Scratch::new().map_err(|source| CopyFailure::Scratch {
        dir: std::env::temp_dir(),
        source,
    })?;
    if let Some(config) = &plan.create_config {
        fence.check()?;
        let made = destination
            .create_config(config)
            .await
            .map_err(|e| dest_err(destination, e))?;
        copy::check_same_repository(&o.from, &o.to, config, &made)?;
        tracing::info!(location = %destination.location(), "created the destination repository's config");
    }
    for item in &plan.before {
        copy_one(source, destination, item, &scratch.0, fence, report).await?;
    }
    if let Some(g) = &plan.generation {
        fence.check()?;
        destination
            .write_generation(g)
            .await
            .map_err(|e| dest_err(destination, e))?;
        tracing::info!(
            generation = g.generation,
            source_generation = plan.source_generation,
            "wrote the destination's generation"
        );
    }
    for item in &plan.tail {
        copy_one(source, destination, item, &scratch.0, fence, report).await?;
    }
    Ok(())
}

async fn copy_one(
    source: &Repository,
    destination: &Repository,
    item: &CopyItem,
    scratch: &Path,
    fence: &LeaseFence,
    report: &mut CopyReport,
) -> Result<(), CopyFailure> {
    copy::check_item_key(item).map_err(|e| source_err(&source.location(), e))?;
    fence.check()?;
    match copy::copy_object(source, destination, item, scratch).await? {
        Copied::Written => {
            report.objects_copied += 1;
            report.bytes_copied += item.size();
            tracing::debug!(key = item.key(), size = item.size(), "copied");
        }
        Copied::Verified => {
            report.objects_verified += 1;
            tracing::info!(
                key = item.key(),
                "already at the destination and verified there"
            );
        }
        Copied::Kept => {
            report.objects_skipped += 1;
            tracing::debug!(
                key = item.key(),
                "listed at the destination, still locked: kept"
            );
        }
    }
    Ok(())
}

/// A private directory for the temporary file of the object in transit, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("tidemark-copy-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
