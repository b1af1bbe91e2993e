//! Where each command's settings come from, in order: the defaults ([`super::options`]),
//! the config file (`--config`, [`super::file`]), then the environment and the command line
//! ([`super::flags`]; clap gives a flag precedence over its variable). A setting given at a
//! later layer wins; the result is checked ([`super::validation`]) before anything runs.

use std::path::Path;
use std::time::Duration;

use tidemark_manifest::cli::{StoreAccess, StoreArgs};

use super::file::{self, FileError, FleetConfig};
use super::flags::{CheckStoreFlags, PruneFlags, RepositoryFlags, RunFlags, StatusFlags};
use super::validation::{check_options, check_retention, check_settings};
use super::{ArchiverOptions, ConfigError, PruneOptions};

/// What `run` and `backup` archive: one database, or the `[[databases]]` of the config file.
#[derive(Debug)]
pub enum Plan {
    One(Box<ArchiverOptions>),
    Many(FleetConfig),
}

/// `invalid config file PATH: …`
fn invalid(path: &Path) -> impl Fn(FileError) -> ConfigError + '_ {
    move |source| ConfigError::File {
        path: path.to_owned(),
        source,
    }
}

fn usage(msg: impl Into<String>) -> ConfigError {
    ConfigError::Usage(msg.into())
}

fn needs_list(name: &str) -> ConfigError {
    usage(format!(
        "--database {name} needs a config file that lists [[databases]] (--config FILE)"
    ))
}

/// `run` and `backup`: the config file, then flags and environment on top, checked.
/// `database` keeps one database of a config file that lists several.
pub fn run_plan(flags: &RunFlags, database: Option<&str>) -> Result<Plan, ConfigError> {
    let text = flags.config.as_deref().map(file::read).transpose()?;
    if let (Some(path), Some(text)) = (&flags.config, &text)
        && file::lists_databases(text).map_err(invalid(path))?
    {
        return many(flags, path, text, database).map(Plan::Many);
    }
    if let Some(name) = database {
        return Err(needs_list(name));
    }
    let mut o = match (&flags.config, &text) {
        (Some(path), Some(text)) => file::parse_one(text).map_err(invalid(path))?,
        _ => ArchiverOptions::default(),
    };
    apply_flags(flags, &mut o);
    if let Some(v) = &flags.db {
        o.db = v.clone();
    }
    if let Some(v) = &flags.to {
        o.to = v.clone();
    }
    if flags.wal_dir.is_some() {
        o.wal_dir = flags.wal_dir.clone();
    }
    if flags.scratch_dir.is_some() {
        o.scratch_dir = flags.scratch_dir.clone();
    }
    if flags.metrics_addr.is_some() {
        o.metrics_addr = flags.metrics_addr.clone();
    }
    if o.db.as_os_str().is_empty() {
        return Err(usage(
            "no database given: pass --db PATH (or TIDEMARK_DB, or db = \"...\" in --config)",
        ));
    }
    if o.to.is_empty() {
        return Err(usage(
            "no repository given: pass --to s3://BUCKET/PREFIX or --to file:///ABSOLUTE/DIR",
        ));
    }
    check_settings(&o)?;
    Ok(Plan::One(Box::new(o)))
}

/// The `[[databases]]` of the file at `path`, flags and environment applied to each.
fn many(
    flags: &RunFlags,
    path: &Path,
    text: &str,
    database: Option<&str>,
) -> Result<FleetConfig, ConfigError> {
    if flags.db.is_some() || flags.to.is_some() || flags.wal_dir.is_some() {
        return Err(usage(format!(
            "--db, --to and --wal-dir (or TIDEMARK_DB, TIDEMARK_TO, TIDEMARK_WAL_DIR) cannot \
             be used with {}, which lists [[databases]]: each database sets its own in its table",
            path.display()
        )));
    }
    let mut config = FleetConfig::parse(text).map_err(invalid(path))?;
    if let Some(name) = database {
        config.select(name).map_err(invalid(path))?;
    }
    for d in &mut config.databases {
        apply_flags(flags, &mut d.options);
        if let Some(dir) = &flags.scratch_dir {
            d.options.scratch_dir = Some(dir.join(&d.name));
        }
    }
    if flags.metrics_addr.is_some() {
        config.metrics_addr = flags.metrics_addr.clone();
    }
    config.validate().map_err(invalid(path))?;
    for d in &config.databases {
        check_settings(&d.options).map_err(|e| ConfigError::Database {
            name: d.name.clone(),
            source: Box::new(e),
        })?;
    }
    Ok(config)
}

