//! The warm standby's metrics (`follow --metrics-addr`): a few numbers behind one mutex,
//! copied under the lock at each scrape (so that one scrape's values belong together, and
//! the lag is computed from the clock at that moment), encoded by `prometheus-client` into
//! the text format 0.0.4 and served by the endpoint both programs share
//! ([`tidemark_manifest::metrics_http`]): `GET /metrics` and `GET /health` (200 while
//! following).
//!
//! The archiver has its own, larger exposition; this one is kept small and beside the
//! command that fills it, because the restore tool does not depend on the archiver.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
pub use tidemark_manifest::metrics_http::{Exporter, MetricsServer, serve};
use time::OffsetDateTime;

/// The follower's numbers.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    applied_seq: u64,
    applied_time: Option<OffsetDateTime>,
    /// The time of the oldest archived record found and not applied yet; `None` when the
    /// last poll found nothing newer than the standby.
    pending_since: Option<OffsetDateTime>,
    segments: u64,
    records: u64,
    rebases: u64,
    errors: u64,
    following: bool,
    /// The batch (sequence number, column family) the standby waits at for a base that
    /// knows its column family.
    waiting_for_base: Option<(u64, u32)>,
}

/// The standby's metrics, shared by the follower (which sets them) and the server.
#[derive(Debug, Default)]
pub struct FollowMetrics {
    state: Mutex<State>,
}

impl FollowMetrics {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The standby holds `seq`, whose record has time `time`; following has started.
    pub fn set_applied(&self, seq: u64, time: OffsetDateTime) {
        self.with(|s| {
            s.applied_seq = seq;
            s.applied_time = Some(time);
            s.following = true;
        });
    }

    /// A segment of `records` records was applied.
    pub fn segment_applied(&self, records: u64) {
        self.with(|s| {
            s.segments += 1;
            s.records += records;
        });
    }

    /// A poll found archived records from `first_time` on (`None`: nothing newer).
    pub fn set_pending(&self, first_time: Option<OffsetDateTime>) {
        self.with(|s| s.pending_since = first_time);
    }

    /// The standby was re-based.
    pub fn rebased(&self) {
        self.with(|s| s.rebases += 1);
    }

    /// The standby waits at the batch `(sequence number, column family)` for a base that
    /// knows the column family (`None`: it does not wait).
    pub fn set_waiting(&self, batch: Option<(u64, u32)>) {
        self.with(|s| s.waiting_for_base = batch);
    }

    /// An error was met (logged where it happened).
    pub fn error(&self) {
        self.with(|s| s.errors += 1);
    }

    /// Following ended (stopped, promoted or failed).
    pub fn stopped(&self) {
        self.with(|s| s.following = false);
    }

    /// The metrics in Prometheus' text format, lag computed now.
    pub fn render(&self) -> String {
        let s = self.with(|s| *s);
        let now = OffsetDateTime::now_utc();
        let lag = s
            .pending_since
            .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
        let mut registry = Registry::default();
        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        let counter = |v: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            c
        };
        let lag_gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        lag_gauge.set(lag);
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        registry.register(
            "tidemark_standby_applied_sequence",
            "The last sequence number applied to the standby (committed in its origin file)",
            gauge(as_i64(s.applied_seq)),
        );
        registry.register(
            "tidemark_standby_applied_record_timestamp_seconds",
            "The time of that record (Unix seconds)",
            gauge(s.applied_time.map_or(0, |t| t.unix_timestamp())),
        );
        registry.register(
            "tidemark_standby_lag_seconds",
            "Now minus the time of the oldest archived record the follower found and has not \
             applied yet; 0 when its last poll found nothing newer",
            lag_gauge,
        );
        registry.register(
            "tidemark_standby_segments_applied",
            "Segments applied by this process",
            counter(s.segments),
        );
        registry.register(
            "tidemark_standby_records_applied",
            "WAL records (write batches) applied by this process",
            counter(s.records),
        );
        registry.register(
            "tidemark_standby_rebases",
            "Fresh standbys restored from a newer base: after a gap, for disk space or past a \
             new column family",
            counter(s.rebases),
        );
        registry.register(
            "tidemark_standby_waiting_for_base",
            "1 while the standby cannot apply a batch because it writes a column family the \
             standby does not have, and waits for a base that knows it; else 0",
            gauge(i64::from(s.waiting_for_base.is_some())),
        );
        registry.register(
            "tidemark_standby_errors",
            "Errors met while following: store failures retried at the next poll, and the \
             error that stopped the follower",
            counter(s.errors),
        );
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String does not fail");
        out
    }
}

impl Exporter for FollowMetrics {
    fn render(&self) -> String {
        FollowMetrics::render(self)
    }

    /// Healthy while following (waiting for a base too: the follower re-bases by itself
    /// once there is one, and says so).
    fn health(&self) -> (bool, String) {
        match self.with(|s| (s.following, s.waiting_for_base)) {
            (true, None) => (true, "ok\n".to_owned()),
            (true, Some((seq, cf))) => (
                true,
                format!(
                    "ok, waiting for a base that knows column family {cf} (the batch at \
                     sequence {seq} writes it)\n"
                ),
            ),
            (false, _) => (false, "not following\n".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_encoder_writes_the_content_type_the_endpoint_announces() {
        assert_eq!(
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            tidemark_manifest::metrics_http::CONTENT_TYPE
        );
    }

    /// The standby's endpoint is the shared one: it answers both paths, and says when the
    /// follower stopped.
    #[tokio::test]
    async fn the_standby_serves_its_metrics_and_health() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Arc::new(FollowMetrics::default());
        m.set_applied(42, OffsetDateTime::now_utc());
        let server = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let addr = server.local_addr();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("tidemark_standby_applied_sequence 42\n"),
            "{text}"
        );
        m.stopped();
        let text = get("/health").await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.ends_with("not following\n"), "{text}");
    }

    #[test]
    fn a_scrape_shows_the_applied_point_the_lag_and_the_counts() {
        let m = FollowMetrics::default();
        let t = OffsetDateTime::now_utc() - time::Duration::seconds(30);
        m.set_applied(42, t);
        m.segment_applied(7);
        m.rebased();
        m.error();
        let text = m.render();
        assert!(
            text.contains("tidemark_standby_applied_sequence 42\n"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_standby_records_applied_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_standby_rebases_total 1\n"),
            "{text}"
        );
        assert!(text.contains("tidemark_standby_errors_total 1\n"), "{text}");
        assert!(
            text.contains("tidemark_standby_lag_seconds 0.0\n"),
            "{text}"
        );
        m.set_pending(Some(t));
        let text = m.render();
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tidemark_standby_lag_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((29.0..60.0).contains(&lag), "{lag}");
        assert!(m.health().0);
        assert!(
            text.contains("tidemark_standby_waiting_for_base 0\n"),
            "{text}"
        );
        m.set_waiting(Some((1234, 7)));
        let text = m.render();
        assert!(
            text.contains("tidemark_standby_waiting_for_base 1\n"),
            "{text}"
        );
        let (healthy, says) = m.health();
        assert!(healthy && says.contains("column family 7"), "{says}");
        m.set_waiting(None);
        assert!(m.render().contains("tidemark_standby_waiting_for_base 0\n"));
        m.stopped();
        assert!(!m.health().0);
    }
}
