//! Client-side encryption end to end, against the local-directory store and the S3 server:
//! a live database (the load generator) archived by `tidemark-archiver` with a key is
//! restored by `tidemark-restore` with that key to exactly what was written; no object at
//! rest but `tidemark.json` is readable without the key (values the application wrote are in
//! the decrypted objects and in none of the stored ones); a restore with a wrong key or none
//! fails clearly before writing anything; and no log line of either program, at debug level,
//! holds the key in any accepted encoding or the S3 secret key. On S3, server-side
//! encryption (`--sse`) reaches the objects as well.
//!
//! Two repositories sharing a key: objects and `tidemark.json` copied from one into the
//! other, and edited configs, are refused by restore and verify. Secrets stay in: the
//! drill's check command gets no key or credential unless named; an endpoint URL with
//! credentials is refused from every source and never shown; a restored OPTIONS file whose
//! path options point outside the restored database is reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use tidemark_manifest::keys;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::{
    EncryptionKey, ObjectStore, OpenOptions, S3Options, Sse, StoreUrl, open_store_with,
};
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{Proc, TestStore, bin, raw_s3_client, wait_for, wait_for_database};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Op, Oracle, read_db_state_and_seq};

/// How the programs get the key.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    /// `--encryption-key-file` (archiver) and `TIDEMARK_ENCRYPTION_KEY_FILE` (restore),
    /// a file holding 64 hex digits.
    File,
    /// `TIDEMARK_ENCRYPTION_KEY`, base64.
    Env,
}

/// A test's setup (bases every 2 s, the archiver logging everything at debug level) with
/// the key it archives with and how the programs get it.
struct Encrypted {
    s: Setup,
    key: EncryptionKey,
    key_file: PathBuf,
    delivery: Delivery,
}

impl std::ops::Deref for Encrypted {
    type Target = Setup;
    fn deref(&self) -> &Setup {
        &self.s
    }
}

impl Encrypted {
    fn new(store: TestStore, delivery: Delivery) -> Result<Encrypted> {
        let s = Setup::new(store)?.base_interval("2s").log_filter("debug");
        let key = EncryptionKey::generate();
        let key_file = write_key_file(&s.path(""), "key", &key)?;
        Ok(Encrypted {
            s,
            key,
            key_file,
            delivery,
        })
    }

    /// What gives the programs `key` (in `file` for [`Delivery::File`]).
    fn key_env(&self, key: &EncryptionKey, file: &Path) -> (String, String) {
        match self.delivery {
            Delivery::File => (
                "TIDEMARK_ENCRYPTION_KEY_FILE".into(),
                file.display().to_string(),
            ),
            Delivery::Env => (
                "TIDEMARK_ENCRYPTION_KEY".into(),
                base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
            ),
        }
    }

    /// The environment the programs get: the store's, the key's (for the restore tool and
    /// for [`Delivery::Env`]).
    fn env(&self, key: Option<(&EncryptionKey, &Path)>) -> Vec<(String, String)> {
        let mut env = self.store.env.clone();
        env.extend(key.map(|(key, file)| self.key_env(key, file)));
        env
    }

    /// The archiver with the key (`--encryption-key-file` or the environment), and
    /// server-side encryption on S3.
    fn archiver(&self) -> Result<Proc> {
        let file = self.key_file.display().to_string();
        let mut args = Vec::new();
        let mut env = Vec::new();
        match self.delivery {
            Delivery::File => args.extend(["--encryption-key-file", file.as_str()]),
            Delivery::Env => env.push(self.key_env(&self.key, &self.key_file)),
        }
        if self.store.local_root().is_none() {
            env.push(("TIDEMARK_SSE".into(), "AES256".into()));
        }
        self.s.archiver_with_env("archiver.log", &args, &env)
    }

