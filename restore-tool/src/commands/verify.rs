//! `verify`: checks, without restoring, that a repository holds everything a restore needs
//! and that it is intact.
//!
//! Loading the repository already checks the manifest, every index page's size and sha256,
//! and that the history has no unrecorded hole. Then, for the bases and segments in scope
//! (those one target needs, or with `--all` every one):
//!
//! - each base's `base.json` (size and sha256), its file names, and its `CURRENT`,
//!   `MANIFEST-*` and `OPTIONS-*` files (downloaded, sha256);
//! - each table file: downloaded and its sha256 checked;
//! - each segment: downloaded, its sha256, every frame and its trailer, and the record
//!   chain: every record continues the previous one, log numbers never decrease, and each
//!   base's first needed record is there, in its first WAL or a later one;
//! - with `--all`, segments no manifest or tail walk reaches are reported.
//!
//! Table files and segments are read where reading is cheap (a local directory) and with
//! `--deep`. Elsewhere (S3) the default checks only that they exist with the recorded size:
//! the server keeps no SHA-256 of them that could be compared without downloading (uploads
//! carry a CRC32, of the stored, possibly encrypted, bytes). The report then says "sizes
//! only" and how many objects were read, and the command exits with
//! [`exit_code::CONTENT_NOT_CHECKED`](crate::error::exit_code::CONTENT_NOT_CHECKED), never
//! with a plain OK.
//!
//! A manifest generation passed over as corrupt while loading is a problem too. Every
//! problem names the object. The command fails (exit code 4) if there is any.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};

use tidemark_manifest::chain::RecordChain;
use tidemark_manifest::checksum;
use tidemark_manifest::keys;
use tidemark_manifest::model::{BaseFile, BaseSummary, SegmentEntry};
use tidemark_manifest::plan::History;
use tidemark_manifest::repo::{ReadFrom, RepoState, Repository};
use tidemark_manifest::segment::SegmentReader;
use tidemark_manifest::store::{ObjectStore, PageCache};

use super::{Target, load_from};
use crate::progress::{PhaseBar, Progress, Unit};
use crate::{Cancel, RestoreError, human_bytes, human_duration, replay};

/// What to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyScope {
    /// What a restore to this target needs.
    Target(Target),
    /// Every base and every segment.
    All,
}

/// Options of `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOptions {
    pub scope: VerifyScope,
    /// Download everything and check every sha256, frame and record (the default where
    /// reading is cheap: a local directory).
    #[serde(default)]
    pub deep: bool,
    /// Verify from this manifest generation instead of the newest intact one.
    #[serde(default)]
    pub generation: Option<u64>,
    /// Concurrent downloads.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
}

fn default_parallelism() -> usize {
    super::restore::DEFAULT_PARALLELISM
}

/// One thing wrong, naming the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object's key, when the problem is about one object.
    pub object: Option<String>,
    pub problem: String,
}

/// What `verify` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub repository: String,
    pub scope: VerifyScope,
    pub deep: bool,
    /// Whether the content of every object was read (`--deep`, or a local directory), or
    /// table files and segments were checked by existence and size only.
    pub content: ContentCheck,
    /// The generation verified.
    pub generation: Option<u64>,
    pub bases: Vec<String>,
    pub segments_checked: usize,
    pub objects_checked: usize,
    /// Objects whose whole content was read and checked.
    pub objects_read: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
    pub duration_ms: u64,
}

/// How much of the objects `verify` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentCheck {
    /// Every object was read and checked against its sha256 (and segments frame by frame).
    Read,
    /// Table files and segments were checked for existence and size only.
    SizesOnly,
}

/// True where reading every object is cheap: a local directory (and memory, in tests).
fn reads_are_cheap(location: &str) -> bool {
    location.starts_with("file://") || location.starts_with("memory://")
}

