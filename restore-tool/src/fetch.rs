//! Fetch: downloading a base's files and the WAL segments, verified, in parallel.
//!
//! Every download holds a permit, so `--parallelism` bounds the whole restore's concurrent
//! transfers. A share of the permits is kept for the WAL segments ([`Permits`]): the replay
//! waits for them one after the other and is the longest phase, while the base files are
//! only needed at its end, so segments never queue behind the base. Retries of transient
//! failures come from the store's retry layer.
//!
//! A base file is hashed as its bytes are written ([`ObjectStore::get_to_file_max_hashed`]),
//! not read back from disk afterwards, so its check costs no second pass and ends with its
//! download. Unless the verification reads the tables back, the base files are written
//! around the page cache ([`ObjectStore::get_to_file_hashed`] with [`PageCache::Around`]): the
//! application's first open reads only a small part of each.
//!
//! Downloads are tasks that are never dropped halfway: on a failure or a cancellation the
//! remaining tasks are told to stop and then awaited, so no download is still writing into a
//! directory that is being cleaned up.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use tidemark_manifest::checksum;
use tidemark_manifest::keys;
use tidemark_manifest::model::{self, BaseFile, SegmentEntry};
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::{ObjectStore, PageCache, StoreError};

use crate::progress::PhaseBar;
use crate::{Cancel, RestoreError};

/// Checks every file name of a base before anything is written: the rules of FORMAT.md §2
/// and §7 ([`model::check_base_files`]).
pub fn check_base_files(files: &[BaseFile]) -> Result<(), RestoreError> {
    model::check_base_files(files).map_err(|e| RestoreError::Integrity(e.to_string()))
}

/// Downloads one base file into `dir` under its (checked) name and verifies its size and
/// sha256, hashed as it is written; around the page cache if `uncached`. Returns its size.
pub async fn fetch_base_file(
    store: &Arc<dyn ObjectStore>,
    file: &BaseFile,
    dir: &Path,
    uncached: bool,
) -> Result<u64, RestoreError> {
    keys::check_base_file_name(&file.name)?;
    let path = dir.join(&file.name);
    // Never more than the base declares (+1 byte to tell "too long"): a corrupt or hostile
    // object cannot fill the disk.
    let found = if uncached {
        store.get_to_file_hashed(&file.key, &path, file.size, PageCache::Around)
    } else {
        store.get_to_file_max_hashed(&file.key, &path, file.size)
    };
    let found = found.await.map_err(|e| match e {
        StoreError::TooLarge { .. } => RestoreError::Integrity(e.to_string()),
        e => e.into(),
    })?;
    checksum::check(&file.key, &file.sha256, file.size, &found.sha256, found.len)?;
    Ok(file.size)
}

