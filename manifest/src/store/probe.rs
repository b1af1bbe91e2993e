//! Probes a store for what Tidemark relies on (docs/operations.md, "Checking a store").
//!
//! Tidemark's safety rests on a few store behaviours that S3-compatible servers do not all
//! have: an atomic `If-None-Match: *` create (the lease, manifest generations and segments
//! are create-only, and of two writers exactly one must win), `If-Match` compare-and-swap
//! (the lease), range reads and multipart uploads. Others only harden it: servers that
//! check the checksums and signatures of requests, and a clock close to ours.
//!
//! - [`check_conditional_writes`] is the cheap part the archiver runs at start: a
//!   create-only write repeated, a race of a few create-only writers, and a compare-and-swap.
//! - [`check_store`] runs everything on the store a URL names and is what
//!   `tidemark-archiver check-store` prints.
//!
//! Probe objects live under [`keys::PROBE_PREFIX`]`<run>/` (FORMAT.md §2), one run
//! directory per probe, and are deleted before the probe returns, whatever it found. A run
//! directory left behind by a crash is deleted by the next [`check_store`] once it is an
//! hour old; until then a sweep names it as foreign and leaves it.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError as SdkBoxError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;

use super::{LocalStore, ObjectStore, S3Options, S3Store, StoreError, StoreResult, StoreUrl};
use crate::keys;

/// How many writers race for one key in [`check_store`].
pub const FULL_RACERS: usize = 16;
/// How many writers race for one key in the archiver's start-up check.
pub const START_RACERS: usize = 4;
/// Probe run directories older than this are leftovers of a crash.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);
/// A clock further off than this is reported.
const MAX_SKEW: Duration = Duration::from_secs(5);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The store behaves as Tidemark needs.
    Ok,
    /// Tidemark works, with less protection (the detail says what is missing).
    Warn,
    /// The store breaks a behaviour Tidemark's safety rests on.
    Unsafe,
    /// Not a question for this kind of store.
    NotApplicable,
    /// The check could not be completed (the detail says why): nothing is known.
    Error,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Unsafe => "UNSAFE",
            Status::NotApplicable => "n/a",
            Status::Error => "ERROR",
        })
    }
}

/// One row of a [`ProbeReport`].
#[derive(Debug, Clone, Serialize)]
pub struct ProbeCheck {
    /// What was checked, e.g. `create-only race`.
    pub name: &'static str,
    pub status: Status,
    /// What was seen, in a sentence.
    pub detail: String,
}

/// What a probe found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The store, as [`ObjectStore::describe`] says it.
    pub store: String,
    pub checks: Vec<ProbeCheck>,
}

impl ProbeReport {
    /// The checks of conditional writes that failed: the store is unsafe for a writer.
    pub fn unsafe_checks(&self) -> impl Iterator<Item = &ProbeCheck> {
        self.checks.iter().filter(|c| c.status == Status::Unsafe)
    }

    /// The checks that could not be completed.
    pub fn errors(&self) -> impl Iterator<Item = &ProbeCheck> {
        self.checks.iter().filter(|c| c.status == Status::Error)
    }

    fn push(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(ProbeCheck {
            name,
            status,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store: {}", self.store)?;
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(5);
        writeln!(f, "{:width$}  {:6}  detail", "check", "result")?;
        for c in &self.checks {
            writeln!(
                f,
                "{:width$}  {:6}  {}",
                c.name,
                c.status.to_string(),
                c.detail
            )?;
        }
        Ok(())
    }
}

/// One probe's objects: `probe/<run>/…`, removed by [`ProbeRun::clean_up`].
struct ProbeRun {
    dir: String,
    written: Mutex<Vec<String>>,
}

impl ProbeRun {
    fn new() -> ProbeRun {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ProbeRun {
            dir: format!(
                "{}{secs:016x}-{:08x}/",
                keys::PROBE_PREFIX,
                rand::random::<u32>()
            ),
            written: Mutex::new(Vec::new()),
        }
    }

    /// A key of this run, remembered for the clean-up.
    fn key(&self, name: &str) -> String {
        let key = format!("{}{name}", self.dir);
        self.written.lock().expect("not poisoned").push(key.clone());
        key
    }

    /// Deletes what this run wrote (and whatever else lies in its directory). Failures are
    /// logged: they leave a leftover, not a wrong answer.
    async fn clean_up(&self, store: &dyn ObjectStore) {
        let mut keys = self.written.lock().expect("not poisoned").clone();
        match store.list(&self.dir).await {
            Ok(listed) => keys.extend(listed.into_iter().map(|m| m.key)),
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir, "cannot list the probe's objects")
            }
        }
        keys.sort();
        keys.dedup();
        for key in keys {
            if let Err(e) = store.delete(&key).await {
                tracing::warn!(error = %e, key = %key, "cannot delete a probe object; delete it by hand");
            }
        }
    }
}

