//! The warm standby (`tidemark-restore follow`), end to end with the real programs: the
//! load generator writes a RocksDB while the archiver archives it and a follower keeps a
//! standby current from the repository.
//!
//! - While the writer runs, an application reads the standby as a RocksDB secondary
//!   instance and, after `try_catch_up_with_primary`, sees newer data, each time exactly
//!   the writer's state at the sequence it reports.
//! - A follower killed with SIGKILL in the middle of following resumes on the same target
//!   (it does not restore again) and reaches the writer's last sequence once the writer
//!   stops.
//! - SIGTERM stops it and leaves a standby; SIGUSR1 promotes it: the database opens
//!   read-write at once and equals the oracle at the last sequence, its origin names that
//!   point, and a follower refuses the promoted directory.
//! - A corrupt segment stops a resumed follower with exit code 4, naming the object; the
//!   same segment missing, with the archive going on past it, stops it with exit code 3
//!   while no base starts after the gap. Once a base does (`tidemark-archiver backup`), the
//!   follower re-bases: a fresh standby restored from it replaces the old one (moved aside,
//!   unchanged), follows to the writer's last sequence and promotes to the oracle's state.
//! - Over `--max-wal-bytes`, the follower re-bases once a newer base exists (the disk bound)
//!   and still promotes to the oracle's state.
//! - The source creates a column family and writes to it: the follower does not stop. While
//!   the archiver's base for the change is held back, the standby waits at the point
//!   before the new column family's first batch (its WAL holds nothing past it, the metric
//!   and the log say what it waits for); copies of it promoted there (SIGUSR1 to a follower
//!   waiting on one, `follow --promote` on another) name the batch not applied. Once the archiver goes on and takes its base, the
//!   same follower re-bases on it by itself and promotes to the source's state, the new
//!   column family included (so does `follow --promote` on a copy from before the change:
//!   it meets the batch, re-bases on the base and promotes at the newest point).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rocksdb::{DB, Options};
use serde_json::Value;
use tidemark_manifest::exit;
use tidemark_manifest::keys::segment_key;
use tidemark_manifest::origin::Origin;
use tidemark_tests::faultproxy::{FaultPlan, FaultProxy};
use tidemark_tests::harness::{
    Proc, TestStore, bin, http_get, logged_metrics_addr, metric_sample, wait_archived, wait_for,
    wait_for_database,
};
use tidemark_tests::rocks::cf_options_for;
use tidemark_tests::setup::Setup;
use tidemark_tests::{
    Oracle, cf_descriptors, db_options, open_db, read_db_state_and_seq, read_state,
};

/// The follower's poll interval in these tests.
const POLL: &str = "200ms";

