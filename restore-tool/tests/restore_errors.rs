//! What a restore refuses, and that a refused or failed restore leaves the target exactly as
//! it was: targets outside the window or in a gap, corrupt and missing objects, non-empty
//! targets, and `--force` moving old contents aside.

mod common;

use std::path::Path;

use anyhow::{Context, Result, ensure};
use common::{Archive, Source, check_against_oracle, names, restore_to};
use tidemark_manifest::model::time_from_micros;
use tidemark_restore::commands::Target;
use tidemark_restore::commands::restore::{self, RestoreOptions};
use tidemark_restore::commands::verify::{self, VerifyOptions, VerifyScope};
use tidemark_restore::progress::Progress;
use tidemark_restore::{Cancel, ErrorClass, RestoreError};

/// A repository with a lost stretch of WAL:
/// base 1 … gap … (records after the gap, no base yet) … base 2 … more.
struct Fixture {
    source: Source,
    repo: tidemark_manifest::repo::Repository,
    repo_dir: std::path::PathBuf,
    archive: Archive,
    gap: tidemark_manifest::model::Gap,
}

async fn fixture(seed: u64) -> Result<Fixture> {
    let mut source = Source::new(seed)?;
    let (repo, _) = common::local_repo(source.root.path()).await?;
    let repo_dir = source.root.path().join("repo");
    source.write(150)?;
    let mut archive = Archive::create(repo.clone(), &source).await?;
    archive.base(&source).await?;
    source.write(80)?;
    archive.catch_up(&source).await?;
    source.write(60)?;
    // A WAL file deleted before the archiver read it.
    let (lost_first, lost_last) = source.write_lost(20)?;
    source.write(50)?;
    archive.catch_up(&source).await?;
    let gap = archive
        .gaps()
        .last()
        .cloned()
        .context("the archiver recorded no gap")?;
    ensure!(
        (gap.first_seq, gap.last_seq) == (lost_first, lost_last),
        "the archiver recorded the gap {}..={}, but {lost_first}..={lost_last} were lost",
        gap.first_seq,
        gap.last_seq
    );
    // Base 2 must not need WAL from before the gap.
    source.flush()?;
    archive.base(&source).await?;
    source.write(70)?;
    archive.checkpoint(&source).await?;
    source.finish()?;
    Ok(Fixture {
        source,
        repo,
        repo_dir,
        archive,
        gap,
    })
}

fn class(e: &RestoreError) -> ErrorClass {
    e.class()
}

fn assert_untouched(parent: &Path, expected: &[&str]) {
    let found = names(parent);
    assert_eq!(
        found,
        expected,
        "the restore left something behind in {}",
        parent.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_outside_the_window_or_in_a_gap_are_refused() -> Result<()> {
    let f = fixture(21).await?;
    let out = tempfile::tempdir()?;
    let target = out.path().join("db");
    let b1 = &f.archive.bases[0];
    let b2 = &f.archive.bases[1];
    let oracle = f.source.oracle()?;

    // Before the window.
    let e = restore_to(&f.repo, &target, Target::Seq(b1.earliest_seq - 1))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");
    assert!(
        e.to_string().contains("before the restorable window"),
        "{e}"
    );
    let e = restore_to(&f.repo, &target, Target::Time(time_from_micros(0)))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");

    // After the window.
    let e = restore_to(&f.repo, &target, Target::Seq(oracle.last_seq() + 1))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");
    assert!(
        e.to_string().contains("after the newest archived point"),
        "{e}"
    );
    let future = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let e = restore_to(&f.repo, &target, Target::Time(future))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");

    // In the gap, and after it before base 2 (no base covers it).
    let e = restore_to(&f.repo, &target, Target::Seq(f.gap.first_seq + 1))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");
    assert!(e.to_string().contains("gap"), "{e}");
    let after_gap = f.gap.last_seq + 2;
    assert!(after_gap < b2.earliest_seq);
    let e = restore_to(&f.repo, &target, Target::Seq(after_gap))
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::NotRestorable, "{e}");
    assert_untouched(out.path(), &[]);

    // Just before the gap and after base 2 work.
    let r = restore_to(
        &f.repo,
        &out.path().join("before-gap"),
        Target::Seq(f.gap.first_seq - 1),
    )
    .await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, f.gap.first_seq - 1);
    assert_eq!(r.base.id, b1.id);
    let r = restore_to(&f.repo, &out.path().join("latest"), Target::Latest).await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());
    assert_eq!(r.base.id, b2.id);
    Ok(())
}