/// The flags every database shares, over what the config file says.
fn apply_flags(flags: &RunFlags, o: &mut ArchiverOptions) {
    if let Some(v) = flags.sync_interval {
        o.sync_interval = v;
    }
    if let Some(v) = flags.base_interval {
        o.base_interval = v;
    }
    if let Some(v) = flags.max_replay {
        o.max_replay = Some(v);
    }
    if let Some(v) = flags.target_recovery_time {
        o.target_recovery_time = Some(v);
    }
    if let Some(v) = flags.restore_download_rate {
        o.restore_download_rate = Some(v);
    }
    if let Some(v) = flags.restore_replay_rate {
        o.restore_replay_rate = Some(v);
    }
    if let Some(v) = flags.checkpoint_interval {
        o.checkpoint_interval = v;
    }
    if let Some(v) = flags.max_segment_bytes {
        o.max_segment_bytes = v;
    }
    o.exit_when_caught_up |= flags.exit_when_caught_up;
    o.allow_unsafe_store |= flags.allow_unsafe_store;
    if let Some(v) = flags.object_lock_mode {
        o.object_lock_mode = Some(v);
    }
    if let Some(v) = flags.object_lock_days {
        o.object_lock_days = Some(v);
    }
    o.store.overlay(flags.store.clone());
    if let Some(v) = flags.upload_concurrency {
        o.upload_concurrency = v;
    }
}

/// One database's options from `--config` (and `--database` when the file lists several),
/// for the commands that work on its repository (`status`, `prune`).
fn database_options(
    command: &str,
    config: Option<&Path>,
    database: Option<&str>,
) -> Result<ArchiverOptions, ConfigError> {
    let Some(path) = config else {
        return match database {
            Some(name) => Err(needs_list(name)),
            None => Ok(ArchiverOptions::default()),
        };
    };
    let text = file::read(path)?;
    if !file::lists_databases(&text).map_err(invalid(path))? {
        return match database {
            Some(name) => Err(needs_list(name)),
            None => file::parse_one(&text).map_err(invalid(path)),
        };
    }
    let Some(name) = database else {
        return Err(usage(format!(
            "{} lists [[databases]]: say which one to {command} with --database NAME",
            path.display()
        )));
    };
    let mut fleet = FleetConfig::parse(&text).map_err(invalid(path))?;
    fleet.select(name).map_err(invalid(path))?;
    Ok(fleet.databases.remove(0).options)
}

/// The repository: `--to` (or its variable) over the config's.
fn repository_of(file: &ArchiverOptions, to: Option<String>) -> Result<String, ConfigError> {
    let to = to.unwrap_or_else(|| file.to.clone());
    if to.is_empty() {
        return Err(usage(
            "no repository given: pass --to s3://BUCKET/PREFIX or --to file:///ABSOLUTE/DIR \
             (or --config FILE)",
        ));
    }
    Ok(to)
}

/// The options of the database a command works on, and its repository URL.
fn repository(
    command: &str,
    flags: &RepositoryFlags,
) -> Result<(ArchiverOptions, String), ConfigError> {
    let file = database_options(command, flags.config.as_deref(), flags.database.as_deref())?;
    let to = repository_of(&file, flags.to.clone())?;
    Ok((file, to))
}

/// `status`: the repository and how to read it (the config's `to` and `[store]`, flags
/// and environment over them).
pub fn status_settings(flags: &StatusFlags) -> Result<(String, StoreAccess), ConfigError> {
    let (file, to) = repository("show", &flags.repository)?;
    let mut access = file.store.access;
    access.overlay(flags.store.clone());
    Ok((to, access))
}

/// `check-store`: the store the archiver would write to (the config's `to` and `[store]`,
/// flags and environment over them).
pub fn check_store_settings(flags: &CheckStoreFlags) -> Result<(String, StoreArgs), ConfigError> {
    let (file, to) = repository("probe", &flags.repository)?;
    let mut store = file.store.clone();
    store.overlay(flags.store.clone());
    Ok((to, store))
}

/// What `prune` works on and with.
#[derive(Debug)]
pub struct PruneSettings {
    pub to: String,
    pub store: StoreArgs,
    pub policy: PruneOptions,
    /// The lease `prune` takes lasts this long without renewal (the config's `lease_ttl`).
    pub lease_ttl: Duration,
}

/// `prune`: the config's `to`, `[store]` and `[retention]`, flags and environment over
/// them. A policy on the command line replaces the config's as a whole.
pub fn prune_settings(flags: PruneFlags) -> Result<PruneSettings, ConfigError> {
    let (file, to) = repository("prune", &flags.repository)?;
    // A config file that cannot work is refused whatever the command.
    check_options(&file)?;
    let mut store = file.store.clone();
    store.overlay(flags.store);
    let mut p = file.retention.unwrap_or_default();
    let from_flags = flags.keep_last.is_some()
        || flags.pitr_window.is_some()
        || flags.keep_daily_for.is_some()
        || flags.keep_weekly_for.is_some()
        || flags.keep_monthly_for.is_some();
    if from_flags {
        p = PruneOptions {
            grace: p.grace,
            interval: p.interval,
            keep_last: flags.keep_last,
            pitr_window: flags.pitr_window,
            keep_daily_for: flags.keep_daily_for,
            keep_weekly_for: flags.keep_weekly_for,
            keep_monthly_for: flags.keep_monthly_for,
        };
    }
    if let Some(g) = flags.grace {
        p.grace = g;
    }
    check_retention(&p)?;
    p.rules()?;
    Ok(PruneSettings {
        to,
        store,
        policy: p,
        lease_ttl: file.lease_ttl,
    })
}
