//! What `/metrics` shows: [`FAMILIES`], the one list of the metric families the archiver
//! exports, and their encoding by `prometheus-client` into Prometheus' text format 0.0.4.
//!
//! The values do not live in `prometheus-client`'s metric types (one atomic each): a scrape
//! must show the numbers of one moment, and the archive lag and the lease are computed at
//! scrape time from the clock. So a scrape copies each database's state under its lock
//! once ([`Snapshot`]), and a custom [`Collector`] encodes every family from these copies:
//! families outside, databases inside, so that several databases make one family each
//! (one `# HELP`/`# TYPE`, a series per `database` label) rather than one per database, as
//! labelled sub-registries would.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Histogram, Phase, State, UPLOAD_BUCKETS};

/// The type of a metric family, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only goes up while the process lives; its name ends in `_total`.
    Counter,
    /// Observations in buckets: `_bucket{le=".."}`, `_sum` and `_count` series.
    Histogram,
}

impl Kind {
    /// The word of the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }

    fn metric_type(self) -> MetricType {
        match self {
            Kind::Gauge => MetricType::Gauge,
            Kind::Counter => MetricType::Counter,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

/// Whose a family's series are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One series per database archived (labelled `database="NAME"` when a process
    /// archives several).
    Database,
    /// One series for the whole process, never labelled.
    Process,
    /// Only where one process archives several databases: one series per database.
    Fleet,
}

/// One metric family the archiver exports.
#[derive(Clone, Copy)]
pub struct Family {
    /// The name the samples carry (what queries and alert rules use); a counter's ends in
    /// `_total`, a histogram's samples add `_bucket`, `_sum` and `_count`.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Whose series it has.
    pub scope: Scope,
    /// Its `# HELP` text.
    pub help: &'static str,
    value: ValueFn,
}

/// How a family's value is computed.
type ValueFn = fn(&View<'_>) -> Value;

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Family {
    /// A family of one series per database.
    const fn new(name: &'static str, kind: Kind, help: &'static str, value: ValueFn) -> Family {
        Family {
            name,
            kind,
            scope: Scope::Database,
            help,
            value,
        }
    }

    const fn of(self, scope: Scope) -> Family {
        Family { scope, ..self }
    }

    /// The name given to `prometheus-client`, which adds `_total` to a counter's.
    fn base_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            Kind::Gauge | Kind::Histogram => self.name,
        }
    }
}

/// What one family's value is computed from: a database's state at `now_us`, and the
/// process's store retries.
#[derive(Debug)]
struct View<'a> {
    state: &'a State,
    now_us: i64,
    store_retries: u64,
}

/// One series' value.
#[derive(Debug)]
enum Value {
    Gauge(f64),
    /// A gauge holding a whole number (a sequence number: exact beyond 2^53).
    Whole(u64),
    Counter(u64),
    Histogram(Histogram),
}

/// Seconds since the epoch of a time in µs, 0 for none.
fn secs(us: Option<i64>) -> f64 {
    us.map_or(0.0, |t| t as f64 / 1e6)
}

