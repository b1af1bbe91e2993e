//! Several databases in one archiver process: a supervisor per database that runs
//! [`service::run_with_metrics`] and starts it again, after a backoff, whenever it fails.
//! The `[[databases]]` form of the config file that lists them is read by
//! [`crate::config::file`].
//!
//! Isolation: each database runs in its own task, its failures (a directory that is missing,
//! options that cannot be archived, a store that cannot be reached or refuses the
//! credentials, a lease held or lost, a panic) stop only that database, which is reported
//! (log, `tidemark_database_up`, `/health`, the final summary) and started again with a
//! backoff of 5 s doubling to 5 min, so that an operator can fix the cause without touching
//! the others. One-shot runs (`exit_when_caught_up`) are not retried.
//!
//! Base backups on request: SIGUSR1 asks every database for one, unless request files
//! ([`request_base`], written by `tidemark-archiver backup --database NAME`) name some: then
//! only those.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_manifest::exit;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::config::{Database, FleetConfig};
use crate::metrics::{FleetMetrics, Metrics, Phase};
use crate::service::{self, ArchiverOptions, RunSummary, ServiceError};

/// The first wait before a failed database is started again; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait before a failed database is started again.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// The name of the file, in a database's scratch directory, that asks a running process for
/// a base backup of that database at the next SIGUSR1.
pub const BASE_REQUEST_FILE: &str = crate::request::REQUEST_FILE;

/// Where a database's base backups copy it (and where its request file goes).
pub fn scratch_dir(o: &ArchiverOptions) -> PathBuf {
    o.scratch_dir
        .clone()
        .unwrap_or_else(|| service::default_scratch(&o.db))
}

/// Asks the process archiving this database for a base backup of it alone at its next
/// SIGUSR1: writes the request file into its scratch directory.
pub fn request_base(o: &ArchiverOptions) -> std::io::Result<PathBuf> {
    let dir = scratch_dir(o);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(BASE_REQUEST_FILE);
    std::fs::write(&path, b"")?;
    Ok(path)
}

/// How one database ended.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSummary {
    pub name: String,
    /// `ok`: it stopped cleanly (or caught up, one-shot); `failed`: it was failing when the
    /// process stopped, or failed on its way out.
    pub status: &'static str,
    /// Times it failed during the run.
    pub failures: u64,
    /// Its last error, when it ended failed.
    pub error: Option<String>,
    /// What its last (clean) run did.
    pub run: Option<RunSummary>,
}

/// How every database ended; printed as JSON at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSummary {
    pub databases: Vec<DatabaseSummary>,
}

impl FleetSummary {
    /// The failed databases' names.
    pub fn failed(&self) -> Vec<&str> {
        self.databases
            .iter()
            .filter(|d| d.status != "ok")
            .map(|d| d.name.as_str())
            .collect()
    }

    /// [`exit::OK`] when every database ended cleanly, else [`exit::FAILURE`].
    pub fn exit_code(&self) -> u8 {
        if self.failed().is_empty() {
            exit::OK
        } else {
            exit::FAILURE
        }
    }
}

