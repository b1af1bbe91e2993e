//! # tidemark-restore: a RocksDB database back from a Tidemark repository
//!
//! This crate is what an operator runs when data must come back: it lists what a repository
//! can restore, restores a database to a sequence number, a time or the latest archived
//! point, and verifies a repository without restoring. It never writes to the repository.
//!
//! A restore follows one data path, each step in its own module:
//!
//! 1. **plan** ([`commands::restore`]): `Repository::load` reads the repository's current
//!    state, `History::plan` picks the newest base backup covering the target and the WAL
//!    segments from the base's `replay_from_seq` to the cutoff. The segment chain is checked
//!    for holes and log-number order before anything is downloaded ([`replay::check_plan`]).
//! 2. **fetch** ([`fetch`]): the base's files (each checked against its size and sha256) and
//!    the segments (each fully verified) are downloaded in parallel with bounded concurrency,
//!    into a staging directory beside the target ([`staging`]); segments are prefetched while
//!    earlier ones are replayed.
//! 3. **replay** ([`replay`]): the source's WAL files are re-created under their original log
//!    numbers from the segment records up to the cutoff, whole batches only, streaming, with
//!    RocksDB's own log format. Every record must continue the previous one. RocksDB's own
//!    recovery applies them when the database is opened, with the application's options.
//! 4. **verify** ([`verify`]): the result is opened read-only and must report exactly the
//!    cutoff as its latest sequence number; keys are counted per column family. Only then is
//!    the staging directory renamed to the target. An existing target is never deleted: with
//!    `--force` it is renamed aside.
//!
//! Errors carry an [`ErrorClass`] that the binary turns into its exit code.

pub mod commands;
pub mod error;
pub mod fetch;
pub mod metrics;
pub mod progress;
pub mod replay;
pub mod staging;
pub mod timespec;
pub mod verify;

pub use error::{ErrorClass, RestoreError};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cancellation flag shared by every task of one command (set on Ctrl-C). Work checks it
/// between steps; a cancelled restore cleans up and leaves the target untouched.
///
/// A [`Cancel::child`] is cancelled with its parent, and can also be cancelled on its own
/// (to stop the other tasks of a phase when one of them fails); a [`Cancel::child_of_both`]
/// with either of two parents.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    own: Arc<AtomicBool>,
    parents: Vec<Cancel>,
}

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// A flag that is set when this one is, or on its own.
    pub fn child(&self) -> Cancel {
        Cancel {
            own: Arc::new(AtomicBool::new(false)),
            parents: vec![self.clone()],
        }
    }

    /// A flag that is set when this one or `other` is, or on its own.
    pub fn child_of_both(&self, other: &Cancel) -> Cancel {
        Cancel {
            own: Arc::new(AtomicBool::new(false)),
            parents: vec![self.clone(), other.clone()],
        }
    }

    /// Sets the flag (and so every child's).
    pub fn cancel(&self) {
        self.own.store(true, Ordering::SeqCst);
    }

    /// True once this flag or a parent's was set.
    pub fn is_cancelled(&self) -> bool {
        self.own.load(Ordering::SeqCst) || self.parents.iter().any(Cancel::is_cancelled)
    }

    /// `Err(Interrupted)` once cancelled.
    pub fn check(&self) -> Result<(), RestoreError> {
        if self.is_cancelled() {
            Err(RestoreError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Formats a byte count for people (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a duration for people (`1h 02m`, `3m 20s`, `4.2s`).
pub fn human_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 {
        format!("{}d {:02}h", secs / 86_400, (secs % 86_400) / 3600)
    } else if secs >= 3600 {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    } else if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(human_duration(Duration::from_secs(200)), "3m 20s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h 02m");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1d 01h");
    }

    #[test]
    fn cancel_is_shared() {
        let c = Cancel::new();
        let d = c.clone();
        let child = c.child();
        assert!(c.check().is_ok());
        child.cancel();
        assert!(
            child.is_cancelled() && !c.is_cancelled(),
            "a child does not cancel its parent"
        );
        let child = c.child();
        d.cancel();
        assert!(c.is_cancelled());
        assert!(child.is_cancelled(), "a parent cancels its children");
        assert!(matches!(c.check(), Err(RestoreError::Interrupted)));

        let (a, b) = (Cancel::new(), Cancel::new());
        let both = a.child_of_both(&b);
        assert!(!both.is_cancelled());
        b.cancel();
        assert!(both.is_cancelled(), "either parent cancels it");
        assert!(!a.is_cancelled());
    }
}
