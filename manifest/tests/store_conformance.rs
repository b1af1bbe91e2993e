//! One set of conformance checks, run against every object store: the local directory store
//! (in a temporary directory), the in-memory store, and a real S3 server.
//!
//! The S3 runs need a server: start one with `scripts/s3-server.sh start` and load its
//! environment with `eval "$(scripts/s3-server.sh env)"`, which sets
//! `TIDEMARK_TEST_S3_ENDPOINT` (plus credentials, and `TIDEMARK_TEST_S3_AUTH=1` when the
//! server checks signatures). Without it the S3 checks are skipped with a loud message, or
//! fail when `TIDEMARK_REQUIRE_S3=1` (as in CI). Each run creates a fresh bucket and gives
//! every check its own key prefix; against a server of your own, `TIDEMARK_TEST_S3_BUCKET`
//! names an existing bucket to use instead and `TIDEMARK_TEST_S3_PREFIX` a key prefix every
//! check's prefix goes under (README.md, "Testing").

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tidemark_manifest::store::{
    self, ETag, MemoryStore, ObjectStore, OpenOptions, PageCache, RetryPolicy, RetryStore,
    S3Options, S3Store, StoreError, StoreUrl,
};
use tidemark_manifest::testing::{self, s3 as test_s3};

const MIB: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Memory,
    S3,
}

/// A store under test plus a scratch directory for local files.
struct Fixture {
    kind: Kind,
    store: Arc<dyn ObjectStore>,
    scratch: TempDir,
    /// Keeps the local store's directory alive.
    _root: Option<TempDir>,
}

impl Fixture {
    fn scratch(&self, name: &str) -> std::path::PathBuf {
        self.scratch.path().join(name)
    }
}

/// Multipart settings for the S3 runs: 64 MiB files go up in 8 parts of 8 MiB.
fn s3_options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint_url: Some(endpoint.to_owned()),
        force_path_style: true,
        multipart_threshold: 16 * MIB as u64,
        part_size: 8 * MIB as u64,
        part_concurrency: 4,
        ..S3Options::default()
    }
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: std::time::Duration::from_millis(50),
        max_delay: std::time::Duration::from_secs(1),
    }
}

