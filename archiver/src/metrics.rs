//! Metrics and health for monitoring: a [`Metrics`] registry the service updates as it works,
//! and an HTTP/1.1 server that answers `GET /metrics` and `GET /health` on the address it is
//! given (`--metrics-addr`).
//!
//! `/metrics` is Prometheus' text format 0.0.4 (`text/plain; version=0.0.4`), which every
//! Prometheus scrapes, written by the Prometheus project's `prometheus-client` crate;
//! [`FAMILIES`] lists what it holds. The server is the endpoint both programs share
//! ([`tidemark_manifest::metrics_http`], on hyper).
//!
//! The registry is one mutex around plain numbers. Updates are a few stores; a scrape copies
//! them under the same lock and renders the copy, so the values of one scrape belong
//! together: the lag is 0 exactly when every sequence number read from the WAL is durable
//! (`tidemark_newest_read_sequence == tidemark_newest_durable_sequence`).
//!
//! Counters count what this process did since it started (Prometheus' `rate()` and
//! `increase()` handle restarts). Gauges about the repository (newest durable sequence and
//! record time, newest base backup, manifest generation) start from what the repository
//! held when the service started.

mod exposition;

pub use exposition::{FAMILIES, Family, Kind, Scope};
pub use tidemark_manifest::metrics_http::{Exporter, MetricsServer, serve};

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exposition::Snapshot;
use tidemark_manifest::model::{BaseSummary, SegmentEntry, micros_from_time};
use tidemark_manifest::plan::RestoreCost;
use tidemark_manifest::segment::Record;
use time::OffsetDateTime;

/// Where the service is in its life, for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Checking the database, taking the lease, reading the repository.
    #[default]
    Starting,
    /// Following the WAL and archiving.
    Running,
    /// Shipping what is open and writing the last generation before exiting.
    Stopping,
    /// Stopped (cleanly or with an error); the process is about to exit.
    Stopped,
    /// Stopped with an error and waiting to be started again (one of several databases
    /// archived by one process, see [`crate::fleet`]).
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        })
    }
}

