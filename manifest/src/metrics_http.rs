//! The metrics endpoint both programs serve (`--metrics-addr`), on hyper's HTTP/1.1
//! server: `GET`/`HEAD` of `/metrics` and `/health`, answered from an [`Exporter`].
//!
//! hyper parses the requests and writes the answers, malformed requests included (400; 431
//! for a request head over [`MAX_REQUEST_BYTES`]). Each connection serves one request and
//! is closed (`Connection: close`): a scrape every few seconds needs no keep-alive, and no
//! idle connection holds one of the [`MAX_CONNECTIONS`] slots.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, ALLOW};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the server answers: the metrics and the health check.
pub trait Exporter: Send + Sync + 'static {
    /// `/metrics`: Prometheus' text format 0.0.4 ([`CONTENT_TYPE`]), as of now.
    fn render(&self) -> String;
    /// `/health`: healthy or not, and the body.
    fn health(&self) -> (bool, String);
}

/// The content type of `/metrics`: Prometheus' text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The largest request head accepted (request line and headers); hyper's smallest limit.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request and taken the answer in this time is closed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP server; stops accepting connections, and closes the open ones, when dropped.
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

/// Accepts connections and serves each in a task of its own. The tasks belong to this
/// loop: when it is aborted, dropping the set aborts them.
async fn accept_loop<E: Exporter>(listener: TcpListener, metrics: Arc<E>) {
    let mut connections = JoinSet::new();
    loop {
        if connections.len() >= MAX_CONNECTIONS {
            connections.join_next().await;
            continue;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        match accepted {
            Ok((stream, _)) => {
                let metrics = Arc::clone(&metrics);
                connections.spawn(async move {
                    let served =
                        tokio::time::timeout(CONNECTION_TIMEOUT, connection(stream, metrics));
                    if let Ok(Err(e)) = served.await {
                        tracing::debug!(error = %e, "metrics: connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Serves the one request of a connection.
async fn connection<E: Exporter>(stream: TcpStream, metrics: Arc<E>) -> hyper::Result<()> {
    let service = service_fn(|request: Request<hyper::body::Incoming>| {
        let response = respond(request.method(), request.uri().path(), &*metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// The answer to `method` on `path` (the query string is ignored). hyper leaves out the
/// body of the answer to a `HEAD`.
fn respond<E: Exporter + ?Sized>(method: &Method, path: &str, metrics: &E) -> Response<String> {
    let readable = *method == Method::GET || *method == Method::HEAD;
    match path {
        "/metrics" if readable => answer(StatusCode::OK, CONTENT_TYPE, metrics.render()),
        "/health" if readable => {
            let (healthy, body) = metrics.health();
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            answer(status, TEXT, body)
        }
        "/metrics" | "/health" => {
            let mut response = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "method not allowed\n".into(),
            );
            let allow = hyper::header::HeaderValue::from_static("GET, HEAD");
            response.headers_mut().insert(ALLOW, allow);
            response
        }
        _ => answer(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let value = hyper::header::HeaderValue::from_static(content_type);
    response.headers_mut().insert(header::CONTENT_TYPE, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An exporter whose health is switched by the test.
    #[derive(Default)]
    struct Fake {
        healthy: AtomicBool,
    }

    impl Exporter for Fake {
        fn render(&self) -> String {
            "# TYPE fake_total counter\nfake_total 1\n".to_owned()
        }

        fn health(&self) -> (bool, String) {
            if self.healthy.load(Ordering::SeqCst) {
                (true, "ok\n".to_owned())
            } else {
                (false, "starting\n".to_owned())
            }
        }
    }

    /// Sends `request` as it is and reads the answer to the end (the server closes the
    /// connection after it): the status code, the head, the body.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
        let status = status.unwrap_or_else(|| panic!("no status in {text:?}"));
        (status, head.to_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn routes() {
        let m = Arc::new(Fake::default());
        let server = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let addr = server.local_addr();
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");

        let (status, head, body) = exchange(addr, get("/metrics").as_bytes()).await;
        assert_eq!(status, 200, "{head}");
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body, m.render());
        let (status, _, body) = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
        assert!(status == 200 && body.contains("fake_total 1\n"));
        let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(status == 200 && body.is_empty(), "{head}");

        let (status, _, body) = exchange(addr, get("/health").as_bytes()).await;
        assert_eq!((status, body.as_str()), (503, "starting\n"));
        m.healthy.store(true, Ordering::SeqCst);
        let (status, _, body) = exchange(addr, get("/health").as_bytes()).await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        m.healthy.store(false, Ordering::SeqCst);
        let (status, _, body) = exchange(addr, get("/health").as_bytes()).await;
        assert_eq!((status, body.as_str()), (503, "starting\n"));

        assert_eq!(exchange(addr, get("/").as_bytes()).await.0, 404);
        assert_eq!(exchange(addr, get("/metricsx").as_bytes()).await.0, 404);
        let (status, head, _) = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(status == 405 && head.contains("allow: get, head"), "{head}");
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "x\r\n\r\n",
            "GET /metrics SPDY/3\r\n\r\n",
        ] {
            let (status, head, _) = exchange(addr, bad.as_bytes()).await;
            assert_eq!(status, 400, "{bad:?}: {head}");
        }
    }

    #[tokio::test]
    async fn serves_over_tcp_and_closes_after_each_answer() {
        let m = Arc::new(Fake::default());
        m.healthy.store(true, Ordering::SeqCst);
        let server = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let addr = server.local_addr();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        // The client asks to keep the connection: the server closes it all the same, so
        // reading to the end returns.
        let keep = b"GET /health HTTP/1.1\r\nConnection: keep-alive\r\n\r\n";
        let (status, _, body) = exchange(addr, keep).await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        // A request head that does not end within the limit is refused.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_BYTES, b'a');
        let (status, head, _) = exchange(addr, &big).await;
        assert_eq!(status, 431, "{head}");
        // Sent in pieces, a request is answered once complete.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hea").await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(b"lth HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        // More connections than are served at once all get their answer.
        let answers = (0..3 * MAX_CONNECTIONS).map(|_| exchange(addr, keep));
        for (status, _, _) in futures::future::join_all(answers).await {
            assert_eq!(status, 200);
        }
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

    #[tokio::test]
    async fn dropping_the_server_closes_the_connections_it_serves() {
        let server = serve("127.0.0.1:0", Arc::new(Fake::default()))
            .await
            .unwrap();
        // A client that sends half a request and waits.
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(b"GET /hea").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(server);
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection is closed with the server");
        assert!(out.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error() {
        let m = Arc::new(Fake::default());
        let first = serve("127.0.0.1:0", Arc::clone(&m)).await.unwrap();
        let err = serve(&first.local_addr().to_string(), m).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }
}
