//! # tidemark-archiver: continuous WAL shipping and base backups
//!
//! The archiver runs beside a RocksDB that another process owns. It never opens the
//! database; it reads the files RocksDB leaves on disk and makes the database restorable to
//! any point since its first base backup. The data path, one module a step:
//!
//! 1. [`preflight`]: is the database archivable (WAL kept long enough, not recycled)?
//! 2. [`watch`]: wake up when the WAL directory changes (with a polling fallback).
//! 3. [`follow`]: read WAL records in order, stamp their time, detect gaps.
//! 4. [`ship`]: pack records into segments, closed every sync interval or at a size limit,
//!    and upload them (create-only, in sequence order) in the background through [`upload`],
//!    while the next segment is read and compressed.
//! 5. [`checkpoint`]: record uploaded segments, bases and gaps in new manifest generations.
//!
//! Beside it, [`base`] takes base backups (a careful external copy of the live database,
//! SSTs uploaded content-addressed), [`lease`] keeps a second archiver off the same
//! repository and [`lease_keeper`] renews it while its holder works, [`prune`] applies a
//! retention policy (mark, then sweep), [`service`] runs it all as a long-lived process
//! (every background task an [`task::OwnedTask`]), [`fleet`] runs several databases in one
//! process, each on its own, and [`metrics`] reports on it to Prometheus. [`config`] holds
//! every setting: its default, its config file key, flag and variable, how they layer, and
//! its limits. [`check_store`] probes a store for what Tidemark relies on. [`copy`] brings a second
//! repository of the same database up to date with a first.

pub mod base;
pub mod check_store;
pub mod checkpoint;
pub mod config;
pub mod copy;
pub mod fleet;
pub mod follow;
pub mod lease;
pub mod lease_keeper;
pub mod metrics;
pub mod preflight;
pub mod prune;
pub mod rekey;
pub mod request;
pub mod service;
pub mod ship;
pub mod status;
pub mod task;
pub mod upload;
pub mod watch;
