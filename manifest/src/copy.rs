//! Copying a repository into a second one (FORMAT.md §4.7): what a destination must hold to
//! be the same repository as its source, how to tell a destination that has diverged, what
//! it lacks (in the write order of §4.5), and moving one object across, verified, through
//! each side's own store stack (the source's decrypts, the destination's encrypts).
//!
//! Who may write to the destination (its lease) and what is reported is the program's
//! policy; the rules of the format are here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use time::OffsetDateTime;

use crate::checksum;
use crate::keys;
use crate::model::{
    self, BaseDescriptor, Generation, IndexPageRef, ObjectLock, ObjectRef, RepositoryConfig,
    SegmentEntry, Writer,
};
use crate::repo::{RepoError, RepoState, Repository};
use crate::segment::SegmentError;
use crate::store::StoreError;

/// Why a copy cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "{to} holds another repository than {from}: {detail}; a copy goes into an empty \
         location or into an earlier copy of the same repository: choose another --to URL"
    )]
    OtherRepository {
        from: String,
        to: String,
        detail: String,
    },
    #[error(
        "{to} has diverged from {from}: {detail}. Something other than `copy` wrote to it (an \
         archiver pointed at the copy?); `copy` never overwrites a history. Keep it aside \
         (it is restorable on its own) and copy into an empty location"
    )]
    Diverged {
        from: String,
        to: String,
        detail: String,
    },
    #[error(
        "{from} is encrypted, and copying it to {to} without a key would store its content in \
         the clear; give the destination a key (--to-encryption-key-file; the source's key \
         file works too)"
    )]
    WouldDecrypt { from: String, to: String },
    #[error(
        "{from} is written with S3 Object Lock ({lock}), and {to} cannot lock objects: \
         {reason}. Copy into a bucket created with Object Lock enabled, or pass \
         --unlocked-copy to keep a copy that anyone with write access to it can delete"
    )]
    CannotLock {
        from: String,
        to: String,
        lock: String,
        reason: String,
    },
    #[error("at the source {location}: {source}")]
    Source {
        location: String,
        #[source]
        source: RepoError,
    },
    #[error("at the destination {location}: {source}")]
    Destination {
        location: String,
        #[source]
        source: RepoError,
    },
}

impl CopyError {
    /// True when what was given is wrong (another repository, a missing key, no source):
    /// trying again unchanged fails again.
    pub fn is_usage(&self) -> bool {
        match self {
            CopyError::OtherRepository { .. }
            | CopyError::WouldDecrypt { .. }
            | CopyError::CannotLock { .. } => true,
            CopyError::Source { source, .. } | CopyError::Destination { source, .. } => {
                source.is_usage()
            }
            CopyError::Diverged { .. } => false,
        }
    }

    /// True when an object or a history did not verify (the destination diverged, a
    /// damaged object on either side).
    pub fn is_damage(&self) -> bool {
        match self {
            CopyError::Diverged { .. } => true,
            CopyError::Source { source, .. } | CopyError::Destination { source, .. } => {
                source.is_damage() || matches!(source, RepoError::History { .. })
            }
            _ => false,
        }
    }
}

/// One object the destination lacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CopyItem {
    /// A WAL segment (verified by its trailer, and its sha256 when indexed).
    Segment { entry: SegmentEntry },
    /// An index page (verified by the size and sha256 its generation records).
    IndexPage { reference: IndexPageRef },
    /// A base's file or a table file (verified by the size and sha256 of its `base.json`).
    BaseFile {
        key: String,
        size: u64,
        sha256: String,
    },
    /// A base's descriptor (verified by the size and sha256 its generation records).
    BaseDescriptor { reference: ObjectRef },
    /// A table file a new base references that the destination's current generation
    /// already lists, in a destination under an object lock: kept while at least half of
    /// its lock is left, written again from the source otherwise, so that every object a
    /// new base references stays locked at least that long ([`ObjectLock::reusable`], the
    /// rule base backups follow, FORMAT.md §3.2).
    ReusedTable {
        key: String,
        size: u64,
        sha256: String,
        lock: ObjectLock,
    },
}

impl CopyItem {
    /// The object's key.
    pub fn key(&self) -> &str {
        match self {
            CopyItem::Segment { entry } => &entry.key,
            CopyItem::IndexPage { reference } => &reference.key,
            CopyItem::BaseFile { key, .. } | CopyItem::ReusedTable { key, .. } => key,
            CopyItem::BaseDescriptor { reference } => &reference.key,
        }
    }

    /// Its size (of the plaintext).
    pub fn size(&self) -> u64 {
        match self {
            CopyItem::Segment { entry } => entry.stored_size,
            CopyItem::IndexPage { reference } => reference.size,
            CopyItem::BaseFile { size, .. } | CopyItem::ReusedTable { size, .. } => *size,
            CopyItem::BaseDescriptor { reference } => reference.size,
        }
    }
}

