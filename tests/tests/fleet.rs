//! Several databases in one archiver process (`[[databases]]` in the config file), each
//! written by its own load generator, against the local-directory store and the S3 server
//! (one prefix per database in one bucket): the healthy ones archive completely and restore
//! exactly while one fails for good (a repository it cannot write) and one fails until its
//! database appears; the failures show in the log, in the metrics under their `database`
//! label and in `/health`; `backup --database NAME` takes a base of that database alone;
//! SIGTERM stops them all, and the exit code and the summary name the failed one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tidemark_tests::harness::{
    Proc, TestStore, bin, check_history, http_get, logged_metrics_addr, metric_sample,
    wait_archived, wait_for, wait_for_database,
};
use tidemark_tests::{Oracle, read_db_state_and_seq};

fn series(name: &str, db: &str) -> String {
    format!("{name}{{database=\"{db}\"}}")
}

/// A database the test writes: its directory, its oracle and its repository.
struct Db {
    name: &'static str,
    dir: PathBuf,
    store: TestStore,
}

impl Db {
    fn db(&self) -> PathBuf {
        self.dir.join(format!("{}-db", self.name))
    }
    fn out(&self) -> PathBuf {
        self.dir.join(format!("{}-oracle", self.name))
    }

    fn loadgen(&self, seed: u64) -> Result<Proc> {
        let a: Vec<String> = [
            "--db",
            &self.db().display().to_string(),
            "--out",
            &self.out().display().to_string(),
            "--duration",
            "6",
            "--rate",
            "300",
            "--seed",
            &seed.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Proc::spawn(
            &bin("tidemark-loadgen")?,
            &a,
            &[],
            &self.dir.join(format!("{}-loadgen.log", self.name)),
        )
    }

    fn toml(&self) -> String {
        format!(
            "[[databases]]\nname = \"{}\"\ndb = \"{}\"\nto = \"{}\"\n",
            self.name,
            self.db().display(),
            self.store.url
        )
    }
}

async fn base_count(db: &Db) -> Result<usize> {
    Ok(db.store.open().await?.load().await?.history.bases.len())
}

/// Restores the latest point with `tidemark-restore` and compares it with the oracle.
fn restore_latest_exactly(db: &Db, oracle: &Oracle) -> Result<()> {
    let target = db.dir.join(format!("{}-restored", db.name));
    let out = Command::new(bin("tidemark-restore")?)
        .args(["--quiet", "restore", "--latest", "--from", &db.store.url])
        .arg("--target")
        .arg(&target)
        .envs(db.store.env.iter().map(|(k, v)| (k, v)))
        .output()
        .context("running tidemark-restore")?;
    ensure!(
        out.status.success(),
        "restoring {} failed ({}):\n{}",
        db.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (actual, seq) = read_db_state_and_seq(&target)?;
    ensure!(
        seq == oracle.last_seq(),
        "{} restored to sequence {seq}, the writer's last is {}",
        db.name,
        oracle.last_seq()
    );
    if let Some(d) = oracle.state_at(seq)?.diff(&actual) {
        bail!("{} restored differs from what was written: {d}", db.name);
    }
    eprintln!("{}: restored exactly to sequence {seq}", db.name);
    Ok(())
}

/// `stores`: one repository each for alpha, beta and gamma; `broken_to`: a repository URL
/// the archiver cannot write, for delta.
async fn many_databases(stores: [TestStore; 3], broken_to: String) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let env = stores[0].env.clone();
    let [a, b, c] = stores;
    let dir = tmp.path().to_path_buf();
    let alpha = Db {
        name: "alpha",
        dir: dir.clone(),
        store: a,
    };
    let beta = Db {
        name: "beta",
        dir: dir.clone(),
        store: b,
    };
    let gamma = Db {
        name: "gamma",
        dir: dir.clone(),
        store: c,
    };
    eprintln!("archiving three databases into {}", alpha.store.describe);
    let mut writers = vec![alpha.loadgen(1)?, beta.loadgen(2)?];
    for db in [&alpha, &beta] {
        wait_for_database(&db.db())?;
    }
    // delta: a database that exists, with a repository that cannot be written.
    let delta_db = dir.join("delta-db");
    {
        let _db = tidemark_tests::open_db(&delta_db)?;
    }
    let config = dir.join("archiver.toml");
    std::fs::write(
        &config,
        format!(
            "sync_interval = \"200ms\"\ncheckpoint_interval = \"1s\"\nbase_interval = \"1h\"\n\
             metrics_addr = \"127.0.0.1:0\"\n\n{}\n{}\n{}\n\
             [[databases]]\nname = \"delta\"\ndb = \"{}\"\nto = \"{broken_to}\"\n",
            alpha.toml(),
            beta.toml(),
            gamma.toml(),
            delta_db.display()
        ),
    )?;
    let log = dir.join("archiver.log");
    let mut arch = Proc::spawn(
        &bin("tidemark-archiver")?,
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &env,
        &log,
    )?;
    let addr = wait_for(Duration::from_secs(30), "the metrics address", || {
        logged_metrics_addr(&log)
    })
    .with_context(|| arch.log_tail())?;

    // gamma's directory does not exist yet, delta's repository cannot be written: both are
    // reported as failed, under their own label, while the process runs on.
    wait_for(
        Duration::from_secs(60),
        "gamma and delta reported as failed",
        || {
            let (_, _, body) = http_get(addr, "/metrics").ok()?;
            let failed = |db: &str| {
                metric_sample(&body, &series("tidemark_database_failures_total", db))
                    .is_some_and(|n| n >= 1.0)
                    && metric_sample(&body, &series("tidemark_database_up", db)) == Some(0.0)
            };
            (failed("gamma") && failed("delta")).then_some(())
        },
    )
    .with_context(|| arch.log_tail())?;
    let (status, _, body) = http_get(addr, "/health")?;
    ensure!(
        status == 503 && body.starts_with("unhealthy\n") && body.contains("\ndelta: failed ("),
        "/health with failed databases: {status} {body:?}"
    );
    // The operator creates gamma's database: it is picked up at its next start.
    writers.push(gamma.loadgen(3)?);
    for w in &mut writers {
        let status = w.wait_timeout(Duration::from_secs(60))?;
        ensure!(status.success(), "load generator failed:\n{}", w.log_tail());
    }
    let mut oracles = Vec::new();
    for db in [&alpha, &beta, &gamma] {
        let oracle = Oracle::open(&db.out())?;
        wait_archived(
            &db.store,
            oracle.last_seq(),
            &mut arch,
            Duration::from_secs(90),
        )
        .await?;
        oracles.push(oracle);
    }

    // One scrape: each healthy database durable up to its writer's last sequence, delta
    // down and counted as failed, the process-wide retry counter once and unlabelled.
    let (status, _, body) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    for (db, oracle) in [&alpha, &beta, &gamma].iter().zip(&oracles) {
        let durable = metric_sample(&body, &series("tidemark_newest_durable_sequence", db.name));
        ensure!(
            durable == Some(oracle.last_seq() as f64),
            "{}: durable {durable:?}, written {}",
            db.name,
            oracle.last_seq()
        );
        ensure!(
            metric_sample(&body, &series("tidemark_database_up", db.name)) == Some(1.0),
            "{} is not up:\n{body}",
            db.name
        );
        ensure!(
            metric_sample(&body, &series("tidemark_lease_held", db.name)) == Some(1.0),
            "{} holds no lease",
            db.name
        );
    }
    ensure!(metric_sample(&body, &series("tidemark_database_up", "delta")) == Some(0.0));
    ensure!(
        metric_sample(&body, &series("tidemark_database_failures_total", "alpha")) == Some(0.0),
        "alpha never failed"
    );
    ensure!(metric_sample(&body, "tidemark_store_retries_total").is_some());
    ensure!(
        body.matches("# TYPE tidemark_newest_durable_sequence ")
            .count()
            == 1,
        "one family for all databases"
    );
    let (status, _, body) = http_get(addr, "/health")?;
    ensure!(
        status == 503
            && body.contains("\nalpha: running\n")
            && body.contains("\ngamma: running\n")
            && body.contains("\ndelta: failed ("),
        "/health: {status} {body:?}"
    );
    let text = std::fs::read_to_string(&log)?;
    let failed_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("DATABASE FAILED"))
        .collect();
    ensure!(
        failed_lines.iter().any(|l| l.contains("database=delta")),
        "no failure logged for delta:\n{}",
        arch.log_tail()
    );
    ensure!(
        !failed_lines
            .iter()
            .any(|l| l.contains("database=alpha") || l.contains("database=beta")),
        "a healthy database was logged as failed: {failed_lines:?}"
    );

