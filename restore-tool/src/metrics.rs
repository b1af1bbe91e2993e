//! The warm standby's metrics (`follow --metrics-addr`): a few numbers behind one mutex,
//! copied under the lock at each scrape (so that one scrape's values belong together, and
//! the lag is computed from the clock at that moment), encoded by `prometheus-client` into
//! the text format 0.0.4 and served by hyper's HTTP/1 server, one request per connection:
//! `GET /metrics` and `GET /health` (200 while following).
//!
//! The archiver has its own, larger exposition; this one is kept small and beside the
//! command that fills it, using the same crates, because the restore tool does not depend
//! on the archiver.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A connection that has not sent its request and taken the answer in this time is closed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

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
            "Fresh standbys restored from a newer base after a gap",
            counter(s.rebases),
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

    fn health(&self) -> (bool, &'static str) {
        if self.with(|s| s.following) {
            (true, "ok\n")
        } else {
            (false, "not following\n")
        }
    }
}

/// The metrics server; it stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on.
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
/// ADDR") and serves `metrics` until the server is dropped.
pub async fn serve(addr: &str, metrics: Arc<FollowMetrics>) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!("metrics listening on {local}");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| {
                    let response = respond(request.method(), request.uri().path(), &metrics);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok(MetricsServer { addr: local, task })
}

fn respond(method: &Method, path: &str, metrics: &FollowMetrics) -> Response<String> {
    let readable = *method == Method::GET || *method == Method::HEAD;
    let (status, content_type, body) = match path {
        "/metrics" if readable => (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            metrics.render(),
        ),
        "/health" if readable => {
            let (healthy, body) = metrics.health();
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, TEXT, body.to_owned())
        }
        "/metrics" | "/health" => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_owned()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

const TEXT: &str = "text/plain; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

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
        m.stopped();
        assert!(!m.health().0);
    }
}
