//! `tidemark-archiver check-store` and the archiver's start-up check of conditional writes,
//! against real stores:
//! - on the test S3 server (moto, or LocalStack with `TIDEMARK_TEST_S3_SERVER=localstack`),
//!   check-store reports create-only writes, their race, compare-and-swap, listing, range
//!   reads and multipart uploads as working, says what it found of checksums, signatures
//!   and the clock, and leaves no object behind;
//! - on a local directory it says which checks do not apply;
//! - behind the fault proxy stripping `If-None-Match` and `If-Match` (a store that ignores
//!   conditional writes), check-store reports it UNSAFE (and still exits 0), the archiver
//!   refuses to start (exit 2, naming the override), and starts with
//!   `--allow-unsafe-store`;
//! - a store that cannot be reached is exit 1, a bad URL exit 2;
//! - the store can be named by the archiver's config file (`--config`, `--database`), as
//!   `status` and `prune` take it; without any, it is bad usage.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tidemark_tests::faultproxy::{FaultPlan, FaultProxy, StripConditional};
use tidemark_tests::harness::{TestStore, bin, run_with_timeout};

/// Runs `tidemark-archiver ARGS` with the store's environment: exit code, stdout, stderr.
fn archiver(args: &[&str], store: &TestStore) -> Result<(i32, String, String)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_with_timeout(
        &bin("tidemark-archiver")?,
        &args,
        &store.env,
        Duration::from_secs(180),
    )
}

/// check-store's JSON report, after printing its table.
fn check_store(store: &TestStore) -> Result<Value> {
    let (code, table, err) = archiver(&["check-store", "--to", &store.url], store)?;
    ensure!(code == 0, "check-store exited {code}: {table}{err}");
    eprintln!("check-store on {}:\n{table}", store.describe);
    let (code, json, err) = archiver(&["check-store", "--to", &store.url, "--json"], store)?;
    ensure!(code == 0, "check-store --json exited {code}: {json}{err}");
    serde_json::from_str(&json).with_context(|| format!("not JSON: {json}"))
}

/// The status of the check whose name starts with `name`.
fn status<'a>(report: &'a Value, name: &str) -> Result<&'a str> {
    report["checks"]
        .as_array()
        .context("no checks")?
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .and_then(|c| c["status"].as_str())
        .with_context(|| format!("no check {name:?} in {report}"))
}

