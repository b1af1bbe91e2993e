//! Several databases in one archiver process: the `[[databases]]` form of the config file,
//! and a supervisor per database that runs [`service::run_with_metrics`] and starts it
//! again, after a backoff, whenever it fails.
//!
//! The config file's top-level keys are defaults for every database; each `[[databases]]`
//! table has a `name`, a `db`, a `to`, and may set any other key of [`ArchiverOptions`] for
//! that database alone. Tables (`[store]`, and any table added to the options later) merge
//! key by key: a database's `[databases.store]` overrides only the keys it sets. Keys that
//! belong to the process (`metrics_addr`) are only accepted at the top.
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

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_manifest::store::StoreUrl;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::metrics::{FleetMetrics, Metrics, Phase};
use crate::service::{self, ArchiverOptions, RunSummary, ServiceError};

/// Keys that belong to the whole process and are refused inside a `[[databases]]` table.
const PROCESS_KEYS: &[&str] = &["metrics_addr"];

/// Keys every database must set for itself, refused at the top level next to `[[databases]]`.
const OWN_KEYS: &[&str] = &["db", "to", "wal_dir"];

/// The first wait before a failed database is started again; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait before a failed database is started again.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// The name of the file, in a database's scratch directory, that asks a running process for
/// a base backup of that database at the next SIGUSR1.
pub const BASE_REQUEST_FILE: &str = crate::request::REQUEST_FILE;

/// A database of the config file.
#[derive(Debug, Clone)]
pub struct Database {
    /// Its name: the `database` label of its metrics, the `database` field of its logs.
    pub name: String,
    /// Its options: the file's defaults, its own keys, then flags and environment.
    pub options: ArchiverOptions,
}

/// A config file that lists `[[databases]]`.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub databases: Vec<Database>,
    /// Where to serve metrics and health for the whole process.
    pub metrics_addr: Option<String>,
}

/// What is wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// True when the config text lists `[[databases]]` (the form this module runs).
pub fn lists_databases(text: &str) -> Result<bool, ConfigError> {
    let table: toml::Table = toml::from_str(text)?;
    Ok(table.contains_key("databases"))
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A database name: 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid database name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', \
             starting with a letter or digit"
        )))
    }
}

