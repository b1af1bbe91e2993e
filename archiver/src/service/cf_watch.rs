//! The column-family watch: notices column families created or dropped in the live
//! database, which the newest base then no longer matches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tidemark_manifest::model::{BaseSummary, Gap, GapKind};
use time::OffsetDateTime;

/// Notices column families created or dropped in the live database: the newest base no
/// longer matches, so a new base is needed, and the records between the change and that
/// base cannot be restored correctly (RocksDB's recovery drops records of a column family
/// its MANIFEST does not know, and keeps a dropped one).
#[derive(Debug)]
pub(crate) struct CfWatch {
    db: PathBuf,
    last_check: Instant,
    manifest_sig: Option<(PathBuf, u64, std::time::SystemTime)>,
    /// The last sequence read while the live set still matched the newest base.
    last_matching_seq: u64,
    /// The first sequence that may belong to the changed set, until a base covers it.
    changed_from: Option<u64>,
    /// The live set as last read from the MANIFEST.
    live: Vec<(u32, String)>,
}

impl CfWatch {
    const EVERY: Duration = Duration::from_secs(2);

    pub(crate) fn new(db: &Path, last_seq: u64) -> CfWatch {
        CfWatch {
            db: db.to_path_buf(),
            last_check: Instant::now() - Self::EVERY,
            manifest_sig: None,
            last_matching_seq: last_seq,
            changed_from: None,
            live: Vec::new(),
        }
    }

    /// True when `base` knows exactly the live column families last seen.
    pub(crate) fn base_matches_live(&self, base: &BaseSummary) -> bool {
        base_set(base) == self.live
    }

    /// A base backup finished: a gap for the records between the change and the base when
    /// it knows the live set, or [`AfterBase::Stale`] when it started before the change.
    pub(crate) fn base_taken(&mut self, base: &BaseSummary) -> AfterBase {
        if self.changed_from.is_some() && !self.base_matches_live(base) {
            return AfterBase::Stale;
        }
        let gap = self.changed_from.take().and_then(|from| {
            let last = base.earliest_seq.saturating_sub(1);
            (from <= last).then(|| column_family_gap(from, last))
        });
        // The base's own MANIFEST copy holds its column families at its earliest point.
        self.last_matching_seq = self.last_matching_seq.max(base.earliest_seq);
        AfterBase::Current { gap }
    }

    /// Looks at the MANIFEST (at most every [`Self::EVERY`]).
    fn look(&mut self) -> Look {
        use tidemark_manifest::rocks::version_edit::{ManifestState, current_manifest};
        if self.last_check.elapsed() < Self::EVERY {
            return Look::NotYet;
        }
        self.last_check = Instant::now();
        let Ok(path) = current_manifest(&self.db) else {
            return Look::NotYet;
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            return Look::NotYet;
        };
        let Ok(modified) = meta.modified() else {
            return Look::NotYet;
        };
        let sig = (path.clone(), meta.len(), modified);
        if self.manifest_sig.as_ref() == Some(&sig) {
            return Look::Unchanged;
        }
        let Ok(state) = ManifestState::from_file(&path) else {
            return Look::NotYet;
        };
        self.manifest_sig = Some(sig);
        let mut live: Vec<(u32, String)> = state
            .column_families
            .iter()
            .map(|(id, cf)| (*id, cf.name.clone()))
            .collect();
        live.sort();
        Look::Changed(live)
    }

    /// Called after each poll with the last sequence read so far; returns true when a
    /// column family change is newly detected.
    pub(crate) fn observe(&mut self, base: Option<&BaseSummary>, read_up_to: u64) -> bool {
        let Some(base) = base else {
            return false;
        };
        let matches = match self.look() {
            Look::NotYet => return false,
            // Unchanged since a look that matched: still matching.
            Look::Unchanged => self.live == base_set(base),
            Look::Changed(live) => {
                self.live = live;
                self.live == base_set(base)
            }
        };
        if matches {
            if self.changed_from.is_none() {
                // Every record read before this look was written before any change.
                self.last_matching_seq = self.last_matching_seq.max(read_up_to);
            }
            false
        } else if self.changed_from.is_none() {
            self.changed_from = Some(self.last_matching_seq + 1);
            tracing::warn!(
                live = ?self.live,
                in_newest_base = ?base_set(base),
                from_seq = self.last_matching_seq + 1,
                "column families changed: taking a new base backup; points between the change \
                 and that base cannot be restored"
            );
            true
        } else {
            false
        }
    }
}

/// What a look at the MANIFEST found.
#[derive(Debug)]
enum Look {
    NotYet,
    Unchanged,
    Changed(Vec<(u32, String)>),
}

fn base_set(base: &BaseSummary) -> Vec<(u32, String)> {
    let mut set: Vec<(u32, String)> = base
        .column_families
        .iter()
        .map(|c| (c.id, c.name.clone()))
        .collect();
    set.sort();
    set
}

/// What a finished base means for the watch.
#[derive(Debug)]
pub(crate) enum AfterBase {
    /// It started before the change and does not know the live set: another base is needed.
    Stale,
    /// It knows the live set; records before it that may not restore make this gap.
    Current { gap: Option<Gap> },
}

fn column_family_gap(first_seq: u64, last_seq: u64) -> Gap {
    Gap {
        first_seq,
        last_seq,
        kind: GapKind::ColumnFamilyChange,
        detected_at: OffsetDateTime::now_utc(),
        detail: "column families were created or dropped; no base knows the new set before \
                 this point"
            .to_owned(),
    }
}
