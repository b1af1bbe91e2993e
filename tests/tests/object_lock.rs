//! Immutable backups with S3 Object Lock, against the S3 server (a bucket created with
//! Object Lock enabled) and the local-directory store: a live database archived into a
//! locked repository restores exactly; every object of the layout carries the repository's
//! retain-until date (the lease and the hint none); the server refuses to delete a locked
//! object version; `prune` deletes no locked object and reports how many it left and until
//! when; `list` and `status` show the lock; and the archiver refuses, saying why and exiting
//! with the usage code, a lock on a bucket without Object Lock, on a directory, a lock that
//! disagrees with the repository's recorded one, and lock settings that cannot work.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aws_sdk_s3::types::ObjectLockMode;
use tidemark_manifest::{exit, keys};
use tidemark_tests::harness::{TestStore, raw_s3_client};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, read_db_state_and_seq};

/// A lock of one day in GOVERNANCE mode, as the archiver's flags.
const LOCK_FLAGS: [&str; 4] = [
    "--object-lock-mode",
    "governance",
    "--object-lock-days",
    "1",
];

/// Writes for a few seconds while an archiver (with `extra` flags) takes a base every second.
async fn archive(s: &Setup, extra: &[&str]) -> Result<Oracle> {
    let writes = [
        "--duration",
        "4",
        "--rate",
        "300",
        "--seed",
        "31",
        "--flush-every",
        "200",
    ];
    s.archive(&writes, extra).await
}