/// Every metric family the archiver exports, in the order they are shown.
pub const FAMILIES: &[Family] = &[
    gauge(
        "tidemark_archive_lag_seconds",
        "Seconds since the time of the oldest record read from the WAL that is not durable \
         in the repository yet (its time marker, or when it was read); 0 when every \
         record read is durable.",
        |v| {
            Value::Gauge(
                v.state
                    .waiting_since_us
                    .map_or(0.0, |t| v.now_us.saturating_sub(t).max(0) as f64 / 1e6),
            )
        },
    ),
    gauge(
        "tidemark_newest_read_sequence",
        "The last sequence number read from the WAL (0: none).",
        |v| Value::Whole(v.state.newest_read_seq),
    ),
    gauge(
        "tidemark_newest_durable_sequence",
        "The last sequence number durable in the repository (0: none).",
        |v| Value::Whole(v.state.newest_durable_seq),
    ),
    gauge(
        "tidemark_newest_durable_record_timestamp_seconds",
        "Time of the newest durable record, in seconds since the epoch (0: none).",
        |v| Value::Gauge(secs(v.state.newest_durable_time_us)),
    ),
    gauge(
        "tidemark_last_segment_upload_timestamp_seconds",
        "When this process last uploaded a segment, in seconds since the epoch (0: not yet).",
        |v| Value::Gauge(secs(v.state.last_upload_us)),
    ),
    histogram(
        "tidemark_segment_upload_duration_seconds",
        "Time taken to upload one segment, the store's retries included.",
        |v| Value::Histogram(v.state.upload_seconds),
    ),
    gauge(
        "tidemark_last_base_backup_timestamp_seconds",
        "When the newest base backup in the repository was taken, in seconds since the \
         epoch (0: none).",
        |v| Value::Gauge(secs(v.state.last_base_us)),
    ),
    gauge(
        "tidemark_last_base_backup_sequence",
        "The newest base backup's earliest point: the last sequence number its files hold \
         (0: none). No base is taken on schedule while nothing is written after it.",
        |v| Value::Whole(v.state.last_base_seq),
    ),
    gauge(
        "tidemark_base_backup_duration_seconds",
        "How long the last base backup taken by this process took (0: none yet).",
        |v| Value::Gauge(v.state.last_base_seconds),
    ),
    gauge(
        "tidemark_wal_bytes_since_base",
        "Bytes (as stored) of the WAL segments uploaded after the newest base backup's \
         point: what max_replay bounds in bytes.",
        |v| Value::Whole(v.state.since_base_bytes),
    ),
    gauge(
        "tidemark_wal_records_since_base",
        "WAL records in the segments uploaded after the newest base backup's point: what \
         max_replay bounds in records.",
        |v| Value::Whole(v.state.since_base_records),
    ),
    gauge(
        "tidemark_predicted_restore_seconds",
        "Predicted restore time of the newest point: the newest base's files and the WAL \
         replayed onto them at the configured restore rates (0: no base yet).",
        |v| Value::Gauge(v.state.predicted_restore_secs),
    ),
    counter(
        "tidemark_archived_bytes_total",
        "WAL bytes (uncompressed records) in the segments this process uploaded.",
        |v| Value::Counter(v.state.archived_bytes),
    ),
    counter(
        "tidemark_stored_bytes_total",
        "Bytes of the segment objects this process uploaded (compressed).",
        |v| Value::Counter(v.state.stored_bytes),
    ),
    counter(
        "tidemark_archived_records_total",
        "WAL records in the segments this process uploaded.",
        |v| Value::Counter(v.state.archived_records),
    ),
    counter(
        "tidemark_wal_reads_total",
        "Times this process read the WAL (each wake-up of the follower).",
        |v| Value::Counter(v.state.wal_reads),
    ),
    counter(
        "tidemark_catch_up_bytes_total",
        "WAL bytes (uncompressed records) read while catching up with a backlog, \
         compressed at catch_up_zstd_level.",
        |v| Value::Counter(v.state.catch_up_bytes),
    ),
    counter(
        "tidemark_segments_uploaded_total",
        "Segments this process uploaded.",
        |v| Value::Counter(v.state.segments),
    ),
    counter(
        "tidemark_upload_failures_total",
        "Segment uploads that failed after the store's own retries (the segment is kept \
         and uploaded again).",
        |v| Value::Counter(v.state.upload_failures),
    ),
    counter(
        "tidemark_store_retries_total",
        "Object store requests retried after a transient failure (throttling, \
         timeouts, resets, 5xx), any request of the process.",
        |v| Value::Counter(v.store_retries),
    )
    .of(Scope::Process),
    counter(
        "tidemark_gaps_detected_total",
        "Gaps (WAL lost before it was archived, column family changes) this process \
         detected.",
        |v| Value::Counter(v.state.gaps),
    ),
    gauge(
        "tidemark_lease_held",
        "1 while this process holds the repository's writer lease, else 0.",
        |v| {
            let held = v.state.lease_expires_us.is_some_and(|t| v.now_us < t);
            Value::Whole(u64::from(held))
        },
    ),
    counter(
        "tidemark_base_backups_total",
        "Base backups this process took.",
        |v| Value::Counter(v.state.bases),
    ),
    counter(
        "tidemark_base_backup_failures_total",
        "Base backups that failed in this process (each is tried again a minute later).",
        |v| Value::Counter(v.state.base_failures),
    ),
    gauge(
        "tidemark_manifest_generation",
        "The newest manifest generation written or read.",
        |v| Value::Whole(v.state.generation),
    ),
    gauge(
        "tidemark_last_prune_timestamp_seconds",
        "When this process last applied the retention policy (0: not yet, or no policy).",
        |v| Value::Gauge(secs(v.state.last_prune_us)),
    ),
    counter(
        "tidemark_prune_failures_total",
        "Times applying the retention policy failed (tried again at the next interval).",
        |v| Value::Counter(v.state.prune_failures),
    ),
    counter(
        "tidemark_pruned_objects_total",
        "Objects the retention policy deleted in this process.",
        |v| Value::Counter(v.state.pruned_objects),
    ),
    counter(
        "tidemark_pruned_bytes_total",
        "Bytes of the objects the retention policy deleted in this process.",
        |v| Value::Counter(v.state.pruned_bytes),
    ),
    gauge(
        "tidemark_database_up",
        "1 while the database is being archived (lease held, following the WAL), 0 \
         while it starts, stops, or failed and waits to be started again.",
        |v| Value::Whole(u64::from(v.state.phase == Phase::Running)),
    )
    .of(Scope::Fleet),
    counter(
        "tidemark_database_failures_total",
        "Times archiving the database failed (it is started again after a backoff).",
        |v| Value::Counter(v.state.failures),
    )
    .of(Scope::Fleet),
];

