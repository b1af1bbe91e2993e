//! Metrics and health for monitoring: a [`Metrics`] registry the service updates as it works,
//! rendered in Prometheus' text exposition format 0.0.4, and a small HTTP/1.1 server that
//! answers `GET /metrics` and `GET /health` on the address it is given (`--metrics-addr`).
//!
//! The registry is one mutex around plain numbers. Updates are a few stores; a scrape renders
//! under the same lock, so the values of one scrape belong together: the lag is 0 exactly
//! when every sequence number read from the WAL is durable
//! (`tidemark_newest_read_sequence == tidemark_newest_durable_sequence`).
//!
//! Counters count what this process did since it started (Prometheus' `rate()` and
//! `increase()` handle restarts). Gauges about the repository (newest durable sequence and
//! record time, newest base backup, manifest generation) start from what the repository
//! held when the service started.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemark_manifest::model::{BaseSummary, SegmentEntry, micros_from_time};
use tidemark_manifest::segment::Record;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

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

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Default)]
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

#[derive(Debug, Default)]
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
    archived_bytes: u64,
    stored_bytes: u64,
    archived_records: u64,
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

    /// The metrics in the text exposition format 0.0.4, as of now.
    pub fn render(&self) -> String {
        self.render_at(now_us(), tidemark_manifest::store::retries_total())
    }

    fn render_at(&self, now_us: i64, store_retries: u64) -> String {
        let mut out = Exposition::default();
        self.write_to(&mut out, "", now_us, Some(store_retries));
        out.finish()
    }

    /// Writes this registry's samples into `out`, each series with `labels`
    /// (`database="orders"`, or none); the process-wide store retries counter only when
    /// `store_retries` is given, without labels.
    fn write_to(
        &self,
        out: &mut Exposition,
        labels: &str,
        now_us: i64,
        store_retries: Option<u64>,
    ) {
        let secs = |us: Option<i64>| us.map_or(0.0, |t| t as f64 / 1e6);
        self.with(|s| {
            out.gauge(
                "tidemark_archive_lag_seconds",
                labels,
                "Seconds since the time of the oldest record read from the WAL that is not durable \
                 in the repository yet (its time marker, or when it was read); 0 when every \
                 record read is durable.",
                s.waiting_since_us
                    .map_or(0.0, |t| now_us.saturating_sub(t).max(0) as f64 / 1e6),
            );
            out.gauge(
                "tidemark_newest_read_sequence",
                labels,
                "The last sequence number read from the WAL (0: none).",
                s.newest_read_seq as f64,
            );
            out.gauge(
                "tidemark_newest_durable_sequence",
                labels,
                "The last sequence number durable in the repository (0: none).",
                s.newest_durable_seq as f64,
            );
            out.gauge(
                "tidemark_newest_durable_record_timestamp_seconds",
                labels,
                "Time of the newest durable record, in seconds since the epoch (0: none).",
                secs(s.newest_durable_time_us),
            );
            out.gauge(
                "tidemark_last_segment_upload_timestamp_seconds",
                labels,
                "When this process last uploaded a segment, in seconds since the epoch (0: not yet).",
                secs(s.last_upload_us),
            );
            out.histogram(
                "tidemark_segment_upload_duration_seconds",
                labels,
                "Time taken to upload one segment, the store's retries included.",
                &s.upload_seconds,
            );
            out.gauge(
                "tidemark_last_base_backup_timestamp_seconds",
                labels,
                "When the newest base backup in the repository was taken, in seconds since the \
                 epoch (0: none).",
                secs(s.last_base_us),
            );
            out.gauge(
                "tidemark_last_base_backup_sequence",
                labels,
                "The newest base backup's earliest point: the last sequence number its files hold \
                 (0: none). No base is taken on schedule while nothing is written after it.",
                s.last_base_seq as f64,
            );
            out.gauge(
                "tidemark_base_backup_duration_seconds",
                labels,
                "How long the last base backup taken by this process took (0: none yet).",
                s.last_base_seconds,
            );
            out.counter(
                "tidemark_archived_bytes_total",
                labels,
                "WAL bytes (uncompressed records) in the segments this process uploaded.",
                s.archived_bytes,
            );
            out.counter(
                "tidemark_stored_bytes_total",
                labels,
                "Bytes of the segment objects this process uploaded (compressed).",
                s.stored_bytes,
            );
            out.counter(
                "tidemark_archived_records_total",
                labels,
                "WAL records in the segments this process uploaded.",
                s.archived_records,
            );
            out.counter(
                "tidemark_segments_uploaded_total",
                labels,
                "Segments this process uploaded.",
                s.segments,
            );
            out.counter(
                "tidemark_upload_failures_total",
                labels,
                "Segment uploads that failed after the store's own retries (the segment is kept \
                 and uploaded again).",
                s.upload_failures,
            );
            if let Some(n) = store_retries {
                out.counter(
                    "tidemark_store_retries_total",
                    "",
                    "Object store requests retried after a transient failure (throttling, \
                     timeouts, resets, 5xx), any request of the process.",
                    n,
                );
            }
            out.counter(
                "tidemark_gaps_detected_total",
                labels,
                "Gaps (WAL lost before it was archived, column family changes) this process \
                 detected.",
                s.gaps,
            );
            out.gauge(
                "tidemark_lease_held",
                labels,
                "1 while this process holds the repository's writer lease, else 0.",
                if s.lease_expires_us.is_some_and(|t| now_us < t) {
                    1.0
                } else {
                    0.0
                },
            );
            out.counter(
                "tidemark_base_backups_total",
                labels,
                "Base backups this process took.",
                s.bases,
            );
            out.counter(
                "tidemark_base_backup_failures_total",
                labels,
                "Base backups that failed in this process (each is tried again a minute later).",
                s.base_failures,
            );
            out.gauge(
                "tidemark_manifest_generation",
                labels,
                "The newest manifest generation written or read.",
                s.generation as f64,
            );
            out.gauge(
                "tidemark_last_prune_timestamp_seconds",
                labels,
                "When this process last applied the retention policy (0: not yet, or no policy).",
                s.last_prune_us.map_or(0.0, |t| t as f64 / 1e6),
            );
            out.counter(
                "tidemark_prune_failures_total",
                labels,
                "Times applying the retention policy failed (tried again at the next interval).",
                s.prune_failures,
            );
            out.counter(
                "tidemark_pruned_objects_total",
                labels,
                "Objects the retention policy deleted in this process.",
                s.pruned_objects,
            );
            out.counter(
                "tidemark_pruned_bytes_total",
                labels,
                "Bytes of the objects the retention policy deleted in this process.",
                s.pruned_bytes,
            );
        })
    }
}