/// Starts `tidemark-restore follow --json` into `target`, logging to `log`.
fn follower(s: &Setup, target: &Path, log: &str, extra: &[&str]) -> Result<Proc> {
    let store = s.programs_store();
    let mut args: Vec<String> = [
        "follow",
        "--json",
        "--from",
        &store.url,
        "--target",
        &target.display().to_string(),
        "--poll-interval",
        POLL,
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut env = store.env.clone();
    env.push(("TIDEMARK_LOG".into(), "info,aws=warn".into()));
    Proc::spawn(&bin("tidemark-restore")?, &args, &env, &s.path(log))
}

/// The sequence number the standby in `target` committed (its origin file), once there.
fn applied(target: &Path) -> Option<u64> {
    Origin::read(target)
        .ok()
        .flatten()
        .map(|o| o.parent.sequence)
}

/// Waits until the standby in `target` has applied `seq`, while `follower` runs.
fn wait_applied(target: &Path, seq: u64, follower: &mut Proc, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while applied(target).is_none_or(|a| a < seq) {
        ensure!(
            follower.running(),
            "the follower exited early; its log:\n{}",
            follower.log_tail()
        );
        ensure!(
            Instant::now() < deadline,
            "the standby did not reach sequence {seq} within {limit:?} (at {:?}); log:\n{}",
            applied(target),
            follower.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The last JSON line the follower printed (its final report).
fn last_json(log: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the follower printed no JSON line")?;
    Ok(serde_json::from_str(line)?)
}

/// Opens `target` as a RocksDB secondary instance (its own directory `secondary`), with the
/// generator's column families and options.
fn open_secondary(target: &Path, secondary: &Path) -> Result<DB> {
    let mut opts: Options = db_options();
    opts.create_if_missing(false);
    opts.set_max_open_files(-1);
    DB::open_cf_descriptors_as_secondary(&opts, target, secondary, cf_descriptors())
        .with_context(|| format!("opening {} as a secondary", target.display()))
}

/// The secondary's view, once caught up, equals what the writer wrote at the sequence it
/// reports.
fn check_secondary(db: &DB, s: &Setup) -> Result<u64> {
    db.try_catch_up_with_primary()?;
    let seq = db.latest_sequence_number();
    let oracle: Oracle = s.oracle()?;
    ensure!(
        oracle.is_boundary(seq),
        "the secondary is at {seq}, inside a batch"
    );
    if let Some(d) = oracle.state_at(seq)?.diff(&read_state(db)?) {
        bail!("the secondary at sequence {seq} differs from what was written: {d}");
    }
    Ok(seq)
}

/// The follower's `/metrics` show the standby at `seq`, caught up, and `/health` is 200.
fn check_metrics(f: &Proc, seq: u64) -> Result<()> {
    let addr = wait_for(Duration::from_secs(30), "the metrics address", || {
        logged_metrics_addr(&f.log)
    })?;
    let (status, _, _) = http_get(addr, "/health")?;
    ensure!(status == 200, "/health answered {status}");
    // The lag is 0 once a poll found nothing newer.
    let body = wait_for(Duration::from_secs(30), "a caught-up scrape", || {
        let (_, _, body) = http_get(addr, "/metrics").ok()?;
        (metric_sample(&body, "tidemark_standby_lag_seconds") == Some(0.0)).then_some(body)
    })?;
    let applied = metric_sample(&body, "tidemark_standby_applied_sequence");
    ensure!(
        applied == Some(seq as f64),
        "applied {applied:?}, expected {seq}:\n{body}"
    );
    let segments = metric_sample(&body, "tidemark_standby_segments_applied_total");
    ensure!(segments.is_some_and(|n| n >= 1.0), "{body}");
    ensure!(
        metric_sample(&body, "tidemark_standby_errors_total") == Some(0.0),
        "{body}"
    );
    Ok(())
}

/// Waits until the repository has a base, while `archiver` runs.
async fn wait_base(s: &Setup, archiver: &mut Proc) -> Result<()> {
    let repo = s.store.open_when_created().await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(state) = repo.load().await
            && !state.history.bases.is_empty()
            && !state.history.segments.is_empty()
        {
            return Ok(());
        }
        ensure!(
            archiver.running(),
            "the archiver exited:\n{}",
            archiver.log_tail()
        );
        ensure!(Instant::now() < deadline, "no base within 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follows_resumes_and_promotes(store: TestStore) -> Result<()> {
    let s = Setup::new(store)?;
    let target = s.path("standby");
    let mut writer = s.loadgen(&["--duration", "12", "--rate", "250", "--seed", "11"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &[])?;
    wait_base(&s, &mut arch).await?;

    // Restore, then follow; killed in the middle, it resumes.
    let mut f = follower(&s, &target, "follow-1.log", &[])?;
    wait_for(Duration::from_secs(120), "the first restore", || {
        applied(&target)
    })?;
    let first = applied(&target).context("no origin")?;
    wait_applied(&target, first + 1, &mut f, Duration::from_secs(60))?;
    f.kill_running()?;
    let mut f = follower(
        &s,
        &target,
        "follow-2.log",
        &["--metrics-addr", "127.0.0.1:0"],
    )?;

    // A secondary instance sees newer data while the standby follows.
    let secondary = open_secondary(&target, &s.path("secondary"))?;
    let seen = check_secondary(&secondary, &s)?;
    wait_applied(&target, seen + 1, &mut f, Duration::from_secs(60))?;

    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    let last = oracle.last_seq();
    wait_archived(&s.store, last, &mut arch, Duration::from_secs(60)).await?;
    wait_applied(&target, last, &mut f, Duration::from_secs(60))?;
    check_metrics(&f, last)?;
    let later = check_secondary(&secondary, &s)?;
    ensure!(
        later > seen,
        "the secondary saw nothing new: {seen} then {later}"
    );
    ensure!(
        later == last,
        "the secondary caught up to {later}, the writer ended at {last}"
    );
    drop(secondary);

    // SIGTERM stops following and leaves a standby; the next run resumes, SIGUSR1 promotes.
    f.stop(Duration::from_secs(30))?;
    let stopped = last_json(&f.log)?;
    ensure!(stopped["event"] == "stopped", "{stopped}");
    ensure!(
        !stopped["resumed_from"].is_null(),
        "the restarted follower restored again: {stopped}"
    );
    let mut f = follower(&s, &target, "follow-3.log", &[])?;
    wait_for(Duration::from_secs(60), "the follower to resume", || {
        std::fs::read_to_string(&f.log)
            .ok()
            .filter(|l| l.contains("resumed the standby"))
    })?;
    let asked = Instant::now();
    f.signal("USR1")?;
    f.wait_success(Duration::from_secs(60))?;
    eprintln!("promotion: SIGUSR1 to exit in {:?}", asked.elapsed());
    let report = last_json(&f.log)?;
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(report["applied"]["seq"].as_u64() == Some(last), "{report}");
    ensure!(report["resumed_from"].as_u64() == Some(last), "{report}");

    let opened = Instant::now();
    let db = open_db(&target)?;
    eprintln!(
        "promotion: the application's first open took {:?}",
        opened.elapsed()
    );
    ensure!(db.latest_sequence_number() == last);
    if let Some(d) = oracle.state_at(last)?.diff(&read_state(&db)?) {
        bail!("the promoted standby differs from what was written: {d}");
    }
    drop(db);
    let origin = Origin::read(&target)?.context("no origin after promotion")?;
    ensure!(origin.parent.sequence == last, "{origin:?}");

    // A promoted database is no standby any more.
    let mut again = follower(&s, &target, "follow-4.log", &[])?;
    let status = again.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.code() == Some(i32::from(exit::USAGE)),
        "{status}: {}",
        again.log_tail()
    );
    ensure!(
        again.log_tail().contains("not a warm standby"),
        "{}",
        again.log_tail()
    );
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_follows_resumes_serves_a_secondary_and_promotes_to_the_oracle_local()
-> Result<()> {
    follows_resumes_and_promotes(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_follows_resumes_serves_a_secondary_and_promotes_to_the_oracle_s3() -> Result<()>
{
    tidemark_tests::harness::with_s3("standby-follow", follows_resumes_and_promotes).await
}

/// Runs a follower on `target` until it exits on its own: its exit code and log.
fn run_to_failure(s: &Setup, target: &Path, log: &str) -> Result<(i32, String)> {
    let mut f = follower(s, target, log, &[])?;
    let status = f.wait_timeout(Duration::from_secs(120))?;
    let text = std::fs::read_to_string(&f.log)?;
    Ok((status.code().unwrap_or(-1), text))
}

async fn stops_on_corruption_and_gaps(store: TestStore) -> Result<()> {
    let s = Setup::new(store)?;
    let target = s.path("standby");
    // Flushes often, so that a base taken later needs no WAL from before the gap.
    let mut writer = s.loadgen(&[
        "--duration",
        "20",
        "--rate",
        "250",
        "--seed",
        "5",
        "--flush-every",
        "200",
    ])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &[])?;
    wait_base(&s, &mut arch).await?;
    let mut f = follower(&s, &target, "follow-1.log", &[])?;
    wait_for(Duration::from_secs(120), "the first restore", || {
        applied(&target)
    })?;
    f.stop(Duration::from_secs(30))?;
    let stopped_at = applied(&target).context("no origin")?;

    // The archive goes on past the standby's point, indexed by a generation.
    let repo = s.store.open().await?;
    let next = stopped_at + 1;
    wait_for(
        Duration::from_secs(60),
        "a generation past the standby",
        || {
            let g = futures_block(repo.current_generation()).ok().flatten()?;
            (g.tail_start_seq > next).then_some(())
        },
    )?;

    let raw = s.store.open_raw().await?;
    let key = segment_key(next);
    let good = raw.get(&key).await?;
    let mut bad = good.to_vec();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x5a;
    raw.put(&key, bytes::Bytes::from(bad)).await?;
    let (code, log) = run_to_failure(&s, &target, "follow-corrupt.log")?;
    ensure!(
        code == i32::from(exit::VERIFICATION_FAILED),
        "exit {code}:\n{log}"
    );
    ensure!(log.contains(&key), "the error does not name {key}:\n{log}");
    ensure!(
        applied(&target) == Some(stopped_at),
        "the standby moved past a corrupt segment"
    );

    raw.delete(&key).await?;
    let (code, log) = run_to_failure(&s, &target, "follow-gap.log")?;
    ensure!(
        code == i32::from(exit::NOT_RESTORABLE),
        "exit {code}:\n{log}"
    );
    ensure!(
        log.contains("no segment of") && log.contains(&format!("starts at sequence {next}")),
        "{log}"
    );
    ensure!(applied(&target) == Some(stopped_at));
    if writer.running() {
        writer.stop(Duration::from_secs(30))?;
    } else {
        writer.wait_success(Duration::from_secs(1))?;
    }

    // With a base past the gap, the follower re-bases: a fresh standby from it, swapped in,
    // the old one moved aside; it then follows to the writer's last sequence.
    let oracle = s.oracle()?;
    let last = oracle.last_seq();
    let db = s.db().display().to_string();
    let url = s.programs_store().url.clone();
    let (code, _, _) = s.run("tidemark-archiver", &["backup", "--db", &db, "--to", &url])?;
    ensure!(code == 0, "backup exited {code}");
    wait_archived(&s.store, last, &mut arch, Duration::from_secs(60)).await?;
    let mut f = follower(&s, &target, "follow-rebase.log", &[])?;
    wait_applied(&target, last, &mut f, Duration::from_secs(120))?;
    let asked = Instant::now();
    f.signal("USR1")?;
    f.wait_success(Duration::from_secs(60))?;
    eprintln!("promotion: SIGUSR1 to exit in {:?}", asked.elapsed());
    let report = last_json(&f.log)?;
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(report["rebases"].as_u64() == Some(1), "{report}");
    let aside: Vec<_> = std::fs::read_dir(s.path(""))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("standby.old-"))
        .collect();
    ensure!(
        aside.len() == 1,
        "the old standby was not moved aside once: {aside:?}"
    );
    ensure!(
        applied(&aside[0].path()) == Some(stopped_at),
        "the old standby changed"
    );
    let db = open_db(&target)?;
    ensure!(db.latest_sequence_number() == last);
    if let Some(d) = oracle.state_at(last)?.diff(&read_state(&db)?) {
        bail!("the re-based standby differs from what was written: {d}");
    }
    drop(db);
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

/// Runs a future to completion from synchronous code inside the multi-threaded runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_segment_stops_the_follower_and_a_gap_stops_it_or_rebases_local() -> Result<()> {
    stops_on_corruption_and_gaps(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_segment_stops_the_follower_and_a_gap_stops_it_or_rebases_s3() -> Result<()> {
    tidemark_tests::harness::with_s3("standby-faults", stops_on_corruption_and_gaps).await
}

/// The disk bound: over `--max-wal-bytes`, the follower re-bases once a newer base exists,
/// and the re-based standby follows to the writer's last sequence and promotes exactly.
async fn rebases_when_the_wal_outgrows_the_limit(store: TestStore) -> Result<()> {
    let s = Setup::new(store)?;
    let target = s.path("standby");
    let mut writer = s.loadgen(&[
        "--duration",
        "15",
        "--rate",
        "250",
        "--seed",
        "9",
        "--flush-every",
        "200",
    ])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &[])?;
    wait_base(&s, &mut arch).await?;
    let mut f = follower(&s, &target, "follow.log", &["--max-wal-bytes", "1", "-v"])?;
    wait_for(Duration::from_secs(120), "the first restore", || {
        applied(&target)
    })?;
    let first = applied(&target).context("no origin")?;
    // Over the limit with no newer base: it follows on. The base taken next needs no WAL
    // from before the flushes the writer made meanwhile.
    wait_applied(&target, first + 10_000, &mut f, Duration::from_secs(60))?;
    let db = s.db().display().to_string();
    let url = s.programs_store().url.clone();
    let (code, _, _) = s.run("tidemark-archiver", &["backup", "--db", &db, "--to", &url])?;
    ensure!(code == 0, "backup exited {code}");
    let moved_aside = || {
        std::fs::read_dir(s.path(""))
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("standby.old-"))
            .map(|e| e.path())
    };
    let rebased = || {
        let log = std::fs::read_to_string(&f.log).ok()?;
        log.contains("re-based the standby").then_some(())
    };
    wait_for(Duration::from_secs(120), "a re-base", rebased).with_context(|| {
        let text = std::fs::read_to_string(&f.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("base")).collect();
        let listed = s
            .run(
                "tidemark-restore",
                &["list", "--from", &url, "--width", "80"],
            )
            .map(|r| r.1)
            .unwrap_or_default();
        format!(
            "{}\n{listed}",
            lines[lines.len().saturating_sub(5)..].join("\n")
        )
    })?;

    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    let last = oracle.last_seq();
    wait_archived(&s.store, last, &mut arch, Duration::from_secs(60)).await?;
    wait_applied(&target, last, &mut f, Duration::from_secs(120))?;
    f.signal("USR1")?;
    f.wait_success(Duration::from_secs(60))?;
    let report = last_json(&f.log)?;
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(
        report["rebases"].as_u64().is_some_and(|n| n >= 1),
        "{report}"
    );
    // A re-base for disk space deletes the standby it replaced: keeping it would defeat
    // the bound.
    ensure!(
        moved_aside().is_none(),
        "the standby replaced for disk space is still there: {:?}",
        moved_aside()
    );
    let db = open_db(&target)?;
    ensure!(db.latest_sequence_number() == last);
    if let Some(d) = oracle.state_at(last)?.diff(&read_state(&db)?) {
        bail!("the re-based standby differs from what was written: {d}");
    }
    drop(db);
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_whose_wal_outgrows_the_limit_rebases_on_a_newer_base_local() -> Result<()> {
    rebases_when_the_wal_outgrows_the_limit(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_whose_wal_outgrows_the_limit_rebases_on_a_newer_base_s3() -> Result<()> {
    tidemark_tests::harness::with_s3("standby-disk", rebases_when_the_wal_outgrows_the_limit).await
}

/// The store goes away while a standby follows: the follower counts the failures, keeps
/// running, and catches up when the store is back (nothing it does between polls, such as
/// its periodic look at the archive's state, may end it on a store failure).
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_rides_out_a_store_outage_s3() -> Result<()> {
    tidemark_tests::harness::with_s3("standby-outage", |store| async move {
        let endpoint = store.s3.endpoint_url.clone().context("an endpoint")?;
        let proxy = FaultProxy::start(&endpoint, FaultPlan::none(), 11)?;
        let s = Setup::new(store)?;
        let target = s.path("standby");
        let mut writer = s.loadgen(&[
            "--duration",
            "12",
            "--rate",
            "250",
            "--seed",
            "5",
            "--flush-every",
            "200",
        ])?;
        wait_for_database(&s.db())?;
        let mut arch = s.archiver("archiver.log", &[])?;
        wait_base(&s, &mut arch).await?;
        let through = s.store.through(&proxy.url())?;
        let mut env = through.env.clone();
        env.push(("TIDEMARK_LOG".into(), "info,aws=warn".into()));
        env.push(("TIDEMARK_REQUEST_TIMEOUT".into(), "2".into()));
        let args = [
            "follow",
            "--json",
            "--from",
            &through.url,
            "--target",
            &target.display().to_string(),
            "--poll-interval",
            POLL,
        ]
        .map(String::from);
        let mut f = Proc::spawn(
            &bin("tidemark-restore")?,
            &args,
            &env,
            &s.path("follow.log"),
        )?;
        wait_for(Duration::from_secs(120), "the first restore", || {
            applied(&target)
        })?;

        proxy.set_plan(FaultPlan::down())?;
        proxy.reset_open();
        let retried = || {
            let log = std::fs::read_to_string(&f.log).ok()?;
            (log.matches("trying again at the next poll").count() >= 3).then_some(())
        };
        wait_for(Duration::from_secs(180), "failures tried again", retried)
            .with_context(|| f.log_tail())?;
        ensure!(
            f.running(),
            "the follower ended during the outage:\n{}",
            f.log_tail()
        );
        proxy.set_plan(FaultPlan::none())?;

        writer.wait_success(Duration::from_secs(90))?;
        let oracle = s.oracle()?;
        let last = oracle.last_seq();
        wait_archived(&s.store, last, &mut arch, Duration::from_secs(60)).await?;
        wait_applied(&target, last, &mut f, Duration::from_secs(180))?;
        f.signal("USR1")?;
        f.wait_success(Duration::from_secs(60))?;
        let db = open_db(&target)?;
        ensure!(db.latest_sequence_number() == last);
        if let Some(d) = oracle.state_at(last)?.diff(&read_state(&db)?) {
            bail!("the standby differs from what was written after the outage: {d}");
        }
        drop(db);
        arch.stop(Duration::from_secs(30))?;
        Ok(())
    })
    .await
}

/// The column family the source creates while a standby follows it.
const ADDED: &str = "added";

/// The sequence number the last record in the WAL files of `dir` ends at.
fn wal_end(dir: &Path) -> Result<u64> {
    use tidemark_manifest::rocks::DbFile;
    use tidemark_manifest::rocks::write_batch::BatchHeader;
    let mut end = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(DbFile::Wal(_)) = DbFile::parse(&entry.file_name().to_string_lossy()) {
            for rec in tidemark_manifest::rocks::log::read_all(entry.path())? {
                end = end.max(BatchHeader::parse(&rec.bytes)?.next_sequence() - 1);
            }
        }
    }
    Ok(end)
}

/// Copies the files of the directory `from` into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        ensure!(
            entry.file_type()?.is_file(),
            "{:?} is no file",
            entry.path()
        );
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// The last JSON line of `text`.
/// `tidemark-restore follow --json --promote` on `target` (it must exit 0): its last report
/// and what it wrote to stderr.
fn follow_and_promote(s: &Setup, target: &Path) -> Result<(Value, String)> {
    let url = s.programs_store().url.clone();
    let t = target.display().to_string();
    let args = [
        "follow",
        "--json",
        "--from",
        &url,
        "--target",
        &t,
        "--promote",
    ];
    let (code, out, err) = s.run("tidemark-restore", &args)?;
    ensure!(code == 0, "follow --promote exited {code}: {err}");
    Ok((last_json_line(&out)?, err))
}

fn last_json_line(text: &str) -> Result<Value> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON line")?;
    Ok(serde_json::from_str(line)?)
}

async fn rides_out_a_column_family_change(store: TestStore) -> Result<()> {
    let s = Setup::new(store)?;
    let target = s.path("standby");
    let mut writer = s.loadgen(&[
        "--duration",
        "4",
        "--rate",
        "250",
        "--seed",
        "17",
        "--flush-every",
        "200",
    ])?;
    wait_for_database(&s.db())?;
    // The archiver takes no base while this file exists (a drill hook).
    let hold = s.path("base-hold");
    let env = [(
        "TIDEMARK_DRILL_BASE_HOLD".to_owned(),
        hold.display().to_string(),
    )];
    let mut arch = s.archiver_with_env("archiver.log", &[], &env)?;
    wait_base(&s, &mut arch).await?;
    let mut f = follower(
        &s,
        &target,
        "follow.log",
        &["--metrics-addr", "127.0.0.1:0"],
    )?;
    wait_for(Duration::from_secs(120), "the first restore", || {
        applied(&target)
    })?;
    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    let written = oracle.last_seq();
    wait_archived(&s.store, written, &mut arch, Duration::from_secs(60)).await?;
    wait_applied(&target, written, &mut f, Duration::from_secs(60))?;
    // A copy of the standby, idle and current, for `--promote` once the base exists.
    let later = s.path("standby-later");
    copy_dir(&target, &later)?;
    // The base the archiver takes for the change waits until the standby was seen waiting.
    std::fs::write(&hold, b"held\n")?;

    // The application (the test, now that the writer is done) creates a column family,
    // writes to it, then to the default one.
    let mut db = open_db(&s.db())?;
    db.create_cf(ADDED, &cf_options_for(ADDED))?;
    let first_new = db.latest_sequence_number() + 1;
    ensure!(first_new == written + 1, "{first_new} after {written}");
    let added = db.cf_handle(ADDED).context("the new column family")?;
    for i in 0..100u32 {
        db.put_cf(&added, format!("a{i:04}"), format!("v{i}"))?;
    }
    for i in 0..100u32 {
        db.put(format!("z{i:04}"), b"after")?;
    }
    let last = db.latest_sequence_number();
    let mut expected = oracle.state_at(written)?;
    expected.add_cf(ADDED).extend((0..100u32).map(|i| {
        (
            format!("a{i:04}").into_bytes(),
            format!("v{i}").into_bytes(),
        )
    }));
    expected
        .add_cf("default")
        .extend((0..100u32).map(|i| (format!("z{i:04}").into_bytes(), b"after".to_vec())));
    if let Some(d) = expected.diff(&read_state(&db)?) {
        bail!("the source is not what the test wrote: {d}");
    }

    let repo = s.store.open().await?;
    let knows_added = |state: &tidemark_manifest::repo::RepoState| {
        state
            .history
            .bases
            .last()
            .is_some_and(|b| b.column_families.iter().any(|c| c.name == ADDED))
    };
    standby_waits_and_promotes_there(&s, &f, &target, written, first_new)?;
    wait_for(
        Duration::from_secs(60),
        "the archiver's base for the change",
        || {
            let log = std::fs::read_to_string(&arch.log).ok()?;
            log.contains("drill: the base backup waits").then_some(())
        },
    )
    .with_context(|| arch.log_tail())?;
    ensure!(
        !knows_added(&repo.load().await?),
        "the archiver took its base while held"
    );
    std::fs::remove_file(&hold)?;
    let released = Instant::now();

    // The archiver's base for the change: the same follower re-bases on it by itself.
    wait_for(Duration::from_secs(120), "a re-base", || {
        let log = std::fs::read_to_string(&f.log).ok()?;
        log.contains("re-based the standby").then_some(())
    })
    .with_context(|| f.log_tail())?;
    eprintln!(
        "column family change: the base released to the standby re-based in {:?}",
        released.elapsed()
    );
    wait_archived(&s.store, last, &mut arch, Duration::from_secs(60)).await?;
    wait_applied(&target, last, &mut f, Duration::from_secs(120))?;
    let state = repo.load().await?;
    ensure!(knows_added(&state), "{:?}", state.history.bases.last());
    f.signal("USR1")?;
    f.wait_success(Duration::from_secs(60))?;
    let report = last_json(&f.log)?;
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(report["rebases"].as_u64() == Some(1), "{report}");
    ensure!(report["resumed_from"].is_null(), "{report}");
    ensure!(report["not_applied"].is_null(), "{report}");
    ensure!(report["applied"]["seq"].as_u64() == Some(last), "{report}");
    let (promoted, seq) = read_db_state_and_seq(&target)?;
    ensure!(
        seq == last,
        "the promoted standby is at {seq}, the source at {last}"
    );
    if let Some(d) = expected.diff(&promoted) {
        bail!("the promoted standby differs from the source: {d}");
    }

    // `--promote` on a standby that meets the batch once the base exists re-bases on it
    // too, then promotes at the archive's newest point.
    let (report, _) = follow_and_promote(&s, &later)?;
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(report["rebases"].as_u64() == Some(1), "{report}");
    ensure!(report["not_applied"].is_null(), "{report}");
    let (promoted, seq) = read_db_state_and_seq(&later)?;
    ensure!(
        seq == last,
        "the copy promoted with --promote is at {seq}, not {last}"
    );
    if let Some(d) = expected.diff(&promoted) {
        bail!("the copy promoted with --promote differs from the source: {d}");
    }
    let aside: Vec<_> = std::fs::read_dir(s.path(""))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".old-"))
        .collect();
    ensure!(aside.is_empty(), "replaced standbys were kept: {aside:?}");
    drop(db);
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

/// With no base knowing the new column family (the archiver's held back): the follower `f` keeps
/// the standby in `target` at `written`, the WAL cut back there, and says what it waits
/// for; copies of it promoted (SIGUSR1, `--promote`) end there and name the batch at
/// `first_new`.
fn standby_waits_and_promotes_there(
    s: &Setup,
    f: &Proc,
    target: &Path,
    written: u64,
    first_new: u64,
) -> Result<()> {
    wait_until_waiting(f, written, first_new)?;
    ensure!(applied(target) == Some(written), "{:?}", applied(target));
    ensure!(
        wal_end(target)? == written,
        "the standby's WAL goes on past its committed point {written}"
    );
    let addr = wait_for(Duration::from_secs(30), "the metrics address", || {
        logged_metrics_addr(&f.log)
    })?;
    let (_, _, body) = http_get(addr, "/metrics")?;
    ensure!(
        metric_sample(&body, "tidemark_standby_waiting_for_base") == Some(1.0),
        "{body}"
    );
    let (status, _, health) = http_get(addr, "/health")?;
    ensure!(
        status == 200 && health.contains("waiting for a base"),
        "{health}"
    );
    let log = std::fs::read_to_string(&f.log)?;
    ensure!(log.contains("\"event\":\"waiting_for_base\""), "{log}");

    // Copies of it, promoted: a follower waiting there on SIGUSR1, and `--promote`, whose
    // catching up meets the same batch and, with no base knowing the column family,
    // promotes at the point reached. Both name the batch not applied.
    let copy = s.path("standby-usr1");
    copy_dir(target, &copy)?;
    let mut waiting = follower(s, &copy, "follow-usr1.log", &[])?;
    wait_until_waiting(&waiting, written, first_new)?;
    waiting.signal("USR1")?;
    waiting.wait_success(Duration::from_secs(60))?;
    let report = last_json(&waiting.log)?;
    check_promoted_while_waiting(s, &copy, &report, written, first_new)?;

    let copy = s.path("standby-promote");
    copy_dir(target, &copy)?;
    let (report, err) = follow_and_promote(s, &copy)?;
    check_promoted_while_waiting(s, &copy, &report, written, first_new)?;
    let cf = report["not_applied"]["column_family"].as_u64();
    ensure!(
        err.contains(&format!("column family {}", cf.unwrap_or(0))),
        "{err}"
    );
    Ok(())
}

/// Waits until the follower `f` logged that its standby waits at `written` for a base
/// knowing the column family the batch at `first_new` writes.
fn wait_until_waiting(f: &Proc, written: u64, first_new: u64) -> Result<()> {
    let waits = format!("the standby waits at sequence {written} for a base");
    let batch = format!("the batch at sequence {first_new} writes it");
    wait_for(Duration::from_secs(60), "the follower to wait", || {
        let log = std::fs::read_to_string(&f.log).ok()?;
        log.lines()
            .any(|l| l.contains(&waits) && l.contains(&batch))
            .then_some(())
    })
    .with_context(|| f.log_tail())
}

/// `report` says the standby in `dir` was promoted at `written`, the batch at `first_new`
/// not applied, and the database there is what the writer wrote up to `written`.
fn check_promoted_while_waiting(
    s: &Setup,
    dir: &Path,
    report: &Value,
    written: u64,
    first_new: u64,
) -> Result<()> {
    ensure!(report["event"] == "promoted", "{report}");
    ensure!(
        report["applied"]["seq"].as_u64() == Some(written),
        "{report}"
    );
    ensure!(
        report["not_applied"]["seq"].as_u64() == Some(first_new),
        "{report}"
    );
    ensure!(report["rebases"].as_u64() == Some(0), "{report}");
    let (state, seq) = read_db_state_and_seq(dir)?;
    ensure!(seq == written, "{} promoted at {seq}", dir.display());
    if let Some(d) = s.oracle()?.state_at(written)?.diff(&state) {
        bail!(
            "{} promoted while waiting differs from what was written: {d}",
            dir.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_waits_at_a_new_column_family_then_rebases_on_the_archivers_base_local()
-> Result<()> {
    rides_out_a_column_family_change(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_waits_at_a_new_column_family_then_rebases_on_the_archivers_base_s3() -> Result<()>
{
    tidemark_tests::harness::with_s3("standby-cf", rides_out_a_column_family_change).await
}