/// The segment objects of the local repository, in order.
fn segment_files(repo_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(repo_dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_missing_objects_are_named_and_nothing_is_left_behind() -> Result<()> {
    let f = fixture(22).await?;
    let out = tempfile::tempdir()?;
    let target = out.path().join("db");

    // A flipped byte in the body of a segment the latest point needs.
    let segs = segment_files(&f.repo_dir);
    let victim = segs[segs.len() - 2].clone();
    let key = format!("wal/{}", victim.file_name().unwrap().to_string_lossy());
    let original = std::fs::read(&victim)?;
    let mut bytes = original.clone();
    let at = 128 + (bytes.len() - 168) / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&victim, &bytes)?;
    let e = restore_to(&f.repo, &target, Target::Latest)
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::VerificationFailed, "{e}");
    assert!(
        e.to_string().contains(&key),
        "the error names the object: {e}"
    );
    assert_untouched(out.path(), &[]);

    // `verify` finds it too, without restoring: on a local directory the default reads
    // every object (a size check alone would call the repository fine), and so does --deep.
    let quick = verify::run(
        &f.repo,
        &VerifyOptions {
            scope: VerifyScope::All,
            deep: false,
            parallelism: 4,
            generation: None,
        },
        &Progress::hidden(),
        &Cancel::new(),
    )
    .await?;
    assert!(!quick.ok(), "{}", quick.render());
    assert_eq!(quick.exit_code(), 4);
    assert!(
        quick
            .problems
            .iter()
            .any(|p| p.object.as_deref() == Some(key.as_str())),
        "{}",
        quick.render()
    );
    let deep = verify::run(
        &f.repo,
        &VerifyOptions {
            scope: VerifyScope::All,
            deep: true,
            parallelism: 4,
            generation: None,
        },
        &Progress::hidden(),
        &Cancel::new(),
    )
    .await?;
    assert!(!deep.ok());
    assert!(
        deep.problems
            .iter()
            .any(|p| p.object.as_deref() == Some(key.as_str())),
        "{}",
        deep.render()
    );
    std::fs::write(&victim, &original)?;

    // A missing table file.
    let sst_dir = f.repo_dir.join("sst");
    let sst = std::fs::read_dir(&sst_dir)?.next().unwrap()?.path();
    let sst_key = format!("sst/{}", sst.file_name().unwrap().to_string_lossy());
    let kept = out.path().join("kept-sst");
    std::fs::rename(&sst, &kept)?;
    let all = verify::run(
        &f.repo,
        &VerifyOptions {
            scope: VerifyScope::All,
            deep: false,
            parallelism: 4,
            generation: None,
        },
        &Progress::hidden(),
        &Cancel::new(),
    )
    .await?;
    assert!(
        all.problems
            .iter()
            .any(|p| p.object.as_deref() == Some(sst_key.as_str())),
        "{}",
        all.render()
    );
    // Restores that need it fail naming it; the target stays as it was.
    let mut failed = 0;
    for target_spec in [Target::Latest, Target::Seq(f.archive.bases[0].earliest_seq)] {
        match restore_to(&f.repo, &target, target_spec).await {
            Err(e) => {
                assert_eq!(class(&e), ErrorClass::VerificationFailed, "{e}");
                assert!(e.to_string().contains(&sst_key), "{e}");
                failed += 1;
            }
            Ok(r) => {
                // This base does not use that table file.
                std::fs::remove_dir_all(&r.target_dir)?;
            }
        }
    }
    assert!(failed >= 1, "no restore needed {sst_key}");
    assert_untouched(out.path(), &["kept-sst"]);
    std::fs::rename(&kept, &sst)?;

    // A deleted segment the manifest lists: the download fails, naming it.
    let gone = victim.clone();
    std::fs::rename(&gone, out.path().join("kept-seg"))?;
    let e = restore_to(&f.repo, &target, Target::Latest)
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::VerificationFailed, "{e}");
    assert!(e.to_string().contains(&key), "{e}");
    assert_untouched(out.path(), &["kept-seg"]);
    std::fs::rename(out.path().join("kept-seg"), &gone)?;
    assert_untouched(out.path(), &[]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_empty_target_is_refused_and_force_moves_it_aside() -> Result<()> {
    let f = fixture(23).await?;
    let oracle = f.source.oracle()?;
    let out = tempfile::tempdir()?;
    let target = out.path().join("db");
    std::fs::create_dir(&target)?;
    std::fs::write(target.join("precious.txt"), b"yesterday's data")?;

    let e = restore_to(&f.repo, &target, Target::Latest)
        .await
        .unwrap_err();
    assert_eq!(class(&e), ErrorClass::Usage, "{e}");
    assert!(matches!(e, RestoreError::TargetNotEmpty { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(names(&target), ["precious.txt"]);
    assert_untouched(out.path(), &["db"]);

    // A dry run says what it would do and writes nothing.
    let mut opts = RestoreOptions::new(&target, Target::Latest);
    opts.dry_run = true;
    let r = restore::run(&f.repo, &opts, &Progress::hidden(), &Cancel::new()).await?;
    assert!(r.dry_run && r.cutoff.is_none());
    assert_eq!(r.planned_max_seq, oracle.last_seq());
    assert!(
        r.warnings.iter().any(|w| w.contains("--force")),
        "{:?}",
        r.warnings
    );
    assert!(r.render().contains("Dry run"));
    assert_untouched(out.path(), &["db"]);

    // --force: the old contents move aside, nothing is deleted.
    let mut opts = RestoreOptions::new(&target, Target::Latest);
    opts.force = true;
    let r = restore::run(&f.repo, &opts, &Progress::hidden(), &Cancel::new()).await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());
    let aside = r.moved_aside.clone().expect("moved aside");
    assert_eq!(
        std::fs::read(aside.join("precious.txt"))?,
        b"yesterday's data"
    );
    let listing = names(out.path());
    assert_eq!(listing.len(), 2, "{listing:?}");
    assert!(listing[1].starts_with("db.old-"), "{listing:?}");

    // An empty directory is not "non-empty": no --force needed.
    let empty = out.path().join("empty");
    std::fs::create_dir(&empty)?;
    let r = restore_to(
        &f.repo,
        &empty,
        Target::Seq(f.archive.bases[0].earliest_seq),
    )
    .await?;
    assert!(r.moved_aside.is_none());
    check_against_oracle(&r, &oracle)?;

    // A target inside the local repository is refused outright.
    let store = tidemark_restore::commands::StoreOptions {
        from: tidemark_manifest::store::StoreUrl::local(&f.repo_dir)?.to_string(),
        ..Default::default()
    };
    let opts = RestoreOptions::new(f.repo_dir.join("restored"), Target::Latest);
    let e = restore::run_from(&store, &opts, &Progress::hidden(), &Cancel::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("overlaps the repository"), "{e}");
    assert!(!f.repo_dir.join("restored").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_what_a_target_needs() -> Result<()> {
    let f = fixture(24).await?;
    for scope in [
        VerifyScope::Target(Target::Latest),
        VerifyScope::Target(Target::Seq(f.gap.first_seq - 1)),
        VerifyScope::All,
    ] {
        for deep in [false, true] {
            let r = verify::run(
                &f.repo,
                &VerifyOptions {
                    scope,
                    deep,
                    parallelism: 3,
                    generation: None,
                },
                &Progress::hidden(),
                &Cancel::new(),
            )
            .await?;
            assert!(r.ok(), "{scope:?} deep={deep}: {}", r.render());
            assert!(r.segments_checked > 0);
        }
    }
    let e = verify::run(
        &f.repo,
        &VerifyOptions {
            scope: VerifyScope::Target(Target::Seq(f.gap.first_seq)),
            deep: false,
            parallelism: 3,
            generation: None,
        },
        &Progress::hidden(),
        &Cancel::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.class(), ErrorClass::NotRestorable, "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_a_cancelled_restore_leaves_nothing() -> Result<()> {
    use std::sync::Arc;
    use std::time::Duration;
    use tidemark_manifest::repo::Repository;
    use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
    use tidemark_manifest::store::{LocalStore, ObjectStore, RetryPolicy, RetryStore, StoreOp};

    let f = fixture(25).await?;
    let oracle = f.source.oracle()?;
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(&f.repo_dir)?);
    let faults = Arc::new(FaultStore::new(local));
    let policy = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    };
    let repo = Repository::new(Arc::new(RetryStore::new(faults.clone(), policy)));
    let out = tempfile::tempdir()?;

    // Every download fails once or twice before it works: the retry layer hides it.
    faults.inject(
        FaultRule::new(Fault::Transient)
            .on(StoreOp::GetToFile)
            .times(6),
    );
    let r = restore_to(&repo, &out.path().join("retried"), Target::Latest).await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());
    assert!(faults.injected() >= 6);
    faults.clear();

    // A slow store, cancelled halfway: the restore stops, cleans up, and says so.
    faults.inject(
        FaultRule::new(Fault::Delay(Duration::from_millis(1000)))
            .on(StoreOp::GetToFile)
            .key_prefix("wal/"),
    );
    let cancel = Cancel::new();
    let task = {
        let (repo, cancel) = (repo.clone(), cancel.clone());
        let mut opts = RestoreOptions::new(out.path().join("cancelled"), Target::Latest);
        opts.parallelism = 2;
        tokio::spawn(async move { restore::run(&repo, &opts, &Progress::hidden(), &cancel).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let e = task.await?.unwrap_err();
    assert!(matches!(e, RestoreError::Interrupted), "{e}");
    assert_eq!(e.class(), ErrorClass::Failure);
    assert_untouched(out.path(), &["retried"]);
    Ok(())
}

/// A restore made for a standby carries the standby's marker when it lands in place: the
/// marker is written before the rename, so no crash between the two can leave a restored
/// database the follower then refuses as "not a warm standby". A re-base over a standby
/// (`--force`) moves the old one aside with its own marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_restore_lands_with_its_marker() -> Result<()> {
    use tidemark_restore::commands::follow::STANDBY_FILE;
    let f = fixture(29).await?;
    let oracle = f.source.oracle()?;
    let out = tempfile::tempdir()?;
    let target = out.path().join("db");

    let plain = out.path().join("plain");
    restore_to(&f.repo, &plain, Target::Latest).await?;
    assert!(
        !plain.join(STANDBY_FILE).exists(),
        "a plain restore is no standby"
    );

    let mut opts = RestoreOptions::new(&target, Target::Latest);
    opts.standby = true;
    let r = restore::run(&f.repo, &opts, &Progress::hidden(), &Cancel::new()).await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());
    let text = std::fs::read_to_string(target.join(STANDBY_FILE))?;
    assert!(text.contains(&r.repository), "{text}");

    opts.force = true;
    let r = restore::run(&f.repo, &opts, &Progress::hidden(), &Cancel::new()).await?;
    let aside = r.moved_aside.clone().expect("the old standby moved aside");
    assert!(aside.join(STANDBY_FILE).exists());
    assert!(target.join(STANDBY_FILE).exists());
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());
    Ok(())
}