/// What a copy writes to the destination, in order: `before` (every object the source's
/// current generation references that the destination lacks: segments, index pages, base
/// files, descriptors), then `generation` (the source's current one renumbered as the
/// destination's next; `None` when the destination's current one already says the same),
/// then `tail` (segments after it, in sequence order).
#[derive(Debug, Clone)]
pub struct CopyPlan {
    /// `tidemark.json` to create at the destination, when it has none yet.
    pub create_config: Option<RepositoryConfig>,
    /// The source's current generation number, 0 when it has none.
    pub source_generation: u64,
    /// The destination's current generation number before the copy, 0 when it has none.
    pub destination_generation: u64,
    pub before: Vec<CopyItem>,
    pub generation: Option<Generation>,
    pub tail: Vec<CopyItem>,
    /// Objects referenced by the source that the destination's current state already holds.
    pub already_there: u64,
    /// The last sequence number the destination holds once the plan is carried out.
    pub reaches_seq: Option<u64>,
}

impl CopyPlan {
    /// Every object the plan writes, in order.
    pub fn objects(&self) -> impl Iterator<Item = &CopyItem> {
        self.before.iter().chain(self.tail.iter())
    }
}

/// The destination's state, when it has a repository.
#[derive(Debug, Clone)]
pub struct DestinationState {
    pub state: RepoState,
    /// The descriptors of the bases of its current generation.
    pub bases: Vec<BaseDescriptor>,
}

/// Checks that the destination's `tidemark.json` is the source's repository: the same
/// repository id, database and lineage (its encryption is its own).
pub fn check_same_repository(
    from: &str,
    to: &str,
    source: &RepositoryConfig,
    destination: &RepositoryConfig,
) -> Result<(), CopyError> {
    let differ = |what: &str, s: &dyn std::fmt::Debug, d: &dyn std::fmt::Debug| {
        Err(CopyError::OtherRepository {
            from: from.to_owned(),
            to: to.to_owned(),
            detail: format!("its {what} is {d:?}, the source's {s:?}"),
        })
    };
    if source.repository_id != destination.repository_id {
        return differ(
            "repository id",
            &source.repository_id,
            &destination.repository_id,
        );
    }
    if source.database_identity != destination.database_identity {
        return differ(
            "database identity",
            &source.database_identity,
            &destination.database_identity,
        );
    }
    if source.lineage != destination.lineage {
        return differ("lineage", &source.lineage, &destination.lineage);
    }
    Ok(())
}

/// The `tidemark.json` a new copy gets: the source's, with the destination's own encryption
/// and object lock. Refused when it would store an encrypted source in the clear. A copy of
/// a locked source keeps the lock when the destination can lock (`lockable`: the
/// destination store's answer to [`crate::store::ObjectStore::check_object_lock`]); one
/// that cannot is refused, unless `unlocked_ok`, when the copy records no lock.
pub fn destination_config(
    from: &str,
    to: &str,
    source: &RepositoryConfig,
    destination: &Repository,
    lockable: Result<(), String>,
    unlocked_ok: bool,
) -> Result<RepositoryConfig, CopyError> {
    if source.encryption.is_some() && destination.encryption().is_none() {
        return Err(CopyError::WouldDecrypt {
            from: from.to_owned(),
            to: to.to_owned(),
        });
    }
    let object_lock = match (source.object_lock, lockable) {
        (None, _) => None,
        (Some(lock), Ok(())) => Some(lock),
        (Some(_), Err(_)) if unlocked_ok => None,
        (Some(lock), Err(reason)) => {
            return Err(CopyError::CannotLock {
                from: from.to_owned(),
                to: to.to_owned(),
                lock: lock.to_string(),
                reason,
            });
        }
    };
    Ok(RepositoryConfig {
        encryption: destination.encryption().cloned(),
        object_lock,
        ..source.clone()
    })
}

/// Reads the destination's state (its current generation, its bases' descriptors): `None`
/// when it has no repository yet.
pub async fn destination_state(
    destination: &Repository,
) -> Result<Option<DestinationState>, RepoError> {
    if destination.read_config().await?.is_none() {
        return Ok(None);
    }
    let state = destination.load().await?;
    let mut bases = Vec::new();
    if let Some(g) = &state.generation {
        for b in &g.bases {
            bases.push(destination.read_base(g.generation, b).await?);
        }
    }
    Ok(Some(DestinationState { state, bases }))
}

