//! Restores of a real RocksDB, archived by the archiver's pipeline, compared key by key
//! with the load generator's oracle: sequence targets (at and inside batches), time
//! targets, the latest point, across two base backups, on the local store and on S3.

mod common;

use anyhow::Result;
use common::{Archive, Source, check_against_oracle, restore_to, restore_verified};
use tidemark_manifest::model::time_from_micros;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::testing::s3 as test_s3;
use tidemark_restore::commands::Target;
use tidemark_restore::verify::{VerificationStatus, VerifyMode};
use tidemark_tests::Oracle;

/// Three phases of writes with a base backup after the first two:
/// base 1 … phase 2 … base 2 … phase 3.
async fn build(source: &mut Source, repo: Repository) -> Result<Archive> {
    source.write(260)?;
    let mut archive = Archive::create(repo, source).await?;
    archive.catch_up(source).await?;
    archive.base(source).await?;
    source.write(420)?;
    archive.catch_up(source).await?;
    archive.base(source).await?;
    source.write(330)?;
    archive.checkpoint(source).await?;
    source.write(60)?;
    // The last batches are shipped but only reachable by the tail walk.
    archive.catch_up(source).await?;
    source.finish()?;
    Ok(archive)
}

/// The index of the first batch whose ops start at or after `seq`.
fn batch_at(oracle: &Oracle, seq: u64) -> usize {
    oracle.batches().partition_point(|b| b.first_seq < seq)
}

