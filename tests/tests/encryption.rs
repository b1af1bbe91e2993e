//! Client-side encryption end to end, against the local-directory store and the S3 server:
//! a live database (the load generator) archived by `tidemark-archiver` with a key is
//! restored by `tidemark-restore` with that key to exactly what was written; no object at
//! rest but `tidemark.json` is readable without the key (values the application wrote are in
//! the decrypted objects and in none of the stored ones); a restore with a wrong key or none
//! fails clearly before writing anything; and no log line of either program, at debug level,
//! holds the key in any accepted encoding or the S3 secret key. On S3, server-side
//! encryption (`--sse`) reaches the objects as well.

use std::fs::File;
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
use tidemark_tests::harness::{Proc, TestStore, bin, wait_for, wait_for_database};
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

struct Setup {
    dir: tempfile::TempDir,
    store: TestStore,
    key: EncryptionKey,
    key_file: PathBuf,
    delivery: Delivery,
}

impl Setup {
    fn new(store: TestStore, delivery: Delivery) -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        let key = EncryptionKey::generate();
        let key_file = write_key_file(dir.path(), "key", &key)?;
        Ok(Setup {
            dir,
            store,
            key,
            key_file,
            delivery,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment the programs get: the store's, the key's (for the restore tool and
    /// for [`Delivery::Env`]), verbose logs.
    fn env(&self, key: Option<(&EncryptionKey, &Path)>) -> Vec<(String, String)> {
        let mut env = self.store.env.clone();
        if let Some((key, file)) = key {
            match self.delivery {
                Delivery::File => env.push((
                    "TIDEMARK_ENCRYPTION_KEY_FILE".into(),
                    file.display().to_string(),
                )),
                Delivery::Env => env.push((
                    "TIDEMARK_ENCRYPTION_KEY".into(),
                    base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
                )),
            }
        }
        env
    }

    fn archiver(&self) -> Result<Proc> {
        let mut args: Vec<String> = [
            "run",
            "--db",
            &self.path("db").display().to_string(),
            "--to",
            &self.store.url,
            "--sync-interval",
            "200ms",
            "--checkpoint-interval",
            "1s",
            "--base-interval",
            "2s",
        ]
        .map(String::from)
        .to_vec();
        let mut env = self.store.env.clone();
        match self.delivery {
            Delivery::File => {
                args.push("--encryption-key-file".into());
                args.push(self.key_file.display().to_string());
            }
            Delivery::Env => env = self.env(Some((&self.key, &self.key_file))),
        }
        if self.store.local_root().is_none() {
            env.push(("TIDEMARK_SSE".into(), "AES256".into()));
        }
        // Proc::spawn sets its own log filter; this test wants everything at debug level.
        let log = self.path("archiver.log");
        let out = File::create(&log)?;
        let child = Command::new(bin("tidemark-archiver")?)
            .args(&args)
            .envs(env)
            .env("TIDEMARK_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Proc {
            name: "tidemark-archiver".into(),
            child,
            log,
        })
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
    let s = Setup::new(store, delivery)?;
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
    let status = writer.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "load generator failed:\n{}",
        writer.log_tail()
    );
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
    arch.signal("TERM")?;
    let status = arch.wait_timeout(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "archiver exit {status}:\n{}",
        arch.log_tail()
    );

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
    let other_file = write_key_file(s.dir.path(), "other-key", &other)?;
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
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(s3.endpoint_url.clone().unwrap_or_default())
        .region(aws_config::Region::new(
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_archive_and_restore_local() -> Result<()> {
    archive_and_restore(TestStore::local()?, Delivery::File).await
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_archive_and_restore_on_s3() -> Result<()> {
    match TestStore::s3("encryption").await? {
        Some(store) => archive_and_restore(store, Delivery::Env).await,
        None => Ok(()),
    }
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
