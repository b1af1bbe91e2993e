//! Segment shipping: records from the follower are packed into a segment that is closed
//! every sync interval or at a size limit, whichever comes first, then uploaded
//! (create-only). Nothing is uploaded while no record arrives.
//!
//! Uploads happen in sequence order and one at a time: a segment that failed to upload is
//! kept and retried before anything newer goes up, so the tail walk of FORMAT.md §4.4 never
//! meets a hole. While it waits, the WAL stays on the database's disk.

use std::time::{Duration, Instant};

use tidemark_manifest::model::{Compression, SegmentEntry};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::segment::{EncodedSegment, Record, SegmentBuilder, SegmentError};

/// How segments are cut and encoded.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// Close the open segment this long after its first record.
    pub sync_interval: Duration,
    /// Close the open segment when its uncompressed records reach this size.
    pub max_segment_bytes: u64,
    /// zstd level of segment bodies.
    pub zstd_level: i32,
}

impl Default for ShipOptions {
    fn default() -> Self {
        ShipOptions {
            sync_interval: Duration::from_secs(1),
            max_segment_bytes: 64 << 20,
            zstd_level: 3,
        }
    }
}

/// Errors while shipping.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("cannot start a segment: {0}")]
    Encoder(#[source] std::io::Error),
}

/// Packs records into segments and uploads them.
#[derive(Debug)]
pub struct Shipper {
    repo: Repository,
    opts: ShipOptions,
    open: Option<(SegmentBuilder, Instant)>,
    /// A closed segment whose upload has not succeeded yet.
    unsent: Option<EncodedSegment>,
}

impl Shipper {
    /// A shipper writing to `repo`.
    pub fn new(repo: Repository, opts: ShipOptions) -> Shipper {
        Shipper {
            repo,
            opts,
            open: None,
            unsent: None,
        }
    }

    /// Adds a record to the open segment (opening one if needed).
    pub fn push(&mut self, r: &Record) -> Result<(), ShipError> {
        if self.open.is_none() {
            let builder = SegmentBuilder::new(Compression::Zstd, self.opts.zstd_level)
                .map_err(ShipError::Encoder)?;
            self.open = Some((builder, Instant::now()));
        }
        let (builder, _) = self.open.as_mut().expect("opened above");
        builder.push(r)?;
        Ok(())
    }

    /// The sequence the next record must have, if a segment is open.
    pub fn next_seq(&self) -> Option<u64> {
        self.open.as_ref().and_then(|(b, _)| b.next_seq())
    }

    /// True when the open segment should be closed now.
    pub fn should_close(&self) -> bool {
        self.open.as_ref().is_some_and(|(b, opened)| {
            b.can_finish()
                && (b.raw_size() >= self.opts.max_segment_bytes
                    || opened.elapsed() >= self.opts.sync_interval)
        })
    }

    /// When the open segment will be due by time.
    pub fn due_at(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .filter(|(b, _)| b.can_finish())
            .map(|(_, opened)| *opened + self.opts.sync_interval)
    }

    /// True if a closed segment still waits for its upload.
    pub fn has_unsent(&self) -> bool {
        self.unsent.is_some()
    }

    /// Closes the open segment (if it holds a sequence number) and uploads everything
    /// closed. Returns the index entries of the segments now durable, in order. On an upload
    /// error the segment is kept and the next call tries it again first.
    pub async fn close_and_upload(&mut self) -> Result<Vec<SegmentEntry>, ShipError> {
        let mut done = Vec::new();
        if let Some(entry) = self.upload_unsent().await? {
            done.push(entry);
        }
        let can_finish = self.open.as_ref().is_some_and(|(b, _)| b.can_finish());
        if can_finish {
            let (builder, _) = self.open.take().expect("checked above");
            self.unsent = Some(builder.finish()?);
            if let Some(entry) = self.upload_unsent().await? {
                done.push(entry);
            }
        }
        Ok(done)
    }

    async fn upload_unsent(&mut self) -> Result<Option<SegmentEntry>, ShipError> {
        let Some(seg) = &self.unsent else {
            return Ok(None);
        };
        let started = Instant::now();
        self.repo.write_segment(seg).await?;
        let entry = seg.entry();
        tracing::debug!(
            key = %entry.key,
            first_seq = entry.first_seq,
            last_seq = entry.last_seq,
            records = entry.record_count,
            raw_bytes = entry.raw_size,
            stored_bytes = entry.stored_size,
            upload_ms = started.elapsed().as_millis() as u64,
            "segment uploaded"
        );
        self.unsent = None;
        Ok(Some(entry))
    }
}
