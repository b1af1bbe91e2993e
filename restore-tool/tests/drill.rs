//! `tidemark-restore drill` through the binary: passing drills (latest and random points, a
//! local store and S3) whose reports carry every phase, the verification, the RTO and the
//! RPO; drills failed by a corrupt object, a failing or hanging check command; usage errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use common::{Archive, Source};
use serde_json::Value;
use tidemark_manifest::testing::s3 as test_s3;
use tidemark_tests::Oracle;
use tidemark_tests::harness::output_text as text;

const PHASES: [&str; 6] = [
    "plan",
    "fetch",
    "replay",
    "verify",
    "check_command",
    "cleanup",
];

fn drill(args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidemark-restore"));
    cmd.arg("drill").args(args).env_remove("RUST_LOG");
    for var in [
        "TIDEMARK_FROM",
        "TIDEMARK_DRILL_TARGET",
        "TIDEMARK_DRILL_SCRATCH",
        "TIDEMARK_DRILL_CHECK_COMMAND",
        "TIDEMARK_DRILL_CHECK_TIMEOUT",
        "TIDEMARK_DRILL_REPORT",
        "TIDEMARK_DRILL_SEED",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn read_report(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("no report at {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The status of each phase, in report order.
fn phase_status(report: &Value) -> Vec<(String, String)> {
    report["phases"]
        .as_array()
        .expect("phases is a list")
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expect_phases(report: &Value, expected: [&str; 6]) {
    let found = phase_status(report);
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, PHASES, "{report:#}");
    let statuses: Vec<&str> = found.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(statuses, expected, "{report:#}");
}

struct Fixture {
    source: Source,
    url: String,
    repo_dir: PathBuf,
    first_restorable: u64,
}

/// A repository with two base backups and WAL after each, on the local store.
async fn fixture(seed: u64) -> Result<Fixture> {
    let mut source = Source::new(seed)?;
    let (repo, url) = common::local_repo(source.root.path()).await?;
    let repo_dir = source.root.path().join("repo");
    let first_restorable = build(&mut source, repo).await?;
    Ok(Fixture {
        source,
        url,
        repo_dir,
        first_restorable,
    })
}

/// Writes, archives and takes two bases; returns the first restorable sequence number.
async fn build(source: &mut Source, repo: tidemark_manifest::repo::Repository) -> Result<u64> {
    source.write(120)?;
    let mut archive = Archive::create(repo, source).await?;
    let first = archive.base(source).await?.earliest_seq;
    source.write(150)?;
    archive.catch_up(source).await?;
    source.flush()?;
    archive.base(source).await?;
    source.write(100)?;
    archive.checkpoint(source).await?;
    source.finish()?;
    Ok(first)
}

/// What every passing report must say, checked against the oracle: all phases, full
/// verification at the cutoff with the oracle's key counts in every column family, the RPO,
/// and the scratch directory gone unless kept. Returns the cutoff.
fn check_passed(report: &Value, oracle: &Oracle, check_command: bool) -> Result<u64> {
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(report["report_version"], 1);
    assert!(report["failure"].is_null(), "{report:#}");
    expect_phases(
        report,
        [
            "passed",
            "passed",
            "passed",
            "passed",
            if check_command { "passed" } else { "skipped" },
            if report["scratch"]["kept"] == true {
                "skipped"
            } else {
                "passed"
            },
        ],
    );
    let cutoff = report["restore"]["cutoff"]["seq"]
        .as_u64()
        .context("no cutoff")?;
    let v = &report["verification"];
    assert_eq!(v["status"], "passed", "{report:#}");
    assert_eq!(v["latest_sequence"], cutoff);
    assert_eq!(v["expected_sequence"], cutoff);
    let expected = oracle.state_at(cutoff)?;
    let counts: BTreeMap<String, u64> = v["column_families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["estimated"], false, "{c}");
            (
                c["name"].as_str().unwrap().to_owned(),
                c["keys"].as_u64().unwrap(),
            )
        })
        .collect();
    let oracle_counts: BTreeMap<String, u64> = expected
        .cf_names()
        .map(|n| (n.to_owned(), expected.cf(n).unwrap().len() as u64))
        .collect();
    assert_eq!(counts, oracle_counts, "key counts per column family");
    assert_eq!(counts.len(), tidemark_tests::COLUMN_FAMILIES.len());

    // RPO: the newest archived record is the writer's last, the restored point is behind it
    // by exactly the difference.
    let rpo = &report["rpo"];
    let last = oracle.last_seq();
    assert_eq!(rpo["newest_archived_seq"], last, "{rpo:#}");
    assert_eq!(rpo["latest_restorable_seq"], last, "{rpo:#}");
    assert_eq!(rpo["restored_seq"], cutoff);
    assert_eq!(rpo["restored_behind_newest_seqs"], last - cutoff);
    let age = rpo["newest_archived_age_ms"].as_i64().context("no age")?;
    assert!(
        (0..600_000).contains(&age),
        "the newest record is {age} ms old"
    );
    let behind = rpo["restored_behind_newest_ms"]
        .as_i64()
        .context("no lag")?;
    assert!(behind >= 0, "{rpo:#}");
    if cutoff == last {
        assert_eq!(behind, 0);
    }
    for key in ["measured_at", "newest_archived_time", "restored_time"] {
        assert!(rpo[key].is_string(), "{key}: {rpo:#}");
    }

    // RTO: the total covers the phases (which may overlap: fetch and replay run together).
    let total = report["total_ms"].as_u64().context("no total")?;
    let phases: Vec<u64> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["phase"] != "cleanup")
        .map(|p| p["duration_ms"].as_u64().unwrap())
        .collect();
    assert!(phases.iter().all(|&p| p <= total), "{phases:?} > {total}");

    // The scratch directory.
    let dir = PathBuf::from(report["scratch"]["dir"].as_str().unwrap());
    if report["scratch"]["kept"] == true {
        assert!(
            dir.join("db").join("CURRENT").is_file(),
            "{}",
            dir.display()
        );
    } else {
        assert_eq!(report["scratch"]["removed"], true);
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
    Ok(cutoff)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_of_the_latest_and_a_random_point_pass() -> Result<()> {
    let f = fixture(41).await?;
    let oracle = f.source.oracle()?;
    let out = tempfile::tempdir()?;
    let scratch = out.path().join("scratch");
    std::fs::create_dir(&scratch)?;

    // The latest point, the defaults (the report is written, the summary printed).
    let report_path = out.path().join("latest.json");
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--report",
            &s(&report_path),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let summary = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "Recovery drill PASSED",
        "RTO",
        "RPO",
        "verification  passed",
    ] {
        assert!(summary.contains(needle), "{needle:?}: {}", text(&o));
    }
    let r = read_report(&report_path)?;
    assert_eq!(r["target"]["requested"], "latest");
    assert_eq!(r["target"]["resolved"], "latest");
    assert_eq!(check_passed(&r, &oracle, false)?, oracle.last_seq());
    assert_eq!(
        common::names(&scratch),
        Vec::<String>::new(),
        "the drill left something in its scratch directory"
    );
    assert_eq!(
        common::names(out.path()),
        ["latest.json", "scratch"],
        "no temporary report file is left"
    );

    // A random point, kept: the restored database is the oracle's state at its cutoff.
    let report_path = out.path().join("random.json");
    let o = drill(
        &[
            "--from",
            &f.url,
            "--target-point",
            "random",
            "--seed",
            "20261123",
            "--keep",
            "--report",
            &s(&report_path),
        ],
        &[("TIDEMARK_DRILL_SCRATCH", &s(&scratch))],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = read_report(&report_path)?;
    assert_eq!(r["target"]["requested"], "random");
    assert_eq!(r["target"]["seed"], 20261123);
    let picked = r["target"]["resolved"]["seq"]
        .as_u64()
        .context("a random point resolves to a sequence number")?;
    assert!(
        (f.first_restorable..=oracle.last_seq()).contains(&picked),
        "{picked} is outside the window {}..={}",
        f.first_restorable,
        oracle.last_seq()
    );
    let cutoff = check_passed(&r, &oracle, false)?;
    assert!(cutoff <= picked, "cutoff {cutoff} after the point {picked}");
    assert!(oracle.is_boundary(cutoff));
    let kept = PathBuf::from(r["scratch"]["dir"].as_str().unwrap());
    assert!(kept.starts_with(&scratch));
    let (state, at) = tidemark_tests::read_db_state_and_seq(&kept.join("db"))?;
    assert_eq!(at, cutoff);
    assert!(oracle.state_at(cutoff)?.diff(&state).is_none());
    std::fs::remove_dir_all(&kept)?;

    // The same seed draws the same point; the JSON report also goes to standard output.
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--target-point",
            "random",
            "--seed",
            "20261123",
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let again: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(again["target"]["resolved"]["seq"], picked);
    assert_eq!(check_passed(&again, &oracle, false)?, cutoff);
    assert_eq!(again["verification"]["level"], "full");

    // The same point verified at `standard` (TIDEMARK_DRILL_VERIFY=standard): the
    // base opened alone, the WAL read back, no second replay; kept, it is the oracle's state.
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--target-point",
            "random",
            "--seed",
            "20261123",
            "--keep",
            "--json",
        ],
        &[("TIDEMARK_DRILL_VERIFY", "standard")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    expect_phases(
        &r,
        ["passed", "passed", "passed", "passed", "skipped", "skipped"],
    );
    let v = &r["verification"];
    assert_eq!(v["level"], "standard", "{v:#}");
    assert_eq!(v["status"], "passed", "{v:#}");
    assert_eq!(v["ends_at_sequence"], cutoff, "{v:#}");
    assert!(
        v["latest_sequence"].is_null() && v["steps"]["open"].is_null(),
        "{v:#}"
    );
    assert_eq!(v["steps"]["base"]["status"], "passed", "{v:#}");
    assert_eq!(v["steps"]["wal"]["last_seq"], cutoff, "{v:#}");
    let kept = PathBuf::from(r["scratch"]["dir"].as_str().unwrap());
    let (state, at) = tidemark_tests::read_db_state_and_seq(&kept.join("db"))?;
    assert_eq!(at, cutoff);
    assert!(oracle.state_at(cutoff)?.diff(&state).is_none());
    std::fs::remove_dir_all(&kept)?;

    // Different seeds draw different points.
    let mut points = std::collections::BTreeSet::new();
    for seed in 1..=3u64 {
        let o = drill(
            &[
                "--from",
                &f.url,
                "--scratch",
                &s(&scratch),
                "--target-point",
                "random",
                "--seed",
                &seed.to_string(),
                "--json",
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let r: Value = serde_json::from_slice(&o.stdout)?;
        check_passed(&r, &oracle, false)?;
        points.insert(r["target"]["resolved"]["seq"].as_u64().unwrap());
    }
    assert!(points.len() > 1, "three seeds drew {points:?}");

    // A sequence number and a time.
    let b = &oracle.batches()[oracle.batches().len() / 2];
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--target-point",
            &format!("seq:{}", b.last_seq()),
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(check_passed(&r, &oracle, false)?, b.last_seq());
    let t = tidemark_manifest::model::time_from_micros(b.unix_micros)
        .format(&time::format_description::well_known::Rfc3339)?;
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--target-point",
            &t,
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(
        check_passed(&r, &oracle, false)?,
        oracle.seq_at_time(b.unix_micros)
    );
    assert_eq!(common::names(&scratch), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_on_s3_passes() -> Result<()> {
    let Some(endpoint) = test_s3::endpoint("a_drill_on_s3_passes") else {
        return Ok(());
    };
    let mut source = Source::new(42)?;
    let (repo, store) = common::s3_repo(&endpoint, "drill").await?;
    build(&mut source, repo).await?;
    let oracle = source.oracle()?;
    let out = tempfile::tempdir()?;
    let report_path = out.path().join("s3.json");
    // The store flags from the environment, as the systemd unit gives them.
    let o = drill(
        &[
            "--target-point",
            "random",
            "--scratch",
            &s(out.path()),
            "--report",
            &s(&report_path),
        ],
        &[
            ("TIDEMARK_FROM", &store.from),
            ("TIDEMARK_ENDPOINT_URL", &endpoint),
            ("TIDEMARK_PATH_STYLE", "true"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = read_report(&report_path)?;
    assert!(
        r["repository"].as_str().unwrap().starts_with("s3://"),
        "{r:#}"
    );
    assert!(
        r["target"]["seed"].is_u64(),
        "a fresh seed is recorded: {r:#}"
    );
    check_passed(&r, &oracle, false)?;
    assert_eq!(common::names(out.path()), ["s3.json"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_object_fails_the_drill_and_is_named() -> Result<()> {
    let f = fixture(43).await?;
    let out = tempfile::tempdir()?;
    let scratch = out.path().join("scratch");
    std::fs::create_dir(&scratch)?;
    let report_path = out.path().join("report.json");
    let run = || {
        drill(
            &[
                "--from",
                &f.url,
                "--scratch",
                &s(&scratch),
                "--report",
                &s(&report_path),
            ],
            &[],
        )
    };

    // A flipped byte in the newest segment (which the latest point needs).
    let mut segs: Vec<PathBuf> = std::fs::read_dir(f.repo_dir.join("wal"))?
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let victim = segs.last().context("no segments")?.clone();
    let key = format!("wal/{}", victim.file_name().unwrap().to_string_lossy());
    let original = std::fs::read(&victim)?;
    let mut bytes = original.clone();
    let n = bytes.len();
    bytes[n - 60] ^= 0x01;
    std::fs::write(&victim, &bytes)?;
    let o = run();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("Recovery drill FAILED"), "{}", text(&o));
    assert!(stdout.contains(&key), "{}", text(&o));
    let r = read_report(&report_path)?;
    assert_eq!(r["status"], "failed", "{r:#}");
    let failure = &r["failure"];
    assert_eq!(failure["object"], key.as_str(), "{r:#}");
    assert_eq!(failure["class"], "verification_failed", "{r:#}");
    assert!(failure["message"].as_str().unwrap().contains(&key), "{r:#}");
    let failed_phase = failure["phase"].as_str().unwrap();
    assert!(
        failed_phase == "fetch" || failed_phase == "replay",
        "{failed_phase}"
    );
    // Fetch and replay run together: the one that failed stopped the other.
    expect_phases(
        &r,
        ["passed", "failed", "failed", "skipped", "skipped", "passed"],
    );
    assert!(r["verification"].is_null());
    // The RPO was measured before the restore failed; the restored point is absent.
    assert!(r["rpo"]["newest_archived_seq"].is_u64(), "{r:#}");
    assert!(r["rpo"]["restored_seq"].is_null(), "{r:#}");
    assert_eq!(r["scratch"]["removed"], true);
    assert_eq!(common::names(&scratch), Vec::<String>::new());
    std::fs::write(&victim, &original)?;
    let o = run();
    assert_eq!(o.status.code(), Some(0), "repaired: {}", text(&o));

    // A flipped byte in every table file (whichever base the drill picks, its files are hit).
    let mut ssts: Vec<PathBuf> = std::fs::read_dir(f.repo_dir.join("sst"))?
        .map(|e| e.unwrap().path())
        .collect();
    ssts.sort();
    ensure!(!ssts.is_empty(), "the bases hold no table files");
    let mut corrupted = Vec::new();
    for sst in &ssts {
        let mut bytes = std::fs::read(sst)?;
        let n = bytes.len();
        bytes[n / 2] ^= 0x80;
        std::fs::write(sst, &bytes)?;
        corrupted.push(format!(
            "sst/{}",
            sst.file_name().unwrap().to_string_lossy()
        ));
    }
    let o = run();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let r = read_report(&report_path)?;
    assert_eq!(r["status"], "failed");
    assert_eq!(r["failure"]["phase"], "fetch", "{r:#}");
    let object = r["failure"]["object"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(corrupted.contains(&object), "{r:#}");
    assert_eq!(common::names(&scratch), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_commands_see_the_restored_database_and_can_fail_the_drill() -> Result<()> {
    let f = fixture(44).await?;
    let oracle = f.source.oracle()?;
    let out = tempfile::tempdir()?;
    let scratch = out.path().join("scratch");
    std::fs::create_dir(&scratch)?;
    let report_path = out.path().join("report.json");

    // A check that copies what it is given, so that the test can look at it afterwards.
    let seen = out.path().join("seen");
    let check = format!(
        r#"test "$1" = "$TIDEMARK_DRILL_DB" && test -f "$TIDEMARK_DRILL_DB/CURRENT" && cp -a "$TIDEMARK_DRILL_DB" '{seen}' && echo "checked $TIDEMARK_DRILL_DB at $TIDEMARK_DRILL_SEQ""#,
        seen = seen.display()
    );
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--report",
            &s(&report_path),
        ],
        &[("TIDEMARK_DRILL_CHECK_COMMAND", &check)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = read_report(&report_path)?;
    let cutoff = check_passed(&r, &oracle, true)?;
    let c = &r["check"];
    assert_eq!(c["exit_code"], 0, "{r:#}");
    assert_eq!(c["timed_out"], false);
    let db = PathBuf::from(r["scratch"]["dir"].as_str().unwrap()).join("db");
    assert_eq!(
        c["stdout_tail"],
        format!("checked {} at {cutoff}\n", db.display())
    );
    let (state, at) = tidemark_tests::read_db_state_and_seq(&seen)?;
    assert_eq!(at, cutoff, "the check command saw the restored database");
    assert!(oracle.state_at(cutoff)?.diff(&state).is_none());

    // `false`: the drill fails in the check phase; the directory is still removed.
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--check-command",
            "echo 'orders table is empty' >&2; false",
            "--report",
            &s(&report_path),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("orders table is empty"),
        "{}",
        text(&o)
    );
    let r = read_report(&report_path)?;
    assert_eq!(r["status"], "failed");
    expect_phases(
        &r,
        ["passed", "passed", "passed", "passed", "failed", "passed"],
    );
    assert_eq!(r["failure"]["phase"], "check_command");
    assert_eq!(r["failure"]["class"], "check_failed");
    assert!(r["failure"]["object"].is_null());
    assert_eq!(r["check"]["exit_code"], 1);
    assert_eq!(r["check"]["stderr_tail"], "orders table is empty\n");
    assert_eq!(
        r["verification"]["status"], "passed",
        "the restore itself was fine"
    );
    assert_eq!(common::names(&scratch), Vec::<String>::new());

    // A check that hangs is killed at the timeout.
    let started = std::time::Instant::now();
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &s(&scratch),
            "--check-command",
            "sleep 120",
            "--check-timeout",
            "1s",
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(r["check"]["timed_out"], true, "{r:#}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{r:#}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_eq!(common::names(&scratch), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_unrestorable_points_fail_the_drill() -> Result<()> {
    let f = fixture(45).await?;
    let out = tempfile::tempdir()?;
    let scratch = s(out.path());
    for (args, needle) in [
        (vec!["--target-point", "yesterday"], "--target-point"),
        (vec!["--target-point", "seq:x"], "sequence number"),
        (vec!["--seed", "3"], "--seed only applies"),
        (vec!["--check-timeout", "0s"], "--check-timeout"),
        (
            vec!["--report", "/nonexistent/dir/report.json"],
            "does not exist",
        ),
    ] {
        let mut all = vec!["--from", &f.url, "--scratch", &scratch];
        all.extend(args.iter().copied());
        let o = drill(&all, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o)
        );
    }
    let o = drill(
        &["--from", &f.url, "--scratch", "/nonexistent/scratch"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/scratch"));
    let o = drill(&["--from", "/plain/path", "--scratch", &scratch], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(common::names(out.path()), Vec::<String>::new());

    // A point outside the window: the drill ran and failed in planning.
    let o = drill(
        &[
            "--from",
            &f.url,
            "--scratch",
            &scratch,
            "--target-point",
            "seq:1",
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(r["failure"]["phase"], "plan", "{r:#}");
    assert_eq!(r["failure"]["class"], "not_restorable", "{r:#}");
    expect_phases(
        &r,
        [
            "failed", "skipped", "skipped", "skipped", "skipped", "passed",
        ],
    );
    // An empty directory is not a repository: the drill fails (the backups are not there).
    let empty = tempfile::tempdir()?;
    let o = drill(
        &[
            "--from",
            &format!("file://{}", empty.path().display()),
            "--scratch",
            &scratch,
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("no Tidemark repository"),
        "{r:#}"
    );
    assert_eq!(common::names(out.path()), Vec::<String>::new());

    // --help documents the drill's exit code and the check command's environment.
    let o = Command::new(env!("CARGO_BIN_EXE_tidemark-restore"))
        .args(["drill", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("TIDEMARK_DRILL_DB"), "{help}");
    let o = Command::new(env!("CARGO_BIN_EXE_tidemark-restore"))
        .arg("--help")
        .output()?;
    assert!(String::from_utf8_lossy(&o.stdout).contains("5  drill:"));
    Ok(())
}
