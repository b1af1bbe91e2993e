//! The archiver, `tidemark-archiver status` and an in-process reader against the S3 server
//! behind a fault-injecting proxy ([`FaultProxy`]): connections reset, `503 SlowDown` and
//! `500 InternalError` answers, stalled requests, connections cut mid-stream, replies lost
//! after the store did the work, and the store down entirely for a while. The retry layer rides them out: the archiver never stops,
//! catches up once the store is healthy, and leaves a contiguous history up to the writer's
//! last sequence; readers still load the repository.
//!
//! S3 only (the faults are on the wire); skipped with a message when no S3 server runs, a
//! failure under `TIDEMARK_REQUIRE_S3=1`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidemark_tests::Oracle;
use tidemark_tests::faultproxy::{FaultCounts, FaultKind, FaultPlan, FaultProxy};
use tidemark_tests::harness::{Proc, TestStore, bin, check_history, wait_for_database};

/// What the retry layer logs for each retried call.
const RETRY_MESSAGE: &str = "object store call failed temporarily; retrying";
/// What it logs when a call succeeded after retries.
const RETRY_SUCCESS_MESSAGE: &str = "object store call succeeded after retrying";
/// What the archiver logs when an upload failed even after the retries (it tries again later).
const WILL_RETRY_MESSAGE: &str = "will retry";
/// What the retry layer logs when it gives up on a call.
const GIVING_UP_MESSAGE: &str = "giving up";
/// What the retry layer logs when a conditional write's reply was lost but the write landed.
const LOST_REPLY_MESSAGE: &str = "its reply was lost";

struct Setup {
    dir: tempfile::TempDir,
    /// The repository reached directly, for the test's own checks.
    direct: TestStore,
    /// The same repository through the proxy, for the programs under test.
    proxied: TestStore,
    proxy: FaultProxy,
}

