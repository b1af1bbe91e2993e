//! Segment uploads in the background, one at a time and in sequence order.
//!
//! The [`crate::ship`] step hands each closed segment to an [`Uploader`], which uploads it on
//! a task of its own while the next segment is read and compressed. Only the oldest segment
//! held is ever being uploaded, and the next one starts only once it is durable: segments
//! reach the store in sequence order, and a segment whose upload failed is retried before
//! anything newer (FORMAT.md §4.5). The uploader holds at most [`MAX_HELD`] closed segment
//! and the shipper at most one more, waiting for room: memory stays bounded however far the
//! store falls behind.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tidemark_manifest::model::SegmentEntry;
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::segment::EncodedSegment;
use tokio::task::JoinHandle;

/// How many closed segments the uploader holds at most: the one being uploaded (or waiting
/// for its retry).
pub const MAX_HELD: usize = 1;

/// A segment now durable.
#[derive(Debug)]
pub struct Uploaded {
    pub entry: SegmentEntry,
    /// How long its upload took.
    pub took: Duration,
}

/// Uploads closed segments in order, in the background.
#[derive(Debug)]
pub struct Uploader {
    repo: Repository,
    /// Closed segments not known to be durable, oldest first. Only the first is uploaded.
    held: VecDeque<EncodedSegment>,
    /// The upload of `held[0]`, while it runs.
    running: Option<JoinHandle<Result<Duration, RepoError>>>,
    /// How the upload of `held[0]` ended, when it did and was not taken yet.
    ended: Option<Result<Duration, RepoError>>,
    /// The upload of `held[0]` failed: it starts again only on [`Uploader::retry`].
    failed: bool,
    /// The buffer of the last segment made durable, for the next segment to be built in.
    spare: Option<Vec<u8>>,
}

impl Uploader {
    /// An uploader writing to `repo`.
    pub fn new(repo: Repository) -> Uploader {
        Uploader {
            repo,
            held: VecDeque::with_capacity(MAX_HELD),
            running: None,
            ended: None,
            failed: false,
            spare: None,
        }
    }

    /// The buffer of the last segment made durable, if nothing else holds it: the next
    /// segment is built in it ([`tidemark_manifest::segment::SegmentBuilder::reusing`]),
    /// so a segment's memory is not taken from the system afresh every few MiB.
    pub fn take_spare(&mut self) -> Option<Vec<u8>> {
        self.spare.take()
    }

    /// How many closed segments are held (uploading or waiting).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// True when no other segment can be taken before the oldest is durable.
    pub fn is_full(&self) -> bool {
        self.held.len() >= MAX_HELD
    }

    /// True when the oldest segment's upload failed and waits for [`Uploader::retry`].
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The time of the oldest record held.
    pub fn oldest_time_us(&self) -> Option<i64> {
        self.held.front().map(|s| s.header.first_time_us)
    }

    /// Takes a closed segment, the successor of every segment held. Its upload starts once
    /// the segments before it are durable.
    ///
    /// # Panics
    /// When the uploader is full: wait for [`Uploader::next_durable`] first.
    pub fn push(&mut self, seg: EncodedSegment) {
        assert!(
            !self.is_full(),
            "at most {MAX_HELD} closed segments are held"
        );
        self.held.push_back(seg);
        self.start();
    }

    /// Starts the oldest segment's upload again after a failure.
    pub fn retry(&mut self) {
        self.failed = false;
        self.start();
    }

    /// Starts the upload of the oldest segment, unless one runs, ended untaken, or failed.
    fn start(&mut self) {
        if self.failed || self.running.is_some() || self.ended.is_some() {
            return;
        }
        let Some(seg) = self.held.front() else {
            return;
        };
        // The bytes are shared with the task, not copied.
        let seg = seg.clone();
        let repo = self.repo.clone();
        self.running = Some(tokio::spawn(async move {
            let started = Instant::now();
            repo.write_segment(&seg).await?;
            Ok(started.elapsed())
        }));
    }

    /// Resolves when the running upload ends (never while none runs). Cancel-safe: how it
    /// ended is kept for [`Uploader::take_ended`].
    pub async fn upload_ended(&mut self) {
        let Some(task) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let result = match task.await {
            Ok(r) => r,
            // The task is aborted only when the uploader is dropped.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.running = None;
        self.ended = Some(result);
    }

    /// The oldest segment, if its upload ended: `Ok(Some)` when it is durable (the next one's
    /// upload starts), `Err` when it failed (it is kept, and waits for a retry). Never waits
    /// for an upload that still runs.
    pub async fn take_ended(&mut self) -> Result<Option<Uploaded>, RepoError> {
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            self.upload_ended().await;
        }
        let Some(result) = self.ended.take() else {
            return Ok(None);
        };
        match result {
            Ok(took) => {
                let seg = self
                    .held
                    .pop_front()
                    .expect("an ended upload is of a held segment");
                self.start();
                let entry = seg.entry();
                self.spare = seg.into_buffer();
                Ok(Some(Uploaded { entry, took }))
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Waits until the oldest segment's upload ends, starting it again first if it failed.
    /// `Ok(None)` when nothing is held.
    pub async fn next_durable(&mut self) -> Result<Option<Uploaded>, RepoError> {
        if self.failed {
            self.retry();
        }
        if self.running.is_some() {
            self.upload_ended().await;
        }
        self.take_ended().await
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // Nothing newer is uploaded by anyone after a dropped uploader: the next one
        // starts from what the repository holds.
        if let Some(task) = self.running.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tidemark_manifest::store::{LocalStore, MemoryStore, ObjectStore};
    use tidemark_manifest::testing::{config, encoded_segment};

    async fn uploader(store: Arc<dyn ObjectStore>) -> Uploader {
        let repo = Repository::new(store);
        repo.create_config(&config()).await.unwrap();
        Uploader::new(repo)
    }

    #[tokio::test]
    async fn a_durable_segment_leaves_its_buffer_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut up = uploader(Arc::new(LocalStore::open(dir.path()).unwrap())).await;
        let seg = encoded_segment(1, 50);
        let at = seg.bytes.as_ptr();
        up.push(seg);
        assert!(up.take_spare().is_none(), "not before it is durable");
        up.next_durable().await.unwrap().expect("durable");
        let spare = up.take_spare().expect("the uploaded segment's buffer");
        assert_eq!(spare.as_ptr(), at, "the same memory, not a copy");
        assert!(up.take_spare().is_none(), "taken once");
    }

    #[tokio::test]
    async fn a_buffer_the_store_still_holds_is_not_taken() {
        // The in-memory store keeps the bytes it was given.
        let mut up = uploader(Arc::new(MemoryStore::new())).await;
        up.push(encoded_segment(1, 50));
        up.next_durable().await.unwrap().expect("durable");
        assert!(up.take_spare().is_none());
    }
}
