//! `verify`: checks, without restoring, that a repository holds everything a restore needs
//! and that it is intact.
//!
//! Loading the repository already checks the manifest, every index page's size and sha256,
//! and that the history has no unrecorded hole. Then, for the bases and segments in scope
//! (those one target needs, or with `--all` every one):
//!
//! - each base's `base.json` (size and sha256), its file names, and its `CURRENT`,
//!   `MANIFEST-*` and `OPTIONS-*` files (downloaded, sha256);
//! - each table file exists with the recorded size (`--deep`: downloaded, sha256);
//! - each segment exists with the recorded size (`--deep`: downloaded, its sha256, every
//!   frame and its trailer, and the record chain: every record continues the previous one,
//!   log numbers never decrease, and each base's first needed record is there, in its first
//!   WAL or a later one);
//! - with `--all`, segments no manifest or tail walk reaches are reported.
//!
//! Every problem names the object. The command fails (exit code 4) if there is any.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};

use tidemark_manifest::checksum;
use tidemark_manifest::keys;
use tidemark_manifest::model::{BaseFile, BaseSummary, SegmentEntry};
use tidemark_manifest::repo::Repository;
use tidemark_manifest::segment::SegmentReader;
use tidemark_manifest::store::ObjectStore;

use super::{TargetSpec, load};
use crate::progress::{Progress, Unit};
use crate::{Cancel, RestoreError, human_bytes, human_duration, replay};

/// What to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyScope {
    /// What a restore to this target needs.
    Target(TargetSpec),
    /// Every base and every segment.
    All,
}