/// The server's name for messages.
fn server() -> String {
    std::env::var("TIDEMARK_TEST_S3_SERVER_NAME").unwrap_or_else(|_| "the S3 server".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_store_on_the_test_server_finds_what_tidemark_relies_on() -> Result<()> {
    let Some(store) = TestStore::s3("check-store").await? else {
        return Ok(());
    };
    let report = check_store(&store)?;
    for name in [
        "create-only write",
        "create-only race",
        "compare-and-swap",
        "listing",
        "range read",
        "multipart upload",
    ] {
        ensure!(
            status(&report, name)? == "ok",
            "{name} on {}: {report:#}",
            server()
        );
    }
    let race = report["checks"][1]["detail"].as_str().unwrap_or_default();
    ensure!(
        race.starts_with("1 of 16 racers won, 15 were refused"),
        "{race}"
    );
    // What the server does here is its own business, but it must be said, not skipped.
    let signatures = status(&report, "signatures checked")?;
    if std::env::var("TIDEMARK_TEST_S3_AUTH").as_deref() == Ok("1") {
        ensure!(
            signatures == "ok",
            "{} checks signatures: {report:#}",
            server()
        );
    } else {
        ensure!(
            signatures == "warn",
            "{} does not check signatures: {report:#}",
            server()
        );
    }
    for name in ["checksums checked", "clock skew"] {
        let s = status(&report, name)?;
        ensure!(["ok", "warn"].contains(&s), "{name}: {s} in {report:#}");
    }
    // Nothing left behind.
    let left = store.open_raw().await?.list("").await?;
    ensure!(left.is_empty(), "probe objects left: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_store_on_a_local_directory_says_what_applies() -> Result<()> {
    let store = TestStore::local()?;
    let root = store.local_root().context("local")?;
    // check-store does not create a repository directory: a missing one is an error.
    let (code, out, err) = archiver(&["check-store", "--to", &store.url], &store)?;
    ensure!(
        code != 0 && format!("{out}{err}").contains("repo"),
        "{code} {out}{err}"
    );
    std::fs::create_dir_all(&root)?;
    let report = check_store(&store)?;
    for name in [
        "create-only write",
        "create-only race",
        "compare-and-swap",
        "listing",
        "range read",
    ] {
        ensure!(status(&report, name)? == "ok", "{name}: {report:#}");
    }
    for name in [
        "multipart upload",
        "checksums checked",
        "signatures checked",
        "clock skew",
    ] {
        ensure!(
            status(&report, name)? == "not_applicable",
            "{name}: {report:#}"
        );
    }
    let left = store.open_raw().await?.list("").await?;
    ensure!(left.is_empty(), "probe objects left: {left:?}");
    // Only the empty `probe/` directory stays.
    let entries: Vec<String> = std::fs::read_dir(&root)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    ensure!(
        entries
            .iter()
            .all(|e| e == "probe" || e.starts_with(".tidemark-")),
        "{entries:?}"
    );

    // A bad URL is bad usage; a store nobody answers for cannot be probed.
    let (code, _, err) = archiver(&["check-store", "--to", "ftp://x/y"], &store)?;
    ensure!(code == 2, "bad URL: {code} {err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut nobody = store.env.clone();
    nobody.push(("TIDEMARK_ENDPOINT_URL".into(), format!("http://{closed}")));
    nobody.push(("AWS_ACCESS_KEY_ID".into(), "x".into()));
    nobody.push(("AWS_SECRET_ACCESS_KEY".into(), "y".into()));
    let (code, _, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &[
            "check-store".into(),
            "--to".into(),
            "s3://nobody/here".into(),
        ],
        &nobody,
        Duration::from_secs(120),
    )?;
    ensure!(
        code == 1 && err.contains("cannot probe"),
        "unreachable: {code} {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_ignores_conditional_writes_is_refused_unless_allowed() -> Result<()> {
    let Some(direct) = TestStore::s3("ignores-conditional").await? else {
        return Ok(());
    };
    let endpoint = direct.s3.endpoint_url.clone().context("endpoint")?;
    let proxy = FaultProxy::start(
        &endpoint,
        FaultPlan::stripping_conditional(StripConditional::from_env()),
        1,
    )?;
    let store = direct.through(&proxy.url())?;

    let report = check_store(&store)?;
    ensure!(
        status(&report, "create-only write")? == "unsafe",
        "{report:#}"
    );
    ensure!(
        status(&report, "create-only race")? == "unsafe",
        "{report:#}"
    );
    ensure!(
        status(&report, "compare-and-swap")? == "unsafe",
        "{report:#}"
    );
    ensure!(proxy.counts().stripped > 0, "{}", proxy.counts());

    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("db");
    let db = tidemark_tests::rocks::open_db(&db_path)?;
    for i in 0..100u32 {
        db.put(format!("k{i}"), b"v")?;
    }
    let db_arg = db_path.display().to_string();
    let backup = ["backup", "--db", &db_arg, "--to", &store.url];
    let (code, out, err) = archiver(&backup, &store)?;
    ensure!(
        code == 2
            && err.contains("refusing the store")
            && err.contains("If-None-Match")
            && err.contains("--allow-unsafe-store"),
        "an archiver on a store that ignores conditional writes: exit {code}\n{out}{err}"
    );
    ensure!(
        store.open_raw().await?.list("").await?.is_empty(),
        "a refused start wrote something"
    );

    // The override: the flag, then the config key.
    let allowed: Vec<&str> = backup
        .iter()
        .copied()
        .chain(["--allow-unsafe-store"])
        .collect();
    let (code, out, err) = archiver(&allowed, &store)?;
    ensure!(
        code == 0,
        "with --allow-unsafe-store: exit {code}\n{out}{err}"
    );
    ensure!(err.contains("--allow-unsafe-store"), "no warning: {err}");
    let config = dir.path().join("archiver.toml");
    std::fs::write(&config, "allow_unsafe_store = true\n")?;
    let config_arg = config.display().to_string();
    let with_config: Vec<&str> = backup
        .iter()
        .copied()
        .chain(["--config", &config_arg])
        .collect();
    db.put(b"after", b"v")?;
    let (code, out, err) = archiver(&with_config, &store)?;
    ensure!(
        code == 0,
        "with allow_unsafe_store = true: exit {code}\n{out}{err}"
    );
    let state = direct.open().await?.load().await?;
    ensure!(state.history.bases.len() == 2, "{:?}", state.history.bases);
    Ok(())
}

/// check-store probes the store of the archiver's config file, one database of a file that
/// lists several, and refuses when nothing names a store.
#[tokio::test(flavor = "multi_thread")]
async fn check_store_takes_the_store_from_the_config_file() -> Result<()> {
    let store = TestStore::local()?;
    std::fs::create_dir_all(store.local_root().context("local")?)?;
    let dir = tempfile::tempdir()?;
    let one = dir.path().join("one.toml");
    std::fs::write(
        &one,
        format!("db = \"/nonexistent/db\"\nto = \"{}\"\n", store.url),
    )?;
    let many = dir.path().join("many.toml");
    std::fs::write(
        &many,
        format!(
            "[[databases]]\nname = \"orders\"\ndb = \"/nonexistent/orders\"\nto = \"{}\"\n\n\
             [[databases]]\nname = \"users\"\ndb = \"/nonexistent/users\"\n\
             to = \"file:///nonexistent/users-repo\"\n",
            store.url
        ),
    )?;
    let one = one.display().to_string();
    let many = many.display().to_string();
    for args in [
        vec!["check-store", "--config", &one, "--json"],
        vec![
            "check-store",
            "--config",
            &many,
            "--database",
            "orders",
            "--json",
        ],
    ] {
        let (code, json, err) = archiver(&args, &store)?;
        ensure!(code == 0, "{args:?} exited {code}: {json}{err}");
        let report: Value = serde_json::from_str(&json).with_context(|| json.clone())?;
        ensure!(status(&report, "create-only write")? == "ok", "{report:#}");
    }
    let (code, out, err) = archiver(&["check-store", "--config", &many, "--json"], &store)?;
    ensure!(
        code == 2 && err.contains("--database"),
        "a file with several databases needs --database: {code} {out}{err}"
    );
    let (code, out, err) = archiver(&["check-store"], &store)?;
    ensure!(
        code == 2 && err.contains("--to"),
        "no store named is bad usage: {code} {out}{err}"
    );
    Ok(())
}