/// Runs every database of `config` until `shutdown` resolves (or, one-shot, until each has
/// caught up or failed). `base_requests` (SIGUSR1) asks for base backups: of the databases
/// whose request file exists, or of all when none does. Fails only if the metrics address
/// cannot be served; each database's failures are in the summary.
pub async fn run(
    config: FleetConfig,
    shutdown: impl Future<Output = ()>,
    mut base_requests: mpsc::UnboundedReceiver<()>,
) -> Result<FleetSummary, ServiceError> {
    let registries: Vec<(String, Arc<Metrics>)> = config
        .databases
        .iter()
        .map(|d| (d.name.clone(), Arc::new(Metrics::new())))
        .collect();
    let fleet_metrics = Arc::new(FleetMetrics::new(registries.clone()));
    let _server =
        crate::service::serve_metrics(config.metrics_addr.as_deref(), Arc::clone(&fleet_metrics))
            .await?;
    tracing::info!(
        databases = config.databases.len(),
        names = ?config.databases.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        "archiving several databases"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut requests = Vec::new();
    let mut tasks = Vec::new();
    for (d, (_, metrics)) in config.databases.into_iter().zip(registries) {
        let (tx, rx) = mpsc::unbounded_channel();
        requests.push((
            d.name.clone(),
            scratch_dir(&d.options).join(BASE_REQUEST_FILE),
            tx,
        ));
        let span = tracing::info_span!("archive", database = %d.name);
        let name = d.name.clone();
        let task = tokio::spawn(supervise(d, metrics, stop_rx.clone(), rx).instrument(span));
        tasks.push((name, task));
    }
    let mut all = Box::pin(futures::future::join_all(
        tasks
            .into_iter()
            .map(|(name, task)| async move { (name, task.await) }),
    ));
    tokio::pin!(shutdown);
    let mut stopping = false;
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                tracing::info!("shutting down every database");
                let _ = stop_tx.send(true);
            }
            Some(()) = base_requests.recv() => dispatch_base_request(&requests),
        }
    };
    let databases: Vec<DatabaseSummary> = results
        .into_iter()
        .map(|(name, r)| {
            r.unwrap_or_else(|e| DatabaseSummary {
                name,
                status: "failed",
                failures: 1,
                error: Some(format!("its supervisor failed: {e}")),
                run: None,
            })
        })
        .collect();
    let summary = FleetSummary { databases };
    let failed = summary.failed();
    if failed.is_empty() {
        tracing::info!("every database stopped cleanly");
    } else {
        tracing::error!(failed = ?failed, "stopped; some databases had failed");
    }
    Ok(summary)
}

/// A base request (SIGUSR1) goes to the databases whose request file exists, or to all.
fn dispatch_base_request(requests: &[(String, PathBuf, mpsc::UnboundedSender<()>)]) {
    let named: Vec<_> = requests
        .iter()
        .filter(|(_, file, _)| file.exists())
        .collect();
    let targets: Vec<_> = if named.is_empty() {
        requests.iter().collect()
    } else {
        named
    };
    for (name, file, tx) in targets {
        let _ = std::fs::remove_file(file);
        tracing::info!(database = %name, "base backup requested");
        if tx.send(()).is_err() {
            tracing::warn!(database = %name, "the database is not running; no base backup");
        }
    }
}

/// A future that resolves when the service is to stop.
type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs one database until asked to stop, starting it again after each failure.
async fn supervise(
    db: Database,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    requests: mpsc::UnboundedReceiver<()>,
) -> DatabaseSummary {
    supervise_with(db, metrics, stop, requests, |o, m, shutdown, rx| {
        service::run_with_metrics(o, m, shutdown, rx)
    })
    .await
}

