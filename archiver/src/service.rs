//! The archiver as a long-lived service: one `tokio::select!` loop that hands each wake-up
//! to its owner.
//!
//! - `pipeline`: watch → follow → ship → checkpoint, one step at a time; `catch_up` says
//!   when it reads a backlog (compressed at a faster level);
//! - `bases`: when the next base backup is due, and the one in progress; `replay` (fed by
//!   the pipeline) says when the WAL a restore would replay calls for one early;
//! - `retention`: the retention policy's mark step, and its sweep in the background;
//! - [`crate::lease_keeper`]: renews the lease in the background; the service stops when
//!   it is lost.
//!
//! Every background task is held by its owner and aborted when the owner is dropped, so an
//! error return leaves nothing running (FORMAT.md §4.6: a sweep and a base backup never
//! overlap).
//!
//! Start-up: check the database, open the repository, refuse it if the database is a
//! restored copy of another lineage (its origin file, FORMAT.md §11), take the lease, create
//! the repository config if there is none (naming a restored database's parent), load the
//! current state, and resume the WAL right after the last archived record. Shutdown (SIGTERM/SIGINT, or the caller's future): stop a sweep, let a
//! base backup in progress finish for a while, ship the open segment, write a final
//! generation, release the lease.

mod bases;
mod catch_up;
mod cf_watch;
pub mod pipeline;
mod reader;
mod replay;
mod retention;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_manifest::lock::{self, RetentionFit};
use tidemark_manifest::model::{
    Compression, FORMAT_VERSION, Lineage, ObjectLock, RepositoryConfig,
};
use tidemark_manifest::origin::{self, LineageError};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::store::StoreError;
use time::OffsetDateTime;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::base::BaseError;
pub use crate::config::ArchiverOptions;
use crate::follow::FollowError;
use crate::lease::{LeaseError, LeaseHandle};
use crate::lease_keeper::{KeeperError, LeaseKeeper};
use crate::metrics::{Metrics, Phase};
use crate::preflight::{CheckError, DbCheck, check_database};
use crate::request::Inbox;
use crate::ship::ShipError;
use crate::watch::WatchError;