impl FleetConfig {
    /// Parses a config file that lists `[[databases]]`. Flags and environment are applied
    /// afterwards, then [`FleetConfig::validate`].
    pub fn parse(text: &str) -> Result<FleetConfig, ConfigError> {
        let mut top: toml::Table = toml::from_str(text)?;
        let list = match top.remove("databases") {
            Some(toml::Value::Array(list)) if !list.is_empty() => list,
            Some(toml::Value::Array(_)) | None => {
                return Err(invalid(
                    "the config file lists no databases: add a [[databases]] table with name, \
                     db and to for each",
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "`databases` must be a list of tables: write each as [[databases]]",
                ));
            }
        };
        for key in OWN_KEYS {
            if top.contains_key(*key) {
                return Err(invalid(format!(
                    "`{key}` is set at the top of a file that lists [[databases]]: each \
                     database has its own, so move it into its [[databases]] table"
                )));
            }
        }
        let metrics_addr = match top.remove("metrics_addr") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(_) => {
                return Err(invalid(
                    "`metrics_addr` must be a string, e.g. \"127.0.0.1:9187\"",
                ));
            }
        };
        // The defaults alone, so that a mistake in them is reported once.
        let defaults: ArchiverOptions = toml::Value::Table(top.clone())
            .try_into()
            .map_err(|e| invalid(format!("in the defaults at the top of the file: {e}")))?;
        let mut databases = Vec::new();
        let mut names = HashSet::new();
        for (i, entry) in list.into_iter().enumerate() {
            let toml::Value::Table(mut own) = entry else {
                return Err(invalid(format!(
                    "databases entry {} is not a table: write it as [[databases]]",
                    i + 1
                )));
            };
            let name = match own.remove("name") {
                Some(toml::Value::String(s)) => s,
                Some(_) => {
                    return Err(invalid(format!(
                        "the name of [[databases]] entry {} must be a string",
                        i + 1
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "[[databases]] entry {} has no name: add name = \"...\" (it labels the \
                         database's metrics and logs)",
                        i + 1
                    )));
                }
            };
            validate_name(&name)?;
            if !names.insert(name.clone()) {
                return Err(invalid(format!(
                    "two databases are named {name:?}: names must be unique"
                )));
            }
            for key in PROCESS_KEYS {
                if own.contains_key(*key) {
                    return Err(invalid(format!(
                        "database {name}: `{key}` is for the whole process; set it once at the \
                         top of the file"
                    )));
                }
            }
            let own_scratch = own.contains_key("scratch_dir");
            let mut merged = top.clone();
            merge(&mut merged, own);
            let mut options: ArchiverOptions = toml::Value::Table(merged)
                .try_into()
                .map_err(|e| invalid(format!("database {name}: {e}")))?;
            if !own_scratch && let Some(dir) = &defaults.scratch_dir {
                // A shared scratch directory gets one subdirectory per database.
                options.scratch_dir = Some(dir.join(&name));
            }
            databases.push(Database { name, options });
        }
        Ok(FleetConfig {
            databases,
            metrics_addr,
        })
    }

    /// Checks what must hold once flags are applied: every database has a `db` and a `to`,
    /// positive intervals, a valid repository URL; no two share a database directory, and
    /// no repository is another's or lies inside another's.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut dbs: BTreeMap<PathBuf, &str> = BTreeMap::new();
        let mut repos: Vec<(&str, Option<&str>, StoreUrl)> = Vec::new();
        for d in &self.databases {
            let (name, o) = (&d.name, &d.options);
            if o.db.as_os_str().is_empty() {
                return Err(invalid(format!(
                    "database {name}: no database directory: add db = \"/path/to/db\" to its \
                     [[databases]] table"
                )));
            }
            if o.to.is_empty() {
                return Err(invalid(format!(
                    "database {name}: no repository: add to = \"s3://BUCKET/PREFIX\" or \
                     \"file:///ABSOLUTE/DIR\" to its [[databases]] table"
                )));
            }
            if o.sync_interval.is_zero()
                || o.base_interval.is_zero()
                || o.checkpoint_interval.is_zero()
            {
                return Err(invalid(format!(
                    "database {name}: intervals must be greater than zero"
                )));
            }
            let key = same_dir_key(&o.db);
            if let Some(other) = dbs.insert(key, name) {
                return Err(invalid(format!(
                    "databases {other} and {name} have the same db {}: each database directory \
                     is archived once, to one repository",
                    o.db.display()
                )));
            }
            let url =
                StoreUrl::parse(&o.to).map_err(|e| invalid(format!("database {name}: {e}")))?;
            let endpoint = o.store.endpoint_url.as_deref();
            for (other, other_endpoint, other_url) in &repos {
                if *other_endpoint == endpoint && nested(other_url, &url) {
                    let how = if same(other_url, &url) {
                        "the same repository"
                    } else {
                        "repositories inside one another"
                    };
                    return Err(invalid(format!(
                        "databases {other} and {name} have {how} ({other_url} and {url}): give \
                         each database its own prefix or directory"
                    )));
                }
            }
            repos.push((name, endpoint, url));
        }
        Ok(())
    }

    /// Keeps only the database named `name`.
    pub fn select(&mut self, name: &str) -> Result<(), ConfigError> {
        let known: Vec<&str> = self.databases.iter().map(|d| d.name.as_str()).collect();
        if !known.contains(&name) {
            return Err(invalid(format!(
                "no database named {name:?} in the config file (it has: {})",
                known.join(", ")
            )));
        }
        self.databases.retain(|d| d.name == name);
        Ok(())
    }
}