/// Restores the newest point and compares it with the oracle, key by key.
fn restore_exactly(s: &Setup, oracle: &Oracle) -> Result<()> {
    let dir = s.path("restored");
    let target = dir.display().to_string();
    let (code, _, err) = s.run(
        "tidemark-restore",
        &[
            "--quiet",
            "restore",
            "--from",
            &s.store.url,
            "--target",
            &target,
            "--latest",
        ],
    )?;
    ensure!(code == 0, "restore: exit {code}: {err}");
    let (state, seq) = read_db_state_and_seq(&dir)?;
    ensure!(
        seq == oracle.last_seq(),
        "restored to {seq}, wrote up to {}",
        oracle.last_seq()
    );
    if let Some(d) = oracle.state_at(seq)?.diff(&state) {
        bail!("the restored database differs from what was written: {d}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The bucket and key prefix (with its trailing `/`) of an `s3://` URL.
fn bucket_and_prefix(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("s3://").context("not an s3:// URL")?;
    let (bucket, prefix) = rest.split_once('/').context("no prefix")?;
    Ok((bucket.to_owned(), format!("{prefix}/")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_repository_keeps_every_object_until_its_lock_ends() -> Result<()> {
    let Some(store) = TestStore::s3_locked("object-lock").await? else {
        return Ok(());
    };
    let endpoint = store.s3.endpoint_url.clone().context("no endpoint")?;
    let s = Setup::new(store)?.base_interval("1s");
    let oracle = archive(&s, &LOCK_FLAGS).await?;
    restore_exactly(&s, &oracle)?;

    // Every object of the layout carries the lock; the lease and the hint do not.
    let client = raw_s3_client(&endpoint).await;
    let (bucket, prefix) = bucket_and_prefix(&s.store.url)?;
    let repo = s.store.open().await?;
    let listed = repo.store().list("").await?;
    let mut locked = 0;
    let mut a_segment = None;
    for meta in &listed {
        let head = client
            .head_object()
            .bucket(&bucket)
            .key(format!("{prefix}{}", meta.key))
            .send()
            .await
            .with_context(|| format!("HEAD {}", meta.key))?;
        if meta.key == keys::LEASE || meta.key == keys::LATEST_HINT {
            ensure!(
                head.object_lock_mode().is_none() && head.object_lock_retain_until_date().is_none(),
                "{} must be written without a lock, it changes",
                meta.key
            );
            continue;
        }
        ensure!(
            head.object_lock_mode() == Some(&ObjectLockMode::Governance),
            "{} has lock mode {:?}",
            meta.key,
            head.object_lock_mode()
        );
        let until = head
            .object_lock_retain_until_date()
            .with_context(|| format!("{} has no retain-until date", meta.key))?;
        let written = head.last_modified().context("no Last-Modified")?;
        let span = until.secs() - written.secs();
        // One day from the write, give or take the clocks and the time the write took.
        ensure!(
            (86_400 - 300..=86_400 + 300).contains(&span),
            "{} is locked for {span} s after its write, not one day",
            meta.key
        );
        locked += 1;
        if meta.key.starts_with("wal/") {
            a_segment = Some((meta.key.clone(), head.version_id().map(str::to_owned)));
        }
    }
    ensure!(locked >= 5, "only {locked} locked objects in {listed:?}");

    // The server refuses to delete a locked version (without a bypass).
    let (key, version) = a_segment.context("no segment was listed")?;
    let version = version.context("a locked object has a version id")?;
    let refused = client
        .delete_object()
        .bucket(&bucket)
        .key(format!("{prefix}{key}"))
        .version_id(&version)
        .send()
        .await;
    let err = refused
        .err()
        .context("deleting a locked version succeeded")?;
    ensure!(
        format!("{err:?}").contains("AccessDenied"),
        "deleting a locked version failed otherwise: {err:?}"
    );

    // `list` and `status` show the lock, for people and as JSON.
    let url = s.store.url.clone();
    let (code, out, err) = s.run("tidemark-restore", &["list", "--from", &url])?;
    ensure!(
        code == 0 && out.contains("object lock GOVERNANCE for 1 days"),
        "list: {code}: {out}{err}"
    );
    let (code, out, _) = s.run("tidemark-restore", &["list", "--from", &url, "--json"])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        code == 0 && json["object_lock"] == serde_json::json!({"mode": "governance", "days": 1}),
        "list --json: {out}"
    );
    let (code, out, err) = s.run("tidemark-archiver", &["status", "--to", &url])?;
    ensure!(
        code == 0 && out.contains("object lock:  GOVERNANCE for 1 days"),
        "status: {code}: {out}{err}"
    );
    let (code, out, _) = s.run("tidemark-archiver", &["status", "--to", &url, "--json"])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        json["object_lock"]["mode"] == "governance",
        "status --json: {code}: {out}"
    );

    // Pruning drops old bases from the history but deletes no locked object: it reports
    // how many it left and when they become deletable.
    let before = repo.store().list("").await?;
    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "0s", "--json"])?;
    ensure!(code == 0, "prune: exit {code}: {err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let left = report["sweep"]["locked"]["objects"].as_u64().unwrap_or(0);
    ensure!(left > 0, "prune left no locked object: {out}");
    ensure!(
        report["sweep"]["deleted"]
            .as_object()
            .is_some_and(|d| d.is_empty()),
        "prune deleted locked objects: {out}"
    );
    ensure!(
        report["sweep"]["locked_all_deletable"].is_string(),
        "prune does not say when: {out}"
    );
    let after = repo.store().list("").await?;
    for meta in &before {
        ensure!(
            after.iter().any(|m| m.key == meta.key),
            "{} was deleted while locked",
            meta.key
        );
    }
    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "0s"])?;
    ensure!(
        code == 0 && out.contains("left under their object lock"),
        "prune's report: {code}: {out}{err}"
    );
    restore_exactly(&s, &oracle)?;

    // The recorded lock is what the archiver follows; a flag that disagrees is refused.
    let mut arch = s.archiver(
        "disagree.log",
        &[
            "--object-lock-mode",
            "compliance",
            "--object-lock-days",
            "1",
            "--exit-when-caught-up",
        ],
    )?;
    let status = arch.wait_timeout(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(s.path("disagree.log"))?;
    ensure!(
        status.code() == Some(i32::from(exit::USAGE))
            && log.contains("keeps the object lock it was created with"),
        "a disagreeing lock: {status:?}\n{log}"
    );
    // Without the flags it follows the recorded lock.
    let mut arch = s.archiver("follow.log", &["--exit-when-caught-up"])?;
    arch.wait_success(Duration::from_secs(90))?;

    // A copy into a directory cannot keep the lock: refused unless asked for, then unlocked.
    let dest = s.path("unlocked-copy");
    let to = format!("file://{}", dest.display());
    let copy = |extra: &[&str]| {
        let mut a = vec!["copy", "--from", &s.store.url, "--to", &to];
        a.extend(extra);
        s.run("tidemark-archiver", &a)
    };
    let (code, _, err) = copy(&[])?;
    ensure!(
        code == i32::from(exit::USAGE)
            && err.contains("cannot lock objects")
            && err.contains("--unlocked-copy")
            && !dest.join(keys::CONFIG).exists(),
        "a locked repository copied into a directory: exit {code}: {err}"
    );
    let (code, _, err) = copy(&["--unlocked-copy"])?;
    ensure!(code == 0, "copy --unlocked-copy: exit {code}: {err}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join(keys::CONFIG))?)?;
    ensure!(
        config.get("object_lock").is_none_or(|l| l.is_null()),
        "the unlocked copy records a lock it does not have: {config}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_without_object_lock_is_refused() -> Result<()> {
    let Some(store) = TestStore::s3("object-lock-plain").await? else {
        return Ok(());
    };
    refused_before_writing(store, &LOCK_FLAGS, "does not have S3 Object Lock enabled").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_store_is_refused() -> Result<()> {
    refused_before_writing(TestStore::local()?, &LOCK_FLAGS, "a directory cannot lock").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_settings_that_cannot_work_are_refused() -> Result<()> {
    for (flags, why) in [
        (
            &["--object-lock-mode", "governance"][..],
            "needs --object-lock-days",
        ),
        (&["--object-lock-days", "7"][..], "needs --object-lock-mode"),
        (
            &[
                "--object-lock-mode",
                "compliance",
                "--object-lock-days",
                "0",
            ][..],
            "between 1 and 36500",
        ),
        (
            &[
                "--object-lock-mode",
                "compliance",
                "--object-lock-days",
                "36501",
            ][..],
            "between 1 and 36500",
        ),
        (
            &["--object-lock-mode", "forever", "--object-lock-days", "7"][..],
            "governance or compliance",
        ),
    ] {
        refused_before_writing(TestStore::local()?, flags, why).await?;
    }
    Ok(())
}

/// Starts the archiver with `flags` on a fresh database and repository: it must exit with
/// the usage code, its output saying `why`, and no repository created.
async fn refused_before_writing(store: TestStore, flags: &[&str], why: &str) -> Result<()> {
    let s = Setup::new(store)?;
    let mut writer = s.loadgen(&["--duration", "1", "--rate", "50", "--seed", "3"])?;
    writer.wait_success(Duration::from_secs(60))?;
    let mut args = flags.to_vec();
    args.push("--exit-when-caught-up");
    let mut arch = s.archiver("refused.log", &args)?;
    let status = arch.wait_timeout(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(s.path("refused.log"))?;
    ensure!(
        status.code() == Some(i32::from(exit::USAGE)) && log.contains(why),
        "{flags:?}: expected exit {} saying {why:?}, got {status:?}:\n{log}",
        exit::USAGE
    );
    if let Ok(repo) = s.store.open().await {
        ensure!(
            repo.read_config().await.ok().flatten().is_none(),
            "{flags:?}: a repository was created although the lock was refused"
        );
    }
    Ok(())
}

/// A key rotation in a locked repository writes `keyring.json` with the lock: a credential
/// that may delete object versions must not be able to take every data key with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keyring_is_written_locked() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    use tidemark_manifest::store::EncryptionKey;
    use tidemark_tests::harness::{bin, run_with_timeout};
    let Some(store) = TestStore::s3_locked("object-lock-rekey").await? else {
        return Ok(());
    };
    let store = store.encrypted();
    let endpoint = store.s3.endpoint_url.clone().context("no endpoint")?;
    let s = Setup::new(store)?.base_interval("1s");
    let key_file = |name: &str, key: &EncryptionKey| -> Result<String> {
        let path = s.path(name);
        std::fs::write(&path, format!("{}\n", key.to_hex().as_str()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path.display().to_string())
    };
    let old = key_file("old.key", s.store.key.as_ref().context("no key")?)?;
    let new = key_file("new.key", &EncryptionKey::generate())?;
    archive(&s, &LOCK_FLAGS).await?;
    // `rekey` takes its keys by flag only.
    let env: Vec<(String, String)> = s
        .store
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("TIDEMARK_ENCRYPTION_KEY"))
        .cloned()
        .collect();
    let args = [
        "rekey",
        "--to",
        &s.store.url,
        "--old-key-file",
        &old,
        "--new-key-file",
        &new,
    ]
    .map(String::from);
    let (code, _, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &args,
        &env,
        Duration::from_secs(120),
    )?;
    ensure!(code == 0, "rekey: exit {code}: {err}");
    let (bucket, prefix) = bucket_and_prefix(&s.store.url)?;
    let head = raw_s3_client(&endpoint)
        .await
        .head_object()
        .bucket(&bucket)
        .key(format!("{prefix}{}", keys::KEYRING))
        .send()
        .await
        .context("HEAD keyring.json")?;
    ensure!(
        head.object_lock_mode() == Some(&ObjectLockMode::Governance)
            && head.object_lock_retain_until_date().is_some(),
        "keyring.json was written without the repository's lock: {:?} {:?}",
        head.object_lock_mode(),
        head.object_lock_retain_until_date()
    );
    Ok(())
}