/// Options of `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOptions {
    pub scope: VerifyScope,
    /// Download everything and check every sha256, frame and record.
    #[serde(default)]
    pub deep: bool,
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
    pub bases: Vec<String>,
    pub segments_checked: usize,
    pub objects_checked: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
    pub duration_ms: u64,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let scope = match self.scope {
            VerifyScope::All => "everything".to_owned(),
            VerifyScope::Target(TargetSpec::Latest) => "what the latest point needs".to_owned(),
            VerifyScope::Target(TargetSpec::Seq(n)) => format!("what sequence {n} needs"),
            VerifyScope::Target(TargetSpec::Time(t)) => {
                format!("what time {} needs", super::short_time(t))
            }
        };
        let plural = |n: usize, one: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {one}s")
            }
        };
        let _ = writeln!(
            w,
            "Verified {scope} in {} ({}): {}, {}, {}, {} read in {}",
            self.repository,
            if self.deep {
                "deep"
            } else {
                "existence and sizes; --deep checks every byte"
            },
            plural(self.bases.len(), "base"),
            plural(self.segments_checked, "segment"),
            plural(self.objects_checked, "object"),
            human_bytes(self.bytes_read),
            human_duration(Duration::from_millis(self.duration_ms))
        );
        for n in &self.notes {
            let _ = writeln!(w, "Note: {n}");
        }
        if self.problems.is_empty() {
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
struct Checked {
    problems: Vec<Problem>,
    bytes: u64,
}

async fn check_base_file(
    store: Arc<dyn ObjectStore>,
    f: BaseFile,
    deep: bool,
    scratch: PathBuf,
) -> Checked {
    let mut out = Checked {
        problems: Vec::new(),
        bytes: 0,
    };
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
    let path = scratch.join(format!("{:08x}", rand::random::<u32>()));
    match store.get_to_file(&f.key, &path).await {
        Ok(n) => {
            out.bytes = n;
            let hashed = path.clone();
            let result = tokio::task::spawn_blocking(move || checksum::sha256_file(&hashed))
                .await
                .expect("hashing does not panic");
            match result {
                Ok((sha, len)) => {
                    if let Err(e) = checksum::check(&f.key, &f.sha256, f.size, &sha, len) {
                        out.problems.push(problem(&f.key, e.to_string()));
                    }
                }
                Err(e) => out
                    .problems
                    .push(problem(&f.key, format!("cannot read back: {e}"))),
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
    let mut out = Checked {
        problems: Vec::new(),
        bytes: 0,
    };
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
    /// `(next sequence, log number)` of the previous record, within a contiguous run.
    prev: Option<(u64, u64)>,
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
            self.prev = None;
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
                    self.prev = None;
                    return;
                }
            };
            if let Some((expected, prev_log)) = self.prev {
                if r.seq != expected {
                    self.problems.push(problem(
                        key,
                        replay::ChainError::RecordHole {
                            key: key.to_owned(),
                            expected,
                            found: r.seq,
                        }
                        .to_string(),
                    ));
                } else if r.log_number < prev_log {
                    self.problems.push(problem(
                        key,
                        replay::ChainError::RecordLogBackwards {
                            key: key.to_owned(),
                            seq: r.seq,
                            log: r.log_number,
                            prev_log,
                        }
                        .to_string(),
                    ));
                }
            }
            self.prev = Some((r.next_seq(), r.log_number));
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
    let state = load(repo).await?;
    let h = &state.history;
    let mut problems: Vec<Problem> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let (bases, segments): (Vec<BaseSummary>, Vec<SegmentEntry>) = match opts.scope {
        VerifyScope::Target(spec) => {
            let plan = h.plan(spec.target())?;
            if let Err(e) = replay::check_plan(&plan) {
                problems.push(Problem {
                    object: None,
                    problem: e.to_string(),
                });
            }
            (vec![plan.base.clone()], plan.segments.clone())
        }
        VerifyScope::All => {
            for b in &h.bases {
                let needs = b.replay_from_seq <= b.earliest_seq;
                let held = h
                    .segments
                    .iter()
                    .any(|s| s.first_seq <= b.replay_from_seq && b.replay_from_seq <= s.last_seq);
                if needs && !held {
                    problems.push(Problem {
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
                notes.push("the repository has no base backup yet: nothing is restorable".into());
            }
            (h.bases.clone(), h.segments.clone())
        }
    };
    notes.push(format!(
        "the manifest, {} index pages and the history were checked when loading",
        state.generation.as_ref().map_or(0, |g| g.index_pages.len())
    ));
    let scratch = Scratch::create()?;
    let generation = state.generation.as_ref().map_or(0, |g| g.generation);
    let bar = progress.phase("verify", 0, Unit::Objects);
    let mut objects = 0usize;
    let mut bytes = 0u64;

    // Bases: descriptors, then their files (each object once, even when bases share it).
    let mut files: Vec<BaseFile> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for b in &bases {
        cancel.check()?;
        objects += 1;
        bar.inc(1);
        match repo.read_base(generation, b).await {
            Ok(d) => {
                bytes += b.descriptor.size;
                if let Err(e) = crate::fetch::check_base_files(&d.files) {
                    problems.push(problem(&b.descriptor.key, e.to_string()));
                    continue;
                }
                if d.database_identity != state.config.database_identity {
                    problems.push(problem(
                        &b.descriptor.key,
                        format!(
                            "base {} belongs to database {}, the repository to {}",
                            d.id, d.database_identity, state.config.database_identity
                        ),
                    ));
                }
                for f in d.files {
                    if seen.insert(f.key.clone()) {
                        files.push(f);
                    }
                }
            }
            Err(e) => problems.push(problem(&b.descriptor.key, e.to_string())),
        }
    }
    bar.set_total((bases.len() + files.len() + segments.len()) as u64);
    let checked: Vec<Checked> = stream::iter(files.into_iter().map(|f| {
        let (store, dir, bar) = (repo.store().clone(), scratch.0.clone(), bar.clone());
        let cancel = cancel.clone();
        async move {
            if cancel.is_cancelled() {
                return Checked {
                    problems: Vec::new(),
                    bytes: 0,
                };
            }
            let c = check_base_file(store, f, opts.deep, dir).await;
            bar.inc(1);
            c
        }
    }))
    .buffer_unordered(opts.parallelism)
    .collect()
    .await;
    cancel.check()?;
    for c in checked {
        objects += 1;
        bytes += c.bytes;
        problems.extend(c.problems);
    }

    // Segments, in order so that the deep pass can follow the record chain.
    let mut chain = DeepChain::new(&bases);
    let mut segments_checked = 0usize;
    let mut results = stream::iter(segments.iter().cloned().map(|s| {
        let (repo, dir) = (repo.clone(), scratch.0.clone());
        let cancel = cancel.clone();
        async move {
            if cancel.is_cancelled() {
                return (
                    s,
                    Checked {
                        problems: Vec::new(),
                        bytes: 0,
                    },
                    None,
                );
            }
            let (c, path) = check_segment(repo, s.clone(), opts.deep, dir).await;
            (s, c, path)
        }
    }))
    .buffered(opts.parallelism);
    while let Some((entry, c, path)) = results.next().await {
        cancel.check()?;
        segments_checked += 1;
        objects += 1;
        bar.inc(1);
        bytes += c.bytes;
        problems.extend(c.problems);
        if let Some(path) = path {
            chain = tokio::task::spawn_blocking(move || {
                chain.segment(&entry, &path);
                let _ = std::fs::remove_file(&path);
                chain
            })
            .await
            .expect("the record check does not panic");
        } else if opts.deep {
            // Without this segment the chain cannot be followed across it.
            chain.prev = None;
            chain.prev_segment_last = None;
        }
    }
    if opts.deep {
        for s in chain.starts.iter().filter(|s| !s.done) {
            problems.push(Problem {
                object: None,
                problem: format!(
                    "the first record base {} needs (sequence {} of WAL {}) was not found in any \
                     segment",
                    s.base, s.replay_from_seq, s.min_log_number
                ),
            });
        }
        problems.extend(chain.problems);
    }

    // With --all: segments that exist but that no manifest or tail walk reaches.
    if opts.scope == VerifyScope::All {
        let known: BTreeSet<&str> = h.segments.iter().map(|s| s.key.as_str()).collect();
        let reach = h.segments.last().map_or(0, |s| s.last_seq);
        let mut beyond: Vec<(u64, String)> = Vec::new();
        for meta in repo.store().list(keys::WAL_PREFIX).await? {
            if known.contains(meta.key.as_str()) {
                continue;
            }
            match keys::parse_segment_key(&meta.key) {
                Some(first) if first > reach => beyond.push((first, meta.key)),
                Some(_) => notes.push(format!(
                    "{} is not referenced by the manifest (an orphan; pruning removes it)",
                    meta.key
                )),
                None => notes.push(format!("{} is not a segment key", meta.key)),
            }
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
        bases: bases.iter().map(|b| b.id.clone()).collect(),
        segments_checked,
        objects_checked: objects,
        bytes_read: bytes,
        problems,
        notes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}