/// Upper bounds (seconds) of the segment upload duration histogram's buckets.
const UPLOAD_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// A histogram with fixed buckets.
#[derive(Debug, Default, Clone, Copy)]
struct Histogram {
    /// Observations that fell into each bucket (not cumulative; the rest are above the last).
    counts: [u64; UPLOAD_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = UPLOAD_BUCKETS.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

#[derive(Debug, Default, Clone)]
struct State {
    phase: Phase,
    newest_read_seq: u64,
    newest_durable_seq: u64,
    newest_durable_time_us: Option<i64>,
    /// Time of the oldest record read but not durable yet.
    waiting_since_us: Option<i64>,
    last_upload_us: Option<i64>,
    upload_seconds: Histogram,
    last_base_us: Option<i64>,
    last_base_seq: u64,
    last_base_seconds: f64,
    since_base_bytes: u64,
    since_base_records: u64,
    predicted_restore_secs: f64,
    archived_bytes: u64,
    stored_bytes: u64,
    archived_records: u64,
    wal_reads: u64,
    catch_up_bytes: u64,
    segments: u64,
    upload_failures: u64,
    gaps: u64,
    bases: u64,
    base_failures: u64,
    lease_expires_us: Option<i64>,
    generation: u64,
    last_prune_us: Option<i64>,
    prune_failures: u64,
    pruned_objects: u64,
    pruned_bytes: u64,
    /// Times the service failed and was started again (several databases per process).
    failures: u64,
    last_error: Option<String>,
}

/// The archiver's metrics, shared (in an `Arc`) by the service, its shipper and checkpoint
/// manager, and the HTTP server.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

fn now_us() -> i64 {
    micros_from_time(OffsetDateTime::now_utc())
}

impl Metrics {
    /// An empty registry (phase: starting).
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // The state is plain numbers: one left half-updated by a panic is still readable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// Moves the service to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.with(|s| s.phase = phase);
    }

    /// Where the service is.
    pub fn phase(&self) -> Phase {
        self.with(|s| s.phase)
    }

    /// The service stopped with `error` and will be started again: phase
    /// [`Phase::Failed`], one more failure counted.
    pub fn failed(&self, error: &str) {
        self.with(|s| {
            s.phase = Phase::Failed;
            s.failures += 1;
            s.last_error = Some(error.to_owned());
        });
    }

    /// How often the service failed, and the last error.
    pub fn failures(&self) -> (u64, Option<String>) {
        self.with(|s| (s.failures, s.last_error.clone()))
    }

    /// What the repository holds when the service starts: the newest archived sequence and
    /// its record's time, the manifest generation and the base backups.
    pub fn resumed(
        &self,
        last_seq: Option<u64>,
        last_time_us: Option<i64>,
        generation: u64,
        bases: &[BaseSummary],
    ) {
        self.with(|s| {
            s.newest_read_seq = last_seq.unwrap_or(0);
            s.newest_durable_seq = last_seq.unwrap_or(0);
            s.newest_durable_time_us = last_time_us;
            s.generation = generation;
            s.last_base_us = bases.iter().map(|b| micros_from_time(b.created_at)).max();
            s.last_base_seq = bases.iter().map(|b| b.earliest_seq).max().unwrap_or(0);
        });
    }

    /// The WAL was read once (a wake-up of the follower, whatever it found).
    pub fn wal_read(&self) {
        self.with(|s| s.wal_reads += 1);
    }

    /// `bytes` of records were read while catching up (a backlog of the WAL, compressed at
    /// the catch-up level).
    pub fn read_catching_up(&self, bytes: u64) {
        self.with(|s| s.catch_up_bytes += bytes);
    }

    /// A record was read from the WAL and handed to the shipper. `waiting_since_us` is the
    /// time of the oldest record read but not durable yet, if any.
    pub fn record_read(&self, r: &Record, waiting_since_us: Option<i64>) {
        self.with(|s| {
            if r.count > 0 {
                s.newest_read_seq = s.newest_read_seq.max(r.next_seq() - 1);
            }
            s.waiting_since_us = waiting_since_us;
        });
    }

    /// A segment was uploaded (it is durable) in `took`; `waiting_since_us` as for
    /// [`Metrics::record_read`], after this upload.
    pub fn segment_uploaded(
        &self,
        entry: &SegmentEntry,
        took: Duration,
        waiting_since_us: Option<i64>,
    ) {
        let now = now_us();
        self.with(|s| {
            s.newest_durable_seq = s.newest_durable_seq.max(entry.last_seq);
            s.newest_durable_time_us = Some(micros_from_time(entry.last_time));
            s.waiting_since_us = waiting_since_us;
            s.last_upload_us = Some(now);
            s.upload_seconds.observe(took.as_secs_f64());
            s.archived_bytes += entry.raw_size;
            s.stored_bytes += entry.stored_size;
            s.archived_records += u64::from(entry.record_count);
            s.segments += 1;
        });
    }

    /// The WAL uploaded after the newest base's point, and the predicted restore time of
    /// the newest point (`None` before the first base).
    pub fn replay_since_base(&self, since: &RestoreCost, predicted: Option<Duration>) {
        self.with(|s| {
            s.since_base_bytes = since.wal_bytes;
            s.since_base_records = since.wal_records;
            s.predicted_restore_secs = predicted.map_or(0.0, |d| d.as_secs_f64());
        });
    }

    /// A segment upload failed (after the store's own retries); it is kept and tried again.
    pub fn upload_failed(&self) {
        self.with(|s| s.upload_failures += 1);
    }

    /// A gap was detected and handed to the checkpoint manager to record.
    pub fn gap_detected(&self) {
        self.with(|s| s.gaps += 1);
    }

    /// A base backup finished in `took`.
    pub fn base_finished(&self, base: &BaseSummary, took: Duration) {
        self.with(|s| {
            let at = micros_from_time(base.created_at);
            s.last_base_us = Some(s.last_base_us.map_or(at, |t| t.max(at)));
            s.last_base_seq = s.last_base_seq.max(base.earliest_seq);
            s.last_base_seconds = took.as_secs_f64();
            s.bases += 1;
        });
    }

    /// A base backup failed (it is tried again later).
    pub fn base_failed(&self) {
        self.with(|s| s.base_failures += 1);
    }

    /// The retention policy was applied: `objects` of `bytes` deleted.
    pub fn prune_finished(&self, objects: u64, bytes: u64) {
        self.with(|s| {
            s.last_prune_us = Some(now_us());
            s.pruned_objects += objects;
            s.pruned_bytes += bytes;
        });
    }

    /// Applying the retention policy failed (it is tried again at the next interval).
    pub fn prune_failed(&self) {
        self.with(|s| s.prune_failures += 1);
    }

    /// The lease is held until `expires_at` (acquired or renewed), or not at all (`None`).
    pub fn lease_held_until(&self, expires_at: Option<OffsetDateTime>) {
        self.with(|s| s.lease_expires_us = expires_at.map(micros_from_time));
    }

    /// A manifest generation was written.
    pub fn generation_written(&self, generation: u64) {
        self.with(|s| s.generation = s.generation.max(generation));
    }

    /// The metrics in Prometheus' text format 0.0.4, as of now.
    pub fn render(&self) -> String {
        self.render_at(now_us(), tidemark_manifest::store::retries_total())
    }

    fn render_at(&self, now_us: i64, store_retries: u64) -> String {
        exposition::render(vec![self.snapshot(None)], false, now_us, store_retries)
    }

    /// A copy of the state, taken under the lock: the values of one moment.
    fn snapshot(&self, database: Option<&str>) -> Snapshot {
        Snapshot {
            database: database.map(str::to_owned),
            state: self.with(|s| s.clone()),
        }
    }
}

impl Exporter for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }

    fn health(&self) -> (bool, String) {
        match self.phase() {
            Phase::Running => (true, "ok\n".to_owned()),
            phase => (false, format!("{phase}\n")),
        }
    }
}