/// Checks that everything the destination holds is what the source holds, or held before
/// it pruned it: every segment of the destination's history is the source's segment of
/// that key (same header fields, same sha256 where both are known) or lies where the source
/// records no segments (pruned); every base of its current generation is the source's base
/// of that id with the same descriptor, or older than the source's newest base (pruned).
pub fn check_not_diverged(
    from: &str,
    to: &str,
    source: &RepoState,
    destination: &DestinationState,
) -> Result<(), CopyError> {
    let diverged = |detail: String| {
        Err(CopyError::Diverged {
            from: from.to_owned(),
            to: to.to_owned(),
            detail,
        })
    };
    let src: BTreeMap<&str, &SegmentEntry> = source
        .history
        .segments
        .iter()
        .map(|s| (s.key.as_str(), s))
        .collect();
    let src_first = source.history.segments.first().map(|s| s.first_seq);
    for d in &destination.state.history.segments {
        match src.get(d.key.as_str()) {
            Some(s) if same_segment(s, d) => {}
            Some(_) => {
                return diverged(format!(
                    "its segment {} differs from the source's segment of that key",
                    d.key
                ));
            }
            None if src_first.is_some_and(|f| d.first_seq < f) => {}
            None if pruned_at_source(source, d) => {}
            None => {
                return diverged(format!(
                    "it holds segment {} (sequences {}..={}), which the source does not have",
                    d.key, d.first_seq, d.last_seq
                ));
            }
        }
    }
    let src_bases: BTreeMap<&str, _> = source
        .history
        .bases
        .iter()
        .map(|b| (b.id.as_str(), b))
        .collect();
    let newest_src = source.history.bases.iter().map(|b| b.created_at).max();
    for b in &destination.state.history.bases {
        match src_bases.get(b.id.as_str()) {
            Some(s) if s.descriptor == b.descriptor => {}
            Some(_) => {
                return diverged(format!(
                    "its base backup {} has another descriptor (sha256) than the source's",
                    b.id
                ));
            }
            None if newest_src.is_some_and(|n| b.created_at < n) => {}
            None => {
                return diverged(format!(
                    "it holds base backup {}, which the source does not have",
                    b.id
                ));
            }
        }
    }
    Ok(())
}

/// The same segment: every field of its header, and the sha256 where both sides know it.
fn same_segment(a: &SegmentEntry, b: &SegmentEntry) -> bool {
    let sha_agrees = match (&a.sha256, &b.sha256) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    sha_agrees
        && a.first_seq == b.first_seq
        && a.last_seq == b.last_seq
        && a.record_count == b.record_count
        && a.first_time == b.first_time
        && a.last_time == b.last_time
        && a.time_source == b.time_source
        && a.first_log == b.first_log
        && a.last_log == b.last_log
        && a.raw_size == b.raw_size
        && a.stored_size == b.stored_size
}

/// Whether the source records the segment's range as one without segments (pruned, or
/// never archived): the source had it and dropped it.
fn pruned_at_source(source: &RepoState, s: &SegmentEntry) -> bool {
    source
        .history
        .gaps
        .iter()
        .any(|g| g.kind.has_no_segments() && g.first_seq <= s.first_seq && s.last_seq <= g.last_seq)
}

/// What the destination lacks of the source's current state, in write order (FORMAT.md
/// §4.7). `source_bases` are the descriptors of the source's current generation's bases.
pub fn plan_copy(
    source: &RepoState,
    source_bases: &[BaseDescriptor],
    destination: Option<&DestinationState>,
    create_config: Option<RepositoryConfig>,
    writer: Writer,
    now: OffsetDateTime,
) -> CopyPlan {
    let dst_state = destination.map(|d| &d.state);
    let mut plan = CopyPlan {
        create_config,
        source_generation: source.generation.as_ref().map_or(0, |g| g.generation),
        destination_generation: dst_state.map_or(0, |d| d.newest_generation),
        before: Vec::new(),
        generation: None,
        tail: Vec::new(),
        already_there: 0,
        reaches_seq: dst_state.and_then(|d| d.history.segments.last().map(|s| s.last_seq)),
    };
    // Without a generation at the source there is nothing a reader of the copy could use
    // (§4.5 rule 4: a repository's first segment follows its first generation).
    let Some(g) = &source.generation else {
        return plan;
    };
    let have_segments: BTreeSet<&str> = dst_state
        .map(|d| d.history.segments.iter().map(|s| s.key.as_str()).collect())
        .unwrap_or_default();
    let dst_gen = dst_state.and_then(|d| d.generation.as_ref());
    let indexed = source.history.segments.len() - source.tail_segments;
    let (in_pages, tail) = source.history.segments.split_at(indexed);
    for s in in_pages {
        push_missing(&mut plan, &have_segments, s, false);
    }
    let have_pages: Vec<&IndexPageRef> = dst_gen
        .map(|d| d.index_pages.iter().collect())
        .unwrap_or_default();
    for p in &g.index_pages {
        if have_pages.contains(&p) {
            plan.already_there += 1;
        } else {
            plan.before.push(CopyItem::IndexPage {
                reference: p.clone(),
            });
        }
    }
    plan_bases(&mut plan, g, source_bases, destination);
    if dst_gen.is_none_or(|d| !same_content(d, g)) {
        plan.generation = Some(Generation {
            generation: plan.destination_generation + 1,
            written_at: now,
            writer,
            ..g.clone()
        });
    }
    for s in tail {
        push_missing(&mut plan, &have_segments, s, true);
    }
    plan.reaches_seq = source
        .history
        .segments
        .last()
        .map(|s| s.last_seq)
        .or(plan.reaches_seq);
    plan
}

fn push_missing(plan: &mut CopyPlan, have: &BTreeSet<&str>, s: &SegmentEntry, tail: bool) {
    if have.contains(s.key.as_str()) {
        plan.already_there += 1;
        return;
    }
    let item = CopyItem::Segment { entry: s.clone() };
    if tail {
        plan.tail.push(item);
    } else {
        plan.before.push(item);
    }
}