/// The cheap check of conditional writes, on the store a repository lives in: a
/// create-only write repeated, `racers` create-only writers racing for one key, and a
/// compare-and-swap. Its objects are deleted before it returns.
///
/// Fails only when the store cannot be written at all (the first create-only write); any
/// later failure is a row of the report with [`Status::Error`].
pub async fn check_conditional_writes(
    store: &dyn ObjectStore,
    racers: usize,
) -> StoreResult<ProbeReport> {
    let run = ProbeRun::new();
    let mut report = ProbeReport {
        store: store.describe(),
        checks: Vec::new(),
    };
    let result = conditional_checks(store, &run, racers, &mut report).await;
    run.clean_up(store).await;
    result.map(|()| report)
}

async fn conditional_checks(
    store: &dyn ObjectStore,
    run: &ProbeRun,
    racers: usize,
    report: &mut ProbeReport,
) -> StoreResult<()> {
    create_only(store, run, report).await?;
    create_race(store, run, racers.max(2), report).await;
    compare_and_swap(store, run, report).await;
    Ok(())
}

/// Everything, on the store `url` names (not created if it does not exist): the
/// conditional writes with [`FULL_RACERS`] racers, listing, range reads, and on S3
/// multipart uploads, checksums, signatures and the server's clock. Leftovers of crashed
/// probes (run directories over an hour old) are deleted too.
pub async fn check_store(url: &StoreUrl, s3: &S3Options) -> StoreResult<ProbeReport> {
    let (store, s3_store): (Arc<dyn ObjectStore>, Option<S3Store>) = match url {
        StoreUrl::Local { root } => (Arc::new(LocalStore::open(root)?), None),
        StoreUrl::S3 { bucket, prefix } => {
            let s = S3Store::connect(bucket, prefix, s3).await?;
            (Arc::new(s.clone()), Some(s))
        }
    };
    let run = ProbeRun::new();
    let mut report = ProbeReport {
        store: store.describe(),
        checks: Vec::new(),
    };
    let result = full_checks(store.as_ref(), s3_store.as_ref(), &run, &mut report).await;
    run.clean_up(store.as_ref()).await;
    result?;
    remove_leftovers(store.as_ref(), &run.dir).await;
    Ok(report)
}

async fn full_checks(
    store: &dyn ObjectStore,
    s3: Option<&S3Store>,
    run: &ProbeRun,
    report: &mut ProbeReport,
) -> StoreResult<()> {
    conditional_checks(store, run, FULL_RACERS, report).await?;
    listing(store, run, report).await;
    range_read(store, run, report).await;
    match s3 {
        Some(s3) => {
            multipart(s3, run, report).await;
            checksums(s3, run, report).await;
            signatures(s3, run, report).await;
            clock(s3, run, report).await;
        }
        None => {
            let local = "a local directory";
            report.push(
                "multipart upload",
                Status::NotApplicable,
                format!("{local}: files are written whole, synced and renamed into place"),
            );
            report.push(
                "checksums checked",
                Status::NotApplicable,
                format!("{local}: no transfer to check"),
            );
            report.push(
                "signatures checked",
                Status::NotApplicable,
                format!("{local}: access is the file system's permissions"),
            );
            report.push(
                "clock skew",
                Status::NotApplicable,
                format!("{local}: no other clock"),
            );
        }
    }
    Ok(())
}

