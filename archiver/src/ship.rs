//! Segment shipping: records from the follower are packed into a segment that is closed
//! every sync interval or at a size limit, whichever comes first, then uploaded
//! (create-only). Nothing is uploaded while no record arrives.
//!
//! A closed segment is finished (its last frames compressed on the pool, the whole hashed)
//! on a blocking thread and uploaded in the background ([`crate::upload`]) while the next one
//! is read and compressed. Uploads happen in sequence order and one at a time: a segment
//! that failed to upload is kept and retried before anything newer goes up, so the tail walk
//! of FORMAT.md §4.4 never meets a hole. At most two closed segments are held (the one
//! uploading and the next, closed and waiting for it), and no segment is open while two are;
//! while the oldest waits for the store, the WAL stays on the database's disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_manifest::model::{Compression, SegmentEntry};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::segment::{EncodedSegment, Record, SegmentBuilder, SegmentError};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::upload::{Uploaded, Uploader};

/// How segments are cut and encoded.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// Close the open segment this long after its first record.
    pub sync_interval: Duration,
    /// Close the open segment when its uncompressed records reach this size.
    pub max_segment_bytes: u64,
    /// zstd level of segment bodies.
    pub zstd_level: i32,
    /// zstd level while catching up ([`Shipper::set_catching_up`]): faster, so that an
    /// archiver behind its database gains on it.
    pub catch_up_zstd_level: i32,
}