impl VerifyReport {
    /// True when no problem was found (see [`VerifyReport::content`] for how much was
    /// checked).
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The exit code: problems first, then whether content went unchecked.
    pub fn exit_code(&self) -> u8 {
        use crate::error::exit_code;
        if !self.ok() {
            exit_code::VERIFICATION_FAILED
        } else if self.content == ContentCheck::SizesOnly {
            exit_code::CONTENT_NOT_CHECKED
        } else {
            exit_code::OK
        }
    }

    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let scope = match self.scope {
            VerifyScope::All => "everything".to_owned(),
            VerifyScope::Target(Target::Latest) => "what the latest point needs".to_owned(),
            VerifyScope::Target(target) => format!("what {} needs", target.describe()),
        };
        let plural = |n: usize, one: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {one}s")
            }
        };
        let how = match self.content {
            ContentCheck::Read => "every object read: sha256, frames and records".to_owned(),
            ContentCheck::SizesOnly => format!(
                "sizes only: {} of {} objects read, the other table files and segments \
                 checked for existence and size; --deep reads every byte",
                self.objects_read, self.objects_checked
            ),
        };
        let generation = self
            .generation
            .map_or_else(String::new, |g| format!(" (manifest generation {g})"));
        let _ = writeln!(
            w,
            "Verified {scope} in {}{generation} ({how}): {}, {}, {}, {} read in {}",
            self.repository,
            plural(self.bases.len(), "base"),
            plural(self.segments_checked, "segment"),
            plural(self.objects_checked, "object"),
            human_bytes(self.bytes_read),
            human_duration(Duration::from_millis(self.duration_ms))
        );
        for n in &self.notes {
            let _ = writeln!(w, "Note: {n}");
        }
        if self.problems.is_empty() && self.content == ContentCheck::SizesOnly {
            let _ = writeln!(
                w,
                "NOT VERIFIED: no problems in existence and sizes, but the content of {} \
                 objects was not read (sizes only); run with --deep to check every byte",
                self.objects_checked - self.objects_read
            );
        } else if self.problems.is_empty() {
            let _ = writeln!(w, "OK: no problems found");
        } else {
            let _ = writeln!(w, "{} PROBLEMS:", self.problems.len());
            for p in &self.problems {
                match &p.object {
                    Some(o) => {
                        let _ = writeln!(w, "  {o}: {}", p.problem);
                    }
                    None => {
                        let _ = writeln!(w, "  {}", p.problem);
                    }
                }
            }
        }
        out
    }
}

