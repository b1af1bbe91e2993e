//! Segment shipping: records from the follower are packed into a segment that is closed
//! every sync interval or at a size limit, whichever comes first, then uploaded
//! (create-only). Nothing is uploaded while no record arrives.
//!
//! Uploads happen in sequence order and one at a time: a segment that failed to upload is
//! kept and retried before anything newer goes up, so the tail walk of FORMAT.md §4.4 never
//! meets a hole. While it waits, the WAL stays on the database's disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_manifest::model::{Compression, SegmentEntry};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::segment::{EncodedSegment, Record, SegmentBuilder, SegmentError};

use crate::metrics::Metrics;

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
    /// The time of the open segment's first record.
    open_first_time_us: i64,
    /// A closed segment whose upload has not succeeded yet.
    unsent: Option<EncodedSegment>,
    metrics: Arc<Metrics>,
}

impl Shipper {
    /// A shipper writing to `repo`.
    pub fn new(repo: Repository, opts: ShipOptions) -> Shipper {
        Shipper {
            repo,
            opts,
            open: None,
            open_first_time_us: 0,
            unsent: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Reports records read, segments uploaded and upload failures to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Shipper {
        self.metrics = metrics;
        self
    }

    /// Adds a record to the open segment (opening one if needed).
    pub fn push(&mut self, r: &Record) -> Result<(), ShipError> {
        if self.open.is_none() {
            let builder = SegmentBuilder::new(Compression::Zstd, self.opts.zstd_level)
                .map_err(ShipError::Encoder)?;
            self.open = Some((builder, Instant::now()));
            self.open_first_time_us = r.time_us;
        }
        let (builder, _) = self.open.as_mut().expect("opened above");
        builder.push(r)?;
        self.metrics.record_read(r, self.waiting_since_us());
        Ok(())
    }

    /// The time of the oldest record pushed that is not uploaded yet. A segment holding only
    /// records without a sequence number holds nothing to restore, and does not count.
    pub fn waiting_since_us(&self) -> Option<i64> {
        match (&self.unsent, &self.open) {
            (Some(seg), _) => Some(seg.header.first_time_us),
            (None, Some((b, _))) if b.can_finish() => Some(self.open_first_time_us),
            _ => None,
        }
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
        if let Err(e) = self.repo.write_segment(seg).await {
            self.metrics.upload_failed();
            return Err(e.into());
        }
        let took = started.elapsed();
        let entry = seg.entry();
        tracing::debug!(
            key = %entry.key,
            first_seq = entry.first_seq,
            last_seq = entry.last_seq,
            records = entry.record_count,
            raw_bytes = entry.raw_size,
            stored_bytes = entry.stored_size,
            upload_ms = took.as_millis() as u64,
            "segment uploaded"
        );
        self.unsent = None;
        self.metrics
            .segment_uploaded(&entry, took, self.waiting_since_us());
        Ok(Some(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::segment::RecordTime;
    use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
    use tidemark_manifest::store::{MemoryStore, ObjectStore, StoreOp};

    fn record(seq: u64, count: u32, time_us: i64) -> Record {
        let mut batch = seq.to_le_bytes().to_vec();
        batch.extend_from_slice(&count.to_le_bytes());
        Record {
            seq,
            count,
            time_us,
            time_source: RecordTime::Observed,
            log_number: 5,
            log_offset: seq * 100 + u64::from(count),
            batch,
        }
    }

    /// The metrics' values as the exposition shows them.
    fn sample(m: &Metrics, name: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[tokio::test]
    async fn metrics_follow_what_is_read_and_what_is_durable() {
        let faults = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = faults.clone();
        let repo = Repository::new(store);
        repo.create_config(&tidemark_manifest::testing::config())
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut shipper =
            Shipper::new(repo, ShipOptions::default()).with_metrics(Arc::clone(&metrics));
        // Times an hour in the past: the lag is at least that while they wait.
        let t0 = tidemark_manifest::model::micros_from_time(time::OffsetDateTime::now_utc())
            - 3_600_000_000;
        let lag = |m: &Metrics| sample(m, "tidemark_archive_lag_seconds");

        // A record without a sequence number alone is nothing waiting.
        shipper.push(&record(1, 0, t0)).unwrap();
        assert_eq!(shipper.waiting_since_us(), None);
        assert_eq!(lag(&metrics), 0.0);
        shipper.push(&record(1, 3, t0 + 10)).unwrap();
        assert_eq!(shipper.waiting_since_us(), Some(t0));
        assert!(lag(&metrics) >= 3600.0);
        assert_eq!(sample(&metrics, "tidemark_newest_read_sequence"), 3.0);
        assert_eq!(sample(&metrics, "tidemark_newest_durable_sequence"), 0.0);

        // The upload fails: counted, and everything still waits.
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::PutIfAbsent)
                .key_prefix("wal/")
                .times(1),
        );
        assert!(shipper.close_and_upload().await.is_err());
        assert_eq!(sample(&metrics, "tidemark_upload_failures_total"), 1.0);
        assert_eq!(shipper.waiting_since_us(), Some(t0));
        // A record read meanwhile goes into a new open segment; the oldest still waits.
        shipper.push(&record(4, 2, t0 + 20)).unwrap();
        assert_eq!(shipper.waiting_since_us(), Some(t0));

        // The retry uploads the first segment, then the second.
        let entries = shipper.close_and_upload().await.unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(shipper.waiting_since_us(), None);
        assert_eq!(lag(&metrics), 0.0);
        assert_eq!(sample(&metrics, "tidemark_newest_durable_sequence"), 5.0);
        assert_eq!(sample(&metrics, "tidemark_newest_read_sequence"), 5.0);
        assert_eq!(
            sample(&metrics, "tidemark_newest_durable_record_timestamp_seconds"),
            (t0 + 20) as f64 / 1e6
        );
        assert_eq!(sample(&metrics, "tidemark_archived_records_total"), 3.0);
        assert_eq!(sample(&metrics, "tidemark_segments_uploaded_total"), 2.0);
        let raw: u64 = entries.iter().map(|e| e.raw_size).sum();
        let stored: u64 = entries.iter().map(|e| e.stored_size).sum();
        assert_eq!(
            sample(&metrics, "tidemark_archived_bytes_total"),
            raw as f64
        );
        assert_eq!(
            sample(&metrics, "tidemark_stored_bytes_total"),
            stored as f64
        );
        assert_eq!(
            sample(&metrics, "tidemark_segment_upload_duration_seconds_count"),
            2.0
        );
    }
}
