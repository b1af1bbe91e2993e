//! Upload limits and storage classes, with the real archiver process, a real RocksDB and the
//! real S3 server: every kind of object carries the storage class configured for it (as the
//! server reports it), an archiver with an upload rate limit takes at least as long as the
//! bytes it uploaded allow, a multipart upload is paced too, and bad limits or classes are
//! refused with a message saying what to write instead.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rand::RngCore;
use sha2::Digest;
use tidemark_manifest::keys::{self, ObjectKind};
use tidemark_manifest::store::{ObjectStore, OpenOptions, Rate, S3Options, StoreUrl};
use tidemark_tests::harness::{TestStore, bin, raw_s3_client};

const MIB: u64 = 1024 * 1024;

/// Runs the archiver to completion: (exit code, output, seconds it took).
fn run_archiver(args: &[&str], env: &[(String, String)]) -> Result<(i32, String, f64)> {
    let started = Instant::now();
    let out = std::process::Command::new(bin("tidemark-archiver")?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    let took = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text, took))
}

/// A database holding about `bytes` of incompressible table data (written with the WAL
/// off, then flushed) and a few WAL records after it, so a backup uploads every kind of
/// object.
fn make_db(path: &Path, bytes: u64) -> Result<()> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_wal_ttl_seconds(3600);
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    let db = rocksdb::DB::open(&opts, path)?;
    let mut no_wal = rocksdb::WriteOptions::default();
    no_wal.disable_wal(true);
    let mut value = vec![0u8; 4096];
    for i in 0..bytes / 4096 {
        rand::rng().fill_bytes(&mut value);
        db.put_opt(format!("bulk{i:08}"), &value, &no_wal)?;
    }
    db.flush()?;
    for i in 0..100u32 {
        db.put(format!("wal{i}"), b"v")?;
    }
    Ok(())
}

/// An SDK client for the test S3 server, to ask it what it stored.
async fn s3_client(s3: &S3Options) -> Result<aws_sdk_s3::Client> {
    let endpoint = s3.endpoint_url.as_deref().context("no endpoint")?;
    Ok(raw_s3_client(endpoint).await)
}

/// Bucket and prefix (with its trailing `/`) of an `s3://` test store.
fn bucket_and_prefix(store: &TestStore) -> Result<(String, String)> {
    match StoreUrl::parse(&store.url)? {
        StoreUrl::S3 { bucket, prefix } => Ok((bucket, format!("{prefix}/"))),
        _ => bail!("{} is not an S3 store", store.url),
    }
}