/// A temporary directory for `--deep` downloads, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Scratch, RestoreError> {
        let dir = std::env::temp_dir().join(format!(
            "tidemark-verify-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(|e| RestoreError::io("cannot create", &dir, e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn problem(object: impl Into<String>, p: impl Into<String>) -> Problem {
    Problem {
        object: Some(object.into()),
        problem: p.into(),
    }
}

/// The result of checking one object.
#[derive(Default)]
struct Checked {
    problems: Vec<Problem>,
    bytes: u64,
    /// The content was downloaded and checked (not only the size).
    read: bool,
}

async fn check_base_file(
    store: Arc<dyn ObjectStore>,
    f: BaseFile,
    deep: bool,
    scratch: PathBuf,
) -> Checked {
    let mut out = Checked::default();
    if keys::is_table_file(&f.name) && !deep {
        match store.head(&f.key).await {
            Ok(Some(meta)) if meta.size == f.size => {}
            Ok(Some(meta)) => out.problems.push(problem(
                &f.key,
                format!(
                    "table file {} is {} bytes, the base records {}",
                    f.name, meta.size, f.size
                ),
            )),
            Ok(None) => out
                .problems
                .push(problem(&f.key, format!("table file {} is missing", f.name))),
            Err(e) => out.problems.push(problem(&f.key, e.to_string())),
        }
        return out;
    }
    out.read = true;
    let path = scratch.join(format!("{:08x}", rand::random::<u32>()));
    // Only hashed, then deleted: around the page cache.
    match store
        .get_to_file_hashed(&f.key, &path, f.size, PageCache::Around)
        .await
    {
        Ok(found) => {
            out.bytes = found.len;
            if let Err(e) = checksum::check(&f.key, &f.sha256, f.size, &found.sha256, found.len) {
                out.problems.push(problem(&f.key, e.to_string()));
            }
        }
        Err(e) if e.is_not_found() => out
            .problems
            .push(problem(&f.key, format!("{} is missing", f.name))),
        Err(e) => out.problems.push(problem(&f.key, e.to_string())),
    }
    let _ = std::fs::remove_file(&path);
    out
}

async fn check_segment(
    repo: Repository,
    s: SegmentEntry,
    deep: bool,
    scratch: PathBuf,
) -> (Checked, Option<PathBuf>) {
    let mut out = Checked::default();
    if !deep {
        match repo.store().head(&s.key).await {
            Ok(Some(meta)) if meta.size == s.stored_size => {}
            Ok(Some(meta)) => out.problems.push(problem(
                &s.key,
                format!(
                    "segment is {} bytes, the index records {}",
                    meta.size, s.stored_size
                ),
            )),
            Ok(None) => out.problems.push(problem(&s.key, "segment is missing")),
            Err(e) => out.problems.push(problem(&s.key, e.to_string())),
        }
        return (out, None);
    }
    out.read = true;
    match repo.fetch_segment(&s, &scratch).await {
        Ok(path) => {
            out.bytes = s.stored_size;
            (out, Some(path))
        }
        Err(e) => {
            out.problems.push(problem(&s.key, e.to_string()));
            (out, None)
        }
    }
}

/// The first record a base needs, checked during the deep record pass.
#[derive(Debug)]
struct StartCheck {
    base: String,
    replay_from_seq: u64,
    min_log_number: u64,
    done: bool,
}

/// The record chain across every segment in scope (see the module documentation).
#[derive(Debug, Default)]
struct DeepChain {
    /// The record chain within a contiguous run of segments.
    chain: RecordChain,
    prev_segment_last: Option<u64>,
    starts: Vec<StartCheck>,
    problems: Vec<Problem>,
}

impl DeepChain {
    fn new(bases: &[BaseSummary]) -> DeepChain {
        DeepChain {
            starts: bases
                .iter()
                .filter(|b| b.replay_from_seq <= b.earliest_seq)
                .map(|b| StartCheck {
                    base: b.id.clone(),
                    replay_from_seq: b.replay_from_seq,
                    min_log_number: b.min_log_number,
                    done: false,
                })
                .collect(),
            ..DeepChain::default()
        }
    }

    fn segment(&mut self, entry: &SegmentEntry, path: &Path) {
        if self
            .prev_segment_last
            .is_none_or(|l| l + 1 != entry.first_seq)
        {
            self.chain.reset();
        }
        self.prev_segment_last = Some(entry.last_seq);
        let key = entry.key.as_str();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.problems
                    .push(problem(key, format!("cannot read back: {e}")));
                return;
            }
        };
        let mut reader = match SegmentReader::new(key, std::io::BufReader::new(file), None) {
            Ok(r) => r,
            Err(e) => {
                self.problems.push(problem(key, e.to_string()));
                return;
            }
        };
        loop {
            let r = match reader.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    self.problems.push(problem(key, e.to_string()));
                    self.chain.reset();
                    return;
                }
            };
            if let Err(source) = self.chain.push_record(&r) {
                let e = replay::ChainError::Records {
                    key: key.to_owned(),
                    source,
                };
                self.problems.push(problem(key, e.to_string()));
            }
            for s in self.starts.iter_mut().filter(|s| !s.done) {
                if r.log_number >= s.min_log_number && r.seq < s.replay_from_seq {
                    s.done = true;
                    self.problems.push(problem(
                        key,
                        format!(
                            "sequence {} is already in WAL {}, before the first record base {} \
                             needs (sequence {} of WAL {}): the base's starting point is wrong",
                            r.seq, r.log_number, s.base, s.replay_from_seq, s.min_log_number
                        ),
                    ));
                } else if r.next_seq() > s.replay_from_seq {
                    s.done = true;
                    if r.seq != s.replay_from_seq || r.log_number < s.min_log_number {
                        self.problems.push(problem(
                            key,
                            replay::ChainError::MissingStart {
                                base: s.base.clone(),
                                key: key.to_owned(),
                                min_log_number: s.min_log_number,
                                replay_from_seq: s.replay_from_seq,
                                found_seq: r.seq,
                                found_log: r.log_number,
                            }
                            .to_string(),
                        ));
                    }
                }
            }
        }
    }
}