/// What the HTTP server answers: the metrics and the health check.
pub trait Exporter: Send + Sync + 'static {
    /// `/metrics`: the text exposition format 0.0.4, as of now.
    fn render(&self) -> String;
    /// `/health`: healthy or not, and the body.
    fn health(&self) -> (bool, String);
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
        let mut out = Exposition::default();
        for (i, (name, m)) in self.databases.iter().enumerate() {
            let retries = (i == 0).then_some(store_retries);
            m.write_to(&mut out, &label("database", name), now_us, retries);
        }
        for (name, m) in &self.databases {
            let labels = label("database", name);
            let (failures, _) = m.failures();
            out.gauge(
                "tidemark_database_up",
                &labels,
                "1 while the database is being archived (lease held, following the WAL), 0 \
                 while it starts, stops, or failed and waits to be started again.",
                if m.phase() == Phase::Running {
                    1.0
                } else {
                    0.0
                },
            );
            out.counter(
                "tidemark_database_failures_total",
                &labels,
                "Times archiving the database failed (it is started again after a backoff).",
                failures,
            );
        }
        out.finish()
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

/// Builds text in the exposition format: a `# HELP` and a `# TYPE` line, then the samples of
/// each family (of every label set written into it), families in the order first written.
#[derive(Debug, Default)]
struct Exposition {
    families: Vec<Family>,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: &'static str,
    help: String,
    samples: Vec<String>,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &'static str, help: &str) -> &mut Vec<String> {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_owned(),
                    kind,
                    help: help.replace('\\', "\\\\").replace('\n', "\\n"),
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }

    fn gauge(&mut self, name: &str, labels: &str, help: &str, v: f64) {
        let line = format!("{name}{} {}", braces(labels), fmt_value(v));
        self.family(name, "gauge", help).push(line);
    }

    fn counter(&mut self, name: &str, labels: &str, help: &str, v: u64) {
        let line = format!("{name}{} {v}", braces(labels));
        self.family(name, "counter", help).push(line);
    }

    fn histogram(&mut self, name: &str, labels: &str, help: &str, h: &Histogram) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut lines = Vec::new();
        let mut cumulative = 0;
        for (bound, n) in UPLOAD_BUCKETS.iter().zip(h.counts) {
            cumulative += n;
            lines.push(format!(
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                fmt_value(*bound)
            ));
        }
        lines.push(format!(
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            h.count
        ));
        lines.push(format!("{name}_sum{} {}", braces(labels), fmt_value(h.sum)));
        lines.push(format!("{name}_count{} {}", braces(labels), h.count));
        self.family(name, "histogram", help).extend(lines);
    }

    fn finish(&self) -> String {
        let mut text = String::new();
        for f in &self.families {
            let _ = writeln!(text, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(text, "# TYPE {} {}", f.name, f.kind);
            for line in &f.samples {
                let _ = writeln!(text, "{line}");
            }
        }
        text
    }
}