use self::bases::Bases;
use self::pipeline::Pipeline;
use self::retention::Retention;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Ship(#[from] ShipError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Lineage(#[from] LineageError),
    #[error(
        "the database's sequence number went back: the repository has archived up to {archived}, \
         the database's WAL continues at {found}. Was it restored or replaced? Archive it to a \
         new repository URL"
    )]
    Diverged { archived: u64, found: u64 },
    #[error("cannot serve metrics on {addr}: {source}; pass a free HOST:PORT as --metrics-addr")]
    MetricsAddr {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    StoreCheck(#[from] crate::check_store::StartCheckError),
    #[error("{0}")]
    Other(String),
}

impl ServiceError {
    /// The binary's exit code ([`tidemark_manifest::exit`]): `USAGE` for configuration or
    /// usage, `LEASE_HELD` for another writer or a lost race, `FAILURE` for anything else.
    pub fn exit_code(&self) -> u8 {
        use tidemark_manifest::exit;
        match self {
            ServiceError::Check(_) | ServiceError::Diverged { .. } | ServiceError::Lineage(_) => {
                exit::USAGE
            }
            ServiceError::MetricsAddr { .. } => exit::USAGE,
            ServiceError::StoreCheck(
                crate::check_store::StartCheckError::Unsafe(_)
                | crate::check_store::StartCheckError::Store(StoreError::Config { .. }),
            ) => exit::USAGE,
            ServiceError::Store(StoreError::Config { .. }) => exit::USAGE,
            ServiceError::Repo(e) if e.is_usage() => exit::USAGE,
            ServiceError::Lease(LeaseError::Held { .. } | LeaseError::Lost { .. }) => {
                exit::LEASE_HELD
            }
            ServiceError::Repo(RepoError::LostRace { .. } | RepoError::Conflict { .. }) => {
                exit::LEASE_HELD
            }
            _ => exit::FAILURE,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub records: u64,
    pub segments: u64,
    pub bases: u64,
    pub gaps: u64,
    pub last_seq: Option<u64>,
}

impl From<KeeperError> for ServiceError {
    fn from(e: KeeperError) -> ServiceError {
        match e {
            KeeperError::Lost(e) => ServiceError::Lease(e),
            e => ServiceError::Other(e.to_string()),
        }
    }
}

/// Runs the archiver until `shutdown` resolves (or, with `exit_when_caught_up`, until it is
/// caught up and a base backup exists). `base_requests` wakes it to take a base backup now.
pub async fn run(
    opts: ArchiverOptions,
    shutdown: impl Future<Output = ()>,
    base_requests: UnboundedReceiver<()>,
) -> Result<RunSummary, ServiceError> {
    let metrics = Arc::new(Metrics::new());
    let _metrics_server = serve_metrics(opts.metrics_addr.as_deref(), Arc::clone(&metrics)).await?;
    run_with_metrics(opts, metrics, shutdown, base_requests).await
}

/// Serves `exporter` on `addr` when one is configured; the server stops when dropped.
pub(crate) async fn serve_metrics<E: crate::metrics::Exporter>(
    addr: Option<&str>,
    exporter: Arc<E>,
) -> Result<Option<crate::metrics::MetricsServer>, ServiceError> {
    match addr {
        Some(addr) => crate::metrics::serve(addr, exporter)
            .await
            .map(Some)
            .map_err(|source| ServiceError::MetricsAddr {
                addr: addr.to_owned(),
                source,
            }),
        None => Ok(None),
    }
}

/// What [`run`] does, reporting to `metrics` without serving them (`opts.metrics_addr` is
/// not used): the caller serves them, as [`crate::fleet`] does for several databases.
pub async fn run_with_metrics(
    opts: ArchiverOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    mut base_requests: UnboundedReceiver<()>,
) -> Result<RunSummary, ServiceError> {
    let check = check_database(&opts.db, opts.wal_dir.as_deref())?;
    let repo = opts.store.open(&opts.to, true).await?;
    if let Some(config) = repo.read_config().await? {
        check_lineage(&repo, &check, &config)?;
    }
    let lock = object_lock_at_start(&repo, &opts).await?;
    crate::check_store::check_at_start(&opts.to, &opts.store, opts.allow_unsafe_store).await?;
    tracing::info!(
        db = %opts.db.display(),
        to = %repo.location(),
        encryption = repo
            .encryption()
            .map_or_else(|| "none".to_owned(), |e| format!("client-side, key id {}", e.key_id)),
        object_lock = lock.map_or_else(|| "none".to_owned(), |l| l.to_string()),
        "starting"
    );
    let lease = LeaseHandle::acquire_beside(&repo, opts.lease_ttl, &opts.db).await?;
    metrics.lease_held_until(Some(lease.lease().expires_at));
    let keeper = LeaseKeeper::start(&repo, lease, opts.lease_ttl, Some(Arc::clone(&metrics)));
    let result = run_holding_lease(
        &opts,
        &check,
        &repo,
        keeper,
        shutdown,
        &mut base_requests,
        &metrics,
    )
    .await;
    metrics.lease_held_until(None);
    metrics.set_phase(Phase::Stopped);
    if let Err(e) = &result {
        tracing::error!(error = %e, "archiver stopped");
    }
    result
}

/// What woke the service up.
enum Wake {
    Shutdown,
    Base(Box<bases::Finished>),
    Sweep(retention::Swept),
    BaseRequested,
    Pipeline,
}

async fn run_holding_lease(
    opts: &ArchiverOptions,
    check: &DbCheck,
    repo: &Repository,
    mut keeper: LeaseKeeper,
    shutdown: impl Future<Output = ()>,
    base_requests: &mut UnboundedReceiver<()>,
    metrics: &Arc<Metrics>,
) -> Result<RunSummary, ServiceError> {
    open_config(repo, check, opts.object_lock()).await?;
    let state = repo.load().await?;
    let scratch = opts
        .scratch_dir
        .clone()
        .unwrap_or_else(|| default_scratch(&opts.db));
    let mut pipeline =
        Pipeline::resume(repo, &check.wal_dir, &scratch, opts, &state, metrics).await?;
    let wal_dir = check.wal_dir.clone();
    let mut bases = Bases::new(opts, wal_dir, scratch.clone(), repo, &state, metrics);
    let mut retention = Retention::new(opts.retention.clone(), repo, keeper.fence(), metrics);
    let mut inbox = Inbox::new(&scratch);
    metrics.set_phase(Phase::Running);
    tokio::pin!(shutdown);

    loop {
        let step = pipeline.step().await?;
        // A request from `tidemark-archiver backup` (crate::request).
        let requested = inbox.take();
        if step.gap || (step.cf_changed && !bases.running()) || requested {
            bases.needed_now();
        }
        if step.caught_up && opts.exit_when_caught_up && bases.settled() {
            break;
        }
        let was_running = bases.running();
        bases.start_if_due(&pipeline, retention.sweeping());
        if bases.running() && !was_running {
            inbox.base_started();
        }
        retention
            .mark_if_due(&mut pipeline, bases.running())
            .await?;

        let wake_at = [pipeline.wake_at(), bases.wake_at(), retention.wake_at()]
            .into_iter()
            .flatten()
            .fold(Instant::now() + Duration::from_secs(5), Instant::min);
        // A running base asks the follower for its earliest record's time: read promptly.
        pipeline.read_promptly(bases.running());
        // Catching up: read on at once, unless something else happened.
        let more = pipeline.more_ready();
        let wake = tokio::select! {
            biased;
            _ = &mut shutdown => Wake::Shutdown,
            e = keeper.gone() => return Err(e.into()),
            r = bases.finished() => Wake::Base(Box::new(r)),
            r = retention.finished() => Wake::Sweep(r),
            Some(()) = base_requests.recv() => Wake::BaseRequested,
            _ = tokio::task::yield_now(), if more => Wake::Pipeline,
            _ = pipeline.wal_changed(), if !more => Wake::Pipeline,
            _ = tokio::time::sleep_until(wake_at.into()), if !more => Wake::Pipeline,
        };
        match wake {
            Wake::Shutdown => {
                tracing::info!("shutting down");
                break;
            }
            Wake::Base(finished) => {
                inbox.base_ended(bases::outcome(&finished));
                if bases.on_finished(*finished, &mut pipeline).await? {
                    retention.after_base();
                }
                if inbox.waiting() {
                    // Taken while that base ran: the next one is theirs.
                    bases.needed_now();
                }
            }
            Wake::Sweep(swept) => retention.on_finished(swept),
            Wake::BaseRequested => {
                tracing::info!("base backup requested");
                bases.needed_now();
            }
            Wake::Pipeline => {}
        }
    }

    // A sweep in progress is stopped: it only deletes unreferenced objects, and the next one
    // finishes its work. A base in progress may finish for a while.
    metrics.set_phase(Phase::Stopping);
    drop(retention);
    let finished_base = bases.stop().await;
    if let Some(base) = &finished_base {
        inbox.base_ended(Ok(base.summary.id.clone()));
    }
    inbox.stopped();
    let summary = pipeline.finish(finished_base).await?;
    match keeper.stop().await {
        Ok(lease) => {
            if let Err(e) = lease.release().await {
                tracing::error!(error = %e, "could not release the lease; it expires by itself");
            }
        }
        Err(e) => tracing::error!(error = %e, "the lease was gone at shutdown"),
    }
    tracing::info!(
        records = summary.records,
        segments = summary.segments,
        bases = summary.bases,
        last_seq = ?summary.last_seq,
        "stopped"
    );
    Ok(summary)
}

/// The object lock the archiver writes with (FORMAT.md §3.2): the repository's recorded one,
/// or for a new repository the one the options ask for; refused on a store that cannot lock,
/// when the options disagree with the recorded one, and when it makes the retention policy
/// impossible. The store is set to write with it.
async fn object_lock_at_start(
    repo: &Repository,
    opts: &ArchiverOptions,
) -> Result<Option<ObjectLock>, ServiceError> {
    let Some(lock) = repo.writer_object_lock(opts.object_lock()).await? else {
        return Ok(None);
    };
    let fit = lock::check_retention(&lock, opts.retention_horizon(), OffsetDateTime::now_utc())
        .map_err(|source| RepoError::Lock {
            location: repo.location(),
            source,
        })?;
    match fit {
        RetentionFit::Shorter { unprotected_days } => tracing::info!(
            %lock,
            unprotected_days,
            "objects older than the lock stay unprotected for the rest of the time retention \
             keeps them"
        ),
        RetentionFit::Longer { extra_days } if extra_days > 0 => tracing::info!(
            %lock,
            extra_days,
            "objects retention drops stay stored (and billed) until their lock ends"
        ),
        RetentionFit::Longer { .. } | RetentionFit::Unknown => {}
    }
    Ok(Some(lock))
}

/// Creates the repository config if there is none (with `lock`, the object lock the
/// options ask for, checked at start); refuses a repository of another database, or of
/// another lineage than a restored database's own, or one created meanwhile with another
/// lock than the one asked for.
pub async fn open_config(
    repo: &Repository,
    check: &DbCheck,
    lock: Option<ObjectLock>,
) -> Result<(), ServiceError> {
    let config = match repo.read_config().await? {
        Some(c) => c,
        None => repo.create_config(&new_config(repo, check, lock)).await?,
    };
    if lock.is_some() && config.object_lock != lock {
        return Err(RepoError::lock_mismatch(repo.location(), config.object_lock, lock).into());
    }
    check_lineage(repo, check, &config)?;
    if config.database_identity != check.identity {
        return Err(RepoError::WrongDatabase {
            location: repo.location(),
            expected: check.identity.clone(),
            found: config.database_identity,
        }
        .into());
    }
    Ok(())
}

/// The config of a new repository for the database: a restored database's names its
/// parent (FORMAT.md §11), any other starts a lineage of its own.
fn new_config(repo: &Repository, check: &DbCheck, lock: Option<ObjectLock>) -> RepositoryConfig {
    let lineage = match &check.origin {
        Some(origin) => origin.lineage(),
        None => Lineage {
            id: uuid::Uuid::new_v4().to_string(),
            parent: None,
        },
    };
    RepositoryConfig {
        format_version: FORMAT_VERSION,
        repository_id: uuid::Uuid::new_v4().to_string(),
        created_at: OffsetDateTime::now_utc(),
        database_identity: check.identity.clone(),
        lineage,
        segment_compression: Compression::Zstd,
        encryption: repo.encryption().cloned(),
        object_lock: lock,
    }
}

/// A restored database is archived only into its own lineage's repository: never into
/// the one it was restored from (nothing is written there before this is checked).
fn check_lineage(
    repo: &Repository,
    check: &DbCheck,
    config: &RepositoryConfig,
) -> Result<(), LineageError> {
    match &check.origin {
        Some(o) => o.check_repository(config, &repo.url(), &origin::file_path(&check.db_dir)),
        None => Ok(()),
    }
}

pub(crate) fn default_scratch(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".to_owned());
    db.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!(".{name}.tidemark-scratch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../scripts/archiver.example.toml");
        let o: ArchiverOptions = toml::from_str(text).unwrap();
        assert_eq!(o.to, "s3://acme-backups/tidemark/orders");
        assert_eq!(o.base_interval, Duration::from_secs(86_400));
        assert_eq!(o.sync_interval, Duration::from_secs(1));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = toml::from_str::<ArchiverOptions>("sync_interval = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = toml::from_str::<ArchiverOptions>("colour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn only_another_archiver_is_lease_held() {
        use tidemark_manifest::exit;
        let held = ServiceError::Lease(LeaseError::Held {
            location: "s3://b/p".into(),
            holder: "h".into(),
            host: "host".into(),
            pid: 1,
            expires_at: "later".into(),
        });
        assert_eq!(held.exit_code(), exit::LEASE_HELD);
        let lost = ServiceError::Lease(LeaseError::Lost {
            location: "s3://b/p".into(),
        });
        assert_eq!(lost.exit_code(), exit::LEASE_HELD);
        // The store failing while the lease is renewed is a runtime failure, not a second
        // archiver: a supervisor must restart it.
        let unreachable = ServiceError::Lease(LeaseError::Store(StoreError::Transient {
            op: tidemark_manifest::store::StoreOp::PutIfMatch,
            key: "lease.json".into(),
            location: "s3://b/p/lease.json".into(),
            source: "connection refused".into(),
        }));
        assert_eq!(unreachable.exit_code(), exit::FAILURE);
    }
}
