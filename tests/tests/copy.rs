//! A second repository by `tidemark-archiver copy`, with real processes: the load generator
//! writes while an archiver runs on repository A and `copy` runs repeatedly into B; both
//! restore exactly what was written (compared with the oracle), a copy with nothing new
//! copies nothing, an interrupted copy resumes without copying again, a destination that is
//! unreachable for a while is caught up, and destinations that are not a copy (another
//! repository, a lease held, a diverged history, an encrypted source without a key) are
//! refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tidemark_manifest::exit;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::{EncryptionKey, LocalStore};
use tidemark_tests::faultproxy::{FaultPlan, FaultProxy};
use tidemark_tests::harness::{
    Proc, TestStore, bin, run_with_timeout, wait_archived, wait_for, wait_for_database, with_s3,
};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, read_db_state_and_seq};

/// Writes at this rate for this long (seconds) in every test.
const WRITES: [&str; 8] = [
    "--rate",
    "300",
    "--seed",
    "31",
    "--flush-every",
    "200",
    "--duration",
    "5",
];

/// `tidemark-archiver copy --from A --to B ARGS --json` with the source's environment:
/// exit code, the report (when it succeeded) and standard error.
fn copy(s: &Setup, to: &str, args: &[&str]) -> Result<(i32, Value, String)> {
    copy_env(s, to, args, &[])
}

fn copy_env(
    s: &Setup,
    to: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Result<(i32, Value, String)> {
    let from = s.programs_store().url.clone();
    let mut a: Vec<String> = ["copy", "--from", &from, "--to", to, "--json"]
        .map(String::from)
        .to_vec();
    a.extend(args.iter().map(|s| s.to_string()));
    let mut all_env = s.programs_store().env.clone();
    all_env.push(("TIDEMARK_LOG".into(), "info,aws=warn".into()));
    all_env.extend_from_slice(env);
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &a,
        &all_env,
        Duration::from_secs(240),
    )?;
    eprintln!(
        "$ tidemark-archiver {}\n-> {code}\n{out}\n{err}",
        a.join(" ")
    );
    let report = if code == 0 {
        serde_json::from_str(&out).context("the copy's JSON report")?
    } else {
        Value::Null
    };
    Ok((code, report, err))
}

fn num(report: &Value, field: &str) -> u64 {
    report[field].as_u64().unwrap_or(0)
}

/// Restores `store` into a fresh directory to `point` (`["--latest"]`, `["--seq", N]`) and
/// compares the result with what the writer wrote: the sequence it reached.
fn restore_exactly(
    s: &Setup,
    store: &TestStore,
    name: &str,
    point: &[&str],
    oracle: &Oracle,
) -> Result<u64> {
    let target = s.path(name);
    let t = target.display().to_string();
    let mut args = vec!["--quiet", "restore", "--from", &store.url, "--target", &t];
    args.extend_from_slice(point);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-restore")?,
        &args,
        &store.env,
        Duration::from_secs(180),
    )?;
    ensure!(
        code == 0,
        "restore from {} exited {code}:\n{out}\n{err}",
        store.url
    );
    let (actual, seq) = read_db_state_and_seq(&target)?;
    if let Some(d) = oracle.state_at(seq)?.diff(&actual) {
        bail!(
            "the database restored from {} differs from what was written at {seq}: {d}",
            store.url
        );
    }
    std::fs::remove_dir_all(&target)?;
    Ok(seq)
}

/// A batch boundary about halfway through what `store` can restore.
async fn middle_point(store: &TestStore, oracle: &Oracle) -> Result<u64> {
    let state = store.open().await?.load().await?;
    let first = state
        .history
        .window()
        .ranges
        .first()
        .context("nothing restorable")?
        .first_seq;
    let mid = first + (oracle.last_seq() - first) / 2;
    oracle
        .batches()
        .iter()
        .map(|b| b.last_seq())
        .filter(|&s| s >= first && s <= mid)
        .max()
        .with_context(|| format!("no batch ends in {first}..={mid}"))
}