/// `{labels}`, or nothing for no labels.
fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// One label pair, `name="value"`, with the value escaped as the format wants.
fn label(name: &str, value: &str) -> String {
    let value = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{name}=\"{value}\"")
}

/// A sample value as the exposition format spells it.
fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

/// The largest request head accepted (request line and headers).
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request and taken the answer in this time is closed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP server; stops accepting connections when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen, when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `addr` (`HOST:PORT`; port 0 picks a free one, logged as "metrics listening on
/// ADDR") and serves `metrics` until the returned server is dropped.
pub async fn serve<E: Exporter>(addr: &str, metrics: Arc<E>) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!("metrics listening on {local}");
    let task = tokio::spawn(accept_loop(listener, metrics));
    Ok(MetricsServer { addr: local, task })
}

async fn accept_loop<E: Exporter>(listener: TcpListener, metrics: Arc<E>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &*metrics)).await;
        });
    }
}

/// Reads one request, answers it and closes the connection.
async fn handle(mut stream: TcpStream, metrics: &dyn Exporter) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let response = loop {
        if let Some(end) = head_end(&buf) {
            break respond(&buf[..end], metrics);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            break Response::text(
                431,
                "Request Header Fields Too Large",
                "request too large\n",
            );
        }
        let room = (MAX_REQUEST_BYTES - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request arrived
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await?;
    if response.status >= 400 {
        // The client may still be sending (an oversized head, a body): read it away before
        // closing, so that the close does not reset the connection before the client has
        // read the answer.
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
    Ok(())
}

/// The length of the request head (through the blank line), once it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: headers only.
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            head_only: false,
            allow: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The answer to a request head.
fn respond(head: &[u8], metrics: &dyn Exporter) -> Response {
    let bad = || Response::text(400, "Bad Request", "bad request\n");
    let Ok(text) = std::str::from_utf8(head) else {
        return bad();
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad();
    };
    if !version.starts_with("HTTP/1.") {
        return bad();
    }
    let path = target.split('?').next().unwrap_or(target);
    let mut response = match (method, path) {
        ("GET" | "HEAD", "/metrics") => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, "OK", &metrics.render())
        },
        ("GET" | "HEAD", "/health") => match metrics.health() {
            (true, body) => Response::text(200, "OK", &body),
            (false, body) => Response::text(503, "Service Unavailable", &body),
        },
        (_, "/metrics" | "/health") => Response {
            allow: true,
            ..Response::text(405, "Method Not Allowed", "method not allowed\n")
        },
        _ => Response::text(404, "Not Found", "not found\n"),
    };
    response.head_only = method == "HEAD";
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use tidemark_manifest::model::{ObjectRef, TimeSource, time_from_micros};
    use tidemark_manifest::segment::RecordTime;

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
        BaseSummary {
            id: format!("b{earliest_seq}"),
            created_at: time_from_micros(created_us),
            descriptor: ObjectRef {
                key: format!("bases/b{earliest_seq}/base.json"),
                size: 1,
                sha256: "00".into(),
            },
            min_log_number: 1,
            replay_from_seq: 1,
            earliest_seq,
            earliest_time: time_from_micros(created_us),
            column_families: vec![],
            total_size: 0,
        }
    }

    fn entry(first_seq: u64, last_seq: u64, records: u32, last_time_us: i64) -> SegmentEntry {
        SegmentEntry {
            key: format!("wal/{first_seq}.seg"),
            first_seq,
            last_seq,
            record_count: records,
            first_time: time_from_micros(T0),
            last_time: time_from_micros(last_time_us),
            time_source: TimeSource::Observed,
            first_log: 1,
            last_log: 1,
            raw_size: 1000,
            stored_size: 300,
            sha256: None,
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
        for (name, kind) in [
            ("tidemark_archive_lag_seconds", "gauge"),
            ("tidemark_newest_read_sequence", "gauge"),
            ("tidemark_newest_durable_sequence", "gauge"),
            ("tidemark_newest_durable_record_timestamp_seconds", "gauge"),
            ("tidemark_last_segment_upload_timestamp_seconds", "gauge"),
            ("tidemark_segment_upload_duration_seconds", "histogram"),
            ("tidemark_last_base_backup_timestamp_seconds", "gauge"),
            ("tidemark_last_base_backup_sequence", "gauge"),
            ("tidemark_base_backup_duration_seconds", "gauge"),
            ("tidemark_archived_bytes_total", "counter"),
            ("tidemark_stored_bytes_total", "counter"),
            ("tidemark_archived_records_total", "counter"),
            ("tidemark_segments_uploaded_total", "counter"),
            ("tidemark_upload_failures_total", "counter"),
            ("tidemark_store_retries_total", "counter"),
            ("tidemark_gaps_detected_total", "counter"),
            ("tidemark_lease_held", "gauge"),
            ("tidemark_base_backups_total", "counter"),
            ("tidemark_base_backup_failures_total", "counter"),
            ("tidemark_manifest_generation", "gauge"),
            ("tidemark_last_prune_timestamp_seconds", "gauge"),
            ("tidemark_prune_failures_total", "counter"),
            ("tidemark_pruned_objects_total", "counter"),
            ("tidemark_pruned_bytes_total", "counter"),
        ] {
            assert_eq!(p.types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        assert_eq!(p.types.len(), 24);
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
            let n = v(&format!("{h}_bucket{{le=\"{}\"}}", fmt_value(b)));
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
        assert_eq!(p.types.len(), 26);
        // Every other series carries the database label, once per database.
        for series in p.samples.keys() {
            if series != "tidemark_store_retries_total" {
                assert!(series.contains("database=\""), "{series}");
            }
        }
        let (head, body) = request(&fleet, "GET /health HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert_eq!(
            body,
            "unhealthy\norders: running\nusers: failed (1 failures, retrying): cannot read /srv/users: gone\n"
        );
        b.set_phase(Phase::Running);
        let (head, body) = request(&fleet, "GET /health HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "ok\norders: running\nusers: running\n");
    }

    #[test]
    fn values_are_spelled_as_the_format_wants() {
        assert_eq!(fmt_value(f64::INFINITY), "+Inf");
        assert_eq!(fmt_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(fmt_value(f64::NAN), "NaN");
        assert_eq!(fmt_value(0.25), "0.25");
        assert_eq!(fmt_value(1767225600.123456), "1767225600.123456");
        let mut e = Exposition::default();
        e.gauge("x", "", "a \\ b\nc", 1.0);
        let text = e.finish();
        assert!(text.starts_with("# HELP x a \\\\ b\\nc\n"), "{text}");
        assert_eq!(label("database", "a\"b\\c\nd"), r#"database="a\"b\\c\nd""#);
    }

    fn request(m: &dyn Exporter, head: &str) -> (String, String) {
        let bytes = respond(head.as_bytes(), m).to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn routes() {
        let m = Metrics::new();
        let (head, body) = request(&m, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
        parse(&body);
        let (head, _) = request(&m, "GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        let (head, body) = request(&m, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200 ") && body.is_empty(),
            "{head}"
        );

        let (head, body) = request(&m, "GET /health HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 503 ") && body == "starting\n",
            "{head}"
        );
        m.set_phase(Phase::Running);
        let (head, body) = request(&m, "GET /health HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200 ") && body == "ok\n",
            "{head}"
        );
        m.set_phase(Phase::Stopping);
        let (head, body) = request(&m, "GET /health HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 503 ") && body == "stopping\n",
            "{head}"
        );

        let (head, _) = request(&m, "GET / HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
        let (head, _) = request(&m, "GET /metricsx HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
        let (head, _) = request(&m, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 405 ") && head.contains("Allow: GET, HEAD"));
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "x\r\n\r\n",
        ] {
            let (head, _) = request(&m, bad);
            assert!(head.starts_with("HTTP/1.1 400 "), "{bad:?}: {head}");
        }
        let (head, _) = request(&m, "GET /metrics SPDY/3\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    }

    #[test]
    fn the_request_head_ends_at_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        // The server closes the connection after its answer: reading to the end returns.
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serves_over_tcp_and_closes_after_each_answer() {
        let m = Arc::new(Metrics::new());
        m.set_phase(Phase::Running);
        let server = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let addr = server.local_addr();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        let text = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        parse(body);
        let text = exchange(addr, b"GET /health HTTP/1.1\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK") && text.ends_with("\r\n\r\nok\n"));
        // A request head that never ends within the limit is refused.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES));
        let text = exchange(addr, &big).await;
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        // Sent in pieces, a request is answered once complete.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hea").await.unwrap();
        s.flush().await.unwrap();
        s.write_all(b"lth HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        // Dropping the server stops it listening.
        drop(server);
        tokio::task::yield_now().await;
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "the listener is closed once the server is dropped");
    }

    #[test]
    fn the_address_comes_from_the_config_file_and_is_off_by_default() {
        use crate::service::ArchiverOptions;
        assert_eq!(ArchiverOptions::default().metrics_addr, None);
        let o: ArchiverOptions = toml::from_str("metrics_addr = \"127.0.0.1:9187\"").unwrap();
        assert_eq!(o.metrics_addr.as_deref(), Some("127.0.0.1:9187"));
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error() {
        let m = Arc::new(Metrics::new());
        let first = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let err = serve(&first.local_addr().to_string(), m).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }
}
