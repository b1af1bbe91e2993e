//! The S3 store against servers on 127.0.0.1 that misbehave in time: one that accepts
//! connections and never answers, one that stops sending in the middle of a body, and one
//! that sends a body slowly but steadily. Small requests must fail within seconds as
//! temporary failures naming the operation and key; slow but live downloads must finish.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use bytes::Bytes;
use tidemark_manifest::store::{
    ObjectStore, RetryPolicy, RetryStore, S3Options, S3Store, StoreError, StoreOp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The small-request timeout the stores under test use.
const TIMEOUT_SECS: u64 = 1;
/// How long a single failing call may take: the timeout plus generous slack for slow CI.
const BOUND: Duration = Duration::from_secs(6);
/// Safety net: a call still running after this long would otherwise hang the test run.
const GUARD: Duration = Duration::from_secs(60);

/// An S3 store (static dummy credentials, path-style) pointed at `port` on 127.0.0.1.
fn store_at(port: u16) -> S3Store {
    let sdk = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        )))
        .build();
    S3Store::from_sdk_config(
        &sdk,
        "bucket",
        "pre",
        &S3Options {
            endpoint_url: Some(format!("http://127.0.0.1:{port}")),
            force_path_style: true,
            request_timeout_secs: TIMEOUT_SECS,
            ..S3Options::default()
        },
    )
    .unwrap()
}