/// The files and descriptors of the source's bases the destination's current generation
/// does not list. A table file that a base of the destination's current generation lists
/// with the same size is not copied again (the rule base backups follow, FORMAT.md §4.6);
/// under the destination's object lock, only while half of its lock is left
/// ([`CopyItem::ReusedTable`]).
fn plan_bases(
    plan: &mut CopyPlan,
    g: &Generation,
    source_bases: &[BaseDescriptor],
    destination: Option<&DestinationState>,
) {
    let dst_gen = destination.and_then(|d| d.state.generation.as_ref());
    let have_base = |id: &str, descriptor: &ObjectRef| {
        dst_gen.is_some_and(|d| {
            d.bases
                .iter()
                .any(|b| b.id == id && &b.descriptor == descriptor)
        })
    };
    let mut planned = BTreeSet::new();
    let have_files: BTreeMap<String, u64> = destination
        .map(|d| {
            d.bases
                .iter()
                .flat_map(|b| b.files.iter().map(|f| (f.key.clone(), f.size)))
                .collect()
        })
        .unwrap_or_default();
    let lock = destination.and_then(|d| d.state.config.object_lock);
    for (summary, d) in g.bases.iter().zip(source_bases) {
        if have_base(&summary.id, &summary.descriptor) {
            plan.already_there += 1 + d.files.len() as u64;
            continue;
        }
        for f in &d.files {
            let listed = have_files.get(&f.key) == Some(&f.size);
            if listed && lock.is_none() {
                plan.already_there += 1;
                continue;
            }
            // A table file several new bases share is copied (or checked) once.
            if !planned.insert(f.key.clone()) {
                continue;
            }
            if let (true, Some(lock)) = (listed, lock) {
                plan.before.push(CopyItem::ReusedTable {
                    key: f.key.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                    lock,
                });
                continue;
            }
            plan.before.push(CopyItem::BaseFile {
                key: f.key.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            });
        }
        plan.before.push(CopyItem::BaseDescriptor {
            reference: summary.descriptor.clone(),
        });
    }
}

/// Whether two generations say the same, whatever their numbers, times and writers.
pub fn same_content(a: &Generation, b: &Generation) -> bool {
    a.repository_id == b.repository_id
        && a.time_precision == b.time_precision
        && a.bases == b.bases
        && a.index_pages == b.index_pages
        && a.tail_start_seq == b.tail_start_seq
        && a.gaps == b.gaps
        && a.retention == b.retention
}

/// How one object went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Read from the source, verified, written to the destination.
    Written,
    /// Already at the destination (left by an interrupted copy): read back there and
    /// verified, not written again.
    Verified,
    /// A table the destination's current generation lists, still locked long enough:
    /// kept as it is, not read.
    Kept,
}

/// Copies one object of a plan from `source` to `destination`, verified on the way, using
/// `scratch` for a temporary file (removed again). An object already at the destination is
/// verified there instead of copied again; one that fails the check is
/// [`RepoError::Conflict`] for a segment or descriptor (create-only objects are never
/// overwritten) and replaced for a base file or index page (as their writers do).
pub async fn copy_object(
    source: &Repository,
    destination: &Repository,
    item: &CopyItem,
    scratch: &Path,
) -> Result<Copied, CopyError> {
    let src = |e: RepoError| CopyError::Source {
        location: source.location(),
        source: e,
    };
    let dst = |e: RepoError| CopyError::Destination {
        location: destination.location(),
        source: e,
    };
    match item {
        CopyItem::Segment { entry } => copy_segment(source, destination, entry, scratch).await,
        CopyItem::IndexPage { reference } => {
            let r = ObjectRef {
                key: reference.key.clone(),
                size: reference.size,
                sha256: reference.sha256.clone(),
            };
            if verified_document(destination, &r).await.map_err(dst)? {
                return Ok(Copied::Verified);
            }
            let bytes = source.read_index_page_bytes(reference).await.map_err(src)?;
            destination
                .store()
                .put(&r.key, bytes)
                .await
                .map_err(|e| dst(e.into()))?;
            Ok(Copied::Written)
        }
        CopyItem::BaseDescriptor { reference } => {
            let bytes = source.read_document_bytes(reference).await.map_err(src)?;
            model::parse_document::<BaseDescriptor>(&reference.key, &bytes)
                .map_err(|e| src(e.into()))?;
            create_only(destination, &reference.key, bytes, &reference.sha256)
                .await
                .map_err(dst)
        }
        CopyItem::BaseFile { key, size, sha256 } => {
            copy_base_file(source, destination, key, *size, sha256, scratch).await
        }
        CopyItem::ReusedTable {
            key,
            size,
            sha256,
            lock,
        } => {
            let meta = destination
                .store()
                .head(key)
                .await
                .map_err(|e| dst(e.into()))?;
            let written_at = meta.and_then(|m| m.last_modified);
            if lock.reusable(written_at, OffsetDateTime::now_utc()) {
                return Ok(Copied::Kept);
            }
            tracing::debug!(
                key,
                "table written again: less than half its object lock is left"
            );
            write_base_file(source, destination, key, *size, sha256, scratch).await
        }
    }
}