/// Writes while an archiver runs on A and copies run into `dest` one after another; once
/// the writer stopped and A holds everything, a last copy. Returns the oracle.
async fn write_while_copying(s: &Setup, dest: &TestStore, extra: &[&str]) -> Result<Oracle> {
    let mut writer = s.loadgen(&WRITES)?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &[])?;
    // Copies start once A exists and has a segment.
    let start = Instant::now();
    while s.archived_seq().await.is_none() {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "A got no segment"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut copies = 0;
    while writer.running() {
        let (code, _, err) = copy(s, &dest.url, extra)?;
        ensure!(code == 0, "a copy while writing exited {code}: {err}");
        copies += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    wait_archived(
        &s.store,
        oracle.last_seq(),
        &mut arch,
        Duration::from_secs(60),
    )
    .await?;
    arch.stop(Duration::from_secs(30))?;
    ensure!(copies >= 2, "only {copies} copies ran while writing");
    let (code, last, err) = copy(s, &dest.url, extra)?;
    ensure!(code == 0, "the last copy exited {code}: {err}");
    ensure!(
        num(&last, "reached_seq") == oracle.last_seq(),
        "the last copy reached {:?}, the writer {}",
        last["reached_seq"],
        oracle.last_seq()
    );
    Ok(oracle)
}

/// B restores the latest point and one in the middle exactly; a copy with nothing new
/// copies nothing and writes no generation.
async fn check_copy(s: &Setup, dest: &TestStore, oracle: &Oracle, extra: &[&str]) -> Result<()> {
    let (code, again, err) = copy(s, &dest.url, extra)?;
    ensure!(code == 0, "a copy with nothing new exited {code}: {err}");
    ensure!(
        num(&again, "objects_copied") == 0
            && num(&again, "objects_verified") == 0
            && again["generation_written"].is_null(),
        "a copy with nothing new did something: {again}"
    );
    let latest = restore_exactly(s, dest, "latest", &["--latest"], oracle)?;
    ensure!(latest == oracle.last_seq(), "B restored to {latest}");
    let mid = middle_point(dest, oracle).await?;
    let got = restore_exactly(s, dest, "middle", &["--seq", &mid.to_string()], oracle)?;
    ensure!(got == mid, "B restored to {got}, asked for {mid}");
    // Both are the same repository.
    let a = s.store.open().await?.require_config().await?;
    let b = dest.open().await?.require_config().await?;
    ensure!(a.repository_id == b.repository_id && a.lineage == b.lineage);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_a_local_repository_into_another_while_it_is_written() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.base_interval("2s");
    let dest = TestStore::local()?;
    let oracle = write_while_copying(&s, &dest, &[]).await?;
    check_copy(&s, &dest, &oracle, &[]).await?;
    // Retention at the copy is its own: `prune --to B` keeps the newest base.
    let (code, _, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &[
            "prune",
            "--to",
            &dest.url,
            "--keep-last",
            "1",
            "--grace",
            "0s",
        ]
        .map(String::from),
        &[],
        Duration::from_secs(120),
    )?;
    ensure!(code == 0, "prune --to B exited {code}: {err}");
    let latest = restore_exactly(&s, &dest, "after-prune", &["--latest"], &oracle)?;
    ensure!(latest == oracle.last_seq());
    // The next copy brings back nothing the destination pruned, and refuses nothing.
    let (code, after, err) = copy(&s, &dest.url, &[])?;
    ensure!(code == 0, "a copy after pruning B exited {code}: {err}");
    eprintln!("after pruning B: {after}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_from_s3_into_a_local_directory_while_it_is_written() -> Result<()> {
    with_s3("copy-s3-to-local", |store| async move {
        let s = Setup::new(store)?.base_interval("2s");
        let dest = TestStore::local()?;
        let oracle = write_while_copying(&s, &dest, &[]).await?;
        check_copy(&s, &dest, &oracle, &[]).await
    })
    .await
}

/// The objects of a local repository, by key: everything but its config, lease and
/// manifest, and the store's temporary files.
fn data_objects(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tidemark-") {
                continue;
            }
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.retain(|k| !k.starts_with("manifest/") && k != "tidemark.json" && k != "lease.json");
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_copy_resumes_without_copying_again() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.base_interval("1s");
    let oracle = s.archive(&WRITES, &[]).await?;
    let dest = TestStore::local()?;
    let root = dest.local_root().unwrap();
    // A slow copy (uploads at 512 KiB/s), killed once it is copying base files: after the
    // segments and index pages, before the generation.
    let slow = s.path("slow.toml");
    std::fs::write(&slow, "[store]\nmax_upload_rate = \"512KiB/s\"\n")?;
    let from = s.store.url.clone();
    let slow_str = slow.display().to_string();
    let mut p = Proc::spawn(
        &bin("tidemark-archiver")?,
        &[
            "copy",
            "--from",
            &from,
            "--to",
            &dest.url,
            "--to-config",
            &slow_str,
            "--lease-ttl",
            "10s",
        ]
        .map(String::from),
        &[],
        &s.path("interrupted.log"),
    )?;
    wait_for(Duration::from_secs(120), "base files at B", || {
        data_objects(&root)
            .iter()
            .any(|k| k.starts_with("sst/") || k.starts_with("bases/"))
            .then_some(())
    })?;
    p.kill_running()?;
    let present: Vec<String> = data_objects(&root);
    eprintln!("killed with {} data objects at B", present.len());

    // What is left to do, by a dry run (no lease needed).
    let (code, plan, err) = copy(&s, &dest.url, &["--dry-run"])?;
    ensure!(code == 0, "dry run exited {code}: {err}");
    let planned: Vec<String> = plan["planned"]
        .as_array()
        .context("the dry run lists what it would copy")?
        .iter()
        .map(|o| o["key"].as_str().unwrap_or_default().to_owned())
        .collect();
    let there = planned.iter().filter(|k| present.contains(k)).count() as u64;
    ensure!(
        there > 0,
        "none of the objects at B is planned: {present:?}"
    );
    // Every object the killed copy wrote is either in B's state already (its tail walk
    // finds the segments) or planned, to be checked rather than copied.
    ensure!(
        present.len() as u64 == num(&plan, "objects_skipped") + there,
        "{} objects at B ({present:?}), {there} of them planned, {} skipped: {plan}",
        present.len(),
        plan["objects_skipped"]
    );

    // The killed copy's lease runs out; the next copy then takes it and completes.
    let start = Instant::now();
    let report = loop {
        let (code, report, err) = copy(&s, &dest.url, &["--lease-ttl", "10s"])?;
        if code == 0 {
            break report;
        }
        ensure!(
            code == i32::from(exit::LEASE_HELD) && start.elapsed() < Duration::from_secs(90),
            "the resumed copy exited {code}: {err}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    ensure!(
        num(&report, "objects_verified") == there
            && num(&report, "objects_copied") == planned.len() as u64 - there,
        "of {} planned objects {there} were at B already; the resumed copy reports {report}",
        planned.len()
    );
    check_copy(&s, &dest, &oracle, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_destination_fails_the_copy_and_is_caught_up_later() -> Result<()> {
    with_s3("copy-outage", |dest| async move {
        let s = Setup::new(TestStore::local()?)?.base_interval("2s");
        let endpoint = dest.s3.endpoint_url.clone().context("an endpoint")?;
        let proxy = FaultProxy::start(&endpoint, FaultPlan::none(), 7)?;
        let conf = s.path("dest.toml");
        std::fs::write(
            &conf,
            format!(
                "[store]\nendpoint_url = \"{}\"\npath_style = true\nrequest_timeout = 2\n",
                proxy.url()
            ),
        )?;
        let conf = conf.display().to_string();
        let to_dest = ["--to-config", conf.as_str()];

        let mut writes = WRITES;
        writes[7] = "10";
        let mut writer = s.loadgen(&writes)?;
        wait_for_database(&s.db())?;
        let mut arch = s.archiver("archiver.log", &[])?;
        let start = Instant::now();
        while s.archived_seq().await.is_none() {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "A got no segment"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (code, _, err) = copy(&s, &dest.url, &to_dest)?;
        ensure!(code == 0, "the first copy exited {code}: {err}");

        proxy.set_plan(FaultPlan::down())?;
        proxy.reset_open();
        let before = s.archived_seq().await;
        let (code, _, err) = copy(&s, &dest.url, &to_dest)?;
        ensure!(
            code == i32::from(exit::FAILURE) && err.contains(&dest.url),
            "a copy to an unreachable destination exited {code}, expected {} naming it: {err}",
            exit::FAILURE
        );
        let after = s.archived_seq().await;
        ensure!(
            arch.running() && after > before,
            "A did not stay current while B was unreachable ({before:?} -> {after:?})"
        );
        proxy.set_plan(FaultPlan::none())?;

        writer.wait_success(Duration::from_secs(90))?;
        let oracle = s.oracle()?;
        wait_archived(
            &s.store,
            oracle.last_seq(),
            &mut arch,
            Duration::from_secs(60),
        )
        .await?;
        arch.stop(Duration::from_secs(30))?;
        // The destination's lease from the failed run may still be live: wait it out.
        let start = Instant::now();
        let report = loop {
            let (code, report, err) = copy(&s, &dest.url, &to_dest)?;
            if code == 0 {
                break report;
            }
            ensure!(
                code == i32::from(exit::LEASE_HELD) && start.elapsed() < Duration::from_secs(120),
                "the catch-up copy exited {code}: {err}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        ensure!(num(&report, "reached_seq") == oracle.last_seq(), "{report}");
        let latest = restore_exactly(&s, &dest, "latest", &["--latest"], &oracle)?;
        ensure!(latest == oracle.last_seq());
        Ok(())
    })
    .await
}

/// A key in a file of the test's directory.
fn key_file(s: &Setup, name: &str, key: &EncryptionKey) -> Result<PathBuf> {
    let path = s.path(name);
    std::fs::write(&path, key.to_hex().as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_between_keys_and_from_plaintext_into_an_encrypted_copy() -> Result<()> {
    // An encrypted source (its key in TIDEMARK_ENCRYPTION_KEY) into a copy with another key.
    let s = Setup::new(TestStore::local()?.encrypted())?.base_interval("1s");
    let oracle = s.archive(&WRITES, &[]).await?;
    let other = EncryptionKey::generate();
    let other_file = key_file(&s, "other.key", &other)?;
    let mut dest = TestStore::local()?;
    dest.env
        .push(("TIDEMARK_ENCRYPTION_KEY".into(), other.to_hex().to_string()));
    dest.key = Some(other.clone());
    let f = other_file.display().to_string();
    let (code, report, err) = copy(&s, &dest.url, &["--to-encryption-key-file", &f])?;
    ensure!(code == 0, "copy between keys exited {code}: {err}");
    ensure!(num(&report, "objects_copied") > 0);
    let latest = restore_exactly(&s, &dest, "between-keys", &["--latest"], &oracle)?;
    ensure!(latest == oracle.last_seq());
    let config = dest.open().await?.require_config().await?;
    ensure!(config.encryption.map(|e| e.key_id) == Some(other.key_id()));

    // Without a key for the destination, an encrypted source is not stored in the clear.
    let plain = TestStore::local()?;
    let (code, _, err) = copy(&s, &plain.url, &[])?;
    ensure!(
        code == i32::from(exit::USAGE) && err.contains("in the clear"),
        "an encrypted source into a copy without a key exited {code}: {err}"
    );

    // A plaintext source: refused by B (another repository), copied into a new encrypted
    // copy.
    let p = Setup::new(TestStore::local()?)?.base_interval("1s");
    let oracle = p.archive(&WRITES, &[]).await?;
    let (code, _, err) = copy(&p, &dest.url, &["--to-encryption-key-file", &f])?;
    ensure!(
        code == i32::from(exit::USAGE) && err.contains("another repository"),
        "a copy of another repository into B exited {code}: {err}"
    );
    let mut enc = TestStore::local()?;
    enc.env
        .push(("TIDEMARK_ENCRYPTION_KEY".into(), other.to_hex().to_string()));
    let (code, _, err) = copy(&p, &enc.url, &["--to-encryption-key-file", &f])?;
    ensure!(
        code == 0,
        "plaintext into an encrypted copy exited {code}: {err}"
    );
    let latest = restore_exactly(&p, &enc, "into-encrypted", &["--latest"], &oracle)?;
    ensure!(latest == oracle.last_seq());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_another_repository_a_held_lease_and_a_diverged_copy() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.base_interval("1s");
    s.archive(&WRITES, &[]).await?;

    // Another repository id at the destination.
    let a = s.store.open().await?.require_config().await?;
    let other = TestStore::local()?;
    let other_root = other.local_root().unwrap();
    let repo = Repository::new(std::sync::Arc::new(LocalStore::create(&other_root)?));
    let mut config = a.clone();
    config.repository_id = "00000000-0000-4000-8000-000000000000".into();
    repo.create_config(&config).await?;
    let (code, _, err) = copy(&s, &other.url, &[])?;
    ensure!(
        code == i32::from(exit::USAGE) && err.contains("repository id"),
        "a copy into another repository exited {code}: {err}"
    );

    // A good copy, then an archiver pointed at it: the copy is refused while it runs.
    let dest = TestStore::local()?;
    let (code, _, err) = copy(&s, &dest.url, &[])?;
    ensure!(code == 0, "the copy exited {code}: {err}");
    let db = s.db().display().to_string();
    let mut wrong = Proc::spawn(
        &bin("tidemark-archiver")?,
        &["run", "--db", &db, "--to", &dest.url].map(String::from),
        &[],
        &s.path("wrong-archiver.log"),
    )?;
    let dest_repo = dest.open().await?;
    let start = Instant::now();
    while dest_repo
        .live_lease(time::OffsetDateTime::now_utc())
        .await?
        .is_none()
    {
        ensure!(
            wrong.running() && start.elapsed() < Duration::from_secs(60),
            "the archiver at B took no lease:\n{}",
            wrong.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = copy(&s, &dest.url, &[])?;
    ensure!(
        code == i32::from(exit::LEASE_HELD),
        "a copy while an archiver holds B exited {code}: {err}"
    );
    wrong.stop(Duration::from_secs(30))?;
    // An archiver takes a base backup at B: a base A never had.
    let (code, _, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &["backup", "--db", &db, "--to", &dest.url].map(String::from),
        &[],
        Duration::from_secs(120),
    )?;
    ensure!(code == 0, "backup into B exited {code}: {err}");

    // B now holds a base A never had: the copy refuses and leaves B as it is.
    let before = data_objects(&dest.local_root().unwrap());
    let (code, _, err) = copy(&s, &dest.url, &[])?;
    ensure!(
        code == i32::from(exit::VERIFICATION_FAILED) && err.contains("diverged"),
        "a copy into a diverged destination exited {code}: {err}"
    );
    ensure!(data_objects(&dest.local_root().unwrap()) == before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_every_keeps_a_copy_current_until_stopped() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.base_interval("2s");
    let dest = TestStore::local()?;
    let mut writer = s.loadgen(&WRITES)?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &[])?;
    let from = s.store.url.clone();
    // The copier starts once A exists (no repository at --from is bad usage: it would end).
    let start = Instant::now();
    while s.archived_seq().await.is_none() {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "A got no segment"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut copier = Proc::spawn(
        &bin("tidemark-archiver")?,
        &[
            "copy", "--from", &from, "--to", &dest.url, "--json", "--every", "500ms",
        ]
        .map(String::from),
        &[],
        &s.path("copier.log"),
    )?;
    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    wait_archived(
        &s.store,
        oracle.last_seq(),
        &mut arch,
        Duration::from_secs(60),
    )
    .await?;
    arch.stop(Duration::from_secs(30))?;
    wait_archived(
        &dest,
        oracle.last_seq(),
        &mut copier,
        Duration::from_secs(90),
    )
    .await?;
    copier.stop(Duration::from_secs(30))?;
    let latest = restore_exactly(&s, &dest, "latest", &["--latest"], &oracle)?;
    ensure!(latest == oracle.last_seq(), "B restored to {latest}");
    Ok(())
}