async fn local_fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let url = StoreUrl::local(root.path()).unwrap();
    let store = store::open_store_with(
        &url,
        &OpenOptions {
            retry: retry_policy(),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    Fixture {
        kind: Kind::Local,
        store,
        scratch: tempfile::tempdir().unwrap(),
        _root: Some(root),
    }
}

async fn memory_fixture() -> Fixture {
    Fixture {
        kind: Kind::Memory,
        store: Arc::new(RetryStore::new(
            Arc::new(MemoryStore::new()),
            retry_policy(),
        )),
        scratch: tempfile::tempdir().unwrap(),
        _root: None,
    }
}

/// Which server a check runs against, for the log: the server's name when
/// `scripts/s3-server.sh env` provided it, and the store's location and endpoint.
fn server(store: &dyn ObjectStore) -> String {
    match std::env::var("TIDEMARK_TEST_S3_SERVER_NAME") {
        Ok(name) if !name.is_empty() => format!("{name}: {}", store.describe()),
        _ => store.describe(),
    }
}

async fn s3_fixture(case: &str) -> Option<Fixture> {
    let endpoint = test_s3::endpoint(&format!("s3::{case}"))?;
    let bucket = test_s3::bucket(&endpoint).await.unwrap();
    let raw = S3Store::connect(&bucket, &test_s3::prefix(case), &s3_options(&endpoint))
        .await
        .unwrap();
    eprintln!("[s3::{case}] running against {}", server(&raw));
    Some(Fixture {
        kind: Kind::S3,
        store: Arc::new(RetryStore::new(Arc::new(raw), retry_policy())),
        scratch: tempfile::tempdir().unwrap(),
        _root: None,
    })
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

// ---------------------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------------------

async fn round_trip_small_objects(f: &Fixture) {
    let s = &f.store;
    let etag = s.put("dir/sub/object.json", b("{\"v\":1}")).await.unwrap();
    assert_eq!(
        &s.get("dir/sub/object.json").await.unwrap()[..],
        b"{\"v\":1}"
    );
    let (data, meta) = s.get_with_meta("dir/sub/object.json").await.unwrap();
    assert_eq!(&data[..], b"{\"v\":1}");
    assert_eq!(meta.etag, etag);
    assert_eq!(meta.size, 7);
    assert_eq!(meta.key, "dir/sub/object.json");

    // Replacing gives new contents and a new ETag.
    let etag2 = s.put("dir/sub/object.json", b("{\"v\":22}")).await.unwrap();
    assert_ne!(etag, etag2);
    assert_eq!(
        &s.get("dir/sub/object.json").await.unwrap()[..],
        b"{\"v\":22}"
    );

    // Empty objects and every byte value survive.
    s.put("empty", Bytes::new()).await.unwrap();
    assert!(s.get("empty").await.unwrap().is_empty());
    assert_eq!(s.head("empty").await.unwrap().unwrap().size, 0);
    let all: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    s.put("binary.bin", Bytes::from(all.clone())).await.unwrap();
    assert_eq!(s.get("binary.bin").await.unwrap(), all);

    // Small files through put_file / get_to_file (below the multipart threshold).
    let src = f.scratch("small.src");
    std::fs::write(&src, b"small file").unwrap();
    s.put_file("files/small", &src).await.unwrap();
    let dst = f.scratch("small.dst");
    assert_eq!(s.get_to_file("files/small", &dst).await.unwrap(), 10);
    assert_eq!(std::fs::read(&dst).unwrap(), b"small file");
}

async fn large_file_multipart_round_trip(f: &Fixture) {
    let s = &f.store;
    let len = 64 * MIB;
    let src = f.scratch("large.src");
    std::fs::write(&src, random_bytes(len, 7)).unwrap();
    let etag = s.put_file("base/backup-1/000042.sst", &src).await.unwrap();
    if f.kind == Kind::S3 {
        // A multipart ETag ends in "-<parts>": 64 MiB in 8 MiB parts.
        assert!(
            etag.as_str().trim_matches('"').ends_with("-8"),
            "expected a multipart upload of 8 parts, got ETag {etag}"
        );
    }
    let meta = s.head("base/backup-1/000042.sst").await.unwrap().unwrap();
    assert_eq!(meta.size, len as u64);
    assert_eq!(meta.etag, etag);

    let dst = f.scratch("large.dst");
    let written = s
        .get_to_file("base/backup-1/000042.sst", &dst)
        .await
        .unwrap();
    assert_eq!(written, len as u64);
    assert_eq!(sha256_file(&dst), sha256_file(&src));

    // A range across the boundary of parts 1 and 2.
    let start = 8 * MIB as u64 - 100;
    let got = s
        .get_range("base/backup-1/000042.sst", start..start + 200)
        .await
        .unwrap();
    let want = &std::fs::read(&src).unwrap()[start as usize..start as usize + 200];
    assert_eq!(&got[..], want);

    // Downloading over an existing file replaces it whole.
    std::fs::write(&dst, b"old contents").unwrap();
    s.get_to_file("base/backup-1/000042.sst", &dst)
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), len as u64);
}