async fn restore_everywhere(
    repo: &Repository,
    archive: &Archive,
    oracle: &Oracle,
    root: &std::path::Path,
) -> Result<()> {
    let b1 = &archive.bases[0];
    let b2 = &archive.bases[1];
    assert!(b1.earliest_seq < b2.earliest_seq);
    let last = oracle.last_seq();
    let batches = oracle.batches();
    let mid1 =
        &batches[(batch_at(oracle, b1.earliest_seq) + batch_at(oracle, b2.earliest_seq)) / 2];
    let mid2 = &batches[(batch_at(oracle, b2.earliest_seq) + batches.len()) / 2];
    // A batch of several ops after base 2, to target a sequence inside it.
    let wide = batches[batch_at(oracle, b2.earliest_seq) + 3..]
        .iter()
        .find(|b| b.count >= 3)
        .expect("the workload writes batches of several ops");

    let mut n = 0;
    let mut dir = || {
        n += 1;
        root.join(format!("restored-{n}"))
    };

    // The latest point, including the segments only the tail walk finds: verified by
    // default without a second replay (the base alone with key estimates, the WAL read
    // back) ...
    let r = restore_to(repo, &dir(), Target::Latest).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, last);
    assert_eq!(r.base.id, b2.id);
    let v = r.verification.as_ref().unwrap();
    assert_eq!(v.level, VerifyMode::Quick);
    assert_eq!(v.status, VerificationStatus::Passed, "{v:?}");
    let base = v.steps.base.as_ref().unwrap();
    assert!(base.sequence.unwrap() <= b2.earliest_seq, "{base:?}");
    assert!(base.column_families.iter().all(|c| c.estimated), "{base:?}");
    assert_eq!(v.steps.wal.as_ref().unwrap().last_seq, last);
    assert!(v.steps.open.is_none());

    // ... with --verify standard, every key of the base's tables is read as well ...
    let r = restore_verified(repo, &dir(), Target::Latest, VerifyMode::Standard).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, last);
    let v = r.verification.as_ref().unwrap();
    assert_eq!(v.level, VerifyMode::Standard);
    assert_eq!(v.status, VerificationStatus::Passed, "{v:?}");
    assert_eq!((v.ends_at_sequence, v.latest_sequence), (Some(last), None));
    let base = v.steps.base.as_ref().unwrap();
    assert!(base.sequence.unwrap() <= b2.earliest_seq, "{base:?}");
    assert!(base.column_families.iter().all(|c| !c.estimated));
    let counters = base.column_families.iter().find(|c| c.name == "counters");
    assert_eq!(
        counters.and_then(|c| c.merge_operator.as_deref()),
        Some("tidemark.add"),
        "the base's merge operator is stood in for: {base:?}"
    );
    let wal = v.steps.wal.as_ref().unwrap();
    assert_eq!(wal.last_seq, last);
    assert_eq!(wal.first_seq, Some(b2.replay_from_seq));
    assert_eq!(wal.records, r.replay.as_ref().unwrap().records_replayed);
    assert!(v.steps.open.is_none());

    // ... and with --verify full, RocksDB's own replay reaches the cutoff, every key counted.
    let r = restore_verified(repo, &dir(), Target::Latest, VerifyMode::Full).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, last);
    let v = r.verification.as_ref().unwrap();
    assert_eq!(v.status, VerificationStatus::Passed, "{v:?}");
    assert_eq!(v.latest_sequence, Some(last));
    assert_eq!(v.steps.wal.as_ref().unwrap().last_seq, last);
    let counters = v
        .column_families
        .iter()
        .find(|c| c.name == "counters")
        .unwrap();
    assert_eq!(counters.merge_operator.as_deref(), Some("tidemark.add"));
    let expected = oracle.state_at(last)?;
    for cf in &v.column_families {
        assert_eq!(
            cf.keys as usize,
            expected.cf(&cf.name).map_or(0, |m| m.len()),
            "key count of {}",
            cf.name
        );
    }

    // Each base's own point, exactly.
    for b in [b1, b2] {
        let r = restore_to(repo, &dir(), Target::Seq(b.earliest_seq)).await?;
        assert_eq!(check_against_oracle(&r, oracle)?, b.earliest_seq);
        assert_eq!(r.base.id, b.id);
    }

    // Batch boundaries between the bases (base 1 is used) and after base 2.
    let r = restore_to(repo, &dir(), Target::Seq(mid1.last_seq())).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, mid1.last_seq());
    assert_eq!(r.base.id, b1.id);
    assert!(r.cutoff.as_ref().unwrap().rounded_down.is_none());
    let r = restore_to(repo, &dir(), Target::Seq(mid2.last_seq())).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, mid2.last_seq());
    assert_eq!(r.base.id, b2.id);

    // Inside a batch: rounded down to the batch before it, and said so.
    let inside = wide.first_seq + 1;
    let r = restore_to(repo, &dir(), Target::Seq(inside)).await?;
    assert_eq!(check_against_oracle(&r, oracle)?, wide.first_seq - 1);
    let rd = r
        .cutoff
        .as_ref()
        .unwrap()
        .rounded_down
        .expect("rounded down");
    assert_eq!(
        (
            rd.requested,
            rd.batch_first_seq,
            rd.batch_last_seq,
            rd.restored_to
        ),
        (inside, wide.first_seq, wide.last_seq(), wide.first_seq - 1)
    );
    assert!(r.render().contains("rounded down"), "{}", r.render());

    // Times: every batch carries the generator's wall time, so the oracle knows the cutoff.
    for b in [mid1, mid2] {
        let t = time_from_micros(b.unix_micros);
        let r = restore_to(repo, &dir(), Target::Time(t)).await?;
        let cutoff = check_against_oracle(&r, oracle)?;
        assert_eq!(cutoff, oracle.seq_at_time(b.unix_micros), "time {t}");
        let c = r.cutoff.as_ref().unwrap();
        assert!(
            c.time <= t,
            "the last record ({}) is after the target ({t})",
            c.time
        );
        if let Some(next) = c.next_record {
            assert!(next.time > t);
            assert_eq!(next.seq, cutoff + 1);
        }
        // One microsecond before that batch: it is left out.
        let before = time_from_micros(b.unix_micros - 1);
        let r = restore_to(repo, &dir(), Target::Time(before)).await?;
        assert_eq!(
            check_against_oracle(&r, oracle)?,
            oracle.seq_at_time(b.unix_micros - 1)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_restores_match_the_oracle() -> Result<()> {
    let mut source = Source::new(11)?;
    let (repo, _url) = common::local_repo(source.root.path()).await?;
    let archive = build(&mut source, repo.clone()).await?;
    let oracle = source.oracle()?;
    let out = tempfile::tempdir()?;
    restore_everywhere(&repo, &archive, &oracle, out.path()).await?;

    // The restored database is a healthy database for the application: it opens read-write
    // with the application's options, takes writes, flushes, compacts and reopens.
    let r = restore_to(&repo, &out.path().join("healthy"), Target::Latest).await?;
    {
        let db = tidemark_tests::open_db(&r.target_dir)?;
        assert_eq!(db.latest_sequence_number(), oracle.last_seq());
        let cf = db.cf_handle("counters").unwrap();
        db.merge_cf(&cf, b"counter/x", 5u64.to_le_bytes())?;
        db.flush()?;
        db.flush_cf(&cf)?;
        db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
    }
    let db = tidemark_tests::open_db(&r.target_dir)?;
    assert_eq!(db.latest_sequence_number(), oracle.last_seq() + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_restores_match_the_oracle() -> Result<()> {
    let Some(endpoint) = test_s3::endpoint("s3_restores_match_the_oracle") else {
        return Ok(());
    };
    let mut source = Source::new(12)?;
    let (repo, store_opts) = common::s3_repo(&endpoint, "oracle").await?;
    let archive = build(&mut source, repo.clone()).await?;
    let oracle = source.oracle()?;
    let out = tempfile::tempdir()?;
    restore_everywhere(&repo, &archive, &oracle, out.path()).await?;

    // Through the store options the command line uses (a fresh store and retry layer).
    let opened = store_opts.open().await?;
    let r = restore_to(&opened, &out.path().join("via-url"), Target::Latest).await?;
    assert_eq!(check_against_oracle(&r, &oracle)?, oracle.last_seq());

    // And through the binary, with the S3 flags.
    let b1 = &archive.bases[0];
    let dir = out.path().join("via-cli");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-restore"))
        .args([
            "restore",
            "--from",
            &store_opts.from,
            "--endpoint-url",
            &endpoint,
            "--path-style",
        ])
        .args(["--target".as_ref(), dir.as_os_str()])
        .args([
            "--seq",
            &b1.earliest_seq.to_string(),
            "--parallelism",
            "3",
            "--json",
        ])
        .output()?;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (state, seq) = tidemark_tests::read_db_state_and_seq(&dir)?;
    assert_eq!(seq, b1.earliest_seq);
    assert!(oracle.state_at(seq)?.diff(&state).is_none());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-restore"))
        .args([
            "verify",
            "--from",
            &store_opts.from,
            "--endpoint-url",
            &endpoint,
            "--path-style",
        ])
        .args(["--all", "--deep"])
        .output()?;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(())
}
