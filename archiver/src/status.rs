//! `tidemark-archiver status`: what a repository can restore and how fresh it is, for
//! people and for health checks.
//!
//! It reads as restores do: past a corrupt newest generation to the newest intact one
//! (FORMAT.md §4.4), so it still shows the window and the lease, and it names every damaged
//! object it passed over in [`StatusReport::damage`]: a report with damage is never healthy.

use serde::Serialize;
use tidemark_manifest::model::{LineageParent, ObjectLock};
use tidemark_manifest::plan::fmt_time;
use tidemark_manifest::repo::{LoadWarning, ReadFrom, RepoError, Repository};
use time::OffsetDateTime;

/// A repository's state as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub repository: String,
    pub database_identity: String,
    /// The repository's lineage id.
    pub lineage: String,
    /// Where the database was restored from, when it is a restored copy.
    pub parent: Option<LineageParent>,
    /// The S3 Object Lock its objects are written with (FORMAT.md §3.2), if any.
    pub object_lock: Option<ObjectLock>,
    /// The generation read: the newest intact one.
    pub generation: u64,
    /// The newest generation that exists (newer than `generation` when that one is damaged).
    pub newest_generation: u64,
    /// Damaged objects found and passed over while reading, each named; empty when the
    /// repository read cleanly.
    pub damage: Vec<LoadWarning>,
    pub bases: usize,
    pub segments: usize,
    pub gaps: usize,
    /// The newest archived (durable) sequence number.
    pub newest_seq: Option<u64>,
    /// The time of the newest archived record.
    pub newest_time: Option<String>,
    /// Seconds since the newest archived record.
    pub newest_age_seconds: Option<f64>,
    /// The newest base backup's time.
    pub newest_base_time: Option<String>,
    /// Seconds since the newest base backup.
    pub newest_base_age_seconds: Option<f64>,
    /// The restorable window, human-readable.
    pub window: String,
    /// Who holds the writer lease, if anyone.
    pub lease: Option<LeaseInfo>,
}

/// The writer lease as seen by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    pub host: String,
    pub pid: u32,
    pub expires_at: String,
    /// Neither live nor held: expired or released.
    pub expired: bool,
    /// When the holder released it (a clean shutdown).
    pub released_at: Option<String>,
}

fn age(t: OffsetDateTime) -> f64 {
    (OffsetDateTime::now_utc() - t).as_seconds_f64()
}

/// Reads the repository and reports its state.
pub async fn status(repo: &Repository) -> Result<StatusReport, RepoError> {
    let state = repo.load_for_reading(ReadFrom::NewestIntact).await?;
    let damage = state
        .warnings
        .iter()
        .filter(|w| w.damage)
        .cloned()
        .collect();
    let newest = state.history.segments.last();
    let newest_base = state.history.bases.iter().map(|b| b.created_at).max();
    let lease = repo.read_lease().await?.map(|(l, _)| LeaseInfo {
        expired: !l.is_live(OffsetDateTime::now_utc()),
        host: l.host,
        pid: l.pid,
        expires_at: fmt_time(l.expires_at),
        released_at: l.released_at.map(fmt_time),
    });
    Ok(StatusReport {
        repository: repo.location(),
        database_identity: state.config.database_identity.clone(),
        lineage: state.config.lineage.id.clone(),
        parent: state.config.lineage.parent.clone(),
        object_lock: state.config.object_lock,
        generation: state.generation.as_ref().map_or(0, |g| g.generation),
        newest_generation: state.newest_generation,
        damage,
        bases: state.history.bases.len(),
        segments: state.history.segments.len(),
        gaps: state.history.gaps.len(),
        newest_seq: newest.map(|s| s.last_seq),
        newest_time: newest.map(|s| fmt_time(s.last_time)),
        newest_age_seconds: newest.map(|s| age(s.last_time)),
        newest_base_time: newest_base.map(fmt_time),
        newest_base_age_seconds: newest_base.map(age),
        window: state.history.window().to_string(),
        lease,
    })
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "repository:   {}", self.repository)?;
        writeln!(f, "database:     {}", self.database_identity)?;
        writeln!(f, "lineage:      {}", self.lineage)?;
        if let Some(p) = &self.parent {
            writeln!(
                f,
                "              restored from {} (lineage {}) at sequence {}",
                p.repository, p.lineage, p.sequence
            )?;
        }
        match &self.object_lock {
            Some(lock) => writeln!(f, "object lock:  {lock}")?,
            None => writeln!(f, "object lock:  none")?,
        }
        writeln!(
            f,
            "history:      {} base(s), {} segment(s), {} gap(s), manifest generation {}",
            self.bases, self.segments, self.gaps, self.generation
        )?;
        match (&self.newest_seq, &self.newest_time, self.newest_age_seconds) {
            (Some(seq), Some(t), Some(age)) => {
                writeln!(f, "newest point: sequence {seq} at {t} ({age:.1} s ago)")?
            }
            _ => writeln!(f, "newest point: nothing archived yet")?,
        }
        match (&self.newest_base_time, self.newest_base_age_seconds) {
            (Some(t), Some(age)) => writeln!(f, "newest base:  {t} ({:.1} h ago)", age / 3600.0)?,
            _ => writeln!(f, "newest base:  none")?,
        }
        writeln!(f, "window:       {}", self.window)?;
        for d in &self.damage {
            match &d.object {
                Some(o) => writeln!(f, "DAMAGED:      {o}: {}", d.message)?,
                None => writeln!(f, "DAMAGED:      {}", d.message)?,
            }
        }
        if !self.damage.is_empty() {
            writeln!(
                f,
                "REPAIR NEEDED: the repository is damaged (above); run `tidemark-restore verify` \
                 and see docs/operations.md"
            )?;
        }
        match &self.lease {
            Some(LeaseInfo {
                released_at: Some(at),
                host,
                pid,
                ..
            }) => writeln!(
                f,
                "archiver:     not running (released its lease at {at}; was {host} pid {pid})"
            ),
            Some(l) => writeln!(
                f,
                "archiver:     {} pid {} (lease until {}{})",
                l.host,
                l.pid,
                l.expires_at,
                if l.expired { ", EXPIRED" } else { "" }
            ),
            None => writeln!(f, "archiver:     not running (no lease)"),
        }
    }
}