/// The metrics of several databases archived by one process: every series of a database's
/// registry carries the label `database="<name>"`, the store retries counter (which belongs
/// to the whole process) has none, and two families say how each database fares:
/// `tidemark_database_up` and `tidemark_database_failures_total`.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    databases: Vec<(String, Arc<Metrics>)>,
}

impl FleetMetrics {
    /// The registries of the databases, by name, in the order they are shown.
    pub fn new(databases: Vec<(String, Arc<Metrics>)>) -> FleetMetrics {
        FleetMetrics { databases }
    }

    fn render_at(&self, now_us: i64, store_retries: u64) -> String {
        let databases = self
            .databases
            .iter()
            .map(|(name, m)| m.snapshot(Some(name)))
            .collect();
        exposition::render(databases, true, now_us, store_retries)
    }
}

impl Exporter for FleetMetrics {
    fn render(&self) -> String {
        self.render_at(now_us(), tidemark_manifest::store::retries_total())
    }

    /// Healthy when every database is being archived. The body's first line is `ok` or
    /// `unhealthy`, then one line per database: `NAME: PHASE`, and for a failed one how
    /// often it failed and the last error.
    fn health(&self) -> (bool, String) {
        let mut healthy = true;
        let mut lines = String::new();
        for (name, m) in &self.databases {
            let phase = m.phase();
            healthy &= phase == Phase::Running;
            let _ = write!(lines, "{name}: {phase}");
            if phase == Phase::Failed {
                let (failures, error) = m.failures();
                let error = error.unwrap_or_default().replace('\n', " ");
                let _ = write!(lines, " ({failures} failures, retrying): {error}");
            }
            lines.push('\n');
        }
        let head = if healthy { "ok" } else { "unhealthy" };
        (healthy, format!("{head}\n{lines}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use tidemark_manifest::model::time_from_micros;
    use tidemark_manifest::segment::RecordTime;
    use tidemark_manifest::testing;

    const T0: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z in µs

    fn record(seq: u64, count: u32, time_us: i64) -> Record {
        let mut batch = seq.to_le_bytes().to_vec();
        batch.extend_from_slice(&count.to_le_bytes());
        Record {
            seq,
            count,
            time_us,
            time_source: RecordTime::Observed,
            log_number: 1,
            log_offset: seq * 100,
            batch,
        }
    }

    fn base(created_us: i64, earliest_seq: u64) -> BaseSummary {
        let id = format!("b{earliest_seq}");
        testing::base(&id, 1, earliest_seq, time_from_micros(created_us))
    }

    fn entry(first_seq: u64, last_seq: u64, records: u32, last_time_us: i64) -> SegmentEntry {
        let (first, last) = (time_from_micros(T0), time_from_micros(last_time_us));
        SegmentEntry {
            record_count: records,
            raw_size: 1000,
            stored_size: 300,
            ..testing::segment(first_seq, last_seq, first, last)
        }
    }

    /// A parsed exposition: families (name → type), help lines, samples (series → value).
    #[derive(Debug, Default)]
    struct Parsed {
        types: BTreeMap<String, String>,
        helps: BTreeSet<String>,
        samples: BTreeMap<String, f64>,
    }

    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses exposition text, checking the rules Prometheus' parser enforces: HELP and TYPE
    /// once per family and before its samples, valid names, samples that belong to the
    /// family declared last, values that parse, no series twice.
    fn parse(text: &str) -> Parsed {
        let mut p = Parsed::default();
        let mut current: Option<String> = None;
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(valid_name(name), "{line}");
                assert!(!help.is_empty(), "{line}");
                assert!(p.helps.insert(name.to_owned()), "HELP twice: {line}");
                assert!(!p.types.contains_key(name), "HELP after TYPE: {line}");
                current = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                assert_eq!(current.as_deref(), Some(name), "TYPE without HELP: {line}");
                assert!(
                    p.types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "TYPE twice: {line}"
                );
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
                let (series, value) = line.rsplit_once(' ').expect("series value");
                let name = series.split('{').next().unwrap();
                assert!(valid_name(name), "{line}");
                let family = current.as_deref().expect("a sample before any family");
                let kind = &p.types[family];
                let belongs = match kind.as_str() {
                    "histogram" => [
                        format!("{family}_bucket"),
                        format!("{family}_sum"),
                        format!("{family}_count"),
                    ]
                    .contains(&name.to_owned()),
                    _ => name == family,
                };
                assert!(belongs, "sample {name} outside its family {family}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
                let v: f64 = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
                };
                assert!(
                    p.samples.insert(series.to_owned(), v).is_none(),
                    "series twice: {line}"
                );
            }
        }
        for name in &p.helps {
            assert!(p.types.contains_key(name), "{name} has no TYPE");
        }
        p
    }

    #[test]
    fn a_fresh_registry_renders_every_family_with_zeroes() {
        let m = Metrics::new();
        let p = parse(&m.render_at(T0, 0));
        // One family for each of the list, as its TYPE says; a fleet's only with several.
        for f in FAMILIES {
            let kind = (f.scope != Scope::Fleet).then_some(f.kind.as_str());
            let name = f.name;
            assert_eq!(p.types.get(name).map(String::as_str), kind, "{name}");
        }
        assert_eq!(p.types.len(), 29);
        for (series, v) in &p.samples {
            assert_eq!(*v, 0.0, "{series}");
        }
    }

    #[test]
    fn updates_show_in_the_exposition() {
        let m = Metrics::new();
        m.resumed(
            Some(10),
            Some(T0 - 5_000_000),
            7,
            &[base(T0 - 3_600_000_000, 5), base(T0 - 7_200_000_000, 3)],
        );
        let p = parse(&m.render_at(T0, 0));
        assert_eq!(p.samples["tidemark_newest_durable_sequence"], 10.0);
        assert_eq!(p.samples["tidemark_newest_read_sequence"], 10.0);
        assert_eq!(p.samples["tidemark_manifest_generation"], 7.0);
        assert_eq!(p.samples["tidemark_last_base_backup_sequence"], 5.0);
        assert_eq!(
            p.samples["tidemark_last_base_backup_timestamp_seconds"],
            (T0 - 3_600_000_000) as f64 / 1e6
        );
        assert_eq!(p.samples["tidemark_base_backups_total"], 0.0);
        m.lease_held_until(Some(time_from_micros(T0 + 60_000_000)));
        m.record_read(&record(11, 10, T0), Some(T0));
        m.segment_uploaded(&entry(11, 12, 1, T0), Duration::from_millis(300), None);
        m.segment_uploaded(&entry(13, 20, 4, T0 + 1), Duration::from_secs(3), None);
        m.upload_failed();
        m.read_catching_up(4 << 20);
        m.read_catching_up(1000);
        m.gap_detected();
        m.base_finished(&base(T0 - 1_000_000, 15), Duration::from_millis(2500));
        m.base_failed();
        m.generation_written(9);
        m.generation_written(8); // an older one never goes back
        let p = parse(&m.render_at(T0 + 2_000_000, 4));
        let v = |s: &str| *p.samples.get(s).unwrap_or_else(|| panic!("no {s}"));
        assert_eq!(v("tidemark_newest_read_sequence"), 20.0);
        assert_eq!(v("tidemark_newest_durable_sequence"), 20.0);
        assert_eq!(
            v("tidemark_newest_durable_record_timestamp_seconds"),
            (T0 + 1) as f64 / 1e6
        );
        assert_eq!(v("tidemark_archive_lag_seconds"), 0.0);
        assert_eq!(v("tidemark_archived_records_total"), 5.0);
        assert_eq!(v("tidemark_archived_bytes_total"), 2000.0);
        assert_eq!(v("tidemark_stored_bytes_total"), 600.0);
        assert_eq!(
            v("tidemark_catch_up_bytes_total"),
            f64::from((4 << 20) + 1000)
        );
        assert_eq!(v("tidemark_segments_uploaded_total"), 2.0);
        assert_eq!(v("tidemark_upload_failures_total"), 1.0);
        assert_eq!(v("tidemark_store_retries_total"), 4.0);
        assert_eq!(v("tidemark_gaps_detected_total"), 1.0);
        assert_eq!(v("tidemark_base_backups_total"), 1.0);
        assert_eq!(v("tidemark_base_backup_failures_total"), 1.0);
        assert_eq!(v("tidemark_base_backup_duration_seconds"), 2.5);
        assert_eq!(
            v("tidemark_last_base_backup_timestamp_seconds"),
            (T0 - 1_000_000) as f64 / 1e6
        );
        assert_eq!(v("tidemark_last_base_backup_sequence"), 15.0);
        assert_eq!(v("tidemark_manifest_generation"), 9.0);
        assert_eq!(v("tidemark_lease_held"), 1.0);
        assert!(v("tidemark_last_segment_upload_timestamp_seconds") > 0.0);
        // The histogram: cumulative buckets, +Inf is the count, the sum adds up.
        let h = "tidemark_segment_upload_duration_seconds";
        assert_eq!(v(&format!("{h}_bucket{{le=\"0.25\"}}")), 0.0);
        assert_eq!(v(&format!("{h}_bucket{{le=\"0.5\"}}")), 1.0);
        assert_eq!(v(&format!("{h}_bucket{{le=\"2.5\"}}")), 1.0);
        assert_eq!(v(&format!("{h}_bucket{{le=\"5\"}}")), 2.0);
        assert_eq!(v(&format!("{h}_bucket{{le=\"+Inf\"}}")), 2.0);
        assert_eq!(v(&format!("{h}_count")), 2.0);
        assert!((v(&format!("{h}_sum")) - 3.3).abs() < 1e-9);
        let mut last = 0.0;
        for b in UPLOAD_BUCKETS {
            let n = v(&format!("{h}_bucket{{le=\"{b}\"}}"));
            assert!(n >= last, "buckets are cumulative");
            last = n;
        }
        // A slow upload counts only in +Inf.
        m.segment_uploaded(&entry(21, 21, 1, T0 + 2), Duration::from_secs(600), None);
        let p = parse(&m.render_at(T0, 0));
        assert_eq!(p.samples[&format!("{h}_bucket{{le=\"120\"}}")], 2.0);
        assert_eq!(p.samples[&format!("{h}_bucket{{le=\"+Inf\"}}")], 3.0);
    }

    #[test]
    fn the_lag_is_the_age_of_the_oldest_record_not_durable_yet() {
        let m = Metrics::new();
        let lag = |m: &Metrics, now: i64| parse(&m.render_at(now, 0)).samples["tidemark_archive_lag_seconds"];
        m.record_read(&record(1, 1, T0), Some(T0));
        m.record_read(&record(2, 1, T0 + 400_000), Some(T0));
        assert_eq!(lag(&m, T0 + 1_500_000), 1.5);
        // The first segment is durable, the second record still waits.
        m.segment_uploaded(&entry(1, 1, 1, T0), Duration::ZERO, Some(T0 + 400_000));
        assert_eq!(lag(&m, T0 + 1_500_000), 1.1);
        // A record time after now (a time marker from a clock ahead) is no negative lag.
        assert_eq!(lag(&m, T0), 0.0);
        m.segment_uploaded(&entry(2, 2, 1, T0 + 400_000), Duration::ZERO, None);
        assert_eq!(lag(&m, T0 + 9_000_000), 0.0);
        // A record without a sequence number moves nothing.
        m.record_read(&record(3, 0, T0 + 500_000), None);
        let p = parse(&m.render_at(T0 + 9_000_000, 0));
        assert_eq!(p.samples["tidemark_newest_read_sequence"], 2.0);
    }

    #[test]
    fn the_lease_counts_as_held_until_it_expires() {
        let m = Metrics::new();
        let held =
            |m: &Metrics, now: i64| parse(&m.render_at(now, 0)).samples["tidemark_lease_held"];
        m.lease_held_until(Some(time_from_micros(T0 + 60_000_000)));
        assert_eq!(held(&m, T0), 1.0);
        assert_eq!(held(&m, T0 + 60_000_000), 0.0);
        m.lease_held_until(None);
        assert_eq!(held(&m, T0), 0.0);
    }

    #[test]
    fn several_databases_render_one_family_each_with_a_label_per_database() {
        let (a, b) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
        let fleet = FleetMetrics::new(vec![
            ("orders".into(), Arc::clone(&a)),
            ("users".into(), Arc::clone(&b)),
        ]);
        a.set_phase(Phase::Running);
        a.segment_uploaded(&entry(1, 4, 2, T0), Duration::from_millis(300), None);
        b.failed("cannot read /srv/users: gone");
        let p = parse(&fleet.render_at(T0, 7));
        let v = |s: &str| *p.samples.get(s).unwrap_or_else(|| panic!("no {s}"));
        assert_eq!(
            v("tidemark_newest_durable_sequence{database=\"orders\"}"),
            4.0
        );
        assert_eq!(
            v("tidemark_newest_durable_sequence{database=\"users\"}"),
            0.0
        );
        assert_eq!(
            v("tidemark_segment_upload_duration_seconds_bucket{database=\"orders\",le=\"0.5\"}"),
            1.0
        );
        assert_eq!(
            v("tidemark_segment_upload_duration_seconds_count{database=\"users\"}"),
            0.0
        );
        // The store's retries belong to the process: one series, no label.
        assert_eq!(v("tidemark_store_retries_total"), 7.0);
        assert!(
            !p.samples
                .keys()
                .any(|k| k.starts_with("tidemark_store_retries_total{"))
        );
        assert_eq!(v("tidemark_database_up{database=\"orders\"}"), 1.0);
        assert_eq!(v("tidemark_database_up{database=\"users\"}"), 0.0);
        assert_eq!(
            v("tidemark_database_failures_total{database=\"users\"}"),
            1.0
        );
        assert_eq!(p.types.len(), 31);
        // Every other series carries the database label, once per database.
        for series in p.samples.keys() {
            if series != "tidemark_store_retries_total" {
                assert!(series.contains("database=\""), "{series}");
            }
        }
        let (healthy, body) = fleet.health();
        assert!(!healthy);
        assert_eq!(
            body,
            "unhealthy\norders: running\nusers: failed (1 failures, retrying): cannot read /srv/users: gone\n"
        );
        b.set_phase(Phase::Running);
        assert_eq!(
            fleet.health(),
            (true, "ok\norders: running\nusers: running\n".to_owned())
        );
    }

    #[test]
    fn help_and_label_values_are_escaped() {
        let m = Arc::new(Metrics::new());
        let fleet = FleetMetrics::new(vec![("a\"b\\c\nd".into(), Arc::clone(&m))]);
        let text = fleet.render_at(T0, 0);
        let p = parse(&text);
        let series = r#"tidemark_newest_read_sequence{database="a\"b\\c\nd"}"#;
        assert_eq!(p.samples.get(series), Some(&0.0), "{text}");
        // Every HELP text is one line of the exposition.
        for f in FAMILIES {
            assert!(!f.help.contains(['\n', '\\']), "{}", f.name);
            assert!(text.contains(&format!("# HELP {} {}\n", f.name, f.help)));
        }
    }

    #[test]
    fn the_address_comes_from_the_config_file_and_is_off_by_default() {
        use crate::service::ArchiverOptions;
        assert_eq!(ArchiverOptions::default().metrics_addr, None);
        let o: ArchiverOptions = toml::from_str("metrics_addr = \"127.0.0.1:9187\"").unwrap();
        assert_eq!(o.metrics_addr.as_deref(), Some("127.0.0.1:9187"));
    }
}
