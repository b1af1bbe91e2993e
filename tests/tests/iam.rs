//! The IAM policies of `docs/iam`, enforced by the S3 test server (moto with authentication
//! on evaluates each request's action and resource against the caller's policies).
//!
//! Two users are created with `scripts/s3-server-user.py`, each with exactly one of the
//! documented policies, its `<BUCKET>` and `<PREFIX>` placeholders filled in:
//! - with the archiver policy, `tidemark-archiver run` archives a live database written by
//!   the load generator, takes base backups, and stops cleanly (releasing the lease, a
//!   DELETE); a multipart upload through Tidemark's own S3 store succeeds, and so does
//!   aborting one;
//! - with the restore policy, `tidemark-restore list`, `verify --all --deep`, `restore
//!   --latest` (equal, key by key, to what was written) and `drill` succeed;
//! - the restore key cannot write, delete or start a multipart upload, and an archiver
//!   started with it stops with "access denied": AccessDenied (403) from the server;
//! - the archiver key cannot read, write or delete outside its prefix, not even under a
//!   sibling prefix that merely starts with the same characters.
//!
//! What moto cannot show: it ignores `Condition` blocks, so the `s3:prefix` condition that
//! limits `s3:ListBucket` to the repository is not enforced here (a listing outside the
//! prefix is allowed by moto, and denied by AWS); and it answers 404 for a missing object
//! whether or not the caller may list the bucket, where AWS answers 403 without
//! `s3:ListBucket` (docs/operations.md says what that means for the policies).
//!
//! Needs the S3 test server with authentication (scripts/s3-server.sh, the default); skipped
//! with a message without one, and failed instead when `TIDEMARK_REQUIRE_S3=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use tidemark_manifest::store::{ObjectStore, S3Options, S3Store, StoreError};
use tidemark_tests::harness::output_text as text;
use tidemark_tests::harness::{Proc, TestStore, bin, check_history, wait_for_database};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, read_db_state_and_seq};

/// The workspace root (policies, scripts).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The moto virtualenv's python, which has boto3 (`TIDEMARK_S3_PYTHON` overrides).
fn moto_python() -> PathBuf {
    if let Some(p) = std::env::var_os("TIDEMARK_S3_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("TIDEMARK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tidemark")
        });
    cache.join("venv-moto/bin/python")
}

/// An access key of the test server.
#[derive(Clone)]
struct Key {
    id: String,
    secret: String,
}

/// Creates a user with exactly the policy in `docs/iam/<file>`, placeholders filled in.
fn user_with_policy(name: &str, file: &str, bucket: &str, prefix: &str) -> Result<Key> {
    let policy = workspace().join("docs/iam").join(file);
    let out = Command::new(moto_python())
        .arg(workspace().join("scripts/s3-server-user.py"))
        .arg(name)
        .arg(&policy)
        .args(["--bucket", bucket, "--prefix", prefix])
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (set TIDEMARK_S3_PYTHON to a python with boto3)",
                moto_python().display()
            )
        })?;
    ensure!(
        out.status.success(),
        "s3-server-user.py {name} {} failed: {}",
        policy.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(id), Some(secret), None) => Ok(Key {
            id: id.to_owned(),
            secret: secret.to_owned(),
        }),
        _ => bail!("s3-server-user.py printed {text:?}, not a key id and a secret"),
    }
}

/// The programs' environment: the store's, with this key.
/// The credentials of `key`, for the programs.
fn key_env(key: &Key) -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), key.id.clone()),
        ("AWS_SECRET_ACCESS_KEY".into(), key.secret.clone()),
    ]
}

fn env_with(store: &TestStore, key: &Key) -> Vec<(String, String)> {
    let mut env = store.env.clone();
    env.extend(key_env(key));
    env
}

async fn sdk_config(key: &Key) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            key.id.clone(),
            key.secret.clone(),
            None,
            None,
            "iam-test",
        ))
        .load()
        .await
}

/// A plain S3 client signing with `key`.
async fn client(endpoint: &str, key: &Key) -> aws_sdk_s3::Client {
    let conf = sdk_config(key).await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .endpoint_url(endpoint)
            .force_path_style(true)
            .build(),
    )
}