async fn put_if_absent_conflict(f: &Fixture) {
    let s = &f.store;
    let etag = s.put_if_absent("lease", b("holder-a")).await.unwrap();
    let err = s.put_if_absent("lease", b("holder-b")).await.unwrap_err();
    assert!(err.is_precondition_failed(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("put_if_absent 'lease'") && msg.contains("already exists"),
        "{msg}"
    );
    let (data, meta) = s.get_with_meta("lease").await.unwrap();
    assert_eq!(&data[..], b"holder-a", "the first object must be untouched");
    assert_eq!(meta.etag, etag);
}

async fn put_if_absent_race_has_one_winner(f: &Fixture) {
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = f.store.clone();
            tokio::spawn(async move {
                let body = Bytes::from(format!("racer-{i}"));
                (i, store.put_if_absent("claims/generation-1", body).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        match result {
            Ok(_) => winners.push(i),
            Err(e) => assert!(e.is_precondition_failed(), "racer {i}: {e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one racer must win, got {winners:?}"
    );
    let stored = f.store.get("claims/generation-1").await.unwrap();
    assert_eq!(stored, format!("racer-{}", winners[0]).as_bytes());
}

async fn put_if_match_compare_and_swap(f: &Fixture) {
    let s = &f.store;
    let v1 = s.put("pointer", b("generation-1")).await.unwrap();
    let v2 = s
        .put_if_match("pointer", b("generation-2"), &v1)
        .await
        .unwrap();
    assert_ne!(v1, v2);
    assert_eq!(s.head("pointer").await.unwrap().unwrap().etag, v2);

    let err = s
        .put_if_match("pointer", b("generation-2-other"), &v1)
        .await
        .unwrap_err();
    assert!(err.is_precondition_failed(), "stale ETag must fail: {err}");
    assert!(err.to_string().contains("'pointer'"), "{err}");
    assert_eq!(&s.get("pointer").await.unwrap()[..], b"generation-2");

    let v3 = s
        .put_if_match("pointer", b("generation-3"), &v2)
        .await
        .unwrap();
    assert_ne!(v3, v2);

    let err = s
        .put_if_match("no-such-pointer", b("x"), &v3)
        .await
        .unwrap_err();
    assert!(
        err.is_not_found(),
        "put_if_match on a missing object: {err}"
    );

    let bogus = ETag::new("\"0123456789abcdef0123456789abcdef\"");
    let err = s.put_if_match("pointer", b("x"), &bogus).await.unwrap_err();
    assert!(err.is_precondition_failed(), "{err}");
}

async fn ranged_get(f: &Fixture) {
    let s = &f.store;
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    s.put("segments/000001.seg", Bytes::from(data.clone()))
        .await
        .unwrap();
    for range in [0..10u64, 990..1000, 500..501, 0..1000, 123..877] {
        let got = s
            .get_range("segments/000001.seg", range.clone())
            .await
            .unwrap();
        assert_eq!(
            &got[..],
            &data[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    assert!(
        s.get_range("segments/000001.seg", 5..5)
            .await
            .unwrap()
            .is_empty()
    );

    for range in [990..1001u64, 1000..1010, 2000..2001] {
        let err = s
            .get_range("segments/000001.seg", range.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRange { .. }),
            "{range:?}: {err}"
        );
        assert!(err.to_string().contains("000001.seg"), "{err}");
    }
    let err = s.get_range("segments/missing.seg", 0..1).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

async fn head_present_and_missing(f: &Fixture) {
    let s = &f.store;
    let etag = s.put("h/present", b("12345")).await.unwrap();
    let meta = s.head("h/present").await.unwrap().expect("present");
    assert_eq!(meta.size, 5);
    assert_eq!(meta.etag, etag);
    assert_eq!(meta.key, "h/present");
    assert!(s.head("h/missing").await.unwrap().is_none());
    assert!(
        s.head("h").await.unwrap().is_none(),
        "a 'directory' is no object"
    );
}

async fn missing_objects_are_not_found(f: &Fixture) {
    let s = &f.store;
    let err = s.get("manifest/no-such-generation").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.key(), Some("manifest/no-such-generation"));
    let msg = err.to_string();
    assert!(
        msg.starts_with("get 'manifest/no-such-generation'"),
        "message names op and key: {msg}"
    );

    let dst = f.scratch("never-created");
    let err = s.get_to_file("missing/file", &dst).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!dst.exists(), "a failed download must not leave a file");
    let leftovers = std::fs::read_dir(f.scratch.path()).unwrap().count();
    assert_eq!(
        leftovers, 0,
        "a failed download must not leave temporary files"
    );
}

async fn delete_objects(f: &Fixture) {
    let s = &f.store;
    s.put("d/victim", b("x")).await.unwrap();
    s.put("d/survivor", b("y")).await.unwrap();
    s.delete("d/victim").await.unwrap();
    assert!(s.head("d/victim").await.unwrap().is_none());
    assert!(s.get("d/victim").await.unwrap_err().is_not_found());
    s.delete("d/victim")
        .await
        .expect("deleting a missing object succeeds");
    assert_eq!(&s.get("d/survivor").await.unwrap()[..], b"y");
    // A deleted key can be created again, also create-only.
    s.put_if_absent("d/victim", b("again")).await.unwrap();
}

async fn list_with_prefix(f: &Fixture) {
    let s = &f.store;
    for (key, body) in [
        ("a/1", "one"),
        ("a/2", "two"),
        ("a/b/3", "three"),
        ("ab/4", "four"),
        ("b/5", "five"),
    ] {
        s.put(key, Bytes::from(body)).await.unwrap();
    }
    let keys = |v: Vec<store::ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(keys(s.list("a/").await.unwrap()), ["a/1", "a/2", "a/b/3"]);
    assert_eq!(
        keys(s.list("a").await.unwrap()),
        ["a/1", "a/2", "a/b/3", "ab/4"]
    );
    assert_eq!(keys(s.list("a/b").await.unwrap()), ["a/b/3"]);
    assert!(s.list("zzz/").await.unwrap().is_empty());
    let all = s.list("").await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.key.as_str()).collect::<BTreeSet<_>>(),
        BTreeSet::from(["a/1", "a/2", "a/b/3", "ab/4", "b/5"])
    );
    for meta in all {
        let head = s.head(&meta.key).await.unwrap().unwrap();
        assert_eq!(meta.size, head.size, "{}", meta.key);
        assert_eq!(meta.etag, head.etag, "{}", meta.key);
    }
}

async fn invalid_keys_are_rejected(f: &Fixture) {
    let s = &f.store;
    let src = f.scratch("src");
    std::fs::write(&src, b"x").unwrap();
    for key in [
        "",
        "/abs",
        "a//b",
        "a/",
        "a/../b",
        "./a",
        "a\\b",
        "x/.tidemark-tmp-1",
    ] {
        let check = |r: Result<(), StoreError>, op: &str| {
            let err = r.expect_err(&format!("{op} {key:?} must fail"));
            assert!(
                matches!(err, StoreError::InvalidKey { .. }),
                "{op} {key:?}: {err}"
            );
            assert!(err.to_string().contains("invalid object key"), "{err}");
        };
        check(s.put(key, b("x")).await.map(drop), "put");
        check(
            s.put_if_absent(key, b("x")).await.map(drop),
            "put_if_absent",
        );
        check(
            s.put_if_match(key, b("x"), &ETag::new("e")).await.map(drop),
            "put_if_match",
        );
        check(s.put_file(key, &src).await.map(drop), "put_file");
        check(s.get(key).await.map(drop), "get");
        check(
            s.get_to_file(key, &f.scratch("dst")).await.map(drop),
            "get_to_file",
        );
        check(s.get_range(key, 0..1).await.map(drop), "get_range");
        check(s.head(key).await.map(drop), "head");
        check(s.delete(key).await, "delete");
    }
    assert!(matches!(
        s.list("../").await.unwrap_err(),
        StoreError::InvalidKey { .. }
    ));
    assert!(matches!(
        s.list("/a").await.unwrap_err(),
        StoreError::InvalidKey { .. }
    ));
}

async fn missing_local_file_is_a_local_error(f: &Fixture) {
    let missing = f.scratch("does-not-exist");
    let err = f.store.put_file("k", &missing).await.unwrap_err();
    assert!(matches!(err, StoreError::LocalFile { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist"), "{err}");
    assert!(f.store.head("k").await.unwrap().is_none());
}

/// Downloads hashed as they are written: the digest is the sha256 of the file's bytes, for
/// an empty object and one of many body chunks; a bound one byte short is refused and
/// leaves nothing behind.
async fn hashed_downloads(f: &Fixture) {
    let s = &f.store;
    let large = random_bytes(5 * MIB + 3, 11);
    for (key, data) in [("hashed/empty", Vec::new()), ("hashed/large", large)] {
        s.put(key, Bytes::from(data.clone())).await.unwrap();
        let len = data.len() as u64;
        let dst = f.scratch("hashed.dst");
        for max in [len, len + 1, u64::MAX] {
            let got = s.get_to_file_max_hashed(key, &dst, max).await.unwrap();
            assert_eq!(got.len, len, "{key}");
            assert_eq!(got.sha256, sha256_file(&dst), "{key}");
            assert_eq!(got.sha256, hex::encode(Sha256::digest(&data)), "{key}");
        }
        std::fs::remove_file(&dst).unwrap();
        if len > 0 {
            let err = s
                .get_to_file_max_hashed(key, &dst, len - 1)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::TooLarge { limit, .. } if limit == len - 1),
                "{err}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(f.scratch.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{key}: left behind: {left:?}");
    }
    let dst = f.scratch("missing.dst");
    let err = s
        .get_to_file_max_hashed("hashed/missing", &dst, 10)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!dst.exists());
}

/// A large object downloaded hashed and uncached (a restored base file the restore does not
/// read back) is written around the page cache; downloaded hashed (a base file that is read
/// back, a file copied on) or plain (a segment, read back at once), it is left in the
/// cache. All are byte for byte the object. (The scratch directory is on the temporary
/// directory's file system, which takes direct I/O here.)
async fn large_hashed_downloads_leave_the_page_cache_alone(f: &Fixture) {
    let s = &f.store;
    let data = random_bytes(4 * MIB + 100, 12);
    s.put("uncached/large", Bytes::from(data.clone()))
        .await
        .unwrap();
    let uncached = f.scratch("uncached.dst");
    let got = s
        .get_to_file_hashed(
            "uncached/large",
            &uncached,
            data.len() as u64,
            PageCache::Around,
        )
        .await
        .unwrap();
    assert_eq!(got.sha256, hex::encode(Sha256::digest(&data)));
    let cached = testing::share_cached(&uncached);
    assert!(cached < 0.01, "uncached: {:.1} % cached", cached * 100.0);
    let hashed = f.scratch("hashed.dst");
    let got = s
        .get_to_file_max_hashed("uncached/large", &hashed, data.len() as u64)
        .await
        .unwrap();
    assert_eq!(got.sha256, hex::encode(Sha256::digest(&data)));
    let cached = testing::share_cached(&hashed);
    assert!(cached > 0.99, "hashed: {:.1} % cached", cached * 100.0);
    let plain = f.scratch("plain.dst");
    s.get_to_file_max("uncached/large", &plain, data.len() as u64)
        .await
        .unwrap();
    let cached = testing::share_cached(&plain);
    assert!(cached > 0.99, "plain: {:.1} % cached", cached * 100.0);
    for path in [uncached, hashed, plain] {
        assert!(std::fs::read(&path).unwrap() == data, "{}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_large_hashed_downloads_leave_the_page_cache_alone() {
    large_hashed_downloads_leave_the_page_cache_alone(&local_fixture().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_large_hashed_downloads_leave_the_page_cache_alone() {
    let case = "large_hashed_downloads_leave_the_page_cache_alone";
    if let Some(fixture) = s3_fixture(case).await {
        large_hashed_downloads_leave_the_page_cache_alone(&fixture).await;
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::local_fixture().await).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::memory_fixture().await).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(fixture) = super::s3_fixture(stringify!($case)).await {
                        super::$case(&fixture).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    round_trip_small_objects,
    large_file_multipart_round_trip,
    put_if_absent_conflict,
    put_if_absent_race_has_one_winner,
    put_if_match_compare_and_swap,
    ranged_get,
    head_present_and_missing,
    missing_objects_are_not_found,
    delete_objects,
    list_with_prefix,
    invalid_keys_are_rejected,
    missing_local_file_is_a_local_error,
    hashed_downloads,
);

// ---------------------------------------------------------------------------------------
// Store-specific checks.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn local_open_store_from_url() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let url = StoreUrl::parse(&format!("file://{}", root.display())).unwrap();

    let err = store::open_store(&url, &S3Options::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist") && err.contains("repo"),
        "{err}"
    );

    let created = store::open_store_with(
        &url,
        &OpenOptions {
            create_local_root: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    created.put("k", b("v")).await.unwrap();
    let reopened = store::open_store(&url, &S3Options::default())
        .await
        .unwrap();
    assert_eq!(&reopened.get("k").await.unwrap()[..], b"v");
    assert!(
        reopened.describe().starts_with("file:///"),
        "{}",
        reopened.describe()
    );
}

/// Compare-and-swap increments from several threads: none may be lost. (Run for the local
/// store only: its atomicity is Tidemark's own code, while S3 servers vary; moto, for
/// instance, does not evaluate If-Match atomically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_put_if_match_is_atomic_under_contention() {
    let f = local_fixture().await;
    f.store.put("counter", b("0")).await.unwrap();
    let (workers, increments) = (4, 15);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move {
                let mut conflicts = 0u32;
                for _ in 0..increments {
                    loop {
                        let (data, meta) = store.get_with_meta("counter").await.unwrap();
                        let n: u32 = std::str::from_utf8(&data).unwrap().parse().unwrap();
                        let next = Bytes::from((n + 1).to_string());
                        match store.put_if_match("counter", next, &meta.etag).await {
                            Ok(_) => break,
                            Err(e) if e.is_precondition_failed() => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.unwrap();
    }
    let total = f.store.get("counter").await.unwrap();
    assert_eq!(
        std::str::from_utf8(&total).unwrap(),
        (workers * increments).to_string(),
        "lost updates ({conflicts} conflicts were detected and retried)"
    );
}

#[tokio::test]
async fn s3_open_store_from_url() {
    let Some(endpoint) = test_s3::endpoint("s3::open_store_from_url") else {
        return;
    };
    let options = s3_options(&endpoint);
    let bucket = test_s3::bucket(&endpoint).await.unwrap();
    let raw = S3Store::connect(&bucket, "", &options).await.unwrap();
    let prefix = test_s3::prefix("open-store");
    let url = StoreUrl::parse(&format!("s3://{bucket}/{prefix}/")).unwrap();
    let s = store::open_store(&url, &options).await.unwrap();
    eprintln!("[s3::open_store_from_url] running against {}", server(&*s));
    assert_eq!(
        s.describe(),
        format!("s3://{bucket}/{prefix} (endpoint {endpoint}, region us-east-1)")
    );
    s.put("x/y", b("through the URL")).await.unwrap();
    // The prefix is really applied: the raw bucket view sees the object below it.
    let seen = raw.list(&format!("{prefix}/")).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].key, format!("{prefix}/x/y"));
}

#[tokio::test]
async fn s3_missing_bucket_is_reported() {
    let Some(endpoint) = test_s3::endpoint("s3::missing_bucket_is_reported") else {
        return;
    };
    let s = S3Store::connect("tidemark-no-such-bucket-4711", "p", &s3_options(&endpoint))
        .await
        .unwrap();
    eprintln!(
        "[s3::missing_bucket_is_reported] running against {}",
        server(&s)
    );
    let err = s.get("k").await.unwrap_err();
    assert!(matches!(err, StoreError::BucketNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tidemark-no-such-bucket-4711") && msg.contains(&endpoint),
        "{msg}"
    );
}

#[tokio::test]
async fn s3_wrong_credentials_are_rejected() {
    let Some(endpoint) = test_s3::endpoint("s3::wrong_credentials_are_rejected") else {
        return;
    };
    if std::env::var("TIDEMARK_TEST_S3_AUTH").as_deref() != Ok("1") {
        eprintln!(
            "!!! SKIPPED s3::wrong_credentials_are_rejected: the server at {endpoint} lacks \
             signature enforcement (TIDEMARK_TEST_S3_AUTH is not 1; scripts/s3-server.sh's \
             moto enforces it unless TIDEMARK_S3_AUTH=0, LocalStack does not)"
        );
        return;
    }
    // The run's bucket must exist so that only the credentials can be the problem.
    let bucket = test_s3::bucket(&endpoint).await.unwrap();
    let prefix = test_s3::prefix("auth");
    let good = S3Store::connect(&bucket, &prefix, &s3_options(&endpoint))
        .await
        .unwrap();
    good.put("auth/probe", b("x")).await.unwrap();

    let real_key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
    for (key_id, secret, expected_code) in [
        (
            "AKIAUNKNOWNKEY000000".to_owned(),
            "a-secret-that-must-not-leak",
            "InvalidAccessKeyId",
        ),
        (
            real_key_id,
            "a-secret-that-must-not-leak",
            "SignatureDoesNotMatch",
        ),
    ] {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(key_id, secret, None, None, "test"))
            .load()
            .await;
        let bad = S3Store::from_sdk_config(&sdk, &bucket, &prefix, &s3_options(&endpoint)).unwrap();
        eprintln!(
            "[s3::wrong_credentials_are_rejected] running against {} ({expected_code})",
            server(&bad)
        );
        for err in [
            bad.get("auth/probe").await.unwrap_err(),
            bad.put("auth/other", b("y")).await.unwrap_err(),
        ] {
            assert!(
                matches!(err, StoreError::InvalidCredentials { .. }),
                "expected InvalidCredentials ({expected_code}), got: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(expected_code),
                "names the server's answer: {msg}"
            );
            assert!(
                msg.contains("AWS_ACCESS_KEY_ID"),
                "says what to check: {msg}"
            );
            assert!(
                !msg.contains("a-secret-that-must-not-leak"),
                "leaks the secret: {msg}"
            );
        }
        // A HEAD reply has no body, so only "403" is known: some credentials problem.
        let err = bad.head("auth/probe").await.unwrap_err();
        assert!(err.is_auth(), "head with bad credentials: {err}");
        assert!(!err.to_string().contains("a-secret-that-must-not-leak"));
    }
    assert!(good.head("auth/other").await.unwrap().is_none());
}