    /// Runs `tidemark-restore -vv restore --latest` into `target` with the key given;
    /// returns the exit code and the whole output.
    fn restore(
        &self,
        target: &Path,
        key: Option<(&EncryptionKey, &Path)>,
    ) -> Result<(i32, String)> {
        let out = Command::new(bin("tidemark-restore")?)
            .args(["-vv", "restore", "--latest", "--from", &self.store.url])
            .arg("--target")
            .arg(target)
            .env_remove("TIDEMARK_ENCRYPTION_KEY")
            .env_remove("TIDEMARK_ENCRYPTION_KEY_FILE")
            .envs(self.env(key))
            .output()
            .context("running tidemark-restore")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// The store without the key (what an attacker with the bucket sees) and the repository
    /// with it.
    async fn stores(&self) -> Result<(Arc<dyn ObjectStore>, Repository)> {
        let raw = self.store.open_raw().await?;
        let repo = Repository::open(Arc::clone(&raw), Some(&self.key)).await?;
        Ok((raw, repo))
    }
}

fn write_key_file(dir: &Path, name: &str, key: &EncryptionKey) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", key.to_hex().as_str()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Every way the key could be written down: the encodings accepted (hex in either case,
/// base64 with and without padding) and the raw bytes.
fn key_encodings(key: &EncryptionKey) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
    vec![
        key.to_hex().as_bytes().to_vec(),
        key.to_hex().to_uppercase().into_bytes(),
        b64.trim_end_matches('=').as_bytes().to_vec(),
        b64.into_bytes(),
        key.as_bytes().to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// 32-byte pieces of values the application wrote (random bytes, so they do not occur by
/// chance and compression leaves them as they are).
fn needles(oracle: &Oracle) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for i in 0..oracle.batches().len() {
        for op in oracle.read_batch(i)?.ops {
            if let Op::Put { value, .. } = op
                && value.len() >= 64
            {
                out.push(value[16..48].to_vec());
            }
        }
        if out.len() >= 40 {
            break;
        }
    }
    ensure!(
        !out.is_empty(),
        "the load generator wrote no value of 64 bytes or more"
    );
    Ok(out)
}

async fn archive_and_restore(store: TestStore, delivery: Delivery) -> Result<()> {
    eprintln!("encrypted archive into {} ({delivery:?})", store.describe);
    let s = Encrypted::new(store, delivery)?;
    let mut writer = Proc::spawn(
        &bin("tidemark-loadgen")?,
        &[
            "--db",
            &s.path("db").display().to_string(),
            "--out",
            &s.path("oracle").display().to_string(),
            "--duration",
            "6",
            "--rate",
            "300",
            "--seed",
            "23",
            "--large-value-every",
            "20",
            "--flush-every",
            "300",
        ]
        .map(String::from),
        &[],
        &s.path("loadgen.log"),
    )?;
    let db = s.path("db");
    wait_for_database(&db)?;
    let mut arch = s.archiver()?;
    writer.wait_success(Duration::from_secs(60))?;
    let oracle = Oracle::open(&s.path("oracle"))?;

    // Wait until everything written is archived, reading the repository with the key.
    if let Some(root) = s.store.local_root() {
        wait_for(Duration::from_secs(20), "the repository directory", || {
            root.join(keys::CONFIG).exists().then_some(())
        })?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((_, repo)) = s.stores().await
            && let Ok(state) = repo.load().await
            && state.history.segments.last().map(|x| x.last_seq) == Some(oracle.last_seq())
            && !state.history.bases.is_empty()
        {
            break;
        }
        ensure!(
            arch.running(),
            "the archiver exited early:\n{}",
            arch.log_tail()
        );
        ensure!(
            Instant::now() < deadline,
            "the repository did not reach sequence {}:\n{}",
            oracle.last_seq(),
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    arch.stop(Duration::from_secs(30))?;

    // At rest: tidemark.json names the key by its id only; every other object is sealed
    // and holds none of the values the application wrote, which its plaintext does hold.
    let (raw, repo) = s.stores().await?;
    let config = raw.get(keys::CONFIG).await?;
    let text = String::from_utf8_lossy(&config);
    ensure!(
        text.contains("xchacha20-poly1305") && text.contains(&s.key.key_id()),
        "tidemark.json does not record the encryption:\n{text}"
    );
    let needles = needles(&oracle)?;
    let objects = raw.list("").await?;
    ensure!(
        objects.iter().any(|m| m.key.starts_with(keys::SST_PREFIX))
            && objects.iter().any(|m| m.key.starts_with(keys::WAL_PREFIX)),
        "expected table files and segments, found {:?}",
        objects.iter().map(|m| &m.key).collect::<Vec<_>>()
    );
    let mut found_in_plaintext = 0;
    for meta in &objects {
        let stored = raw.get(&meta.key).await?;
        for secret in key_encodings(&s.key) {
            ensure!(!contains(&stored, &secret), "{} holds the key", meta.key);
        }
        if meta.key == keys::CONFIG {
            continue;
        }
        ensure!(
            stored.starts_with(b"TDMKENC\0"),
            "{} is not an encrypted object",
            meta.key
        );
        let plain = repo.store().get(&meta.key).await?;
        ensure!(plain != stored, "{} is stored in the clear", meta.key);
        for n in &needles {
            ensure!(
                !contains(&stored, n),
                "{}: a value the application wrote is readable at rest",
                meta.key
            );
            if contains(&plain, n) {
                found_in_plaintext += 1;
            }
        }
    }
    ensure!(
        found_in_plaintext > 0,
        "none of the {} values searched for is in any decrypted object: the search proves nothing",
        needles.len()
    );
    eprintln!(
        "{} objects sealed; {found_in_plaintext} value pieces found only after decryption",
        objects.len()
    );

    // On S3 the objects also carry the server-side encryption asked for.
    if s.store.local_root().is_none() {
        let (bucket, prefix) = bucket_and_prefix(&s.store.url)?;
        let client = s3_client(&s.store.s3).await;
        for meta in objects.iter().filter(|m| m.key != keys::LEASE).take(5) {
            let head = client
                .head_object()
                .bucket(&bucket)
                .key(format!("{prefix}/{}", meta.key))
                .send()
                .await?;
            ensure!(
                head.server_side_encryption()
                    == Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256),
                "{}: server-side encryption {:?}, expected AES256",
                meta.key,
                head.server_side_encryption()
            );
        }
    }

    // A wrong key and no key are refused before anything is written.
    let other = EncryptionKey::generate();
    let other_file = write_key_file(&s.path(""), "other-key", &other)?;
    let mut outputs = vec![std::fs::read_to_string(&arch.log)?];
    for (name, key, needle) in [
        (
            "wrong",
            Some((&other, other_file.as_path())),
            other.key_id(),
        ),
        ("none", None, "--encryption-key-file".to_owned()),
    ] {
        let target = s.path(&format!("restore-{name}"));
        let (code, out) = s.restore(&target, key)?;
        ensure!(
            code == 2,
            "restore with {name} key: exit {code}, expected 2:\n{out}"
        );
        ensure!(
            out.contains(&needle) && out.contains(&s.key.key_id()),
            "restore with {name} key: the message does not name the key ids:\n{out}"
        );
        ensure!(
            !target.exists(),
            "restore with {name} key created {}",
            target.display()
        );
        outputs.push(out);
    }

    // The archiver's read-only commands refuse the same way, as usage errors.
    for (name, key) in [
        ("wrong", Some((&other, other_file.as_path()))),
        ("none", None),
    ] {
        for args in [
            vec!["status", "--to", &s.store.url],
            vec![
                "prune",
                "--to",
                &s.store.url,
                "--keep-last",
                "1",
                "--dry-run",
            ],
        ] {
            let out = Command::new(bin("tidemark-archiver")?)
                .args(&args)
                .env_remove("TIDEMARK_ENCRYPTION_KEY")
                .env_remove("TIDEMARK_ENCRYPTION_KEY_FILE")
                .envs(s.env(key))
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            ensure!(
                out.status.code() == Some(2) && err.contains(&s.key.key_id()),
                "{} with {name} key: exit {:?}, expected 2 naming the key id:\n{err}",
                args[0],
                out.status.code()
            );
            outputs.push(err);
        }
    }

    // The right key restores exactly what was written.
    let target = s.path("restored");
    let (code, out) = s.restore(&target, Some((&s.key, &s.key_file)))?;
    ensure!(code == 0, "restore failed with exit {code}:\n{out}");
    let (actual, seq) = read_db_state_and_seq(&target)?;
    ensure!(
        seq == oracle.last_seq(),
        "restored to sequence {seq}, written up to {}",
        oracle.last_seq()
    );
    if let Some(d) = oracle.state_at(seq)?.diff(&actual) {
        bail!("the restored database differs from what was written: {d}");
    }
    outputs.push(out);

    // Nothing either program printed holds the key or the S3 secret.
    let all = outputs.join("\n");
    ensure!(all.contains("DEBUG"), "the logs are not at debug level");
    let mut secrets = key_encodings(&s.key);
    secrets.extend(key_encodings(&other));
    if let Ok(secret) = std::env::var("AWS_SECRET_ACCESS_KEY")
        && s.store.local_root().is_none()
    {
        secrets.push(secret.into_bytes());
    }
    for secret in &secrets {
        ensure!(
            !contains(all.as_bytes(), secret),
            "a key or credential appears in the programs' output"
        );
    }
    eprintln!(
        "restored sequence {seq} with the key; {} bytes of logs hold no secret",
        all.len()
    );
    Ok(())
}

fn bucket_and_prefix(url: &str) -> Result<(String, String)> {
    match StoreUrl::parse(url)? {
        StoreUrl::S3 { bucket, prefix } => Ok((bucket, prefix.trim_end_matches('/').to_owned())),
        other => bail!("{other:?} is not an S3 URL"),
    }
}

async fn s3_client(s3: &S3Options) -> aws_sdk_s3::Client {
    raw_s3_client(s3.endpoint_url.as_deref().unwrap_or_default()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_archive_and_restore_local() -> Result<()> {
    archive_and_restore(TestStore::local()?, Delivery::File).await
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_archive_and_restore_on_s3() -> Result<()> {
    with_s3("encryption", |store| {
        archive_and_restore(store, Delivery::Env)
    })
    .await
}

/// `--sse` reaches every kind of upload: a plain put, a conditional create, a single-part
/// file and a multipart file; the server reports it on each object.
#[tokio::test(flavor = "multi_thread")]
async fn server_side_encryption_reaches_the_objects_on_s3() -> Result<()> {
    let Some(store) = TestStore::s3("sse").await? else {
        return Ok(());
    };
    let (bucket, prefix) = bucket_and_prefix(&store.url)?;
    let client = s3_client(&store.s3).await;
    let dir = tempfile::tempdir()?;
    let small = dir.path().join("small");
    std::fs::write(&small, vec![7u8; 1000])?;
    let large = dir.path().join("large");
    std::fs::write(&large, vec![9u8; 11 << 20])?;
    for (sse, expected) in [
        (Sse::Aes256, aws_sdk_s3::types::ServerSideEncryption::Aes256),
        (
            Sse::Kms {
                key_id: Some("alias/tidemark-test".into()),
            },
            aws_sdk_s3::types::ServerSideEncryption::AwsKms,
        ),
    ] {
        let s3 = S3Options {
            sse: Some(sse.clone()),
            multipart_threshold: 5 << 20,
            part_size: 5 << 20,
            ..store.s3.clone()
        };
        let s = open_store_with(
            &StoreUrl::parse(&store.url)?,
            &OpenOptions {
                s3,
                ..OpenOptions::default()
            },
        )
        .await?;
        let tag = format!("{expected:?}").to_lowercase();
        let keys = [
            format!("{tag}/put"),
            format!("{tag}/create"),
            format!("{tag}/small"),
            format!("{tag}/large"),
        ];
        s.put(&keys[0], bytes::Bytes::from_static(b"x")).await?;
        s.put_if_absent(&keys[1], bytes::Bytes::from_static(b"y"))
            .await?;
        s.put_file(&keys[2], &small).await?;
        s.put_file(&keys[3], &large).await?;
        for k in &keys {
            let head = client
                .head_object()
                .bucket(&bucket)
                .key(format!("{prefix}/{k}"))
                .send()
                .await?;
            ensure!(
                head.server_side_encryption() == Some(&expected),
                "{k}: server-side encryption {:?}, expected {expected:?}",
                head.server_side_encryption()
            );
            if let Sse::Kms { key_id: Some(id) } = &sse {
                ensure!(
                    head.ssekms_key_id()
                        .is_some_and(|k| k.contains(id.trim_start_matches("alias/"))),
                    "{k}: KMS key {:?}, expected {id}",
                    head.ssekms_key_id()
                );
            }
        }
    }
    Ok(())
}

/// Runs `tidemark-restore` with `args` and the key file; returns the exit code and output.
fn run_restore_tool(args: &[&str], key_file: &Path) -> Result<(i32, String)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env = [(
        "TIDEMARK_ENCRYPTION_KEY_FILE".to_owned(),
        key_file.display().to_string(),
    )];
    let (code, out, err) = tidemark_tests::harness::run_with_timeout(
        &bin("tidemark-restore")?,
        &args,
        &env,
        Duration::from_secs(180),
    )?;
    Ok((code, format!("{out}{err}")))
}

/// What a restore and a deep verify of `url` say when the repository holds something foreign:
/// both fail with a message that names `object` and contains `why`, and the restore
/// leaves nothing behind in `scratch`.
fn assert_refused(
    url: &str,
    key_file: &Path,
    scratch: &Path,
    object: &str,
    why: &str,
) -> Result<()> {
    assert_restore_refused(url, key_file, scratch, object, why)?;
    assert_verify_refused(url, key_file, object, why)
}

/// The restore part of [`assert_refused`].
fn assert_restore_refused(
    url: &str,
    key_file: &Path,
    scratch: &Path,
    object: &str,
    why: &str,
) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let target = scratch.join("restored");
    let t = target.display().to_string();
    let (code, out) = run_restore_tool(
        &["restore", "--latest", "--from", url, "--target", &t],
        key_file,
    )?;
    ensure!(
        code != 0 && out.contains(object) && out.contains(why),
        "restore with {object} foreign: exit {code}, expected a failure naming it ({why}):\n{out}"
    );
    let left: Vec<_> = std::fs::read_dir(scratch)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(
        left.is_empty(),
        "the refused restore left {left:?} in {}",
        scratch.display()
    );
    Ok(())
}

/// The verify part of [`assert_refused`].
fn assert_verify_refused(url: &str, key_file: &Path, object: &str, why: &str) -> Result<()> {
    let (code, out) = run_restore_tool(&["verify", "--all", "--deep", "--from", url], key_file)?;
    ensure!(
        code != 0 && out.contains(object) && out.contains(why),
        "verify with {object} foreign: exit {code}, expected a failure naming it ({why}):\n{out}"
    );
    Ok(())
}

/// The same document with `from` replaced by `to` and a correct checksum (FORMAT.md §3.1),
/// so that only its authentication can tell.
fn edit_document(doc: &[u8], from: &str, to: &str) -> Result<Vec<u8>> {
    let body = std::str::from_utf8(&doc[CHECKSUM_PREFIX_LEN..])?;
    ensure!(body.contains(from), "{from} is not in {body}");
    Ok(document(&body.replacen(from, to, 1)))
}

/// Length of a document's checksum prefix: `{"checksum":"`, 64 hex digits, `",`.
const CHECKSUM_PREFIX_LEN: usize = 13 + 64 + 2;

/// A document with this body (everything after the checksum prefix) and its checksum.
fn document(body: &str) -> Vec<u8> {
    let mut out = b"{\"checksum\":\"".to_vec();
    out.extend_from_slice(tidemark_manifest::checksum::sha256_hex(body.as_bytes()).as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(body.as_bytes());
    out
}

/// Two repositories encrypted with one key, written by the archiver from the same database
/// (so they hold objects under the same keys): an object of one copied into the other, or
/// one's `tidemark.json` with it, is refused by restore and verify, naming the object, with
/// nothing restored; so is a `tidemark.json` whose fields were changed.
/// A database written to the end by the load generator, and encrypted repositories of it
/// written by `tidemark-archiver backup` with one key.
struct Backups {
    dir: tempfile::TempDir,
    key: EncryptionKey,
    key_file: PathBuf,
    roots: Vec<PathBuf>,
    urls: Vec<String>,
}

impl Backups {
    fn new(repositories: usize, rocks_options: Option<rocksdb::Options>) -> Result<Backups> {
        let dir = tempfile::tempdir()?;
        let key = EncryptionKey::generate();
        let key_file = write_key_file(dir.path(), "key", &key)?;
        let db = dir.path().join("db");
        match rocks_options {
            None => {
                let args = [
                    "--db",
                    &db.display().to_string(),
                    "--out",
                    &dir.path().join("oracle").display().to_string(),
                    "--batches",
                    "1500",
                    "--seed",
                    "31",
                    "--flush-every",
                    "500",
                ]
                .map(String::from);
                let log = dir.path().join("loadgen.log");
                let mut writer = Proc::spawn(&bin("tidemark-loadgen")?, &args, &[], &log)?;
                writer.wait_success(Duration::from_secs(60))?;
            }
            Some(mut o) => {
                o.create_if_missing(true);
                let rocks = rocksdb::DB::open(&o, &db)?;
                for i in 0..200u32 {
                    rocks.put(format!("key{i:04}"), vec![i as u8; 100])?;
                }
                rocks.flush()?;
                rocks.put(b"after-flush", b"1")?;
            }
        }
        let roots: Vec<PathBuf> = (0..repositories)
            .map(|i| dir.path().join(format!("repo-{i}")))
            .collect();
        let urls: Vec<String> = roots
            .iter()
            .map(|r| format!("file://{}", r.display()))
            .collect();
        for url in &urls {
            let args = [
                "backup",
                "--db",
                &db.display().to_string(),
                "--to",
                url,
                "--encryption-key-file",
                &key_file.display().to_string(),
            ]
            .map(String::from);
            let (code, out, err) = tidemark_tests::harness::run_with_timeout(
                &bin("tidemark-archiver")?,
                &args,
                &[],
                Duration::from_secs(180),
            )?;
            ensure!(code == 0, "backup into {url}: exit {code}\n{out}{err}");
        }
        Ok(Backups {
            dir,
            key,
            key_file,
            roots,
            urls,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Two repositories encrypted with one key, written by the archiver from the same database
/// (so they hold objects under the same keys): an object of one copied into the other, or
/// one's `tidemark.json` with it, is refused by restore and verify, naming the object, with
/// nothing restored; so is a `tidemark.json` whose fields were changed.
#[tokio::test(flavor = "multi_thread")]
async fn another_repositorys_objects_and_a_changed_config_are_refused() -> Result<()> {
    let f = Backups::new(2, None)?;
    let (key, key_file, roots, urls) = (&f.key, &f.key_file, &f.roots, &f.urls);
    let raw_a = tidemark_manifest::store::LocalStore::open(&roots[0])?;
    let raw_b = tidemark_manifest::store::LocalStore::open(&roots[1])?;
    let keys_a: std::collections::BTreeSet<String> =
        raw_a.list("").await?.into_iter().map(|m| m.key).collect();
    let keys_b: std::collections::BTreeSet<String> =
        raw_b.list("").await?.into_iter().map(|m| m.key).collect();
    let common: Vec<&String> = keys_a.intersection(&keys_b).collect();
    let pick = |prefix: &str| {
        common
            .iter()
            .find(|k| k.starts_with(prefix))
            .map(|k| k.to_string())
    };
    let (Some(sst), Some(segment)) = (pick(keys::SST_PREFIX), pick(keys::WAL_PREFIX)) else {
        bail!("the two repositories share no table file and no segment key: {common:?}");
    };
    eprintln!(
        "{} objects in common between the repositories, e.g. {sst} and {segment}",
        common.len()
    );

    // Both repositories restore and verify as they are.
    for (i, url) in urls.iter().enumerate() {
        let t = f.path(&format!("intact-{i}")).display().to_string();
        let (code, out) = run_restore_tool(
            &["restore", "--latest", "--from", url, "--target", &t],
            key_file,
        )?;
        ensure!(code == 0, "restore of the intact {url}: exit {code}\n{out}");
        let (code, out) =
            run_restore_tool(&["verify", "--all", "--deep", "--from", url], key_file)?;
        ensure!(code == 0, "verify of the intact {url}: exit {code}\n{out}");
    }

    // One of A's objects in B, under the key B has it.
    let scratch = f.path("scratch");
    let b = &urls[1];
    let why = "another repository";
    let own = raw_b.get(&sst).await?;
    raw_b.put(&sst, raw_a.get(&sst).await?).await?;
    assert_refused(b, key_file, &scratch, &sst, why)?;
    raw_b.put(&sst, own).await?;
    // The segment precedes the base, so only a deep verify reads it. One longer than B's
    // manifest records for it is stopped by the bounded download before it is decrypted.
    let own = raw_b.get(&segment).await?;
    let foreign = raw_a.get(&segment).await?;
    let seg_why = if foreign.len() > own.len() {
        "longer than"
    } else {
        why
    };
    raw_b.put(&segment, foreign).await?;
    assert_verify_refused(b, key_file, &segment, seg_why)?;
    raw_b.put(&segment, own).await?;

    // A's tidemark.json with A's objects in B: B's own objects no longer authenticate.
    let config_b = raw_b.get(keys::CONFIG).await?;
    let own = raw_b.get(&sst).await?;
    raw_b
        .put(keys::CONFIG, raw_a.get(keys::CONFIG).await?)
        .await?;
    raw_b.put(&sst, raw_a.get(&sst).await?).await?;
    assert_refused(b, key_file, &scratch, "manifest/", why)?;
    raw_b.put(keys::CONFIG, config_b.clone()).await?;
    raw_b.put(&sst, own).await?;

    // A changed tidemark.json, each field edited with a correct checksum.
    let text = String::from_utf8(config_b.to_vec())?;
    let field = |name: &str| -> Result<String> {
        let start = text
            .find(&format!("\"{name}\": "))
            .with_context(|| format!("no {name} in {text}"))?;
        let end = start + text[start..].find([',', '\n']).unwrap_or(0);
        Ok(text[start..end].to_owned())
    };
    let other_id = EncryptionKey::generate().key_id();
    let edits = [
        (
            field("repository_id")?,
            "\"repository_id\": \"someone-else\"".to_owned(),
        ),
        (
            field("database_identity")?,
            "\"database_identity\": \"x\"".to_owned(),
        ),
        (field("chunk_size")?, "\"chunk_size\": 4096".to_owned()),
        (field("key_id")?, format!("\"key_id\": \"{other_id}\"")),
    ];
    for (from, to) in &edits {
        raw_b
            .put(keys::CONFIG, edit_document(&config_b, from, to)?.into())
            .await?;
        let expected = if from.contains("key_id") {
            // Refused when the repository is opened, before the authentication.
            key.key_id()
        } else {
            "tidemark.json failed authentication".to_owned()
        };
        assert_refused(b, key_file, &scratch, &expected, "")
            .with_context(|| format!("tidemark.json with {to}"))?;
    }
    // Without its authentication (`"authentication":"<64 hex digits>",` after the checksum).
    let body = std::str::from_utf8(&config_b[CHECKSUM_PREFIX_LEN..])?;
    let auth = "\"authentication\":\"".len() + 64 + 2;
    ensure!(
        body.starts_with("\"authentication\":\""),
        "tidemark.json is not authenticated: {body}"
    );
    let stripped = document(&body[auth..]);
    raw_b.put(keys::CONFIG, stripped.into()).await?;
    assert_refused(
        b,
        key_file,
        &scratch,
        "tidemark.json",
        "carries no authentication",
    )?;
    Ok(())
}

/// Runs `program` with `args`, `env` added and the variables `remove` removed from the
/// test's environment; returns the exit code and the whole output.
fn run_with_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    remove: &[&str],
) -> Result<(i32, String)> {
    let mut cmd = Command::new(bin(program)?);
    cmd.args(args).stdin(Stdio::null());
    for name in remove {
        cmd.env_remove(name);
    }
    let out = cmd
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The drill's check command gets the restored database and the few variables a program
/// needs, not the encryption key or the store's credentials the drill itself was given,
/// unless they are named with `--check-env` (or `TIDEMARK_DRILL_CHECK_ENV`).
#[tokio::test(flavor = "multi_thread")]
async fn the_drill_check_command_gets_no_secret_unless_named() -> Result<()> {
    let f = Backups::new(1, None)?;
    let seen = f.path("seen-env");
    let check = format!("env > '{}'", seen.display());
    let scratch = f.path("scratch");
    std::fs::create_dir(&scratch)?;
    let key_hex = f.key.to_hex();
    let secrets = [
        ("TIDEMARK_ENCRYPTION_KEY", key_hex.as_str()),
        ("AWS_SECRET_ACCESS_KEY", "drill-aws-secret-0451"),
        ("AWS_SESSION_TOKEN", "drill-aws-session-0451"),
        ("APP_DATABASE_PASSWORD", "drill-app-password-0451"),
    ];
    let drill = |extra: &[&str], env: &[(&str, &str)]| -> Result<String> {
        let mut args = vec![
            "drill",
            "--from",
            &f.urls[0],
            "--scratch",
            scratch.to_str().context("utf-8 path")?,
            "--check-command",
            &check,
        ];
        args.extend_from_slice(extra);
        let mut all = secrets.to_vec();
        all.extend_from_slice(env);
        all.push(("LC_TIME", "C"));
        let (code, out) = run_with_env(
            "tidemark-restore",
            &args,
            &all,
            &["TIDEMARK_ENCRYPTION_KEY_FILE", "TIDEMARK_DRILL_CHECK_ENV"],
        )?;
        ensure!(code == 0, "drill: exit {code}\n{out}");
        Ok(std::fs::read_to_string(&seen)?)
    };
    let has = |env: &str, name: &str| env.lines().any(|l| l.starts_with(&format!("{name}=")));

    // By default: the drill's variables and the basics, no secret.
    let env = drill(&[], &[])?;
    for name in ["TIDEMARK_DRILL_DB", "TIDEMARK_DRILL_SEQ", "PATH", "LC_TIME"] {
        ensure!(
            has(&env, name),
            "the check command did not get {name}:\n{env}"
        );
    }
    for (name, value) in secrets {
        ensure!(
            !has(&env, name) && !env.contains(value),
            "the check command got {name}:\n{env}"
        );
    }
    ensure!(
        env.lines().count() < 20,
        "the check command got more than the basics:\n{env}"
    );

    // Named on the command line or in the environment: passed, and only those.
    let env = drill(
        &[
            "--check-env",
            "APP_DATABASE_PASSWORD",
            "--check-env",
            "NOT_SET_AT_ALL",
        ],
        &[],
    )?;
    ensure!(
        env.contains("APP_DATABASE_PASSWORD=drill-app-password-0451"),
        "--check-env did not pass the variable:\n{env}"
    );
    ensure!(!has(&env, "TIDEMARK_ENCRYPTION_KEY") && !has(&env, "AWS_SECRET_ACCESS_KEY"));
    let env = drill(
        &[],
        &[(
            "TIDEMARK_DRILL_CHECK_ENV",
            "TIDEMARK_ENCRYPTION_KEY,AWS_SECRET_ACCESS_KEY",
        )],
    )?;
    ensure!(
        env.contains(&format!("TIDEMARK_ENCRYPTION_KEY={}", key_hex.as_str()))
            && env.contains("AWS_SECRET_ACCESS_KEY=drill-aws-secret-0451")
            && !has(&env, "AWS_SESSION_TOKEN"),
        "TIDEMARK_DRILL_CHECK_ENV did not pass exactly the variables named:\n{env}"
    );

    // A name that is not one is a usage error.
    let (code, out) = run_with_env(
        "tidemark-restore",
        &["drill", "--from", &f.urls[0], "--check-env", "A=B"],
        &secrets,
        &[],
    )?;
    ensure!(
        code == 2 && out.contains("--check-env"),
        "exit {code}:\n{out}"
    );
    Ok(())
}

/// An endpoint URL with credentials in it is refused wherever it comes from (the flag, the
/// AWS configuration's AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3), and the credentials are in
/// no message.
#[test]
fn an_endpoint_with_credentials_is_refused_and_never_shown() -> Result<()> {
    let secret = "endpoint-secret-0451";
    let with_creds = format!("http://AKIAENDPOINT0451:{secret}@127.0.0.1:9/");
    let aws = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "y"),
    ];
    let remove = [
        "TIDEMARK_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
        "TIDEMARK_ENCRYPTION_KEY",
        "TIDEMARK_ENCRYPTION_KEY_FILE",
    ];
    let url = "s3://tidemark-endpoint-test/x";
    let restore_list = ["-vv", "list", "--from", url];
    let archiver_status = ["status", "--to", url];
    for (name, value) in [
        ("AWS_ENDPOINT_URL", with_creds.as_str()),
        ("AWS_ENDPOINT_URL_S3", with_creds.as_str()),
        ("TIDEMARK_ENDPOINT_URL", with_creds.as_str()),
        (
            "TIDEMARK_ENDPOINT_URL",
            "ftp://user:endpoint-secret-0451@host/",
        ),
        (
            "TIDEMARK_ENDPOINT_URL",
            "http://user:endpoint-secret-0451@host:99999/",
        ),
    ] {
        let mut env = aws.to_vec();
        env.push((name, value));
        for (program, args) in [
            ("tidemark-restore", &restore_list[..]),
            ("tidemark-archiver", &archiver_status[..]),
        ] {
            let (code, out) = run_with_env(program, args, &env, &remove)?;
            ensure!(
                code == 2,
                "{program} with {name}={value}: exit {code}, expected 2:\n{out}"
            );
            ensure!(
                !out.contains(secret) && !out.contains("AKIAENDPOINT0451"),
                "{program} with {name}: the credentials are in the output:\n{out}"
            );
            ensure!(
                out.contains("contains credentials")
                    || out.contains("must not contain credentials")
                    || out.contains("must start with http")
                    || out.contains("is not a URL"),
                "{program} with {name}: no reason given:\n{out}"
            );
        }
    }
    Ok(())
}

/// A restored database whose OPTIONS file points a path option outside it (here
/// `db_log_dir`) gets a warning naming the option and its value, in the text report and in
/// the JSON one.
#[tokio::test(flavor = "multi_thread")]
async fn an_options_path_outside_the_restored_database_is_reported() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let mut o = rocksdb::Options::default();
    o.set_db_log_dir(logs.path());
    o.set_wal_ttl_seconds(3600);
    let f = Backups::new(1, Some(o))?;
    let value = logs.path().display().to_string();
    let restore = |target: &str, json: bool| -> Result<String> {
        let t = f.path(target).display().to_string();
        let mut args = vec!["restore", "--latest", "--from", &f.urls[0], "--target", &t];
        if json {
            args.push("--json");
        }
        let (code, out) = run_restore_tool(&args, &f.key_file)?;
        ensure!(code == 0, "restore: exit {code}\n{out}");
        Ok(out)
    };
    let text = restore("text", false)?;
    ensure!(
        text.lines().any(|l| l.starts_with("WARNING: OPTIONS-")
            && l.contains(&format!("db_log_dir = {value}"))
            && l.contains("outside the restored database")),
        "no warning about db_log_dir = {value}:\n{text}"
    );
    let json = restore("json", true)?;
    let start = json.find('{').context("no JSON report")?;
    let report: serde_json::Value = serde_json::Deserializer::from_str(&json[start..])
        .into_iter()
        .next()
        .context("no JSON report")??;
    let warnings = report["warnings"].as_array().context("no warnings list")?;
    ensure!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains(&format!("db_log_dir = {value}")))),
        "the JSON report does not warn about db_log_dir = {value}: {warnings:?}"
    );
    Ok(())
}
