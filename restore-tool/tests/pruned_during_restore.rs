//! A restore and a pruning run at the same time. The restore plans from one reading of the
//! repository; pruning then writes a new generation and sweeps. Within the grace period the
//! restore still finds every object it planned with and finishes exactly; once the objects
//! are gone it fails saying that the repository was pruned under it (run it again), not
//! with a bare "missing object".

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Archive, Source, check_against_oracle};
use tidemark_archiver::prune::{PruneOptions, prune_repository};
use tidemark_manifest::repo::{RepoState, Repository};
use tidemark_restore::commands::Target;
use tidemark_restore::commands::restore::{self, PhaseLog, RestoreOptions, RestoreReport};
use tidemark_restore::progress::Progress;
use tidemark_restore::{Cancel, ErrorClass, RestoreError};

/// Restores `target` planning from `state`, a reading taken before pruning ran: the seam
/// between planning and fetching.
async fn restore_planned_from(
    repo: &Repository,
    state: &RepoState,
    dir: &std::path::Path,
    target: Target,
) -> Result<RestoreReport, RestoreError> {
    let opts = RestoreOptions::new(dir, target);
    restore::run_logged(
        repo,
        Some(state),
        &opts,
        &Progress::hidden(),
        &Cancel::new(),
        &PhaseLog::new(),
    )
    .await
}

async fn prune(repo: &Repository, keep_last: usize, grace: Duration) -> Result<()> {
    let opts = PruneOptions {
        keep_last: Some(keep_last),
        grace,
        ..PruneOptions::default()
    };
    let report = prune_repository(repo, &opts, false, Duration::from_secs(60)).await?;
    eprintln!("{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_finishes_within_the_grace_period_and_says_when_it_was_pruned_under_it()
-> Result<()> {
    // Base 1, WAL after it, base 2, more WAL.
    let mut source = Source::new(31)?;
    let (repo, _) = common::local_repo(source.root.path()).await?;
    source.write(120)?;
    let mut archive = Archive::create(repo.clone(), &source).await?;
    let b1 = archive.base(&source).await?;
    source.write(200)?;
    archive.catch_up(&source).await?;
    source.flush()?;
    archive.base(&source).await?;
    source.write(60)?;
    archive.checkpoint(&source).await?;
    source.finish()?;
    let oracle = source.oracle()?;
    let out = tempfile::tempdir()?;

    // Plan now; prune with a policy that drops base 1 and the WAL after it, but a grace
    // period of an hour: the planned restore still finishes.
    let planned = repo.load().await?;
    prune(&repo, 1, Duration::from_secs(3600)).await?;
    let after = repo.load().await?;
    // A point only base 1 and the WAL after it restored: the end of a dropped segment.
    let between = planned
        .history
        .segments
        .iter()
        .find(|s| {
            s.first_seq > b1.earliest_seq && !after.history.segments.iter().any(|a| a.key == s.key)
        })
        .context("the policy must drop WAL after base 1")?
        .last_seq;
    ensure!(after.history.plan(Target::Seq(between)).is_err());
    let report = restore_planned_from(
        &repo,
        &planned,
        &out.path().join("within-grace"),
        Target::Seq(between),
    )
    .await
    .context("a restore planned within the grace period")?;
    check_against_oracle(&report, &oracle)?;

    // The same plan after a sweep without grace: base 1 and its WAL are gone.
    prune(&repo, 1, Duration::ZERO).await?;
    let e = restore_planned_from(
        &repo,
        &planned,
        &out.path().join("segments-gone"),
        Target::Seq(between),
    )
    .await
    .unwrap_err();
    let msg = e.to_string();
    ensure!(
        matches!(e, RestoreError::PrunedDuringRestore { .. }),
        "not recognised as pruning: {msg}"
    );
    ensure!(
        msg.contains("pruned while this restore ran")
            && msg.contains("run the restore again")
            && e.object()
                .is_some_and(|k| k.starts_with("wal/") || k.starts_with("bases/")),
        "{msg}"
    );
    ensure!(e.class() == ErrorClass::Failure, "{msg}");

    // Nothing was left behind by the failed restores.
    ensure!(
        common::names(out.path()) == vec!["within-grace".to_owned()],
        "{:?}",
        common::names(out.path())
    );
    Ok(())
}