/// A create-only write, then the same again: the second must be refused.
async fn create_only(
    store: &dyn ObjectStore,
    run: &ProbeRun,
    report: &mut ProbeReport,
) -> StoreResult<()> {
    const NAME: &str = "create-only write (If-None-Match: *)";
    let key = run.key("create-only");
    store
        .put_if_absent(&key, Bytes::from_static(b"first"))
        .await?;
    match store
        .put_if_absent(&key, Bytes::from_static(b"second"))
        .await
    {
        Err(StoreError::PreconditionFailed { .. }) => match store.get(&key).await {
            Ok(b) if b.as_ref() == b"first" => report.push(
                NAME,
                Status::Ok,
                "a second create-only write of the same key was refused",
            ),
            Ok(_) => report.push(
                NAME,
                Status::Unsafe,
                "a second create-only write was refused, yet the object changed",
            ),
            Err(e) => report.push(NAME, Status::Error, format!("reading it back: {e}")),
        },
        Ok(_) => report.push(
            NAME,
            Status::Unsafe,
            "a second create-only write of the same key replaced the object: the store \
             ignores If-None-Match",
        ),
        Err(e) => report.push(NAME, Status::Error, e.to_string()),
    }
    Ok(())
}

/// `racers` create-only writes of one key at once: exactly one may succeed, and the object
/// must hold its bytes.
async fn create_race(store: &dyn ObjectStore, run: &ProbeRun, racers: usize, r: &mut ProbeReport) {
    const NAME: &str = "create-only race";
    let key = run.key("race");
    let bodies: Vec<Bytes> = (0..racers)
        .map(|i| Bytes::from(format!("racer {i} of {racers}")))
        .collect();
    let results = join_all(bodies.iter().map(|b| store.put_if_absent(&key, b.clone()))).await;
    let winners: Vec<usize> = (0..racers).filter(|&i| results[i].is_ok()).collect();
    let refused = results
        .iter()
        .filter(|res| matches!(res, Err(StoreError::PreconditionFailed { .. })))
        .count();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|res| match res {
            Ok(_) | Err(StoreError::PreconditionFailed { .. }) => None,
            Err(e) => Some(e.to_string()),
        })
        .collect();
    let seen = format!(
        "{} of {racers} racers won, {refused} were refused, {} failed",
        winners.len(),
        failed.len()
    );
    if winners.len() > 1 {
        r.push(
            NAME,
            Status::Unsafe,
            format!("{seen}: the store does not apply If-None-Match atomically"),
        );
        return;
    }
    if let Some(e) = failed.first() {
        r.push(NAME, Status::Error, format!("{seen}; first failure: {e}"));
        return;
    }
    let &[winner] = winners.as_slice() else {
        r.push(NAME, Status::Error, format!("{seen}: nobody won"));
        return;
    };
    match store.get(&key).await {
        Ok(b) if b == bodies[winner] => r.push(NAME, Status::Ok, seen),
        Ok(_) => r.push(
            NAME,
            Status::Unsafe,
            format!("{seen}, but the object holds another racer's bytes"),
        ),
        Err(e) => r.push(NAME, Status::Error, format!("{seen}; reading it back: {e}")),
    }
}

/// A write with the current ETag must succeed, one with a stale ETag must be refused.
async fn compare_and_swap(store: &dyn ObjectStore, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "compare-and-swap (If-Match)";
    let key = run.key("cas");
    let step = async {
        let first = store.put(&key, Bytes::from_static(b"v1")).await?;
        let second = match store
            .put_if_match(&key, Bytes::from_static(b"v2"), &first)
            .await
        {
            Ok(etag) => etag,
            Err(StoreError::PreconditionFailed { .. }) => {
                return Ok((
                    Status::Unsafe,
                    "a write with the object's current ETag was refused".to_owned(),
                ));
            }
            Err(e) => return Err(e),
        };
        if second == first {
            return Ok((
                Status::Unsafe,
                "replacing the object did not change its ETag".to_owned(),
            ));
        }
        match store
            .put_if_match(&key, Bytes::from_static(b"v3"), &first)
            .await
        {
            Err(StoreError::PreconditionFailed { .. }) => {}
            Ok(_) => {
                return Ok((
                    Status::Unsafe,
                    "a write with a stale ETag replaced the object: the store ignores If-Match"
                        .to_owned(),
                ));
            }
            Err(e) => return Err(e),
        }
        Ok(match store.get(&key).await?.as_ref() {
            b"v2" => (
                Status::Ok,
                "the current ETag was accepted, a stale one refused".to_owned(),
            ),
            _ => (
                Status::Unsafe,
                "a stale ETag was refused, yet the object changed".to_owned(),
            ),
        })
    };
    match step.await {
        Ok((status, detail)) => r.push(NAME, status, detail),
        Err(e) => r.push(NAME, Status::Error, e.to_string()),
    }
}