/// What a scope covers, and what was found choosing it.
struct Scope {
    bases: Vec<BaseSummary>,
    segments: Vec<SegmentEntry>,
    problems: Vec<Problem>,
    notes: Vec<String>,
}

/// The bases and segments `scope` covers in `h`.
fn scope_items(h: &History, scope: VerifyScope) -> Result<Scope, RestoreError> {
    let mut out = Scope {
        bases: Vec::new(),
        segments: Vec::new(),
        problems: Vec::new(),
        notes: Vec::new(),
    };
    match scope {
        VerifyScope::Target(spec) => {
            let plan = h.plan(spec)?;
            if let Err(e) = replay::check_plan(&plan) {
                out.problems.push(Problem {
                    object: None,
                    problem: e.to_string(),
                });
            }
            out.bases = vec![plan.base.clone()];
            out.segments = plan.segments.clone();
        }
        VerifyScope::All => {
            for b in &h.bases {
                let needs = b.replay_from_seq <= b.earliest_seq;
                let held = h
                    .segments
                    .iter()
                    .any(|s| s.first_seq <= b.replay_from_seq && b.replay_from_seq <= s.last_seq);
                if needs && !held {
                    out.problems.push(Problem {
                        object: Some(b.descriptor.key.clone()),
                        problem: format!(
                            "base {} cannot be restored: no segment holds its first needed \
                             record (sequence {} of WAL {})",
                            b.id, b.replay_from_seq, b.min_log_number
                        ),
                    });
                }
            }
            if h.bases.is_empty() {
                out.notes
                    .push("the repository has no base backup yet: nothing is restorable".into());
            }
            out.bases = h.bases.clone();
            out.segments = h.segments.clone();
        }
    }
    Ok(out)
}

/// Running totals of a verification.
#[derive(Default)]
struct Tally {
    objects: usize,
    read: usize,
    bytes: u64,
    problems: Vec<Problem>,
}

impl Tally {
    fn add(&mut self, c: Checked) {
        self.objects += 1;
        self.read += usize::from(c.read);
        self.bytes += c.bytes;
        self.problems.extend(c.problems);
    }
}

/// Reads and checks the bases' descriptors; returns their files, each once (bases share
/// table files).
async fn check_descriptors(
    repo: &Repository,
    state: &RepoState,
    bases: &[BaseSummary],
    bar: &PhaseBar,
    cancel: &Cancel,
    tally: &mut Tally,
) -> Result<Vec<BaseFile>, RestoreError> {
    let generation = state.generation.as_ref().map_or(0, |g| g.generation);
    let mut files: Vec<BaseFile> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for b in bases {
        cancel.check()?;
        bar.inc(1);
        let mut c = Checked {
            read: true,
            ..Checked::default()
        };
        match repo.read_base(generation, b).await {
            Ok(d) => {
                c.bytes = b.descriptor.size;
                if let Err(e) = crate::fetch::check_base_files(&d.files) {
                    c.problems.push(problem(&b.descriptor.key, e.to_string()));
                    tally.add(c);
                    continue;
                }
                if d.database_identity != state.config.database_identity {
                    c.problems.push(problem(
                        &b.descriptor.key,
                        format!(
                            "base {} belongs to database {}, the repository to {}",
                            d.id, d.database_identity, state.config.database_identity
                        ),
                    ));
                }
                files.extend(d.files.into_iter().filter(|f| seen.insert(f.key.clone())));
            }
            Err(e) => c.problems.push(problem(&b.descriptor.key, e.to_string())),
        }
        tally.add(c);
    }
    Ok(files)
}

/// Checks base files: read (sha256) when `read`, otherwise table files by size.
async fn check_files(
    repo: &Repository,
    files: Vec<BaseFile>,
    read: bool,
    parallelism: usize,
    ctx: (&PhaseBar, &Scratch, &Cancel),
    tally: &mut Tally,
) -> Result<(), RestoreError> {
    let (bar, scratch, cancel) = ctx;
    let checked: Vec<Checked> = stream::iter(files.into_iter().map(|f| {
        let (store, dir, bar) = (repo.store().clone(), scratch.0.clone(), bar.clone());
        let cancel = cancel.clone();
        async move {
            if cancel.is_cancelled() {
                return Checked::default();
            }
            let c = check_base_file(store, f, read, dir).await;
            bar.inc(1);
            c
        }
    }))
    .buffer_unordered(parallelism)
    .collect()
    .await;
    cancel.check()?;
    checked.into_iter().for_each(|c| tally.add(c));
    Ok(())
}

