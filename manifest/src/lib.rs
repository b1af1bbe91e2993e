//! # tidemark-manifest: the Tidemark repository format
//!
//! Everything the archiver and the restore tool must agree on lives here, so that neither
//! carries its own copy of it. FORMAT.md at the workspace root is the normative
//! specification; this crate implements it:
//!
//! - [`model`]: the JSON documents of a repository (repository config, manifest generations,
//!   base-backup descriptors, segment index pages) and their serde types.
//! - [`keys`]: the object key layout.
//! - [`origin`]: the origin file a restore leaves in a restored database: which repository
//!   and lineage it came from, so that it is archived into a new repository only.
//! - [`segment`]: the WAL segment encoding (framed records, zstd, crc32c, sha256 trailer).
//! - [`plan`]: which base backup and which segments restore a sequence number or a time, and
//!   validation of a repository's history (overlaps, holes, gaps).
//! - [`chain`]: the record chain: each batch starts where the one before it ends.
//! - [`retention`]: which bases and segments a retention policy keeps, and which objects a
//!   pruning sweep may delete.
//! - [`repo`]: a repository on a store: finding the current state without listing, and
//!   writing objects in the order FORMAT.md requires. The only way the programs read or
//!   write a document; [`lease`] adds the writer lease's conditional writes.
//! - [`copy`]: a second repository kept up to date from a first: what it lacks, in write
//!   order, how to tell one that diverged, and copying one object across, verified.
//! - [`cli`]: the store flags both programs share.
//! - [`metrics_http`]: the `/metrics` and `/health` HTTP endpoint both programs serve.
//! - [`exit`]: the exit codes of both programs, one meaning per number.
//! - [`checksum`]: sha256 helpers used for every object.
//! - [`rocks`]: RocksDB's own on-disk formats that Tidemark reads and writes: the log (WAL)
//!   format, WriteBatch records, VersionEdits in a MANIFEST, OPTIONS files.
//! - [`store`]: the object stores (local directory, S3) behind one async trait, with retry
//!   and client-side encryption decorators and URL parsing.

pub mod chain;
pub mod checksum;
pub mod cli;
pub mod copy;
pub mod exit;
pub mod keyring;
pub mod keys;
pub mod lease;
pub mod lock;
pub mod metrics_http;
pub mod model;
pub mod origin;
pub mod plan;
pub mod repo;
pub mod retention;
pub mod rocks;
pub mod segment;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