/// Whether `r` is at the destination with its size and sha256.
async fn verified_document(destination: &Repository, r: &ObjectRef) -> Result<bool, RepoError> {
    match destination.store().get_max(&r.key, r.size).await {
        Ok(b) => Ok(checksum::check_bytes(&r.key, &r.sha256, r.size, &b).is_ok()),
        Err(StoreError::NotFound { .. } | StoreError::TooLarge { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates `key` with `bytes` (put-if-absent); one already there with the same sha256 is
/// [`Copied::Verified`], any other a conflict.
async fn create_only(
    destination: &Repository,
    key: &str,
    bytes: Bytes,
    sha256: &str,
) -> Result<Copied, RepoError> {
    let len = bytes.len() as u64;
    match destination.store().put_if_absent(key, bytes).await {
        Ok(_) => Ok(Copied::Written),
        Err(StoreError::PreconditionFailed { .. }) => {
            // Longer than the copy: another object (read no further).
            let existing = match destination.store().get_max(key, len).await {
                Err(StoreError::TooLarge { .. }) => Bytes::new(),
                other => other?,
            };
            if checksum::sha256_hex(&existing) == sha256 {
                Ok(Copied::Verified)
            } else {
                Err(RepoError::Conflict {
                    location: destination.location(),
                    key: key.to_owned(),
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// A segment: downloaded from the source and verified completely (trailer, frames, and its
/// sha256 when indexed), then created at the destination. One there already must verify
/// the same way and have the same sha256.
async fn copy_segment(
    source: &Repository,
    destination: &Repository,
    entry: &SegmentEntry,
    scratch: &Path,
) -> Result<Copied, CopyError> {
    let src = |e: RepoError| CopyError::Source {
        location: source.location(),
        source: e,
    };
    let dst = |e: RepoError| CopyError::Destination {
        location: destination.location(),
        source: e,
    };
    let path = source.fetch_segment(entry, scratch).await.map_err(src)?;
    let read = tokio::fs::read(&path).await;
    let _ = tokio::fs::remove_file(&path).await;
    let bytes = Bytes::from(read.map_err(|source| {
        src(SegmentError::Io {
            key: entry.key.clone(),
            source,
        }
        .into())
    })?);
    let sha = checksum::sha256_hex(&bytes);
    match create_only(destination, &entry.key, bytes, &sha).await {
        Ok(c @ (Copied::Written | Copied::Kept)) => Ok(c),
        Ok(Copied::Verified) => {
            // Same bytes; checked in full as a reader of the copy would.
            let checked = SegmentEntry {
                sha256: Some(sha),
                ..entry.clone()
            };
            let p = destination
                .fetch_segment(&checked, scratch)
                .await
                .map_err(dst)?;
            let _ = tokio::fs::remove_file(p).await;
            Ok(Copied::Verified)
        }
        Err(e) => Err(dst(e)),
    }
}

/// A base's file: one at the destination with the size and sha256 its descriptor lists is
/// kept; otherwise it is downloaded from the source, checked against the descriptor, and
/// uploaded (replacing what was there).
async fn copy_base_file(
    source: &Repository,
    destination: &Repository,
    key: &str,
    size: u64,
    sha256: &str,
    scratch: &Path,
) -> Result<Copied, CopyError> {
    let dst = |e: RepoError| CopyError::Destination {
        location: destination.location(),
        source: e,
    };
    let path = scratch.join("base-file");
    if destination
        .store()
        .head(key)
        .await
        .map_err(|e| dst(e.into()))?
        .is_some()
    {
        let ok = download_checked(destination, key, size, sha256, &path).await;
        let _ = std::fs::remove_file(&path);
        match ok {
            Ok(()) => return Ok(Copied::Verified),
            Err(e) => tracing::warn!(key, error = %e, "replacing a file that does not verify"),
        }
    }
    write_base_file(source, destination, key, size, sha256, scratch).await
}

/// Downloads a base's file from the source, checks it, and writes it to the destination
/// (replacing what is there).
async fn write_base_file(
    source: &Repository,
    destination: &Repository,
    key: &str,
    size: u64,
    sha256: &str,
    scratch: &Path,
) -> Result<Copied, CopyError> {
    let path = scratch.join("base-file");
    let result = async {
        download_checked(source, key, size, sha256, &path)
            .await
            .map_err(|e| CopyError::Source {
                location: source.location(),
                source: e,
            })?;
        destination
            .put_base_file(key, &path)
            .await
            .map_err(|e| CopyError::Destination {
                location: destination.location(),
                source: e,
            })
    }
    .await;
    let _ = std::fs::remove_file(&path);
    result.map(|()| Copied::Written)
}

/// Downloads `key` to `path` (at most `size` bytes) and checks its size and sha256.
async fn download_checked(
    repo: &Repository,
    key: &str,
    size: u64,
    sha256: &str,
    path: &Path,
) -> Result<(), RepoError> {
    let found = repo.store().get_to_file_max_hashed(key, path, size).await?;
    checksum::check(key, sha256, size, &found.sha256, found.len)?;
    Ok(())
}

impl Repository {
    /// The bytes of an index page, verified against its reference.
    pub async fn read_index_page_bytes(&self, r: &IndexPageRef) -> Result<Bytes, RepoError> {
        let obj = ObjectRef {
            key: r.key.clone(),
            size: r.size,
            sha256: r.sha256.clone(),
        };
        self.read_document_bytes(&obj).await
    }

    /// The bytes of a document a generation references, verified against the reference.
    pub async fn read_document_bytes(&self, r: &ObjectRef) -> Result<Bytes, RepoError> {
        let got = self.store().get(&r.key).await;
        let bytes = got.map_err(|e| crate::repo::document_error(&r.key, e))?;
        checksum::check_bytes(&r.key, &r.sha256, r.size, &bytes)?;
        Ok(bytes)
    }
}

/// Keys of the layout a plan may write (a guard against a hostile source naming others).
pub fn check_item_key(item: &CopyItem) -> Result<(), RepoError> {
    let ok = matches!(
        (item, keys::parse_listed_key(item.key())),
        (CopyItem::Segment { .. }, Ok(keys::LayoutKey::Segment(_)))
            | (
                CopyItem::IndexPage { .. },
                Ok(keys::LayoutKey::IndexPage { .. })
            )
            | (
                CopyItem::BaseDescriptor { .. },
                Ok(keys::LayoutKey::BaseDescriptor { .. })
            )
            | (
                CopyItem::BaseFile { .. },
                Ok(keys::LayoutKey::Table { .. } | keys::LayoutKey::BaseFile { .. })
            )
            | (
                CopyItem::ReusedTable { .. },
                Ok(keys::LayoutKey::Table { .. })
            )
    );
    if ok {
        Ok(())
    } else {
        Err(model::ModelError::Inconsistent {
            key: item.key().to_owned(),
            detail: "a copy writes only objects of the layout of their kind".to_owned(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FORMAT_VERSION, GapKind, IndexPage};
    use crate::store::{MemoryStore, ObjectStore};
    use crate::testing;
    use std::sync::Arc;

    fn memory() -> Repository {
        Repository::new(Arc::new(MemoryStore::new()))
    }

    /// A source with one indexed segment (1..=10), one tail segment (11..=20) and a base.
    async fn source() -> Repository {
        let r = memory();
        r.create_config(&testing::config()).await.unwrap();
        let first = testing::encoded_segment(1, 10);
        r.write_segment(&first).await.unwrap();
        let page = IndexPage {
            format_version: FORMAT_VERSION,
            first_seq: 1,
            last_seq: 10,
            segments: vec![first.entry()],
        };
        let page_ref = r.write_index_page(&page).await.unwrap();
        let base = testing::write_base(&r, 5).await;
        let mut g = testing::generation(1, testing::at_secs(1));
        g.index_pages = vec![page_ref];
        g.bases = vec![base];
        g.tail_start_seq = 11;
        r.write_generation(&g).await.unwrap();
        r.write_segment(&testing::encoded_segment(11, 20))
            .await
            .unwrap();
        r
    }

    async fn plan(src: &Repository, dst: &Repository) -> Result<CopyPlan, CopyError> {
        let s = src.load().await.unwrap();
        let g = s.generation.clone().unwrap();
        let mut bases = Vec::new();
        for b in &g.bases {
            bases.push(src.read_base(g.generation, b).await.unwrap());
        }
        let d = destination_state(dst).await.unwrap();
        let create = match &d {
            Some(d) => {
                check_same_repository("a", "b", &s.config, &d.state.config)?;
                check_not_diverged("a", "b", &s, d)?;
                None
            }
            None => Some(destination_config("a", "b", &s.config, dst, Ok(()), false)?),
        };
        Ok(plan_copy(
            &s,
            &bases,
            d.as_ref(),
            create,
            testing::writer(),
            testing::at_secs(9),
        ))
    }

    async fn carry_out(src: &Repository, dst: &Repository, p: &CopyPlan) -> Vec<Copied> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(c) = &p.create_config {
            dst.create_config(c).await.unwrap();
        }
        let mut out = Vec::new();
        for item in &p.before {
            out.push(copy_object(src, dst, item, dir.path()).await.unwrap());
        }
        if let Some(g) = &p.generation {
            dst.write_generation(g).await.unwrap();
        }
        for item in &p.tail {
            out.push(copy_object(src, dst, item, dir.path()).await.unwrap());
        }
        out
    }

    /// A base of `repo` (from [`testing::write_base`]) that also holds one table file with
    /// the content `table`, stored content-addressed under `sst/`.
    async fn base_with_table(repo: &Repository, table: &'static [u8]) -> model::BaseSummary {
        let mut summary = testing::write_base(repo, 5).await;
        let key = summary.descriptor.key.clone();
        let bytes = repo.store().get(&key).await.unwrap();
        let mut d = model::parse_document::<BaseDescriptor>(&key, &bytes).unwrap();
        let sha256 = checksum::sha256_hex(table);
        let table_key = keys::sst_key(&sha256);
        repo.store()
            .put(&table_key, Bytes::from_static(table))
            .await
            .unwrap();
        d.files.push(model::BaseFile {
            name: "000009.sst".into(),
            size: table.len() as u64,
            sha256,
            key: table_key,
        });
        let bytes = model::to_document_bytes(&d);
        repo.store()
            .put(&key, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        summary.descriptor = ObjectRef {
            key,
            size: bytes.len() as u64,
            sha256: checksum::sha256_hex(&bytes),
        };
        summary.total_size += table.len() as u64;
        summary
    }

    /// Copies a locked source with one base to a locked destination, lets `days` pass at
    /// the destination, then copies a second base sharing the first one's table. Returns
    /// how the shared table went and its retain-until date at the destination before and
    /// after.
    async fn reuse_after(days: i64) -> (Copied, OffsetDateTime, OffsetDateTime) {
        let lock = ObjectLock {
            mode: model::LockMode::Governance,
            days: 10,
        };
        let src = memory();
        let mut c = testing::config();
        c.object_lock = Some(lock);
        src.create_config(&c).await.unwrap();
        let first = base_with_table(&src, b"a shared table").await;
        let mut g = testing::generation(1, testing::at_secs(1));
        g.bases = vec![first.clone()];
        src.write_generation(&g).await.unwrap();
        let dst_store = Arc::new(MemoryStore::new());
        dst_store.set_object_lock(Some(lock));
        let dst = Repository::new(dst_store.clone());
        let p = plan(&src, &dst).await.unwrap();
        carry_out(&src, &dst, &p).await;
        let table = keys::sst_key(&checksum::sha256_hex(b"a shared table"));
        dst_store.age(time::Duration::days(days));
        let before = dst_store.retain_until(&table).unwrap();

        let second = base_with_table(&src, b"a shared table").await;
        let mut g = testing::generation(2, testing::at_secs(2));
        g.bases = vec![first, second];
        src.write_generation(&g).await.unwrap();
        let p = plan(&src, &dst).await.unwrap();
        let items: Vec<&CopyItem> = p
            .objects()
            .filter(|i| matches!(i, CopyItem::ReusedTable { .. }))
            .collect();
        assert_eq!(items.len(), 1, "{:?}", p.before);
        assert_eq!(items[0].key(), table);
        let done = carry_out(&src, &dst, &p).await;
        let position = p.objects().position(|i| i.key() == table).unwrap();
        let after = dst_store.retain_until(&table).unwrap();
        (done[position], before, after)
    }

    /// Under the destination's object lock, a table a new base shares with an older one is
    /// kept only while at least half of its lock is left; otherwise it is written again,
    /// with a fresh lock, as a base backup does at the source.
    #[tokio::test]
    async fn a_shared_table_under_a_lock_is_reused_only_while_half_its_lock_is_left() {
        let (how, before, after) = reuse_after(2).await;
        assert_eq!(how, Copied::Kept);
        assert_eq!(before, after, "a kept table is not written again");

        let (how, before, after) = reuse_after(6).await;
        assert_eq!(how, Copied::Written);
        assert!(
            after - before >= time::Duration::days(5),
            "written again with a fresh lock: {before} -> {after}"
        );
        assert!(after > OffsetDateTime::now_utc() + time::Duration::days(9));
    }

    /// A base file or index page copied is hashed as it is downloaded, and checked.
    #[tokio::test]
    async fn a_checked_download_hashes_what_it_writes() {
        let spy = Arc::new(testing::SpyStore::new(Arc::new(MemoryStore::new())));
        let repo = Repository::new(spy.clone());
        let data = b"table bytes";
        let sha = checksum::sha256_hex(data);
        spy.put("sst/x", Bytes::from_static(data)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        download_checked(&repo, "sst/x", 11, &sha, &path)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(spy.counts(), (1, 0), "(hashed, plain) downloads");
        let other = checksum::sha256_hex(b"other bytes");
        let e = download_checked(&repo, "sst/x", 11, &other, &path)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let e = download_checked(&repo, "sst/x", 10, &sha, &path)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("longer than the 10 bytes"), "{e}");
    }

    #[tokio::test]
    async fn a_copy_writes_what_is_missing_in_order_then_nothing() {
        let (src, dst) = (source().await, memory());
        let p = plan(&src, &dst).await.unwrap();
        let keys: Vec<&str> = p.objects().map(CopyItem::key).collect();
        assert!(keys[0].starts_with("wal/"), "{keys:?}");
        assert!(keys[1].starts_with("index/"), "{keys:?}");
        assert!(keys[2].ends_with("/files/CURRENT"), "{keys:?}");
        assert!(keys[3].ends_with("/base.json"), "{keys:?}");
        assert_eq!(keys[4], keys::segment_key(11));
        assert_eq!(p.generation.as_ref().map(|g| g.generation), Some(1));
        let done = carry_out(&src, &dst, &p).await;
        assert!(done.iter().all(|c| *c == Copied::Written));

        let (a, b) = (src.load().await.unwrap(), dst.load().await.unwrap());
        assert_eq!(a.history.segments.len(), b.history.segments.len());
        assert_eq!(a.history.bases, b.history.bases);
        assert!(same_content(
            a.generation.as_ref().unwrap(),
            b.generation.as_ref().unwrap()
        ));
        let again = plan(&src, &dst).await.unwrap();
        assert_eq!(again.objects().count(), 0);
        assert!(again.generation.is_none());
        assert_eq!(again.reaches_seq, Some(20));
    }

    #[tokio::test]
    async fn objects_left_by_an_interrupted_copy_are_verified_not_written() {
        let (src, dst) = (source().await, memory());
        let p = plan(&src, &dst).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        dst.create_config(p.create_config.as_ref().unwrap())
            .await
            .unwrap();
        // The first two objects landed before a crash.
        for item in &p.before[..2] {
            copy_object(&src, &dst, item, dir.path()).await.unwrap();
        }
        // The segment is in the copy's state now (its tail walk finds it, its header is the
        // source's); the index page is read back and checked.
        let p = plan(&src, &dst).await.unwrap();
        assert_eq!(p.already_there, 1);
        let done = carry_out(&src, &dst, &p).await;
        assert_eq!(
            done,
            vec![
                Copied::Verified,
                Copied::Written,
                Copied::Written,
                Copied::Written
            ]
        );
        // A segment of that key with other content is a conflict, never overwritten.
        let other = memory();
        other.create_config(&testing::config()).await.unwrap();
        let fake = testing::encoded_segment(1, 9);
        other
            .store()
            .put(&keys::segment_key(1), fake.bytes.clone())
            .await
            .unwrap();
        let item = CopyItem::Segment {
            entry: src.load().await.unwrap().history.segments[0].clone(),
        };
        let e2 = copy_object(&src, &other, &item, dir.path())
            .await
            .unwrap_err();
        assert!(e2.to_string().contains("different content"), "{e2}");
    }

    #[tokio::test]
    async fn another_repository_and_a_diverged_copy_are_refused() {
        let src = source().await;
        let other = memory();
        let mut c = testing::config();
        c.repository_id = "repo-2".into();
        other.create_config(&c).await.unwrap();
        let e = plan(&src, &other).await.unwrap_err();
        assert!(matches!(e, CopyError::OtherRepository { .. }), "{e}");
        assert!(e.to_string().contains("repository id"), "{e}");

        // A copy, then a segment written there that the source does not have.
        let dst = memory();
        let p = plan(&src, &dst).await.unwrap();
        carry_out(&src, &dst, &p).await;
        dst.write_segment(&testing::encoded_segment(21, 30))
            .await
            .unwrap();
        let e = plan(&src, &dst).await.unwrap_err();
        assert!(matches!(e, CopyError::Diverged { .. }), "{e}");
        assert!(e.is_damage() && !e.is_usage());
        assert!(e.to_string().contains(&keys::segment_key(21)), "{e}");
    }

    #[test]
    fn segments_the_source_pruned_are_not_divergence() {
        let t = testing::at_secs(1);
        let mut source_state = RepoState {
            config: testing::config(),
            generation: Some(testing::generation(3, t)),
            history: Default::default(),
            tail_segments: 0,
            newest_generation: 3,
            warnings: Vec::new(),
        };
        source_state.history.segments = vec![testing::segment(21, 30, t, t)];
        source_state.history.gaps = vec![testing::gap(11, 20, GapKind::Pruned)];
        let mut dst_state = source_state.clone();
        dst_state.history.gaps.clear();
        dst_state.history.segments = vec![
            testing::segment(1, 10, t, t),
            testing::segment(11, 20, t, t),
            testing::segment(21, 30, t, t),
        ];
        let d = DestinationState {
            state: dst_state.clone(),
            bases: Vec::new(),
        };
        check_not_diverged("a", "b", &source_state, &d).unwrap();
        // The same key with other times is another segment.
        let mut changed = dst_state;
        changed.history.segments[2].last_time = testing::at_secs(2);
        let d = DestinationState {
            state: changed,
            bases: Vec::new(),
        };
        let e = check_not_diverged("a", "b", &source_state, &d).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
    }

    #[test]
    fn a_table_file_new_bases_share_is_planned_once_and_not_counted_as_there() {
        let t = testing::at_secs(1);
        let table = crate::model::BaseFile {
            name: "000009.sst".into(),
            size: 7,
            sha256: "ab".repeat(32),
            key: keys::sst_key(&"ab".repeat(32)),
        };
        let descriptor = |id: &str| BaseDescriptor {
            format_version: FORMAT_VERSION,
            id: id.into(),
            created_at: t,
            database_identity: "db-1".into(),
            min_log_number: 1,
            replay_from_seq: 1,
            earliest_seq: 1,
            earliest_time: t,
            next_file_number: 10,
            column_families: Vec::new(),
            files: vec![table.clone()],
        };
        let mut g = testing::generation(1, t);
        g.bases = vec![testing::base("b1", 1, 1, t), testing::base("b2", 1, 1, t)];
        let state = RepoState {
            config: testing::config(),
            generation: Some(g),
            history: Default::default(),
            tail_segments: 0,
            newest_generation: 1,
            warnings: Vec::new(),
        };
        let p = plan_copy(
            &state,
            &[descriptor("b1"), descriptor("b2")],
            None,
            None,
            testing::writer(),
            t,
        );
        let keys: Vec<&str> = p.objects().map(CopyItem::key).collect();
        assert_eq!(
            keys.iter().filter(|k| **k == table.key).count(),
            1,
            "{keys:?}"
        );
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(p.already_there, 0);
    }
}