/// A server that accepts connections and never answers (nor closes them).
async fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// Reads one request's head (up to the blank line) and returns it, with any body bytes
/// that came along; `None` when the connection ends first.
async fn read_request_head(socket: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            return Some((head, data[end + 4..].to_vec()));
        }
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// The Content-Length of a request head (0 when there is none).
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A server that reads each request in full, then waits `delay` before answering
/// `200 OK` with an ETag and no body.
async fn slow_answer_server(delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                while let Some((head, mut body)) = read_request_head(&mut socket).await {
                    let len = content_length(&head);
                    let mut buf = vec![0u8; 64 * 1024];
                    while body.len() < len {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let answer =
                        "HTTP/1.1 200 OK\r\nETag: \"0123abcd\"\r\nContent-Length: 0\r\n\r\n";
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A server answering every GET with a `len`-byte body of `b'x'`, sent in `chunk`-byte
/// pieces `pause` apart; after `stop_after` bytes it stops sending and holds the connection.
async fn body_server(len: usize, chunk: usize, pause: Duration, stop_after: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // One request after another on the connection, as HTTP/1.1 keep-alive wants.
                while read_request_head(&mut socket).await.is_some() {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"0123abcd\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    );
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut sent = 0;
                    while sent < len.min(stop_after) {
                        let n = chunk.min(len.min(stop_after) - sent);
                        if socket.write_all(&vec![b'x'; n]).await.is_err() {
                            return;
                        }
                        sent += n;
                        tokio::time::sleep(pause).await;
                    }
                    if sent < len {
                        // Stalled: keep the connection open without a further byte.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            });
        }
    });
    port
}

/// Runs `call`, returning its result and how long it took; panics if it runs away.
async fn timed<T>(what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = tokio::time::timeout(GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what} still running after {GUARD:?}"));
    (out, start.elapsed())
}

/// Checks a single attempt's failure: transient, quick, naming the operation and the key.
fn assert_quick_transient(
    what: &str,
    result: Result<impl std::fmt::Debug, StoreError>,
    elapsed: Duration,
    op: StoreOp,
    key: &str,
) {
    let err = result.expect_err(what);
    eprintln!("{what} failed after {elapsed:?}: {err}");
    assert!(
        elapsed < BOUND,
        "{what} took {elapsed:?}, more than {BOUND:?}: {err}"
    );
    assert!(
        matches!(err, StoreError::Transient { .. }),
        "{what}: expected a transient failure, got {err}"
    );
    assert_eq!(err.op(), Some(op), "{what}: {err}");
    assert_eq!(err.key(), Some(key), "{what}: {err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("'{key}'")), "{what}: {msg}");
    assert!(msg.contains(&op.to_string()), "{what}: {msg}");
}

#[tokio::test]
async fn small_requests_to_a_silent_server_fail_within_seconds() {
    let store = store_at(silent_server().await);
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("downloaded");

    let key = "manifests/000001.json";
    let (r, t) = timed("get", store.get(key)).await;
    assert_quick_transient("get", r, t, StoreOp::Get, key);
    let msg = store.get(key).await.unwrap_err().to_string();
    assert!(msg.contains("timed out"), "{msg}");

    let key = "segments/000001.seg";
    let (r, t) = timed("head", store.head(key)).await;
    assert_quick_transient("head", r, t, StoreOp::Head, key);

    let body = Bytes::from(vec![7u8; 20_000]);
    let (r, t) = timed("put", store.put(key, body.clone())).await;
    assert_quick_transient("put", r, t, StoreOp::Put, key);

    let (r, t) = timed("put_if_absent", store.put_if_absent("lease", body.clone())).await;
    assert_quick_transient("put_if_absent", r, t, StoreOp::PutIfAbsent, "lease");

    let (r, t) = timed("get_range", store.get_range(key, 0..128)).await;
    assert_quick_transient("get_range", r, t, StoreOp::GetRange, key);

    let (r, t) = timed("delete", store.delete(key)).await;
    assert_quick_transient("delete", r, t, StoreOp::Delete, key);

    let (r, t) = timed("list", store.list("segments/")).await;
    assert_quick_transient("list", r, t, StoreOp::List, "segments/");

    let (r, t) = timed("get_to_file", store.get_to_file(key, &dest)).await;
    assert_quick_transient("get_to_file", r, t, StoreOp::GetToFile, key);
    assert!(!dest.exists());

    let small_file = scratch.path().join("small");
    std::fs::write(&small_file, &body).unwrap();
    let (r, t) = timed("put_file", store.put_file(key, &small_file)).await;
    assert_quick_transient("put_file", r, t, StoreOp::PutFile, key);
}

#[tokio::test]
async fn retries_against_a_silent_server_end_in_retries_exhausted() {
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    };
    let store = RetryStore::new(Arc::new(store_at(silent_server().await)), policy);
    let key = "manifests/000002.json";
    let bound = BOUND + Duration::from_secs(3 * TIMEOUT_SECS);

    for (what, op) in [("get", StoreOp::Get), ("head", StoreOp::Head)] {
        let (r, t) = timed(what, async {
            match op {
                StoreOp::Get => store.get(key).await.map(|_| ()),
                _ => store.head(key).await.map(|_| ()),
            }
        })
        .await;
        let err = r.expect_err(what);
        assert!(t < bound, "{what} took {t:?}: {err}");
        let StoreError::RetriesExhausted { attempts, last, .. } = &err else {
            panic!("{what}: expected RetriesExhausted, got {err}");
        };
        assert_eq!(*attempts, 3, "{err}");
        assert!(last.is_transient(), "{err}");
        // Every attempt waited for the timeout.
        assert!(
            t >= Duration::from_secs(3 * TIMEOUT_SECS),
            "{what} took {t:?}"
        );
        assert_eq!(err.op(), Some(op));
        assert!(err.to_string().contains(&format!("'{key}'")), "{err}");
    }

    let (r, t) = timed("put", store.put(key, Bytes::from_static(b"{}"))).await;
    let err = r.expect_err("put");
    assert!(t < bound, "put took {t:?}: {err}");
    assert!(
        matches!(err, StoreError::RetriesExhausted { attempts: 3, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_download_that_stops_mid_body_fails_within_seconds() {
    // Headers and 1 KiB of a 64 KiB body, then nothing.
    let store = store_at(body_server(64 * 1024, 1024, Duration::ZERO, 1024).await);
    let key = "segments/000003.seg";

    let (r, t) = timed("get", store.get(key)).await;
    assert_quick_transient("get", r, t, StoreOp::Get, key);

    let (r, t) = timed("get_range", store.get_range(key, 0..65536)).await;
    assert_quick_transient("get_range", r, t, StoreOp::GetRange, key);

    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("downloaded");
    let (r, t) = timed("get_to_file", store.get_to_file(key, &dest)).await;
    assert_quick_transient("get_to_file", r, t, StoreOp::GetToFile, key);
    assert!(!dest.exists());
    assert_eq!(
        leftovers(scratch.path()),
        0,
        "the temporary file was not removed"
    );
}

#[tokio::test]
async fn a_download_dropped_half_way_leaves_no_temporary_file() {
    // 64 KiB in 1 KiB pieces, 100 ms apart: the temporary file exists long before the end.
    let store =
        store_at(body_server(64 * 1024, 1024, Duration::from_millis(100), usize::MAX).await);
    let key = "segments/000006.seg";
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("downloaded");
    let download = store.get_to_file(key, &dest);
    let started = async {
        while leftovers(scratch.path()) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = download => panic!("the download ended before it was dropped: {r:?}"),
        _ = tokio::time::timeout(GUARD, started) => {}
    }
    assert!(!dest.exists());
    assert_eq!(
        leftovers(scratch.path()),
        0,
        "the temporary file of the dropped download was left behind"
    );
}

#[tokio::test]
async fn a_slow_but_steady_download_is_not_cut_off() {
    // 24 KiB in 1 KiB pieces, 150 ms apart: about 3.5 s in all, several times the 1 s
    // request timeout, but never silent for long.
    let len = 24 * 1024;
    let store = store_at(body_server(len, 1024, Duration::from_millis(150), usize::MAX).await);
    let key = "segments/000004.seg";

    let (r, t) = timed("get", store.get(key)).await;
    let data = r.unwrap();
    assert_eq!(data.len(), len);
    assert!(t > Duration::from_secs(2 * TIMEOUT_SECS), "too fast: {t:?}");

    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("downloaded");
    let (r, t) = timed("get_to_file", store.get_to_file(key, &dest)).await;
    assert_eq!(r.unwrap(), len as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), vec![b'x'; len]);
    assert!(t > Duration::from_secs(2 * TIMEOUT_SECS), "too fast: {t:?}");
}

#[tokio::test]
async fn large_uploads_get_time_in_proportion_to_their_size() {
    // The server answers each upload 2 s after receiving it: too late for a small one under
    // the 1 s request timeout, in time for a large one.
    let store = store_at(slow_answer_server(Duration::from_secs(2)).await);
    let key = "segments/000005.seg";

    let (r, t) = timed("small put", store.put(key, Bytes::from(vec![1u8; 20_000]))).await;
    assert_quick_transient("small put", r, t, StoreOp::Put, key);

    let large = Bytes::from(vec![2u8; 9 * 1024 * 1024]);
    let (r, t) = timed("large put", store.put(key, large)).await;
    assert_eq!(r.unwrap().as_str(), "\"0123abcd\"");
    assert!(t >= Duration::from_secs(2), "too fast: {t:?}");
}

fn leftovers(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}
