//! The writer lease under races, on the S3 server (whose conditional create is atomic) and
//! on the local store: of many archivers starting at once on one repository, exactly one
//! gets the lease; the others are refused with a message naming the holder. A release never
//! removes a successor's lease, and archivers in containers that share a host name and pid
//! take over a lease only with proof that its holder is gone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidemark_archiver::lease::{LeaseError, LeaseHandle};
use tidemark_manifest::exit;
use tidemark_manifest::model::Lease;
use tidemark_manifest::repo::Repository;
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{Proc, TestStore, bin, run_with_timeout, wait_for};
use time::OffsetDateTime;

async fn race(store: TestStore) -> Result<()> {
    if let Some(root) = store.local_root() {
        std::fs::create_dir_all(root)?;
    }
    let repo = store.open().await?;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            LeaseHandle::acquire(&repo, Duration::from_secs(60)).await
        }));
    }
    let mut winners = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await? {
            Ok(h) => winners.push(h),
            Err(e @ LeaseError::Held { .. }) => {
                ensure!(e.to_string().contains("another archiver"), "{e}");
                refused += 1;
            }
            Err(e) => anyhow::bail!("unexpected lease error on {}: {e}", store.describe),
        }
    }
    ensure!(
        winners.len() == 1 && refused == 11,
        "{} winners, {refused} refused on {}",
        winners.len(),
        store.describe
    );
    eprintln!(
        "lease race on {}: 1 winner, {refused} refused",
        store.describe
    );
    let winner = winners.pop().unwrap();
    winner.release().await?;
    // Released: the next one gets it at once.
    let again = LeaseHandle::acquire(&repo, Duration::from_secs(60)).await?;
    again.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_lease_holder_among_racers_on_s3() -> Result<()> {
    with_s3("lease-race", race).await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_lease_holder_among_racers_on_the_local_store() -> Result<()> {
    race(TestStore::local()?).await
}

/// A lease released after a successor took it over stays the successor's.
async fn release_after_takeover(store: TestStore) -> Result<()> {
    if let Some(root) = store.local_root() {
        std::fs::create_dir_all(root)?;
    }
    let repo = store.open().await?;
    let old = LeaseHandle::acquire(&repo, Duration::from_millis(300)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut new = LeaseHandle::acquire(&repo, Duration::from_secs(60)).await?;
    old.release().await?;
    let (left, _) = repo
        .read_lease()
        .await?
        .context("the successor's lease was removed")?;
    ensure!(
        left.holder == new.lease().holder
            && left.released_at.is_none()
            && left.is_live(OffsetDateTime::now_utc()),
        "the successor's lease was changed on {}: {left:?}",
        store.describe
    );
    new.renew().await?;
    new.release().await?;
    let (left, _) = repo.read_lease().await?.context("no lease")?;
    ensure!(
        left.released_at.is_some() && !left.is_live(OffsetDateTime::now_utc()),
        "{left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn release_after_a_takeover_leaves_the_successors_lease_on_s3() -> Result<()> {
    with_s3("lease-release", release_after_takeover).await
}

#[tokio::test(flavor = "multi_thread")]
async fn release_after_a_takeover_leaves_the_successors_lease_on_the_local_store() -> Result<()> {
    release_after_takeover(TestStore::local()?).await
}

/// What the archivers of two containers have alike: the host name, and pid 1.
fn container_env(store: &TestStore) -> Vec<(String, String)> {
    let mut env = store.env.clone();
    env.push(("TIDEMARK_TEST_LEASE_HOST".into(), "box".into()));
    env.push(("TIDEMARK_TEST_LEASE_PID".into(), "1".into()));
    env
}

fn run_args(db: &Path, store: &TestStore) -> Vec<String> {
    [
        "run",
        "--db",
        &db.display().to_string(),
        "--to",
        &store.url,
        "--sync-interval",
        "200ms",
        "--checkpoint-interval",
        "1s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Another container's archiver on `db` is refused: `LEASE_HELD`, naming the holder.
fn refused(db: &Path, store: &TestStore, what: &str) -> Result<()> {
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &run_args(db, store),
        &container_env(store),
        Duration::from_secs(30),
    )
    .with_context(|| format!("{what}: it was not refused"))?;
    ensure!(
        code == i32::from(exit::LEASE_HELD)
            && err.contains("another archiver")
            && err.contains("host box, pid 1"),
        "{what}: exit {code}\n{out}\n{err}"
    );
    Ok(())
}

/// Polls the lease until `ok` says it is the one awaited.
async fn wait_for_lease(
    repo: &Repository,
    what: &str,
    ok: impl Fn(&Lease) -> bool,
) -> Result<Lease> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((lease, _)) = repo.read_lease().await?
            && ok(&lease)
        {
            return Ok(lease);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Two containers with one host name, each running its archiver as pid 1, archive the same
/// database (one sees it on a shared volume, one a copy of its own) to one repository:
/// neither takes the other's live lease. Once the holder is killed, the container sharing
/// its liveness lock takes over at once, and the other still waits for expiry.
#[tokio::test(flavor = "multi_thread")]
async fn containers_sharing_a_host_name_and_pid_1_never_take_a_live_lease() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = TestStore::local()?;
    let db = dir.path().join("shared").join("db");
    let own_copy = dir.path().join("other").join("db");
    let mut writer = Proc::spawn(
        &bin("tidemark-loadgen")?,
        &[
            "--db",
            &db.display().to_string(),
            "--out",
            &dir.path().join("oracle").display().to_string(),
            "--duration",
            "1",
            "--seed",
            "3",
        ]
        .map(str::to_owned),
        &[],
        &dir.path().join("loadgen.log"),
    )?;
    writer.wait_success(Duration::from_secs(60))?;
    copy_dir(&db, &own_copy)?;

    let mut first = Proc::spawn(
        &bin("tidemark-archiver")?,
        &run_args(&db, &store),
        &container_env(&store),
        &dir.path().join("first.log"),
    )?;
    let repo = store.open_when_created().await?;
    let held = wait_for_lease(&repo, "the first archiver's lease", |l| {
        l.is_live(OffsetDateTime::now_utc())
    })
    .await?;
    ensure!(held.host == "box" && held.pid == 1, "{held:?}");

    refused(&own_copy, &store, "a second container with its own copy")?;
    refused(&db, &store, "a second container on the shared volume")?;
    first.kill_running()?;
    // Dead, but only the container that shares its liveness lock can tell.
    refused(
        &own_copy,
        &store,
        "after the kill, a container without its liveness lock",
    )?;
    let started = Instant::now();
    let mut second = Proc::spawn(
        &bin("tidemark-archiver")?,
        &run_args(&db, &store),
        &container_env(&store),
        &dir.path().join("second.log"),
    )?;
    let taken = wait_for_lease(&repo, "the takeover", |l| {
        l.instance != held.instance && l.is_live(OffsetDateTime::now_utc())
    })
    .await
    .with_context(|| second.log_tail())?;
    ensure!(
        taken.acquired_at < held.expires_at,
        "waited for expiry instead of taking over: {taken:?}"
    );
    eprintln!(
        "takeover after kill -9 with the liveness lock: {:.1} s (lease valid {:.0} s more)",
        started.elapsed().as_secs_f64(),
        (held.expires_at - taken.acquired_at).as_seconds_f64()
    );
    // Stopped once it runs (it handles signals from its loop on).
    wait_for(
        Duration::from_secs(30),
        "the second archiver to run",
        || {
            std::fs::read_to_string(&second.log)
                .ok()
                .filter(|log| log.contains("resuming"))
        },
    )?;
    std::thread::sleep(Duration::from_secs(1));
    second.stop(Duration::from_secs(30))?;
    let (left, _) = repo.read_lease().await?.context("no lease")?;
    ensure!(left.released_at.is_some(), "not released: {left:?}");
    Ok(())
}