/// Fails unless the server refused the request with AccessDenied (403).
fn denied<T, E>(what: &str, result: Result<T, SdkError<E, HttpResponse>>) -> Result<()>
where
    E: ProvideErrorMetadata + std::fmt::Debug,
{
    match result {
        Ok(_) => bail!("{what}: the server allowed it, but the policy must deny it"),
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            ensure!(
                status == Some(403) && e.code() == Some("AccessDenied"),
                "{what}: expected AccessDenied (403) from the server, got {status:?} {:?}: {e:?}",
                e.code()
            );
            Ok(())
        }
    }
}

/// Fails unless the request succeeded.
fn allowed<T, E: std::fmt::Debug>(
    what: &str,
    result: Result<T, SdkError<E, HttpResponse>>,
) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!("{what}: the policy must allow it, but: {e:?}"))
}

/// Runs `tidemark-restore ARGS` with the given environment.
fn restore_tool(args: &[&str], env: &[(String, String)]) -> Result<Output> {
    Ok(Command::new(bin("tidemark-restore")?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("TIDEMARK_FROM")
        .env_remove("TIDEMARK_DRILL_TARGET")
        .output()?)
}

/// Archives with the archiver key until the repository holds the writer's last sequence and
/// at least two bases, then stops the archiver with SIGTERM.
async fn archive(s: &Setup, key: &Key) -> Result<Oracle> {
    let store = &s.store;
    let mut writer = s.loadgen(&["--duration", "6", "--rate", "400", "--seed", "11"])?;
    wait_for_database(&s.db())?;
    let mut archiver = s.archiver_with_env("archiver.log", &[], &key_env(key))?;
    // A second base while the writer runs, on request.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        archiver.running(),
        "the archiver with the archiver policy exited; its log:\n{}",
        archiver.log_tail()
    );
    archiver.signal("USR1")?;
    writer.wait_success(Duration::from_secs(60))?;
    let oracle = s.oracle()?;

    // Watched with the administrator's key (the test process's own environment).
    let repo = store.open().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(state) = repo.load().await
            && state.history.segments.last().map(|s| s.last_seq) == Some(oracle.last_seq())
            && state.history.bases.len() >= 2
        {
            break;
        }
        ensure!(
            archiver.running(),
            "the archiver exited early; its log:\n{}",
            archiver.log_tail()
        );
        ensure!(
            std::time::Instant::now() < deadline,
            "the repository did not reach sequence {} with two bases; archiver log:\n{}",
            oracle.last_seq(),
            archiver.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    archiver.stop(Duration::from_secs(30))?;
    ensure!(
        repo.read_lease()
            .await?
            .is_some_and(|(l, _)| l.released_at.is_some()),
        "the lease was not released"
    );
    check_history(store, &oracle, 2).await?;
    Ok(oracle)
}

/// Everything the restore key must be able to do, and the restored database.
fn restore_with(s: &Setup, key: &Key, oracle: &Oracle) -> Result<()> {
    let store = &s.store;
    let env = env_with(store, key);
    let url = store.url.as_str();
    for args in [
        vec!["list", "--from", url],
        vec!["verify", "--from", url, "--all", "--deep"],
    ] {
        let out = restore_tool(&args, &env)?;
        ensure!(
            out.status.success(),
            "tidemark-restore {} with the restore policy failed: {}",
            args[0],
            text(&out)
        );
    }
    let target = s_path(s, "restored");
    let out = restore_tool(
        &[
            "--quiet", "restore", "--from", url, "--target", &target, "--latest",
        ],
        &env,
    )?;
    ensure!(
        out.status.success(),
        "restore with the restore policy failed: {}",
        text(&out)
    );
    let (actual, seq) = read_db_state_and_seq(&s.path("restored"))?;
    ensure!(
        seq == oracle.last_seq(),
        "the restored database ends at {seq}, the writer's last sequence is {}",
        oracle.last_seq()
    );
    if let Some(d) = oracle.state_at(seq)?.diff(&actual) {
        bail!("the restored database differs from what was written: {d}");
    }

    std::fs::create_dir_all(s.path("scratch"))?;
    let report = s_path(s, "drill.json");
    let out = restore_tool(
        &[
            "--quiet",
            "drill",
            "--from",
            url,
            "--scratch",
            &s_path(s, "scratch"),
            "--report",
            &report,
        ],
        &env,
    )?;
    ensure!(
        out.status.success(),
        "the drill with the restore policy failed: {}",
        text(&out)
    );
    eprintln!(
        "restore key: list, verify --all --deep, restore --latest (sequence {seq}, equal to \
         what was written) and drill passed"
    );
    Ok(())
}

/// The restore key can read and nothing else.
async fn restore_key_is_read_only(
    s: &Setup,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    key: &Key,
) -> Result<()> {
    let store = &s.store;
    let c = client(endpoint, key).await;
    let existing = format!("{prefix}/tidemark.json");
    allowed(
        "restore key: GET tidemark.json",
        c.get_object().bucket(bucket).key(&existing).send().await,
    )?;
    denied(
        "restore key: PUT a new object in the repository",
        c.put_object()
            .bucket(bucket)
            .key(format!("{prefix}/wal/intruder.seg"))
            .body(ByteStream::from_static(b"x"))
            .send()
            .await,
    )?;
    denied(
        "restore key: PUT over tidemark.json",
        c.put_object()
            .bucket(bucket)
            .key(&existing)
            .body(ByteStream::from_static(b"{}"))
            .send()
            .await,
    )?;
    denied(
        "restore key: DELETE tidemark.json",
        c.delete_object().bucket(bucket).key(&existing).send().await,
    )?;
    denied(
        "restore key: CreateMultipartUpload",
        c.create_multipart_upload()
            .bucket(bucket)
            .key(format!("{prefix}/sst/intruder"))
            .send()
            .await,
    )?;

    // Through Tidemark's own store: the error the programs report.
    let sdk = sdk_config(key).await;
    let tidemark_store = S3Store::from_sdk_config(
        &sdk,
        bucket,
        prefix,
        &S3Options {
            endpoint_url: Some(endpoint.to_owned()),
            force_path_style: true,
            ..S3Options::default()
        },
    )?;
    match tidemark_store.delete("tidemark.json").await {
        Err(StoreError::AccessDenied { .. }) => {}
        other => bail!("restore key: deleting tidemark.json must be AccessDenied: {other:?}"),
    }

    // An archiver started with the restore key stops at once and says why.
    let mut archiver = Proc::spawn(
        &bin("tidemark-archiver")?,
        &[
            "run".into(),
            "--db".into(),
            s_path(s, "db"),
            "--to".into(),
            store.url.clone(),
        ],
        &env_with(store, key),
        &s.path("archiver-restore-key.log"),
    )?;
    let status = archiver.wait_timeout(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(&archiver.log)?;
    ensure!(
        !status.success() && log.contains("access denied"),
        "an archiver with the restore key must fail with 'access denied' ({status}):\n{log}"
    );
    eprintln!(
        "restore key: PUT, DELETE and CreateMultipartUpload are AccessDenied; the archiver \
         stops with {status}"
    );
    Ok(())
}

/// The archiver key works inside its prefix only.
async fn archiver_key_stays_in_its_prefix(
    s: &Setup,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    admin: &aws_sdk_s3::Client,
    key: &Key,
) -> Result<()> {
    let c = client(endpoint, key).await;

    // Multipart, as Tidemark uploads large SST files: through its own store, with a
    // threshold low enough that a 6 MiB file goes up in two parts.
    let sdk = sdk_config(key).await;
    let tidemark_store = S3Store::from_sdk_config(
        &sdk,
        bucket,
        prefix,
        &S3Options {
            endpoint_url: Some(endpoint.to_owned()),
            force_path_style: true,
            multipart_threshold: 1024 * 1024,
            part_size: 5 * 1024 * 1024,
            ..S3Options::default()
        },
    )?;
    let big = s.path("big.bin");
    let content: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &content)?;
    tidemark_store
        .put_file("sst/iam-multipart-check", &big)
        .await
        .context("archiver key: a multipart upload inside the prefix")?;
    ensure!(
        tidemark_store.get("sst/iam-multipart-check").await? == content,
        "the multipart upload did not round-trip"
    );
    // An upload orphaned by a crash is aborted.
    let upload = allowed(
        "archiver key: CreateMultipartUpload",
        c.create_multipart_upload()
            .bucket(bucket)
            .key(format!("{prefix}/sst/iam-abort-check"))
            .send()
            .await,
    )?;
    allowed(
        "archiver key: AbortMultipartUpload",
        c.abort_multipart_upload()
            .bucket(bucket)
            .key(format!("{prefix}/sst/iam-abort-check"))
            .upload_id(upload.upload_id().context("no upload id")?)
            .send()
            .await,
    )?;
    allowed(
        "archiver key: DELETE inside the prefix (pruning will)",
        c.delete_object()
            .bucket(bucket)
            .key(format!("{prefix}/sst/iam-multipart-check"))
            .send()
            .await,
    )?;

    // Outside: another prefix, a sibling that starts with the same characters, the root.
    for outside in [
        "other-team/data.bin".to_owned(),
        format!("{prefix}-sibling/data.bin"),
        "root-object.bin".to_owned(),
    ] {
        allowed(
            "administrator: PUT outside the prefix",
            admin
                .put_object()
                .bucket(bucket)
                .key(&outside)
                .body(ByteStream::from_static(b"not yours"))
                .send()
                .await,
        )?;
        denied(
            &format!("archiver key: GET {outside}"),
            c.get_object().bucket(bucket).key(&outside).send().await,
        )?;
        denied(
            &format!("archiver key: PUT {outside}"),
            c.put_object()
                .bucket(bucket)
                .key(&outside)
                .body(ByteStream::from_static(b"overwritten"))
                .send()
                .await,
        )?;
        denied(
            &format!("archiver key: DELETE {outside}"),
            c.delete_object().bucket(bucket).key(&outside).send().await,
        )?;
    }
    // moto does not evaluate the s3:prefix condition of the ListBucket statement, so a
    // listing outside the prefix cannot be shown to be denied here (AWS denies it).
    eprintln!(
        "archiver key: multipart upload and abort inside the prefix; GET, PUT and DELETE \
         outside it are AccessDenied"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_iam_policies_are_enough_and_no_more() -> Result<()> {
    let Some(store) = TestStore::s3("iam").await? else {
        return Ok(());
    };
    // The capability: users with policies, created through moto's IAM API, whose requests
    // the server checks. The server's environment says whether it has it; a server that
    // says nothing is a mistake when TIDEMARK_REQUIRE_S3=1.
    let declared = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (auth, iam) = (
        declared("TIDEMARK_TEST_S3_AUTH"),
        declared("TIDEMARK_TEST_S3_IAM"),
    );
    if auth.as_deref() != Some("1") || iam.as_deref() != Some("1") {
        ensure!(
            std::env::var("TIDEMARK_REQUIRE_S3").as_deref() != Ok("1")
                || (auth.is_some() && iam.is_some()),
            "TIDEMARK_REQUIRE_S3=1 but the S3 server's environment does not say whether it \
             checks signatures and has IAM users (TIDEMARK_TEST_S3_AUTH, TIDEMARK_TEST_S3_IAM)"
        );
        eprintln!(
            "!!! SKIPPED the IAM policy test: {} lacks the capability it needs: IAM users with \
             policies and enforced signatures (TIDEMARK_TEST_S3_AUTH={}, TIDEMARK_TEST_S3_IAM={}; \
             scripts/s3-server.sh's moto has them)",
            std::env::var("TIDEMARK_TEST_S3_SERVER_NAME")
                .unwrap_or_else(|_| "the S3 server".into()),
            auth.as_deref().unwrap_or("unset"),
            iam.as_deref().unwrap_or("unset"),
        );
        return Ok(());
    }
    let endpoint = store.s3.endpoint_url.clone().context("no endpoint")?;
    let (bucket, prefix) = store
        .url
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .context("the test store is not s3://bucket/prefix")?;
    let (bucket, prefix) = (bucket.to_owned(), prefix.to_owned());
    let admin = {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&conf)
                .endpoint_url(&endpoint)
                .force_path_style(true)
                .build(),
        )
    };
    let tag = format!("{:08x}", rand::random::<u32>());
    let archiver_key = user_with_policy(
        &format!("tidemark-archiver-{tag}"),
        "archiver-policy.json",
        &bucket,
        &prefix,
    )?;
    let restore_key = user_with_policy(
        &format!("tidemark-restore-{tag}"),
        "restore-policy.json",
        &bucket,
        &prefix,
    )?;
    let s = Setup::new(store)?;

    let oracle = archive(&s, &archiver_key).await?;
    eprintln!(
        "archiver key: archived sequences 1..={} with two bases and released the lease",
        oracle.last_seq()
    );
    restore_with(&s, &restore_key, &oracle)?;
    restore_key_is_read_only(&s, &endpoint, &bucket, &prefix, &restore_key).await?;
    archiver_key_stays_in_its_prefix(&s, &endpoint, &bucket, &prefix, &admin, &archiver_key)
        .await?;
    Ok(())
}

/// `name` in the test's directory, as an argument.
fn s_path(s: &Setup, name: &str) -> String {
    s.path(name).display().to_string()
}