    // A base backup of alpha alone, asked of the running process.
    let (alpha_bases, beta_bases) = (base_count(&alpha).await?, base_count(&beta).await?);
    let out = Command::new(bin("tidemark-archiver")?)
        .args(["backup", "--database", "alpha", "--config"])
        .arg(&config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alpha: asked"),
        "backup --database alpha: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = alpha.store.open().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while repo.load().await?.history.bases.len() <= alpha_bases {
        ensure!(
            std::time::Instant::now() < deadline,
            "no new base for alpha:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        base_count(&beta).await? == beta_bases,
        "beta took a base it was not asked for"
    );
    let text = std::fs::read_to_string(&log)?;
    let requested: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("base backup requested"))
        .collect();
    ensure!(
        requested.iter().any(|l| l.contains("alpha"))
            && !requested.iter().any(|l| l.contains("beta")),
        "the request went elsewhere: {requested:?}"
    );

    // SIGTERM stops all; delta was failing, so the exit code is 1 and the summary says so.
    arch.signal("TERM")?;
    let status = arch.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.code() == Some(1),
        "exit {status}, expected 1 (delta had failed):\n{}",
        arch.log_tail()
    );
    let text = std::fs::read_to_string(&log)?;
    let summary: serde_json::Value = text
        .lines()
        .find(|l| l.starts_with("{\"databases\""))
        .context("no summary on standard output")
        .and_then(|l| Ok(serde_json::from_str(l)?))?;
    let of = |name: &str| {
        summary["databases"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    for name in ["alpha", "beta", "gamma"] {
        ensure!(of(name)["status"] == "ok", "{name}: {}", of(name));
    }
    ensure!(
        of("gamma")["failures"].as_u64() >= Some(1),
        "{}",
        of("gamma")
    );
    let delta = of("delta");
    ensure!(
        delta["status"] == "failed" && delta["error"].as_str().is_some_and(|e| !e.is_empty()),
        "delta: {delta}"
    );
    ensure!(
        text.contains("1 of 4 databases had failed: delta"),
        "{}",
        arch.log_tail()
    );

    for (db, oracle) in [&alpha, &beta, &gamma].iter().zip(&oracles) {
        check_history(&db.store, oracle, 1).await?;
        let repo = db.store.open().await?;
        ensure!(
            repo.read_lease()
                .await?
                .is_some_and(|(l, _)| l.released_at.is_some()),
            "{}: the lease was not released",
            db.name
        );
        restore_latest_exactly(db, oracle)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn many_databases_in_one_process_local() -> Result<()> {
    // Under /proc no directory can be created, not even by root.
    many_databases(
        [
            TestStore::local()?,
            TestStore::local()?,
            TestStore::local()?,
        ],
        "file:///proc/tidemark-cannot-write/repo".to_owned(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn many_databases_in_one_process_s3() -> Result<()> {
    let mut stores = Vec::new();
    for name in ["fleet-alpha", "fleet-beta", "fleet-gamma"] {
        match TestStore::s3(name).await? {
            Some(s) => stores.push(s),
            None => return Ok(()),
        }
    }
    let stores: [TestStore; 3] = stores.try_into().expect("three stores");
    // The three prefixes share one bucket; delta's bucket does not exist.
    let bucket = |url: &str| {
        url.trim_start_matches("s3://")
            .split('/')
            .next()
            .map(str::to_owned)
    };
    ensure!(
        stores
            .iter()
            .all(|s| bucket(&s.url) == bucket(&stores[0].url))
    );
    let missing = format!("s3://tidemark-missing-{:08x}/delta", rand::random::<u32>());
    many_databases(stores, missing).await
}

/// A config file with two databases on one repository is refused before anything starts.
#[test]
fn a_shared_repository_is_refused_at_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("archiver.toml");
    std::fs::write(
        &config,
        "[[databases]]\nname = \"a\"\ndb = \"/srv/a\"\nto = \"file:///srv/repo\"\n\
         [[databases]]\nname = \"b\"\ndb = \"/srv/b\"\nto = \"file:///srv/repo/\"\n",
    )?;
    let out = Command::new(bin("tidemark-archiver")?)
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.contains("databases a and b have the same repository"),
        "{}: {stderr}",
        out.status
    );
    Ok(())
}