/// Downloads every base file into `dir` (around the page cache if `uncached`), at most as
/// many at once as `limit` allows.
pub async fn fetch_base_files(
    store: Arc<dyn ObjectStore>,
    files: Vec<BaseFile>,
    dir: PathBuf,
    uncached: bool,
    limit: Arc<Semaphore>,
    cancel: Cancel,
    bar: PhaseBar,
) -> Result<u64, RestoreError> {
    check_base_files(&files)?;
    // Largest first: the long transfers start early and the tail of the phase is short.
    let mut files = files;
    files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.name.cmp(&b.name)));
    let stop = Cancel::new();
    let mut tasks = JoinSet::new();
    for f in files {
        let (store, dir, limit, cancel, stop, bar) = (
            store.clone(),
            dir.clone(),
            limit.clone(),
            cancel.clone(),
            stop.clone(),
            bar.clone(),
        );
        tasks.spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            cancel.check()?;
            stop.check()?;
            let n = fetch_base_file(&store, &f, &dir, uncached).await?;
            bar.inc(n);
            tracing::debug!(file = %f.name, key = %f.key, bytes = n, "fetched base file");
            Ok::<u64, RestoreError>(n)
        });
    }
    let mut total = 0u64;
    let mut first_error: Option<RestoreError> = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("download tasks do not panic") {
            Ok(n) => total += n,
            Err(e) => {
                stop.cancel();
                // Keep the root cause, not the "stopped" of the tasks that followed it.
                if first_error
                    .as_ref()
                    .is_none_or(|f| matches!(f, RestoreError::Interrupted))
                {
                    first_error = Some(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// The download permits of one restore.
#[derive(Debug, Clone)]
pub struct Permits {
    /// For base files.
    pub base: Arc<Semaphore>,
    /// For WAL segments.
    pub wal: Arc<Semaphore>,
}

impl Permits {
    /// `parallelism` permits in all: a quarter of them (at least one) for the WAL segments,
    /// the others for the base files. With one permit, both share it.
    pub fn split(parallelism: usize) -> Permits {
        let parallelism = parallelism.max(1);
        if parallelism == 1 {
            let one = Arc::new(Semaphore::new(1));
            return Permits {
                base: one.clone(),
                wal: one,
            };
        }
        let wal = (parallelism / 4).max(1);
        Permits {
            base: Arc::new(Semaphore::new(parallelism - wal)),
            wal: Arc::new(Semaphore::new(wal)),
        }
    }
}

/// A segment downloaded and checked ([`Repository::fetch_segment_for_replay`]): its frames
/// are checked as the replay reads them.
#[derive(Debug)]
pub struct FetchedSegment {
    pub entry: SegmentEntry,
    pub path: PathBuf,
}

/// What [`fetch_segments`] downloads, where, and how.
#[derive(Debug, Clone)]
pub struct SegmentFetch {
    pub repo: Repository,
    /// In sequence order.
    pub entries: Vec<SegmentEntry>,
    /// Where the segment files go.
    pub scratch: PathBuf,
    /// The shared download permits.
    pub limit: Arc<Semaphore>,
    /// How many segments may be downloaded ahead of the consumer.
    pub window: usize,
    pub cancel: Cancel,
    pub bar: PhaseBar,
}

/// Downloads the segments into `scratch` in order, `window` ahead of the consumer, and hands
/// each verified one to `tx` in sequence order. Stops early, without error, when the
/// consumer drops its receiver (the cutoff was reached).
pub async fn fetch_segments(
    job: SegmentFetch,
    tx: mpsc::Sender<FetchedSegment>,
) -> Result<(), RestoreError> {
    let SegmentFetch {
        repo,
        entries,
        scratch,
        limit,
        window,
        cancel,
        bar,
    } = job;
    let stop = Cancel::new();
    let mut pending: VecDeque<tokio::task::JoinHandle<Result<FetchedSegment, RestoreError>>> =
        VecDeque::new();
    let mut queue = entries.into_iter();
    let mut result = Ok(());
    loop {
        while pending.len() < window.max(1) {
            let Some(entry) = queue.next() else { break };
            let (repo, scratch, limit, cancel, stop, bar) = (
                repo.clone(),
                scratch.clone(),
                limit.clone(),
                cancel.clone(),
                stop.clone(),
                bar.clone(),
            );
            pending.push_back(tokio::spawn(async move {
                let _permit = limit
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                cancel.check()?;
                stop.check()?;
                let path = repo.fetch_segment_for_replay(&entry, &scratch).await?;
                bar.inc(entry.stored_size);
                tracing::debug!(key = %entry.key, bytes = entry.stored_size, "fetched segment");
                Ok(FetchedSegment { entry, path })
            }));
        }
        let Some(next) = pending.pop_front() else {
            break;
        };
        match next.await.expect("download tasks do not panic") {
            Ok(seg) => {
                if let Err(mpsc::error::SendError(seg)) = tx.send(seg).await {
                    let _ = std::fs::remove_file(&seg.path);
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    stop.cancel();
    for handle in pending {
        if let Ok(Ok(seg)) = handle.await {
            let _ = std::fs::remove_file(&seg.path);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tidemark_manifest::store::MemoryStore;

    #[test]
    fn the_wal_keeps_a_share_of_the_permits_and_the_total_stays_bounded() {
        for (parallelism, base, wal) in [(8, 6, 2), (4, 3, 1), (2, 1, 1), (3, 2, 1), (16, 12, 4)] {
            let p = Permits::split(parallelism);
            assert_eq!(
                (p.base.available_permits(), p.wal.available_permits()),
                (base, wal),
                "--parallelism {parallelism}"
            );
        }
        // One permit (or a zero that was not refused upstream): both share a single one.
        for parallelism in [0, 1] {
            let p = Permits::split(parallelism);
            assert!(Arc::ptr_eq(&p.base, &p.wal));
            assert_eq!(p.base.available_permits(), 1);
        }
    }

    fn file(name: &str, content: &[u8]) -> BaseFile {
        let sha = checksum::sha256_hex(content);
        let key = keys::base_object_key("b1", name, &sha);
        BaseFile {
            name: name.into(),
            size: content.len() as u64,
            sha256: sha,
            key,
        }
    }

    #[test]
    fn base_file_names_from_the_store_are_checked() {
        check_base_files(&[file("CURRENT", b"x"), file("000001.sst", b"y")]).unwrap();
        for bad in ["../CURRENT", "000001.log", "IDENTITY", "/etc/passwd"] {
            let e = check_base_files(&[file("CURRENT", b"x"), file(bad, b"y")]).unwrap_err();
            assert!(e.to_string().contains("invalid name"), "{bad}: {e}");
        }
        let e = check_base_files(&[file("CURRENT", b"x"), file("CURRENT", b"x")]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = check_base_files(&[file("MANIFEST-000001", b"x")]).unwrap_err();
        assert!(e.to_string().contains("no CURRENT"), "{e}");
        let mut moved = file("000002.sst", b"z");
        moved.key = "sst/elsewhere".into();
        let e = check_base_files(&[file("CURRENT", b"x"), moved]).unwrap_err();
        assert!(e.to_string().contains("content key"), "{e}");
    }

    #[tokio::test]
    async fn base_files_are_downloaded_and_a_corrupt_one_is_named() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let files = vec![
            file("CURRENT", b"MANIFEST-000003\n"),
            file("MANIFEST-000003", b"manifest bytes"),
            file("000009.sst", &[7u8; 5000]),
        ];
        for f in &files {
            let content: Vec<u8> = match f.name.as_str() {
                "CURRENT" => b"MANIFEST-000003\n".to_vec(),
                "MANIFEST-000003" => b"manifest bytes".to_vec(),
                _ => vec![7u8; 5000],
            };
            store.put(&f.key, Bytes::from(content)).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let n = fetch_base_files(
            store.clone(),
            files.clone(),
            dir.path().to_path_buf(),
            true,
            Arc::new(Semaphore::new(2)),
            Cancel::new(),
            PhaseBar::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(n, 16 + 14 + 5000);
        assert_eq!(
            std::fs::read(dir.path().join("000009.sst")).unwrap(),
            vec![7u8; 5000]
        );

        // The SST object now holds other bytes: the download fails and names the object.
        let sst_key = files[2].key.clone();
        store
            .put(&sst_key, Bytes::from(vec![8u8; 5000]))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = fetch_base_files(
            store.clone(),
            files.clone(),
            dir.path().to_path_buf(),
            true,
            Arc::new(Semaphore::new(2)),
            Cancel::new(),
            PhaseBar::hidden(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RestoreError::Checksum(_)), "{e}");
        assert!(e.to_string().contains(&sst_key), "{e}");

        // An object longer than the base says is stopped, named, and not kept.
        store
            .put(&sst_key, Bytes::from(vec![7u8; 50_000]))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = fetch_base_files(
            store.clone(),
            files.clone(),
            dir.path().to_path_buf(),
            true,
            Arc::new(Semaphore::new(2)),
            Cancel::new(),
            PhaseBar::hidden(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::VerificationFailed, "{e}");
        assert!(e.to_string().contains(&sst_key), "{e}");
        assert!(e.to_string().contains("longer than the 5000 bytes"), "{e}");
        assert!(!dir.path().join("000009.sst").exists());

        // A missing object is named too.
        store.delete(&sst_key).await.unwrap();
        let e = fetch_base_files(
            store,
            files,
            dir.path().to_path_buf(),
            true,
            Arc::new(Semaphore::new(2)),
            Cancel::new(),
            PhaseBar::hidden(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::VerificationFailed);
        assert!(e.to_string().contains(&sst_key), "{e}");
    }

    /// Each base file is hashed as it is downloaded, not downloaded and then read back.
    #[tokio::test]
    async fn base_files_are_hashed_as_they_are_downloaded() {
        use tidemark_manifest::testing::SpyStore;
        let spy = Arc::new(SpyStore::new(Arc::new(MemoryStore::new())));
        let files = vec![
            file("CURRENT", b"MANIFEST-000003\n"),
            file("MANIFEST-000003", b"manifest bytes"),
            file("000009.sst", b""),
        ];
        for (f, content) in files
            .iter()
            .zip([&b"MANIFEST-000003\n"[..], b"manifest bytes", b""])
        {
            spy.put(&f.key, Bytes::from_static(content)).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let n = fetch_base_files(
            spy.clone(),
            files,
            dir.path().to_path_buf(),
            false,
            Arc::new(Semaphore::new(2)),
            Cancel::new(),
            PhaseBar::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(n, 16 + 14);
        assert_eq!(std::fs::read(dir.path().join("000009.sst")).unwrap(), b"");
        assert_eq!(spy.counts(), (3, 0), "(hashed, plain) downloads");
    }
}