/// A directory as compared for duplicates: canonical when it exists, else made absolute and
/// cleaned of `.` and `..` without touching the file system.
fn same_dir_key(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// True when both are the same repository.
fn same(a: &StoreUrl, b: &StoreUrl) -> bool {
    match (a, b) {
        (StoreUrl::Local { root: ra }, StoreUrl::Local { root: rb }) => {
            same_dir_key(ra) == same_dir_key(rb)
        }
        _ => a == b,
    }
}

/// True when one repository is the other or lies inside it.
fn nested(a: &StoreUrl, b: &StoreUrl) -> bool {
    fn within(outer: &str, inner: &str) -> bool {
        outer.is_empty()
            || inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|r| r.starts_with('/'))
    }
    match (a, b) {
        (
            StoreUrl::S3 {
                bucket: ba,
                prefix: pa,
            },
            StoreUrl::S3 {
                bucket: bb,
                prefix: pb,
            },
        ) => ba == bb && (within(pa, pb) || within(pb, pa)),
        (StoreUrl::Local { root: ra }, StoreUrl::Local { root: rb }) => {
            let (ra, rb) = (same_dir_key(ra), same_dir_key(rb));
            ra.starts_with(&rb) || rb.starts_with(&ra)
        }
        _ => false,
    }
}

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

    /// `0` when every database ended cleanly, else `1`.
    pub fn exit_code(&self) -> u8 {
        if self.failed().is_empty() { 0 } else { 1 }
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

    fn parse(text: &str) -> Result<FleetConfig, String> {
        let c = FleetConfig::parse(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err()
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../scripts/archiver.many.example.toml");
        assert!(lists_databases(text).unwrap());
        let c = parse(text).unwrap();
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9187"));
        let names: Vec<&str> = c.databases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["orders", "users", "billing"]);
        let [orders, users, billing] = &c.databases[..] else {
            panic!()
        };
        assert_eq!(orders.options.to, "s3://acme-backups/tidemark/orders");
        assert_eq!(orders.options.base_interval, Duration::from_secs(86_400));
        assert_eq!(users.options.base_interval, Duration::from_secs(6 * 3600));
        assert_eq!(users.options.sync_interval, Duration::from_secs(1));
        assert_eq!(billing.options.sync_interval, Duration::from_millis(250));
        // [store] defaults merge with a database's own [databases.store] key by key.
        assert_eq!(orders.options.store.region.as_deref(), Some("eu-west-1"));
        assert_eq!(billing.options.store.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            billing.options.store.storage_class.as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(orders.options.store.storage_class, None);
    }

    #[test]
    fn the_single_database_example_is_not_the_many_form() {
        let text = include_str!("../../scripts/archiver.example.toml");
        assert!(!lists_databases(text).unwrap());
    }

    const TWO: &str = r#"
        sync_interval = "2s"
        scratch_dir = "/var/tmp/tidemark"
        [store]
        region = "eu-west-1"
        [[databases]]
        name = "a"
        db = "/srv/a/db"
        to = "s3://bucket/a"
        [[databases]]
        name = "b"
        db = "/srv/b/db"
        to = "s3://bucket/b"
        sync_interval = "100ms"
        scratch_dir = "/srv/b/scratch"
        [databases.store]
        path_style = true
    "#;

    #[test]
    fn defaults_apply_and_entries_override() {
        let c = parse(TWO).unwrap();
        let (a, b) = (&c.databases[0].options, &c.databases[1].options);
        assert_eq!(a.sync_interval, Duration::from_secs(2));
        assert_eq!(b.sync_interval, Duration::from_millis(100));
        assert_eq!(a.store.region.as_deref(), Some("eu-west-1"));
        assert_eq!(b.store.region.as_deref(), Some("eu-west-1"));
        assert!(!a.store.path_style && b.store.path_style);
        // A shared scratch directory is divided by database; an own one is kept.
        assert_eq!(
            a.scratch_dir.as_deref(),
            Some(Path::new("/var/tmp/tidemark/a"))
        );
        assert_eq!(b.scratch_dir.as_deref(), Some(Path::new("/srv/b/scratch")));
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn mistakes_are_refused_with_a_message_that_names_them() {
        let one = |extra: &str, entry: &str| {
            format!(
                "{extra}\n[[databases]]\nname = \"a\"\ndb = \"/srv/a\"\nto = \"s3://bkt/a\"\n{entry}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("databases = []".into(), "lists no databases"),
            ("databases = 3".into(), "list of tables"),
            (one("db = \"/x\"", ""), "`db` is set at the top"),
            (one("to = \"s3://bkt/x\"", ""), "`to` is set at the top"),
            (
                one("", "metrics_addr = \"127.0.0.1:1\""),
                "for the whole process",
            ),
            (one("", "colour = 1"), "database a: unknown field `colour`"),
            (one("colour = 1", ""), "in the defaults at the top"),
            (one("", "sync_interval = \"soon\""), "invalid duration"),
            (one("", "sync_interval = \"0s\""), "greater than zero"),
            (
                "[[databases]]\nname = \"a\"\ndb = \"/x\"\nto = \"ftp://x\"".into(),
                "database a:",
            ),
            (
                "[[databases]]\ndb = \"/x\"\nto = \"s3://bkt/x\"".into(),
                "has no name",
            ),
            (
                "[[databases]]\nname = \"a b\"\ndb = \"/x\"\nto = \"s3://bkt/x\"".into(),
                "invalid database name",
            ),
            (
                "[[databases]]\nname = \"a\"\nto = \"s3://bkt/x\"".into(),
                "no database directory",
            ),
            (
                "[[databases]]\nname = \"a\"\ndb = \"/x\"".into(),
                "no repository",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"a\"\ndb = \"/srv/b\"\nto = \"s3://bkt/b\"",
                ),
                "two databases are named \"a\"",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/./a\"\nto = \"s3://bkt/b\"",
                ),
                "databases a and b have the same db",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a/\"",
                ),
                "have the same repository",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a/sub\"",
                ),
                "repositories inside one another",
            ),
            (
                one(
                    "",
                    "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt\"",
                ),
                "repositories inside one another",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        }
        // Prefixes that only share a beginning are different repositories; so are the same
        // prefix on two endpoints.
        parse(&one(
            "",
            "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/ab\"",
        ))
        .unwrap();
        parse(&one(
            "",
            "[[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"s3://bkt/a\"\n[databases.store]\nendpoint_url = \"http://other:9000\"",
        ))
        .unwrap();
    }

    #[test]
    fn select_keeps_one_database_or_names_the_known_ones() {
        let mut c = parse(TWO).unwrap();
        let e = c.select("c").unwrap_err().to_string();
        assert!(e.contains("it has: a, b"), "{e}");
        c.select("b").unwrap();
        assert_eq!(c.databases.len(), 1);
        assert_eq!(c.databases[0].name, "b");
    }

    #[test]
    fn nested_repositories() {
        let u = |s: &str| StoreUrl::parse(s).unwrap();
        assert!(nested(&u("s3://bkt/x"), &u("s3://bkt/x")));
        assert!(nested(&u("s3://bkt/x"), &u("s3://bkt/x/y")));
        assert!(!nested(&u("s3://bkt/x"), &u("s3://bkt/xy")));
        assert!(!nested(&u("s3://bkt/x"), &u("s3://cde/x")));
        assert!(nested(&u("file:///srv/r"), &u("file:///srv/r/t")));
        assert!(!nested(&u("file:///srv/r"), &u("file:///srv/rt")));
        assert!(!nested(&u("file:///srv/r"), &u("s3://srv/r")));
    }

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
