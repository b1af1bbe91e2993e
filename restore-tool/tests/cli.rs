//! The `tidemark-restore` binary: its output, JSON and exit codes (0 ok, 2 bad usage or
//! input, 3 not restorable, 4 verification failed).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use common::{Archive, Source};
use tidemark_tests::harness::output_text as text;

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidemark-restore"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TIDEMARK_FROM")
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Fixture {
    source: Source,
    url: String,
}

async fn fixture() -> Result<Fixture> {
    let mut source = Source::new(31)?;
    let (repo, url) = common::local_repo(source.root.path()).await?;
    source.write(120)?;
    let mut archive = Archive::create(repo, &source).await?;
    archive.base(&source).await?;
    source.write(200)?;
    archive.checkpoint(&source).await?;
    source.finish()?;
    Ok(Fixture { source, url })
}

fn target(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_restore_and_verify_through_the_binary() -> Result<()> {
    let f = fixture().await?;
    let oracle = f.source.oracle()?;
    let last = oracle.last_seq();
    let out = tempfile::tempdir()?;

    // list: text with a timeline, and JSON.
    let o = cli(&["list", "--from", &f.url, "--width", "60"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s = stdout(&o);
    for needle in [
        "Base backups (1)",
        "Restorable window",
        "Timeline",
        "B base backup",
        &format!("..={last}"),
    ] {
        assert!(s.contains(needle), "{needle:?} missing: {}", text(&o));
    }
    assert!(s.lines().all(|l| l.chars().count() <= 140), "{s}");
    let o = cli(&["list", "--from", &f.url, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(j["latest"]["seq"], last);
    assert_eq!(j["bases"].as_array().unwrap().len(), 1);
    assert_eq!(j["time_precision"], "marker");

    // restore --dry-run writes nothing.
    let db = out.path().join("db");
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &target(&db),
        "--latest",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(stdout(&o).contains("Dry run"), "{}", text(&o));
    assert!(!db.exists());

    // restore --seq with --json, then the same target again without --force: refused (2).
    let seq = oracle.batches()[oracle.batches().len() - 20].last_seq();
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &target(&db),
        "--seq",
        &seq.to_string(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(j["cutoff"]["seq"], seq);
    assert_eq!(j["verification"]["status"], "passed");
    assert!(j["durations_ms"]["total"].as_u64().is_some());
    let (state, at) = tidemark_tests::read_db_state_and_seq(&db)?;
    assert_eq!(at, seq);
    assert!(oracle.state_at(seq)?.diff(&state).is_none());
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &target(&db),
        "--latest",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("--force"), "{}", text(&o));

    // --time with an offset and --tz.
    let b = &oracle.batches()[oracle.batches().len() - 50];
    let t = tidemark_manifest::model::time_from_micros(b.unix_micros)
        .to_offset(time::UtcOffset::from_hms(2, 0, 0)?);
    let naive = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    );
    let db2 = out.path().join("db2");
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &target(&db2),
        "--time",
        &naive,
        "--tz",
        "+02:00",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(j["cutoff"]["seq"], oracle.seq_at_time(b.unix_micros));
    assert_eq!(j["verification"]["level"], "quick", "the default level");
    assert_eq!(j["verification"]["status"], "passed");

    // --verify quick: the base's keys estimated, the WAL read back; the summary names the
    // level and each step.
    let db3 = out.path().join("db3");
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &target(&db3),
        "--latest",
        "--verify",
        "quick",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for needle in [
        "verification  passed (quick): the database ends at sequence",
        "base: opened alone, read-only",
        "WAL: ",
        "read back: checksums, batches, record chain",
    ] {
        assert!(stdout(&o).contains(needle), "{needle:?}: {}", text(&o));
    }
    let (state, at) = tidemark_tests::read_db_state_and_seq(&db3)?;
    assert_eq!(at, oracle.last_seq());
    assert!(oracle.state_at(at)?.diff(&state).is_none());

    // verify: deep, everything.
    let o = cli(&["verify", "--from", &f.url, "--all", "--deep"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(stdout(&o).contains("OK: no problems found"), "{}", text(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_unrestorable_targets_have_their_exit_codes() -> Result<()> {
    let f = fixture().await?;
    let out = tempfile::tempdir()?;
    let db = target(&out.path().join("db"));

    // Malformed times: 2, with examples.
    for bad in [
        "yesterday",
        "2026-13-01 00:00:00",
        "15 minutes",
        "2026-11-23",
    ] {
        let o = cli(&["restore", "--from", &f.url, "--target", &db, "--time", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(stderr(&o).contains("15m ago"), "{bad}: {}", text(&o));
    }
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &db,
        "--time",
        "1h ago",
        "--tz",
        "Europe/Berlin",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        stderr(&o).contains("named time zones are not supported"),
        "{}",
        text(&o)
    );

    // No target point, or two: clap's usage error, 2.
    let o = cli(&["restore", "--from", &f.url, "--target", &db]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = cli(&[
        "restore", "--from", &f.url, "--target", &db, "--latest", "--seq", "5",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Not a repository: 2.
    let empty = tempfile::tempdir()?;
    let o = cli(&[
        "list",
        "--from",
        &format!("file://{}", empty.path().display()),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        stderr(&o).contains("no Tidemark repository"),
        "{}",
        text(&o)
    );
    let o = cli(&["list", "--from", "/plain/path"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Before and after the window: 3, and the window is shown; JSON errors for automation.
    let o = cli(&["restore", "--from", &f.url, "--target", &db, "--seq", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(stderr(&o).contains("the window is"), "{}", text(&o));
    let o = cli(&[
        "restore",
        "--from",
        &f.url,
        "--target",
        &db,
        "--time",
        "2099-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(j["exit_code"], 3);
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("after the newest archived point")
    );
    assert!(!out.path().join("db").exists());

    // A corrupt segment: restore and verify --deep fail with 4, naming it.
    let repo_dir = f.source.root.path().join("repo");
    let mut segs: Vec<_> = std::fs::read_dir(repo_dir.join("wal"))?
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let victim = segs.last().unwrap();
    let key = format!("wal/{}", victim.file_name().unwrap().to_string_lossy());
    let mut bytes = std::fs::read(victim)?;
    let n = bytes.len();
    bytes[n - 60] ^= 0x01;
    std::fs::write(victim, bytes)?;
    let o = cli(&["restore", "--from", &f.url, "--target", &db, "--latest"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(stderr(&o).contains(&key), "{}", text(&o));
    assert_eq!(common::names(out.path()), Vec::<String>::new());
    let o = cli(&["verify", "--from", &f.url, "--deep"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(stdout(&o).contains(&key), "{}", text(&o));

    // --help documents the exit codes.
    let o = cli(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("Exit codes:")
            && stdout(&o).contains("3  the target is not restorable")
    );
    Ok(())
}