impl Setup {
    /// An S3 repository and a proxy in front of its server, or `None` without a server.
    async fn new(test: &str, plan: FaultPlan, seed: u64) -> Result<Option<Setup>> {
        let Some(direct) = TestStore::s3(test).await? else {
            return Ok(None);
        };
        let endpoint = direct
            .s3
            .endpoint_url
            .clone()
            .context("the test S3 store has no endpoint")?;
        let proxy = FaultProxy::start(&endpoint, plan, seed)?;
        let proxied = direct.through(&proxy.url())?;
        eprintln!(
            "{test}: programs reach {endpoint} through the fault proxy at {}",
            proxy.url()
        );
        Ok(Some(Setup {
            dir: tempfile::tempdir()?,
            direct,
            proxied,
            proxy,
        }))
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("oracle")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn loadgen(&self, args: &[&str]) -> Result<Proc> {
        let mut a = vec![
            "--db".to_owned(),
            self.db().display().to_string(),
            "--out".to_owned(),
            self.out().display().to_string(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn(&bin("tidemark-loadgen")?, &a, &[], &self.log("loadgen.log"))
    }

    /// `tidemark-archiver run` through the proxy.
    fn archiver(&self, extra: &[&str]) -> Result<Proc> {
        let mut a = vec![
            "run".to_owned(),
            "--db".to_owned(),
            self.db().display().to_string(),
            "--to".to_owned(),
            self.proxied.url.clone(),
            "--sync-interval".to_owned(),
            "200ms".to_owned(),
            "--checkpoint-interval".to_owned(),
            "1s".to_owned(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            &bin("tidemark-archiver")?,
            &a,
            &self.proxied.env,
            &self.log("archiver.log"),
        )
    }

    /// `tidemark-archiver status --json` through the proxy: its exit code, standard output
    /// (the report) and standard error (the log).
    async fn status(&self) -> Result<(i32, String, String)> {
        let program = bin("tidemark-archiver")?;
        let url = self.proxied.url.clone();
        let env = self.proxied.env.clone();
        tokio::task::spawn_blocking(move || -> Result<(i32, String, String)> {
            let out = std::process::Command::new(program)
                .args(["status", "--json", "--to", &url])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("TIDEMARK_LOG", "info,aws=warn")
                .output()?;
            Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        })
        .await?
    }

    /// The last archived sequence, read directly (`None` before there is a repository).
    async fn archived_seq(&self) -> Option<u64> {
        let repo = self.direct.open().await.ok()?;
        let state = repo.load().await.ok()?;
        state.history.segments.last().map(|s| s.last_seq)
    }
}

fn wait_for_db(db: &Path) -> Result<()> {
    wait_for_database(db)
}

/// Waits until the repository (read directly) holds `last_seq` and a base, while the
/// archiver keeps running.
async fn wait_archived(
    s: &Setup,
    last_seq: u64,
    archiver: &mut Proc,
    limit: Duration,
) -> Result<()> {
    let repo = s.direct.open().await?;
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(state) = repo.load().await
            && state.history.segments.last().map(|x| x.last_seq) == Some(last_seq)
            && !state.history.bases.is_empty()
        {
            return Ok(());
        }
        ensure!(
            archiver.running(),
            "the archiver exited; its log:\n{}",
            archiver.log_tail()
        );
        ensure!(
            Instant::now() < deadline,
            "the repository did not reach sequence {last_seq} within {limit:?} (proxy: {}); \
             archiver log:\n{}",
            s.proxy.counts(),
            archiver.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the archiver with SIGTERM; it must exit cleanly.
fn stop_archiver(arch: &mut Proc) -> Result<()> {
    arch.signal("TERM")?;
    let status = arch.wait_timeout(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "archiver exit {status}:\n{}",
        arch.log_tail()
    );
    Ok(())
}

/// How often each message occurs in the archiver's log; prints them.
fn log_counts(arch: &Proc) -> Result<(usize, usize)> {
    let log = std::fs::read_to_string(&arch.log)?;
    let count = |m: &str| log.lines().filter(|l| l.contains(m)).count();
    let (retried, recovered) = (count(RETRY_MESSAGE), count(RETRY_SUCCESS_MESSAGE));
    eprintln!(
        "archiver log: {retried} retried calls, {recovered} calls succeeded after retrying, {} \
         calls gave up after every attempt, {} uploads put off to retry later, {} conditional \
         writes found done after their reply was lost, {} base backups taken, {} failed",
        count(GIVING_UP_MESSAGE),
        count(WILL_RETRY_MESSAGE),
        count(LOST_REPLY_MESSAGE),
        count("base backup taken"),
        count("base backup failed;")
    );
    Ok((retried, recovered))
}

fn all_kinds_seen(counts: &FaultCounts, kinds: &[FaultKind]) -> bool {
    kinds.iter().all(|k| counts.of(*k) > 0)
}

async fn rides_out_faults(s: Setup) -> Result<()> {
    let kinds = s.proxy.plan().enabled();
    // The proxy is on from the start: lease, configuration, first base and first segments
    // all go through it.
    let mut writer = s.loadgen(&["--duration", "10", "--rate", "500", "--seed", "21"])?;
    wait_for_db(&s.db())?;
    let mut arch = s.archiver(&["--base-interval", "5s"])?;

    // Faults for at least 8 s and until every kind was injected; meanwhile readers through
    // the proxy must succeed too.
    let started = Instant::now();
    let reader_repo = s.proxied.open().await?;
    let (mut loads, mut statuses, mut status_retries) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(8)
        || !all_kinds_seen(&s.proxy.counts(), &kinds)
        || loads == 0
    {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "within 30 s, not every fault kind was injected or nothing was archived for a \
             reader to load ({loads} loads): {}",
            s.proxy.counts()
        );
        ensure!(
            arch.running(),
            "the archiver exited under faults; proxy: {}; its log:\n{}",
            s.proxy.counts(),
            arch.log_tail()
        );
        if s.archived_seq().await.is_some() {
            let state = reader_repo
                .load()
                .await
                .context("a reader through the faulty proxy must load the repository")?;
            ensure!(
                !state.history.segments.is_empty(),
                "the reader saw no segments"
            );
            loads += 1;
            let (code, out, err) = s.status().await?;
            ensure!(
                code == 0,
                "status through the faulty proxy: exit {code}\n{out}{err}"
            );
            let report: serde_json::Value = serde_json::from_str(&out)
                .with_context(|| format!("status output is not JSON:\n{out}{err}"))?;
            ensure!(
                report["newest_seq"].as_u64().is_some(),
                "status reports no archived record:\n{out}"
            );
            status_retries += err.lines().filter(|l| l.contains(RETRY_MESSAGE)).count();
            statuses += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.proxy.set_plan(FaultPlan::none())?;
    let injected = s.proxy.counts();
    eprintln!(
        "faults on for {:.1} s, then off; injected: {injected}",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "through the faults: {loads} repository loads and {statuses} status runs succeeded \
         (the status runs retried {status_retries} calls)"
    );
    ensure!(
        loads > 0 && statuses > 0,
        "no reader ran while the faults were on"
    );
    for kind in &kinds {
        ensure!(
            injected.of(*kind) > 0,
            "no {kind} fault injected: {injected}"
        );
    }

    let status = writer.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "load generator failed:\n{}",
        writer.log_tail()
    );
    let oracle = Oracle::open(&s.out())?;
    wait_archived(&s, oracle.last_seq(), &mut arch, Duration::from_secs(30)).await?;
    let (retried, _) = log_counts(&arch)?;
    ensure!(
        retried > 0,
        "the archiver's log shows no retried store call; proxy: {injected}"
    );
    stop_archiver(&mut arch)?;
    check_history(&s.direct, &oracle, 1).await?;
    eprintln!("proxy at the end: {}", s.proxy.counts());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archiver_and_readers_ride_out_resets_errors_stalls_cuts_and_lost_replies() -> Result<()>
{
    let plan = FaultPlan::mixed(0.3, Duration::from_secs(2));
    match Setup::new("faults-mixed", plan, 0x7a1d_e5ee).await? {
        Some(s) => rides_out_faults(s).await,
        None => Ok(()),
    }
}

async fn rides_out_an_outage(s: Setup) -> Result<()> {
    let mut writer = s.loadgen(&["--duration", "14", "--rate", "500", "--seed", "23"])?;
    wait_for_db(&s.db())?;
    let mut arch = s.archiver(&["--base-interval", "1h"])?;
    // Healthy until the first base is in and segments flow.
    let repo = s.direct.open().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(state) = repo.load().await
            && !state.history.bases.is_empty()
            && state.history.segments.len() >= 3
        {
            break;
        }
        ensure!(
            arch.running() && Instant::now() < deadline,
            "the archiver did not get going:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The store goes down, open connections with it, for 5 s while the writes go on.
    let outage = Duration::from_secs(5);
    s.proxy.set_plan(FaultPlan::down())?;
    s.proxy.reset_open();
    let down_at = Instant::now();
    eprintln!("store down for {outage:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = s.archived_seq().await;
    // A reader that starts near the end of the outage gets through by retrying.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let reader = {
        let store = s.direct.through(&s.proxy.url())?;
        tokio::spawn(async move {
            let repo = store.open().await?;
            let state = repo.load().await?;
            anyhow::Ok(state.history.segments.last().map(|x| x.last_seq))
        })
    };
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    let after = s.archived_seq().await;
    ensure!(
        arch.running(),
        "the archiver exited while the store was down:\n{}",
        arch.log_tail()
    );
    let during = s.proxy.counts();
    s.proxy.set_plan(FaultPlan::none())?;
    eprintln!("store up again; while it was down: {during}");
    ensure!(during.reset > 0, "nothing was reset: {during}");
    ensure!(
        before == after,
        "the repository grew from {before:?} to {after:?} while the store was down: the outage \
         did not take"
    );
    let up_at = Instant::now();
    loop {
        if s.archived_seq().await > after {
            break;
        }
        ensure!(
            arch.running() && up_at.elapsed() < Duration::from_secs(30),
            "archiving did not resume within 30 s of the store coming back:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "archiving resumed {:.1} s after the store came back",
        up_at.elapsed().as_secs_f64()
    );
    let seen = reader
        .await?
        .context("a reader started during the outage must succeed once the store is back")?;
    ensure!(
        seen >= before,
        "the reader saw {seen:?}, less than {before:?}"
    );

    let status = writer.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "load generator failed:\n{}",
        writer.log_tail()
    );
    let oracle = Oracle::open(&s.out())?;
    ensure!(
        after.is_some_and(|a| a < oracle.last_seq()),
        "the writer wrote nothing after the outage began"
    );
    wait_archived(&s, oracle.last_seq(), &mut arch, Duration::from_secs(30)).await?;
    let (retried, _) = log_counts(&arch)?;
    ensure!(
        retried > 0,
        "the archiver's log shows no retried store call"
    );
    stop_archiver(&mut arch)?;
    check_history(&s.direct, &oracle, 1).await?;
    eprintln!("proxy at the end: {}", s.proxy.counts());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archiver_rides_out_the_store_being_down_and_loses_nothing() -> Result<()> {
    match Setup::new("faults-outage", FaultPlan::none(), 0x0d0_3d0e).await? {
        Some(s) => rides_out_an_outage(s).await,
        None => Ok(()),
    }
}
