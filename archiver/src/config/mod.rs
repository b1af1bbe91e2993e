//! The archiver's configuration, in one place: every setting `run`, `backup`, `status` and
//! `prune` take, where each comes from, and what it may be.
//!
//! - [`options`]: every setting and its default ([`ArchiverOptions`] for a database,
//!   [`PruneOptions`] for a retention policy); the config file's keys are their field names.
//! - [`duration`]: how durations are written (`500ms`, `15m`, `7d`).
//! - [`file`]: the TOML config file, for one database or several (`[[databases]]`).
//! - [`flags`]: the command line and `TIDEMARK_*` variables of each command.
//! - [`layering`]: defaults < config file < environment < flags, per command.
//! - [`validation`]: the limits checked once the layers are merged, before anything runs.
//! - [`copy`]: `copy`'s two sets of store settings, the source's and the destination's.
//!
//! The store settings (`[store]`, `--endpoint-url`…) are shared with the restore tool and
//! live in [`tidemark_manifest::cli`].

pub mod copy;
pub mod duration;
pub mod file;
pub mod flags;
pub mod layering;
pub mod options;
pub mod validation;

use std::path::PathBuf;

use tidemark_manifest::store::StoreError;

pub use file::{Database, FileError, FleetConfig};
pub use layering::{
    Plan, PruneSettings, check_store_settings, prune_settings, run_plan, status_settings,
};
pub use options::{ArchiverOptions, PruneOptions, ReplayBound};
pub use validation::{InvalidSetting, MIN_LEASE_TTL};

use crate::prune::PruneError;

/// Settings that cannot be used: the command exits with `USAGE`, nothing started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: FileError,
    },
    /// One database of a `[[databases]]` file.
    #[error("database {name}")]
    Database {
        name: String,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PruneError),
}