/// The storage class the server reports for a key (`STANDARD` when it names none, as S3
/// does for standard objects).
async fn class_of(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<String> {
    let head = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .with_context(|| format!("HEAD {key}"))?;
    Ok(head
        .storage_class()
        .map_or("STANDARD", |c| c.as_str())
        .to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_object_gets_its_storage_class() -> Result<()> {
    let Some(store) = TestStore::s3("limits-classes").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    make_db(&db, 2 * MIB)?;
    let (code, text, _) = run_archiver(
        &[
            "backup",
            "--db",
            &db.display().to_string(),
            "--to",
            &store.url,
            "--storage-class",
            "ONEZONE_IA",
            "--base-storage-class",
            "STANDARD_IA",
            "--wal-storage-class",
            "GLACIER_IR",
        ],
        &store.env,
    )?;
    ensure!(code == 0, "backup with storage classes: {code} {text}");

    let client = s3_client(&store.s3).await?;
    let (bucket, prefix) = bucket_and_prefix(&store)?;
    let objects = store.open().await?.store().list("").await?;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for o in &objects {
        let (kind, expected) = match keys::object_kind(&o.key) {
            ObjectKind::Segment => ("segment", "GLACIER_IR"),
            ObjectKind::BaseData => ("base file", "STANDARD_IA"),
            ObjectKind::Document => ("document", "STANDARD"),
            ObjectKind::Other => ("other", "ONEZONE_IA"),
        };
        let class = class_of(&client, &bucket, &format!("{prefix}{}", o.key)).await?;
        ensure!(
            class == expected,
            "{} ({kind}) is stored as {class}, expected {expected}",
            o.key
        );
        *seen.entry(kind.to_owned()).or_default() += 1;
    }
    eprintln!("storage classes checked: {seen:?}");
    for kind in ["segment", "base file", "document"] {
        ensure!(seen.contains_key(kind), "no {kind} was uploaded: {seen:?}");
    }
    Ok(())
}

/// The arithmetic lower bound: `bytes` through a bucket of `rate` that starts full.
fn least_seconds(bytes: u64, rate: Rate) -> f64 {
    let burst = (rate.get() / 4).max(64 * 1024);
    bytes.saturating_sub(burst) as f64 / rate.get() as f64
}

async fn a_rate_limited_backup_is_no_faster_than_the_limit(store: TestStore) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    make_db(&db, 6 * MIB)?;
    let rate: Rate = "2MiB/s".parse()?;
    let (code, text, took) = run_archiver(
        &[
            "backup",
            "--db",
            &db.display().to_string(),
            "--to",
            &store.url,
            "--max-upload-rate",
            "2MiB/s",
        ],
        &store.env,
    )?;
    ensure!(code == 0, "rate-limited backup: {code} {text}");
    ensure!(text.contains("limiting uploads"), "{text}");

    let repo = store.open().await?;
    let state = repo.load().await?;
    let base = state.history.bases.first().context("no base")?;
    let generation = state
        .generation
        .as_ref()
        .context("no generation")?
        .generation;
    let descriptor = repo.read_base(generation, base).await?;
    let base_bytes: u64 = descriptor.files.iter().map(|f| f.size).sum();
    ensure!(
        base_bytes >= 6 * MIB,
        "the base holds only {base_bytes} bytes"
    );
    // Every byte the store holds went through the limiter at least once.
    let stored: u64 = repo.store().list("").await?.iter().map(|o| o.size).sum();
    ensure!(stored >= base_bytes);
    let least = least_seconds(stored, rate);
    eprintln!(
        "{}: {stored} bytes uploaded ({base_bytes} of base) in {took:.2} s at {rate}; at least {least:.2} s",
        store.describe
    );
    ensure!(
        took >= least,
        "{stored} bytes went up in {took:.2} s, faster than {rate} allows ({least:.2} s)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_backup_is_no_faster_than_the_limit_local() -> Result<()> {
    a_rate_limited_backup_is_no_faster_than_the_limit(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_backup_is_no_faster_than_the_limit_s3() -> Result<()> {
    let Some(store) = TestStore::s3("limits-rate").await? else {
        return Ok(());
    };
    a_rate_limited_backup_is_no_faster_than_the_limit(store).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_is_paced_while_it_streams_and_gets_its_class() -> Result<()> {
    let Some(store) = TestStore::s3("limits-multipart").await? else {
        return Ok(());
    };
    let rate: Rate = "2MiB/s".parse()?;
    let s3 = S3Options {
        multipart_threshold: 5 * MIB,
        part_size: 5 * MIB,
        base_storage_class: Some("STANDARD_IA".into()),
        ..store.s3.clone()
    };
    let opened: Arc<dyn ObjectStore> = tidemark_manifest::store::open_store_with(
        &StoreUrl::parse(&store.url)?,
        &OpenOptions {
            s3,
            max_upload_rate: Some(rate),
            ..OpenOptions::default()
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("big.sst");
    let mut data = vec![0u8; (12 * MIB) as usize];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&file, &data)?;
    let key = keys::sst_key(&hex::encode(sha2::Sha256::digest(&data)));
    let started = Instant::now();
    opened.put_file(&key, &file).await?;
    let took = started.elapsed().as_secs_f64();
    let least = least_seconds(12 * MIB, rate);
    eprintln!("12 MiB in 3 parts in {took:.2} s at {rate}; at least {least:.2} s");
    ensure!(took >= least, "{took:.2} s < {least:.2} s");

    ensure!(
        opened.get(&key).await? == data,
        "the object differs from the file"
    );
    let client = s3_client(&store.s3).await?;
    let (bucket, prefix) = bucket_and_prefix(&store)?;
    let full = format!("{prefix}{key}");
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(&full)
        .send()
        .await?;
    ensure!(
        head.e_tag().is_some_and(|t| t.contains('-')),
        "not a multipart object: {:?}",
        head.e_tag()
    );
    let class = class_of(&client, &bucket, &full).await?;
    ensure!(class == "STANDARD_IA", "{key} is stored as {class}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_limits_and_classes_are_refused_with_a_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    make_db(&db, MIB)?;
    let db = db.display().to_string();
    let repo = format!("file://{}", dir.path().join("repo").display());
    for (extra, needle) in [
        (vec!["--max-upload-rate", "50Mb/s"], "bits or bytes"),
        (vec!["--max-upload-rate", "50MiB"], "per second"),
        (vec!["--max-upload-rate", "1KiB/s"], "64KiB/s"),
        (vec!["--upload-concurrency", "0"], "from 1 to 64"),
        (
            vec!["--storage-class", "GLACIER"],
            "storage class GLACIER is refused",
        ),
        (
            vec!["--base-storage-class", "DEEP_ARCHIVE"],
            "use GLACIER_IR",
        ),
        (
            vec!["--wal-storage-class", "COLD"],
            "unknown storage class 'COLD'",
        ),
    ] {
        for command in ["run", "backup"] {
            let mut args = vec![command, "--db", &db, "--to", &repo];
            args.extend(&extra);
            let (code, text, _) = run_archiver(&args, &[])?;
            ensure!(
                code == 2 && text.contains(needle),
                "{args:?}: expected exit 2 and {needle:?}, got {code}: {text}"
            );
        }
    }
    // The same from the environment and the config file.
    let (code, text, _) = run_archiver(
        &["run", "--db", &db, "--to", &repo],
        &[("TIDEMARK_MAX_UPLOAD_RATE".into(), "3mb/s".into())],
    )?;
    ensure!(
        code == 2 && text.contains("bits or bytes"),
        "{code}: {text}"
    );
    let config = dir.path().join("archiver.toml");
    std::fs::write(
        &config,
        "upload_concurrency = 65\n[store]\nmax_upload_rate = \"10MiB/s\"\n",
    )?;
    let (code, text, _) = run_archiver(
        &[
            "run",
            "--db",
            &db,
            "--to",
            &repo,
            "--config",
            &config.display().to_string(),
        ],
        &[],
    )?;
    ensure!(code == 2 && text.contains("from 1 to 64"), "{code}: {text}");
    std::fs::write(&config, "[store]\nmax_upload_rate = \"lots\"\n")?;
    let (code, text, _) = run_archiver(
        &[
            "run",
            "--db",
            &db,
            "--to",
            &repo,
            "--config",
            &config.display().to_string(),
        ],
        &[],
    )?;
    ensure!(code == 2 && text.contains("invalid rate"), "{code}: {text}");
    ensure!(
        !dir.path().join("repo").exists(),
        "a refused start must not create the repository"
    );
    Ok(())
}
