//! The archiver, `tidemark-archiver status` and an in-process reader against the S3 server
//! behind a fault-injecting proxy ([`FaultProxy`]): connections reset, `503 SlowDown` and
//! `500 InternalError` answers, stalled requests, connections cut mid-stream, replies lost
//! after the store did the work, and the store down entirely for a while. The retry layer rides them out: the archiver never stops,
//! catches up once the store is healthy, and leaves a contiguous history up to the writer's
//! last sequence; readers still load the repository.
//!
//! S3 only (the faults are on the wire); skipped with a message when no S3 server runs, a
//! failure under `TIDEMARK_REQUIRE_S3=1`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidemark_tests::Oracle;
use tidemark_tests::faultproxy::{FaultCounts, FaultKind, FaultPlan, FaultProxy};
use tidemark_tests::harness::{
    Proc, TestStore, bin, check_history, wait_archived, wait_for_database,
};
use tidemark_tests::setup::Setup;

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

/// An S3 repository and a proxy in front of its server through which the programs reach
/// it (the test's own checks reach it directly), or `None` without a server.
async fn setup(test: &str, plan: FaultPlan, seed: u64) -> Result<Option<(Setup, FaultProxy)>> {
    let Some(store) = TestStore::s3(test).await? else {
        return Ok(None);
    };
    let endpoint = store
        .s3
        .endpoint_url
        .clone()
        .context("the test S3 store has no endpoint")?;
    let proxy = FaultProxy::start(&endpoint, plan, seed)?;
    eprintln!(
        "{test}: programs reach {endpoint} through the fault proxy at {}",
        proxy.url()
    );
    Ok(Some((Setup::new(store)?.through(&proxy.url())?, proxy)))
}

/// `tidemark-archiver status --json` through the proxy: its exit code, standard output
/// (the report) and standard error (the log).
async fn status(s: &Setup) -> Result<(i32, String, String)> {
    let program = bin("tidemark-archiver")?;
    let url = s.programs_store().url.clone();
    let env = s.programs_store().env.clone();
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

/// Once the writer is done: the archiver catches up (as the repository read directly
/// shows), its log shows retried store calls, it stops cleanly, and the history is whole.
async fn catches_up(s: &Setup, proxy: &FaultProxy, arch: &mut Proc, oracle: &Oracle) -> Result<()> {
    wait_archived(&s.store, oracle.last_seq(), arch, Duration::from_secs(30))
        .await
        .with_context(|| format!("proxy: {}", proxy.counts()))?;
    let (retried, _) = log_counts(arch)?;
    ensure!(
        retried > 0,
        "the archiver's log shows no retried store call; proxy: {}",
        proxy.counts()
    );
    arch.stop(Duration::from_secs(30))?;
    check_history(&s.store, oracle, 1).await?;
    eprintln!("proxy at the end: {}", proxy.counts());
    Ok(())
}

fn all_kinds_seen(counts: &FaultCounts, kinds: &[FaultKind]) -> bool {
    kinds.iter().all(|k| counts.of(*k) > 0)
}

async fn rides_out_faults(s: Setup, proxy: FaultProxy) -> Result<()> {
    let kinds = proxy.plan().enabled();
    // The proxy is on from the start: lease, configuration, first base and first segments
    // all go through it.
    let mut writer = s.loadgen(&["--duration", "10", "--rate", "500", "--seed", "21"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &["--base-interval", "5s"])?;

    // Faults for at least 8 s and until every kind was injected; meanwhile readers through
    // the proxy must succeed too.
    let started = Instant::now();
    let reader_repo = s.programs_store().open().await?;
    let (mut loads, mut statuses, mut status_retries) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(8)
        || !all_kinds_seen(&proxy.counts(), &kinds)
        || loads == 0
    {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "within 30 s, not every fault kind was injected or nothing was archived for a \
             reader to load ({loads} loads): {}",
            proxy.counts()
        );
        ensure!(
            arch.running(),
            "the archiver exited under faults; proxy: {}; its log:\n{}",
            proxy.counts(),
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
            let (code, out, err) = status(&s).await?;
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
    proxy.set_plan(FaultPlan::none())?;
    let injected = proxy.counts();
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

    writer.wait_success(Duration::from_secs(60))?;
    let oracle = s.oracle()?;
    catches_up(&s, &proxy, &mut arch, &oracle).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archiver_and_readers_ride_out_resets_errors_stalls_cuts_and_lost_replies() -> Result<()>
{
    let plan = FaultPlan::mixed(0.3, Duration::from_secs(2));
    match setup("faults-mixed", plan, 0x7a1d_e5ee).await? {
        Some((s, proxy)) => rides_out_faults(s, proxy).await,
        None => Ok(()),
    }
}

async fn rides_out_an_outage(s: Setup, proxy: FaultProxy) -> Result<()> {
    let mut writer = s.loadgen(&["--duration", "14", "--rate", "500", "--seed", "23"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &["--base-interval", "1h"])?;
    // Healthy until the first base is in and segments flow.
    let repo = s.store.open().await?;
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
    proxy.set_plan(FaultPlan::down())?;
    proxy.reset_open();
    let down_at = Instant::now();
    eprintln!("store down for {outage:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = s.archived_seq().await;
    // A reader that starts near the end of the outage gets through by retrying.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let reader = {
        let store = s.store.through(&proxy.url())?;
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
    let during = proxy.counts();
    proxy.set_plan(FaultPlan::none())?;
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

    writer.wait_success(Duration::from_secs(60))?;
    let oracle = s.oracle()?;
    ensure!(
        after.is_some_and(|a| a < oracle.last_seq()),
        "the writer wrote nothing after the outage began"
    );
    catches_up(&s, &proxy, &mut arch, &oracle).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archiver_rides_out_the_store_being_down_and_loses_nothing() -> Result<()> {
    match setup("faults-outage", FaultPlan::none(), 0x0d0_3d0e).await? {
        Some((s, proxy)) => rides_out_an_outage(s, proxy).await,
        None => Ok(()),
    }
}
