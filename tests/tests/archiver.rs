//! The archiver as a separate process beside a database written by another process (the
//! load generator), against the local-directory store and the S3 server: the history it
//! leaves is contiguous from a base backup to the last write, survives `kill -9` at random
//! moments, and bad starts fail fast with a message that names the problem.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tidemark_manifest::exit;
use tidemark_manifest::plan::Target;
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{
    Proc, TestStore, bin, check_history, run_with_timeout, wait_archived, wait_for,
    wait_for_database,
};
use tidemark_tests::setup::Setup;

/// Whether `lease.json` holds a live lease (a released one stays after a clean stop).
fn live_lease(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| {
        tidemark_manifest::model::parse_document::<tidemark_manifest::model::Lease>(
            "lease.json",
            &bytes,
        )
        .is_ok_and(|l| l.is_live(time::OffsetDateTime::now_utc()))
    })
}

async fn archives_a_live_database(store: TestStore) -> Result<()> {
    eprintln!("archiving into {}", store.describe);
    let s = Setup::new(store)?;
    let oracle = s
        .archive(
            &["--duration", "8", "--rate", "500", "--seed", "7"],
            &["--base-interval", "3s"],
        )
        .await?;
    check_history(&s.store, &oracle, 2).await?;
    // A clean shutdown released the lease.
    let repo = s.store.open().await?;
    ensure!(
        repo.read_lease()
            .await?
            .is_some_and(|(l, _)| l.released_at.is_some()),
        "the lease was not released"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_a_live_database_to_a_local_directory() -> Result<()> {
    archives_a_live_database(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_a_live_database_to_s3() -> Result<()> {
    with_s3("archiver-live", archives_a_live_database).await
}

async fn survives_kill_9(store: TestStore, kills: usize) -> Result<()> {
    let s = Setup::new(store)?;
    let mut writer = s.loadgen(&["--duration", "12", "--rate", "800", "--seed", "11"])?;
    wait_for_database(&s.db())?;
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for i in 0..kills {
        let mut arch = s.archiver(&format!("archiver-{i}.log"), &["--base-interval", "2s"])?;
        let alive = Duration::from_millis(300 + next() % 1700);
        std::thread::sleep(alive);
        arch.kill_running()?;
    }
    writer.wait_success(Duration::from_secs(60))?;
    let oracle = s.oracle()?;
    let mut arch = s.archiver("archiver-final.log", &["--base-interval", "1h"])?;
    wait_archived(
        &s.store,
        oracle.last_seq(),
        &mut arch,
        Duration::from_secs(60),
    )
    .await?;
    arch.stop(Duration::from_secs(30))?;
    check_history(&s.store, &oracle, 1).await
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_kill_9_at_random_moments_local() -> Result<()> {
    survives_kill_9(TestStore::local()?, 6).await
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_kill_9_at_random_moments_s3() -> Result<()> {
    with_s3("archiver-kill9", |store| survives_kill_9(store, 4)).await
}

/// Runs the archiver to completion (at most three minutes) and returns (exit code, output).
fn run_archiver(args: &[&str], env: &[(String, String)]) -> Result<(i32, String)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &args,
        env,
        Duration::from_secs(180),
    )?;
    Ok((code, format!("{out}{err}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_starts_fail_fast_and_say_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo_url = format!("file://{}", dir.path().join("repo").display());

    // A missing directory.
    let missing = dir.path().join("nope");
    let (code, text) = run_archiver(
        &[
            "run",
            "--db",
            &missing.display().to_string(),
            "--to",
            &repo_url,
        ],
        &[],
    )?;
    ensure!(
        code == 2 && text.contains("nope"),
        "missing dir: {code} {text}"
    );

    // A database that deletes its rotated WAL files.
    let bad_db = dir.path().join("bad-db");
    {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        let db = rocksdb::DB::open(&o, &bad_db)?;
        db.put(b"k", b"v")?;
    }
    let (code, text) = run_archiver(
        &[
            "run",
            "--db",
            &bad_db.display().to_string(),
            "--to",
            &repo_url,
        ],
        &[],
    )?;
    ensure!(
        code == 2 && text.contains("WAL_ttl_seconds"),
        "misconfigured db: {code} {text}"
    );

    // An unreachable store: fails, naming the endpoint, without hanging.
    let s = Setup::new(TestStore::local()?)?;
    let mut writer = s.loadgen(&["--batches", "200"])?;
    writer.wait_timeout(Duration::from_secs(30))?;
    let started = std::time::Instant::now();
    let (code, text) = run_archiver(
        &[
            "run",
            "--db",
            &s.db().display().to_string(),
            "--to",
            "s3://tidemark-nowhere/x",
            "--endpoint-url",
            "http://127.0.0.1:9",
            "--path-style",
        ],
        &[
            ("AWS_ACCESS_KEY_ID".into(), "x".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "y".into()),
        ],
    )?;
    ensure!(code != 0, "unreachable store must fail: {text}");
    ensure!(
        text.contains("127.0.0.1:9"),
        "message must name the endpoint: {text}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?} to give up",
        started.elapsed()
    );

    // A held lease: a second archiver on the same repository refuses, naming the holder.
    let mut first = s.archiver("first.log", &[])?;
    let lease = s.store.local_root().unwrap().join("lease.json");
    wait_for(
        Duration::from_secs(20),
        "the first archiver's lease",
        || live_lease(&lease).then_some(()),
    )?;
    let (code, text) = run_archiver(
        &[
            "run",
            "--db",
            &s.db().display().to_string(),
            "--to",
            &s.store.url,
        ],
        &[],
    )?;
    ensure!(
        code == i32::from(exit::LEASE_HELD)
            && text.contains("another archiver")
            && text.contains(&first.child.id().to_string()),
        "held lease: {code} {text}"
    );
    first.signal("TERM")?;
    first.wait_timeout(Duration::from_secs(30))?;

    // Wrong credentials, where the S3 server checks them.
    if std::env::var("TIDEMARK_TEST_S3_AUTH").as_deref() == Ok("1")
        && let Some(store) = TestStore::s3("archiver-creds").await?
    {
        let mut env = store.env.clone();
        env.push(("AWS_ACCESS_KEY_ID".into(), "AKIAWRONGWRONGWRONG0".into()));
        env.push(("AWS_SECRET_ACCESS_KEY".into(), "wrong-secret".into()));
        let (code, text) = run_archiver(
            &[
                "run",
                "--db",
                &s.db().display().to_string(),
                "--to",
                &store.url,
            ],
            &env,
        )?;
        ensure!(
            code != 0 && text.to_lowercase().contains("credentials"),
            "wrong credentials: {code} {text}"
        );
    }
    Ok(())
}

/// Options for a database a test writes itself: created if missing, its WAL files kept for
/// an hour (as the archiver requires).
fn archivable_options() -> rocksdb::Options {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_wal_ttl_seconds(3600);
    opts
}

/// `tidemark-archiver backup` with no archiver running: archives the WAL, takes a base, exits.
fn one_shot_backup(db: &Path, store: &TestStore) -> Result<(i32, String)> {
    run_archiver(
        &[
            "backup",
            "--db",
            &db.display().to_string(),
            "--to",
            &store.url,
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_family_change_takes_a_base_and_marks_the_points_before_it() -> Result<()> {
    use tidemark_manifest::model::GapKind;
    use tidemark_manifest::plan::PlanError;

    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let store = TestStore::local()?;
    let opts = archivable_options();
    let mut db = rocksdb::DB::open(&opts, &db_path)?; // the test owns the database
    for i in 0..200u32 {
        db.put(format!("k{i}"), b"v")?;
    }
    let args: Vec<String> = [
        "run",
        "--db",
        &db_path.display().to_string(),
        "--to",
        &store.url,
        "--sync-interval",
        "100ms",
        "--checkpoint-interval",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut arch = Proc::spawn(
        &bin("tidemark-archiver")?,
        &args,
        &[],
        &dir.path().join("archiver.log"),
    )?;
    let repo_root = store.local_root().unwrap();
    wait_for(Duration::from_secs(30), "the first base", || {
        std::fs::read_dir(repo_root.join("bases"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|_| ())
    })?;
    let repo = store.open().await?;
    wait_for_history(&repo, |s| !s.history.bases.is_empty()).await?;
    // Create a column family and write to it, then more to the default one.
    db.create_cf("added", &opts)?;
    let added = db.cf_handle("added").unwrap();
    for i in 0..100u32 {
        db.put_cf(&added, format!("a{i}"), b"x")?;
    }
    for i in 0..100u32 {
        db.put(format!("z{i}"), b"v")?;
    }
    let last = db.latest_sequence_number();
    wait_for_history(&repo, |s| {
        s.history.bases.len() >= 2
            && s.history
                .gaps
                .iter()
                .any(|g| g.kind == GapKind::ColumnFamilyChange)
            && s.history.segments.last().map(|x| x.last_seq) == Some(last)
    })
    .await
    .with_context(|| arch.log_tail())?;
    arch.stop(Duration::from_secs(30))?;
    let state = repo.load().await?;
    let gap = state
        .history
        .gaps
        .iter()
        .find(|g| g.kind == GapKind::ColumnFamilyChange)
        .unwrap()
        .clone();
    let newest = state.history.bases.last().unwrap();
    ensure!(
        newest.column_families.iter().any(|c| c.name == "added"),
        "the new base must know the new column family: {:?}",
        newest.column_families
    );
    ensure!(
        gap.last_seq + 1 == newest.earliest_seq,
        "{gap:?} vs {newest:?}"
    );
    ensure!(
        gap.first_seq <= 201,
        "the change happened after sequence 200: {gap:?}"
    );
    match state.history.plan(Target::Seq(gap.last_seq)) {
        Err(PlanError::InGap { .. }) => {}
        other => anyhow::bail!("a target inside the change must be refused, got {other:?}"),
    }
    let window = state.history.window();
    ensure!(
        state.history.plan(Target::Seq(last)).is_ok(),
        "the latest point must restore: {window}; {gap:?}"
    );
    ensure!(
        state.history.plan(Target::Seq(200)).is_ok(),
        "the point before the change must restore: {window}; {gap:?}; bases {:?}; log:\n{}",
        state
            .history
            .bases
            .iter()
            .map(|b| (b.replay_from_seq, b.earliest_seq))
            .collect::<Vec<_>>(),
        arch.log_tail()
    );
    drop(db);
    Ok(())
}

async fn wait_for_history(
    repo: &tidemark_manifest::repo::Repository,
    done: impl Fn(&tidemark_manifest::repo::RepoState) -> bool,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(s) = repo.load().await
            && done(&s)
        {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the repository did not reach the expected state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `tidemark-archiver run` on `db` until the repository holds `last` and `done` holds.
async fn archive_until(
    db: &Path,
    store: &TestStore,
    log: &Path,
    last: u64,
    done: impl Fn(&tidemark_manifest::repo::RepoState) -> bool,
) -> Result<()> {
    let args: Vec<String> = [
        "run",
        "--db",
        &db.display().to_string(),
        "--to",
        &store.url,
        "--sync-interval",
        "100ms",
        "--checkpoint-interval",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut arch = Proc::spawn(&bin("tidemark-archiver")?, &args, &store.env, log)?;
    let repo = store.open_when_created().await?;
    wait_for_history(&repo, |s| {
        s.history.segments.last().map(|x| x.last_seq) == Some(last) && done(s)
    })
    .await
    .with_context(|| arch.log_tail())?;
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wal_deleted_before_it_was_archived_is_a_gap_healed_by_a_new_base() -> Result<()> {
    use tidemark_manifest::model::GapKind;
    use tidemark_manifest::plan::PlanError;

    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let store = TestStore::local()?;
    // The test owns the database; rotated WAL files are kept for one second only.
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_wal_ttl_seconds(1);
    opts.set_write_buffer_size(64 << 10);
    let db = rocksdb::DB::open(&opts, &db_path)?;
    let value = vec![b'x'; 1000];
    let write = |from: u32, n: u32| -> Result<()> {
        for i in from..from + n {
            db.put(format!("k{i:06}"), &value)?;
        }
        Ok(())
    };
    write(0, 300)?;
    let first_last = db.latest_sequence_number();
    archive_until(
        &db_path,
        &store,
        &dir.path().join("a1.log"),
        first_last,
        |s| !s.history.bases.is_empty(),
    )
    .await?;

    // The archiver is stopped; the database goes on and its old WAL files expire.
    for round in 0..4u32 {
        write(1000 + round * 300, 300)?;
        db.flush()?;
        std::thread::sleep(Duration::from_millis(1200));
    }
    write(5000, 10)?;
    db.flush()?;
    let last = db.latest_sequence_number();

    archive_until(&db_path, &store, &dir.path().join("a2.log"), last, |s| {
        s.history.gaps.iter().any(|g| g.kind == GapKind::MissingWal) && s.history.bases.len() >= 2
    })
    .await?;
    let state = store.open().await?.load().await?;
    let gap = state
        .history
        .gaps
        .iter()
        .find(|g| g.kind == GapKind::MissingWal)
        .unwrap()
        .clone();
    ensure!(
        gap.first_seq == first_last + 1,
        "the gap must start right after what was archived ({first_last}): {gap:?}"
    );
    ensure!(gap.last_seq < last, "{gap:?}");
    for target in [gap.first_seq, gap.last_seq] {
        match state.history.plan(Target::Seq(target)) {
            Err(e @ PlanError::InGap { .. }) => {
                ensure!(e.to_string().contains("gap"), "{e}");
            }
            other => anyhow::bail!("a target in the gap must be refused: {other:?}"),
        }
    }
    let newest = state
        .history
        .bases
        .iter()
        .max_by_key(|b| b.earliest_seq)
        .unwrap();
    ensure!(newest.earliest_seq > gap.last_seq, "{newest:?} {gap:?}");
    let plan = state.history.plan(Target::Latest)?;
    ensure!(plan.max_seq == last && plan.base.id == newest.id);
    ensure!(state.history.plan(Target::Seq(first_last)).is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_asks_a_running_archiver_or_runs_once_and_status_checks_thresholds() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?;
    let mut writer = s.loadgen(&["--batches", "2000"])?;
    writer.wait_success(Duration::from_secs(60))?;
    let db = s.db().display().to_string();
    let bases =
        |root: &Path| -> usize { std::fs::read_dir(root.join("bases")).map_or(0, |d| d.count()) };
    let root = s.store.local_root().unwrap();

    // No archiver running: `backup` archives the WAL, takes a base and exits.
    let (code, text) = run_archiver(&["backup", "--db", &db, "--to", &s.store.url], &[])?;
    ensure!(code == 0, "one-shot backup: {code} {text}");
    ensure!(bases(&root) == 1, "one base after the one-shot backup");

    // An archiver running with a long base interval: `backup` asks it for one and waits
    // until it is taken.
    let mut arch = s.archiver("running.log", &["--base-interval", "24h"])?;
    wait_for(Duration::from_secs(20), "the lease", || {
        live_lease(&root.join("lease.json")).then_some(())
    })?;
    let (code, text) = run_archiver(&["backup", "--db", &db, "--to", &s.store.url], &[])?;
    ensure!(
        code == 0
            && text.contains("asked the running archiver")
            && text.contains("the running archiver took base backup"),
        "backup with a running archiver: {code} {text}\n{}",
        arch.log_tail()
    );
    let repo = s.store.open().await?;
    ensure!(
        repo.load().await?.history.bases.len() == 2,
        "the base is in the history when backup returns"
    );
    arch.stop(Duration::from_secs(30))?;

    // status: thresholds turn into `THRESHOLD_EXCEEDED`.
    let (code, text) = run_archiver(&["status", "--to", &s.store.url, "--json"], &[])?;
    ensure!(code == 0, "status: {code} {text}");
    let report: serde_json::Value = serde_json::from_str(text.trim())?;
    ensure!(report["bases"].as_u64() >= Some(2), "{report}");
    let (code, text) = run_archiver(
        &[
            "status",
            "--to",
            &s.store.url,
            "--max-base-age",
            "1h",
            "--max-lag",
            "1h",
        ],
        &[],
    )?;
    ensure!(
        code == 0,
        "fresh repository within thresholds: {code} {text}"
    );
    std::thread::sleep(Duration::from_millis(50));
    let (code, text) = run_archiver(&["status", "--to", &s.store.url, "--max-lag", "10ms"], &[])?;
    ensure!(
        code == i32::from(exit::THRESHOLD_EXCEEDED) && text.contains("newest record"),
        "lag threshold exceeded: {code} {text}"
    );
    Ok(())
}

/// Kills the process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A live lease naming this host and the pid of an unrelated process (as a crashed
/// archiver's lease does once its pid is reused, or another container's pid 1): `backup`
/// sends that process nothing, says that no archiver runs here, and answers with the
/// lease's refusal instead of a base it cannot take.
#[tokio::test(flavor = "multi_thread")]
async fn backup_never_signals_a_pid_read_from_the_lease() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?;
    let mut writer = s.loadgen(&["--batches", "300"])?;
    writer.wait_success(Duration::from_secs(60))?;
    let db = s.db().display().to_string();
    let (code, text) = run_archiver(&["backup", "--db", &db, "--to", &s.store.url], &[])?;
    ensure!(code == 0, "one-shot backup: {code} {text}");

    let mut sleeper = KillOnDrop(std::process::Command::new("sleep").arg("300").spawn()?);
    let pid = sleeper.0.id();
    let now = time::OffsetDateTime::now_utc();
    let lease = tidemark_manifest::model::Lease {
        format_version: tidemark_manifest::model::FORMAT_VERSION,
        holder: "another-writer".into(),
        host: tidemark_archiver::checkpoint::hostname(),
        pid,
        acquired_at: now,
        renewed_at: now,
        expires_at: now + time::Duration::minutes(10),
        instance: Some("an-instance-no-lock-file-names".into()),
        released_at: None,
    };
    let repo = s.store.open().await?;
    repo.store()
        .put(
            tidemark_manifest::keys::LEASE,
            tidemark_manifest::model::to_document_bytes(&lease).into(),
        )
        .await?;

    let (code, text) = run_archiver(&["backup", "--db", &db, "--to", &s.store.url], &[])?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        sleeper.0.try_wait()?.is_none(),
        "the unrelated process {pid} was signalled: {code} {text}"
    );
    ensure!(
        code == i32::from(exit::LEASE_HELD)
            && text.contains(&format!("names pid {pid} on this host"))
            && text.contains("liveness lock is free")
            && text.contains("another archiver"),
        "backup must refuse clearly: {code} {text}"
    );
    ensure!(
        repo.load().await?.history.bases.len() == 1,
        "no base was taken"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_database_gets_no_new_scheduled_bases() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?;
    let mut writer = s.loadgen(&["--batches", "300"])?;
    writer.wait_success(Duration::from_secs(60))?;
    let mut arch = s.archiver("idle.log", &["--base-interval", "500ms"])?;
    let repo = s.store.open_when_created().await?;
    wait_for_history(&repo, |st| !st.history.bases.is_empty()).await?;
    // Several base intervals pass with nothing written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    arch.stop(Duration::from_secs(30))?;
    let state = repo.load().await?;
    ensure!(
        state.history.bases.len() == 1,
        "an idle database got {} bases; log:\n{}",
        state.history.bases.len(),
        arch.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_is_taken_after_a_reopen_whose_log_number_no_wal_ever_had() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let store = TestStore::local()?;
    let opts = archivable_options();
    {
        // Bulk load with the WAL off, then flush: the WAL stays empty.
        let db = rocksdb::DB::open(&opts, &db_path)?;
        let mut w = rocksdb::WriteOptions::default();
        w.disable_wal(true);
        for i in 0..500u32 {
            db.put_opt(format!("k{i}"), b"v", &w)?;
        }
        db.flush()?;
    }
    // Reopened: a few writes, no flush.
    let db = rocksdb::DB::open(&opts, &db_path)?;
    for i in 0..10u32 {
        db.put(format!("n{i}"), b"v")?;
    }
    let (code, text) = one_shot_backup(&db_path, &store)?;
    ensure!(code == 0, "backup after a reopen: {code} {text}");
    let state = store.open().await?.load().await?;
    ensure!(state.history.bases.len() == 1, "{:?}", state.history.bases);
    ensure!(
        state
            .history
            .plan(Target::Seq(db.latest_sequence_number()))
            .is_ok(),
        "the latest point must be restorable: {}",
        state.history.window()
    );
    Ok(())
}

/// The time the archive records for the record holding `seq`.
async fn archived_record_time(repo: &tidemark_manifest::repo::Repository, seq: u64) -> Result<i64> {
    let state = repo.load().await?;
    let entry = state
        .history
        .segments
        .iter()
        .find(|s| s.first_seq <= seq && seq <= s.last_seq)
        .with_context(|| format!("no segment holds sequence {seq}"))?;
    let dir = tempfile::tempdir()?;
    let path = repo.fetch_segment(entry, dir.path()).await?;
    let (_, records) = tidemark_manifest::segment::decode_all(&entry.key, &std::fs::read(path)?)?;
    let r = records
        .iter()
        .find(|r| r.seq <= seq && seq < r.next_seq())
        .with_context(|| format!("no record of {} holds sequence {seq}", entry.key))?;
    Ok(r.time_us)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_does_not_wait_for_a_record_its_wal_does_not_hold() -> Result<()> {
    // An empty database, and one whose records are all flushed and whose WAL files holding
    // them are gone (deleted from archive/): the base's earliest record is nowhere the
    // follower could read it.
    let dir = tempfile::tempdir()?;
    let opts = archivable_options();
    let empty = dir.path().join("empty");
    drop(rocksdb::DB::open(&opts, &empty)?);
    let flushed = dir.path().join("flushed");
    {
        let db = rocksdb::DB::open(&opts, &flushed)?;
        for i in 0..40u32 {
            db.put(format!("k{i}"), b"v")?;
        }
        db.flush()?;
    }
    let mut deleted = 0;
    for entry in std::fs::read_dir(flushed.join("archive"))? {
        std::fs::remove_file(entry?.path())?;
        deleted += 1;
    }
    ensure!(deleted > 0, "the flush archived no WAL file");
    for db_path in [&empty, &flushed] {
        let store = TestStore::local()?;
        let (code, text) = one_shot_backup(db_path, &store)?;
        ensure!(code == 0, "{}: {code} {text}", db_path.display());
        ensure!(
            !text.contains("did not read the base's earliest record in time"),
            "{}: the base waited for a record the WAL does not hold:\n{text}",
            db_path.display()
        );
        let bases = store.open().await?.load().await?.history.bases;
        ensure!(bases.len() == 1, "{} bases", bases.len());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_after_a_restart_has_the_time_its_earliest_record_was_archived_with() -> Result<()> {
    // Every batch carries its time: a base's earliest_time is exactly its earliest record's.
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let store = TestStore::local()?;
    let opts = archivable_options();
    {
        let db = rocksdb::DB::open(&opts, &db_path)?;
        for i in 0..40u32 {
            let mut b = rocksdb::WriteBatch::default();
            b.put(format!("k{i}"), b"v");
            b.put_log_data(tidemark_manifest::rocks::marker::encode(
                std::time::SystemTime::now(),
            ));
            db.write(b)?;
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    // Two one-shot runs: the second resumes after everything the first archived, and its
    // base's earliest record is one it never reads itself (the first run archived it).
    for run in 1..=2 {
        let (code, text) = one_shot_backup(&db_path, &store)?;
        ensure!(code == 0, "backup run {run}: {code} {text}");
    }
    let repo = store.open().await?;
    let bases = repo.load().await?.history.bases;
    ensure!(bases.len() == 2, "{} bases", bases.len());
    for b in &bases {
        let archived = archived_record_time(&repo, b.earliest_seq).await?;
        let recorded = tidemark_manifest::model::micros_from_time(b.earliest_time);
        ensure!(
            recorded == archived,
            "base {}: earliest_time {} µs, but sequence {} was archived with {} µs",
            b.id,
            recorded,
            b.earliest_seq,
            archived
        );
    }
    Ok(())
}

/// The value of key `i` in the catch-up test: 4 KiB, about half of it compressible.
fn backlog_value(i: u32) -> Vec<u8> {
    let mut x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4096u32)
        .map(|j| {
            if j % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (j / 64) as u8
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_compressed_at_the_catch_up_level_and_restores_exactly() -> Result<()> {
    // 96 MiB of WAL written while no archiver runs: more than the 64 MiB read in a row that
    // make a backlog.
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let store = TestStore::local()?;
    let keys = 24 * 1024u32;
    let last_seq = {
        let db = rocksdb::DB::open(&archivable_options(), &db_path)?;
        for i in 0..keys {
            db.put(format!("k{i:06}"), backlog_value(i))?;
        }
        db.latest_sequence_number()
    };
    let (code, text) = one_shot_backup(&db_path, &store)?;
    ensure!(code == 0, "backup: {code} {text}");
    let started = text
        .find("catching up")
        .with_context(|| format!("the backlog was not noticed:\n{text}"))?;
    let ended = text
        .find("caught up with the WAL")
        .with_context(|| format!("the end of the backlog was not logged:\n{text}"))?;
    ensure!(started < ended, "{text}");
    ensure!(text.contains("zstd_level=1"), "{text}");
    let repo = store.open().await?;
    let plan = repo.load().await?.history.plan(Target::Latest)?;
    ensure!(plan.max_seq == last_seq, "{} != {last_seq}", plan.max_seq);

    let target = dir.path().join("restored");
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-restore")?,
        &[
            "--quiet".to_owned(),
            "restore".to_owned(),
            "--latest".to_owned(),
            "--from".to_owned(),
            store.url.clone(),
            "--target".to_owned(),
            target.display().to_string(),
        ],
        &store.env,
        Duration::from_secs(180),
    )?;
    ensure!(code == 0, "restore: {code} {out}{err}");
    let restored = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &target, false)?;
    let mut found = 0u32;
    for item in restored.iterator(rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let i: u32 = std::str::from_utf8(&k[1..])?.parse()?;
        ensure!(k.as_ref() == format!("k{i:06}").as_bytes() && i == found);
        ensure!(
            v.as_ref() == backlog_value(i),
            "key {i} restored differently"
        );
        found += 1;
    }
    ensure!(found == keys, "{found} keys restored of {keys}");
    Ok(())
}