/// Checks the segments in order, so that a reading pass can follow the record chain.
async fn check_segments(
    repo: &Repository,
    bases: &[BaseSummary],
    segments: &[SegmentEntry],
    read: bool,
    parallelism: usize,
    ctx: (&PhaseBar, &Scratch, &Cancel),
    tally: &mut Tally,
) -> Result<usize, RestoreError> {
    let (bar, scratch, cancel) = ctx;
    let mut chain = DeepChain::new(bases);
    let mut segments_checked = 0usize;
    let mut results = stream::iter(segments.iter().cloned().map(|s| {
        let (repo, dir) = (repo.clone(), scratch.0.clone());
        let cancel = cancel.clone();
        async move {
            if cancel.is_cancelled() {
                return (s, Checked::default(), None);
            }
            let (c, path) = check_segment(repo, s.clone(), read, dir).await;
            (s, c, path)
        }
    }))
    .buffered(parallelism);
    while let Some((entry, c, path)) = results.next().await {
        cancel.check()?;
        segments_checked += 1;
        bar.inc(1);
        tally.add(c);
        if let Some(path) = path {
            chain = tokio::task::spawn_blocking(move || {
                chain.segment(&entry, &path);
                let _ = std::fs::remove_file(&path);
                chain
            })
            .await
            .expect("the record check does not panic");
        } else if read {
            // Without this segment the chain cannot be followed across it.
            chain.chain.reset();
            chain.prev_segment_last = None;
        }
    }
    if read {
        for s in chain.starts.iter().filter(|s| !s.done) {
            tally.problems.push(Problem {
                object: None,
                problem: format!(
                    "the first record base {} needs (sequence {} of WAL {}) was not found in any \
                     segment",
                    s.base, s.replay_from_seq, s.min_log_number
                ),
            });
        }
        tally.problems.extend(chain.problems);
    }
    Ok(segments_checked)
}

/// With `--all`: segments that exist but that no manifest or tail walk reaches.
async fn unreachable_segments(
    repo: &Repository,
    h: &History,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) -> Result<(), RestoreError> {
    let known: BTreeSet<&str> = h.segments.iter().map(|s| s.key.as_str()).collect();
    let reach = h.segments.last().map_or(0, |s| s.last_seq);
    let mut beyond: Vec<(u64, String)> = Vec::new();
    let listed = repo.list_segments().await?;
    for (first, key) in listed.segments {
        if known.contains(key.as_str()) {
            continue;
        }
        if first > reach {
            beyond.push((first, key));
        } else {
            notes.push(format!(
                "{key} is not referenced by the manifest (an orphan; pruning removes it)"
            ));
        }
    }
    for key in listed.foreign {
        notes.push(format!("{key} is not a segment key"));
    }
    if beyond.iter().any(|(first, _)| *first == reach + 1) {
        // The archiver is still writing: these continue the chain.
        notes.push(format!(
            "{} segments were uploaded after the repository was loaded; verify again to \
             include them",
            beyond.len()
        ));
    } else {
        for (_, key) in beyond {
            problems.push(problem(
                &key,
                format!(
                    "segment exists but cannot be reached: the archived WAL stops at \
                     sequence {reach}, and the segment starting at {} is missing",
                    reach + 1
                ),
            ));
        }
    }
    Ok(())
}

/// What loading `state` passed over (damage is a problem, the rest a note), and what it
/// checked.
fn loading_findings(state: &RepoState, problems: &mut Vec<Problem>, notes: &mut Vec<String>) {
    for w in &state.warnings {
        match (&w.object, w.damage) {
            (object, true) => problems.push(Problem {
                object: object.clone(),
                problem: w.message.clone(),
            }),
            (Some(o), false) => notes.push(format!("{o}: {}", w.message)),
            (None, false) => notes.push(w.message.clone()),
        }
    }
    notes.push(format!(
        "the manifest, {} index pages and the history were checked when loading",
        state.generation.as_ref().map_or(0, |g| g.index_pages.len())
    ));
}