/// The probe's own objects are listed, in key order.
async fn listing(store: &dyn ObjectStore, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "listing";
    let names = ["list/a", "list/b", "list/c"];
    let mut expected = Vec::new();
    for name in names {
        let key = run.key(name);
        if let Err(e) = store.put(&key, Bytes::from_static(b"x")).await {
            r.push(NAME, Status::Error, e.to_string());
            return;
        }
        expected.push(key);
    }
    match store.list(&format!("{}list/", run.dir)).await {
        Ok(listed) => {
            let got: Vec<String> = listed.into_iter().map(|m| m.key).collect();
            if got == expected {
                r.push(NAME, Status::Ok, "3 objects listed, in key order");
            } else {
                r.push(
                    NAME,
                    Status::Unsafe,
                    format!("listed {got:?}, expected {expected:?}"),
                );
            }
        }
        Err(e) => r.push(NAME, Status::Error, e.to_string()),
    }
}

/// Bytes `range` of `data`, as the store returns them, compared.
async fn range_matches(
    store: &dyn ObjectStore,
    key: &str,
    data: &[u8],
    range: Range<u64>,
) -> StoreResult<bool> {
    let got = store.get_range(key, range.clone()).await?;
    Ok(got.as_ref() == &data[range.start as usize..range.end as usize])
}

/// Range reads return exactly the bytes asked for.
async fn range_read(store: &dyn ObjectStore, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "range read";
    let key = run.key("range");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let step = async {
        store.put(&key, Bytes::from(data.clone())).await?;
        for range in [0..1, 1000..1100, 4000..4096] {
            if !range_matches(store, &key, &data, range.clone()).await? {
                return Ok((
                    Status::Unsafe,
                    format!("bytes {range:?} of a 4096-byte object came back wrong"),
                ));
            }
        }
        Ok::<_, StoreError>((Status::Ok, "3 ranges of a 4096-byte object".to_owned()))
    };
    match step.await {
        Ok((status, detail)) => r.push(NAME, status, detail),
        Err(e) => r.push(NAME, Status::Error, e.to_string()),
    }
}

/// Tidemark's own multipart upload (parts with CRC32 checksums), read back whole and across
/// a part boundary.
async fn multipart(s3: &S3Store, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "multipart upload";
    const PART: u64 = 5 << 20;
    let key = run.key("multipart");
    let step = async {
        let store = s3.with_multipart(PART, PART)?;
        let len = 2 * PART + 4099;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let dir = tempfile_dir()?;
        let path = dir.path().join("multipart.probe");
        std::fs::write(&path, &data)
            .map_err(|e| StoreError::config(format!("cannot write {}: {e}", path.display())))?;
        store.put_file(&key, &path).await?;
        let whole = store.get(&key).await?;
        if whole.as_ref() != data.as_slice() {
            return Ok((
                Status::Unsafe,
                format!(
                    "a {len}-byte object uploaded in 3 parts came back as {} other bytes",
                    whole.len()
                ),
            ));
        }
        if !range_matches(&store, &key, &data, PART - 10..PART + 10).await? {
            return Ok((
                Status::Unsafe,
                "a range across a part boundary came back wrong".to_owned(),
            ));
        }
        Ok::<_, StoreError>((
            Status::Ok,
            format!(
                "{len} bytes in 3 parts with CRC32 checksums, read back whole and across a part boundary"
            ),
        ))
    };
    match step.await {
        Ok((status, detail)) => r.push(NAME, status, detail),
        Err(e) => r.push(NAME, Status::Error, e.to_string()),
    }
}