const fn gauge(name: &'static str, help: &'static str, value: ValueFn) -> Family {
    Family::new(name, Kind::Gauge, help, value)
}

const fn counter(name: &'static str, help: &'static str, value: ValueFn) -> Family {
    Family::new(name, Kind::Counter, help, value)
}

const fn histogram(name: &'static str, help: &'static str, value: ValueFn) -> Family {
    Family::new(name, Kind::Histogram, help, value)
}

/// The state of one database as of one moment, with its name for the `database` label
/// (none: the process archives this database alone).
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) database: Option<String>,
    pub(crate) state: State,
}

/// The collector of one scrape: what it encodes was copied before, so encoding takes no lock.
#[derive(Debug)]
struct Scrape {
    databases: Vec<Snapshot>,
    /// Whether the [`Scope::Fleet`] families are shown.
    fleet: bool,
    now_us: i64,
    store_retries: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let process = State::default();
        for family in FAMILIES {
            let series: Vec<(Option<&str>, &State)> = match family.scope {
                Scope::Process => vec![(None, &process)],
                Scope::Fleet if !self.fleet => continue,
                Scope::Database | Scope::Fleet => self
                    .databases
                    .iter()
                    .map(|s| (s.database.as_deref(), &s.state))
                    .collect(),
            };
            if series.is_empty() {
                continue;
            }
            let mut metric = encoder.encode_descriptor(
                family.base_name(),
                family.help,
                None,
                family.kind.metric_type(),
            )?;
            for (database, state) in series {
                let view = View {
                    state,
                    now_us: self.now_us,
                    store_retries: self.store_retries,
                };
                let value = (family.value)(&view);
                match database {
                    None => encode_value(&mut metric, &value)?,
                    Some(name) => {
                        let labels = [("database", name)];
                        encode_value(&mut metric.encode_family(&labels)?, &value)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_value(metric: &mut MetricEncoder<'_>, value: &Value) -> Result<(), std::fmt::Error> {
    match value {
        Value::Gauge(v) => metric.encode_gauge(v),
        Value::Whole(v) => metric.encode_gauge(v),
        Value::Counter(v) => metric.encode_counter::<NoLabelSet, _, u64>(v, None),
        Value::Histogram(h) => {
            // Per-bucket counts: the encoder makes them cumulative and adds `+Inf`.
            let buckets: Vec<(f64, u64)> = UPLOAD_BUCKETS.into_iter().zip(h.counts).collect();
            metric.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
        }
    }
}

/// The text exposition of `databases` as of `now_us` (`tidemark_manifest::metrics_http::CONTENT_TYPE`); with `fleet`, the
/// [`Scope::Fleet`] families too.
pub(crate) fn render(
    databases: Vec<Snapshot>,
    fleet: bool,
    now_us: i64,
    store_retries: u64,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        databases,
        fleet,
        now_us,
        store_retries,
    }));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing into a String cannot fail");
    text
}