/// [`supervise`] with the service given by `start`.
async fn supervise_with<F, Fut>(
    db: Database,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    mut requests: mpsc::UnboundedReceiver<()>,
    start: F,
) -> DatabaseSummary
where
    F: Fn(ArchiverOptions, Arc<Metrics>, Shutdown, mpsc::UnboundedReceiver<()>) -> Fut,
    Fut: Future<Output = Result<RunSummary, ServiceError>> + Send + 'static,
{
    let one_shot = db.options.exit_when_caught_up;
    let mut failures = 0u64;
    let mut delay = RETRY_MIN;
    loop {
        metrics.set_phase(Phase::Starting);
        let started = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stopped = stop.clone();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        let mut task = tokio::spawn(
            start(db.options.clone(), Arc::clone(&metrics), shutdown, rx).in_current_span(),
        );
        let outcome = loop {
            tokio::select! {
                r = &mut task => break r,
                Some(()) = requests.recv() => { let _ = tx.send(()); }
            }
        };
        let error = match outcome {
            Ok(Ok(run)) => {
                return DatabaseSummary {
                    name: db.name,
                    status: "ok",
                    failures,
                    error: None,
                    run: Some(run),
                };
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                format!("the archiving task panicked: {msg}")
            }
            Err(e) => format!("the archiving task was cancelled: {e}"),
        };
        failures += 1;
        metrics.failed(&error);
        if one_shot || *stop.borrow() {
            tracing::error!(error = %error, "archiving this database failed");
            return DatabaseSummary {
                name: db.name,
                status: "failed",
                failures,
                error: Some(error),
                run: None,
            };
        }
        if started.elapsed() > RETRY_MAX {
            delay = RETRY_MIN;
        }
        tracing::error!(
            error = %error,
            failures,
            retry_in = ?delay,
            "DATABASE FAILED: archiving this database stopped; the other databases go on; \
             it is started again in {delay:?}"
        );
        let mut stopped = stop.clone();
        let stop_now = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stopped.wait_for(|s| *s) => true,
        };
        if stop_now {
            return DatabaseSummary {
                name: db.name,
                status: "failed",
                failures,
                error: metrics.failures().1,
                run: None,
            };
        }
        // Base requests that came while it was down are dropped: a new start takes a base
        // when one is due anyway.
        while requests.try_recv().is_ok() {}
        delay = (delay * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type ServiceFuture =
        std::pin::Pin<Box<dyn Future<Output = Result<RunSummary, ServiceError>> + Send>>;

    /// A service that panics at its first start, fails at its second, and runs until told
    /// to stop at its third.
    fn flaky(
        attempts: Arc<std::sync::atomic::AtomicU32>,
    ) -> impl Fn(ArchiverOptions, Arc<Metrics>, Shutdown, mpsc::UnboundedReceiver<()>) -> ServiceFuture
    {
        move |_, m, shutdown, _| {
            let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                match n {
                    0 => panic!("a bug"),
                    1 => Err(ServiceError::Other("the store is down".into())),
                    _ => {
                        m.set_phase(Phase::Running);
                        shutdown.await;
                        m.set_phase(Phase::Stopped);
                        Ok(RunSummary::default())
                    }
                }
            })
        }
    }

    fn database() -> Database {
        Database {
            name: "a".into(),
            options: ArchiverOptions::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_that_panics_or_fails_is_started_again_until_it_runs() {
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (_requests, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(supervise_with(
            database(),
            Arc::clone(&metrics),
            stop_rx,
            rx,
            flaky(Arc::clone(&attempts)),
        ));
        while metrics.phase() != Phase::Running {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (failures, error) = metrics.failures();
        assert_eq!(failures, 2);
        assert_eq!(error.as_deref(), Some("the store is down"));
        stop_tx.send(true).unwrap();
        let summary = task.await.unwrap();
        assert_eq!(summary.status, "ok");
        assert_eq!(summary.failures, 2);
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_one_shot_run_is_not_retried_and_a_panic_is_reported() {
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let metrics = Arc::new(Metrics::new());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let (_requests, rx) = mpsc::unbounded_channel();
        let mut db = database();
        db.options.exit_when_caught_up = true;
        let summary = supervise_with(
            db,
            Arc::clone(&metrics),
            stop_rx,
            rx,
            flaky(Arc::clone(&attempts)),
        )
        .await;
        assert_eq!(summary.status, "failed");
        assert_eq!(
            summary.error.as_deref(),
            Some("the archiving task panicked: a bug")
        );
        assert_eq!(metrics.phase(), Phase::Failed);
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_request_file_goes_to_the_scratch_directory() {
        let dir = tempfile::tempdir().unwrap();
        let o = ArchiverOptions {
            db: dir.path().join("db"),
            ..ArchiverOptions::default()
        };
        let path = request_base(&o).unwrap();
        assert_eq!(
            path,
            service::default_scratch(&o.db).join(BASE_REQUEST_FILE)
        );
        assert!(path.exists());
    }
}