fn tempfile_dir() -> StoreResult<TempDir> {
    TempDir::new()
}

/// A temporary directory, removed on drop (the probe's multipart file).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> StoreResult<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "tidemark-probe-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&path).map_err(|e| {
            StoreError::config(format!(
                "cannot create a temporary directory {}: {e}",
                path.display()
            ))
        })?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A PUT whose body does not match its CRC32 header should be rejected.
async fn checksums(s3: &S3Store, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "checksums checked";
    let key = run.key("bad-checksum");
    let result = s3
        .client()
        .put_object()
        .bucket(s3.bucket())
        .key(s3.full_key(&key))
        .body(ByteStream::from_static(
            b"these bytes do not have that CRC32",
        ))
        // CRC32 of nothing: certainly not of the body.
        .checksum_crc32("AAAAAA==")
        .send()
        .await;
    match rejected(result) {
        Ok(None) => r.push(
            NAME,
            Status::Warn,
            "a body that does not match its x-amz-checksum-crc32 was stored: damage in transit \
             is not caught at upload (a restore still verifies every object's own checksum)",
        ),
        Ok(Some(code)) => r.push(
            NAME,
            Status::Ok,
            format!("a body that does not match its CRC32 was rejected ({code})"),
        ),
        Err(e) => r.push(NAME, Status::Error, e),
    }
}

/// A request signed with the right key id and a wrong secret should be rejected.
async fn signatures(s3: &S3Store, run: &ProbeRun, r: &mut ProbeReport) {
    use aws_credential_types::provider::ProvideCredentials;
    const NAME: &str = "signatures checked";
    let key = run.key("create-only");
    let config = s3.client().config();
    // The same chain S3Store::connect loads its credentials from.
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let Some(provider) = sdk.credentials_provider() else {
        r.push(
            NAME,
            Status::NotApplicable,
            "no credentials are configured (anonymous access)",
        );
        return;
    };
    let creds = match provider.provide_credentials().await {
        Ok(c) => c,
        Err(e) => {
            r.push(NAME, Status::Error, format!("cannot load credentials: {e}"));
            return;
        }
    };
    let wrong = aws_credential_types::Credentials::new(
        creds.access_key_id(),
        format!("{}-wrong", creds.secret_access_key()),
        creds.session_token().map(str::to_owned),
        None,
        "tidemark-probe",
    );
    let client =
        aws_sdk_s3::Client::from_conf(config.to_builder().credentials_provider(wrong).build());
    let result = client
        .get_object()
        .bucket(s3.bucket())
        .key(s3.full_key(&key))
        .send()
        .await;
    match rejected(result) {
        Ok(None) => r.push(
            NAME,
            Status::Warn,
            "a request signed with a wrong secret was served: the server does not check \
             signatures, so anyone who reaches it can read and write",
        ),
        Ok(Some(code)) => r.push(
            NAME,
            Status::Ok,
            format!("a request signed with a wrong secret was rejected ({code})"),
        ),
        Err(e) => r.push(NAME, Status::Error, e),
    }
}

/// `Ok(None)` when the server accepted the request, `Ok(Some(code))` when it answered with
/// an error, `Err` when no answer came.
fn rejected<T, E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static>(
    result: Result<T, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
) -> Result<Option<String>, String> {
    use aws_sdk_s3::error::SdkError;
    match result {
        Ok(_) => Ok(None),
        Err(SdkError::ServiceError(ctx)) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("no error code").to_owned();
            Ok(Some(format!("HTTP {status} {code}")))
        }
        Err(e) => Err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()),
    }
}

/// Keeps the `Date` header of a response.
#[derive(Debug, Clone, Default)]
struct DateHeader(Arc<Mutex<Option<String>>>);