impl Default for ShipOptions {
    fn default() -> Self {
        ShipOptions {
            sync_interval: Duration::from_secs(1),
            max_segment_bytes: 32 << 20,
            zstd_level: 3,
            catch_up_zstd_level: 1,
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
    #[error("cannot start a segment or change its compression level: {0}")]
    Encoder(#[source] std::io::Error),
    #[error("the task finishing a segment did not end: {0}")]
    Finish(String),
}

/// Packs records into segments and uploads them.
#[derive(Debug)]
pub struct Shipper {
    opts: ShipOptions,
    open: Option<(SegmentBuilder, Instant)>,
    /// The time of the open segment's first record.
    open_first_time_us: i64,
    /// Closed segments on their way to the store.
    uploads: Uploader,
    /// A segment closed and waiting for the uploader to take it (being finished, maybe).
    closed: Option<Closed>,
    /// Segments found durable and not taken yet, in order.
    durable: Vec<SegmentEntry>,
    /// Records are compressed at the catch-up level.
    catching_up: bool,
    metrics: Arc<Metrics>,
}

impl Shipper {
    /// A shipper writing to `repo`.
    pub fn new(repo: Repository, opts: ShipOptions) -> Shipper {
        Shipper {
            opts,
            open: None,
            open_first_time_us: 0,
            uploads: Uploader::new(repo),
            closed: None,
            durable: Vec::new(),
            catching_up: false,
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
            // Full frames are compressed on other threads while the WAL is read on; the
            // object is built in the buffer of the last segment uploaded, with room for a
            // full segment set aside (not touched) so that it never copies itself to grow.
            let mut builder = SegmentBuilder::new(Compression::Zstd, self.level())
                .map_err(ShipError::Encoder)?
                .in_parallel();
            if let Some(buffer) = self.uploads.take_spare() {
                builder = builder.reusing(buffer);
            }
            let builder = builder.with_room_for(self.opts.max_segment_bytes);
            self.open = Some((builder, Instant::now()));
            self.open_first_time_us = r.time_us;
        }
        let (builder, _) = self.open.as_mut().expect("opened above");
        builder.push(r)?;
        self.metrics.record_read(r, self.waiting_since_us());
        Ok(())
    }

    /// Compresses the records pushed from now on at the catch-up level (`true`) or the
    /// normal one, in the open segment too: the archiver reads a backlog of the WAL.
    pub fn set_catching_up(&mut self, on: bool) -> Result<(), ShipError> {
        if on == self.catching_up {
            return Ok(());
        }
        let level = if on {
            self.opts.catch_up_zstd_level
        } else {
            self.opts.zstd_level
        };
        if let Some((builder, _)) = &mut self.open {
            builder.set_zstd_level(level).map_err(ShipError::Encoder)?;
        }
        self.catching_up = on;
        Ok(())
    }

    /// True while records are compressed at the catch-up level.
    pub fn catching_up(&self) -> bool {
        self.catching_up
    }

    /// The zstd level of the records pushed now.
    pub fn level(&self) -> i32 {
        if self.catching_up {
            self.opts.catch_up_zstd_level
        } else {
            self.opts.zstd_level
        }
    }

    /// The time of the oldest record pushed that is not uploaded yet. A segment holding only
    /// records without a sequence number holds nothing to restore, and does not count.
    pub fn waiting_since_us(&self) -> Option<i64> {
        let closed = self
            .uploads
            .oldest_time_us()
            .or(self.closed.as_ref().map(|c| c.first_time_us));
        match (closed, &self.open) {
            (Some(t), _) => Some(t),
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

    /// True when the open segment reached the maximum size: it is closed as soon as the
    /// record that filled it is in, without waiting for the rest of the read (unlike a
    /// segment due by time, which takes everything read before its close).
    pub fn is_full(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|(b, _)| b.can_finish() && b.raw_size() >= self.opts.max_segment_bytes)
    }

    /// When the open segment will be due by time.
    pub fn due_at(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .filter(|(b, _)| b.can_finish())
            .map(|(_, opened)| *opened + self.opts.sync_interval)
    }

    /// True when the oldest closed segment's upload failed and waits for a retry.
    pub fn upload_failed(&self) -> bool {
        self.uploads.failed()
    }

    /// True while a closed segment is not durable yet (uploading, or waiting to).
    pub fn has_unsent(&self) -> bool {
        self.closed_held() > 0
    }

    /// How many closed segments are held: by the uploader (at most
    /// [`crate::upload::MAX_HELD`]) and the one waiting for it.
    pub fn closed_held(&self) -> usize {
        self.uploads.held() + usize::from(self.closed.is_some())
    }

    /// Closes the open segment (if it holds a sequence number) and starts its upload behind
    /// those before it. The segment is finished (its last bytes compressed, hashed) on a
    /// blocking thread while the next one fills and the upload before it runs; it is handed
    /// to the uploader when that upload ends (by a later call, or [`Shipper::collect`], when
    /// nothing else waits to close behind it). A failed upload is retried first. Segments
    /// found durable meanwhile are kept for [`Shipper::take_durable`], also when this fails.
    /// On an upload error every segment is kept, and the next call tries the oldest again
    /// first.
    pub async fn ship(&mut self) -> Result<(), ShipError> {
        self.ship_closed(false).await
    }

    /// [`Shipper::ship`]; with `all`, hands every closed segment to the uploader, waiting
    /// for its finish.
    async fn ship_closed(&mut self, all: bool) -> Result<(), ShipError> {
        // Collect first: handing a finished segment over frees the slot the open one closes
        // into.
        self.collect().await?;
        self.close();
        while let Some(closed) = self.closed.take() {
            if self.uploads.is_full() {
                self.closed = Some(closed);
                self.wait_one().await?;
                continue;
            }
            if !all && self.open.is_none() && !closed.is_finished() {
                // Nothing waits to close behind it and the uploader is free: the next
                // segment fills while this one is finished (two closed are still the most).
                self.closed = Some(closed);
                break;
            }
            self.uploads.push(closed.segment().await?);
            // A segment left open behind one that waited (after a failure) goes next.
            self.close();
        }
        if self.uploads.failed() {
            self.wait_one().await?;
        }
        Ok(())
    }

    /// Moves the open segment into the closed slot, if that is free and the segment holds a
    /// sequence number, and starts finishing it.
    fn close(&mut self) {
        if self.closed.is_none() && self.open.as_ref().is_some_and(|(b, _)| b.can_finish()) {
            let (builder, _) = self.open.take().expect("checked above");
            self.closed = Some(Closed::finish(builder, self.open_first_time_us));
        }
    }

    /// [`Shipper::ship`], then waits until every closed segment is durable.
    pub async fn ship_all(&mut self) -> Result<(), ShipError> {
        self.ship_closed(true).await?;
        while self.has_unsent() {
            self.wait_one().await?;
        }
        Ok(())
    }

    /// Takes note of an upload that ended, and hands a finished segment to the uploader if
    /// it has room, without waiting. An upload error is returned (the segment is kept for a
    /// retry).
    pub async fn collect(&mut self) -> Result<(), ShipError> {
        let ended = self.uploads.take_ended().await;
        self.uploaded(ended)?;
        if !self.uploads.is_full() && self.closed.as_ref().is_some_and(Closed::is_finished) {
            let closed = self.closed.take().expect("checked above");
            self.uploads.push(closed.segment().await?);
        }
        Ok(())
    }

    /// Resolves when the upload running now ends or the closed segment is finished (never
    /// while neither runs): [`Shipper::collect`] has something to do. Cancel-safe.
    pub async fn progressed(&mut self) {
        let finishing = async {
            match &mut self.closed {
                Some(closed) if matches!(closed.state, Finish::Running(_)) => {
                    closed.wait_finished().await
                }
                // Finished and waiting for the uploader: its upload ending is the news.
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.uploads.upload_ended() => {}
            _ = finishing => {}
        }
    }

    /// The segments found durable since the last call, in order.
    pub fn take_durable(&mut self) -> Vec<SegmentEntry> {
        std::mem::take(&mut self.durable)
    }

    async fn wait_one(&mut self) -> Result<(), ShipError> {
        let ended = self.uploads.next_durable().await;
        self.uploaded(ended)
    }

    fn uploaded(&mut self, ended: Result<Option<Uploaded>, RepoError>) -> Result<(), ShipError> {
        let up = match ended {
            Ok(Some(up)) => up,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.metrics.upload_failed();
                return Err(e.into());
            }
        };
        let entry = up.entry;
        tracing::debug!(
            key = %entry.key,
            first_seq = entry.first_seq,
            last_seq = entry.last_seq,
            records = entry.record_count,
            raw_bytes = entry.raw_size,
            stored_bytes = entry.stored_size,
            upload_ms = up.took.as_millis() as u64,
            "segment uploaded"
        );
        self.metrics
            .segment_uploaded(&entry, up.took, self.waiting_since_us());
        self.durable.push(entry);
        Ok(())
    }
}

/// A closed segment: being finished on a blocking thread, then finished (or failed).
#[derive(Debug)]
struct Closed {
    first_time_us: i64,
    state: Finish,
}

#[derive(Debug)]
enum Finish {
    Running(JoinHandle<Result<EncodedSegment, SegmentError>>),
    Done(Result<EncodedSegment, ShipError>),
}

impl Closed {
    fn finish(builder: SegmentBuilder, first_time_us: i64) -> Closed {
        Closed {
            first_time_us,
            state: Finish::Running(tokio::task::spawn_blocking(move || builder.finish())),
        }
    }

    fn is_finished(&self) -> bool {
        match &self.state {
            Finish::Running(task) => task.is_finished(),
            Finish::Done(_) => true,
        }
    }

    /// Resolves when the segment is finished. Cancel-safe: the outcome is kept.
    async fn wait_finished(&mut self) {
        let Finish::Running(task) = &mut self.state else {
            return;
        };
        let outcome = match task.await {
            Ok(r) => r.map_err(ShipError::from),
            // The task is never aborted; a panic in it is this thread's.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(ShipError::Finish(e.to_string())),
        };
        self.state = Finish::Done(outcome);
    }

    /// The finished segment (waiting for its finish).
    async fn segment(mut self) -> Result<EncodedSegment, ShipError> {
        self.wait_finished().await;
        match self.state {
            Finish::Done(outcome) => outcome,
            Finish::Running(_) => unreachable!("waited for above"),
        }
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
    async fn catching_up_compresses_the_open_segment_faster_from_the_next_record() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        repo.create_config(&tidemark_manifest::testing::config())
            .await
            .unwrap();
        // 40 records of 64 KiB, compressible: several jobs of frames on each side.
        let records: Vec<Record> = (0..40u64)
            .map(|i| {
                let mut r = record(1 + i, 1, 1_000 + i as i64);
                r.batch
                    .extend((0..65_536u64).map(|j| ((i * 31 + j * 7) % 251 + j / 4096) as u8));
                r
            })
            .collect();
        let build = |switch_at: Option<usize>| {
            let mut b = SegmentBuilder::new(Compression::Zstd, 3).unwrap();
            for (i, r) in records.iter().enumerate() {
                if switch_at == Some(i) {
                    b.set_zstd_level(1).unwrap();
                }
                b.push(r).unwrap();
            }
            b.finish().unwrap()
        };
        let mut shipper = Shipper::new(repo.clone(), ShipOptions::default());
        for (i, r) in records.iter().enumerate() {
            if i == 20 {
                assert_eq!(shipper.level(), 3);
                shipper.set_catching_up(true).unwrap();
                assert!(shipper.catching_up());
                assert_eq!(shipper.level(), 1);
            }
            shipper.push(r).unwrap();
        }
        shipper.ship_all().await.unwrap();
        let entries = shipper.take_durable();
        assert_eq!(entries.len(), 1);
        let shipped = repo.store().get(&entries[0].key).await.unwrap();
        assert!(
            shipped == build(Some(20)).bytes,
            "level 1 from record 20 on"
        );
        assert!(shipped != build(None).bytes, "not level 3 throughout");
        // Back to the normal level for the segment opened next.
        shipper.set_catching_up(false).unwrap();
        assert_eq!(shipper.level(), 3);
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
        assert!(shipper.ship_all().await.is_err());
        assert_eq!(sample(&metrics, "tidemark_upload_failures_total"), 1.0);
        assert_eq!(shipper.waiting_since_us(), Some(t0));
        // A record read meanwhile goes into a new open segment; the oldest still waits.
        shipper.push(&record(4, 2, t0 + 20)).unwrap();
        assert_eq!(shipper.waiting_since_us(), Some(t0));

        // The retry uploads the first segment, then the second.
        shipper.ship_all().await.unwrap();
        let entries = shipper.take_durable();
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

    /// A shipper on a fault store, over a fresh in-memory repository.
    async fn faulty_shipper() -> (Arc<FaultStore>, Shipper) {
        let faults = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = faults.clone();
        let repo = Repository::new(store);
        repo.create_config(&tidemark_manifest::testing::config())
            .await
            .unwrap();
        (faults, Shipper::new(repo, ShipOptions::default()))
    }

    /// The first sequences of the segments in the store, in order.
    async fn stored(store: &FaultStore) -> Vec<u64> {
        let mut firsts: Vec<u64> = store
            .list(tidemark_manifest::keys::WAL_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|m| {
                let hex = &m.key["wal/".len()..m.key.len() - ".seg".len()];
                u64::from_str_radix(hex, 16).unwrap()
            })
            .collect();
        firsts.sort();
        firsts
    }

    /// Pushes records `first..first + n` (one sequence each).
    fn push_run(shipper: &mut Shipper, first: u64, n: u64) {
        for seq in first..first + n {
            shipper.push(&record(seq, 1, 1_000 + seq as i64)).unwrap();
        }
    }

    #[tokio::test]
    async fn a_segment_never_reaches_the_store_before_the_one_before_it() {
        let (faults, mut shipper) = faulty_shipper().await;
        // The first segment's upload is slow; the second is closed meanwhile.
        faults.inject(
            FaultRule::new(Fault::Delay(Duration::from_millis(400)))
                .on(StoreOp::PutIfAbsent)
                .key_prefix(tidemark_manifest::keys::segment_key(1))
                .times(1),
        );
        push_run(&mut shipper, 1, 3);
        shipper.ship().await.unwrap();
        assert_eq!(
            shipper.closed_held(),
            1,
            "the upload runs in the background"
        );
        push_run(&mut shipper, 4, 3);
        let watch = async {
            // While the second segment waits, it must never be seen without the first.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = stored(&faults).await;
                assert!(
                    !s.contains(&4) || s.contains(&1),
                    "segment 4 stored before 1: {s:?}"
                );
                if s == [1, 4] || Instant::now() > deadline {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let (shipped, seen) = tokio::join!(shipper.ship_all(), watch);
        shipped.unwrap();
        assert_eq!(seen, vec![1, 4]);
        let durable: Vec<u64> = shipper.take_durable().iter().map(|e| e.first_seq).collect();
        assert_eq!(durable, vec![1, 4]);
    }

    #[tokio::test]
    async fn a_failed_upload_keeps_the_compressed_segment_after_it_out_of_the_store() {
        let (faults, mut shipper) = faulty_shipper().await;
        // Segment 1 fails twice (its upload, then its first retry).
        faults.inject(
            FaultRule::new(Fault::Transient)
                .on(StoreOp::PutIfAbsent)
                .key_prefix(tidemark_manifest::keys::segment_key(1))
                .times(2),
        );
        push_run(&mut shipper, 1, 3);
        // Whether this call sees the failure or the next does depends on timing.
        let _ = shipper.ship().await;
        push_run(&mut shipper, 4, 3);
        let first = shipper.ship().await;
        let err = match first {
            Err(e) => e,
            Ok(()) => shipper.ship().await.unwrap_err(),
        };
        assert!(matches!(err, ShipError::Repo(_)), "{err}");
        assert!(shipper.upload_failed());
        assert_eq!(shipper.closed_held(), 2, "segment 4 is compressed and kept");
        assert_eq!(
            shipper.next_seq(),
            None,
            "no segment is open while two are held"
        );
        assert_eq!(
            shipper.waiting_since_us(),
            Some(1_001),
            "the lag counts from the oldest record not durable"
        );
        assert!(shipper.take_durable().is_empty());
        assert_eq!(stored(&faults).await, Vec::<u64>::new());

        // Retried: while segment 1 still fails, nothing reaches the store; then 1, then 4.
        let mut tries = 0;
        while let Err(e) = shipper.ship_all().await {
            tries += 1;
            assert!(tries < 3, "the fault was injected twice: {e}");
            assert_eq!(stored(&faults).await, Vec::<u64>::new());
            assert_eq!(shipper.closed_held(), 2);
        }
        let durable: Vec<u64> = shipper.take_durable().iter().map(|e| e.first_seq).collect();
        assert_eq!(durable, vec![1, 4]);
        assert_eq!(stored(&faults).await, vec![1, 4]);
        assert_eq!(shipper.closed_held(), 0);
        assert_eq!(shipper.waiting_since_us(), None);
    }

    #[tokio::test]
    async fn a_segment_closed_with_the_uploader_free_goes_up_without_another_ship() {
        let (faults, mut shipper) = faulty_shipper().await;
        push_run(&mut shipper, 1, 3);
        shipper.ship().await.unwrap();
        // Records read meanwhile go into the next segment, whatever the closed one is doing.
        push_run(&mut shipper, 4, 2);
        assert_eq!(shipper.next_seq(), Some(6));
        // No further ship: the step's wake-up and collect hand it over, then see it durable.
        let deadline = Instant::now() + Duration::from_secs(20);
        while shipper.durable.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the closed segment never went up"
            );
            tokio::time::timeout(Duration::from_secs(5), shipper.progressed())
                .await
                .expect("the finish or the upload ending wakes the step");
            shipper.collect().await.unwrap();
        }
        assert_eq!(stored(&faults).await, vec![1]);
        assert_eq!(shipper.take_durable()[0].last_seq, 3);
        assert_eq!(shipper.waiting_since_us(), Some(1_004));
    }

    /// The shipper, closing a segment at every record.
    fn one_record_segments(shipper: Shipper) -> Shipper {
        Shipper {
            opts: ShipOptions {
                max_segment_bytes: 1,
                ..ShipOptions::default()
            },
            ..shipper
        }
    }

    /// Waits until the closed segment is finished (not handed over: nothing collects it).
    async fn until_closed_is_finished(shipper: &Shipper) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !shipper.closed.as_ref().is_some_and(Closed::is_finished) {
            assert!(
                Instant::now() < deadline,
                "the closed segment never finished"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn ship_all_ships_the_open_segment_behind_a_finished_one_not_handed_over_yet() {
        let (faults, mut shipper) = faulty_shipper().await;
        push_run(&mut shipper, 1, 3);
        shipper.ship().await.unwrap();
        push_run(&mut shipper, 4, 2);
        until_closed_is_finished(&shipper).await;
        // Handing the finished one over frees the slot the open one must close into.
        shipper.ship_all().await.unwrap();
        assert_eq!(stored(&faults).await, vec![1, 4]);
        assert!(!shipper.has_unsent() && shipper.next_seq().is_none());
    }

    #[tokio::test]
    async fn a_full_segment_closes_when_the_one_before_it_is_handed_over() {
        let (_faults, shipper) = faulty_shipper().await;
        let mut shipper = one_record_segments(shipper);
        push_run(&mut shipper, 1, 1);
        shipper.ship().await.unwrap();
        push_run(&mut shipper, 2, 1);
        assert!(shipper.is_full());
        until_closed_is_finished(&shipper).await;
        shipper.ship().await.unwrap();
        assert!(
            !shipper.is_full() && shipper.next_seq().is_none(),
            "the full segment was left open: the next record would go into it"
        );
    }

    #[tokio::test]
    async fn at_most_two_closed_segments_are_held_however_slow_the_store() {
        let (faults, shipper) = faulty_shipper().await;
        let mut shipper = one_record_segments(shipper);
        faults.inject(
            FaultRule::new(Fault::Delay(Duration::from_millis(50)))
                .on(StoreOp::PutIfAbsent)
                .key_prefix("wal/"),
        );
        let mut most = 0;
        for seq in 1..=20 {
            // As the pipeline does: close each full segment as soon as a record fills it.
            push_run(&mut shipper, seq, 1);
            assert!(shipper.should_close());
            shipper.ship().await.unwrap();
            most = most.max(shipper.closed_held());
            assert!(shipper.closed_held() <= crate::upload::MAX_HELD);
        }
        assert_eq!(most, 1, "each upload overlapped the next segment");
        shipper.ship_all().await.unwrap();
        assert_eq!(stored(&faults).await, (1..=20).collect::<Vec<u64>>());
        assert_eq!(shipper.take_durable().len(), 20);
    }
}