/// Verifies `repo` as `opts` says. Problems are in the report; an `Err` means the
/// repository could not be read at all, or the target is not restorable.
pub async fn run(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<VerifyReport, RestoreError> {
    let started = Instant::now();
    if opts.parallelism == 0 {
        return Err(RestoreError::Usage(
            "--parallelism must be at least 1".to_owned(),
        ));
    }
    let from = opts
        .generation
        .map_or(ReadFrom::NewestIntact, ReadFrom::Generation);
    let state = load_from(repo, from).await?;
    let h = &state.history;
    let Scope {
        bases,
        segments,
        mut problems,
        mut notes,
    } = scope_items(h, opts.scope)?;
    loading_findings(&state, &mut problems, &mut notes);
    let read = opts.deep || reads_are_cheap(&repo.location());
    let scratch = Scratch::create()?;
    let bar = progress.phase("verify", 0, Unit::Objects);
    let mut tally = Tally::default();
    let ctx = (&bar, &scratch, cancel);
    let files = check_descriptors(repo, &state, &bases, &bar, cancel, &mut tally).await?;
    bar.set_total((bases.len() + files.len() + segments.len()) as u64);
    check_files(repo, files, read, opts.parallelism, ctx, &mut tally).await?;
    let segments_checked = check_segments(
        repo,
        &bases,
        &segments,
        read,
        opts.parallelism,
        ctx,
        &mut tally,
    )
    .await?;
    problems.append(&mut tally.problems);
    if opts.scope == VerifyScope::All {
        unreachable_segments(repo, h, &mut problems, &mut notes).await?;
    }
    bar.finish(if problems.is_empty() {
        "ok"
    } else {
        "problems found"
    });
    Ok(VerifyReport {
        repository: repo.location(),
        scope: opts.scope,
        deep: opts.deep,
        content: if tally.read < tally.objects {
            ContentCheck::SizesOnly
        } else {
            ContentCheck::Read
        },
        generation: state.generation.as_ref().map(|g| g.generation),
        bases: bases.iter().map(|b| b.id.clone()).collect(),
        segments_checked,
        objects_checked: tally.objects,
        objects_read: tally.read,
        bytes_read: tally.bytes,
        problems,
        notes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tidemark_manifest::store::MemoryStore;
    use tidemark_manifest::testing::SpyStore;

    /// A base file is hashed as it is downloaded; a changed or missing one is a problem
    /// that names it.
    #[tokio::test]
    async fn a_base_file_is_hashed_as_it_is_downloaded() {
        let spy = Arc::new(SpyStore::new(Arc::new(MemoryStore::new())));
        let content = b"MANIFEST-000003\n";
        let sha256 = checksum::sha256_hex(content);
        let f = BaseFile {
            name: "CURRENT".into(),
            size: content.len() as u64,
            key: keys::base_object_key("b1", "CURRENT", &sha256),
            sha256,
        };
        spy.put(&f.key, Bytes::from_static(content)).await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        let out = check_base_file(spy.clone(), f.clone(), false, dir.clone()).await;
        assert!(out.problems.is_empty(), "{:?}", out.problems.first());
        assert!(out.read);
        assert_eq!(out.bytes, content.len() as u64);
        assert_eq!(spy.counts(), (1, 0), "(hashed, plain) downloads");

        spy.put(&f.key, Bytes::from_static(b"MANIFEST-000004\n"))
            .await
            .unwrap();
        let out = check_base_file(spy.clone(), f.clone(), false, dir.clone()).await;
        assert_eq!(out.problems.len(), 1);
        assert!(out.problems[0].problem.contains("checksum mismatch"));
        assert_eq!(out.problems[0].object.as_deref(), Some(f.key.as_str()));

        spy.delete(&f.key).await.unwrap();
        let out = check_base_file(spy, f, false, dir.clone()).await;
        assert!(out.problems[0].problem.contains("CURRENT is missing"));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "scratch files left"
        );
    }
}