impl Intercept for DateHeader {
    fn name(&self) -> &'static str {
        "tidemark-probe-date"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), SdkBoxError> {
        if let Some(date) = context.response().headers().get("date") {
            *self.0.lock().expect("not poisoned") = Some(date.to_owned());
        }
        Ok(())
    }
}

/// The server's `Date` header against our clock.
async fn clock(s3: &S3Store, run: &ProbeRun, r: &mut ProbeReport) {
    const NAME: &str = "clock skew";
    let key = run.key("create-only");
    let date = DateHeader::default();
    let before = SystemTime::now();
    let result = s3
        .client()
        .head_object()
        .bucket(s3.bucket())
        .key(s3.full_key(&key))
        .customize()
        .interceptor(date.clone())
        .send()
        .await;
    let after = SystemTime::now();
    let header = date.0.lock().expect("not poisoned").clone();
    let Some(header) = header else {
        let why = match result {
            Ok(_) => "the server sent no Date header".to_owned(),
            Err(e) => aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
        };
        r.push(NAME, Status::Error, why);
        return;
    };
    let server = match aws_smithy_types::DateTime::from_str(
        &header,
        aws_smithy_types::date_time::Format::HttpDate,
    ) {
        Ok(t) => t.as_secs_f64(),
        Err(e) => {
            r.push(
                NAME,
                Status::Error,
                format!("cannot read the Date header {header:?}: {e}"),
            );
            return;
        }
    };
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    // The header has whole seconds: the server's time lay in [date, date + 1).
    let skew = server + 0.5 - (secs(before) + secs(after)) / 2.0;
    let round_trip = secs(after) - secs(before);
    let seen = format!(
        "the server's clock is {:.1} s {} ours (±{:.1} s)",
        skew.abs(),
        if skew >= 0.0 { "ahead of" } else { "behind" },
        0.5 + round_trip / 2.0
    );
    if skew.abs() <= MAX_SKEW.as_secs_f64() {
        r.push(NAME, Status::Ok, seen);
    } else {
        r.push(
            NAME,
            Status::Warn,
            format!(
                "{seen}: keep clocks within {} s (NTP); lease expiry and restore times \
                 compare clocks of different hosts, and AWS refuses requests 15 minutes off",
                MAX_SKEW.as_secs()
            ),
        );
    }
}

/// Deletes the run directories of earlier probes that are over an hour old (a crash left
/// them). `own` is this probe's directory, kept out.
async fn remove_leftovers(store: &dyn ObjectStore, own: &str) {
    let listed = match store.list(keys::PROBE_PREFIX).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list earlier probes' leftovers");
            return;
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for meta in listed {
        if meta.key.starts_with(own) {
            continue;
        }
        let written = meta
            .key
            .strip_prefix(keys::PROBE_PREFIX)
            .and_then(|rest| rest.get(..16))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        let old = written.is_some_and(|t| now.saturating_sub(t) > LEFTOVER_AGE.as_secs());
        if old {
            tracing::info!(key = %meta.key, "deleting an earlier probe's leftover");
            if let Err(e) = store.delete(&meta.key).await {
                tracing::warn!(error = %e, key = %meta.key, "cannot delete a probe leftover");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn a_store_with_conditional_writes_passes_and_is_left_clean() {
        let store = MemoryStore::new();
        let report = check_conditional_writes(&store, 8).await.unwrap();
        assert_eq!(report.checks.len(), 3, "{report}");
        assert!(
            report.checks.iter().all(|c| c.status == Status::Ok),
            "{report}"
        );
        assert!(
            report
                .to_string()
                .contains("1 of 8 racers won, 7 were refused")
        );
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn old_leftovers_are_removed_and_recent_ones_kept() {
        let store = MemoryStore::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let old = format!("{}{:016x}-00000001/race", keys::PROBE_PREFIX, now - 7200);
        let recent = format!("{}{:016x}-00000002/race", keys::PROBE_PREFIX, now - 60);
        for k in [&old, &recent] {
            store.put(k, Bytes::from_static(b"x")).await.unwrap();
        }
        remove_leftovers(&store, "probe/own/").await;
        let left: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(left, vec![recent]);
    }
}
